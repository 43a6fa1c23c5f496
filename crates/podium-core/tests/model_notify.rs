//! Exhaustive model check of the role-notification protocol (break-before-make at the process
//! level) with stateright: every interleaving of a bounded world, breadth first, with the real
//! [`Receiver::handle`], [`Receiver::tick`], [`Link::answered`], [`Link::granted`],
//! [`decide_activation`] and [`podium_core::notify::audience`]. The model only supplies the
//! world around them.
//!
//! The world:
//! - Pods `p0..`, each with a [`Receiver`]. The Lease starts held by `p0` at epoch 1; the
//!   environment elects another pod (epoch + 1) and deletes pods, each within a budget. A
//!   deleted pod's receiver and process are gone at once (the kubelet stops containers before
//!   the pod object is gone), and the operator sees it gone from then on.
//! - Time: one discrete global time `now` in ticks of [`UNIT`] ms on the operator's clock,
//!   advanced by `Tick` up to a bound. The first replica started sending at tick 0 and the
//!   model starts at tick 3, once its first time-out has passed. The term is [`TERM`] ms,
//!   chosen so that a term plus [`drift_margin_millis`] is exactly three ticks: the operator's
//!   time-out falls on a tick, where the model is exact. Clock-rate drift: every pod's clock
//!   runs slow, losing [`DRIFT`] ms per tick (4.2 %), the most the margin covers at this term,
//!   with the pod's clock reading `now * (UNIT - DRIFT)`. A slow pod is the worst case: a pod
//!   whose clock runs fast ends its terms sooner and refuses more stale nonces. A pod's term
//!   ends in the `Tick` that first reaches its deadline (`Receiver::tick` runs for every pod in
//!   that step), which is no sooner than the real deadline. With `DRIFT` = 43 ms the check
//!   must fail (a negative control below).
//! - Operator replicas, one after the other: only the current replica sends (the HA claim).
//!   It crashes within a budget; the next one starts with no links, no nonces and
//!   `since = now`. Answers to an earlier replica are lost with it; its messages stay in the
//!   network.
//! - The current replica sends each live pod what the operator would send it now: `follower` to
//!   pods other than the holder; to the holder, as `plan::plan` does: a probe (`leader` without
//!   a nonce, which can only be refused) while the replica has never heard from it, `leader`
//!   echoing the latest nonce received from it when [`decide_activation`] returns `Now`, and
//!   `pending` otherwise. All at the current epoch. Sending a `leader` message that echoes a
//!   nonce records a grant at the tick the nonce arrived ([`Link::granted`]), as the notifier
//!   does; `decide` times a pod out one term after its last grant, whatever it answers since.
//! - Every message carries a token; the operator mints one per pod, with that pod's audience
//!   ([`podium_core::notify::audience`]). `podium exec` takes a message only if its token's
//!   audience is the pod's own, and answers anything else 401: no nonce, no change.
//! - An adversary holds a genuine operator token for a pod of another group (the operator sends
//!   one with every message to a tenant's own pods), and knows every pod's name and UID. In
//!   any state it sends any live pod any message: any role, the current epoch, the next one or
//!   [`MAX_EPOCH`], no nonce or any it learned from answers to its own messages, a term of
//!   [`TERM`] or [`MAX_TERM_MILLIS`]; delivered at once (when to send is its choice anyway). At
//!   most `PODIUM_NOTIFY_MODEL_FORGERIES` (2) of them are taken by a pod; a forgery refused by
//!   the token check changes nothing, not even that budget, so it tries without limit.
//! - The network delays, reorders and loses messages and answers (any of them is delivered or
//!   dropped in any order, at any later time). `PODIUM_NOTIFY_MODEL_DUPLICATES=1` also delivers
//!   a message or an answer more than once. A message is its content, so the network is a set,
//!   bounded to `PODIUM_NOTIFY_MODEL_IN_FLIGHT` messages and as many answers (an answer that
//!   does not fit is lost).
//! - A pod handles a message at its own clock with a fresh nonce (named after the tick it was
//!   issued in) and answers at once: a `Command::Stop` has completed when the answer leaves.
//!   A pod takes at most one message per tick: the receiver keeps the time of each of its last
//!   eight nonces, and several per tick multiplied the states past what CI can explore. Two
//!   messages a pod would take in one tick are taken in consecutive ticks instead.
//!
//! Checked in every state reached:
//! - N1: at most one pod runs leader-only work (`Receiver::is_leading`).
//! - N2: a pod's epoch (the `epoch` of its answers) never goes back, and a pod leads only at an
//!   epoch it was elected at.
//! - N3: a pod takes only epochs the Lease has reached. A pod pushed beyond would refuse every
//!   genuine message until the Lease catches up: for good, at [`MAX_EPOCH`].
//!
//! And, so that the check is not vacuous, that some state has a pod leading, some state a
//! second pod leading after another led (a handover), and that the adversary tried leading
//! pods (counted outside the state, so that refusals cost no states).
//!
//! `PODIUM_NOTIFY_MODEL_FULL=1` widens the scope; `PODIUM_NOTIFY_MODEL_PODS`, `_ELECTIONS`,
//! `_DELETIONS`, `_CRASHES`, `_TIME`, `_IN_FLIGHT`, `_DUPLICATES` and `_FORGERIES` set each
//! bound.

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use podium_core::notify::{
    AUDIENCE_PREFIX, Activation, Identity, Link, MAX_EPOCH, MAX_TERM_MILLIS, NotifyRole, Other,
    Receiver, RoleMessage, decide_activation, drift_margin_millis,
};
use stateright::{Checker, HasDiscoveries, Model, Property};

