//! The fixtures every test, the bench and the demo share: a namespace with a simulated
//! kubelet, a Deployment of "servers", a leader Service, an ElectionGroup, and waits on them.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use podium_core::crd::{ElectionGroup, ROLE_LABEL};

use crate::testbed::Testbed;
use crate::testbed::kubelet::{Kubelet, KubeletOptions};
use serde_json::{Value, json};

pub struct Fixture {
    pub client: Client,
    pub ns: String,
    pub kubelet: Kubelet,
}

/// A fresh namespace on the shared testbed, with the CRD installed and a kubelet for it.
pub async fn fixture(prefix: &str) -> Fixture {
    fixture_on(Testbed::shared(), prefix).await
}

/// The same on a given control plane (a test that stops its API server needs a private one).
pub async fn fixture_on(testbed: &Testbed, prefix: &str) -> Fixture {
    testbed.install_crd().await.expect("install CRD");
    let ns = testbed
        .create_namespace(prefix)
        .await
        .expect("create namespace");
    let client = testbed.client();
    let kubelet = Kubelet::start(
        &client,
        KubeletOptions::new(format!("node-{ns}")).namespace(&ns),
    )
    .await
    .expect("start kubelet");
    Fixture {
        client,
        ns,
        kubelet,
    }
}

impl Fixture {
    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn groups(&self) -> Api<ElectionGroup> {
        Api::namespaced(self.client.clone(), &self.ns)
    }
    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A Deployment `app` of `replicas` pods labelled `app=<app>`, all Running and Ready.
    pub async fn deploy(&self, app: &str, replicas: i32) {
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": { "name": app },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app": app } },
                "template": {
                    "metadata": { "labels": { "app": app } },
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{ "name": "server", "image": "registry.k8s.io/pause:3.9", "ports": [{ "containerPort": 8080 }] }]
                    }
                }
            }
        }))
        .unwrap();
        Api::<Deployment>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &deployment)
            .await
            .expect("create deployment");
        self.wait_ready(app, replicas as usize).await;
    }

    /// Waits until exactly `n` non-terminating pods of `app` are Ready.
    pub async fn wait_ready(&self, app: &str, n: usize) {
        let pods = self.pods();
        let selector = format!("app={app}");
        wait_for(
            Duration::from_secs(30),
            &format!("{n} ready pods of {app}"),
            || {
                let pods = pods.clone();
                let selector = selector.clone();
                async move {
                    let list = pods
                        .list(&ListParams::default().labels(&selector))
                        .await
                        .ok()?;
                    let ready = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
                        .count();
                    (ready == n).then_some(())
                }
            },
        )
        .await;
    }

    /// A Service routing to the leader of `app` only.
    pub async fn leader_service(&self, app: &str) -> String {
        let name = format!("{app}-leader");
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": {
                "selector": { "app": app, ROLE_LABEL: "leader" },
                "ports": [{ "port": 80, "targetPort": 8080 }]
            }
        }))
        .unwrap();
        Api::<Service>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
        name
    }

    /// An ElectionGroup `name` selecting `app=<app>`, with `extra` merged into its spec.
    pub async fn group(&self, name: &str, app: &str, extra: Value) -> ElectionGroup {
        let mut spec =
            json!({ "selector": { "matchLabels": { "app": app } }, "leaseDurationSeconds": 4 });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                spec.insert(k.clone(), v.clone());
            }
        }
        let group: ElectionGroup = serde_json::from_value(json!({
            "apiVersion": "podium.dev/v1alpha1",
            "kind": "ElectionGroup",
            "metadata": { "name": name },
            "spec": spec,
        }))
        .unwrap();
        self.groups()
            .create(&PostParams::default(), &group)
            .await
            .expect("create group")
    }

    /// The pods labelled leader right now.
    pub async fn leaders(&self) -> Vec<Pod> {
        let list = self
            .pods()
            .list(&ListParams::default().labels(&format!("{ROLE_LABEL}=leader")))
            .await
            .expect("list pods");
        list.items
    }

    /// Waits until exactly one pod is labelled leader and is not `not`; returns it.
    pub async fn wait_leader_other_than(&self, not: Option<&str>, timeout: Duration) -> Pod {
        self.wait_single_leader(&format!("{ROLE_LABEL}=leader"), not, timeout)
            .await
    }

    /// The same among the pods of `app`, for a namespace with several groups.
    pub async fn wait_app_leader_other_than(
        &self,
        app: &str,
        not: Option<&str>,
        timeout: Duration,
    ) -> Pod {
        self.wait_single_leader(&format!("app={app},{ROLE_LABEL}=leader"), not, timeout)
            .await
    }

    async fn wait_single_leader(
        &self,
        selector: &str,
        not: Option<&str>,
        timeout: Duration,
    ) -> Pod {
        let pods = self.pods();
        wait_for(
            timeout,
            &format!("a single leader ({selector}) other than {not:?}"),
            || {
                let pods = pods.clone();
                async move {
                    let list = pods
                        .list(&ListParams::default().labels(selector))
                        .await
                        .ok()?;
                    match list.items.as_slice() {
                        [only] if Some(only.name_any().as_str()) != not => Some(only.clone()),
                        _ => None,
                    }
                }
            },
        )
        .await
    }

    pub async fn lease_state(&self, group: &str) -> (Option<String>, i32) {
        let lease = self.leases().get(group).await.expect("get lease");
        let spec = lease.spec.unwrap_or_default();
        (
            spec.holder_identity.filter(|h| !h.is_empty()),
            spec.lease_transitions.unwrap_or(0),
        )
    }

    /// Deletes group `name` and waits until the operator has finished its cleanup and the
    /// group is gone.
    pub async fn delete_group(&self, name: &str) {
        self.groups()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete group");
        wait_for(
            Duration::from_secs(5),
            &format!("group {name} gone"),
            || async {
                self.groups()
                    .get_opt(name)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn delete_pod(&self, name: &str) {
        self.pods()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete pod");
    }

    /// Waits until the group's status says `leader` (or no leader) at `epoch`.
    pub async fn wait_status(
        &self,
        group: &str,
        leader: Option<&str>,
        timeout: Duration,
    ) -> ElectionGroup {
        let groups = self.groups();
        let (group, leader) = (group.to_string(), leader.map(String::from));
        wait_for(
            timeout,
            &format!("status.leader of {group} to be {leader:?}"),
            || {
                let groups = groups.clone();
                let (group, leader) = (group.clone(), leader.clone());
                async move {
                    let g = groups.get(&group).await.ok()?;
                    (g.status.as_ref()?.leader == leader).then_some(g)
                }
            },
        )
        .await
    }

    /// The status condition `type_` of `group`, as (status, reason, message).
    pub async fn condition(&self, group: &str, type_: &str) -> Option<(String, String, String)> {
        let g = self.groups().get(group).await.ok()?;
        let c = g
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)?;
        Some((c.status, c.reason, c.message))
    }
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

/// Polls `check` every 20 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
