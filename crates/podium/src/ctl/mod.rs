//! The commands people run against a cluster, as `podium <command>` or, through a
//! `kubectl-podium` link on the PATH, `kubectl podium <command>`: a one-shot switchover and a
//! status view. They talk only to the API server; the operator does the work.

pub mod show;
pub mod switchover;

use anyhow::{Context, Result, bail};
use kube::Client;

/// `NAMESPACE/GROUP`, or `GROUP` in `namespace` or else the kubeconfig's namespace.
pub fn group_ref(
    client: &Client,
    group: &str,
    namespace: Option<&str>,
) -> Result<(String, String)> {
    match group.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            if namespace.is_some_and(|n| n != ns) {
                bail!("{group:?} names namespace {ns}, but --namespace says {namespace:?}");
            }
            Ok((ns.to_string(), name.to_string()))
        }
        None if !group.is_empty() => Ok((
            namespace.unwrap_or(client.default_namespace()).to_string(),
            group.to_string(),
        )),
        _ => bail!("{group:?} is not a group: give NAMESPACE/GROUP or GROUP"),
    }
}

/// A client from KUBECONFIG or the in-cluster config, with an error that says so.
pub async fn client() -> Result<Client> {
    Client::try_default()
        .await
        .context("cannot build a Kubernetes client from KUBECONFIG or the in-cluster config")
}
