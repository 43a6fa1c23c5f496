use super::*;
use crate::crd::{ElectionGroupStatus, ROLE_LEADER, SwitchoverRequest};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;

const GROUP: &str = "web";

fn spec() -> ElectionGroupSpec {
    ElectionGroupSpec {
        lease_duration_seconds: 10,
        ..ElectionGroupSpec::selecting(LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            ..Default::default()
        })
    }
}

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).unwrap()
}

/// A Ready member, Ready since `ready_at`, unlabelled.
fn member(name: &str, ready_at: i64) -> Member {
    Member {
        name: name.into(),
        uid: format!("uid-{name}"),
        resource_version: format!("rv-{name}"),
        eligibility: Eligibility::Eligible,
        ready_since: Some(t(ready_at)),
        not_ready_since: None,
        draining: false,
        priority: None,
        invalid_priority: None,
        role: None,
        epoch: None,
        group: None,
    }
}

fn labelled(mut m: Member, role: &str, epoch: Option<i32>) -> Member {
    m.role = Some(role.into());
    m.epoch = epoch.map(|e| e.to_string());
    m.group = Some(GROUP.into());
    m
}

fn lease(holder: Option<&str>, transitions: i32, renewed: i64) -> LeaseState {
    LeaseState::Owned(LeaseView {
        holder: holder.map(String::from),
        holder_uid: holder.map(|h| format!("uid-{h}")),
        transitions,
        acquire_time: Some(t(0)),
        renew_time: Some(t(renewed)),
        duration_seconds: Some(10),
        version: Some(format!("lease-{transitions}")),
    })
}

fn observe<'a>(
    spec: &'a ElectionGroupSpec,
    members: Vec<Member>,
    lease: LeaseState,
    now: i64,
) -> Observation<'a> {
    Observation {
        now: t(now),
        group: GROUP,
        spec,
        members,
        strays: vec![],
        lease,
        overlaps: vec![],
        published_epoch: None,
        switchover: None,
    }
}

fn promote(pod: &str, epoch: i32) -> LabelWrite {
    LabelWrite::Promote {
        pod: pod.into(),
        resource_version: format!("rv-{pod}"),
        epoch,
    }
}
fn demote(pod: &str) -> LabelWrite {
    LabelWrite::Demote {
        pod: pod.into(),
        resource_version: format!("rv-{pod}"),
    }
}
fn fence(pod: &str, transitions: i32) -> LabelWrite {
    LabelWrite::Fence {
        pod: pod.into(),
        lease_version: format!("lease-{transitions}"),
        strip: false,
    }
}
fn follow(pod: &str) -> LabelWrite {
    LabelWrite::Follow {
        pod: pod.into(),
        resource_version: format!("rv-{pod}"),
    }
}
fn holder(name: &str) -> Option<Holder> {
    Some(Holder {
        name: name.into(),
        uid: format!("uid-{name}"),
    })
}

#[test]
fn first_election_creates_the_lease_for_the_longest_ready_pod() {
    let s = spec();
    let d = decide(&observe(
        &s,
        vec![member("b", 5), member("a", 9), member("c", 1)],
        LeaseState::Absent,
        20,
    ));
    assert_eq!(
        d.lease,
        LeaseWrite::Create {
            holder: holder("c"),
            transitions: 1
        }
    );
    assert_eq!(d.epoch, 1);
    assert_eq!(d.labels, vec![promote("c", 1), follow("b"), follow("a")]);
    assert_eq!(d.outcome, Outcome::Led);
    assert_eq!((d.members, d.eligible), (3, 3));
}

#[test]
fn a_healthy_holder_is_kept_without_writes_until_renewal_is_due() {
    let s = spec();
    let members = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(4)),
        labelled(member("b", 0), ROLE_FOLLOWER, None),
    ];
    let d = decide(&observe(&s, members.clone(), lease(Some("a"), 4, 100), 102));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert!(d.labels.is_empty(), "{:?}", d.labels);
    assert_eq!(d.requeue_after, Duration::from_secs(3));
    assert_eq!(d.renew_after, Some(Duration::from_secs(3)));
    assert_eq!(d.wake_after, None);
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 105));
    assert_eq!(d.lease, LeaseWrite::Renew);
    assert_eq!(d.requeue_after, Duration::from_secs(5));
    assert_eq!(d.renew_after, Some(Duration::from_secs(5)));
}

#[test]
fn an_expired_lease_with_an_eligible_holder_is_renewed_not_failed_over() {
    let s = spec();
    let members = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(4)),
        labelled(member("b", 0), ROLE_FOLLOWER, None),
    ];
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 500));
    assert_eq!(d.lease, LeaseWrite::Renew);
    assert_eq!(d.epoch, 4);
    assert!(d.handover.is_none());
}

#[test]
fn terminating_holder_fails_over_break_before_make() {
    let s = spec();
    let mut a = labelled(member("a", 0), ROLE_LEADER, Some(4));
    a.eligibility = Eligibility::Terminating;
    let members = vec![
        a,
        labelled(member("b", 3), ROLE_FOLLOWER, None),
        labelled(member("c", 2), ROLE_FOLLOWER, None),
    ];
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 101));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: holder("c"),
            transitions: 5
        }
    );
    assert_eq!(d.labels, vec![fence("a", 4), promote("c", 5)]);
    assert_eq!(d.breaks, 1);
    assert_eq!(
        d.handover.as_ref().map(|h| h.reason.as_str()),
        Some("PodTerminating")
    );
}

