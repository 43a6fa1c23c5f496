//! A routine renewal sent without deciding again. Once a reconcile has decided to keep a holder,
//! the operator's renewer renews that holder's Lease each half TTL from the freshest copy it
//! has, instead of running the whole reconcile for a write that changes only `renewTime`.
//!
//! A renewal keeps the holder and the epoch and replaces exactly the version it read, so the
//! server either accepts it, which changes nothing but `renewTime` and the resourceVersion, or
//! refuses it with a 409. Anything else the renewer cannot vouch for goes back to a reconcile
//! (docs/design.md, "Renewals").

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Resource, ResourceExt};

use crate::crd::ElectionGroup;
use crate::election::{Holder, LeaseState, LeaseWrite};
use crate::lease;

/// What a reconcile handed to the renewer: the holder it kept and the epoch it kept it at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub holder: Holder,
    pub epoch: i32,
}

#[derive(Debug, PartialEq)]
pub enum Next {
    /// Send this Lease: a replace conditional on the resourceVersion it carries.
    Send(Box<Lease>),
    /// The renewer may not renew; the group must be decided again. The reason is for the log.
    Decide(&'static str),
}

/// The renewal of `holding`, given the group and the freshest Lease the operator has.
pub fn next(
    group: Option<&ElectionGroup>,
    lease: Option<&Lease>,
    holding: &Holding,
    now: Timestamp,
) -> Next {
    let Some(group) = group else {
        return Next::Decide("the group is gone");
    };
    if group.meta().deletion_timestamp.is_some() {
        return Next::Decide("the group is being deleted");
    }
    let view = match lease::state(group, lease) {
        LeaseState::Owned(view) => view,
        LeaseState::Absent => return Next::Decide("the Lease is gone"),
        LeaseState::Foreign { .. } => return Next::Decide("the Lease is not podium's"),
    };
    if view.holder.as_deref() != Some(holding.holder.name.as_str())
        || view.transitions != holding.epoch
    {
        return Next::Decide("the Lease names another holder or epoch");
    }
    match view.holder_uid.as_deref() {
        None => return Next::Decide("the Lease does not record the holder's UID"),
        Some(uid) if !holding.holder.uid.is_empty() && uid != holding.holder.uid => {
            return Next::Decide("the Lease names another pod of the holder's name");
        }
        Some(_) => {}
    }
    // Without a version to compare against, a replace would overwrite whatever is there.
    if lease.and_then(|l| l.resource_version()).is_none() {
        return Next::Decide("the Lease has no resourceVersion");
    }
    match lease::desired(group, lease, &LeaseWrite::Renew, now) {
        Some(renewed) => Next::Send(Box::new(renewed)),
        None => Next::Decide("nothing to renew"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::tests::group;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn t(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    fn holding() -> Holding {
        Holding {
            holder: Holder {
                name: "p".into(),
                uid: "p-uid".into(),
            },
            epoch: 3,
        }
    }

    /// The Lease a reconcile wrote for `holding()`, as the server answered it.
    fn written() -> Lease {
        let h = holding();
        let create = LeaseWrite::Create {
            holder: Some(h.holder),
            transitions: h.epoch,
        };
        let mut lease = lease::desired(&group(), None, &create, t(0)).unwrap();
        lease.metadata.resource_version = Some("42".into());
        lease
    }

    #[test]
    fn the_kept_holder_is_renewed_conditionally_with_nothing_else_changed() {
        let Next::Send(renewed) = next(Some(&group()), Some(&written()), &holding(), t(7)) else {
            panic!("expected a renewal");
        };
        assert_eq!(renewed.metadata.resource_version.as_deref(), Some("42"));
        let (before, after) = (lease::view(&written()), lease::view(&renewed));
        assert_eq!(
            (&after.holder, &after.holder_uid, after.transitions),
            (&before.holder, &before.holder_uid, before.transitions)
        );
        assert_eq!(after.acquire_time, before.acquire_time);
        assert_eq!(after.renew_time, Some(t(7)));
    }

    #[test]
    fn anything_the_renewer_cannot_vouch_for_goes_back_to_a_reconcile() {
        let g = group();
        let lease = written();
        let decide = |group: Option<&ElectionGroup>, lease: Option<&Lease>, holding: &Holding| {
            matches!(next(group, lease, holding, t(7)), Next::Decide(_))
        };
        assert!(decide(None, Some(&lease), &holding()), "group gone");
        let mut deleting = g.clone();
        deleting.metadata.deletion_timestamp = Some(Time(t(5)));
        assert!(
            decide(Some(&deleting), Some(&lease), &holding()),
            "deleting"
        );
        assert!(decide(Some(&g), None, &holding()), "Lease gone");

        let mut other_group = g.clone();
        other_group.metadata.uid = Some("another-uid".into());
        other_group.metadata.name = Some("other".into());
        assert!(
            decide(Some(&other_group), Some(&lease), &holding()),
            "foreign"
        );

        let mut moved = holding();
        moved.epoch = 4;
        assert!(decide(Some(&g), Some(&lease), &moved), "another epoch");
        let mut other_holder = holding();
        other_holder.holder.name = "q".into();
        assert!(
            decide(Some(&g), Some(&lease), &other_holder),
            "another holder"
        );
        let mut recreated = holding();
        recreated.holder.uid = "new-uid".into();
        assert!(
            decide(Some(&g), Some(&lease), &recreated),
            "same name, new pod"
        );

        let mut no_uid = lease.clone();
        no_uid
            .annotations_mut()
            .remove(lease::HOLDER_UID_ANNOTATION);
        assert!(
            decide(Some(&g), Some(&no_uid), &holding()),
            "no UID recorded"
        );
        let mut unversioned = lease.clone();
        unversioned.metadata.resource_version = None;
        assert!(
            decide(Some(&g), Some(&unversioned), &holding()),
            "no version"
        );
    }

    #[test]
    fn a_holder_kept_without_a_known_uid_is_renewed_by_name_and_epoch() {
        // A paused group keeps a holder that is no longer a member; the decision knows no UID.
        let mut anonymous = holding();
        anonymous.holder.uid = String::new();
        assert!(matches!(
            next(Some(&group()), Some(&written()), &anonymous, t(7)),
            Next::Send(_)
        ));
    }
}
