//! The testbed against real etcd, kube-apiserver and kube-controller-manager processes: one
//! shared control plane for this test binary, one namespace per test. Without the binaries
//! these tests fail with the install hint; they are never skipped.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use podium_testkit::fixture::create_servers;
use podium_testkit::testbed::{self, Kubelet, KubeletOptions, Testbed, kubelet};
use podium_testkit::wait::poll;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `check` until it yields `Some`, failing the test after `TIMEOUT` with the last
/// error.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let checked = poll(TIMEOUT, Duration::from_millis(100), what, async || {
        check().await.map_err(anyhow::Error::msg)
    });
    checked.await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until Deployment `name` reports `n` available replicas.
async fn wait_available(client: &Client, ns: &str, name: &str, n: i32) {
    let what = format!("Deployment {name} to report {n} available replicas");
    eventually(&what, || async {
        let d = Api::<Deployment>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .map_err(|e| e.to_string())?;
        let available = d.status.and_then(|s| s.available_replicas).unwrap_or(0);
        Ok((available == n).then_some(()))
    })
    .await;
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod(name: &str, pod_labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels(pod_labels) },
        "spec": { "containers": [{ "name": "main", "image": "registry.example/app:1" }] },
    }))
    .expect("a valid Pod")
}

fn condition(pod: &Pod, type_: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

async fn pods_of(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .expect("listing pods")
        .items
}

/// Creates a pod, binds it to `node` and makes it Running+Ready; returns its IP.
async fn running_pod(
    client: &Client,
    ns: &str,
    node: &str,
    name: &str,
    pod_labels: &[(&str, &str)],
) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod(name, pod_labels))
        .await
        .expect("creating a pod");
    testbed::bind_pod(client, ns, name, node)
        .await
        .expect("binding");
    let ip = testbed::next_pod_ip();
    testbed::set_pod_running_ready(client, ns, name, &ip)
        .await
        .expect("reporting Running+Ready");
    ip
}

#[test]
fn find_binary_explains_how_to_install() {
    let err = testbed::find_binary("podium-no-such-binary").expect_err("must not be found");
    assert!(
        format!("{err:#}").contains("scripts/install-deps.sh"),
        "error lacks the install hint: {err:#}"
    );
    for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        testbed::find_binary(name).unwrap_or_else(|e| panic!("{e:#}"));
    }
}

#[tokio::test]
async fn deployment_replicaset_creates_unscheduled_pods() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("deploy").await.unwrap();
    create_servers(&client, &ns, "web", 3).await.unwrap();

    let pods = eventually("the ReplicaSet to create 3 pods", || async {
        let pods = pods_of(&client, &ns, "app=web").await;
        Ok::<_, String>((pods.len() == 3).then_some(pods))
    })
    .await;
    for pod in &pods {
        let owner = &pod.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(owner.kind, "ReplicaSet");
        assert!(
            pod.spec.as_ref().unwrap().node_name.is_none(),
            "no scheduler runs, so the pod must be unscheduled"
        );
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Pending")
        );
    }
}

#[tokio::test]
async fn kubelet_helpers_make_pods_running_and_ready() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("ready").await.unwrap();
    let node = format!("node-{ns}");
    testbed::create_node(&client, &node).await.unwrap();
    create_servers(&client, &ns, "web", 2).await.unwrap();
    let pods = eventually("2 pods", || async {
        let pods = pods_of(&client, &ns, "app=web").await;
        Ok::<_, String>((pods.len() == 2).then_some(pods))
    })
    .await;

    let mut ips = Vec::new();
    for pod in &pods {
        let name = pod.metadata.name.as_deref().unwrap();
        testbed::bind_pod(&client, &ns, name, &node).await.unwrap();
        let ip = testbed::next_pod_ip();
        testbed::set_pod_running_ready(&client, &ns, name, &ip)
            .await
            .unwrap();
        ips.push((name.to_string(), ip));
    }

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (name, ip) in &ips {
        let pod = api.get(name).await.unwrap();
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some(ip.as_str()));
        assert_eq!(
            pod.spec.as_ref().unwrap().node_name.as_deref(),
            Some(node.as_str())
        );
        for type_ in ["Ready", "ContainersReady", "PodScheduled", "Initialized"] {
            assert_eq!(
                condition(&pod, type_).as_deref(),
                Some("True"),
                "{type_} of {name}"
            );
        }
        let ready = status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert!(ready.last_transition_time.is_some());
        let containers = status.container_statuses.as_ref().unwrap();
        assert!(
            containers
                .iter()
                .all(|c| c.ready && c.state.as_ref().unwrap().running.is_some())
        );
    }

    // The controllers see the readiness too.
    wait_available(&client, &ns, "web", 2).await;

    // And back: not ready keeps the pod Running but flips the conditions.
    let (name, ip) = &ips[0];
    testbed::set_pod_not_ready(&client, &ns, name)
        .await
        .unwrap();
    let pod = api.get(name).await.unwrap();
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));
    assert_eq!(condition(&pod, "ContainersReady").as_deref(), Some("False"));
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(
        pod.status.as_ref().unwrap().pod_ip.as_deref(),
        Some(ip.as_str())
    );
}

