//! The ElectionGroup CRD's schema, enforced by a real kube-apiserver (v1.20, so the structural
//! schema, not the CEL rules, does the work). Invalid specs go through `DynamicObject` because
//! they may not deserialize into the Rust type.

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use podium::crd::{ElectionGroup, ROLE_LABEL};
use podium_testkit::fixture::group_manifest;
use podium_testkit::testbed::Testbed;
use serde_json::{Value, json};

struct Fixture {
    groups: Api<DynamicObject>,
    typed: Api<ElectionGroup>,
}

async fn fixture(prefix: &str) -> Fixture {
    let tb = Testbed::shared();
    tb.install_crd().await.unwrap_or_else(|e| panic!("{e:#}"));
    let ns = tb.create_namespace(prefix).await.unwrap();
    let resource = ApiResource::erase::<ElectionGroup>(&());
    Fixture {
        groups: Api::namespaced_with(tb.client(), &ns, &resource),
        typed: Api::namespaced(tb.client(), &ns),
    }
}

fn group(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(group_manifest(name, spec)).expect("a DynamicObject")
}

/// Creates a group with `spec`, asserts the server refuses it with 422 and a message naming
/// `field`, and returns the message.
async fn assert_rejected(spec: Value, field: &str) -> String {
    let f = fixture("crd-invalid").await;
    match f
        .groups
        .create(&PostParams::default(), &group("g", spec.clone()))
        .await
    {
        Err(kube::Error::Api(status)) => {
            let msg = status.message;
            eprintln!("{spec}\n  -> {} {msg}", status.code);
            assert_eq!(status.code, 422, "spec {spec} -> server said: {msg}");
            assert!(
                msg.contains(field),
                "spec {spec}: expected {field} in: {msg}"
            );
            msg
        }
        Ok(created) => panic!("the server accepted an invalid spec {spec}: {created:?}"),
        Err(e) => panic!("unexpected error for spec {spec}: {e}"),
    }
}

#[tokio::test]
async fn empty_selector_is_rejected() {
    assert_rejected(json!({ "selector": {} }), "spec.selector").await;
}

#[tokio::test]
async fn empty_match_labels_is_rejected() {
    assert_rejected(
        json!({ "selector": { "matchLabels": {} } }),
        "spec.selector.matchLabels",
    )
    .await;
}

#[tokio::test]
async fn empty_match_expressions_is_rejected() {
    assert_rejected(
        json!({ "selector": { "matchExpressions": [] } }),
        "spec.selector.matchExpressions",
    )
    .await;
}

#[tokio::test]
async fn missing_selector_is_rejected() {
    let msg = assert_rejected(json!({ "leaseDurationSeconds": 15 }), "spec.selector").await;
    assert!(msg.contains("Required"), "server said: {msg}");
}

#[tokio::test]
async fn zero_ttl_is_rejected() {
    assert_rejected(
        json!({ "selector": { "matchLabels": { "app": "db" } }, "leaseDurationSeconds": 0 }),
        "spec.leaseDurationSeconds",
    )
    .await;
}

#[tokio::test]
async fn huge_ttl_is_rejected() {
    assert_rejected(
        json!({
            "selector": { "matchLabels": { "app": "db" } },
            "leaseDurationSeconds": 1_000_000_000,
        }),
        "spec.leaseDurationSeconds",
    )
    .await;
}

#[tokio::test]
async fn role_label_in_match_labels_is_rejected() {
    assert_rejected(
        json!({ "selector": { "matchLabels": { "app": "db", ROLE_LABEL: "leader" } } }),
        "spec.selector.matchLabels",
    )
    .await;
}

#[tokio::test]
async fn role_label_in_match_expressions_is_rejected() {
    assert_rejected(
        json!({
            "selector": {
                "matchLabels": { "app": "db" },
                "matchExpressions": [
                    { "key": ROLE_LABEL, "operator": "In", "values": ["leader"] },
                ],
            },
        }),
        "spec.selector.matchExpressions",
    )
    .await;
}

#[tokio::test]
async fn illegal_preferred_leader_is_rejected() {
    assert_rejected(
        json!({
            "selector": { "matchLabels": { "app": "db" } },
            "preferredLeader": "Not_A/Pod Name",
        }),
        "spec.preferredLeader",
    )
    .await;
}

#[tokio::test]
async fn valid_spec_is_accepted_with_defaults() {
    let f = fixture("crd-valid").await;
    let created = f
        .groups
        .create(
            &PostParams::default(),
            &group(
                "db",
                json!({ "selector": { "matchLabels": { "app": "db" } } }),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("a valid spec was refused: {e}"));
    let spec = &created.data["spec"];
    assert_eq!(
        spec["leaseDurationSeconds"], 15,
        "defaults not applied: {spec}"
    );
    assert_eq!(spec["minReadySeconds"], 0, "defaults not applied: {spec}");

    // It also reads back as the Rust type.
    let typed = f.typed.get("db").await.unwrap();
    assert_eq!(typed.spec.lease_duration_seconds, 15);
    assert_eq!(typed.spec.min_ready_seconds, 0);
    assert!(!typed.spec.paused);

    // Boundaries are inclusive, and a matchExpressions-only selector is fine.
    f.groups
        .create(
            &PostParams::default(),
            &group(
                "edges",
                json!({
                    "selector": {
                        "matchExpressions": [{ "key": "app", "operator": "Exists" }],
                    },
                    "leaseDurationSeconds": 2,
                    "minReadySeconds": 3600,
                    "preferredLeader": "db-0",
                }),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("a valid spec was refused: {e}"));
}
