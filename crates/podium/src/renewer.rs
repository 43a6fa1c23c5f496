//! Routine renewals, outside the reconcile. A reconcile that keeps a holder hands it here with
//! the time its Lease is next due ([`Decision::renew_after`](crate::election::Decision)); the
//! renewer then renews it every half TTL from the freshest copy of the Lease the operator has
//! (our own last write while the cache lags it, else the cache), with no observation and no
//! decision, and the group is decided again only when something happens to it or at its resync.
//! At 1000 groups the reconcile around each renewal (the controller queue, observing the pods,
//! deciding, reporting) was about half the operator's CPU.
//!
//! Whatever the renewer cannot vouch for ([`renewal::next`]) or fails to write goes back to a
//! reconcile through the controller's trigger stream, and the entry is dropped until a
//! reconcile hands the group over again. Like every other writer it sends only while this
//! replica holds the operator claim, checked before each write.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use podium_core::renewal::{self, Holding, Next};
use tokio::sync::{mpsc, watch};
use tokio_util::time::{DelayQueue, delay_queue};

use crate::crd::ElectionGroup;
use crate::election;
use crate::lean_lease::LeanLease;
use crate::lease;
use crate::memory::{Key, Memory};
use crate::metrics::Metrics;

/// Renewals in flight at once, as many as the controller's reconciles.
const MAX_IN_FLIGHT: usize = 64;

/// The handle reconciles use. Commands are applied in the order they are sent.
#[derive(Clone)]
pub struct Renewer {
    commands: mpsc::UnboundedSender<Command>,
}

enum Command {
    Hold {
        key: Key,
        holding: Holding,
        after: Duration,
    },
    Release(Key),
}

/// What the renewer reads and writes through.
pub struct Sources {
    pub client: Client,
    pub groups: Store<ElectionGroup>,
    pub leases: Store<Lease>,
    pub memory: Arc<Memory>,
    pub leading: watch::Receiver<bool>,
    pub claim: watch::Receiver<crate::ha::Claim>,
    pub metrics: Arc<Metrics>,
}

impl Renewer {
    /// Starts the renewer's task; groups it hands back for a reconcile go to `decide`.
    pub fn start(
        sources: Sources,
        decide: mpsc::UnboundedSender<ObjectRef<ElectionGroup>>,
    ) -> Renewer {
        let (commands, received) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::new(sources), received, decide));
        Renewer { commands }
    }

    /// From now on the renewer renews `holding` for the group `key`, first in `after`.
    pub fn hold(&self, key: Key, holding: Holding, after: Duration) {
        let _ = self.commands.send(Command::Hold {
            key,
            holding,
            after,
        });
    }

    /// The group's holder is no longer the renewer's to renew (nobody leads, or a reconcile
    /// failed and will decide again).
    pub fn release(&self, key: &Key) {
        let _ = self.commands.send(Command::Release(key.clone()));
    }
}

struct Entry {
    holding: Holding,
    /// Bumped by every command about the group: a renewal that finishes after a newer command
    /// must not act on the entry it was started for.
    generation: u64,
    timer: Option<delay_queue::Key>,
}

enum Outcome {
    /// Renewed; the next one is due in this long.
    Renewed(Duration),
    /// This replica is not the operator leader; the reconcile of every group on becoming it
    /// hands the group over again.
    NotLeading,
    /// The group needs a decision; nothing was sent.
    Decide(String),
    /// The write was refused or got no answer; the group needs a decision.
    Failed(String),
}

