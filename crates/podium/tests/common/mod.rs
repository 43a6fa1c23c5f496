//! What the operator's integration tests add to the test kit: an in-process operator, and the
//! opening most election tests share.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

use kube::{Client, ResourceExt};
use podium::operator::{Operator, OperatorConfig};
pub use podium_testkit::fixture::{Fixture, fixture, fixture_on};
pub use podium_testkit::pod::{is_ready, pod_ip};
use podium_testkit::testbed::kubelet::{Kubelet, KubeletOptions};
pub use podium_testkit::wait::wait_for;
pub use podium_testkit::{checker, faults};
use serde_json::Value;

/// A fresh namespace on the shared testbed, with the CRD installed and a Ready node, where
/// no simulated kubelet manages pods: the fixture's kubelet (replaced before any pod exists)
/// only looks at pods labelled `podium.test/simulated-kubelet=none`, which none is. For tests
/// that play the kubelet themselves (`ProcessPods`).
pub async fn fixture_without_kubelet(prefix: &str) -> Fixture {
    let mut f = fixture(prefix).await;
    let options = KubeletOptions::new(f.kubelet.node())
        .namespace(&f.ns)
        .label_selector("podium.test/simulated-kubelet=none")
        .bind_unscheduled(false)
        .finalize_after(None);
    f.kubelet = Kubelet::start(&f.client, options)
        .await
        .expect("start kubelet");
    f
}

/// An operator watching only a fixture's namespace, without operator leader election.
pub trait RunOperator {
    async fn operator(&self) -> Operator;
}

impl RunOperator for Fixture {
    async fn operator(&self) -> Operator {
        start_operator(self.client.clone(), &self.ns, None).await
    }
}

/// Pods of app `web` behind their leader Service, watched by a checker (I5 included) from the
/// start. Returns the fixture, the Service's name and the checker.
pub async fn served(prefix: &str, replicas: i32) -> (Fixture, String, checker::Checker) {
    let f = fixture(prefix).await;
    f.deploy("web", replicas).await;
    let service = f.leader_service("web").await;
    let checker = checker::Checker::start(&f.client, &f.ns, "web", Some(&service)).await;
    (f, service, checker)
}

/// The opening most election tests share, up to the first leader: three (or `replicas`) pods of
/// app `web`, a checker watching them from the start, an in-process operator, and the group
/// `web` with `spec`. Returns the fixture, the checker, the operator and the leader's name.
pub async fn elected(
    prefix: &str,
    replicas: i32,
    spec: Value,
) -> (Fixture, checker::Checker, Operator, String) {
    let f = fixture(prefix).await;
    f.deploy("web", replicas).await;
    let checker = checker::Checker::start(&f.client, &f.ns, "web", None).await;
    let operator = f.operator().await;
    f.group("web", "web", spec).await;
    let leader = f.wait_leader_name(None, Duration::from_secs(5)).await;
    (f, checker, operator, leader)
}

/// The end of a test under the checker: no invariant broke over the whole run, and the
/// operator stops cleanly.
pub async fn finish(f: &Fixture, checker: &checker::Checker, operator: Operator) {
    checker.assert_invariants(&f.client, &f.ns).await;
    operator.stop().await;
}

pub async fn start_operator(
    client: Client,
    ns: &str,
    election: Option<podium::ha::ElectionConfig>,
) -> Operator {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let config = OperatorConfig {
        http_addr: None,
        watch_namespace: Some(ns.to_string()),
        election,
        service_account: None,
    };
    let operator = Operator::start(client, config)
        .await
        .expect("start operator");
    synced(operator).await
}

/// The operator as `podium run` starts it ([`Operator::connect`]: its client records every
/// request in its metrics), on the shared testbed, watching `ns`, serving HTTP on `http_addr`.
pub async fn start_connected_operator(ns: &str, http_addr: std::net::SocketAddr) -> Operator {
    podium::telemetry::init(podium::telemetry::LogFormat::Text, "warn,podium=info");
    let config = OperatorConfig {
        http_addr: Some(http_addr),
        watch_namespace: Some(ns.to_string()),
        election: None,
        service_account: None,
    };
    let kube_config = podium_testkit::testbed::Testbed::shared().config();
    let operator = Operator::connect(kube_config, config)
        .await
        .expect("start operator");
    synced(operator).await
}

/// `operator` once its caches have synced.
async fn synced(operator: Operator) -> Operator {
    let ready = operator.ready.clone();
    wait_for(Duration::from_secs(10), "operator caches to sync", || {
        let ready = ready.clone();
        async move {
            ready
                .load(std::sync::atomic::Ordering::Acquire)
                .then_some(())
        }
    })
    .await;
    operator
}

/// Pods `<app>-0`..`<app>-{count-1}` in `ns`, labelled `app=<app>`, each running this build's
/// real `podium exec` on a loopback IP of its own (logs under `dir`).
pub async fn exec_pods(
    ns: &str,
    app: &str,
    count: usize,
    dir: &std::path::Path,
) -> podium_testkit::leader_process::ProcessPods {
    let testbed = podium_testkit::testbed::Testbed::shared();
    let mut pods = podium_testkit::leader_process::ProcessPods::new(
        &testbed.client(),
        ns,
        app,
        std::path::Path::new(env!("CARGO_BIN_EXE_podium")),
        testbed.kubeconfig_path(),
        dir,
    )
    .await
    .expect("process pods");
    for i in 0..count {
        pods.start(&format!("{app}-{i}"), app)
            .await
            .expect("start pod");
    }
    pods
}

/// ElectionGroup `name` selecting `app=<app>`, with `spec.notify` on `port`.
pub fn notify_group(
    name: &str,
    app: &str,
    ttl_seconds: u64,
    port: u16,
) -> podium::crd::ElectionGroup {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": name },
        "spec": {
            "selector": { "matchLabels": { "app": app } },
            "leaseDurationSeconds": ttl_seconds,
            "notify": { "port": port },
        },
    }))
    .expect("a valid ElectionGroup")
}
