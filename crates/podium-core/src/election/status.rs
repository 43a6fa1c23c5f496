//! The status a decision implies. Pure, so the conditions' wording and transitions are tested
//! with the rest of the core.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{Decision, Outcome, Overlap, SwitchoverDecision};
use crate::crd::conditions::{self, reasons};
use crate::crd::{ElectionGroupStatus, LeaderTransition, SwitchoverOutcome};
use crate::notify::stall::{Stall, Stalled, describe};

/// At most this many names in a condition message; the rest are counted.
const MAX_NAMES_IN_MESSAGE: usize = 5;

pub fn from_decision(
    previous: Option<&ElectionGroupStatus>,
    decision: &Decision,
    overlaps: &[Overlap],
    generation: Option<i64>,
    now: Timestamp,
) -> ElectionGroupStatus {
    let leader = decision.leader.as_ref().filter(|h| !h.name.is_empty());
    let mut conds = Vec::new();
    let mut set = |type_: &str, status: bool, reason: &str, message: String| {
        conds.push(condition(
            previous, type_, status, reason, message, generation, now,
        ));
    };
    match leader {
        Some(h) => set(
            conditions::LEADER_ELECTED,
            true,
            reasons::ELECTED,
            format!("pod {} leads at epoch {}", h.name, decision.epoch),
        ),
        None => set(
            conditions::LEADER_ELECTED,
            false,
            reasons::NO_LEADER,
            "no pod leads".into(),
        ),
    }
    if decision.eligible == 0 && decision.outcome != Outcome::Paused {
        set(
            conditions::NO_ELIGIBLE_MEMBERS,
            true,
            reasons::NO_ELIGIBLE,
            no_eligible_message(decision),
        );
    } else {
        set(
            conditions::NO_ELIGIBLE_MEMBERS,
            false,
            reasons::SOME_ELIGIBLE,
            format!(
                "{} of {} members are eligible",
                decision.eligible, decision.members
            ),
        );
    }
    match (&decision.outcome, overlaps.is_empty()) {
        (Outcome::LeaseConflict { owner }, _) => set(
            conditions::CONFLICT,
            true,
            reasons::LEASE_NOT_OWNED,
            format!(
                "a Lease with this group's name already exists and is not owned by podium ({owner}); podium will not touch it: rename the group or delete that Lease"
            ),
        ),
        (_, false) => set(
            conditions::CONFLICT,
            true,
            reasons::OVERLAPPING_GROUP,
            overlap_message(overlaps),
        ),
        (_, true) => set(
            conditions::CONFLICT,
            false,
            reasons::NO_CONFLICT,
            "no conflict".into(),
        ),
    }
    if decision.outcome == Outcome::Paused {
        set(
            conditions::PAUSED,
            true,
            reasons::PAUSED,
            "spec.paused is true: the Lease is renewed for its holder, nobody new is elected and no labels change".into(),
        );
    } else {
        set(
            conditions::PAUSED,
            false,
            reasons::ACTIVE,
            "elections are running".into(),
        );
    }
    set(
        conditions::INVALID_SPEC,
        false,
        reasons::VALID,
        "spec is valid".into(),
    );
    let degraded = !decision.warnings.is_empty();
    set(
        conditions::DEGRADED,
        degraded,
        if degraded {
            reasons::INVALID
        } else {
            reasons::HEALTHY
        },
        if degraded {
            decision.warnings.join("; ")
        } else {
            "no problems seen".into()
        },
    );

    ElectionGroupStatus {
        leader: leader.map(|h| h.name.clone()),
        leader_uid: leader.map(|h| h.uid.clone()).filter(|u| !u.is_empty()),
        epoch: Some(decision.epoch),
        // metav1.Time keeps whole seconds; the Lease's acquireTime has microseconds. Without
        // truncation the status read back always differs and every renewal rewrote it.
        leader_since: leader
            .and(decision.leader_since)
            .and_then(|t| Timestamp::from_second(t.as_second()).ok())
            .map(Time),
        members: decision.members,
        eligible_members: decision.eligible,
        eligible: Some(format!("{}/{}", decision.eligible, decision.members)),
        observed_generation: generation,
        conditions: conds,
        last_transition: match &decision.handover {
            Some(h) => Some(LeaderTransition {
                from: h.from.clone(),
                to: h.to.clone(),
                reason: h.reason.clone(),
                epoch: decision.epoch,
                at: Time(now),
                duration_millis: None,
            }),
            None => previous.and_then(|p| p.last_transition.clone()),
        },
        last_switchover: match &decision.switchover {
            Some(s) => Some(switchover_outcome(s, decision.epoch, now)),
            None => previous.and_then(|p| p.last_switchover.clone()),
        },
    }
}

/// How the status records what became of a switchover request.
pub fn switchover_outcome(
    switchover: &SwitchoverDecision,
    epoch: i32,
    now: Timestamp,
) -> SwitchoverOutcome {
    SwitchoverOutcome {
        id: switchover.request.id.clone(),
        result: switchover.result.name().into(),
        message: switchover.result.message().into(),
        from: switchover.from.clone(),
        to: switchover.to.clone(),
        epoch,
        requested_at: switchover.request.requested_at.clone(),
        completed_at: Time(now),
    }
}

