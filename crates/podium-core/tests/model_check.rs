//! Exhaustive model check of the handover protocol with stateright: every interleaving of a
//! bounded world, breadth first, with the real [`decide`], `lease::desired` and
//! `labels::patch_body`, applied in the order [`Decision::steps`] gives to a model API server
//! with Kubernetes' per-object semantics (a write carrying a resourceVersion is refused with 409
//! when the object moved on; a merge patch that changes nothing keeps the resourceVersion; a
//! write to a missing pod is a 404).
//!
//! The world: pods `p0..`, one group, its Lease, and operator replicas that act with no
//! operator leader election at all (any number acting at once is the worst case). Each replica
//! has its own cache, one object at a time: a cached object catches up with the server in its
//! own step (so every replica may decide on any mix of old and new objects), a crash drops the
//! replica's reconcile in flight and relists it to the oldest snapshot, and a paused replica is
//! simply one whose steps come later. The environment deletes, recreates and readies pods,
//! changes `preferredLeader` and priorities, and a human unselects a pod; each such event uses
//! one unit of a budget. Renewals land at any moment, from a budget of their own
//! ([`Action::Renew`]).
//!
//! Checked in every state reached:
//! - I1: at most one pod carries `podium.dev/role=leader`.
//! - I2: the epoch only grows: the Lease's `leaseTransitions` never goes back and moves by one
//!   exactly when the holder changes, and no promote labels a pod with an epoch lower than one
//!   already labelled.
//! - I3: from any state, a replica with fresh caches and nothing else running converges within
//!   three reconciles: one leader label, on the Lease holder, which is eligible whenever a
//!   member is.
//!
//! `PODIUM_MODEL_EVENTS`, `PODIUM_MODEL_RENEWALS`, `PODIUM_MODEL_DECISIONS`,
//! `PODIUM_MODEL_REPLICAS` and `PODIUM_MODEL_PODS` widen the scope (see docs/design.md for how
//! far they were run).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PodCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use kube::Resource;
use podium_core::crd::{
    EPOCH_ANNOTATION, ElectionGroup, ElectionGroupSpec, FENCE_ANNOTATION, GROUP_ANNOTATION,
    PRIORITY_ANNOTATION, ROLE_FOLLOWER, ROLE_LABEL, ROLE_LEADER,
};
use podium_core::election::{
    Decision, LabelWrite, LeaseWrite, Observation, Step, decide, member_from_pod,
};
use podium_core::pod::{ElectionPod, ElectionPodStatus};
use podium_core::{labels, lease};
use serde_json::Value;
use stateright::{Checker, Model, Property};

const NS: &str = "ns";
const GROUP: &str = "web";
const APP: &str = "app";
const TTL: i32 = 4;

fn now() -> Timestamp {
    Timestamp::from_second(1_700_000_100).unwrap()
}

fn pod_name(i: usize) -> String {
    format!("p{i}")
}

/// One pod as the server stores it, reduced to what the election reads or writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodObj {
    incarnation: u8,
    version: u32,
    ready: bool,
    terminating: bool,
    selected: bool,
    priority: bool,
    role: Option<String>,
    epoch: Option<String>,
    group: Option<String>,
    fence: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct LeaseObj {
    holder: Option<String>,
    holder_uid: Option<String>,
    transitions: i32,
    version: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupObj {
    preferred: Option<usize>,
    version: u32,
}

/// What the server holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    pods: Vec<Option<PodObj>>,
    lease: Option<LeaseObj>,
    group: GroupObj,
    next_version: u32,
    next_incarnation: u8,
}

