//! The harness's own watches, separate from the operator's: pod roles, the leader Service's
//! EndpointSlices, and a Lease's holder. Each publishes a snapshot stamped with when the
//! watched value last changed, so a waiter that wakes late still gets the moment the
//! condition first held.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::testbed::kubelet::endpointslice_resource;
use podium_core::crd::{ROLE_LABEL, ROLE_LEADER};

/// One pod as the harness sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodState {
    pub app: Option<String>,
    pub role: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    pub ip: Option<String>,
}

impl PodState {
    fn of(pod: &Pod) -> PodState {
        PodState {
            app: pod.labels().get("app").cloned(),
            role: pod.labels().get(ROLE_LABEL).cloned(),
            ready: pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            terminating: pod.metadata.deletion_timestamp.is_some(),
            ip: pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .filter(|ip| !ip.is_empty()),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.role.as_deref() == Some(ROLE_LEADER)
    }
}

/// What a [`PodWatch`] publishes.
#[derive(Clone, Debug)]
pub struct PodsSnapshot {
    /// The initial list has been seen.
    pub synced: bool,
    /// Pods of the focus app, by name.
    pub focus: BTreeMap<String, PodState>,
    /// Pods of the focus app labelled leader, sorted.
    pub focus_leaders: Vec<String>,
    /// When `focus_leaders` last changed.
    pub focus_leaders_since: Instant,
    /// Apps with exactly one pod labelled leader, and with more than one.
    pub apps_with_one_leader: usize,
    pub apps_with_many_leaders: usize,
}

impl PodsSnapshot {
    /// Non-terminating Ready pods of the focus app.
    pub fn focus_ready(&self) -> usize {
        self.focus
            .values()
            .filter(|p| p.ready && !p.terminating)
            .count()
    }

    /// The focus app is settled: `n` pods, none terminating, all Ready and labelled, one leader.
    pub fn focus_settled(&self, n: usize) -> bool {
        self.focus.len() == n
            && self
                .focus
                .values()
                .all(|p| p.ready && !p.terminating && p.role.is_some())
            && self.focus_leaders.len() == 1
    }
}

/// Watches pods in a namespace (matching a label selector), tallying leaders per `app` label
/// and following the pods of one app closely.
pub struct PodWatch {
    rx: watch::Receiver<PodsSnapshot>,
    task: JoinHandle<()>,
}

impl PodWatch {
    pub fn start(
        client: &Client,
        namespace: &str,
        selector: Option<&str>,
        focus_app: &str,
    ) -> Self {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let mut config = watcher::Config::default();
        if let Some(selector) = selector {
            config = config.labels(selector);
        }
        let (tx, rx) = watch::channel(PodsSnapshot {
            synced: false,
            focus: BTreeMap::new(),
            focus_leaders: Vec::new(),
            focus_leaders_since: Instant::now(),
            apps_with_one_leader: 0,
            apps_with_many_leaders: 0,
        });
        let focus_app = focus_app.to_string();
        let task = tokio::spawn(async move {
            let mut pods: HashMap<String, PodState> = HashMap::new();
            let mut staging: HashMap<String, PodState> = HashMap::new();
            let mut synced = false;
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                match event {
                    Ok(Event::Init) => staging.clear(),
                    Ok(Event::InitApply(pod)) => {
                        staging.insert(pod.name_any(), PodState::of(&pod));
                        continue;
                    }
                    Ok(Event::InitDone) => {
                        pods = std::mem::take(&mut staging);
                        synced = true;
                    }
                    Ok(Event::Apply(pod)) => {
                        pods.insert(pod.name_any(), PodState::of(&pod));
                    }
                    Ok(Event::Delete(pod)) => {
                        pods.remove(&pod.name_any());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bench pod watch error");
                        continue;
                    }
                }
                let focus: BTreeMap<String, PodState> = pods
                    .iter()
                    .filter(|(_, p)| p.app.as_deref() == Some(focus_app.as_str()))
                    .map(|(n, p)| (n.clone(), p.clone()))
                    .collect();
                let focus_leaders: Vec<String> = focus
                    .iter()
                    .filter(|(_, p)| p.is_leader())
                    .map(|(n, _)| n.clone())
                    .collect();
                let mut per_app: HashMap<&str, usize> = HashMap::new();
                for p in pods.values().filter(|p| p.is_leader()) {
                    *per_app.entry(p.app.as_deref().unwrap_or("")).or_default() += 1;
                }
                tx.send_modify(|s| {
                    if s.focus_leaders != focus_leaders {
                        s.focus_leaders = focus_leaders;
                        s.focus_leaders_since = now;
                    }
                    s.focus = focus;
                    s.synced = synced;
                    s.apps_with_one_leader = per_app.values().filter(|n| **n == 1).count();
                    s.apps_with_many_leaders = per_app.values().filter(|n| **n > 1).count();
                });
            }
        });
        PodWatch { rx, task }
    }

    pub fn now(&self) -> PodsSnapshot {
        self.rx.borrow().clone()
    }

