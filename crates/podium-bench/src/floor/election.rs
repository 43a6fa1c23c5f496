//! The election floor: watches the groups and pods of a namespace and, for each group it sees,
//! sends the minimum writes that elect it: Lease create naming the first pod, that pod's
//! leader label, the others' follower labels, the status. A group's writes go one after the
//! other (as one reconcile sends them); up to [`OPERATOR_CONCURRENCY`] groups at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tokio::task::JoinHandle;

use super::{OPERATOR_CONCURRENCY, Shared, Writes, status};
use podium_core::crd::ElectionGroup;
use podium_core::election::{Holder, LabelWrite, LeaseWrite};
use podium_core::lean_lease::LeanLease;
use podium_testkit::observe::{Watching, watch_groups, watch_pods};

pub struct ElectionFloor {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    _watches: [Watching; 2],
}

impl ElectionFloor {
    /// Starts watching `ns`; each group selects the pods labelled `app=<group name>` (as the
    /// scale section creates them), `pods_per_group` of them.
    pub fn start(client: &Client, ns: &str, pods_per_group: usize) -> ElectionFloor {
        let shared = Arc::new(Shared::default());
        let watches = [
            watch_pods(client, ns, None, shared.feed(|w| &mut w.pods)),
            watch_groups(client, ns, shared.feed(|w| &mut w.groups)),
        ];
        let task = tokio::spawn(act(
            client.clone(),
            ns.to_string(),
            pods_per_group,
            shared.clone(),
        ));
        ElectionFloor {
            shared,
            task,
            _watches: watches,
        }
    }

    /// Whether both watches have listed.
    pub fn synced(&self) -> bool {
        let w = self.shared.world();
        w.pods.synced && w.groups.synced
    }

    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) {
        self.shared.wait_quiet(quiet, timeout).await;
    }

    pub fn writes(&self) -> Writes {
        self.shared.writes()
    }
}

impl Drop for ElectionFloor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn act(client: Client, ns: String, pods_per_group: usize, shared: Arc<Shared>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let leases: Api<LeanLease> = Api::namespaced(client.clone(), &ns);
    let groups: Api<ElectionGroup> = Api::namespaced(client, &ns);
    // Groups seen and not yet elected, in the order they arrived; the pods of each group, as
    // first listed (the pods exist before the groups, and only this floor writes them).
    let mut waiting: VecDeque<String> = VecDeque::new();
    let mut by_app: HashMap<String, Vec<Pod>> = HashMap::new();
    let mut in_flight = FuturesUnordered::new();
    loop {
        let ready: Vec<(ElectionGroup, Vec<Pod>)> = {
            let mut world = shared.world();
            if by_app.is_empty() && world.pods.synced {
                for pod in world.pods.values() {
                    if let Some(app) = pod.labels().get("app") {
                        by_app.entry(app.clone()).or_default().push(pod.clone());
                    }
                }
                for members in by_app.values_mut() {
                    members.sort_by_key(|p| p.name_any());
                }
            }
            waiting.extend(world.groups.take_fresh());
            let mut ready = Vec::new();
            while in_flight.len() + ready.len() < OPERATOR_CONCURRENCY
                && let Some(name) = waiting.front()
            {
                let members = by_app.get(name).filter(|m| m.len() == pods_per_group);
                let (Some(group), Some(members)) = (world.groups.get(name), members) else {
                    break;
                };
                ready.push((group.clone(), members.clone()));
                waiting.pop_front();
            }
            ready
        };
        for (group, members) in ready {
            let (shared, pods, leases, groups) =
                (shared.clone(), pods.clone(), leases.clone(), groups.clone());
            in_flight.push(async move {
                let name = group.name_any();
                let result = elect(&shared, (&pods, &leases, &groups), &group, &members).await;
                (name, result)
            });
        }
        tokio::select! {
            Some((name, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(e) = result {
                    // Tried again from the world as it is then.
                    tracing::debug!(group = %name, error = %e, "floor election failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    waiting.push_back(name);
                }
            }
            () = shared.wake.notified() => {}
        }
    }
}

/// One group's writes, in the order a reconcile sends them.
async fn elect(
    shared: &Shared,
    (pods, leases, groups): (&Api<Pod>, &Api<LeanLease>, &Api<ElectionGroup>),
    group: &ElectionGroup,
    members: &[Pod],
) -> Result<()> {
    let name = group.name_any();
    let leader = members.first().ok_or_else(|| anyhow!("no members"))?;
    let epoch = 1;
    let create = LeaseWrite::Create {
        holder: Some(Holder {
            name: leader.name_any(),
            uid: leader.uid().unwrap_or_default(),
        }),
        transitions: epoch,
    };
    let now = Timestamp::now();
    let lease = podium::lease::desired(group, None, &create, now)
        .ok_or_else(|| anyhow!("no Lease for a create"))?;
    shared.wrote(podium::lease::write(leases, lease, true).await)?;
    for (i, pod) in members.iter().enumerate() {
        let (pod, resource_version) = (pod.name_any(), pod.resource_version().unwrap_or_default());
        let write = if i == 0 {
            LabelWrite::Promote {
                pod,
                resource_version,
                epoch,
            }
        } else {
            LabelWrite::Follow {
                pod,
                resource_version,
            }
        };
        shared.wrote(podium::labels::apply(pods, &write, &name).await)?;
    }
    let status = status(group, leader, epoch, members.len(), members.len(), now);
    shared.wrote(podium::status::write(groups, group, &status).await)?;
    Ok(())
}
