//! Real-process chaos under the watch-history checker (I1: never two pods labelled leader at
//! any observed pod event; I5: the leader Service's EndpointSlices never list two pods).
//!
//! - Two real `podium run --leader-elect` processes. Round after round a handover is started
//!   (preferredLeader, the leader NotReady, the leader deleted) and the active replica is frozen
//!   with SIGSTOP the instant a write of that handover shows in a watch: the group's Lease
//!   changing holder, or (other rounds) the first change of a leader label. While it is frozen
//!   leadership is moved elsewhere (preferredLeader to another pod, or the pod it was handing
//!   over to made NotReady), the standby takes the operator Lease over and acts, and then the
//!   frozen replica is resumed with whatever it had in flight. Some rounds send SIGTERM instead,
//!   in the middle of the handover, and start that replica again afterwards.
//!
//!   Both processes talk to the API server through a relay that holds every byte from the
//!   server back for a few milliseconds (`PODIUM_CHAOS_LATENCY_MS`, 25 by default), as a
//!   network would; the test itself watches without it, so its SIGSTOP reliably lands after
//!   the write it saw and before the replica has heard back and sent its next write.
//!
//!   `PODIUM_CHAOS_ROUNDS` (default 20) sets the number of rounds; each takes about 5 s.
//!
//! - One replica, in process, whose pod watch lags its Lease watch: every body chunk of a pod
//!   watch response is held back 300–800 ms (in order), while Lease and group watches and every
//!   other request pass at once. Leadership is moved the moment the Lease names a new holder,
//!   so the operator keeps deciding with a pod cache that has not seen its own last label
//!   writes. `PODIUM_CHAOS_LAG_STEPS` (default 30) sets the number of moves.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::checker::Checker;
use common::{
    Fixture, fixture, fixture_without_kubelet, is_ready, pod_ip, start_operator, wait_for,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use podium::crd::{ROLE_LABEL, ROLE_LEADER};
use podium_testkit::leader_process::{
    NOTIFY_PORT, OPERATOR_ACCOUNT, ProcessPods, Work, overlaps, unix_nanos,
};
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{set_pod_not_ready, set_pod_running_ready};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Both tests time their actions against the operator's reactions: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const OPERATOR_LEASE: &str = "podium-operator";
const GROUP: &str = "web";
const APP: &str = "web";
const PODS: usize = 4;
/// The operator Lease TTL of the real processes: a frozen replica loses it within about 2 s.
const OPERATOR_TTL_SECS: u64 = 2;
/// The group's term with leader processes: a replica that takes the operator over activates
/// nobody new for one term.
const NOTIFY_TTL_SECS: u64 = 4;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator: the variation needs no quality, and the seed is printed so a
/// run can be repeated (`PODIUM_CHAOS_SEED`).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("PODIUM_CHAOS_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64);
                nanos ^ NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            });
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A number in `range` (which must not be empty).
    fn in_range(&mut self, range: Range<u64>) -> u64 {
        range.start + self.next() % (range.end - range.start)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            items.get(self.next() as usize % items.len())
        }
    }
}

/// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) to `pid`; false if it could not be delivered
/// (the process is gone).
fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------------------------
// Watches of the test's own: the group's Lease and the leader labels, with a tripwire that
// signals a replica the instant a handover write shows.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FreezeOn {
    /// The group's Lease names a new holder.
    HolderChange,
    /// A pod gains or loses the leader label.
    LeaderLabel,
}

struct Arm {
    pid: u32,
    signal: &'static str,
    on: FreezeOn,
    holder_before: Option<String>,
    fired: oneshot::Sender<Fired>,
}

struct Fired {
    at: Instant,
    what: String,
}

#[derive(Default)]
struct Tripwire {
    arm: Mutex<Option<Arm>>,
}

impl Tripwire {
    fn arm(
        &self,
        pid: u32,
        signal: &'static str,
        on: FreezeOn,
        holder_before: Option<String>,
    ) -> oneshot::Receiver<Fired> {
        let (fired, rx) = oneshot::channel();
        *self.arm.lock().unwrap() = Some(Arm {
            pid,
            signal,
            on,
            holder_before,
            fired,
        });
        rx
    }

    fn disarm(&self) {
        self.arm.lock().unwrap().take();
    }

    /// Fires (signals the armed process) if `on` is what it waits for and `holder`, for a
    /// holder change, differs from the holder it was armed with.
    fn seen(&self, on: FreezeOn, holder: Option<&str>, what: impl FnOnce() -> String) {
        let arm = {
            let mut slot = self.arm.lock().unwrap();
            match &*slot {
                Some(a)
                    if a.on == on
                        && (on != FreezeOn::HolderChange
                            || a.holder_before.as_deref() != holder) =>
                {
                    slot.take()
                }
                _ => None,
            }
        };
        if let Some(arm) = arm {
            signal(arm.pid, arm.signal);
            let at = Instant::now();
            let _ = arm.fired.send(Fired { at, what: what() });
        }
    }
}

