//! `podium-bench --real-node`: failover as a client of the leader Service sees it, on a real
//! node (kubelet, containerd, kube-proxy; [`RealNode`]), with the chart's in-cluster operator
//! built from the release `podium` binary next to this executable.
//!
//! Each round starts settled (4 Ready, labelled pods, one leader, the Service answering from
//! it), then either deletes the leader pod or makes its readiness probe really fail (the app's
//! `/cgi-bin/fail`; `/cgi-bin/heal` afterwards, so it rejoins as a follower). From that
//! trigger it times: the new leader's label in the harness's own pod watch (the row the others
//! are compared with), the first answer from the new leader through the Service's ClusterIP,
//! the old leader's last answer there, and the Downward API labels file in the new leader
//! showing `leader`; and it counts the client's failed requests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams};

use podium_testkit::observe::PodWatch;
use podium_testkit::testbed::node::{NODE_NAME, RealNode};
use podium_testkit::testbed::service_traffic::{
    ClientFailover, GROUP, REPLICAS, REQUEST_PAUSE, REQUEST_TIMEOUT, Traffic, app_call,
    apply_examples, cluster_ip, downward_leader_seen, helm_install, wait_operator_leader,
    wait_service_leader,
};

use super::procstat::{self, Machine};
use super::report::{load_row, one_line, ratio, title_and_machine};
use super::stats::{Summary, median, ms};
use super::{BenchArgs, BenchOutcome, PeakLoad, Progress, with_progress, write_report};

/// How long one step of a round may take before the round counts as failed.
const WAIT: Duration = Duration::from_secs(60);
/// Settling includes kubelet 1.20 deleting a deleted pod's object, at its next 10 s status sync.
const SETTLE: Duration = Duration::from_secs(120);
/// Consecutive failed rounds after which the node is taken to be broken.
const GIVE_UP_AFTER: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Trigger {
    Deleted,
    ProbeFails,
}

impl Trigger {
    fn describe(self) -> &'static str {
        match self {
            Trigger::Deleted => "leader pod deleted",
            Trigger::ProbeFails => "leader's readiness probe fails",
        }
    }
}

/// One trigger's samples, each from the trigger.
#[derive(Debug, Default)]
struct TriggerResults {
    label: Vec<Duration>,
    service: Vec<Duration>,
    last_old: Vec<Duration>,
    downward: Vec<Duration>,
    failed_before: Vec<u64>,
    failed_after: Vec<u64>,
    /// Rounds in which the old leader answered no request started after the trigger.
    no_old_answer: usize,
    third: usize,
    old_after_new: usize,
    /// Rounds in which the first pod to answer was not the one the label watch saw elected.
    other_than_labelled: usize,
    failures: Vec<String>,
}

impl TriggerResults {
    fn add(&mut self, round: &Round) {
        let c = &round.client;
        self.label.push(round.label);
        self.service.push(c.first_new);
        self.downward.push(round.downward);
        match c.last_old {
            Some(d) => self.last_old.push(d),
            None => self.no_old_answer += 1,
        }
        self.failed_before.push(c.failed_before as u64);
        self.failed_after.push(c.failed_after as u64);
        self.third += c.third.len();
        self.old_after_new += c.old_after_new;
        if c.new != round.labelled {
            self.other_than_labelled += 1;
        }
    }

    fn rounds(&self) -> usize {
        self.label.len()
    }
}

/// What one round measured.
struct Round {
    labelled: String,
    label: Duration,
    downward: Duration,
    client: ClientFailover,
}

/// What a round needs: the group's pods (API and the harness's watch), the Service's client.
struct Setup {
    pod_api: Api<Pod>,
    pods: PodWatch,
    service_ip: std::net::IpAddr,
    traffic: Traffic,
}

struct RealNodeReport {
    machine: Machine,
    started_at: jiff::Zoned,
    duration: Duration,
    load_end: String,
    load_peak: f64,
    apiserver_version: String,
    etcd_version: String,
    node_versions: String,
    source: String,
    operator_binary: PathBuf,
    rounds: usize,
    quick: bool,
    results: BTreeMap<Trigger, TriggerResults>,
    /// Why the run stopped early, if it did.
    error: Option<String>,
}