/// One request of a reconcile in flight.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Request {
    Label(LabelWrite),
    /// The Lease object `lease::desired` built, reduced; `expect` is the version it replaces
    /// (`None`: a create).
    Lease {
        holder: Option<String>,
        holder_uid: Option<String>,
        transitions: i32,
        expect: Option<u32>,
    },
    /// The old protocol's quorum read before a promote (only in [`Protocol::Legacy`]).
    CheckLease {
        pod: String,
        epoch: i32,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Replica {
    pods: Vec<Option<PodObj>>,
    lease: Option<LeaseObj>,
    group: GroupObj,
    plan: Vec<Request>,
    decisions_left: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    world: World,
    replicas: Vec<Replica>,
    /// The oldest snapshot, which a crashed replica relists to.
    oldest: (Vec<Option<PodObj>>, Option<LeaseObj>, GroupObj),
    events_left: u8,
    renewals_left: u8,
    crashes_left: u8,
    highest_labelled_epoch: i32,
    violation: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// Replica `r`'s pod cache catches up with the server (a watch delivers one kind in
    /// order; each kind lags on its own).
    SyncPods(usize),
    SyncLease(usize),
    SyncGroup(usize),
    /// Replica `r` decides from its cache.
    Decide(usize),
    /// Replica `r` sends the next request of its reconcile.
    Send(usize),
    /// Replica `r` dies and relists to the oldest snapshot.
    Crash(usize),
    /// A renewal lands: a compare-and-swap that keeps the holder and the epoch, sent by any
    /// replica from any view, at any moment. Whatever the sender saw, a renewal that the server
    /// accepts replaced the current version, so it changes only the version (and renewTime,
    /// which the model holds fixed); one it refuses changes nothing. This one action therefore
    /// stands for every replica's routine renewals, whether a reconcile or a renewer sends them.
    Renew,
    DeletePod(usize),
    FinalizePod(usize),
    CreatePod(usize),
    SetReady(usize, bool),
    SetPreferred(Option<usize>),
    HumanPriority(usize),
    HumanUnselect(usize),
}

/// Which protocol the replicas run: today's, or the one before it (Lease first, a conditional
/// demotion of the holder only when the cache shows it, a quorum read before a promote), kept
/// so the check shows that it can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Fenced,
    Legacy,
}

