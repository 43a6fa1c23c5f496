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

#[derive(Clone, Debug)]
pub struct Receiver {
    pod: String,
    group: Option<String>,
    highest_epoch: u64,
    nonces: VecDeque<(String, u64)>,
    term: Option<Term>,
}

impl Receiver {
    /// A receiver for `pod`; with `group`, messages for any other group are refused.
    pub fn new(pod: impl Into<String>, group: Option<String>) -> Self {
        Receiver {
            pod: pod.into(),
            group,
            highest_epoch: 0,
            nonces: VecDeque::new(),
            term: None,
        }
    }

    pub fn is_leading(&self) -> bool {
        self.term.is_some()
    }

    /// The epoch the command runs under, while it runs.
    pub fn leading_epoch(&self) -> Option<u64> {
        self.term.map(|term| term.epoch)
    }

    /// When the current term ends, on the pod's clock.
    pub fn deadline(&self) -> Option<u64> {
        self.term.map(|term| term.until)
    }

    /// Takes one message at `now`; `fresh_nonce` is handed out in the answer.
    pub fn handle(&mut self, message: &RoleMessage, now: u64, fresh_nonce: String) -> Reply {
        let (accepted, reason, command) = self.decide(message, now);
        self.nonces.push_back((fresh_nonce.clone(), now));
        while self.nonces.len() > NONCES_KEPT {
            self.nonces.pop_front();
        }
        Reply {
            ack: Ack {
                nonce: fresh_nonce,
                epoch: self.highest_epoch,
                running: self.term.is_some(),
                accepted,
                reason,
            },
            command,
        }
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
        if message.pod != self.pod {
            return refuse(format!(
                "message for pod {:?}, this is {:?}",
                message.pod, self.pod
            ));
        }
        if let Some(group) = &self.group
            && *group != message.group
        {
            return refuse(format!(
                "message for group {:?}, this pod runs for {group:?}",
                message.group
            ));
        }
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
        let until = issued.saturating_add(message.term_millis);
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
            role,
            leader: Some("p".into()),
            epoch,
            term_millis: TERM,
            nonce: nonce.map(str::to_string),
        }
    }

    fn receiver() -> Receiver {
        Receiver::new("p", Some("ns/g".into()))
    }

    #[test]
    fn a_leader_message_needs_a_nonce_the_pod_issued() {
        let mut r = receiver();
        let reply = r.handle(
            &message(NotifyRole::Leader, 1, Some("forged")),
            0,
            "n0".into(),
        );
        assert!(!reply.ack.accepted);
        assert_eq!(reply.command, Command::Nothing);
        let reply = r.handle(&message(NotifyRole::Leader, 1, Some("n0")), 5, "n1".into());
        assert!(reply.ack.accepted && reply.ack.running);
        assert_eq!(reply.command, Command::Start { epoch: 1 });
    }

    #[test]
    fn the_term_runs_from_the_nonce_not_from_the_message() {
        let mut r = receiver();
        r.handle(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        // Delivered late: the term still ends one term after the nonce was issued.
        let reply = r.handle(
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
        r.handle(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        let reply = r.handle(
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
        r.handle(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.handle(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        let reply = r.handle(&message(NotifyRole::Follower, 2, None), 2, "n2".into());
        assert_eq!(reply.command, Command::Stop);
        assert_eq!((reply.ack.running, reply.ack.epoch), (false, 2));
        // A renewal from epoch 1, delayed in the network, arrives after the demotion.
        let reply = r.handle(&message(NotifyRole::Leader, 1, Some("n1")), 3, "n3".into());
        assert!(!reply.ack.accepted && !reply.ack.running);
        assert_eq!(reply.command, Command::Nothing);
    }

    #[test]
    fn renewals_extend_and_a_newer_epoch_restarts() {
        let mut r = receiver();
        r.handle(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.handle(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        r.handle(&message(NotifyRole::Leader, 1, Some("n1")), 2, "n2".into());
        assert_eq!(r.deadline(), Some(1 + TERM));
        // A reordered older renewal does not shorten the term.
        r.handle(&message(NotifyRole::Leader, 1, Some("n0")), 3, "n3".into());
        assert_eq!(r.deadline(), Some(1 + TERM));
        let reply = r.handle(&message(NotifyRole::Leader, 3, Some("n3")), 4, "n4".into());
        assert_eq!(reply.command, Command::Restart { epoch: 3 });
        assert_eq!(r.leading_epoch(), Some(3));
    }

    #[test]
    fn running_always_means_running_at_the_answered_epoch() {
        let mut r = receiver();
        r.handle(&message(NotifyRole::Follower, 1, None), 0, "n0".into());
        r.handle(&message(NotifyRole::Leader, 1, Some("n0")), 1, "n1".into());
        // A probe at the same epoch (no nonce) leaves the term alone.
        let probe = r.handle(&message(NotifyRole::Leader, 1, None), 2, "n2".into());
        assert!(!probe.ack.accepted && probe.ack.running);
        assert_eq!(probe.command, Command::Nothing);
        // A newer epoch that grants no term ends the old one.
        let newer = r.handle(
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
    fn messages_for_another_pod_or_group_are_refused() {
        let mut r = receiver();
        let mut other_pod = message(NotifyRole::Follower, 7, None);
        other_pod.pod = "q".into();
        assert!(!r.handle(&other_pod, 0, "n0".into()).ack.accepted);
        let mut other_group = message(NotifyRole::Follower, 7, None);
        other_group.group = "ns/h".into();
        assert!(!r.handle(&other_group, 0, "n1".into()).ack.accepted);
        // Neither moved the epoch.
        assert!(
            r.handle(&message(NotifyRole::Follower, 1, None), 0, "n2".into())
                .ack
                .accepted
        );
    }
}