/// The release `podium` binary next to this executable: the operator image is built from it.
fn podium_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no directory", exe.display()))?;
    let podium = dir.join("podium");
    if !podium.is_file() {
        bail!(
            "{} not found: --real-node builds the operator image from the `podium` binary next \
             to podium-bench; run `cargo build --release -p podium` (with the same target \
             directory) first",
            podium.display()
        );
    }
    Ok(podium)
}

/// The whole real-node run: node, chart, examples, rounds, report.
pub async fn run(args: &BenchArgs) -> Result<BenchOutcome> {
    let rounds = args
        .real_node_rounds
        .unwrap_or(if args.quick { 3 } else { 20 });
    let operator_binary = podium_binary()?;
    let started_at = jiff::Zoned::now();
    let started = Instant::now();
    let machine = procstat::machine();
    let load = PeakLoad::start();

    let mut progress = Progress::new("real node");
    progress.say("starting the control plane and the node (needs root)".into());
    let node = with_progress(&mut progress, RealNode::start()).await?;
    let client = node.testbed().try_client()?;
    progress.say(format!(
        "building the operator image from {}",
        operator_binary.display()
    ));
    node.build_operator_image(&operator_binary)?;
    progress.say("helm install (waits for 2 Ready operator replicas)".into());
    blocking_with_progress("real node: helm install", || helm_install(&node)).await?;
    let operator = wait_operator_leader(&client, None, SETTLE).await?;
    progress.say(format!("operator leader {operator}; applying the examples"));
    let ns = node.testbed().create_namespace("bench-real-node").await?;
    apply_examples(&node, &ns)?;
    let pods = PodWatch::start(&client, &ns, Some(&format!("app={GROUP}")), GROUP);
    pods.wait(SETTLE, "4 Ready, labelled pods with one leader", |s| {
        s.synced && s.focus_settled(REPLICAS)
    })
    .await?;
    let service_ip = cluster_ip(&client, &ns).await?;
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    wait_service_leader(&pod_api, service_ip, None, SETTLE).await?;
    progress.done();

    let mut report = RealNodeReport {
        machine,
        started_at,
        duration: Duration::ZERO,
        load_end: String::new(),
        load_peak: 0.0,
        apiserver_version: client
            .apiserver_version()
            .await
            .map(|v| v.git_version)
            .unwrap_or_else(|e| format!("unknown ({e})")),
        etcd_version: super::etcd_version(),
        node_versions: node_versions(&client).await,
        source: super::git_source(),
        operator_binary,
        rounds,
        quick: args.quick,
        results: BTreeMap::new(),
        error: None,
    };
    let setup = Setup {
        pod_api,
        pods,
        service_ip,
        traffic: Traffic::start(service_ip),
    };
    for trigger in [Trigger::Deleted, Trigger::ProbeFails] {
        let mut progress = Progress::new(format!("real node ({})", trigger.describe()));
        let mut results = TriggerResults::default();
        let mut failed_in_a_row = 0;
        // Round 0 is not recorded: the first trigger of a kind finds its paths cold (the
        // Deployment's first replacement pod, the first probe failure), as in the failover
        // section.
        for round in 0..=rounds {
            match one_round(&setup, trigger).await {
                Ok(r) => {
                    failed_in_a_row = 0;
                    progress.say(format!(
                        "{round}/{rounds}{}: {} -> {}: label {}, first answer {}, Downward API {} ms; {} failed",
                        if round == 0 { " (warm-up)" } else { "" },
                        r.client.old,
                        r.labelled,
                        ms(r.label),
                        ms(r.client.first_new),
                        ms(r.downward),
                        r.client.failed_before
                    ));
                    if round > 0 {
                        results.add(&r);
                    }
                }
                Err(e) => {
                    failed_in_a_row += 1;
                    progress.say(format!("{round}/{rounds}: failed: {e:#}"));
                    results.failures.push(format!("round {round}: {e:#}"));
                }
            }
            if failed_in_a_row >= GIVE_UP_AFTER {
                report.error = Some(format!(
                    "{}: {GIVE_UP_AFTER} rounds in a row failed; stopped",
                    trigger.describe()
                ));
                break;
            }
        }
        progress.done();
        report.results.insert(trigger, results);
        if report.error.is_some() {
            break;
        }
    }
    setup.traffic.stop();

    report.duration = started.elapsed();
    report.load_end = procstat::load_average();
    report.load_peak = load.stop();
    let markdown = report.render();
    let path = write_report(&args.out, &report.started_at, "-real-node", &markdown)?;
    let mut failures: Vec<String> = report.error.iter().cloned().collect();
    for (trigger, r) in &report.results {
        failures.extend(
            r.failures
                .iter()
                .map(|f| format!("{}: {f}", trigger.describe())),
        );
    }
    drop(node);
    Ok(BenchOutcome {
        markdown,
        path,
        failures,
    })
}