#[test]
fn deleted_holder_fails_over_with_reason() {
    let s = spec();
    let members = vec![labelled(member("b", 3), ROLE_FOLLOWER, None)];
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 101));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: holder("b"),
            transitions: 5
        }
    );
    // The deleted holder is fenced too: a cache that no longer shows a pod proves nothing.
    assert_eq!(d.labels, vec![fence("a", 4), promote("b", 5)]);
    let h = d.handover.unwrap();
    assert_eq!(
        (h.from.as_deref(), h.to.as_deref(), h.reason.as_str()),
        (Some("a"), Some("b"), "PodDeleted")
    );
}

#[test]
fn not_ready_holder_and_node_not_ready_holder_fail_over() {
    let s = spec();
    for why in [
        Eligibility::NotReady,
        Eligibility::NodeNotReady,
        Eligibility::NotRunning,
    ] {
        let mut a = labelled(member("a", 0), ROLE_LEADER, Some(1));
        a.eligibility = why.clone();
        let d = decide(&observe(
            &s,
            vec![a, member("b", 1)],
            lease(Some("a"), 1, 100),
            101,
        ));
        assert_eq!(d.leader, holder("b"), "{why:?}");
        assert_eq!(d.labels[0], fence("a", 1));
        assert_eq!(d.handover.unwrap().reason, why.reason());
    }
}

#[test]
fn nobody_eligible_clears_the_holder_and_every_leader_label() {
    let s = spec();
    let mut a = labelled(member("a", 0), ROLE_LEADER, Some(2));
    a.eligibility = Eligibility::NotReady;
    let mut b = member("b", 0);
    b.eligibility = Eligibility::NotRunning;
    let d = decide(&observe(&s, vec![a, b], lease(Some("a"), 2, 100), 101));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: None,
            transitions: 3
        }
    );
    assert_eq!(d.outcome, Outcome::NoEligibleMembers);
    assert_eq!(d.leader, None);
    assert_eq!(d.labels, vec![fence("a", 2), follow("b")]);
    // And once someone is eligible again, it is elected at the next epoch.
    let d = decide(&observe(
        &s,
        vec![member("b", 200)],
        lease(None, 3, 101),
        300,
    ));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: holder("b"),
            transitions: 4
        }
    );
}

#[test]
fn an_empty_lease_with_nobody_eligible_is_left_alone() {
    let s = spec();
    let mut b = member("b", 0);
    b.eligibility = Eligibility::NotReady;
    let d = decide(&observe(
        &s,
        vec![labelled(b, ROLE_FOLLOWER, None)],
        lease(None, 3, 100),
        500,
    ));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert!(d.labels.is_empty());
    assert_eq!(d.requeue_after, Duration::from_secs(10));
    assert_eq!(d.renew_after, None, "nobody to renew for");
}

#[test]
fn paused_renews_the_holder_even_if_ineligible_and_changes_no_label() {
    let mut s = spec();
    s.paused = true;
    let mut a = labelled(member("a", 0), ROLE_LEADER, Some(2));
    a.eligibility = Eligibility::NotReady;
    let d = decide(&observe(
        &s,
        vec![
            a,
            member("b", 0),
            labelled(member("c", 0), ROLE_LEADER, None),
        ],
        lease(Some("a"), 2, 100),
        106,
    ));
    assert_eq!(d.lease, LeaseWrite::Renew);
    assert!(d.labels.is_empty());
    assert_eq!(d.outcome, Outcome::Paused);
    assert_eq!(d.leader.map(|h| h.name), Some("a".into()));
    // Paused with no Lease: nothing is created.
    let d = decide(&observe(&s, vec![member("b", 0)], LeaseState::Absent, 106));
    assert_eq!(d.lease, LeaseWrite::Keep);
}

#[test]
fn preferred_leader_takes_over_when_eligible_and_only_then() {
    let mut s = spec();
    s.preferred_leader = Some("b".into());
    let members = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(2)),
        labelled(member("b", 50), ROLE_FOLLOWER, None),
    ];
    let d = decide(&observe(&s, members.clone(), lease(Some("a"), 2, 100), 101));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: holder("b"),
            transitions: 3
        }
    );
    assert_eq!(d.labels, vec![fence("a", 2), promote("b", 3)]);
    assert_eq!(d.handover.unwrap().reason, "Switchover");

    let mut not_ready = members;
    not_ready[1].eligibility = Eligibility::NotReady;
    let d = decide(&observe(&s, not_ready, lease(Some("a"), 2, 100), 101));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert_eq!(d.leader, holder("a"));
}

#[test]
fn a_returning_pod_does_not_take_leadership_back() {
    let s = spec();
    // "a" was leader, failed over to "b", and is Ready again (and was Ready earlier than b).
    let members = vec![
        labelled(member("a", 1), ROLE_FOLLOWER, None),
        labelled(member("b", 50), ROLE_LEADER, Some(3)),
    ];
    let d = decide(&observe(&s, members, lease(Some("b"), 3, 100), 101));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert_eq!(d.leader, holder("b"));
    assert!(d.labels.is_empty());
}

#[test]
fn a_hand_labelled_second_leader_is_demoted_and_the_holder_keeps_its_label() {
    let s = spec();
    let members = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(2)),
        labelled(member("b", 0), ROLE_LEADER, None),
    ];
    let d = decide(&observe(&s, members, lease(Some("a"), 2, 100), 101));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert_eq!(d.labels, vec![demote("b")]);
}

#[test]
fn after_a_crash_labels_converge_from_the_lease_stripping_first() {
    let s = spec();
    // The Lease names b at epoch 5, but the crash happened before a was unlabelled.
    let members = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(4)),
        labelled(member("b", 0), ROLE_FOLLOWER, None),
    ];
    let d = decide(&observe(&s, members, lease(Some("b"), 5, 100), 101));
    // The promote needs a Lease write of this decision's own, after the demotion.
    assert_eq!(d.lease, LeaseWrite::Renew);
    assert_eq!(d.labels, vec![demote("a"), promote("b", 5)]);
    assert_eq!(d.breaks, 1);
}

