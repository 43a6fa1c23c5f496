//! What the operator remembers about each group between reconciles, in one place with one
//! [`Memory::forget`]:
//!
//! - **Our own writes.** A reconcile that follows right after one of ours (our label writes
//!   trigger it) often still sees the cache from before our write: it would rewrite the status
//!   it just wrote, conditional on a resourceVersion the server has moved past, and retry on 409
//!   until the watch caught up (17 failed status writes per group while electing 1000 groups).
//!   Remembering what we wrote, and which version it replaced, lets the next reconcile build on
//!   our write instead. Only our own version is ever preferred to the cache, and only while the
//!   cache still shows exactly the version our write replaced; any other change shows up as a
//!   different version and the cache wins again. Every write stays conditional, so a view that
//!   is still stale costs a 409, never a lost update.
//! - **A stale Lease.** After a 409 on the Lease, the cached copy is known to be old: the next
//!   reconcile reads it from the server. Otherwise, while the Lease watch is down or backing off
//!   (after an API server restart, up to half a minute), every renewal and failover of the group
//!   would fail against the same stale copy.
//! - **A Lease outside the cache.** The Lease cache holds only Leases podium labelled. A Lease
//!   the server showed that the cache lacks (someone else's, under the group's name) is read
//!   from the server again each time until the cache shows one.
//! - **When a failover started**, for `podium_failover_seconds`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Resource, ResourceExt};

use crate::crd::ElectionGroup;

/// A group's key: (namespace, name). The group's Lease has the same key.
pub type Key = (String, String);

#[derive(Default)]
pub struct Memory {
    groups: Mutex<HashMap<Key, GroupMemory>>,
}

#[derive(Default)]
struct GroupMemory {
    status: Option<Written<ElectionGroup>>,
    lease: Option<Written<Lease>>,
    lease_stale: bool,
    lease_outside_cache: bool,
    failover_started: Option<Instant>,
}

impl GroupMemory {
    fn is_empty(&self) -> bool {
        self.status.is_none()
            && self.lease.is_none()
            && !self.lease_stale
            && !self.lease_outside_cache
            && self.failover_started.is_none()
    }
}

struct Written<K> {
    /// The resourceVersion our write replaced; `None` for a create.
    replaced: Option<String>,
    object: Arc<K>,
}

impl<K: Resource> Written<K> {
    fn new(replaced: Option<String>, mut object: K) -> Self {
        object.meta_mut().managed_fields = None;
        Written {
            replaced,
            object: Arc::new(object),
        }
    }
}

/// Our write when the cache (`cached`) has not caught up with it; once it has, or shows
/// something else, the memory is dropped and the cache is the view from then on.
fn newer_than<K: Resource>(slot: &mut Option<Written<K>>, cached: Option<&K>) -> Option<Arc<K>> {
    let ours = slot.as_ref()?;
    if cached.and_then(|c| c.resource_version()) == ours.replaced {
        return Some(ours.object.clone());
    }
    *slot = None;
    None
}

impl Memory {
    /// Remembers `written`, the server's answer to our status write that replaced `replaced`.
    pub fn wrote_status(&self, key: &Key, replaced: Option<String>, written: ElectionGroup) {
        self.with(key, |m| m.status = Some(Written::new(replaced, written)));
    }

    /// Our last status write when the group cache does not show it yet.
    pub fn status_newer_than(
        &self,
        key: &Key,
        cached: Option<&ElectionGroup>,
    ) -> Option<Arc<ElectionGroup>> {
        self.with(key, |m| newer_than(&mut m.status, cached))
    }

    /// Remembers `written`, the server's answer to our Lease write that replaced `replaced`.
    pub fn wrote_lease(&self, key: &Key, replaced: Option<String>, written: Lease) {
        self.with(key, |m| m.lease = Some(Written::new(replaced, written)));
    }

    /// Our last Lease write when the Lease cache does not show it yet.
    pub fn lease_newer_than(&self, key: &Key, cached: Option<&Lease>) -> Option<Arc<Lease>> {
        self.with(key, |m| newer_than(&mut m.lease, cached))
    }

    /// The freshest Lease this replica has: our last write while the cache lags it, else the
    /// cached copy.
    pub fn freshest_lease(&self, key: &Key, cached: Option<Arc<Lease>>) -> Option<Arc<Lease>> {
        self.lease_newer_than(key, cached.as_deref()).or(cached)
    }

    /// A status write failed: whatever we remembered writing, the server has moved past it.
    pub fn status_write_failed(&self, key: &Key) {
        self.with(key, |m| m.status = None);
    }

    /// A Lease write failed; after a 409 (`stale`), the cached Lease is known to be old too.
    pub fn lease_write_failed(&self, key: &Key, stale: bool) {
        self.with(key, |m| {
            m.lease = None;
            m.lease_stale |= stale;
        });
    }

