//! `podium-bench`: Podium's failover latency, its cost in API requests, how it compares with
//! applications electing themselves through a Lease, and how it scales, all measured on the
//! local testbed ([`podium_testkit::testbed`]) and written as Markdown to stdout and to
//! `bench/results/<date>.md`.
//!
//! Sections:
//! 1. **Failover latency** ([`failover`]): one group of four Ready pods behind a leader
//!    Service; the leader is deleted (or turned NotReady) `--rounds` times, timed from the
//!    harness's write to the new leader's label in the harness's own watch, and to the
//!    Service's EndpointSlices listing only the new leader.
//! 2. **Peers** ([`peers`]): the same control plane, four candidate tasks racing for one Lease
//!    with kube-leader-election's `LeaseLock`: at that crate's usual timings, and at client-go's
//!    defaults (modelled). The holder crashes (task aborted) or steps down.
//! 3. **Scale** ([`scale`]): G groups × 3 pods for each G in `--groups`: time to elect them
//!    all, steady-state API writes against the floor G / (TTL/2), the operator's CPU and peak
//!    RSS, and one group's failover while the rest run.
//! 4. **Cost per failover**: every request the operator made for each failover of section 1,
//!    sorted by what it did, against the floor (Lease write, unlabel, label, status write).
//!
//! 5. **Role notifications** ([`notify`]): four pods, each running a real `podium exec` (this
//!    executable's `exec`) on a loopback IP; the leader is deleted or turned NotReady, timed to
//!    the new leader's label, to its `leader` notification, and to its command's start; next
//!    to the floor of a break-before-make handover, two messages sent straight to idle pods.
//!
//! `--real-node` runs instead a report of its own ([`real_node`]): failover on a real node
//! (kubelet, containerd, kube-proxy) as a client of the leader Service and the Downward API
//! see it, next to the new leader's label, written to `bench/results/<date>-real-node.md`.
//!
//! The operator runs in a child process (this executable, `podium-bench --operator-child`): the
//! operator as `podium run --leader-elect=false`, plus a counting layer on its client whose
//! counts the harness reads over a loopback socket. So CPU and memory come from
//! `/proc/<child>/{stat,status}` and exclude the harness, and the request counts are exact
//! and split by verb and resource. `--in-process-operator` runs it in the harness instead.

mod failover;
mod floor;
mod notify;
mod operator;
mod peers;
mod procstat;
mod real_node;
mod report;
mod scale;
mod stats;

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use kube::Client;
use kube::api::Api;
use serde_json::json;

use podium::telemetry::{self, LogFormat};
use podium_core::crd::ElectionGroup;
use podium_testkit::fixture;
use podium_testkit::testbed::{self, Testbed};
use podium_testkit::wait::poll;

use operator::OperatorSource;
use report::Report;
use scale::ScaleParams;

/// Sections `--skip` can leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Failover,
    Peers,
    Scale,
    Notify,
}