#[test]
fn priority_beats_readiness_age_and_bad_priorities_are_reported() {
    let s = spec();
    let mut young = member("young", 90);
    young.priority = Some(10);
    let mut bad = member("bad", 0);
    bad.invalid_priority = Some("high".into());
    let d = decide(&observe(
        &s,
        vec![member("old", 1), young, bad],
        LeaseState::Absent,
        100,
    ));
    assert_eq!(d.leader, holder("young"));
    assert_eq!(d.warnings.len(), 1);
    assert!(d.warnings[0].contains("bad") && d.warnings[0].contains("high"));
}

#[test]
fn ties_break_by_name() {
    let s = spec();
    let d = decide(&observe(
        &s,
        vec![member("b", 5), member("a", 5)],
        LeaseState::Absent,
        100,
    ));
    assert_eq!(d.leader, holder("a"));
}

#[test]
fn a_recreated_pod_with_the_holders_name_is_a_new_term() {
    let s = spec();
    let mut a = member("a", 90);
    a.uid = "uid-a-2".into();
    let d = decide(&observe(&s, vec![a], lease(Some("a"), 7, 100), 101));
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: Some(Holder {
                name: "a".into(),
                uid: "uid-a-2".into()
            }),
            transitions: 8
        }
    );
    assert_eq!(d.handover.unwrap().reason, "PodReplaced");
}

#[test]
fn a_foreign_lease_is_never_touched() {
    let s = spec();
    let members = vec![labelled(member("a", 0), ROLE_LEADER, Some(1))];
    let d = decide(&observe(
        &s,
        members,
        LeaseState::Foreign {
            owner: "someone".into(),
        },
        101,
    ));
    assert_eq!(d.lease, LeaseWrite::Keep);
    assert!(d.labels.is_empty());
    assert_eq!(
        d.outcome,
        Outcome::LeaseConflict {
            owner: "someone".into()
        }
    );
}

#[test]
fn a_stray_leader_is_stripped_before_anyone_is_promoted() {
    let s = spec();
    let mut obs = observe(&s, vec![member("b", 0)], lease(Some("a"), 1, 100), 101);
    obs.strays = vec![
        labelled(member("a", 0), ROLE_LEADER, Some(1)),
        labelled(member("z", 0), ROLE_FOLLOWER, None),
    ];
    let d = decide(&obs);
    assert_eq!(d.handover.as_ref().unwrap().reason, "NoLongerSelected");
    assert_eq!(
        d.labels,
        vec![
            LabelWrite::Fence {
                pod: "a".into(),
                lease_version: "lease-1".into(),
                strip: true,
            },
            promote("b", 2),
            LabelWrite::Strip {
                pod: "z".into(),
                resource_version: "rv-z".into()
            },
        ]
    );
}

#[test]
fn min_ready_seconds_requeues_when_the_first_member_qualifies() {
    let mut s = spec();
    s.min_ready_seconds = 30;
    let mut a = member("a", 0);
    a.eligibility = Eligibility::ReadyTooShort {
        remaining: Duration::from_millis(2500),
    };
    let d = decide(&observe(&s, vec![a], LeaseState::Absent, 10));
    assert_eq!(
        d.lease,
        LeaseWrite::Create {
            holder: None,
            transitions: 0
        }
    );
    assert_eq!(d.requeue_after, Duration::from_millis(2500));
    assert_eq!(d.renew_after, None);
    assert_eq!(d.wake_after, Some(Duration::from_millis(2500)));
}

#[test]
fn a_ttl_change_is_written_at_once() {
    let mut s = spec();
    s.lease_duration_seconds = 30;
    let members = vec![labelled(member("a", 0), ROLE_LEADER, Some(1))];
    let d = decide(&observe(&s, members, lease(Some("a"), 1, 100), 100));
    assert_eq!(d.lease, LeaseWrite::Renew);
}

#[test]
fn cleanup_fences_whoever_may_lead_before_stripping_the_rest_and_skips_untouched_pods() {
    let pods = vec![
        labelled(member("f", 0), ROLE_FOLLOWER, None),
        member("plain", 0),
        labelled(member("l", 0), ROLE_LEADER, Some(3)),
    ];
    // The Lease names "h", which the cache does not show (promoted for the first time).
    let writes = cleanup_writes(&pods, &["h", "l"], "41");
    let fences: Vec<&str> = writes.fences.iter().map(LabelWrite::pod).collect();
    assert_eq!(fences, vec!["h", "l"]);
    assert!(writes.fences.iter().all(|w| matches!(
        w,
        LabelWrite::Fence { lease_version, strip: true, .. } if lease_version == "41"
    )));
    let strips: Vec<&str> = writes.strips.iter().map(LabelWrite::pod).collect();
    assert_eq!(strips, vec!["f"]);
}

#[test]
fn a_transfer_fences_the_holder_first_even_when_the_cache_does_not_show_it_labelled() {
    let s = spec();
    // The pod cache lags: "b" holds the Lease but shows no leader label yet; "a" is eligible.
    let mut b = member("b", 0);
    b.eligibility = Eligibility::NotReady;
    let d = decide(&observe(
        &s,
        vec![member("a", 0), b],
        lease(Some("b"), 4, 100),
        100,
    ));
    let steps: Vec<String> = d
        .steps()
        .map(|step| match step {
            Step::Lease(l) => format!("lease {l:?}"),
            Step::Label(w) => format!("{w:?}"),
        })
        .collect();
    assert!(
        steps[0].starts_with("Fence { pod: \"b\", lease_version: \"lease-4\""),
        "{steps:?}"
    );
    assert!(steps[1].starts_with("lease Transfer"), "{steps:?}");
    assert!(steps[2].starts_with("Promote { pod: \"a\""), "{steps:?}");
    assert_eq!(steps.len(), 3, "three sequential writes: {steps:?}");
}

