//! A real Kubernetes node beside the testbed's control plane: containerd (with a private root,
//! state and socket), kubelet, kube-scheduler and kube-proxy (iptables mode) on a bridge of its
//! own, so that pods run real processes, probes, graceful stops and Downward API volumes, and
//! Services carry real traffic. Every flag and its reason: `docs/real-node-recipe.md`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let node = podium_testkit::testbed::node::RealNode::start().await?;
//! node.kubectl(&["get", "nodes", "-o", "wide"])?;
//! # Ok(()) }
//! ```
//!
//! Needs root, `scripts/install-deps.sh` (which runs `scripts/install-node.sh`), and this
//! machine to itself as far as the bridge `podium0`, `10.244.0.0/24` and the `KUBE-*` iptables
//! chains go: one node per machine, guarded by a lock file. [`RealNode::start`] fails with the
//! reason when any of that is missing; it never skips.
//!
//! Everything stays on this machine: pods live in network namespaces of the run, with no
//! default route and no nameserver; the pod and Service ranges are routed only locally.
//!
//! Cleanup happens on drop, and again at the next [`RealNode::start`] for a run that was killed
//! (its directory, mounts and container processes outlive it): processes, container shims and
//! their containers, mounts under the run's directory, the bridge, the `KUBE-*`/`CNI-*` iptables
//! chains and the jumps to them, the sysctls kubelet and kube-proxy change, and the host paths
//! kubelet and containerd write whatever their flags say.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Endpoints, Node};
use kube::Api;

use super::process::{ManagedProcess, find_in_path, log_tail};
use super::{DIR_PREFIX, Mode, Testbed, find_binary, path_str, write_kubeconfig};

/// The node bridge's address: the node IP, the pods' gateway, and where the apiserver listens.
pub const NODE_IP: &str = "10.244.0.1";
/// The Node object's name.
pub const NODE_NAME: &str = "podium-node";
/// The image tag [`RealNode`] gives the images it imports (`localhost/<name>:v1`).
pub const IMAGE_TAG: &str = "v1";
/// The app image from `scripts/node/app` (see `docs/real-node-recipe.md`, "The app image").
pub const APP_IMAGE: &str = "localhost/podium-app:v1";
/// The operator image [`RealNode::build_operator_image`] builds.
pub const OPERATOR_IMAGE_REPOSITORY: &str = "localhost/podium";
const PAUSE_IMAGE: &str = "localhost/podium-pause:v1";

const BRIDGE: &str = "podium0";
const POD_CIDR: &str = "10.244.0.0/24";
const SERVICE_CIDR: &str = "10.96.0.0/16";
const KUBE_PROXY_HEALTHZ: &str = "127.0.0.1:10256";
/// Marks a testbed directory that ran a node: only the node's cleanup may remove it.
pub(crate) const MARKER: &str = "NODE";
/// One node per machine (bridge name, pod range and iptables are machine-wide).
const LOCK_FILE: &str = "/run/podium-node.lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(600);
const NODE_TIMEOUT: Duration = Duration::from_secs(120);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Files under the run's directory recording what to restore.
const SYSCTLS_FILE: &str = "node-sysctls";
const HOST_PATHS_FILE: &str = "node-host-paths";

/// Sysctls that kubelet (`--protect-kernel-defaults=false`), kube-proxy and the CNI bridge
/// plugin set, and a few they might: recorded at start, restored at cleanup.
const SYSCTLS: &[&str] = &[
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
];

/// Host paths written whatever the flags say (kubelet 1.20's device-plugin socket and container
/// logs, libcni's result cache, containerd's shim sockets, libmount's utab).
const HOST_PATHS: &[&str] = &[
    "/var/lib/kubelet/device-plugins",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni/results",
    "/run/containerd/s",
    "/run/mount",
];

