//! The operator's own metrics on the testbed, as `podium run` starts it: the kube client's
//! request metrics next to the election metrics in `/metrics`, through a failover under the
//! watch-history checker.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use podium::operator::Operator;
use podium_testkit::prometheus::{http_get, samples};
use serde_json::json;

type Sample = (BTreeMap<String, String>, f64);

fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample.0.get(name).map_or("", String::as_str)
}

/// The requests `verb` on `api_group`/`resource` answered with `code`, summed.
fn requests(all: &[Sample], verb: &str, api_group: &str, resource: &str, code: &str) -> f64 {
    all.iter()
        .filter(|s| {
            label(s, "verb") == verb
                && label(s, "api_group") == api_group
                && label(s, "resource") == resource
                && label(s, "code") == code
        })
        .map(|s| s.1)
        .sum()
}

/// Three pods of app `web` under a checker, and `podium run` serving `/metrics` on the port
/// returned.
async fn serving_metrics(prefix: &str) -> (Fixture, checker::Checker, Operator, u16) {
    let f = fixture(prefix).await;
    f.deploy("web", 3).await;
    let checker = checker::Checker::start(&f.client, &f.ns, "web", None).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let operator = start_connected_operator(&f.ns, ([127, 0, 0, 1], port).into()).await;
    (f, checker, operator, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_requests_and_a_failover_show_in_metrics() {
    let (f, checker, operator, port) = serving_metrics("observability").await;
    f.group("web", "web", json!({})).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    f.delete_leader("web", &leader).await;

    let (status, text) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let all = samples(&text, "podium_kube_client_requests_total");
    for (verb, api_group, resource, code) in [
        ("list", "core", "pods", "200"),
        ("watch", "core", "pods", "200"),
        ("patch", "core", "pods", "200"),
        ("list", "coordination.k8s.io", "leases", "200"),
        ("watch", "coordination.k8s.io", "leases", "200"),
        ("create", "coordination.k8s.io", "leases", "201"),
        ("list", "podium.dev", "electiongroups", "200"),
        ("watch", "podium.dev", "electiongroups", "200"),
    ] {
        assert!(
            requests(&all, verb, api_group, resource, code) >= 1.0,
            "no {verb} {api_group}/{resource} {code} in\n{text}"
        );
    }
    // The failover moved the Lease to the next leader and wrote the group's status.
    assert!(
        all.iter().any(|s| label(s, "resource") == "leases"
            && matches!(label(s, "verb"), "update" | "patch")
            && label(s, "code").starts_with('2')),
        "no Lease handover write in\n{text}"
    );
    assert!(
        all.iter()
            .any(|s| label(s, "resource") == "electiongroups/status"
                && label(s, "code").starts_with('2')),
        "no status write in\n{text}"
    );
    assert!(
        all.iter()
            .all(|s| !s.0.contains_key("namespace") && !s.0.contains_key("name")),
        "a namespace or name label in\n{text}"
    );
    // Watches too: each is timed until its stream starts.
    let latency = samples(&text, "podium_kube_client_request_duration_seconds_count");
    assert!(
        latency
            .iter()
            .any(|s| label(s, "verb") == "watch" && s.1 >= 1.0)
            && latency
                .iter()
                .any(|s| label(s, "verb") == "patch" && s.1 >= 1.0),
        "watches and patches are not timed in\n{text}"
    );
    let changes = samples(&text, "podium_leader_changes_total");
    assert!(
        changes
            .iter()
            .any(|s| label(s, "group") == "web" && s.1 >= 1.0),
        "no leader change of web in\n{text}"
    );
    finish(&f, &checker, operator).await;
}

/// A kept holder is renewed by the renewer, not by a reconcile per renewal (which was about
/// half the operator's CPU at 1000 groups): over four renewal intervals the Lease is renewed
/// each half TTL, holder and epoch unchanged, while the group is not reconciled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_renewals_need_no_reconcile() {
    let (f, checker, operator, port) = serving_metrics("renewer").await;
    f.group("web", "web", json!({ "leaseDurationSeconds": 2 }))
        .await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    f.wait_status("web", Some(&leader), Duration::from_secs(5))
        .await;
    // The election's own follow-up reconciles (its status and label echoes) settle first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counts = || {
        let (status, text) = http_get(port, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200);
        let reconciles: f64 = samples(&text, "podium_reconcile_seconds_count")
            .iter()
            .map(|s| s.1)
            .sum();
        let renewals = requests(
            &samples(&text, "podium_kube_client_requests_total"),
            "update",
            "coordination.k8s.io",
            "leases",
            "200",
        );
        let renewed: f64 = samples(&text, "podium_renewals_total")
            .iter()
            .filter(|s| label(s, "result") == "renewed")
            .map(|s| s.1)
            .sum();
        (reconciles, renewals, renewed)
    };
    let (reconciles_before, renewals_before, counted_before) = counts();
    let lease_before = f.lease_state("web").await;
    let renewed_before = f.renew_time("web").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (reconciles_after, renewals_after, counted_after) = counts();

    let renewals = renewals_after - renewals_before;
    let reconciles = reconciles_after - reconciles_before;
    assert_eq!(
        counted_after - counted_before,
        renewals,
        "podium_renewals_total{{result=\"renewed\"}} does not count the renewer's Lease updates"
    );
    assert!(
        (3.0..=5.0).contains(&renewals),
        "{renewals} Lease renewals in 4 s at a TTL of 2 s (one each second expected)"
    );
    assert!(
        reconciles <= 1.0,
        "{reconciles} reconciles during {renewals} renewals: renewals still go through the reconcile"
    );
    assert!(f.renew_time("web").await > renewed_before);
    assert_eq!(f.lease_state("web").await, lease_before);
    assert_eq!(f.leader_names().await, vec![leader]);
    finish(&f, &checker, operator).await;
}
