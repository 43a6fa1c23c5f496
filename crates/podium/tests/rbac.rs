//! The chart's RBAC, proven: the operator runs with a client for the chart's ServiceAccount,
//! bound by the chart's own rendered ClusterRole, and the whole election and failover works.
//! With one verb removed it fails in a way the user can see: a condition and an Event say
//! what is missing.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{fixture, served, start_operator, wait_for};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use podium_testkit::testbed::{Testbed, find_binary};
use serde_json::Value;

const RELEASE: &str = "rbac";

/// The chart's ClusterRole and ClusterRoleBinding for a release in `namespace`, as rendered.
fn rendered_rbac(namespace: &str) -> (ClusterRole, ClusterRoleBinding) {
    let helm = find_binary("helm").expect("helm (run scripts/install-deps.sh)");
    let chart = podium_testkit::repo_root().join("charts/podium");
    let chart = chart.to_str().expect("a UTF-8 path");
    let out = Command::new(helm)
        .args(["template", RELEASE, chart, "--namespace", namespace])
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect();
    let pick = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} rendered"))
    };
    let mut role: ClusterRole = serde_json::from_value(pick("ClusterRole")).unwrap();
    let mut binding: ClusterRoleBinding =
        serde_json::from_value(pick("ClusterRoleBinding")).unwrap();
    // Cluster-scoped names must not collide between tests sharing the testbed.
    let name = format!("{namespace}-podium");
    role.metadata.name = Some(name.clone());
    binding.metadata.name = Some(name.clone());
    binding.role_ref.name = name;
    (role, binding)
}

/// Installs the rendered RBAC (minus `drop_verb` on pods, if given) and returns a client for
/// the chart's ServiceAccount.
async fn operator_client(admin: &Client, namespace: &str, drop_verb: Option<&str>) -> Client {
    let (mut role, binding) = rendered_rbac(namespace);
    if let Some(verb) = drop_verb {
        for rule in role.rules.iter_mut().flatten() {
            if rule.resources.iter().flatten().any(|r| r == "pods") {
                rule.verbs.retain(|v| v != verb);
            }
        }
    }
    let subject = binding
        .subjects
        .as_ref()
        .and_then(|s| s.first())
        .expect("binding has a subject")
        .clone();
    assert_eq!(subject.namespace.as_deref(), Some(namespace));
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    Testbed::shared()
        .service_account_client(namespace, &subject.name)
        .await
        .expect("service account client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rbac_is_enough_for_election_and_failover() {
    let (f, _service, checker) = served("rbac-ok", 3).await;
    let client = operator_client(&f.client, &f.ns, None).await;
    let operator = start_operator(client, &f.ns, None).await;
    f.group("web", "web", serde_json::json!({})).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(3)).await;
    f.wait_status("web", Some(&leader), Duration::from_secs(3))
        .await;
    let next = f.delete_leader("web", &leader).await;
    assert_eq!(f.lease_state("web").await, (Some(next), 2));
    checker.assert_invariants(&f.client, &f.ns).await;
    assert!(
        operator
            .metrics
            .encode()
            .contains("podium_reconcile_errors_total{kind=\"pod_patch\"} 0"),
        "no pod write was refused"
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pods_patch_a_condition_and_an_event_name_the_missing_permission() {
    let f = fixture("rbac-nopatch").await;
    f.deploy("web", 2).await;
    let client = operator_client(&f.client, &f.ns, Some("patch")).await;
    let operator = start_operator(client, &f.ns, None).await;
    f.group("web", "web", serde_json::json!({})).await;

    let (status, reason, message) =
        wait_for(Duration::from_secs(10), "a Degraded condition", || {
            let f = &f;
            async move {
                f.condition("web", "Degraded")
                    .await
                    .filter(|c| c.0 == "True")
            }
        })
        .await;
    println!("Degraded={status} {reason}: {message}");
    assert!(
        message.contains("patch") && message.contains("pods"),
        "the condition should name the refused verb and resource: {message}"
    );
    assert!(message.contains("forbidden"), "{message}");

    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    let forbidden = wait_for(Duration::from_secs(5), "a Forbidden event", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("Forbidden"))
        }
    })
    .await;
    let note = forbidden.note.unwrap_or_default();
    assert!(note.contains("cannot patch resource \"pods\""), "{note}");
    assert!(
        f.leaders().await.is_empty(),
        "nothing can be labelled without pods/patch"
    );
    operator.stop().await;
}