/// The group's Lease as (holder, epoch), every observation in order, and the latest.
struct Watches {
    tripwire: Arc<Tripwire>,
    lease: watch::Receiver<(Option<String>, i32)>,
    epochs: Arc<Mutex<Vec<i32>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Watches {
    async fn start(client: &Client, ns: &str) -> Watches {
        let tripwire = Arc::new(Tripwire::default());
        let epochs = Arc::new(Mutex::new(Vec::new()));
        let (lease_tx, lease) = watch::channel((None, 0));
        let mut tasks = Vec::new();

        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let config = watcher::Config::default().fields(&format!("metadata.name={GROUP}"));
        let (tw, ep) = (tripwire.clone(), epochs.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(leases, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let (Ok(Event::Apply(l)) | Ok(Event::InitApply(l))) = event else {
                    continue;
                };
                let spec = l.spec.unwrap_or_default();
                let holder = spec.holder_identity.filter(|h| !h.is_empty());
                let epoch = spec.lease_transitions.unwrap_or(0);
                // Published before the tripwire fires, so whoever it wakes reads this holder.
                let before = lease_tx.send_replace((holder.clone(), epoch)).0;
                ep.lock().unwrap().push(epoch);
                tw.seen(FreezeOn::HolderChange, holder.as_deref(), || {
                    format!("Lease {GROUP}: holder {before:?} -> {holder:?} at epoch {epoch}")
                });
            }
        }));

        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let config = watcher::Config::default().labels(&format!("app={APP}"));
        let tw = tripwire.clone();
        tasks.push(tokio::spawn(async move {
            let mut roles: BTreeMap<String, Option<String>> = BTreeMap::new();
            let mut stream = watcher(pods, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Apply(p) | Event::InitApply(p)) => {
                        let name = p.name_any();
                        let role = p.labels().get(ROLE_LABEL).cloned();
                        let before = roles.insert(name.clone(), role.clone());
                        let leader = |r: &Option<String>| r.as_deref() == Some(ROLE_LEADER);
                        if let Some(before) = before
                            && before != role
                            && (leader(&before) || leader(&role))
                        {
                            tw.seen(FreezeOn::LeaderLabel, None, || {
                                format!("pod {name}: role {before:?} -> {role:?}")
                            });
                        }
                    }
                    Ok(Event::Delete(p)) => {
                        roles.remove(&p.name_any());
                    }
                    _ => {}
                }
            }
        }));
        let watches = Watches {
            tripwire,
            lease,
            epochs,
            tasks,
        };
        // Let both watches list before anything happens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        watches
    }

    fn holder(&self) -> Option<String> {
        self.lease.borrow().0.clone()
    }

    /// Waits until the Lease names a holder other than `not`; returns it.
    async fn holder_other_than(&mut self, not: Option<&str>, timeout: Duration) -> Option<String> {
        let changed = tokio::time::timeout(
            timeout,
            self.lease
                .wait_for(|(h, _)| h.is_some() && h.as_deref() != not),
        )
        .await;
        match changed {
            Ok(Ok(state)) => state.0.clone(),
            _ => None,
        }
    }

    /// Every epoch seen, in order, must be at least the one before.
    fn assert_epochs_monotonic(&self) {
        let epochs = self.epochs.lock().unwrap();
        for pair in epochs.windows(2) {
            assert!(
                pair[1] >= pair[0],
                "the group's epoch went backwards: {} -> {} (all: {epochs:?})",
                pair[0],
                pair[1]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture helpers.

/// Ready, non-terminating pods of the app, by name, with their IPs.
async fn ready_pods(f: &Fixture) -> Vec<String> {
    let list = f
        .pods()
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
        .expect("list pods");
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
        .map(|p| p.name_any())
        .collect()
}

async fn prefer(f: &Fixture, pod: &str) {
    f.groups()
        .patch(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "preferredLeader": pod } })),
        )
        .await
        .expect("set preferredLeader");
}

/// Makes every pod in `not_ready` that still exists Ready again (with the IP it had).
async fn restore_ready(f: &Fixture, not_ready: &mut BTreeSet<String>) {
    for pod in std::mem::take(not_ready) {
        let Ok(Some(p)) = f.pods().get_opt(&pod).await else {
            continue;
        };
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ip = pod_ip(&p);
        if let Err(e) = set_pod_running_ready(&f.client, &f.ns, &pod, &ip).await {
            println!("  (could not make {pod} Ready again: {e:#})");
        }
    }
}

