//! Role notifications and `podium exec` end to end on the testbed: real pods on loopback IPs,
//! each running the real `podium exec` with a shell command as its leader-only work, the real
//! operator signing with TokenRequest tokens, and the API server's keys verifying them. The
//! commands log their starts and stops; no two may overlap through delete and NotReady
//! failovers, a frozen leader, and an operator restart.

mod common;

use std::time::{Duration, Instant};

use podium::operator::{Operator, OperatorConfig};
use podium_testkit::leader_process::{
    NOTIFY_PORT, OPERATOR_ACCOUNT, ProcessPods, Work, overlaps, unix_nanos,
};
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::kubelet::set_pod_not_ready;
use podium_testkit::wait::wait_for;

const TTL_SECONDS: u64 = 4;

async fn start_operator(client: kube::Client, ns: &str) -> Operator {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let config = OperatorConfig {
        http_addr: None,
        watch_namespace: Some(ns.to_string()),
        election: None,
        service_account: Some((ns.to_string(), OPERATOR_ACCOUNT.to_string())),
    };
    Operator::start(client, config)
        .await
        .expect("start operator")
}

fn read_runs(pods: &ProcessPods) -> Vec<Work> {
    pods.runs().expect("the work log parses")
}

/// Waits for a run that started after `after` runs, on a pod other than `not`, and returns it.
async fn next_run(pods: &ProcessPods, after: usize, not: Option<&str>, timeout: Duration) -> Work {
    wait_for(timeout, "a leader process to start", || async {
        read_runs(pods)
            .into_iter()
            .skip(after)
            .find(|r| Some(r.pod.as_str()) != not)
    })
    .await
}

fn millis_between(earlier_ns: u128, later_ns: u128) -> i128 {
    (later_ns as i128 - earlier_ns as i128) / 1_000_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_only_processes_never_overlap() {
    let testbed = Testbed::shared();
    testbed.install_crd().await.expect("install CRD");
    let ns = testbed.create_namespace("notify").await.expect("namespace");
    let client = testbed.client();
    let dir = tempfile::tempdir().unwrap();
    let mut pods = common::exec_pods(&ns, "web", 3, dir.path()).await;
    let mut operator = start_operator(client.clone(), &ns).await;
    let started = Instant::now();
    let groups: kube::Api<podium::crd::ElectionGroup> = kube::Api::namespaced(client.clone(), &ns);
    let group = common::notify_group("web", "web", TTL_SECONDS, NOTIFY_PORT);
    groups
        .create(&Default::default(), &group)
        .await
        .expect("create group");

    // A fresh operator activates nobody for one term: a process it never heard of may run.
    let first = next_run(&pods, 0, None, Duration::from_secs(20)).await;
    println!(
        "first leader process {} (epoch {}) started {:?} after the operator",
        first.pod,
        first.epoch,
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(TTL_SECONDS),
        "a fresh operator activated a leader within one term of starting"
    );

    // Delete the leader's pod: its process is stopped by the kubelet, then the pod goes.
    let count = read_runs(&pods).len();
    let deleted_at = unix_nanos();
    pods.delete(&first.pod).await.expect("delete leader pod");
    let second = next_run(&pods, count, Some(&first.pod), Duration::from_secs(20)).await;
    println!(
        "delete: {} started {} ms after the delete (epoch {})",
        second.pod,
        millis_between(deleted_at, second.start_ns),
        second.epoch
    );
    assert!(second.epoch > first.epoch);
    pods.start("web-3", "web").await.expect("replacement pod");

    // NotReady: the operator demotes the leader, its process stops and acknowledges, and
    // only then does the new leader's process start.
    let count = read_runs(&pods).len();
    let not_ready_at = unix_nanos();
    set_pod_not_ready(&client, &ns, &second.pod)
        .await
        .expect("NotReady");
    let third = next_run(&pods, count, Some(&second.pod), Duration::from_secs(20)).await;
    println!(
        "NotReady: {} started {} ms after the leader went NotReady (epoch {})",
        third.pod,
        millis_between(not_ready_at, third.start_ns),
        third.epoch
    );

    // Operator restart: the running leader is found running and renewed, not stopped.
    operator.stop().await;
    operator = start_operator(client.clone(), &ns).await;
    tokio::time::sleep(Duration::from_secs(TTL_SECONDS * 3 / 2)).await;
    let after_restart = read_runs(&pods);
    let current = after_restart.last().unwrap();
    assert_eq!(
        (current.pod.as_str(), current.stop_ns),
        (third.pod.as_str(), None),
        "the operator restart stopped or moved the leader process: {after_restart:?}"
    );

    // A frozen leader (its exec and its command stopped, as in a paused VM): the new leader's
    // process waits until the frozen one's term has surely run out.
    let count = after_restart.len();
    pods.freeze(&third.pod, true).expect("freeze");
    let frozen_at = unix_nanos();
    set_pod_not_ready(&client, &ns, &third.pod)
        .await
        .expect("NotReady");
    let fourth = next_run(&pods, count, Some(&third.pod), Duration::from_secs(20)).await;
    let waited = millis_between(frozen_at, fourth.start_ns);
    println!(
        "frozen leader: {} started {waited} ms after the freeze",
        fourth.pod
    );
    // The last renewal it took reached it at most a third of a term before the freeze, and
    // echoed the nonce of its answer a third of a term before that: its term, which runs from
    // that nonce, ran until a third of a term after the freeze at the earliest. The operator
    // waits one term from that nonce's receipt (its last grant), not from the last answer.
    assert!(
        waited >= (TTL_SECONDS * 1000 / 3) as i128,
        "activated {waited} ms after the freeze, before the frozen leader's term could end"
    );
    pods.freeze(&third.pod, false).expect("thaw");
    let thawed_at = unix_nanos();
    let frozen_run = wait_for(
        Duration::from_secs(10),
        "the thawed process to stop",
        || async {
            read_runs(&pods)
                .into_iter()
                .find(|r| r.pod == third.pod && r.epoch == third.epoch && r.stop_ns.is_some())
        },
    )
    .await;
    let tail = millis_between(thawed_at, frozen_run.stop_ns.unwrap());
    println!("the thawed process stopped {tail} ms after the thaw (its term had ended)");

    operator.stop().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = read_runs(&pods);
    println!("{} leader runs: {all:?}", all.len());
    // A frozen process cannot run its own stop: between the thaw and its exec's SIGTERM it
    // may still run, after its term. That tail, and nothing else, is allowed to overlap.
    let found: Vec<_> = overlaps(&all)
        .into_iter()
        .filter(|(a, _)| !(a.pod == third.pod && a.epoch == third.epoch))
        .collect();
    assert!(found.is_empty(), "leader processes overlapped: {found:#?}");
    assert!(all.len() >= 4, "expected four leader runs, saw {all:?}");
}
