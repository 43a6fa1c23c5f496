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
pub mod activation;
pub mod message;
pub mod plan;
pub mod receiver;

pub use activation::{Activation, Link, Other, decide as decide_activation, drift_margin_millis};
pub use message::{Ack, NotifyRole, RoleMessage};
pub use receiver::{Command, Receiver, Reply};

/// Audience of the ServiceAccount tokens that sign notifications, so that no other token the
/// operator holds, and no token meant for another service, is accepted by a pod.
pub const AUDIENCE: &str = "podium.dev/notify";
