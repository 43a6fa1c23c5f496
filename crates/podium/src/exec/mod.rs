//! `podium exec -- CMD [ARGS...]`: runs CMD only while this pod leads.
//!
//! - Push mode (the default): the operator POSTs signed role messages ([`server`]); CMD runs
//!   for a term on this process's own clock from a nonce it issued, a renewal extends the term,
//!   and a demotion is answered only once CMD has exited. Tokens are checked by [`verify`],
//!   the command is run by [`child`].
//! - Downward API mode (`--labels-file`): CMD runs while the pod's role label says `leader`
//!   ([`labels`]). No term and no acknowledged demotion: a pod cut off from the API server
//!   keeps running CMD.
pub mod child;
pub mod labels;
pub mod server;
pub mod verify;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use thiserror::Error;

use podium_core::notify::{Identity, Receiver};

use crate::telemetry::LogFormat;

/// The operator's ServiceAccount in the Helm chart's default install.
pub const DEFAULT_OPERATOR: &str = "system:serviceaccount:podium-system:podium";

#[derive(Args, Debug, Clone)]
#[command(
    after_help = "CMD gets PODIUM_ROLE=leader, PODIUM_EPOCH and PODIUM_GROUP in its environment. \
                  It is stopped (SIGTERM to its process group, SIGKILL after --grace) when the pod \
                  is demoted, when its term runs out without a renewal from the operator, and when \
                  podium exec itself gets SIGTERM or SIGINT.\n\n\
                  GET /readyz answers 503 once CMD exited on its own while the pod leads, so a \
                  readiness probe on it hands leadership to another pod. GET /role shows the role, and \
                  the whole state (epoch, term, pid, exits) to a request with the operator's token."
)]
pub struct ExecArgs {
    /// Address to listen on for the operator's role messages, /readyz and /role.
    #[arg(long, env = "PODIUM_LISTEN", default_value = "0.0.0.0:8787")]
    pub listen: SocketAddr,

    /// Path the operator POSTs role messages to.
    #[arg(long, env = "PODIUM_NOTIFY_PATH", default_value = "/podium/notify", value_parser = parse_path)]
    pub path: String,

    /// This pod's name (Downward API `metadata.name`); messages for any other pod are refused.
    #[arg(long, env = "POD_NAME", required_unless_present = "labels_file")]
    pub pod: Option<String>,

    /// This pod's namespace (Downward API `metadata.namespace`); messages for a group in any
    /// other namespace are refused.
    #[arg(long, env = "POD_NAMESPACE", required_unless_present = "labels_file")]
    pub namespace: Option<String>,

    /// This pod's UID (Downward API `metadata.uid`): only tokens minted for this very pod are
    /// taken, so a token captured at any other pod is worthless here.
    #[arg(long, env = "POD_UID", required_unless_present = "labels_file")]
    pub pod_uid: Option<String>,

    /// The ElectionGroup this pod runs CMD for, as NAME or NAMESPACE/NAME (the namespace must be
    /// this pod's); messages for any other group are refused.
    #[arg(long, env = "PODIUM_GROUP_NAME", value_parser = parse_group, required_unless_present = "labels_file")]
    pub group: Option<String>,

    /// The longest term this pod grants CMD without a renewal, whatever a message asks; at most
    /// 1h (the longest ElectionGroup TTL). A shorter one stops CMD sooner when the operator
    /// falls silent.
    #[arg(long, env = "PODIUM_MAX_TERM", default_value = "1h", value_parser = parse_max_term)]
    pub max_term: Duration,

    /// The token subject the operator's messages must carry (its ServiceAccount).
    #[arg(long, env = "PODIUM_OPERATOR", default_value = DEFAULT_OPERATOR)]
    pub operator: String,

    /// How long CMD may take to exit after SIGTERM before it gets SIGKILL (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "PODIUM_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,

    /// How often to refetch the cluster's token keys (/openid/v1/jwks) and issuer; also
    /// refetched, at most once a minute, when a token names an unknown key.
    #[arg(long, env = "PODIUM_JWKS_REFRESH", default_value = "5m", value_parser = parse_refresh)]
    pub jwks_refresh: Duration,

    /// Downward API mode: follow the pod's role label in this file (the kubelet's Downward API
    /// `metadata.labels` file) instead of listening for the operator. No term, no acknowledged
    /// demotion.
    #[arg(long, env = "PODIUM_LABELS_FILE")]
    pub labels_file: Option<PathBuf>,

    /// Downward API mode: the pod's `metadata.annotations` file, for PODIUM_EPOCH.
    #[arg(long, env = "PODIUM_ANNOTATIONS_FILE", requires = "labels_file")]
    pub annotations_file: Option<PathBuf>,

