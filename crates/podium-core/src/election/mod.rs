//! The election core: pure functions from what was observed (group spec, member pods, Lease)
//! to what should be written (Lease, labels, status). No I/O happens here, so every rule of the
//! protocol is tested without an API server; `reconcile` only reads, calls [`decide`], and
//! applies the [`Decision`] in order.

pub mod member;
pub mod status;
mod switchover;

use std::cmp::Reverse;
use std::time::Duration;

use jiff::Timestamp;

use crate::crd::{ElectionGroupSpec, ROLE_FOLLOWER, ROLE_LEADER, SwitchoverRequest};
pub use member::{Eligibility, Member, member_from_pod, node_draining, node_ready};
pub use switchover::{SwitchoverDecision, SwitchoverResult};

/// Never requeue sooner than this: it bounds the loop when a clock or a Lease is odd.
pub const MIN_REQUEUE: Duration = Duration::from_millis(100);

/// The Lease as podium reads it. `holder_uid` comes from an annotation: a pod recreated under
/// the same name (a StatefulSet's) is a new incarnation and must get a new epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    pub holder_uid: Option<String>,
    pub transitions: i32,
    pub acquire_time: Option<Timestamp>,
    pub renew_time: Option<Timestamp>,
    pub duration_seconds: Option<i32>,
    /// The Lease's resourceVersion: a transfer fences its holder with it.
    pub version: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Absent,
    /// A Lease with the group's name exists but podium does not own it: never touch it.
    Foreign {
        owner: String,
    },
    Owned(LeaseView),
}

/// A pod that an older group also selects; this group leaves it alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub pod: String,
    pub other_group: String,
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    pub now: Timestamp,
    pub group: &'a str,
    pub spec: &'a ElectionGroupSpec,
    /// Pods the selector matches (minus overlaps), in any order.
    pub members: Vec<Member>,
    /// Pods that carry this group's annotation but are no longer members: podium's labels
    /// must come off them, a leader label first of all.
    pub strays: Vec<Member>,
    pub lease: LeaseState,
    pub overlaps: Vec<Overlap>,
    /// The epoch the group's status last published: with the Lease deleted by hand, it keeps
    /// the epoch from restarting even when no pod carries it any more.
    pub published_epoch: Option<i32>,
    /// A switchover request not yet carried out (one whose id the status has not recorded).
    pub switchover: Option<&'a SwitchoverRequest>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    pub name: String,
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeaseWrite {
    Keep,
    /// Create the group's Lease. `holder` is `None` when nobody is eligible yet.
    Create {
        holder: Option<Holder>,
        transitions: i32,
    },
    /// Same holder, new renewTime (and the spec's TTL).
    Renew,
    /// A change of holder (possibly to nobody); bumps `leaseTransitions`, the epoch.
    Transfer {
        holder: Option<Holder>,
        transitions: i32,
    },
}

/// One pod write. Each but [`LabelWrite::Fence`] carries the resourceVersion it was decided
/// on, so a write based on a stale read is refused with 409 instead of overwriting a newer
/// decision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelWrite {
    /// Sent before a transfer replaces the Lease version `lease_version`, to the holder that
    /// version names, whether or not the cache shows that pod: role=follower (or, with
    /// `strip`, no podium label at all), epoch removed, and `podium.dev/fence` set to that
    /// version. Unconditional, and it always changes the pod's resourceVersion (the version is
    /// new to the pod), so any promote of that pod decided on an earlier read is refused. See
    /// docs/design.md, "Why one leader".
    Fence {
        pod: String,
        lease_version: String,
        strip: bool,
    },
    /// role=follower, epoch annotation removed.
    Demote {
        pod: String,
        resource_version: String,
    },
    /// Every podium label and annotation removed (strays, group deletion).
    Strip {
        pod: String,
        resource_version: String,
    },
    /// role=leader with the epoch annotation.
    Promote {
        pod: String,
        resource_version: String,
        epoch: i32,
    },
    /// role=follower on a member that lacks it.
    Follow {
        pod: String,
        resource_version: String,
    },
}

