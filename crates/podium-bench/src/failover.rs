//! Section 1 (failover latency) and section 4 (API requests per failover): one group of four
//! Ready pods behind a leader Service; the leader is deleted, or reported NotReady, over and
//! over, timed from the harness's write to (a) the new leader's label in the harness's own pod
//! watch and (b) the Service's EndpointSlices listing only the new leader.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams};

use super::floor::failover::FailoverFloor;
use super::operator::OperatorUnderTest;
use super::{Progress, create_group, wait_group_eligible};
use podium_core::crd::ElectionGroup;
use podium_testkit::counting::RequestRecord;
use podium_testkit::fixture;
use podium_testkit::observe::{PodWatch, SliceWatch};
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{
    Kubelet, KubeletOptions, set_pod_not_ready, set_pod_running_ready,
};

const APP: &str = "web";
const REPLICAS: usize = 4;
/// The group's TTL. Failover does not wait for it; it only sets the renewal rhythm.
pub const LEASE_SECONDS: i32 = 15;
const WAIT: Duration = Duration::from_secs(30);
/// The operator counts as done with a failover after this long without a request.
const QUIET: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cause {
    Deleted,
    NotReady,
}

impl Cause {
    pub fn describe(self) -> &'static str {
        match self {
            Cause::Deleted => "leader pod deleted",
            Cause::NotReady => "leader NotReady",
        }
    }
}

/// Requests of one failover, by what they did.
pub type Cost = BTreeMap<&'static str, u64>;

/// Cost categories, in report order.
pub const COST_ROWS: &[(&str, &str)] = &[
    ("lease_write", "Lease write (update/create)"),
    ("unlabel_old", "old leader's label removed (pod patch)"),
    ("label_new", "new leader labelled (pod patch)"),
    ("status_write", "ElectionGroup status write"),
    ("other_pod_write", "other pod label writes"),
    ("group_write", "other ElectionGroup writes"),
    ("event_write", "Event writes"),
    ("lease_read", "Lease reads (quorum get)"),
    ("other_read", "other reads"),
    ("writes", "**all writes**"),
    ("reads", "**all reads**"),
    ("failed", "answered other than 2xx"),
];

/// The floor per failover: one Lease write, one unlabel, one label, one status write.
pub fn floor(category: &str) -> Option<u64> {
    match category {
        "lease_write" | "unlabel_old" | "label_new" | "status_write" => Some(1),
        "writes" => Some(4),
        "group_write" | "other_pod_write" | "event_write" | "lease_read" | "other_read"
        | "reads" | "failed" => Some(0),
        _ => None,
    }
}

