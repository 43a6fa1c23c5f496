//! Section 3: G groups of 3 pods in one namespace. Pods are created directly (bound to a node,
//! status written as a kubelet would) with bounded concurrency; then a fresh operator starts,
//! all groups are created, and the bench times the election, measures a steady-state window
//! (API requests, CPU, memory) and fails over one group while the others run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::floor::election::ElectionFloor;
use super::floor::renewal::{self, Renewals};
use super::operator::{OperatorSource, OperatorUnderTest};
use super::procstat;
use super::{Progress, Rng, create_group, wait_group_eligible};
use podium_core::crd::{
    EPOCH_ANNOTATION, ElectionGroup, FENCE_ANNOTATION, GROUP_ANNOTATION, ROLE_LABEL, ROLE_LEADER,
};
use podium_testkit::counting::Counts;
use podium_testkit::observe::PodWatch;
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{finalize_deletion, next_pod_ip};
use podium_testkit::wait::poll;

const PODS_PER_GROUP: usize = 3;
/// Concurrent API calls while creating pods and groups.
const CONCURRENCY: usize = 32;
pub(crate) const NODE: &str = "bench-scale-node";
const WAIT: Duration = Duration::from_secs(60);
/// How long one failover under load may take before the bench gives up on it.
const FAILOVER_WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug)]
pub struct ScaleParams {
    pub groups: usize,
    pub ttl_seconds: i32,
    pub window: Duration,
    pub failover_rounds: usize,
}

#[derive(Clone, Debug, Default)]
pub struct ScaleResults {
    pub groups: usize,
    pub ttl_seconds: i32,
    pub pods_created_in: Duration,
    pub groups_created_in: Duration,
    /// From the first group's creation to every group having exactly one leader.
    pub elected_after: Option<Duration>,
    /// Groups with exactly one leader when the wait ended (all of them on success).
    pub elected_groups: usize,
    /// Groups that ever showed more than one leader label at once.
    pub max_multi_leader_groups: usize,
    /// Operator requests while electing (creation start to all elected).
    pub election_requests: Counts,
    pub election_cpu: Duration,
    /// The steady-state window.
    pub window: Duration,
    pub window_requests: Counts,
    pub window_cpu: Duration,
    /// Writes to leases, pods, electiongroups and events in the API server's own
    /// `apiserver_request_total`, all clients, over the window.
    pub apiserver_writes: Option<u64>,
    pub apiserver_cpu: Option<Duration>,
    pub etcd_cpu: Option<Duration>,
    pub rss_end: u64,
    pub peak_rss: u64,
    pub failover: Vec<Duration>,
    /// Every group deleted with the operator running, until the last is gone (cleaned up and
    /// its finalizer off), no pod still labelled: the counterpart of the floor's undo.
    pub groups_deleted_in: Option<Duration>,
    pub failures: Vec<String>,
    /// The bare clients' election and renewals of the same groups.
    pub floor: Option<ScaleFloor>,
}

/// The election and renewal floors of one G step.
#[derive(Clone, Debug, Default)]
pub struct ScaleFloor {
    /// From the first group's creation to every group having exactly one leader.
    pub elected_after: Option<Duration>,
    pub groups_created_in: Duration,
    /// The election floor's writes, and those answered other than 2xx.
    pub election_writes: u64,
    pub failed_writes: u64,
    pub renewals: Renewals,
    /// Undoing the floor's writes before the operator starts.
    pub undone_in: Duration,
    /// Group creates the API server did not answer the first time.
    pub retried: Option<String>,
    /// Why the floor's writes could not all be undone; the operator is then not measured, as
    /// it would start on a different world.
    pub undo_failed: Option<String>,
}

impl ScaleResults {
    pub fn floor_writes_per_second(&self) -> f64 {
        self.groups as f64 / (f64::from(self.ttl_seconds) / 2.0)
    }
    pub fn writes_per_second(&self) -> f64 {
        self.window_requests.writes() as f64 / self.window.as_secs_f64()
    }
    pub fn cpu_seconds_per_minute(&self) -> f64 {
        self.window_cpu.as_secs_f64() * 60.0 / self.window.as_secs_f64()
    }
    /// Operator CPU per steady-state write (every one a renewal when podium is at its floor).
    pub fn cpu_per_write(&self) -> Option<Duration> {
        let writes = self.window_requests.writes();
        (writes > 0).then(|| self.window_cpu.div_f64(writes as f64))
    }
}

