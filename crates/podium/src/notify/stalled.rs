//! Stalled members, from the notifier to the status. The notifier judges a group's pods
//! ([`podium_core::notify::stall`]) after each answer and each update; when what it finds
//! changes, it keeps the result here and asks for a reconcile of the group through the
//! controller's trigger stream, as the renewer hands groups back. That reconcile writes the
//! `NotificationsStalled` condition with the rest of the status (one field manager, one write)
//! and announces each stall that started with an Event: the notifier has no group object to
//! point an Event at, and owns no status write that could race the reconcile's.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::reflector::ObjectRef;
use podium_core::notify::stall::{self, Stall, Stalled};

use super::{GroupKey, Task};

/// The stalls of the groups this replica notifies.
#[derive(Default)]
pub struct Stalls {
    groups: Mutex<HashMap<GroupKey, Entry>>,
}

#[derive(Default)]
struct Entry {
    current: Vec<Stalled>,
    /// Stalls that started since a reconcile last took them, still going on.
    started: Vec<Stalled>,
}

/// What [`Stalls::set`] changed.
struct Change {
    /// The group was not known here before.
    first: bool,
    stalls: bool,
}

impl Stalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupKey, Entry>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, key: &GroupKey, now: Vec<Stalled>) -> Change {
        let mut groups = self.lock();
        let first = !groups.contains_key(key);
        let entry = groups.entry(key.clone()).or_default();
        if entry.current == now {
            return Change {
                first,
                stalls: false,
            };
        }
        let started: Vec<Stalled> = stall::started(&entry.current, &now)
            .into_iter()
            .cloned()
            .collect();
        // A stall that ended before any reconcile announced it is no news any more.
        entry.started.retain(|s| {
            now.iter()
                .any(|n| n.pod == s.pod && n.stall.same_kind(&s.stall))
        });
        entry.started.extend(started);
        entry.current = now;
        Change {
            first,
            stalls: true,
        }
    }

    /// Forgets the group; whether it had stalls.
    fn forget(&self, key: &GroupKey) -> Option<bool> {
        self.lock().remove(key).map(|e| !e.current.is_empty())
    }

    fn clear(&self) -> Vec<GroupKey> {
        self.lock().drain().map(|(key, _)| key).collect()
    }

    /// The pods that stall the group now, as the notifier last judged them.
    pub fn of(&self, key: &GroupKey) -> Vec<Stalled> {
        self.lock()
            .get(key)
            .map(|e| e.current.clone())
            .unwrap_or_default()
    }

    /// The group's stalls that started since the last call, each returned once.
    pub fn take_started(&self, key: &GroupKey) -> Vec<Stalled> {
        self.lock()
            .get_mut(key)
            .map(|e| std::mem::take(&mut e.started))
            .unwrap_or_default()
    }
}

impl Task {
    /// Judges the group's members again; when the stalls changed, updates the gauge and asks
    /// for a reconcile to report them. Former members are left out: the group no longer waits
    /// on their answers, and activation deals with whatever they may still run.
    pub(super) fn judge_stalls(&self, key: &GroupKey) {
        let found = self
            .groups
            .get(key)
            .filter(|g| g.notify.is_some())
            .map(|group| {
                stall::stalled(&stall::Group {
                    epoch: group.epoch,
                    since: self.since,
                    term_millis: group.term_millis,
                    pods: group
                        .pods
                        .iter()
                        .filter(|(_, p)| p.member)
                        .map(|(name, p)| (name.as_str(), p.heard))
                        .collect(),
                })
            });
        let Some(found) = found else {
            if let Some(had) = self.stalls.forget(key) {
                self.metrics.notify_stalled_removed(&key.0, &key.1);
                if had {
                    self.reconcile(key);
                }
            }
            return;
        };
        let counts = count(&found);
        let change = self.stalls.set(key, found);
        if change.first || change.stalls {
            self.metrics.notify_stalled(&key.0, &key.1, counts);
        }
        if change.stalls {
            tracing::info!(namespace = %key.0, group = %key.1, epoch_ahead = counts[0], running_ungranted = counts[1], "members stalling the group changed");
            self.reconcile(key);
        }
    }

    /// This replica stopped (or started) leading: what it judged is no longer its to report.
    pub(super) fn forget_stalls(&self) {
        for key in self.stalls.clear() {
            self.metrics.notify_stalled_removed(&key.0, &key.1);
        }
    }

    fn reconcile(&self, key: &GroupKey) {
        // Unbounded, as the renewer's hand-backs: one entry per change of a group's stalls,
        // which answers to sends (each pod at most one in flight, with backoff) pace.
        let _ = self.decide.send(ObjectRef::new(&key.1).within(&key.0));
    }
}

/// Stalled pods per reason, in the order of [`crate::metrics::STALL_REASONS`].
fn count(stalled: &[Stalled]) -> [usize; 2] {
    let mut counts = [0; 2];
    for s in stalled {
        match s.stall {
            Stall::EpochAhead { .. } => counts[0] += 1,
            Stall::RunningUngranted { .. } => counts[1] += 1,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> GroupKey {
        ("ns".into(), "web".into())
    }

    fn ahead(pod: &str, pod_epoch: u64) -> Stalled {
        Stalled {
            pod: pod.into(),
            stall: Stall::EpochAhead {
                pod_epoch,
                group_epoch: 1,
            },
        }
    }

    #[test]
    fn each_started_stall_is_announced_once_while_it_lasts() {
        let stalls = Stalls::default();
        let first = stalls.set(&key(), Vec::new());
        assert!(first.first && !first.stalls);
        assert!(stalls.set(&key(), vec![ahead("a", 5)]).stalls);
        // Its epoch moved: the same stall, not a new one.
        assert!(stalls.set(&key(), vec![ahead("a", 6)]).stalls);
        assert_eq!(stalls.take_started(&key()), vec![ahead("a", 5)]);
        assert_eq!(stalls.take_started(&key()), vec![]);
        assert_eq!(stalls.of(&key()), vec![ahead("a", 6)]);
        // b starts and ends before anyone took it: nothing to announce.
        stalls.set(&key(), vec![ahead("a", 6), ahead("b", 2)]);
        stalls.set(&key(), vec![ahead("a", 6)]);
        assert_eq!(stalls.take_started(&key()), vec![]);
        assert!(!stalls.set(&key(), vec![ahead("a", 6)]).stalls);
        assert_eq!(stalls.forget(&key()), Some(true));
        assert_eq!(stalls.forget(&key()), None);
        assert_eq!(stalls.of(&key()), vec![]);
    }

    #[test]
    fn counts_follow_the_metric_reasons() {
        let running = Stalled {
            pod: "r".into(),
            stall: Stall::RunningUngranted { epoch: 1 },
        };
        assert_eq!(
            crate::metrics::STALL_REASONS,
            ["epoch_ahead", "running_ungranted"]
        );
        assert_eq!(count(&[ahead("a", 2), ahead("b", 3), running]), [2, 1]);
    }
}