#[test]
fn a_promote_without_a_transfer_renews_the_lease_first() {
    let s = spec();
    // The Lease names "a" (a crash came between the Lease write and the label), fresh.
    let d = decide(&observe(
        &s,
        vec![member("a", 0), member("b", 0)],
        lease(Some("a"), 2, 100),
        100,
    ));
    let steps: Vec<bool> = d.steps().map(|s| matches!(s, Step::Lease(_))).collect();
    assert_eq!(d.lease, LeaseWrite::Renew);
    let promote = d
        .labels
        .iter()
        .position(|w| matches!(w, LabelWrite::Promote { .. }))
        .unwrap();
    assert!(
        steps.iter().position(|l| *l).unwrap() <= promote + d.breaks,
        "{steps:?}"
    );
    assert!(matches!(
        d.steps().next(),
        Some(Step::Lease(LeaseWrite::Renew))
    ));
}

/// Pods a and b, no Lease yet, at t=100: a is elected at epoch 1. The status and its decision.
fn first_election() -> (ElectionGroupStatus, Decision) {
    let s = spec();
    let d = decide(&observe(
        &s,
        vec![member("a", 0), member("b", 0)],
        LeaseState::Absent,
        100,
    ));
    (status::from_decision(None, &d, &[], Some(3), t(100)), d)
}