/// Waits until exactly one pod is labelled leader, the group's Lease names it, it is Ready, and
/// that still holds 300 ms later; returns (leader, epoch).
async fn settled(f: &Fixture, timeout: Duration) -> (String, i32) {
    let once = || async {
        let leaders = f.leaders().await;
        let [leader] = leaders.as_slice() else {
            return None;
        };
        let lease = f.leases().get_opt(GROUP).await.ok()??;
        let spec = lease.spec?;
        let name = leader.name_any();
        (spec.holder_identity.as_deref() == Some(name.as_str())
            && is_ready(leader)
            && leader.metadata.deletion_timestamp.is_none())
        .then(|| (name, spec.lease_transitions.unwrap_or(0)))
    };
    wait_for(
        timeout,
        "one Ready leader that the group's Lease names, stable for 300 ms",
        || async {
            let first = once().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            (once().await? == first).then_some(first)
        },
    )
    .await
}

fn summarize(violations: &[String]) -> String {
    let count = |prefix: &str| violations.iter().filter(|v| v.starts_with(prefix)).count();
    let (i1, i5) = (count("I1"), count("I5"));
    format!(
        "{} violations (I1: {i1}, I5: {i5}, other: {})",
        violations.len(),
        violations.len() - i1 - i5
    )
}

// ---------------------------------------------------------------------------------------------
// Two real processes.

/// A TCP relay in front of the API server that holds every byte coming from the server back
/// for `delay` (bytes to the server pass at once). TLS passes through untouched: the relay
/// listens on 127.0.0.1 too, so the serving certificate still matches.
struct Relay {
    port: u16,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_relay(upstream: SocketAddr, delay: Duration) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let port = listener.local_addr().expect("relay address").port();
    let task = tokio::spawn(async move {
        // Dropping the set (when the relay is dropped) ends every connection.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            if let Ok((client, _)) = listener.accept().await {
                connections.spawn(relay_connection(client, upstream, delay));
            }
        }
    });
    Relay { port, task }
}

async fn relay_connection(client: TcpStream, upstream: SocketAddr, delay: Duration) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let read_down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due = tokio::time::Instant::now() + delay;
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let write_down = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if client_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, read_down, write_down);
}

