//! When the operator may tell a newly elected pod `leader`: break-before-make at the process
//! level. The label, and so traffic, moves at once; leader-only work starts only once no other
//! pod can still be running it (docs/design.md, "Your app and its role").
//!
//! A pod's term comes only from `leader` messages, each echoing a nonce the pod issued and the
//! operator received, so the term a message grants ends before the operator's receipt of the
//! nonce it echoes plus one term, whatever the network delays. Each pod other than the new
//! leader must therefore be:
//! - **stopped**: it answered "not running" at the new epoch or later, so it refuses every
//!   older message, and no `leader` message at this epoch names it; or
//! - **gone**: its pod no longer exists, and the kubelet stops containers before that; or
//! - **timed out**: one term plus [`drift_margin_millis`] has passed since the receipt of the
//!   nonce echoed by the latest `leader` message this operator sent it, and since this operator
//!   started sending (`since`): messages an earlier replica sent were all sent before that.
//!
//! What a pod answers does not extend the wait: a pod that keeps answering "running", broken or
//! lying, cannot hold back the group's new leader for longer than one term after its last grant.

/// A margin for clock-rate drift between the operator and a pod, over one term: 1 % of the
/// term plus 100 ms. Crystal clocks drift by well under 0.1 %; the rest covers a slewing NTP.
pub fn drift_margin_millis(term_millis: u64) -> u64 {
    term_millis / 100 + 100
}

/// What the operator knows of one pod's answers, and of the terms it granted the pod, on the
/// operator's clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// When the pod last answered anything (every answer carries a nonce).
    pub last_answer: Option<u64>,
    /// When this operator received the nonce echoed by the latest `leader` message it sent the
    /// pod: the term of every message it sent ends one term (plus drift) after this.
    pub last_grant: Option<u64>,
    /// The highest epoch at which the pod answered that leader-only work is not running.
    pub stopped_at: Option<u64>,
    /// The highest epoch at which the pod answered that leader-only work is running.
    pub running_at: Option<u64>,
}

impl Link {
    /// Records an answer received at `now`.
    pub fn answered(&mut self, now: u64, epoch: u64, running: bool) {
        self.last_answer = Some(self.last_answer.map_or(now, |last| last.max(now)));
        let slot = if running {
            &mut self.running_at
        } else {
            &mut self.stopped_at
        };
        *slot = Some(slot.map_or(epoch, |seen| seen.max(epoch)));
    }

    /// Records a `leader` message about to be sent, echoing a nonce received at
    /// `nonce_received_at`. It must be recorded before the message can arrive: from then on the
    /// pod may run on it.
    pub fn granted(&mut self, nonce_received_at: u64) {
        self.last_grant = Some(
            self.last_grant
                .map_or(nonce_received_at, |last| last.max(nonce_received_at)),
        );
    }

    /// When, on the operator's clock, anything this pod may be running has surely stopped: its
    /// answers say nothing here, since a term comes only from a grant, and grants by an earlier
    /// replica were all made before `since`.
    pub fn timed_out_at(&self, since: u64, term_millis: u64) -> u64 {
        self.last_grant.unwrap_or(since).max(since) + term_millis + drift_margin_millis(term_millis)
    }
}

/// One pod other than the one to activate, as the operator sees it now.
#[derive(Clone, Copy, Debug)]
pub struct Other<'a> {
    pub pod: &'a str,
    pub gone: bool,
    pub link: Link,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activation {
    Now,
    /// Not yet: these pods may still run leader-only work; without an answer from them, the
    /// last of them has timed out at `until`.
    Wait {
        until: u64,
        waiting_on: Vec<String>,
    },
}

