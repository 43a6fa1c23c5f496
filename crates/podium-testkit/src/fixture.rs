//! The fixtures every test, the bench and the demo share: a namespace with a simulated
//! kubelet, a Deployment of "servers", a leader Service, an ElectionGroup, and waits on them.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use podium_core::crd::{ElectionGroup, ROLE_LABEL, ROLE_LEADER};

use crate::observe::lease_holder;
use crate::pod::is_serving;
use crate::testbed::Testbed;
use crate::testbed::kubelet::{Kubelet, KubeletOptions};
use crate::wait::wait_for;
use anyhow::Context as _;
use serde_json::{Value, json};

/// The "servers" podium elects among: a Deployment `app` of `replicas` pause pods labelled
/// `app=<app>`.
pub fn servers(app: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
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
    .expect("a valid Deployment")
}

/// Creates the [`servers`] Deployment `app` in `namespace`.
pub async fn create_servers(
    client: &Client,
    namespace: &str,
    app: &str,
    replicas: i32,
) -> anyhow::Result<()> {
    Api::<Deployment>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &servers(app, replicas))
        .await
        .with_context(|| format!("cannot create Deployment {namespace}/{app}"))?;
    Ok(())
}

/// Creates the Service `<app>-leader`, which routes to the pod of `app` labelled leader only;
/// returns its name.
pub async fn create_leader_service(
    client: &Client,
    namespace: &str,
    app: &str,
) -> anyhow::Result<String> {
    let name = format!("{app}-leader");
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "selector": { "app": app, ROLE_LABEL: ROLE_LEADER },
            "ports": [{ "port": 80, "targetPort": 8080 }]
        }
    }))?;
    Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await
        .with_context(|| format!("cannot create Service {namespace}/{name}"))?;
    Ok(name)
}

