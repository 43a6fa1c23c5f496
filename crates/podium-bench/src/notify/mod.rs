//! Section 5 (role notifications): one group of four pods with `spec.notify`, each pod a real
//! `podium exec` (this executable's `exec`) on a loopback IP whose command logs its start and
//! stop. The leader is deleted, or reported NotReady, over and over. Each round is timed from
//! the trigger to the new leader's label in the harness's watch, to the new leader's `exec`
//! taking its `leader` message (its log), and to its command's start (the command's log).
//!
//! The floor of the process handover runs on two idle `podium exec` pods that no group selects:
//! the harness sends the two messages break-before-make needs, straight to the pods with a
//! token it holds: demote the leader (answered once its command has exited), then tell the
//! other one `leader`. No API request, no watch, no queue: what is left is the pods' own work.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::api::Api;
use serde_json::json;

use super::failover::Cause;
use super::operator::{OperatorSource, OperatorUnderTest};
use super::{Progress, wait_group_eligible};
use podium::notify::{Sender, TokenSource};
use podium_core::crd::ElectionGroup;
use podium_core::notify::{NotifyRole, RoleMessage};
use podium_testkit::fixture;
use podium_testkit::leader_process::{
    NOTIFY_PORT, OPERATOR_ACCOUNT, ProcessPods, Work, overlaps, unix_nanos,
};
use podium_testkit::observe::PodWatch;
use podium_testkit::prometheus::samples;
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{set_pod_not_ready, set_pod_running_ready};
use podium_testkit::wait::poll;

pub mod report;
pub mod tokens;

const APP: &str = "web";
const REPLICAS: usize = 4;
const WAIT: Duration = Duration::from_secs(30);
/// The operator counts as done with a round after this long without an API request.
const QUIET: Duration = Duration::from_millis(500);
/// The floor's pods run their command for this long per `leader` message; the floor hands over
/// long before, so no term runs out under it.
const FLOOR_TERM_MILLIS: u64 = 60_000;

pub struct NotifyParams<'a> {
    /// The executable whose `exec` subcommand is `podium exec`.
    pub exec_bin: &'a Path,
    pub rounds: usize,
    pub ttl_seconds: i32,
    /// Groups for the token cost ([`tokens`]); 0 skips it.
    pub token_groups: usize,
    pub window: Duration,
}

/// One trigger's samples, each from the trigger unless named otherwise.
#[derive(Clone, Debug, Default)]
pub struct TriggerResults {
    pub label: Vec<Duration>,
    /// The old leader's command logged its stop.
    pub old_stopped: Vec<Duration>,
    /// The new leader's `podium exec` took its `leader` message.
    pub notified: Vec<Duration>,
    /// The new leader's command logged its start.
    pub started: Vec<Duration>,
    /// From the new label (harness's watch) to the `leader` message taken.
    pub label_to_notified: Vec<Duration>,
    /// From the old command's stop to the new command's start: the gap break-before-make leaves.
    pub gap: Vec<Duration>,
    pub failures: Vec<String>,
}

/// The floor's handovers, from the harness's decision.
#[derive(Clone, Debug, Default)]
pub struct FloorResults {
    pub notified: Vec<Duration>,
    pub started: Vec<Duration>,
}

#[derive(Clone, Debug, Default)]
pub struct NotifyResults {
    pub by_cause: BTreeMap<Cause, TriggerResults>,
    pub floor: FloorResults,
    /// From creating the group to the first leader command: one term by design, since a fresh
    /// operator cannot know whether a process it never heard from still runs.
    pub first_activation: Option<Duration>,
    /// Leader runs of the measured pods, and the pairs of them that overlapped.
    pub leader_runs: usize,
    pub overlaps: Vec<String>,
    pub floor_runs: usize,
    pub floor_overlaps: Vec<String>,
    /// `podium_notifications_total` by result, from the operator.
    pub sent: BTreeMap<String, u64>,
    /// What per-pod tokens cost at scale.
    pub tokens: Option<Result<tokens::TokenCost, String>>,
}