/// Whether the pod `leader`, elected at `epoch`, may be told `leader` at `now`.
///
/// `leader_link` is what the operator knows of the new leader itself: if it already answered
/// that it runs at this epoch, an operator (this one or an earlier one) activated it, and
/// telling it again only renews its term. Otherwise every pod in `others` must be stopped,
/// gone or timed out (one term after its last grant, whatever it answers since), and so must
/// every pod this operator does not know of: until one term after `since` nothing new is
/// activated.
pub fn decide<'a>(
    epoch: u64,
    leader_link: &Link,
    others: impl IntoIterator<Item = Other<'a>>,
    now: u64,
    since: u64,
    term_millis: u64,
) -> Activation {
    if leader_link
        .running_at
        .is_some_and(|running| running >= epoch)
    {
        return Activation::Now;
    }
    let unknown_pods_done = since + term_millis + drift_margin_millis(term_millis);
    let mut until = if now >= unknown_pods_done {
        now
    } else {
        unknown_pods_done
    };
    let mut waiting_on = Vec::new();
    for other in others {
        if other.gone
            || other
                .link
                .stopped_at
                .is_some_and(|stopped| stopped >= epoch)
        {
            continue;
        }
        let timed_out = other.link.timed_out_at(since, term_millis);
        if now < timed_out {
            until = until.max(timed_out);
            waiting_on.push(other.pod.to_string());
        }
    }
    if now >= until && waiting_on.is_empty() {
        Activation::Now
    } else {
        Activation::Wait { until, waiting_on }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: u64 = 10_000;
    const MARGIN: u64 = 200;

    fn other(pod: &str, link: Link) -> Other<'_> {
        Other {
            pod,
            gone: false,
            link,
        }
    }

    fn answered(at: u64, epoch: u64, running: bool) -> Link {
        let mut link = Link::default();
        link.answered(at, epoch, running);
        link
    }

    /// `link` once a `leader` message echoing a nonce received at `at` was sent.
    fn granted(mut link: Link, at: u64) -> Link {
        link.granted(at);
        link
    }

    #[test]
    fn the_margin_is_stated() {
        assert_eq!(drift_margin_millis(TERM), MARGIN);
    }

    #[test]
    fn a_fresh_operator_activates_nobody_new_for_one_term() {
        let others = [other("old", answered(0, 5, false))];
        assert_eq!(
            decide(5, &Link::default(), others, 1, 0, TERM),
            Activation::Wait {
                until: TERM + MARGIN,
                waiting_on: vec![]
            }
        );
        assert_eq!(
            decide(5, &Link::default(), others, TERM + MARGIN, 0, TERM),
            Activation::Now
        );
    }

    #[test]
    fn a_leader_already_running_at_the_epoch_is_renewed_at_once() {
        let others = [other("old", Link::default())];
        assert_eq!(
            decide(5, &answered(1, 5, true), others, 1, 0, TERM),
            Activation::Now
        );
        assert_ne!(
            decide(6, &answered(1, 5, true), others, 1, 0, TERM),
            Activation::Now
        );
    }

    #[test]
    fn the_old_leader_must_have_stopped_at_the_new_epoch() {
        let since = 0;
        let now = 2 * TERM;
        let old_running = granted(answered(now - 1, 5, true), now - 1);
        assert_eq!(
            decide(
                6,
                &Link::default(),
                [other("old", old_running)],
                now,
                since,
                TERM
            ),
            Activation::Wait {
                until: now - 1 + TERM + MARGIN,
                waiting_on: vec!["old".into()]
            }
        );
        // Stopped, but only at the old epoch: a delayed renewal at that epoch could restart it.
        let stopped_before = granted(answered(now - 1, 5, false), now - 1);
        assert_ne!(
            decide(
                6,
                &Link::default(),
                [other("old", stopped_before)],
                now,
                since,
                TERM
            ),
            Activation::Now
        );
        let stopped = granted(answered(now - 1, 6, false), now - 1);
        assert_eq!(
            decide(
                6,
                &Link::default(),
                [other("old", stopped)],
                now,
                since,
                TERM
            ),
            Activation::Now
        );
    }

    #[test]
    fn a_gone_or_silent_pod_stops_blocking() {
        let now = 2 * TERM;
        let silent = granted(answered(now - TERM, 5, true), now - TERM);
        let gone = Other {
            pod: "gone",
            gone: true,
            link: answered(now - 1, 5, true),
        };
        assert_ne!(
            decide(
                6,
                &Link::default(),
                [other("silent", silent), gone],
                now,
                0,
                TERM
            ),
            Activation::Now
        );
        assert_eq!(
            decide(
                6,
                &Link::default(),
                [other("silent", silent), gone],
                now + MARGIN,
                0,
                TERM
            ),
            Activation::Now
        );
    }

    #[test]
    fn a_pod_answering_running_for_ever_stops_blocking_one_term_after_its_last_grant() {
        // The old leader's last grant echoed a nonce received at 1_000; since then it has been
        // told `follower` and answers `running` to every message, up to the very last moment.
        let grant = 1_000;
        let done = grant + TERM + MARGIN;
        let liar = |now: u64| {
            let mut link = granted(answered(grant, 5, true), grant);
            for at in (grant..=now).step_by(500) {
                link.answered(at, 6, true);
            }
            link.answered(now, 6, true);
            link
        };
        assert_eq!(
            decide(
                6,
                &Link::default(),
                [other("old", liar(done - 1))],
                done - 1,
                0,
                TERM
            ),
            Activation::Wait {
                until: done,
                waiting_on: vec!["old".into()]
            }
        );
        for now in [done, done + 1, 10 * TERM] {
            assert_eq!(
                decide(6, &Link::default(), [other("old", liar(now))], now, 0, TERM),
                Activation::Now,
                "at {now}"
            );
        }
    }

    #[test]
    fn a_pod_granted_recently_still_blocks() {
        let now = 5 * TERM;
        // Answers long ago, but granted a moment ago: the echoed nonce is what its term runs
        // from.
        let link = granted(answered(now - 2 * TERM, 5, true), now - 1);
        assert_eq!(
            decide(6, &Link::default(), [other("old", link)], now, 0, TERM),
            Activation::Wait {
                until: now - 1 + TERM + MARGIN,
                waiting_on: vec!["old".into()]
            }
        );
        // A later grant echoing an older nonce does not shorten the wait.
        let link = granted(link, now - TERM);
        assert_eq!(link.last_grant, Some(now - 1));
    }

    #[test]
    fn a_pod_never_granted_blocks_until_one_term_after_since() {
        // Running on a grant by an earlier replica: made before this one started.
        let since = 3 * TERM;
        let link = answered(since + 10, 5, true);
        let done = since + TERM + MARGIN;
        assert_eq!(
            decide(
                6,
                &Link::default(),
                [other("old", link)],
                done - 1,
                since,
                TERM
            ),
            Activation::Wait {
                until: done,
                waiting_on: vec!["old".into()]
            }
        );
        assert_eq!(
            decide(6, &Link::default(), [other("old", link)], done, since, TERM),
            Activation::Now
        );
        // A grant older than `since` does not end the wait sooner: `since` still bounds the
        // earlier replica's grants.
        assert_eq!(granted(link, since - TERM).timed_out_at(since, TERM), done);
    }
}
