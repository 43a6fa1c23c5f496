//! The ElectionGroup CRD on a Kubernetes 1.36 apiserver: the 1.36.4 apiextensions-apiserver
//! (built from Debian's Go sources by scripts/install-apiext.sh), on its own etcd, delegating
//! authentication and authorization to the v1.20 testbed. This is where the CEL rules
//! (`x-kubernetes-validations`), which v1.20 ignores, are proven, together with defaults,
//! server-side apply of the status as the operator does it, and the printer columns.
//!
//! The server has no `/api`; everything here uses typed `Api`s, which need no discovery.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use podium::FIELD_MANAGER;
use podium::crd::{ElectionGroup, ElectionGroupStatus, LeaderTransition, SwitchoverOutcome};
use podium_testkit::testbed::apiext::ApiextServer;
use podium_testkit::testbed::{Testbed, find_binary};
use serde_json::{Value, json};

const CRD_NAME: &str = "electiongroups.podium.dev";
const CEL_EMPTY: &str = "selector must not be empty: an empty selector would match every pod";
const CEL_DELAY: &str = "failoverDelaySeconds must not exceed leaseDurationSeconds";
const CEL_ROLE: &str = "selector must not use the key podium.dev/role: podium writes that label";

/// One 1.36 server for every test of this binary, started on first use on a thread and runtime
/// of its own (so that no test's runtime owns it). Its processes die with the test process.
fn server() -> &'static ApiextServer {
    static SERVER: OnceLock<Result<ApiextServer, String>> = OnceLock::new();
    let server = SERVER.get_or_init(|| {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(ApiextServer::start(Testbed::shared()))
                .map_err(|e| format!("{e:#}"))
        })
        .join()
        .unwrap_or_else(|_| Err("the apiext startup thread panicked".to_string()))
    });
    match server {
        Ok(server) => server,
        Err(e) => panic!("the 1.36 apiextensions-apiserver did not start: {e}"),
    }
}

