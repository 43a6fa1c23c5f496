//! Command-line interface. Every `run` flag can also come from the environment, which is how
//! the Helm chart configures the operator.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::ha::{ElectionConfig, OPERATOR_LEASE};
use crate::operator::OperatorConfig;
use crate::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "podium",
    version,
    about = "Leader election as a service for Kubernetes pods",
    long_about = "Podium elects one leader among the pods an ElectionGroup selects, records it in a \
                  coordination.k8s.io Lease, and labels it podium.dev/role=leader (the others \
                  podium.dev/role=follower), so a Service selecting that label routes to the leader only.\n\n\
                  Without a subcommand, podium runs the operator."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator against the current kubeconfig or in-cluster config (the default).
    Run(RunArgs),
    /// Print the ElectionGroup CustomResourceDefinition as YAML.
    Crd,
    /// Hand a group's leadership to another pod, once (also `kubectl podium switchover`).
    Switchover(SwitchoverArgs),
    /// Show groups: leader, epoch, members, the last change and conditions (also `kubectl podium status`).
    Status(StatusArgs),
    /// Run CMD only while this pod leads: `podium exec [FLAGS] -- CMD [ARGS...]` (in your app's image).
    Exec(crate::exec::ExecArgs),
    /// Internal: how `podium exec` starts CMD, so that CMD dies with it.
    #[command(name = "exec-shim", hide = true)]
    ExecShim(crate::exec::child::ShimArgs),
}

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "The request is recorded in the group's podium.dev/switchover annotation; the operator \
                  carries it out once and records the outcome in status.lastSwitchover. Refused when \
                  the target is not an eligible member, the group is paused, or spec.preferredLeader \
                  would take leadership back."
)]
pub struct SwitchoverArgs {
    /// The group: NAMESPACE/GROUP, or GROUP in the namespace of --namespace or the kubeconfig.
    pub group: String,

    /// The pod to hand over to [default: the best other eligible pod].
    #[arg(long)]
    pub to: Option<String>,

    /// Wait for the outcome, print it, and exit non-zero if the switchover was refused.
    #[arg(long)]
    pub wait: bool,

    /// How long --wait waits for the operator, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    /// Namespace of GROUP when it has none [default: the kubeconfig's].
    #[arg(short, long)]
    pub namespace: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// NAMESPACE/GROUP or GROUP [default: every group in every namespace, or in --namespace].
    pub group: Option<String>,

    /// Namespace of GROUP, or the only namespace to list.
    #[arg(short, long)]
    pub namespace: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Elect one active replica through the Lease `podium-operator` [default: true in a cluster, false elsewhere].
    #[arg(long, env = "PODIUM_LEADER_ELECT", num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: Option<bool>,

    /// Namespace of the operator's own Lease [default: the pod's namespace, else "default"].
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the operator's own Lease.
    #[arg(long, env = "PODIUM_LEADER_ELECTION_ID", default_value = OPERATOR_LEASE)]
    pub leader_election_id: String,

    /// This replica's identity in the operator Lease [default: the pod name, else host name and PID].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Lifetime of the operator's own Lease, in seconds.
    #[arg(long, env = "PODIUM_LEADER_ELECTION_TTL", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub leader_election_ttl: u64,

    /// Manage ElectionGroups in this namespace only (needs only a Role there) [default: all namespaces].
    #[arg(long, env = "PODIUM_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "PODIUM_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// The operator's own ServiceAccount as NAMESPACE/NAME, whose tokens sign role notifications (the chart sets it) [default: none; groups with spec.notify then get no notifications].
    #[arg(long, env = "PODIUM_SERVICE_ACCOUNT", value_parser = parse_service_account)]
    pub service_account: Option<(String, String)>,

    /// Log format; RUST_LOG sets levels (default info).
    #[arg(long, env = "PODIUM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Threads that run the operator. One costs the least CPU per renewal; more can help with
    /// many thousands of groups on a node with cores to spare.
    #[arg(long, env = "PODIUM_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,
}

impl Default for RunArgs {
    fn default() -> Self {
        // Parsing no arguments applies the defaults and the environment, as `podium` alone does.
        RunArgs::from_env()
    }
}

#[derive(Parser)]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

impl RunArgs {
    pub fn from_env() -> RunArgs {
        RunOnly::parse_from(["podium"]).args
    }

    pub fn operator_config(&self) -> OperatorConfig {
        let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        let election = self
            .leader_elect
            .unwrap_or(in_cluster)
            .then(|| ElectionConfig {
                namespace: self
                    .leader_election_namespace
                    .clone()
                    .or_else(in_cluster_namespace)
                    .unwrap_or_else(|| "default".into()),
                lease_name: self.leader_election_id.clone(),
                identity: self.identity.clone().unwrap_or_else(default_identity),
                lease_ttl: Duration::from_secs(self.leader_election_ttl),
            });
        OperatorConfig {
            http_addr: Some(self.http_addr),
            watch_namespace: self.watch_namespace.clone().filter(|n| !n.is_empty()),
            election,
            service_account: self.service_account.clone(),
        }
    }
}

fn parse_service_account(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok((namespace.to_string(), name.to_string()))
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

fn in_cluster_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "podium".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_flags_parse() {
        let cli = Cli::parse_from([
            "podium",
            "run",
            "--leader-elect",
            "--watch-namespace",
            "team-a",
            "--http-addr",
            "127.0.0.1:9000",
        ]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        let config = args.operator_config();
        assert!(config.election.is_some());
        assert_eq!(config.watch_namespace.as_deref(), Some("team-a"));
        assert_eq!(config.http_addr, Some("127.0.0.1:9000".parse().unwrap()));
        let cli = Cli::parse_from(["podium", "run", "--leader-elect=false"]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        assert!(args.operator_config().election.is_none());
    }

    #[test]
    fn bad_ttl_is_refused_with_a_message() {
        let err = Cli::try_parse_from(["podium", "run", "--leader-election-ttl", "0"]).unwrap_err();
        assert!(err.to_string().contains("leader-election-ttl"), "{err}");
    }
}