/// An ElectionGroup `name` with `spec`, as a manifest: invalid specs too, which the typed
/// [`ElectionGroup`] may not hold.
pub fn group_manifest(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// Creates ElectionGroup `name` with `spec` in `namespace`.
pub async fn create_group(
    client: &Client,
    namespace: &str,
    name: &str,
    spec: Value,
) -> anyhow::Result<ElectionGroup> {
    let group: ElectionGroup = serde_json::from_value(group_manifest(name, spec))?;
    Api::<ElectionGroup>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &group)
        .await
        .with_context(|| format!("cannot create ElectionGroup {namespace}/{name}"))
}

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
        create_servers(&self.client, &self.ns, app, replicas)
            .await
            .expect("create deployment");
        self.wait_ready(app, replicas as usize).await;
    }

    /// Waits until exactly `n` non-terminating pods of `app` are Ready.
    pub async fn wait_ready(&self, app: &str, n: usize) {
        let what = format!("{n} ready pods of {app}");
        let selector = ListParams::default().labels(&format!("app={app}"));
        wait_for(Duration::from_secs(30), &what, || async {
            let list = self.pods().list(&selector).await.ok()?;
            (list.iter().filter(|p| is_serving(p)).count() == n).then_some(())
        })
        .await;
    }

    /// A Service routing to the leader of `app` only.
    pub async fn leader_service(&self, app: &str) -> String {
        create_leader_service(&self.client, &self.ns, app)
            .await
            .expect("create service")
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
        create_group(&self.client, &self.ns, name, spec)
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

    /// The names of the namespace's pods.
    pub async fn pod_names(&self) -> Vec<String> {
        let list = self.pods().list(&ListParams::default()).await;
        list.expect("list pods")
            .iter()
            .map(|p| p.name_any())
            .collect()
    }

    /// The name of a pod other than `pod`.
    pub async fn pod_other_than(&self, pod: &str) -> String {
        let names = self.pod_names().await;
        names.into_iter().find(|n| n != pod).expect("another pod")
    }

    /// Waits until exactly `n` pods are labelled follower.
    pub async fn wait_followers(&self, n: usize, timeout: Duration) {
        let selector = ListParams::default().labels(&format!("{ROLE_LABEL}=follower"));
        wait_for(timeout, &format!("{n} followers"), || async {
            let l = self.pods().list(&selector).await.ok()?;
            (l.items.len() == n).then_some(())
        })
        .await;
    }

    /// The names of the pods labelled leader right now.
    pub async fn leader_names(&self) -> Vec<String> {
        self.leaders().await.iter().map(|p| p.name_any()).collect()
    }

    /// [`Fixture::wait_leader_other_than`], for the leader's name.
    pub async fn wait_leader_name(&self, not: Option<&str>, timeout: Duration) -> String {
        self.wait_leader_other_than(not, timeout).await.name_any()
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
        let what = format!("a single leader ({selector}) other than {not:?}");
        let selector = ListParams::default().labels(selector);
        wait_for(timeout, &what, || async {
            let list = self.pods().list(&selector).await.ok()?;
            match list.items.as_slice() {
                [only] if Some(only.name_any().as_str()) != not => Some(only.clone()),
                _ => None,
            }
        })
        .await
    }

    /// The holder and epoch of the Lease `group`.
    pub async fn lease_state(&self, group: &str) -> (Option<String>, i32) {
        lease_holder(&self.leases().get(group).await.expect("get lease"))
    }

    /// When the Lease `group` was last renewed.
    pub async fn renew_time(&self, group: &str) -> jiff::Timestamp {
        let lease = self.leases().get(group).await.expect("get lease");
        lease.spec.and_then(|s| s.renew_time).expect("renewTime").0
    }

    /// Edits the Lease `name` as a human would: read, change, replace.
    pub async fn edit_lease(&self, name: &str, edit: impl FnOnce(&mut Lease)) {
        let mut lease = self.leases().get(name).await.expect("get lease");
        edit(&mut lease);
        self.leases()
            .replace(name, &PostParams::default(), &lease)
            .await
            .expect("replace lease");
    }

    /// A human hands the Lease `name` to pod `holder` at `epoch`, dropping the holder's UID
    /// that podium recorded.
    pub async fn hand_lease_to(&self, name: &str, holder: &str, epoch: i32) {
        self.edit_lease(name, |lease| {
            let spec = lease.spec.get_or_insert_default();
            spec.holder_identity = Some(holder.to_string());
            spec.lease_transitions = Some(epoch);
            if let Some(annotations) = lease.metadata.annotations.as_mut() {
                annotations.remove("podium.dev/holder-uid");
            }
        })
        .await;
    }

    /// A Lease `name` held by `holder` that podium does not own.
    pub async fn foreign_lease(&self, name: &str, holder: &str) {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": 30 }
        }))
        .unwrap();
        self.leases()
            .create(&PostParams::default(), &lease)
            .await
            .expect("create lease");
    }

    /// Merges `spec` into the spec of group `name`.
    pub async fn patch_group(&self, name: &str, spec: Value) {
        let patch = Patch::Merge(json!({ "spec": spec }));
        self.groups()
            .patch(name, &PatchParams::default(), &patch)
            .await
            .expect("patch group");
    }

    /// Deletes group `name` and waits until the operator has finished its cleanup and the
    /// group is gone.
    pub async fn delete_group(&self, name: &str) {
        self.groups()
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete group");
        self.wait_group_gone(name).await;
    }

    /// Waits until the group `name` no longer exists (its finalizer has run).
    pub async fn wait_group_gone(&self, name: &str) {
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

    /// Deletes the pod `leader` of group `group` and waits for the next leader, labelled and
    /// named in the group's status; returns its name.
    pub async fn delete_leader(&self, group: &str, leader: &str) -> String {
        self.delete_pod(leader).await;
        let next = self
            .wait_leader_name(Some(leader), Duration::from_secs(5))
            .await;
        self.wait_status(group, Some(&next), Duration::from_secs(3))
            .await;
        next
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
        let what = format!("status.leader of {group} to be {leader:?}");
        wait_for(timeout, &what, || async {
            let g = self.groups().get(group).await.ok()?;
            (g.status.as_ref()?.leader.as_deref() == leader).then_some(g)
        })
        .await
    }

    /// Waits until condition `type_` of `group` is True (with `reason`, if given); returns
    /// (status, reason, message).
    pub async fn wait_condition(
        &self,
        group: &str,
        type_: &str,
        reason: Option<&str>,
        timeout: Duration,
    ) -> (String, String, String) {
        wait_for(
            timeout,
            &format!("{group}: condition {type_}=True {reason:?}"),
            || async {
                let c = self.condition(group, type_).await?;
                (c.0 == "True" && reason.is_none_or(|r| c.1 == r)).then_some(c)
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
