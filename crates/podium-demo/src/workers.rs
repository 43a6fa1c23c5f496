//! The demo's last story, with real processes: four workers, each a real `podium exec` on its
//! pod's loopback IP, whose leader-only command prints "I am the leader". Podium pushes each its
//! role; a new leader's command starts only once the old one has stopped.
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use podium_core::crd::{ElectionGroup, ROLE_LABEL, ROLE_LEADER};
use podium_testkit::leader_process::{ProcessPods, Work, overlaps, unix_nanos};

use super::{NAMESPACE, Ui};

pub const WORKER_APP: &str = "worker";
const WORKERS: usize = 4;
const WORKER_TTL_SECONDS: u64 = 4;
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// `podium exec` is a subcommand of the operator's binary, built next to the demo's.
pub fn podium_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the demo's own path")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("podium");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "the podium binary is not next to {} (build it: cargo build -p podium)",
        exe.display()
    )
}

/// One takeover as the demo timed it.
#[derive(Clone, Debug)]
pub struct Takeover {
    pub how: &'static str,
    pub old: String,
    pub new: String,
    pub epoch: u64,
    /// From the trigger to the new leader's command printing "I am the leader".
    pub after: Duration,
}

async fn next_run(pods: &ProcessPods, after: usize, not: Option<&str>) -> Result<Work> {
    let deadline = Instant::now() + TAKEOVER_TIMEOUT;
    loop {
        if let Some(run) = pods
            .runs()?
            .into_iter()
            .skip(after)
            .find(|r| Some(r.pod.as_str()) != not)
        {
            return Ok(run);
        }
        if Instant::now() > deadline {
            bail!("no leader process started within {TAKEOVER_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn followers(client: &Client) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(&format!("app={WORKER_APP}")))
        .await?;
    Ok(list
        .into_iter()
        .filter(|p| p.labels().get(ROLE_LABEL).map(String::as_str) != Some(ROLE_LEADER))
        .map(|p| p.name_any())
        .collect())
}

pub async fn story<W: Write>(
    ui: &mut Ui<W>,
    client: &Client,
    pods: &mut ProcessPods,
) -> Result<Vec<Takeover>> {
    for i in 0..WORKERS {
        pods.start(&format!("{WORKER_APP}-{i}"), WORKER_APP).await?;
    }
    ui.ok(format!(
        "{WORKERS} pods {WORKER_APP}-0..{}, each running: podium exec -- sh -c 'echo I am the leader; ...'",
        WORKERS - 1
    ))?;
    let group = json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": WORKER_APP },
        "spec": {
            "selector": { "matchLabels": { "app": WORKER_APP } },
            "leaseDurationSeconds": WORKER_TTL_SECONDS,
            "notify": { "port": 8787 },
        },
    });
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), NAMESPACE);
    groups
        .create(&PostParams::default(), &serde_json::from_value(group)?)
        .await
        .context("cannot create the ElectionGroup worker")?;
    let first = next_run(pods, 0, None).await?;
    ui.ok(format!(
        "{}: I am the leader (epoch {})",
        ui.bold(&first.pod),
        first.epoch
    ))?;
    for follower in followers(client).await? {
        ui.item(format!("{follower}: I am a follower"))?;
    }

    let mut takeovers = Vec::new();
    let mut leader = first;
    for how in ["its process is stopped", "its pod is deleted"] {
        let count = pods.runs()?.len();
        let started = unix_nanos();
        let old = leader.pod.clone();
        if how == "its process is stopped" {
            ui.command(&format!("kill -TERM <podium exec in {old}>"))?;
            // podium exec stops its command and fails /readyz; the kubelet's probe reports the
            // pod NotReady; the operator demotes it, and the stopped process acknowledges.
            pods.stop_with_probe(&old).await?;
        } else {
            ui.command(&format!("kubectl delete pod -n {NAMESPACE} {old}"))?;
            pods.delete(&old).await?;
        }
        let next = next_run(pods, count, Some(&old)).await?;
        let after = Duration::from_nanos((next.start_ns.saturating_sub(started)) as u64);
        ui.ok(format!(
            "{}: I am the leader (epoch {}), {} after {old}'s {}",
            ui.bold(&next.pod),
            next.epoch,
            ui.time(after),
            if how == "its process is stopped" {
                "process was stopped"
            } else {
                "pod was deleted"
            }
        ))?;
        if how == "its process is stopped" {
            // The kubelet restarts the container: the pod is back as a follower, and its new
            // podium exec answers at once (a pod that exists but never answers would hold the
            // next handover back for a term).
            pods.restart(&old).await?;
            ui.item(format!("{old}: restarted by the kubelet; I am a follower"))?;
        }
        takeovers.push(Takeover {
            how,
            old,
            new: next.pod.clone(),
            epoch: next.epoch,
            after,
        });
        leader = next;
    }
    let all = pods.runs()?;
    let overlapping = overlaps(&all).len();
    ui.ok(format!(
        "{} leader runs in the workers' shared log, {overlapping} overlapping",
        all.len()
    ))?;
    if overlapping > 0 {
        bail!("two leader processes overlapped: {all:?}");
    }
    Ok(takeovers)
}