/// `podium bench` flags.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// Failovers per trigger (leader deleted, leader NotReady), for Podium's failover rows and
    /// for the role-notification rows [default: 50; 3 with --quick].
    #[arg(long)]
    pub rounds: Option<usize>,

    /// Group counts for the scale runs, comma separated [default: 10,100,1000; 10 with --quick].
    #[arg(long, value_delimiter = ',')]
    pub groups: Option<Vec<usize>>,

    /// Also run G=10,000 (30,000 pods) after the --groups steps: election against its floor,
    /// steady writes, CPU and peak RSS. Takes several minutes and a few GiB of etcd.
    #[arg(long)]
    pub ten_thousand: bool,

    /// A smoke run: few rounds, G=10, and TTLs, renewal periods and windows cut to a fifth or
    /// less. Its numbers are for checking the bench, not for quoting.
    #[arg(long)]
    pub quick: bool,

    /// Directory for the report, `<date>.md`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,

    /// Crash rounds per peer; each takes about one TTL (15 s) [default: 3; 1 with --quick].
    #[arg(long)]
    pub peer_crash_rounds: Option<usize>,

    /// Step-down rounds per peer [default: 5; 1 with --quick].
    #[arg(long)]
    pub peer_graceful_rounds: Option<usize>,

    /// Failovers of one group during each scale run [default: 20; 2 with --quick].
    #[arg(long)]
    pub scale_rounds: Option<usize>,

    /// Groups (one pod each) for the role notifications' token cost: TokenRequests while every
    /// pod is first told its role, and over a steady window [default: 1000; 10 with --quick].
    #[arg(long)]
    pub notify_groups: Option<usize>,

    /// Length of the steady-state window of each scale run, in seconds, rounded up to whole
    /// renewal periods (TTL/2) so that every group renews equally often inside it
    /// [default: 30; 4 with --quick].
    #[arg(long)]
    pub window: Option<u64>,

    /// Sections to leave out, comma separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub skip: Vec<Section>,

    /// Instead of the sections above, time failovers on a real node (root; one per machine):
    /// the chart's in-cluster operator, built from the release `podium` binary next to this
    /// executable, and a client of the leader Service. Writes `<date>-real-node.md`.
    #[arg(long)]
    pub real_node: bool,

    /// Failovers per trigger (leader deleted, readiness probe fails) with --real-node
    /// [default: 20; 3 with --quick].
    #[arg(long, requires = "real_node")]
    pub real_node_rounds: Option<usize>,

    /// Run the operator inside the bench process (CPU and memory then include the harness).
    #[arg(long)]
    pub in_process_operator: bool,

    /// The executable to run the operator child from [default: this one]; it must accept
    /// `podium-bench --operator-child`.
    #[arg(long, hide = true)]
    pub operator_bin: Option<PathBuf>,

    /// Internal: be the operator child.
    #[arg(long, hide = true)]
    pub operator_child: bool,

    /// Internal: the operator child watches this namespace only.
    #[arg(long, hide = true, requires = "operator_child")]
    pub child_namespace: Option<String>,

    /// Internal: the operator child logs every request.
    #[arg(long, hide = true, requires = "operator_child")]
    pub child_log: bool,

    /// Internal: the operator child signs role notifications as this ServiceAccount
    /// (NAMESPACE/NAME).
    #[arg(long, hide = true, requires = "operator_child")]
    pub child_service_account: Option<String>,
}

/// The settings a run used, after defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub rounds: usize,
    pub groups: Vec<usize>,
    pub peer_crash_rounds: usize,
    pub peer_graceful_rounds: usize,
    /// Multiplies the peers' TTL and periods (1 for the real thing).
    pub peer_scale: f64,
    pub scale_rounds: usize,
    pub scale_ttl_seconds: i32,
    /// The notification group's TTL: a fresh operator activates nobody for one term.
    pub notify_ttl_seconds: i32,
    pub notify_groups: usize,
    pub window: Duration,
    pub skip: Vec<Section>,
}

impl Settings {
    pub fn from_args(args: &BenchArgs) -> Settings {
        let quick = args.quick;
        let scale_ttl_seconds = if quick {
            4
        } else {
            podium_core::crd::DEFAULT_LEASE_DURATION_SECONDS
        };
        // A window cut mid-period counts the groups whose renewal fell inside it twice as often
        // as the rest, and the groups were elected in a burst, so their renewals bunch up.
        let period = podium_core::election::renew_interval(scale_ttl_seconds);
        let asked = Duration::from_secs(args.window.unwrap_or(if quick { 4 } else { 30 }));
        let window = period
            * u32::try_from(asked.div_duration_f64(period).ceil() as u64)
                .unwrap_or(u32::MAX)
                .max(1);
        Settings {
            quick,
            rounds: args.rounds.unwrap_or(if quick { 3 } else { 50 }),
            groups: {
                let mut groups = args
                    .groups
                    .clone()
                    .unwrap_or_else(|| if quick { vec![10] } else { vec![10, 100, 1000] });
                if args.ten_thousand && !groups.contains(&10_000) {
                    groups.push(10_000);
                }
                groups
            },
            peer_crash_rounds: args.peer_crash_rounds.unwrap_or(if quick { 1 } else { 3 }),
            peer_graceful_rounds: args
                .peer_graceful_rounds
                .unwrap_or(if quick { 1 } else { 5 }),
            peer_scale: if quick { 0.2 } else { 1.0 },
            scale_rounds: args.scale_rounds.unwrap_or(if quick { 2 } else { 20 }),
            scale_ttl_seconds,
            notify_ttl_seconds: if quick { 4 } else { failover::LEASE_SECONDS },
            notify_groups: args.notify_groups.unwrap_or(if quick { 10 } else { 1000 }),
            window,
            skip: args.skip.clone(),
        }
    }