#[test]
fn status_reports_leader_and_conditions() {
    let (st, d) = first_election();
    assert_eq!(st.leader.as_deref(), Some("a"));
    assert_eq!(st.epoch, Some(1));
    assert_eq!(st.eligible.as_deref(), Some("2/2"));
    let cond = |ty: &str| {
        st.conditions
            .iter()
            .find(|c| c.type_ == ty)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(cond("LeaderElected"), "True");
    assert_eq!(cond("NoEligibleMembers"), "False");
    assert_eq!(cond("Conflict"), "False");
    assert_eq!(cond("Paused"), "False");
    // Same decision later: no transition times move, so nothing needs writing.
    let again = status::from_decision(Some(&st), &d, &[], Some(3), t(200));
    assert!(!status::differs(Some(&st), &again));
}

#[test]
fn notifications_condition_names_stalled_pods_the_epochs_and_the_remedy() {
    use crate::notify::stall::{Stall, Stalled};
    let (mut st, _) = first_election();
    let follow = status::notifications(Some(&st), &[], Some(3), t(100));
    assert_eq!(
        (
            follow.type_.as_str(),
            follow.status.as_str(),
            follow.reason.as_str()
        ),
        ("NotificationsStalled", "False", "AllPodsFollow")
    );
    st.conditions.push(follow.clone());

    let ahead = Stalled {
        pod: "web-1".into(),
        stall: Stall::EpochAhead {
            pod_epoch: 1000,
            group_epoch: 3,
        },
    };
    let running = Stalled {
        pod: "web-2".into(),
        stall: Stall::RunningUngranted { epoch: 3 },
    };
    let only_running =
        status::notifications(Some(&st), std::slice::from_ref(&running), Some(3), t(200));
    assert_eq!(
        (only_running.status.as_str(), only_running.reason.as_str()),
        ("True", "PodRunningUngranted")
    );
    assert!(
        only_running.message.contains("pod web-2"),
        "{}",
        only_running.message
    );
    assert!(
        only_running.message.contains("epoch 3"),
        "{}",
        only_running.message
    );
    assert!(
        only_running.message.contains(
            "never granted it, more than a term after it started sending: delete the pod"
        ),
        "{}",
        only_running.message
    );
    // A change of status moves the transition time.
    assert_eq!(only_running.last_transition_time, Time(t(200)));

    let both = status::notifications(Some(&st), &[ahead, running], Some(3), t(200));
    assert_eq!(
        (both.status.as_str(), both.reason.as_str()),
        ("True", "PodEpochAhead")
    );
    for needle in [
        "pod web-1 holds epoch 1000, above the group's epoch 3",
        "pod web-2 says it runs leader-only work at epoch 3",
        "delete the pod to clear it (kubectl delete pod web-1 web-2)",
    ] {
        assert!(
            both.message.contains(needle),
            "missing {needle:?} in {}",
            both.message
        );
    }
    // Another stall while stalled already: the message changes, the transition time does not.
    st.conditions.retain(|c| c.type_ != "NotificationsStalled");
    st.conditions.push(both.clone());
    let later = status::notifications(Some(&st), &[only_running_pod("web-3")], Some(3), t(300));
    assert_eq!(later.last_transition_time, Time(t(200)));

    let many: Vec<Stalled> = (0..8).map(|i| only_running_pod(&format!("p{i}"))).collect();
    let capped = status::notifications(None, &many, Some(3), t(300));
    assert!(capped.message.contains("and 3 more"), "{}", capped.message);
    assert!(!capped.message.contains("p5"), "{}", capped.message);
}

fn only_running_pod(name: &str) -> crate::notify::stall::Stalled {
    crate::notify::stall::Stalled {
        pod: name.into(),
        stall: crate::notify::stall::Stall::RunningUngranted { epoch: 3 },
    }
}

#[test]
fn status_differs_in_every_field_but_condition_times_and_order() {
    let (base, _) = first_election();
    assert!(base.conditions.len() > 1);

    let mut same = base.clone();
    same.conditions.reverse();
    for c in &mut same.conditions {
        c.last_transition_time = Time(t(500));
    }
    assert!(!status::differs(Some(&base), &same));
    assert!(!status::differs(Some(&same), &base));

    let outcome = crate::crd::SwitchoverOutcome {
        id: "x".into(),
        result: "Succeeded".into(),
        message: String::new(),
        from: None,
        to: None,
        epoch: 1,
        requested_at: Time(t(100)),
        completed_at: Time(t(100)),
    };
    type Change = Box<dyn Fn(&mut ElectionGroupStatus)>;
    let changes: Vec<(&str, Change)> = vec![
        ("leader", Box::new(|st| st.leader = Some("b".into()))),
        (
            "leaderUid",
            Box::new(|st| st.leader_uid = Some("other".into())),
        ),
        ("epoch", Box::new(|st| st.epoch = Some(2))),
        (
            "leaderSince",
            Box::new(|st| st.leader_since = Some(Time(t(101)))),
        ),
        ("members", Box::new(|st| st.members += 1)),
        ("eligibleMembers", Box::new(|st| st.eligible_members -= 1)),
        ("eligible", Box::new(|st| st.eligible = Some("1/2".into()))),
        (
            "observedGeneration",
            Box::new(|st| st.observed_generation = Some(4)),
        ),
        (
            "lastTransition",
            Box::new(|st| {
                st.last_transition = match st.last_transition {
                    Some(_) => None,
                    None => Some(crate::crd::LeaderTransition {
                        from: None,
                        to: Some("a".into()),
                        reason: "elected".into(),
                        epoch: 1,
                        at: Time(t(100)),
                        duration_millis: None,
                    }),
                }
            }),
        ),
        (
            "lastSwitchover",
            Box::new(move |st| st.last_switchover = Some(outcome.clone())),
        ),
        (
            "a condition's status",
            Box::new(|st| st.conditions[0].status = "Unknown".into()),
        ),
        (
            "a condition's reason",
            Box::new(|st| st.conditions[0].reason = "Other".into()),
        ),
        (
            "a condition's message",
            Box::new(|st| st.conditions[0].message = "other".into()),
        ),
        (
            "a condition's generation",
            Box::new(|st| st.conditions[0].observed_generation = Some(9)),
        ),
        (
            "a condition fewer",
            Box::new(|st| {
                st.conditions.pop();
            }),
        ),
        (
            "a condition's type",
            Box::new(|st| st.conditions[0].type_ = "Other".into()),
        ),
    ];
    for (field, change) in &changes {
        let mut changed = base.clone();
        change(&mut changed);
        assert!(status::differs(Some(&base), &changed), "{field} changed");
        assert!(
            status::differs(Some(&changed), &base),
            "{field} changed (reversed)"
        );
    }
}

#[test]
fn status_leader_since_survives_a_round_trip_so_renewals_write_no_status() {
    let s = spec();
    let mut members = vec![labelled(member("a", 0), ROLE_LEADER, Some(1))];
    members[0].group = Some(GROUP.into());
    let mut lease_state = lease(Some("a"), 1, 100);
    if let LeaseState::Owned(v) = &mut lease_state {
        v.acquire_time = Some(t(0) + jiff::SignedDuration::from_micros(123_456));
    }
    let d = decide(&observe(&s, members, lease_state, 101));
    let st = status::from_decision(None, &d, &[], Some(1), t(101));
    let round_tripped: crate::crd::ElectionGroupStatus =
        serde_json::from_value(serde_json::to_value(&st).unwrap()).unwrap();
    assert!(!status::differs(Some(&round_tripped), &st));
}

#[test]
fn status_names_overlaps_and_the_foreign_lease() {
    let s = spec();
    let d = decide(&observe(
        &s,
        vec![],
        LeaseState::Foreign {
            owner: "holder x".into(),
        },
        100,
    ));
    let st = status::from_decision(None, &d, &[], None, t(100));
    let conflict = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Conflict")
        .unwrap();
    assert_eq!(
        (conflict.status.as_str(), conflict.reason.as_str()),
        ("True", "LeaseNotOwned")
    );
    let overlaps = vec![Overlap {
        pod: "p".into(),
        other_group: "older".into(),
    }];
    let d = decide(&observe(&s, vec![], LeaseState::Absent, 100));
    let st = status::from_decision(None, &d, &overlaps, None, t(100));
    let conflict = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Conflict")
        .unwrap();
    assert!(conflict.message.contains("older"), "{}", conflict.message);
}

// ---- properties of single decisions over arbitrary observations ----

fn arb_eligibility() -> impl Strategy<Value = Eligibility> {
    prop_oneof![
        4 => Just(Eligibility::Eligible),
        1 => Just(Eligibility::Terminating),
        1 => Just(Eligibility::NotReady),
        1 => Just(Eligibility::NodeNotReady),
        1 => (1u64..5000).prop_map(|ms| Eligibility::ReadyTooShort { remaining: Duration::from_millis(ms) }),
    ]
}

fn arb_member(i: usize) -> impl Strategy<Value = Member> {
    (
        arb_eligibility(),
        0i64..50,
        prop::option::of(-3i64..3),
        prop::option::of(prop_oneof![
            Just(ROLE_LEADER.to_string()),
            Just(ROLE_FOLLOWER.to_string())
        ]),
        prop::option::of(0i32..6),
    )
        .prop_map(move |(eligibility, ready, priority, role, epoch)| {
            let mut m = member(&format!("p{i}"), ready);
            m.eligibility = eligibility;
            m.priority = priority;
            m.role = role;
            m.epoch = epoch.map(|e| e.to_string());
            m.group = Some(GROUP.into());
            m
        })
}

fn arb_observation() -> impl Strategy<
    Value = (
        Vec<Member>,
        Vec<Member>,
        LeaseState,
        bool,
        Option<usize>,
        i64,
    ),
> {
    (
        (0usize..6).prop_flat_map(|n| (0..n).map(arb_member).collect::<Vec<_>>()),
        prop::collection::vec(arb_member(99), 0..2),
        prop_oneof![
            1 => Just(LeaseState::Absent),
            4 => (prop::option::of(0usize..8), 0i32..20, 0i64..40).prop_map(|(h, tr, renewed)| {
                lease(h.map(|i| format!("p{i}")).as_deref(), tr, renewed)
            }),
        ],
        any::<bool>(),
        prop::option::of(0usize..8),
        0i64..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(crate::election::tests::cases()))]

    #[test]
    fn decisions_keep_the_invariants((members, strays, lease_state, paused, preferred, now) in arb_observation()) {
        let mut s = spec();
        s.paused = paused;
        s.preferred_leader = preferred.map(|i| format!("p{i}"));
        let strays: Vec<Member> = strays.into_iter().enumerate().map(|(i, mut m)| { m.name = format!("s{i}"); m }).collect();
        let obs = Observation { now: t(now), group: GROUP, spec: &s, members: members.clone(), strays: strays.clone(), lease: lease_state.clone(), overlaps: vec![], published_epoch: None, switchover: None };
        let d = decide(&obs);
        let before = match &lease_state { LeaseState::Owned(v) => v.transitions, _ => 0 };

        // I2: the epoch never goes backwards, and moves exactly when the holder changes.
        prop_assert!(d.epoch >= before);
        match &d.lease {
            LeaseWrite::Transfer { transitions, .. } => prop_assert_eq!(*transitions, before + 1),
            LeaseWrite::Create { transitions, holder } => {
                // A recreated Lease carries on from the highest epoch a pod still carries.
                let seen = members.iter().chain(&strays).filter_map(|m| m.epoch.as_deref()?.parse::<i32>().ok()).max().unwrap_or(0);
                prop_assert_eq!(*transitions, seen + i32::from(holder.is_some()))
            }
            LeaseWrite::Keep | LeaseWrite::Renew => prop_assert_eq!(d.epoch, before),
        }

        if paused {
            prop_assert!(d.labels.is_empty());
            let elects = matches!(d.lease, LeaseWrite::Transfer { .. } | LeaseWrite::Create { .. });
            prop_assert!(!elects, "paused must not elect: {:?}", d.lease);
            return Ok(());
        }

        // The leader is eligible, and there is one whenever anyone is eligible.
        let any_eligible = members.iter().any(|m| m.eligibility.is_eligible());
        prop_assert_eq!(d.leader.is_some(), any_eligible);
        if let Some(h) = &d.leader {
            prop_assert!(members.iter().any(|m| m.name == h.name && m.eligibility.is_eligible()));
        }

        // Break before make: every leader label that must go is removed before the promote.
        let promote_at = d.labels.iter().position(|w| matches!(w, LabelWrite::Promote { .. }));
        let promotes = d.labels.iter().filter(|w| matches!(w, LabelWrite::Promote { .. })).count();
        prop_assert!(promotes <= 1, "{:?}", d.labels);
        if let Some(p) = promote_at {
            for (i, w) in d.labels.iter().enumerate() {
                let was_leader = members.iter().chain(&strays).any(|m| m.name == w.pod() && m.role.as_deref() == Some(ROLE_LEADER));
                if matches!(w, LabelWrite::Fence { .. } | LabelWrite::Demote { .. } | LabelWrite::Strip { .. }) && was_leader {
                    prop_assert!(i < p, "demote of {} after promote: {:?}", w.pod(), d.labels);
                }
            }
        }

        // I1 + I3 on the core: applying the writes, in order, leaves at most one leader label at
        // every step, and at the end exactly the decided leader carries it.
        let mut roles: std::collections::BTreeMap<String, Option<String>> =
            members.iter().chain(&strays).map(|m| (m.name.clone(), m.role.clone())).collect();
        let leaders = |r: &std::collections::BTreeMap<String, Option<String>>| r.values().filter(|v| v.as_deref() == Some(ROLE_LEADER)).count();
        let initial_leaders = leaders(&roles);
        for w in &d.labels {
            match w {
                LabelWrite::Demote { pod, .. } | LabelWrite::Follow { pod, .. } | LabelWrite::Fence { pod, strip: false, .. } => { roles.insert(pod.clone(), Some(ROLE_FOLLOWER.into())); }
                LabelWrite::Strip { pod, .. } | LabelWrite::Fence { pod, strip: true, .. } => { roles.insert(pod.clone(), None); }
                LabelWrite::Promote { pod, .. } => { roles.insert(pod.clone(), Some(ROLE_LEADER.into())); }
            }
            prop_assert!(leaders(&roles) <= initial_leaders.max(1), "{:?}", d.labels);
        }
        let final_leaders: Vec<&String> = roles.iter().filter(|(_, v)| v.as_deref() == Some(ROLE_LEADER)).map(|(k, _)| k).collect();
        prop_assert_eq!(final_leaders, d.leader.iter().map(|h| &h.name).collect::<Vec<_>>());
        prop_assert!(d.requeue_after >= MIN_REQUEUE);
        // Somebody to renew for exactly when the decision leaves a holder; a write of ours now
        // starts a full interval, and a renewal is never due later than the next look.
        prop_assert_eq!(d.renew_after.is_some(), d.leader.is_some());
        if let Some(after) = d.renew_after {
            prop_assert!(after >= MIN_REQUEUE && after <= renew_interval(s.lease_duration_seconds));
            if d.lease != LeaseWrite::Keep {
                prop_assert_eq!(after, renew_interval(s.lease_duration_seconds));
            }
            prop_assert!(d.requeue_after <= after);
        }
        if let Some(wake) = d.wake_after {
            prop_assert!(d.requeue_after <= wake);
        }
    }
}

