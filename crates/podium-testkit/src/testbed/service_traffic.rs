//! The chart and the examples on a [`RealNode`], and a client of the leader Service: what the
//! end-to-end suite (`crates/podium/tests/real_node.rs`) and `podium-bench --real-node` both
//! do, so that both time failovers the same way.
//!
//! Everything returns errors rather than panicking: the test turns them into panics, the bench
//! into a report line.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use podium_core::crd::ROLE_LABEL;
use serde_yaml::Value;

use super::node::{APP_IMAGE, IMAGE_TAG, OPERATOR_IMAGE_REPOSITORY, RealNode, http_get};
use crate::observe::lease_holder;
use crate::wait::poll;

/// The Helm release, and its namespace.
pub const RELEASE: &str = "podium";
pub const OPERATOR_NAMESPACE: &str = "podium-system";
/// The operator's own Lease (the chart's leader election).
pub const OPERATOR_LEASE: &str = "podium-operator";
/// From examples/: the ElectionGroup (its Lease has the same name), the app's `app` label, the
/// Service that routes to the leader.
pub const GROUP: &str = "web";
pub const SERVICE: &str = "web-leader";
/// The examples' Deployment replicas.
pub const REPLICAS: usize = 4;
/// Where the app image listens in the pod (`/`, `/healthz`, `/cgi-bin/{fail,heal,labels}`).
pub const APP_PORT: u16 = 8080;
/// The client's timeout per request: a request routed to a pod that is gone hangs until then,
/// so it bounds how late the client can notice the new leader.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The client's pause between requests.
pub const REQUEST_PAUSE: Duration = Duration::from_millis(10);
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The chart as a user installs it on v1.20 with Helm 4 (`--server-side=false`, see the README),
/// with the locally built image: two replicas, the chart's ServiceAccount, RBAC, probes and
/// PodDisruptionBudget, all defaults.
pub fn helm_install(node: &RealNode) -> Result<()> {
    let chart = crate::repo_root().join("charts/podium");
    let repository = format!("image.repository={OPERATOR_IMAGE_REPOSITORY}");
    let tag = format!("image.tag={IMAGE_TAG}");
    node.helm(&[
        "install",
        RELEASE,
        &super::path_str(&chart)?,
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--server-side=false",
        "--set",
        &repository,
        "--set",
        &tag,
        // The image exists only in the node's containerd.
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "logFormat=text",
        "--wait",
        "--timeout",
        "5m",
    ])?;
    Ok(())
}

/// examples/ as a user applies them, with the web Deployment running the app image instead of
/// agnhost (no registry here): it answers `GET /` with its pod name, has a probe endpoint a
/// client can make fail, and mounts its labels through the Downward API.
pub fn apply_examples(node: &RealNode, ns: &str) -> Result<()> {
    let examples = crate::repo_root().join("examples");
    for file in ["electiongroup.yaml", "service.yaml"] {
        let path = super::path_str(&examples.join(file))?;
        node.kubectl(&["-n", ns, "apply", "-f", &path])?;
    }
    let text = std::fs::read_to_string(examples.join("deployment.yaml"))
        .context("reading examples/deployment.yaml")?;
    let mut deployment: Value =
        serde_yaml::from_str(&text).context("parsing examples/deployment.yaml")?;
    let spec = &mut deployment["spec"]["template"]["spec"];
    let container = &mut spec["containers"][0];
    container["image"] = APP_IMAGE.into();
    container["imagePullPolicy"] = "Never".into();
    if let Value::Mapping(map) = container {
        map.remove("args");
    }
    container["env"] = serde_yaml::from_str(
        r#"
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        # A stop that takes a moment, like a real server draining.
        - {name: STOP_DELAY, value: "1"}
        "#,
    )?;
    container["readinessProbe"] = serde_yaml::from_str(
        "{httpGet: {path: /healthz, port: http}, periodSeconds: 1, failureThreshold: 1}",
    )?;
    container["volumeMounts"] = serde_yaml::from_str("[{name: podinfo, mountPath: /etc/podinfo}]")?;
    spec["volumes"] = serde_yaml::from_str(
        "[{name: podinfo, downwardAPI: {items: [{path: labels, fieldRef: {fieldPath: metadata.labels}}]}}]",
    )?;
    let manifest = serde_yaml::to_string(&deployment)?;
    node.kubectl_stdin(&["-n", ns, "apply", "-f", "-"], &manifest)?;
    Ok(())
}

