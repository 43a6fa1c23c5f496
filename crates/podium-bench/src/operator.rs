//! The operator under test. By default it runs in a child process (this executable, `bench
//! --operator-child`), so that its CPU time and memory can be read from `/proc/<pid>` apart
//! from the harness's. The child is `podium run --leader-elect=false` with one addition: a
//! counting layer on its client, whose counts (and, for the failover runs, a log of every
//! request) the harness fetches over a loopback socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::procstat::{self, ProcSample};
use podium::operator::{Operator, OperatorConfig};
use podium::telemetry::{self, LogFormat};
use podium_testkit::counting::{Counter, Counts, RequestRecord};

/// The line the child prints on stdout once it listens: this prefix and the address.
const HELLO: &str = "podium-bench-operator listening on ";
/// Generous: with 30,000 pods on a saturated 2-core control plane, the child's first lists
/// took longer than 30 s.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(180);

/// What the child answers on its socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The operator's caches have synced.
    pub ready: bool,
    pub counts: Counts,
    /// Logged requests after the asked-for sequence number.
    pub log: Vec<RequestRecord>,
    /// The operator's own `/metrics` text, when asked for.
    pub metrics: Option<String>,
}

/// `podium-bench --operator-child`: run the operator until stdin closes.
pub async fn run_child(
    namespace: Option<String>,
    service_account: Option<String>,
    keep_log: bool,
) -> Result<()> {
    telemetry::init(LogFormat::Text, "info,kube_runtime=warn");
    let config = kube::Config::infer()
        .await
        .context("cannot build a Kubernetes client configuration from KUBECONFIG")?;
    let counter = Counter::new(keep_log);
    let client = counter.client(config)?;
    let operator = Operator::start(
        client,
        OperatorConfig {
            // `podium run` always serves /healthz, /readyz and /metrics.
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            watch_namespace: namespace,
            election: None,
            service_account: service_account.as_deref().map(account).transpose()?,
        },
    )
    .await?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("{HELLO}{}\n", listener.local_addr()?).as_bytes())
        .await?;
    stdout.flush().await?;
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            read = stdin.read(&mut sink) => {
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let answer = |request: &str| answer(request, &operator, &counter);
                if let Err(e) = serve_one(stream, answer).await {
                    tracing::debug!(error = %e, "bench query failed");
                }
            }
        }
    }
    operator.stop().await;
    Ok(())
}

/// `NAMESPACE/NAME` as a pair.
fn account(text: &str) -> Result<(String, String)> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.into(), name.into())),
        _ => bail!("expected a ServiceAccount as NAMESPACE/NAME, got {text:?}"),
    }
}

fn answer(request: &str, operator: &Operator, counter: &Counter) -> Report {
    let mut words = request.split_whitespace();
    let command = words.next().unwrap_or_default();
    let after: u64 = words
        .next()
        .and_then(|w| w.parse().ok())
        .unwrap_or(u64::MAX);
    Report {
        ready: operator.ready.load(Ordering::Acquire),
        counts: counter.snapshot(),
        log: if command == "log" {
            counter.log_since(after)
        } else {
            Vec::new()
        },
        metrics: (command == "metrics").then(|| operator.metrics.encode()),
    }
}

async fn serve_one(stream: TcpStream, answer: impl Fn(&str) -> Report) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let body = serde_json::to_vec(&answer(line.trim()))?;
    write.write_all(&body).await?;
    write.shutdown().await?;
    Ok(())
}

/// Where the bench runs its operators.
pub enum OperatorSource<'a> {
    /// `bin --operator-child`, logging to `log_dir/operator-<name>.log`.
    Child {
        bin: &'a Path,
        log_dir: &'a Path,
    },
    InProcess,
}

impl OperatorSource<'_> {
    /// Starts an operator watching `namespace` (all when `None`), signing role notifications
    /// as `service_account` (NAMESPACE/NAME) if given; `name` names its log file.
    pub async fn start(
        &self,
        testbed: &podium_testkit::testbed::Testbed,
        namespace: Option<&str>,
        service_account: Option<&str>,
        keep_log: bool,
        name: &str,
    ) -> Result<OperatorUnderTest> {
        match self {
            OperatorSource::Child { bin, log_dir } => {
                OperatorUnderTest::spawn(
                    bin,
                    testbed.kubeconfig_path(),
                    namespace,
                    service_account,
                    keep_log,
                    &log_dir.join(format!("operator-{name}.log")),
                )
                .await
            }
            OperatorSource::InProcess => {
                OperatorUnderTest::in_process(
                    testbed.config(),
                    namespace,
                    service_account,
                    keep_log,
                )
                .await
            }
        }
    }
}

/// The operator the bench measures, wherever it runs.
pub enum OperatorUnderTest {
    Child {
        child: Box<tokio::process::Child>,
        stdin: Option<tokio::process::ChildStdin>,
        addr: SocketAddr,
        pid: u32,
        log: PathBuf,
    },
    InProcess {
        operator: Operator,
        counter: Counter,
    },
}