/// Runs the section on a fresh pair of namespaces.
pub async fn run(
    testbed: &Testbed,
    client: &Client,
    source: &OperatorSource<'_>,
    params: &NotifyParams<'_>,
) -> Result<NotifyResults> {
    let (ns, pods) = process_pods(
        testbed,
        client,
        "bench-notify",
        APP,
        REPLICAS,
        params.exec_bin,
    )
    .await?;
    let watch = PodWatch::start(client, &ns, Some(&format!("app={APP}")), APP);
    let mut operator = source
        .start(
            testbed,
            Some(&ns),
            Some(&pods.operator_account()),
            false,
            "notify",
        )
        .await?;
    if let Err(e) = operator.wait_ready(WAIT).await {
        operator.stop().await;
        return Err(e);
    }
    let mut floor = match HandoverFloor::start(testbed, client, params.exec_bin).await {
        Ok(floor) => floor,
        Err(e) => {
            operator.stop().await;
            return Err(e.context("starting the floor's pods"));
        }
    };
    let mut setup = Setup {
        client: client.clone(),
        ns,
        pods,
        watch,
        operator,
        next_pod: REPLICAS,
    };
    let measured = measure(&mut setup, &mut floor, params).await;
    let sent = setup.operator.metrics().await.map(|m| notifications(&m));
    setup.operator.stop().await;
    let mut results = measured?;
    results.sent = sent.unwrap_or_default();
    let (count, found) = overlapping(&setup.pods)?;
    (results.leader_runs, results.overlaps) = (count, found);
    let (count, found) = overlapping(&floor.pods)?;
    (results.floor_runs, results.floor_overlaps) = (count, found);
    if params.token_groups > 0 {
        let cost = tokens::run(
            testbed,
            client,
            source,
            params.token_groups,
            params.ttl_seconds,
            params.window,
        )
        .await;
        results.tokens = Some(cost.map_err(|e| format!("{e:#}")));
    }
    Ok(results)
}

struct Setup {
    client: Client,
    ns: String,
    pods: ProcessPods,
    watch: PodWatch,
    operator: OperatorUnderTest,
    /// The number in the next replacement pod's name.
    next_pod: usize,
}

async fn measure(
    setup: &mut Setup,
    floor: &mut HandoverFloor,
    params: &NotifyParams<'_>,
) -> Result<NotifyResults> {
    let mut results = NotifyResults::default();
    let created = Instant::now();
    fixture::create_group(
        &setup.client,
        &setup.ns,
        APP,
        json!({
            "selector": { "matchLabels": { "app": APP } },
            "leaseDurationSeconds": params.ttl_seconds,
            "notify": { "port": NOTIFY_PORT },
        }),
    )
    .await?;
    let mut progress = Progress::new("notifications");
    progress.say(format!(
        "waiting one term ({} s) for the first leader's command: a fresh operator activates nobody sooner",
        params.ttl_seconds
    ));
    let term = Duration::from_secs(params.ttl_seconds.unsigned_abs().into());
    first_run(&setup.pods, term + WAIT).await?;
    results.first_activation = Some(created.elapsed());
    floor.elect_first().await?;

    for cause in [Cause::Deleted, Cause::NotReady] {
        let mut measured = TriggerResults::default();
        let mut progress = Progress::new(format!("notifications ({})", cause.describe()));
        // Round 0 warms the paths of this trigger up and is not recorded.
        for round in 0..=params.rounds {
            let mut warm_up = (TriggerResults::default(), FloorResults::default());
            let (out, floor_out) = match round {
                0 => (&mut warm_up.0, &mut warm_up.1),
                _ => (&mut measured, &mut results.floor),
            };
            let line = match one_round(setup, cause, out).await {
                Ok(line) => line,
                Err(e) => {
                    out.failures.push(format!("round {round}: {e:#}"));
                    format!("failed: {e:#}")
                }
            };
            let floor_line = floor.hand_over(floor_out).await?;
            progress.say(format!(
                "{round}/{}: {line}; floor {floor_line}",
                params.rounds
            ));
        }
        progress.done();
        results.by_cause.insert(cause, measured);
    }
    Ok(results)
}

