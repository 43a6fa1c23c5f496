//! Sends the Lease the core decided, always conditional on the resourceVersion that was read.
//! Answers are decoded as [`LeanLease`], without the managed fields nobody here reads.

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, PostParams};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::lean_lease::LeanLease;
pub use podium_core::lease::{HOLDER_UID_ANNOTATION, desired, state, view};

/// Writes the Lease: create for a new one, replace (conditional on the resourceVersion that
/// `lease` carries) otherwise. A 409 surfaces as an error for the controller to requeue.
pub async fn write(api: &Api<LeanLease>, lease: Lease, create: bool) -> Result<Lease> {
    let name = lease.name_any();
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let lease = LeanLease::from(lease);
    let result = if create {
        api.create(&params, &lease).await
    } else {
        api.replace(&name, &params, &lease).await
    };
    result
        .map(Lease::from)
        .map_err(|source| Error::LeaseWrite { name, source })
}

pub async fn get(api: &Api<LeanLease>, name: &str) -> Result<Option<Lease>> {
    match api.get_opt(name).await {
        Ok(lease) => Ok(lease.map(Lease::from)),
        Err(source) => Err(Error::LeaseRead {
            name: name.into(),
            source,
        }),
    }
}
