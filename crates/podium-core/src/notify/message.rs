//! The notification contract. The operator POSTs a [`RoleMessage`] as JSON with
//! `Authorization: Bearer <token>`; the pod answers 200 with an [`Ack`] when it took the
//! message, 409 with an [`Ack`] when it refused it as stale, and 401 when the token does not
//! verify.
use serde::{Deserialize, Serialize};

/// What a member is told.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum NotifyRole {
    /// Run leader-only work until the term ends, unless a renewal extends it.
    Leader,
    /// This pod holds the leader label, so traffic reaches it, but the previous leader may
    /// still be running leader-only work: wait.
    Pending,
    /// Do no leader-only work.
    Follower,
}

impl NotifyRole {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyRole::Leader => "leader",
            NotifyRole::Pending => "pending",
            NotifyRole::Follower => "follower",
        }
    }
}

/// One member's whole state: every message stands alone, so a lost or repeated one does no
/// harm.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RoleMessage {
    /// `namespace/name` of the ElectionGroup.
    pub group: String,
    /// The pod this message is for; a pod refuses a message for another pod.
    pub pod: String,
    /// That pod's UID: a pod refuses a message meant for an earlier pod of the same name.
    pub pod_uid: String,
    pub role: NotifyRole,
    /// The pod that carries the leader label, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The group's fencing epoch (the Lease's `leaseTransitions`).
    pub epoch: u64,
    /// How long a leader's term lasts from the nonce it echoes, on the pod's own clock.
    pub term_millis: u64,
    /// The latest nonce the pod handed out, echoed back. A `leader` message needs one: the
    /// pod's term starts when it issued that nonce, so no delay in the network can stretch it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// A pod's answer to a message.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// A fresh nonce, for the next `leader` message to echo.
    pub nonce: String,
    /// The highest epoch this pod has taken; it refuses anything older.
    pub epoch: u64,
    /// Whether leader-only work is running now. `false` in the answer to a demotion means it
    /// has stopped.
    pub running: bool,
    /// Whether the message was taken.
    pub accepted: bool,
    /// Why a message was refused, or what the pod did with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