/// Status for a spec that failed validation: the problems, and otherwise what was there.
pub fn invalid(
    previous: Option<&ElectionGroupStatus>,
    problems: &[String],
    generation: Option<i64>,
    now: Timestamp,
) -> ElectionGroupStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let message = format!("spec is invalid: {}", problems.join("; "));
    let invalid = condition(
        previous,
        conditions::INVALID_SPEC,
        true,
        reasons::INVALID,
        message,
        generation,
        now,
    );
    status
        .conditions
        .retain(|c| c.type_ != conditions::INVALID_SPEC);
    status.conditions.push(invalid);
    status.observed_generation = generation;
    status
}

/// The `NotificationsStalled` condition of a group with `spec.notify`, from the pods the
/// notifier found stalling it ([`crate::notify::stall`]). The message names each pod, its
/// epochs and the remedy, since the operator itself never clears a stall.
pub fn notifications(
    previous: Option<&ElectionGroupStatus>,
    stalled: &[Stalled],
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    if stalled.is_empty() {
        return condition(
            previous,
            conditions::NOTIFICATIONS_STALLED,
            false,
            reasons::ALL_PODS_FOLLOW,
            "every member takes the operator's notifications".into(),
            generation,
            now,
        );
    }
    // The stall that blocks every genuine message names the condition when there are both.
    let reason = if stalled
        .iter()
        .any(|s| matches!(s.stall, Stall::EpochAhead { .. }))
    {
        reasons::POD_EPOCH_AHEAD
    } else {
        reasons::POD_RUNNING_UNGRANTED
    };
    let mut parts: Vec<String> = stalled
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(describe)
        .collect();
    let mut names: Vec<&str> = stalled
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|s| s.pod.as_str())
        .collect();
    let more = stalled.len().saturating_sub(MAX_NAMES_IN_MESSAGE);
    if more > 0 {
        parts.push(format!("and {more} more"));
    }
    names.sort_unstable();
    names.dedup();
    // Why the operator does not clear it itself, where one would expect it to.
    let why = if reason == reasons::POD_EPOCH_AHEAD {
        "; podium never lowers a pod's epoch nor raises the group's on a pod's word"
    } else {
        ""
    };
    let message = format!(
        "{}{why}: delete the pod to clear it (kubectl delete pod {}{}), its replacement starts a fresh podium exec",
        parts.join("; "),
        names.join(" "),
        if more > 0 { " ..." } else { "" }
    );
    condition(
        previous,
        conditions::NOTIFICATIONS_STALLED,
        true,
        reason,
        message,
        generation,
        now,
    )
}

fn condition(
    previous: Option<&ElectionGroupStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status {
        conditions::TRUE
    } else {
        conditions::FALSE
    };
    // The transition time moves only when the status does, as the API conventions ask.
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

fn no_eligible_message(decision: &Decision) -> String {
    if decision.members == 0 {
        return "the selector matches no pods".into();
    }
    let mut parts: Vec<String> = decision
        .ineligible
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|(name, reason)| format!("{name}: {reason}"))
        .collect();
    if decision.ineligible.len() > MAX_NAMES_IN_MESSAGE {
        parts.push(format!(
            "and {} more",
            decision.ineligible.len() - MAX_NAMES_IN_MESSAGE
        ));
    }
    format!(
        "none of {} members is eligible ({})",
        decision.members,
        parts.join(", ")
    )
}

fn overlap_message(overlaps: &[Overlap]) -> String {
    let mut parts: Vec<String> = overlaps
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|o| format!("pod {} belongs to older group {}", o.pod, o.other_group))
        .collect();
    if overlaps.len() > MAX_NAMES_IN_MESSAGE {
        parts.push(format!(
            "and {} more",
            overlaps.len() - MAX_NAMES_IN_MESSAGE
        ));
    }
    format!(
        "the selector overlaps an older group; those pods are left alone: {}",
        parts.join(", ")
    )
}

/// Whether two statuses differ in anything but condition timestamps, so an unchanged status
/// costs no write. Asked once per reconcile, so it compares in place: cloning both statuses
/// to blank their timestamps was a few percent of a renewal's CPU.
pub fn differs(a: Option<&ElectionGroupStatus>, b: &ElectionGroupStatus) -> bool {
    let Some(a) = a else { return true };
    // Destructured in full, so that a new status field cannot be left out of the comparison.
    let ElectionGroupStatus {
        leader,
        leader_uid,
        epoch,
        leader_since,
        members,
        eligible_members,
        eligible,
        observed_generation,
        conditions,
        last_transition,
        last_switchover,
    } = a;
    *leader != b.leader
        || *leader_uid != b.leader_uid
        || *epoch != b.epoch
        || *leader_since != b.leader_since
        || *members != b.members
        || *eligible_members != b.eligible_members
        || *eligible != b.eligible
        || *observed_generation != b.observed_generation
        || *last_transition != b.last_transition
        || *last_switchover != b.last_switchover
        || conditions_differ(conditions, &b.conditions)
}

/// Conditions compared by type, timestamps aside.
fn conditions_differ(a: &[Condition], b: &[Condition]) -> bool {
    fn by_type(conditions: &[Condition]) -> Vec<&Condition> {
        let mut sorted: Vec<&Condition> = conditions.iter().collect();
        sorted.sort_by(|x, y| x.type_.cmp(&y.type_));
        sorted
    }
    let same = |x: &Condition, y: &Condition| {
        let Condition {
            type_,
            status,
            reason,
            message,
            observed_generation,
            last_transition_time: _,
        } = x;
        *type_ == y.type_
            && *status == y.status
            && *reason == y.reason
            && *message == y.message
            && *observed_generation == y.observed_generation
    };
    a.len() != b.len()
        || by_type(a)
            .into_iter()
            .zip(by_type(b))
            .any(|(x, y)| !same(x, y))
}
