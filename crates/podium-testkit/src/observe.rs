//! The harness's own watches, separate from the operator's: pods, a Lease, and a Service's
//! EndpointSlices. [`watch_pods`], [`watch_lease`] and [`watch_slices`] hand every change,
//! stamped with when it arrived, to a callback: the [`checker`](crate::checker) records them
//! all. [`PodWatch`], [`SliceWatch`] and [`LeaseWatch`] fold them into a snapshot stamped with
//! when the watched value last changed, so a waiter that wakes late still gets the moment the
//! condition first held.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pod::{is_ready, is_terminating};
use crate::testbed::kubelet::{endpointslice_resource, slice_endpoints};
use podium_core::crd::{ElectionGroup, ROLE_LABEL, ROLE_LEADER};

/// One change a watch saw.
#[derive(Clone, Debug)]
pub enum Change<K> {
    /// A (re)list begins: the objects that follow, up to [`Change::Listed`], replace all known.
    Relisting,
    /// One object of the (re)list.
    Listing(K),
    /// The (re)list is complete.
    Listed,
    Applied(K),
    Deleted(K),
}

impl<K> Change<K> {
    /// The object this change is about, and whether it was deleted; `None` where a (re)list
    /// begins or ends.
    pub fn object(self) -> Option<(K, bool)> {
        match self {
            Change::Listing(object) | Change::Applied(object) => Some((object, false)),
            Change::Deleted(object) => Some((object, true)),
            Change::Relisting | Change::Listed => None,
        }
    }
}

/// A running watch; dropping it stops the watch.
pub struct Watching(JoinHandle<()>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches `api`, handing `on` each change and when it arrived. Errors are retried with
/// backoff, so that an API server outage does not turn into a busy reconnect loop.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    mut on: impl FnMut(Instant, Change<K>) + Send + 'static,
) -> Watching
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    Watching(tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            let change = match event {
                Ok(Event::Init) => Change::Relisting,
                Ok(Event::InitApply(object)) => Change::Listing(object),
                Ok(Event::InitDone) => Change::Listed,
                Ok(Event::Apply(object)) => Change::Applied(object),
                Ok(Event::Delete(object)) => Change::Deleted(object),
                Err(e) => {
                    tracing::debug!(error = %e, "harness {what} watch error");
                    continue;
                }
            };
            on(at, change);
        }
    }))
}

/// Watches the pods of `namespace` (those matching `selector`, if given).
pub fn watch_pods(
    client: &Client,
    namespace: &str,
    selector: Option<&str>,
    on: impl FnMut(Instant, Change<Pod>) + Send + 'static,
) -> Watching {
    let mut config = watcher::Config::default();
    if let Some(selector) = selector {
        config = config.labels(selector);
    }
    watch(
        Api::namespaced(client.clone(), namespace),
        config,
        "pod",
        on,
    )
}

/// Watches the Lease `namespace/name`.
pub fn watch_lease(
    client: &Client,
    namespace: &str,
    name: &str,
    on: impl FnMut(Instant, Change<Lease>) + Send + 'static,
) -> Watching {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watch(
        Api::namespaced(client.clone(), namespace),
        config,
        "Lease",
        on,
    )
}

/// Watches the ElectionGroups of `namespace`.
pub fn watch_groups(
    client: &Client,
    namespace: &str,
    on: impl FnMut(Instant, Change<ElectionGroup>) + Send + 'static,
) -> Watching {
    watch(
        Api::namespaced(client.clone(), namespace),
        watcher::Config::default(),
        "ElectionGroup",
        on,
    )
}

/// Watches the EndpointSlices of Service `namespace/service`.
pub fn watch_slices(
    client: &Client,
    namespace: &str,
    service: &str,
    on: impl FnMut(Instant, Change<DynamicObject>) + Send + 'static,
) -> Watching {
    let api = Api::namespaced_with(client.clone(), namespace, &endpointslice_resource());
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    watch(api, config, "EndpointSlice", on)
}

/// The holder a Lease names, if any, and its `leaseTransitions` (the epoch).
pub fn lease_holder(lease: &Lease) -> (Option<String>, i32) {
    let spec = lease.spec.clone().unwrap_or_default();
    (
        spec.holder_identity.filter(|h| !h.is_empty()),
        spec.lease_transitions.unwrap_or(0),
    )
}

/// The objects a watch knows of by name, with the (re)list of a reconnect replacing them only
/// once complete.
struct Known<T> {
    now: HashMap<String, T>,
    listing: HashMap<String, T>,
    synced: bool,
}

impl<T> Default for Known<T> {
    fn default() -> Self {
        Known {
            now: HashMap::new(),
            listing: HashMap::new(),
            synced: false,
        }
    }
}

impl<T> Known<T> {
    /// Applies one change; false while a (re)list is still coming in, when nothing changed yet.
    fn apply<K: ResourceExt>(&mut self, change: Change<K>, value: impl Fn(&K) -> T) -> bool {
        match change {
            Change::Relisting => self.listing.clear(),
            Change::Listing(object) => {
                self.listing.insert(object.name_any(), value(&object));
                return false;
            }
            Change::Listed => {
                self.now = std::mem::take(&mut self.listing);
                self.synced = true;
            }
            Change::Applied(object) => {
                self.now.insert(object.name_any(), value(&object));
            }
            Change::Deleted(object) => {
                self.now.remove(&object.name_any());
            }
        }
        true
    }
}

/// Sets `value` and stamps `since` with `at`, if the value changed; whether it did.
fn stamp<T: PartialEq>(value: &mut T, new: T, since: &mut Instant, at: Instant) -> bool {
    if *value == new {
        return false;
    }
    *value = new;
    *since = at;
    true
}

