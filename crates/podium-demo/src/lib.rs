//! `podium-demo`: Podium's main job on a throwaway local control plane, told like the classic
//! etcd leader-election demo.
//!
//! It starts a real control plane ([`podium_testkit::testbed`]: etcd, kube-apiserver,
//! kube-controller-manager) with a simulated kubelet, runs the operator in-process, deploys four
//! "servers", a Service that routes to the leader only and an ElectionGroup, then kills the
//! leader twice and makes the third one NotReady, timing each failover from the client's side:
//! until the new leader label is visible, and until the Service's EndpointSlice lists only the
//! new leader. Everything is torn down at the end or on Ctrl-C, unless `--keep` asks to leave it
//! running for `kubectl`.
//!
//! [`run`] is what `podium-demo` (and `scripts/demo.sh`) calls; [`run_with`] writes to any writer and stops on any
//! future, for tests.

use std::fmt::Display;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use podium::operator::{Operator, OperatorConfig};
use podium::telemetry::{self, LogFormat};
use podium_core::crd::{EPOCH_ANNOTATION, ElectionGroup, ROLE_LABEL, ROLE_LEADER};
use podium_testkit::fixture;
use podium_testkit::pod::{is_ready, is_serving, pod_ip};
use podium_testkit::testbed::kubelet::{
    Kubelet, KubeletOptions, SliceEndpoint, endpointslice_endpoints, set_pod_not_ready,
};
use podium_testkit::testbed::{self, Testbed};
use podium_testkit::wait::poll;

mod workers;

/// Namespace the demo works in.
pub const NAMESPACE: &str = "demo";
/// The `app` label of the Deployment's pods, and the Deployment's name.
pub const APP: &str = "web";
/// Name of the ElectionGroup (and so of its Lease).
pub const GROUP_NAME: &str = "web";
/// The Service that selects the leader only.
pub const SERVICE: &str = "web-leader";
/// Pods in the Deployment.
pub const REPLICAS: usize = 4;
/// The ElectionGroup's `leaseDurationSeconds`.
pub const LEASE_SECONDS: i32 = 15;

const NODE: &str = "node-1";
/// How often the demo looks at labels and EndpointSlices while it times a failover.
const POLL: Duration = Duration::from_millis(5);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
const OPERATOR_SYNC_TIMEOUT: Duration = Duration::from_secs(20);

/// `podium demo` flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DemoArgs {
    /// At the end, leave the control plane and the operator running (and print how to reach
    /// them with kubectl) until Ctrl-C.
    #[arg(long)]
    pub keep: bool,

    /// Plain output [default: colour when stdout is a terminal and NO_COLOR is unset].
    #[arg(long)]
    pub no_color: bool,
}

/// What made the leader lose the Lease in a [`Failover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The leader pod was deleted (`kubectl delete pod`).
    PodDeleted,
    /// The leader's readiness probe failed: Running, but Ready=False.
    PodNotReady,
}

impl Cause {
    fn describe(self) -> &'static str {
        match self {
            Cause::PodDeleted => "leader pod deleted",
            Cause::PodNotReady => "leader NotReady",
        }
    }
}

/// One failover as the demo timed it, from its own API calls.
#[derive(Clone, Debug)]
pub struct Failover {
    pub cause: Cause,
    pub old_leader: String,
    pub new_leader: String,
    pub new_leader_ip: String,
    /// The new leader's `podium.dev/epoch`.
    pub epoch: i32,
    /// From the delete (or readiness) write to exactly one pod, the new one, labelled leader.
    pub label_after: Duration,
    /// From the same write to the Service's EndpointSlices listing only the new leader.
    pub service_after: Duration,
}

/// What a demo run did.
#[derive(Clone, Debug, Default)]
pub struct DemoReport {
    /// The first leader elected, and how long after the ElectionGroup was created.
    pub first_leader: Option<(String, Duration)>,
    pub failovers: Vec<Failover>,
    /// `podium_failover_seconds` as the operator measured it: (count, sum in seconds).
    pub operator_failover_seconds: Option<(u64, f64)>,
    /// The control plane's temporary directory (gone once the demo returns, unless
    /// `PODIUM_KEEP_TESTBED` is set). Every control-plane process has it in its command line.
    pub testbed_dir: Option<PathBuf>,
    /// The workers' takeovers, timed from the trigger to the new leader's command starting.
    pub takeovers: Vec<workers::Takeover>,
    /// The run was stopped by the interrupt before it finished.
    pub interrupted: bool,
}

/// Whether `podium demo` colours its output: not with `--no-color`, not when `NO_COLOR` is set
/// to anything, and only when stdout is a terminal.
pub fn color_wanted(args: &DemoArgs) -> bool {
    !args.no_color
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::io::stdout().is_terminal()
}

