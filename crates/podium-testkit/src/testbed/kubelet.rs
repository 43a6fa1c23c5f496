//! A simulated kubelet (and scheduler): the testbed has neither, so tests and the demo play
//! them through the API, exactly as the real components would write it.
//!
//! - One-shot helpers: [`create_node`], [`set_node_ready`], [`bind_pod`],
//!   [`set_pod_running_ready`], [`set_pod_not_ready`], [`finalize_deletion`], [`run_pods`].
//! - A background loop, [`Kubelet`], that binds pending pods to its node, makes them
//!   Running+Ready once, and finalises their deletion.
//! - Readers for the v1beta1-only resources of a v1.20 server: [`endpointslice_resource`],
//!   [`endpointslice_endpoints`], [`endpointslice_addresses`], [`pdb_resource`].
//!
//! Nodes must exist before pods are bound to them: the pod garbage collector deletes pods bound
//! to missing nodes, and the EndpointSlice controller skips them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, Preconditions,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::task::{JoinHandle, JoinSet};

use crate::pod::is_ready;

/// Label the EndpointSlice controller puts on every slice of a Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A pod IP no other call in this process has returned: `10.244.x.y`.
pub fn next_pod_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (256 * 254);
    format!("10.244.{}.{}", n / 254, n % 254 + 1)
}

fn next_node_ip() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % (256 * 254);
    format!("10.0.{}.{}", n / 254, n % 254 + 1)
}

/// The API's timestamp format; whole seconds, as the server would store them anyway.
fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

/// Creates a Node that is Ready (status posted as a kubelet would on registration). If it
/// already exists it is made Ready.
pub async fn create_node(client: &Client, name: &str) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 409) => {
            set_node_ready(client, name, true).await?;
            return Ok(nodes.get(name).await?);
        }
        Err(e) => return Err(e).with_context(|| format!("creating node {name}")),
    }
    let t = now();
    let resources = json!({ "cpu": "8", "memory": "32Gi", "pods": "110" });
    let status = json!({
        "status": {
            "conditions": [node_ready_condition(true, &t, &t)],
            "addresses": [
                { "type": "InternalIP", "address": next_node_ip() },
                { "type": "Hostname", "address": name },
            ],
            "capacity": resources,
            "allocatable": resources,
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kernelVersion": "simulated",
                "osImage": "podium simulated kubelet",
                "containerRuntimeVersion": "simulated://1.0",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("posting the status of node {name}"))
}

fn node_ready_condition(ready: bool, heartbeat: &str, transition: &str) -> Value {
    let (status, reason, message) = if ready {
        ("True", "KubeletReady", "kubelet is posting ready status")
    } else {
        (
            "False",
            "KubeletNotReady",
            "simulated kubelet reports not ready",
        )
    };
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": heartbeat,
        "lastTransitionTime": transition,
    })
}

/// Sets the node's Ready condition, as its kubelet would.
pub async fn set_node_ready(client: &Client, name: &str, ready: bool) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get(name)
        .await
        .with_context(|| format!("reading node {name}"))?;
    let wanted = if ready { "True" } else { "False" };
    let t = now();
    let previous = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let transition = match previous {
        Some(c) if c.status == wanted => c
            .last_transition_time
            .as_ref()
            .map(|time| time.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_else(|| t.clone()),
        _ => t.clone(),
    };
    let patch =
        json!({ "status": { "conditions": [node_ready_condition(ready, &t, &transition)] } });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting node {name} Ready={wanted}"))?;
    Ok(())
}

/// Schedules a pod onto a node through the `pods/binding` subresource, as the scheduler does.
pub async fn bind_pod(client: &Client, namespace: &str, pod: &str, node: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": { "name": pod, "namespace": namespace },
        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
    });
    let _: Value = pods
        .create_subresource("binding", pod, &PostParams::default(), &binding)
        .await
        .with_context(|| format!("binding pod {namespace}/{pod} to node {node}"))?;
    Ok(())
}