/// What one of the snapshot watches ([`PodWatch`], [`SliceWatch`], [`LeaseWatch`]) publishes:
/// its latest snapshot, and waits on it. Dropping it stops the watch.
pub struct Published<T> {
    rx: watch::Receiver<T>,
    _watching: Watching,
}

impl<T: Clone> Published<T> {
    /// Publishes `initial`, then what the watch that `start` begins sends.
    fn new(initial: T, start: impl FnOnce(watch::Sender<T>) -> Watching) -> Self {
        let (tx, rx) = watch::channel(initial);
        Published {
            rx,
            _watching: start(tx),
        }
    }

    pub fn now(&self) -> T {
        self.rx.borrow().clone()
    }

    /// Waits until `condition` holds for a snapshot; returns it.
    pub async fn wait(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl FnMut(&T) -> bool,
    ) -> Result<T> {
        let mut rx = self.rx.clone();
        match tokio::time::timeout(timeout, rx.wait_for(condition)).await {
            Ok(Ok(value)) => Ok(value.clone()),
            Ok(Err(_)) => Err(anyhow!("the watch ended while waiting for {what}")),
            Err(_) => Err(anyhow!(
                "timed out after {:.0}s waiting for {what}",
                timeout.as_secs_f64()
            )),
        }
    }
}

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
    pub fn of(pod: &Pod) -> PodState {
        PodState {
            app: pod.labels().get("app").cloned(),
            role: pod.labels().get(ROLE_LABEL).cloned(),
            ready: is_ready(pod),
            terminating: is_terminating(pod),
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
pub type PodWatch = Published<PodsSnapshot>;

impl PodWatch {
    pub fn start(
        client: &Client,
        namespace: &str,
        selector: Option<&str>,
        focus_app: &str,
    ) -> Self {
        let initial = PodsSnapshot {
            synced: false,
            focus: BTreeMap::new(),
            focus_leaders: Vec::new(),
            focus_leaders_since: Instant::now(),
            apps_with_one_leader: 0,
            apps_with_many_leaders: 0,
        };
        let focus_app = focus_app.to_string();
        let mut pods = Known::default();
        Published::new(initial, |tx| {
            watch_pods(client, namespace, selector, move |at, change| {
                if !pods.apply(change, PodState::of) {
                    return;
                }
                let focus: BTreeMap<String, PodState> = pods
                    .now
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
                for p in pods.now.values().filter(|p| p.is_leader()) {
                    *per_app.entry(p.app.as_deref().unwrap_or("")).or_default() += 1;
                }
                tx.send_modify(|s| {
                    if s.focus_leaders != focus_leaders {
                        s.focus_leaders = focus_leaders;
                        s.focus_leaders_since = at;
                    }
                    s.focus = focus;
                    s.synced = pods.synced;
                    s.apps_with_one_leader = per_app.values().filter(|n| **n == 1).count();
                    s.apps_with_many_leaders = per_app.values().filter(|n| **n > 1).count();
                });
            })
        })
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
pub type SliceWatch = Published<SlicesSnapshot>;

impl SliceWatch {
    pub fn start(client: &Client, namespace: &str, service: &str) -> Self {
        let initial = SlicesSnapshot {
            addresses: BTreeSet::new(),
            since: Instant::now(),
        };
        let mut slices = Known::default();
        Published::new(initial, |tx| {
            watch_slices(client, namespace, service, move |at, change| {
                if slices.apply(change, ready_addresses) {
                    let addresses = slices.now.values().flatten().cloned().collect();
                    tx.send_if_modified(|s| stamp(&mut s.addresses, addresses, &mut s.since, at));
                }
            })
        })
    }

    /// Waits until the Service routes to exactly `ip`; returns when that began.
    pub async fn wait_only(&self, ip: &str, timeout: Duration) -> Result<Instant> {
        let wanted: BTreeSet<String> = [ip.to_string()].into();
        let what = format!("the Service to route to {ip} only");
        self.wait(timeout, &what, |s| s.addresses == wanted)
            .await
            .map(|s| s.since)
            .map_err(|e| anyhow!("{e} (now: {:?})", self.rx.borrow().addresses))
    }
}

fn ready_addresses(slice: &DynamicObject) -> BTreeSet<String> {
    slice_endpoints(slice)
        .into_iter()
        .filter(|e| e.ready)
        .map(|e| e.address)
        .collect()
}

/// What a [`LeaseWatch`] publishes.
#[derive(Clone, Debug)]
pub struct LeaseSnapshot {
    pub holder: Option<String>,
    pub since: Instant,
}

/// Watches one Lease's holder.
pub type LeaseWatch = Published<LeaseSnapshot>;

impl LeaseWatch {
    pub fn start(client: &Client, namespace: &str, name: &str) -> Self {
        let initial = LeaseSnapshot {
            holder: None,
            since: Instant::now(),
        };
        Published::new(initial, |tx| {
            watch_lease(client, namespace, name, move |at, change| {
                let holder = match change.object() {
                    Some((lease, false)) => lease_holder(&lease).0,
                    Some((_, true)) => None,
                    None => return,
                };
                tx.send_if_modified(|s| stamp(&mut s.holder, holder, &mut s.since, at));
            })
        })
    }

    /// Waits until the Lease names a holder for which `accept` is true.
    pub async fn wait_holder(
        &self,
        timeout: Duration,
        mut accept: impl FnMut(&str) -> bool,
    ) -> Result<LeaseSnapshot> {
        let waited = self.wait(timeout, "a new Lease holder", |s| {
            s.holder.as_deref().is_some_and(&mut accept)
        });
        waited
            .await
            .map_err(|e| anyhow!("{e} (now: {:?})", self.rx.borrow().holder))
    }
}