/// The programs the node runs or calls, found before anything starts.
struct Tools {
    kubelet: PathBuf,
    scheduler: PathBuf,
    proxy: PathBuf,
    containerd: PathBuf,
    ctr: PathBuf,
    umoci: PathBuf,
    images: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        const HINT: &str = "run scripts/install-deps.sh (it runs scripts/install-node.sh) as root";
        let mut missing = Vec::new();
        let mut cached = |name: &str| match find_binary(name) {
            Ok(path) => path,
            Err(_) => {
                missing.push(name.to_string());
                PathBuf::new()
            }
        };
        let kubelet = cached("kubelet");
        let scheduler = cached("kube-scheduler");
        let proxy = cached("kube-proxy");
        let mut on_path = |name: &str| match find_in_path(name) {
            Some(path) => path,
            None => {
                missing.push(name.to_string());
                PathBuf::new()
            }
        };
        let containerd = on_path("containerd");
        let ctr = on_path("ctr");
        let umoci = on_path("umoci");
        for tool in [
            "containerd-shim-runc-v2",
            "runc",
            "iptables",
            "ip",
            "mount",
            "umount",
            "objcopy",
            "ldd",
        ] {
            on_path(tool);
        }
        for plugin in ["bridge", "host-local", "portmap", "loopback"] {
            if !Path::new("/usr/lib/cni").join(plugin).exists() {
                missing.push(format!("/usr/lib/cni/{plugin}"));
            }
        }
        let images = match std::env::var_os("PODIUM_CACHE").filter(|d| !d.is_empty()) {
            Some(cache) => PathBuf::from(cache).join("images"),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/podium/images"),
        };
        for image in ["podium-pause.tar", "podium-app.tar"] {
            if !images.join(image).exists() {
                missing.push(images.join(image).display().to_string());
            }
        }
        if !missing.is_empty() {
            bail!(
                "the real node cannot start: missing {}: {HINT}",
                missing.join(", ")
            );
        }
        Ok(Tools {
            kubelet,
            scheduler,
            proxy,
            containerd,
            ctr,
            umoci,
            images,
        })
    }
}

/// A running node and its control plane. Everything stops and is removed on drop.
pub struct RealNode {
    /// Dropped after the node's own cleanup (it stops the control plane, removes the directory).
    testbed: Option<Testbed>,
    dir: Option<PathBuf>,
    tools: Tools,
    /// In start order; stopped in reverse.
    processes: Vec<ManagedProcess>,
    _lock: File,
}

impl RealNode {
    /// Starts the control plane configured for a node, then containerd, kube-scheduler,
    /// kubelet and kube-proxy, and imports the pause and app images; returns once the Node is
    /// Ready and untainted and kube-proxy is healthy (about 15 s).
    ///
    /// Fails with the reason when the node cannot start here: not root, something not
    /// installed, or a component that does not come up (with the end of its log).
    pub async fn start() -> Result<RealNode> {
        let started = Instant::now();
        if !is_root() {
            bail!(
                "the real node needs root (containerd, kubelet, iptables, mounts); run the \
                 tests as root"
            );
        }
        let tools = Tools::find()?;
        let lock = take_lock().await?;
        let stale = clean_stale(&tools.proxy);
        if stale > 0 {
            eprintln!("podium node: cleaned up after {stale} earlier run(s) that were killed");
        }
        eprintln!("podium node: {}", cgroup_mode());

        // From here on, dropping `node` undoes whatever has been done so far.
        let mut node = RealNode {
            testbed: None,
            dir: None,
            tools,
            processes: Vec::new(),
            _lock: lock,
        };
        // The apiserver binds the bridge's address, so the bridge comes first.
        for args in [
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", &format!("{NODE_IP}/24"), "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            run(Path::new("ip"), &args).context("creating the node's bridge")?;
        }
        let testbed = Testbed::start_in(Mode::Node).await?;
        let dir = testbed.dir().to_path_buf();
        node.dir = Some(dir.clone());
        node.testbed = Some(testbed);
        record_host_state(&dir)?;
        let control_plane = started.elapsed();

        node.start_scheduler()?;
        node.start_containerd().await?;
        let images = &node.tools.images;
        node.import_image(&images.join("podium-pause.tar"), "localhost/podium-pause")?;
        node.import_image(&images.join("podium-app.tar"), "localhost/podium-app")?;
        node.start_kubelet().await?;
        node.start_proxy().await?;
        node.wait_kubernetes_endpoints().await?;
        eprintln!(
            "podium node: {NODE_NAME} ready in {:.1}s (control plane {:.1}s, node {:.1}s); \
             kubeconfig: {}, logs: {}",
            started.elapsed().as_secs_f64(),
            control_plane.as_secs_f64(),
            (started.elapsed() - control_plane).as_secs_f64(),
            node.testbed().kubeconfig_path().display(),
            node.testbed().log_dir().display()
        );
        Ok(node)
    }

    /// The control plane: clients, kubeconfig, namespaces, logs.
    pub fn testbed(&self) -> &Testbed {
        self.testbed
            .as_ref()
            .expect("a started node has its control plane")
    }

