//! A real local Kubernetes control plane for tests, the demo and benchmarks: etcd,
//! kube-apiserver and kube-controller-manager on loopback ports, with generated certificates and
//! RBAC switched on. There is no kubelet and no scheduler; [`kubelet`] plays both.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let testbed = podium_testkit::testbed::Testbed::shared();
//! let ns = testbed.create_namespace("my-test").await?;
//! let client = testbed.client();
//! # Ok(()) }
//! ```
//!
//! The control plane is Kubernetes v1.20: EndpointSlices are served only as
//! `discovery.k8s.io/v1beta1` and PodDisruptionBudgets only as `policy/v1beta1`, which
//! k8s-openapi's `latest` types do not cover; see [`endpointslice_resource`] and
//! [`pdb_resource`].
//!
//! Environment:
//! - `PODIUM_BIN_DIR`, `PODIUM_CACHE`: where the binaries are (see [`find_binary`]).
//! - `PODIUM_KEEP_TESTBED`: keep the temporary directory (certificates, logs, etcd data) for
//!   inspection instead of deleting it.
//!
//! [`node::RealNode`] runs the same control plane configured for a real node beside it
//! (containerd, kubelet, kube-scheduler, kube-proxy), for the end-to-end suite, and
//! [`service_traffic`] installs the chart and the examples there and loops a client through the
//! leader Service (the suite and `podium-bench --real-node`).

pub mod apiext;
mod certs;
pub mod kubelet;
pub mod node;
mod process;
pub mod service_traffic;

use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, CustomResourceExt};

pub use kubelet::{
    Kubelet, KubeletOptions, SliceEndpoint, bind_pod, create_node, endpointslice_addresses,
    endpointslice_endpoints, endpointslice_resource, finalize_deletion, next_pod_ip, pdb_resource,
    run_pods, set_node_ready, set_pod_not_ready, set_pod_running_ready,
};

use certs::{ClientIdentity, Pki};
use process::{ManagedProcess, free_port, lost_port_race};

const INSTALL_HINT: &str = "run scripts/install-deps.sh to install etcd, kube-apiserver, \
     kube-controller-manager, kubectl and helm into ~/.cache/podium/bin (or set PODIUM_BIN_DIR to \
     a directory that holds them)";

/// Prefix of every testbed's temporary directory; the pid that follows lets a later run tell
/// whether the owner is still alive.
const DIR_PREFIX: &str = "podium-testbed-";
/// Marker file in a directory kept with `PODIUM_KEEP_TESTBED`, so that no later run deletes it.
const KEEP_MARKER: &str = "KEEP";

const ETCD_TIMEOUT: Duration = Duration::from_secs(30);
const APISERVER_TIMEOUT: Duration = Duration::from_secs(90);
const CONTROLLER_MANAGER_TIMEOUT: Duration = Duration::from_secs(60);
const CRD_TIMEOUT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Attempts per component when its port was taken between picking and binding it.
const START_ATTEMPTS: u32 = 3;

/// Finds one of podium's external binaries (`etcd`, `kube-apiserver`, `kube-controller-manager`,
/// `kubectl`, `helm`): in `$PODIUM_BIN_DIR`, then `$PODIUM_CACHE/bin` (default
/// `~/.cache/podium/bin`), then `PATH`. The error tells the user how to install them.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') {
        bail!("invalid binary name {name:?}");
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("PODIUM_BIN_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    if let Some(cache) = std::env::var_os("PODIUM_CACHE").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(cache).join("bin"));
    } else if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(home).join(".cache/podium/bin"));
    }
    for dir in &dirs {
        let candidate = dir.join(name);
        if process::is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    if let Some(found) = process::find_in_path(name) {
        return Ok(found);
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "cannot find `{name}` (looked in {} and PATH): {INSTALL_HINT}",
        searched.join(", ")
    )
}

