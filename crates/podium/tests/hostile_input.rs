//! Hostile input: specs, names, Leases and annotations that try to break podium. Each case
//! ends in a clear API rejection or a clear condition, never a panic, and a healthy group in the
//! same namespace keeps working (it still fails over at the end, under the invariant checker).
//!
//! `one_group_over_thousands_of_pods_stays_fast` creates 2,000 pods in CI and 10,000 with
//! `PODIUM_SOAK=1`, and prints how long the election and a failover take.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::checker::{self, Checker};
use common::{Fixture, RunOperator, fixture, wait_for};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use podium::crd::{ElectionGroup, PRIORITY_ANNOTATION, ROLE_LABEL};
use podium_testkit::fixture::group_manifest;
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{create_node, set_pod_not_ready};
use serde_json::{Value, json};

/// Panics on the runtime's worker threads (where the operator's reconciles run) since start.
static WORKER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_worker_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-runtime-worker"))
            {
                WORKER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn dynamic(f: &Fixture) -> Api<DynamicObject> {
    Api::namespaced_with(
        f.client.clone(),
        &f.ns,
        &ApiResource::erase::<ElectionGroup>(&()),
    )
}

/// Creates the group; `Err((code, message))` if the API server refused it.
async fn create(f: &Fixture, name: &str, spec: Value) -> Result<(), (u16, String)> {
    let group: DynamicObject = serde_json::from_value(group_manifest(name, spec)).unwrap();
    match dynamic(f).create(&PostParams::default(), &group).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err((status.code, status.message)),
        Err(e) => panic!("unexpected error creating {name}: {e}"),
    }
}

/// How long podium may take to answer a hostile spec with a condition.
const ANSWER: Duration = Duration::from_secs(10);

/// A spec that selects the pods of `app`.
fn selecting(app: &str) -> Value {
    json!({ "selector": { "matchLabels": { "app": app } } })
}

/// Creates group `name` with `spec`, which the API server must accept, and waits for podium
/// to answer with condition `type_`; returns it as (status, reason, message).
async fn answer(f: &Fixture, name: &str, type_: &str, spec: Value) -> (String, String, String) {
    create(f, name, spec).await.unwrap();
    f.wait_condition(name, type_, None, ANSWER).await
}

/// The healthy group every case must leave alone: two pods `app=healthy`, under the checker.
struct Healthy {
    checker: Checker,
    leader: String,
    state: (Option<String>, i32),
}

impl Healthy {
    async fn start(f: &Fixture) -> Healthy {
        f.deploy("healthy", 2).await;
        let checker = Checker::start_with(
            &f.client,
            &f.ns,
            "healthy",
            None,
            checker::Options {
                pod_selector: Some("app=healthy".into()),
                ..Default::default()
            },
        )
        .await;
        f.group("healthy", "healthy", json!({})).await;
        let leader = f
            .wait_app_leader_other_than("healthy", None, Duration::from_secs(5))
            .await
            .name_any();
        let state = f.lease_state("healthy").await;
        Healthy {
            checker,
            leader,
            state,
        }
    }

    /// Nothing moved, then a failover works and every invariant held.
    async fn still_works(&self, f: &Fixture) {
        assert_eq!(
            f.lease_state("healthy").await,
            self.state,
            "the healthy group was disturbed"
        );
        set_pod_not_ready(&f.client, &f.ns, &self.leader)
            .await
            .unwrap();
        let next = f
            .wait_app_leader_other_than("healthy", Some(&self.leader), Duration::from_secs(5))
            .await
            .name_any();
        assert_eq!(
            f.lease_state("healthy").await,
            (Some(next), self.state.1 + 1)
        );
        self.checker.assert_invariants(&f.client, &f.ns).await;
        assert_eq!(
            WORKER_PANICS.load(Ordering::SeqCst),
            0,
            "a reconcile panicked"
        );
    }
}

