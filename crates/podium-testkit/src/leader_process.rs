//! Pods that run real processes: each pod gets a loopback IP of its own (127.x.y.z), and a
//! real `podium exec` process listens on it with a shell command as its leader-only work. The
//! command appends `start` and `stop` lines to a log shared by all pods, which
//! [`overlaps`] reads back. This plays the kubelet's part for those pods: a deleted pod's
//! process is stopped (SIGTERM) before its deletion is finalised, as a kubelet stops containers.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};

use crate::testbed::kubelet::{bind_pod, create_node, finalize_deletion, set_pod_running_ready};

/// The port `podium exec` listens on in these pods (its default).
pub const NOTIFY_PORT: u16 = 8787;
/// The ServiceAccount whose tokens sign the notifications in these tests.
pub const OPERATOR_ACCOUNT: &str = "podium";

/// A loopback subnet (127.N.0.0/16) no other call in this process has used, so that tests
/// running at once do not share addresses.
fn next_subnet() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // 127.0.0.0/16 holds the API server and the rest of the testbed.
    let pid_part = std::process::id() % 100;
    100 + (pid_part + NEXT.fetch_add(1, Ordering::Relaxed) * 100) % 150
}

/// One pod and the `podium exec` process "in" it.
pub struct ProcessPod {
    pub name: String,
    /// The pod object's UID, which its `podium exec` gets as `POD_UID`.
    pub uid: String,
    pub ip: String,
    process: Option<Child>,
}

impl ProcessPod {
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Child::id)
    }
}

pub struct ProcessPods {
    client: Client,
    namespace: String,
    group: String,
    node: String,
    podium: PathBuf,
    kubeconfig: PathBuf,
    dir: PathBuf,
    subnet: u32,
    next_host: u32,
    pub pods: BTreeMap<String, ProcessPod>,
}

