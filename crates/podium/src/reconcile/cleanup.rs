//! A deleted group: remove podium's labels and annotations from every pod it touched, then its
//! Lease, then everything remembered about it.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;

use super::Context;
use crate::crd::ElectionGroup;
use crate::election::{self, LeaseState, Member};
use crate::error::{Error, Result};
use crate::{index, labels, lease};

pub async fn cleanup(group: &ElectionGroup, ctx: &Context) -> Result<Action> {
    let name = group.name_any();
    let namespace = group.namespace().ok_or(Error::MissingObjectKey)?;
    let now = Timestamp::now();
    let touched: Vec<Member> = index::touched_pods(&ctx.pods, &ctx.pod_index, &namespace, &name)
        .iter()
        .map(|p| election::member_from_pod(p, None, Duration::ZERO, now))
        .collect();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    for write in election::cleanup_writes(&touched) {
        labels::apply(&pods, &write, &name).await?;
    }
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(l) = lease::get(&lease_api, &name).await?
        && let LeaseState::Owned(_) = lease::state(group, Some(&l))
    {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: l.uid(),
                resource_version: l.resource_version(),
            }),
            ..Default::default()
        };
        match lease_api.delete(&name, &params).await {
            Ok(_) => {}
            Err(e) if crate::error::status_code(&e) == Some(404) => {}
            Err(source) => {
                return Err(Error::LeaseDelete {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    ctx.metrics.group_removed(&namespace, &name);
    ctx.memory.forget(&(namespace, name));
    Ok(Action::await_change())
}