#[derive(Clone, Debug, Default)]
pub struct CauseResults {
    pub label: Vec<Duration>,
    pub service: Vec<Duration>,
    pub costs: Vec<Cost>,
    /// The floor's rounds: trigger to its last write acknowledged.
    pub acked: Vec<Duration>,
    /// Non-2xx answers to the operator in the failover windows, by `"<verb> <resource> <code>"`.
    pub errors: BTreeMap<String, u64>,
    /// Rounds that did not complete, with why.
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct FailoverResults {
    pub by_cause: BTreeMap<Cause, CauseResults>,
    /// The same rounds answered by the failover floor instead of the operator.
    pub floor: BTreeMap<Cause, CauseResults>,
    /// Writes of the floor answered other than 2xx (a fence of a pod already gone is one).
    pub floor_failed_writes: u64,
    /// `podium_failover_seconds` (count, sum) from the operator.
    pub operator_histogram: Option<(u64, f64)>,
    /// Time from creating the group to the first leader label.
    pub first_election: Option<Duration>,
}

/// What a round needs: the group's namespace, its pods and Service, the harness's watches.
struct Setup {
    client: Client,
    ns: String,
    pods: PodWatch,
    slices: SliceWatch,
    groups: Api<ElectionGroup>,
    pod_api: Api<Pod>,
}

/// Who answers the trigger.
enum Responder<'a> {
    Podium(&'a OperatorUnderTest),
    Floor(&'a FailoverFloor),
}

/// Podium's rounds with `operator`, which is then stopped, and the floor's rounds on the same
/// group, pods and triggers.
pub async fn run(
    testbed: &Testbed,
    client: &Client,
    operator: OperatorUnderTest,
    rounds: usize,
) -> Result<FailoverResults> {
    let ns = testbed.create_namespace("bench-failover").await?;
    let _kubelet = Kubelet::start(
        client,
        KubeletOptions::new(format!("node-{ns}")).namespace(&ns),
    )
    .await?;
    let pods = PodWatch::start(client, &ns, Some(&format!("app={APP}")), APP);
    fixture::create_servers(client, &ns, APP, REPLICAS as i32).await?;
    pods.wait(WAIT, "4 Ready pods", |s| {
        s.synced && s.focus_ready() == REPLICAS
    })
    .await?;
    let service = fixture::create_leader_service(client, &ns, APP).await?;
    let slices = SliceWatch::start(client, &ns, &service);

    let mut results = FailoverResults::default();
    let created = Instant::now();
    create_group(client, &ns, APP, APP, LEASE_SECONDS).await?;
    let first = pods
        .wait(WAIT, "the first leader", |s| s.focus_leaders.len() == 1)
        .await?;
    results.first_election = Some(first.focus_leaders_since.saturating_duration_since(created));

    let setup = Setup {
        client: client.clone(),
        groups: Api::namespaced(client.clone(), &ns),
        pod_api: Api::namespaced(client.clone(), &ns),
        ns,
        pods,
        slices,
    };
    // The floor answers the same triggers on the same group. With the operator in a child
    // process, the two take turns round by round (the operator stopped with SIGSTOP while the
    // floor answers), so that both see the same background load on this shared machine; in
    // process, the floor's rounds follow Podium's.
    let floor = FailoverFloor::start(client, &setup.ns, APP, APP);
    let interleave = operator.can_pause();
    for cause in [Cause::Deleted, Cause::NotReady] {
        let mut podium = CauseResults::default();
        let mut floored = CauseResults::default();
        let mut progress = Progress::new(format!("failover ({})", cause.describe()));
        // Round 0 is not recorded: the first trigger of a kind finds the control plane's paths
        // for it cold, and whoever answered it first would carry that alone.
        for round in 0..=rounds {
            let mut warm_up = (CauseResults::default(), CauseResults::default());
            let (podium, floored) = match round {
                0 => (&mut warm_up.0, &mut warm_up.1),
                _ => (&mut podium, &mut floored),
            };
            let podium_round = Responder::Podium(&operator);
            let line = one_round(&setup, cause, round, &podium_round, podium).await?;
            if interleave {
                operator.pause()?;
                floor.set_active(true);
                let answered =
                    one_round(&setup, cause, round, &Responder::Floor(&floor), floored).await;
                floor.set_active(false);
                operator.resume()?;
                progress.say(format!(
                    "{round}/{rounds}: Podium {line}; floor {}",
                    answered?
                ));
            } else {
                progress.say(format!("{round}/{rounds}: {line}"));
            }
        }
        progress.done();
        results.by_cause.insert(cause, podium);
        results.floor.insert(cause, floored);
    }
    results.operator_histogram = histogram(&operator.metrics().await.unwrap_or_default());
    operator.stop().await;
    if !interleave {
        floor.set_active(true);
        for cause in [Cause::Deleted, Cause::NotReady] {
            let out = results.floor.entry(cause).or_default();
            let mut progress = Progress::new(format!("failover floor ({})", cause.describe()));
            for round in 0..=rounds {
                let mut warm_up = CauseResults::default();
                let out = if round == 0 { &mut warm_up } else { &mut *out };
                let line = one_round(&setup, cause, round, &Responder::Floor(&floor), out).await?;
                progress.say(format!("{round}/{rounds}: {line}"));
            }
            progress.done();
        }
    }
    results.floor_failed_writes = floor.failed_writes();
    Ok(results)
}

/// One failover answered by `responder`, its samples added to `out`; a line for the progress.
async fn one_round(
    setup: &Setup,
    cause: Cause,
    round: usize,
    responder: &Responder<'_>,
    out: &mut CauseResults,
) -> Result<String> {
    let Setup {
        client,
        ns,
        pods,
        slices,
        groups,
        pod_api,
    } = setup;
    // Start every round from the same state: four Ready pods, all labelled, one leader,
    // the Service on the leader, and an operator (or floor) with nothing left to do.
    let settled = pods
        .wait(WAIT, "the group to settle", |s| s.focus_settled(REPLICAS))
        .await?;
    wait_group_eligible(groups, APP, REPLICAS as i32, WAIT).await?;
    let old = settled.focus_leaders[0].clone();
    let old_ip = settled.focus[&old]
        .ip
        .clone()
        .ok_or_else(|| anyhow!("leader {old} has no IP"))?;
    slices.wait_only(&old_ip, WAIT).await?;
    let before = match responder {
        Responder::Podium(operator) => Some(operator.wait_quiet(QUIET, WAIT).await?),
        Responder::Floor(floor) => {
            floor.wait_quiet(QUIET, WAIT).await;
            None
        }
    };

    let t0 = Instant::now();
    match cause {
        Cause::Deleted => {
            pod_api
                .delete(&old, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting leader {old}"))?;
        }
        Cause::NotReady => {
            set_pod_not_ready(client, ns, &old).await?;
        }
    }
    let moved = pods
        .wait(WAIT, "a new leader label", |s| {
            s.focus_leaders.len() == 1 && s.focus_leaders[0] != old
        })
        .await;
    let moved = match moved {
        Ok(s) => s,
        Err(e) => {
            out.failures.push(format!("round {round}: {e:#}"));
            return Ok(format!("failed: {e:#}"));
        }
    };
    let new = moved.focus_leaders[0].clone();
    let label = moved.focus_leaders_since.saturating_duration_since(t0);
    let new_ip = moved.focus[&new].ip.clone().unwrap_or_default();
    let service = match slices.wait_only(&new_ip, WAIT).await {
        Ok(since) => since.saturating_duration_since(t0),
        Err(e) => {
            out.failures.push(format!("round {round}: {e:#}"));
            return Ok(format!("failed: {e:#}"));
        }
    };
    out.label.push(label);
    out.service.push(service);
    match (responder, before) {
        (Responder::Podium(operator), Some(before)) => {
            operator.wait_quiet(QUIET, WAIT).await?;
            let log = operator.log_since(before.total).await?;
            out.costs.push(cost(&log, ns, &old, &new));
            for r in log.iter().filter(|r| !(200..300).contains(&r.code)) {
                *out.errors
                    .entry(format!("{} {} {}", r.verb, r.resource, r.code))
                    .or_default() += 1;
            }
        }
        (Responder::Floor(floor), _) => {
            // Its status write may still be in flight when the Service has moved.
            floor.wait_quiet(QUIET, WAIT).await;
            if let Some(h) = floor.handled_since(t0) {
                out.acked.push(h.acked.saturating_duration_since(t0));
            }
        }
        (Responder::Podium(_), None) => {}
    }

    if cause == Cause::NotReady {
        // Ready again, as after a passing probe; it rejoins as a follower.
        set_pod_running_ready(client, ns, &old, &old_ip).await?;
    }
    Ok(format!(
        "label {}, Service {}",
        super::stats::ms(label),
        super::stats::ms(service)
    ))
}

/// Sorts one failover's requests (those the operator made in the group's namespace, watches
/// aside) into [`COST_ROWS`].
pub fn cost(log: &[RequestRecord], namespace: &str, old: &str, new: &str) -> Cost {
    let mut cost = Cost::new();
    for key in COST_ROWS.iter().map(|(k, _)| *k) {
        cost.insert(key, 0);
    }
    for r in log {
        if r.verb == "watch" || r.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            continue;
        }
        let write = r.is_write();
        let category = match (r.resource.as_str(), write) {
            ("leases", true) => "lease_write",
            ("leases", false) => "lease_read",
            ("pods", true) if r.name.as_deref() == Some(old) => "unlabel_old",
            ("pods", true) if r.name.as_deref() == Some(new) => "label_new",
            ("pods", true) => "other_pod_write",
            ("electiongroups/status", true) => "status_write",
            ("electiongroups", true) => "group_write",
            ("events", true) => "event_write",
            (_, true) => "other_pod_write",
            (_, false) => "other_read",
        };
        *cost.entry(category).or_default() += 1;
        *cost
            .entry(if write { "writes" } else { "reads" })
            .or_default() += 1;
        if !(200..300).contains(&r.code) {
            *cost.entry("failed").or_default() += 1;
        }
    }
    cost
}

/// `podium_failover_seconds` count and sum from the operator's metrics text.
pub fn histogram(metrics: &str) -> Option<(u64, f64)> {
    let value = |name: &str| {
        metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    Some((
        value("podium_failover_seconds_count")? as u64,
        value("podium_failover_seconds_sum")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(verb: &str, resource: &str, name: &str) -> RequestRecord {
        RequestRecord {
            seq: 0,
            verb: verb.into(),
            resource: resource.into(),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            code: 200,
        }
    }

    #[test]
    fn a_minimal_failover_costs_the_floor() {
        let log = vec![
            record("update", "leases", "web"),
            record("patch", "pods", "old"),
            record("patch", "pods", "new"),
            record("patch", "electiongroups/status", "web"),
            record("watch", "pods", ""),
        ];
        let c = cost(&log, "ns", "old", "new");
        for (key, _) in COST_ROWS {
            assert_eq!(Some(c[key]), floor(key), "{key}");
        }
    }

    #[test]
    fn reads_the_operator_histogram() {
        let text = "# TYPE podium_failover_seconds histogram\npodium_failover_seconds_sum 0.25\npodium_failover_seconds_count 5\n";
        assert_eq!(histogram(text), Some((5, 0.25)));
    }
}
