//! A client layer that counts every API request a kube `Client` makes, by verb and resource
//! (as the API server names them: `get`, `list`, `watch`, `create`, `update`, `patch`,
//! `delete`), and optionally keeps a log of each request for attributing the requests of one
//! failover.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::Request;
use kube::client::Body;
use serde::{Deserialize, Serialize};

use crate::intercept::{self, Hook, Pending};

/// One request as the layer saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    pub verb: String,
    /// `pods`, `pods/status`, `leases`, `electiongroups/status`, ...
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status, 0 when the request failed before a response.
    pub code: u16,
}

impl RequestRecord {
    pub fn is_write(&self) -> bool {
        is_write_verb(&self.verb)
    }
}

pub fn is_write_verb(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "delete" | "deletecollection"
    )
}

/// Counts by `"<verb> <resource>"`, the total, and (if enabled) the log.
#[derive(Clone, Default)]
pub struct Counter {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    total: AtomicU64,
    counts: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    log: Option<Mutex<Vec<RequestRecord>>>,
}

/// What [`Counter::snapshot`] returns; differences of two give a window's requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: u64,
    /// `"<verb> <resource>"` to count.
    pub by_kind: BTreeMap<String, u64>,
    /// `"<verb> <resource> <code>"` to count, for responses other than 2xx.
    pub errors: BTreeMap<String, u64>,
}

impl Counts {
    /// `self - earlier`, per key.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let diff = |now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>| {
            now.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(then.get(k).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Counts {
            total: self.total.saturating_sub(earlier.total),
            by_kind: diff(&self.by_kind, &earlier.by_kind),
            errors: diff(&self.errors, &earlier.errors),
        }
    }

    pub fn writes(&self) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| k.split(' ').next().is_some_and(is_write_verb))
            .map(|(_, v)| v)
            .sum()
    }

    /// Gets and lists; watches are long-running and counted apart.
    pub fn reads(&self) -> u64 {
        self.by_kind
            .iter()
            .filter(|(k, _)| matches!(k.split(' ').next(), Some("get" | "list")))
            .map(|(_, v)| v)
            .sum()
    }
}

impl Counter {
    pub fn new(keep_log: bool) -> Counter {
        Counter {
            inner: Arc::new(Inner {
                log: keep_log.then(Mutex::default),
                ..Inner::default()
            }),
        }
    }

    pub fn snapshot(&self) -> Counts {
        Counts {
            total: self.inner.total.load(Ordering::Acquire),
            by_kind: lock(&self.inner.counts).clone(),
            errors: lock(&self.inner.errors).clone(),
        }
    }

    /// Logged requests with `seq > after` (empty when the log is off).
    pub fn log_since(&self, after: u64) -> Vec<RequestRecord> {
        match &self.inner.log {
            Some(log) => lock(log)
                .iter()
                .filter(|r| r.seq > after)
                .cloned()
                .collect(),
            None => Vec::new(),
        }
    }

    /// A client for `config` whose requests this counter counts.
    pub fn client(&self, config: kube::Config) -> anyhow::Result<kube::Client> {
        intercept::client(config, self.clone())
    }

    fn record(&self, verb: String, target: Target, code: u16) {
        let key = format!("{verb} {}", target.resource);
        *lock(&self.inner.counts).entry(key.clone()).or_default() += 1;
        if !(200..300).contains(&code) {
            *lock(&self.inner.errors)
                .entry(format!("{key} {code}"))
                .or_default() += 1;
        }
        // Under the log's lock, so that sequence numbers are in log order.
        match &self.inner.log {
            Some(log) => {
                let mut log = lock(log);
                let seq = self.inner.total.fetch_add(1, Ordering::AcqRel) + 1;
                log.push(RequestRecord {
                    seq,
                    verb,
                    resource: target.resource,
                    namespace: target.namespace,
                    name: target.name,
                    code,
                });
            }
            None => {
                self.inner.total.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub use podium_core::request::{Target, target, verb};

/// Counts each request once it is answered.
impl Hook for Counter {
    type Seen = (String, Target);

    fn see(&self, request: &Request<Body>) -> Self::Seen {
        let target = target(request.uri().path());
        let verb = verb(request.method().as_str(), &target, request.uri().query()).to_string();
        (verb, target)
    }

    fn answer(&self, (verb, target): Self::Seen, send: Pending) -> Pending {
        let counter = self.clone();
        Box::pin(async move {
            let result = send.await;
            let code = result.as_ref().map_or(0, |r| r.status().as_u16());
            counter.record(verb, target, code);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_split_reads_and_writes() {
        let mut a = Counts::default();
        a.by_kind.insert("update leases".into(), 2);
        let mut b = a.clone();
        b.total = 5;
        b.by_kind.insert("update leases".into(), 5);
        b.by_kind.insert("get leases".into(), 1);
        b.by_kind.insert("watch pods".into(), 1);
        let d = b.since(&a);
        assert_eq!((d.writes(), d.reads(), d.total), (3, 1, 5));
    }
}