/// `podium demo`: the demo on stdout, stopped (and cleaned up) by Ctrl-C or SIGTERM.
pub async fn run(args: DemoArgs) -> Result<()> {
    let color = color_wanted(&args);
    let report = run_with(&args, std::io::stdout(), color, shutdown_signal()).await?;
    if report.interrupted {
        return Err(anyhow!(
            "interrupted; the control plane and the operator were stopped"
        ));
    }
    Ok(())
}

/// The demo, written to `out` (with ANSI colours if `color`). When `interrupt` completes,
/// whatever is running stops and everything is cleaned up; the report then says `interrupted`.
/// With `args.keep`, after the demo the control plane keeps running until `interrupt`.
///
/// Every process started is stopped and the temporary directory removed before this returns,
/// on success, on error and on interrupt.
pub async fn run_with<W: Write>(
    args: &DemoArgs,
    out: W,
    color: bool,
    interrupt: impl Future<Output = ()>,
) -> Result<DemoReport> {
    let mut ui = Ui::new(out, color);
    let mut session: Option<Session> = None;
    let mut report = DemoReport::default();
    let mut interrupt = std::pin::pin!(interrupt);

    let finished = tokio::select! {
        result = script(args, &mut ui, &mut session, &mut report) => Some(result),
        () = &mut interrupt => None,
    };
    let outcome = match finished {
        None => {
            report.interrupted = true;
            let _ = ui.blank();
            let _ = ui.warn("interrupted: stopping everything");
            Ok(())
        }
        Some(Err(e)) => Err(e),
        Some(Ok(())) => match (&session, args.keep) {
            (Some(s), true) => {
                let kept = keep_running(&mut ui, s, &report);
                match kept {
                    Ok(()) => {
                        interrupt.as_mut().await;
                        let _ = ui.blank();
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Ok(()),
        },
    };
    clean_up(&mut ui, session.take()).await;
    outcome.map(|()| report)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Everything that must be stopped at the end, in order: operator, kubelet, control plane.
struct Session {
    testbed: Testbed,
    /// The workers' `podium exec` processes (stopped when dropped).
    workers: Option<podium_testkit::leader_process::ProcessPods>,
    client: Client,
    kubectl: Option<PathBuf>,
    operator: Option<Operator>,
    kubelet: Option<Kubelet>,
    metrics_addr: Option<SocketAddr>,
    leader: Option<Leader>,
}

impl Session {
    /// The leader as of the last failover.
    fn leader(&self) -> Result<Leader> {
        self.leader
            .clone()
            .ok_or_else(|| anyhow!("lost track of the leader"))
    }
}

/// A leader as the demo saw it on its pod.
#[derive(Clone, Debug)]
struct Leader {
    name: String,
    ip: String,
    epoch: i32,
}

impl Leader {
    /// The new leader of `failover`.
    fn after(failover: &Failover) -> Leader {
        Leader {
            name: failover.new_leader.clone(),
            ip: failover.new_leader_ip.clone(),
            epoch: failover.epoch,
        }
    }

    fn of(pod: &Pod) -> Leader {
        Leader {
            name: pod.name_any(),
            ip: pod_ip(pod),
            epoch: pod
                .annotations()
                .get(EPOCH_ANNOTATION)
                .and_then(|e| e.parse().ok())
                .unwrap_or(0),
        }
    }
}

async fn script<W: Write>(
    args: &DemoArgs,
    ui: &mut Ui<W>,
    slot: &mut Option<Session>,
    report: &mut DemoReport,
) -> Result<()> {
    // ① The control plane, the CRD and the operator.
    ui.heading("Start the control plane")?;
    ui.explain(&[
        "A real Kubernetes control plane on loopback ports: etcd, kube-apiserver and",
        "kube-controller-manager. There is no kubelet: one simulated in this process binds",
        "pods to a node and reports them Running and Ready, as a kubelet would.",
    ])?;
    ui.item("starting etcd, kube-apiserver, kube-controller-manager ...")?;
    let started = Instant::now();
    let testbed = with_progress(ui, started, Testbed::start())
        .await
        .context("cannot start the local control plane")?;
    report.testbed_dir = Some(testbed.dir().to_path_buf());
    // Only now: the testbed's readiness probes log every refused attempt as an error.
    telemetry::init(LogFormat::Text, "warn");
    let client = testbed.try_client()?;
    let version = client
        .apiserver_version()
        .await
        .map(|v| format!("Kubernetes {}", v.git_version))
        .unwrap_or_else(|_| "Kubernetes".to_string());
    ui.ok(format!(
        "control plane up in {:.1}s: {version} at {}",
        started.elapsed().as_secs_f64(),
        testbed.server_url()
    ))?;
    let kubectl = testbed::find_binary("kubectl").ok();
    let s = slot.insert(Session {
        testbed,
        client: client.clone(),
        kubectl,
        workers: None,
        operator: None,
        kubelet: None,
        metrics_addr: None,
        leader: None,
    });

    s.testbed.install_crd().await?;
    ui.ok("CRD electiongroups.podium.dev installed (short name: eg)")?;

    let metrics_addr = if args.keep { local_addr() } else { None };
    let operator = Operator::start(
        client.clone(),
        OperatorConfig {
            http_addr: metrics_addr,
            watch_namespace: Some(NAMESPACE.to_string()),
            election: None,
            // Signs the workers' role notifications (the last part of the demo).
            service_account: Some((
                NAMESPACE.to_string(),
                podium_testkit::leader_process::OPERATOR_ACCOUNT.to_string(),
            )),
        },
    )
    .await
    .context("cannot start the operator")?;
    let ready = operator.ready.clone();
    s.operator = Some(operator);
    s.metrics_addr = metrics_addr;
    poll(
        OPERATOR_SYNC_TIMEOUT,
        POLL,
        "the operator's caches to sync",
        async || Ok(ready.load(Ordering::Acquire).then_some(())),
    )
    .await?;
    ui.ok(format!(
        "operator running in this process, watching namespace {NAMESPACE} (logs: warnings only; \
         RUST_LOG=podium=info for more)"
    ))?;

    // ② The workload, its leader Service, and the ElectionGroup.
    ui.heading("Deploy four servers and elect one of them")?;
    ui.explain(&[
        "No sidecar, no client library: an ElectionGroup selects pods by label. Podium holds a",
        "Lease for the winner and labels it podium.dev/role=leader, the others follower. A",
        "Service that selects the leader label routes to the leader, and only to it.",
    ])?;
    create_namespace(&client).await?;
    s.kubelet = Some(
        Kubelet::start(
            &client,
            KubeletOptions::new(NODE)
                .namespace(NAMESPACE)
                .label_selector(format!("app={APP}")),
        )
        .await
        .context("cannot start the simulated kubelet")?,
    );
    ui.ok(format!(
        "namespace {NAMESPACE}, node {NODE} with a simulated kubelet"
    ))?;
    fixture::create_servers(&client, NAMESPACE, APP, REPLICAS as i32).await?;
    wait_ready_pods(&client, REPLICAS).await?;
    ui.ok(format!(
        "Deployment {APP}: {REPLICAS} pods (pause image) Running and Ready"
    ))?;
    fixture::create_leader_service(&client, NAMESPACE, APP).await?;
    ui.ok(format!(
        "Service {SERVICE}: selector app={APP}, {ROLE_LABEL}={ROLE_LEADER} (no endpoints yet)"
    ))?;
    let group = group_manifest();
    ui.item(format!(
        "ElectionGroup {GROUP_NAME} ({LEASE_SECONDS}s TTL):"
    ))?;
    ui.block(&serde_yaml::to_string(&group)?)?;
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), NAMESPACE);
    let created = Instant::now();
    groups
        .create(&PostParams::default(), &serde_json::from_value(group)?)
        .await
        .context("cannot create the ElectionGroup")?;
    let first = wait_leader_label(&client, None, created).await?;
    let leader = Leader::of(&first.0);
    report.first_leader = Some((leader.name.clone(), first.1));
    ui.ok(format!(
        "elected {} {} after the ElectionGroup was created (epoch {})",
        ui.bold(&leader.name),
        ui.time(first.1),
        leader.epoch
    ))?;

    // ③ The state of the election, from every angle.
    ui.heading("Who leads")?;
    ui.explain(&[
        "Lease demo/web names the holder; the operator renews it every TTL/2 for as long as",
        "the leader stays eligible. Its leaseTransitions is the epoch: a fencing token the",
        "leader can hand to storage so that writes from an older leader are refused.",
    ])?;
    wait_service_is(&client, &leader.ip, Instant::now()).await?;
    wait_status_leader(&client, &leader.name).await?;
    let lease = lease_line(&client).await?;
    ui.item(format!(
        "leader {}  IP {}  epoch {}",
        ui.bold(&leader.name),
        leader.ip,
        leader.epoch
    ))?;
    ui.item(lease)?;
    show_groups(ui, s).await?;
    show_pods(ui, s).await?;
    show_service(ui, &client).await?;
    s.leader = Some(leader);

    // ④ ⑤ Two failovers by deleting the leader.
    for (n, title) in [(1, "Failover: delete the leader"), (2, "Failover again")] {
        ui.heading(title)?;
        if n == 1 {
            ui.explain(&[
                "A deleted pod is Terminating and so ineligible at once; Podium does not wait",
                "for the Lease to expire. It moves the Lease to the next pod first (epoch + 1),",
                "takes the leader label off the old pod, and only then labels the new leader:",
                "break before make, so two pods never carry the label at the same time.",
            ])?;
        } else {
            ui.explain(&[
                "Once more, from the new leader. The Deployment has replaced the deleted pod;",
                "the newcomer joined as a follower.",
            ])?;
        }
        let old = s.leader()?;
        ui.command(&format!("kubectl delete pod -n {NAMESPACE} {}", old.name))?;
        let failover = fail_over(&client, &old, Cause::PodDeleted).await?;
        print_failover(ui, &old, &failover)?;
        s.leader = Some(Leader::after(&failover));
        report.failovers.push(failover);
        wait_ready_pods(&client, REPLICAS).await?;
        ui.ok(format!(
            "the Deployment replaced {}: {REPLICAS}/{REPLICAS} pods Ready again",
            old.name
        ))?;
    }

    // ⑥ The leader fails its readiness probe.
    ui.heading("Failover: the leader turns NotReady")?;
    ui.explain(&[
        "A failing readiness probe: the kubelet reports the leader's containers not ready. The",
        "pod keeps running, but a NotReady pod may not lead: the same handover follows, and the",
        "old leader stays in the group as a follower.",
    ])?;
    let old = s.leader()?;
    ui.command(&format!(
        "# the kubelet reports {}: Ready=False (readiness probe failing)",
        old.name
    ))?;
    let failover = fail_over(&client, &old, Cause::PodNotReady).await?;
    print_failover(ui, &old, &failover)?;
    s.leader = Some(Leader::after(&failover));
    report.failovers.push(failover);

    // ⑦ Real processes: leader-only work that never overlaps.
    ui.heading("Your app and its role: real processes take over")?;
    ui.explain(&[
        "Four workers, each a real `podium exec` process listening on its pod's own loopback IP.",
        "Podium pushes every pod its role, signed with its ServiceAccount's token; podium exec runs",
        "its command only while its pod leads, and a new leader's command starts only once the",
        "old one has stopped (or its pod is gone, or its term has run out).",
    ])?;
    let workers_dir = s.testbed.dir().join("workers");
    std::fs::create_dir_all(&workers_dir)?;
    let mut workers = podium_testkit::leader_process::ProcessPods::new(
        &client,
        NAMESPACE,
        workers::WORKER_APP,
        &workers::podium_binary()?,
        s.testbed.kubeconfig_path(),
        &workers_dir,
    )
    .await?;
    let takeovers = workers::story(ui, &client, &mut workers).await;
    s.workers = Some(workers);
    report.takeovers = takeovers?;

    // ⑧ Summary.
    ui.heading("Where things stand")?;
    if let Some(leader) = &s.leader {
        wait_status_leader(&client, &leader.name).await?;
    }
    show_groups(ui, s).await?;
    show_pods(ui, s).await?;
    ui.item("failovers, timed by this demo from its own write (polling every 5 ms):")?;
    let mut rows = vec![vec![
        "CAUSE".to_string(),
        "OLD LEADER".to_string(),
        "NEW LEADER".to_string(),
        "EPOCH".to_string(),
        "LABEL MOVED".to_string(),
        "SERVICE MOVED".to_string(),
    ]];
    for f in &report.failovers {
        rows.push(vec![
            f.cause.describe().to_string(),
            f.old_leader.clone(),
            f.new_leader.clone(),
            f.epoch.to_string(),
            ms(f.label_after),
            ms(f.service_after),
        ]);
    }
    ui.block(&table(&rows))?;
    ui.item("worker takeovers, from the trigger to the new leader's command starting:")?;
    let mut rows = vec![vec![
        "TRIGGER".to_string(),
        "OLD LEADER".to_string(),
        "NEW LEADER".to_string(),
        "EPOCH".to_string(),
        "COMMAND STARTED".to_string(),
    ]];
    for t in &report.takeovers {
        rows.push(vec![
            t.how.to_string(),
            t.old.clone(),
            t.new.clone(),
            t.epoch.to_string(),
            ms(t.after),
        ]);
    }
    ui.block(&table(&rows))?;
    if let Some(operator) = &s.operator {
        let text = operator.metrics.encode();
        let count = sample::<u64>(&text, "podium_failover_seconds_count");
        let sum = sample::<f64>(&text, "podium_failover_seconds_sum");
        if let (Some(count), Some(sum)) = (count, sum) {
            report.operator_failover_seconds = Some((count, sum));
            let mean = if count > 0 {
                Duration::from_secs_f64(sum / count as f64)
            } else {
                Duration::ZERO
            };
            ui.item(format!(
                "podium_failover_seconds: count {count}, sum {sum:.3}s, mean {}",
                ui.time(mean)
            ))?;
            ui.explain(&[
                "  (the operator's own measure: from seeing the old leader ineligible to the",
                "  new leader label acknowledged by the API server)",
            ])?;
        }
    }
    Ok(())
}

/// Awaits `fut`, printing the elapsed time every couple of seconds.
async fn with_progress<W: Write, T>(
    ui: &mut Ui<W>,
    started: Instant,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let mut fut = std::pin::pin!(fut);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            result = &mut fut => return result,
            _ = tick.tick() => {
                ui.item(format!("still starting, {:.0}s so far", started.elapsed().as_secs_f64()))?;
            }
        }
    }
}

