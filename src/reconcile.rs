//! Reconcile one ElectionGroup: read from the caches, ask the election core, apply its decision
//! in order (Lease first, then labels break-before-make, then status), and report.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::FIELD_MANAGER;
use crate::crd::{ElectionGroup, ElectionGroupStatus, FINALIZER, ROLE_LEADER, conditions};
use crate::election::{
    self, Decision, Handover, LabelWrite, LeaseState, LeaseWrite, Member, Observation, Outcome,
    Overlap,
};
use crate::error::{Error, Result};
use crate::index::{self, Index};
use crate::metrics::Metrics;
use crate::own_writes::OwnWrites;
use crate::{labels, lease, validate};

/// What every reconcile shares: the client, the watch caches, and the reporting sinks.
pub struct Context {
    pub client: Client,
    pub groups: Store<ElectionGroup>,
    pub pods: Store<Pod>,
    pub pod_index: Arc<Index<Pod>>,
    pub group_index: Arc<Index<ElectionGroup>>,
    /// `None` when the operator may not read Nodes (namespace-scoped RBAC).
    pub nodes: Option<Store<Node>>,
    pub leases: Store<Lease>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Whether this replica holds the operator Lease; only the holder writes.
    pub leading: watch::Receiver<bool>,
    /// When each group's current failover started, for `podium_failover_seconds`.
    pub failovers: Mutex<HashMap<(String, String), Instant>>,
    /// Whether every cache has had its first full list.
    pub synced: Arc<AtomicBool>,
    /// Groups whose cached Lease just proved stale (a write of it got 409): the next reconcile
    /// reads it from the server. Otherwise, while the Lease watch is down or backing off (after
    /// an API server restart, up to half a minute), every renewal and every failover of the
    /// group would fail with 409 against the same stale copy, 20 times a second.
    pub stale_leases: Mutex<HashSet<(String, String)>>,
    /// Status and Lease writes of ours the caches may not show yet.
    pub written_groups: OwnWrites<ElectionGroup>,
    pub written_leases: OwnWrites<Lease>,
}

pub async fn reconcile(group: Arc<ElectionGroup>, ctx: Arc<Context>) -> Result<Action> {
    if !*ctx.leading.borrow() {
        // A standby keeps its caches warm; the trigger fired on gaining leadership brings it here again.
        return Ok(Action::await_change());
    }
    if !ctx.synced.load(Ordering::Acquire) {
        // The group cache can fill before the pod cache: deciding now would see no members and
        // fail a healthy leader over (observed on every restart that lost that race).
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let started = Instant::now();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let api: Api<ElectionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, group, |event| async {
        match event {
            FinalizerEvent::Apply(g) => apply(&g, &ctx).await,
            FinalizerEvent::Cleanup(g) => cleanup(&g, &ctx).await,
        }
    })
    .await;
    ctx.metrics.reconciled(started.elapsed());
    match result {
        // Two reconciles of a deleted group can race to remove the finalizer; the second finds
        // the group already gone, which is the outcome both wanted.
        Err(kube::runtime::finalizer::Error::RemoveFinalizer(e))
            if crate::error::status_code(&e) == Some(404) =>
        {
            Ok(Action::await_change())
        }
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    }
}

pub fn error_policy(group: Arc<ElectionGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.kind());
    let ttl = group.spec.lease_duration_seconds.clamp(2, 3600);
    if error.is_conflict() {
        tracing::debug!(group = %group.name_any(), %error, "conflict; retrying from fresh state");
        return Action::requeue(Duration::from_millis(50));
    }
    tracing::warn!(group = %group.name_any(), kind = error.kind(), %error, "reconcile failed");
    // Retry well inside the renewal window so one failed renewal does not cost the Lease.
    Action::requeue(election::renew_interval(ttl).min(Duration::from_secs(1)) / 2)
}

