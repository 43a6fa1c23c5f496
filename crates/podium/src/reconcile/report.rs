//! Step 4: tell the user. Status goes out by server-side apply under podium's one field
//! manager, conditional on the resourceVersion read; Events are best effort.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::Context;
use crate::crd::{ElectionGroup, ElectionGroupStatus, ROLE_LEADER, conditions};
use crate::election::{self, Decision, Observation, SwitchoverDecision, SwitchoverResult};
use crate::error::{Error, Result};
use crate::status;
use podium_core::notify::stall;

/// After a decision was applied: metrics, and the status when it changed.
/// Hands the group's state to the notifier: the label writes are done, so the roles it pushes
/// follow them.
pub fn notify(
    ctx: &Context,
    group: &ElectionGroup,
    observed: &Observation<'_>,
    decision: &Decision,
) {
    let Ok(namespace) = group.namespace().ok_or(Error::MissingObjectKey) else {
        return;
    };
    ctx.notifier.update(crate::notify::GroupUpdate {
        key: (namespace, group.name_any()),
        notify: group.spec.notify.clone(),
        leader: decision.leader.clone(),
        epoch: decision.epoch.max(0) as u64,
        term: Duration::from_secs(group.spec.lease_duration_seconds.clamp(2, 3600) as u64),
        targets: observed
            .members
            .iter()
            .chain(&observed.strays)
            .map(|m| crate::notify::Target {
                name: m.name.clone(),
                uid: m.uid.clone(),
            })
            .collect(),
    });
}

pub async fn decided(
    ctx: &Context,
    group: &ElectionGroup,
    observed: &Observation<'_>,
    decision: &Decision,
    failover_took: Option<Duration>,
    now: Timestamp,
) -> Result<()> {
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    // Leader labels as observed before this reconcile's writes: a hand-made second leader shows
    // up here (and in the alert) until the next reconcile has removed it.
    let leader_labels = observed
        .members
        .iter()
        .chain(&observed.strays)
        .filter(|m| m.role.as_deref() == Some(ROLE_LEADER))
        .count();
    ctx.metrics.group_state(
        &namespace,
        &group.name_any(),
        decision.leader.is_some(),
        leader_labels,
    );
    let previous = group.status.as_ref();
    let mut status = election::status::from_decision(
        previous,
        decision,
        &observed.overlaps,
        group.metadata.generation,
        now,
    );
    if let (Some(transition), Some(took), Some(_)) = (
        status.last_transition.as_mut(),
        failover_took,
        &decision.handover,
    ) {
        transition.duration_millis = i64::try_from(took.as_millis()).ok();
    }
    let key = (namespace, group.name_any());
    notifications(ctx, group, &key, &mut status, now);
    if election::status::differs(previous, &status) {
        write_status(ctx, group, &status).await?;
    }
    for started in ctx.notifier.stalls_started(&key) {
        tracing::warn!(namespace = %key.0, group = %key.1, pod = %started.pod, stall = ?started.stall, "a member stalls the group's notifications");
        event(
            ctx,
            group,
            EventType::Warning,
            crate::events::NOTIFICATIONS_STALLED,
            format!(
                "{}; delete the pod to clear it (kubectl delete pod {} -n {}), its replacement starts a fresh podium exec",
                stall::describe(&started),
                started.pod,
                key.0
            ),
        );
    }
    if let Some(switchover) = &decision.switchover {
        switchover_done(ctx, group, switchover);
    }
    Ok(())
}

/// A switchover request was carried out or refused, and the status now says so.
pub fn switchover_done(ctx: &Context, group: &ElectionGroup, switchover: &SwitchoverDecision) {
    let id = &switchover.request.id;
    let (type_, reason) = match switchover.result {
        SwitchoverResult::Succeeded { .. } => (EventType::Normal, "Switchover"),
        SwitchoverResult::Refused { .. } => (EventType::Warning, "SwitchoverRefused"),
    };
    tracing::info!(group = %group.name_any(), %id, result = switchover.result.name(), message = switchover.result.message(), "switchover request handled");
    let note = format!("switchover {id}: {}", switchover.result.message());
    event(ctx, group, type_, reason, note);
}

/// Missing RBAC is a deployment problem the user must fix; say so where they look.
pub async fn forbidden(
    ctx: &Context,
    group: &ElectionGroup,
    observed: &Observation<'_>,
    decision: &Decision,
    error: &Error,
    now: Timestamp,
) {
    let message = format!(
        "podium lacks a permission it needs ({}): {}; grant it in the operator's Role or ClusterRole (the Helm chart's RBAC has it)",
        error.kind(),
        error.server_message().unwrap_or("forbidden")
    );
    event(ctx, group, EventType::Warning, "Forbidden", message.clone());
    let mut status = election::status::from_decision(
        group.status.as_ref(),
        decision,
        &observed.overlaps,
        group.metadata.generation,
        now,
    );
    set_degraded(&mut status, conditions::reasons::FORBIDDEN, message, now);
    if let Some(namespace) = group.namespace() {
        notifications(ctx, group, &(namespace, group.name_any()), &mut status, now);
    }
    let _ = write_status(ctx, group, &status).await;
}

/// Adds the `NotificationsStalled` condition to a group with `spec.notify`, from what the
/// notifier judged last. A group without it has no such condition: leaving it out of the
/// applied status removes it.
fn notifications(
    ctx: &Context,
    group: &ElectionGroup,
    key: &(String, String),
    status: &mut ElectionGroupStatus,
    now: Timestamp,
) {
    if group.spec.notify.is_none() {
        return;
    }
    let stalled = ctx.notifier.stalled(key);
    status.conditions.push(election::status::notifications(
        group.status.as_ref(),
        &stalled,
        group.metadata.generation,
        now,
    ));
}

pub async fn write_status(
    ctx: &Context,
    group: &ElectionGroup,
    status: &ElectionGroupStatus,
) -> Result<()> {
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let api: Api<ElectionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let written = status::write(&api, group, status).await;
    let key = (namespace, group.name_any());
    let written = written.map_err(|e| {
        ctx.memory.status_write_failed(&key);
        Error::StatusPatch(e)
    })?;
    ctx.memory
        .wrote_status(&key, group.resource_version(), written);
    Ok(())
}

fn set_degraded(status: &mut ElectionGroupStatus, reason: &str, message: String, now: Timestamp) {
    status
        .conditions
        .retain(|c| c.type_ != conditions::DEGRADED);
    status.conditions.push(Condition {
        type_: conditions::DEGRADED.into(),
        status: conditions::TRUE.into(),
        reason: reason.into(),
        message,
        observed_generation: status.observed_generation,
        last_transition_time: Time(now),
    });
}

/// Queues an Event about the group; see [`crate::events`].
pub fn event(ctx: &Context, group: &ElectionGroup, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    ctx.events.publish(event, group.object_ref(&()));
}