/// Property-test cases per property: enough to matter in CI, more with PODIUM_PROPTEST_CASES.
pub(crate) fn cases() -> u32 {
    std::env::var("PODIUM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

#[test]
fn a_lease_deleted_with_its_leader_pod_continues_from_the_published_epoch() {
    let s = spec();
    // No pod carries an epoch any more (the labelled leader was deleted too); the status does.
    let mut obs = observe(&s, vec![member("b", 0)], LeaseState::Absent, 100);
    obs.published_epoch = Some(7);
    let d = decide(&obs);
    assert_eq!(d.epoch, 8);
    assert!(matches!(d.lease, LeaseWrite::Create { transitions: 8, .. }));
    // A pod that carries a higher epoch than the status still wins.
    obs.members = vec![labelled(member("b", 0), "follower", Some(9))];
    assert_eq!(decide(&obs).epoch, 10);
}

// Day-2 operations: failover delay, drains, switchovers.

fn not_ready(mut m: Member, since: i64) -> Member {
    m.eligibility = Eligibility::NotReady;
    m.ready_since = None;
    m.not_ready_since = Some(t(since));
    m
}

fn draining(mut m: Member) -> Member {
    m.draining = true;
    m
}

fn request(id: &str, to: Option<&str>, from: Option<&str>) -> SwitchoverRequest {
    SwitchoverRequest {
        id: id.into(),
        to: to.map(String::from),
        from: from.map(String::from),
        requested_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t(0)),
    }
}

fn two_pods_led_by_a() -> Vec<Member> {
    vec![
        labelled(member("a", 0), ROLE_LEADER, Some(4)),
        labelled(member("b", 3), ROLE_FOLLOWER, None),
        labelled(member("c", 2), ROLE_FOLLOWER, None),
    ]
}

#[test]
fn failover_delay_keeps_a_not_ready_leader_until_the_delay_runs_out() {
    let s = ElectionGroupSpec {
        failover_delay_seconds: 5,
        ..spec()
    };
    let mut members = two_pods_led_by_a();
    members[0] = not_ready(members[0].clone(), 100);
    // 3 s into the delay: no transition, no epoch change, a look again when it ends.
    let d = decide(&observe(&s, members.clone(), lease(Some("a"), 4, 100), 103));
    assert_eq!(d.leader, holder("a"));
    assert_eq!((d.epoch, d.handover.as_ref()), (4, None));
    assert!(!matches!(d.lease, LeaseWrite::Transfer { .. }));
    assert!(d.labels.is_empty(), "{:?}", d.labels);
    assert_eq!(d.requeue_after, Duration::from_secs(2));
    assert_eq!(d.wake_after, Some(Duration::from_secs(2)));
    assert!(
        d.renew_after.is_some(),
        "the delayed holder is still renewed"
    );
    // Past it: the usual failover.
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 105));
    assert_eq!(d.leader, holder("c"));
    assert_eq!(d.handover.unwrap().reason, "PodNotReady");
    // Without a delay, at once.
    let mut members = two_pods_led_by_a();
    members[0] = not_ready(members[0].clone(), 100);
    let d = decide(&observe(&spec(), members, lease(Some("a"), 4, 100), 100));
    assert_eq!(d.leader, holder("c"));
}

