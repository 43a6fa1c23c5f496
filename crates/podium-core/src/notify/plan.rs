//! What the operator sends to one group's pods now: observation in (the group's leader and
//! epoch, each pod's answers and deliveries), messages out, and when to look again.
use super::activation::{self, Activation, Link, Other};
use super::message::NotifyRole;

/// A message the pod took: which role at which epoch, and when its answer arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub role: NotifyRole,
    pub epoch: u64,
    pub at: u64,
}

/// One pod as the notifier knows it, on the operator's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView<'a> {
    pub name: &'a str,
    /// Its pod object is gone (or was replaced under the same name).
    pub gone: bool,
    /// It has an IP to send to.
    pub reachable: bool,
    /// A message to it is in flight.
    pub busy: bool,
    pub link: Link,
    pub delivered: Option<Delivered>,
    /// No send before this time (backoff after a failure or a refusal).
    pub retry_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView<'a> {
    /// The pod that holds the Lease and the leader label, if any.
    pub leader: Option<&'a str>,
    pub epoch: u64,
    pub term_millis: u64,
    /// When this operator started sending (see [`activation::decide`]).
    pub since: u64,
    pub now: u64,
    pub pods: Vec<PodView<'a>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Index into `pods` and the role to send it.
    pub sends: Vec<(usize, NotifyRole)>,
    /// The leader's activation, when there is a leader.
    pub activation: Option<Activation>,
    /// When something becomes due without any new input.
    pub wake_at: Option<u64>,
}

/// A leader message echoes the nonce of the answer before, so the term it grants ends one
/// term after that answer; renewing every third of a term keeps a third of a term in hand.
pub fn renew_interval(term_millis: u64) -> u64 {
    (term_millis / 3).max(1)
}

/// The notifier must send each pod its latest nonce, and none to a pod it has not heard from.
pub fn plan(view: &GroupView<'_>) -> Plan {
    let leader = view
        .leader
        .and_then(|name| view.pods.iter().find(|p| p.name == name));
    let activation = leader.map(|leader| {
        let others = view
            .pods
            .iter()
            .filter(|p| p.name != leader.name)
            .map(|p| Other {
                pod: p.name,
                gone: p.gone,
                link: p.link,
            });
        activation::decide(
            view.epoch,
            &leader.link,
            others,
            view.now,
            view.since,
            view.term_millis,
        )
    });
    let mut wake_at = match &activation {
        Some(Activation::Wait { until, .. }) => Some(*until),
        _ => None,
    };
    let mut sends = Vec::new();
    for (index, pod) in view.pods.iter().enumerate() {
        if pod.gone || !pod.reachable {
            continue;
        }
        let role = match (Some(pod.name) == view.leader, &activation) {
            (true, Some(Activation::Now)) => NotifyRole::Leader,
            // Never heard from, as after an operator restart: a `leader` message without a
            // nonce is refused without any change, and the answer says whether the pod already
            // runs at this epoch. `pending` would stop a leader that was running fine.
            (true, _) if pod.link.last_answer.is_none() => NotifyRole::Leader,
            (true, _) => NotifyRole::Pending,
            (false, _) => NotifyRole::Follower,
        };
        let due = match pod.delivered {
            // A leader's term runs from the nonce its `leader` message echoes, so the holder's
            // nonce is kept fresh while it waits as well as while it leads. Otherwise, after a
            // wait of most of a term for the old leader, activation echoed a nonce from the
            // wait's start: the command started, its term ended ~100 ms later, and it started
            // again at the next renewal.
            Some(d) if d.role == role && d.epoch == view.epoch => {
                (role != NotifyRole::Follower).then(|| d.at + renew_interval(view.term_millis))
            }
            _ => Some(view.now),
        };
        let Some(due) = due.map(|due| due.max(pod.retry_at)) else {
            continue;
        };
        if pod.busy {
            // Its answer brings the pod back here.
            continue;
        }
        if due <= view.now {
            sends.push((index, role));
        } else {
            wake_at = Some(wake_at.map_or(due, |w| w.min(due)));
        }
    }
    Plan {
        sends,
        activation,
        wake_at,
    }
}

