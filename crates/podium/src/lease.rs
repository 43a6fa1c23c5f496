//! Sends the Lease the core decided, always conditional on the resourceVersion that was read.

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
pub use podium_core::lease::{HOLDER_UID_ANNOTATION, desired, state, view};

/// Writes the Lease: create for a new one, replace (conditional on the resourceVersion that
/// `lease` carries) otherwise. A 409 surfaces as an error for the controller to requeue.
pub async fn write(api: &Api<Lease>, lease: &Lease, create: bool) -> Result<Lease> {
    let name = lease.name_any();
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let result = if create {
        api.create(&params, lease).await
    } else {
        api.replace(&name, &params, lease).await
    };
    result.map_err(|source| Error::LeaseWrite { name, source })
}

pub async fn get(api: &Api<Lease>, name: &str) -> Result<Option<Lease>> {
    api.get_opt(name).await.map_err(|source| Error::LeaseRead {
        name: name.into(),
        source,
    })
}