async fn apply(cached: &ElectionGroup, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let seen_at = Instant::now();
    let name = cached.name_any();
    let namespace = cached.namespace().ok_or(Error::MissingObjectKey)?;
    let key = (namespace.clone(), name.clone());
    let ours = ctx.written_groups.newer_than(&key, Some(cached));
    let group = ours.as_deref().unwrap_or(cached);
    let previous = group.status.as_ref();

    if let Err(problems) = validate::validate(&group.spec) {
        let status = election::status::invalid(previous, &problems, group.metadata.generation, now);
        if election::status::differs(previous, &status) {
            publish(
                ctx,
                group,
                EventType::Warning,
                "InvalidSpec",
                problems.join("; "),
            )
            .await;
            write_status(ctx, group, &status).await?;
        }
        return Ok(Action::await_change());
    }

    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    let stale = ctx
        .stale_leases
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
    let cached_lease = ctx.leases.get(&ObjectRef::new(&name).within(&namespace));
    let cached_lease = ctx
        .written_leases
        .newer_than(&key, cached_lease.as_deref())
        .or(cached_lease)
        .filter(|_| !stale);
    // The cache only holds Leases podium labelled; a missing one may exist unlabelled.
    let read_lease = match cached_lease {
        Some(l) => Some((*l).clone()),
        None => lease::get(&lease_api, &name).await?,
    };
    let observed = observe(group, ctx, read_lease.as_ref(), &namespace, now);
    let mut decision = election::decide(&observed);
    defer_routine_writes(&observed, &mut decision);

    let result = execute(
        group,
        ctx,
        &lease_api,
        read_lease.as_ref(),
        &decision,
        seen_at,
        now,
    )
    .await;
    if let Err(Error::LeaseWrite { .. } | Error::LeaseMoved(_)) = &result {
        // Whatever we remembered writing, the server has moved past it (or it is gone).
        ctx.written_leases.forget(&key);
    }
    if let Err(Error::LeaseWrite { source, .. }) = &result
        && crate::error::status_code(source) == Some(409)
    {
        ctx.stale_leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
    }
    if let Err(e) = &result
        && e.is_forbidden()
    {
        // Missing RBAC is a deployment problem the user must fix; say so where they look.
        let message = format!(
            "podium lacks a permission it needs ({}): {}; grant it in the operator's Role or ClusterRole (the Helm chart's RBAC has it)",
            e.kind(),
            e.server_message().unwrap_or("forbidden")
        );
        publish(ctx, group, EventType::Warning, "Forbidden", message.clone()).await;
        let mut status = election::status::from_decision(
            previous,
            &decision,
            &observed.overlaps,
            group.metadata.generation,
            now,
        );
        set_degraded(&mut status, conditions::reasons::FORBIDDEN, message, now);
        let _ = write_status(ctx, group, &status).await;
    }
    result?;

    // Leader labels as observed before this reconcile's writes: a hand-made second leader shows
    // up here (and in the alert) until the next reconcile has removed it.
    let leader_labels = observed
        .members
        .iter()
        .chain(&observed.strays)
        .filter(|m| m.role.as_deref() == Some(ROLE_LEADER))
        .count();
    ctx.metrics
        .group_state(&namespace, &name, decision.leader.is_some(), leader_labels);
    let status = election::status::from_decision(
        previous,
        &decision,
        &observed.overlaps,
        group.metadata.generation,
        now,
    );
    if election::status::differs(previous, &status) {
        write_status(ctx, group, &status).await?;
    }
    Ok(Action::requeue(decision.requeue_after))
}