    fn runs(&self, section: Section) -> bool {
        !self.skip.contains(&section)
    }
}

/// What a bench run produced.
pub struct BenchOutcome {
    pub markdown: String,
    /// Where the report was written.
    pub path: PathBuf,
    /// Sections that failed (their error is also in the report).
    pub failures: Vec<String>,
}

/// What `podium-bench` runs.
pub async fn run(args: BenchArgs) -> Result<()> {
    if args.operator_child {
        return operator::run_child(
            args.child_namespace,
            args.child_service_account,
            args.child_log,
        )
        .await;
    }
    let outcome = if args.real_node {
        telemetry::init(LogFormat::Text, "warn,kube_client=off");
        real_node::run(&args).await?
    } else {
        run_with(&args).await?
    };
    println!("{}", outcome.markdown);
    eprintln!("bench: report written to {}", outcome.path.display());
    if !outcome.failures.is_empty() {
        return Err(anyhow!(
            "{} section(s) failed (see the report): {}",
            outcome.failures.len(),
            outcome.failures.join("; ")
        ));
    }
    Ok(())
}

/// `podium-bench exec ARGS`: `podium exec ARGS`, for the notification section's pods.
pub async fn run_exec(args: impl Iterator<Item = String>) -> Result<()> {
    let cli = <podium::cli::Cli as clap::Parser>::parse_from(
        std::iter::once("podium".into()).chain(args),
    );
    let Some(podium::cli::Command::Exec(args)) = cli.command else {
        return Err(anyhow!("podium-bench exec: expected `exec` and its flags"));
    };
    telemetry::init(args.log_format, "info");
    podium::exec::run(args).await.map_err(anyhow::Error::from)
}

/// The whole bench: starts a testbed, runs the sections, writes the report, returns it.
pub async fn run_with(args: &BenchArgs) -> Result<BenchOutcome> {
    telemetry::init(
        LogFormat::Text,
        "warn,kube_client=off,kube_leader_election=off",
    );
    let settings = Settings::from_args(args);
    let started_at = jiff::Zoned::now();
    let started = Instant::now();
    let machine = procstat::machine();
    let operator_bin = if args.in_process_operator {
        None
    } else {
        Some(match &args.operator_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe().context("finding this executable")?,
        })
    };

    let mut progress = Progress::new("control plane");
    progress.say("starting etcd, kube-apiserver, kube-controller-manager".into());
    let testbed = with_progress(&mut progress, Testbed::start()).await?;
    testbed.install_crd().await?;
    let client = testbed.try_client()?;
    progress.done();

    let mut report = Report::new(&settings, machine, started_at);
    report.apiserver_version = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    report.etcd_version = etcd_version();
    report.source = git_source();
    report.operator_mode = match &operator_bin {
        Some(_) => format!(
            "child process (`podium-bench --operator-child`: `podium run --leader-elect=false` plus a request-counting layer; worker threads: {})",
            podium::cli::RunArgs::from_env().worker_threads
        ),
        None => "in the bench process (CPU and memory include the harness)".into(),
    };
    let mut rng = Rng::from_entropy();
    let load = PeakLoad::start();
    let log_dir = testbed.log_dir();
    let source = match &operator_bin {
        Some(bin) => OperatorSource::Child {
            bin,
            log_dir: &log_dir,
        },
        None => OperatorSource::InProcess,
    };

    if settings.runs(Section::Failover) {
        let result = async {
            let mut operator = source.start(&testbed, None, None, true, "failover").await?;
            match operator.wait_ready(Duration::from_secs(60)).await {
                Ok(()) => failover::run(&testbed, &client, operator, settings.rounds).await,
                Err(e) => {
                    operator.stop().await;
                    Err(e)
                }
            }
        }
        .await;
        report.failover = Some(result.map_err(|e| format!("{e:#}")));
    }

    if settings.runs(Section::Notify) {
        let exec_bin = match &args.operator_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe().context("finding this executable")?,
        };
        let params = notify::NotifyParams {
            exec_bin: &exec_bin,
            rounds: settings.rounds,
            ttl_seconds: settings.notify_ttl_seconds,
            token_groups: settings.notify_groups,
            window: settings.window,
        };
        let result = notify::run(&testbed, &client, &source, &params).await;
        report.notify = Some(result.map_err(|e| format!("{e:#}")));
    }

    if settings.runs(Section::Peers) {
        for config in [
            peers::PeerConfig::kube_leader_election(settings.peer_scale),
            peers::PeerConfig::client_go(settings.peer_scale),
        ] {
            let result = peers::run(
                &testbed,
                &client,
                &config,
                settings.peer_crash_rounds,
                settings.peer_graceful_rounds,
                &mut rng,
            )
            .await;
            report
                .peers
                .push((config, result.map_err(|e| format!("{e:#}"))));
        }
    }

    if settings.runs(Section::Scale) {
        for &groups in &settings.groups {
            let params = ScaleParams {
                groups,
                ttl_seconds: settings.scale_ttl_seconds,
                window: settings.window,
                failover_rounds: settings.scale_rounds,
            };
            let result = scale::run(&testbed, &client, &source, &params, &mut rng).await;
            report
                .scale
                .push((groups, result.map_err(|e| format!("{e:#}"))));
        }
    }

    report.duration = started.elapsed();
    report.load_end = procstat::load_average();
    report.load_peak = load.stop();
    let markdown = report.render();
    let path = write_report(&args.out, &report.started_at, "", &markdown)?;
    Ok(BenchOutcome {
        markdown,
        path,
        failures: report.failures(),
    })
}