/// The holder of the operator's Lease once it names an existing operator pod other than `not`.
pub async fn wait_operator_leader(
    client: &Client,
    not: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    poll(
        timeout,
        POLL_EVERY,
        "an operator replica holding its Lease",
        async || {
            let Some(lease) = leases.get_opt(OPERATOR_LEASE).await? else {
                return Ok(None);
            };
            let Some(holder) = lease_holder(&lease).0.filter(|h| Some(h.as_str()) != not) else {
                return Ok(None);
            };
            Ok(pods.get_opt(&holder).await?.map(|_| holder))
        },
    )
    .await
}

/// The leader Service's ClusterIP.
pub async fn cluster_ip(client: &Client, ns: &str) -> Result<IpAddr> {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let service = services
        .get(SERVICE)
        .await
        .with_context(|| format!("getting Service {ns}/{SERVICE}"))?;
    let ip = service
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow!("Service {ns}/{SERVICE} has no ClusterIP"))?;
    ip.parse()
        .with_context(|| format!("the ClusterIP {ip:?} of {ns}/{SERVICE}"))
}

/// Waits until exactly one pod is labelled leader, is not `not`, and answers through the
/// Service at `ip`; returns its name.
pub async fn wait_service_leader(
    pods: &Api<Pod>,
    ip: IpAddr,
    not: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let leaders = ListParams::default().labels(&format!("{ROLE_LABEL}=leader"));
    poll(
        timeout,
        POLL_EVERY,
        "one leader answering through the Service",
        async || {
            let list = pods.list(&leaders).await?;
            let [leader] = &list.items[..] else {
                return Ok(None);
            };
            let name = leader.name_any();
            if Some(name.as_str()) == not {
                return Ok(None);
            }
            // Not answering yet is a reason to wait, not an error.
            let Ok((_, body)) = http_get(SocketAddr::new(ip, 80), "/", REQUEST_TIMEOUT).await
            else {
                return Ok(None);
            };
            Ok((body.trim() == name).then_some(name))
        },
    )
    .await
}

/// The app's port on a pod IP as the API reports it.
pub fn app_addr(pod_ip: &str) -> Result<SocketAddr> {
    let ip: IpAddr = pod_ip
        .parse()
        .with_context(|| format!("pod IP {pod_ip:?}"))?;
    Ok(SocketAddr::new(ip, APP_PORT))
}

/// `GET path` on the app in the pod at `pod_ip`, which must answer 200 (`/cgi-bin/fail` makes
/// its readiness probe fail, `/cgi-bin/heal` pass again).
pub async fn app_call(pod_ip: &str, path: &str) -> Result<String> {
    let (status, body) = http_get(app_addr(pod_ip)?, path, Duration::from_secs(2))
        .await
        .with_context(|| format!("GET {path} on {pod_ip}"))?;
    if status != 200 {
        return Err(anyhow!("GET {path} on {pod_ip} answered {status}: {body}"));
    }
    Ok(body)
}

/// How long after `since` the Downward API labels file in the pod at `pod_ip` said it leads
/// (read through the app, every 20 ms).
pub async fn downward_leader_seen(
    pod_ip: &str,
    since: Instant,
    timeout: Duration,
) -> Result<Duration> {
    let addr = app_addr(pod_ip)?;
    let leader = format!("{ROLE_LABEL}=\"leader\"");
    poll(
        timeout,
        POLL_EVERY,
        "role=leader in the Downward API labels file",
        async || {
            let (_, labels) = http_get(addr, "/cgi-bin/labels", Duration::from_secs(1)).await?;
            Ok(labels.contains(&leader).then(|| since.elapsed()))
        },
    )
    .await
}

/// One answer: when the request started, and the pod that answered (`None`: it failed).
pub type Answer = (Instant, Option<String>);