fn report(case: &str, outcome: &str) {
    println!("{case:<55} -> {outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_specs_end_in_a_rejection_or_a_condition_and_other_groups_keep_working() {
    count_worker_panics();
    let f = fixture("hostile").await;
    let operator = f.operator().await;
    let healthy = Healthy::start(&f).await;
    f.deploy("web", 3).await;
    let web_pods: Vec<String> = f
        .pods()
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .iter()
        .map(|p| p.name_any())
        .collect();

    // Refused by the API server (the CRD schema), with a message naming the field.
    let refused: Vec<(&str, Value, &str)> = vec![
        ("empty selector", json!({ "selector": {} }), "spec.selector"),
        (
            "empty matchLabels",
            json!({ "selector": { "matchLabels": {} } }),
            "spec.selector.matchLabels",
        ),
        (
            "selector on podium.dev/role (matchLabels)",
            json!({ "selector": { "matchLabels": { ROLE_LABEL: "leader" } } }),
            "spec.selector.matchLabels",
        ),
        (
            "selector on podium.dev/role (matchExpressions)",
            json!({ "selector": { "matchExpressions": [{ "key": ROLE_LABEL, "operator": "Exists" }] } }),
            "spec.selector.matchExpressions",
        ),
        (
            "leaseDurationSeconds 0",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "leaseDurationSeconds": 0 }),
            "spec.leaseDurationSeconds",
        ),
        (
            "leaseDurationSeconds -5",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "leaseDurationSeconds": -5 }),
            "spec.leaseDurationSeconds",
        ),
        (
            "leaseDurationSeconds 2^31",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "leaseDurationSeconds": 2_147_483_648_i64 }),
            "spec.leaseDurationSeconds",
        ),
        (
            "preferredLeader other-ns/pod",
            json!({ "selector": { "matchLabels": { "app": "web" } }, "preferredLeader": "other-ns/pod" }),
            "spec.preferredLeader",
        ),
    ];
    for (i, (case, spec, field)) in refused.into_iter().enumerate() {
        match create(&f, &format!("refused-{i}"), spec).await {
            Err((code, message)) => {
                assert_eq!(code, 422, "{case}: {message}");
                assert!(message.contains(field), "{case}: {message}");
                report(case, &format!("{code} {message}"));
            }
            Ok(()) => panic!("{case}: the API server accepted it"),
        }
    }

    // Accepted by the server, answered by podium with a condition.
    let (_, reason, message) = answer(&f, "overlap", "Conflict", selecting("healthy")).await;
    assert_eq!(reason, "OverlappingGroup", "{message}");
    assert!(message.contains("healthy"), "{message}");
    report(
        "a selector matching another group's pods",
        &format!("Conflict/{reason}: {message}"),
    );

    // A Lease named like the group but not podium's: left alone.
    f.foreign_lease("taken", "someone-else").await;
    let (_, reason, message) = answer(&f, "taken", "Conflict", selecting("web")).await;
    assert_eq!(reason, "LeaseNotOwned", "{message}");
    let lease = f.leases().get("taken").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("someone-else")
    );
    assert!(
        f.leaders()
            .await
            .iter()
            .all(|p| !web_pods.contains(&p.name_any())),
        "nobody in app=web may be labelled for a group without its Lease"
    );
    report(
        "a Lease of the same name owned by someone else",
        &format!("Conflict/{reason}: {message}"),
    );
    f.delete_group("taken").await;
    assert_eq!(
        f.leases()
            .get("taken")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("someone-else"),
        "deleting the group must not delete a Lease podium does not own"
    );

    // preferredLeader naming a pod that does not exist: an ordinary election.
    let spec = json!({ "selector": { "matchLabels": { "app": "web" } }, "preferredLeader": "no-such-pod" });
    let (_, _, message) = answer(&f, "ghost-pref", "LeaderElected", spec).await;
    let (holder, _) = f.lease_state("ghost-pref").await;
    assert!(holder.as_ref().is_some_and(|h| web_pods.contains(h)));
    report(
        "preferredLeader naming a pod that does not exist",
        &format!("LeaderElected: {message}"),
    );
    f.delete_group("ghost-pref").await;

    // preferredLeader naming a pod that exists only in another namespace: not a member.
    let elsewhere = Testbed::shared()
        .create_namespace("hostile-other")
        .await
        .unwrap();
    let lonely: Pod = serde_json::from_value(json!({
        "metadata": { "name": "lonely", "labels": { "app": "web" } },
        "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.9" }] }
    }))
    .unwrap();
    Api::<Pod>::namespaced(f.client.clone(), &elsewhere)
        .create(&PostParams::default(), &lonely)
        .await
        .unwrap();
    let (_, _, message) = answer(
        &f,
        "far-pref",
        "LeaderElected",
        json!({ "selector": { "matchLabels": { "app": "web" } }, "preferredLeader": "lonely" }),
    )
    .await;
    let (holder, _) = f.lease_state("far-pref").await;
    assert!(
        holder.as_ref().is_some_and(|h| web_pods.contains(h)),
        "{holder:?}"
    );
    report(
        "preferredLeader naming a pod in another namespace",
        &format!("not a member; LeaderElected: {message}"),
    );
    f.delete_group("far-pref").await;

    // A 253-character name (the longest Kubernetes allows): its Lease gets the same name, which
    // is also legal, so the election works. Event names are "<object name>.<timestamp>" and
    // cannot fit: those events are refused and dropped (events are best effort).
    let long = format!("g{}", "x".repeat(252));
    assert_eq!(long.len(), 253);
    let (_, _, message) = answer(&f, &long, "LeaderElected", selecting("web")).await;
    let (holder, epoch) = f.lease_state(&long).await;
    assert!(holder.is_some() && epoch == 1);
    let events = Api::<DynamicObject>::namespaced_with(
        f.client.clone(),
        &f.ns,
        &ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
            "events",
        ),
    )
    .list(&ListParams::default())
    .await
    .unwrap()
    .items
    .into_iter()
    .filter(|e| e.data["regarding"]["name"].as_str() == Some(long.as_str()))
    .count();
    report(
        "a 253-character group name",
        &format!(
            "works: Lease of the same name, {message}; {events} events recorded (names too long)"
        ),
    );
    f.delete_group(&long).await;
    assert!(f.leases().get_opt(&long).await.unwrap().is_none());

    // A priority annotation that is not a number: Degraded says so, and it counts as 0: the pod
    // with a valid higher priority wins, and the bad one stays eligible.
    let (bad, good) = (&web_pods[0], &web_pods[1]);
    // The pod watch delivers in order, so once the operator has seen the bad annotation (the
    // paused group turns Degraded) it has seen the good one too, and the election that follows
    // unpausing knows both. Created unpaused, the group raced the annotations into the cache.
    for (pod, priority) in [(good, "5"), (bad, "high")] {
        f.pods()
            .patch(
                pod,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "metadata": { "annotations": { PRIORITY_ANNOTATION: priority } } }),
                ),
            )
            .await
            .unwrap();
    }
    let (_, reason, message) = answer(
        &f,
        "prio",
        "Degraded",
        json!({ "selector": { "matchLabels": { "app": "web" } }, "paused": true }),
    )
    .await;
    f.groups()
        .patch(
            "prio",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "paused": false } })),
        )
        .await
        .unwrap();
    f.wait_condition("prio", "LeaderElected", None, ANSWER)
        .await;
    assert!(
        message.contains(bad.as_str()) && message.contains("high"),
        "{message}"
    );
    assert_eq!(
        f.lease_state("prio").await.0.as_deref(),
        Some(good.as_str())
    );
    let status = f.groups().get("prio").await.unwrap().status.unwrap();
    assert_eq!(status.eligible.as_deref(), Some("3/3"));
    report(
        "podium.dev/priority: high",
        &format!("Degraded/{reason}: {message}; {good} (priority 5) leads, 3/3 eligible"),
    );

    // The operator's own validation for what v1.20 lets through (no CEL there): an `In` without
    // values.
    let (_, reason, message) = answer(
        &f,
        "no-values",
        "InvalidSpec",
        json!({ "selector": { "matchExpressions": [{ "key": "app", "operator": "In" }] } }),
    )
    .await;
    report(
        "matchExpressions In without values",
        &format!("InvalidSpec/{reason}: {message}"),
    );

    healthy.still_works(&f).await;
    operator.stop().await;
}

