//! The `ElectionGroup` API (`podium.dev/v1alpha1`). These Rust types are the single source of
//! truth for the CRD: `podium crd` prints it and `crds/electiongroup.yaml` is generated from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// API group of every podium resource and the prefix of podium's labels and annotations.
pub const GROUP: &str = "podium.dev";
/// Label that podium writes on every member: `leader` or `follower`.
pub const ROLE_LABEL: &str = "podium.dev/role";
pub const ROLE_LEADER: &str = "leader";
pub const ROLE_FOLLOWER: &str = "follower";
/// Annotation on the leader pod carrying the fencing epoch (the Lease's `leaseTransitions`).
pub const EPOCH_ANNOTATION: &str = "podium.dev/epoch";
/// Annotation stamped on a pod when a handover fences it: the Lease resourceVersion the
/// handover replaced. Its only job is to change the pod's resourceVersion (docs/design.md).
pub const FENCE_ANNOTATION: &str = "podium.dev/fence";
/// Annotation on every member naming the group that manages its role label.
pub const GROUP_ANNOTATION: &str = "podium.dev/group";
/// Annotation a user may set on a pod to rank it higher in elections (an integer).
pub const PRIORITY_ANNOTATION: &str = "podium.dev/priority";
/// Annotation on an ElectionGroup asking for one switchover: a JSON [`SwitchoverRequest`].
/// `podium switchover` writes it; the operator carries out each request id once and records the
/// outcome in `status.lastSwitchover`.
pub const SWITCHOVER_ANNOTATION: &str = "podium.dev/switchover";
/// Finalizer that removes podium's labels from the members before a group goes away.
pub const FINALIZER: &str = "podium.dev/cleanup";
/// Label put on Leases podium created, so humans and tools can tell them apart.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "podium";

pub const DEFAULT_LEASE_DURATION_SECONDS: i32 = 15;
pub const MIN_LEASE_DURATION_SECONDS: i32 = 2;
pub const MAX_LEASE_DURATION_SECONDS: i32 = 3600;
pub const MAX_MIN_READY_SECONDS: i32 = 3600;
/// At most this many taint keys in `spec.drainTaints`.
pub const MAX_DRAIN_TAINTS: usize = 16;
/// Longest Kubernetes object name (a DNS subdomain).
pub const MAX_NAME_LENGTH: usize = 253;

/// Elects one leader among the pods that `selector` matches and labels it
/// `podium.dev/role=leader`; the others get `podium.dev/role=follower`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "podium.dev",
    version = "v1alpha1",
    kind = "ElectionGroup",
    plural = "electiongroups",
    singular = "electiongroup",
    shortname = "eg",
    category = "podium",
    namespaced,
    status = "ElectionGroupStatus",
    doc = "An ElectionGroup elects one leader among the pods its selector matches, records it in a Lease of the same name, and labels it podium.dev/role=leader.",
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader","description":"Pod that holds the Lease and carries podium.dev/role=leader"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch","description":"Fencing epoch: the Lease's leaseTransitions"}"#,
    printcolumn = r#"{"name":"Eligible","type":"string","jsonPath":".status.eligible","description":"Eligible members / members"}"#,
    printcolumn = r#"{"name":"TTL","type":"integer","jsonPath":".spec.leaseDurationSeconds","description":"Lease duration in seconds; renewed at half of it"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.failoverDelaySeconds) || !has(self.leaseDurationSeconds) || self.failoverDelaySeconds <= self.leaseDurationSeconds",
    "message": "failoverDelaySeconds must not exceed leaseDurationSeconds"
}]))]
pub struct ElectionGroupSpec {
    /// Pods in this namespace that take part in the election. Required and non-empty (an empty
    /// selector would match every pod in the namespace); must not use the key `podium.dev/role`,
    /// which podium itself writes.
    #[schemars(schema_with = "selector_schema")]
    pub selector: LabelSelector,

    /// Time-to-live of the leader's Lease in seconds. The operator renews it every half TTL.
    #[serde(default = "default_lease_duration_seconds")]
    #[schemars(range(min = 2, max = 3600))]
    pub lease_duration_seconds: i32,

    /// A pod must have been Ready at least this many seconds before it can be elected.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,

    /// Keep renewing the current holder, but elect nobody new and change no labels.
    #[serde(default)]
    pub paused: bool,

    /// Name of a pod that should lead whenever it is eligible (a switchover).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub preferred_leader: Option<String>,

    /// How long a leader that turns NotReady keeps leadership before podium fails over, so a
    /// readiness probe that flaps under load does not churn the epoch. At most
    /// `leaseDurationSeconds`. A leader that is deleted, terminating or on a NotReady node
    /// still fails over at once.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub failover_delay_seconds: i32,

