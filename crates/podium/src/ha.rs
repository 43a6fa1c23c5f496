//! The operator's own high availability: replicas race for the Lease `podium-operator` with
//! kube-leader-election, and only the holder reconciles. This is an optimisation, not the
//! safety argument: that crate renews with a read followed by an unconditional patch, so two
//! replicas can briefly both believe they lead, and the handover protocol is safe for any
//! number of acting replicas (docs/design.md). Still, a replica acts only on a [`Claim`] that
//! names it and has not expired, checked just before each batch of writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::sync::watch;

use crate::metrics::Metrics;

pub const OPERATOR_LEASE: &str = "podium-operator";

/// This replica's right to write, as kubert's `Claim`: until when it holds the operator
/// Lease by its own last successful renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// No operator election (a single replica): always.
    Unconditional,
    Until(Instant),
    None,
}

impl Claim {
    pub fn is_current(&self) -> bool {
        match self {
            Claim::Unconditional => true,
            Claim::Until(until) => Instant::now() < *until,
            Claim::None => false,
        }
    }
}

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
    claim: watch::Sender<Claim>,
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
        let sent = Instant::now();
        let now_leading = match lock.try_acquire_or_renew().await {
            // That crate reports `Acquired` after its own unconditional patch; only a Lease that
            // names this replica counts.
            Ok(LeaseLockResult::Acquired(lease))
                if lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(config.identity.as_str()) =>
            {
                last_renewed = Some(sent);
                true
            }
            Ok(LeaseLockResult::Acquired(_) | LeaseLockResult::NotAcquired(_)) => false,
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
        // Valid for two thirds of a TTL from when the renewal was sent, so a slow clock or a
        // slow answer cannot stretch it past the Lease others see.
        claim.send_replace(match last_renewed {
            Some(t) => Claim::Until(t + config.lease_ttl * 2 / 3),
            None => Claim::None,
        });
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
    claim.send_replace(Claim::None);
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
