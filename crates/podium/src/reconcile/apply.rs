//! Step 3: send a decision's writes in the order [`Decision::steps`] gives: the fence and the
//! demotions, the Lease (compare-and-swap on the version read), then the promote and the
//! routine labels. Any failure stops here: what was written is durable and consistent, and
//! the next reconcile converges from the Lease.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::{Context, report};
use crate::crd::{ElectionGroup, ROLE_LEADER};
use crate::election::{
    self, Decision, Handover, LabelWrite, LeaseWrite, Observation, Outcome, Step,
};
use crate::error::{Error, Result};
use crate::lean_lease::LeanLease;
use crate::memory::Key;
use crate::pod::ElectionPod;
use crate::{labels, lease};

pub async fn apply(
    group: &ElectionGroup,
    ctx: &Context,
    lease_api: &Api<LeanLease>,
    read_lease: Option<&Lease>,
    decision: &Decision,
    seen_at: Instant,
    now: Timestamp,
) -> Result<Option<Duration>> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let key = (namespace.clone(), name.clone());
    if decision.handover.is_some() {
        ctx.memory.failover_started(&key, seen_at);
    }

    let pods: Api<ElectionPod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut lease_written = false;
    let mut failover_took = None;
    for step in decision.steps() {
        match step {
            Step::Lease(write) => {
                write_lease(group, ctx, lease_api, read_lease, decision, write, now).await?;
                lease_written = true;
            }
            Step::Label(write) => {
                if let LabelWrite::Promote { .. } = write
                    && !lease_written
                {
                    // The core never decides this; refuse rather than promote unfenced.
                    return Err(Error::LeaseMoved(format!(
                        "refusing to promote without a Lease write of our own first: {write:?}"
                    )));
                }
                labels::apply(&pods, write, &name).await?;
                if let LabelWrite::Promote { pod, epoch, .. } = write {
                    failover_took = promoted(ctx, group, &key, decision, pod, *epoch);
                }
            }
        }
    }
    if decision.leader.is_none() {
        ctx.memory.failover_ended(&key);
    }
    Ok(failover_took)
}

/// The Lease write of a decision, conditional on the version read; remembered, logged and
/// reported.
async fn write_lease(
    group: &ElectionGroup,
    ctx: &Context,
    lease_api: &Api<LeanLease>,
    read_lease: Option<&Lease>,
    decision: &Decision,
    write: &LeaseWrite,
    now: Timestamp,
) -> Result<()> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let key = (namespace.clone(), name.clone());
    let Some(desired) = lease::desired(group, read_lease, write, now) else {
        return Ok(());
    };
    let create = matches!(write, LeaseWrite::Create { .. });
    let written = lease::write(lease_api, desired, create).await?;
    ctx.memory
        .wrote_lease(&key, read_lease.and_then(|l| l.resource_version()), written);
    if let Some(h) = &decision.handover {
        ctx.metrics.leader_changed(&namespace, &name);
        tracing::info!(group = %name, %namespace, from = ?h.from, to = ?h.to, reason = %h.reason, epoch = decision.epoch, "leadership moved");
        // With a successor, the LeaderElected event names the old leader too: one Event per
        // failover instead of two, as Events are API writes like any other.
        if let (Some(from), None) = (&h.from, &h.to) {
            report::event(
                ctx,
                group,
                EventType::Normal,
                "LeaderLost",
                format!("pod {from} lost leadership: {}", h.reason),
            );
        }
    }
    if decision.leader.is_none() && matches!(decision.outcome, Outcome::NoEligibleMembers) {
        report::event(
            ctx,
            group,
            EventType::Warning,
            "NoEligibleMembers",
            "no member is eligible; the leader label is cleared".into(),
        );
    }
    Ok(())
}

/// A new leader is labelled: the failover is over. Returns how long it took, when known.
fn promoted(
    ctx: &Context,
    group: &ElectionGroup,
    key: &Key,
    decision: &Decision,
    pod: &str,
    epoch: i32,
) -> Option<Duration> {
    let took = ctx
        .memory
        .failover_ended(key)
        .map(|started| started.elapsed());
    if let Some(took) = took {
        ctx.metrics.failover(took);
    }
    let previous = match &decision.handover {
        Some(Handover {
            from: Some(from),
            reason,
            ..
        }) if from != pod => format!(", taking over from pod {from} ({reason})"),
        _ => String::new(),
    };
    report::event(
        ctx,
        group,
        EventType::Normal,
        "LeaderElected",
        format!("pod {pod} is the leader at epoch {epoch}{previous}"),
    );
    took
}

/// At most this many routine label writes (followers, strays without a leader label) per
/// reconcile, after the writes that matter for safety.
const MAX_ROUTINE_WRITES: usize = 50;

/// Leaves routine label writes beyond [`MAX_ROUTINE_WRITES`] to the next reconcile, which comes
/// at once. A reconcile applies its writes one by one and nothing else happens to the group
/// meanwhile: labelling the followers of a new 10,000-pod group took minutes in one go, during
/// which the Lease was not renewed and a failed leader was not replaced.
pub fn defer_routine_writes(observed: &Observation<'_>, decision: &mut Decision) {
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
        LabelWrite::Fence { .. } | LabelWrite::Demote { .. } | LabelWrite::Promote { .. } => false,
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