fn pod_condition(type_: &str, status: bool, transition: &str) -> Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "lastProbeTime": null,
        "lastTransitionTime": transition,
    })
}

fn condition_since(pod: &Pod, type_: &str, status: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)?
        .last_transition_time
        .as_ref()
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

async fn host_ip(client: &Client, node: &str) -> String {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.status)
        .and_then(|s| s.addresses)
        .and_then(|addresses| {
            addresses
                .into_iter()
                .find(|a| a.type_ == "InternalIP")
                .map(|a| a.address)
        })
        .unwrap_or_else(|| "10.0.0.1".to_string())
}

/// Reports a bound pod as Running and Ready with IP `ip`: phase, conditions, pod and host IPs
/// and running, ready container statuses, written to the status subresource.
///
/// If the pod is already Ready its Ready `lastTransitionTime` is kept, so "ready since" (which
/// `minReadySeconds` is measured from) does not move.
pub async fn set_pod_running_ready(
    client: &Client,
    namespace: &str,
    pod: &str,
    ip: &str,
) -> Result<Pod> {
    if ip.parse::<std::net::IpAddr>().is_err() {
        bail!("invalid pod IP {ip:?}");
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = pods
        .get(pod)
        .await
        .with_context(|| format!("reading pod {namespace}/{pod}"))?;
    let Some(node) = current.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        bail!("pod {namespace}/{pod} is not bound to a node; call bind_pod first");
    };
    let t = now();
    let ready_since = condition_since(&current, "Ready", "True").unwrap_or_else(|| t.clone());
    let scheduled_since =
        condition_since(&current, "PodScheduled", "True").unwrap_or_else(|| t.clone());
    let start_time = current
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|st| st.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.clone());
    let uid = current
        .metadata
        .uid
        .clone()
        .unwrap_or_default()
        .replace('-', "");
    let containers: Vec<Value> = current
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("simulated://{image}"),
                "containerID": format!("simulated://{uid}{i:02}"),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": { "running": { "startedAt": start_time } },
            })
        })
        .collect();
    let patch = json!({
        "status": {
            "phase": "Running",
            "hostIP": host_ip(client, &node).await,
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "startTime": start_time,
            "conditions": [
                pod_condition("Initialized", true, &scheduled_since),
                pod_condition("Ready", true, &ready_since),
                pod_condition("ContainersReady", true, &ready_since),
                pod_condition("PodScheduled", true, &scheduled_since),
            ],
            "containerStatuses": containers,
        }
    });
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("reporting pod {namespace}/{pod} Running and Ready"))
}

/// Reports a pod's containers as not ready (a failing readiness probe): Ready and
/// ContainersReady become False, the pod stays Running with its IP.
pub async fn set_pod_not_ready(client: &Client, namespace: &str, pod: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let current = pods
        .get(pod)
        .await
        .with_context(|| format!("reading pod {namespace}/{pod}"))?;
    let t = now();
    let not_ready_since = condition_since(&current, "Ready", "False").unwrap_or_else(|| t.clone());
    let scheduled_since =
        condition_since(&current, "PodScheduled", "True").unwrap_or_else(|| t.clone());
    let mut containers: Vec<Value> = current
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|statuses| {
            statuses
                .iter()
                .filter_map(|s| serde_json::to_value(s).ok())
                .collect()
        })
        .unwrap_or_default();
    for container in &mut containers {
        container["ready"] = json!(false);
    }
    let mut ready = pod_condition("Ready", false, &not_ready_since);
    ready["reason"] = json!("ContainersNotReady");
    let mut containers_ready = pod_condition("ContainersReady", false, &not_ready_since);
    containers_ready["reason"] = json!("ContainersNotReady");
    let mut status = json!({
        "conditions": [
            pod_condition("Initialized", true, &scheduled_since),
            ready,
            containers_ready,
            pod_condition("PodScheduled", true, &scheduled_since),
        ],
    });
    if !containers.is_empty() {
        status["containerStatuses"] = Value::Array(containers);
    }
    pods.patch_status(
        pod,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "status": status })),
    )
    .await
    .with_context(|| format!("reporting pod {namespace}/{pod} not ready"))
}