struct Protocols {
    protocol: Protocol,
    pods: usize,
    replicas: usize,
    events: u8,
    /// How many renewals may land, on top of the environment's events.
    renewals: u8,
    decisions: u8,
    crashes: u8,
    /// Start from a group that has never elected (no Lease) as well as from a settled one.
    from_scratch: bool,
    /// How many of the pods exist at the start (the rest can be created).
    initial_pods: usize,
    /// Also the rarer human edits (priorities, unselecting a pod); off in CI's scope.
    human_edits: bool,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Protocols {
    /// CI's scope: 2 replicas, 3 pods, 4 environment events, one reconcile per replica.
    /// With one reconcile each, a crash adds nothing: a crashed replica that never decides
    /// again is a replica that stopped sending, which every interleaving already includes, and
    /// a replica that never synced decides on the oldest snapshot, which is what a relist to it
    /// gives. `PODIUM_MODEL_FULL=1` adds a second reconcile per replica, a crash with a relist
    /// to the oldest snapshot, human edits, and a start from a group that never elected.
    fn ci(protocol: Protocol) -> Protocols {
        let full = env_or("PODIUM_MODEL_FULL", 0) == 1;
        Protocols {
            protocol,
            pods: env_or("PODIUM_MODEL_PODS", 3) as usize,
            replicas: env_or("PODIUM_MODEL_REPLICAS", 2) as usize,
            events: env_or("PODIUM_MODEL_EVENTS", 4) as u8,
            renewals: env_or("PODIUM_MODEL_RENEWALS", 0) as u8,
            decisions: env_or("PODIUM_MODEL_DECISIONS", if full { 2 } else { 1 }) as u8,
            crashes: u8::from(full),
            from_scratch: full,
            initial_pods: env_or("PODIUM_MODEL_PODS", 3) as usize,
            human_edits: full,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The API server's side.

impl World {
    fn bump(&mut self) -> u32 {
        self.next_version += 1;
        self.next_version
    }
}

fn pod_object(i: usize, obj: &PodObj) -> ElectionPod {
    let mut labels = BTreeMap::new();
    labels.insert(
        APP.to_string(),
        if obj.selected { GROUP } else { "other" }.to_string(),
    );
    if let Some(role) = &obj.role {
        labels.insert(ROLE_LABEL.to_string(), role.clone());
    }
    let mut annotations = BTreeMap::new();
    for (key, value) in [
        (EPOCH_ANNOTATION, &obj.epoch),
        (GROUP_ANNOTATION, &obj.group),
        (FENCE_ANNOTATION, &obj.fence),
    ] {
        if let Some(v) = value {
            annotations.insert(key.to_string(), v.clone());
        }
    }
    if obj.priority {
        annotations.insert(PRIORITY_ANNOTATION.to_string(), "5".to_string());
    }
    ElectionPod {
        metadata: ObjectMeta {
            name: Some(pod_name(i)),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{}", obj.incarnation)),
            resource_version: Some(obj.version.to_string()),
            labels: Some(labels),
            annotations: Some(annotations),
            deletion_timestamp: obj.terminating.then(|| Time(now())),
            ..Default::default()
        },
        spec: None,
        status: Some(ElectionPodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if obj.ready { "True" } else { "False" }.into(),
                last_transition_time: Some(Time(now() - SignedDuration::from_secs(60))),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

fn group_object(g: &GroupObj) -> ElectionGroup {
    let mut group = ElectionGroup::new(
        GROUP,
        ElectionGroupSpec {
            lease_duration_seconds: TTL,
            preferred_leader: g.preferred.map(pod_name),
            ..ElectionGroupSpec::selecting(LabelSelector {
                match_labels: Some([(APP.to_string(), GROUP.to_string())].into()),
                ..Default::default()
            })
        },
    );
    group.metadata.namespace = Some(NS.into());
    group.metadata.uid = Some("group-uid".into());
    group.metadata.resource_version = Some(g.version.to_string());
    group
}

fn lease_object(group: &ElectionGroup, l: &LeaseObj) -> Lease {
    let mut lease = lease::desired(
        group,
        None,
        &LeaseWrite::Create {
            holder: None,
            transitions: l.transitions,
        },
        now(),
    )
    .expect("a create always builds a Lease");
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = l.holder.clone();
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        now(),
    ));
    if let Some(uid) = &l.holder_uid {
        lease
            .meta_mut()
            .annotations
            .get_or_insert_with(Default::default)
            .insert(lease::HOLDER_UID_ANNOTATION.into(), uid.clone());
    }
    lease.metadata.resource_version = Some(l.version.to_string());
    lease
}

/// A merge patch's effect on a string map (`null` deletes a key).
fn merge(value: &mut Option<String>, patch: Option<&Value>) {
    match patch {
        None => {}
        Some(Value::String(s)) => *value = Some(s.clone()),
        Some(_) => *value = None,
    }
}

enum Outcome {
    Done,
    Refused,
}

impl State {
    /// An edit by the kubelet or a human: a new resourceVersion.
    fn edit_pod(&mut self, i: usize, edit: impl FnOnce(&mut PodObj)) -> Option<()> {
        let version = self.world.bump();
        let p = self.world.pods.get_mut(i)?.as_mut()?;
        edit(p);
        p.version = version;
        Some(())
    }

    fn label_count(&self) -> usize {
        self.world
            .pods
            .iter()
            .flatten()
            .filter(|p| p.role.as_deref() == Some(ROLE_LEADER))
            .count()
    }

    fn fail(&mut self, why: String) {
        if self.violation.is_none() {
            self.violation = Some(why);
        }
    }

    /// A label merge patch: its resourceVersion (if any) is a precondition; a patch that
    /// changes nothing keeps the version.
    fn patch_pod(&mut self, write: &LabelWrite) -> Outcome {
        let name = write.pod();
        let i: usize = name[1..].parse().expect("pod names are p<i>");
        let body = labels::patch_body(write, GROUP);
        let meta = &body["metadata"];
        let Some(current) = self.world.pods.get(i).cloned().flatten() else {
            // Gone: nothing to demote, nobody to promote.
            return match write {
                LabelWrite::Promote { .. } => Outcome::Refused,
                _ => Outcome::Done,
            };
        };
        if let Some(expected) = meta.get("resourceVersion").and_then(Value::as_str)
            && expected != current.version.to_string()
        {
            return Outcome::Refused;
        }
        let mut next = current.clone();
        merge(&mut next.role, meta["labels"].get(ROLE_LABEL));
        let annotations = &meta["annotations"];
        merge(&mut next.epoch, annotations.get(EPOCH_ANNOTATION));
        merge(&mut next.group, annotations.get(GROUP_ANNOTATION));
        merge(&mut next.fence, annotations.get(FENCE_ANNOTATION));
        if next != current {
            next.version = self.world.bump();
            self.world.pods[i] = Some(next);
        }
        if self.label_count() > 1 {
            self.fail(format!("I1: two leader labels after {write:?}"));
        }
        if let LabelWrite::Promote { epoch, .. } = write {
            if *epoch < self.highest_labelled_epoch {
                self.fail(format!(
                    "I2: {name} promoted at epoch {epoch} after epoch {} was labelled",
                    self.highest_labelled_epoch
                ));
            }
            self.highest_labelled_epoch = self.highest_labelled_epoch.max(*epoch);
        }
        Outcome::Done
    }

    fn write_lease(
        &mut self,
        holder: &Option<String>,
        holder_uid: &Option<String>,
        transitions: i32,
        expect: Option<u32>,
    ) -> Outcome {
        match (&self.world.lease, expect) {
            (Some(_), None) | (None, Some(_)) => return Outcome::Refused,
            (Some(l), Some(v)) if l.version != v => return Outcome::Refused,
            _ => {}
        }
        if let Some(old) = &self.world.lease {
            let holder_changed = (&old.holder, &old.holder_uid) != (holder, holder_uid)
                && !(old.holder == *holder && old.holder_uid.is_none());
            let moved = transitions != old.transitions;
            if transitions < old.transitions
                || holder_changed != moved
                || (moved && transitions != old.transitions + 1)
            {
                self.fail(format!(
                    "I2: Lease {:?}@{} -> {holder:?}@{transitions}",
                    old.holder, old.transitions
                ));
            }
        }
        let version = self.world.bump();
        self.world.lease = Some(LeaseObj {
            holder: holder.clone(),
            holder_uid: holder_uid.clone(),
            transitions,
            version,
        });
        Outcome::Done
    }

    fn send(&mut self, request: &Request) -> Outcome {
        match request {
            Request::Label(write) => self.patch_pod(write),
            Request::Lease {
                holder,
                holder_uid,
                transitions,
                expect,
            } => self.write_lease(holder, holder_uid, *transitions, *expect),
            Request::CheckLease { pod, epoch } => match &self.world.lease {
                Some(l) if l.holder.as_deref() == Some(pod.as_str()) && l.transitions == *epoch => {
                    Outcome::Done
                }
                _ => Outcome::Refused,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator's side: `reconcile` with the real core.

/// What replica `cache` decides, as the requests `reconcile::apply` sends in order. A Lease the
/// cache lacks is taken as absent, as `observe::read_lease` does (its server reads after a 409
/// return what a cache that caught up would show, which the model reaches too): the create that
/// follows is refused when one exists.
fn plan(protocol: Protocol, replica: &Replica, world: &World) -> Vec<Request> {
    let group = group_object(&replica.group);
    let lease = replica.lease.as_ref().map(|l| lease_object(&group, l));
    let mut members = Vec::new();
    let mut strays = Vec::new();
    for (i, p) in replica.pods.iter().enumerate() {
        let Some(p) = p else { continue };
        let m = member_from_pod(&pod_object(i, p), None, Duration::ZERO, now());
        if p.selected {
            members.push(m);
        } else if p.group.as_deref() == Some(GROUP) {
            strays.push(m);
        }
    }
    let observation = Observation {
        now: now(),
        group: GROUP,
        spec: &group.spec,
        members,
        strays,
        lease: lease::state(&group, lease.as_ref()),
        overlaps: Vec::new(),
        published_epoch: None,
        switchover: None,
    };
    let decision = decide(&observation);
    requests(protocol, &decision, &group, lease.as_ref(), replica, world)
}

fn requests(
    protocol: Protocol,
    decision: &Decision,
    group: &ElectionGroup,
    read: Option<&Lease>,
    replica: &Replica,
    world: &World,
) -> Vec<Request> {
    let lease_request = |write: &LeaseWrite| {
        lease::desired(group, read, write, now()).map(|desired| {
            let view = lease::view(&desired);
            Request::Lease {
                holder: view.holder,
                holder_uid: view.holder_uid,
                transitions: view.transitions,
                expect: match write {
                    LeaseWrite::Create { .. } => None,
                    _ => read
                        .and_then(|l| l.metadata.resource_version.as_deref())
                        .and_then(|v| v.parse().ok()),
                },
            }
        })
    };
    match protocol {
        Protocol::Fenced => decision
            .steps()
            .filter_map(|step| match step {
                Step::Lease(write) => lease_request(write),
                Step::Label(write) => Some(Request::Label(write.clone())),
            })
            .collect(),
        Protocol::Legacy => {
            // Lease first, a renewal only when it was due on its own (never here), then the
            // labels; the fence was a demotion conditional on the cached pod, sent only when
            // the cache showed it; a promote not preceded by our own Lease write read the
            // Lease from the server first.
            let mut out = Vec::new();
            let own_lease_write = !matches!(decision.lease, LeaseWrite::Renew | LeaseWrite::Keep);
            if own_lease_write {
                out.extend(lease_request(&decision.lease));
            }
            for write in &decision.labels {
                match write {
                    LabelWrite::Fence { pod, .. } => {
                        let i: usize = pod[1..].parse().expect("p<i>");
                        if let Some(Some(cached)) = replica.pods.get(i) {
                            out.push(Request::Label(LabelWrite::Demote {
                                pod: pod.clone(),
                                resource_version: cached.version.to_string(),
                            }));
                        }
                    }
                    LabelWrite::Promote { pod, epoch, .. } => {
                        if !own_lease_write {
                            out.push(Request::CheckLease {
                                pod: pod.clone(),
                                epoch: *epoch,
                            });
                        }
                        out.push(Request::Label(write.clone()));
                    }
                    other => out.push(Request::Label(other.clone())),
                }
            }
            let _ = world;
            out
        }
    }
}

impl Protocols {
    fn settled(&self, with_lease: bool) -> State {
        let mut world = World {
            pods: Vec::new(),
            lease: None,
            group: GroupObj {
                preferred: None,
                version: 1,
            },
            next_version: 10,
            next_incarnation: 0,
        };
        for i in 0..self.pods {
            world.next_incarnation += 1;
            let version = world.bump();
            let leads = with_lease && i == 0;
            if i >= self.initial_pods {
                world.pods.push(None);
                continue;
            }
            world.pods.push(Some(PodObj {
                incarnation: world.next_incarnation,
                version,
                ready: true,
                terminating: false,
                selected: true,
                priority: false,
                role: with_lease.then(|| if leads { ROLE_LEADER } else { ROLE_FOLLOWER }.into()),
                epoch: leads.then(|| "1".into()),
                group: with_lease.then(|| GROUP.into()),
                fence: None,
            }));
        }
        if with_lease {
            let version = world.bump();
            world.lease = Some(LeaseObj {
                holder: Some(pod_name(0)),
                holder_uid: Some("uid-1".into()),
                transitions: 1,
                version,
            });
        }
        let replica = Replica {
            pods: world.pods.clone(),
            lease: world.lease.clone(),
            group: world.group.clone(),
            plan: Vec::new(),
            decisions_left: self.decisions,
        };
        State {
            oldest: (world.pods.clone(), world.lease.clone(), world.group.clone()),
            replicas: vec![replica; self.replicas],
            world,
            events_left: self.events,
            renewals_left: self.renewals,
            crashes_left: self.crashes,
            highest_labelled_epoch: i32::from(with_lease),
            violation: None,
        }
    }

    /// I3: a lone replica with fresh caches converges within three reconciles.
    fn converges(&self, state: &State) -> bool {
        let mut s = state.clone();
        for _ in 0..3 {
            let fresh = Replica {
                pods: s.world.pods.clone(),
                lease: s.world.lease.clone(),
                group: s.world.group.clone(),
                plan: Vec::new(),
                decisions_left: 1,
            };
            let requests = plan(self.protocol, &fresh, &s.world);
            if requests.is_empty() {
                break;
            }
            for r in &requests {
                if let Outcome::Refused = s.send(r) {
                    return false;
                }
            }
        }
        let leaders: Vec<usize> = (0..s.world.pods.len())
            .filter(|i| {
                s.world.pods[*i]
                    .as_ref()
                    .is_some_and(|p| p.role.as_deref() == Some(ROLE_LEADER))
            })
            .collect();
        let eligible = |p: &PodObj| p.ready && !p.terminating && p.selected;
        let any_eligible = s.world.pods.iter().flatten().any(eligible);
        let holder = s.world.lease.as_ref().and_then(|l| l.holder.clone());
        match leaders.as_slice() {
            [] => !any_eligible && holder.is_none(),
            [i] => {
                holder.as_deref() == Some(pod_name(*i).as_str())
                    && s.world.pods[*i].as_ref().is_some_and(eligible)
            }
            _ => false,
        }
    }
}

impl Model for Protocols {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let mut states = vec![self.settled(true)];
        if self.from_scratch {
            states.push(self.settled(false));
        }
        states
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.violation.is_some() {
            return;
        }
        for (r, replica) in s.replicas.iter().enumerate() {
            // A replica that will not decide again has no use for its cache.
            let decides_again = replica.decisions_left > 0;
            if decides_again && replica.pods != s.world.pods {
                actions.push(Action::SyncPods(r));
            }
            if decides_again && replica.lease != s.world.lease {
                actions.push(Action::SyncLease(r));
            }
            if decides_again && replica.group != s.world.group {
                actions.push(Action::SyncGroup(r));
            }
            if replica.plan.is_empty() {
                if replica.decisions_left > 0 {
                    actions.push(Action::Decide(r));
                }
            } else {
                actions.push(Action::Send(r));
            }
            if s.crashes_left > 0 && (decides_again || !replica.plan.is_empty()) {
                actions.push(Action::Crash(r));
            }
        }
        if s.renewals_left > 0 && s.world.lease.as_ref().is_some_and(|l| l.holder.is_some()) {
            actions.push(Action::Renew);
        }
        if s.events_left == 0 {
            return;
        }
        for (i, pod) in s.world.pods.iter().enumerate() {
            match pod {
                None => actions.push(Action::CreatePod(i)),
                Some(p) if p.terminating => actions.push(Action::FinalizePod(i)),
                Some(p) => {
                    actions.push(Action::DeletePod(i));
                    actions.push(Action::SetReady(i, !p.ready));
                    if self.human_edits && !p.priority {
                        actions.push(Action::HumanPriority(i));
                    }
                    if self.human_edits && p.selected {
                        actions.push(Action::HumanUnselect(i));
                    }
                }
            }
            if s.world.group.preferred != Some(i) {
                actions.push(Action::SetPreferred(Some(i)));
            }
        }
        if s.world.group.preferred.is_some() {
            actions.push(Action::SetPreferred(None));
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let event = |s: &mut State| s.events_left -= 1;
        match action {
            Action::SyncPods(r) => s.replicas[r].pods = s.world.pods.clone(),
            Action::SyncLease(r) => s.replicas[r].lease = s.world.lease.clone(),
            Action::SyncGroup(r) => s.replicas[r].group = s.world.group.clone(),
            Action::Decide(r) => {
                let requests = plan(self.protocol, &s.replicas[r], &s.world);
                if requests.is_empty() {
                    // Nothing to do changes nothing; not worth a state of its own.
                    return None;
                }
                let replica = &mut s.replicas[r];
                replica.decisions_left -= 1;
                replica.plan = requests;
                replica.plan.reverse();
                if replica.decisions_left == 0 {
                    forget_cache(replica, &self.settled(true));
                }
            }
            Action::Send(r) => {
                let request = s.replicas[r].plan.pop()?;
                if let Outcome::Refused = s.send(&request) {
                    // A refused request ends the reconcile, as `apply`'s `?` does.
                    s.replicas[r].plan.clear();
                }
            }
            Action::Crash(r) => {
                s.crashes_left -= 1;
                let (pods, lease, group) = s.oldest.clone();
                let replica = &mut s.replicas[r];
                replica.plan.clear();
                replica.pods = pods;
                replica.lease = lease;
                replica.group = group;
            }
            Action::Renew => {
                s.renewals_left -= 1;
                let version = s.world.bump();
                s.world.lease.as_mut()?.version = version;
            }
            Action::DeletePod(i) => {
                event(&mut s);
                s.edit_pod(i, |p| p.terminating = true)?;
            }
            Action::FinalizePod(i) => {
                event(&mut s);
                s.world.pods[i] = None;
            }
            Action::CreatePod(i) => {
                event(&mut s);
                s.world.next_incarnation += 1;
                let version = s.world.bump();
                s.world.pods[i] = Some(PodObj {
                    incarnation: s.world.next_incarnation,
                    version,
                    ready: true,
                    terminating: false,
                    selected: true,
                    priority: false,
                    role: None,
                    epoch: None,
                    group: None,
                    fence: None,
                });
            }
            Action::SetReady(i, ready) => {
                event(&mut s);
                s.edit_pod(i, |p| p.ready = ready)?;
            }
            Action::HumanPriority(i) => {
                event(&mut s);
                s.edit_pod(i, |p| p.priority = true)?;
            }
            Action::HumanUnselect(i) => {
                event(&mut s);
                s.edit_pod(i, |p| p.selected = false)?;
            }
            Action::SetPreferred(p) => {
                event(&mut s);
                s.world.group.preferred = p;
                s.world.group.version = s.world.bump();
            }
        }
        canonicalize(&mut s);
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("I1 and I2 hold at every step", |_, s: &State| {
                s.violation.is_none()
            }),
            Property::always("I3 a lone fresh replica converges", |m: &Protocols, s| {
                m.converges(s)
            }),
        ]
    }
}

/// Renames every resourceVersion in the state to 1, 2, … in the order a fixed walk meets them.
/// Only equality of versions matters to the protocol, so states that differ only in which
/// numbers the server handed out (two independent writes in either order) become one state.
fn canonicalize(s: &mut State) {
    let mut r = Renamer::default();
    r.pods(&mut s.world.pods);
    r.lease(&mut s.world.lease);
    r.num(&mut s.world.group.version);
    for replica in &mut s.replicas {
        r.pods(&mut replica.pods);
        r.lease(&mut replica.lease);
        r.num(&mut replica.group.version);
        for request in &mut replica.plan {
            match request {
                Request::Label(
                    LabelWrite::Demote {
                        resource_version, ..
                    }
                    | LabelWrite::Strip {
                        resource_version, ..
                    }
                    | LabelWrite::Promote {
                        resource_version, ..
                    }
                    | LabelWrite::Follow {
                        resource_version, ..
                    }
                    | LabelWrite::Fence {
                        lease_version: resource_version,
                        ..
                    },
                ) => r.text(resource_version),
                Request::Lease { expect, .. } => {
                    if let Some(v) = expect.as_mut() {
                        r.num(v);
                    }
                }
                Request::CheckLease { .. } => {}
            }
        }
    }
    r.pods(&mut s.oldest.0);
    r.lease(&mut s.oldest.1);
    r.num(&mut s.oldest.2.version);
    s.world.next_version = r.next();
}

#[derive(Default)]
struct Renamer {
    names: BTreeMap<u32, u32>,
}

impl Renamer {
    fn next(&self) -> u32 {
        u32::try_from(self.names.len()).unwrap_or(u32::MAX) + 1
    }

    fn num(&mut self, v: &mut u32) {
        let next = self.next();
        *v = *self.names.entry(*v).or_insert(next);
    }

    fn text(&mut self, t: &mut String) {
        if let Ok(mut v) = t.parse::<u32>() {
            self.num(&mut v);
            *t = v.to_string();
        }
    }

    fn pods(&mut self, pods: &mut [Option<PodObj>]) {
        for p in pods.iter_mut().flatten() {
            self.num(&mut p.version);
            if let Some(f) = p.fence.as_mut() {
                self.text(f);
            }
        }
    }

    fn lease(&mut self, lease: &mut Option<LeaseObj>) {
        if let Some(l) = lease.as_mut() {
            self.num(&mut l.version);
        }
    }
}

/// States that differ only in a cache no decision will read are the same state.
fn forget_cache(replica: &mut Replica, canonical: &State) {
    let (pods, lease, group) = canonical.oldest.clone();
    replica.pods = pods;
    replica.lease = lease;
    replica.group = group;
}

/// Replays `actions` from `s`; the first violation, if any.
fn replay(model: &Protocols, mut s: State, actions: &[Action]) -> Result<(), String> {
    for a in actions {
        if std::env::var_os("PODIUM_MODEL_TRACE").is_some() {
            eprintln!(
                "{a:?}: plans {:?}",
                s.replicas.iter().map(|r| r.plan.last()).collect::<Vec<_>>()
            );
        }
        // A reconcile that ended early (a refused request) has nothing left to send.
        if matches!(a, Action::Send(r) if s.replicas[*r].plan.is_empty()) {
            continue;
        }
        s = model
            .next_state(&s, a.clone())
            .ok_or_else(|| format!("{a:?} is not possible here"))?;
        if let Some(v) = &s.violation {
            return Err(format!("after {a:?}: {v}"));
        }
    }
    if model.converges(&s) {
        Ok(())
    } else {
        Err("does not converge".into())
    }
}

fn check(model: Protocols) -> (usize, usize, Vec<(&'static str, String)>) {
    let started = Instant::now();
    let checker = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
        .spawn_bfs()
        .join();
    let found: Vec<(&'static str, String)> = checker
        .discoveries()
        .into_iter()
        .map(|(name, path)| (name, format!("{:?}", path.into_actions())))
        .collect();
    println!(
        "model check ({:?}, {} pods, {} replicas, {} events, {} renewals, {} reconciles each, {} crashes, human edits {}, from scratch {}): {} states, {} unique, depth {}, {:.1}s",
        checker.model().protocol,
        checker.model().pods,
        checker.model().replicas,
        checker.model().events,
        checker.model().renewals,
        checker.model().decisions,
        checker.model().crashes,
        checker.model().human_edits,
        checker.model().from_scratch,
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    (checker.state_count(), checker.unique_state_count(), found)
}

#[test]
fn every_interleaving_keeps_one_leader_and_a_growing_epoch() {
    let (_, unique, found) = check(Protocols::ci(Protocol::Fenced));
    assert!(unique > 1000, "the model explored only {unique} states");
    assert!(found.is_empty(), "counterexamples: {found:#?}");
}

/// Renewals landing at any moment, from any replica: the operator's renewer sends them outside
/// any reconcile, from its own last write or its cache. One renewal with three events costs
/// about as much to explore as four events without; `PODIUM_MODEL_RENEWALS` and
/// `PODIUM_MODEL_EVENTS` widen it (docs/design.md gives how far it was run).
#[test]
fn renewals_at_any_moment_keep_one_leader_and_a_growing_epoch() {
    let mut model = Protocols::ci(Protocol::Fenced);
    model.renewals = model.renewals.max(1);
    model.events = u8::try_from(env_or("PODIUM_MODEL_EVENTS", 3)).unwrap_or(3);
    let (_, unique, found) = check(model);
    assert!(unique > 1000, "the model explored only {unique} states");
    assert!(found.is_empty(), "counterexamples: {found:#?}");
}

#[test]
fn the_check_finds_the_old_protocols_double_leaders() {
    // Without this, a model that cannot fail would pass the test above just the same.
    let mut model = Protocols::ci(Protocol::Legacy);
    model.events = model.events.min(2);
    let (_, _, found) = check(model);
    let i1 = found.iter().find(|(name, _)| name.starts_with("I1"));
    assert!(i1.is_some(), "the legacy protocol passed: {found:#?}");
    println!("legacy counterexample: {}", i1.unwrap().1);
}

/// Issue 11's first finding, on a real control plane: the active replica froze right after
/// its handover Lease write; leadership moved on while it was frozen; its promote then landed,
/// because the "fence" of the pod it promoted had been a no-op merge patch on a follower.
#[test]
fn a_frozen_replica_cannot_promote_after_leadership_moved_on() {
    use Action::*;
    let sequence = [
        SetPreferred(Some(1)),
        SyncGroup(0),
        Decide(0),
        Send(0), // replica 0: fence p0
        Send(0), // replica 0: Lease -> p1 (epoch 2); it freezes before the promote
        SyncGroup(1),
        SyncLease(1),
        SyncPods(1),
        SetPreferred(Some(2)),
        SyncGroup(1),
        Decide(1),
        Send(1), // replica 1: fence p1
        Send(1), // replica 1: Lease -> p2 (epoch 3)
        Send(1), // replica 1: promote p2
        Send(0), // replica 0 wakes up: promote p1 at epoch 2
    ];
    let fenced = Protocols::ci(Protocol::Fenced);
    assert_eq!(replay(&fenced, fenced.settled(true), &sequence), Ok(()));
    let legacy = Protocols::ci(Protocol::Legacy);
    let legacy_sequence = [
        SetPreferred(Some(1)),
        SyncGroup(0),
        Decide(0),
        Send(0), // Lease -> p1
        Send(0), // demote p0
        SyncGroup(1),
        SyncLease(1),
        SyncPods(1),
        SetPreferred(Some(2)),
        SyncGroup(1),
        Decide(1),
        Send(1), // Lease -> p2
        Send(1), // "fence" p1: a demotion of a follower, which changes nothing
        Send(1), // promote p2
        Send(0), // promote p1: its version still matches
    ];
    let outcome = replay(&legacy, legacy.settled(true), &legacy_sequence);
    assert!(
        outcome.as_ref().is_err_and(|e| e.contains("I1")),
        "{outcome:?}"
    );
}

/// Issue 11's second finding: one replica whose pod cache lags its Lease cache moved the Lease
/// away from a holder its pod cache did not show yet, and so never wrote to it.
#[test]
fn a_lagging_pod_cache_cannot_promote_past_a_holder_it_does_not_show() {
    use Action::*;
    // p1 carries a priority from the start. p2 is created, preferred and elected by replica 1,
    // and the old leader p0 is deleted. Replica 0 sees the new Lease but its pod cache is from
    // the start: p2 is no member to it, so it fails over to p1.
    let sequence = [
        CreatePod(2),
        SetPreferred(Some(2)),
        SyncPods(1),
        SyncGroup(1),
        Decide(1),
        Send(1), // fence p0
        Send(1), // Lease -> p2
        Send(1), // promote p2
        Send(1),
        SetPreferred(None),
        DeletePod(0),
        FinalizePod(0),
        SyncGroup(0),
        SyncLease(0),
        Decide(0),
        Send(0),
        Send(0),
        Send(0),
        Send(0),
    ];
    let start = |model: &Protocols| {
        let mut s = model.settled(true);
        let version = s.world.bump();
        let p1 = s.world.pods[1].as_mut().expect("p1 exists");
        p1.priority = true;
        p1.version = version;
        s.oldest.0 = s.world.pods.clone();
        for r in &mut s.replicas {
            r.pods = s.world.pods.clone();
        }
        s
    };
    let mut fenced = Protocols::ci(Protocol::Fenced);
    fenced.initial_pods = 2;
    fenced.events = 8;
    assert_eq!(replay(&fenced, start(&fenced), &sequence), Ok(()));
    let mut legacy = Protocols::ci(Protocol::Legacy);
    legacy.initial_pods = 2;
    legacy.events = 8;
    let outcome = replay(&legacy, start(&legacy), &sequence);
    assert!(
        outcome.as_ref().is_err_and(|e| e.contains("I1")),
        "{outcome:?}"
    );
}
