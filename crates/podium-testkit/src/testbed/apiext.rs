//! A Kubernetes 1.36 `apiextensions-apiserver` next to a v1.20 [`Testbed`], for the CRD's
//! modern API semantics: CEL rules (`x-kubernetes-validations`), defaults, server-side apply and
//! printer columns as current apiservers implement them.
//!
//! It runs on its own etcd and delegates authentication and authorization to the testbed's
//! kube-apiserver (see `docs/apiext-recipe.md`), so the testbed's admin certificate works on
//! both. The server serves only `/apis/apiextensions.k8s.io` and the CRDs' groups: there is no
//! `/api` and no core types, so use typed [`kube::Api`]s (no discovery). Namespaces are looked up
//! in the testbed: create them there ([`Testbed::create_namespace`]).
//!
//! The binary is `apiextensions-apiserver-1.36`, built by `scripts/install-apiext.sh` (which
//! `scripts/install-deps.sh` runs) and found like the others by [`find_binary`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use podium_testkit::testbed::{Testbed, apiext::ApiextServer};
//! let server = ApiextServer::start(Testbed::shared()).await?;
//! let client = server.client()?;
//! # Ok(()) }
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;

use super::process::{ManagedProcess, free_port, lost_port_race};
use super::{
    DIR_PREFIX, DirGuard, KEEP_MARKER, START_ATTEMPTS, Testbed, find_binary, path_str, server_url,
    start_etcd,
};