/// Waits for the first leader command of the group.
async fn first_run(pods: &ProcessPods, timeout: Duration) -> Result<Work> {
    poll(
        timeout,
        Duration::from_millis(20),
        "the first leader command",
        async || Ok(pods.runs()?.into_iter().next()),
    )
    .await
}

/// One failover, its samples added to `out`; a line for the progress.
async fn one_round(setup: &mut Setup, cause: Cause, out: &mut TriggerResults) -> Result<String> {
    // Every round starts from the same state: four Ready pods, all labelled, the leader's
    // command running, and an operator with nothing left to do.
    let settled = setup
        .watch
        .wait(WAIT, "the group to settle", |s| s.focus_settled(REPLICAS))
        .await?;
    let groups: Api<ElectionGroup> = Api::namespaced(setup.client.clone(), &setup.ns);
    wait_group_eligible(&groups, APP, REPLICAS as i32, WAIT).await?;
    let old = settled.focus_leaders[0].clone();
    let old_ip = settled.focus[&old]
        .ip
        .clone()
        .ok_or_else(|| anyhow!("leader {old} has no IP"))?;
    let old_run = poll(
        WAIT,
        Duration::from_millis(20),
        "the leader's command to run",
        async || {
            Ok(setup
                .pods
                .runs()?
                .into_iter()
                .rfind(|r| r.pod == old && r.stop_ns.is_none()))
        },
    )
    .await?;
    setup.operator.wait_quiet(QUIET, WAIT).await?;
    let before = setup.pods.runs()?.len();

    let t0 = Instant::now();
    let t0_ns = unix_nanos();
    match cause {
        Cause::Deleted => setup.pods.delete(&old).await?,
        Cause::NotReady => {
            set_pod_not_ready(&setup.client, &setup.ns, &old).await?;
        }
    }
    let new_run = poll(
        WAIT,
        Duration::from_millis(5),
        "the new leader's command",
        async || {
            Ok(setup
                .pods
                .runs()?
                .into_iter()
                .skip(before)
                .find(|r| r.pod != old))
        },
    )
    .await?;
    let moved = setup
        .watch
        .wait(WAIT, "the new leader's label", |s| {
            s.focus_leaders == [new_run.pod.clone()]
        })
        .await?;
    let label_ns = t0_ns
        + moved
            .focus_leaders_since
            .saturating_duration_since(t0)
            .as_nanos();
    let notified_ns = setup
        .pods
        .notified_at(&new_run.pod, new_run.epoch)?
        .with_context(|| {
            format!(
                "{}'s command started at epoch {} without a leader message in its log",
                new_run.pod, new_run.epoch
            )
        })?;
    let old_stop_ns = poll(
        WAIT,
        Duration::from_millis(5),
        "the old command's stop",
        async || {
            Ok(setup
                .pods
                .runs()?
                .into_iter()
                .find(|r| r.pod == old_run.pod && r.start_ns == old_run.start_ns)
                .and_then(|r| r.stop_ns))
        },
    )
    .await?;

    out.label.push(between(t0_ns, label_ns));
    out.old_stopped.push(between(t0_ns, old_stop_ns));
    out.notified.push(between(t0_ns, notified_ns));
    out.started.push(between(t0_ns, new_run.start_ns));
    out.label_to_notified.push(between(label_ns, notified_ns));
    out.gap.push(between(old_stop_ns, new_run.start_ns));

    match cause {
        Cause::Deleted => {
            let name = format!("{APP}-{}", setup.next_pod);
            setup.next_pod += 1;
            setup.pods.start(&name, APP).await?;
        }
        // Ready again, as after a passing probe: it rejoins as a follower.
        Cause::NotReady => {
            set_pod_running_ready(&setup.client, &setup.ns, &old, &old_ip).await?;
        }
    }
    let ms = |from: u128, to: u128| super::stats::ms(between(from, to));
    Ok(format!(
        "label {}, told {}, command {}",
        ms(t0_ns, label_ns),
        ms(t0_ns, notified_ns),
        ms(t0_ns, new_run.start_ns)
    ))
}

