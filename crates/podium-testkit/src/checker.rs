//! The watch-based history checker: records every pod, Lease and EndpointSlice event of one
//! group's namespace while a test runs, and checks Podium's safety invariants over the whole
//! history, not just the end state.
//!
//! - I1: at no observed resourceVersion do two pods carry `podium.dev/role=leader`.
//! - I2: the epoch (`leaseTransitions`) never decreases, and it changes exactly when the holder does.
//! - I3: after quiet, the labelled leader equals the Lease holder and is eligible.
//! - I4: no terminating or NotReady pod keeps the leader label while an eligible pod exists
//!   for longer than a reaction time (1 s by default; [`Options::reaction`]).
//! - I5: the leader Service's EndpointSlices never list two pods.
//!
//! [`Checker::start`] checks everything with the defaults; [`Checker::start_with`] takes
//! [`Options`] (a pod label selector when several groups share the namespace, the group's
//! `minReadySeconds`, a longer reaction time under injected faults). While the operator is
//! knowingly down, [`Checker::pause_i4`] and [`Checker::resume_i4`] suspend I4.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::{Client, ResourceExt};
use podium_core::crd::ROLE_LABEL;
use tokio::task::JoinHandle;

use crate::observe::{self, Change, PodState as Observed, Watching, lease_holder};
use crate::pod::{is_ready, is_terminating};
use crate::testbed::kubelet::slice_endpoints;

#[derive(Clone, Debug)]
pub enum Record {
    /// A pod's role label as of one event (`None` when deleted or unlabelled).
    Pod {
        at: Instant,
        pod: String,
        role: Option<String>,
        ready: bool,
        terminating: bool,
    },
    Lease {
        at: Instant,
        holder: Option<String>,
        transitions: i32,
    },
    Slice {
        at: Instant,
        slice: String,
        addresses: Vec<String>,
    },
}

/// What the checker watches and how strict I4 is.
#[derive(Clone, Debug)]
pub struct Options {
    /// Only pods matching this label selector (e.g. `app=web`) count; all pods by default.
    pub pod_selector: Option<String>,
    /// I4's reaction time; `None` turns I4 off (e.g. for a paused group).
    pub reaction: Option<Duration>,
    /// The group's `minReadySeconds`: a pod counts as eligible for I4 only this long after the
    /// checker saw it become Ready.
    pub min_ready: Duration,
    /// Pods a human labels leader on purpose: I1 episodes involving them are not violations.
    pub tolerate_leaders: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pod_selector: None,
            reaction: Some(Duration::from_secs(1)),
            min_ready: Duration::ZERO,
            tolerate_leaders: Vec::new(),
        }
    }
}

/// One pod as the checker last saw it.
#[derive(Clone, Debug)]
struct PodState {
    /// When the checker saw the pod become Ready; `None` while it is not Ready.
    ready_since: Option<Instant>,
    terminating: bool,
}

#[derive(Default)]
struct History {
    records: Vec<Record>,
    violations: Vec<String>,
    roles: BTreeMap<String, Option<String>>,
    /// The pods labelled leader right now (kept apart so that a check costs no scan of
    /// thousands of pods).
    leaders: BTreeSet<String>,
    pods: BTreeMap<String, PodState>,
    slices: BTreeMap<String, Vec<String>>,
    last_lease: Option<(Option<String>, i32)>,
    options: Options,
    /// Since when I4's bad state has held, and whether this episode was reported.
    i4_since: Option<(Instant, bool)>,
    i4_paused: bool,
}

pub struct Checker {
    history: Arc<Mutex<History>>,
    _watches: Vec<Watching>,
    clock: JoinHandle<()>,
    lease_name: String,
    pod_selector: Option<String>,
}

impl Checker {
    /// Starts watching `namespace`: pods, the Lease `group`, and the EndpointSlices of `service`.
    pub async fn start(
        client: &Client,
        namespace: &str,
        group: &str,
        service: Option<&str>,
    ) -> Checker {
        Self::start_with(client, namespace, group, service, Options::default()).await
    }