/// A running control plane. Everything stops, and the temporary directory goes away, on drop.
pub struct Testbed {
    dir: PathBuf,
    keep: bool,
    pki: Pki,
    config: kube::Config,
    kubeconfig: PathBuf,
    /// The address the apiserver listens on: 127.0.0.1, or the node bridge's address for a
    /// real node (pods must reach it).
    host: &'static str,
    apiserver_port: u16,
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    etcd: Mutex<Option<ManagedProcess>>,
    apiserver: Mutex<Option<ManagedProcess>>,
    controller_manager: Mutex<Option<ManagedProcess>>,
    /// Serialises stop/start so that two callers cannot race two apiservers onto one port.
    apiserver_lifecycle: tokio::sync::Mutex<()>,
    identities: AtomicU64,
}

static SHARED: OnceLock<std::result::Result<Testbed, String>> = OnceLock::new();

impl Testbed {
    /// Starts a private control plane (a few seconds). Tests should prefer [`Testbed::shared`];
    /// a private one is for tests that disrupt the control plane (e.g.
    /// [`Testbed::stop_apiserver`]) and for the demo.
    pub async fn start() -> Result<Testbed> {
        Self::start_in(Mode::Loopback).await
    }

    async fn start_in(mode: Mode) -> Result<Testbed> {
        let started = Instant::now();
        let etcd_bin = find_binary("etcd")?;
        let apiserver_bin = find_binary("kube-apiserver")?;
        let controller_manager_bin = find_binary("kube-controller-manager")?;
        remove_stale_dirs();

        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the testbed directory")?
            .keep();
        let keep =
            std::env::var_os("PODIUM_KEEP_TESTBED").is_some_and(|v| !v.is_empty() && v != "0");
        // Processes started below are `ManagedProcess`es that die when dropped, so an early
        // return cleans them up; this guard does the same for the directory.
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

        let pki = Pki::generate(&dir.join("pki"))?;
        let admin = pki.issue_client("admin", "podium-admin", &["system:masters"])?;
        let controller_manager_identity = pki.issue_client(
            "controller-manager",
            "system:kube-controller-manager",
            &["system:masters"],
        )?;
        // kube-aggregator's identity towards aggregated API servers (testbed::apiext).
        let front_proxy = pki.issue_client(FRONT_PROXY_CLIENT, FRONT_PROXY_CLIENT, &[])?;

        let host = mode.host();
        let mut mode_flags = Vec::new();
        if mode == Mode::Node {
            // The node's pods need what a test-only control plane switches off; see
            // docs/real-node-recipe.md, "Startup, in order", step 3.
            fs::write(dir.join(node::MARKER), "a real node ran here\n")?;
            let kubelet_client = pki.issue_client(
                "apiserver-kubelet-client",
                "kube-apiserver-kubelet-client",
                &["system:masters"],
            )?;
            mode_flags = vec![
                "--authorization-mode=Node,RBAC".to_string(),
                "--enable-admission-plugins=NodeRestriction".to_string(),
                format!(
                    "--kubelet-client-certificate={}",
                    path_str(&kubelet_client.cert)?
                ),
                format!("--kubelet-client-key={}", path_str(&kubelet_client.key)?),
                // Otherwise exec and logs look the node's name up in the machine's DNS.
                "--kubelet-preferred-address-types=InternalIP".to_string(),
            ];
        }

        let (etcd, etcd_url) = start_etcd(&dir, &etcd_bin).await?;

        let mut attempt = 0;
        let (apiserver, apiserver_port, apiserver_args, config) = loop {
            attempt += 1;
            let port = free_port()?;
            let args =
                apiserver_flags(&dir, &pki, &front_proxy, &etcd_url, host, port, &mode_flags)?;
            let config = client_config(&server_url(host, port), &pki, &admin)?;
            let log = dir.join("logs/kube-apiserver.log");
            match launch_apiserver(&apiserver_bin, &args, &log, &config).await {
                Ok(process) => break (process, port, args, config),
                Err(e) if attempt < START_ATTEMPTS && lost_port_race(&log) => {
                    eprintln!("podium testbed: kube-apiserver lost a port race, retrying: {e:#}");
                }
                Err(e) => return Err(e),
            }
        };

        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &server_url(host, apiserver_port),
            &pki.ca_cert,
            &admin,
        )?;
        let cm_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_kubeconfig(
            &cm_kubeconfig,
            &server_url(host, apiserver_port),
            &pki.ca_cert,
            &controller_manager_identity,
        )?;
        let controller_manager =
            start_controller_manager(&dir, &controller_manager_bin, &cm_kubeconfig, &pki, &config)
                .await?;

