//! Wires the watches to the reconciler. Pods, Nodes and Leases are watched once into shared
//! caches; their events are mapped to the groups they concern, so a leader's deletion or
//! NotReady triggers that group's reconcile at once instead of waiting for the TTL.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Future, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, controller, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;

use crate::crd::{ElectionGroup, GROUP_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::events::Events;
use crate::index::{self, Index};
use crate::lean_lease::LeanLease;
use crate::metrics::Metrics;
use crate::pod::ElectionPod;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::{FIELD_MANAGER, election};

pub struct Options {
    /// Watch one namespace instead of the whole cluster.
    pub namespace: Option<String>,
    /// Whether Nodes may be read; without it a pod's node readiness is not considered.
    pub watch_nodes: bool,
    /// Signs role notifications (see [`crate::notify`]).
    pub service_account: Option<(String, String)>,
}

/// Runs the controller until `shutdown` resolves. `leading` gates every write; the caches
/// fill regardless, so a standby that becomes leader acts immediately.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    leading: watch::Receiver<bool>,
    claim: watch::Receiver<crate::ha::Claim>,
    ready: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let api = |client: &Client| -> (Api<ElectionGroup>, Api<ElectionPod>, Api<LeanLease>) {
        match &options.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        }
    };
    let (groups_api, pods_api, leases_api) = api(&client);

    let (groups, group_writer) = reflector::store();
    let group_index = Arc::new(Index::new(index::group_keys));
    let group_stream = watcher(groups_api, watcher::Config::default().any_semantic())
        .backoff(WatchBackoff::default())
        .modify(|g: &mut ElectionGroup| g.managed_fields_mut().clear())
        .reflect(group_writer)
        .inspect(follow(&group_index))
        .applied_objects();

    let (pods, pod_writer) = reflector::store();
    let pod_index = Arc::new(Index::new(index::pod_keys));
    let pod_stream = watcher(pods_api, watcher::Config::default().any_semantic())
        .backoff(WatchBackoff::default())
        .modify(crate::pod::keep_election_fields)
        .reflect(pod_writer)
        .inspect(follow(&pod_index))
        .touched_objects();

    let (leases, lease_writer) = reflector::store();
    let lease_config = watcher::Config::default()
        .any_semantic()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let lease_stream = watcher(leases_api, lease_config)
        .backoff(WatchBackoff::default())
        .map_ok(as_lease)
        .reflect(lease_writer)
        .touched_objects()
        // Our own renewals change only renewTime; only a change of holder, epoch or TTL (a human
        // edit) needs a reconcile.
        .predicate_filter(lease_identity, PredicateConfig::default());

    let (nodes, node_stream) = if options.watch_nodes {
        let (nodes, node_writer) = reflector::store();
        let stream = watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .backoff(WatchBackoff::default())
        .modify(|n: &mut Node| n.managed_fields_mut().clear())
        .reflect(node_writer)
        .touched_objects()
        // Nodes heartbeat constantly; only readiness, cordons and taints matter to an election.
        .predicate_filter(node_election_facts, PredicateConfig::default());
        (Some(nodes), Some(stream))
    } else {
        (None, None)
    };

    tokio::spawn(mark_ready_when_synced(
        groups.clone(),
        pods.clone(),
        leases.clone(),
        nodes.clone(),
        ready.clone(),
    ));

    // Gaining operator leadership reconciles every group at once.
    let gained = WatchStream::new(leading.clone()).filter_map(|l| async move { l.then_some(()) });

    let memory = Arc::new(crate::memory::Memory::default());
    // Groups the renewer hands back for a decision.
    let (decide, to_decide) = tokio::sync::mpsc::unbounded_channel();
    let renewer = crate::renewer::Renewer::start(
        crate::renewer::Sources {
            client: client.clone(),
            groups: groups.clone(),
            leases: leases.clone(),
            memory: memory.clone(),
            leading: leading.clone(),
            claim: claim.clone(),
            metrics: metrics.clone(),
        },
        decide.clone(),
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        groups: groups.clone(),
        pods: pods.clone(),
        pod_index: pod_index.clone(),
        group_index: group_index.clone(),
        nodes: nodes.clone(),
        leases,
        events: Events::start(Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        )),
        notifier: crate::notify::Notifier::start(
            pods.clone(),
            options
                .service_account
                .as_ref()
                .map(|(ns, name)| crate::notify::TokenSource::new(client.clone(), ns, name)),
            leading.clone(),
            claim.clone(),
            metrics.clone(),
            decide,
        ),
        metrics,
        leading,
        claim,
        synced: ready,
        memory,
        renewer,
    });

    let groups_for_pods = (groups.clone(), group_index.clone());
    let mut controller = Controller::for_stream(group_stream, groups.clone())
        .watches_stream(pod_stream, move |pod: ElectionPod| {
            groups_of_pod(&groups_for_pods.0, &groups_for_pods.1, &pod)
        })
        .owns_stream(lease_stream)
        .reconcile_all_on(gained)
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            to_decide,
        ))
        // The controller pauses all its watches together after an error from any of them, with
        // the same 30 s-capped backoff by default; that hid every pod event for half a minute
        // after an API server restart.
        .trigger_backoff(WatchBackoff::default())
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES))
        .graceful_shutdown_on(shutdown);
    if let (Some(node_stream), Some(_)) = (node_stream, &nodes) {
        let (groups, group_index) = (groups.clone(), group_index.clone());
        let (pods, pod_index) = (pods.clone(), pod_index.clone());
        controller = controller.watches_stream(node_stream, move |node: Node| {
            pod_index
                .get(&index::Key::Node(node.name_any()))
                .iter()
                .filter_map(|p| pods.get(p))
                .flat_map(|p| groups_of_pod(&groups, &group_index, &p))
                .collect::<Vec<_>>()
        });
    }
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile loop reported");
            }
        })
        .await;
    tracing::info!("controller stopped");
}