    /// [`Checker::start`] with [`Options`].
    pub async fn start_with(
        client: &Client,
        namespace: &str,
        group: &str,
        service: Option<&str>,
        options: Options,
    ) -> Checker {
        let pod_selector = options.pod_selector.clone();
        let history = Arc::new(Mutex::new(History {
            options,
            ..History::default()
        }));
        let mut watches = vec![
            observe::watch_pods(
                client,
                namespace,
                pod_selector.as_deref(),
                recorder(&history, History::pod),
            ),
            observe::watch_lease(client, namespace, group, recorder(&history, History::lease)),
        ];
        if let Some(service) = service {
            let record = recorder(&history, History::slice);
            watches.push(observe::watch_slices(client, namespace, service, record));
        }

        // I4 is about time passing without an event, so it is also checked on a clock.
        let h = history.clone();
        let clock = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                h.lock().unwrap().check_i4();
            }
        });
        // Let the watches list before the test starts acting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Checker {
            history,
            _watches: watches,
            clock,
            lease_name: group.to_string(),
            pod_selector,
        }
    }

    pub fn records(&self) -> Vec<Record> {
        self.history.lock().unwrap().records.clone()
    }

    /// The pods labelled leader as of the last event seen.
    pub fn leaders_now(&self) -> Vec<String> {
        self.history
            .lock()
            .unwrap()
            .leaders
            .iter()
            .cloned()
            .collect()
    }

    /// Violations seen so far (I1, I2, I4, I5), without panicking.
    pub fn violations(&self) -> Vec<String> {
        self.history.lock().unwrap().violations.clone()
    }

    /// Suspends I4, e.g. while the operator is crashed on purpose: nobody can react then.
    pub fn pause_i4(&self) {
        let mut h = self.history.lock().unwrap();
        h.i4_paused = true;
        h.i4_since = None;
    }

    /// Resumes I4; the reaction time starts now.
    pub fn resume_i4(&self) {
        let mut h = self.history.lock().unwrap();
        h.i4_paused = false;
        h.i4_since = None;
        h.check_i4();
    }

    /// Pods a human labels leader on purpose from now on (see [`Options::tolerate_leaders`]).
    pub fn tolerate_leaders(&self, pods: &[&str]) {
        self.history.lock().unwrap().options.tolerate_leaders =
            pods.iter().map(|p| p.to_string()).collect();
    }

    /// Sets I4's reaction time (`None`: off) from now on.
    pub fn set_reaction(&self, reaction: Option<Duration>) {
        let mut h = self.history.lock().unwrap();
        h.options.reaction = reaction;
        h.i4_since = None;
    }

    /// Changes of the `podium.dev/role` label seen at or after `since` (pod, new role).
    pub fn role_changes_since(&self, since: Instant) -> Vec<(String, Option<String>)> {
        let mut last: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut changes = Vec::new();
        for r in self.records() {
            if let Record::Pod { at, pod, role, .. } = r {
                let before = last.insert(pod.clone(), role.clone());
                if at >= since && before.is_some_and(|b| b != role) {
                    changes.push((pod, role));
                }
            }
        }
        changes
    }

    /// Lease observations at or after `since`, as (holder, epoch).
    pub fn lease_changes_since(&self, since: Instant) -> Vec<(Option<String>, i32)> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Lease {
                    at,
                    holder,
                    transitions,
                } if at >= since => Some((holder, transitions)),
                _ => None,
            })
            .collect()
    }

    /// The first time at or after `since` that `pod` was seen labelled leader.
    pub fn leader_seen_at(&self, pod: &str, since: Instant) -> Option<Instant> {
        self.records().into_iter().find_map(|r| match r {
            Record::Pod {
                at, pod: p, role, ..
            } if at >= since && p == pod && role.as_deref() == Some("leader") => Some(at),
            _ => None,
        })
    }

    /// The first time at or after `since` that the slices listed exactly `address`.
    pub fn slice_only_seen_at(&self, address: &str, since: Instant) -> Option<Instant> {
        let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in self.records() {
            if let Record::Slice {
                at,
                slice,
                addresses,
            } = r
            {
                current.insert(slice, addresses);
                let all: Vec<&String> = current.values().flatten().collect();
                if at >= since && all.len() == 1 && all[0] == address {
                    return Some(at);
                }
            }
        }
        None
    }

    /// Panics with every invariant violation seen (I1, I2, I4, I5) and checks I3 against
    /// `client`.
    pub async fn assert_invariants(&self, client: &Client, namespace: &str) {
        self.history.lock().unwrap().check_i4();
        let violations = self.history.lock().unwrap().violations.clone();
        assert!(
            violations.is_empty(),
            "invariant violations:\n{}",
            violations.join("\n")
        );
        converged(
            client,
            namespace,
            &self.lease_name,
            self.pod_selector.as_deref(),
        )
        .await;
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.clock.abort();
    }
}