/// One failover from a settled group. The group is settled again when it returns, also after
/// a failure where possible (a probe made to fail is healed whatever happened).
async fn one_round(setup: &Setup, trigger: Trigger) -> Result<Round> {
    let old = settle(setup).await?;
    let old_ip = setup
        .pods
        .now()
        .focus
        .get(&old)
        .and_then(|p| p.ip.clone())
        .ok_or_else(|| anyhow!("the leader {old} has no IP"))?;
    let t0 = Instant::now();
    let measured = async {
        match trigger {
            Trigger::Deleted => {
                setup
                    .pod_api
                    .delete(&old, &DeleteParams::default())
                    .await
                    .with_context(|| format!("deleting the leader {old}"))?;
            }
            Trigger::ProbeFails => {
                app_call(&old_ip, "/cgi-bin/fail").await?;
            }
        }
        let moved = setup
            .pods
            .wait(WAIT, "a new leader label", |s| {
                s.focus_leaders.len() == 1 && s.focus_leaders[0] != old
            })
            .await?;
        let labelled = moved.focus_leaders[0].clone();
        let new_ip = moved
            .focus
            .get(&labelled)
            .and_then(|p| p.ip.clone())
            .ok_or_else(|| anyhow!("the new leader {labelled} has no IP"))?;
        // Both clocks run from the trigger, so waiting on them together loses nothing.
        let (downward, _) = tokio::try_join!(
            downward_leader_seen(&new_ip, t0, WAIT),
            setup.traffic.wait_other_than(&old, t0, WAIT)
        )?;
        Ok::<_, anyhow::Error>((
            labelled,
            moved.focus_leaders_since.saturating_duration_since(t0),
            downward,
        ))
    }
    .await;
    if trigger == Trigger::ProbeFails {
        app_call(&old_ip, "/cgi-bin/heal")
            .await
            .context("healing the old leader's probe")?;
    }
    let (labelled, label, downward) = measured?;
    // Until settled, the client keeps going: an answer from the old leader or a third pod in
    // that time counts against this round.
    settle(setup).await?;
    let client = setup.traffic.failover(&old, t0)?;
    setup.traffic.forget_before(Instant::now());
    Ok(Round {
        labelled,
        label,
        downward,
        client,
    })
}

/// Waits for 4 Ready, labelled pods with one leader, answering through the Service, as the
/// harness's watch and the Service agree; returns the leader.
async fn settle(setup: &Setup) -> Result<String> {
    let settled = setup
        .pods
        .wait(
            SETTLE,
            "the group to settle (4 Ready, labelled pods, one leader)",
            |s| s.focus_settled(REPLICAS),
        )
        .await?;
    let leader = wait_service_leader(&setup.pod_api, setup.service_ip, None, SETTLE).await?;
    if settled.focus_leaders[0] != leader {
        setup
            .pods
            .wait(WAIT, "the watch to see the Service's leader", |s| {
                s.focus_settled(REPLICAS) && s.focus_leaders == [leader.as_str()]
            })
            .await?;
    }
    Ok(leader)
}

/// Runs the blocking `f` (helm waits minutes), saying every couple of seconds how long it has
/// taken, from a task on another worker thread.
async fn blocking_with_progress<T>(label: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mut progress = Progress::new(label);
    let started = Instant::now();
    let ticker = tokio::spawn(async move {
        let every = Duration::from_secs(5);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            progress.say(format!("{:.0}s", started.elapsed().as_secs_f64()));
        }
    });
    let result = tokio::task::block_in_place(f);
    ticker.abort();
    result
}