/// An address for the operator's /metrics in `--keep` mode: a port that was free a moment ago.
fn local_addr() -> Option<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .ok()
}

fn group_manifest() -> Value {
    let mut group = fixture::group_manifest(
        GROUP_NAME,
        json!({
            "selector": { "matchLabels": { "app": APP } },
            "leaseDurationSeconds": LEASE_SECONDS,
        }),
    );
    group["metadata"]["namespace"] = NAMESPACE.into();
    group
}

async fn create_namespace(client: &Client) -> Result<()> {
    let namespace: Namespace =
        serde_json::from_value(json!({ "metadata": { "name": NAMESPACE } }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("cannot create namespace {NAMESPACE}"))?;
    Ok(())
}

fn pods_api(client: &Client) -> Api<Pod> {
    Api::namespaced(client.clone(), NAMESPACE)
}

async fn wait_ready_pods(client: &Client, n: usize) -> Result<()> {
    let pods = pods_api(client);
    let selector = ListParams::default().labels(&format!("app={APP}"));
    poll(
        READY_TIMEOUT,
        POLL,
        &format!("{n} Ready pods of Deployment {APP}"),
        async || {
            let list = pods.list(&selector).await?;
            Ok((list.iter().filter(|p| is_serving(p)).count() == n).then_some(()))
        },
    )
    .await
}

/// Waits until exactly one pod is labelled leader and it is not `old`; returns it and the time
/// since `since`.
async fn wait_leader_label(
    client: &Client,
    old: Option<&str>,
    since: Instant,
) -> Result<(Pod, Duration)> {
    let pods = pods_api(client);
    let selector = ListParams::default().labels(&format!("{ROLE_LABEL}={ROLE_LEADER}"));
    let what = match old {
        Some(old) => format!("a pod other than {old} to carry {ROLE_LABEL}={ROLE_LEADER}"),
        None => format!("a pod to carry {ROLE_LABEL}={ROLE_LEADER}"),
    };
    poll(FAILOVER_TIMEOUT, POLL, &what, async || {
        let list = pods.list(&selector).await?;
        Ok(match list.items.as_slice() {
            [only] if Some(only.name_any().as_str()) != old => {
                Some((only.clone(), since.elapsed()))
            }
            _ => None,
        })
    })
    .await
}

fn ready_endpoints(endpoints: Vec<SliceEndpoint>) -> Vec<SliceEndpoint> {
    let mut ready: Vec<SliceEndpoint> = endpoints.into_iter().filter(|e| e.ready).collect();
    ready.dedup_by(|a, b| a.address == b.address);
    ready
}

/// Waits until the Service routes to exactly one address, one that `wanted` accepts; returns it
/// and the time since `since`.
async fn wait_service_routes(
    client: &Client,
    since: Instant,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<(String, Duration)> {
    poll(FAILOVER_TIMEOUT, POLL, what, async || {
        let ready = ready_endpoints(endpointslice_endpoints(client, NAMESPACE, SERVICE).await?);
        Ok(match ready.as_slice() {
            [only] if wanted(&only.address) => Some((only.address.clone(), since.elapsed())),
            _ => None,
        })
    })
    .await
}

/// Waits until the Service routes to exactly one address and it is not `old_ip`.
async fn wait_service_moves(
    client: &Client,
    old_ip: &str,
    since: Instant,
) -> Result<(String, Duration)> {
    let what = format!("Service {SERVICE} to route to one pod other than {old_ip}");
    wait_service_routes(client, since, &what, |a| a != old_ip).await
}

/// Waits until the Service routes to `ip` and only to it.
async fn wait_service_is(client: &Client, ip: &str, since: Instant) -> Result<Duration> {
    let what = format!("Service {SERVICE} to route to {ip} only");
    let (_, after) = wait_service_routes(client, since, &what, |a| a == ip).await?;
    Ok(after)
}

async fn wait_status_leader(client: &Client, leader: &str) -> Result<()> {
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), NAMESPACE);
    poll(
        FAILOVER_TIMEOUT,
        POLL,
        &format!("ElectionGroup {GROUP_NAME} to report {leader} as leader"),
        async || {
            let group = groups.get(GROUP_NAME).await?;
            let status = group.status.unwrap_or_default();
            Ok((status.leader.as_deref() == Some(leader)).then_some(()))
        },
    )
    .await
}