/// The highest 1-minute load average sampled during a run: other work on the machine shows up
/// here.
struct PeakLoad {
    peak: std::sync::Arc<std::sync::Mutex<f64>>,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakLoad {
    fn start() -> PeakLoad {
        let peak = std::sync::Arc::new(std::sync::Mutex::new(0.0f64));
        let sampler = tokio::spawn({
            let peak = peak.clone();
            async move {
                loop {
                    let load = procstat::load_1m();
                    {
                        let mut peak = peak.lock().unwrap_or_else(|e| e.into_inner());
                        *peak = peak.max(load);
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        });
        PeakLoad { peak, sampler }
    }

    fn stop(self) -> f64 {
        self.sampler.abort();
        *self.peak.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Writes `<out>/<date><suffix>.md`, or `<date><suffix>-2.md` and so on if that exists: earlier
/// reports are kept.
fn write_report(
    out: &Path,
    started: &jiff::Zoned,
    suffix: &str,
    markdown: &str,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let date = started.strftime("%Y-%m-%d").to_string();
    let mut path = out.join(format!("{date}{suffix}.md"));
    let mut n = 2;
    while path.exists() {
        path = out.join(format!("{date}{suffix}-{n}.md"));
        n += 1;
    }
    std::fs::write(&path, markdown).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `git <commit>` of the working directory at run time (`+ local changes` when `src/` differs
/// from it), and when this executable was built: the checkout may have moved since.
fn git_source() -> String {
    let built = std::env::current_exe()
        .and_then(std::fs::metadata)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| format!(" (this binary built {})", t.strftime("%Y-%m-%d %H:%M UTC")))
        .unwrap_or_default();
    format!("{}{built}", checkout())
}

fn checkout() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            // From the repository's top, where the bench runs, the sources are under crates/.
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "crates",
                "src",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            format!(
                "checkout at git {commit}{}",
                if dirty { " + local changes" } else { "" }
            )
        }
        None => "unknown (not a git checkout)".into(),
    }
}

fn etcd_version() -> String {
    testbed::find_binary("etcd")
        .ok()
        .and_then(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
        })
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("etcd Version:")
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Creates ElectionGroup `name` selecting `app=<app>` with the given TTL.
async fn create_group(client: &Client, ns: &str, name: &str, app: &str, ttl: i32) -> Result<()> {
    let spec = json!({
        "selector": { "matchLabels": { "app": app } },
        "leaseDurationSeconds": ttl,
    });
    fixture::create_group(client, ns, name, spec).await?;
    Ok(())
}

/// Waits until group `name` reports a leader and `n` eligible members.
async fn wait_group_eligible(
    groups: &Api<ElectionGroup>,
    name: &str,
    n: i32,
    timeout: Duration,
) -> Result<()> {
    let what = format!("ElectionGroup {name} to report {n} eligible members and a leader");
    let mut last = None;
    let waited = poll(timeout, Duration::from_millis(20), &what, async || {
        last = groups.get(name).await?.status;
        Ok(last
            .as_ref()
            .is_some_and(|s| s.leader.is_some() && s.eligible_members == n)
            .then_some(()))
    })
    .await;
    waited.map_err(|e| anyhow!("{e:#} (status: {last:?})"))
}

const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Progress lines on stderr: `bench: <label>: <message>`.
pub(crate) struct Progress {
    label: String,
    last: Instant,
    started: Instant,
}

impl Progress {
    fn new(label: impl Into<String>) -> Progress {
        let now = Instant::now();
        Progress {
            label: label.into(),
            last: now,
            started: now,
        }
    }

    /// Prints the message if nothing was printed for a couple of seconds.
    fn tick(&mut self, message: impl FnOnce() -> String) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.say(message());
        }
    }

    fn say(&mut self, message: String) {
        eprintln!("bench: {}: {message}", self.label);
        self.last = Instant::now();
    }

    fn done(self) {
        eprintln!(
            "bench: {}: done in {:.1}s",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Awaits `fut`, saying how long it has taken every couple of seconds.
async fn with_progress<T>(
    progress: &mut Progress,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let mut fut = std::pin::pin!(fut);
    let started = Instant::now();
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            result = &mut fut => return result,
            _ = tick.tick() => progress.say(format!("{:.0}s", started.elapsed().as_secs_f64())),
        }
    }
}

/// A small xorshift generator for random phases and jitter; no cryptographic use.
pub(crate) struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn from_entropy() -> Rng {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Rng::new(hasher.finish())
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n), 0 for n = 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let cli = Cli::parse_from(["bench", "--groups", "10,100,1000,3000", "--rounds", "7"]);
        let s = Settings::from_args(&cli.bench);
        assert_eq!(s.groups, vec![10, 100, 1000, 3000]);
        assert_eq!(
            (s.rounds, s.peer_crash_rounds, s.scale_ttl_seconds),
            (7, 3, 15)
        );
        let quick =
            Settings::from_args(&Cli::parse_from(["bench", "--quick", "--skip", "peers"]).bench);
        assert_eq!((quick.rounds, quick.groups.clone()), (3, vec![10]));
        assert!(!quick.runs(Section::Peers) && quick.runs(Section::Scale));
        assert!(Cli::try_parse_from(["bench", "--child-log"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--real-node-rounds", "2"]).is_err());
        let real = Cli::parse_from(["bench", "--real-node", "--real-node-rounds", "2"]).bench;
        assert_eq!((real.real_node, real.real_node_rounds), (true, Some(2)));
        let huge = Settings::from_args(&Cli::parse_from(["bench", "--ten-thousand"]).bench);
        assert_eq!(huge.groups, vec![10, 100, 1000, 10_000]);
    }

    #[test]
    fn the_window_covers_whole_renewal_periods() {
        let window = |args: &[&str]| Settings::from_args(&Cli::parse_from(args).bench).window;
        assert_eq!(window(&["bench"]), Duration::from_secs(30));
        assert_eq!(
            window(&["bench", "--window", "20"]),
            Duration::from_millis(22_500)
        );
        assert_eq!(
            window(&["bench", "--window", "0"]),
            Duration::from_millis(7_500)
        );
        assert_eq!(window(&["bench", "--quick"]), Duration::from_secs(4));
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut rng = Rng::new(42);
        let mean: f64 = (0..10_000).map(|_| rng.unit()).sum::<f64>() / 10_000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
        assert!((0..1000).all(|_| rng.below(7) < 7));
    }
}
