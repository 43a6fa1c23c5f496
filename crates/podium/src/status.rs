//! The status write: server-side apply under podium's one field manager, forced (podium owns
//! its status fields) and conditional on the resourceVersion that was read, so a decision on a
//! stale group is refused with 409 instead of overwriting a newer status.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::FIELD_MANAGER;
use crate::crd::{ElectionGroup, ElectionGroupStatus};

pub async fn write(
    api: &Api<ElectionGroup>,
    group: &ElectionGroup,
    status: &ElectionGroupStatus,
) -> Result<ElectionGroup, kube::Error> {
    let patch = json!({
        "apiVersion": "podium.dev/v1alpha1",
        "kind": "ElectionGroup",
        "metadata": { "name": group.name_any(), "resourceVersion": group.meta().resource_version },
        "status": status,
    });
    api.patch_status(
        &group.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}