    /// Hand leadership to a pod on another, schedulable node as soon as the leader's node is
    /// cordoned or carries one of `drainTaints`, before a drain evicts the leader. Pods on such
    /// nodes rank last in elections.
    #[serde(default = "default_true")]
    pub handover_on_drain: bool,

    /// Taint keys that, with effect NoSchedule or NoExecute on a pod's node, count as that node
    /// being drained, like a cordon does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 317)))]
    pub drain_taints: Vec<String>,

    /// Push each member its role, the leader, the epoch and the term over HTTP, signed with
    /// the operator's ServiceAccount token, and activate a new leader's process only once the
    /// old one has stopped (see `podium exec`). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
}

/// Where the operator sends role notifications: `http://<podIP>:<port><path>`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifySpec {
    /// Port on the pod's IP that takes the notifications (`podium exec` listens on 8787).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// HTTP path of the notifications.
    #[serde(default = "default_notify_path")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^/[A-Za-z0-9._~/-]*$"))]
    pub path: String,
}

/// The path `podium exec` serves by default.
pub const DEFAULT_NOTIFY_PATH: &str = "/podium/notify";
/// The port `podium exec` listens on by default.
pub const DEFAULT_NOTIFY_PORT: i32 = 8787;

fn default_notify_path() -> String {
    DEFAULT_NOTIFY_PATH.into()
}

fn default_true() -> bool {
    true
}

impl ElectionGroupSpec {
    /// A spec with `selector` and every other field at the default the CRD gives it.
    pub fn selecting(selector: LabelSelector) -> Self {
        ElectionGroupSpec {
            selector,
            lease_duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
            min_ready_seconds: 0,
            paused: false,
            preferred_leader: None,
            failover_delay_seconds: 0,
            handover_on_drain: true,
            drain_taints: Vec::new(),
            notify: None,
        }
    }
}

/// A switchover asked for with `podium switchover`, as the `podium.dev/switchover` annotation
/// holds it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverRequest {
    /// Unique per request; the operator carries out each id once.
    pub id: String,
    /// The pod to hand over to; without it, the best other eligible pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The leader when the request was made: once it no longer leads, an untargeted request
    /// is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The requester's clock when it asked.
    pub requested_at: Time,
}

fn default_lease_duration_seconds() -> i32 {
    DEFAULT_LEASE_DURATION_SECONDS
}

/// What the operator observed and decided, written with server-side apply.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElectionGroupStatus {
    /// Name of the leader pod; absent when nobody leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub leader: Option<String>,
    /// UID of the leader pod, so a pod recreated under the same name is not mistaken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[serde(rename = "leaderUID")]
    pub leader_uid: Option<String>,
    /// Fencing epoch: equals the Lease's `leaseTransitions` and never decreases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub epoch: Option<i32>,
    /// When the current leader acquired the Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_since: Option<Time>,
    /// Number of pods the selector matches.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub members: i32,
    /// Number of members that may be elected right now.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub eligible_members: i32,
    /// `eligibleMembers/members`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub eligible: Option<String>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The last change of leader: who, why, at which epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<LeaderTransition>,
    /// The outcome of the last switchover request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover: Option<SwitchoverOutcome>,
}

/// One change of leader as the status records it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderTransition {
    /// The pod that led before; absent when nobody did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub from: Option<String>,
    /// The pod that leads now; absent when nobody does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub to: Option<String>,
    /// Why (`PodDeleted`, `PodNotReady`, `NodeDraining`, `Switchover`, ...).
    #[schemars(length(max = 64))]
    pub reason: String,
    /// The epoch the change started.
    #[schemars(range(min = 0))]
    pub epoch: i32,
    /// When the operator made the change.
    pub at: Time,
    /// From the event that cost the old leader its lead to the new leader's label, as the
    /// operator measured it; absent when that is unknown (no new leader, or it was labelled by
    /// a later reconcile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub duration_millis: Option<i64>,
}

/// What became of a switchover request.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverOutcome {
    /// The request's id.
    #[schemars(length(max = 128))]
    pub id: String,
    /// `Succeeded` or `Refused`.
    #[schemars(length(max = 16))]
    pub result: String,
    /// Why, for a refusal; what happened otherwise.
    #[schemars(length(max = 1024))]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub to: Option<String>,
    /// The epoch after the switchover.
    #[schemars(range(min = 0))]
    pub epoch: i32,
    /// The requester's time of asking.
    pub requested_at: Time,
    /// When the operator carried it out or refused it.
    pub completed_at: Time,
}

