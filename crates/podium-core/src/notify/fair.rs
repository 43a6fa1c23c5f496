//! Sharing the notifier's sends among tenants. Any tenant who may create an ElectionGroup can
//! select pods that accept a connection and never answer; each send to one holds a slot until
//! it times out. Without limits, a few hundred such pods held every slot, and every other
//! namespace's renewals waited until their leaders' terms ran out. So:
//! - [`admit`]: a namespace holds at most [`Caps::per_namespace`] slots, of which demotions,
//!   the only sends that may take long, at most [`Caps::long_per_namespace`], so that its own
//!   renewals still find one; and the last [`Caps::reserved`] slots of the pool go only to
//!   namespaces that hold almost none, so that however many namespaces flood the pool, one that
//!   sends a renewal now and then finds a slot;
//! - [`Turns`]: groups whose sends had to wait go first, in the order they waited, and a group
//!   that has to wait again goes to the back (round robin);
//! - [`urgency`]: within a group, leader and pending messages go before demotions, and pods that
//!   have failed less go before pods that have failed more;
//! - [`timeout_millis`]: only a demotion may take long to answer.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;

use super::message::NotifyRole;

/// How many sends may be in flight at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Over all namespaces.
    pub total: usize,
    /// In one namespace.
    pub per_namespace: usize,
    /// Of those, sends with the long timeout ([`is_long`]).
    pub long_per_namespace: usize,
    /// The last slots of the pool, kept for namespaces with fewer than `light` in flight.
    pub reserved: usize,
    pub light: usize,
}

impl Caps {
    /// Eight namespaces at their cap would fill the pool; the last 32 slots serve namespaces
    /// with fewer than 2 in flight (a leader's renewal and a probe). Pods that hold demotions
    /// for 15 s leave a namespace 8 slots for the renewals, which end within 2 s.
    pub const DEFAULT: Caps = Caps {
        total: 256,
        per_namespace: 32,
        long_per_namespace: 24,
        reserved: 32,
        light: 2,
    };
}

/// What one namespace holds of the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub all: usize,
    /// Sends with the long timeout.
    pub long: usize,
}

/// Whether a send may start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Now,
    /// Its namespace holds its share: it waits for one of its own sends to end.
    NamespaceFull,
    /// The pool is full, or what is left of it is kept for namespaces that hold almost none.
    PoolFull,
}

/// Whether one more send (`long`: with the long timeout) in a namespace that holds `held` of
/// the `total_in_flight` sends may start.
pub fn admit(caps: &Caps, total_in_flight: usize, held: Held, long: bool) -> Admit {
    if total_in_flight >= caps.total {
        Admit::PoolFull
    } else if held.all >= caps.per_namespace || (long && held.long >= caps.long_per_namespace) {
        Admit::NamespaceFull
    } else if total_in_flight >= caps.total.saturating_sub(caps.reserved) && held.all >= caps.light
    {
        Admit::PoolFull
    } else {
        Admit::Now
    }
}

/// A demotion's answer may wait for the pod's command to exit (`podium exec --grace`, 10 s by
/// default), so it gets this long.
pub const LONG_TIMEOUT_MILLIS: u64 = 15_000;
/// Anything else is answered at once by a pod that works; its timeout is a third of a term (a
/// renewal that takes longer has missed its turn), within these bounds.
pub const SHORT_TIMEOUT_MAX_MILLIS: u64 = 2_000;
pub const SHORT_TIMEOUT_MIN_MILLIS: u64 = 500;

/// Whether a `role` message gets the long timeout: a demotion.
pub fn is_long(role: NotifyRole) -> bool {
    role == NotifyRole::Follower
}

/// How long the notifier waits for the answer to a `role` message in a group whose term is
/// `term_millis`.
///
/// A `follower` message keeps the long timeout: the pod may run the command, and then it
/// answers only once the command has exited. A `leader` or `pending` message to a pod that runs
/// the command at an older epoch also stops it first; if its answer times out it is sent again,
/// and the pod, which handles one message at a time, answers that once the command exited.
///
/// A timeout is never taken for an answer: only answers move what the operator knows of a pod
/// (`activation::Link`), so a shorter timeout can delay an activation but never allow one.
pub fn timeout_millis(role: NotifyRole, term_millis: u64) -> u64 {
    if is_long(role) {
        LONG_TIMEOUT_MILLIS
    } else {
        (term_millis / 3).clamp(SHORT_TIMEOUT_MIN_MILLIS, SHORT_TIMEOUT_MAX_MILLIS)
    }
}