#[test]
fn failover_delay_never_holds_a_terminating_deleted_or_unknown_since_leader() {
    let s = ElectionGroupSpec {
        failover_delay_seconds: 10,
        ..spec()
    };
    let mut terminating = two_pods_led_by_a();
    terminating[0].eligibility = Eligibility::Terminating;
    terminating[0].not_ready_since = Some(t(100));
    let mut node_down = two_pods_led_by_a();
    node_down[0].eligibility = Eligibility::NodeNotReady;
    let mut no_time = two_pods_led_by_a();
    no_time[0] = not_ready(no_time[0].clone(), 0);
    no_time[0].not_ready_since = None;
    let deleted = two_pods_led_by_a()[1..].to_vec();
    for members in [terminating, node_down, no_time, deleted] {
        let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 101));
        assert_eq!(d.leader, holder("c"));
        assert_eq!(d.epoch, 5);
    }
}

#[test]
fn a_leader_on_a_draining_node_hands_over_to_a_pod_on_another_node() {
    let s = spec();
    let mut members = two_pods_led_by_a();
    members[0] = draining(members[0].clone());
    members[2] = draining(members[2].clone());
    let d = decide(&observe(&s, members.clone(), lease(Some("a"), 4, 100), 101));
    // c has been Ready longer than b, but its node drains too: it ranks last.
    assert_eq!(d.leader, holder("b"));
    assert_eq!(d.labels[..2], [fence("a", 4), promote("b", 5)]);
    assert_eq!(d.handover.unwrap().reason, "NodeDraining");
    // Switched off for the group: nothing moves.
    let off = ElectionGroupSpec {
        handover_on_drain: false,
        ..spec()
    };
    let d = decide(&observe(&off, members, lease(Some("a"), 4, 100), 101));
    assert_eq!((d.leader, d.epoch), (holder("a"), 4));
}

#[test]
fn when_every_node_drains_the_leader_stays() {
    let s = spec();
    let members: Vec<Member> = two_pods_led_by_a().into_iter().map(draining).collect();
    let d = decide(&observe(&s, members, lease(Some("a"), 4, 100), 101));
    assert_eq!((d.leader, d.epoch, d.handover), (holder("a"), 4, None));
}