/// Results a [`SwitchoverOutcome`] can have.
pub mod switchover_results {
    pub const SUCCEEDED: &str = "Succeeded";
    pub const REFUSED: &str = "Refused";
}

/// A LabelSelector schema with the bounds Kubernetes enforces on label keys and values, plus
/// the two rules that make a selector usable for an election: it selects something, and it does
/// not select on the label podium writes. `minProperties`/`minItems`/`not` work on every
/// apiserver; the CEL rules give newer ones a clearer message.
fn selector_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Pods in this namespace that take part in the election. Required and non-empty; must not use the key podium.dev/role.",
        "type": "object",
        "minProperties": 1,
        "properties": {
            "matchLabels": {
                "description": "Labels a member must carry. Must not contain podium.dev/role.",
                "type": "object",
                "minProperties": 1,
                "maxProperties": 64,
                "additionalProperties": { "type": "string", "maxLength": 63 },
                "not": { "required": [ROLE_LABEL] }
            },
            "matchExpressions": {
                "description": "Label requirements a member must meet. Must not use the key podium.dev/role.",
                "type": "array",
                "minItems": 1,
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 317,
                            "not": { "enum": [ROLE_LABEL] }
                        },
                        "operator": { "type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"] },
                        "values": {
                            "type": "array",
                            "maxItems": 64,
                            "items": { "type": "string", "maxLength": 63 }
                        }
                    }
                }
            }
        },
        "x-kubernetes-validations": [
            {
                "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
                "message": "selector must not be empty: an empty selector would match every pod in the namespace"
            },
            {
                "rule": "(!has(self.matchLabels) || !('podium.dev/role' in self.matchLabels)) && (!has(self.matchExpressions) || self.matchExpressions.all(e, e.key != 'podium.dev/role'))",
                "message": "selector must not use the key podium.dev/role: podium writes that label itself"
            }
        ]
    })
}

/// The standard metav1.Condition shape, with the bounds upstream puts on it.
fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Latest observations of the group's state, one per type.",
        "type": "array",
        "maxItems": 16,
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": { "type": "string", "maxLength": 316 },
                "status": { "type": "string", "enum": ["True", "False", "Unknown"] },
                "observedGeneration": { "type": "integer", "format": "int64", "minimum": 0 },
                "lastTransitionTime": { "type": "string", "format": "date-time" },
                "reason": { "type": "string", "maxLength": 1024, "minLength": 1 },
                "message": { "type": "string", "maxLength": 32768 }
            }
        },
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// Condition types, reasons and statuses, kept in one place so that status, events, metrics and
/// tests agree on the spelling.
pub mod conditions {
    pub const LEADER_ELECTED: &str = "LeaderElected";
    pub const NO_ELIGIBLE_MEMBERS: &str = "NoEligibleMembers";
    pub const CONFLICT: &str = "Conflict";
    pub const PAUSED: &str = "Paused";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DEGRADED: &str = "Degraded";
    /// Only on groups with `spec.notify`: whether a member refuses or defies the operator's
    /// notifications until its pod is deleted (`notify::stall`).
    pub const NOTIFICATIONS_STALLED: &str = "NotificationsStalled";

    pub const TRUE: &str = "True";
    pub const FALSE: &str = "False";

    pub mod reasons {
        pub const ELECTED: &str = "Elected";
        pub const NO_LEADER: &str = "NoLeader";
        pub const NO_ELIGIBLE: &str = "NoEligiblePods";
        pub const SOME_ELIGIBLE: &str = "EligiblePodsFound";
        pub const LEASE_NOT_OWNED: &str = "LeaseNotOwned";
        pub const OVERLAPPING_GROUP: &str = "OverlappingGroup";
        pub const NO_CONFLICT: &str = "NoConflict";
        pub const PAUSED: &str = "Paused";
        pub const ACTIVE: &str = "Active";
        pub const INVALID: &str = "Invalid";
        pub const VALID: &str = "Valid";
        pub const API_ERROR: &str = "ApiError";
        pub const FORBIDDEN: &str = "Forbidden";
        pub const HEALTHY: &str = "Healthy";
        pub const POD_EPOCH_AHEAD: &str = "PodEpochAhead";
        pub const POD_RUNNING_UNGRANTED: &str = "PodRunningUngranted";
        pub const ALL_PODS_FOLLOW: &str = "AllPodsFollow";
    }
}

/// The CRD as YAML, exactly as `podium crd` prints it and `crds/electiongroup.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = ElectionGroup::crd();
    format!(
        "# Generated by `podium crd` from src/crd.rs. Do not edit by hand.\n{}",
        serde_yaml::to_string(&crd).expect("a CRD always serialises to YAML")
    )
}
