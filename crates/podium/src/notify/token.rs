//! The token that signs notifications: a short-lived ServiceAccount token for the operator's
//! own identity, requested with podium's audience through the TokenRequest API. A pod verifies
//! it against the cluster's published keys, so it needs no secret and no RBAC of its own beyond
//! reading those keys (docs/design.md, "Threat model").
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::Mutex;

use podium_core::notify::AUDIENCE;

/// The shortest lifetime the API server grants; shorter requests are raised to it.
const LIFETIME: Duration = Duration::from_secs(600);
/// A token is replaced once this much of its lifetime is left, so no send carries one that
/// expires in flight.
const RENEW_WITH_LEFT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the TokenRequest for the operator's ServiceAccount failed: {0}")]
    Request(#[source] kube::Error),
    #[error("the API server granted an empty token")]
    Empty,
}

pub struct TokenSource {
    api: Api<ServiceAccount>,
    name: String,
    cached: Mutex<Option<(String, Instant)>>,
}

impl TokenSource {
    /// Tokens for the ServiceAccount `namespace/name` (the operator's own).
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        TokenSource {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            cached: Mutex::new(None),
        }
    }

    /// A token valid for at least two more minutes.
    pub async fn token(&self) -> Result<String, TokenError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && expires.saturating_duration_since(Instant::now()) > RENEW_WITH_LEFT
        {
            return Ok(token.clone());
        }
        let asked = Instant::now();
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![AUDIENCE.into()]),
                expiration_seconds: Some(LIFETIME.as_secs() as i64),
                ..Default::default()
            }),
            ..Default::default()
        };
        let granted: TokenRequest = self
            .api
            .create_subresource("token", &self.name, &PostParams::default(), &request)
            .await
            .map_err(TokenError::Request)?;
        let token = granted
            .status
            .and_then(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::Empty)?;
        // The server may grant less than asked; without a readable expiry, assume the least.
        *cached = Some((token.clone(), asked + LIFETIME));
        Ok(token)
    }
}
