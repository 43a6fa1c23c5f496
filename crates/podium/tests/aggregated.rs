//! The whole operator on Kubernetes 1.36 CRD semantics (issue 16's stretch): the 1.36
//! apiextensions-apiserver serves `podium.dev` and is registered with a private v1.20 testbed
//! as the APIService `v1alpha1.podium.dev`, so every ElectionGroup request the operator makes
//! to v1.20 (get, list, watch, the finalizer patch, the status apply) is proxied by
//! kube-aggregator to the 1.36 server. Pods, Leases and Events stay on v1.20, whose
//! kube-controller-manager garbage-collects Leases whose owning group is gone.

mod common;

use std::time::Duration;

use common::{start_operator, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{CustomResourceExt, ResourceExt};
use podium::crd::{ElectionGroup, FINALIZER, ROLE_LABEL};
use podium_testkit::checker::Checker;
use podium_testkit::fixture::Fixture;
use podium_testkit::testbed::Testbed;
use podium_testkit::testbed::apiext::ApiextServer;
use podium_testkit::testbed::kubelet::{Kubelet, KubeletOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_through_kube_aggregator_on_the_136_crd_server() {
    let testbed = Testbed::start().await.unwrap_or_else(|e| panic!("{e:#}"));
    let server = ApiextServer::start(&testbed)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let crds: Api<CustomResourceDefinition> = Api::all(server.client().unwrap());
    crds.patch(
        "electiongroups.podium.dev",
        &PatchParams::apply("podium-test").force(),
        &Patch::Apply(ElectionGroup::crd()),
    )
    .await
    .expect("installing the CRD on the 1.36 server");
    server
        .aggregate_into(&testbed)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));

    let client = testbed.client();
    let ns = testbed.create_namespace("agg").await.unwrap();
    let kubelet = Kubelet::start(
        &client,
        KubeletOptions::new(format!("node-{ns}")).namespace(&ns),
    )
    .await
    .unwrap();
    let f = Fixture {
        client: client.clone(),
        ns,
        kubelet,
    };
    f.deploy("web", 3).await;
    let checker = Checker::start(&f.client, &f.ns, "web", None).await;
    let operator = start_operator(f.client.clone(), &f.ns, None).await;
    f.group("web", "web", json!({})).await;
    let first = f.wait_leader_name(None, Duration::from_secs(10)).await;
    let group = f
        .wait_status("web", Some(&first), Duration::from_secs(5))
        .await;
    assert!(group.finalizers().iter().any(|x| x == FINALIZER));
    // The group really lives on the 1.36 server: read it there directly.
    let on_136: Api<ElectionGroup> = Api::namespaced(server.client().unwrap(), &f.ns);
    let direct = on_136
        .get("web")
        .await
        .expect("the group on the 1.36 server");
    assert_eq!(direct.status.and_then(|s| s.leader), Some(first.clone()));

    // A failover, driven by the pod watch on v1.20 and the group watch through the aggregator.
    f.delete_pod(&first).await;
    let second = f
        .wait_leader_name(Some(&first), Duration::from_secs(5))
        .await;
    assert_eq!(f.lease_state("web").await, (Some(second.clone()), 2));

    // Deleting the group: the finalizer (patched through the aggregator) runs the cleanup.
    f.groups()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the group to be gone", || async {
        f.groups()
            .get_opt("web")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let labelled = f
        .pods()
        .list(&kube::api::ListParams::default().labels(ROLE_LABEL))
        .await
        .unwrap();
    assert!(labelled.items.is_empty(), "labels left behind");
    assert!(f.leases().get_opt("web").await.unwrap().is_none());
    checker.assert_invariants(&f.client, &f.ns).await;

    // Garbage collection by v1.20's kube-controller-manager of a Lease whose owner, a group on
    // the 1.36 server, went without the operator: stop it, drop the finalizer, delete.
    f.group("gc", "web", json!({})).await;
    wait_for(Duration::from_secs(10), "the gc group's Lease", || async {
        f.leases().get_opt("gc").await.unwrap().map(|_| ())
    })
    .await;
    operator.stop().await;
    f.groups()
        .patch(
            "gc",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
        )
        .await
        .unwrap();
    f.groups()
        .delete("gc", &DeleteParams::default())
        .await
        .unwrap();
    let leases: Api<Lease> = f.leases();
    let deleted = std::time::Instant::now();
    wait_for(
        Duration::from_secs(90),
        "kube-controller-manager to collect the Lease of the deleted group",
        || async { leases.get_opt("gc").await.unwrap().is_none().then_some(()) },
    )
    .await;
    println!(
        "kube-controller-manager collected the Lease {:?} after its owner was deleted on the 1.36 server",
        deleted.elapsed()
    );
    // The gc group's leader label stays (its operator was stopped on purpose); no moment of
    // the whole run showed two leaders.
    assert_eq!(checker.violations(), Vec::<String>::new());
}