/// Two idle `podium exec` pods in a namespace of their own that no group selects, handed over
/// by the harness itself.
struct HandoverFloor {
    pods: ProcessPods,
    names: [String; 2],
    group: String,
    tokens: TokenSource,
    sender: Sender,
    leader: usize,
    epoch: u64,
}

impl HandoverFloor {
    async fn start(testbed: &Testbed, client: &Client, exec_bin: &Path) -> Result<HandoverFloor> {
        const GROUP: &str = "floor";
        let (ns, pods) =
            process_pods(testbed, client, "bench-notify-floor", GROUP, 2, exec_bin).await?;
        let names = [format!("{GROUP}-0"), format!("{GROUP}-1")];
        Ok(HandoverFloor {
            pods,
            names,
            group: format!("{ns}/{GROUP}"),
            tokens: TokenSource::new(client.clone(), &ns, OPERATOR_ACCOUNT),
            sender: Sender::default(),
            leader: 0,
            epoch: 0,
        })
    }

    fn message(
        &self,
        pod: usize,
        role: NotifyRole,
        epoch: u64,
        nonce: Option<String>,
    ) -> RoleMessage {
        RoleMessage {
            group: self.group.clone(),
            pod: self.names[pod].clone(),
            pod_uid: self.uid(pod),
            role,
            leader: Some(
                self.names[if role == NotifyRole::Follower {
                    1 - pod
                } else {
                    pod
                }]
                .clone(),
            ),
            epoch,
            term_millis: FLOOR_TERM_MILLIS,
            nonce,
        }
    }

    fn uid(&self, pod: usize) -> String {
        self.pods
            .pods
            .get(&self.names[pod])
            .map(|p| p.uid.clone())
            .unwrap_or_default()
    }

    async fn send(&self, pod: usize, message: &RoleMessage) -> Result<podium_core::notify::Ack> {
        let (namespace, group) = self
            .group
            .split_once('/')
            .context("the floor's group is NAMESPACE/NAME")?;
        let audience = podium_core::notify::audience(namespace, group, &self.uid(pod));
        let token = self.tokens.token(&audience).await?;
        let ack = self
            .sender
            .send(&self.pods.url(&self.names[pod])?, &token, message)
            .await
            .with_context(|| {
                format!(
                    "sending {} a {} message",
                    self.names[pod],
                    message.role.as_str()
                )
            })?;
        if !ack.accepted {
            bail!(
                "{} refused a {} message: {ack:?}",
                self.names[pod],
                message.role.as_str()
            );
        }
        Ok(ack)
    }

    /// Makes pod 0 the leader at epoch 1.
    async fn elect_first(&mut self) -> Result<()> {
        self.epoch = 1;
        let ack = self
            .send(0, &self.message(0, NotifyRole::Pending, 1, None))
            .await?;
        self.send(0, &self.message(0, NotifyRole::Leader, 1, Some(ack.nonce)))
            .await?;
        self.send(1, &self.message(1, NotifyRole::Follower, 1, None))
            .await?;
        self.leader = 0;
        Ok(())
    }

