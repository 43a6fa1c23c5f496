//! Role notifications for groups with `spec.notify`: after each reconcile the group's state goes
//! to a task of its own, which tells every member its role over HTTP, renews the leader's term,
//! and activates a new leader only once its predecessor has stopped ([`podium_core::notify`]).
//! Sends never hold a reconcile: updates go through a bounded queue, and each send is a task
//! of its own, at most one per pod in flight.
//!
//! Tenants share the sends in flight ([`podium_core::notify::fair`]): each namespace holds at
//! most its share of them, groups that had to wait for a slot take the next ones in turn, and
//! only a demotion may take long to answer. So pods that accept connections and never answer
//! cost their own namespace its share, and no other namespace its renewals.
//!
//! Only the replica that holds the operator claim sends, checked before each send; a replica
//! that (re)gains it starts from nothing, and activates nobody new for one term (see
//! `activation::decide`'s `since`).

mod send;
mod stalled;
mod token;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pod::ElectionPod;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::{mpsc, watch};

use podium_core::crd::NotifySpec;
use podium_core::election::Holder;
use podium_core::notify::fair::{self, Admit, Caps, Held, Turns};
use podium_core::notify::plan::{self, Delivered, GroupView, PodView};
use podium_core::notify::stall::{self, Heard, Stalled};
use podium_core::notify::{Ack, Link, NotifyRole, RoleMessage};

pub use send::{SendError, Sender};
pub use stalled::Stalls;
pub use token::TokenSource;

use crate::metrics::Metrics;

/// Group updates waiting for the notifier, at most; more means the notifier cannot keep up,
/// and a dropped update is repeated by the group's next reconcile.
const QUEUE: usize = 4096;
/// Sends in flight at once: over all groups, and per namespace.
const CAPS: Caps = Caps::DEFAULT;
/// Backoff after a failed or refused send: 0, 50, 100, 200 ms, ... up to 2 s.
const BACKOFF_STEP: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

pub type GroupKey = (String, String);

/// One pod the group's messages go to: a member, or a former member that may still run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: String,
}

/// A group's state after a reconcile.
#[derive(Clone, Debug)]
pub struct GroupUpdate {
    pub key: GroupKey,
    /// `None`: the group is gone or no longer asks for notifications. Its pods are told
    /// `follower` until each has stopped or timed out.
    pub notify: Option<NotifySpec>,
    pub leader: Option<Holder>,
    pub epoch: u64,
    pub term: Duration,
    pub targets: Vec<Target>,
}

/// The handle reconciles use.
#[derive(Clone)]
pub struct Notifier {
    updates: mpsc::Sender<GroupUpdate>,
    /// Groups the notifier serves, so that a group without `spec.notify` costs nothing unless
    /// it just dropped it.
    known: Arc<Mutex<HashSet<GroupKey>>>,
    stalls: Arc<Stalls>,
}

impl Notifier {
    /// Starts the notifier task. `tokens` is `None` when the operator has no ServiceAccount to
    /// sign with; groups asking for notifications then get a warning and nothing is sent.
    /// Groups whose stalled members changed go to `decide` for a reconcile that reports them.
    pub fn start(
        pods: Store<ElectionPod>,
        tokens: Option<TokenSource>,
        leading: watch::Receiver<bool>,
        claim: watch::Receiver<crate::ha::Claim>,
        metrics: Arc<Metrics>,
        decide: mpsc::UnboundedSender<ObjectRef<crate::crd::ElectionGroup>>,
    ) -> Notifier {
        let (updates, queued) = mpsc::channel(QUEUE);
        let known = Arc::new(Mutex::new(HashSet::new()));
        let stalls = Arc::new(Stalls::default());
        let task = Task {
            pods,
            tokens: tokens.map(Arc::new),
            leading,
            claim,
            metrics,
            sender: send::Sender::default(),
            origin: Instant::now(),
            since: 0,
            groups: HashMap::new(),
            in_flight: 0,
            in_flight_by_namespace: HashMap::new(),
            turns: Turns::default(),
            known: known.clone(),
            stalls: stalls.clone(),
            decide,
        };
        tokio::spawn(task.run(queued));
        Notifier {
            updates,
            known,
            stalls,
        }
    }

