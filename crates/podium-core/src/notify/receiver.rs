//! The pod's side of a notification, as a pure state machine over the pod's own monotonic
//! clock (milliseconds from any origin). `podium exec` drives it; an app that takes the push
//! itself can follow the same rules.
use std::collections::VecDeque;

use super::message::{Ack, NotifyRole, RoleMessage};

/// How many recently issued nonces a `leader` message may echo: enough for a few answers in
/// flight at once, few enough that an old nonce cannot come back.
const NONCES_KEPT: usize = 8;

/// What the pod must do with its leader-only command after a message or a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Nothing,
    Start {
        epoch: u64,
    },
    /// Stop it, and answer only once it has exited.
    Stop,
    /// The pod leads again at a newer epoch: stop the command, then start it with that epoch.
    Restart {
        epoch: u64,
    },
}

/// The answer to a message: the [`Ack`] to send back (after carrying out `command`) and
/// whether the message was refused as stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub ack: Ack,
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Term {
    epoch: u64,
    /// The pod's clock at which leader-only work must stop without a renewal.
    until: u64,
}

/// Who this pod is, as the Downward API tells it: a message must name all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    /// The ElectionGroup's name, within `namespace`.
    pub group: String,
    pub pod: String,
    pub pod_uid: String,
}

impl Identity {
    /// `namespace/group`, as messages name the group.
    pub fn group_key(&self) -> String {
        format!("{}/{}", self.namespace, self.group)
    }

    /// The audience a token must carry to be taken here ([`super::audience`]).
    pub fn audience(&self) -> String {
        super::audience(&self.namespace, &self.group, &self.pod_uid)
    }
}

/// Why a message was refused before anything in it was believed. No nonce goes out with a
/// rejection, and the pod's state does not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectionKind {
    /// The message is for another pod, pod UID, group or namespace (HTTP 403).
    Identity,
    /// A field is outside what any honest operator sends (HTTP 400).
    Bounds,
}

#[derive(Clone, Debug)]
pub struct Receiver {
    identity: Identity,
    group_key: String,
    /// The longest term this pod grants, whatever a message asks (at most
    /// [`super::MAX_TERM_MILLIS`]).
    max_term_millis: u64,
    highest_epoch: u64,
    nonces: VecDeque<(String, u64)>,
    term: Option<Term>,
}