async fn run(
    sources: Arc<Sources>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    decide: mpsc::UnboundedSender<ObjectRef<ElectionGroup>>,
) {
    let mut entries: HashMap<Key, Entry> = HashMap::new();
    let mut timers: DelayQueue<Key> = DelayQueue::new();
    let mut due: VecDeque<(Key, u64)> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut generations = 0_u64;
    loop {
        while in_flight.len() < MAX_IN_FLIGHT {
            let Some((key, generation)) = due.pop_front() else {
                break;
            };
            let Some(entry) = entries.get(&key).filter(|e| e.generation == generation) else {
                continue;
            };
            let (sources, holding) = (sources.clone(), entry.holding.clone());
            in_flight.push(async move {
                let outcome = renew(&sources, &key, &holding).await;
                (key, generation, outcome)
            });
        }
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return };
                generations += 1;
                match command {
                    Command::Hold { key, holding, after } => {
                        if let Some(old) = entries.remove(&key).and_then(|e| e.timer) {
                            timers.remove(&old);
                        }
                        let timer = Some(timers.insert(key.clone(), after));
                        entries.insert(key, Entry { holding, generation: generations, timer });
                    }
                    Command::Release(key) => {
                        if let Some(old) = entries.remove(&key).and_then(|e| e.timer) {
                            timers.remove(&old);
                        }
                    }
                }
            }
            Some(expired) = timers.next() => {
                let key = expired.into_inner();
                if let Some(entry) = entries.get_mut(&key) {
                    entry.timer = None;
                    due.push_back((key, entry.generation));
                }
            }
            Some((key, generation, outcome)) = in_flight.next() => {
                let current = entries.get(&key).is_some_and(|e| e.generation == generation);
                if !current {
                    continue;
                }
                match outcome {
                    Outcome::Renewed(next) => {
                        let timer = timers.insert(key.clone(), next);
                        if let Some(entry) = entries.get_mut(&key) {
                            entry.timer = Some(timer);
                        }
                    }
                    Outcome::NotLeading => {
                        entries.remove(&key);
                    }
                    Outcome::Decide(why) | Outcome::Failed(why) => {
                        tracing::debug!(namespace = %key.0, group = %key.1, %why, "renewal handed back to a reconcile");
                        entries.remove(&key);
                        let _ = decide.send(ObjectRef::new(&key.1).within(&key.0));
                    }
                }
            }
        }
    }
}

/// One renewal of `holding`, from the freshest Lease this replica has, counted by its result.
async fn renew(sources: &Sources, key: &Key, holding: &Holding) -> Outcome {
    let outcome = send_renewal(sources, key, holding).await;
    match &outcome {
        Outcome::Renewed(_) => sources.metrics.renewal("renewed"),
        Outcome::Failed(_) => sources.metrics.renewal("failed"),
        Outcome::Decide(_) => sources.metrics.renewal("handed_back"),
        Outcome::NotLeading => {}
    }
    outcome
}

async fn send_renewal(sources: &Sources, key: &Key, holding: &Holding) -> Outcome {
    let (namespace, name) = key;
    if !*sources.leading.borrow() {
        return Outcome::NotLeading;
    }
    if sources.memory.lease_is_stale(key) {
        return Outcome::Decide("the cached Lease is known to be stale".into());
    }
    let group = sources.groups.get(&ObjectRef::new(name).within(namespace));
    let lease = sources.memory.freshest_lease(
        key,
        sources.leases.get(&ObjectRef::new(name).within(namespace)),
    );
    let renewed = match renewal::next(
        group.as_deref(),
        lease.as_deref(),
        holding,
        Timestamp::now(),
    ) {
        Next::Send(renewed) => *renewed,
        Next::Decide(why) => return Outcome::Decide(why.into()),
    };
    if !sources.claim.borrow().is_current() {
        // Still leading, but the claim lapsed (its renewal is late): the reconcile retries until
        // it is current again, where dropping the group would leave it unrenewed until a resync.
        return Outcome::Decide("the operator claim lapsed".into());
    }
    let api: Api<LeanLease> = Api::namespaced(sources.client.clone(), namespace);
    match lease::write(&api, renewed, false).await {
        Ok(written) => {
            let ttl = written
                .spec
                .as_ref()
                .and_then(|s| s.lease_duration_seconds)
                .unwrap_or_default();
            sources
                .memory
                .wrote_lease(key, lease.and_then(|l| l.resource_version()), written);
            Outcome::Renewed(election::renew_interval(ttl))
        }
        Err(e) => {
            let conflict = e.is_conflict();
            sources.memory.lease_write_failed(key, conflict);
            Outcome::Failed(e.to_string())
        }
    }
}
