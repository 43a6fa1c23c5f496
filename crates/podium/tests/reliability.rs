//! Reliability on the real testbed, every test under the invariant checker (I1–I5):
//!
//! - a fault (409, 500, a timeout before or after the server applied the write) injected into
//!   each write of a handover: the Lease transfer, the old leader's demotion, the new leader's
//!   promotion, the status;
//! - the operator killed between any two of those writes, then restarted;
//! - kube-apiserver restarted, and down for longer than 2×TTL, while the operator keeps running;
//! - readiness flapping every 200 ms, with `minReadySeconds`;
//! - a human editing the labels or the Lease.
//!
//! Each test prints what happened at each injection point (the writes the operator sent and
//! what they were answered), so a CI log shows the path taken.

mod common;

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use common::checker::{self, Checker};
use common::faults::{Fault, Faults};
use common::{Fixture, RunOperator, elected, finish, fixture, pod_ip, start_operator, wait_for};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use podium::crd::{EPOCH_ANNOTATION, ROLE_LABEL};
use podium::operator::Operator;
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::{set_pod_not_ready, set_pod_running_ready};
use serde_json::json;

/// The Lease TTL of the fault tests: long, so that no renewal lands among the counted writes.
const QUIET_TTL: i32 = 30;

/// A group of three pods with its leader elected and every label and the status written, run by
/// an operator whose client goes through `faults`.
struct Scene {
    f: Fixture,
    checker: Checker,
    faults: Faults,
    operator: Option<Operator>,
    leader: String,
    epoch: i32,
}

impl Scene {
    async fn new(prefix: &str, options: checker::Options) -> Scene {
        let f = fixture(prefix).await;
        f.deploy("web", 3).await;
        let checker = Checker::start_with(&f.client, &f.ns, "web", None, options).await;
        let faults = Faults::default();
        let operator = start_operator(faults.client(Testbed::shared().config()), &f.ns, None).await;
        f.group("web", "web", json!({ "leaseDurationSeconds": QUIET_TTL }))
            .await;
        let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
        f.wait_status("web", Some(&leader), Duration::from_secs(5))
            .await;
        f.wait_followers(2, Duration::from_secs(5)).await;
        // Let the reconciles that our own label writes triggered run out.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, epoch) = f.lease_state("web").await;
        Scene {
            f,
            checker,
            faults,
            operator: Some(operator),
            leader,
            epoch,
        }
    }

    /// Fails the leader over (it turns NotReady) with `fault` in the `nth` write, restarting the
    /// operator if the fault was a crash; checks that it converges with every invariant intact.
    async fn fail_over_with(mut self, fault: Fault, nth: usize) {
        let (f, faults) = (&self.f, &self.faults);
        faults.arm(fault, nth);
        let started = Instant::now();
        set_pod_not_ready(&f.client, &f.ns, &self.leader)
            .await
            .unwrap();
        if fault == Fault::Crash {
            tokio::time::timeout(Duration::from_secs(10), faults.crashed())
                .await
                .unwrap_or_else(|_| panic!("write {nth} never came: {:?}", faults.seen()));
            // Nobody can react while the operator is dead.
            self.checker.pause_i4();
            self.operator.take().unwrap().abort();
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.operator = Some(start_operator(Testbed::shared().client(), &f.ns, None).await);
            self.checker.resume_i4();
        }
        let next = f
            .wait_leader_name(Some(&self.leader), Duration::from_secs(10))
            .await;
        let took = started.elapsed();
        f.wait_status("web", Some(&next), Duration::from_secs(10))
            .await;
        assert_eq!(
            f.lease_state("web").await,
            (Some(next.clone()), self.epoch + 1),
            "{fault:?} at write {nth}: the Lease names the new leader, one epoch up"
        );
        assert_eq!(faults.fired(), Some(fault), "the fault was injected");
        let writes: Vec<String> = faults
            .seen()
            .iter()
            .map(|w| {
                let what = w.path.rsplit('/').take(2).collect::<Vec<_>>();
                let outcome = match (w.fault, w.status) {
                    (Some(fault), status) => format!("{fault:?} (server: {status:?})"),
                    (None, Some(status)) => status.to_string(),
                    (None, None) => "no answer".into(),
                };
                format!("{} {}/{} -> {outcome}", w.method, what[1], what[0])
            })
            .collect();
        println!(
            "{fault:?} at write {nth}: new leader {next} after {took:?}; writes: {}",
            writes.join(", ")
        );
        self.checker.assert_invariants(&f.client, &f.ns).await;
        self.operator.take().unwrap().stop().await;
    }
}