/// Completes a pod's deletion as the kubelet does once its containers have stopped: a delete
/// with `gracePeriodSeconds=0`, preconditioned on the UID so that a successor with the same
/// name is never hit. A bound pod stays Terminating until this happens. On a pod that is not
/// being deleted this is a force delete. Succeeds if the pod is already gone.
pub async fn finalize_deletion(client: &Client, namespace: &str, pod: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let Some(current) = pods
        .get_opt(pod)
        .await
        .with_context(|| format!("reading pod {namespace}/{pod}"))?
    else {
        return Ok(());
    };
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: current.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(pod, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or replaced by a new pod of the same name (UID precondition failed).
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("finalising the deletion of {namespace}/{pod}")),
    }
}

/// One pass of a kubelet for `node`: binds every pending pod in `namespace` matching
/// `label_selector` (`""` for all) to `node` and makes the pods on `node` that have not started
/// yet Running+Ready with fresh IPs. Returns `(pod, ip)` for each pod it started. Pods being
/// deleted and pods on other nodes are left alone.
pub async fn run_pods(
    client: &Client,
    namespace: &str,
    label_selector: &str,
    node: &str,
) -> Result<Vec<(String, String)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(label_selector))
        .await
        .with_context(|| format!("listing pods in {namespace} matching {label_selector:?}"))?;
    let mut started = Vec::new();
    for pod in list {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() || has_started(&pod) {
            continue;
        }
        match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            None => bind_pod(client, namespace, &name, node).await?,
            Some(n) if n == node => {}
            Some(_) => continue,
        }
        let ip = existing_ip(&pod).unwrap_or_else(next_pod_ip);
        set_pod_running_ready(client, namespace, &name, &ip).await?;
        started.push((name, ip));
    }
    Ok(started)
}

/// Whether a kubelet already started this pod (or the test set its status by hand).
fn has_started(pod: &Pod) -> bool {
    is_ready(pod)
        || pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase != "Pending")
}

fn existing_ip(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|ip| !ip.is_empty())
}

/// What a [`Kubelet`] does.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// Node this kubelet runs; created (Ready) by [`Kubelet::start`].
    pub node: String,
    /// Only pods in this namespace; `None` for all namespaces, which on the shared testbed
    /// means other tests' pods too.
    pub namespace: Option<String>,
    /// Only pods matching this label selector.
    pub label_selector: Option<String>,
    /// Also play the scheduler: bind matching unscheduled pods to `node`. Turn off when several
    /// kubelets should split pods, and bind them yourself.
    pub bind_unscheduled: bool,
    /// How long a pod takes from bound to Running+Ready.
    pub ready_after: Duration,
    /// How long a Terminating pod on `node` lingers before the kubelet finalises its deletion;
    /// `None` leaves that to the test ([`finalize_deletion`]).
    pub finalize_after: Option<Duration>,
}