/// Whether a pod that is no longer a member can be forgotten: it is gone, or it has stopped at
/// the current epoch, or whatever it ran has timed out (one term after its last grant).
pub fn forgettable(pod: &PodView<'_>, epoch: u64, now: u64, since: u64, term_millis: u64) -> bool {
    pod.gone
        || pod.link.stopped_at.is_some_and(|stopped| stopped >= epoch)
        || now >= pod.link.timed_out_at(since, term_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: u64 = 9_000;

    fn pod(name: &str) -> PodView<'_> {
        PodView {
            name,
            gone: false,
            reachable: true,
            busy: false,
            link: Link::default(),
            delivered: None,
            retry_at: 0,
        }
    }

    /// `p` once it took `role` at the views' epoch and its answer (running only as leader)
    /// arrived at `at`.
    fn took(mut p: PodView<'_>, role: NotifyRole, at: u64) -> PodView<'_> {
        p.link.answered(at, 2, role == NotifyRole::Leader);
        p.delivered = Some(Delivered { role, epoch: 2, at });
        p
    }

    fn view<'a>(leader: Option<&'a str>, now: u64, pods: Vec<PodView<'a>>) -> GroupView<'a> {
        GroupView {
            leader,
            epoch: 2,
            term_millis: TERM,
            since: 0,
            now,
            pods,
        }
    }

    #[test]
    fn a_waiting_leader_is_sent_pending_again_each_renewal_so_its_nonce_stays_fresh() {
        let mut old = pod("old");
        old.link.answered(50, 1, true);
        let new = took(pod("new"), NotifyRole::Pending, 105);
        let renew_at = 105 + renew_interval(TERM);
        let planned = plan(&view(Some("new"), 106, vec![new.clone(), old.clone()]));
        assert!(matches!(planned.activation, Some(Activation::Wait { .. })));
        assert!(!planned.sends.iter().any(|&(i, _)| i == 0), "{planned:?}");
        assert!(
            planned.wake_at.is_some_and(|w| w <= renew_at),
            "{planned:?}"
        );
        let planned = plan(&view(Some("new"), renew_at, vec![new, old]));
        assert!(matches!(planned.activation, Some(Activation::Wait { .. })));
        assert!(
            planned.sends.contains(&(0, NotifyRole::Pending)),
            "{planned:?}"
        );
    }

    #[test]
    fn a_new_leader_is_pending_until_the_old_one_stopped() {
        let mut old = pod("old");
        old.link.answered(50, 1, true);
        let mut new = pod("new");
        // First a probe: a leader message without a nonce, which changes nothing.
        let planned = plan(&view(Some("new"), 100, vec![new.clone(), old.clone()]));
        assert_eq!(
            planned.sends,
            vec![(0, NotifyRole::Leader), (1, NotifyRole::Follower)]
        );
        new.link.answered(105, 1, false);
        let planned = plan(&view(Some("new"), 106, vec![new.clone(), old.clone()]));
        assert_eq!(
            planned.sends,
            vec![(0, NotifyRole::Pending), (1, NotifyRole::Follower)]
        );
        assert!(matches!(planned.activation, Some(Activation::Wait { .. })));

        old.link.answered(120, 2, false);
        new.delivered = Some(Delivered {
            role: NotifyRole::Pending,
            epoch: 2,
            at: 110,
        });
        old.delivered = Some(Delivered {
            role: NotifyRole::Follower,
            epoch: 2,
            at: 120,
        });
        // Still within one term of this operator's start: someone it never heard of may run.
        let early = plan(&view(Some("new"), 130, vec![new.clone(), old.clone()]));
        assert!(early.sends.is_empty());
        let late = plan(&view(Some("new"), 20_000, vec![new, old]));
        assert_eq!(late.sends, vec![(0, NotifyRole::Leader)]);
    }

    #[test]
    fn a_leader_found_running_after_a_restart_is_renewed_not_stopped() {
        let mut leader = pod("a");
        let mut old = pod("old");
        old.link.answered(10, 1, false);
        assert_eq!(
            plan(&view(Some("a"), 20, vec![leader.clone(), old.clone()])).sends[0],
            (0, NotifyRole::Leader)
        );
        leader.link.answered(30, 2, true);
        let planned = plan(&view(Some("a"), 31, vec![leader, old]));
        assert_eq!(planned.activation, Some(Activation::Now));
        assert_eq!(planned.sends[0], (0, NotifyRole::Leader));
    }

    #[test]
    fn the_leader_is_renewed_every_third_of_a_term() {
        let leader = took(pod("a"), NotifyRole::Leader, 1_000);
        let quiet = plan(&view(Some("a"), 1_001, vec![leader.clone()]));
        assert!(quiet.sends.is_empty());
        assert_eq!(quiet.wake_at, Some(1_000 + TERM / 3));
        let due = plan(&view(Some("a"), 1_000 + TERM / 3, vec![leader]));
        assert_eq!(due.sends, vec![(0, NotifyRole::Leader)]);
    }

    #[test]
    fn busy_unreachable_gone_and_backed_off_pods_are_skipped() {
        let mut busy = pod("busy");
        busy.busy = true;
        let mut no_ip = pod("no-ip");
        no_ip.reachable = false;
        let mut gone = pod("gone");
        gone.gone = true;
        let mut backing_off = pod("backoff");
        backing_off.retry_at = 500;
        let planned = plan(&view(None, 100, vec![busy, no_ip, gone, backing_off]));
        assert!(planned.sends.is_empty());
        assert_eq!(planned.wake_at, Some(500));
    }

    #[test]
    fn a_former_member_is_kept_until_it_cannot_be_running() {
        let mut left = pod("left");
        left.link.answered(1_000, 1, true);
        left.link.granted(1_000);
        assert!(!forgettable(&left, 2, 1_001, 0, TERM));
        // Still answering `running` does not keep it: its term ran from the last grant.
        left.link.answered(1_000 + TERM, 1, true);
        assert!(!forgettable(&left, 2, 1_000 + TERM + 189, 0, TERM));
        assert!(forgettable(&left, 2, 1_000 + TERM + 190, 0, TERM));
        left.link.answered(1_100, 2, false);
        assert!(forgettable(&left, 2, 1_101, 0, TERM));
    }
}