/// kubelet, kube-proxy and container runtime versions as the Node reports them.
async fn node_versions(client: &kube::Client) -> String {
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.get(NODE_NAME).await {
        Ok(node) => match node.status.and_then(|s| s.node_info) {
            Some(i) => format!(
                "kubelet {}, kube-proxy {} (iptables), {}, on {}",
                i.kubelet_version, i.kube_proxy_version, i.container_runtime_version, i.os_image
            ),
            None => "unknown (no nodeInfo)".into(),
        },
        Err(e) => format!("unknown ({e})"),
    }
}

impl RealNodeReport {
    fn render(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.latency(&mut md);
        self.requests(&mut md);
        self.notes(&mut md);
        md
    }

    fn header(&self, md: &mut String) {
        let m = &self.machine;
        title_and_machine(
            md,
            "podium bench --real-node",
            &self.started_at,
            self.quick,
            m,
        );
        let _ = writeln!(
            md,
            "| control plane | kube-apiserver {}, etcd {}, kube-controller-manager, kube-scheduler (testbed, on the node's bridge) |",
            self.apiserver_version, self.etcd_version
        );
        let _ = writeln!(md, "| node | {} |", self.node_versions);
        let _ = writeln!(
            md,
            "| podium | {}, source {}; operator image built from {} |",
            env!("CARGO_PKG_VERSION"),
            self.source,
            self.operator_binary.display()
        );
        let _ = writeln!(
            md,
            "| operator | in-cluster from the chart's defaults (`helm install`: 2 replicas, leader-elected) |"
        );
        load_row(md, m, &self.load_end, self.load_peak);
        let _ = writeln!(
            md,
            "| settings | {} failovers per trigger, after one unrecorded warm-up round each |",
            self.rounds
        );
        let _ = writeln!(md, "| run time | {:.0} s |\n", self.duration.as_secs_f64());
    }