/// The file name of the 1.36 server in the binary directory.
pub const BINARY: &str = "apiextensions-apiserver-1.36";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running 1.36 apiextensions-apiserver and its etcd. Both are killed on drop (and, like every
/// testbed process, when the test process dies); the temporary directory is removed unless
/// `PODIUM_KEEP_TESTBED` is set.
pub struct ApiextServer {
    dir: PathBuf,
    keep: bool,
    port: u16,
    config: kube::Config,
    kubeconfig: PathBuf,
    server: Option<ManagedProcess>,
    etcd: Option<ManagedProcess>,
}

impl ApiextServer {
    /// Starts a second etcd and the 1.36 server delegating to `testbed`, and waits until
    /// `/readyz` answers `ok` (about a second). Fails, naming `scripts/install-deps.sh`, when the
    /// binary is not installed.
    pub async fn start(testbed: &Testbed) -> Result<ApiextServer> {
        let started = Instant::now();
        let bin = find_binary(BINARY).with_context(|| {
            format!(
                "the Kubernetes 1.36 CRD server `{BINARY}` is not installed: run \
                 scripts/install-deps.sh (it runs scripts/install-apiext.sh, 4 to 7 minutes once)"
            )
        })?;
        let etcd_bin = find_binary("etcd")?;

        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-apiext-", std::process::id()))
            .tempdir()
            .context("creating the apiext directory")?
            .keep();
        let keep =
            std::env::var_os("PODIUM_KEEP_TESTBED").is_some_and(|v| !v.is_empty() && v != "0");
        let mut dir_guard = DirGuard {
            dir: Some(dir.clone()),
            keep,
        };
        if keep {
            fs::write(
                dir.join(KEEP_MARKER),
                "kept because PODIUM_KEEP_TESTBED is set\n",
            )?;
        }
        fs::create_dir_all(dir.join("logs")).context("creating the log directory")?;

        let (etcd, etcd_url) = start_etcd(&dir, &etcd_bin).await?;

        let pki = &testbed.pki;
        let kubeconfig = path_str(testbed.kubeconfig_path())?;
        let log = dir.join("logs/apiextensions-apiserver.log");
        let mut attempt = 0;
        let (server, port, config) = loop {
            attempt += 1;
            let port = free_port()?;
            let mut args = super::requestheader_flags(pki)?;
            args.extend([
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".to_string(),
                // The testbed's serving certificate: signed by its CA, valid for 127.0.0.1.
                format!("--tls-cert-file={}", path_str(&pki.server_cert)?),
                format!("--tls-private-key-file={}", path_str(&pki.server_key)?),
                format!("--cert-dir={}", path_str(&dir.join("certs"))?),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--kubeconfig={kubeconfig}"),
                "--authentication-skip-lookup".to_string(),
                // Needed with the skip-lookup: without it client certificates are not checked
                // and every request runs as anonymous.
                format!("--client-ca-file={}", path_str(&pki.ca_cert)?),
                // Their informers list APIs that v1.20 lacks; the server would never be ready.
                "--disable-admission-plugins=MutatingAdmissionPolicy,ValidatingAdmissionPolicy,\
                 MutatingAdmissionWebhook,ValidatingAdmissionWebhook"
                    .to_string(),
                "--enable-priority-and-fairness=false".to_string(),
                "--profiling=false".to_string(),
            ]);
            let mut config = testbed.config();
            config.cluster_url = server_url("127.0.0.1", port)
                .parse()
                .context("parsing the apiext server URL")?;
            match launch(&bin, &args, &log, &config).await {
                Ok(process) => break (process, port, config),
                Err(e) if attempt < START_ATTEMPTS && lost_port_race(&log) => {
                    eprintln!("podium apiext: lost a port race, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        };

        // The testbed's admin kubeconfig, aimed at this server, so that real kubectl and helm
        // can talk to it.
        let kubeconfig = dir.join("kubeconfig");
        let admin = fs::read_to_string(testbed.kubeconfig_path())
            .context("reading the testbed's kubeconfig")?;
        fs::write(
            &kubeconfig,
            admin.replace(&testbed.server_url(), &server_url("127.0.0.1", port)),
        )
        .context("writing the apiext kubeconfig")?;

        dir_guard.dir = None;
        let server = ApiextServer {
            dir,
            keep,
            port,
            config,
            kubeconfig,
            server: Some(server),
            etcd: Some(etcd),
        };
        eprintln!(
            "podium apiext: Kubernetes 1.36 apiextensions-apiserver ready in {:.1}s at {} (logs: {})",
            started.elapsed().as_secs_f64(),
            server.server_url(),
            server.log_dir().display()
        );
        Ok(server)
    }

    /// A fresh admin client for the 1.36 server (the testbed's admin identity). Fresh on every
    /// call, for the same reason as [`Testbed::client`].
    pub fn client(&self) -> Result<Client> {
        Client::try_from(self.config()).context("building a client for the apiext server")
    }

    /// The admin client configuration.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A kubeconfig file with the admin identity, for kubectl and helm.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        server_url("127.0.0.1", self.port)
    }

    /// Where `etcd.log` and `apiextensions-apiserver.log` are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

/// The APIService name for podium's API group, and the Service it points to.
pub const APISERVICE: &str = "v1alpha1.podium.dev";
const AGGREGATED_SERVICE: &str = "podium-apiext-136";
const AVAILABLE_TIMEOUT: Duration = Duration::from_secs(30);

impl ApiextServer {
    /// Registers this server with `testbed`'s kube-aggregator as the APIService for
    /// `podium.dev/v1alpha1`, so that the testbed proxies every request for that group here,
    /// and waits until the aggregator calls it Available.
    ///
    /// The testbed must not serve `podium.dev` itself (no podium CRD installed there): its CRD
    /// autoregistration would claim the same APIService. The Service is an ExternalName one for
    /// 127.0.0.1, which kube-aggregator resolves without endpoints (endpoints may not be
    /// loopback addresses); TLS is not verified because the aggregator checks the certificate
    /// against `<service>.<namespace>.svc`, a name the testbed's serving certificate lacks.
    pub async fn aggregate_into(&self, testbed: &Testbed) -> Result<()> {
        let client = testbed.try_client()?;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let service: Service = serde_json::from_value(json!({
            "metadata": { "name": AGGREGATED_SERVICE },
            "spec": {
                "type": "ExternalName",
                "externalName": "127.0.0.1",
                "ports": [{ "name": "https", "port": self.port, "protocol": "TCP" }],
            },
        }))?;
        services
            .create(&PostParams::default(), &service)
            .await
            .context("creating the ExternalName Service for the 1.36 server")?;
        let apiservices: Api<APIService> = Api::all(client);
        let apiservice: APIService = serde_json::from_value(json!({
            "metadata": { "name": APISERVICE },
            "spec": {
                "group": "podium.dev",
                "version": "v1alpha1",
                "service": { "namespace": "default", "name": AGGREGATED_SERVICE, "port": self.port },
                "insecureSkipTLSVerify": true,
                "groupPriorityMinimum": 1000,
                "versionPriority": 15,
            },
        }))?;
        apiservices
            .create(&PostParams::default(), &apiservice)
            .await
            .context("registering the 1.36 server as an APIService")?;
        let started = Instant::now();
        loop {
            let current = apiservices.get(APISERVICE).await?;
            let available = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Available"))
                .cloned();
            if available.as_ref().is_some_and(|c| c.status == "True") {
                eprintln!(
                    "podium apiext: aggregated as {APISERVICE} in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            if started.elapsed() > AVAILABLE_TIMEOUT {
                bail!(
                    "APIService {APISERVICE} not Available after {}s: {:?} (logs: {})",
                    AVAILABLE_TIMEOUT.as_secs(),
                    available,
                    self.log_dir().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ApiextServer {
    fn drop(&mut self) {
        for process in [self.server.take(), self.etcd.take()].into_iter().flatten() {
            let mut process = process;
            process.kill();
        }
        DirGuard {
            dir: Some(self.dir.clone()),
            keep: self.keep,
        }
        .cleanup();
    }
}

async fn launch(
    bin: &Path,
    args: &[String],
    log: &Path,
    config: &kube::Config,
) -> Result<ManagedProcess> {
    super::launch_until_ready(
        "apiextensions-apiserver",
        bin,
        args,
        log,
        config,
        READY_TIMEOUT,
    )
    .await
}