    /// The members that stall the group, as the notifier last judged them.
    pub fn stalled(&self, key: &GroupKey) -> Vec<Stalled> {
        self.stalls.of(key)
    }

    /// The group's stalls that started since the last call, to announce once each.
    pub fn stalls_started(&self, key: &GroupKey) -> Vec<Stalled> {
        self.stalls.take_started(key)
    }

    /// Hands the group's new state to the notifier; never waits.
    pub fn update(&self, update: GroupUpdate) {
        {
            let mut known = self.known.lock().expect("notifier set poisoned");
            if update.notify.is_some() {
                known.insert(update.key.clone());
            } else if !known.remove(&update.key) {
                return;
            }
        }
        if let Err(e) = self.updates.try_send(update) {
            tracing::warn!(error = %e, "notification queue full; the group's next reconcile repeats it");
        }
    }
}

struct PodState {
    uid: String,
    member: bool,
    link: Link,
    /// What this replica heard from the pod, to judge whether it stalls the group.
    heard: Heard,
    /// The pod's latest nonce and when it arrived: a `leader` message echoing it grants a term
    /// that ends one term after that ([`Link::granted`]).
    nonce: Option<(String, u64)>,
    delivered: Option<Delivered>,
    busy: bool,
    failures: u32,
    retry_at: u64,
}

struct GroupState {
    notify: Option<NotifySpec>,
    /// The spec of the last update that had one: former members are still told `follower`
    /// after the group dropped `spec.notify` or went away.
    address: NotifySpec,
    leader: Option<Holder>,
    epoch: u64,
    term_millis: u64,
    pods: BTreeMap<String, PodState>,
    wake_at: Option<u64>,
    /// When the leader was last seen pending, to report how long its activation waited.
    pending_since: Option<u64>,
}

struct Answer {
    key: GroupKey,
    pod: String,
    role: NotifyRole,
    epoch: u64,
    result: Result<Ack, SendError>,
    took: Duration,
}

struct Task {
    pods: Store<ElectionPod>,
    tokens: Option<Arc<TokenSource>>,
    leading: watch::Receiver<bool>,
    claim: watch::Receiver<crate::ha::Claim>,
    metrics: Arc<Metrics>,
    sender: send::Sender,
    origin: Instant,
    since: u64,
    groups: HashMap<GroupKey, GroupState>,
    in_flight: usize,
    /// Counted at each send's start and end, across leadership changes, like `in_flight`.
    in_flight_by_namespace: HashMap<String, Held>,
    /// Groups that had due sends and no slot for them.
    turns: Turns<GroupKey>,
    known: Arc<Mutex<HashSet<GroupKey>>>,
    stalls: Arc<Stalls>,
    decide: mpsc::UnboundedSender<ObjectRef<crate::crd::ElectionGroup>>,
}

