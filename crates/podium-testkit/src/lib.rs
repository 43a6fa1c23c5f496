//! Podium's test kit, shared by the integration tests, the bench and the demo, and never
//! compiled into the operator:
//!
//! - [`testbed`]: a real etcd, kube-apiserver and kube-controller-manager on loopback, and a
//!   simulated kubelet; or, with [`testbed::node::RealNode`], the same control plane beside a
//!   real node (containerd, kubelet, kube-scheduler, kube-proxy) for the end-to-end suite.
//! - [`fixture`]: a namespace, a Deployment of servers, a leader Service, a group, and waits.
//! - [`observe`]: watches of pods, Leases and EndpointSlices, timestamped as they arrive.
//! - [`checker`]: the safety invariants checked over the whole watch history of a test.
//! - [`faults`]: a client layer that holds back or fails the operator's writes.
//! - [`counting`]: a client layer that counts (and can log) every request.
//! - [`lag`]: a client layer whose watches trail the server by a fixed time.
//! - [`intercept`]: the tower plumbing those layers share.
//! - [`pod`]: readiness and IP as read off a pod.
//! - [`prometheus`]: the operator's metrics as Prometheus scrapes and queries them.
//! - [`wait`]: polling until a condition holds.
pub mod checker;
pub mod counting;
pub mod faults;
pub mod fixture;
pub mod intercept;
pub mod lag;
pub mod leader_process;
pub mod observe;
pub mod pod;
pub mod prometheus;
pub mod testbed;
pub mod token_holder;
pub mod wait;

/// The repository's top directory, for tests that read the chart, the CRD or the scripts.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root above crates/podium-testkit")
}
