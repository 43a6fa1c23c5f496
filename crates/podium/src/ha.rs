//! The operator's own high availability: replicas race for the Lease `podium-operator` with
//! kube-leader-election, and only the holder reconciles. That crate's writes are not
//! conditional, so two replicas can briefly both believe they lead; podium's own writes carry
//! resourceVersions, which is what keeps a stale replica harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::sync::watch;

use crate::metrics::Metrics;

pub const OPERATOR_LEASE: &str = "podium-operator";

#[derive(Clone, Debug)]
pub struct ElectionConfig {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_ttl: Duration,
}

/// Holds or chases the operator Lease until `shutdown` fires, publishing whether this replica
/// leads on `leading`. On shutdown a leader steps down, so a standby takes over in about a
/// second instead of a full TTL.
pub async fn run(
    client: Client,
    config: ElectionConfig,
    leading: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let lock = LeaseLock::new(
        client,
        &config.namespace,
        LeaseLockParams {
            lease_name: config.lease_name.clone(),
            holder_id: config.identity.clone(),
            lease_ttl: config.lease_ttl,
        },
    );
    // The leader renews three times per TTL; a standby polls more often so it notices a
    // released Lease quickly.
    let renew_every = config.lease_ttl / 3;
    let poll_every = (config.lease_ttl / 7).max(Duration::from_millis(500));
    let mut last_renewed: Option<Instant> = None;
    loop {
        let now_leading = match lock.try_acquire_or_renew().await {
            Ok(LeaseLockResult::Acquired(_)) => {
                last_renewed = Some(Instant::now());
                true
            }
            Ok(LeaseLockResult::NotAcquired(_)) => false,
            Err(e) => {
                // Keep leading only while the last renewal is surely still valid.
                let still_valid =
                    last_renewed.is_some_and(|t| t.elapsed() < config.lease_ttl * 2 / 3);
                tracing::warn!(error = %e, still_valid, "operator lease renewal failed");
                still_valid && *leading.borrow()
            }
        };
        if !now_leading {
            last_renewed = None;
        }
        leading.send_if_modified(|was| {
            if *was != now_leading {
                tracing::info!(identity = %config.identity, leading = now_leading, "operator leadership changed");
                *was = now_leading;
                true
            } else {
                false
            }
        });
        metrics.operator_leader(now_leading);
        let wait = if now_leading { renew_every } else { poll_every };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    let was_leading = *leading.borrow();
    leading.send_replace(false);
    metrics.operator_leader(false);
    if was_leading {
        match lock.step_down().await {
            Ok(()) => tracing::info!("released the operator lease"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the operator lease; a standby takes over when it expires")
            }
        }
    }
}
