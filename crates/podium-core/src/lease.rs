//! The group's `coordination.k8s.io/v1` Lease as the core sees it: the view read from it, and
//! the object a decision turns it into. The operator sends that object as a conditional write.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::{Resource, ResourceExt};

use crate::crd::{ElectionGroup, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::election::{Holder, LeaseState, LeaseView, LeaseWrite};

/// Annotation on the Lease recording the holder pod's UID, so a pod recreated under the same
/// name is recognised as a new term.
pub const HOLDER_UID_ANNOTATION: &str = "podium.dev/holder-uid";

/// Classifies a Lease found under the group's name. Podium owns it when it names the group as
/// controller; a Lease podium created for an earlier group of the same name is adopted.
pub fn state(group: &ElectionGroup, lease: Option<&Lease>) -> LeaseState {
    let Some(lease) = lease else {
        return LeaseState::Absent;
    };
    let owners = lease.owner_references();
    let owned_by_this = group
        .uid()
        .is_some_and(|uid| owners.iter().any(|o| o.uid == uid));
    let ours_by_name = lease.labels().get(MANAGED_BY_LABEL).map(String::as_str)
        == Some(MANAGED_BY_VALUE)
        && owners
            .iter()
            .any(|o| o.kind == "ElectionGroup" && o.name == group.name_any());
    if !(owned_by_this || ours_by_name) {
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let owner = match owners.first() {
            Some(o) => format!(
                "Lease {} is owned by {} {}",
                lease.name_any(),
                o.kind,
                o.name
            ),
            None if holder.is_empty() => format!("Lease {} has no owner", lease.name_any()),
            None => format!(
                "Lease {} is held by {holder:?} and has no owner",
                lease.name_any()
            ),
        };
        return LeaseState::Foreign { owner };
    }
    LeaseState::Owned(view(lease))
}

pub fn view(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        holder_uid: lease
            .annotations()
            .get(HOLDER_UID_ANNOTATION)
            .cloned()
            .filter(|u| !u.is_empty()),
        transitions: spec.lease_transitions.unwrap_or(0),
        acquire_time: spec.acquire_time.map(|t| t.0),
        renew_time: spec.renew_time.map(|t| t.0),
        duration_seconds: spec.lease_duration_seconds,
        version: lease.metadata.resource_version.clone(),
    }
}