/// Reconciles in flight at once. Unbounded, creating 1000 groups started 1000 reconciles
/// together: as many connections to the API server (which sheds load above 200 mutating
/// requests in flight by default), each with its own TLS and HTTP buffers that stayed in the
/// operator's memory afterwards. Renewals at steady state need a handful at a time.
const MAX_CONCURRENT_RECONCILES: u16 = 64;

/// The groups a pod event concerns: those whose selector matches it now, and the one whose
/// annotation it carries (it may just have stopped matching).
pub fn groups_of_pod(
    groups: &Store<ElectionGroup>,
    group_index: &Index<ElectionGroup>,
    pod: &ElectionPod,
) -> Vec<ObjectRef<ElectionGroup>> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut refs: Vec<ObjectRef<ElectionGroup>> = index::groups_selecting(groups, group_index, pod)
        .iter()
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect();
    if let Some(group) = pod.annotations().get(GROUP_ANNOTATION)
        && !refs.iter().any(|r| &r.name == group)
    {
        refs.push(ObjectRef::new(group).within(&namespace));
    }
    refs
}

/// How soon a broken watch is retried, for each watch and for the controller's pause of all of
/// them. kube's default backoff grows to 30 s; after an API server restart the watches had
/// failed for every second of the outage and then waited that long (plus another round for the
/// relist after "too old resource version"), so podium saw no pod fail for up to a minute.
/// Capped at 4 s; a successful event resets it.
#[derive(Clone, Debug)]
struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(4);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        WatchBackoff { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;
    fn next(&mut self) -> Option<Self::Item> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(now)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Feeds an index the events its store has just applied.
fn follow<K>(index: &Arc<Index<K>>) -> impl Fn(&Result<watcher::Event<K>, watcher::Error>) + use<K>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    let index = index.clone();
    move |event| {
        if let Ok(event) = event {
            index.apply(event);
        }
    }
}

/// A Lease watch event decoded as [`LeanLease`], as the `Lease` the store and the core use.
fn as_lease(event: watcher::Event<LeanLease>) -> watcher::Event<Lease> {
    match event {
        watcher::Event::Apply(lease) => watcher::Event::Apply(lease.into()),
        watcher::Event::Delete(lease) => watcher::Event::Delete(lease.into()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(lease) => watcher::Event::InitApply(lease.into()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn lease_identity(lease: &Lease) -> Option<u64> {
    let spec = lease.spec.as_ref()?;
    let mut h = DefaultHasher::new();
    (
        &spec.holder_identity,
        spec.lease_transitions,
        spec.lease_duration_seconds,
        lease.annotations(),
        lease.labels(),
    )
        .hash(&mut h);
    Some(h.finish())
}

fn node_election_facts(node: &Node) -> Option<u64> {
    let mut h = DefaultHasher::new();
    election::node_ready(node).hash(&mut h);
    if let Some(spec) = &node.spec {
        spec.unschedulable.hash(&mut h);
        for taint in spec.taints.iter().flatten() {
            (&taint.key, &taint.effect).hash(&mut h);
        }
    }
    Some(h.finish())
}

async fn mark_ready_when_synced(
    groups: Store<ElectionGroup>,
    pods: Store<ElectionPod>,
    leases: Store<Lease>,
    nodes: Option<Store<Node>>,
    ready: Arc<AtomicBool>,
) {
    synced(&groups).await;
    synced(&pods).await;
    synced(&leases).await;
    if let Some(nodes) = &nodes {
        synced(nodes).await;
    }
    tracing::info!("caches synced; ready");
    ready.store(true, Ordering::Release);
}

/// Waits for a store's first full list. The store's readiness signal wakes only its most
/// recent waiter, and the controller waits on the same store, so poll rather than park.
async fn synced<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    while tokio::time::timeout(
        std::time::Duration::from_millis(50),
        store.wait_until_ready(),
    )
    .await
    .is_err()
    {}
}
