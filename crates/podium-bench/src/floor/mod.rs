//! The floors: bare clients that do only the writes the protocol requires, on the same control
//! plane, group and pods as Podium's rows, so that each Podium figure can be read as a ratio
//! to the least that work can cost here, whatever the machine.
//!
//! - [`failover`]: after the watch event that makes the leader ineligible, fence, Lease
//!   compare-and-swap, promote, status; versions from its own watch cache, no reads.
//! - [`election`]: for each new group, Lease create, leader and follower labels, status, with
//!   the operator's concurrency limit.
//! - [`renewal`]: every Lease renewed each TTL/2, on a thread of its own so that its CPU time
//!   can be read apart from the harness's.
//!
//! The writes are sent with podium's own write functions and bodies (`podium::labels`,
//! `podium::lease`, `podium::status`): the floor differs from Podium only in what decides
//! them, which is the part whose cost the ratios show.

pub mod election;
pub mod failover;
pub mod renewal;
pub mod report;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

use podium_core::crd::{ElectionGroup, ElectionGroupStatus, conditions};
use podium_testkit::observe::Change;
use podium_testkit::pod::is_serving;

/// podium's `controller::MAX_CONCURRENT_RECONCILES` (private there): the election floor may
/// have as many groups in flight as the operator may reconcile at once.
pub const OPERATOR_CONCURRENCY: usize = 64;

/// Objects by name, each kept at the highest resourceVersion seen, whether from the floor's
/// watch or from the answer to its own write: an answer often arrives before the watch event
/// of the same write, and acting on the older version would cost a 409 and a retry, which a
/// real floor would not pay.
pub struct Cache<K> {
    objects: HashMap<String, K>,
    listing: HashMap<String, K>,
    /// When the floor's watch delivered each object's latest change (its deletion included).
    changed_at: HashMap<String, Instant>,
    /// Names seen for the first time, until taken.
    fresh: Vec<String>,
    pub synced: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            objects: HashMap::new(),
            listing: HashMap::new(),
            changed_at: HashMap::new(),
            fresh: Vec::new(),
            synced: false,
        }
    }
}

/// etcd's revisions are numbers; the API contract calls them opaque, but a bench on its own
/// etcd may compare them.
fn version<K: Resource>(object: &K) -> u64 {
    object
        .meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl<K: Resource + Clone> Cache<K> {
    pub fn apply(&mut self, at: Instant, change: Change<K>) {
        match change {
            Change::Relisting => self.listing.clear(),
            Change::Listing(object) => {
                self.listing.insert(object.name_any(), object);
            }
            Change::Listed => {
                let new = self
                    .listing
                    .keys()
                    .filter(|n| !self.objects.contains_key(*n));
                self.fresh.extend(new.cloned());
                self.objects = std::mem::take(&mut self.listing);
                self.synced = true;
            }
            Change::Applied(object) => {
                let name = object.name_any();
                if self.offer(object) {
                    self.changed_at.insert(name, at);
                }
            }
            Change::Deleted(object) => {
                let name = object.name_any();
                self.objects.remove(&name);
                self.changed_at.insert(name, at);
            }
        }
    }

    /// Keeps `object` if it is newer than what is cached; whether it was.
    pub fn offer(&mut self, object: K) -> bool {
        let name = object.name_any();
        match self.objects.get(&name) {
            Some(known) if version(known) >= version(&object) => false,
            known => {
                if known.is_none() {
                    self.fresh.push(name.clone());
                }
                self.objects.insert(name, object);
                true
            }
        }
    }

    /// The names seen for the first time since the last call.
    pub fn take_fresh(&mut self) -> Vec<String> {
        std::mem::take(&mut self.fresh)
    }

    pub fn get(&self, name: &str) -> Option<&K> {
        self.objects.get(name)
    }

    pub fn values(&self) -> impl Iterator<Item = &K> {
        self.objects.values()
    }

    pub fn changed_at(&self, name: &str) -> Option<Instant> {
        self.changed_at.get(name).copied()
    }
}

/// What a floor knows of the world, fed by its watches and by its own writes.
#[derive(Default)]
pub struct World {
    pub pods: Cache<Pod>,
    pub leases: Cache<Lease>,
    pub groups: Cache<ElectionGroup>,
}

/// The world, a wake-up for the floor's task, and the floor's own account of its writes.
#[derive(Default)]
pub struct Shared {
    world: Mutex<World>,
    wake: Notify,
    writes: Mutex<Writes>,
}

#[derive(Clone, Debug, Default)]
pub struct Writes {
    pub sent: u64,
    pub failed: u64,
    pub last: Option<Instant>,
}

impl Shared {
    pub fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A watch callback feeding one of the world's caches and waking the floor.
    pub fn feed<K>(
        self: &Arc<Self>,
        cache: fn(&mut World) -> &mut Cache<K>,
    ) -> impl FnMut(Instant, Change<K>) + Send + 'static
    where
        K: Resource + Clone + Send + 'static,
    {
        let shared = self.clone();
        move |at, change| {
            cache(&mut shared.world()).apply(at, change);
            shared.wake.notify_one();
        }
    }

    /// Counts one write and its outcome; hands back its answer.
    pub fn wrote<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        let mut w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        w.sent += 1;
        w.failed += u64::from(result.is_err());
        w.last = Some(Instant::now());
        result
    }

    pub fn writes(&self) -> Writes {
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the floor has sent nothing for `quiet` (at most `timeout`).
    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) {
        let started = Instant::now();
        loop {
            let idle = self.writes().last.is_none_or(|t| t.elapsed() >= quiet);
            if idle || started.elapsed() >= timeout {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The status a floor writes: what `kubectl get` and the bench's own waits read (leader,
/// epoch, counts) and the one condition that says so. At least one condition: a server-side
/// apply that drops every condition its manager owned leaves `conditions: null`, which the
/// CRD's schema refuses (422).
pub fn status(
    group: &ElectionGroup,
    leader: &Pod,
    epoch: i32,
    members: usize,
    eligible: usize,
    now: Timestamp,
) -> ElectionGroupStatus {
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    ElectionGroupStatus {
        leader: Some(leader.name_any()),
        leader_uid: leader.uid(),
        epoch: Some(epoch),
        leader_since: Some(Time(now)),
        members: count(members),
        eligible_members: count(eligible),
        eligible: Some(format!("{eligible}/{members}")),
        observed_generation: group.metadata.generation,
        conditions: vec![Condition {
            type_: conditions::LEADER_ELECTED.into(),
            status: conditions::TRUE.into(),
            reason: conditions::reasons::ELECTED.into(),
            message: format!("pod {} leads at epoch {epoch}", leader.name_any()),
            observed_generation: group.metadata.generation,
            last_transition_time: Time(now),
        }],
        ..Default::default()
    }
}

/// Members the floor may elect: Ready and not Terminating, as podium's default eligibility.
pub fn eligible(pod: &Pod) -> bool {
    is_serving(pod)
}