/// Makes `old` lose the leadership by `cause` and times the handover from the client's side.
async fn fail_over(client: &Client, old: &Leader, cause: Cause) -> Result<Failover> {
    let started = Instant::now();
    match cause {
        Cause::PodDeleted => {
            pods_api(client)
                .delete(&old.name, &DeleteParams::default())
                .await
                .with_context(|| format!("cannot delete pod {}", old.name))?;
        }
        Cause::PodNotReady => {
            set_pod_not_ready(client, NAMESPACE, &old.name).await?;
        }
    }
    let (label, service) = tokio::join!(
        wait_leader_label(client, Some(&old.name), started),
        wait_service_moves(client, &old.ip, started)
    );
    let (pod, mut label_after) = label?;
    let (address, mut service_after) = service?;
    let new = Leader::of(&pod);
    if address != new.ip {
        // The Service briefly routed to someone else (not expected); time it to the new leader.
        service_after = wait_service_is(client, &new.ip, started).await?;
    }
    // Each time is when a poll saw the change, so an upper bound. The Service selects on the
    // label, so seeing it route to the new leader also proves the label was there by then.
    label_after = label_after.min(service_after);
    Ok(Failover {
        cause,
        old_leader: old.name.clone(),
        new_leader: new.name,
        new_leader_ip: new.ip,
        epoch: new.epoch,
        label_after,
        service_after,
    })
}