    /// Log format; RUST_LOG sets levels (default info).
    #[arg(long, env = "PODIUM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The command to run while this pod leads, after `--`.
    #[arg(last = true, required = true, num_args = 1.., value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Error, Debug)]
pub enum ExecError {
    #[error(
        "cannot build a Kubernetes client (for the cluster's token keys) from KUBECONFIG or the in-cluster config: {0}"
    )]
    KubeConfig(#[source] kube::config::InferConfigError),
    #[error(
        "cannot build a Kubernetes client (for the cluster's token keys) from the in-cluster config: {0}"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a Kubernetes client: {0}")]
    KubeClient(#[source] kube::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("cannot watch for SIGTERM: {0}")]
    Signals(#[source] std::io::Error),
    #[error(
        "--group {group:?} is in namespace {group_namespace:?}, but this pod is in {namespace:?}: a pod can only run for a group of its own namespace"
    )]
    ForeignGroup {
        group: String,
        group_namespace: String,
        namespace: String,
    },
}

/// Who this pod is, from the flags clap has already required in push mode.
fn identity(args: &ExecArgs) -> Result<Identity, ExecError> {
    let required = "clap requires --pod, --namespace, --pod-uid and --group without --labels-file";
    let namespace = args.namespace.clone().expect(required);
    let group = args.group.clone().expect(required);
    let group = match group.split_once('/') {
        Some((group_namespace, name)) if group_namespace != namespace => {
            return Err(ExecError::ForeignGroup {
                group: format!("{group_namespace}/{name}"),
                group_namespace: group_namespace.into(),
                namespace,
            });
        }
        Some((_, name)) => name.to_string(),
        None => group,
    };
    Ok(Identity {
        namespace,
        group,
        pod: args.pod.clone().expect(required),
        pod_uid: args.pod_uid.clone().expect(required),
    })
}

/// How long `podium exec` keeps answering after its command stopped on SIGTERM, waiting for the
/// operator's demotion: well inside the 30 s a kubelet allows by default.
const LINGER: Duration = Duration::from_secs(2);

/// Runs `podium exec` until SIGTERM or SIGINT; then stops CMD, answers the operator's next
/// message (for at most [`LINGER`]) and returns.
pub async fn run(args: ExecArgs) -> Result<(), ExecError> {
    let argv = match std::env::current_exe() {
        Ok(podium) => child::shimmed(&podium, &args.command),
        Err(e) => {
            tracing::warn!(error = %e, "cannot find this binary: the command will outlive podium exec if it is killed");
            args.command.clone()
        }
    };
    if let Some(labels_file) = &args.labels_file {
        return labels::run(labels::Options {
            labels_file: labels_file.clone(),
            annotations_file: args.annotations_file.clone(),
            argv,
            grace: args.grace,
            poll: labels::POLL,
        })
        .await;
    }
    let identity = identity(&args)?;
    let config = kube_config().await?;
    let client = kube::Client::try_from(config).map_err(ExecError::KubeClient)?;
    let keys = Arc::new(verify::Keys::new(
        client,
        args.operator.clone(),
        identity.audience(),
    ));
    match keys.refresh().await {
        Ok(count) => tracing::info!(keys = count, "read the cluster's token keys"),
        // Not fatal: until the keys can be read, every message is refused, which is safe.
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster's token keys yet; will retry")
        }
    }
    keys.clone().spawn_refresh(args.jwks_refresh);

    let max_term_millis = u64::try_from(args.max_term.as_millis()).unwrap_or(u64::MAX);
    let exec = server::Exec::new(
        argv,
        args.grace,
        Receiver::new(identity.clone(), max_term_millis),
        keys,
    );
    tokio::spawn(exec.clone().term_timer());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| ExecError::Listen {
            addr: args.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(
        %addr,
        path = %args.path,
        pod = %identity.pod,
        pod_uid = %identity.pod_uid,
        group = %identity.group_key(),
        operator = %args.operator,
        command = ?args.command,
        "podium exec: waiting for the operator's role messages; the command runs only while this pod leads"
    );
    let router = exec.router(&args.path);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ExecError::Signals)?;
    let mut serve = tokio::spawn(server::serve(listener, router, server::MAX_CONNECTIONS));
    tokio::select! {
        served = &mut serve => {
            return match served {
                Ok(never) => match never {},
                Err(source) => Err(ExecError::Serve { addr, source }),
            };
        }
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping the command"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping the command"),
    }
    // Keep answering while the command stops and a little after: the operator's demotion,
    // answered "not running", lets it activate the next leader at once.
    exec.shutdown().await;
    exec.linger(LINGER).await;
    serve.abort();
    tracing::info!("podium exec: done");
    Ok(())
}

/// The pod's own ServiceAccount when it runs in a cluster, else KUBECONFIG: inside a pod,
/// a KUBECONFIG that happens to be in the image must not decide whose keys are believed.
async fn kube_config() -> Result<kube::Config, ExecError> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::path::Path::new(SERVICE_ACCOUNT_TOKEN).exists()
    {
        return kube::Config::incluster().map_err(ExecError::InCluster);
    }
    kube::Config::infer().await.map_err(ExecError::KubeConfig)
}