    fn dir(&self) -> &Path {
        self.dir.as_deref().expect("a started node has a directory")
    }

    fn socket(&self) -> PathBuf {
        self.dir().join("containerd/containerd.sock")
    }

    /// Imports an OCI image archive into the node's containerd as `<base_name>:<its tag>`.
    /// `--base-name`: without it a stray `import-<date>:<tag>` name breaks CRI's image lookup.
    pub fn import_image(&self, archive: &Path, base_name: &str) -> Result<()> {
        let socket = self.socket();
        run(
            &self.tools.ctr,
            &[
                "--address",
                &path_str(&socket)?,
                "-n",
                "k8s.io",
                "images",
                "import",
                "--base-name",
                base_name,
                &path_str(archive)?,
            ],
        )
        .with_context(|| format!("importing {}", archive.display()))?;
        Ok(())
    }

    /// Builds the operator image from `binary` and imports it; returns its reference
    /// (`localhost/podium:v1`). Like the Dockerfile's distroless image: `/podium` as the
    /// entrypoint with `run` as the command, uid 65532 as the chart runs it, plus the shared
    /// libraries `ldd` lists (the binary need not be static). Debug info is stripped: it is
    /// most of a debug build's size and only slows packing.
    pub fn build_operator_image(&self, binary: &Path) -> Result<String> {
        let started = Instant::now();
        let work = self.dir().join("operator-image");
        let rootfs = work.join("rootfs");
        fs::create_dir_all(rootfs.join("etc"))?;
        run(
            Path::new("objcopy"),
            &[
                "--strip-debug",
                &path_str(binary)?,
                &path_str(&rootfs.join("podium"))?,
            ],
        )?;
        let ldd = run(Path::new("ldd"), &[&path_str(binary)?])?;
        for library in ldd.split_whitespace().filter(|word| word.starts_with('/')) {
            let target = rootfs.join(library.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent)?;
            }
            // Follows symlinks, so the loader's /lib64 link becomes a file at that path.
            fs::copy(library, &target).with_context(|| format!("copying {library}"))?;
        }
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        )?;
        fs::write(rootfs.join("etc/group"), "root:x:0:\nnonroot:x:65532:\n")?;

        let layout = path_str(&work.join("oci"))?;
        let image = format!("{layout}:{IMAGE_TAG}");
        let bundle = path_str(&work.join("bundle"))?;
        let umoci = &self.tools.umoci;
        run(umoci, &["init", "--layout", &layout])?;
        run(umoci, &["new", "--image", &image])?;
        // unpack + copy + repack, not `umoci insert`: Debian's umoci 0.4.7 writes truncated
        // layers with insert.
        run(umoci, &["unpack", "--image", &image, &bundle])?;
        run(
            Path::new("cp"),
            &[
                "-a",
                &format!("{}/.", path_str(&rootfs)?),
                &format!("{bundle}/rootfs/"),
            ],
        )?;
        run(umoci, &["repack", "--image", &image, &bundle])?;
        run(
            umoci,
            &[
                "config",
                "--image",
                &image,
                "--config.entrypoint",
                "/podium",
                "--config.cmd",
                "run",
                "--config.user",
                "65532:65532",
                "--config.workingdir",
                "/",
                "--config.exposedports",
                "8080/tcp",
            ],
        )?;
        run(umoci, &["gc", "--layout", &layout])?;
        let archive = work.join("podium-operator.tar");
        run(
            Path::new("tar"),
            &["-C", &layout, "-cf", &path_str(&archive)?, "."],
        )?;
        self.import_image(&archive, OPERATOR_IMAGE_REPOSITORY)?;
        // The unpacked copies are only needed for packing.
        let _ = fs::remove_dir_all(work.join("bundle"));
        let _ = fs::remove_dir_all(&rootfs);
        eprintln!(
            "podium node: operator image {OPERATOR_IMAGE_REPOSITORY}:{IMAGE_TAG} from {} \
             built and imported in {:.1}s ({} MB)",
            binary.display(),
            started.elapsed().as_secs_f64(),
            fs::metadata(&archive).map(|m| m.len() >> 20).unwrap_or(0)
        );
        Ok(format!("{OPERATOR_IMAGE_REPOSITORY}:{IMAGE_TAG}"))
    }

    /// Runs `kubectl` against the node's cluster (admin); returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.tool("kubectl", args, None)
    }

    /// [`RealNode::kubectl`] with `stdin` (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        self.tool("kubectl", args, Some(stdin))
    }

    /// Runs `helm` against the node's cluster; returns its stdout.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        self.tool("helm", args, None)
    }

    fn tool(&self, name: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let program = find_binary(name)?;
        let dir = self.dir();
        let mut command = Command::new(&program);
        command
            .args(args)
            .env("KUBECONFIG", self.testbed().kubeconfig_path())
            // Their caches and settings go under the run's directory, not ~/.kube or ~/.cache.
            .env("KUBECACHEDIR", dir.join("kube-cache"))
            .env("HELM_CACHE_HOME", dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", dir.join("helm/config"))
            .env("HELM_DATA_HOME", dir.join("helm/data"))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("running {}", program.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())?;
        }
        stdout_of(&program, args, child.wait_with_output()?)
    }

    /// What a failed test wants to see: every pod, recent events, the node components' logs.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &[
                "get",
                "nodes,pods",
                "-A",
                "-o",
                "wide",
                "-L",
                "podium.dev/role",
            ][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
        ] {
            out.push_str(&format!("--- kubectl {}\n", args.join(" ")));
            match self.kubectl(args) {
                Ok(text) => out.push_str(&text),
                Err(e) => out.push_str(&format!("{e:#}\n")),
            }
        }
        for name in ["kubelet", "containerd", "kube-proxy", "kube-scheduler"] {
            let log = self.testbed().log_dir().join(format!("{name}.log"));
            out.push_str(&format!("--- last lines of {}\n", log.display()));
            out.push_str(&log_tail(&log, 30));
            out.push('\n');
        }
        out
    }

    fn client_kubeconfig(&self, file_stem: &str, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let testbed = self.testbed();
        let identity = testbed.pki.issue_client(file_stem, user, groups)?;
        let path = self.dir().join(format!("{file_stem}.kubeconfig"));
        write_kubeconfig(
            &path,
            &testbed.server_url(),
            &testbed.pki.ca_cert,
            &identity,
        )?;
        Ok(path)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.testbed().log_dir().join(format!("{name}.log"))
    }

    fn start_scheduler(&mut self) -> Result<()> {
        let kubeconfig = self.client_kubeconfig("kube-scheduler", "system:kube-scheduler", &[])?;
        let args = vec![
            format!("--kubeconfig={}", path_str(&kubeconfig)?),
            "--leader-elect=false".to_string(),
            // No serving: nothing here reads it, and fixed ports would collide.
            "--port=0".to_string(),
            "--secure-port=0".to_string(),
        ];
        let log = self.log("kube-scheduler");
        let process = ManagedProcess::spawn("kube-scheduler", &self.tools.scheduler, &args, &log)?;
        self.processes.push(process);
        Ok(())
    }

    async fn start_containerd(&mut self) -> Result<()> {
        let dir = self.dir().to_path_buf();
        let r = path_str(&dir)?;
        let cni = dir.join("cni/net.d");
        fs::create_dir_all(&cni)?;
        // Before containerd starts: it loads the CNI config at start.
        fs::write(
            cni.join("10-podium.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "podium",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": true,
                        "isDefaultGateway": false,
                        "ipMasq": false,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "dataDir": format!("{r}/cni/ipam"),
                            "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                            // Only the Service range: pods get no default route off this machine.
                            "routes": [{"dst": SERVICE_CIDR}],
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}},
                ],
            }))?,
        )?;
        // Root, state, socket, runc state, netns mounts, CNI config and IPAM leases all under
        // the run's directory; `restrict_oom_score_adj` because this machine lacks
        // CAP_SYS_RESOURCE (runc fails every sandbox without it).
        let config = format!(
            r#"version = 2
root = "{r}/containerd/root"
state = "{r}/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{r}/containerd/containerd.sock"

[ttrpc]
  address = "{r}/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{r}/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{r}/cni/net.d"
    max_conf_num = 1
"#
        );
        let config_path = dir.join("containerd/config.toml");
        fs::create_dir_all(dir.join("containerd"))?;
        fs::write(&config_path, config)?;
        let args = vec!["--config".to_string(), path_str(&config_path)?];
        let log = self.log("containerd");
        let mut process = ManagedProcess::spawn("containerd", &self.tools.containerd, &args, &log)?;
        let ctr = self.tools.ctr.clone();
        let socket = path_str(&self.socket())?;
        super::wait_ready(&mut process, NODE_TIMEOUT, || {
            let ok = run(&ctr, &["--address", &socket, "version"]).is_ok();
            async move { ok }
        })
        .await?;
        self.processes.push(process);
        Ok(())
    }

    async fn start_kubelet(&mut self) -> Result<()> {
        let kubeconfig = self.client_kubeconfig(
            "kubelet",
            &format!("system:node:{NODE_NAME}"),
            &["system:nodes"],
        )?;
        let dir = self.dir().to_path_buf();
        let r = path_str(&dir)?;
        let socket = path_str(&self.socket())?;
        let args: Vec<String> = vec![
            format!("--kubeconfig={}", path_str(&kubeconfig)?),
            format!("--root-dir={r}/kubelet"),
            format!("--cert-dir={r}/kubelet/pki"),
            format!("--volume-plugin-dir={r}/kubelet/volume-plugins"),
            "--container-runtime=remote".to_string(),
            format!("--container-runtime-endpoint=unix://{socket}"),
            // cAdvisor reads container stats from our containerd, not the default socket.
            format!("--containerd={socket}"),
            "--runtime-request-timeout=2m".to_string(),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            "--cgroup-driver=cgroupfs".to_string(),
            "--cgroups-per-qos=false".to_string(),
            "--enforce-node-allocatable=".to_string(),
            "--fail-swap-on=false".to_string(),
            // Never garbage-collect or evict on a shared test machine's disk.
            "--image-gc-high-threshold=100".to_string(),
            "--image-gc-low-threshold=99".to_string(),
            "--eviction-hard=memory.available<1Mi,nodefs.available<1Mi,nodefs.inodesFree<1,imagefs.available<1Mi".to_string(),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            format!("--address={NODE_IP}"),
            "--port=10250".to_string(),
            // Ready 1 s after registration instead of 10 s.
            "--node-status-update-frequency=1s".to_string(),
            "--read-only-port=0".to_string(),
            "--healthz-port=0".to_string(),
            // Pods get no nameserver of the machine's.
            "--resolv-conf=".to_string(),
            // It defaults to -999, which needs CAP_SYS_RESOURCE.
            "--oom-score-adj=0".to_string(),
            "--v=2".to_string(),
        ];
        let log = self.log("kubelet");
        // The in-tree ECR credential provider would ask the EC2 metadata address otherwise.
        let mut process = ManagedProcess::spawn_env(
            "kubelet",
            &self.tools.kubelet,
            &args,
            &[("AWS_EC2_METADATA_DISABLED", "true")],
            &log,
        )?;
        let nodes: Api<Node> = Api::all(self.testbed().try_client()?);
        let nodes = &nodes;
        // Ready, and the not-ready taint gone (the node lifecycle controller removes it).
        super::wait_ready(&mut process, NODE_TIMEOUT, || async move {
            let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await else {
                return false;
            };
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let untainted = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_none_or(|t| t.is_empty());
            ready && untainted
        })
        .await?;
        self.processes.push(process);
        Ok(())
    }

    /// After the Node exists: started earlier, kube-proxy guesses the node IP.
    async fn start_proxy(&mut self) -> Result<()> {
        let kubeconfig = self.client_kubeconfig("kube-proxy", "system:kube-proxy", &[])?;
        let args = vec![
            format!("--kubeconfig={}", path_str(&kubeconfig)?),
            "--proxy-mode=iptables".to_string(),
            format!("--hostname-override={NODE_NAME}"),
            format!("--cluster-cidr={POD_CIDR}"),
            // NodePorts only on the bridge, never on the machine's own interface.
            format!("--nodeport-addresses={NODE_IP}/32"),
            // Leave the machine's conntrack sysctls alone.
            "--conntrack-max-per-core=0".to_string(),
            "--conntrack-tcp-timeout-established=0".to_string(),
            "--conntrack-tcp-timeout-close-wait=0".to_string(),
            "--oom-score-adj=0".to_string(),
            format!("--healthz-bind-address={KUBE_PROXY_HEALTHZ}"),
            "--metrics-bind-address=127.0.0.1:10249".to_string(),
        ];
        let log = self.log("kube-proxy");
        let mut process = ManagedProcess::spawn("kube-proxy", &self.tools.proxy, &args, &log)?;
        let healthz: SocketAddr = KUBE_PROXY_HEALTHZ.parse()?;
        super::wait_ready(&mut process, NODE_TIMEOUT, || async move {
            matches!(
                http_get(healthz, "/healthz", Duration::from_secs(1)).await,
                Ok((200, _))
            )
        })
        .await?;
        self.processes.push(process);
        Ok(())
    }

    /// The in-cluster client's way to the apiserver: the `kubernetes` Service's endpoints,
    /// which the apiserver's own reconciler writes.
    async fn wait_kubernetes_endpoints(&self) -> Result<()> {
        let endpoints: Api<Endpoints> = Api::namespaced(self.testbed().try_client()?, "default");
        crate::wait::poll(
            NODE_TIMEOUT,
            Duration::from_millis(100),
            "the `kubernetes` Service's endpoints",
            async || {
                let found = endpoints.get_opt("kubernetes").await?;
                Ok(found
                    .and_then(|e| e.subsets)
                    .is_some_and(|s| {
                        s.iter()
                            .flat_map(|s| s.addresses.iter().flatten())
                            .any(|a| a.ip == NODE_IP)
                    })
                    .then_some(()))
            },
        )
        .await
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let started = Instant::now();
        if std::thread::panicking() && self.testbed.is_some() {
            eprintln!("{}", self.diagnostics());
        }
        // kubelet first, so that it restarts no container while they are being killed.
        while let Some(mut process) = self.processes.pop() {
            process.kill();
        }
        cleanup(self.dir.as_deref(), &self.tools.proxy);
        // Stops the control plane and removes the directory.
        drop(self.testbed.take());
        eprintln!(
            "podium node: cleaned up in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
}

/// `GET path` over plain HTTP/1.0 (a pod, a ClusterIP, kube-proxy's healthz): the status code
/// and body. One connection per request, so every request is routed afresh.
pub async fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| anyhow!("no answer from {addr} within {timeout:?}"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed answer from {addr}: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Runs a program to completion; its stdout, or an error with its output.
fn run(program: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    stdout_of(program, args, out)
}

/// A finished program's stdout, or an error with what it printed.
fn stdout_of(program: &Path, args: &[&str], out: std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn cgroup_mode() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "cgroup v2 (unified)"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "cgroup v1 (hybrid, with cgroup2 at /sys/fs/cgroup/unified)"
    } else {
        "cgroup v1"
    }
}

/// The machine-wide node lock; waits while another test process runs a node.
async fn take_lock() -> Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("opening {LOCK_FILE}"))?;
    let started = Instant::now();
    let mut last_progress = started;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {LOCK_FILE}"));
            }
        }
        if started.elapsed() > LOCK_TIMEOUT {
            bail!(
                "another real node held {LOCK_FILE} for {}s: one node per machine",
                LOCK_TIMEOUT.as_secs()
            );
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            eprintln!(
                "podium node: waiting for another real node on this machine to stop ({LOCK_FILE}, {:.0}s so far)",
                started.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes down, under the run's directory, what cleanup must restore: the sysctls and which of
/// the host paths exist. A later run restores them from there if this one is killed.
fn record_host_state(dir: &Path) -> Result<()> {
    let mut sysctls = String::new();
    for name in SYSCTLS {
        if let Ok(value) = fs::read_to_string(sysctl_path(name)) {
            sysctls.push_str(&format!("{name} {}\n", value.trim()));
        }
    }
    fs::write(dir.join(SYSCTLS_FILE), sysctls)?;
    let mut paths = String::new();
    for path in HOST_PATHS {
        // The topmost missing ancestor goes entirely; an existing directory loses only what
        // is newer than the run.
        let mut missing: Option<&Path> = None;
        let mut current = Some(Path::new(path));
        while let Some(p) = current {
            if p.exists() {
                break;
            }
            missing = Some(p);
            current = p.parent();
        }
        match missing {
            Some(top) => paths.push_str(&format!("missing {}\n", top.display())),
            None => paths.push_str(&format!("existing {path}\n")),
        }
    }
    fs::write(dir.join(HOST_PATHS_FILE), paths)?;
    Ok(())
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

/// Everything a node leaves on the machine, for the run in `dir` (if it got that far): its
/// processes and containers, mounts, sysctls and host paths; then the machine-wide bridge and
/// iptables chains. Idempotent; every step goes on when one fails.
fn cleanup(dir: Option<&Path>, proxy: &Path) {
    if let Some(dir) = dir {
        kill_processes_naming(dir);
        unmount_under(dir);
        remove_container_cgroups();
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists()
        && let Err(e) = run(Path::new("ip"), &["link", "del", BRIDGE])
    {
        eprintln!("podium node: {e:#}");
    }
    clean_iptables(proxy);
    if let Some(dir) = dir {
        restore_host_state(dir);
    }
}

/// Cleans up after earlier runs that were killed (their owner process is gone): their
/// directories, mounts and processes, and whatever the machine-wide bridge and chains hold.
/// Only called with the node lock held, so no live node is touched. Returns how many runs.
fn clean_stale(proxy: &Path) -> usize {
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            if entry.path().join(MARKER).exists() {
                dirs.insert(entry.path());
            }
        }
    }
    // A directory another testbed removed may still have mounts and processes naming it.
    for mount in mount_points() {
        if let Some(dir) = run_dir_of(&mount, &tmp) {
            dirs.insert(dir);
        }
    }
    for process in processes() {
        if [
            "containerd",
            "containerd-shim-runc-v2",
            "kubelet",
            "kube-proxy",
        ]
        .iter()
        .any(|name| process.command.contains(name))
            && let Some(dir) = process
                .command
                .split_whitespace()
                .find_map(|word| run_dir_of(word.trim_start_matches("--config="), &tmp))
        {
            dirs.insert(dir);
        }
    }
    let stale: Vec<PathBuf> = dirs
        .into_iter()
        .filter(|dir| owner_gone(dir) && !dir.join(super::KEEP_MARKER).exists())
        .collect();
    for dir in &stale {
        cleanup(Some(dir), proxy);
        let _ = fs::remove_dir_all(dir);
    }
    // A bridge or chains without a directory: we hold the lock, so they are no one's.
    cleanup(None, proxy);
    stale.len()
}

/// `/tmp/podium-testbed-<pid>-XXXX` for a path at or below such a directory.
fn run_dir_of(path: &str, tmp: &Path) -> Option<PathBuf> {
    let rest = Path::new(path).strip_prefix(tmp).ok()?;
    let first = rest.components().next()?.as_os_str().to_str()?;
    first.starts_with(DIR_PREFIX).then(|| tmp.join(first))
}

fn owner_gone(dir: &Path) -> bool {
    let pid = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(DIR_PREFIX))
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok());
    match pid {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

struct Process {
    pid: u32,
    parent: u32,
    command: String,
}

fn processes() -> Vec<Process> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if pid == me {
                return None;
            }
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            // After the command name in parentheses: state, then the parent's pid.
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?;
            let parent = fields.next()?.parse().ok()?;
            if state == "Z" {
                return None;
            }
            let mut command = Vec::new();
            File::open(entry.path().join("cmdline"))
                .ok()?
                .read_to_end(&mut command)
                .ok()?;
            let command = String::from_utf8_lossy(&command).replace('\0', " ");
            Some(Process {
                pid,
                parent,
                command,
            })
        })
        .collect()
}