impl Task {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut updates: mpsc::Receiver<GroupUpdate>) {
        let (answers_tx, mut answers) = mpsc::channel::<Answer>(CAPS.total);
        let mut was_leading = *self.leading.borrow();
        self.since = self.now();
        loop {
            let wake = self
                .groups
                .values()
                .filter_map(|g| g.wake_at)
                .min()
                .map(|at| self.origin + Duration::from_millis(at));
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let touched: Vec<GroupKey> = tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => {
                        let key = update.key.clone();
                        self.take(update);
                        vec![key]
                    }
                    None => return,
                },
                Some(answer) = answers.recv() => {
                    self.in_flight -= 1;
                    if let Some(held) = self.in_flight_by_namespace.get_mut(&answer.key.0) {
                        held.all = held.all.saturating_sub(1);
                        held.long = held
                            .long
                            .saturating_sub(usize::from(fair::is_long(answer.role)));
                        if held.all == 0 {
                            self.in_flight_by_namespace.remove(&answer.key.0);
                        }
                    }
                    let key = answer.key.clone();
                    self.answered(answer);
                    vec![key]
                }
                changed = self.leading.changed() => {
                    if changed.is_err() { return; }
                    let leading = *self.leading.borrow_and_update();
                    if leading != was_leading {
                        was_leading = leading;
                        // Whatever this replica knew may be stale by now: start from nothing.
                        self.groups.clear();
                        self.turns.clear();
                        self.known.lock().expect("notifier set poisoned").clear();
                        self.forget_stalls();
                        self.since = self.now();
                    }
                    Vec::new()
                }
                _ = sleep => {
                    let now = self.now();
                    self.groups
                        .iter()
                        .filter(|(_, g)| g.wake_at.is_some_and(|at| at <= now))
                        .map(|(k, _)| k.clone())
                        .collect()
                }
            };
            // Groups that waited for a slot go first, in turn: a freed slot is theirs, and a
            // group touched now must not take it from them.
            for key in self.turns.order(touched) {
                self.drive(&key, &answers_tx);
            }
        }
    }

    fn take(&mut self, update: GroupUpdate) {
        let now = self.now();
        let group = self
            .groups
            .entry(update.key.clone())
            .or_insert_with(|| GroupState {
                notify: None,
                address: update.notify.clone().unwrap_or(NotifySpec {
                    port: podium_core::crd::DEFAULT_NOTIFY_PORT,
                    path: podium_core::crd::DEFAULT_NOTIFY_PATH.into(),
                }),
                leader: None,
                epoch: 0,
                term_millis: 0,
                pods: BTreeMap::new(),
                wake_at: Some(now),
                pending_since: None,
            });
        if let Some(spec) = &update.notify {
            group.address = spec.clone();
        } else if group.notify.is_some() {
            tracing::info!(group = %update.key.1, namespace = %update.key.0, "notifications off; telling the members to stop");
        }
        group.notify = update.notify;
        group.leader = if group.notify.is_some() {
            update.leader
        } else {
            None
        };
        // The epoch never goes back: a stale update must not reopen an older epoch.
        group.epoch = group.epoch.max(update.epoch);
        group.term_millis = update.term.as_millis() as u64;
        for pod in group.pods.values_mut() {
            pod.member = false;
        }
        for target in update.targets {
            let pod = group.pods.entry(target.name).or_insert_with(|| PodState {
                uid: target.uid.clone(),
                member: true,
                link: Link::default(),
                heard: Heard::default(),
                nonce: None,
                delivered: None,
                busy: false,
                failures: 0,
                retry_at: 0,
            });
            if pod.uid != target.uid {
                // Recreated under the same name: a new process with no state of ours.
                *pod = PodState {
                    uid: target.uid,
                    member: true,
                    link: Link::default(),
                    heard: Heard::default(),
                    nonce: None,
                    delivered: None,
                    busy: pod.busy,
                    failures: 0,
                    retry_at: 0,
                };
            }
            pod.member = true;
        }
        group.wake_at = Some(now);
        self.judge_stalls(&update.key);
    }

    fn answered(&mut self, answer: Answer) {
        let now = self.now();
        let Some(group) = self.groups.get_mut(&answer.key) else {
            return;
        };
        let Some(pod) = group.pods.get_mut(&answer.pod) else {
            return;
        };
        pod.busy = false;
        match answer.result {
            Ok(ack) => {
                pod.link.answered(now, ack.epoch, ack.running);
                let sent_at = now.saturating_sub(answer.took.as_millis() as u64);
                let granted =
                    (answer.role == NotifyRole::Leader && ack.accepted).then_some(answer.epoch);
                pod.heard.answered(
                    stall::Answer {
                        epoch: ack.epoch,
                        running: ack.running,
                        sent_at,
                    },
                    granted,
                );
                pod.nonce = Some((ack.nonce, now));
                if ack.accepted {
                    self.metrics.notify_sent("accepted", answer.took);
                    pod.failures = 0;
                    pod.retry_at = 0;
                    pod.delivered = Some(Delivered {
                        role: answer.role,
                        epoch: answer.epoch,
                        at: now,
                    });
                    if answer.role == NotifyRole::Leader
                        && let Some(waited) = group.pending_since.take()
                    {
                        self.metrics
                            .notify_activated(Duration::from_millis(now - waited));
                        tracing::info!(group = %answer.key.1, pod = %answer.pod, epoch = answer.epoch, waited_ms = now - waited, "leader process activated");
                    }
                } else {
                    self.metrics.notify_sent("refused", answer.took);
                    tracing::debug!(group = %answer.key.1, pod = %answer.pod, reason = ?ack.reason, "notification refused");
                    pod.retry_at = now + backoff(pod.failures);
                    pod.failures += 1;
                }
            }
            Err(e) => {
                self.metrics.notify_sent(e.kind(), answer.took);
                if pod.failures == 0 {
                    tracing::info!(group = %answer.key.1, pod = %answer.pod, error = %e, "notification failed; retrying with backoff");
                }
                pod.retry_at = now + backoff(pod.failures);
                pod.failures += 1;
            }
        }
        self.judge_stalls(&answer.key);
    }

    fn held(&self, namespace: &str) -> Held {
        self.in_flight_by_namespace
            .get(namespace)
            .copied()
            .unwrap_or_default()
    }

    /// Plans the group and starts its sends, as many as the caps let it.
    fn drive(&mut self, key: &GroupKey, answers: &mpsc::Sender<Answer>) {
        let now = self.now();
        let since = self.since;
        let no_slot = self.turns.is_waiting(key)
            && fair::admit(&CAPS, self.in_flight, self.held(&key.0), false) != Admit::Now;
        let Some(group) = self.groups.get_mut(key) else {
            self.turns.served(key);
            return;
        };
        if no_slot {
            // It keeps its turn, and the answer that frees a slot brings it back (every slot
            // it waits for is held by a send that ends with an answer); a wake-up in the past
            // would only bring it back here at once, again and again.
            group.wake_at = None;
            return;
        }
        let addresses: Vec<(Option<String>, bool)> = group
            .pods
            .iter()
            .map(|(name, pod)| {
                let cached = self.pods.get(&ObjectRef::new(name).within(&key.0));
                let gone = cached
                    .as_ref()
                    .is_none_or(|p| p.uid().as_deref() != Some(pod.uid.as_str()));
                let ip = cached.and_then(|p| p.status.as_ref().and_then(|s| s.pod_ip.clone()));
                (ip, gone)
            })
            .collect();
        let view = GroupView {
            leader: group.leader.as_ref().map(|h| h.name.as_str()),
            epoch: group.epoch,
            term_millis: group.term_millis,
            since,
            now,
            pods: group
                .pods
                .iter()
                .zip(&addresses)
                .map(|((name, pod), (ip, gone))| PodView {
                    name,
                    gone: *gone,
                    reachable: ip.is_some(),
                    busy: pod.busy,
                    link: pod.link,
                    delivered: pod.delivered,
                    retry_at: pod.retry_at,
                })
                .collect(),
        };
        let planned = plan::plan(&view);
        if matches!(
            planned.activation,
            Some(podium_core::notify::Activation::Wait { .. })
        ) {
            group.pending_since.get_or_insert(now);
        }
        let forget: Vec<String> = view
            .pods
            .iter()
            .filter(|p| {
                !group.pods[p.name].member
                    && plan::forgettable(p, group.epoch, now, since, group.term_millis)
            })
            .map(|p| p.name.to_string())
            .collect();
        let names: Vec<String> = group.pods.keys().cloned().collect();
        group.wake_at = planned.wake_at;
        let mut sends = planned.sends;
        sends.sort_by_key(|&(index, role)| fair::urgency(role, group.pods[&names[index]].failures));
        // No claim: look again soon. No slot: the group waits its turn, and the next freed
        // slot brings it back.
        let mut deferred = false;
        let mut waiting = false;
        for (index, role) in sends {
            let name = &names[index];
            let Some(ip) = addresses[index].0.clone() else {
                continue;
            };
            if !self.claim.borrow().is_current() {
                deferred = true;
                continue;
            }
            let held = self
                .in_flight_by_namespace
                .get(&key.0)
                .copied()
                .unwrap_or_default();
            let long = fair::is_long(role);
            if fair::admit(&CAPS, self.in_flight, held, long) != Admit::Now {
                // The caps only tighten as sends start, and the sends are in order of
                // urgency, long ones last: nothing after this fits either.
                waiting = true;
                break;
            }
            let pod = group.pods.get_mut(name).expect("planned pods exist");
            pod.busy = true;
            self.in_flight += 1;
            let held = self
                .in_flight_by_namespace
                .entry(key.0.clone())
                .or_default();
            held.all += 1;
            held.long += usize::from(long);
            if role == NotifyRole::Leader
                && let Some((_, received)) = &pod.nonce
            {
                pod.link.granted(*received);
            }
            let message = RoleMessage {
                group: format!("{}/{}", key.0, key.1),
                pod: name.clone(),
                pod_uid: pod.uid.clone(),
                role,
                leader: group.leader.as_ref().map(|h| h.name.clone()),
                epoch: group.epoch,
                term_millis: group.term_millis,
                nonce: pod.nonce.as_ref().map(|(nonce, _)| nonce.clone()),
            };
            let url = format!(
                "http://{}:{}{}",
                bracket_v6(&ip),
                group.address.port,
                group.address.path
            );
            let audience = podium_core::notify::audience(&key.0, &key.1, &pod.uid);
            let sender = self.sender.clone();
            let tokens = self.tokens.clone();
            let answers = answers.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = match tokens {
                    Some(tokens) => match tokens.token(&audience).await {
                        Ok(token) => sender.send(&url, &token, &message).await,
                        Err(e) => Err(SendError::Unreachable(format!("cannot get a token to sign with: {e}"))),
                    },
                    None => Err(SendError::Unreachable("the operator has no ServiceAccount to sign notifications with (--service-account)".into())),
                };
                let _ = answers
                    .send(Answer {
                        key,
                        pod: message.pod,
                        role,
                        epoch: message.epoch,
                        result,
                        took: started.elapsed(),
                    })
                    .await;
            });
        }
        if deferred {
            let retry = now + BACKOFF_STEP.as_millis() as u64;
            group.wake_at = Some(group.wake_at.map_or(retry, |w| w.min(retry)));
        }
        if waiting {
            if self.turns.wait(key.clone()) {
                self.metrics.notify_waited(&key.0);
            }
        } else {
            self.turns.served(key);
        }
        for name in forget {
            if !group.pods[&name].busy {
                group.pods.remove(&name);
            }
        }
        if group.notify.is_none() && group.pods.is_empty() {
            self.groups.remove(key);
            self.turns.served(key);
        }
    }
}

fn backoff(failures: u32) -> u64 {
    if failures == 0 {
        return 0;
    }
    let step = BACKOFF_STEP.as_millis() as u64;
    (step << (failures - 1).min(10)).min(BACKOFF_MAX.as_millis() as u64)
}

fn bracket_v6(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_and_is_capped() {
        assert_eq!(backoff(0), 0);
        assert_eq!(backoff(1), 50);
        assert_eq!(backoff(3), 200);
        assert_eq!(backoff(30), 2_000);
    }

    #[test]
    fn ipv6_pod_addresses_are_bracketed() {
        assert_eq!(bracket_v6("10.0.0.1"), "10.0.0.1");
        assert_eq!(bracket_v6("fd00::1"), "[fd00::1]");
    }
}
