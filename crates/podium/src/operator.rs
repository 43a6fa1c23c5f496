//! `podium run`: the controller, the HTTP server and the operator's own election, together,
//! until SIGTERM or Ctrl-C, then a graceful stop that releases the operator Lease. If any of
//! them ends on its own, the process exits non-zero so that the Pod restarts instead of running
//! half alive.

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
    /// The operator's own ServiceAccount (`namespace`, `name`), whose tokens sign role
    /// notifications; `None` sends none.
    pub service_account: Option<(String, String)>,
}

/// A running operator; [`Operator::stop`] shuts it down gracefully.
pub struct Operator {
    stop: watch::Sender<bool>,
    /// Each task returns its name when it ends.
    tasks: tokio::task::JoinSet<&'static str>,
    pub metrics: Arc<Metrics>,
    pub leading: watch::Receiver<bool>,
    pub ready: Arc<AtomicBool>,
    /// Readiness turns false through this as soon as shutdown begins.
    stopping: Arc<AtomicBool>,
    /// The HTTP server stops last, so that probes see the shutdown.
    stop_http: watch::Sender<bool>,
    /// The operator Lease is released only once the controller has drained.
    stop_election: watch::Sender<bool>,
    controller_done: watch::Receiver<bool>,
}

impl Operator {
    pub async fn start(client: Client, config: OperatorConfig) -> anyhow::Result<Operator> {
        Self::start_with(client, config, Arc::new(Metrics::new())).await
    }

    /// The operator as `podium run` starts it: its client for `kube_config` records every
    /// request in the metrics that `/metrics` serves.
    pub async fn connect(
        kube_config: kube::Config,
        config: OperatorConfig,
    ) -> anyhow::Result<Operator> {
        let metrics = Arc::new(Metrics::new());
        let client = metrics
            .client_requests()
            .client_for(kube_config)
            .context("cannot build a Kubernetes client")?;
        Self::start_with(client, config, metrics).await
    }

    /// [`Operator::start`] recording into `metrics`, which `client` may write to as well.
    pub async fn start_with(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Operator> {
        let ready = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let (stop, _) = watch::channel(false);
        let (stop_http, http_stopped) = watch::channel(false);
        let (leading_tx, leading) = watch::channel(config.election.is_none());
        let (claim_tx, claim) = watch::channel(if config.election.is_none() {
            ha::Claim::Unconditional
        } else {
            ha::Claim::None
        });
        // The election stops after the controller has drained (see `stop`).
        let (stop_election, election_stopped) = watch::channel(false);
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
                stopping: stopping.clone(),
            };
            let mut s = http_stopped;
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
                "the HTTP server"
            });
        }
        if let Some(election) = config.election.clone() {
            let election = ha::run(
                client.clone(),
                election,
                leading_tx,
                claim_tx,
                metrics.clone(),
                election_stopped,
            );
            tasks.spawn(async move {
                election.await;
                "the operator's own leader election"
            });
        } else {
            // Keep the sender alive so receivers never see a closed channel.
            tasks.spawn(async move {
                let mut s = election_stopped;
                let _ = s.wait_for(|v| *v).await;
                drop((leading_tx, claim_tx));
                "the leadership channel"
            });
        }
        let mut s = stop.subscribe();
        let controller = controller::run(
            client,
            Options {
                namespace: config.watch_namespace.clone(),
                watch_nodes,
                service_account: config.service_account.clone(),
            },
            metrics.clone(),
            leading.clone(),
            claim,
            ready.clone(),
            async move {
                let _ = s.wait_for(|v| *v).await;
            },
        );
        let (controller_done_tx, controller_done) = watch::channel(false);
        tasks.spawn(async move {
            controller.await;
            controller_done_tx.send_replace(true);
            "the controller"
        });
        Ok(Operator {
            stop,
            tasks,
            metrics,
            leading,
            ready,
            stopping,
            stop_http,
            stop_election,
            controller_done,
        })
    }

    /// Waits until one of the operator's tasks ends on its own, which is always a failure
    /// while no stop was asked for; says which one.
    pub async fn failed(&mut self) -> anyhow::Error {
        first_to_end(&mut self.tasks).await
    }

    /// Stops every task; a leader steps down. Bounded so a hung API call cannot hold it up.
    /// Readiness turns false first, so that no Service sends this replica more work.
    pub async fn stop(mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.stop.send(true);
        let mut controller_done = self.controller_done.clone();
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            // No reconcile may still be writing when the operator Lease goes: a standby would
            // act at once, and two replicas would be writing.
            let _ = controller_done.wait_for(|done| *done).await;
            let _ = self.stop_election.send(true);
            let other_tasks = usize::from(self.stop_http.receiver_count() > 0);
            while self.tasks.len() > other_tasks {
                if self.tasks.join_next().await.is_none() {
                    break;
                }
            }
            let _ = self.stop_http.send(true);
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

/// The runtime `podium run` runs on, and the bench's operator child too, so that the bench
/// measures what ships. With one thread it is tokio's current-thread runtime: the reconciles
/// are short and wait on the API server, and with two worker threads a fifth of the steady
/// state's CPU went to waking one thread from the other (1000 groups: 0.51 ms of CPU per
/// renewal on two threads, 0.40 ms on one; bench/results/2026-12-06-scale-*.md).
pub fn runtime(worker_threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(worker_threads));
        builder
    };
    builder.enable_all().build()
}

/// Runs until SIGTERM or Ctrl-C, or until a task fails (an error, so the process exits non-zero).
pub async fn run(kube_config: kube::Config, config: OperatorConfig) -> anyhow::Result<()> {
    let mut operator = Operator::connect(kube_config, config).await?;
    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        failure = operator.failed() => Err(failure.context("exiting so that the pod restarts")),
    };
    match &outcome {
        Ok(()) => tracing::info!("shutting down"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "shutting down after a failure"),
    }
    operator.stop().await;
    outcome
}

/// The first task to end, as the failure it is.
async fn first_to_end(tasks: &mut tokio::task::JoinSet<&'static str>) -> anyhow::Error {
    match tasks.join_next().await {
        Some(Ok(task)) => anyhow::anyhow!("{task} stopped unexpectedly"),
        Some(Err(e)) if e.is_panic() => anyhow::anyhow!("an operator task panicked: {e}"),
        Some(Err(e)) => anyhow::anyhow!("an operator task was cancelled: {e}"),
        None => anyhow::anyhow!("the operator has no tasks left"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::task::JoinSet;

    #[tokio::test]
    async fn a_task_that_ends_or_panics_is_named_as_the_failure() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async {
            std::future::pending::<()>().await;
            "the controller"
        });
        tasks.spawn(async { "the HTTP server" });
        let failure = first_to_end(&mut tasks).await.to_string();
        assert_eq!(failure, "the HTTP server stopped unexpectedly");

        tasks.spawn(async { panic!("boom") });
        let failure = first_to_end(&mut tasks).await.to_string();
        assert!(failure.contains("panicked"), "{failure}");
        tasks.abort_all();
    }
}