    fn latency(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Failover on a real node: label, Service, Downward API\n"
        );
        let _ = writeln!(
            md,
            "Milliseconds from the trigger (the harness's pod delete; its request to the app's \
             `/cgi-bin/fail`, after which the readiness probe, every 1 s, fails). Ratios are \
             p50 against the *new leader labelled* row of the same trigger.\n"
        );
        let _ = writeln!(md, "| trigger | until | n | p50 | p99 | max | p50 ratio |");
        let _ = writeln!(md, "|---|---|--:|--:|--:|--:|--:|");
        for (trigger, r) in &self.results {
            let base = Summary::of(&r.label).map(|s| s.p50);
            let rows: [(&str, &[Duration]); 4] = [
                ("new leader labelled (harness's pod watch)", &r.label),
                (
                    "first answer from the new leader through the ClusterIP",
                    &r.service,
                ),
                (
                    "old leader's last answer through the ClusterIP",
                    &r.last_old,
                ),
                (
                    "Downward API labels file in the new leader shows `leader`",
                    &r.downward,
                ),
            ];
            for (until, samples) in rows {
                let _ = match Summary::of(samples) {
                    Some(s) => writeln!(
                        md,
                        "| {} | {until} | {} | {} | {} | {} | {} |",
                        trigger.describe(),
                        s.n,
                        ms(s.p50),
                        ms(s.p99),
                        ms(s.max),
                        match base {
                            Some(b) if !b.is_zero() => ratio(s.p50.div_duration_f64(b)),
                            _ => "–".into(),
                        }
                    ),
                    None => writeln!(
                        md,
                        "| {} | {until} | 0 | – | – | – | – |",
                        trigger.describe()
                    ),
                };
            }
        }
        let _ = writeln!(
            md,
            "\nPercentiles are nearest-rank; with fewer than 100 samples p99 is the maximum.\n"
        );
    }

    fn requests(&self, md: &mut String) {
        let _ = writeln!(md, "## The client's requests\n");
        let _ = writeln!(
            md,
            "| trigger | rounds | failed, trigger → new leader's first answer: median / max / total | failed after it, until settled: total | rounds with no answer from the old leader after the trigger | answers from a third pod | from the old leader after the new one answered | first answer not from the labelled pod |"
        );
        let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|");
        for (trigger, r) in &self.results {
            let _ = writeln!(
                md,
                "| {} | {} | {} / {} / {} | {} | {} | {} | {} | {} |",
                trigger.describe(),
                r.rounds(),
                median(&r.failed_before),
                r.failed_before.iter().max().copied().unwrap_or(0),
                r.failed_before.iter().sum::<u64>(),
                r.failed_after.iter().sum::<u64>(),
                r.no_old_answer,
                r.third,
                r.old_after_new,
                r.other_than_labelled
            );
        }
        let _ = writeln!(md);
    }

    fn notes(&self, md: &mut String) {
        let _ = writeln!(md, "## How this was measured\n");
        let notes = [
            "A real node beside the testbed's control plane (`RealNode`: containerd, kubelet, kube-scheduler, kube-proxy in iptables mode, a CNI bridge); the chart installed by `helm install` with its defaults and the operator image built from the release `podium` binary; `examples/` applied with the app image (`GET /` answers the pod name; readiness probe `/healthz` every 1 s, failureThreshold 1; `STOP_DELAY` 1 s after SIGTERM; a Downward API volume of the pod's labels).".to_string(),
            "Each round starts settled: 4 Ready pods, none terminating, all labelled, one leader in the harness's pod watch, and that leader answering through the Service. After a delete this includes the replacement pod and kubelet 1.20 removing the old pod object (its next 10 s status sync). A probe made to fail is healed (`/cgi-bin/heal`) once the round is measured; the pod rejoins as a follower.".to_string(),
            "Label: when the harness's own pod watch delivered the change to exactly one leader, other than the old one (stamped when the value changed, so a late waiter does not add to it).".to_string(),
            format!(
                "Service: a client in the bench process loops on the ClusterIP, a new TCP connection per request (so kube-proxy routes each afresh), {} ms timeout, {} ms pause between requests; an answer is timed at its request's start. A request sent to a pod that has gone waits for the timeout, so the first answer from the new leader can come up to that much after the Service switched.",
                REQUEST_TIMEOUT.as_millis(),
                REQUEST_PAUSE.as_millis()
            ),
            "Downward API: the app's `/cgi-bin/labels` in the new leader (the file kubelet writes from the pod's labels), read every 20 ms from when the label watch names the new leader, until it shows `podium.dev/role=\"leader\"`; timed at the answer.".to_string(),
            "Failed requests: no answer within the timeout, a refused connection or a non-200 answer. The counts after the new leader's first answer run until the next settled state; answers from a third pod, or from the old leader after the new one answered, would be a fault and are counted, not asserted.".to_string(),
        ];
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        let failures: Vec<String> = self
            .error
            .iter()
            .cloned()
            .chain(self.results.iter().flat_map(|(t, r)| {
                r.failures
                    .iter()
                    .map(move |f| format!("{}: {f}", t.describe()))
            }))
            .collect();
        if !failures.is_empty() {
            let _ = writeln!(md, "\n## Failures\n");
            for f in failures {
                let _ = writeln!(md, "- {}", one_line(&f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_counts_into_its_trigger() {
        let round = Round {
            labelled: "b".into(),
            label: Duration::from_millis(40),
            downward: Duration::from_millis(600),
            client: ClientFailover {
                old: "a".into(),
                new: "b".into(),
                first_new: Duration::from_millis(300),
                last_old: None,
                failed_before: 7,
                failed_after: 0,
                third: Vec::new(),
                old_after_new: 0,
            },
        };
        let mut r = TriggerResults::default();
        r.add(&round);
        assert_eq!(
            (r.rounds(), r.no_old_answer, r.failed_before.clone()),
            (1, 1, vec![7])
        );
        assert!(r.last_old.is_empty());
        let report = RealNodeReport {
            machine: Machine::default(),
            started_at: jiff::Zoned::now(),
            duration: Duration::ZERO,
            load_end: String::new(),
            load_peak: 0.0,
            apiserver_version: String::new(),
            etcd_version: String::new(),
            node_versions: String::new(),
            source: String::new(),
            operator_binary: PathBuf::from("podium"),
            rounds: 1,
            quick: false,
            results: BTreeMap::from([(Trigger::Deleted, r)]),
            error: None,
        };
        let md = report.render();
        assert!(md.contains("| leader pod deleted | first answer from the new leader through the ClusterIP | 1 | 300 | 300 | 300 | 7.5× |"), "{md}");
    }
}
