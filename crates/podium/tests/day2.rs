//! Day-2 operations on the real testbed, under the watch-history checker: a switchover with
//! the real `podium` binary (and as `kubectl podium` through the real kubectl), its refusals,
//! `podium status`, a drain-aware handover when the leader's node is cordoned, and
//! `failoverDelaySeconds` against a flapping readiness probe.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{RunOperator, elected, finish, pod_ip};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use podium::crd::ROLE_LABEL;
use podium_testkit::testbed::kubelet::{
    Kubelet, KubeletOptions, set_pod_not_ready, set_pod_running_ready,
};
use podium_testkit::testbed::{Testbed, find_binary};
use serde_json::json;

/// Runs the real `podium` binary against the shared testbed.
async fn podium(args: &[&str]) -> Output {
    command(Path::new(env!("CARGO_BIN_EXE_podium")), args).await
}

async fn command(program: &Path, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(program)
        .env("KUBECONFIG", Testbed::shared().kubeconfig_path())
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    println!(
        "$ {} {}\n{}{}",
        program.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn event_reasons(client: &kube::Client, ns: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_hands_over_once_refuses_with_reasons_and_shows_in_status() {
    let (f, checker, operator, first) = elected("switch", 3, json!({})).await;
    let group = format!("{}/web", f.ns);
    let target = f.pod_other_than(&first).await;

    // Targeted, waiting for the outcome.
    let out = podium(&["switchover", &group, "--to", &target, "--wait"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!("Succeeded ({first} -> {target}, epoch 2")),
        "{said}"
    );
    assert_eq!(f.lease_state("web").await, (Some(target.clone()), 2));
    let old = f.pods().get(&first).await.unwrap();
    assert_eq!(
        old.labels().get(ROLE_LABEL).map(String::as_str),
        Some("follower")
    );

    // Untargeted, with the namespace as a flag: the best other eligible pod.
    let out = podium(&["switchover", "web", "-n", &f.ns, "--wait"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let (now_leading, epoch) = f.lease_state("web").await;
    let now_leading = now_leading.unwrap();
    assert_ne!(now_leading, target);
    assert_eq!(epoch, 3);

    // Refusals: each says why, exits non-zero, and moves nothing.
    let not_ready = f.pod_other_than(&now_leading).await;
    set_pod_not_ready(&f.client, &f.ns, &not_ready)
        .await
        .unwrap();
    let refusals = [
        (
            vec!["--to", "no-such-pod"],
            "pod no-such-pod is not a member",
        ),
        (
            vec!["--to", not_ready.as_str()],
            "not eligible: PodNotReady",
        ),
    ];
    for (extra, why) in refusals {
        let mut args = vec!["switchover", group.as_str(), "--wait"];
        args.extend(extra);
        let out = podium(&args).await;
        assert!(!out.status.success(), "refusal expected: {}", stdout(&out));
        assert!(stdout(&out).contains("Refused"), "{}", stdout(&out));
        assert!(
            stderr(&out).contains(why),
            "{why:?} not in {}",
            stderr(&out)
        );
        assert_eq!(f.lease_state("web").await, (Some(now_leading.clone()), 3));
    }
    // v1.20 ignores the CEL rule that the delay stays within the TTL; the operator does not.
    f.patch_group("web", json!({ "failoverDelaySeconds": 100 }))
        .await;
    let out = podium(&["switchover", &group, "--wait"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("spec is invalid"), "{}", stderr(&out));
    let (_, _, message) = f.condition("web", "InvalidSpec").await.unwrap();
    assert!(message.contains("failoverDelaySeconds is 100"), "{message}");
    f.patch_group("web", json!({ "failoverDelaySeconds": 0 }))
        .await;
    f.patch_group("web", json!({ "paused": true })).await;
    let out = podium(&["switchover", &group, "--wait"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("paused"), "{}", stderr(&out));
    f.patch_group("web", json!({ "paused": false })).await;
    let out = podium(&["switchover", "a/b/c"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("give NAMESPACE/GROUP or GROUP"),
        "{}",
        stderr(&out)
    );
    let out = podium(&["switchover", &format!("{}/missing", f.ns)]).await;
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    // `kubectl podium status`, through the real kubectl and a kubectl-podium link on the PATH.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_podium"),
        bin.path().join("kubectl-podium"),
    )
    .unwrap();
    let kubectl = find_binary("kubectl").unwrap_or_else(|e| panic!("{e:#}"));
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new(&kubectl)
        .env("KUBECONFIG", Testbed::shared().kubeconfig_path())
        .env("PATH", path)
        .args(["podium", "status", &group])
        .output()
        .await
        .unwrap();
    let shown = stdout(&out);
    println!("$ kubectl podium status {group}\n{shown}{}", stderr(&out));
    assert!(out.status.success(), "{}", stderr(&out));
    for want in [
        format!("leader:      {now_leading} at epoch 3"),
        "eligible:    2 of 3 members".to_string(),
        format!("-> {now_leading}, Switchover at epoch 3"),
        "Refused".to_string(),
        "LeaderElected".to_string(),
    ] {
        assert!(shown.contains(&want), "{want:?} not in:\n{shown}");
    }
    let reasons = event_reasons(&f.client, &f.ns).await;
    for reason in ["Switchover", "SwitchoverRefused"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
    finish(&f, &checker, operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordoning_the_leaders_node_hands_over_before_any_eviction() {
    let (f, checker, operator, first) = elected("drain", 2, json!({})).await;
    // A second node with one more member on it.
    let other_node = format!("{}-b", f.ns);
    let _kubelet_b = Kubelet::start(
        &f.client,
        KubeletOptions::new(&other_node)
            .namespace(&f.ns)
            .bind_unscheduled(false),
    )
    .await
    .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "web-on-b", "labels": { "app": "web" } },
        "spec": {
            "nodeName": other_node,
            "containers": [{ "name": "web", "image": "podium.local/web:test" }],
        },
    }))
    .unwrap();
    f.pods().create(&PostParams::default(), &pod).await.unwrap();
    f.wait_ready("web", 3).await;

    let nodes: Api<Node> = Api::all(f.client.clone());
    let cordon = |unschedulable: bool| {
        let nodes = nodes.clone();
        let node = f.kubelet.node().to_string();
        async move {
            nodes
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": { "unschedulable": unschedulable } })),
                )
                .await
                .unwrap();
        }
    };
    let cordoned = Instant::now();
    cordon(true).await;
    let next = f
        .wait_leader_name(Some(&first), Duration::from_secs(5))
        .await;
    println!(
        "leadership left the cordoned node after {:?}",
        cordoned.elapsed()
    );
    assert_eq!(next, "web-on-b", "the only pod on a schedulable node");
    let old = f
        .pods()
        .get(&first)
        .await
        .expect("the old leader still exists");
    assert!(old.metadata.deletion_timestamp.is_none());
    let group = f
        .wait_status("web", Some(&next), Duration::from_secs(5))
        .await;
    assert_eq!(
        group.status.unwrap().last_transition.map(|t| t.reason),
        Some("NodeDraining".to_string())
    );

    // Uncordoned: leadership stays where it is.
    cordon(false).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.lease_state("web").await, (Some("web-on-b".into()), 2));
    finish(&f, &checker, operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_delay_rides_out_a_flapping_probe_and_then_fails_over() {
    let (f, checker, operator, first) =
        elected("flap", 3, json!({ "failoverDelaySeconds": 3 })).await;
    // A NotReady leader keeps its label for the delay by design: I4 allows that plus its usual
    // second.
    checker.set_reaction(Some(Duration::from_secs(4)));
    // The followers' labels come right after the leader's; let them land before watching.
    f.wait_followers(2, Duration::from_secs(5)).await;
    let ip = pod_ip(&f.pods().get(&first).await.unwrap());
    let flapping = Instant::now();
    for _ in 0..3 {
        set_pod_not_ready(&f.client, &f.ns, &first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        set_pod_running_ready(&f.client, &f.ns, &first, &ip)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(f.lease_state("web").await, (Some(first.clone()), 1));
    // Renewals only: no other holder and no new epoch, at any moment the watch saw.
    let changes = checker.lease_changes_since(flapping);
    assert!(
        changes.iter().all(|c| *c == (Some(first.clone()), 1)),
        "the flapping leader's Lease changed hands: {changes:?}"
    );
    let leadership_moves: Vec<_> = checker
        .role_changes_since(flapping)
        .into_iter()
        .filter(|(pod, role)| *pod == first || role.as_deref() == Some("leader"))
        .collect();
    assert_eq!(
        leadership_moves,
        vec![],
        "the leader label moved while the probe flapped"
    );

    // NotReady for good: still the leader within the delay, then a failover.
    let not_ready = Instant::now();
    set_pod_not_ready(&f.client, &f.ns, &first).await.unwrap();
    // The transition time has whole seconds, so the delay ends 2 to 3 s from here.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(f.lease_state("web").await, (Some(first.clone()), 1));
    let next = f
        .wait_leader_name(Some(&first), Duration::from_secs(8))
        .await;
    println!(
        "failed over {:?} after NotReady (delay 3 s)",
        not_ready.elapsed()
    );
    let group = f
        .wait_status("web", Some(&next), Duration::from_secs(5))
        .await;
    let transition = group.status.unwrap().last_transition.unwrap();
    assert_eq!(
        (transition.to.as_deref(), transition.reason.as_str()),
        (Some(next.as_str()), "PodNotReady")
    );
    finish(&f, &checker, operator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_every_group_and_says_when_there_are_none() {
    let f = common::fixture("status-all").await;
    let out = podium(&["status", "-n", &f.ns]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no ElectionGroups found"));
    f.deploy("web", 1).await;
    let operator = f.operator().await;
    f.group("web", "web", json!({})).await;
    f.group("api", "web-none", json!({})).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    f.wait_status("web", Some(&leader), Duration::from_secs(5))
        .await;
    let out = podium(&["status", "-n", &f.ns]).await;
    let shown = stdout(&out);
    let (api, web) = (
        shown.find(&format!("{}/api", f.ns)),
        shown.find(&format!("{}/web", f.ns)),
    );
    assert!(api.is_some() && web.is_some() && api < web, "{shown}");
    assert!(
        shown.contains(&format!("leader:      {leader} at epoch 1")),
        "{shown}"
    );
    operator.stop().await;
}