/// One tick, on the operator's clock.
const UNIT: u64 = 1000;
/// A term plus its drift margin is exactly three ticks: 2872 + 28 + 100.
const TERM: u64 = 2872;
/// How many ms a pod's clock loses per tick: the most the margin covers over a term
/// (3 × 958 ≥ 2872; 3 × 957 is not).
const DRIFT: u64 = 42;
/// The tick the model starts at, one time-out after the first replica started: so the first
/// holder can be activated at once.
const START: u8 = 3;
const GROUP: &str = "ns/g";

fn uid(p: usize) -> String {
    format!("uid-{p}")
}

fn identity(p: usize) -> Identity {
    Identity {
        namespace: "ns".into(),
        group: "g".into(),
        pod: NAMES[p].into(),
        pod_uid: uid(p),
    }
}
const NAMES: [&str; 4] = ["p0", "p1", "p2", "p3"];

/// The pod whose token the adversary holds: a member of another group, in the same namespace.
fn foreign() -> Identity {
    Identity {
        namespace: "ns".into(),
        group: "other".into(),
        pod: "q0".into(),
        pod_uid: "uid-q0".into(),
    }
}

/// The audience of the tokens the operator mints for `identity`, and so the one `podium exec`
/// running as `identity` requires.
fn audience_of(variant: Variant, identity: &Identity) -> String {
    match variant {
        Variant::UnboundToken => AUDIENCE_PREFIX.into(),
        _ => identity.audience(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Variant {
    /// The real protocol.
    Real,
    /// Negative control: the operator tells the holder `leader` as soon as it has a nonce,
    /// ignoring `decide`.
    ActivateAtOnce,
    /// Negative control: a new replica passes `since = 0`, forgetting that an earlier
    /// replica's messages may still be in flight.
    ForgetSince,
    /// Negative control: every token has the one audience `podium.dev/notify`, as before
    /// tokens were bound to a pod, so a pod takes the adversary's token.
    UnboundToken,
}

#[derive(Clone, Debug)]
struct Notify {
    variant: Variant,
    pods: usize,
    elections: u8,
    deletions: u8,
    crashes: u8,
    max_time: u8,
    in_flight: usize,
    duplicates: bool,
    /// ms a pod's clock loses per tick.
    drift: u64,
    /// How many forged messages the pods may take, all told.
    forgeries: u8,
    /// The audience of each pod's tokens, as the operator mints them and as `podium exec`
    /// running as that pod requires them (it works it out once, at start).
    audiences: Vec<String>,
    /// The audience of the token the adversary captured.
    captured: String,
    /// Forgeries refused by the token check while exploring, and those of them sent to a pod
    /// that was leading: outside the state, so that the refusals cost no states, yet a run in
    /// which the adversary never tried shows.
    refused: Arc<AtomicU64>,
    refused_at_leader: Arc<AtomicU64>,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Notify {
    /// CI's scope; `PODIUM_NOTIFY_MODEL_FULL=1` widens it.
    fn ci(variant: Variant) -> Notify {
        let full = env_or("PODIUM_NOTIFY_MODEL_FULL", 0) == 1;
        let pick = |name: &str, ci: u64, wide: u64| {
            env_or(
                &format!("PODIUM_NOTIFY_MODEL_{name}"),
                if full { wide } else { ci },
            )
        };
        Notify {
            variant,
            pods: (pick("PODS", 2, 3) as usize).clamp(2, NAMES.len()),
            elections: pick("ELECTIONS", 1, 2) as u8,
            deletions: pick("DELETIONS", 1, 1) as u8,
            crashes: pick("CRASHES", 1, 1) as u8,
            max_time: pick("TIME", 3, 4) as u8,
            in_flight: pick("IN_FLIGHT", 1, 2) as usize,
            duplicates: pick("DUPLICATES", 0, 1) == 1,
            drift: DRIFT,
            forgeries: pick("FORGERIES", 2, 2) as u8,
            audiences: (0..NAMES.len())
                .map(|p| audience_of(variant, &identity(p)))
                .collect(),
            captured: audience_of(variant, &foreign()),
            refused: Arc::default(),
            refused_at_leader: Arc::default(),
        }
    }

    /// The pod's clock at `now`.
    fn pod_clock(&self, now: u8) -> u64 {
        u64::from(now) * (UNIT - self.drift)
    }
}

// ---------------------------------------------------------------------------------------------
// The state.

/// A [`Receiver`] as part of a state: the receiver keeps its fields to itself, so it is
/// compared and hashed by its `Debug` form, which shows all of them. The form and its hash are
/// made on each change and shared by the states that copy it: states are copied, hashed and
/// compared far more often than a receiver changes.
#[derive(Clone)]
struct Rx(Arc<Keyed>);

#[derive(Clone)]
struct Keyed {
    rx: Receiver,
    key: String,
    hash: u64,
}

impl Rx {
    fn new(rx: Receiver) -> Rx {
        Rx(Arc::new(Keyed::new(rx)))
    }

    /// Runs `change` on the receiver.
    fn change<T>(&mut self, change: impl FnOnce(&mut Receiver) -> T) -> T {
        let mut rx = self.0.rx.clone();
        let out = change(&mut rx);
        self.0 = Arc::new(Keyed::new(rx));
        out
    }
}

impl Keyed {
    fn new(rx: Receiver) -> Keyed {
        let key = format!("{rx:?}");
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        Keyed {
            rx,
            key,
            hash: hasher.finish(),
        }
    }
}

impl std::ops::Deref for Rx {
    type Target = Receiver;

    fn deref(&self) -> &Receiver {
        &self.0.rx
    }
}

impl fmt::Debug for Rx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "leading {:?} until {:?}",
            self.leading_epoch(),
            self.deadline()
        )
    }
}

impl PartialEq for Rx {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.key == other.0.key
    }
}