#[tokio::test]
async fn service_endpointslice_holds_exactly_the_labeled_pod() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("slices").await.unwrap();
    let node = format!("node-{ns}");
    testbed::create_node(&client, &node).await.unwrap();
    let ip_a = running_pod(&client, &ns, &node, "a", &[("app", "db")]).await;
    let _ip_b = running_pod(&client, &ns, &node, "b", &[("app", "db")]).await;

    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "primary" },
        "spec": {
            "selector": { "app": "db", "role": "primary" },
            "ports": [{ "port": 5432 }],
        },
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &service)
        .await
        .unwrap();

    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "role": "primary" } } })),
        )
        .await
        .unwrap();

    eventually("the EndpointSlice to hold exactly pod a", || async {
        let addresses = testbed::endpointslice_addresses(&client, &ns, "primary")
            .await
            .map_err(|e| format!("{e:#}"))?;
        if addresses == vec![ip_a.clone()] {
            Ok(Some(()))
        } else {
            Err(format!("addresses {addresses:?}, want [{ip_a}]"))
        }
    })
    .await;
    let endpoints = testbed::endpointslice_endpoints(&client, &ns, "primary")
        .await
        .unwrap();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].pod.as_deref(), Some("a"));

    // A not-ready pod stays in the slice, marked not ready, and leaves the ready addresses.
    testbed::set_pod_not_ready(&client, &ns, "a").await.unwrap();
    eventually("pod a to be listed as not ready", || async {
        let endpoints = testbed::endpointslice_endpoints(&client, &ns, "primary")
            .await
            .map_err(|e| format!("{e:#}"))?;
        let ready = testbed::endpointslice_addresses(&client, &ns, "primary")
            .await
            .map_err(|e| format!("{e:#}"))?;
        if ready.is_empty() && endpoints.iter().any(|e| e.address == ip_a && !e.ready) {
            Ok(Some(()))
        } else {
            Err(format!("endpoints {endpoints:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn deleted_bound_pod_stays_terminating_until_finalized() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("terminating").await.unwrap();
    let node = format!("node-{ns}");
    testbed::create_node(&client, &node).await.unwrap();
    running_pod(&client, &ns, &node, "doomed", &[("app", "x")]).await;

    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    api.delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    let pod = api
        .get("doomed")
        .await
        .expect("a bound pod outlives its delete call");
    assert!(pod.metadata.deletion_timestamp.is_some());
    assert_eq!(pod.metadata.deletion_grace_period_seconds, Some(30));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pod = api.get("doomed").await.expect("still Terminating");
    assert!(pod.metadata.deletion_timestamp.is_some());

    testbed::finalize_deletion(&client, &ns, "doomed")
        .await
        .unwrap();
    eventually("the pod to be gone", || async {
        let pod = api.get_opt("doomed").await.map_err(|e| e.to_string())?;
        Ok(pod.is_none().then_some(()))
    })
    .await;
    // Idempotent: finalising a pod that is gone is fine.
    testbed::finalize_deletion(&client, &ns, "doomed")
        .await
        .unwrap();
}

#[tokio::test]
async fn service_account_client_is_subject_to_rbac() {
    let tb = Testbed::shared();
    let admin = tb.client();
    let ns = tb.create_namespace("rbac").await.unwrap();
    let sa = tb.service_account_client(&ns, "reader").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(sa.clone(), &ns);

    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "server said: {}", status.message);
            assert!(
                status
                    .message
                    .contains(&format!("system:serviceaccount:{ns}:reader")),
                "server said: {}",
                status.message
            );
        }
        other => panic!("expected 403 before any binding, got {other:?}"),
    }

    let role: Role = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": { "name": "pod-lister" },
        "rules": [{ "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] }],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": { "name": "reader-lists-pods" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-lister" },
        "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": ns }],
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    eventually(
        "the RoleBinding to let the ServiceAccount list pods",
        || async {
            match pods.list(&ListParams::default()).await {
                Ok(_) => Ok(Some(())),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    // Only what was granted.
    match pods.get("anything").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403, "server said: {}", status.message)
        }
        other => panic!("expected 403 for get, got {other:?}"),
    }
}

#[tokio::test]
async fn kubelet_loop_runs_and_finalizes_pods() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("loop").await.unwrap();
    let _kubelet = Kubelet::start(
        &client,
        KubeletOptions::new(format!("node-{ns}"))
            .namespace(&ns)
            .label_selector("app=loop"),
    )
    .await
    .unwrap();
    create_servers(&client, &ns, "loop", 3).await.unwrap();

    let pods = eventually("3 Running+Ready pods with distinct IPs", || async {
        let pods = pods_of(&client, &ns, "app=loop").await;
        let mut ips: Vec<String> = pods
            .iter()
            .filter(|p| condition(p, "Ready").as_deref() == Some("True"))
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        ips.sort();
        ips.dedup();
        Ok::<_, String>((pods.len() == 3 && ips.len() == 3).then_some(pods))
    })
    .await;

    // Deleting one: the loop finalises it and the ReplicaSet's replacement gets started.
    let victim = pods[0].metadata.name.clone().unwrap();
    let victim_uid = pods[0].metadata.uid.clone().unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deleted pod to be replaced by a ready one", || async {
        let pods = pods_of(&client, &ns, "app=loop").await;
        let gone = pods
            .iter()
            .all(|p| p.metadata.uid.as_deref() != Some(&victim_uid));
        let ready = pods
            .iter()
            .filter(|p| condition(p, "Ready").as_deref() == Some("True"))
            .count();
        Ok::<_, String>((gone && pods.len() == 3 && ready == 3).then_some(()))
    })
    .await;

    // Readiness is made once: a test can take it away again.
    let name = pods[1].metadata.name.clone().unwrap();
    testbed::set_pod_not_ready(&client, &ns, &name)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));
}