impl OperatorUnderTest {
    /// Starts `bin bench --operator-child` with `KUBECONFIG=kubeconfig`, its stderr (the
    /// operator's log) going to `log`. With a `service_account` (NAMESPACE/NAME) it sends role
    /// notifications signed as that account.
    pub async fn spawn(
        bin: &Path,
        kubeconfig: &Path,
        namespace: Option<&str>,
        service_account: Option<&str>,
        keep_log: bool,
        log: &Path,
    ) -> Result<OperatorUnderTest> {
        let mut command = tokio::process::Command::new(bin);
        command.args(["--operator-child"]);
        if let Some(ns) = namespace {
            command.args(["--child-namespace", ns]);
        }
        if let Some(account) = service_account {
            command.args(["--child-service-account", account]);
        }
        if keep_log {
            command.arg("--child-log");
        }
        let stderr =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = command
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} --operator-child", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the operator child exited at once"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from the operator child"))?;
        let mut lines = BufReader::new(stdout).lines();
        let hello = tokio::time::timeout(CHILD_START_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| {
                anyhow!(
                    "the operator child did not start within {}s",
                    CHILD_START_TIMEOUT.as_secs()
                )
            })?
            .context("reading the operator child's stdout")?;
        let Some(addr) = hello.as_deref().and_then(|l| l.strip_prefix(HELLO)) else {
            bail!(
                "the operator child ({}) did not announce itself (got {hello:?}); does it \
                 support `podium-bench --operator-child`? Its log: {}",
                bin.display(),
                log.display()
            );
        };
        let addr = addr.trim().parse().context("parsing the child's address")?;
        let stdin = child.stdin.take();
        Ok(OperatorUnderTest::Child {
            child: Box::new(child),
            stdin,
            addr,
            pid,
            log: log.to_path_buf(),
        })
    }

    /// Runs the operator in this process (CPU and memory then include the harness).
    pub async fn in_process(
        config: kube::Config,
        namespace: Option<&str>,
        service_account: Option<&str>,
        keep_log: bool,
    ) -> Result<OperatorUnderTest> {
        let counter = Counter::new(keep_log);
        let operator = Operator::start(
            counter.client(config)?,
            OperatorConfig {
                http_addr: None,
                watch_namespace: namespace.map(str::to_string),
                election: None,
                service_account: service_account.map(account).transpose()?,
            },
        )
        .await?;
        Ok(OperatorUnderTest::InProcess { operator, counter })
    }

    pub fn pid(&self) -> u32 {
        match self {
            OperatorUnderTest::Child { pid, .. } => *pid,
            OperatorUnderTest::InProcess { .. } => std::process::id(),
        }
    }

    pub fn proc_sample(&self) -> Result<ProcSample> {
        procstat::sample(self.pid())
    }

    async fn query(&self, request: &str) -> Result<Report> {
        match self {
            OperatorUnderTest::Child { addr, .. } => {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .context("connecting to the operator child")?;
                stream.write_all(format!("{request}\n").as_bytes()).await?;
                let mut body = Vec::new();
                stream.read_to_end(&mut body).await?;
                serde_json::from_slice(&body).context("parsing the operator child's answer")
            }
            OperatorUnderTest::InProcess { operator, counter } => {
                Ok(answer(request, operator, counter))
            }
        }
    }

    pub async fn counts(&self) -> Result<Counts> {
        Ok(self.query("counts").await?.counts)
    }

    pub async fn log_since(&self, after: u64) -> Result<Vec<RequestRecord>> {
        Ok(self.query(&format!("log {after}")).await?.log)
    }

    pub async fn metrics(&self) -> Result<String> {
        Ok(self.query("metrics").await?.metrics.unwrap_or_default())
    }

    /// Whether [`pause`](Self::pause) works: only a child process can be stopped alone.
    pub fn can_pause(&self) -> bool {
        matches!(self, OperatorUnderTest::Child { .. })
    }

    /// Stops the child with SIGSTOP: it keeps its caches and connections and sends nothing
    /// until [`resume`](Self::resume), which lets another client answer the same trigger.
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let OperatorUnderTest::Child { pid, .. } = self else {
            bail!("an in-process operator cannot be paused");
        };
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .with_context(|| format!("kill {signal} {pid}"))?;
        if !status.success() {
            bail!("kill {signal} {pid}: {status}");
        }
        Ok(())
    }

    /// Waits until the operator's caches have synced.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let OperatorUnderTest::Child { child, log, .. } = self
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the operator child exited ({status}) before it was ready; log: {}",
                    log.display()
                );
            }
            if self.query("counts").await.is_ok_and(|r| r.ready) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("the operator was not ready within {}s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the operator has made no request for `quiet`, at most `timeout`.
    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> Result<Counts> {
        let started = Instant::now();
        let mut last = self.counts().await?;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let now = self.counts().await?;
            if now.total != last.total {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet || started.elapsed() >= timeout {
                return Ok(now);
            }
        }
    }

    /// Stops the operator: a child sees its stdin close and stops gracefully, or is killed
    /// after 10 s.
    pub async fn stop(self) {
        match self {
            OperatorUnderTest::Child {
                mut child, stdin, ..
            } => {
                drop(stdin);
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
            OperatorUnderTest::InProcess { operator, .. } => operator.stop().await,
        }
    }
}
