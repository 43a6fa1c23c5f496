//! The renewal floor: every Lease of a namespace renewed each TTL/2 by a bare client, each
//! replace conditional on the version its previous answer returned (no watch, no reads but
//! the one list at the start). It runs on a thread of its own with a single-threaded runtime,
//! so that the thread's CPU time (`/proc/thread-self/stat`) is the renewer's alone: its
//! connections, TLS and JSON included, the harness excluded.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use podium::lean_lease::LeanLease;

use super::OPERATOR_CONCURRENCY;
use crate::procstat;

/// What the renewer did inside the measured window.
#[derive(Clone, Debug, Default)]
pub struct Renewals {
    pub leases: usize,
    pub window: Duration,
    /// Renewals acknowledged inside the window.
    pub renewed: u64,
    /// Renewals sent inside the window (every one is a write).
    pub sent: u64,
    pub failed: u64,
    /// The renewer thread's CPU time over the window.
    pub cpu: Duration,
}

impl Renewals {
    pub fn writes_per_second(&self) -> f64 {
        self.sent as f64 / self.window.as_secs_f64()
    }

    pub fn cpu_per_renewal(&self) -> Option<Duration> {
        (self.renewed > 0).then(|| self.cpu.div_f64(self.renewed as f64))
    }
}

/// Renews the Leases of `ns` (`ttl_seconds` each) for `settle`, then measures `window`.
pub async fn run(
    config: kube::Config,
    ns: &str,
    ttl_seconds: i32,
    settle: Duration,
    window: Duration,
) -> Result<Renewals> {
    let ns = ns.to_string();
    let thread = std::thread::Builder::new()
        .name("renewal-floor".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the renewer's runtime")?
                .block_on(renew(config, &ns, ttl_seconds, settle, window))
        })
        .context("starting the renewer thread")?;
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("waiting for the renewer thread")?
        .map_err(|_| anyhow::anyhow!("the renewer thread panicked"))?
}

/// One renewal in flight: the Lease, when it was sent, and the answer.
type Renewal = futures::future::BoxFuture<'static, (String, Instant, podium::error::Result<Lease>)>;

async fn renew(
    config: kube::Config,
    ns: &str,
    ttl_seconds: i32,
    settle: Duration,
    window: Duration,
) -> Result<Renewals> {
    let client = Client::try_from(config).context("building the renewer's client")?;
    let api: Api<LeanLease> = Api::namespaced(client, ns);
    let period = podium_core::election::renew_interval(ttl_seconds);
    let mut leases: HashMap<String, Lease> = HashMap::new();
    // Each Lease is due TTL/2 after the renewTime it carries, as podium schedules it.
    let mut due: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
    let now = (Instant::now(), Timestamp::now());
    for lease in api.list(&ListParams::default()).await?.items {
        let lease = Lease::from(lease);
        let renewed = lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map_or(now.1, |t| t.0);
        let age = now.1.duration_since(renewed).unsigned_abs();
        let at = now.0 + period.saturating_sub(age);
        due.push(Reverse((at, lease.name_any())));
        leases.insert(lease.name_any(), lease);
    }
    let mut out = Renewals {
        leases: leases.len(),
        ..Renewals::default()
    };
    let window_start = tokio::time::Instant::now() + settle;
    let window_end = window_start + window;
    let mut cpu_start = None;
    let mut in_flight: FuturesUnordered<Renewal> = FuturesUnordered::new();
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        let can_send = next.is_some() && in_flight.len() < OPERATOR_CONCURRENCY;
        let next = tokio::time::Instant::from_std(next.unwrap_or_else(Instant::now));
        let measuring = cpu_start.is_some();
        tokio::select! {
            () = tokio::time::sleep_until(window_start), if !measuring => {
                cpu_start = Some(procstat::thread_cpu()?);
            }
            () = tokio::time::sleep_until(window_end), if measuring => break,
            Some((name, sent_at, result)) = in_flight.next(), if !in_flight.is_empty() => {
                let in_window = measuring;
                match result {
                    Ok(lease) => {
                        out.renewed += u64::from(in_window);
                        leases.insert(name.clone(), lease);
                    }
                    Err(e) => {
                        out.failed += u64::from(in_window);
                        tracing::debug!(lease = %name, error = %e, "floor renewal failed");
                    }
                }
                due.push(Reverse((sent_at + period, name)));
            }
            () = tokio::time::sleep_until(next), if can_send => {
                let Some(Reverse((_, name))) = due.pop() else { continue };
                let Some(mut lease) = leases.remove(&name) else { continue };
                out.sent += u64::from(measuring);
                let api = api.clone();
                in_flight.push(Box::pin(async move {
                    let sent_at = Instant::now();
                    lease.metadata.managed_fields = None;
                    if let Some(spec) = lease.spec.as_mut() {
                        spec.renew_time = Some(MicroTime(Timestamp::now()));
                    }
                    let result = podium::lease::write(&api, lease, false).await;
                    (name, sent_at, result)
                }));
            }
        }
    }
    out.window = window;
    out.cpu = procstat::thread_cpu()?.saturating_sub(cpu_start.unwrap_or_default());
    Ok(out)
}