#[tokio::test]
async fn node_readiness_can_be_toggled() {
    let tb = Testbed::shared();
    let client = tb.client();
    let ns = tb.create_namespace("node").await.unwrap();
    let name = format!("node-{ns}");
    testbed::create_node(&client, &name).await.unwrap();
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let ready = |node: &k8s_openapi::api::core::v1::Node| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone())
    };
    assert_eq!(
        ready(&nodes.get(&name).await.unwrap()).as_deref(),
        Some("True")
    );
    testbed::set_node_ready(&client, &name, false)
        .await
        .unwrap();
    assert_eq!(
        ready(&nodes.get(&name).await.unwrap()).as_deref(),
        Some("False")
    );
    testbed::set_node_ready(&client, &name, true).await.unwrap();
    assert_eq!(
        ready(&nodes.get(&name).await.unwrap()).as_deref(),
        Some("True")
    );
    // Creating it again is harmless.
    kubelet::create_node(&client, &name).await.unwrap();
}

#[tokio::test]
async fn kubeconfig_works_with_kubectl() {
    let tb = Testbed::shared();
    let ns = tb.create_namespace("kubectl").await.unwrap();
    let kubectl = testbed::find_binary("kubectl").unwrap_or_else(|e| panic!("{e:#}"));
    let out = std::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(tb.kubeconfig_path())
        .args(["get", "namespace", &ns, "-o", "name"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("namespace/{ns}")
    );
}

/// A private control plane: stopping the apiserver would break the other tests.
#[tokio::test]
async fn apiserver_restart_keeps_state_and_clients_reconnect() {
    let tb = Testbed::start().await.unwrap_or_else(|e| panic!("{e:#}"));
    let client = tb.client();
    let ns = tb.create_namespace("restart").await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": "survivor" },
        "data": { "k": "v" },
    }))
    .unwrap();
    config_maps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let url = tb.server_url();
    let _kubelet = Kubelet::start(&client, KubeletOptions::new("restart-node").namespace(&ns))
        .await
        .unwrap();

    tb.stop_apiserver().await;
    assert!(
        config_maps.get("survivor").await.is_err(),
        "the apiserver should be down"
    );
    tb.start_apiserver()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(tb.server_url(), url, "same port after a restart");

    // The client made before the outage reconnects, and etcd kept the data.
    let survivor = eventually("the old client to reconnect", || async {
        config_maps
            .get("survivor")
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(survivor.data.unwrap()["k"], "v");
    // Starting a running apiserver is a no-op.
    tb.start_apiserver().await.unwrap();

    // The controller-manager and the kubelet loop came back too.
    create_servers(&client, &ns, "after", 2).await.unwrap();
    wait_available(&client, &ns, "after", 2).await;

    let dir = tb.dir().to_path_buf();
    let kubeconfig = tb.kubeconfig_path().to_path_buf();
    assert!(kubeconfig.exists());
    drop(tb);
    if std::env::var_os("PODIUM_KEEP_TESTBED").is_none() {
        assert!(!dir.exists(), "{} should be removed on drop", dir.display());
    }
}