fn print_failover<W: Write>(ui: &mut Ui<W>, old: &Leader, f: &Failover) -> Result<()> {
    ui.ok(format!(
        "new leader {} ({}), epoch {} -> {}",
        ui.bold(&f.new_leader),
        f.new_leader_ip,
        old.epoch,
        f.epoch
    ))?;
    ui.item(format!(
        "    leader label moved   {} after the {}",
        ui.time(f.label_after),
        trigger(f.cause)
    ))?;
    ui.item(format!(
        "    Service routes to it {} after the {}",
        ui.time(f.service_after),
        trigger(f.cause)
    ))
}

fn trigger(cause: Cause) -> &'static str {
    match cause {
        Cause::PodDeleted => "delete",
        Cause::PodNotReady => "readiness change",
    }
}

async fn lease_line(client: &Client) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let lease = leases
        .get(GROUP_NAME)
        .await
        .with_context(|| format!("cannot read Lease {NAMESPACE}/{GROUP_NAME}"))?;
    let spec = lease.spec.unwrap_or_default();
    Ok(format!(
        "Lease {NAMESPACE}/{GROUP_NAME}: holderIdentity={}, leaseTransitions={}, \
         leaseDurationSeconds={}",
        spec.holder_identity.unwrap_or_default(),
        spec.lease_transitions.unwrap_or(0),
        spec.lease_duration_seconds.unwrap_or(0)
    ))
}

