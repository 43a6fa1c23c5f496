//! The tokens that authorise notifications: short-lived ServiceAccount tokens for the
//! operator's own identity, requested through the TokenRequest API, one audience per pod
//! ([`podium_core::notify::audience`]: namespace, group and pod UID). A pod verifies a token
//! against the cluster's published keys and takes only one minted for itself, so a token
//! captured at one pod is worthless at any other (docs/design.md, "Threat model").
use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::Mutex;

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

type Slot = Arc<Mutex<Option<(String, Instant)>>>;

pub struct TokenSource {
    api: Api<ServiceAccount>,
    name: String,
    /// One slot per audience; each slot's lock makes its TokenRequest single-flight.
    cached: StdMutex<HashMap<String, Slot>>,
}

impl TokenSource {
    /// Tokens for the ServiceAccount `namespace/name` (the operator's own).
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        TokenSource {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            cached: StdMutex::new(HashMap::new()),
        }
    }

    fn slot(&self, audience: &str) -> Slot {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = cached.get(audience) {
            return slot.clone();
        }
        // Pods come and go: drop the slots whose tokens have expired, or that never got one and
        // nobody waits on, so that the map holds about one slot per live pod.
        let now = Instant::now();
        cached.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map(|held| held.as_ref().is_some_and(|(_, expires)| *expires > now))
                    .unwrap_or(true)
        });
        cached.entry(audience.to_string()).or_default().clone()
    }

    /// A token for `audience` valid for at least two more minutes.
    pub async fn token(&self, audience: &str) -> Result<String, TokenError> {
        let slot = self.slot(audience);
        let mut cached = slot.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && expires.saturating_duration_since(Instant::now()) > RENEW_WITH_LEFT
        {
            return Ok(token.clone());
        }
        let asked = Instant::now();
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.into()]),
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
