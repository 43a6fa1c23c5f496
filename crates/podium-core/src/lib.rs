//! Podium's core: the `ElectionGroup` API and every decision of the protocol, as pure
//! functions. Nothing here talks to an API server or needs an async runtime; the crate does not
//! even depend on kube's client, so that purity is checked by the compiler.
//!
//! - [`crd`]: the `ElectionGroup` types, the single source of truth for the CRD, and the label,
//!   annotation and condition constants.
//! - [`election`]: observed group, pods and Lease in; Lease, label and status writes out.
//! - [`pod`]: a pod as the operator decodes and caches it, only the fields the election reads.
//! - [`lean_lease`], [`meta`]: Leases and metadata decoded without their managed fields.
//! - [`lease`], [`labels`]: the objects and patch bodies those writes become.
//! - [`renewal`]: a kept holder's routine renewal, sent without deciding again.
//! - [`selector`], [`validate`]: label-selector matching and the spec rules, checked in code.
//! - [`notify`]: the role notifications pushed to pods and the rules of `podium exec`'s term
//!   and of activating a new leader's process.
//! - [`request`]: the verb and resource of a kube API request, for the client metrics and the
//!   test kit's request counts.
pub mod crd;
pub mod election;
pub mod labels;
pub mod lean_lease;
pub mod lease;
pub mod meta;
pub mod notify;
pub mod pod;
pub mod renewal;
pub mod request;
pub mod selector;
pub mod validate;

/// The one field manager for every podium write, so server-side apply and `kubectl` show whose
/// fields are whose.
pub const FIELD_MANAGER: &str = "podium";
