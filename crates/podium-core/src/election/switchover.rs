//! A one-shot switchover: which pod a pending request hands over to, or why it is refused.
//!
//! A request is carried out at most once: its outcome goes into the status with its id, and a
//! request whose id the status holds is no longer pending. Until then every reconcile plans it
//! again from what it sees, so a reconcile that failed half-way is finished by the next one:
//! a targeted request is done once its target leads, an untargeted one once the leader it was
//! made against no longer does.

use super::Member;
use crate::crd::SwitchoverRequest;
use crate::crd::switchover_results::{REFUSED, SUCCEEDED};

/// What became of a request, for the status and an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchoverDecision {
    pub request: SwitchoverRequest,
    pub result: SwitchoverResult,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchoverResult {
    Succeeded { message: String },
    Refused { reason: String },
}

impl SwitchoverResult {
    /// The status's `result` field.
    pub fn name(&self) -> &'static str {
        match self {
            SwitchoverResult::Succeeded { .. } => SUCCEEDED,
            SwitchoverResult::Refused { .. } => REFUSED,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            SwitchoverResult::Succeeded { message } => message,
            SwitchoverResult::Refused { reason } => reason,
        }
    }
}

impl SwitchoverDecision {
    pub fn refused(request: &SwitchoverRequest, current: Option<&str>, reason: String) -> Self {
        SwitchoverDecision {
            request: request.clone(),
            result: SwitchoverResult::Refused { reason },
            from: current.map(str::to_string),
            to: None,
        }
    }

    fn succeeded(
        request: &SwitchoverRequest,
        from: Option<&str>,
        to: &str,
        message: String,
    ) -> Self {
        SwitchoverDecision {
            request: request.clone(),
            result: SwitchoverResult::Succeeded { message },
            from: from.map(str::to_string),
            to: Some(to.to_string()),
        }
    }
}

/// What [`plan`] looks at, from [`super::decide`].
pub struct Facts<'m, 'c> {
    pub members: &'m [Member],
    /// The pods that may lead now (eligible, and off draining nodes where possible).
    pub candidates: &'c [&'m Member],
    /// The member that holds the Lease, if it may keep leading.
    pub holder: Option<&'m Member>,
    /// The Lease's holder by name, whether or not it is a member.
    pub current: Option<&'c str>,
    /// `spec.preferredLeader`, when it names a candidate: it would take leadership back.
    pub preferred: Option<&'m Member>,
}

/// The pod to hand over to (`None`: no handover for this request) and the outcome to record.
pub fn plan<'m>(
    request: &SwitchoverRequest,
    facts: &Facts<'m, '_>,
) -> (Option<&'m Member>, SwitchoverDecision) {
    let current = facts.current;
    let refuse = |reason: String| (None, SwitchoverDecision::refused(request, current, reason));
    match request.to.as_deref() {
        Some(to) => {
            if let Some(p) = facts.preferred.filter(|p| p.name != to) {
                return refuse(preferred_in_force(&p.name));
            }
            if facts.holder.is_some_and(|h| h.name == to) {
                let done = SwitchoverDecision::succeeded(
                    request,
                    request.from.as_deref().or(current),
                    to,
                    format!("pod {to} leads"),
                );
                return (None, done);
            }
            let Some(target) = facts.members.iter().find(|m| m.name == to) else {
                return refuse(format!(
                    "pod {to} is not a member of this group: the selector does not match it, it \
                     does not exist, or an older group claims it"
                ));
            };
            if !target.eligibility.is_eligible() {
                return refuse(format!(
                    "pod {to} is not eligible: {}",
                    target.eligibility.reason()
                ));
            }
            if !facts.candidates.iter().any(|c| c.name == to) {
                return refuse(format!(
                    "pod {to} is on a node that is being drained (cordoned or tainted); pick a \
                     pod on another node"
                ));
            }
            let planned = SwitchoverDecision::succeeded(
                request,
                current,
                to,
                format!("handed over to pod {to}"),
            );
            (Some(target), planned)
        }
        None => {
            let Some(leader) = current else {
                return refuse("no pod leads, so there is nothing to switch over from".into());
            };
            if request.from.as_deref().is_some_and(|from| from != leader) {
                let from = request.from.as_deref().unwrap_or_default();
                let done = SwitchoverDecision::succeeded(
                    request,
                    Some(from),
                    leader,
                    format!("leadership moved from pod {from} to pod {leader}"),
                );
                return (None, done);
            }
            if let Some(p) = facts.preferred.filter(|p| p.name == leader) {
                return refuse(preferred_in_force(&p.name));
            }
            let others: Vec<&Member> = facts
                .candidates
                .iter()
                .copied()
                .filter(|m| m.name != leader)
                .collect();
            match super::rank(&others, facts.preferred.map(|p| p.name.as_str())) {
                Some(next) => {
                    let planned = SwitchoverDecision::succeeded(
                        request,
                        Some(leader),
                        &next.name,
                        format!("handed over to pod {}", next.name),
                    );
                    (Some(next), planned)
                }
                None => refuse(format!(
                    "no other member is eligible to take over from pod {leader}"
                )),
            }
        }
    }
}

fn preferred_in_force(preferred: &str) -> String {
    format!(
        "spec.preferredLeader names pod {preferred}, which would take leadership back at once; \
         change or clear spec.preferredLeader instead"
    )
}