/// A watch callback that hands each object change to `record` (what changed, whether it was
/// deleted), under the history's lock.
fn recorder<K>(
    history: &Arc<Mutex<History>>,
    record: fn(&mut History, Instant, &K, bool),
) -> impl FnMut(Instant, Change<K>) + Send + 'static
where
    K: Send + 'static,
{
    let history = history.clone();
    move |at, change| {
        if let Some((object, deleted)) = change.object() {
            record(&mut history.lock().unwrap(), at, &object, deleted);
        }
    }
}

impl History {
    fn pod(&mut self, now: Instant, p: &Pod, deleted: bool) {
        let name = p.name_any();
        let Observed {
            role,
            ready,
            terminating,
            ..
        } = Observed::of(p);
        let role = if deleted { None } else { role };
        self.records.push(Record::Pod {
            at: now,
            pod: name.clone(),
            role: role.clone(),
            ready,
            terminating,
        });
        if deleted {
            self.pods.remove(&name);
        } else {
            let was_ready_since = self.pods.get(&name).and_then(|s| s.ready_since);
            self.pods.insert(
                name.clone(),
                PodState {
                    ready_since: if ready {
                        Some(was_ready_since.unwrap_or(now))
                    } else {
                        None
                    },
                    terminating,
                },
            );
        }
        if role.as_deref() == Some("leader") {
            self.leaders.insert(name.clone());
        } else {
            self.leaders.remove(&name);
        }
        self.roles.insert(name, role);
        self.check_i4();
        let leaders: Vec<&String> = self.leaders.iter().collect();
        let tolerated = leaders
            .iter()
            .any(|l| self.options.tolerate_leaders.contains(l));
        if leaders.len() > 1 && !tolerated {
            let msg = format!(
                "I1: two leader labels at pod resourceVersion {:?}: {leaders:?}",
                p.resource_version()
            );
            self.violations.push(msg);
        }
    }

    fn lease(&mut self, at: Instant, l: &Lease, deleted: bool) {
        if deleted {
            return self.lease_deleted(at);
        }
        let (holder, transitions) = lease_holder(l);
        self.records.push(Record::Lease {
            at,
            holder: holder.clone(),
            transitions,
        });
        if let Some((prev_holder, prev_transitions)) = &self.last_lease {
            if transitions < *prev_transitions {
                self.violations.push(format!(
                    "I2: epoch went backwards {prev_transitions} -> {transitions}"
                ));
            }
            let holder_changed = prev_holder != &holder;
            let epoch_changed = transitions != *prev_transitions;
            // Both may change in one step or neither; a watch never skips a write on one object
            // except across a relist, where several holder changes fold into one observation.
            if holder_changed && !epoch_changed {
                self.violations.push(format!("I2: holder {prev_holder:?} -> {holder:?} without an epoch change ({transitions})"));
            }
            if epoch_changed && !holder_changed && transitions == prev_transitions + 1 {
                self.violations.push(format!(
                    "I2: epoch {prev_transitions} -> {transitions} with the same holder {holder:?}"
                ));
            }
        }
        self.last_lease = Some((holder, transitions));
    }