impl LabelWrite {
    pub fn pod(&self) -> &str {
        match self {
            LabelWrite::Fence { pod, .. }
            | LabelWrite::Demote { pod, .. }
            | LabelWrite::Strip { pod, .. }
            | LabelWrite::Promote { pod, .. }
            | LabelWrite::Follow { pod, .. } => pod,
        }
    }
}

/// A change of leadership, for events, metrics and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub from: Option<String>,
    pub to: Option<String>,
    /// Why the old holder lost the Lease (`PodDeleted`, `PodNotReady`, `Switchover`, ...).
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Led,
    NoEligibleMembers,
    Paused,
    LeaseConflict { owner: String },
}

/// One request of a decision, in the order [`Decision::steps`] gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step<'d> {
    Label(&'d LabelWrite),
    Lease(&'d LeaseWrite),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub lease: LeaseWrite,
    /// Apply in order, each acknowledged before the next: every leader label that must go
    /// comes off before the new one goes on (break before make).
    pub labels: Vec<LabelWrite>,
    /// How many of `labels` (the fence and the demotions) go before the Lease write; the
    /// rest (a promote, followers, strays) after it.
    pub breaks: usize,
    pub leader: Option<Holder>,
    pub epoch: i32,
    pub leader_since: Option<Timestamp>,
    pub handover: Option<Handover>,
    pub outcome: Outcome,
    pub members: i32,
    pub eligible: i32,
    /// Ineligible members with their reasons, for the NoEligibleMembers message.
    pub ineligible: Vec<(String, &'static str)>,
    /// Problems worth telling the user that do not stop the election.
    pub warnings: Vec<String>,
    /// What became of the pending switchover request, if there was one.
    pub switchover: Option<SwitchoverDecision>,
    /// When to decide again with no event to prompt it: the soonest of the renewal below, a
    /// deadline in `wake_after`, and a recheck when nobody leads.
    pub requeue_after: Duration,
    /// When the Lease this decision leaves with a holder is next due for renewal; `None` when
    /// it leaves nobody to renew for. A renewal keeps the holder and the epoch, so it may be sent
    /// without deciding again (docs/design.md, "Renewals").
    pub renew_after: Option<Duration>,
    /// The soonest moment at which time alone can change the decision (a member's
    /// `minReadySeconds` or the holder's failover delay running out); `None` when only an event
    /// can.
    pub wake_after: Option<Duration>,
}

impl Decision {
    /// The writes in the order they must be sent, each acknowledged before the next: the
    /// fence and every demotion, then the Lease, then the promote and the routine labels. A
    /// promote is only ever preceded by this decision's own Lease write (see [`decide`]).
    pub fn steps(&self) -> impl Iterator<Item = Step<'_>> {
        let breaks = self.breaks.min(self.labels.len());
        let lease = (self.lease != LeaseWrite::Keep).then_some(Step::Lease(&self.lease));
        self.labels[..breaks]
            .iter()
            .map(Step::Label)
            .chain(lease)
            .chain(self.labels[breaks..].iter().map(Step::Label))
    }
}

/// Renew at half the TTL, as the etcd recipe and client-go do: a renewal that fails can be
/// retried for another half TTL before the Lease runs out.
pub fn renew_interval(ttl_seconds: i32) -> Duration {
    Duration::from_millis(u64::try_from(ttl_seconds.max(1)).unwrap_or(1) * 500)
}

pub fn decide(obs: &Observation<'_>) -> Decision {
    let spec = obs.spec;
    let eligible: Vec<&Member> = obs
        .members
        .iter()
        .filter(|m| m.eligibility.is_eligible())
        .collect();
    let mut decision = Decision {
        lease: LeaseWrite::Keep,
        labels: Vec::new(),
        breaks: 0,
        leader: None,
        epoch: 0,
        leader_since: None,
        handover: None,
        outcome: Outcome::Led,
        members: count(obs.members.len()),
        eligible: count(eligible.len()),
        ineligible: obs
            .members
            .iter()
            .filter(|m| !m.eligibility.is_eligible())
            .map(|m| (m.name.clone(), m.eligibility.reason()))
            .collect(),
        warnings: obs
            .members
            .iter()
            .filter_map(|m| {
                m.invalid_priority.as_ref().map(|p| {
                    format!("pod {} has podium.dev/priority {p:?}, which is not an integer; it counts as 0", m.name)
                })
            })
            .collect(),
        switchover: None,
        requeue_after: renew_interval(spec.lease_duration_seconds),
        renew_after: None,
        wake_after: None,
    };

    let lease = match &obs.lease {
        LeaseState::Foreign { owner } => {
            decision.switchover = obs.switchover.map(|request| {
                SwitchoverDecision::refused(
                    request,
                    None,
                    format!(
                        "the group's Lease is not podium's ({owner}); see the Conflict condition"
                    ),
                )
            });
            decision.outcome = Outcome::LeaseConflict {
                owner: owner.clone(),
            };
            decision.requeue_after =
                Duration::from_secs(u64::try_from(spec.lease_duration_seconds).unwrap_or(15));
            return decision;
        }
        LeaseState::Absent => None,
        LeaseState::Owned(view) => Some(view),
    };
    let current = lease.and_then(|l| l.holder.as_deref());
    let transitions = lease.map_or(0, |l| l.transitions);
    let holder_member = current.and_then(|name| {
        obs.members.iter().find(|m| {
            m.name == name
                && lease
                    .and_then(|l| l.holder_uid.as_deref())
                    .is_none_or(|uid| uid == m.uid)
        })
    });

    if spec.paused {
        decision.switchover = obs.switchover.map(|request| {
            SwitchoverDecision::refused(
                request,
                current,
                "the group is paused (spec.paused): nobody new is elected".into(),
            )
        });
        decision.outcome = Outcome::Paused;
        decision.epoch = transitions;
        decision.leader = current.map(|name| Holder {
            name: name.to_string(),
            uid: holder_member.map(|m| m.uid.clone()).unwrap_or_default(),
        });
        decision.leader_since = lease.and_then(|l| l.acquire_time);
        if let Some(view) = lease.filter(|l| l.holder.is_some()) {
            let (write, requeue) = renewal(view, spec.lease_duration_seconds, obs.now);
            decision.lease = write;
            decision.requeue_after = requeue;
            decision.renew_after = Some(requeue.max(MIN_REQUEUE));
        }
        return decision;
    }

    // While some eligible pod's node is not being drained, only such pods may lead: a drain
    // then costs a planned handover before the eviction instead of a failover after it.
    let candidates: Vec<&Member> = if spec.handover_on_drain && eligible.iter().any(|m| !m.draining)
    {
        eligible.iter().copied().filter(|m| !m.draining).collect()
    } else {
        eligible.clone()
    };
    let holder_grace = holder_member.and_then(|m| failover_grace(m, spec, obs.now));
    let holder_ok = holder_grace.is_some()
        || holder_member.is_some_and(|m| candidates.iter().any(|c| std::ptr::eq(*c, m)));
    let preferred = spec
        .preferred_leader
        .as_deref()
        .and_then(|p| candidates.iter().copied().find(|m| m.name == p));
    let switch = obs.switchover.map(|request| {
        switchover::plan(
            request,
            &switchover::Facts {
                members: &obs.members,
                candidates: &candidates,
                holder: holder_member.filter(|_| holder_ok),
                current,
                preferred,
            },
        )
    });
    let switch_to = switch.as_ref().and_then(|(to, _)| *to);
    decision.switchover = switch.map(|(_, outcome)| outcome);
    let target: Option<&Member> = match (switch_to, holder_ok, preferred) {
        (Some(to), _, _) => Some(to),
        (None, true, Some(p)) => Some(p),
        (None, true, None) => holder_member,
        (None, false, _) => rank(&candidates, spec.preferred_leader.as_deref()),
    };
    let target_holder = target.map(|m| Holder {
        name: m.name.clone(),
        uid: m.uid.clone(),
    });

    let same_holder = match (lease, target) {
        (Some(l), Some(t)) => l.holder.as_deref() == Some(t.name.as_str()) && holder_ok,
        (Some(l), None) => l.holder.is_none(),
        (None, _) => false,
    };
    // Until the holder's Lease is next due: a write of ours now starts a new interval.
    let mut renewal_due = renew_interval(spec.lease_duration_seconds);
    match lease {
        None => {
            // A Lease deleted by hand must not restart the epoch: carry on from the highest
            // epoch a pod still carries or the status published, so fencing tokens keep growing.
            let seen = obs
                .members
                .iter()
                .chain(&obs.strays)
                .filter_map(|m| m.epoch.as_deref()?.trim().parse::<i32>().ok())
                .chain(obs.published_epoch)
                .max()
                .unwrap_or(0)
                .max(0);
            let epoch = seen.saturating_add(i32::from(target.is_some()));
            decision.lease = LeaseWrite::Create {
                holder: target_holder.clone(),
                transitions: epoch,
            };
            decision.epoch = epoch;
            decision.leader_since = target.map(|_| obs.now);
        }
        Some(view) if !same_holder => {
            let next = transitions.saturating_add(1);
            decision.lease = LeaseWrite::Transfer {
                holder: target_holder.clone(),
                transitions: next,
            };
            decision.epoch = next;
            decision.leader_since = target.map(|_| obs.now);
            decision.handover = Some(Handover {
                from: view.holder.clone(),
                to: target.map(|m| m.name.clone()),
                reason: loss_reason(
                    view,
                    holder_member,
                    obs,
                    switch_to.is_some() || (preferred.is_some() && holder_ok),
                ),
            });
        }
        Some(view) => {
            decision.epoch = transitions;
            decision.leader_since = view.acquire_time;
            if target.is_some() {
                let (write, requeue) = renewal(view, spec.lease_duration_seconds, obs.now);
                // A Lease from before holder UIDs were recorded gets one on its next renewal.
                decision.lease = if view.holder_uid.is_none() {
                    LeaseWrite::Renew
                } else {
                    write
                };
                decision.requeue_after = requeue;
                renewal_due = requeue;
            }
        }
    }
    if target.is_none() {
        decision.outcome = Outcome::NoEligibleMembers;
        // Nobody to renew for; look again within one TTL in case an event was missed.
        decision.requeue_after =
            Duration::from_secs(u64::try_from(spec.lease_duration_seconds).unwrap_or(15));
    }
    decision.leader = target_holder;
    // A transfer fences the holder the replaced Lease version names, seen in the cache or not.
    let fence = match (&decision.lease, lease) {
        (LeaseWrite::Transfer { .. }, Some(view)) => view
            .holder
            .as_deref()
            .map(|pod| (pod, view.version.as_deref().unwrap_or_default())),
        _ => None,
    };
    let (labels, breaks) =
        label_writes(obs, target.map(|m| m.name.as_str()), fence, decision.epoch);
    decision.labels = labels;
    decision.breaks = breaks;
    // A promote is safe only on a pod version read before a Lease write of our own that names
    // it (docs/design.md): when nothing else needs writing, that is a renewal.
    let promotes = decision
        .labels
        .iter()
        .any(|w| matches!(w, LabelWrite::Promote { .. }));
    if promotes && decision.lease == LeaseWrite::Keep {
        decision.lease = LeaseWrite::Renew;
    }
    if decision.lease != LeaseWrite::Keep {
        renewal_due = renew_interval(spec.lease_duration_seconds);
    }
    decision.renew_after = decision
        .leader
        .is_some()
        .then(|| renewal_due.max(MIN_REQUEUE));

    let soonest_eligible = obs
        .members
        .iter()
        .filter_map(|m| match m.eligibility {
            Eligibility::ReadyTooShort { remaining } => Some(remaining),
            _ => None,
        })
        .min();
    // A NotReady leader within its failover delay: look again when the delay ends.
    if let Some(remaining) = soonest_eligible.into_iter().chain(holder_grace).min() {
        decision.requeue_after = decision.requeue_after.min(remaining);
        decision.wake_after = Some(remaining.max(MIN_REQUEUE));
    }
    decision.requeue_after = decision.requeue_after.max(MIN_REQUEUE);
    decision
}

/// Whether the holder's Lease is due for renewal, and when to look next.
fn renewal(view: &LeaseView, ttl_seconds: i32, now: Timestamp) -> (LeaseWrite, Duration) {
    let interval = renew_interval(ttl_seconds);
    if view.duration_seconds != Some(ttl_seconds) {
        return (LeaseWrite::Renew, interval);
    }
    let Some(renewed) = view.renew_time else {
        return (LeaseWrite::Renew, interval);
    };
    let since = Duration::try_from(now.duration_since(renewed)).unwrap_or(Duration::ZERO);
    // A little early rather than a little late: waking up 1 ms before the deadline must not
    // schedule a 1 ms sleep followed by another reconcile.
    let slack = interval / 20;
    if since + slack >= interval {
        (LeaseWrite::Renew, interval)
    } else {
        (LeaseWrite::Keep, interval - since)
    }
}

/// How much longer a NotReady holder keeps leadership under `failoverDelaySeconds`; `None`
/// when it gets no delay (not merely NotReady, no transition time, or the delay is over).
fn failover_grace(holder: &Member, spec: &ElectionGroupSpec, now: Timestamp) -> Option<Duration> {
    if spec.failover_delay_seconds <= 0 || holder.eligibility != Eligibility::NotReady {
        return None;
    }
    let delay = Duration::from_secs(u64::try_from(spec.failover_delay_seconds).ok()?);
    let not_ready_for =
        Duration::try_from(now.duration_since(holder.not_ready_since?)).unwrap_or(Duration::ZERO);
    delay.checked_sub(not_ready_for).filter(|d| !d.is_zero())
}

/// Who leads when the holder cannot: `preferredLeader` if eligible, then the highest
/// `podium.dev/priority`, then the longest Ready, then the name, so every replica of the
/// operator and every rerun picks the same pod.
pub fn rank<'m>(eligible: &[&'m Member], preferred: Option<&str>) -> Option<&'m Member> {
    eligible.iter().copied().min_by_key(|m| {
        (
            Some(m.name.as_str()) != preferred,
            Reverse(m.priority.unwrap_or(0)),
            m.ready_since.is_none(),
            m.ready_since,
            m.name.as_str(),
        )
    })
}