/// The order a group's due sends take the slots in: smaller first. The leader's renewal (or the
/// holder's `pending`) keeps a command running or lets one start; a demotion to a pod that has
/// failed many times in a row is likely to fail again, and must not keep the others of its
/// group from their turn.
pub fn urgency(role: NotifyRole, failures: u32) -> (bool, u32) {
    (is_long(role), failures)
}

/// Groups waiting for a slot, in the order they started waiting.
#[derive(Clone, Debug)]
pub struct Turns<K> {
    next: u64,
    waiting: HashMap<K, u64>,
    order: BTreeMap<u64, K>,
}

impl<K> Default for Turns<K> {
    fn default() -> Self {
        Turns {
            next: 0,
            waiting: HashMap::new(),
            order: BTreeMap::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> Turns<K> {
    /// `key` had sends it could not start: it waits, behind every group already waiting.
    /// Returns whether it was not waiting before.
    pub fn wait(&mut self, key: K) -> bool {
        let turn = self.next;
        self.next += 1;
        let previous = self.waiting.insert(key.clone(), turn);
        if let Some(previous) = previous {
            self.order.remove(&previous);
        }
        self.order.insert(turn, key);
        previous.is_none()
    }

    /// `key` started every send it had, or is gone.
    pub fn served(&mut self, key: &K) {
        if let Some(turn) = self.waiting.remove(key) {
            self.order.remove(&turn);
        }
    }

    pub fn is_waiting(&self, key: &K) -> bool {
        self.waiting.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn clear(&mut self) {
        self.waiting.clear();
        self.order.clear();
    }

    /// The groups to look at, in order: every waiting group in turn, then those of `touched`
    /// that are not waiting, each once.
    pub fn order(&self, touched: impl IntoIterator<Item = K>) -> Vec<K> {
        let mut seen: HashSet<K> = HashSet::new();
        let mut keys: Vec<K> = self.order.values().cloned().collect();
        seen.extend(keys.iter().cloned());
        for key in touched {
            if seen.insert(key.clone()) {
                keys.push(key);
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps::DEFAULT;

    fn held(all: usize) -> Held {
        Held { all, long: 0 }
    }

    #[test]
    fn a_namespace_never_holds_more_than_its_cap() {
        for long in [false, true] {
            assert_eq!(admit(&CAPS, 0, held(23), long), Admit::Now);
            assert_eq!(admit(&CAPS, 31, held(31), long), Admit::Now);
            assert_eq!(admit(&CAPS, 32, held(32), long), Admit::NamespaceFull);
            assert_eq!(admit(&CAPS, 100, held(32), long), Admit::NamespaceFull);
        }
    }

    #[test]
    fn demotions_leave_a_namespace_room_for_its_renewals() {
        let demoting = Held { all: 24, long: 24 };
        assert_eq!(admit(&CAPS, 24, demoting, true), Admit::NamespaceFull);
        assert_eq!(admit(&CAPS, 24, demoting, false), Admit::Now);
        let mixed = Held { all: 31, long: 23 };
        assert_eq!(admit(&CAPS, 31, mixed, true), Admit::Now);
        assert_eq!(admit(&CAPS, 31, mixed, false), Admit::Now);
    }

    #[test]
    fn the_pool_holds_no_more_than_its_total() {
        assert_eq!(admit(&CAPS, 256, held(0), false), Admit::PoolFull);
        assert_eq!(admit(&CAPS, 300, held(1), false), Admit::PoolFull);
        assert_eq!(admit(&CAPS, 255, held(0), true), Admit::Now);
    }

    #[test]
    fn the_last_slots_are_kept_for_namespaces_that_hold_almost_none() {
        // Seven namespaces at their cap fill what is not reserved.
        let flooded = 7 * CAPS.per_namespace;
        assert_eq!(flooded, CAPS.total - CAPS.reserved);
        assert_eq!(admit(&CAPS, flooded - 1, held(5), false), Admit::Now);
        assert_eq!(admit(&CAPS, flooded, held(5), false), Admit::PoolFull);
        assert_eq!(admit(&CAPS, flooded, held(2), false), Admit::PoolFull);
        assert_eq!(admit(&CAPS, flooded, held(1), true), Admit::Now);
        assert_eq!(admit(&CAPS, flooded, held(0), false), Admit::Now);
        assert_eq!(admit(&CAPS, CAPS.total - 1, held(0), false), Admit::Now);
    }

    /// However many namespaces flood the pool, a namespace with one renewal at a time gets a
    /// slot at once, as long as fewer than `reserved` such namespaces want one at that moment.
    #[test]
    fn flooding_namespaces_leave_room_for_a_quiet_one() {
        let mut in_flight: Vec<usize> = vec![0; 50];
        let mut total = 0;
        // Fifty namespaces each try to start a hundred sends, in turn.
        for _ in 0..100 {
            for count in in_flight.iter_mut() {
                if admit(&CAPS, total, held(*count), false) == Admit::Now {
                    *count += 1;
                    total += 1;
                }
            }
        }
        assert_eq!(total, CAPS.total - CAPS.reserved);
        assert!(in_flight.iter().all(|&n| n <= CAPS.per_namespace));
        let quiet = (0..CAPS.reserved / CAPS.light)
            .filter(|_| {
                let admitted = admit(&CAPS, total, held(0), false) == Admit::Now;
                if admitted {
                    total += 1;
                }
                admitted
            })
            .count();
        assert_eq!(quiet, CAPS.reserved / CAPS.light, "{in_flight:?}");
        assert!(total <= CAPS.total);
    }

    #[test]
    fn only_demotions_wait_long() {
        assert_eq!(
            timeout_millis(NotifyRole::Follower, 4_000),
            LONG_TIMEOUT_MILLIS
        );
        assert_eq!(timeout_millis(NotifyRole::Leader, 4_000), 1_333);
        assert_eq!(timeout_millis(NotifyRole::Pending, 4_000), 1_333);
        assert_eq!(timeout_millis(NotifyRole::Leader, 60_000), 2_000);
        assert_eq!(timeout_millis(NotifyRole::Leader, 1_000), 500);
        assert_eq!(timeout_millis(NotifyRole::Pending, 0), 500);
        assert_eq!(timeout_millis(NotifyRole::Leader, u64::MAX), 2_000);
    }

    #[test]
    fn renewals_go_first_then_the_pods_that_failed_least() {
        let mut sends = [
            ("a", NotifyRole::Follower, 3),
            ("b", NotifyRole::Follower, 0),
            ("c", NotifyRole::Leader, 7),
            ("d", NotifyRole::Follower, 1),
            ("e", NotifyRole::Pending, 0),
            ("f", NotifyRole::Follower, 0),
        ];
        sends.sort_by_key(|&(_, role, failures)| urgency(role, failures));
        let order: Vec<&str> = sends.iter().map(|s| s.0).collect();
        assert_eq!(order, ["e", "c", "b", "f", "d", "a"]);
    }

    #[test]
    fn waiting_groups_go_first_in_the_order_they_waited() {
        let mut turns = Turns::default();
        assert!(turns.wait("a"));
        assert!(turns.wait("b"));
        assert_eq!(turns.order(["c", "b"]), ["a", "b", "c"]);
        // `a` had its turn and must wait again: behind `b`.
        assert!(!turns.wait("a"));
        assert_eq!(turns.order(["c"]), ["b", "a", "c"]);
        turns.served(&"b");
        assert!(!turns.is_waiting(&"b"));
        assert_eq!(turns.order(["b", "b"]), ["a", "b"]);
        assert_eq!(turns.len(), 1);
        turns.clear();
        assert!(turns.is_empty());
        assert_eq!(turns.order(["x"]), ["x"]);
    }

    /// Round robin: three groups that each want more slots than there are take turns, and
    /// none is served twice before each of the others was served once.
    #[test]
    fn groups_that_keep_waiting_take_turns() {
        let mut turns = Turns::default();
        for key in ["a", "b", "c"] {
            turns.wait(key);
        }
        let mut served = Vec::new();
        for _ in 0..6 {
            // One slot frees: the first in turn takes it, and still wants more.
            let first = turns.order([])[0];
            served.push(first);
            turns.wait(first);
        }
        assert_eq!(served, ["a", "b", "c", "a", "b", "c"]);
    }
}
