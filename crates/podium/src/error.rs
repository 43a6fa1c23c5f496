//! One error type for the operator, a variant per API step, so a failure says which step failed
//! and `kind()` gives a short, stable label for metrics and conditions.

use thiserror::Error;

#[derive(Error, Debug)]
pub enum Error {
    #[error("writing Lease {name}: {source}")]
    LeaseWrite {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading Lease {name}: {source}")]
    LeaseRead {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting Lease {name}: {source}")]
    LeaseDelete {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("labelling pod {pod}: {source}")]
    PodPatch {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading pod {pod}: {source}")]
    PodRead {
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading the group again: {0}")]
    GroupRead(#[source] kube::Error),
    #[error("writing status: {0}")]
    StatusPatch(#[source] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the Lease changed while the handover was in progress: {0}")]
    LeaseMoved(String),
    #[error("group has no namespace or name")]
    MissingObjectKey,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Every [`Error::kind`], so that the error counter can start at 0 for each: `rate()` and
    /// `increase()` miss the first error of a series that appears only with it.
    pub const KINDS: &[&str] = &[
        "lease_write",
        "lease_read",
        "lease_delete",
        "pod_patch",
        "pod_read",
        "group_read",
        "status_patch",
        "finalizer",
        "lease_moved",
        "missing_key",
    ];

    /// Short label for metrics and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::LeaseWrite { .. } => "lease_write",
            Error::LeaseRead { .. } => "lease_read",
            Error::LeaseDelete { .. } => "lease_delete",
            Error::PodPatch { .. } => "pod_patch",
            Error::PodRead { .. } => "pod_read",
            Error::GroupRead(_) => "group_read",
            Error::StatusPatch(_) => "status_patch",
            Error::Finalizer(_) => "finalizer",
            Error::LeaseMoved(_) => "lease_moved",
            Error::MissingObjectKey => "missing_key",
        }
    }

    /// The API error underneath, if any.
    pub fn api_error(&self) -> Option<&kube::Error> {
        match self {
            Error::LeaseWrite { source, .. }
            | Error::LeaseRead { source, .. }
            | Error::LeaseDelete { source, .. }
            | Error::PodPatch { source, .. }
            | Error::PodRead { source, .. }
            | Error::GroupRead(source)
            | Error::StatusPatch(source) => Some(source),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.api_error(),
                kube::runtime::finalizer::Error::AddFinalizer(e)
                | kube::runtime::finalizer::Error::RemoveFinalizer(e) => Some(e),
                _ => None,
            },
            Error::LeaseMoved(_) | Error::MissingObjectKey => None,
        }
    }

    /// What the API server said, without the client's wrapping: the part a user can act on.
    pub fn server_message(&self) -> Option<&str> {
        match self.api_error()? {
            kube::Error::Api(status) if !status.message.is_empty() => Some(status.message.as_str()),
            _ => None,
        }
    }

    /// A 409: someone else wrote first. Expected under contention; retry soon from fresh state.
    pub fn is_conflict(&self) -> bool {
        self.api_error()
            .is_some_and(|e| status_code(e) == Some(409))
            || matches!(self, Error::LeaseMoved(_))
    }

    /// A 403: the operator's RBAC lacks a verb. Worth telling the user in words.
    pub fn is_forbidden(&self) -> bool {
        self.api_error()
            .is_some_and(|e| status_code(e) == Some(403))
    }
}

pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_lists_every_variants_kind_once() {
        let api = || kube::Error::LinesCodecMaxLineLengthExceeded;
        let every = [
            Error::LeaseWrite {
                name: "l".into(),
                source: api(),
            },
            Error::LeaseRead {
                name: "l".into(),
                source: api(),
            },
            Error::LeaseDelete {
                name: "l".into(),
                source: api(),
            },
            Error::PodPatch {
                pod: "p".into(),
                source: api(),
            },
            Error::PodRead {
                pod: "p".into(),
                source: api(),
            },
            Error::GroupRead(api()),
            Error::StatusPatch(api()),
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::UnnamedObject)),
            Error::LeaseMoved("l".into()),
            Error::MissingObjectKey,
        ];
        for error in &every {
            // A new variant stops this compiling until it is added to `every` (and KINDS).
            match error {
                Error::LeaseWrite { .. }
                | Error::LeaseRead { .. }
                | Error::LeaseDelete { .. }
                | Error::PodPatch { .. }
                | Error::PodRead { .. }
                | Error::GroupRead(_)
                | Error::StatusPatch(_)
                | Error::Finalizer(_)
                | Error::LeaseMoved(_)
                | Error::MissingObjectKey => {}
            }
        }
        let kinds: Vec<&str> = every.iter().map(Error::kind).collect();
        assert_eq!(kinds, Error::KINDS);
    }
}