/// Runs `kubectl <args>` against the testbed and returns its output, or why it could not.
async fn kubectl(s: &Session, args: &[&str]) -> std::result::Result<String, String> {
    let Some(bin) = &s.kubectl else {
        return Err("kubectl not found (scripts/install-deps.sh installs it)".to_string());
    };
    let output = tokio::process::Command::new(bin)
        .arg("--kubeconfig")
        .arg(s.testbed.kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `kubectl get electiongroups`, or the same columns from the API without kubectl.
async fn show_groups<W: Write>(ui: &mut Ui<W>, s: &Session) -> Result<()> {
    ui.command(&format!("kubectl get electiongroups -n {NAMESPACE}"))?;
    match kubectl(s, &["get", "electiongroups", "-n", NAMESPACE]).await {
        Ok(text) => ui.block(&text),
        Err(why) => {
            ui.warn(format!("{why}; the same columns from the API:"))?;
            let groups: Api<ElectionGroup> = Api::namespaced(s.client.clone(), NAMESPACE);
            let mut rows = vec![
                ["NAME", "LEADER", "EPOCH", "ELIGIBLE", "TTL", "AGE"]
                    .map(String::from)
                    .to_vec(),
            ];
            for g in groups.list(&ListParams::default()).await? {
                let status = g.status.clone().unwrap_or_default();
                rows.push(vec![
                    g.name_any(),
                    status.leader.unwrap_or_default(),
                    status.epoch.map(|e| e.to_string()).unwrap_or_default(),
                    status.eligible.unwrap_or_default(),
                    g.spec.lease_duration_seconds.to_string(),
                    age(g.metadata.creation_timestamp.as_ref()),
                ]);
            }
            ui.block(&table(&rows))
        }
    }
}

/// `kubectl get pods -L podium.dev/role`, or the same from the API without kubectl.
async fn show_pods<W: Write>(ui: &mut Ui<W>, s: &Session) -> Result<()> {
    ui.command(&format!("kubectl get pods -n {NAMESPACE} -L {ROLE_LABEL}"))?;
    match kubectl(s, &["get", "pods", "-n", NAMESPACE, "-L", ROLE_LABEL]).await {
        Ok(text) => ui.block(&text),
        Err(why) => {
            ui.warn(format!("{why}; the same columns from the API:"))?;
            let mut rows = vec![
                ["NAME", "READY", "STATUS", "AGE", "ROLE"]
                    .map(String::from)
                    .to_vec(),
            ];
            for p in pods_api(&s.client).list(&ListParams::default()).await? {
                let status = if p.metadata.deletion_timestamp.is_some() {
                    "Terminating".to_string()
                } else {
                    p.status
                        .as_ref()
                        .and_then(|st| st.phase.clone())
                        .unwrap_or_default()
                };
                rows.push(vec![
                    p.name_any(),
                    if is_ready(&p) { "1/1" } else { "0/1" }.to_string(),
                    status,
                    age(p.metadata.creation_timestamp.as_ref()),
                    p.labels().get(ROLE_LABEL).cloned().unwrap_or_default(),
                ]);
            }
            ui.block(&table(&rows))
        }
    }
}

/// Where Service `web-leader` routes: its EndpointSlice addresses, mapped back to pod names.
async fn show_service<W: Write>(ui: &mut Ui<W>, client: &Client) -> Result<()> {
    let pods = pods_api(client).list(&ListParams::default()).await?;
    let endpoints = ready_endpoints(endpointslice_endpoints(client, NAMESPACE, SERVICE).await?);
    let targets: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let pod = pods
                .items
                .iter()
                .find(|p| pod_ip(p) == e.address)
                .map(ResourceExt::name_any)
                .or_else(|| e.pod.clone())
                .unwrap_or_else(|| "?".to_string());
            format!("{pod} ({})", e.address)
        })
        .collect();
    ui.item(format!(
        "Service {SERVICE} routes to {}, per its EndpointSlice",
        if targets.is_empty() {
            "nothing".to_string()
        } else {
            targets.join(", ")
        }
    ))
}