fn loss_reason(
    view: &LeaseView,
    holder: Option<&Member>,
    obs: &Observation<'_>,
    switchover: bool,
) -> String {
    let Some(name) = view.holder.as_deref() else {
        return "NoLeader".into();
    };
    if switchover {
        return "Switchover".into();
    }
    if let Some(member) = holder {
        if member.eligibility.is_eligible() && member.draining {
            return "NodeDraining".into();
        }
        return member.eligibility.reason().into();
    }
    if obs.strays.iter().any(|s| s.name == name) {
        return "NoLongerSelected".into();
    }
    if obs.members.iter().any(|m| m.name == name) {
        return "PodReplaced".into();
    }
    if obs.overlaps.iter().any(|o| o.pod == name) {
        return "ClaimedByOlderGroup".into();
    }
    "PodDeleted".into()
}

/// Label writes that make the pods agree with the Lease, ordered break-before-make, and how
/// many of them (the fence and the demotions) go before the Lease write.
fn label_writes(
    obs: &Observation<'_>,
    leader: Option<&str>,
    fence: Option<(&str, &str)>,
    epoch: i32,
) -> (Vec<LabelWrite>, usize) {
    let is_leader_label = |m: &Member| m.role.as_deref() == Some(ROLE_LEADER);
    let fenced = |m: &Member| fence.is_some_and(|(pod, _)| pod == m.name);
    let mut writes = Vec::new();
    if let Some((pod, lease_version)) = fence.filter(|(pod, _)| Some(*pod) != leader) {
        writes.push(LabelWrite::Fence {
            pod: pod.to_string(),
            lease_version: lease_version.to_string(),
            strip: obs.strays.iter().any(|s| s.name == pod),
        });
    }
    for m in obs
        .members
        .iter()
        .filter(|m| is_leader_label(m) && !fenced(m) && Some(m.name.as_str()) != leader)
    {
        writes.push(LabelWrite::Demote {
            pod: m.name.clone(),
            resource_version: m.resource_version.clone(),
        });
    }
    for s in obs
        .strays
        .iter()
        .filter(|s| is_leader_label(s) && !fenced(s))
    {
        writes.push(LabelWrite::Strip {
            pod: s.name.clone(),
            resource_version: s.resource_version.clone(),
        });
    }
    let breaks = writes.len();
    if let Some(m) = leader.and_then(|name| obs.members.iter().find(|m| m.name == name)) {
        let epoch_text = epoch.to_string();
        if !is_leader_label(m)
            || m.epoch.as_deref() != Some(epoch_text.as_str())
            || m.group.as_deref() != Some(obs.group)
        {
            writes.push(LabelWrite::Promote {
                pod: m.name.clone(),
                resource_version: m.resource_version.clone(),
                epoch,
            });
        }
    }
    for m in &obs.members {
        let needs_follow = Some(m.name.as_str()) != leader
            && !is_leader_label(m)
            && !fenced(m)
            && m.eligibility != Eligibility::Terminating
            && (m.role.as_deref() != Some(ROLE_FOLLOWER)
                || m.group.as_deref() != Some(obs.group)
                || m.epoch.is_some());
        if needs_follow {
            writes.push(LabelWrite::Follow {
                pod: m.name.clone(),
                resource_version: m.resource_version.clone(),
            });
        }
    }
    for s in obs
        .strays
        .iter()
        .filter(|s| !is_leader_label(s) && !fenced(s))
    {
        writes.push(LabelWrite::Strip {
            pod: s.name.clone(),
            resource_version: s.resource_version.clone(),
        });
    }
    (writes, breaks)
}

