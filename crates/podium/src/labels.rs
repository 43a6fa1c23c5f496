//! Sends one pod label write and waits for the API server's acknowledgement.

use kube::api::{Api, Patch, PatchParams};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result, status_code};
use podium_core::election::LabelWrite;
pub use podium_core::labels::patch_body;

/// Applies one write and returns once the API server has acknowledged it. A pod that is gone
/// needs no label removed; a pod that is gone cannot be promoted. The answer is decoded as `K`:
/// the operator's [`podium_core::pod::ElectionPod`], or a whole `Pod` for the bench's floor.
pub async fn apply<K>(api: &Api<K>, write: &LabelWrite, group: &str) -> Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let pod = write.pod();
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api
        .patch(pod, &params, &Patch::Merge(patch_body(write, group)))
        .await
    {
        Ok(p) => Ok(Some(p)),
        Err(e) if status_code(&e) == Some(404) && !matches!(write, LabelWrite::Promote { .. }) => {
            Ok(None)
        }
        Err(source) => Err(Error::PodPatch {
            pod: pod.into(),
            source,
        }),
    }
}
