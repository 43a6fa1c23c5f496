//! Role notifications: the operator pushes each member's state to the pod, and `podium exec`
//! runs a leader-only command under a term of its own (docs/design.md, "Your app and its role").
//!
//! - [`message`]: the JSON contract, one [`RoleMessage`] per send and one [`Ack`] per answer.
//! - [`receiver`]: the pod's side as a pure state machine: epochs only go forward, a leader's
//!   term runs on the pod's own clock from a nonce the pod issued, and a demotion is answered
//!   only once the command has stopped.
//! - [`activation`]: the operator's side: when a newly elected pod may be told `leader`
//!   (break-before-make at the process level).
//! - [`plan`]: what the operator sends to one group's pods now, and when it looks again.
//! - [`fair`]: how the groups of all tenants share the operator's sends.
//! - [`stall`]: which members keep their group from following the operator, to report.
pub mod activation;
pub mod fair;
pub mod message;
pub mod plan;
pub mod receiver;
pub mod stall;

pub use activation::{Activation, Link, Other, decide as decide_activation, drift_margin_millis};
pub use message::{Ack, NotifyRole, RoleMessage};
pub use receiver::{Command, Identity, Receiver, Rejection, RejectionKind, Reply};

/// What every notification token's audience starts with, so that no other token the operator
/// holds, and no token meant for another service, is accepted by a pod.
pub const AUDIENCE_PREFIX: &str = "podium.dev/notify";

/// The longest term a message may grant: the CRD's longest Lease TTL (one hour). A message
/// that asks for more is refused before anything in it is believed.
pub const MAX_TERM_MILLIS: u64 = 3_600_000;

/// The highest epoch a message may carry: the Lease's `leaseTransitions` is an int32, so no
/// honest operator ever sends more, and a pod that took more could refuse every genuine
/// message for good.
pub const MAX_EPOCH: u64 = i32::MAX as u64;

/// The audience of the token that authorises messages to one pod: the namespace, the group and
/// the pod's UID. A pod accepts only tokens minted for itself, so a token captured anywhere
/// else (another namespace, another group, another member of the same group, a former pod of
/// the same name) is worthless at it.
pub fn audience(namespace: &str, group: &str, pod_uid: &str) -> String {
    format!("{AUDIENCE_PREFIX}/{namespace}/{group}/{pod_uid}")
}
