//! Turns a pod (and its Node, where readable) into the facts the election needs.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;

use crate::crd::{EPOCH_ANNOTATION, GROUP_ANNOTATION, PRIORITY_ANNOTATION, ROLE_LABEL};
use crate::pod::ElectionPod;

/// Why a member may or may not be elected right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Eligibility {
    Eligible,
    Terminating,
    NotRunning,
    NotReady,
    /// Ready, but for less than `minReadySeconds`; eligible after `remaining`.
    ReadyTooShort {
        remaining: Duration,
    },
    NodeNotReady,
}

impl Eligibility {
    pub fn is_eligible(&self) -> bool {
        matches!(self, Eligibility::Eligible)
    }

    /// Short reason, used in the LeaderLost event and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Eligibility::Eligible => "Eligible",
            Eligibility::Terminating => "PodTerminating",
            Eligibility::NotRunning => "PodNotRunning",
            Eligibility::NotReady => "PodNotReady",
            Eligibility::ReadyTooShort { .. } => "ReadyTooShort",
            Eligibility::NodeNotReady => "NodeNotReady",
        }
    }
}

/// One pod as the election sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub eligibility: Eligibility,
    /// When the pod last became Ready; earlier ranks higher.
    pub ready_since: Option<Timestamp>,
    /// When a pod that is NotReady became so, if its Ready condition says: a leader keeps
    /// leadership for `failoverDelaySeconds` from then.
    pub not_ready_since: Option<Timestamp>,
    /// Its node is cordoned or carries one of the group's drain taints (set by the caller,
    /// which knows the group's spec; see [`node_draining`]).
    pub draining: bool,
    /// `podium.dev/priority`, higher ranks higher. `None` when absent.
    pub priority: Option<i64>,
    /// The annotation's raw text when it is not an integer, so the user can be told.
    pub invalid_priority: Option<String>,
    /// The `podium.dev/role` label as it is now.
    pub role: Option<String>,
    /// The `podium.dev/epoch` annotation as it is now.
    pub epoch: Option<String>,
    /// The `podium.dev/group` annotation as it is now.
    pub group: Option<String>,
}

/// `node_ready` is `None` when the node is unknown or cannot be read; only a node that is
/// known to be NotReady makes its pods ineligible.
pub fn member_from_pod(
    pod: &ElectionPod,
    node_ready: Option<bool>,
    min_ready: Duration,
    now: Timestamp,
) -> Member {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    let is_ready = ready.is_some_and(|c| c.status == "True");
    let ready_since = ready
        .filter(|_| is_ready)
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    // A pod on a node known to be NotReady gets no failover delay: its own NotReady may be
    // the node's.
    let not_ready_since = ready
        .filter(|c| c.status == "False" && node_ready != Some(false))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    let phase_running = status.and_then(|s| s.phase.as_deref()) == Some("Running");

    let eligibility = if meta.deletion_timestamp.is_some() {
        Eligibility::Terminating
    } else if !phase_running {
        Eligibility::NotRunning
    } else if !is_ready {
        Eligibility::NotReady
    } else if node_ready == Some(false) {
        Eligibility::NodeNotReady
    } else {
        ready_too_short(ready_since, min_ready, now)
    };

    let annotation = |key: &str| meta.annotations.as_ref().and_then(|a| a.get(key)).cloned();
    let raw_priority = annotation(PRIORITY_ANNOTATION);
    let parsed_priority = raw_priority.as_deref().map(|p| p.trim().parse::<i64>());
    Member {
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        eligibility,
        ready_since,
        not_ready_since,
        draining: false,
        priority: parsed_priority.clone().and_then(Result::ok),
        invalid_priority: match parsed_priority {
            Some(Err(_)) => raw_priority,
            _ => None,
        },
        role: meta
            .labels
            .as_ref()
            .and_then(|l| l.get(ROLE_LABEL))
            .cloned(),
        epoch: annotation(EPOCH_ANNOTATION),
        group: annotation(GROUP_ANNOTATION),
    }
}

fn ready_too_short(
    ready_since: Option<Timestamp>,
    min_ready: Duration,
    now: Timestamp,
) -> Eligibility {
    if min_ready.is_zero() {
        return Eligibility::Eligible;
    }
    // A Ready condition without a transition time cannot prove how long it has been Ready.
    let Some(since) = ready_since else {
        return Eligibility::ReadyTooShort {
            remaining: min_ready,
        };
    };
    let ready_for = Duration::try_from(now.duration_since(since)).unwrap_or(Duration::ZERO);
    if ready_for >= min_ready {
        Eligibility::Eligible
    } else {
        Eligibility::ReadyTooShort {
            remaining: min_ready - ready_for,
        }
    }
}