#[test]
fn a_switchover_to_a_named_pod_fences_the_leader_and_records_success() {
    let s = spec();
    let req = request("r1", Some("b"), Some("a"));
    let mut obs = observe(&s, two_pods_led_by_a(), lease(Some("a"), 4, 100), 101);
    obs.switchover = Some(&req);
    let d = decide(&obs);
    assert_eq!(
        d.lease,
        LeaseWrite::Transfer {
            holder: holder("b"),
            transitions: 5
        }
    );
    assert_eq!(d.labels, vec![fence("a", 4), promote("b", 5)]);
    assert_eq!(d.handover.as_ref().unwrap().reason, "Switchover");
    let outcome = d.switchover.as_ref().unwrap();
    assert_eq!(outcome.result.name(), "Succeeded");
    assert_eq!(
        (outcome.from.as_deref(), outcome.to.as_deref()),
        (Some("a"), Some("b"))
    );
    let status = status::from_decision(None, &d, &[], Some(1), t(101));
    let recorded = status.last_switchover.unwrap();
    assert_eq!((recorded.id.as_str(), recorded.epoch), ("r1", 5));
    assert_eq!(status.last_transition.unwrap().reason, "Switchover");
}

#[test]
fn a_switchover_finished_by_an_earlier_reconcile_is_only_recorded() {
    let s = spec();
    // b leads already (the status write of the reconcile that moved it failed).
    let members = vec![
        labelled(member("a", 0), ROLE_FOLLOWER, None),
        labelled(member("b", 3), ROLE_LEADER, Some(5)),
    ];
    for req in [
        request("r1", Some("b"), Some("a")),
        request("r2", None, Some("a")),
    ] {
        let mut obs = observe(&s, members.clone(), lease(Some("b"), 5, 100), 101);
        obs.switchover = Some(&req);
        let d = decide(&obs);
        assert_eq!((d.lease.clone(), d.labels.len()), (LeaseWrite::Keep, 0));
        let outcome = d.switchover.unwrap();
        assert_eq!(outcome.result.name(), "Succeeded", "{outcome:?}");
        assert_eq!(outcome.to.as_deref(), Some("b"));
    }
}

#[test]
fn an_untargeted_switchover_picks_the_best_other_pod() {
    let s = spec();
    let req = request("r", None, Some("a"));
    let mut obs = observe(&s, two_pods_led_by_a(), lease(Some("a"), 4, 100), 101);
    obs.switchover = Some(&req);
    let d = decide(&obs);
    assert_eq!(d.leader, holder("c"));
    assert_eq!(d.switchover.unwrap().to.as_deref(), Some("c"));
}

#[test]
fn switchovers_are_refused_with_a_reason_and_change_nothing() {
    let mut not_eligible = two_pods_led_by_a();
    not_eligible[1] = not_ready(not_eligible[1].clone(), 50);
    let mut on_draining_node = two_pods_led_by_a();
    on_draining_node[1] = draining(on_draining_node[1].clone());
    let paused = ElectionGroupSpec {
        paused: true,
        ..spec()
    };
    let prefers_c = ElectionGroupSpec {
        preferred_leader: Some("c".into()),
        ..spec()
    };
    let prefers_a = ElectionGroupSpec {
        preferred_leader: Some("a".into()),
        ..spec()
    };
    let alone = vec![labelled(member("a", 0), ROLE_LEADER, Some(4))];
    let cases: Vec<(ElectionGroupSpec, Vec<Member>, SwitchoverRequest, &str)> = vec![
        (
            spec(),
            two_pods_led_by_a(),
            request("1", Some("zz"), Some("a")),
            "not a member",
        ),
        (
            spec(),
            not_eligible,
            request("2", Some("b"), Some("a")),
            "not eligible: PodNotReady",
        ),
        (
            spec(),
            on_draining_node,
            request("3", Some("b"), Some("a")),
            "being drained",
        ),
        (
            paused,
            two_pods_led_by_a(),
            request("4", Some("b"), Some("a")),
            "paused",
        ),
        (
            prefers_c,
            two_pods_led_by_a(),
            request("5", Some("b"), None),
            "preferredLeader names pod c",
        ),
        (
            prefers_a,
            two_pods_led_by_a(),
            request("6", None, Some("a")),
            "preferredLeader names pod a",
        ),
        (
            spec(),
            alone,
            request("7", None, Some("a")),
            "no other member is eligible",
        ),
    ];
    for (s, members, req, why) in cases {
        let leads_now = if s.preferred_leader.as_deref() == Some("c") {
            "c"
        } else {
            "a"
        };
        let mut obs = observe(&s, members, lease(Some("a"), 4, 100), 101);
        obs.switchover = Some(&req);
        let d = decide(&obs);
        let outcome = d.switchover.as_ref().expect("an outcome");
        assert_eq!(outcome.result.name(), "Refused", "{}: {outcome:?}", req.id);
        assert!(
            outcome.result.message().contains(why),
            "{}: {:?}",
            req.id,
            outcome.result.message()
        );
        // A refusal moves nothing the rest of the spec would not have moved anyway.
        assert_eq!(d.leader, holder(leads_now), "{}", req.id);
    }
    // Nobody leads: nothing to switch over from.
    let req = request("8", None, None);
    let s = spec();
    let mut obs = observe(&s, vec![], lease(None, 4, 100), 101);
    obs.switchover = Some(&req);
    assert!(
        decide(&obs)
            .switchover
            .unwrap()
            .result
            .message()
            .contains("no pod leads")
    );
}

#[test]
fn a_switchover_on_a_group_whose_lease_is_foreign_is_refused() {
    let s = spec();
    let req = request("f", None, Some("a"));
    let mut obs = observe(
        &s,
        two_pods_led_by_a(),
        LeaseState::Foreign {
            owner: "someone".into(),
        },
        101,
    );
    obs.switchover = Some(&req);
    let d = decide(&obs);
    let outcome = d.switchover.unwrap();
    assert_eq!(outcome.result.name(), "Refused");
    assert!(outcome.result.message().contains("not podium's"));
}