        dir_guard.dir = None;
        let testbed = Testbed {
            dir,
            keep,
            pki,
            config,
            kubeconfig,
            host,
            apiserver_port,
            apiserver_bin,
            apiserver_args,
            etcd: Mutex::new(Some(etcd)),
            apiserver: Mutex::new(Some(apiserver)),
            controller_manager: Mutex::new(Some(controller_manager)),
            apiserver_lifecycle: tokio::sync::Mutex::new(()),
            identities: AtomicU64::new(0),
        };
        eprintln!(
            "podium testbed: control plane ready in {:.1}s at {} (kubeconfig: {}, logs: {})",
            started.elapsed().as_secs_f64(),
            testbed.server_url(),
            testbed.kubeconfig.display(),
            testbed.log_dir().display()
        );
        Ok(testbed)
    }

    /// The control plane shared by every test of this test binary, started on first use.
    ///
    /// It is never dropped (statics are not), but it cannot outlive the process: its children
    /// get SIGKILL when the process exits, and the next run removes its temporary directory.
    /// Works from inside or outside a Tokio runtime: startup runs on its own thread and runtime,
    /// so the shared instance is tied to no test's runtime.
    ///
    /// # Panics
    /// If the control plane cannot start (e.g. the binaries are not installed), with the reason
    /// and the install hint, so that a test fails rather than passes vacuously. Use
    /// [`Testbed::try_shared`] to handle that instead.
    pub fn shared() -> &'static Testbed {
        match Self::try_shared() {
            Ok(testbed) => testbed,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Testbed::shared`], returning the startup error (the same one to every caller).
    pub fn try_shared() -> Result<&'static Testbed> {
        SHARED
            .get_or_init(|| {
                let startup = std::thread::Builder::new()
                    .name("podium-testbed-start".into())
                    .spawn(|| -> Result<Testbed> {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .context("building a runtime to start the testbed")?
                            .block_on(Testbed::start())
                    });
                match startup.map(|handle| handle.join()) {
                    Ok(Ok(Ok(testbed))) => Ok(testbed),
                    Ok(Ok(Err(e))) => Err(format!("{e:#}")),
                    Ok(Err(_)) => Err("the testbed's startup thread panicked".to_string()),
                    Err(e) => Err(format!("cannot start the testbed's startup thread: {e}")),
                }
            })
            .as_ref()
            .map_err(|e| anyhow!("the podium testbed did not start: {e}"))
    }

    /// A fresh admin client (user `podium-admin`, group `system:masters`).
    ///
    /// Fresh on every call because a client's connection pool belongs to the Tokio runtime that
    /// created it, and each `#[tokio::test]` has its own. Cheap. Must be called inside a Tokio
    /// runtime.
    ///
    /// # Panics
    /// If the client cannot be built, which only happens when the testbed's certificate files
    /// were deleted from under it; see [`Testbed::try_client`].
    pub fn client(&self) -> Client {
        match self.try_client() {
            Ok(client) => client,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`Testbed::client`] without the panic.
    pub fn try_client(&self) -> Result<Client> {
        Client::try_from(self.config()).context("building a client for the testbed")
    }

    /// The admin client configuration.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A client authenticated as ServiceAccount `namespace/name`, which is created if absent.
    ///
    /// The identity is a client certificate with CN `system:serviceaccount:<ns>:<name>` and the
    /// groups `system:serviceaccounts` and `system:serviceaccounts:<ns>`: exactly the user
    /// info a token would carry, so RBAC bindings to the ServiceAccount apply, without waiting
    /// for the token controller.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        for (what, value) in [("namespace", namespace), ("name", name)] {
            if value.is_empty()
                || value.len() > 253
                || !value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            {
                bail!("invalid ServiceAccount {what} {value:?}");
            }
        }
        let accounts: Api<ServiceAccount> = Api::namespaced(self.try_client()?, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating ServiceAccount {namespace}/{name}"));
            }
        }
        let n = self.identities.fetch_add(1, Ordering::Relaxed);
        let identity = self.pki.issue_client(
            &format!("sa-{n}"),
            &format!("system:serviceaccount:{namespace}:{name}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
            ],
        )?;
        let config = client_config(&self.server_url(), &self.pki, &identity)?;
        Client::try_from(config).context("building a ServiceAccount client")
    }

    /// An admin kubeconfig for `kubectl` and `helm` (`KUBECONFIG=<this> kubectl get pods -A`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` (on a real node `https://10.244.0.1:<port>`); stays the same
    /// across apiserver restarts.
    pub fn server_url(&self) -> String {
        server_url(self.host, self.apiserver_port)
    }

    /// The temporary directory holding certificates, kubeconfigs, logs and etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `etcd.log`, `kube-apiserver.log` and `kube-controller-manager.log` are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Kills kube-apiserver (SIGKILL, like a crash). etcd and the controller-manager keep
    /// running, so the cluster's state survives. Disrupts every user of this testbed: use a
    /// private [`Testbed::start`] for outage tests, not [`Testbed::shared`].
    pub async fn stop_apiserver(&self) {
        let _lifecycle = self.apiserver_lifecycle.lock().await;
        let process = lock(&self.apiserver).take();
        if let Some(mut process) = process {
            process.kill();
        }
    }

    /// Starts kube-apiserver again on the same port with the same certificates and waits until
    /// it is ready. Does nothing if it is running.
    pub async fn start_apiserver(&self) -> Result<()> {
        let _lifecycle = self.apiserver_lifecycle.lock().await;
        {
            let mut current = lock(&self.apiserver);
            match current.as_mut().map(|p| p.exit_status()) {
                Some(None) => return Ok(()),
                Some(Some(_)) => *current = None,
                None => {}
            }
        }
        let log = self.log_dir().join("kube-apiserver.log");
        let process = launch_apiserver(
            &self.apiserver_bin,
            &self.apiserver_args,
            &log,
            &self.config,
        )
        .await?;
        *lock(&self.apiserver) = Some(process);
        Ok(())
    }

    /// Creates (or replaces) the `ElectionGroup` CRD and waits until it is Established.
    ///
    /// Plain create/replace, not server-side apply: v1.20 does not know
    /// `x-kubernetes-validations`, rejects it under SSA, and silently drops it on create.
    pub async fn install_crd(&self) -> Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.try_client()?);
        let crd = podium_core::crd::ElectionGroup::crd();
        let name = crd.metadata.name.clone().unwrap_or_default();
        let pp = PostParams::default();
        // Tests install it concurrently; a lost create or replace race is retried.
        let mut tries = 0;
        loop {
            tries += 1;
            let result = match crds.create(&pp, &crd).await {
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let existing = crds.get(&name).await?;
                    let mut replacement = crd.clone();
                    replacement.metadata.resource_version = existing.metadata.resource_version;
                    crds.replace(&name, &pp, &replacement).await
                }
                other => other,
            };
            match result {
                Ok(_) => break,
                Err(kube::Error::Api(status)) if status.code == 409 && tries < 10 => continue,
                Err(e) => return Err(e).with_context(|| format!("installing CRD {name}")),
            }
        }

        let deadline = Instant::now() + CRD_TIMEOUT;
        loop {
            let current = crds.get(&name).await?;
            let established = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "CRD {name} not Established after {}s; status: {:?}",
                    CRD_TIMEOUT.as_secs(),
                    current.status
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates a namespace `<prefix>-<random>` and returns its name.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String> {
        let mut base: String = prefix
            .chars()
            .map(|c| c.to_ascii_lowercase())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        base = base.trim_matches('-').to_string();
        if base.is_empty() {
            base = "test".to_string();
        }
        let namespaces: Api<Namespace> = Api::all(self.try_client()?);
        for _ in 0..5 {
            let name = format!("{base}-{}", random_suffix());
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            match namespaces.create(&PostParams::default(), &namespace).await {
                Ok(_) => return Ok(name),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("creating namespace {name}")),
            }
        }
        bail!("could not find a free namespace name for prefix {prefix:?}")
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // The controller-manager and apiserver first, so that nothing logs errors about a
        // vanished etcd.
        for slot in [
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            let process = slot
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(mut process) = process {
                process.kill();
            }
        }
        DirGuard {
            dir: Some(self.dir.clone()),
            keep: self.keep,
        }
        .cleanup();
    }
}

