//! Step 1: what the group looks like, from the caches, as the core's [`Observation`]. Only the
//! pods the group selects or once touched are looked at (through the indexes), so a reconcile
//! costs the same with 10 groups or 3000.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::Context;
use crate::crd::{ElectionGroup, SWITCHOVER_ANNOTATION, SwitchoverRequest};
use crate::election::{self, Observation, Overlap};
use crate::error::Result;
use crate::lean_lease::LeanLease;
use crate::memory::Key;
use crate::pod::ElectionPod;
use crate::{index, lease, validate};

/// The group's Lease: our own last write while the cache lags it, else the cache. The server is
/// read only when the cache is known to be stale (a 409) or to lack a Lease that exists (one
/// podium did not label). A synced cache without the Lease needs no read: the decision then
/// creates it, and a create is itself a compare-and-swap on "absent", refused with a 409 when
/// the cache was wrong, after which the next reconcile reads the server. That read cost one
/// request per new group, a fifth of an election's floor.
pub async fn read_lease(
    ctx: &Context,
    api: &Api<LeanLease>,
    key: &Key,
) -> Result<Option<Arc<Lease>>> {
    let (namespace, name) = key;
    let stale = ctx.memory.take_lease_stale(key);
    let cached = ctx.leases.get(&ObjectRef::new(name).within(namespace));
    let in_cache = cached.is_some();
    let cached = ctx.memory.freshest_lease(key, cached).filter(|_| !stale);
    if cached.is_some() {
        return Ok(cached);
    }
    if !stale && !ctx.memory.lease_outside_cache(key) {
        return Ok(None);
    }
    let read = lease::get(api, name).await?;
    ctx.memory.lease_seen(key, read.is_some(), in_cache);
    Ok(read.map(Arc::new))
}

/// Builds the core's input from the caches.
pub fn observe<'a>(
    group: &'a ElectionGroup,
    switchover: &'a Option<Result<SwitchoverRequest, String>>,
    ctx: &Context,
    lease: Option<&Lease>,
    namespace: &str,
    now: Timestamp,
) -> Observation<'a> {
    let name = group.metadata.name.as_deref().unwrap_or_default();
    let min_ready = Duration::from_secs(u64::try_from(group.spec.min_ready_seconds).unwrap_or(0));
    let node = |pod: &ElectionPod| {
        let name = pod.spec.as_ref()?.node_name.as_ref()?;
        ctx.nodes.as_ref()?.get(&ObjectRef::new(name))
    };
    let node_ready = |pod: &ElectionPod| election::node_ready(node(pod)?.as_ref());
    let member = |pod: &ElectionPod| {
        let mut member = election::member_from_pod(pod, node_ready(pod), min_ready, now);
        member.draining =
            node(pod).is_some_and(|n| election::node_draining(&n, &group.spec.drain_taints));
        member
    };
    // The pod belongs to the oldest valid group selecting it; any other reports an overlap.
    let claimant = |pod: &ElectionPod| -> Option<String> {
        index::groups_selecting(&ctx.groups, &ctx.group_index, pod)
            .into_iter()
            .filter(|g| g.metadata.name.as_deref() != Some(name))
            .filter(|g| g.meta().deletion_timestamp.is_none())
            .filter(|g| validate::validate(&g.spec).is_ok())
            .filter(|g| is_older(g, group))
            .min_by(|a, b| ordering_key(a).cmp(&ordering_key(b)))
            .map(|g| g.name_any())
    };

    let selected = index::selected_pods(&ctx.pods, &ctx.pod_index, namespace, &group.spec.selector);
    let mut members = Vec::new();
    let mut overlaps = Vec::new();
    for pod in &selected {
        match claimant(pod) {
            None => members.push(member(pod)),
            Some(other_group) => overlaps.push(Overlap {
                pod: pod.name_any(),
                other_group,
            }),
        }
    }
    let member_names: HashSet<String> = members.iter().map(|m| m.name.clone()).collect();
    // Pods carrying our annotation that are not (or no longer) our members: their labels are ours
    // to clean up.
    let strays = index::touched_pods(&ctx.pods, &ctx.pod_index, namespace, name)
        .iter()
        .filter(|p| !member_names.contains(p.metadata.name.as_deref().unwrap_or_default()))
        .map(|p| member(p))
        .collect();
    Observation {
        now,
        group: name,
        spec: &group.spec,
        members,
        strays,
        lease: lease::state(group, lease),
        overlaps,
        published_epoch: group.status.as_ref().and_then(|s| s.epoch),
        switchover: switchover.as_ref().and_then(|r| r.as_ref().ok()),
    }
}

/// The group's switchover request, unless the status shows it carried out: `Err` with the
/// reason when the annotation is not a request.
pub fn switchover_request(group: &ElectionGroup) -> Option<Result<SwitchoverRequest, String>> {
    let raw = group.annotations().get(SWITCHOVER_ANNOTATION)?;
    let request = match serde_json::from_str::<SwitchoverRequest>(raw) {
        Ok(request) => request,
        Err(e) => {
            return Some(Err(format!(
                "annotation {SWITCHOVER_ANNOTATION} is not a switchover request ({e}); use `podium switchover`"
            )));
        }
    };
    let done = group
        .status
        .as_ref()
        .and_then(|s| s.last_switchover.as_ref())
        .is_some_and(|o| o.id == request.id);
    (!done).then_some(Ok(request))
}

/// Creation time, then name: the order in which overlapping groups claim pods.
fn ordering_key(g: &ElectionGroup) -> (Option<Timestamp>, String) {
    (
        g.meta().creation_timestamp.clone().map(|t| t.0),
        g.name_any(),
    )
}

/// Whether `a` was created before `b`; the name breaks ties so both groups agree.
fn is_older(a: &ElectionGroup, b: &ElectionGroup) -> bool {
    ordering_key(a) < ordering_key(b)
}