/// A client looping on the leader Service's ClusterIP, one connection per request, as a user's
/// client would retry. Stops when dropped.
pub struct Traffic {
    answers: Arc<Mutex<Vec<Answer>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the client saw when `old` stopped leading: times are from the trigger to the start of
/// the request in question.
#[derive(Clone, Debug)]
pub struct ClientFailover {
    pub old: String,
    /// The first pod other than `old` to answer.
    pub new: String,
    pub first_new: Duration,
    /// The old leader's last answer before the new one's first (`None`: none after the trigger).
    pub last_old: Option<Duration>,
    /// Requests that failed between the trigger and the new leader's first answer, and after it.
    pub failed_before: usize,
    pub failed_after: usize,
    /// Answers from neither `old` nor `new`: must never happen.
    pub third: Vec<String>,
    /// Answers from `old` after `new` answered: must never happen.
    pub old_after_new: usize,
}

impl ClientFailover {
    /// One line for a log: `<what>: old -> new; ...`.
    pub fn describe(&self, what: &str) -> String {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        format!(
            "{what}: {} -> {}; first answer from the new leader {} after; old leader's last \
             answer {}; {} requests failed in between ({} after); answers from a third pod: \
             {}; from the old leader after the new one answered: {}",
            self.old,
            self.new,
            ms(self.first_new),
            self.last_old
                .map_or("none after the action".to_string(), ms),
            self.failed_before,
            self.failed_after,
            self.third.len(),
            self.old_after_new,
        )
    }
}

impl Traffic {
    /// Starts looping on port 80 of `ip` (a tokio runtime must be running).
    pub fn start(ip: IpAddr) -> Traffic {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let record = answers.clone();
        let task = tokio::spawn(async move {
            loop {
                let at = Instant::now();
                let answer = match http_get(SocketAddr::new(ip, 80), "/", REQUEST_TIMEOUT).await {
                    Ok((200, body)) => Some(body.trim().to_string()),
                    _ => None,
                };
                lock(&record).push((at, answer));
                tokio::time::sleep(REQUEST_PAUSE).await;
            }
        });
        Traffic { answers, task }
    }

    /// The answers to requests started at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Answer> {
        lock(&self.answers)
            .iter()
            .filter(|(at, _)| *at >= since)
            .cloned()
            .collect()
    }

    /// Waits for the first pod other than `old` to answer a request started after `since`.
    pub async fn wait_other_than(
        &self,
        old: &str,
        since: Instant,
        timeout: Duration,
    ) -> Result<String> {
        poll(
            timeout,
            POLL_EVERY,
            "an answer from a new leader",
            async || {
                Ok(self
                    .since(since)
                    .into_iter()
                    .find_map(|(_, a)| a.filter(|pod| pod != old)))
            },
        )
        .await
    }

    /// What the client saw from `since` until now when `old` stopped leading; an error if no
    /// other pod has answered yet.
    pub fn failover(&self, old: &str, since: Instant) -> Result<ClientFailover> {
        let answers = self.since(since);
        let first = answers
            .iter()
            .position(|(_, a)| a.as_deref().is_some_and(|pod| pod != old))
            .ok_or_else(|| anyhow!("no pod other than {old} answered through the Service"))?;
        let (first_at, first_pod) = &answers[first];
        let new = first_pod.clone().unwrap_or_default();
        let (before, after) = answers.split_at(first);
        let failed = |answers: &[Answer]| answers.iter().filter(|(_, a)| a.is_none()).count();
        Ok(ClientFailover {
            old: old.to_string(),
            first_new: first_at.duration_since(since),
            last_old: before
                .iter()
                .rev()
                .find(|(_, a)| a.as_deref() == Some(old))
                .map(|(at, _)| at.duration_since(since)),
            failed_before: failed(before),
            failed_after: failed(after),
            third: answers
                .iter()
                .filter_map(|(_, a)| a.clone())
                .filter(|pod| pod != old && *pod != new)
                .collect(),
            old_after_new: after
                .iter()
                .filter(|(_, a)| a.as_deref() == Some(old))
                .count(),
            new,
        })
    }

    /// Forgets the answers to requests started before `before`, so that a long run's history
    /// does not grow without bound.
    pub fn forget_before(&self, before: Instant) {
        lock(&self.answers).retain(|(at, _)| *at >= before);
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answers survive a panic elsewhere: the recording task only pushes.
fn lock(answers: &Mutex<Vec<Answer>>) -> MutexGuard<'_, Vec<Answer>> {
    answers.lock().unwrap_or_else(|e| e.into_inner())
}