/// How many pods the scale test creates: 2,000 in CI, 10,000 with `PODIUM_SOAK=1`.
fn scale() -> usize {
    if std::env::var("PODIUM_SOAK").is_ok_and(|v| v == "1") {
        10_000
    } else {
        2_000
    }
}

/// Runs `work` over `items` with at most `limit` in flight.
async fn bounded<T, F, Fut>(items: Vec<T>, limit: usize, work: F)
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(items.into_iter().map(work))
        .buffer_unordered(limit)
        .try_collect::<Vec<()>>()
        .await
        .expect("bulk API calls");
}

async fn ready_pod(client: &Client, ns: &str, name: String, ip: String) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let status = json!({ "status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "conditions": [
            { "type": "Ready", "status": "True", "lastTransitionTime": now },
            { "type": "ContainersReady", "status": "True", "lastTransitionTime": now },
        ],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// One group over thousands of pods: created directly (bound to a node, status set by the test)
/// with bounded concurrency. Prints how long the first leader label, full convergence (every
/// member labelled follower) and a failover take, and checks the invariants throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_over_thousands_of_pods_stays_fast() {
    count_worker_panics();
    let n = scale();
    let f = fixture("scale").await;
    let operator = f.operator().await;
    let healthy = Healthy::start(&f).await;
    let node = format!("big-{}", f.ns);
    create_node(&f.client, &node).await.unwrap();

    let started = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("big-{i:05}")).collect();
    let pods = f.pods();
    bounded(names.clone(), 32, |name| {
        let pods = pods.clone();
        let node = node.clone();
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": { "app": "big" } },
                "spec": {
                    "nodeName": node,
                    "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.9" }]
                }
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
            Ok(())
        }
    })
    .await;
    let created = started.elapsed();
    let ips: Vec<(String, String)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), format!("10.250.{}.{}", i / 250, i % 250 + 1)))
        .collect();
    bounded(ips, 32, |(name, ip)| ready_pod(&f.client, &f.ns, name, ip)).await;
    println!(
        "{n} pods created in {created:?}, all Ready after {:?}",
        started.elapsed()
    );

    let checker = Checker::start_with(
        &f.client,
        &f.ns,
        "big",
        None,
        checker::Options {
            pod_selector: Some("app=big".into()),
            // A NotReady leader waits for the reconcile in progress: at most one batch of
            // follower writes (`reconcile::MAX_ROUTINE_WRITES`), whatever the group's size.
            reaction: Some(Duration::from_secs(10)),
            ..Default::default()
        },
    )
    .await;
    let ttl = 15;
    let created_at = Instant::now();
    f.group("big", "big", json!({ "leaseDurationSeconds": ttl }))
        .await;
    // Leaders are read from the checker's watch, and the big lists are polled slowly: listing
    // thousands of pods every 20 ms would load the API server more than podium does.
    let big_leader = |not: Option<String>| {
        let leaders = checker.leaders_now();
        async move {
            match leaders.as_slice() {
                [only] if Some(only) != not.as_ref() => Some(only.clone()),
                _ => None,
            }
        }
    };
    let first = wait_for(
        Duration::from_secs(60),
        "a leader among the big pods",
        || big_leader(None),
    )
    .await;
    let elected = created_at.elapsed();
    // Makes `leader` NotReady; returns the next leader and how long the failover took.
    let fail_over = async |leader: &String, what: &str| {
        let failed_at = Instant::now();
        set_pod_not_ready(&f.client, &f.ns, leader).await.unwrap();
        let next = wait_for(Duration::from_secs(60), what, || {
            big_leader(Some(leader.clone()))
        })
        .await;
        (next, failed_at.elapsed())
    };

    // A failover while thousands of followers are still being labelled.
    let (second, early_failover) = fail_over(&first, "a failover while labelling").await;

    // Every member labelled, while the Lease keeps being renewed.
    let timeout = Duration::from_secs(if n > 5_000 { 600 } else { 180 });
    let stalest = std::cell::Cell::new(Duration::ZERO);
    wait_for(timeout, "every big pod labelled", || {
        let pods = f.pods();
        let leases = f.leases();
        let stalest = &stalest;
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Some(renewed) = leases
                .get("big")
                .await
                .ok()
                .and_then(|l| l.spec?.renew_time)
            {
                let age = jiff::Timestamp::now().duration_since(renewed.0);
                stalest.set(
                    stalest
                        .get()
                        .max(Duration::try_from(age).unwrap_or_default()),
                );
            }
            let l = pods
                .list_metadata(
                    &ListParams::default().labels(&format!("app=big,{ROLE_LABEL}=follower")),
                )
                .await
                .ok()?;
            (l.items.len() == n - 1).then_some(())
        }
    })
    .await;
    let converged = created_at.elapsed();
    let stalest = stalest.get();
    f.wait_status("big", Some(&second), Duration::from_secs(30))
        .await;

    let (third, failover) = fail_over(&second, "the big group to fail over").await;
    println!(
        "{n} pods in one group: first leader labelled {elected:?} after the group was created; \
         failover during the labelling {first} -> {second} in {early_failover:?}; every member \
         labelled after {converged:?} (Lease renewTime at most {stalest:?} old meanwhile, TTL \
         {ttl}s); failover after that {second} -> {third} in {failover:?}"
    );
    // Bounded by one reconcile's batch of follower writes (see `reconcile::MAX_ROUTINE_WRITES`),
    // not by the size of the group; generous for a loaded CI machine.
    assert!(
        early_failover < Duration::from_secs(10),
        "a failover while labelling {n} pods took {early_failover:?}"
    );
    assert!(
        failover < Duration::from_secs(5),
        "a failover over {n} pods took {failover:?}"
    );
    assert!(
        stalest < Duration::from_secs(ttl as u64),
        "the Lease went {stalest:?} without renewal while the members were labelled"
    );
    checker.assert_invariants(&f.client, &f.ns).await;
    healthy.still_works(&f).await;
    operator.stop().await;
}
