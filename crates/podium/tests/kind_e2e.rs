//! End-to-end on a real cluster: kind, the operator image built from the Dockerfile, the Helm
//! chart, the examples. Each step is a subcommand of `scripts/kind-e2e.sh`, which also runs
//! them by hand (`scripts/kind-e2e.sh help`).
//!
//! Needs docker, kind, kubectl and helm, so it is ignored by default:
//!
//! ```text
//! cargo test --test kind_e2e -- --ignored --nocapture
//! ```
//!
//! An existing cluster named `$KIND_CLUSTER_NAME` (default `podium-e2e`) is reused, as in CI
//! where `helm/kind-action` creates it; `PODIUM_E2E_KEEP_CLUSTER=1` keeps the cluster at the end.
//! `PODIUM_E2E_MAX_FAILOVER_SECONDS` (default 45) bounds the measured failover time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn script() -> PathBuf {
    podium_testkit::repo_root().join("scripts/kind-e2e.sh")
}

/// Runs one step of the script; its progress goes to stderr, its `key=value` results are
/// returned. Panics (failing the test) when the step fails.
fn step(name: &str) -> BTreeMap<String, String> {
    eprintln!("==> scripts/kind-e2e.sh {name}");
    let out = Command::new("bash")
        .arg(script())
        .arg(name)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "scripts/kind-e2e.sh {name} failed with {}",
        out.status
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Dumps diagnostics on failure and deletes the cluster (unless kept) at the end.
struct Teardown;

impl Drop for Teardown {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("bash").arg(script()).arg("logs").status();
        }
        let _ = Command::new("bash").arg(script()).arg("down").status();
    }
}

fn seconds(results: &BTreeMap<String, String>, key: &str) -> f64 {
    results
        .get(key)
        .unwrap_or_else(|| panic!("the script printed no {key}: {results:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not a number: {e}"))
}

#[test]
#[ignore = "needs docker + kind"]
fn kind_leader_service_failover_and_downward_api() {
    let _teardown = Teardown;
    let max_failover: f64 = std::env::var("PODIUM_E2E_MAX_FAILOVER_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(45.0);

    // Cluster, image, chart: the operator's two replicas roll out and one takes its Lease.
    step("up");
    // Four web pods, the ElectionGroup, the leader Service, and a client pod.
    step("examples");

    // The Service answers with the pod the ElectionGroup names as leader.
    let check = step("check");
    let leader = check.get("leader").expect("check prints leader=");
    assert!(leader.starts_with("web-"), "{leader}");

    // Deleting the leader pod moves the Service to a new leader, with a higher epoch.
    let failover = step("failover");
    assert_eq!(failover.get("old_leader"), Some(leader));
    assert_ne!(failover.get("new_leader"), Some(leader));
    let took = seconds(&failover, "failover_seconds");
    eprintln!("failover through the web-leader Service: {took:.2}s");
    assert!(
        took <= max_failover,
        "failover took {took:.2}s, more than {max_failover}s"
    );

    // Deleting the active operator replica hands its Lease to the standby, which keeps leading.
    let operator = step("operator-failover");
    eprintln!(
        "operator failover: {:.2}s",
        seconds(&operator, "operator_failover_seconds")
    );

    // The Downward API example: a promoted member reads role=leader from its volume, live.
    let downward = step("downward");
    eprintln!(
        "downward API volume updated {:.2}s after the election",
        seconds(&downward, "downward_update_seconds")
    );
}

/// The script's own usage text lists every step this test drives.
#[test]
fn script_lists_its_steps() {
    let out = Command::new("bash")
        .arg(script())
        .arg("help")
        .output()
        .expect("bash runs the script");
    assert!(out.status.success());
    let usage = String::from_utf8_lossy(&out.stdout);
    for step in [
        "up",
        "examples",
        "check",
        "failover",
        "operator-failover",
        "downward",
        "logs",
        "down",
    ] {
        assert!(
            usage.contains(&format!("scripts/kind-e2e.sh {step}")),
            "usage lacks {step}:\n{usage}"
        );
    }
}
