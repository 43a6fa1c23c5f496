//! Which members stall their group, from what the notifier has heard of them. Reported, never
//! acted on: the operator never lowers an epoch at a pod and never raises the group's epoch on
//! a pod's word (a member could push it to [`super::MAX_EPOCH`] and exhaust it), so the one
//! remedy is a fresh `podium exec`: delete the pod.
//!
//! - **Epoch ahead**: the pod holds an epoch above the group's. It refuses every genuine
//!   message until its process restarts. Honestly reached when a group is deleted and created
//!   again under the same name while its pods run on (the new Lease counts from the start), or
//!   by whoever holds a token minted for that pod.
//! - **Running ungranted**: the pod answers that it runs leader-only work at an epoch this
//!   replica never granted it, in answer to a message sent more than one term (plus the drift
//!   margin) after this replica started sending. Any grant an earlier replica gave ran out by
//!   then, on the pod's own clock, so no honest `podium exec` can say so.
//!
//! Both are judged only from answers to messages sent after that first term: until then an
//! earlier replica's messages, whose epochs this replica's caches may not have caught up with,
//! can account for either.

use super::activation::drift_margin_millis;

/// A pod's latest answer, as the notifier recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The highest epoch the pod has taken (`Ack::epoch`).
    pub epoch: u64,
    /// Whether it said leader-only work runs (at `epoch`: a term at an older epoch ends when a
    /// newer epoch grants none).
    pub running: bool,
    /// When the message it answered was sent, on the operator's clock: the pod answered after.
    pub sent_at: u64,
}

/// What this replica has heard from one pod, kept per pod (and reset when the pod's UID
/// changes: a new process).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    pub last: Option<Answer>,
    /// The highest epoch at which the pod took a `leader` message from this replica.
    pub granted: Option<u64>,
}

impl Heard {
    /// Records the answer to a message sent at `sent_at`. `granted` is the message's epoch when
    /// it was a `leader` message that the pod took.
    pub fn answered(&mut self, answer: Answer, granted: Option<u64>) {
        // Sends to one pod never overlap, but a late answer must not hide a newer one.
        if self.last.is_none_or(|last| last.sent_at <= answer.sent_at) {
            self.last = Some(answer);
        }
        if let Some(epoch) = granted {
            self.granted = Some(self.granted.map_or(epoch, |g| g.max(epoch)));
        }
    }
}

/// Why a pod stalls its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stall {
    EpochAhead { pod_epoch: u64, group_epoch: u64 },
    RunningUngranted { epoch: u64 },
}