/// The operator processes. Every one is SIGKILLed and reaped on drop, also when the test
/// panics (a stopped process dies of SIGKILL too).
struct Replicas {
    ns: String,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    identities: Vec<String>,
    children: Vec<Option<Child>>,
    /// Extra environment of every replica.
    env: Vec<(String, String)>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if std::thread::panicking() {
            println!("{}", self.tails(40));
        }
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Replicas {
    fn new(ns: &str, relay_port: u16, identities: &[&str], env: &[(&str, String)]) -> Replicas {
        let testbed = Testbed::shared();
        let dir = tempfile::Builder::new()
            .prefix("podium-chaos-")
            .tempdir()
            .expect("temp dir");
        let original =
            std::fs::read_to_string(testbed.kubeconfig_path()).expect("read the kubeconfig");
        let server = testbed.server_url();
        assert!(original.contains(&server), "{server} not in the kubeconfig");
        let relayed = original.replace(&server, &format!("https://127.0.0.1:{relay_port}"));
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, relayed).expect("write the relayed kubeconfig");
        Replicas {
            ns: ns.to_string(),
            kubeconfig,
            dir,
            identities: identities.iter().map(|s| s.to_string()).collect(),
            children: identities.iter().map(|_| None).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.identities[i]))
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(i))
            .expect("open the replica's log");
        let child = Command::new(env!("CARGO_BIN_EXE_podium"))
            .args([
                "run",
                "--leader-elect",
                "--leader-election-namespace",
                &self.ns,
                "--leader-election-ttl",
                &OPERATOR_TTL_SECS.to_string(),
                "--identity",
                &self.identities[i],
                "--watch-namespace",
                &self.ns,
                "--http-addr",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "warn,podium=info")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start the podium binary");
        self.children[i] = Some(child);
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().expect("replica running").id()
    }

    fn index_of(&self, identity: &str) -> Option<usize> {
        self.identities.iter().position(|i| i == identity)
    }

    /// Waits (up to `timeout`) for replica `i` to exit; returns how it exited and clears it.
    async fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.children[i].as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.children[i] = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last `n` lines of each replica's log.
    fn tails(&self, n: usize) -> String {
        let mut out = String::new();
        for i in 0..self.identities.len() {
            let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} (last {n} lines)\n", self.identities[i]));
            for line in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

async fn operator_holder(f: &Fixture) -> Option<String> {
    f.leases()
        .get_opt(OPERATOR_LEASE)
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[derive(Clone, Copy, Debug)]
enum Trigger {
    Prefer,
    NotReady,
    Delete,
}

/// How leadership is moved while the replica that started the handover is frozen.
#[derive(Clone, Debug)]
enum Move {
    /// preferredLeader set to this pod: the standby must make it the leader.
    Prefer(String),
    /// This pod (which the frozen replica was handing over to) made NotReady.
    NotReady(String),
    /// Nothing left to move to; the standby only has to finish the handover.
    Nothing,
}

/// Who plays the kubelet for the app's pods, and so what deleting one means.
enum AppPods {
    /// The fixture's simulated kubelet, under a Deployment that replaces a deleted pod.
    Simulated,
    /// Pods running real `podium exec` processes with leader-only work: deleting one stops its
    /// process (SIGTERM) before the deletion is finalised, and a new pod takes its place.
    Processes(Box<LeaderProcesses>),
}

struct LeaderProcesses {
    pods: ProcessPods,
    /// Pods started so far (named `web-0`, `web-1`, ...).
    started: usize,
    /// For each round, how long after its trigger the leader it settled on started its work.
    activations: Vec<Duration>,
}

impl AppPods {
    /// `PODS` pods of the app, each running a real `podium exec` whose leader-only work logs
    /// its starts and stops to `dir`.
    async fn processes(f: &Fixture, dir: &std::path::Path) -> AppPods {
        let pods = ProcessPods::new(
            &f.client,
            &f.ns,
            GROUP,
            std::path::Path::new(env!("CARGO_BIN_EXE_podium")),
            Testbed::shared().kubeconfig_path(),
            dir,
        )
        .await
        .expect("process pods");
        let mut processes = LeaderProcesses {
            pods,
            started: 0,
            activations: Vec::new(),
        };
        processes.replace_deleted(f).await;
        AppPods::Processes(Box::new(processes))
    }

    async fn delete(&mut self, f: &Fixture, pod: &str) {
        match self {
            AppPods::Simulated => f.delete_pod(pod).await,
            AppPods::Processes(p) => p.pods.delete(pod).await.expect("delete the pod"),
        }
    }

    /// Starts new pods until the app has `PODS` again (the Deployment does that for simulated
    /// pods).
    async fn replace_deleted(&mut self, f: &Fixture) {
        if let AppPods::Processes(p) = self {
            p.replace_deleted(f).await;
        }
    }

    /// Waits until the leader the group's Lease names runs its leader-only work at the Lease's
    /// epoch; returns what to add to the round's line.
    async fn activated(&mut self, watches: &Watches, triggered_ns: u128) -> String {
        let AppPods::Processes(p) = self else {
            return String::new();
        };
        let run = p.current_run(watches, Duration::from_secs(20)).await;
        let delay = Duration::from_nanos(run.start_ns.saturating_sub(triggered_ns) as u64);
        p.activations.push(delay);
        format!(
            "; its process started leader work {:.1}s after the trigger",
            delay.as_secs_f64()
        )
    }
}

impl LeaderProcesses {
    async fn replace_deleted(&mut self, f: &Fixture) {
        let list = f
            .pods()
            .list(&ListParams::default().labels(&format!("app={APP}")))
            .await
            .expect("list pods");
        let alive = list
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        for _ in alive..PODS {
            let name = format!("{APP}-{}", self.started);
            self.started += 1;
            self.pods.start(&name, APP).await.expect("start a pod");
        }
    }

    fn runs(&self) -> Vec<Work> {
        self.pods.runs().expect("the work log parses")
    }

    /// The run of the pod the group's Lease names, at the Lease's epoch, once it has started.
    async fn current_run(&self, watches: &Watches, timeout: Duration) -> Work {
        wait_for(
            timeout,
            "the leader's process to start its leader-only work at the current epoch",
            || async {
                let (holder, epoch) = watches.lease.borrow().clone();
                let holder = holder?;
                self.runs()
                    .into_iter()
                    .find(|r| r.pod == holder && r.epoch == epoch as u64)
            },
        )
        .await
    }
}

/// The two real replicas' chaos, round after round (see the module's doc), on a group of
/// `PODS` pods of `APP` whose kubelet `pods` plays, under `checker`. The replicas run with
/// `env`; the group gets `spec` merged into its own.
async fn two_replica_chaos(
    f: &Fixture,
    checker: &Checker,
    pods: &mut AppPods,
    rounds: usize,
    env: &[(&str, String)],
    spec: serde_json::Value,
) -> Replicas {
    let latency = Duration::from_millis(env_number("PODIUM_CHAOS_LATENCY_MS", 25));
    let mut rng = Rng::seeded();
    println!(
        "chaos: {rounds} rounds, relay latency {latency:?}, seed {}",
        rng.0
    );
    // I4 (a NotReady or terminating leader keeps its label) is suspended while a replica is
    // frozen on purpose, and allowed a few seconds otherwise: the relay slows every reaction.
    checker.set_reaction(Some(Duration::from_secs(5)));
    let watches = Watches::start(&f.client, &f.ns).await;

    let upstream: SocketAddr = Testbed::shared()
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .expect("the API server's address");
    let relay = start_relay(upstream, latency).await;
    let mut replicas = Replicas::new(&f.ns, relay.port, &["chaos-a", "chaos-b"], env);
    replicas.spawn(0);
    wait_for(
        Duration::from_secs(30),
        "chaos-a to hold the operator Lease",
        || async { (operator_holder(f).await.as_deref() == Some("chaos-a")).then_some(()) },
    )
    .await;
    replicas.spawn(1);
    let created_ns = unix_nanos();
    f.group(GROUP, APP, spec).await;
    settled(f, Duration::from_secs(30)).await;
    let first = pods.activated(&watches, created_ns).await;
    println!("the group settled{first}");
    // Let the standby list everything before it is needed.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let mut not_ready: BTreeSet<String> = BTreeSet::new();
    let mut preferred: Option<String> = None;
    let mut rounds_with_violations = 0;
    for round in 0..rounds {
        let round_started = Instant::now();
        // Start from a quiet group (a pod made Ready again may have drawn leadership back to
        // the preferred pod after the last round).
        let (leader, _) = settled(f, Duration::from_secs(30)).await;
        let active_identity = wait_for(
            Duration::from_secs(30),
            "a running replica to hold the operator Lease",
            || async {
                let holder = operator_holder(f).await?;
                let i = replicas.index_of(&holder)?;
                replicas.children[i].as_ref().map(|_| holder)
            },
        )
        .await;
        let active = replicas.index_of(&active_identity).expect("one of ours");
        let standby = 1 - active;
        let standby_identity = replicas.identities[standby].clone();
        let trigger = [Trigger::Prefer, Trigger::NotReady, Trigger::Delete][round % 3];
        let freeze_on = if (round / 3) % 2 == 0 {
            FreezeOn::HolderChange
        } else {
            FreezeOn::LeaderLabel
        };
        let sigterm = round % 5 == 4;
        let sig = if sigterm { "TERM" } else { "STOP" };
        let violations_before = checker.violations().len();

        checker.pause_i4();
        let fired =
            watches
                .tripwire
                .arm(replicas.pid(active), sig, freeze_on, Some(leader.clone()));
        let triggered_at = Instant::now();
        let triggered_ns = unix_nanos();
        let mut target = None;
        match trigger {
            Trigger::Prefer => {
                let candidates: Vec<String> = ready_pods(f)
                    .await
                    .into_iter()
                    .filter(|p| *p != leader && Some(p) != preferred.as_ref())
                    .collect();
                let pod = rng.pick(&candidates).expect("a pod to prefer").clone();
                prefer(f, &pod).await;
                preferred = Some(pod.clone());
                target = Some(pod);
            }
            Trigger::NotReady => {
                set_pod_not_ready(&f.client, &f.ns, &leader)
                    .await
                    .expect("make the leader NotReady");
                not_ready.insert(leader.clone());
            }
            // Below, while the pod is deleted: its process may take a moment to stop.
            Trigger::Delete => {}
        }
        let deleting = async {
            if let Trigger::Delete = trigger {
                pods.delete(f, &leader).await;
            }
        };
        let handover = async {
            let fired = match tokio::time::timeout(Duration::from_secs(20), fired).await {
                Ok(Ok(fired)) => fired,
                _ => {
                    watches.tripwire.disarm();
                    panic!(
                        "round {round}: no handover write seen within 20 s of {trigger:?} on {leader}"
                    );
                }
            };

            // The active replica is frozen (or shutting down) right after a write of its own.
            // Move leadership away from wherever it was heading.
            let heading = watches.holder();
            let exclude: Vec<Option<&str>> =
                vec![Some(leader.as_str()), heading.as_deref(), target.as_deref()];
            let others: Vec<String> = ready_pods(f)
                .await
                .into_iter()
                .filter(|p| !exclude.contains(&Some(p.as_str())))
                .collect();
            let moved_from_leader = heading.as_deref().is_some_and(|h| h != leader);
            let mv = if round % 2 == 1 && moved_from_leader {
                Move::NotReady(heading.clone().unwrap_or_default())
            } else if let Some(pod) = rng.pick(&others) {
                Move::Prefer(pod.clone())
            } else if moved_from_leader {
                Move::NotReady(heading.clone().unwrap_or_default())
            } else {
                Move::Nothing
            };
            match &mv {
                Move::Prefer(pod) => {
                    prefer(f, pod).await;
                    preferred = Some(pod.clone());
                }
                Move::NotReady(pod) => {
                    if set_pod_not_ready(&f.client, &f.ns, pod).await.is_ok() {
                        not_ready.insert(pod.clone());
                    }
                }
                Move::Nothing => {}
            }

            // The standby takes the operator over and moves leadership.
            let takeover = wait_for(
                Duration::from_secs(20),
                &format!("round {round}: {standby_identity} to take the operator Lease over"),
                || async {
                    (operator_holder(f).await.as_deref() == Some(standby_identity.as_str()))
                        .then(Instant::now)
                },
            )
            .await;
            let (acted, acted_at) = wait_for(
                Duration::from_secs(20),
                &format!("round {round}: {standby_identity} to move leadership ({mv:?})"),
                || async {
                    let holder = watches.holder()?;
                    let wanted = match &mv {
                        Move::Prefer(pod) => holder == *pod,
                        Move::NotReady(pod) => holder != *pod && holder != leader,
                        Move::Nothing => holder != leader,
                    };
                    let labelled = f.leaders().await.iter().any(|p| p.name_any() == holder);
                    (wanted && labelled).then(|| (holder, Instant::now()))
                },
            )
            .await;
            format!(
                "SIG{sig} {active_identity} on {freeze_on:?} {:?} later ({}); frozen heading to \
                 {heading:?}; moved {mv:?}; {standby_identity} took over after {:.1}s and made \
                 {acted} leader after {:.1}s",
                fired.at.duration_since(triggered_at),
                fired.what,
                takeover.duration_since(fired.at).as_secs_f64(),
                acted_at.duration_since(fired.at).as_secs_f64(),
            )
        };
        let ((), handover) = tokio::join!(deleting, handover);

        // Resume the frozen replica with whatever it had in flight, or start the stopped one
        // again.
        let resumed = if sigterm {
            let exit = replicas
                .wait_exit(active, Duration::from_secs(10))
                .await
                .map_or("still running after 10 s".to_string(), |s| s.to_string());
            replicas.spawn(active);
            format!("exited ({exit}) and restarted")
        } else {
            signal(replicas.pid(active), "CONT");
            "resumed".to_string()
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;

        restore_ready(f, &mut not_ready).await;
        pods.replace_deleted(f).await;
        f.wait_ready(APP, PODS).await;
        let (next, epoch) = settled(f, Duration::from_secs(30)).await;
        let activated = pods.activated(&watches, triggered_ns).await;
        checker.resume_i4();
        let violations = checker.violations();
        let new = &violations[violations_before..];
        if !new.is_empty() {
            rounds_with_violations += 1;
        }
        println!(
            "round {round:>2}: {trigger:?} on {leader}; {handover}; {active_identity} {resumed}; \
             settled on {next} at epoch {epoch} ({:.1}s){activated}; new violations: {}{}",
            round_started.elapsed().as_secs_f64(),
            new.len(),
            if new.is_empty() {
                String::new()
            } else {
                format!("\n    {}", new.join("\n    "))
            },
        );
    }

    let violations = checker.violations();
    println!(
        "chaos summary: {rounds} rounds in {:.0}s, {rounds_with_violations} rounds with violations, {}",
        started.elapsed().as_secs_f64(),
        summarize(&violations)
    );
    watches.assert_epochs_monotonic();
    checker.assert_invariants(&f.client, &f.ns).await;
    let leaders: Vec<String> = f.leaders().await.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        leaders.len(),
        1,
        "exactly one leader at the end: {leaders:?}"
    );
    drop(relay);
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_real_replicas_frozen_inside_handovers_never_show_two_leaders() {
    let _serial = SERIAL.lock().await;
    let rounds = env_number("PODIUM_CHAOS_ROUNDS", 20) as usize;
    let f = fixture("chaos").await;
    f.deploy(APP, PODS as i32).await;
    let service = f.leader_service(APP).await;
    let checker = Checker::start(&f.client, &f.ns, GROUP, Some(&service)).await;
    let spec = json!({ "leaseDurationSeconds": 4 });
    two_replica_chaos(&f, &checker, &mut AppPods::Simulated, rounds, &[], spec).await;
}

/// The same chaos on pods that run real leader-only processes (`spec.notify`, `podium exec`),
/// which this test plays the kubelet for: on top of never two leader labels, no two leader
/// processes ever run at once, and the leader's process really moves with every handover.
/// `PODIUM_CHAOS_NOTIFY_ROUNDS` (default 8) sets the number of rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_real_replicas_frozen_inside_handovers_never_overlap_leader_processes() {
    let _serial = SERIAL.lock().await;
    let rounds = env_number("PODIUM_CHAOS_NOTIFY_ROUNDS", 8) as usize;
    let f = fixture_without_kubelet("chaos-notify").await;
    let dir = tempfile::Builder::new()
        .prefix("podium-chaos-notify-")
        .tempdir()
        .expect("temp dir");
    let checker = Checker::start(&f.client, &f.ns, GROUP, None).await;
    let mut pods = AppPods::processes(&f, dir.path()).await;
    f.wait_ready(APP, PODS).await;
    let account = [(
        "PODIUM_SERVICE_ACCOUNT",
        format!("{}/{OPERATOR_ACCOUNT}", f.ns),
    )];
    let spec =
        json!({ "leaseDurationSeconds": NOTIFY_TTL_SECS, "notify": { "port": NOTIFY_PORT } });
    let replicas = two_replica_chaos(&f, &checker, &mut pods, rounds, &account, spec).await;

    let AppPods::Processes(p) = &pods else {
        unreachable!("process pods")
    };
    let all = p.runs();
    let found = overlaps(&all);
    let distinct: BTreeSet<(&str, u64)> = all.iter().map(|r| (r.pod.as_str(), r.epoch)).collect();
    let pods_run: BTreeSet<&str> = all.iter().map(|r| r.pod.as_str()).collect();
    let handovers = all.windows(2).filter(|w| w[0].pod != w[1].pod).count();
    let max_delay = p.activations.iter().max().copied().unwrap_or_default();
    println!(
        "notify chaos summary: {rounds} rounds, {} leader runs ({} pod/epoch pairs on {} pods), \
         {handovers} handovers moved the leader process, max activation delay {:.1}s after a \
         trigger (term {NOTIFY_TTL_SECS}s), {} overlaps",
        all.len(),
        distinct.len(),
        pods_run.len(),
        max_delay.as_secs_f64(),
        found.len()
    );
    let origin = all.first().map_or(0, |r| r.start_ns);
    let ms = |ns: u128| (ns.saturating_sub(origin) / 1_000_000).to_string();
    let listed: Vec<String> = all
        .iter()
        .map(|r| {
            let stop = r.stop_ns.map_or("running".to_string(), ms);
            format!("{}@{} {}..{}", r.pod, r.epoch, ms(r.start_ns), stop)
        })
        .collect();
    println!(
        "leader runs (ms after the first start): {}",
        listed.join(", ")
    );
    if !found.is_empty() {
        println!("leader runs: {all:#?}");
        println!("{}", replicas.tails(400));
        for name in p.pods.pods.keys() {
            let log = dir.path().join(format!("{name}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            println!("--- podium exec in {name}\n{text}");
        }
    }
    assert!(found.is_empty(), "leader processes overlapped: {found:#?}");
    assert!(
        distinct.len() > rounds && pods_run.len() > 1,
        "the leader process hardly moved: {all:#?}"
    );
    drop(replicas);
}

// ---------------------------------------------------------------------------------------------
// One replica whose pod watch lags.

/// Counts what the lagging client held back.
#[derive(Default)]
struct LagStats {
    watches: AtomicU64,
    chunks: AtomicU64,
    held_ms: AtomicU64,
}

/// A client that holds back every body chunk of a pod watch response by a random time in
/// `lag` (milliseconds), keeping their order, and passes everything else (Lease and group
/// watches, lists, writes) at once. Built as faults.rs builds its clients, with
/// `ClientBuilder` over a service stack: here the stack is a router whose only route forwards
/// each request through an ordinary client to the API server.
fn lagging_pod_watch_client(lag: Range<u64>, stats: Arc<LagStats>) -> Client {
    let inner = Testbed::shared().client();
    let router = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (inner, lag, stats) = (inner.clone(), lag.clone(), stats.clone());
        async move { forward(inner, req, lag, stats).await }
    });
    kube::client::ClientBuilder::new(router, "default").build()
}

fn is_pod_watch(uri: &http::Uri) -> bool {
    uri.path().ends_with("/pods")
        && uri
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"))
}

fn unavailable(message: String) -> axum::response::Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "ServiceUnavailable", "code": 503,
    });
    http::Response::builder()
        .status(503)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .expect("a valid response")
}