impl ProcessPods {
    /// Prepares `namespace` for pods of group `group` labelled `app=<app>`: a Ready node, and
    /// the ServiceAccount [`OPERATOR_ACCOUNT`] whose tokens the operator signs with.
    pub async fn new(
        client: &Client,
        namespace: &str,
        group: &str,
        podium: &Path,
        kubeconfig: &Path,
        dir: &Path,
    ) -> Result<ProcessPods> {
        let node = format!("node-{namespace}");
        create_node(client, &node).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
        let account: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": OPERATOR_ACCOUNT } }))?;
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e).context("creating the operator's ServiceAccount"),
        }
        Ok(ProcessPods {
            client: client.clone(),
            namespace: namespace.into(),
            group: group.into(),
            node,
            podium: podium.into(),
            kubeconfig: kubeconfig.into(),
            dir: dir.into(),
            subnet: next_subnet(),
            next_host: 1,
            pods: BTreeMap::new(),
        })
    }

    /// The shared log of starts and stops.
    pub fn log(&self) -> PathBuf {
        self.dir.join("leader-work.log")
    }

    /// The leader runs the shared log shows so far.
    pub fn runs(&self) -> Result<Vec<Work>> {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        runs(&text)
    }

    /// Pod `name`'s `podium exec` log (JSON lines, one file across its restarts).
    pub fn pod_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// When pod `name`'s `podium exec` took a `leader` message at `epoch`, in nanoseconds since
    /// the Unix epoch, from its log: the time it was told, just before it starts its command.
    pub fn notified_at(&self, name: &str, epoch: u64) -> Result<Option<u128>> {
        let log = std::fs::read_to_string(self.pod_log(name))
            .with_context(|| format!("reading {}", self.pod_log(name).display()))?;
        leader_message_taken(&log, epoch)
    }

    /// The ServiceAccount tokens are signed as, `NAMESPACE/NAME`.
    pub fn operator_account(&self) -> String {
        format!("{}/{OPERATOR_ACCOUNT}", self.namespace)
    }

    /// The URL the operator sends pod `name`'s role messages to.
    pub fn url(&self, name: &str) -> Result<String> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        Ok(format!(
            "http://{}:{NOTIFY_PORT}{}",
            pod.ip,
            podium_core::crd::DEFAULT_NOTIFY_PATH
        ))
    }

    /// A genuine token for pod `name`, as the operator mints one: what only a holder of the
    /// operator's own credentials can get.
    pub async fn operator_token(&self, name: &str) -> Result<String> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let audience = podium_core::notify::audience(&self.namespace, &self.group, &pod.uid);
        crate::token_holder::mint(&self.client, &self.namespace, OPERATOR_ACCOUNT, &audience).await
    }

    /// The token subject `podium exec` expects.
    pub fn operator_subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{OPERATOR_ACCOUNT}",
            self.namespace
        )
    }

    /// Creates pod `name` (label `app=<app>`), starts its `podium exec`, and reports it
    /// Running and Ready on its loopback IP once the process listens.
    pub async fn start(&mut self, name: &str, app: &str) -> Result<()> {
        let host = self.next_host;
        self.next_host += 1;
        let ip = format!("127.{}.{}.{}", self.subnet, host / 250, host % 250 + 1);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pod: Pod = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { "app": app } },
            "spec": { "containers": [{ "name": "app", "image": "app" }] },
        }))?;
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .with_context(|| format!("creating pod {name}"))?;
        let uid = created
            .metadata
            .uid
            .with_context(|| format!("pod {name} was created without a UID"))?;
        bind_pod(&self.client, &self.namespace, name, &self.node).await?;
        self.pods.insert(
            name.into(),
            ProcessPod {
                name: name.into(),
                uid,
                ip: ip.clone(),
                process: None,
            },
        );
        self.run_process(name).await
    }

    /// Starts pod `name`'s `podium exec` again after it stopped, as a kubelet restarts a
    /// container, and reports the pod Ready once it listens.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        self.run_process(name).await
    }

    async fn run_process(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let (ip, uid) = (pod.ip.clone(), pod.uid.clone());
        let log = self.log();
        let work = format!(
            "echo \"start $POD_NAME $PODIUM_EPOCH $(date +%s%N)\" >> {log}; \
             trap 'echo \"stop $POD_NAME $PODIUM_EPOCH $(date +%s%N)\" >> {log}; exit 0' TERM; \
             while :; do sleep 0.01; done",
            log = log.display()
        );
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pod_log(name))?;
        let process = Command::new(&self.podium)
            .args([
                "exec",
                "--listen",
                &format!("{ip}:{NOTIFY_PORT}"),
                "--pod",
                name,
            ])
            .args(["--group", &self.group])
            .args([
                "--operator",
                &self.operator_subject(),
                "--grace",
                "5s",
                "--",
            ])
            .args(["sh", "-c", &work])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", &self.namespace)
            .env("POD_UID", &uid)
            .env("RUST_LOG", "info")
            .env("PODIUM_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .context("starting podium exec")?;
        if let Some(pod) = self.pods.get_mut(name) {
            pod.process = Some(process);
        }
        wait_listening(&ip, NOTIFY_PORT).await?;
        set_pod_running_ready(&self.client, &self.namespace, name, &ip).await?;
        Ok(())
    }

    /// Stops pod `name`'s process as a kubelet stops a container (SIGTERM, then its exit).
    pub async fn stop_process(&mut self, name: &str) -> Result<()> {
        let Some(pod) = self.pods.get_mut(name) else {
            bail!("no pod {name}")
        };
        let Some(mut process) = pod.process.take() else {
            return Ok(());
        };
        if let Some(pid) = process.id() {
            signal(pid, "TERM")?;
        }
        tokio::time::timeout(Duration::from_secs(15), process.wait())
            .await
            .with_context(|| {
                format!("podium exec in {name} did not exit within 15 s of SIGTERM")
            })??;
        Ok(())
    }

    /// Stops pod `name`'s process as a kubelet with a readiness probe on `/readyz` sees it:
    /// SIGTERM; once `/readyz` stops answering 200 (podium exec says 503 while it shuts down),
    /// the pod is reported NotReady; then the process exits.
    pub async fn stop_with_probe(&mut self, name: &str) -> Result<()> {
        let pod = self
            .pods
            .get(name)
            .with_context(|| format!("no pod {name}"))?;
        let ip = pod.ip.clone();
        let pid = pod
            .pid()
            .with_context(|| format!("{name} runs no process"))?;
        signal(pid, "TERM")?;
        for _ in 0..1000 {
            if !ready_probe(&ip, NOTIFY_PORT).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        crate::testbed::kubelet::set_pod_not_ready(&self.client, &self.namespace, name).await?;
        self.stop_process(name).await
    }

    /// Deletes pod `name` as a kubelet sees it: the delete, then its process stopped, then the
    /// deletion finalised.
    pub async fn delete(&mut self, name: &str) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        pods.delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting {name}"))?;
        self.stop_process(name).await?;
        finalize_deletion(&self.client, &self.namespace, name).await
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) pod `name`'s `podium exec` and its command, as a
    /// paused VM or a stuck node would.
    pub fn freeze(&self, name: &str, frozen: bool) -> Result<()> {
        let pid = self
            .pods
            .get(name)
            .and_then(ProcessPod::pid)
            .context("no running process")?;
        let signal_name = if frozen { "STOP" } else { "CONT" };
        // The command's shell and its sleeps are the exec's descendants.
        let status = std::process::Command::new("pkill")
            .args([&format!("-{signal_name}"), "-P", &pid.to_string()])
            .status()?;
        let _ = status;
        signal(pid, signal_name)
    }
}