fn reaction(reaction: Duration) -> checker::Options {
    checker::Options {
        reaction: Some(reaction),
        ..Default::default()
    }
}

/// The writes of a handover: 1 the Lease, 2 the old leader's label, 3 the new leader's, 4 the
/// status. A baseline run checks that order, so the injection points mean what they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_fences_the_old_leader_then_writes_the_lease_then_the_new_label_then_status() {
    let scene = Scene::new("handover", Default::default()).await;
    let faults = scene.faults.clone();
    // A fault past the end of the handover, so the log is kept and nothing is injected.
    faults.arm(Fault::Conflict, 100);
    set_pod_not_ready(&scene.f.client, &scene.f.ns, &scene.leader)
        .await
        .unwrap();
    let next = scene
        .f
        .wait_leader_name(Some(&scene.leader), Duration::from_secs(5))
        .await;
    scene
        .f
        .wait_status("web", Some(&next), Duration::from_secs(5))
        .await;
    let seen = faults.seen();
    let paths: Vec<&str> = seen.iter().map(|w| w.path.as_str()).collect();
    assert!(paths.len() >= 4, "{paths:?}");
    assert!(
        paths[0].ends_with(&format!("/pods/{}", scene.leader)),
        "{paths:?}"
    );
    assert!(paths[1].ends_with("/leases/web"), "{paths:?}");
    assert!(paths[2].ends_with(&format!("/pods/{next}")), "{paths:?}");
    assert!(
        paths[3].ends_with("/electiongroups/web/status"),
        "{paths:?}"
    );
    assert!(seen[..3].iter().all(|w| w.status == Some(200)), "{seen:?}");
    scene
        .checker
        .assert_invariants(&scene.f.client, &scene.f.ns)
        .await;
    let mut scene = scene;
    scene.operator.take().unwrap().stop().await;
}

