//! The operator's own high availability on the real testbed: only the replica holding the
//! operator Lease writes, a standby takes over when it dies, and a replica that was frozen
//! past its Lease cannot do harm when it wakes up, because every podium write is conditional.

mod common;

use std::time::{Duration, Instant};

use common::checker::Checker;
use common::faults::Faults;
use common::{Fixture, fixture, start_operator, wait_for};
use kube::Client;
use podium::ha::ElectionConfig;
use podium::operator::Operator;
use podium_testkit::testbed::Testbed;
use serde_json::json;

fn election(ns: &str, identity: &str) -> Option<ElectionConfig> {
    Some(ElectionConfig {
        namespace: ns.into(),
        lease_name: "podium-operator".into(),
        identity: identity.into(),
        lease_ttl: Duration::from_secs(2),
    })
}

async fn wait_leading(op: &podium::operator::Operator, what: &str, timeout: Duration) {
    let leading = op.leading.clone();
    wait_for(timeout, what, || {
        let leading = leading.clone();
        async move { (*leading.borrow()).then_some(()) }
    })
    .await;
}

/// Two replicas of the operator, a (with `client_a`) leading and b standing by, over three pods
/// of app `web` under the checker; and the group `web` with its first leader.
struct Replicas {
    f: Fixture,
    checker: Checker,
    a: Operator,
    b: Operator,
    leader: String,
}

async fn replicas(prefix: &str, client_a: Client) -> Replicas {
    let f = fixture(prefix).await;
    f.deploy("web", 3).await;
    let checker = Checker::start(&f.client, &f.ns, "web", None).await;
    let a = start_operator(client_a, &f.ns, election(&f.ns, "replica-a")).await;
    wait_leading(&a, "replica a to lead", Duration::from_secs(5)).await;
    let b = start_operator(
        Testbed::shared().client(),
        &f.ns,
        election(&f.ns, "replica-b"),
    )
    .await;
    f.group("web", "web", json!({})).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(2)).await;
    Replicas {
        f,
        checker,
        a,
        b,
        leader,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_crashed_or_stopped_replica_without_moving_leadership() {
    let Replicas {
        f,
        checker,
        a,
        b,
        leader,
    } = replicas("ha", Testbed::shared().client()).await;
    assert!(!*b.leading.borrow(), "only one replica leads");
    let state = f.lease_state("web").await;

    // A crash: no step-down, so b waits for the operator Lease to expire.
    let crashed = Instant::now();
    a.abort();
    wait_leading(&b, "replica b to take over", Duration::from_secs(10)).await;
    println!(
        "standby took over {:?} after the active replica crashed (operator lease TTL 2s)",
        crashed.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        f.lease_state("web").await,
        state,
        "taking over the operator must not move any group's leader"
    );

    // The new active replica does the next failover.
    f.delete_pod(&leader).await;
    let next = f
        .wait_leader_name(Some(&leader), Duration::from_secs(5))
        .await;

    // A graceful stop steps down, so a new standby takes over in about a second.
    let c = start_operator(
        Testbed::shared().client(),
        &f.ns,
        election(&f.ns, "replica-c"),
    )
    .await;
    let stopped = Instant::now();
    b.stop().await;
    wait_leading(&c, "replica c to take over", Duration::from_secs(5)).await;
    println!(
        "standby took over {:?} after the active replica stepped down",
        stopped.elapsed()
    );
    assert_eq!(f.lease_state("web").await.0.as_deref(), Some(next.as_str()));
    checker.assert_invariants(&f.client, &f.ns).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_wakes_up_to_refused_writes_and_no_second_leader() {
    let faults = Faults::default();
    let Replicas {
        f,
        checker,
        a,
        b,
        leader,
    } = replicas("frozen", faults.client(Testbed::shared().config())).await;
    // Let a finish the election (its status write, and the retry a stale cache may cause), so
    // the write frozen below is one of the failover's, not a leftover of the election.
    f.wait_status("web", Some(&leader), Duration::from_secs(5))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Freeze a's writes: its operator-Lease renewal hangs, so it still believes it leads,
    // while b sees the Lease expire and takes over.
    faults.freeze();
    f.delete_pod(&leader).await;
    wait_leading(&b, "replica b to take over", Duration::from_secs(10)).await;
    assert!(
        *a.leading.borrow(),
        "the frozen replica still believes it leads"
    );
    let next = f
        .wait_leader_name(Some(&leader), Duration::from_secs(5))
        .await;
    let state = f.lease_state("web").await;

    // Wake a up: whatever it decided while frozen is sent now, on stale resourceVersions.
    faults.release();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let released = faults.released();
    println!("writes the frozen replica sent after waking: {released:?}");
    let group_writes: Vec<_> = released
        .iter()
        .filter(|(_, path, _)| path.contains("/leases/web") || path.contains("/pods/"))
        .collect();
    assert!(
        !group_writes.is_empty(),
        "the frozen replica should have tried to act on the failover: {released:?}"
    );
    for (method, path, status) in &group_writes {
        // Its fence of the deleted leader is unconditional by design and finds the pod gone;
        // every conditional write held while frozen is refused. (The Lease write it sends
        // after the fence is not held; the unchanged Lease below shows it was refused.)
        let fence_of_the_gone_leader = path.ends_with(&format!("/pods/{leader}"));
        let expected = if fence_of_the_gone_leader { 404 } else { 409 };
        assert_eq!(
            *status, expected,
            "stale write {method} {path} must be refused, got {status}"
        );
    }
    assert_eq!(
        f.lease_state("web").await,
        state,
        "the stale replica changed nothing"
    );
    assert_eq!(f.leader_names().await, vec![next]);
    checker.assert_invariants(&f.client, &f.ns).await;
    a.stop().await;
    b.stop().await;
}
