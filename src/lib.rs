//! Podium: leader election as a service for Kubernetes pods.
//!
//! Module map (see docs/design.md):
//! - [`crd`]: the `ElectionGroup` API types, the single source of truth for the CRD.
//! - [`election`]: the pure core: observed group, pods and Lease in; Lease, label and status
//!   writes out.
//! - [`reconcile`]: reads the caches, calls the core, applies its decision in order.
//! - [`controller`]: the watches and how their events map to groups.
//! - [`lease`], [`labels`]: the two kinds of conditional write.
//! - [`operator`], [`ha`], [`http`], [`metrics`], [`telemetry`], [`cli`]: running it.
//! - [`testbed`]: a real local control plane (etcd, kube-apiserver, kube-controller-manager)
//!   and a simulated kubelet, shared by the tests, the demo and the benchmarks.
pub mod bench;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod demo;
pub mod election;
pub mod error;
pub mod ha;
pub mod http;
pub mod index;
pub mod labels;
pub mod lease;
pub mod metrics;
pub mod operator;
pub mod own_writes;
pub mod reconcile;
pub mod selector;
pub mod telemetry;
pub mod testbed;
pub mod validate;

/// The one field manager for every podium write, so server-side apply and `kubectl` show whose
/// fields are whose.
pub const FIELD_MANAGER: &str = "podium";