/// Fails over with each of `faults` at each of `writes` of a handover in turn, on a fresh scene
/// each time.
async fn at_each_write(
    prefix: &str,
    options: checker::Options,
    writes: RangeInclusive<usize>,
    faults: &[Fault],
) {
    for nth in writes {
        for &fault in faults {
            Scene::new(prefix, options.clone())
                .await
                .fail_over_with(fault, nth)
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_at_any_write_of_a_handover_is_retried_from_fresh_state() {
    at_each_write("conflict", Default::default(), 1..=4, &[Fault::Conflict]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_at_any_write_of_a_handover_is_retried() {
    // A failed write is retried after half a second (the error policy), hence 2 s for I4.
    let options = reaction(Duration::from_secs(2));
    at_each_write("error500", options, 1..=4, &[Fault::ServerError]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_before_or_after_the_server_applied_a_write_converges() {
    // A 1 s timeout plus the retry delay: the old leader may keep its label ~1.5 s.
    let delay = Duration::from_secs(1);
    let timeouts = [
        Fault::TimeoutBeforeSend(delay),
        Fault::TimeoutAfterSend(delay),
    ];
    at_each_write(
        "timeout",
        reaction(Duration::from_secs(3)),
        1..=3,
        &timeouts,
    )
    .await;
}

/// The operator dies before write 1 (nothing written), between the Lease and the old leader's
/// label, between the two labels, or before the status, and a new one starts: it converges from
/// the Lease, and at no moment are two pods labelled leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_at_any_step_of_a_failover_restarts_and_converges() {
    at_each_write("crash", Default::default(), 1..=4, &[Fault::Crash]).await;
}

/// Operator restarts (a crash, then a new process) with a healthy leader move nothing: the new
/// operator waits for its caches before deciding. Its first reconcile used to run on a group
/// cache that had filled before the pod cache, see no members, and fail the leader over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_operator_repeatedly_keeps_the_leader_and_epoch() {
    let (f, checker, mut operator, leader) = elected("restarts", 3, json!({})).await;
    f.wait_status("web", Some(&leader), Duration::from_secs(5))
        .await;
    f.wait_followers(2, Duration::from_secs(5)).await;
    let state = f.lease_state("web").await;
    let since = Instant::now();
    for _ in 0..8 {
        operator.abort();
        operator = start_operator(Testbed::shared().client(), &f.ns, None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(f.lease_state("web").await, state);
    }
    let leases = checker.lease_changes_since(since);
    assert!(leases.iter().all(|l| *l == state), "{leases:?}");
    assert!(checker.role_changes_since(since).is_empty());
    finish(&f, &checker, operator).await;
}

/// kube-apiserver is restarted, then kept down for more than 2×TTL, while the operator runs.
/// Nothing can change while it is down; afterwards the operator reconnects, renews the same
/// holder at the same epoch, moves no label, and still fails over on the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_restarting_or_down_past_two_ttls_moves_no_leader() {
    let testbed = Testbed::start().await.expect("private testbed");
    let f = common::fixture_on(&testbed, "outage").await;
    f.deploy("web", 3).await;
    let checker = Checker::start(&f.client, &f.ns, "web", None).await;
    let operator = start_operator(testbed.client(), &f.ns, None).await;
    let ttl = 4;
    f.group("web", "web", json!({ "leaseDurationSeconds": ttl }))
        .await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    f.wait_status("web", Some(&leader), Duration::from_secs(5))
        .await;
    f.wait_followers(2, Duration::from_secs(5)).await;
    let state = f.lease_state("web").await;

    for (phase, down_for) in [
        ("restart", Duration::ZERO),
        ("down past 2xTTL", Duration::from_secs(2 * ttl as u64 + 1)),
    ] {
        let stopped = Instant::now();
        testbed.stop_apiserver().await;
        tokio::time::sleep(down_for).await;
        testbed.start_apiserver().await.expect("restart apiserver");
        let up = jiff::Timestamp::now();
        println!(
            "{phase}: kube-apiserver was unavailable for {:?}",
            stopped.elapsed()
        );
        // The operator resumes renewing the same holder.
        wait_for(
            Duration::from_secs(30),
            "the Lease to be renewed after the restart",
            || async { (f.renew_time("web").await > up).then_some(()) },
        )
        .await;
        println!(
            "{phase}: Lease renewed {:?} after the API server was back",
            jiff::Timestamp::now().duration_since(up)
        );
        tokio::time::sleep(Duration::from_secs(ttl as u64)).await;
        assert_eq!(f.lease_state("web").await, state, "{phase}: no failover");
        assert_eq!(
            f.leader_names().await,
            vec![leader.clone()],
            "{phase}: the same pod keeps the label"
        );
        let changes = checker.role_changes_since(stopped);
        assert!(
            changes.is_empty(),
            "{phase}: labels changed around the outage: {changes:?}"
        );
        let leases = checker.lease_changes_since(stopped);
        assert!(
            leases.iter().all(|l| (l.0.clone(), l.1) == state),
            "{phase}: the Lease changed hands: {leases:?}"
        );
    }

    // The watches are back: the next NotReady fails over at once.
    set_pod_not_ready(&f.client, &f.ns, &leader).await.unwrap();
    let next = f
        .wait_leader_name(Some(&leader), Duration::from_secs(30))
        .await;
    assert_eq!(f.lease_state("web").await, (Some(next), state.1 + 1));
    finish(&f, &checker, operator).await;
    drop(checker);
    drop(f);
}

/// Toggles `pod` between Ready and NotReady every 200 ms for `duration`, ending Ready; returns
/// when it was last made Ready.
async fn flap(f: &Fixture, pod: &str, duration: Duration) -> Instant {
    let ip = pod_ip(&f.pods().get(pod).await.unwrap());
    let end = Instant::now() + duration;
    let mut ready = false;
    loop {
        let at = Instant::now();
        if ready {
            set_pod_running_ready(&f.client, &f.ns, pod, &ip)
                .await
                .unwrap();
            if at >= end {
                return at;
            }
        } else {
            set_pod_not_ready(&f.client, &f.ns, pod).await.unwrap();
        }
        ready = !ready;
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(at.elapsed())).await;
    }
}

/// A follower and then the leader flap every 200 ms with `minReadySeconds: 2`: the follower's
/// flapping changes nothing, the leader's costs exactly one handover and never brings it back,
/// and a pod is elected only once it has been Ready for 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flapping_does_not_flap_the_leader_and_min_ready_seconds_holds() {
    let f = fixture("flap").await;
    f.deploy("web", 3).await;
    let min_ready = Duration::from_secs(2);
    let checker = Checker::start_with(
        &f.client,
        &f.ns,
        "web",
        None,
        checker::Options {
            min_ready,
            ..Default::default()
        },
    )
    .await;
    let operator = f.operator().await;
    f.group(
        "web",
        "web",
        json!({ "leaseDurationSeconds": 4, "minReadySeconds": 2 }),
    )
    .await;
    let leader = f.wait_leader_name(None, Duration::from_secs(6)).await;
    let (_, epoch) = f.lease_state("web").await;
    let pods = f.pod_names().await;
    let follower = pods.iter().find(|p| **p != leader).unwrap().clone();
    let third = pods
        .iter()
        .find(|p| **p != leader && **p != follower)
        .unwrap()
        .clone();

    // A flapping follower: nothing moves.
    let since = Instant::now();
    flap(&f, &follower, Duration::from_secs(4)).await;
    assert_eq!(f.lease_state("web").await, (Some(leader.clone()), epoch));
    assert!(
        checker
            .role_changes_since(since)
            .iter()
            .all(|(_, role)| role.as_deref() == Some("follower")),
        "{:?}",
        checker.role_changes_since(since)
    );

    // A flapping leader: one handover, to the pod that has been Ready long enough (not the
    // follower that flapped a moment ago), and never back.
    let since = Instant::now();
    let last_ready = flap(&f, &leader, Duration::from_secs(4)).await;
    let leases = checker.lease_changes_since(since);
    let holders: Vec<_> = leases.iter().map(|(h, e)| (h.clone(), *e)).collect();
    println!("Lease while the leader flapped: {holders:?}");
    assert_eq!(
        f.lease_state("web").await,
        (Some(third.clone()), epoch + 1),
        "exactly one handover, to {third}"
    );
    assert!(
        !regained(&checker, &leader, since),
        "{leader} got the label back while flapping"
    );

    // minReadySeconds: the old leader, Ready again since `last_ready`, is the only candidate
    // once the others are NotReady; it is elected only after 2 s of Ready (the Ready time has
    // whole seconds, so up to 1 s earlier).
    set_pod_not_ready(&f.client, &f.ns, &follower)
        .await
        .unwrap();
    set_pod_not_ready(&f.client, &f.ns, &third).await.unwrap();
    let back = f
        .wait_leader_name(Some(&third), Duration::from_secs(6))
        .await;
    assert_eq!(back, leader);
    let elected = wait_for(Duration::from_secs(2), "the checker to see it", || async {
        checker.leader_seen_at(&leader, last_ready)
    })
    .await;
    let after = elected.duration_since(last_ready);
    println!("the pod was elected {after:?} after it became Ready (minReadySeconds 2)");
    assert!(
        after >= min_ready - Duration::from_secs(1),
        "elected after {after:?}, before minReadySeconds"
    );
    assert!(after < min_ready + Duration::from_secs(2), "{after:?}");
    finish(&f, &checker, operator).await;
}

/// Whether `pod` lost the leader label after `since` and then had it again.
fn regained(checker: &Checker, pod: &str, since: Instant) -> bool {
    let mut lost = false;
    for r in checker.records() {
        if let common::checker::Record::Pod {
            at, pod: p, role, ..
        } = r
            && at >= since
            && p == pod
        {
            let leader = role.as_deref() == Some("leader");
            if lost && leader {
                return true;
            }
            lost |= !leader;
        }
    }
    false
}

async fn patch_pod(f: &Fixture, pod: &str, patch: serde_json::Value) {
    f.pods()
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn wait_lease(f: &Fixture, what: &str, check: impl Fn(Option<String>, i32) -> bool) {
    wait_for(Duration::from_secs(5), what, || async {
        let lease = f.leases().get_opt("web").await.ok()??;
        let spec = lease.spec?;
        check(
            spec.holder_identity.filter(|h| !h.is_empty()),
            spec.lease_transitions.unwrap_or(0),
        )
        .then_some(())
    })
    .await;
}

/// The Lease and the leader pod deleted together while the operator is down: no pod carries the
/// epoch any more, and the status's epoch keeps the fencing token growing instead of
/// restarting at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_deleted_with_its_leader_pod_keeps_the_epoch_growing() {
    let (f, checker, operator, first) = elected("lost-epoch", 3, json!({})).await;
    let leader = f.delete_leader("web", &first).await;
    let (_, epoch) = f.lease_state("web").await;
    assert!(epoch >= 2, "two terms so far, epoch {epoch}");
    operator.stop().await;

    f.leases().delete("web", &Default::default()).await.unwrap();
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    f.pods().delete(&leader, &now).await.unwrap();
    wait_for(Duration::from_secs(5), "the leader pod gone", || async {
        f.pods()
            .get_opt(&leader)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let carried: Vec<String> = f
        .pods()
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .filter_map(|p| p.annotations().get(EPOCH_ANNOTATION).cloned())
        .collect();
    assert!(
        carried.is_empty(),
        "no pod may carry the epoch: {carried:?}"
    );

    let operator = f.operator().await;
    wait_lease(&f, "the Lease recreated one epoch up", |h, e| {
        h.is_some() && e == epoch + 1
    })
    .await;
    checker::assert_converged(&f.client, &f.ns, "web").await;
    finish(&f, &checker, operator).await;
}

/// A human edits the leader's labels, labels a second leader, points the Lease elsewhere (at a
/// pod, at nobody that exists), deletes the Lease, changes its TTL: each time podium converges
/// back, the epoch only grows, and only the hand-made second leader ever doubles the label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_edits_of_labels_and_the_lease_converge_back() {
    let f = fixture("humans").await;
    f.deploy("web", 3).await;
    let pods = f.pod_names().await;
    let checker = Checker::start(&f.client, &f.ns, "web", None).await;
    let operator = f.operator().await;
    f.group("web", "web", json!({})).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    f.wait_followers(2, Duration::from_secs(5)).await;
    let (_, epoch) = f.lease_state("web").await;
    let other = pods.iter().find(|p| **p != leader).unwrap().clone();
    let leader_label = |f: &Fixture, pod: String| {
        let pods = f.pods();
        async move {
            let p = pods.get(&pod).await.ok()?;
            (p.labels().get(ROLE_LABEL).map(String::as_str) == Some("leader")
                && p.annotations().contains_key(EPOCH_ANNOTATION))
            .then_some(())
        }
    };

    // The leader's label removed, or set to follower: put back, same epoch.
    for patch in [
        json!({ "metadata": { "labels": { ROLE_LABEL: null } } }),
        json!({ "metadata": { "labels": { ROLE_LABEL: "follower" }, "annotations": { EPOCH_ANNOTATION: null } } }),
    ] {
        patch_pod(&f, &leader, patch.clone()).await;
        wait_for(
            Duration::from_secs(3),
            &format!("the leader label back after {patch}"),
            || leader_label(&f, leader.clone()),
        )
        .await;
        assert_eq!(f.lease_state("web").await, (Some(leader.clone()), epoch));
    }

    // A second leader by hand: stripped within the reaction time. Only that pod may double the
    // label, and only while this lasts.
    checker.tolerate_leaders(&[&other]);
    let labelled = Instant::now();
    patch_pod(
        &f,
        &other,
        json!({ "metadata": { "labels": { ROLE_LABEL: "leader" } } }),
    )
    .await;
    wait_for(
        Duration::from_secs(3),
        "the extra label stripped",
        || async {
            let p = f.pods().get(&other).await.ok()?;
            (p.labels().get(ROLE_LABEL).map(String::as_str) == Some("follower")).then_some(())
        },
    )
    .await;
    println!(
        "a hand-made second leader label lasted {:?}",
        labelled.elapsed()
    );
    assert!(labelled.elapsed() < Duration::from_secs(1));
    checker.tolerate_leaders(&[]);
    assert_eq!(f.lease_state("web").await, (Some(leader.clone()), epoch));

    // The Lease pointed at another pod (with a new epoch): the labels follow the Lease, and the
    // epoch stays the human's (no second transfer).
    f.hand_lease_to("web", &other, epoch + 1).await;
    wait_for(
        Duration::from_secs(3),
        "the labels to follow the Lease",
        || leader_label(&f, other.clone()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        f.lease_state("web").await,
        (Some(other.clone()), epoch + 1),
        "the hand-picked holder is kept at the hand-set epoch"
    );
    common::checker::assert_converged(&f.client, &f.ns, "web").await;
    let uid = f.pods().get(&other).await.unwrap().metadata.uid;
    let lease = f.leases().get("web").await.unwrap();
    assert_eq!(
        lease.annotations().get("podium.dev/holder-uid"),
        uid.as_ref(),
        "the new holder's UID is recorded"
    );

    // The Lease pointed at a pod that does not exist: failover to an eligible pod.
    f.edit_lease("web", |lease| {
        let spec = lease.spec.as_mut().unwrap();
        spec.holder_identity = Some("ghost".into());
        spec.lease_transitions = Some(epoch + 2);
    })
    .await;
    wait_lease(&f, "a real holder again", |h, e| {
        h.is_some_and(|h| pods.contains(&h)) && e == epoch + 3
    })
    .await;
    common::checker::assert_converged(&f.client, &f.ns, "web").await;

    // The Lease deleted: recreated, and the epoch goes on from the leader's annotation.
    f.leases().delete("web", &Default::default()).await.unwrap();
    wait_lease(&f, "the Lease recreated one epoch up", |h, e| {
        h.is_some() && e == epoch + 4
    })
    .await;
    common::checker::assert_converged(&f.client, &f.ns, "web").await;

    // The Lease's TTL changed: podium puts the group's back.
    f.edit_lease("web", |lease| {
        lease.spec.as_mut().unwrap().lease_duration_seconds = Some(600);
    })
    .await;
    wait_for(Duration::from_secs(3), "the group's TTL back", || async {
        let d = f
            .leases()
            .get("web")
            .await
            .ok()?
            .spec?
            .lease_duration_seconds;
        (d == Some(4)).then_some(())
    })
    .await;

    finish(&f, &checker, operator).await;
}
