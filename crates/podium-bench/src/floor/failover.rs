//! The failover floor: one group, watched (pods, its Lease, the group), and the protocol's
//! sequential writes sent as soon as the watch shows the leader ineligible: fence the old
//! leader, replace the Lease (conditional on the cached version, new holder, epoch + 1),
//! promote the new leader (conditional on its cached version), write the status. Between
//! failovers it keeps the group as Podium would leave it (a joining pod labelled follower, the
//! eligible count in the status), so that the harness's rounds start from the same state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::{Client, ResourceExt};
use tokio::task::JoinHandle;

use super::{Shared, World, eligible, status};
use podium_core::crd::{ElectionGroup, ROLE_LABEL};
use podium_core::election::{Holder, LabelWrite, LeaseWrite};
use podium_core::lean_lease::LeanLease;
use podium_testkit::observe::{Watching, lease_holder, watch_groups, watch_lease, watch_pods};

/// One failover the floor made.
#[derive(Clone, Copy, Debug)]
pub struct Handled {
    /// When its watch delivered the event that made the leader ineligible.
    pub seen: Instant,
    /// When the last of its writes (the status) was acknowledged.
    pub acked: Instant,
}

pub struct FailoverFloor {
    shared: Arc<Shared>,
    /// Off while the operator answers: the floor keeps watching but sends nothing.
    active: Arc<AtomicBool>,
    handled: Arc<Mutex<Vec<Handled>>>,
    task: JoinHandle<()>,
    _watches: [Watching; 3],
}

enum Action {
    Failover {
        group: ElectionGroup,
        lease: Box<Lease>,
        old: String,
        new: Pod,
        seen: Instant,
    },
    Follow(Pod),
    Status(ElectionGroup, Pod, i32),
}

impl FailoverFloor {
    /// Starts watching and acting for group `group` over pods `app=<app>` in `ns`.
    pub fn start(client: &Client, ns: &str, group: &str, app: &str) -> FailoverFloor {
        let shared = Arc::new(Shared::default());
        let watches = [
            watch_pods(
                client,
                ns,
                Some(&format!("app={app}")),
                shared.feed(|w| &mut w.pods),
            ),
            watch_lease(client, ns, group, shared.feed(|w| &mut w.leases)),
            watch_groups(client, ns, shared.feed(|w| &mut w.groups)),
        ];
        let handled = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(act(
            client.clone(),
            ns.to_string(),
            group.to_string(),
            (shared.clone(), active.clone()),
            handled.clone(),
        ));
        FailoverFloor {
            shared,
            active,
            handled,
            task,
            _watches: watches,
        }
    }

    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) {
        self.shared.wait_quiet(quiet, timeout).await;
    }

    /// Starts (or stops) answering; it starts inactive.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
        self.shared.wake.notify_one();
    }

    /// The first failover whose triggering event arrived after `since`.
    pub fn handled_since(&self, since: Instant) -> Option<Handled> {
        let handled = self.handled.lock().unwrap_or_else(|e| e.into_inner());
        handled.iter().find(|h| h.seen >= since).copied()
    }

    pub fn failed_writes(&self) -> u64 {
        self.shared.writes().failed
    }
}