/// Applies a decision in the protocol's order. Any failure stops here: what was written is
/// durable and consistent (Lease first, labels removed before added), and the next reconcile
/// converges from the Lease.
async fn execute(
    group: &ElectionGroup,
    ctx: &Context,
    lease_api: &Api<Lease>,
    read_lease: Option<&Lease>,
    decision: &Decision,
    seen_at: Instant,
    now: Timestamp,
) -> Result<()> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let key = (namespace.clone(), name.clone());
    if decision.handover.is_some() {
        ctx.failovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_insert(seen_at);
    }

    let mut fresh_lease: Option<Lease> = None;
    if let Some(desired) = lease::desired(group, read_lease, &decision.lease, now) {
        let create = matches!(decision.lease, LeaseWrite::Create { .. });
        let written = lease::write(lease_api, &desired, create).await?;
        ctx.written_leases.record(
            key.clone(),
            read_lease.and_then(|l| l.resource_version()),
            written.clone(),
        );
        fresh_lease = Some(written);
        if let Some(h) = &decision.handover {
            ctx.metrics.leader_changed(&namespace, &name);
            tracing::info!(group = %name, %namespace, from = ?h.from, to = ?h.to, reason = %h.reason, epoch = decision.epoch, "leadership moved");
            // With a successor, the LeaderElected event below names the old leader too: one
            // Event per failover instead of two, as Events are API writes like any other.
            if let (Some(from), None) = (&h.from, &h.to) {
                publish(
                    ctx,
                    group,
                    EventType::Normal,
                    "LeaderLost",
                    format!("pod {from} lost leadership: {}", h.reason),
                )
                .await;
            }
        }
        if decision.leader.is_none() && matches!(decision.outcome, Outcome::NoEligibleMembers) {
            publish(
                ctx,
                group,
                EventType::Warning,
                "NoEligibleMembers",
                "no member is eligible; the leader label is cleared".into(),
            )
            .await;
        }
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for write in &decision.labels {
        if let LabelWrite::Promote { pod, epoch, .. } = write {
            // Promote only what the Lease says right now: when this reconcile did not write the
            // Lease itself, a quorum read rules out acting on a stale cache.
            let current = match fresh_lease.take() {
                Some(l) => l,
                None => lease::get(lease_api, &name)
                    .await?
                    .ok_or_else(|| Error::LeaseMoved(format!("Lease {name} is gone")))?,
            };
            let view = lease::view(&current);
            if view.holder.as_deref() != Some(pod.as_str()) || view.transitions != *epoch {
                return Err(Error::LeaseMoved(format!(
                    "Lease {name} names {:?} at epoch {}, not {pod} at epoch {epoch}",
                    view.holder, view.transitions
                )));
            }
        }
        labels::apply(&pods, write, &name).await?;
        if let LabelWrite::Promote { pod, epoch, .. } = write {
            if let Some(started) = ctx
                .failovers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&key)
            {
                ctx.metrics.failover(started.elapsed());
            }
            let previous = match &decision.handover {
                Some(Handover {
                    from: Some(from),
                    reason,
                    ..
                }) if from != pod => format!(", taking over from pod {from} ({reason})"),
                _ => String::new(),
            };
            publish(
                ctx,
                group,
                EventType::Normal,
                "LeaderElected",
                format!("pod {pod} is the leader at epoch {epoch}{previous}"),
            )
            .await;
        }
    }
    if decision.leader.is_none() {
        ctx.failovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
    }
    Ok(())
}

/// At most this many routine label writes (followers, strays without a leader label) per
/// reconcile, after the writes that matter for safety.
const MAX_ROUTINE_WRITES: usize = 50;

/// Leaves routine label writes beyond [`MAX_ROUTINE_WRITES`] to the next reconcile, which comes
/// at once. A reconcile applies its writes one by one and nothing else happens to the group
/// meanwhile: labelling the followers of a new 10,000-pod group took minutes in one go, during
/// which the Lease was not renewed and a failed leader was not replaced.
fn defer_routine_writes(observed: &Observation<'_>, decision: &mut Decision) {
    let leader_labelled: HashSet<&str> = observed
        .members
        .iter()
        .chain(&observed.strays)
        .filter(|m| m.role.as_deref() == Some(ROLE_LEADER))
        .map(|m| m.name.as_str())
        .collect();
    let routine = |w: &LabelWrite| match w {
        LabelWrite::Follow { .. } => true,
        LabelWrite::Strip { pod, .. } => !leader_labelled.contains(pod.as_str()),
        LabelWrite::Demote { .. } | LabelWrite::Promote { .. } => false,
    };
    let safety_end = decision
        .labels
        .iter()
        .rposition(|w| !routine(w))
        .map_or(0, |i| i + 1);
    let keep = safety_end + MAX_ROUTINE_WRITES;
    if decision.labels.len() > keep {
        decision.labels.truncate(keep);
        decision.requeue_after = election::MIN_REQUEUE;
    }
}