const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

fn parse_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.contains(char::is_whitespace) || s == "/readyz" || s == "/role" {
        return Err(format!(
            "{s:?} must start with '/', hold no spaces, and not be /readyz or /role"
        ));
    }
    Ok(s.to_string())
}

fn parse_group(s: &str) -> Result<String, String> {
    let name = match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() => name,
        Some(_) => "",
        None => s,
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!("{s:?} is not NAME or NAMESPACE/NAME"));
    }
    Ok(s.to_string())
}

fn parse_max_term(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let max = Duration::from_millis(podium_core::notify::MAX_TERM_MILLIS);
    if d.is_zero() || d > max {
        return Err(format!("{s:?}: the term must be above 0 and at most 1h"));
    }
    Ok(d)
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let millis = match unit {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn parse_refresh(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(format!("{s:?}: refresh at most every 10s"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<ExecArgs, clap::Error> {
        let mut argv = vec!["podium", "exec"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Exec(args)) => Ok(args),
            other => panic!("expected exec, got {other:?}"),
        }
    }

    /// The identity flags the Downward API gives a pod, for the tests that are about others.
    const WHO: [&str; 8] = [
        "--pod",
        "p0",
        "--namespace",
        "ns",
        "--pod-uid",
        "u0",
        "--group",
        "g",
    ];

    /// `args` after the identity flags, less those `args` sets itself.
    fn with_identity(args: &[&'static str]) -> Vec<&'static str> {
        let mut all: Vec<&str> = WHO
            .chunks(2)
            .filter(|pair| !args.contains(&pair[0]))
            .flatten()
            .copied()
            .collect();
        all.extend_from_slice(args);
        all
    }

    #[test]
    fn flags_parse() {
        let args = parse(&with_identity(&[
            "--listen",
            "127.0.0.1:9000",
            "--grace",
            "500ms",
            "--max-term",
            "30s",
            "--",
            "sleep",
            "10",
        ]))
        .unwrap();
        assert_eq!(args.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(args.pod.as_deref(), Some("p0"));
        assert_eq!(args.group.as_deref(), Some("g"));
        assert_eq!(args.grace, Duration::from_millis(500));
        assert_eq!(args.max_term, Duration::from_secs(30));
        assert_eq!(args.path, "/podium/notify");
        assert_eq!(args.operator, DEFAULT_OPERATOR);
        assert_eq!(args.jwks_refresh, Duration::from_secs(300));
        assert_eq!(args.command, ["sleep", "10"]);
        let identity = identity(&args).unwrap();
        assert_eq!(identity.group_key(), "ns/g");
        assert_eq!(identity.audience(), "podium.dev/notify/ns/g/u0");
    }

    #[test]
    fn the_group_is_named_in_the_pods_own_namespace() {
        let mut args = parse(&with_identity(&["--", "x"])).unwrap();
        args.group = Some("ns/g".into());
        assert_eq!(identity(&args).unwrap().group, "g");
        args.group = Some("other/g".into());
        let err = identity(&args).unwrap_err().to_string();
        assert!(err.contains("namespace \"other\""), "{err}");
    }

    #[test]
    fn bad_flags_and_a_missing_command_are_refused_with_a_message() {
        for (args, expected) in [
            (&[][..], "CMD"),
            (&["--"][..], "CMD"),
            (&["--group", "ns/", "--", "x"][..], "NAMESPACE/NAME"),
            (&["--group", "a/b/c", "--", "x"][..], "NAMESPACE/NAME"),
            (&["--grace", "10y", "--", "x"][..], "unit"),
            (&["--max-term", "2h", "--", "x"][..], "at most 1h"),
            (&["--max-term", "0s", "--", "x"][..], "above 0"),
            (&["--path", "notify", "--", "x"][..], "must start with '/'"),
            (&["--jwks-refresh", "1s", "--", "x"][..], "10s"),
            (&["--listen", "nowhere", "--", "x"][..], "--listen"),
            (
                &["--annotations-file", "/a", "--", "x"][..],
                "--labels-file",
            ),
        ] {
            let err = parse(&with_identity(args)).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_pods_identity_is_needed_except_in_downward_api_mode() {
        // None of these is set under `cargo test`.
        for (flag, env) in [
            ("--pod", "POD_NAME"),
            ("--namespace", "POD_NAMESPACE"),
            ("--pod-uid", "POD_UID"),
            ("--group", "PODIUM_GROUP_NAME"),
        ] {
            if std::env::var_os(env).is_some() {
                continue;
            }
            let without: Vec<&str> = WHO
                .chunks(2)
                .filter(|pair| pair[0] != flag)
                .flatten()
                .copied()
                .chain(["--", "x"])
                .collect();
            let err = parse(&without).unwrap_err().to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
        assert!(parse(&["--labels-file", "/etc/podinfo/labels", "--", "x"]).is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
