//! One notification over HTTP: POST the message, read the pod's answer.
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use podium_core::notify::{Ack, RoleMessage, fair};

/// Larger answers are not acks.
const MAX_ANSWER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach the pod: {0}")]
    Unreachable(String),
    #[error("the pod refused the token (HTTP {0})")]
    Unauthorized(StatusCode),
    #[error("the pod answered HTTP {status}: {body}")]
    Unexpected { status: StatusCode, body: String },
    #[error("the pod's answer is not an ack: {0}")]
    BadAnswer(String),
}

impl SendError {
    pub fn kind(&self) -> &'static str {
        match self {
            SendError::Timeout(_) => "timeout",
            SendError::Unreachable(_) => "unreachable",
            SendError::Unauthorized(_) => "unauthorized",
            SendError::Unexpected { .. } => "unexpected",
            SendError::BadAnswer(_) => "bad_answer",
        }
    }
}

#[derive(Clone)]
pub struct Sender {
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Sender {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Sender {
            http: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl Sender {
    /// Sends `message` to `url` and returns the pod's ack: taken (200) or refused as stale
    /// (409), both with the pod's state. Only a demotion may take long to answer
    /// ([`fair::timeout_millis`]): a pod that holds any other message holds a slot of the
    /// notifier's pool.
    pub async fn send(
        &self,
        url: &str,
        token: &str,
        message: &RoleMessage,
    ) -> Result<Ack, SendError> {
        let body = serde_json::to_vec(message).expect("a role message always serialises");
        let request = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| SendError::Unreachable(error_chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| SendError::BadAnswer(e.to_string()))?
                .to_bytes();
            Ok::<_, SendError>((status, body))
        };
        let timeout =
            Duration::from_millis(fair::timeout_millis(message.role, message.term_millis));
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| SendError::Timeout(timeout))??;
        match status {
            StatusCode::OK | StatusCode::CONFLICT => {
                serde_json::from_slice(&body).map_err(|e| SendError::BadAnswer(e.to_string()))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(SendError::Unauthorized(status))
            }
            status => Err(SendError::Unexpected {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
