//! Pod label writes as merge-patch bodies. Each carries the resourceVersion the decision was
//! based on; the API server refuses it with 409 if the pod changed since, so a stale decision
//! (or a stale operator replica) can never overwrite a newer one.

use serde_json::{Value, json};

use crate::crd::{
    EPOCH_ANNOTATION, FENCE_ANNOTATION, GROUP_ANNOTATION, ROLE_FOLLOWER, ROLE_LABEL, ROLE_LEADER,
};
use crate::election::LabelWrite;

/// The merge patch for one write. `null` deletes a key in a merge patch.
pub fn patch_body(write: &LabelWrite, group: &str) -> Value {
    let (resource_version, role, epoch, group_value) = match write {
        LabelWrite::Promote {
            resource_version,
            epoch,
            ..
        } => (
            resource_version,
            json!(ROLE_LEADER),
            json!(epoch.to_string()),
            json!(group),
        ),
        LabelWrite::Demote {
            resource_version, ..
        }
        | LabelWrite::Follow {
            resource_version, ..
        } => (
            resource_version,
            json!(ROLE_FOLLOWER),
            Value::Null,
            json!(group),
        ),
        LabelWrite::Strip {
            resource_version, ..
        } => (resource_version, Value::Null, Value::Null, Value::Null),
        LabelWrite::Fence {
            lease_version,
            strip,
            ..
        } => return fence_body(lease_version, *strip, group),
    };
    let mut annotations = json!({ EPOCH_ANNOTATION: epoch, GROUP_ANNOTATION: group_value });
    if matches!(write, LabelWrite::Strip { .. }) {
        annotations[FENCE_ANNOTATION] = Value::Null;
    }
    json!({
        "metadata": {
            "resourceVersion": resource_version,
            "labels": { ROLE_LABEL: role },
            "annotations": annotations,
        }
    })
}

/// No resourceVersion: a fence must land whatever the pod looks like now.
fn fence_body(lease_version: &str, strip: bool, group: &str) -> Value {
    let (role, group_value) = if strip {
        (Value::Null, Value::Null)
    } else {
        (json!(ROLE_FOLLOWER), json!(group))
    };
    json!({
        "metadata": {
            "labels": { ROLE_LABEL: role },
            "annotations": {
                EPOCH_ANNOTATION: Value::Null,
                GROUP_ANNOTATION: group_value,
                FENCE_ANNOTATION: lease_version,
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_sets_role_epoch_group_and_the_precondition() {
        let body = patch_body(
            &LabelWrite::Promote {
                pod: "p".into(),
                resource_version: "9".into(),
                epoch: 4,
            },
            "web",
        );
        assert_eq!(body["metadata"]["resourceVersion"], "9");
        assert_eq!(body["metadata"]["labels"][ROLE_LABEL], "leader");
        assert_eq!(body["metadata"]["annotations"][EPOCH_ANNOTATION], "4");
        assert_eq!(body["metadata"]["annotations"][GROUP_ANNOTATION], "web");
    }

    #[test]
    fn demote_clears_the_epoch_and_strip_clears_everything() {
        let body = patch_body(
            &LabelWrite::Demote {
                pod: "p".into(),
                resource_version: "9".into(),
            },
            "web",
        );
        assert_eq!(body["metadata"]["labels"][ROLE_LABEL], "follower");
        assert!(body["metadata"]["annotations"][EPOCH_ANNOTATION].is_null());
        let body = patch_body(
            &LabelWrite::Strip {
                pod: "p".into(),
                resource_version: "9".into(),
            },
            "web",
        );
        assert!(body["metadata"]["labels"][ROLE_LABEL].is_null());
        assert!(body["metadata"]["annotations"][GROUP_ANNOTATION].is_null());
        assert_eq!(body["metadata"]["resourceVersion"], "9");
    }

    #[test]
    fn a_fence_is_unconditional_and_always_stamps_the_replaced_lease_version() {
        for strip in [false, true] {
            let body = patch_body(
                &LabelWrite::Fence {
                    pod: "p".into(),
                    lease_version: "77".into(),
                    strip,
                },
                "web",
            );
            assert!(body["metadata"].get("resourceVersion").is_none());
            assert_eq!(body["metadata"]["annotations"][FENCE_ANNOTATION], "77");
            assert!(body["metadata"]["annotations"][EPOCH_ANNOTATION].is_null());
            let role = &body["metadata"]["labels"][ROLE_LABEL];
            assert_eq!(role.is_null(), strip, "{role}");
            assert_ne!(role, "leader");
        }
    }
}