impl Stall {
    /// Whether two stalls have the same cause, whatever the epochs: a pod whose epoch moves
    /// while it stays ahead has not started stalling again.
    pub fn same_kind(&self, other: &Stall) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stalled {
    pub pod: String,
    pub stall: Stall,
}

/// One group as the notifier knows it.
#[derive(Clone, Debug)]
pub struct Group<'a> {
    /// The group's epoch (its Lease's `leaseTransitions`, never lowered by the notifier).
    pub epoch: u64,
    /// When this replica started sending.
    pub since: u64,
    pub term_millis: u64,
    /// The pods the group's messages go to, by name.
    pub pods: Vec<(&'a str, Heard)>,
}

/// The pods that stall `group`, in the order given. A pod both ahead and running is reported
/// ahead: that is what keeps it from ever taking a genuine message.
pub fn stalled(group: &Group<'_>) -> Vec<Stalled> {
    let judged_from = group
        .since
        .saturating_add(group.term_millis)
        .saturating_add(drift_margin_millis(group.term_millis));
    group
        .pods
        .iter()
        .filter_map(|&(pod, heard)| {
            let last = heard.last.filter(|a| a.sent_at >= judged_from)?;
            let stall = if last.epoch > group.epoch {
                Stall::EpochAhead {
                    pod_epoch: last.epoch,
                    group_epoch: group.epoch,
                }
            } else if last.running && heard.granted != Some(last.epoch) {
                Stall::RunningUngranted { epoch: last.epoch }
            } else {
                return None;
            };
            Some(Stalled {
                pod: pod.to_string(),
                stall,
            })
        })
        .collect()
}

/// One stalled pod in a sentence, for the group's condition and Event.
pub fn describe(stalled: &Stalled) -> String {
    let pod = &stalled.pod;
    match stalled.stall {
        Stall::EpochAhead {
            pod_epoch,
            group_epoch,
        } => format!(
            "pod {pod} holds epoch {pod_epoch}, above the group's epoch {group_epoch}, and refuses every notification until its process restarts"
        ),
        Stall::RunningUngranted { epoch } => format!(
            "pod {pod} says it runs leader-only work at epoch {epoch}, which this operator never granted it, more than a term after it started sending"
        ),
    }
}

/// The stalls in `now` that were not in `before` with the same cause: each deserves one
/// announcement.
pub fn started<'a>(before: &[Stalled], now: &'a [Stalled]) -> Vec<&'a Stalled> {
    now.iter()
        .filter(|s| {
            !before
                .iter()
                .any(|b| b.pod == s.pod && b.stall.same_kind(&s.stall))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: u64 = 10_000;
    const MARGIN: u64 = 200;
    /// This replica's start, and the first send time from which anything is judged.
    const SINCE: u64 = 5_000;
    const JUDGED: u64 = SINCE + TERM + MARGIN;

    fn heard(epoch: u64, running: bool, sent_at: u64, granted: Option<u64>) -> Heard {
        let mut h = Heard::default();
        h.answered(
            Answer {
                epoch,
                running,
                sent_at,
            },
            granted,
        );
        h
    }

    fn group(epoch: u64, pods: Vec<(&str, Heard)>) -> Group<'_> {
        Group {
            epoch,
            since: SINCE,
            term_millis: TERM,
            pods,
        }
    }

    #[test]
    fn members_that_follow_or_lead_by_grant_do_not_stall() {
        let g = group(
            7,
            vec![
                ("leader", heard(7, true, JUDGED + 1, Some(7))),
                ("follower", heard(7, false, JUDGED + 1, None)),
                ("behind", heard(3, false, JUDGED + 1, None)),
                ("silent", Heard::default()),
            ],
        );
        assert_eq!(stalled(&g), vec![]);
    }

    #[test]
    fn a_pod_ahead_of_the_group_is_reported_with_both_epochs() {
        let g = group(
            2,
            vec![
                ("a", heard(2, false, JUDGED, None)),
                ("b", heard(1000, false, JUDGED, None)),
            ],
        );
        assert_eq!(
            stalled(&g),
            vec![Stalled {
                pod: "b".into(),
                stall: Stall::EpochAhead {
                    pod_epoch: 1000,
                    group_epoch: 2
                }
            }]
        );
    }

    #[test]
    fn a_pod_ahead_and_running_is_reported_ahead() {
        let g = group(2, vec![("b", heard(9, true, JUDGED, None))]);
        assert_eq!(
            stalled(&g)[0].stall,
            Stall::EpochAhead {
                pod_epoch: 9,
                group_epoch: 2
            }
        );
    }

    #[test]
    fn running_at_an_epoch_never_granted_is_reported() {
        let never = group(4, vec![("x", heard(4, true, JUDGED, None))]);
        assert_eq!(
            stalled(&never),
            vec![Stalled {
                pod: "x".into(),
                stall: Stall::RunningUngranted { epoch: 4 }
            }]
        );
        // Granted at an older epoch only: the epoch it claims now is not ours.
        let older = group(4, vec![("x", heard(4, true, JUDGED, Some(3)))]);
        assert_eq!(
            stalled(&older)[0].stall,
            Stall::RunningUngranted { epoch: 4 }
        );
    }

    #[test]
    fn honest_operator_restart_a_pod_running_from_a_previous_replicas_grant_is_not_reported_before_since_plus_term_plus_margin()
     {
        // An earlier replica granted the leader a term at epoch 4; this replica has not yet.
        for sent_at in [SINCE, SINCE + TERM, JUDGED - 1] {
            let g = group(4, vec![("leader", heard(4, true, sent_at, None))]);
            assert_eq!(stalled(&g), vec![], "sent at {sent_at}");
        }
        let g = group(4, vec![("leader", heard(4, true, JUDGED, None))]);
        assert_eq!(stalled(&g).len(), 1);
    }

    #[test]
    fn an_earlier_replicas_epoch_is_not_judged_within_the_first_term() {
        // That replica may have raised the pods to an epoch this one's cache has not seen yet.
        let early = group(4, vec![("p", heard(5, false, JUDGED - 1, None))]);
        assert_eq!(stalled(&early), vec![]);
    }

    #[test]
    fn only_the_latest_answer_counts() {
        let mut h = heard(4, true, JUDGED, None);
        h.answered(
            Answer {
                epoch: 4,
                running: false,
                sent_at: JUDGED + 10,
            },
            None,
        );
        assert_eq!(stalled(&group(4, vec![("p", h)])), vec![]);
        // A late answer to an older message does not bring the claim back.
        h.answered(
            Answer {
                epoch: 4,
                running: true,
                sent_at: JUDGED + 5,
            },
            None,
        );
        assert_eq!(stalled(&group(4, vec![("p", h)])), vec![]);
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let g = Group {
            epoch: u64::MAX,
            since: u64::MAX - 1,
            term_millis: u64::MAX,
            pods: vec![("p", heard(u64::MAX, true, u64::MAX, None))],
        };
        assert_eq!(stalled(&g).len(), 1);
    }

    #[test]
    fn a_stall_starts_once_per_pod_and_cause() {
        let ahead = |pod: &str, pod_epoch| Stalled {
            pod: pod.into(),
            stall: Stall::EpochAhead {
                pod_epoch,
                group_epoch: 1,
            },
        };
        let before = vec![ahead("a", 5)];
        let now = vec![
            ahead("a", 6),
            ahead("b", 5),
            Stalled {
                pod: "c".into(),
                stall: Stall::RunningUngranted { epoch: 1 },
            },
        ];
        let new: Vec<&str> = started(&before, &now)
            .iter()
            .map(|s| s.pod.as_str())
            .collect();
        assert_eq!(new, vec!["b", "c"]);
    }
}