/// Where the operator comes from for each scale step.
pub async fn run(
    testbed: &Testbed,
    client: &Client,
    source: &OperatorSource<'_>,
    params: &ScaleParams,
    rng: &mut Rng,
) -> Result<ScaleResults> {
    let g = params.groups;
    let label = format!("scale G={g}");
    let mut results = ScaleResults {
        groups: g,
        ttl_seconds: params.ttl_seconds,
        window: params.window,
        ..ScaleResults::default()
    };
    let ns = testbed
        .create_namespace(&format!("bench-scale-{g}"))
        .await?;
    podium_testkit::testbed::kubelet::create_node(client, NODE).await?;
    let host_ip = "10.0.255.1".to_string();

    // Pods, directly: a create with spec.nodeName (no scheduler needed) and a status write.
    let started = Instant::now();
    let mut progress = Progress::new(format!("{label}: pods"));
    let total = g * PODS_PER_GROUP;
    let names: Vec<(String, String)> = (0..g)
        .flat_map(|i| {
            (0..PODS_PER_GROUP).map(move |j| (group_name(i), format!("{}-{j}", group_name(i))))
        })
        .collect();
    let mut created = 0usize;
    let mut stream =
        futures::stream::iter(names)
            .map(|(app, name)| {
                let (client, ns, host_ip) = (client.clone(), ns.clone(), host_ip.clone());
                async move {
                    create_ready_pod(&client, &ns, &app, &name, &host_ip, &next_pod_ip()).await
                }
            })
            .buffer_unordered(CONCURRENCY);
    while let Some(r) = stream.next().await {
        r?;
        created += 1;
        progress.tick(|| {
            format!(
                "{created}/{total} created and Ready ({:.0}/s)",
                created as f64 / started.elapsed().as_secs_f64()
            )
        });
    }
    drop(stream);
    results.pods_created_in = started.elapsed();
    progress.say(format!(
        "{total} pods in {:.1}s",
        results.pods_created_in.as_secs_f64()
    ));
    progress.done();

    // The floor first, on the same pods, and undone before the operator starts.
    match floor_phase(testbed, client, &ns, params).await {
        Ok(floor) => {
            let dirty = floor.undo_failed.clone();
            results.floor = Some(floor);
            if let Some(e) = dirty {
                results.failures.push(format!(
                    "undoing the floor failed, so the operator was not run: {e}"
                ));
                return Ok(results);
            }
        }
        Err(e) => results.failures.push(format!("floor: {e:#}")),
    }

    // A fresh operator for this step, watching this namespace only, so that its memory and
    // requests are this step's. Where it fails, what was measured so far (the floors) stays in
    // the report beside the failure: at 10,000 groups that is the finding.
    if let Err(e) = with_operator(testbed, client, source, &ns, params, &mut results, rng).await {
        results.failures.push(format!("operator: {e:#}"));
    }
    Ok(results)
}

async fn with_operator(
    testbed: &Testbed,
    client: &Client,
    source: &OperatorSource<'_>,
    ns: &str,
    params: &ScaleParams,
    results: &mut ScaleResults,
    rng: &mut Rng,
) -> Result<()> {
    let g = params.groups;
    let mut operator = source
        .start(testbed, Some(ns), None, false, &format!("scale-{g}"))
        .await?;
    // Its first lists of 3G pods take a while on a loaded control plane.
    let outcome = match operator.wait_ready(WAIT * 5).await {
        Ok(()) => measure(testbed, client, &operator, ns, params, results, rng).await,
        Err(e) => Err(e),
    };
    operator.stop().await;
    outcome
}