/// Removes podium's labels and annotations from every pod the group touched, then its Lease.
async fn cleanup(group: &ElectionGroup, ctx: &Context) -> Result<Action> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let now = Timestamp::now();
    let touched: Vec<Member> = index::touched_pods(&ctx.pods, &ctx.pod_index, &namespace, &name)
        .iter()
        .map(|p| election::member_from_pod(p, None, Duration::ZERO, now))
        .collect();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for write in election::cleanup_writes(&touched) {
        labels::apply(&pods, &write, &name).await?;
    }
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(l) = lease::get(&lease_api, &name).await?
        && let LeaseState::Owned(_) = lease::state(group, Some(&l))
    {
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
    ctx.metrics.group_removed(&namespace, &name);
    let key = (namespace, name);
    ctx.written_groups.forget(&key);
    ctx.written_leases.forget(&key);
    ctx.stale_leases
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
    ctx.failovers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&key);
    Ok(Action::await_change())
}

/// Builds the core's input from the caches. Only the pods the group selects or once touched
/// are looked at (through the indexes), so a reconcile costs the same with 10 groups or 3000.
fn observe<'a>(
    group: &'a ElectionGroup,
    ctx: &Context,
    lease: Option<&Lease>,
    namespace: &str,
    now: Timestamp,
) -> Observation<'a> {
    let name = group.metadata.name.as_deref().unwrap_or_default();
    let min_ready = Duration::from_secs(u64::try_from(group.spec.min_ready_seconds).unwrap_or(0));
    let node_ready = |pod: &Pod| -> Option<bool> {
        let node = pod.spec.as_ref()?.node_name.as_ref()?;
        election::node_ready(ctx.nodes.as_ref()?.get(&ObjectRef::new(node))?.as_ref())
    };
    // The pod belongs to the oldest valid group selecting it; any other reports an overlap.
    let claimant = |pod: &Pod| -> Option<String> {
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
            None => members.push(election::member_from_pod(
                pod,
                node_ready(pod),
                min_ready,
                now,
            )),
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
        .map(|p| election::member_from_pod(p, node_ready(p), min_ready, now))
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
    }
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

async fn write_status(
    ctx: &Context,
    group: &ElectionGroup,
    status: &ElectionGroupStatus,
) -> Result<()> {
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let api: Api<ElectionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": group.name_any(), "resourceVersion": group.resource_version() },
        "status": status,
    });
    let written = api
        .patch_status(
            &group.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    let key = (namespace, group.name_any());
    let written = written.map_err(|e| {
        // Our remembered status is what the server moved past; start again from the cache.
        ctx.written_groups.forget(&key);
        Error::StatusPatch(e)
    })?;
    ctx.written_groups
        .record(key, group.resource_version(), written);
    Ok(())
}

fn set_degraded(status: &mut ElectionGroupStatus, reason: &str, message: String, now: Timestamp) {
    status
        .conditions
        .retain(|c| c.type_ != conditions::DEGRADED);
    status
        .conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: conditions::DEGRADED.into(),
            status: conditions::TRUE.into(),
            reason: reason.into(),
            message,
            observed_generation: status.observed_generation,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
        });
}

async fn publish(
    ctx: &Context,
    group: &ElectionGroup,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    // Events are best effort: failing to record one must not fail the election.
    if let Err(e) = ctx.recorder.publish(&event, &group.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}