fn client() -> Client {
    server().client().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The real `kubectl apply --server-side -f crds/electiongroup.yaml`, then asserts what a modern
/// server must say about it: Established, names accepted, a structural schema, and the CEL rules
/// kept (a rule that does not compile or exceeds the cost budget makes the apply itself fail).
async fn install_crd(client: &Client) -> CustomResourceDefinition {
    let path = podium_testkit::repo_root().join("crds/electiongroup.yaml");
    let kubectl = find_binary("kubectl").unwrap_or_else(|e| panic!("{e:#}"));
    let out = tokio::process::Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(server().kubeconfig_path())
        .args(["apply", "--server-side", "-f"])
        .arg(&path)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", kubectl.display()));
    assert!(
        out.status.success(),
        "kubectl apply --server-side -f {} refused by the 1.36 server: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let current = crds.get(CRD_NAME).await.expect("reading the CRD back");
        let conditions = current
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let is_true = |type_: &str| {
            conditions
                .iter()
                .any(|c| c.type_ == type_ && c.status == "True")
        };
        for c in &conditions {
            assert!(
                !(c.type_ == "NonStructuralSchema" && c.status == "True"),
                "the 1.36 server calls the CRD's schema non-structural: {:?}",
                c.message
            );
        }
        if is_true("Established") {
            assert!(
                is_true("NamesAccepted"),
                "names not accepted: {conditions:?}"
            );
            for c in &conditions {
                assert!(
                    matches!(c.type_.as_str(), "Established" | "NamesAccepted"),
                    "unexpected CRD condition on 1.36: {c:?}"
                );
            }
            let stored = serde_json::to_value(&current.spec).unwrap();
            let rules = &stored["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["selector"]["x-kubernetes-validations"];
            assert_eq!(
                rules.as_array().map(Vec::len),
                Some(2),
                "the 1.36 server did not keep both CEL rules: {rules}"
            );
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "CRD {CRD_NAME} not Established on 1.36 after 30s: {conditions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Fixture {
    client: Client,
    ns: String,
    dynamic: Api<DynamicObject>,
    typed: Api<ElectionGroup>,
}

async fn fixture(prefix: &str) -> Fixture {
    let client = client();
    install_crd(&client).await;
    // Namespaces live in the v1.20 testbed: the 1.36 server's NamespaceLifecycle asks it.
    let ns = Testbed::shared()
        .create_namespace(prefix)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let resource = ApiResource::erase::<ElectionGroup>(&());
    Fixture {
        dynamic: Api::namespaced_with(client.clone(), &ns, &resource),
        typed: Api::namespaced(client.clone(), &ns),
        client,
        ns,
    }
}

fn group(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a DynamicObject")
}

#[tokio::test]
async fn crd_installs_with_server_side_apply_and_is_established() {
    let client = client();
    let first = install_crd(&client).await;
    // Applying it again is a no-op for the same manager.
    let again = install_crd(&client).await;
    assert_eq!(first.metadata.generation, again.metadata.generation);
    let managers: Vec<_> = again
        .managed_fields()
        .iter()
        .filter_map(|m| Some((m.manager.clone()?, m.operation.clone()?)))
        .collect();
    assert!(
        managers.contains(&("kubectl".to_string(), "Apply".to_string())),
        "{managers:?}"
    );
}

/// The real `helm install` of the chart, whose first step is Helm 4's server-side apply of the
/// chart's `crds/`. This server has no core or apps API, so Helm cannot go on to the templates or
/// store the release (docs/apiext-recipe.md has the whole record); what must hold is that the CRD
/// step is accepted by 1.36 and that the install fails only after it.
#[tokio::test]
async fn helm_4_server_side_crd_install_is_accepted() {
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e:#}"));
    let out = tokio::process::Command::new(&helm)
        .arg("--kubeconfig")
        .arg(server().kubeconfig_path())
        .args(["install", "podium-crd-step", "--namespace", "default"])
        .arg(podium_testkit::repo_root().join("charts/podium"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("failed to install CRD"),
        "the 1.36 server refused Helm 4's install of the chart's CRD: {said}"
    );
    assert!(
        said.contains("unable to build kubernetes objects from release manifest"),
        "helm install should get past the CRD and stop only at the templates, which have no API \
         on this server ({}): {said}",
        out.status
    );

    let crds: Api<CustomResourceDefinition> = Api::all(client());
    let crd = crds.get(CRD_NAME).await.expect("the CRD helm applied");
    let appliers: Vec<_> = crd
        .managed_fields()
        .iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        appliers.iter().any(|m| m == "helm"),
        "helm did not apply the CRD server-side; appliers: {appliers:?}"
    );
}

#[tokio::test]
async fn bad_specs_are_refused_with_the_cel_message() {
    let f = fixture("crd136-bad").await;
    let ok_selector = json!({ "matchLabels": { "app": "db" } });
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "empty selector",
            json!({ "selector": {} }),
            vec![CEL_EMPTY, "should have at least 1 properties"],
        ),
        (
            "matchLabels {}",
            json!({ "selector": { "matchLabels": {} } }),
            vec![CEL_EMPTY],
        ),
        (
            "podium.dev/role in matchLabels",
            json!({ "selector": { "matchLabels": { "podium.dev/role": "leader" } } }),
            vec![CEL_ROLE],
        ),
        (
            "podium.dev/role in matchExpressions",
            json!({ "selector": { "matchExpressions": [
                { "key": "podium.dev/role", "operator": "Exists" }
            ] } }),
            vec![CEL_ROLE],
        ),
        (
            "TTL 0",
            json!({ "selector": ok_selector, "leaseDurationSeconds": 0 }),
            vec![
                "spec.leaseDurationSeconds",
                "should be greater than or equal to 2",
            ],
        ),
        (
            "TTL 3601",
            json!({ "selector": ok_selector, "leaseDurationSeconds": 3601 }),
            vec![
                "spec.leaseDurationSeconds",
                "should be less than or equal to 3600",
            ],
        ),
        (
            "failoverDelaySeconds above the TTL",
            json!({ "selector": ok_selector, "leaseDurationSeconds": 10, "failoverDelaySeconds": 11 }),
            vec![CEL_DELAY],
        ),
        (
            // CEL sees the defaulted TTL (15).
            "failoverDelaySeconds above the default TTL",
            json!({ "selector": ok_selector, "failoverDelaySeconds": 16 }),
            vec![CEL_DELAY],
        ),
        (
            "empty drain taint key",
            json!({ "selector": ok_selector, "drainTaints": [""] }),
            vec!["spec.drainTaints[0]", "at least 1 chars long"],
        ),
        (
            "bad preferredLeader",
            json!({ "selector": ok_selector, "preferredLeader": "Not_A_Pod" }),
            vec!["spec.preferredLeader", "should match"],
        ),
    ];
    for (i, (what, spec, wanted)) in cases.into_iter().enumerate() {
        let result = f
            .dynamic
            .create(&PostParams::default(), &group(&format!("bad-{i}"), spec))
            .await;
        match result {
            Err(kube::Error::Api(status)) => {
                println!("1.36 refused {what}: {} {}", status.code, status.message);
                assert_eq!(status.code, 422, "{what}: {status:?}");
                for needle in wanted {
                    assert!(
                        status.message.contains(needle),
                        "{what}: {needle:?} not in {:?}",
                        status.message
                    );
                }
            }
            other => panic!("{what}: expected 422, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_valid_spec_gets_its_defaults() {
    let f = fixture("crd136-defaults").await;
    let created = f
        .dynamic
        .create(
            &PostParams::default(),
            &group(
                "good",
                json!({ "selector": { "matchLabels": { "app": "db" } } }),
            ),
        )
        .await
        .expect("a valid ElectionGroup is accepted");
    let spec = &created.data["spec"];
    assert_eq!(spec["leaseDurationSeconds"], json!(15), "{spec}");
    assert_eq!(spec["minReadySeconds"], json!(0), "{spec}");
    assert_eq!(spec["paused"], json!(false), "{spec}");
    assert_eq!(spec["failoverDelaySeconds"], json!(0), "{spec}");
    assert_eq!(spec["handoverOnDrain"], json!(true), "{spec}");
    // And the typed API reads it back.
    let typed = f.typed.get("good").await.expect("typed get");
    assert_eq!(typed.spec.lease_duration_seconds, 15);
}

/// The operator's own status write, the code path `reconcile` uses.
async fn write_status_like_the_operator(
    api: &Api<ElectionGroup>,
    group: &ElectionGroup,
    status: &ElectionGroupStatus,
) -> Result<ElectionGroup, kube::Error> {
    podium::status::write(api, group, status).await
}

#[tokio::test]
async fn status_is_written_like_the_operator_and_shown_in_the_table() {
    let f = fixture("crd136-status").await;
    f.dynamic
        .create(
            &PostParams::default(),
            &group(
                "good",
                json!({ "selector": { "matchLabels": { "app": "db" } } }),
            ),
        )
        .await
        .expect("creating the group");
    let group = f.typed.get("good").await.unwrap();
    // Whole seconds: the server stores RFC 3339 times to the second.
    let now = Time(
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
            .unwrap(),
    );
    let status = ElectionGroupStatus {
        leader: Some("db-0".into()),
        leader_uid: Some("0b7c1b0e-0000-4000-8000-000000000001".into()),
        epoch: Some(1),
        leader_since: Some(now.clone()),
        members: 3,
        eligible_members: 3,
        eligible: Some("3/3".into()),
        observed_generation: group.metadata.generation,
        conditions: vec![Condition {
            type_: "Degraded".into(),
            status: "False".into(),
            reason: "Elected".into(),
            message: "db-0 leads".into(),
            observed_generation: group.metadata.generation,
            last_transition_time: now.clone(),
        }],
        last_transition: Some(LeaderTransition {
            from: Some("db-1".into()),
            to: Some("db-0".into()),
            reason: "Switchover".into(),
            epoch: 1,
            at: now.clone(),
            duration_millis: Some(41),
        }),
        last_switchover: Some(SwitchoverOutcome {
            id: "1800000000000-42".into(),
            result: "Succeeded".into(),
            message: "handed over to pod db-0".into(),
            from: Some("db-1".into()),
            to: Some("db-0".into()),
            epoch: 1,
            requested_at: now.clone(),
            completed_at: now,
        }),
    };
    let written = write_status_like_the_operator(&f.typed, &group, &status)
        .await
        .expect("the operator's status write");
    assert_eq!(written.status.as_ref(), Some(&status));
    let managed: Vec<_> = written
        .managed_fields()
        .iter()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
                m.subresource.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managed.contains(&(FIELD_MANAGER.into(), "Apply".into(), "status".into())),
        "{managed:?}"
    );

    // A write based on the old resourceVersion is refused: the precondition holds on 1.36.
    let mut stale = status.clone();
    stale.leader = Some("db-1".into());
    match write_status_like_the_operator(&f.typed, &group, &stale).await {
        Err(kube::Error::Api(s)) => {
            println!("stale resourceVersion: {} {}", s.code, s.message);
            assert_eq!(s.code, 409, "{s:?}");
        }
        other => panic!("a stale resourceVersion was accepted: {other:?}"),
    }

    // Another manager that applies .status.leader without force gets a conflict naming podium.
    let other = json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": "good" },
        "status": { "leader": "db-2" },
    });
    match f
        .typed
        .patch_status("good", &PatchParams::apply("other"), &Patch::Apply(&other))
        .await
    {
        Err(kube::Error::Api(s)) => {
            println!("conflicting manager: {} {}", s.code, s.message);
            assert_eq!(s.code, 409, "{s:?}");
            assert!(s.message.contains("\"podium\""), "{}", s.message);
            assert!(s.message.contains(".status.leader"), "{}", s.message);
        }
        other => panic!("a conflicting apply was accepted: {other:?}"),
    }
    let current = f.typed.get("good").await.unwrap();
    assert_eq!(
        current.status.and_then(|s| s.leader).as_deref(),
        Some("db-0")
    );

    // The Table view, as `kubectl get electiongroups` asks for it.
    let request = http::Request::get(format!(
        "/apis/podium.dev/v1alpha1/namespaces/{}/electiongroups",
        f.ns
    ))
    .header(
        http::header::ACCEPT,
        "application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    .body(Vec::new())
    .unwrap();
    let table: Value = f.client.request(request).await.expect("the Table view");
    assert_eq!(table["kind"], json!("Table"), "{table}");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Leader", "Epoch", "Eligible", "TTL", "Age"],
        "{table}"
    );
    let cells = table["rows"][0]["cells"].as_array().expect("one row");
    println!("table: {columns:?} {cells:?}");
    assert_eq!(
        &cells[..5],
        &[
            json!("good"),
            json!("db-0"),
            json!(1),
            json!("3/3"),
            json!(15)
        ],
        "{table}"
    );
    assert!(
        cells[5].as_str().is_some_and(|age| age.ends_with('s')),
        "{table}"
    );
}
