//! `podium run`: the controller, the HTTP server and the operator's own election, together,
//! until SIGTERM or Ctrl-C, then a graceful stop that releases the operator Lease.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, ListParams};
use tokio::sync::watch;

use crate::controller::{self, Options};
use crate::ha::{self, ElectionConfig};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct OperatorConfig {
    pub http_addr: Option<SocketAddr>,
    pub watch_namespace: Option<String>,
    /// `None` runs without operator leader election (a single replica).
    pub election: Option<ElectionConfig>,
}

/// A running operator; [`Operator::stop`] shuts it down gracefully.
pub struct Operator {
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
    pub metrics: Arc<Metrics>,
    pub leading: watch::Receiver<bool>,
    pub ready: Arc<AtomicBool>,
}

impl Operator {
    pub async fn start(client: Client, config: OperatorConfig) -> anyhow::Result<Operator> {
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = watch::channel(false);
        let (leading_tx, leading) = watch::channel(config.election.is_none());
        metrics.operator_leader(config.election.is_none());
        let mut tasks = tokio::task::JoinSet::new();

        let watch_nodes = can_list_nodes(&client).await;
        if !watch_nodes {
            tracing::warn!(
                "cannot list Nodes (RBAC); a pod's node readiness will not be considered"
            );
        }

        if let Some(addr) = config.http_addr {
            let listener_state = HttpState {
                metrics: metrics.clone(),
                ready: ready.clone(),
            };
            let mut s = stopped.clone();
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} for /healthz, /readyz and /metrics")
            })?;
            tasks.spawn(async move {
                if let Err(e) = http::serve(listener, listener_state, async move {
                    let _ = s.wait_for(|v| *v).await;
                })
                .await
                {
                    tracing::error!(error = %e, "http server failed");
                }
            });
        }
        if let Some(election) = config.election.clone() {
            tasks.spawn(ha::run(
                client.clone(),
                election,
                leading_tx,
                metrics.clone(),
                stopped.clone(),
            ));
        } else {
            // Keep the sender alive so receivers never see a closed channel.
            tasks.spawn(async move {
                let mut s = stopped.clone();
                let _ = s.wait_for(|v| *v).await;
                drop(leading_tx);
            });
        }
        let mut s = stop.subscribe();
        tasks.spawn(controller::run(
            client,
            Options {
                namespace: config.watch_namespace.clone(),
                watch_nodes,
            },
            metrics.clone(),
            leading.clone(),
            ready.clone(),
            async move {
                let _ = s.wait_for(|v| *v).await;
            },
        ));
        Ok(Operator {
            stop,
            tasks,
            metrics,
            leading,
            ready,
        })
    }

    /// Stops every task; a leader steps down. Bounded so a hung API call cannot hold it up.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("some tasks did not stop within 5s; aborting them");
            self.tasks.abort_all();
        }
    }

    /// Kills the operator without any goodbye, as a crash would: no step-down, nothing flushed.
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }
}

/// Runs until SIGTERM or Ctrl-C.
pub async fn run(client: Client, config: OperatorConfig) -> anyhow::Result<()> {
    let operator = Operator::start(client, config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    operator.stop().await;
    Ok(())
}

async fn can_list_nodes(client: &Client) -> bool {
    Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
        .is_ok()
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