impl Receiver {
    /// A receiver for the pod `identity`, granting terms of at most `max_term_millis` (capped at
    /// [`super::MAX_TERM_MILLIS`]).
    pub fn new(identity: Identity, max_term_millis: u64) -> Self {
        Receiver {
            group_key: identity.group_key(),
            identity,
            max_term_millis: max_term_millis.min(super::MAX_TERM_MILLIS),
            highest_epoch: 0,
            nonces: VecDeque::new(),
            term: None,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn is_leading(&self) -> bool {
        self.term.is_some()
    }

    /// The highest epoch this pod has taken.
    pub fn highest_epoch(&self) -> u64 {
        self.highest_epoch
    }

    /// The epoch the command runs under, while it runs.
    pub fn leading_epoch(&self) -> Option<u64> {
        self.term.map(|term| term.epoch)
    }

    /// When the current term ends, on the pod's clock.
    pub fn deadline(&self) -> Option<u64> {
        self.term.map(|term| term.until)
    }

    /// Whether `message` is for this pod and within bounds: checked before anything in it is
    /// believed, and before a nonce is handed out.
    pub fn admit(&self, message: &RoleMessage) -> Result<(), Rejection> {
        let identity = |reason: String| Rejection {
            kind: RejectionKind::Identity,
            reason,
        };
        if message.group != self.group_key {
            return Err(identity(format!(
                "message for group {:?}, this pod runs for {:?}",
                message.group, self.group_key
            )));
        }
        if message.pod != self.identity.pod {
            return Err(identity(format!(
                "message for pod {:?}, this is {:?}",
                message.pod, self.identity.pod
            )));
        }
        if message.pod_uid != self.identity.pod_uid {
            return Err(identity(format!(
                "message for pod UID {:?}, this pod's is {:?}",
                message.pod_uid, self.identity.pod_uid
            )));
        }
        let bounds = |reason: String| Rejection {
            kind: RejectionKind::Bounds,
            reason,
        };
        if message.epoch > super::MAX_EPOCH {
            return Err(bounds(format!(
                "epoch {} is above the largest a Lease can carry ({})",
                message.epoch,
                super::MAX_EPOCH
            )));
        }
        if message.term_millis > super::MAX_TERM_MILLIS {
            return Err(bounds(format!(
                "termMillis {} is above the longest term an ElectionGroup can have ({})",
                message.term_millis,
                super::MAX_TERM_MILLIS
            )));
        }
        Ok(())
    }

    /// Takes one message at `now`; `fresh_nonce` is handed out in the answer, unless the
    /// message is rejected by [`Receiver::admit`].
    pub fn handle(
        &mut self,
        message: &RoleMessage,
        now: u64,
        fresh_nonce: String,
    ) -> Result<Reply, Rejection> {
        self.admit(message)?;
        let (accepted, reason, command) = self.decide(message, now);
        self.nonces.push_back((fresh_nonce.clone(), now));
        while self.nonces.len() > NONCES_KEPT {
            self.nonces.pop_front();
        }
        Ok(Reply {
            ack: Ack {
                nonce: fresh_nonce,
                epoch: self.highest_epoch,
                running: self.term.is_some(),
                accepted,
                reason,
            },
            command,
        })
    }

    /// Ends the term once the pod's clock has passed it: the pod stops on its own when the
    /// operator falls silent.
    pub fn tick(&mut self, now: u64) -> Command {
        match self.term {
            Some(term) if now >= term.until => {
                self.term = None;
                Command::Stop
            }
            _ => Command::Nothing,
        }
    }

    fn decide(&mut self, message: &RoleMessage, now: u64) -> (bool, Option<String>, Command) {
        if message.epoch < self.highest_epoch {
            return refuse(format!(
                "stale epoch {}: this pod has taken epoch {}",
                message.epoch, self.highest_epoch
            ));
        }
        self.highest_epoch = message.epoch;
        if message.role != NotifyRole::Leader {
            return match self.term.take() {
                Some(_) => (true, Some("stopped".into()), Command::Stop),
                None => (true, None, Command::Nothing),
            };
        }
        let issued = message
            .nonce
            .as_ref()
            .and_then(|echoed| self.nonces.iter().find(|(nonce, _)| nonce == echoed))
            .map(|&(_, issued)| issued);
        let Some(issued) = issued else {
            return self.refuse_leader(
                message.epoch,
                "a leader message must echo a nonce this pod issued recently",
            );
        };
        let until = issued.saturating_add(message.term_millis.min(self.max_term_millis));
        if until <= now {
            return self.refuse_leader(message.epoch, "the echoed nonce is older than the term");
        }
        match self.term {
            Some(term) if term.epoch == message.epoch => {
                self.term = Some(Term {
                    epoch: term.epoch,
                    until: until.max(term.until),
                });
                (true, None, Command::Nothing)
            }
            Some(_) => {
                self.term = Some(Term {
                    epoch: message.epoch,
                    until,
                });
                (
                    true,
                    Some("restarted at a newer epoch".into()),
                    Command::Restart {
                        epoch: message.epoch,
                    },
                )
            }
            None => {
                self.term = Some(Term {
                    epoch: message.epoch,
                    until,
                });
                (
                    true,
                    Some("started".into()),
                    Command::Start {
                        epoch: message.epoch,
                    },
                )
            }
        }
    }
}

impl Receiver {
    /// Refuses a leader message that grants no term. A term at the message's epoch keeps
    /// running (the message may be a probe by an operator that has not heard from this pod);
    /// a term at an older epoch ends, because that epoch is over: "running" in an answer
    /// always means running at the answer's epoch.
    fn refuse_leader(&mut self, epoch: u64, reason: &str) -> (bool, Option<String>, Command) {
        match self.term {
            Some(term) if term.epoch < epoch => {
                self.term = None;
                (
                    false,
                    Some(format!(
                        "{reason}; stopped the term of epoch {}",
                        term.epoch
                    )),
                    Command::Stop,
                )
            }
            _ => refuse(reason.into()),
        }
    }
}

fn refuse(reason: String) -> (bool, Option<String>, Command) {
    (false, Some(reason), Command::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: u64 = 10_000;

    fn message(role: NotifyRole, epoch: u64, nonce: Option<&str>) -> RoleMessage {
        RoleMessage {
            group: "ns/g".into(),
            pod: "p".into(),
            pod_uid: "u1".into(),
            role,
            leader: Some("p".into()),
            epoch,
            term_millis: TERM,
            nonce: nonce.map(str::to_string),
        }
    }

    fn identity() -> Identity {
        Identity {
            namespace: "ns".into(),
            group: "g".into(),
            pod: "p".into(),
            pod_uid: "u1".into(),
        }
    }

    fn receiver() -> Receiver {
        Receiver::new(identity(), crate::notify::MAX_TERM_MILLIS)
    }

    /// `Receiver::handle` for a message that passes `admit`.
    trait Handle {
        fn take(&mut self, message: &RoleMessage, now: u64, nonce: String) -> Reply;
    }

    impl Handle for Receiver {
        fn take(&mut self, message: &RoleMessage, now: u64, nonce: String) -> Reply {
            self.handle(message, now, nonce)
                .expect("an admissible message")
        }
    }

    #[test]
    fn a_leader_message_needs_a_nonce_the_pod_issued() {
        let mut r = receiver();
        let reply = r.take(
            &message(NotifyRole::Leader, 1, Some("forged")),
            0,
            "n0".into(),
        );
        assert!(!reply.ack.accepted);
        assert_eq!(reply.command, Command::Nothing);
        let reply = r.take(&message(NotifyRole::Leader, 1, Some("n0")), 5, "n1".into());
        assert!(reply.ack.accepted && reply.ack.running);
        assert_eq!(reply.command, Command::Start { epoch: 1 });
    }

    #[test]
    fn the_term_runs_from_the_nonce_not_from_the_message() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        // Delivered late: the term still ends one term after the nonce was issued.
        let reply = r.take(
            &message(NotifyRole::Leader, 1, Some("n0")),
            9_000,
            "n1".into(),
        );
        assert_eq!(reply.command, Command::Start { epoch: 1 });
        assert_eq!(r.deadline(), Some(TERM));
        assert_eq!(r.tick(TERM - 1), Command::Nothing);
        assert_eq!(r.tick(TERM), Command::Stop);
        assert!(!r.is_leading());
    }

    #[test]
    fn a_nonce_older_than_the_term_starts_nothing() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        let reply = r.take(
            &message(NotifyRole::Leader, 1, Some("n0")),
            TERM,
            "n1".into(),
        );
        assert!(!reply.ack.accepted);
        assert_eq!(reply.command, Command::Nothing);
    }

    #[test]
    fn older_epochs_are_refused_after_a_demotion() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.take(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        let reply = r.take(&message(NotifyRole::Follower, 2, None), 2, "n2".into());
        assert_eq!(reply.command, Command::Stop);
        assert_eq!((reply.ack.running, reply.ack.epoch), (false, 2));
        // A renewal from epoch 1, delayed in the network, arrives after the demotion.
        let reply = r.take(&message(NotifyRole::Leader, 1, Some("n1")), 3, "n3".into());
        assert!(!reply.ack.accepted && !reply.ack.running);
        assert_eq!(reply.command, Command::Nothing);
    }

    #[test]
    fn renewals_extend_and_a_newer_epoch_restarts() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.take(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        r.take(&message(NotifyRole::Leader, 1, Some("n1")), 2, "n2".into());
        assert_eq!(r.deadline(), Some(1 + TERM));
        // A reordered older renewal does not shorten the term.
        r.take(&message(NotifyRole::Leader, 1, Some("n0")), 3, "n3".into());
        assert_eq!(r.deadline(), Some(1 + TERM));
        let reply = r.take(&message(NotifyRole::Leader, 3, Some("n3")), 4, "n4".into());
        assert_eq!(reply.command, Command::Restart { epoch: 3 });
        assert_eq!(r.leading_epoch(), Some(3));
    }

    #[test]
    fn running_always_means_running_at_the_answered_epoch() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.take(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        // A probe at the same epoch (no nonce) leaves the term alone.
        let probe = r.take(&message(NotifyRole::Leader, 1, None), 2, "n2".into());
        assert!(!probe.ack.accepted && probe.ack.running);
        assert_eq!(probe.command, Command::Nothing);
        // A newer epoch that grants no term ends the old one.
        let newer = r.take(
            &message(NotifyRole::Leader, 2, Some("forged")),
            3,
            "n3".into(),
        );
        assert_eq!(newer.command, Command::Stop);
        assert_eq!(
            (newer.ack.accepted, newer.ack.running, newer.ack.epoch),
            (false, false, 2)
        );
    }

    #[test]
    fn a_message_for_anyone_else_is_rejected_without_a_nonce_or_a_change() {
        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 3, None), 0, "n0".into());
        let mut cases = Vec::new();
        for (what, edit) in [
            (
                "pod",
                (|m: &mut RoleMessage| m.pod = "q".into()) as fn(&mut RoleMessage),
            ),
            ("pod UID", |m| m.pod_uid = "u0".into()),
            ("group", |m| m.group = "ns/h".into()),
            ("namespace", |m| m.group = "other/g".into()),
        ] {
            let mut forged = message(NotifyRole::Leader, 4, Some("n0"));
            edit(&mut forged);
            cases.push((what, forged));
        }
        for (what, forged) in cases {
            let rejection = r.handle(&forged, 1, "fresh".into()).unwrap_err();
            assert_eq!(rejection.kind, RejectionKind::Identity, "{what}");
            // The namespace is half of the group's key, and is named as such.
            let named = if what == "namespace" { "group" } else { what };
            assert!(
                rejection.reason.contains(named),
                "{what}: {}",
                rejection.reason
            );
        }
        assert_eq!((r.highest_epoch(), r.is_leading()), (3, false));
        // The nonce of a rejected message was never handed out: it cannot be echoed.
        let reply = r.take(
            &message(NotifyRole::Leader, 3, Some("fresh")),
            2,
            "n1".into(),
        );
        assert!(!reply.ack.accepted);
    }

    #[test]
    fn epochs_and_terms_beyond_what_a_lease_allows_are_rejected() {
        let mut r = receiver();
        let mut wedge = message(NotifyRole::Follower, 1 << 53, None);
        let rejection = r.handle(&wedge, 0, "n0".into()).unwrap_err();
        assert_eq!(rejection.kind, RejectionKind::Bounds);
        wedge.epoch = crate::notify::MAX_EPOCH + 1;
        assert!(r.handle(&wedge, 0, "n0".into()).is_err());
        wedge.epoch = crate::notify::MAX_EPOCH;
        assert!(r.handle(&wedge, 0, "n0".into()).is_ok());

        let mut r = receiver();
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        let mut long = message(NotifyRole::Leader, 1, Some("n0"));
        long.term_millis = crate::notify::MAX_TERM_MILLIS + 1;
        assert_eq!(
            r.handle(&long, 1, "n1".into()).unwrap_err().kind,
            RejectionKind::Bounds
        );
        assert!(!r.is_leading());
    }

    #[test]
    fn a_term_is_cut_to_the_pods_own_maximum() {
        let mut r = Receiver::new(identity(), 1_000);
        r.take(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        let mut long = message(NotifyRole::Leader, 1, Some("n0"));
        long.term_millis = crate::notify::MAX_TERM_MILLIS;
        assert!(r.take(&long, 10, "n1".into()).ack.running);
        assert_eq!(r.deadline(), Some(1_000));
    }

    #[test]
    fn the_audience_names_namespace_group_and_pod_uid() {
        assert_eq!(identity().audience(), "podium.dev/notify/ns/g/u1");
    }
}