/// What removing a deleted group from its pods takes, in order: `fences`, then deleting the
/// Lease, then `strips`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleanup {
    /// Every pod that may lead or be about to: unconditional, so that no promote decided on an
    /// earlier read lands after the cleanup.
    pub fences: Vec<LabelWrite>,
    /// Every other pod with a trace of podium, conditional as usual.
    pub strips: Vec<LabelWrite>,
}

/// The writes that remove every trace of podium from a deleted group's pods. `may_lead` names
/// the pods the Lease, the status or anything else says lead (they need not be cached);
/// `fence_version` is the Lease resourceVersion about to be deleted (or, without a Lease, any
/// other version no pod can carry yet, such as the group's).
pub fn cleanup_writes(pods: &[Member], may_lead: &[&str], fence_version: &str) -> Cleanup {
    let leads = |m: &Member| m.role.as_deref() == Some(ROLE_LEADER);
    let mut fenced: Vec<&str> = may_lead.to_vec();
    fenced.extend(pods.iter().filter(|m| leads(m)).map(|m| m.name.as_str()));
    fenced.sort_unstable();
    fenced.dedup();
    let fences = fenced
        .iter()
        .map(|pod| LabelWrite::Fence {
            pod: (*pod).to_string(),
            lease_version: fence_version.to_string(),
            strip: true,
        })
        .collect();
    let strips = pods
        .iter()
        .filter(|m| !fenced.contains(&m.name.as_str()))
        .filter(|m| m.role.is_some() || m.epoch.is_some() || m.group.is_some())
        .map(|m| LabelWrite::Strip {
            pod: m.name.clone(),
            resource_version: m.resource_version.clone(),
        })
        .collect();
    Cleanup { fences, strips }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests;