    /// One handover to the other pod, its times added to `out`; a line for the progress.
    async fn hand_over(&mut self, out: &mut FloorResults) -> Result<String> {
        let (old, new) = (self.leader, 1 - self.leader);
        // The new leader's nonce is fresh, as the operator's would be after its last follower
        // message or renewal.
        let nonce = self
            .send(
                new,
                &self.message(new, NotifyRole::Follower, self.epoch, None),
            )
            .await?
            .nonce;
        let epoch = self.epoch + 1;
        let t0_ns = unix_nanos();
        let demoted = self
            .send(old, &self.message(old, NotifyRole::Follower, epoch, None))
            .await?;
        if demoted.running {
            bail!("{} answered its demotion still running", self.names[old]);
        }
        self.send(
            new,
            &self.message(new, NotifyRole::Leader, epoch, Some(nonce)),
        )
        .await?;
        self.epoch = epoch;
        self.leader = new;
        let name = &self.names[new];
        let started = poll(
            WAIT,
            Duration::from_millis(5),
            "the floor's command",
            async || {
                Ok(self
                    .pods
                    .runs()?
                    .into_iter()
                    .find(|r| &r.pod == name && r.epoch == epoch))
            },
        )
        .await?;
        let notified = self
            .pods
            .notified_at(name, epoch)?
            .with_context(|| format!("no leader message at epoch {epoch} in {name}'s log"))?;
        out.notified.push(between(t0_ns, notified));
        out.started.push(between(t0_ns, started.start_ns));
        Ok(format!(
            "told {}, command {}",
            super::stats::ms(between(t0_ns, notified)),
            super::stats::ms(between(t0_ns, started.start_ns))
        ))
    }
}

/// A fresh namespace with `count` pods `<app>-<i>` labelled `app=<app>`, each running
/// `exec_bin exec` for group `<app>`, logging under the testbed's log directory.
async fn process_pods(
    testbed: &Testbed,
    client: &Client,
    prefix: &str,
    app: &str,
    count: usize,
    exec_bin: &Path,
) -> Result<(String, ProcessPods)> {
    let ns = testbed.create_namespace(prefix).await?;
    let dir = testbed.log_dir().join(&ns);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut pods =
        ProcessPods::new(client, &ns, app, exec_bin, testbed.kubeconfig_path(), &dir).await?;
    for i in 0..count {
        pods.start(&format!("{app}-{i}"), app).await?;
    }
    Ok((ns, pods))
}

/// The pods' leader runs and every overlapping pair, described.
fn overlapping(pods: &ProcessPods) -> Result<(usize, Vec<String>)> {
    let all = pods.runs()?;
    let found = overlaps(&all)
        .into_iter()
        .map(|(a, b)| {
            format!(
                "{} (epoch {}) still ran when {} (epoch {}) started",
                a.pod, a.epoch, b.pod, b.epoch
            )
        })
        .collect();
    Ok((all.len(), found))
}

/// `podium_notifications_total` by result.
fn notifications(metrics: &str) -> BTreeMap<String, u64> {
    samples(metrics, "podium_notifications_total")
        .into_iter()
        .map(|(labels, value)| {
            (
                labels.get("result").cloned().unwrap_or_default(),
                value as u64,
            )
        })
        .collect()
}

/// From `earlier` to `later` (nanoseconds since the Unix epoch), zero if `later` is earlier.
fn between(earlier: u128, later: u128) -> Duration {
    Duration::from_nanos(u64::try_from(later.saturating_sub(earlier)).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_counts_come_by_result() {
        let metrics = "# TYPE podium_notifications_total counter\n\
                       podium_notifications_total{result=\"accepted\"} 12\n\
                       podium_notifications_total{result=\"timeout\"} 1\n";
        let sent = notifications(metrics);
        assert_eq!(sent.get("accepted"), Some(&12));
        assert_eq!(sent.get("timeout"), Some(&1));
        assert_eq!(between(5, 3), Duration::ZERO);
        assert_eq!(between(1_000, 3_000_000), Duration::from_nanos(2_999_000));
    }
}