/// The `--keep` epilogue: how to reach what keeps running.
fn keep_running<W: Write>(ui: &mut Ui<W>, s: &Session, report: &DemoReport) -> Result<()> {
    ui.heading("Keep running (--keep)")?;
    ui.explain(&[
        "The control plane, the simulated kubelet and the operator keep running. Try, in",
        "another terminal:",
    ])?;
    let mut lines = vec![format!(
        "export KUBECONFIG={}",
        s.testbed.kubeconfig_path().display()
    )];
    if let Some(dir) = s.kubectl.as_deref().and_then(Path::parent)
        && !on_path(dir)
    {
        lines.push(format!("export PATH=\"{}:$PATH\"", dir.display()));
    }
    let leader = s
        .leader
        .as_ref()
        .map(|l| l.name.clone())
        .or_else(|| report.failovers.last().map(|f| f.new_leader.clone()))
        .unwrap_or_else(|| "<leader>".to_string());
    lines.extend([
        format!("kubectl get eg -n {NAMESPACE} -w"),
        format!("kubectl get pods -n {NAMESPACE} -L {ROLE_LABEL} -w"),
        format!("kubectl delete pod -n {NAMESPACE} {leader}"),
        format!("kubectl describe eg -n {NAMESPACE} {GROUP_NAME}"),
    ]);
    if let Some(addr) = s.metrics_addr {
        lines.push(format!("curl -s http://{addr}/metrics | grep '^podium_'"));
    }
    ui.block(&lines.join("\n"))?;
    ui.item("Press Ctrl-C to stop everything and clean up.")
}

fn on_path(dir: &Path) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|p| p == dir))
}

