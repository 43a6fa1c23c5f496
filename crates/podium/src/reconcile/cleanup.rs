//! A deleted group: fence every pod that may lead, delete its Lease (compare-and-swap on the
//! version read), strip podium's labels from every other pod it touched, and forget it.
//!
//! The cache names the pods; their labels are read again from the server. A reconcile's label
//! writes can still be missing from the watch cache when the next reconcile (this one) starts,
//! and a pod the cache shows untouched would keep its label for good: nothing reconciles a
//! deleted group again.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;

use super::Context;
use crate::crd::{ElectionGroup, FENCE_ANNOTATION, GROUP_ANNOTATION};
use crate::election::{self, LabelWrite, LeaseState, Member};
use crate::error::{Error, Result};
use crate::lean_lease::LeanLease;
use crate::pod::ElectionPod;
use crate::{index, labels, lease, validate};

pub async fn cleanup(group: &ElectionGroup, ctx: &Context) -> Result<Action> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    // The renewer would hand a deleting group back anyway; stop it renewing what goes away.
    ctx.renewer.release(&(namespace.clone(), name.clone()));
    let now = Timestamp::now();
    let pods: Api<ElectionPod> = Api::namespaced(ctx.client.clone(), &namespace);
    let read = touched_pods(group, ctx, &pods, &namespace, &name).await?;
    let touched: Vec<Member> = read
        .iter()
        .map(|p| election::member_from_pod(p, None, Duration::ZERO, now))
        .collect();
    let lease_api: Api<LeanLease> = Api::namespaced(ctx.client.clone(), &namespace);
    let owned = lease::get(&lease_api, &name)
        .await?
        .filter(|l| matches!(lease::state(group, Some(l)), LeaseState::Owned(_)));
    // Whoever the server's Lease, the status or the labels say may lead is fenced before the
    // Lease goes, cached or not: a stale replica's promote cannot land after the cleanup.
    let holder = owned.as_ref().and_then(|l| lease::view(l).holder);
    let published = group.status.as_ref().and_then(|s| s.leader.clone());
    let may_lead: Vec<&str> = holder
        .iter()
        .chain(&published)
        .map(String::as_str)
        .collect();
    let fence_version = owned
        .as_ref()
        .and_then(|l| l.resource_version())
        .or_else(|| group.resource_version())
        .unwrap_or_default();
    let mut writes = election::cleanup_writes(&touched, &may_lead, &fence_version);
    writes
        .strips
        .extend(unfinished_fences(&read, &writes.fences));
    if !ctx.claim.borrow().is_current() {
        return Ok(Action::requeue(super::CLAIM_RETRY));
    }
    // The fence's own annotation comes off last, conditional on the version the fence left.
    let mut unfence = Vec::new();
    for write in &writes.fences {
        if let Some(fenced) = labels::apply(&pods, write, &name).await? {
            unfence.push(LabelWrite::Strip {
                pod: write.pod().to_string(),
                resource_version: fenced.resource_version().unwrap_or_default(),
            });
        }
    }
    if let Some(l) = owned {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: l.uid(),
                resource_version: l.resource_version(),
            }),
            ..Default::default()
        };
        match lease_api.delete(&name, &params).await {
            Ok(_) => {}
            Err(e) if crate::error::status_code(&e) == Some(404) => {}
            Err(source) => {
                return Err(Error::LeaseDelete {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    for write in writes.strips.iter().chain(&unfence) {
        labels::apply(&pods, write, &name).await?;
    }
    ctx.notifier.update(crate::notify::GroupUpdate {
        key: (namespace.clone(), name.clone()),
        notify: None,
        leader: None,
        epoch: group
            .status
            .as_ref()
            .and_then(|s| s.epoch)
            .unwrap_or_default()
            .max(0) as u64,
        term: Duration::from_secs(group.spec.lease_duration_seconds.clamp(2, 3600) as u64),
        targets: Vec::new(),
    });
    ctx.metrics.group_removed(&namespace, &name);
    ctx.memory.forget(&(namespace, name));
    Ok(Action::await_change())
}

/// Pods an earlier attempt of this cleanup fenced and did not unfence: it stopped between the
/// two (a 409 on another pod's strip ends the attempt), and the fence had taken the group's
/// annotation off, so nothing else names them any more. Their fence annotation comes off with
/// a strip, conditional on the version read.
fn unfinished_fences(read: &[ElectionPod], fences: &[LabelWrite]) -> Vec<LabelWrite> {
    read.iter()
        .filter(|p| fenced_out_of_any_group(p))
        .filter(|p| !fences.iter().any(|f| f.pod() == p.name_any()))
        .map(|p| LabelWrite::Strip {
            pod: p.name_any(),
            resource_version: p.resource_version().unwrap_or_default(),
        })
        .collect()
}

/// A fence without a group annotation: what a cleanup's fence leaves until its unfence.
fn fenced_out_of_any_group(pod: &ElectionPod) -> bool {
    let annotations = pod.annotations();
    annotations.contains_key(FENCE_ANNOTATION) && !annotations.contains_key(GROUP_ANNOTATION)
}

/// The pods carrying the group's annotation, read from the server one by one: every pod the
/// cache shows the group touched or selects, so that a label written but not yet in the cache
/// is found, and each with its current version for the conditional strips. A GET by name is one
/// key in etcd; a list would read the whole namespace's pods per deleted group (4x slower to
/// delete 1000 groups, docs/design.md). An invalid group's selector is not trusted: only the
/// pods it touched are read.
async fn touched_pods(
    group: &ElectionGroup,
    ctx: &Context,
    pods: &Api<ElectionPod>,
    namespace: &str,
    name: &str,
) -> Result<Vec<ElectionPod>> {
    let mut candidates: BTreeSet<String> =
        index::touched_pods(&ctx.pods, &ctx.pod_index, namespace, name)
            .iter()
            .map(|p| p.name_any())
            .collect();
    if validate::validate(&group.spec).is_ok() {
        candidates.extend(
            index::selected_pods(&ctx.pods, &ctx.pod_index, namespace, &group.spec.selector)
                .iter()
                .map(|p| p.name_any()),
        );
    }
    let read: Vec<Option<ElectionPod>> = futures::stream::iter(candidates)
        .map(|pod| async move {
            pods.get_opt(&pod)
                .await
                .map_err(|source| Error::PodRead { pod, source })
        })
        .buffer_unordered(READS_IN_FLIGHT)
        .try_collect()
        .await?;
    // A pod with a fence and no group annotation is one this cleanup fenced before (see
    // [`unfinished_fences`]); it is among the candidates because the group selects it or the
    // cache still shows it annotated.
    Ok(read
        .into_iter()
        .flatten()
        .filter(|p| {
            p.annotations().get(GROUP_ANNOTATION).map(String::as_str) == Some(name)
                || fenced_out_of_any_group(p)
        })
        .collect())
}

/// A group may select hundreds of pods; a few reads at a time keep its cleanup from crowding
/// out the other reconciles' requests.
const READS_IN_FLIGHT: usize = 8;