/// SIGKILLs every process whose command line names `dir` (every node component's does;
/// container shims carry `-address <dir>/containerd/containerd.sock`), and first the shims'
/// children: each is a container's pid 1, whose death ends its pid namespace. Shims and
/// containers outlive containerd, and would otherwise be re-parented to pid 1.
fn kill_processes_naming(dir: &Path) {
    let dir = dir.to_string_lossy().into_owned();
    let all = processes();
    let shims: BTreeSet<u32> = all
        .iter()
        .filter(|p| p.command.contains("containerd-shim") && p.command.contains(&dir))
        .map(|p| p.pid)
        .collect();
    let containers: Vec<u32> = all
        .iter()
        .filter(|p| shims.contains(&p.parent))
        .map(|p| p.pid)
        .collect();
    let rest: Vec<u32> = all
        .iter()
        .filter(|p| p.command.contains(&dir) && !shims.contains(&p.pid))
        .map(|p| p.pid)
        .collect();
    for group in [containers, shims.into_iter().collect(), rest] {
        if group.is_empty() {
            continue;
        }
        let pids: Vec<String> = group.iter().map(u32::to_string).collect();
        let mut args = vec!["-KILL"];
        args.extend(pids.iter().map(String::as_str));
        let _ = run(Path::new("kill"), &args);
        // Gone or a zombie (an orphan's zombie is reaped late by pid 1).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let alive: BTreeSet<u32> = processes().iter().map(|p| p.pid).collect();
            if group.iter().all(|pid| !alive.contains(pid)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Mount points, unescaped (`\040` is a space).
fn mount_points() -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|m| {
            m.replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
        })
        .collect()
}

/// Unmounts everything under `dir`, deepest first, lazily: pod netns and shm mounts, container
/// root filesystems, kubelet's bind mount of its root dir and the pods' volumes. Unmounting a
/// netns destroys it, and with it the pod's veth pair.
fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .filter(|m| Path::new(m).starts_with(dir))
            .collect();
        if mounts.is_empty() {
            return;
        }
        mounts.sort();
        mounts.dedup();
        for mount in mounts.iter().rev() {
            let _ = run(Path::new("umount"), &["-l", mount]);
        }
    }
}