impl KubeletOptions {
    /// Binds and readies every pod in the cluster at once, and finalises deletions at once.
    /// Narrow it with [`KubeletOptions::namespace`] (and a label selector) on a shared testbed.
    pub fn new(node: impl Into<String>) -> Self {
        KubeletOptions {
            node: node.into(),
            namespace: None,
            label_selector: None,
            bind_unscheduled: true,
            ready_after: Duration::ZERO,
            finalize_after: Some(Duration::ZERO),
        }
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    pub fn label_selector(mut self, selector: impl Into<String>) -> Self {
        self.label_selector = Some(selector.into());
        self
    }

    pub fn bind_unscheduled(mut self, bind: bool) -> Self {
        self.bind_unscheduled = bind;
        self
    }

    pub fn ready_after(mut self, delay: Duration) -> Self {
        self.ready_after = delay;
        self
    }

    pub fn finalize_after(mut self, delay: Option<Duration>) -> Self {
        self.finalize_after = delay;
        self
    }
}

/// A background kubelet for one node: binds matching pending pods to the node (unless told
/// not to), makes each pod on the node Running+Ready once, with a unique IP, and finalises the
/// deletion of its Terminating pods. It makes a pod Ready only once, so a test can still flip
/// readiness with [`set_pod_not_ready`]. Stops when dropped.
///
/// Runs on the Tokio runtime that started it, so it also stops when that runtime ends.
pub struct Kubelet {
    node: String,
    task: JoinHandle<()>,
}

impl Kubelet {
    /// Creates the node (Ready) and starts the loop. Must be called inside a Tokio runtime.
    pub async fn start(client: &Client, options: KubeletOptions) -> Result<Kubelet> {
        create_node(client, &options.node).await?;
        let node = options.node.clone();
        let task = tokio::spawn(kubelet_loop(client.clone(), options));
        Ok(Kubelet { node, task })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Stops the loop (same as dropping it). The node stays Ready.
    pub fn stop(self) {}
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Outcome {
    Done,
    BindFailed(String),
    StartFailed(String),
    FinalizeFailed(String),
}

async fn kubelet_loop(client: Client, options: KubeletOptions) {
    let pods: Api<Pod> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut config = watcher::Config::default();
    if let Some(selector) = &options.label_selector {
        config = config.labels(selector);
    }
    let mut events = watcher(pods, config).default_backoff().boxed();
    // UIDs already acted on, so that each pod is bound, started and finalised once; failures
    // drop the UID again and the next event for the pod (at the latest the relist after a
    // reconnect) retries.
    let mut binding = HashSet::new();
    let mut started = HashSet::new();
    let mut finalizing = HashSet::new();
    // Dropped (aborting every action in flight) when this task is aborted.
    let mut actions: JoinSet<Outcome> = JoinSet::new();
    loop {
        tokio::select! {
            Some(outcome) = actions.join_next(), if !actions.is_empty() => {
                match outcome {
                    Ok(Outcome::BindFailed(uid)) => { binding.remove(&uid); }
                    Ok(Outcome::StartFailed(uid)) => { started.remove(&uid); }
                    Ok(Outcome::FinalizeFailed(uid)) => { finalizing.remove(&uid); }
                    Ok(Outcome::Done) | Err(_) => {}
                }
            }
            event = events.next() => {
                let pod = match event {
                    None => return,
                    Some(Err(e)) => {
                        tracing::warn!(node = %options.node, error = %e, "simulated kubelet: watch error");
                        continue;
                    }
                    Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
                    Some(Ok(watcher::Event::Delete(pod))) => {
                        if let Some(uid) = &pod.metadata.uid {
                            binding.remove(uid);
                            started.remove(uid);
                            finalizing.remove(uid);
                        }
                        continue;
                    }
                    Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => continue,
                };
                let (Some(uid), Some(name), Some(namespace)) = (
                    pod.metadata.uid.clone(),
                    pod.metadata.name.clone(),
                    pod.metadata.namespace.clone(),
                ) else {
                    continue;
                };
                let on_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let client = client.clone();
                let node = options.node.clone();
                if pod.metadata.deletion_timestamp.is_some() {
                    if on_node.as_deref() == Some(node.as_str())
                        && let Some(delay) = options.finalize_after
                        && finalizing.insert(uid.clone())
                    {
                        actions.spawn(async move {
                            tokio::time::sleep(delay).await;
                            match finalize_deletion(&client, &namespace, &name).await {
                                Ok(()) => Outcome::Done,
                                Err(e) => {
                                    tracing::warn!(error = %format!("{e:#}"), "simulated kubelet");
                                    Outcome::FinalizeFailed(uid)
                                }
                            }
                        });
                    }
                    continue;
                }
                match on_node {
                    None if options.bind_unscheduled && binding.insert(uid.clone()) => {
                        actions.spawn(async move {
                            match bind_pod(&client, &namespace, &name, &node).await {
                                Ok(()) => Outcome::Done,
                                Err(e) => {
                                    // Another scheduler (or kubelet) got there first.
                                    if e.downcast_ref::<kube::Error>().is_some_and(|k| is_status(k, 409)) {
                                        return Outcome::Done;
                                    }
                                    tracing::warn!(error = %format!("{e:#}"), "simulated kubelet");
                                    Outcome::BindFailed(uid)
                                }
                            }
                        });
                    }
                    Some(n) if n == node && !started.contains(&uid) => {
                        started.insert(uid.clone());
                        if has_started(&pod) {
                            continue;
                        }
                        let ip = existing_ip(&pod).unwrap_or_else(next_pod_ip);
                        let delay = options.ready_after;
                        actions.spawn(async move {
                            tokio::time::sleep(delay).await;
                            match set_pod_running_ready(&client, &namespace, &name, &ip).await {
                                Ok(_) => Outcome::Done,
                                Err(e) => {
                                    tracing::warn!(error = %format!("{e:#}"), "simulated kubelet");
                                    Outcome::StartFailed(uid)
                                }
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// `discovery.k8s.io/v1beta1` EndpointSlice, the only version a v1.20 server serves (k8s-openapi
/// only has v1). Use with `Api<DynamicObject>`.
pub fn endpointslice_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", "v1beta1", "EndpointSlice"),
        "endpointslices",
    )
}

/// `policy/v1beta1` PodDisruptionBudget, the only version a v1.20 server serves. Use with
/// `Api<DynamicObject>`.
pub fn pdb_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget"),
        "poddisruptionbudgets",
    )
}

/// One address of an endpoint in a Service's EndpointSlices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: String,
    /// `conditions.ready`; absent means ready, per the API.
    pub ready: bool,
    /// Name of the pod behind the endpoint, if any.
    pub pod: Option<String>,
}

/// Every endpoint address of one EndpointSlice, in its order.
pub fn slice_endpoints(slice: &DynamicObject) -> Vec<SliceEndpoint> {
    let mut found = Vec::new();
    let Some(endpoints) = slice.data.get("endpoints").and_then(Value::as_array) else {
        return found;
    };
    for endpoint in endpoints {
        let ready = endpoint
            .pointer("/conditions/ready")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let pod = endpoint
            .pointer("/targetRef/name")
            .and_then(Value::as_str)
            .map(str::to_string);
        let addresses = endpoint
            .get("addresses")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for address in addresses.iter().filter_map(Value::as_str) {
            found.push(SliceEndpoint {
                address: address.to_string(),
                ready,
                pod: pod.clone(),
            });
        }
    }
    found
}

/// Every endpoint address in the EndpointSlices of Service `namespace/service`, sorted.
pub async fn endpointslice_endpoints(
    client: &Client,
    namespace: &str,
    service: &str,
) -> Result<Vec<SliceEndpoint>> {
    let slices: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &endpointslice_resource());
    let list = slices
        .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}")))
        .await
        .with_context(|| format!("listing EndpointSlices of {namespace}/{service}"))?;
    let mut found: Vec<SliceEndpoint> = list.iter().flat_map(slice_endpoints).collect();
    found.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(found)
}

/// The ready endpoint addresses of Service `namespace/service`, sorted and deduplicated: what a
/// client of the Service would be routed to.
pub async fn endpointslice_addresses(
    client: &Client,
    namespace: &str,
    service: &str,
) -> Result<Vec<String>> {
    let mut addresses: Vec<String> = endpointslice_endpoints(client, namespace, service)
        .await?
        .into_iter()
        .filter(|e| e.ready)
        .map(|e| e.address)
        .collect();
    addresses.dedup();
    Ok(addresses)
}