impl Eq for Rx {}

impl Hash for Rx {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Pod {
    /// `None` once the pod is gone.
    rx: Option<Rx>,
    /// The epoch of the pod's latest answer.
    epoch: u64,
    /// The tick of its latest answer: a pod takes at most one message per tick.
    answered: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Leader,
    Pending,
    Follower,
}

impl Role {
    fn notify(self) -> NotifyRole {
        match self {
            Role::Leader => NotifyRole::Leader,
            Role::Pending => NotifyRole::Pending,
            Role::Follower => NotifyRole::Follower,
        }
    }
}

/// Who sent a message, and so where its answer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum From {
    /// The current replica.
    Current,
    /// A replica that is gone: the answer goes nowhere.
    Earlier,
    /// The adversary, with the token it captured: the answer goes to it.
    Adversary,
}

/// A message in flight (the adversary's are delivered as it sends them: when to send is its
/// choice anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Msg {
    pod: u8,
    role: Role,
    epoch: u64,
    /// The echoed nonce: the tick it was issued in.
    nonce: Option<u8>,
    term_millis: u64,
    from: From,
}

/// An answer in flight to the current replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Answer {
    pod: u8,
    epoch: u64,
    running: bool,
    nonce: u8,
}

/// A [`Link`] with `Hash`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct LinkState {
    last_answer: Option<u64>,
    last_grant: Option<u64>,
    stopped_at: Option<u64>,
    running_at: Option<u64>,
}