    fn lease_deleted(&mut self, at: Instant) {
        self.records.push(Record::Lease {
            at,
            holder: None,
            transitions: self.last_lease.as_ref().map_or(0, |(_, t)| *t),
        });
        // Keep the last epoch: a recreated Lease must not go below it (I2).
        if let Some((holder, _)) = &mut self.last_lease {
            *holder = None;
        }
    }

    /// I4: a leader label on a terminating or NotReady pod while another pod is eligible, for
    /// longer than the reaction time.
    fn check_i4(&mut self) {
        let Some(reaction) = self.options.reaction.filter(|_| !self.i4_paused) else {
            self.i4_since = None;
            return;
        };
        let now = Instant::now();
        let min_ready = self.options.min_ready;
        let stuck: Vec<&String> = self
            .leaders
            .iter()
            .filter(|n| {
                self.pods
                    .get(*n)
                    .is_some_and(|s| s.terminating || s.ready_since.is_none())
            })
            .collect();
        if stuck.is_empty() {
            self.i4_since = None;
            return;
        }
        let eligible: Vec<&String> = self
            .pods
            .iter()
            .filter(|(_, s)| {
                !s.terminating
                    && s.ready_since
                        .is_some_and(|t| now.duration_since(t) >= min_ready)
            })
            .map(|(n, _)| n)
            .take(5)
            .collect();
        if eligible.is_empty() {
            self.i4_since = None;
            return;
        }
        let (since, reported) = *self.i4_since.get_or_insert((now, false));
        if !reported && now.duration_since(since) > reaction {
            let msg = format!(
                "I4: {stuck:?} kept the leader label while terminating or NotReady for more than {reaction:?} although {eligible:?} (and maybe more) were eligible"
            );
            self.violations.push(msg);
            self.i4_since = Some((since, true));
        }
    }

    fn slice(&mut self, at: Instant, s: &DynamicObject, deleted: bool) {
        let addresses: Vec<String> = if deleted {
            Vec::new()
        } else {
            slice_endpoints(s).into_iter().map(|e| e.address).collect()
        };
        let name = s.name_any();
        self.records.push(Record::Slice {
            at,
            slice: name.clone(),
            addresses: addresses.clone(),
        });
        self.slices.insert(name, addresses);
        let all: Vec<&String> = self.slices.values().flatten().collect();
        if all.len() > 1 {
            self.violations.push(format!(
                "I5: the leader Service's EndpointSlices list {} addresses: {all:?}",
                all.len()
            ));
        }
    }
}

/// I3: the labelled leader equals the Lease holder and is eligible (Ready, not terminating),
/// polled for up to 5 s so the last writes can land.
pub async fn assert_converged(client: &Client, namespace: &str, lease_name: &str) {
    converged(client, namespace, lease_name, None).await;
}

/// [`assert_converged`] over the pods matching `pod_selector` only.
async fn converged(client: &Client, namespace: &str, lease_name: &str, pod_selector: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let problem = convergence_problem(client, namespace, lease_name, pod_selector).await;
        match problem {
            None => return,
            Some(p) if Instant::now() > deadline => panic!("I3: not converged after quiet: {p}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn convergence_problem(
    client: &Client,
    namespace: &str,
    lease_name: &str,
    pod_selector: Option<&str>,
) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default().labels(pod_selector.unwrap_or_default());
    let pods = pods.list(&params).await.ok()?;
    let leaders: Vec<&Pod> = pods
        .items
        .iter()
        .filter(|p| p.labels().get(ROLE_LABEL).map(String::as_str) == Some("leader"))
        .collect();
    let holder = leases
        .get_opt(lease_name)
        .await
        .ok()?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty());
    let names: Vec<String> = leaders.iter().map(|p| p.name_any()).collect();
    if names.len() > 1 {
        return Some(format!("several leader labels: {names:?}"));
    }
    if names.first() != holder.as_ref() {
        return Some(format!(
            "labelled leader {names:?} but Lease holder {holder:?}"
        ));
    }
    if let Some(p) = leaders.first() {
        let ready = is_ready(p);
        if !ready || is_terminating(p) {
            return Some(format!("leader {} is not eligible", p.name_any()));
        }
    }
    None
}
