//! `podium switchover`: records a request on the group and, with `--wait`, waits for the
//! operator's outcome.
//!
//! The request goes into an annotation rather than the spec: the spec is often owned by GitOps
//! tooling that would revert a one-shot field, and an annotation does not bump the generation.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::cli::SwitchoverArgs;
use crate::crd::switchover_results::REFUSED;
use crate::crd::{ElectionGroup, SWITCHOVER_ANNOTATION, SwitchoverOutcome, SwitchoverRequest};

/// How often `--wait` looks, and how often it says it is still waiting.
const POLL: Duration = Duration::from_millis(100);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Attempts at recording the request when the group keeps changing under us.
const WRITE_ATTEMPTS: usize = 5;

pub async fn run(client: Client, args: &SwitchoverArgs) -> Result<()> {
    let (namespace, name) = super::group_ref(&client, &args.group, args.namespace.as_deref())?;
    let api: Api<ElectionGroup> = Api::namespaced(client, &namespace);
    let started = Instant::now();
    let request = record(&api, &namespace, &name, args.to.as_deref()).await?;
    let target = request.to.as_deref().map_or_else(
        || "the best other eligible pod".to_string(),
        |to| format!("pod {to}"),
    );
    let from = request
        .from
        .as_deref()
        .map_or_else(|| "nobody".to_string(), |f| format!("pod {f}"));
    println!(
        "switchover {} requested for {namespace}/{name}: from {from} to {target}",
        request.id
    );
    if !args.wait {
        println!("follow it with: podium status {namespace}/{name}");
        return Ok(());
    }
    let outcome = wait(&api, &name, &request.id, Duration::from_secs(args.timeout)).await?;
    println!("{}", describe(&outcome, started.elapsed()));
    if outcome.result == REFUSED {
        bail!("switchover {} refused: {}", outcome.id, outcome.message);
    }
    Ok(())
}

/// Writes the request, conditional on the group version whose leader it names as `from`, so
/// that an untargeted request cannot be made against a leader that already changed.
async fn record(
    api: &Api<ElectionGroup>,
    namespace: &str,
    name: &str,
    to: Option<&str>,
) -> Result<SwitchoverRequest> {
    for _ in 0..WRITE_ATTEMPTS {
        let group = match api.get(name).await {
            Ok(group) => group,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                bail!("ElectionGroup {namespace}/{name} not found")
            }
            Err(e) => return Err(e).context(format!("reading ElectionGroup {namespace}/{name}")),
        };
        let now = Timestamp::now();
        let request = SwitchoverRequest {
            id: format!("{}-{}", now.as_millisecond(), std::process::id()),
            to: to.map(str::to_string),
            from: group.status.as_ref().and_then(|s| s.leader.clone()),
            requested_at: Time(now),
        };
        let patch = json!({
            "metadata": {
                "resourceVersion": group.resource_version(),
                "annotations": { SWITCHOVER_ANNOTATION: serde_json::to_string(&request)? },
            }
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(request),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                return Err(e).context(format!(
                    "recording the switchover on ElectionGroup {namespace}/{name}"
                ));
            }
        }
    }
    bail!(
        "ElectionGroup {namespace}/{name} kept changing; the switchover was not recorded, try again"
    )
}

async fn wait(
    api: &Api<ElectionGroup>,
    name: &str,
    id: &str,
    timeout: Duration,
) -> Result<SwitchoverOutcome> {
    let started = Instant::now();
    let mut said = started;
    loop {
        let group = api
            .get(name)
            .await
            .with_context(|| format!("reading ElectionGroup {name}"))?;
        if let Some(outcome) = group
            .status
            .and_then(|s| s.last_switchover)
            .filter(|o| o.id == id)
        {
            return Ok(outcome);
        }
        if started.elapsed() >= timeout {
            bail!(
                "no outcome after {}s: is the podium operator running? The request stays on the \
                 group and is carried out when it runs",
                timeout.as_secs()
            );
        }
        if said.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "still waiting for the operator ({}s)...",
                started.elapsed().as_secs()
            );
            said = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line for an outcome, with the time the requester saw it take.
pub fn describe(outcome: &SwitchoverOutcome, took: Duration) -> String {
    let who = |p: &Option<String>| p.clone().unwrap_or_else(|| "-".into());
    format!(
        "switchover {}: {} ({} -> {}, epoch {}, {} ms): {}",
        outcome.id,
        outcome.result,
        who(&outcome.from),
        who(&outcome.to),
        outcome.epoch,
        took.as_millis(),
        outcome.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_reads_in_one_line() {
        let at = Time(Timestamp::from_second(1_800_000_000).unwrap());
        let outcome = SwitchoverOutcome {
            id: "r1".into(),
            result: "Succeeded".into(),
            message: "handed over to pod b".into(),
            from: Some("a".into()),
            to: Some("b".into()),
            epoch: 7,
            requested_at: at.clone(),
            completed_at: at,
        };
        assert_eq!(
            describe(&outcome, Duration::from_millis(42)),
            "switchover r1: Succeeded (a -> b, epoch 7, 42 ms): handed over to pod b"
        );
    }
}