/// Stops the operator, the kubelet and the control plane, in that order. Never fails: a
/// problem writing the output must not leave processes behind.
async fn clean_up<W: Write>(ui: &mut Ui<W>, session: Option<Session>) {
    let _ = ui.heading("Clean up");
    let Some(mut s) = session else {
        let _ = ui.ok("nothing was left running (a half-started control plane stops with it)");
        return;
    };
    if let Some(workers) = s.workers.take() {
        drop(workers);
        let _ = ui.ok("worker processes stopped");
    }
    if let Some(operator) = s.operator.take() {
        operator.stop().await;
        let _ = ui.ok("operator stopped");
    }
    drop(s.kubelet.take());
    let dir = s.testbed.dir().to_path_buf();
    drop(s.testbed);
    let _ = ui.ok(format!(
        "kube-controller-manager, kube-apiserver and etcd stopped; {} removed",
        dir.display()
    ));
}

/// A Prometheus sample without labels, e.g. `podium_failover_seconds_count`.
fn sample<T: FromStr>(text: &str, name: &str) -> Option<T> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn age(created: Option<&Time>) -> String {
    let Some(created) = created else {
        return "<unknown>".to_string();
    };
    let secs = jiff::Timestamp::now()
        .duration_since(created.0)
        .as_secs()
        .max(0);
    if secs < 120 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

/// Columns aligned as kubectl aligns them: padded to the widest cell plus three spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[c].saturating_sub(cell.chars().count()) + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const CIRCLED: [&str; 10] = ["①", "②", "③", "④", "⑤", "⑥", "⑦", "⑧", "⑨", "⑩"];

/// The demo's output: numbered headings, explanations, results, commands and their output.
struct Ui<W> {
    out: W,
    color: bool,
    step: usize,
}

impl<W: Write> Ui<W> {
    fn new(out: W, color: bool) -> Self {
        Ui {
            out,
            color,
            step: 0,
        }
    }

    fn paint(&self, style: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{style}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    fn time(&self, d: Duration) -> String {
        self.paint("1;35", &ms(d))
    }

    fn line(&mut self, text: impl Display) -> Result<()> {
        writeln!(self.out, "{text}")
            .and_then(|()| self.out.flush())
            .context("cannot write the demo's output")
    }

    fn blank(&mut self) -> Result<()> {
        self.line("")
    }

    fn heading(&mut self, title: &str) -> Result<()> {
        let number = CIRCLED.get(self.step).copied().unwrap_or("*");
        self.step += 1;
        let text = self.paint("1;36", &format!("{number} {title}"));
        self.blank()?;
        self.line(text)
    }

    fn explain(&mut self, lines: &[&str]) -> Result<()> {
        for line in lines {
            let text = self.paint("2", line);
            self.line(format!("  {text}"))?;
        }
        Ok(())
    }

    fn item(&mut self, text: impl Display) -> Result<()> {
        self.line(format!("  {text}"))
    }

    fn ok(&mut self, text: impl Display) -> Result<()> {
        let mark = self.paint("32", "✓");
        self.line(format!("  {mark} {text}"))
    }

    fn warn(&mut self, text: impl Display) -> Result<()> {
        let mark = self.paint("33", "!");
        self.line(format!("  {mark} {text}"))
    }

    fn command(&mut self, command: &str) -> Result<()> {
        let text = self.paint("1", &format!("$ {command}"));
        self.line(format!("  {text}"))
    }

    fn block(&mut self, text: &str) -> Result<()> {
        for line in text.trim_end().lines() {
            self.line(format!("    {line}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_like_kubectl() {
        let rows = vec![
            vec![
                "NAME".to_string(),
                "LEADER".to_string(),
                "EPOCH".to_string(),
            ],
            vec!["web".to_string(), "web-abc".to_string(), "2".to_string()],
        ];
        assert_eq!(table(&rows), "NAME   LEADER    EPOCH\nweb    web-abc   2");
    }

    #[test]
    fn samples_are_read_from_the_exposition() {
        let text = "# TYPE podium_failover_seconds histogram\n\
                    podium_failover_seconds_sum 0.0125\n\
                    podium_failover_seconds_count 3\n\
                    podium_failover_seconds_bucket{le=\"0.001\"} 0\n";
        assert_eq!(
            sample::<u64>(text, "podium_failover_seconds_count"),
            Some(3)
        );
        assert_eq!(
            sample::<f64>(text, "podium_failover_seconds_sum"),
            Some(0.0125)
        );
        assert_eq!(sample::<u64>(text, "podium_failover_seconds"), None);
    }

    #[test]
    fn plain_output_has_no_escape_codes() {
        let mut out = Vec::new();
        let mut ui = Ui::new(&mut out, false);
        ui.heading("Start").unwrap();
        ui.ok(format!("took {}", ui.time(Duration::from_millis(42))))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "\n① Start\n  ✓ took 42 ms\n");

        let mut out = Vec::new();
        let mut ui = Ui::new(&mut out, true);
        ui.heading("Start").unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\x1b["));
    }
}