async fn measure(
    testbed: &Testbed,
    client: &Client,
    operator: &OperatorUnderTest,
    ns: &str,
    params: &ScaleParams,
    results: &mut ScaleResults,
    rng: &mut Rng,
) -> Result<()> {
    let g = params.groups;
    let label = format!("scale G={g}");
    let leaders = PodWatch::start(client, ns, Some(&leader_selector()), &group_name(0));
    leaders
        .wait(WAIT, "the leader watch to sync", |s| s.synced)
        .await?;

    let counts_start = operator.counts().await?;
    let cpu_start = operator.proc_sample()?.cpu;
    let election = elect_all(client, ns, params, &leaders, &label).await?;
    results.groups_created_in = election.created_in;
    results.elected_after = election.elected_after;
    results.elected_groups = election.elected_groups;
    results.max_multi_leader_groups = election.max_multi_leader_groups;
    results.failures.extend(election.failure);
    results.failures.extend(election.retried);
    results.election_cpu = operator.proc_sample()?.cpu.saturating_sub(cpu_start);
    results.election_requests = operator.counts().await?.since(&counts_start);
    // Steady state: let the election's status writes drain and the first renewals pass.
    let settle = settle(params);
    let mut progress = Progress::new(format!("{label}: steady state"));
    progress.say(format!(
        "settling {:.1}s, then measuring {:.0}s",
        settle.as_secs_f64(),
        params.window.as_secs_f64()
    ));
    tokio::time::sleep(settle).await;
    let apiserver = procstat::find_process("kube-apiserver", &testbed.dir().to_string_lossy());
    let etcd = procstat::find_process("etcd", &testbed.dir().to_string_lossy());
    let side_cpu = |pid: Option<u32>| pid.and_then(|p| procstat::sample(p).ok()).map(|s| s.cpu);
    let api_before = apiserver_writes(client).await.ok();
    let (apiserver_cpu0, etcd_cpu0) = (side_cpu(apiserver), side_cpu(etcd));
    let counts0 = operator.counts().await?;
    let cpu0 = operator.proc_sample()?.cpu;
    let window_start = Instant::now();
    while window_start.elapsed() < params.window {
        let left = params.window.saturating_sub(window_start.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
        let so_far = operator.counts().await?.since(&counts0);
        progress.say(format!(
            "{:.0}/{:.0}s: {} writes so far",
            window_start.elapsed().as_secs_f64(),
            params.window.as_secs_f64(),
            so_far.writes()
        ));
    }
    results.window = window_start.elapsed();
    results.window_requests = operator.counts().await?.since(&counts0);
    let sample = operator.proc_sample()?;
    results.window_cpu = sample.cpu.saturating_sub(cpu0);
    results.apiserver_cpu = side_cpu(apiserver)
        .zip(apiserver_cpu0)
        .map(|(a, b)| a.saturating_sub(b));
    results.etcd_cpu = side_cpu(etcd)
        .zip(etcd_cpu0)
        .map(|(a, b)| a.saturating_sub(b));
    let api_after = apiserver_writes(client).await.ok();
    results.apiserver_writes = api_after.zip(api_before).map(|(a, b)| a.saturating_sub(b));
    progress.done();

    // One group fails over while the others run.
    // A failure here keeps what was measured so far.
    if results.elected_after.is_some()
        && let Err(e) = failover_under_load(client, ns, params, results, rng).await
    {
        results
            .failures
            .push(format!("failover under load stopped: {e:#}"));
    }
    let end = operator.proc_sample()?;
    results.rss_end = end.rss;
    results.peak_rss = end.peak_rss;
    if results.elected_after.is_some() {
        match delete_groups(client, ns).await {
            Ok(took) => results.groups_deleted_in = Some(took),
            Err(e) => results.failures.push(format!("deleting the groups: {e:#}")),
        }
    }
    Ok(())
}

/// Deletes every group while the operator runs and waits until the last is gone; then no pod
/// may still carry a role label, for each group's cleanup ends before its finalizer goes.
async fn delete_groups(client: &Client, ns: &str) -> Result<Duration> {
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    delete_each(&groups).await?;
    poll(
        WAIT * 5,
        Duration::from_millis(250),
        "every group to be cleaned up and gone",
        async || {
            let left = groups.list_metadata(&ListParams::default()).await?.items;
            Ok(left.is_empty().then_some(()))
        },
    )
    .await?;
    let took = started.elapsed();
    let labelled = pods
        .list_metadata(&ListParams::default().labels(ROLE_LABEL))
        .await?
        .items;
    anyhow::ensure!(
        labelled.is_empty(),
        "{} pods still labelled after every group was gone, e.g. {}",
        labelled.len(),
        labelled[0].name_any()
    );
    Ok(took)
}

/// How long after the election the steady window starts: the election's status writes drain
/// and the first renewals pass.
fn settle(params: &ScaleParams) -> Duration {
    Duration::from_millis(u64::try_from(params.ttl_seconds).unwrap_or(15) * 500)
        + Duration::from_secs(2)
}

/// How one election of all G groups went.
struct Election {
    created_in: Duration,
    elected_after: Option<Duration>,
    elected_groups: usize,
    max_multi_leader_groups: usize,
    failure: Option<String>,
    /// Creates the API server did not answer the first time, if any.
    retried: Option<String>,
}

/// Creates the G groups ([`CONCURRENCY`] at a time) and waits until `leaders` shows exactly
/// one leader in each, timed from the first create, whoever elects them.
async fn elect_all(
    client: &Client,
    ns: &str,
    params: &ScaleParams,
    leaders: &PodWatch,
    label: &str,
) -> Result<Election> {
    let g = params.groups;
    let started = Instant::now();
    let mut progress = Progress::new(format!("{label}: groups"));
    let mut created = 0usize;
    let mut stream = futures::stream::iter(0..g)
        .map(|i| {
            let (client, ns) = (client.clone(), ns.to_string());
            async move {
                let name = group_name(i);
                let mut refused = Vec::new();
                // An overloaded API server times requests out (at 10,000 groups on 2 cores);
                // a create that landed anyway answers "already exists" the second time.
                loop {
                    match create_group(&client, &ns, &name, &name, params.ttl_seconds).await {
                        Ok(()) => return Ok(refused),
                        Err(e)
                            if format!("{e:#}").contains("already exists")
                                && !refused.is_empty() =>
                        {
                            return Ok(refused);
                        }
                        Err(e) if refused.len() < 5 => {
                            refused.push(format!("{e:#}"));
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        })
        .buffer_unordered(CONCURRENCY);
    let mut retried: Vec<String> = Vec::new();
    while let Some(r) = stream.next().await {
        retried.extend(r?);
        created += 1;
        progress.tick(|| {
            let s = leaders.now();
            format!(
                "{created}/{g} groups created; {} have a leader",
                s.apps_with_one_leader
            )
        });
    }
    drop(stream);
    let mut out = Election {
        created_in: started.elapsed(),
        elected_after: None,
        elected_groups: 0,
        max_multi_leader_groups: 0,
        failure: None,
        retried: (!retried.is_empty()).then(|| {
            format!(
                "{} group creates were retried; the first answer: {}",
                retried.len(),
                retried[0]
            )
        }),
    };

    // Every group with exactly one leader.
    let deadline = WAIT.max(Duration::from_millis(150) * g as u32);
    let mut progress = Progress::new(format!("{label}: election"));
    loop {
        let s = leaders.now();
        out.max_multi_leader_groups = out.max_multi_leader_groups.max(s.apps_with_many_leaders);
        out.elected_groups = s.apps_with_one_leader;
        if s.apps_with_one_leader == g && s.apps_with_many_leaders == 0 {
            out.elected_after = Some(started.elapsed());
            break;
        }
        if started.elapsed() > deadline {
            out.failure = Some(format!(
                "only {}/{g} groups had one leader after {:.0}s",
                s.apps_with_one_leader,
                deadline.as_secs_f64()
            ));
            break;
        }
        progress.tick(|| {
            format!(
                "{}/{g} groups have one leader after {:.1}s",
                s.apps_with_one_leader,
                started.elapsed().as_secs_f64()
            )
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.say(match out.elected_after {
        Some(t) => format!(
            "all {g} groups elected {:.2}s after the first was created",
            t.as_secs_f64()
        ),
        None => format!("{}/{g} groups elected", out.elected_groups),
    });
    progress.done();
    Ok(out)
}

/// The election floor and the renewal floor on the step's pods, then everything they wrote
/// undone (groups, Leases, pod labels) so that the operator starts on the world it would have
/// started on without them.
async fn floor_phase(
    testbed: &Testbed,
    client: &Client,
    ns: &str,
    params: &ScaleParams,
) -> Result<ScaleFloor> {
    let g = params.groups;
    let label = format!("scale G={g} floor");
    let leaders = PodWatch::start(client, ns, Some(&leader_selector()), &group_name(0));
    leaders
        .wait(WAIT, "the leader watch to sync", |s| s.synced)
        .await?;
    let floor = ElectionFloor::start(&testbed.try_client()?, ns, PODS_PER_GROUP);
    poll(
        WAIT,
        Duration::from_millis(20),
        "the election floor's watches to sync",
        async || Ok(floor.synced().then_some(())),
    )
    .await?;
    let election = elect_all(client, ns, params, &leaders, &label).await?;
    floor.wait_quiet(Duration::from_millis(500), WAIT).await;
    let writes = floor.writes();
    drop(floor);

    if let Some(failure) = election.failure {
        anyhow::bail!("{failure}");
    }

    let mut progress = Progress::new(format!("{label}: renewals"));
    progress.say(format!(
        "renewing every TTL/2, settling {:.1}s, then measuring {:.0}s",
        settle(params).as_secs_f64(),
        params.window.as_secs_f64()
    ));
    let renewals = renewal::run(
        testbed.config(),
        ns,
        params.ttl_seconds,
        settle(params),
        params.window,
    )
    .await?;
    progress.done();

    let started = Instant::now();
    let undone = undo_floor(client, ns, &leaders).await;
    Ok(ScaleFloor {
        elected_after: election.elected_after,
        groups_created_in: election.created_in,
        election_writes: writes.sent,
        failed_writes: writes.failed,
        renewals,
        undone_in: started.elapsed(),
        retried: election.retried,
        undo_failed: undone.err().map(|e| format!("{e:#}")),
    })
}

fn leader_selector() -> String {
    format!("{ROLE_LABEL}={ROLE_LEADER}")
}

/// Deletes the groups and Leases and strips podium's labels and annotations from the pods.
async fn undo_floor(client: &Client, ns: &str, leaders: &PodWatch) -> Result<()> {
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    delete_each(&groups)
        .await
        .context("deleting the floor's groups")?;
    delete_each(&leases)
        .await
        .context("deleting the floor's Leases")?;
    let labelled = pods
        .list_metadata(&ListParams::default().labels(ROLE_LABEL))
        .await?
        .items;
    let strip = json!({
        "metadata": {
            "labels": { ROLE_LABEL: null },
            "annotations": { EPOCH_ANNOTATION: null, GROUP_ANNOTATION: null, FENCE_ANNOTATION: null },
        }
    });
    let mut stream = futures::stream::iter(labelled)
        .map(|pod| {
            let (pods, strip) = (pods.clone(), &strip);
            async move {
                pods.patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(strip),
                )
                .await
            }
        })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = stream.next().await {
        r.context("stripping a floor label")?;
    }
    drop(stream);
    leaders
        .wait(WAIT, "no leader labels left", |s| {
            s.apps_with_one_leader == 0 && s.apps_with_many_leaders == 0
        })
        .await?;
    poll(
        WAIT,
        Duration::from_millis(50),
        "the floor's groups and Leases to go",
        async || {
            let left = groups
                .list_metadata(&ListParams::default())
                .await?
                .items
                .len()
                + leases
                    .list_metadata(&ListParams::default())
                    .await?
                    .items
                    .len();
            Ok((left == 0).then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// Deletes every object of `api`, one request each: a single deletecollection of 10,000
/// groups outlasted the API server's 60 s request deadline.
async fn delete_each<K>(api: &Api<K>) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let names = api.list_metadata(&ListParams::default()).await?.items;
    let mut deletes = futures::stream::iter(names)
        .map(|o| async move { api.delete(&o.name_any(), &DeleteParams::default()).await })
        .buffer_unordered(CONCURRENCY);
    while let Some(r) = deletes.next().await {
        match r {
            // The garbage collector deletes Leases whose group went first.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

async fn failover_under_load(
    client: &Client,
    ns: &str,
    params: &ScaleParams,
    results: &mut ScaleResults,
    rng: &mut Rng,
) -> Result<()> {
    let g = params.groups;
    let app = group_name(0);
    let focus = PodWatch::start(client, ns, Some(&format!("app={app}")), &app);
    let groups: Api<ElectionGroup> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut progress = Progress::new(format!("scale G={g}: failover of {app}"));
    let rounds = params.failover_rounds;
    for round in 1..=rounds {
        let settled = focus
            .wait(WAIT, "the group to settle", |s| {
                s.synced && s.focus_settled(PODS_PER_GROUP)
            })
            .await?;
        wait_group_eligible(&groups, &app, PODS_PER_GROUP as i32, WAIT).await?;
        tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
        let old = settled.focus_leaders[0].clone();
        let t0 = Instant::now();
        pods.delete(&old, &DeleteParams::default())
            .await
            .with_context(|| format!("deleting leader {old}"))?;
        let moved = focus
            .wait(FAILOVER_WAIT, "a new leader", |s| {
                s.focus_leaders.len() == 1 && s.focus_leaders[0] != old
            })
            .await;
        match moved {
            Ok(s) => {
                let took = s.focus_leaders_since.saturating_duration_since(t0);
                results.failover.push(took);
                progress.say(format!("{round}/{rounds}: {}", super::stats::ms(took)));
            }
            Err(e) => {
                // An operator this far behind will not catch up for the next round either.
                results
                    .failures
                    .push(format!("failover round {round}: {e:#}; no further rounds"));
                break;
            }
        }
        // The kubelet's part: finish the deletion; the controller's: a replacement pod.
        finalize_deletion(client, ns, &old).await?;
        create_ready_pod(
            client,
            ns,
            &app,
            &format!("{app}-r{round}"),
            "10.0.255.1",
            &next_pod_ip(),
        )
        .await?;
    }
    progress.done();
    Ok(())
}

pub fn group_name(i: usize) -> String {
    format!("g{i:04}")
}

/// Creates pod `name` (label `app=<app>`) bound to the bench node and reports it Running and
/// Ready on `ip`, as the scheduler and kubelet would: two requests.
pub(crate) async fn create_ready_pod(
    client: &Client,
    ns: &str,
    app: &str,
    name: &str,
    host_ip: &str,
    ip: &str,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": {
            "nodeName": NODE,
            "terminationGracePeriodSeconds": 30,
            "containers": [{ "name": "server", "image": "registry.k8s.io/pause:3.9" }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {ns}/{name}"))?;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let condition = |type_: &str| json!({ "type": type_, "status": "True", "lastProbeTime": null, "lastTransitionTime": now });
    let status = json!({
        "status": {
            "phase": "Running",
            "hostIP": host_ip,
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "startTime": now,
            "conditions": [condition("Initialized"), condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
            "containerStatuses": [{
                "name": "server",
                "image": "registry.k8s.io/pause:3.9",
                "imageID": "simulated://registry.k8s.io/pause:3.9",
                "containerID": format!("simulated://{name}"),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": { "running": { "startedAt": now } },
            }],
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("reporting pod {ns}/{name} Running and Ready"))?;
    Ok(())
}

/// Writes (create, update, patch, apply, delete) to the resources podium writes, summed from the
/// API server's `apiserver_request_total` (all clients).
async fn apiserver_writes(client: &Client) -> Result<u64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    Ok(sum_writes(&text))
}

fn sum_writes(text: &str) -> u64 {
    let mut by: BTreeMap<(String, String), f64> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels.split("\",").find_map(|kv| {
                let (k, v) = kv.split_once("=\"")?;
                (k.trim_start_matches(',') == key).then(|| v.trim_end_matches('"').to_string())
            })
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
            continue;
        };
        let write = matches!(
            verb.as_str(),
            "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION"
        );
        let ours = matches!(
            resource.as_str(),
            "leases" | "pods" | "electiongroups" | "events"
        );
        if write && ours {
            *by.entry((verb, resource)).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    by.values().sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_api_servers_write_counters() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 12
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="",resource="pods",scope="resource",subresource="status",verb="PATCH",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",contentType="application/json",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="LIST",version="v1"} 100
apiserver_request_total{code="201",component="apiserver",contentType="application/json",dry_run="",group="",resource="configmaps",scope="resource",subresource="",verb="POST",version="v1"} 7
"#;
        assert_eq!(sum_writes(text), 15);
    }
}