impl Drop for ProcessPods {
    /// Stops every `podium exec` as a kubelet would (SIGTERM, so each stops its command's
    /// process group first), and waits for them: a SIGKILL would orphan the commands.
    fn drop(&mut self) {
        for pod in self.pods.values_mut() {
            if let Some(process) = pod.process.as_mut()
                && let Some(pid) = process.id()
            {
                let _ = std::process::Command::new("pkill")
                    .args(["-CONT", "-P", &pid.to_string()])
                    .status();
                let _ = signal(pid, "CONT");
                let _ = signal(pid, "TERM");
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(8);
        for pod in self.pods.values_mut() {
            if let Some(process) = pod.process.as_mut() {
                while matches!(process.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Whether `GET /readyz` answers 200.
async fn ready_probe(ip: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect((ip, port)).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut head)).await,
        Ok(Ok(_))
    ) && head.ends_with(b"200")
}

async fn wait_listening(ip: &str, port: u16) -> Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect((ip, port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("podium exec did not listen on {ip}:{port} within 5 s")
}

/// Now, in nanoseconds since the Unix epoch: the clock the work log's lines use.
pub fn unix_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The time of the first `role` line for `leader` at `epoch` in a `podium exec` JSON log.
fn leader_message_taken(log: &str, epoch: u64) -> Result<Option<u128>> {
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |name: &str| event.get(name);
        if field("message").and_then(|m| m.as_str()) == Some("role")
            && field("role").and_then(|r| r.as_str()) == Some("leader")
            && field("epoch").and_then(|e| e.as_u64()) == Some(epoch)
        {
            let at: jiff::Timestamp = field("timestamp")
                .and_then(|t| t.as_str())
                .with_context(|| format!("no timestamp in {line:?}"))?
                .parse()
                .with_context(|| format!("timestamp in {line:?}"))?;
            return Ok(Some(u128::try_from(at.as_nanosecond()).unwrap_or(0)));
        }
    }
    Ok(None)
}

/// One run of leader-only work as its log shows it; `stop` is `None` while it runs (or if it
/// was killed before it could write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    pub pod: String,
    pub epoch: u64,
    pub start_ns: u128,
    pub stop_ns: Option<u128>,
}

/// The runs in a log of `start POD EPOCH NANOS` and `stop POD EPOCH NANOS` lines.
pub fn runs(log: &str) -> Result<Vec<Work>> {
    let mut runs: Vec<Work> = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [kind, pod, epoch, nanos] = fields[..] else {
            bail!("bad log line {line:?}")
        };
        let epoch: u64 = epoch
            .parse()
            .with_context(|| format!("epoch in {line:?}"))?;
        let nanos: u128 = nanos.parse().with_context(|| format!("time in {line:?}"))?;
        match kind {
            "start" => runs.push(Work {
                pod: pod.into(),
                epoch,
                start_ns: nanos,
                stop_ns: None,
            }),
            "stop" => {
                let Some(run) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.pod == pod && r.epoch == epoch && r.stop_ns.is_none())
                else {
                    bail!("stop without a start: {line:?}");
                };
                run.stop_ns = Some(nanos);
            }
            _ => bail!("bad log line {line:?}"),
        }
    }
    runs.sort_by_key(|r| r.start_ns);
    Ok(runs)
}

/// Every pair of runs that overlapped in time: a run that has not stopped lasts forever.
pub fn overlaps(runs: &[Work]) -> Vec<(Work, Work)> {
    let mut found = Vec::new();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            if a.stop_ns.is_none_or(|stop| stop >= b.start_ns) {
                found.push((a.clone(), b.clone()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_found_and_handovers_are_not() {
        let log = "start a 1 100\nstop a 1 200\nstart b 2 201\nstop b 2 300\nstart c 3 250\n";
        let runs = runs(log).unwrap();
        assert_eq!(runs.len(), 3);
        let found = overlaps(&runs);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].0.pod.as_str(), found[0].1.pod.as_str()),
            ("b", "c")
        );
        assert!(overlaps(&runs[..2]).is_empty());
    }

    #[test]
    fn the_leader_message_is_found_by_epoch() {
        let log = concat!(
            "{\"timestamp\":\"2026-12-05T19:00:00.000001Z\",\"level\":\"INFO\",\"message\":\"role\",\"role\":\"pending\",\"epoch\":3}\n",
            "not json\n",
            "{\"timestamp\":\"2026-12-05T19:00:00.250000Z\",\"level\":\"INFO\",\"message\":\"role\",\"role\":\"leader\",\"epoch\":3}\n",
        );
        let at = leader_message_taken(log, 3).unwrap().unwrap();
        let expected: jiff::Timestamp = "2026-12-05T19:00:00.25Z".parse().unwrap();
        assert_eq!(at, expected.as_nanosecond() as u128);
        assert_eq!(leader_message_taken(log, 4).unwrap(), None);
    }

    #[test]
    fn a_run_that_never_stopped_overlaps_everything_after_it() {
        let runs = runs("start a 1 100\nstart b 2 500\nstop b 2 600\n").unwrap();
        assert_eq!(overlaps(&runs).len(), 1);
        assert!(super::runs("stop a 1 5\n").is_err());
        assert!(super::runs("start a x 5\n").is_err());
    }
}