/// Whether a Node is Ready: `None` when it reports no Ready condition at all.
pub fn node_ready(node: &Node) -> Option<bool> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True")
}

/// Whether a Node is being drained, for a group that hands over on `drain_taints`: cordoned
/// (`spec.unschedulable`), or tainted NoSchedule/NoExecute with one of those keys.
pub fn node_draining(node: &Node, drain_taints: &[String]) -> bool {
    let Some(spec) = node.spec.as_ref() else {
        return false;
    };
    spec.unschedulable == Some(true)
        || spec.taints.iter().flatten().any(|t| {
            matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && drain_taints.contains(&t.key)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::{ElectionPodStatus, keep_election_fields};
    use k8s_openapi::api::core::v1::PodCondition;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(phase: &str, ready: Option<(&str, Timestamp)>) -> ElectionPod {
        ElectionPod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some("u".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: None,
            status: Some(ElectionPodStatus {
                phase: Some(phase.into()),
                conditions: ready.map(|(status, at)| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: status.into(),
                        last_transition_time: Some(Time(at)),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn running_ready_pod_is_eligible() {
        let m = member_from_pod(
            &pod("Running", Some(("True", at(0)))),
            None,
            Duration::ZERO,
            at(1),
        );
        assert_eq!(m.eligibility, Eligibility::Eligible);
        assert_eq!(m.ready_since, Some(at(0)));
    }

    #[test]
    fn each_disqualifier_is_reported() {
        let now = at(100);
        assert_eq!(
            member_from_pod(&pod("Pending", None), None, Duration::ZERO, now).eligibility,
            Eligibility::NotRunning
        );
        assert_eq!(
            member_from_pod(
                &pod("Running", Some(("False", at(0)))),
                None,
                Duration::ZERO,
                now
            )
            .eligibility,
            Eligibility::NotReady
        );
        assert_eq!(
            member_from_pod(&pod("Running", None), None, Duration::ZERO, now).eligibility,
            Eligibility::NotReady
        );
        assert_eq!(
            member_from_pod(
                &pod("Running", Some(("True", at(0)))),
                Some(false),
                Duration::ZERO,
                now
            )
            .eligibility,
            Eligibility::NodeNotReady
        );
        let mut terminating = pod("Running", Some(("True", at(0))));
        terminating.metadata.deletion_timestamp = Some(Time(at(50)));
        assert_eq!(
            member_from_pod(&terminating, Some(true), Duration::ZERO, now).eligibility,
            Eligibility::Terminating
        );
    }

    #[test]
    fn not_ready_since_is_known_only_for_the_pods_own_readiness() {
        let p = pod("Running", Some(("False", at(7))));
        let m = member_from_pod(&p, Some(true), Duration::ZERO, at(9));
        assert_eq!(m.not_ready_since, Some(at(7)));
        // On a NotReady node the pod's NotReady may be the node's: no failover delay.
        let m = member_from_pod(&p, Some(false), Duration::ZERO, at(9));
        assert_eq!(m.not_ready_since, None);
        let ready = pod("Running", Some(("True", at(7))));
        assert_eq!(
            member_from_pod(&ready, None, Duration::ZERO, at(9)).not_ready_since,
            None
        );
    }

    #[test]
    fn cordons_and_named_taints_drain_a_node() {
        use k8s_openapi::api::core::v1::{NodeSpec, Taint};
        let node = |unschedulable: bool, taints: &[(&str, &str)]| Node {
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                taints: Some(
                    taints
                        .iter()
                        .map(|(key, effect)| Taint {
                            key: (*key).into(),
                            effect: (*effect).into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let named = ["maintenance".to_string()];
        assert!(node_draining(&node(true, &[]), &[]));
        assert!(node_draining(
            &node(false, &[("maintenance", "NoExecute")]),
            &named
        ));
        assert!(node_draining(
            &node(false, &[("maintenance", "NoSchedule")]),
            &named
        ));
        assert!(!node_draining(
            &node(false, &[("maintenance", "PreferNoSchedule")]),
            &named
        ));
        assert!(!node_draining(
            &node(false, &[("other", "NoExecute")]),
            &named
        ));
        assert!(!node_draining(
            &node(false, &[("maintenance", "NoExecute")]),
            &[]
        ));
        assert!(!node_draining(&Node::default(), &named));
    }

    #[test]
    fn min_ready_seconds_delays_eligibility() {
        let p = pod("Running", Some(("True", at(0))));
        assert_eq!(
            member_from_pod(&p, None, Duration::from_secs(10), at(4)).eligibility,
            Eligibility::ReadyTooShort {
                remaining: Duration::from_secs(6)
            }
        );
        assert_eq!(
            member_from_pod(&p, None, Duration::from_secs(10), at(10)).eligibility,
            Eligibility::Eligible
        );
    }

    #[test]
    fn decoding_and_stripping_a_pod_keep_everything_the_election_reads() {
        let json = serde_json::json!({
            "metadata": {
                "name": "web-0", "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
                "labels": { "app": "web", "podium.dev/role": "leader" },
                "annotations": {
                    "podium.dev/priority": "5", "podium.dev/epoch": "3", "podium.dev/group": "g",
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096),
                },
                "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "r" }],
                "deletionTimestamp": "2026-01-01T00:00:10Z",
            },
            "spec": {
                "nodeName": "node-1",
                "containers": [{ "name": "c", "image": "i", "env": [{ "name": "A", "value": "x".repeat(4096) }] }],
            },
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "conditions": [
                    { "type": "Initialized", "status": "True" },
                    { "type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z" },
                ],
                "containerStatuses": [{ "name": "c", "image": "i", "imageID": "x", "ready": true, "restartCount": 0 }],
            },
        });
        let full: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json.clone()).unwrap();
        let decoded: ElectionPod = serde_json::from_value(json).unwrap();
        let (spec, status) = (full.spec.clone().unwrap(), full.status.clone().unwrap());
        let decoded_status = decoded.status.clone().unwrap();
        assert_eq!(decoded.metadata, full.metadata);
        assert_eq!(decoded.spec.clone().unwrap().node_name, spec.node_name);
        assert_eq!(
            (
                decoded_status.phase,
                decoded_status.pod_ip,
                decoded_status.conditions
            ),
            (status.phase, status.pod_ip, status.conditions)
        );

        let mut stripped = decoded.clone();
        keep_election_fields(&mut stripped);
        let mut alive = decoded.clone();
        alive.metadata.deletion_timestamp = None;
        let mut alive_stripped = alive.clone();
        keep_election_fields(&mut alive_stripped);
        for (a, b) in [(&decoded, &stripped), (&alive, &alive_stripped)] {
            for (node, min_ready) in [(None, 0), (Some(false), 0), (Some(true), 5), (None, 3600)] {
                let min_ready = Duration::from_secs(min_ready);
                assert_eq!(
                    member_from_pod(a, node, min_ready, at(1_000_000)),
                    member_from_pod(b, node, min_ready, at(1_000_000))
                );
            }
        }
        // What the operator's indexes key pods by, and where notifications go, survive too.
        let index_keys = |p: &ElectionPod| {
            (
                p.metadata.namespace.clone(),
                p.metadata.labels.clone(),
                p.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(GROUP_ANNOTATION).cloned()),
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
                p.status.as_ref().and_then(|s| s.pod_ip.clone()),
            )
        };
        assert_eq!(index_keys(&decoded), index_keys(&stripped));
        let size = serde_json::to_vec(&stripped).unwrap().len();
        let full_size = serde_json::to_vec(&full).unwrap().len();
        assert!(size * 10 < full_size, "{size} vs {full_size}");
    }

    #[test]
    fn priority_annotation_parses_or_is_reported() {
        let mut p = pod("Running", Some(("True", at(0))));
        p.metadata.annotations =
            Some([(PRIORITY_ANNOTATION.to_string(), " 42 ".to_string())].into());
        let m = member_from_pod(&p, None, Duration::ZERO, at(1));
        assert_eq!((m.priority, m.invalid_priority), (Some(42), None));
        p.metadata.annotations =
            Some([(PRIORITY_ANNOTATION.to_string(), "high".to_string())].into());
        let m = member_from_pod(&p, None, Duration::ZERO, at(1));
        assert_eq!(
            (m.priority, m.invalid_priority.as_deref()),
            (None, Some("high"))
        );
    }
}