async fn forward(
    inner: Client,
    req: axum::extract::Request,
    lag: Range<u64>,
    stats: Arc<LagStats>,
) -> axum::response::Response {
    let delay = is_pod_watch(req.uri());
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return unavailable(format!("reading the request body: {e}")),
    };
    let req = http::Request::from_parts(parts, kube::client::Body::from(bytes));
    let res = match inner.send(req).await {
        Ok(r) => r,
        Err(e) => return unavailable(format!("forwarding: {e}")),
    };
    let (parts, body) = res.into_parts();
    let body = axum::body::Body::new(body);
    let body = if delay {
        stats.watches.fetch_add(1, Ordering::Relaxed);
        held_back(body, lag, stats)
    } else {
        body
    };
    http::Response::from_parts(parts, body)
}

/// `body` with each chunk delivered a random `lag` after it arrived, and never before the
/// chunk ahead of it.
fn held_back(body: axum::body::Body, lag: Range<u64>, stats: Arc<LagStats>) -> axum::body::Body {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut rng = Rng::seeded();
        let mut chunks = body.into_data_stream();
        let mut due = tokio::time::Instant::now();
        loop {
            let chunk = tokio::select! {
                chunk = chunks.next() => chunk,
                _ = tx.closed() => None,
            };
            let Some(chunk) = chunk else { break };
            let now = tokio::time::Instant::now();
            due = due.max(now + Duration::from_millis(rng.in_range(lag.clone())));
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            stats
                .held_ms
                .fetch_add((due - now).as_millis() as u64, Ordering::Relaxed);
            if tx.send((due, chunk)).is_err() {
                break;
            }
        }
    });
    let delivered = futures::stream::unfold(rx, |mut rx| async move {
        let (due, chunk) = rx.recv().await?;
        tokio::time::sleep_until(due).await;
        Some((chunk, rx))
    });
    axum::body::Body::from_stream(delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_whose_pod_watch_lags_its_lease_watch_never_shows_two_leaders() {
    let _serial = SERIAL.lock().await;
    let steps = env_number("PODIUM_CHAOS_LAG_STEPS", 30) as usize;
    let mut rng = Rng::seeded();
    println!(
        "lag chaos: {steps} moves, pod watch chunks held back 300-800 ms, seed {}",
        rng.0
    );
    let f = fixture("chaos-lag").await;
    f.deploy(APP, PODS as i32).await;
    let service = f.leader_service(APP).await;
    let checker = Checker::start(&f.client, &f.ns, GROUP, Some(&service)).await;
    // The operator learns of readiness changes up to 800 ms late and retries stale writes.
    checker.set_reaction(Some(Duration::from_secs(5)));
    let mut watches = Watches::start(&f.client, &f.ns).await;
    let stats = Arc::new(LagStats::default());
    let operator = start_operator(
        lagging_pod_watch_client(300..800, stats.clone()),
        &f.ns,
        None,
    )
    .await;
    f.group(GROUP, APP, json!({ "leaseDurationSeconds": 4 }))
        .await;
    settled(&f, Duration::from_secs(30)).await;

    let started = Instant::now();
    let mut not_ready: BTreeSet<String> = BTreeSet::new();
    let mut deleted = 0;
    let mut preferred: Option<String> = None;
    // The holder before the current one: the operator wrote its labels last, so its cache
    // holds a stale resourceVersion for it and a promote of it would only be refused.
    let mut previous: Option<String> = None;
    let mut last_action = "";
    for step in 0..steps {
        let Some(holder) = watches.holder() else {
            panic!("step {step}: the group's Lease names nobody");
        };
        let ready: Vec<String> = ready_pods(&f)
            .await
            .into_iter()
            .filter(|p| *p != holder && Some(p) != preferred.as_ref())
            .collect();
        // Prefer a pod the operator has not written lately: its promote goes through, while
        // the pod cache may not show yet that the current holder carries the leader label.
        let untouched: Vec<String> = ready
            .iter()
            .filter(|p| Some(*p) != previous.as_ref())
            .cloned()
            .collect();
        // Mostly preferredLeader, which the operator sees at once (group watches are not held
        // back) while its pod cache has not yet shown its own last promote.
        // Deleting the pod a switchover just promoted, at once, races the promote with the
        // kubelet and leaves the operator to learn of both late.
        let after_switchover = last_action == "prefer" && rng.next().is_multiple_of(2);
        let action = match rng.next() % 5 {
            // Deleting takes a replacement pod a moment to be Ready: not too often.
            _ if after_switchover && deleted < steps / 3 => "delete",
            0 if deleted < steps / 3 => "delete",
            1 if ready.len() >= 2 && not_ready.len() < 2 => "not-ready",
            _ => "prefer",
        };
        match action {
            "delete" => {
                deleted += 1;
                f.delete_pod(&holder).await;
            }
            "not-ready" => {
                if set_pod_not_ready(&f.client, &f.ns, &holder).await.is_ok() {
                    not_ready.insert(holder.clone());
                }
            }
            _ => {
                let Some(pod) = rng.pick(&untouched).or_else(|| rng.pick(&ready)) else {
                    restore_ready(&f, &mut not_ready).await;
                    continue;
                };
                prefer(&f, pod).await;
                preferred = Some(pod.clone());
            }
        }
        let moved_at = Instant::now();
        let next = watches
            .holder_other_than(Some(&holder), Duration::from_secs(15))
            .await;
        let Some(next) = next else {
            panic!("step {step}: {action} on {holder} moved nothing within 15 s");
        };
        println!(
            "step {step:>2}: {action} on {holder}: the Lease named {next} after {:?}; violations so far: {}",
            moved_at.elapsed(),
            checker.violations().len()
        );
        previous = Some(holder);
        last_action = action;
        // Act again at once, or (one time in three) after a short pause.
        let pause = if rng.next().is_multiple_of(3) {
            rng.in_range(0..300)
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if step % 4 == 3 {
            restore_ready(&f, &mut not_ready).await;
        }
    }
    restore_ready(&f, &mut not_ready).await;
    f.wait_ready(APP, PODS).await;
    let (leader, epoch) = settled(&f, Duration::from_secs(30)).await;
    let (watched, chunks, held) = (
        stats.watches.load(Ordering::Relaxed),
        stats.chunks.load(Ordering::Relaxed),
        stats.held_ms.load(Ordering::Relaxed),
    );
    let violations = checker.violations();
    println!(
        "lag chaos summary: {steps} moves in {:.0}s, settled on {leader} at epoch {epoch}; \
         {chunks} pod watch chunks over {watched} watches held back {} ms on average; {}",
        started.elapsed().as_secs_f64(),
        held / chunks.max(1),
        summarize(&violations)
    );
    assert!(
        chunks >= steps as u64,
        "the pod watch was hardly held back ({chunks} chunks): the lagging client is not in use"
    );
    watches.assert_epochs_monotonic();
    checker.assert_invariants(&f.client, &f.ns).await;
    assert_eq!(f.leaders().await.len(), 1, "exactly one leader at the end");
    operator.stop().await;
}