impl LinkState {
    fn link(self) -> Link {
        Link {
            last_answer: self.last_answer,
            last_grant: self.last_grant,
            stopped_at: self.stopped_at,
            running_at: self.running_at,
        }
    }

    fn from_link(link: Link) -> Self {
        LinkState {
            last_answer: link.last_answer,
            last_grant: link.last_grant,
            stopped_at: link.stopped_at,
            running_at: link.running_at,
        }
    }
}

/// The current operator replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Replica {
    /// The tick it started sending.
    since: u8,
    links: Vec<LinkState>,
    /// The latest nonce received from each pod (the tick it was issued in), and the tick it
    /// arrived in: a `leader` message echoing it grants a term that ends one term after that.
    nonces: Vec<Option<(u8, u8)>>,
}

impl Replica {
    fn new(pods: usize, since: u8) -> Replica {
        Replica {
            since,
            links: vec![LinkState::default(); pods],
            nonces: vec![None; pods],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    /// The Lease holder at each epoch from 1: the epoch is `holders.len()`.
    holders: Vec<u8>,
    pods: Vec<Pod>,
    replica: Replica,
    messages: BTreeSet<Msg>,
    answers: BTreeSet<Answer>,
    elections_left: u8,
    deletions_left: u8,
    crashes_left: u8,
    forgeries_left: u8,
    /// The nonces the adversary learned from answers to its own messages: (pod, nonce).
    learned: BTreeSet<(u8, u8)>,
    /// The pods that have led, one bit each.
    led: u8,
    violation: Option<String>,
}

impl State {
    fn epoch(&self) -> u8 {
        self.holders.len() as u8
    }

    fn holder(&self) -> usize {
        usize::from(*self.holders.last().expect("the Lease starts held"))
    }

    fn leading(&self) -> usize {
        self.pods
            .iter()
            .filter(|p| p.rx.as_ref().is_some_and(|rx| rx.is_leading()))
            .count()
    }

    /// Whether every pod's epoch is one the Lease has reached: a pod at a higher epoch refuses
    /// every genuine message until the Lease catches up, for good at [`MAX_EPOCH`].
    fn epochs_reached(&self) -> bool {
        self.pods.iter().all(|p| p.epoch <= u64::from(self.epoch()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Tick,
    Elect(u8),
    Delete(u8),
    Crash,
    Send(u8),
    /// The adversary sends a message of its making, delivered at once.
    Forge(Msg),
    Deliver(Msg),
    Drop(Msg),
    Answer(Answer),
    DropAnswer(Answer),
}

// ---------------------------------------------------------------------------------------------
// The operator's side.

impl Notify {
    /// What the current replica sends pod `p` now, by the real activation rule.
    fn message_for(&self, s: &State, p: usize) -> Msg {
        let epoch = s.epoch();
        let holder = s.holder();
        let replica = &s.replica;
        let role = if p != holder {
            Role::Follower
        } else if replica.nonces[p].is_none() {
            // Never heard from: a probe, as `plan::plan` sends it — a leader message without a
            // nonce, which the pod refuses without any change but answers.
            Role::Leader
        } else {
            let since = match self.variant {
                Variant::ForgetSince => 0,
                _ => u64::from(replica.since) * UNIT,
            };
            let others = (0..self.pods).filter(|&o| o != p).map(|o| Other {
                pod: NAMES[o],
                gone: s.pods[o].rx.is_none(),
                link: replica.links[o].link(),
            });
            let activation = decide_activation(
                u64::from(epoch),
                &replica.links[p].link(),
                others,
                u64::from(s.now) * UNIT,
                since,
                TERM,
            );
            match (self.variant, activation) {
                (Variant::ActivateAtOnce, _) | (_, Activation::Now) => Role::Leader,
                (_, Activation::Wait { .. }) => Role::Pending,
            }
        };
        Msg {
            pod: p as u8,
            role,
            epoch: u64::from(epoch),
            nonce: if role == Role::Leader {
                replica.nonces[p].map(|(nonce, _)| nonce)
            } else {
                None
            },
            term_millis: TERM,
            from: From::Current,
        }
    }

    /// Records what the current replica is about to send: a `leader` message echoing a nonce
    /// grants a term that ends one term after the nonce arrived, as the notifier records it.
    fn sent(&self, s: &mut State, msg: &Msg) {
        let p = usize::from(msg.pod);
        if msg.role == Role::Leader
            && let Some((_, received)) = s.replica.nonces[p]
        {
            let mut link = s.replica.links[p].link();
            link.granted(u64::from(received) * UNIT);
            s.replica.links[p] = LinkState::from_link(link);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The adversary's side.

impl Notify {
    /// Every message the adversary can send now: to any live pod, any role, the current epoch,
    /// the next, or the highest a message may carry, and for `leader` no nonce or any it has
    /// learned from that pod, asking for one term or the longest.
    fn forgeries(&self, s: &State, out: &mut Vec<Action>) {
        let epoch = u64::from(s.epoch());
        for (p, pod) in s.pods.iter().enumerate() {
            if pod.rx.is_none() {
                continue;
            }
            for epoch in [epoch, epoch + 1, MAX_EPOCH] {
                let msg = |role, nonce, term_millis| {
                    Action::Forge(Msg {
                        pod: p as u8,
                        role,
                        epoch,
                        nonce,
                        term_millis,
                        from: From::Adversary,
                    })
                };
                out.push(msg(Role::Follower, None, TERM));
                out.push(msg(Role::Pending, None, TERM));
                let learned = s
                    .learned
                    .iter()
                    .filter(|&&(q, _)| usize::from(q) == p)
                    .map(|&(_, nonce)| Some(nonce));
                for nonce in std::iter::once(None).chain(learned) {
                    for term in [TERM, MAX_TERM_MILLIS] {
                        out.push(msg(Role::Leader, nonce, term));
                    }
                }
            }
        }
    }

    /// The audience of the token a message carries: the operator mints one for the pod it
    /// sends to; the adversary has only the one it captured.
    fn token(&self, msg: &Msg) -> &str {
        match msg.from {
            From::Adversary => &self.captured,
            From::Current | From::Earlier => &self.audiences[usize::from(msg.pod)],
        }
    }

    /// `podium exec`'s check, before the receiver sees the message: the token's audience must
    /// be the pod's own. Anything else is answered 401, without a nonce and without a change.
    fn admits(&self, s: &State, msg: &Msg) -> bool {
        let Some(rx) = &s.pods[usize::from(msg.pod)].rx else {
            return false;
        };
        let admitted = self.token(msg) == self.audiences[usize::from(msg.pod)];
        if !admitted {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if rx.is_leading() {
                self.refused_at_leader.fetch_add(1, Ordering::Relaxed);
            }
        }
        admitted
    }
}

// ---------------------------------------------------------------------------------------------
// The pod's side.

impl Notify {
    fn deliver(&self, s: &mut State, msg: Msg) -> Option<()> {
        let p = usize::from(msg.pod);
        let clock = self.pod_clock(s.now);
        // The adversary names whom it likes as leader; the operator names the epoch's holder.
        let holder = usize::try_from(msg.epoch)
            .ok()
            .and_then(|e| e.checked_sub(1))
            .and_then(|e| s.holders.get(e))
            .map_or(p, |&h| usize::from(h));
        let message = RoleMessage {
            group: GROUP.into(),
            pod: NAMES[p].into(),
            pod_uid: uid(p),
            role: msg.role.notify(),
            leader: Some(NAMES[holder].into()),
            epoch: msg.epoch,
            term_millis: msg.term_millis,
            nonce: msg.nonce.map(|n| n.to_string()),
        };
        if !self.admits(s, &msg) {
            return None;
        }
        let pod = &mut s.pods[p];
        if pod.answered == Some(s.now) {
            return None;
        }
        pod.answered = Some(s.now);
        let rx = pod.rx.as_mut()?;
        // The command is carried out before the answer leaves: the receiver's state is the
        // process's state.
        let reply = rx
            .change(|rx| rx.handle(&message, clock, s.now.to_string()))
            .expect("every message names the pod it reaches and is within bounds");
        let leading = rx.leading_epoch();
        if reply.ack.epoch < pod.epoch {
            s.violation = Some(format!(
                "N2: {} answered epoch {} after epoch {}",
                NAMES[p], reply.ack.epoch, pod.epoch
            ));
        }
        pod.epoch = reply.ack.epoch;
        if reply.ack.running != leading.is_some() {
            s.violation = Some(format!(
                "{} answered running {}",
                NAMES[p], reply.ack.running
            ));
        }
        if let Some(epoch) = leading {
            s.led |= 1 << p;
            let elected = usize::try_from(epoch)
                .ok()
                .and_then(|e| e.checked_sub(1))
                .and_then(|e| s.holders.get(e));
            if elected != Some(&msg.pod) {
                s.violation = Some(format!(
                    "N2: {} leads at epoch {epoch}, held by {elected:?}",
                    NAMES[p]
                ));
            }
        }
        match msg.from {
            From::Current => {
                let answer = Answer {
                    pod: msg.pod,
                    epoch: reply.ack.epoch,
                    running: reply.ack.running,
                    nonce: s.now,
                };
                if s.answers.len() < self.in_flight || s.answers.contains(&answer) {
                    s.answers.insert(answer);
                }
            }
            From::Earlier => {}
            From::Adversary => {
                s.learned.insert((msg.pod, s.now));
            }
        }
        Some(())
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

const N1: &str = "N1 at most one pod runs leader-only work";
const N2: &str = "N2 epochs go forward and a pod leads only at its own epoch";
const N3: &str = "N3 a pod takes only epochs the Lease has reached";

impl Model for Notify {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            now: START,
            holders: vec![0],
            pods: (0..self.pods)
                .map(|p| Pod {
                    rx: Some(Rx::new(Receiver::new(identity(p), MAX_TERM_MILLIS))),
                    epoch: 0,
                    answered: None,
                })
                .collect(),
            replica: Replica::new(self.pods, 0),
            messages: BTreeSet::new(),
            answers: BTreeSet::new(),
            elections_left: self.elections,
            deletions_left: self.deletions,
            crashes_left: self.crashes,
            forgeries_left: self.forgeries,
            learned: BTreeSet::new(),
            led: 0,
            violation: None,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.violation.is_some() {
            return;
        }
        if s.now < START + self.max_time {
            actions.push(Action::Tick);
        }
        for (p, pod) in s.pods.iter().enumerate() {
            if pod.rx.is_none() {
                continue;
            }
            actions.push(Action::Send(p as u8));
            if s.elections_left > 0 && p != s.holder() {
                actions.push(Action::Elect(p as u8));
            }
            if s.deletions_left > 0 {
                actions.push(Action::Delete(p as u8));
            }
        }
        if s.crashes_left > 0 {
            actions.push(Action::Crash);
        }
        if s.forgeries_left > 0 {
            self.forgeries(s, actions);
        }
        for &msg in &s.messages {
            actions.push(Action::Deliver(msg));
            actions.push(Action::Drop(msg));
        }
        for &answer in &s.answers {
            actions.push(Action::Answer(answer));
            actions.push(Action::DropAnswer(answer));
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        // A refused forgery changes nothing, not even the adversary's budget, which so bounds
        // only the forgeries a pod takes; checked before the state is copied, since most
        // actions of an adversary run are forgeries.
        if let Action::Forge(msg) = action
            && !self.admits(last, &msg)
        {
            return None;
        }
        let mut s = last.clone();
        match action {
            Action::Tick => {
                s.now += 1;
                let clock = self.pod_clock(s.now);
                for pod in &mut s.pods {
                    if let Some(rx) = pod.rx.as_mut() {
                        rx.change(|rx| rx.tick(clock));
                    }
                }
            }
            Action::Elect(p) => {
                s.elections_left -= 1;
                s.holders.push(p);
            }
            Action::Delete(p) => {
                s.deletions_left -= 1;
                s.pods[usize::from(p)].rx = None;
                // Nothing reaches a pod that is gone.
                s.messages.retain(|m| m.pod != p);
            }
            Action::Crash => {
                s.crashes_left -= 1;
                s.replica = Replica::new(self.pods, s.now);
                s.answers.clear();
                s.messages = s
                    .messages
                    .iter()
                    .map(|&m| Msg {
                        from: From::Earlier,
                        ..m
                    })
                    .collect();
            }
            Action::Send(p) => {
                let msg = self.message_for(&s, usize::from(p));
                if s.messages.contains(&msg) || s.messages.len() >= self.in_flight {
                    return None;
                }
                self.sent(&mut s, &msg);
                s.messages.insert(msg);
            }
            Action::Forge(msg) => {
                s.forgeries_left -= 1;
                self.deliver(&mut s, msg)?;
            }
            Action::Deliver(msg) => {
                if !self.duplicates {
                    s.messages.remove(&msg);
                }
                self.deliver(&mut s, msg)?;
            }
            Action::Drop(msg) => {
                s.messages.remove(&msg);
            }
            Action::Answer(answer) => {
                if !self.duplicates {
                    s.answers.remove(&answer);
                }
                let p = usize::from(answer.pod);
                let mut link = s.replica.links[p].link();
                link.answered(u64::from(s.now) * UNIT, answer.epoch, answer.running);
                s.replica.links[p] = LinkState::from_link(link);
                s.replica.nonces[p] = Some((answer.nonce, s.now));
            }
            Action::DropAnswer(answer) => {
                s.answers.remove(&answer);
            }
        }
        if s == *last {
            return None;
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(N1, |_, s: &State| s.leading() <= 1),
            Property::always(N2, |_, s: &State| s.violation.is_none()),
            Property::always(N3, |_, s: &State| s.epochs_reached()),
            Property::sometimes("a pod leads", |_, s: &State| s.leading() == 1),
            Property::sometimes("a second pod leads after another led", |_, s: &State| {
                s.led.count_ones() >= 2 && s.leading() == 1
            }),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Running it.

struct Found {
    unique: usize,
    refused_at_leader: u64,
    /// `always` properties that failed, with their counterexample.
    failures: Vec<(&'static str, String)>,
    /// `sometimes` properties with an example.
    examples: Vec<&'static str>,
}

fn trace(path: stateright::Path<State, Action>) -> String {
    let mut out = String::new();
    for (state, action) in path.into_vec() {
        out.push_str(&format!(
            "  t={} epoch={} holder=p{} pods={:?} replica(since={}, nonces={:?}) msgs={:?} answers={:?} adversary(forgeries left={}, learned={:?})\n",
            state.now,
            state.epoch(),
            state.holder(),
            state
                .pods
                .iter()
                .map(|p| p
                    .rx
                    .as_ref()
                    .map(|rx| format!("epoch {}, {rx:?}", p.epoch)))
                .collect::<Vec<_>>(),
            state.replica.since,
            state.replica.nonces,
            state.messages,
            state.answers,
            state.forgeries_left,
            state.learned,
        ));
        if let Some(action) = action {
            out.push_str(&format!("-> {action:?}\n"));
        }
    }
    out
}

/// Explores `model` breadth first, until `finish` has been found or everything has.
fn check(model: Notify, finish: Option<HasDiscoveries>) -> Found {
    let started = Instant::now();
    let sometimes: Vec<&'static str> = model
        .properties()
        .into_iter()
        .filter(|p| p.expectation == stateright::Expectation::Sometimes)
        .map(|p| p.name)
        .collect();
    let mut builder = model
        .checker()
        .threads(std::thread::available_parallelism().map_or(1, |n| n.get()));
    if let Some(finish) = finish {
        builder = builder.finish_when(finish);
    }
    let checker = builder.spawn_bfs().join();
    let mut failures = Vec::new();
    let mut examples = Vec::new();
    for (name, path) in checker.discoveries() {
        if sometimes.contains(&name) {
            examples.push(name);
        } else {
            failures.push((name, trace(path)));
        }
    }
    let m = checker.model();
    println!(
        "model check (notify, {:?}, {} pods, {} elections, {} deletions, {} crashes, {} ticks, {} in flight, duplicates {}, drift {} ms/tick, {} forgeries taken at most, {} refused, {} of them at a leading pod): {} states, {} unique states, depth {}, {:.1} s",
        m.variant,
        m.pods,
        m.elections,
        m.deletions,
        m.crashes,
        m.max_time,
        m.in_flight,
        m.duplicates,
        m.drift,
        m.forgeries,
        m.refused.load(Ordering::Relaxed),
        m.refused_at_leader.load(Ordering::Relaxed),
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    Found {
        unique: checker.unique_state_count(),
        refused_at_leader: m.refused_at_leader.load(Ordering::Relaxed),
        failures,
        examples,
    }
}

// The numbers the doc comment relies on, checked when the file compiles.
const _: () = assert!(TERM + TERM / 100 + 100 == 3 * UNIT);
const _: () = assert!(3 * (UNIT - DRIFT) >= TERM && 3 * (UNIT - DRIFT - 1) < TERM);

#[test]
fn the_margin_makes_a_term_three_ticks() {
    assert_eq!(TERM + drift_margin_millis(TERM), 3 * UNIT);
}

/// Checks that `model` keeps N1, N2 and N3 in every state, and that every `sometimes` happened.
fn expect_safe(model: Notify) -> Found {
    let expected = model
        .properties()
        .iter()
        .filter(|p| p.expectation == stateright::Expectation::Sometimes)
        .count();
    let found = check(model, None);
    assert!(
        found.failures.is_empty(),
        "counterexamples:\n{}",
        found
            .failures
            .iter()
            .map(|(name, trace)| format!("{name}:\n{trace}"))
            .collect::<String>()
    );
    assert!(found.unique > 1000, "only {} states", found.unique);
    assert_eq!(
        found.examples.len(),
        expected,
        "vacuous: only {:?} happened",
        found.examples
    );
    found
}

#[test]
fn every_interleaving_keeps_at_most_one_leader_process() {
    let model = Notify::ci(Variant::Real);
    let adversary = model.forgeries > 0;
    let found = expect_safe(model);
    assert!(
        !adversary || found.refused_at_leader > 0,
        "vacuous: the adversary never tried a leading pod"
    );
}

#[test]
fn the_check_finds_forgeries_when_any_operator_token_is_taken() {
    let found = check(
        Notify::ci(Variant::UnboundToken),
        Some(HasDiscoveries::AllOf([N1, N3].into_iter().collect())),
    );
    for property in [N1, N3] {
        let trace = found.failures.iter().find(|(name, _)| *name == property);
        assert!(
            trace.is_some(),
            "no counterexample to {property}: {:?}",
            found.failures
        );
        println!("counterexample to {property}:\n{}", trace.unwrap().1);
    }
}

fn expect_double_leader(model: Notify) {
    let found = check(model, Some(HasDiscoveries::AnyFailures));
    let n1 = found.failures.iter().find(|(name, _)| *name == N1);
    assert!(n1.is_some(), "no double leader found: {:?}", found.failures);
    println!("counterexample:\n{}", n1.unwrap().1);
}

#[test]
fn the_check_finds_an_activation_that_ignores_decide() {
    // Without the negative controls, a model that cannot fail would pass just the same.
    expect_double_leader(Notify::ci(Variant::ActivateAtOnce));
}

#[test]
fn the_check_finds_a_replica_that_forgets_its_predecessors_messages() {
    expect_double_leader(Notify::ci(Variant::ForgetSince));
}

#[test]
fn the_check_finds_drift_beyond_the_margin() {
    let mut model = Notify::ci(Variant::Real);
    model.drift = DRIFT + 1;
    expect_double_leader(model);
}