    /// Whether the cached Lease is known to be stale, leaving that for a reconcile to act on.
    pub fn lease_is_stale(&self, key: &Key) -> bool {
        self.with(key, |m| m.lease_stale)
    }

    /// Whether the cached Lease is known to be stale; asking clears it (the caller reads anew).
    pub fn take_lease_stale(&self, key: &Key) -> bool {
        self.with(key, |m| std::mem::take(&mut m.lease_stale))
    }

    /// Whether the last server read found a Lease the cache did not have; see
    /// [`Memory::lease_seen`].
    pub fn lease_outside_cache(&self, key: &Key) -> bool {
        self.with(key, |m| m.lease_outside_cache)
    }

    /// What the last read of the Lease found: whether it exists, and whether the cache had it.
    pub fn lease_seen(&self, key: &Key, exists: bool, cached: bool) {
        self.with(key, |m| m.lease_outside_cache = exists && !cached);
    }

    /// A handover was decided at `at`; the first one of a failover counts.
    pub fn failover_started(&self, key: &Key, at: Instant) {
        self.with(key, |m| {
            m.failover_started.get_or_insert(at);
        });
    }

    /// The failover is over (a new leader is labelled, or nobody leads); when it began.
    pub fn failover_ended(&self, key: &Key) -> Option<Instant> {
        self.with(key, |m| m.failover_started.take())
    }

    /// Drops everything remembered about the group (it was deleted).
    pub fn forget(&self, key: &Key) {
        self.lock().remove(key);
    }

    fn with<T>(&self, key: &Key, f: impl FnOnce(&mut GroupMemory) -> T) -> T {
        let mut groups = self.lock();
        let memory = groups.entry(key.clone()).or_default();
        let result = f(memory);
        if memory.is_empty() {
            groups.remove(key);
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, GroupMemory>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn lease(version: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("g".into()),
                namespace: Some("ns".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn key() -> Key {
        ("ns".into(), "g".into())
    }

    fn version(l: Option<Arc<Lease>>) -> Option<String> {
        l.and_then(|l| l.resource_version())
    }

    #[test]
    fn ours_wins_only_while_the_cache_shows_what_it_replaced() {
        let memory = Memory::default();
        memory.wrote_lease(&key(), Some("1".into()), lease("2"));
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("1")))),
            Some("2".into())
        );
        // The cache caught up: from here on it is the view, and the memory is gone.
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("2")))),
            None
        );
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("1")))),
            None
        );
        assert_eq!(memory.len(), 0);
    }

    #[test]
    fn a_change_by_someone_else_wins_over_ours() {
        let memory = Memory::default();
        memory.wrote_lease(&key(), Some("1".into()), lease("2"));
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("7")))),
            None
        );
    }

    #[test]
    fn a_create_is_seen_until_the_cache_has_it_but_not_after_a_delete() {
        let memory = Memory::default();
        memory.wrote_lease(&key(), None, lease("5"));
        assert_eq!(
            version(memory.lease_newer_than(&key(), None)),
            Some("5".into())
        );
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("5")))),
            None
        );
        // Deleted after the cache had it: the cache's "missing" is the truth.
        assert_eq!(version(memory.lease_newer_than(&key(), None)), None);
    }

    #[test]
    fn a_failed_write_is_not_offered_and_a_409_marks_the_cache_stale_once() {
        let memory = Memory::default();
        memory.wrote_lease(&key(), Some("1".into()), lease("2"));
        memory.lease_write_failed(&key(), true);
        assert_eq!(
            version(memory.lease_newer_than(&key(), Some(&lease("1")))),
            None
        );
        assert!(memory.take_lease_stale(&key()));
        assert!(!memory.take_lease_stale(&key()));
    }

    #[test]
    fn a_lease_the_server_has_and_the_cache_lacks_is_read_again_until_the_cache_has_it() {
        let memory = Memory::default();
        assert!(!memory.lease_outside_cache(&key()));
        memory.lease_seen(&key(), true, false);
        assert!(memory.lease_outside_cache(&key()));
        assert!(
            memory.lease_outside_cache(&key()),
            "asking does not clear it"
        );
        memory.lease_seen(&key(), true, true);
        assert!(!memory.lease_outside_cache(&key()));
        memory.lease_seen(&key(), true, false);
        memory.lease_seen(&key(), false, false);
        assert!(!memory.lease_outside_cache(&key()));
        assert_eq!(memory.len(), 0, "nothing left to remember");
    }

    #[test]
    fn a_failover_is_timed_from_its_first_decision_and_forget_drops_everything() {
        let memory = Memory::default();
        let first = Instant::now();
        memory.failover_started(&key(), first);
        memory.failover_started(&key(), first + std::time::Duration::from_secs(1));
        assert_eq!(memory.failover_ended(&key()), Some(first));
        assert_eq!(memory.failover_ended(&key()), None);
        memory.failover_started(&key(), first);
        memory.wrote_lease(&key(), None, lease("5"));
        memory.forget(&key());
        assert_eq!(memory.len(), 0);
    }
}