    /// Waits until `condition` holds for a snapshot; returns it.
    pub async fn wait(
        &self,
        timeout: Duration,
        what: &str,
        mut condition: impl FnMut(&PodsSnapshot) -> bool,
    ) -> Result<PodsSnapshot> {
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|s| condition(s))).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(anyhow!("the pod watch ended while waiting for {what}")),
            Err(_) => Err(anyhow!(
                "timed out after {:.0}s waiting for {what}",
                timeout.as_secs_f64()
            )),
        }
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`SliceWatch`] publishes: the ready addresses of a Service, as a client of it would
/// be routed.
#[derive(Clone, Debug)]
pub struct SlicesSnapshot {
    pub addresses: BTreeSet<String>,
    pub since: Instant,
}

/// Watches the EndpointSlices of one Service.
pub struct SliceWatch {
    rx: watch::Receiver<SlicesSnapshot>,
    task: JoinHandle<()>,
}

impl SliceWatch {
    pub fn start(client: &Client, namespace: &str, service: &str) -> Self {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &endpointslice_resource());
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let (tx, rx) = watch::channel(SlicesSnapshot {
            addresses: BTreeSet::new(),
            since: Instant::now(),
        });
        let task = tokio::spawn(async move {
            let mut slices: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut staging: HashMap<String, BTreeSet<String>> = HashMap::new();
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                match event {
                    Ok(Event::Init) => staging.clear(),
                    Ok(Event::InitApply(slice)) => {
                        staging.insert(slice.name_any(), ready_addresses(&slice));
                        continue;
                    }
                    Ok(Event::InitDone) => slices = std::mem::take(&mut staging),
                    Ok(Event::Apply(slice)) => {
                        slices.insert(slice.name_any(), ready_addresses(&slice));
                    }
                    Ok(Event::Delete(slice)) => {
                        slices.remove(&slice.name_any());
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bench EndpointSlice watch error");
                        continue;
                    }
                }
                let addresses: BTreeSet<String> = slices.values().flatten().cloned().collect();
                tx.send_if_modified(|s| {
                    if s.addresses == addresses {
                        return false;
                    }
                    s.addresses = addresses;
                    s.since = now;
                    true
                });
            }
        });
        SliceWatch { rx, task }
    }

    /// Waits until the Service routes to exactly `ip`; returns when that began.
    pub async fn wait_only(&self, ip: &str, timeout: Duration) -> Result<Instant> {
        let mut rx = self.rx.clone();
        let wanted: BTreeSet<String> = [ip.to_string()].into();
        match tokio::time::timeout(timeout, rx.wait_for(|s| s.addresses == wanted)).await {
            Ok(Ok(s)) => Ok(s.since),
            Ok(Err(_)) => Err(anyhow!("the EndpointSlice watch ended")),
            Err(_) => Err(anyhow!(
                "timed out after {:.0}s waiting for the Service to route to {ip} only (now: {:?})",
                timeout.as_secs_f64(),
                self.rx.borrow().addresses
            )),
        }
    }
}

impl Drop for SliceWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ready_addresses(slice: &DynamicObject) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(endpoints) = slice.data.get("endpoints").and_then(Value::as_array) else {
        return out;
    };
    for endpoint in endpoints {
        let ready = endpoint
            .pointer("/conditions/ready")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        if !ready {
            continue;
        }
        if let Some(addresses) = endpoint.get("addresses").and_then(Value::as_array) {
            out.extend(
                addresses
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string),
            );
        }
    }
    out
}

/// What a [`LeaseWatch`] publishes.
#[derive(Clone, Debug)]
pub struct LeaseSnapshot {
    pub holder: Option<String>,
    pub since: Instant,
}

/// Watches one Lease's holder.
pub struct LeaseWatch {
    rx: watch::Receiver<LeaseSnapshot>,
    task: JoinHandle<()>,
}

impl LeaseWatch {
    pub fn start(client: &Client, namespace: &str, name: &str) -> Self {
        let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let (tx, rx) = watch::channel(LeaseSnapshot {
            holder: None,
            since: Instant::now(),
        });
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let holder = match event {
                    Ok(Event::Apply(lease) | Event::InitApply(lease)) => lease
                        .spec
                        .and_then(|s| s.holder_identity)
                        .filter(|h| !h.is_empty()),
                    Ok(Event::Delete(_)) => None,
                    Ok(Event::Init | Event::InitDone) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "bench Lease watch error");
                        continue;
                    }
                };
                tx.send_if_modified(|s| {
                    if s.holder == holder {
                        return false;
                    }
                    s.holder = holder;
                    s.since = now;
                    true
                });
            }
        });
        LeaseWatch { rx, task }
    }

    pub fn now(&self) -> LeaseSnapshot {
        self.rx.borrow().clone()
    }

    /// Waits until the Lease names a holder for which `accept` is true.
    pub async fn wait_holder(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&str) -> bool,
    ) -> Result<LeaseSnapshot> {
        let mut rx = self.rx.clone();
        let waited = rx.wait_for(|s| s.holder.as_deref().is_some_and(&mut accept));
        match tokio::time::timeout(timeout, waited).await {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => Err(anyhow!("the Lease watch ended")),
            Err(_) => Err(anyhow!(
                "timed out after {:.0}s waiting for a new Lease holder (now: {:?})",
                timeout.as_secs_f64(),
                self.rx.borrow().holder
            )),
        }
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