/// The Lease object after `write`, starting from what was read (`current`).
pub fn desired(
    group: &ElectionGroup,
    current: Option<&Lease>,
    write: &LeaseWrite,
    now: Timestamp,
) -> Option<Lease> {
    let ttl = group.spec.lease_duration_seconds;
    let (holder, transitions, acquired): (Option<&Holder>, Option<i32>, bool) = match write {
        LeaseWrite::Keep => return None,
        LeaseWrite::Renew => (None, None, false),
        LeaseWrite::Create {
            holder,
            transitions,
        }
        | LeaseWrite::Transfer {
            holder,
            transitions,
        } => (holder.as_ref(), Some(*transitions), true),
    };
    let mut lease = current.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(group.name_any()),
            namespace: group.namespace(),
            ..Default::default()
        },
        spec: Some(LeaseSpec::default()),
    });
    lease.metadata.managed_fields = None;
    lease.metadata.owner_references = group.controller_owner_ref(&()).map(|o| vec![o]);
    lease
        .labels_mut()
        .insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.lease_duration_seconds = Some(ttl);
    if acquired {
        spec.holder_identity = holder.map(|h| h.name.clone());
        spec.lease_transitions = transitions;
        spec.acquire_time = holder.map(|_| MicroTime(now));
        spec.renew_time = holder.map(|_| MicroTime(now));
        match holder {
            Some(h) => lease
                .annotations_mut()
                .insert(HOLDER_UID_ANNOTATION.into(), h.uid.clone()),
            None => lease.annotations_mut().remove(HOLDER_UID_ANNOTATION),
        };
    } else {
        spec.renew_time = Some(MicroTime(now));
        // Record the holder's UID on Leases written before podium tracked it, but only the UID
        // the status gives for that same holder: after a hand edit of the holder the status
        // still names the previous leader, whose UID would turn the new holder into a stranger.
        if !lease.annotations().contains_key(HOLDER_UID_ANNOTATION)
            && let Some(uid) = group
                .status
                .as_ref()
                .filter(|s| s.leader.is_some() && s.leader == spec.holder_identity)
                .and_then(|s| s.leader_uid.clone())
        {
            lease
                .annotations_mut()
                .insert(HOLDER_UID_ANNOTATION.into(), uid);
        }
    }
    lease.spec = Some(spec);
    Some(lease)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::ElectionGroupSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};

    /// The group `ns/web` (uid `g-uid`) selecting every pod; also for [`crate::renewal`]'s tests.
    pub(crate) fn group() -> ElectionGroup {
        let mut g = ElectionGroup::new(
            "web",
            ElectionGroupSpec::selecting(LabelSelector::default()),
        );
        g.metadata.namespace = Some("ns".into());
        g.metadata.uid = Some("g-uid".into());
        g
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    #[test]
    fn a_new_lease_is_owned_labelled_and_names_the_holder() {
        let g = group();
        let write = LeaseWrite::Create {
            holder: Some(Holder {
                name: "p".into(),
                uid: "u".into(),
            }),
            transitions: 1,
        };
        let lease = desired(&g, None, &write, now()).unwrap();
        assert_eq!(state(&g, Some(&lease)), LeaseState::Owned(view(&lease)));
        let v = view(&lease);
        assert_eq!(
            (v.holder.as_deref(), v.holder_uid.as_deref(), v.transitions),
            (Some("p"), Some("u"), 1)
        );
        assert_eq!(v.duration_seconds, Some(15));
        assert_eq!(lease.owner_references()[0].uid, "g-uid");
        assert_eq!(lease.labels()[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
    }

    #[test]
    fn renew_keeps_holder_and_epoch_and_carries_the_resource_version() {
        let g = group();
        let create = LeaseWrite::Create {
            holder: Some(Holder {
                name: "p".into(),
                uid: "u".into(),
            }),
            transitions: 3,
        };
        let mut read = desired(&g, None, &create, now()).unwrap();
        read.metadata.resource_version = Some("42".into());
        let renewed = desired(
            &g,
            Some(&read),
            &LeaseWrite::Renew,
            now() + jiff::SignedDuration::from_secs(5),
        )
        .unwrap();
        assert_eq!(renewed.metadata.resource_version.as_deref(), Some("42"));
        let (a, b) = (view(&read), view(&renewed));
        assert_eq!(
            (b.holder, b.transitions, b.acquire_time),
            (a.holder, a.transitions, a.acquire_time)
        );
        assert!(b.renew_time > a.renew_time);
    }

    #[test]
    fn a_lease_owned_by_someone_else_is_foreign() {
        let g = group();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("web".into()),
                owner_references: Some(vec![OwnerReference {
                    kind: "Deployment".into(),
                    name: "other".into(),
                    uid: "x".into(),
                    api_version: "apps/v1".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("someone".into()),
                ..Default::default()
            }),
        };
        match state(&g, Some(&lease)) {
            LeaseState::Foreign { owner } => assert!(owner.contains("Deployment other"), "{owner}"),
            other => panic!("expected Foreign, got {other:?}"),
        }
        let bare = Lease {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            spec: None,
        };
        assert!(matches!(state(&g, Some(&bare)), LeaseState::Foreign { .. }));
    }

    #[test]
    fn renewal_records_the_status_uid_only_for_the_same_holder() {
        let mut g = group();
        g.status = Some(crate::crd::ElectionGroupStatus {
            leader: Some("old".into()),
            leader_uid: Some("old-uid".into()),
            ..Default::default()
        });
        // A human pointed the Lease at "new" and dropped the UID annotation.
        let edited = Lease {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("new".into()),
                ..Default::default()
            }),
        };
        let renewed = desired(&g, Some(&edited), &LeaseWrite::Renew, now()).unwrap();
        assert_eq!(view(&renewed).holder_uid, None);
        g.status.as_mut().unwrap().leader = Some("new".into());
        g.status.as_mut().unwrap().leader_uid = Some("new-uid".into());
        let renewed = desired(&g, Some(&edited), &LeaseWrite::Renew, now()).unwrap();
        assert_eq!(view(&renewed).holder_uid.as_deref(), Some("new-uid"));
    }

    #[test]
    fn clearing_the_holder_bumps_the_epoch_and_drops_the_uid() {
        let g = group();
        let create = LeaseWrite::Create {
            holder: Some(Holder {
                name: "p".into(),
                uid: "u".into(),
            }),
            transitions: 1,
        };
        let read = desired(&g, None, &create, now()).unwrap();
        let cleared = desired(
            &g,
            Some(&read),
            &LeaseWrite::Transfer {
                holder: None,
                transitions: 2,
            },
            now(),
        )
        .unwrap();
        let v = view(&cleared);
        assert_eq!((v.holder, v.holder_uid, v.transitions), (None, None, 2));
    }
}