impl Drop for FailoverFloor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn act(
    client: Client,
    ns: String,
    group: String,
    (shared, active): (Arc<Shared>, Arc<AtomicBool>),
    handled: Arc<Mutex<Vec<Handled>>>,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let leases: Api<LeanLease> = Api::namespaced(client.clone(), &ns);
    let groups: Api<ElectionGroup> = Api::namespaced(client, &ns);
    loop {
        let action = if active.load(Ordering::Acquire) {
            next(&shared.world(), &group)
        } else {
            None
        };
        let Some(action) = action else {
            shared.wake.notified().await;
            continue;
        };
        let done = match action {
            Action::Failover {
                group: g,
                lease,
                old,
                new,
                seen,
            } => failover(&shared, (&pods, &leases, &groups), &g, &lease, &old, &new)
                .await
                .map(|acked| {
                    handled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Handled { seen, acked });
                }),
            Action::Follow(pod) => {
                let write = LabelWrite::Follow {
                    pod: pod.name_any(),
                    resource_version: pod.resource_version().unwrap_or_default(),
                };
                label(&shared, &pods, &write, &group).await
            }
            Action::Status(g, leader, epoch) => {
                let (members, eligible) = counts(&shared.world());
                let status = status(&g, &leader, epoch, members, eligible, Timestamp::now());
                write_status(&shared, &groups, &g, &status).await
            }
        };
        if let Err(e) = done {
            // The next look at the world decides again; pause so that a persistent refusal
            // does not turn into a busy loop.
            tracing::debug!(error = %e, "floor write failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The four sequential writes; when the last was acknowledged.
async fn failover(
    shared: &Shared,
    (pods, leases, groups): (&Api<Pod>, &Api<LeanLease>, &Api<ElectionGroup>),
    group: &ElectionGroup,
    lease: &Lease,
    old: &str,
    new: &Pod,
) -> Result<Instant> {
    let name = group.name_any();
    let fence = LabelWrite::Fence {
        pod: old.to_string(),
        lease_version: lease.resource_version().unwrap_or_default(),
        strip: false,
    };
    label(shared, pods, &fence, &name).await?;
    let (_, epoch) = lease_holder(lease);
    let epoch = epoch.saturating_add(1);
    let transfer = LeaseWrite::Transfer {
        holder: Some(Holder {
            name: new.name_any(),
            uid: new.uid().unwrap_or_default(),
        }),
        transitions: epoch,
    };
    let desired = podium::lease::desired(group, Some(lease), &transfer, Timestamp::now())
        .ok_or_else(|| anyhow!("no Lease for a transfer"))?;
    let written = shared.wrote(podium::lease::write(leases, desired, false).await)?;
    shared.world().leases.offer(written);
    let promote = LabelWrite::Promote {
        pod: new.name_any(),
        resource_version: new.resource_version().unwrap_or_default(),
        epoch,
    };
    label(shared, pods, &promote, &name).await?;
    let (members, eligible) = counts(&shared.world());
    let status = status(group, new, epoch, members, eligible, Timestamp::now());
    write_status(shared, groups, group, &status).await?;
    Ok(Instant::now())
}

async fn label(shared: &Shared, pods: &Api<Pod>, write: &LabelWrite, group: &str) -> Result<()> {
    if let Some(pod) = shared.wrote(podium::labels::apply(pods, write, group).await)? {
        shared.world().pods.offer(pod);
    }
    Ok(())
}

async fn write_status(
    shared: &Shared,
    groups: &Api<ElectionGroup>,
    group: &ElectionGroup,
    status: &podium_core::crd::ElectionGroupStatus,
) -> Result<()> {
    let written = shared.wrote(podium::status::write(groups, group, status).await)?;
    shared.world().groups.offer(written);
    Ok(())
}

/// Members and eligible members in the cache.
fn counts(world: &World) -> (usize, usize) {
    let members = world.pods.values().filter(|p| !is_deleting(p)).count();
    (members, world.pods.values().filter(|p| eligible(p)).count())
}

fn is_deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// What the floor does next, if anything: a failover first, then labels, then the status.
fn next(world: &World, group_name: &str) -> Option<Action> {
    if !(world.pods.synced && world.leases.synced && world.groups.synced) {
        return None;
    }
    let group = world.groups.get(group_name)?;
    let lease = world.leases.get(group_name)?;
    let (holder, epoch) = lease_holder(lease);
    let holder = holder?;
    let mut candidates: Vec<&Pod> = world.pods.values().filter(|p| eligible(p)).collect();
    candidates.sort_by_key(|p| p.name_any());
    match world.pods.get(&holder) {
        Some(pod) if eligible(pod) => {}
        _ => {
            let new = candidates.first()?;
            return Some(Action::Failover {
                group: group.clone(),
                lease: Box::new(lease.clone()),
                seen: world.pods.changed_at(&holder).unwrap_or_else(Instant::now),
                old: holder,
                new: (*new).clone(),
            });
        }
    }
    if let Some(pod) = candidates
        .iter()
        .find(|p| !p.labels().contains_key(ROLE_LABEL))
    {
        return Some(Action::Follow((*pod).clone()));
    }
    let leader = world.pods.get(&holder)?;
    let (members, eligible) = counts(world);
    let current = group.status.clone().unwrap_or_default();
    let stale = current.leader.as_deref() != Some(holder.as_str())
        || current.epoch != Some(epoch)
        || current.members != i32::try_from(members).unwrap_or(i32::MAX)
        || current.eligible_members != i32::try_from(eligible).unwrap_or(i32::MAX);
    stale.then(|| Action::Status(group.clone(), leader.clone(), epoch))
}