/// runc leaves a container's cgroups behind when its shim is killed: `/k8s.io/<id>` in every
/// hierarchy (kubelet runs with `--cgroups-per-qos=false`). Only empty ones can go.
fn remove_container_cgroups() {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = vec![PathBuf::from("/sys/fs/cgroup/k8s.io")];
    roots.extend(hierarchies.flatten().map(|h| h.path().join("k8s.io")));
    for root in roots {
        if let Ok(children) = fs::read_dir(&root) {
            for child in children.flatten() {
                if child.path().is_dir() {
                    let _ = fs::remove_dir(child.path());
                }
            }
            let _ = fs::remove_dir(&root);
        }
    }
}

/// `kube-proxy --cleanup`, then what it leaves (kubelet's `KUBE-FIREWALL` and its jumps from
/// INPUT and OUTPUT, `KUBE-MARK-*`, the canaries, portmap's `CNI-*`): every rule of a built-in
/// chain that jumps to such a chain, then the chains themselves.
fn clean_iptables(proxy: &Path) {
    let ours = |chain: &str| chain.starts_with("KUBE-") || chain.starts_with("CNI-");
    let any_left = || {
        ["iptables", "ip6tables"].iter().any(|tool| {
            ["filter", "nat", "mangle"].iter().any(|table| {
                run(Path::new(tool), &["-t", table, "-S"]).is_ok_and(|rules| {
                    rules
                        .lines()
                        .any(|l| l.contains("KUBE-") || l.contains("CNI-"))
                })
            })
        })
    };
    if !any_left() {
        return;
    }
    let _ = run(proxy, &["--cleanup"]);
    for tool in ["iptables", "ip6tables"] {
        if find_in_path(tool).is_none() {
            continue;
        }
        for table in ["filter", "nat", "mangle", "raw", "security"] {
            let Ok(rules) = run(Path::new(tool), &["-t", table, "-S"]) else {
                continue;
            };
            let mut chains = Vec::new();
            for line in rules.lines() {
                if let Some(chain) = line.strip_prefix("-N ") {
                    if ours(chain.trim()) {
                        chains.push(chain.trim().to_string());
                    }
                } else if let Some(rule) = line.strip_prefix("-A ") {
                    let chain = rule.split_whitespace().next().unwrap_or_default();
                    let jumps_to_ours = rule
                        .split_once(" -j ")
                        .is_some_and(|(_, target)| ours(target));
                    if !ours(chain) && jumps_to_ours {
                        // Through sh: the rule quotes its comments as `iptables -S` prints them.
                        let _ = run(
                            Path::new("sh"),
                            &["-c", &format!("{tool} -t {table} -D {rule}")],
                        );
                    }
                }
            }
            for flag in ["-F", "-X"] {
                for chain in &chains {
                    let _ = run(Path::new(tool), &["-t", table, flag, chain]);
                }
            }
        }
    }
}

fn restore_host_state(dir: &Path) {
    if let Ok(sysctls) = fs::read_to_string(dir.join(SYSCTLS_FILE)) {
        for line in sysctls.lines() {
            let Some((name, value)) = line.split_once(' ') else {
                continue;
            };
            let path = sysctl_path(name);
            if fs::read_to_string(&path).is_ok_and(|now| now.trim() != value)
                && let Err(e) = fs::write(&path, value)
            {
                eprintln!("podium node: cannot restore {name}={value}: {e}");
            }
        }
    }
    let Ok(paths) = fs::read_to_string(dir.join(HOST_PATHS_FILE)) else {
        return;
    };
    let since = fs::metadata(dir.join(MARKER))
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    for line in paths.lines() {
        match line.split_once(' ') {
            Some(("missing", path)) => {
                let _ = fs::remove_dir_all(path);
            }
            Some(("existing", path)) => {
                let Ok(entries) = fs::read_dir(path) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let newer = entry
                        .path()
                        .symlink_metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= since);
                    if newer {
                        let _ = fs::remove_dir_all(entry.path())
                            .or_else(|_| fs::remove_file(entry.path()));
                    }
                }
            }
            _ => {}
        }
    }
}