/// Removes a testbed directory on drop unless it is to be kept.
struct DirGuard {
    dir: Option<PathBuf>,
    keep: bool,
}

impl DirGuard {
    fn cleanup(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if self.keep {
            eprintln!(
                "podium testbed: kept {} (PODIUM_KEEP_TESTBED)",
                dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("podium testbed: could not remove {}: {e}", dir.display());
        }
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where a testbed's control plane listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Loopback only, no pods ever run: the tests' simulated kubelet.
    Loopback,
    /// A real node: the apiserver on the node bridge's address, which pods reach through the
    /// `kubernetes` Service, with Node authorization and ServiceAccount admission.
    Node,
}

impl Mode {
    fn host(self) -> &'static str {
        match self {
            Mode::Loopback => "127.0.0.1",
            Mode::Node => node::NODE_IP,
        }
    }
}

fn server_url(host: &str, port: u16) -> String {
    format!("https://{host}:{port}")
}

fn path_str(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("path {} is not UTF-8", path.display()))
}

fn client_config(server: &str, pki: &Pki, identity: &ClientIdentity) -> Result<kube::Config> {
    let mut config = kube::Config::new(
        server
            .parse()
            .with_context(|| format!("parsing {server}"))?,
    );
    config.root_cert = Some(vec![pki.ca_der.clone()]);
    config.auth_info = kube::config::AuthInfo {
        client_certificate: Some(path_str(&identity.cert)?),
        client_key: Some(path_str(&identity.key)?),
        ..kube::config::AuthInfo::default()
    };
    Ok(config)
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, identity: &ClientIdentity) -> Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "podium-testbed",
            "cluster": { "server": server, "certificate-authority": path_str(ca)? },
        }],
        "users": [{
            "name": "podium-testbed",
            "user": {
                "client-certificate": path_str(&identity.cert)?,
                "client-key": path_str(&identity.key)?,
            },
        }],
        "contexts": [{
            "name": "podium-testbed",
            "context": { "cluster": "podium-testbed", "user": "podium-testbed" },
        }],
        "current-context": "podium-testbed",
        "preferences": {},
    });
    fs::write(path, serde_yaml::to_string(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Polls `probe` until it succeeds, while watching that `process` is still alive.
async fn wait_ready<F, Fut>(
    process: &mut ManagedProcess,
    timeout: Duration,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    let mut last_progress = started;
    loop {
        if probe().await {
            return Ok(());
        }
        if let Some(status) = process.exit_status() {
            return Err(process.failure(&format!("exited ({status}) before it was ready")));
        }
        if started.elapsed() > timeout {
            return Err(process.failure(&format!("not ready after {}s", timeout.as_secs())));
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "podium testbed: waiting for {} ({:.0}s so far, log: {})",
                process.name(),
                started.elapsed().as_secs_f64(),
                process.log_path().display()
            );
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_etcd(dir: &Path, bin: &Path) -> Result<(ManagedProcess, String)> {
    let log = dir.join("logs/etcd.log");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // A fresh data dir per attempt: a half-initialised one would remember the old peer URL.
        let data_dir = dir.join(format!("etcd-data-{attempt}"));
        let args = vec![
            "--name=podium".to_string(),
            format!("--data-dir={}", path_str(&data_dir)?),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=podium={peer_url}"),
            "--initial-cluster-state=new".to_string(),
            "--logger=zap".to_string(),
            "--log-outputs=stderr".to_string(),
        ];
        let mut process = ManagedProcess::spawn("etcd", bin, &args, &log)?;
        let ready = wait_ready(&mut process, ETCD_TIMEOUT, || etcd_healthy(client_port)).await;
        match ready {
            Ok(()) => return Ok((process, client_url)),
            Err(e) if attempt < START_ATTEMPTS && lost_port_race(&log) => {
                eprintln!("podium testbed: etcd lost a port race, retrying: {e:#}");
            }
            Err(e) => return Err(e),
        }
    }
}

/// etcd's `/health` over plain HTTP, without pulling in an HTTP client for one request.
async fn etcd_healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).contains(r#""health":"true""#))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

/// The user name kube-aggregator presents to aggregated API servers, which trust the identity
/// headers of requests carrying this name's certificate.
pub(crate) const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The request-header flags both kinds of API server take: kube-aggregator puts the caller's
/// identity in these headers, and a server trusts them only on a connection whose client
/// certificate is the testbed CA's `front-proxy-client`.
pub(crate) fn requestheader_flags(pki: &Pki) -> Result<Vec<String>> {
    Ok(vec![
        format!("--requestheader-client-ca-file={}", path_str(&pki.ca_cert)?),
        format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT}"),
        "--requestheader-username-headers=X-Remote-User".to_string(),
        "--requestheader-group-headers=X-Remote-Group".to_string(),
        "--requestheader-extra-headers-prefix=X-Remote-Extra-".to_string(),
    ])
}

/// The apiserver's flags; `mode_flags` (a real node's) replace the loopback-only ones.
fn apiserver_flags(
    dir: &Path,
    pki: &Pki,
    front_proxy: &ClientIdentity,
    etcd_url: &str,
    host: &str,
    port: u16,
    mode_flags: &[String],
) -> Result<Vec<String>> {
    let mut flags = requestheader_flags(pki)?;
    flags.extend([
        format!("--proxy-client-cert-file={}", path_str(&front_proxy.cert)?),
        format!("--proxy-client-key-file={}", path_str(&front_proxy.key)?),
    ]);
    flags.extend([
        format!("--etcd-servers={etcd_url}"),
        // The insecure port defaults to 8080 in v1.20; two testbeds would collide on it.
        "--insecure-port=0".to_string(),
        format!("--secure-port={port}"),
        format!("--bind-address={host}"),
        format!("--advertise-address={host}"),
        format!("--cert-dir={}", path_str(&dir.join("pki"))?),
        format!("--client-ca-file={}", path_str(&pki.ca_cert)?),
        format!("--tls-cert-file={}", path_str(&pki.server_cert)?),
        format!("--tls-private-key-file={}", path_str(&pki.server_key)?),
        format!(
            "--service-account-key-file={}",
            path_str(&pki.service_account_pub)?
        ),
        format!(
            "--service-account-signing-key-file={}",
            path_str(&pki.service_account_key)?
        ),
        "--service-account-issuer=https://kubernetes.default.svc".to_string(),
        "--service-cluster-ip-range=10.96.0.0/16".to_string(),
        "--allow-privileged=true".to_string(),
        "--profiling=false".to_string(),
    ]);
    if mode_flags.is_empty() {
        flags.extend([
            // The default reconciler writes the advertise address into the `kubernetes`
            // Endpoints, and 127.0.0.1 is not a valid endpoint address.
            "--endpoint-reconciler-type=none".to_string(),
            // The plugin insists on a token secret for every pod; the tests' pods never run.
            "--disable-admission-plugins=ServiceAccount".to_string(),
            "--authorization-mode=RBAC".to_string(),
        ]);
    } else {
        flags.extend_from_slice(mode_flags);
    }
    Ok(flags)
}

async fn launch_apiserver(
    bin: &Path,
    args: &[String],
    log: &Path,
    config: &kube::Config,
) -> Result<ManagedProcess> {
    launch_until_ready("kube-apiserver", bin, args, log, config, APISERVER_TIMEOUT).await
}

/// Starts an API server (kube-apiserver or the 1.36 apiextensions-apiserver) and waits until
/// its `/readyz` says ok.
pub(crate) async fn launch_until_ready(
    name: &str,
    bin: &Path,
    args: &[String],
    log: &Path,
    config: &kube::Config,
    timeout: Duration,
) -> Result<ManagedProcess> {
    let mut process = ManagedProcess::spawn(name, bin, args, log)?;
    // No retries: a starting apiserver answers 503 with Retry-After, and the client would sit
    // in its backoff instead of probing again.
    let mut probe_config = config.clone();
    probe_config.default_retry = false;
    let client = Client::try_from(probe_config).context("building a probe client")?;
    let client = &client;
    wait_ready(&mut process, timeout, || async move {
        let Ok(request) = ::http::Request::get("/readyz").body(Vec::new()) else {
            return false;
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.request_text(request)).await,
            Ok(Ok(body)) if body.trim() == "ok"
        )
    })
    .await?;
    Ok(process)
}

async fn start_controller_manager(
    dir: &Path,
    bin: &Path,
    kubeconfig: &Path,
    pki: &Pki,
    config: &kube::Config,
) -> Result<ManagedProcess> {
    let args = vec![
        format!("--kubeconfig={}", path_str(kubeconfig)?),
        "--leader-elect=false".to_string(),
        // No serving at all: parallel test binaries would collide on 10252/10257.
        "--port=0".to_string(),
        "--secure-port=0".to_string(),
        "--controllers=*".to_string(),
        format!(
            "--service-account-private-key-file={}",
            path_str(&pki.service_account_key)?
        ),
        format!("--root-ca-file={}", path_str(&pki.ca_cert)?),
        format!("--cluster-signing-cert-file={}", path_str(&pki.ca_cert)?),
        format!("--cluster-signing-key-file={}", path_str(&pki.ca_key_file)?),
        "--use-service-account-credentials=false".to_string(),
        // Nobody renews node Leases, so with the default 40s every node would turn Unknown and
        // its pods NotReady mid-test. Node health changes only through `set_node_ready`.
        "--node-monitor-grace-period=1h".to_string(),
        "--node-startup-grace-period=1h".to_string(),
        // Benchmarks create pods in bulk; the default 20 QPS would make the controllers the
        // bottleneck.
        "--kube-api-qps=200".to_string(),
        "--kube-api-burst=400".to_string(),
        // Its default makes it create /usr/libexec/kubernetes/... on the host.
        format!(
            "--flex-volume-plugin-dir={}",
            path_str(&dir.join("kcm-flexvolume"))?
        ),
    ];
    let log = dir.join("logs/kube-controller-manager.log");
    let mut process = ManagedProcess::spawn("kube-controller-manager", bin, &args, &log)?;
    // The serviceaccount controller creating `default/default` shows that the controllers run.
    let accounts: Api<ServiceAccount> = Api::namespaced(
        Client::try_from(config.clone()).context("building a probe client")?,
        "default",
    );
    let accounts = &accounts;
    wait_ready(&mut process, CONTROLLER_MANAGER_TIMEOUT, || async move {
        matches!(accounts.get_opt("default").await, Ok(Some(_)))
    })
    .await?;
    Ok(process)
}

/// Removes the directories of earlier testbeds whose process is gone: the shared testbed lives
/// in a static and is never dropped, so its process cannot clean up after itself.
fn remove_stale_dirs() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = entry.path();
        // A real node's directory may still hold mounts and its processes: only the node's
        // own cleanup (`node::RealNode::start`) may remove it.
        if Path::new(&format!("/proc/{pid}")).exists()
            || path.join(KEEP_MARKER).exists()
            || path.join(node::MARKER).exists()
        {
            continue;
        }
        let _ = fs::remove_dir_all(&path);
    }
}

fn random_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(since_epoch) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        hasher.write_u128(since_epoch.as_nanos());
    }
    format!("{:08x}", hasher.finish() as u32)
}
