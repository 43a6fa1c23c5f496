//! A client layer whose watches trail the server: [`LaggingWatches`] hands on every frame of a
//! watch of one resource a fixed time after it arrived, the way a replica's cache trails the
//! API server under load. Lists, reads and writes pass untouched, so the operator acts on the
//! server at once and learns of its own writes late.

use std::time::Duration;

use futures::StreamExt;
use http::Request;
use http_body_util::{BodyStream, StreamBody};
use kube::client::{Body, DynBody};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::intercept::{Hook, Pending};

/// Delays each frame of every `watch=true` request on `resource` (a plural such as `pods`) by
/// `lag`, keeping their order and spacing.
#[derive(Clone)]
pub struct LaggingWatches {
    resource: &'static str,
    lag: Duration,
}

impl LaggingWatches {
    pub fn new(resource: &'static str, lag: Duration) -> Self {
        LaggingWatches { resource, lag }
    }
}

impl Hook for LaggingWatches {
    /// Whether the request is a watch this layer delays.
    type Seen = bool;

    fn see(&self, request: &Request<Body>) -> bool {
        let uri = request.uri();
        uri.path().rsplit('/').next() == Some(self.resource)
            && uri
                .query()
                .unwrap_or_default()
                .split('&')
                .any(|pair| pair == "watch=true" || pair == "watch=1")
    }

    fn answer(&self, lagging: bool, send: Pending) -> Pending {
        if !lagging {
            return send;
        }
        let lag = self.lag;
        Box::pin(async move {
            let response = send.await?;
            Ok(response.map(|body| {
                // A task stamps each frame as it arrives, so that a burst is handed on as a
                // burst `lag` later rather than one `lag` per frame.
                let (stamped, arrivals) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(async move {
                    let mut frames = BodyStream::new(body);
                    while let Some(frame) = frames.next().await {
                        if stamped.send((Instant::now() + lag, frame)).is_err() {
                            break;
                        }
                    }
                });
                let late = UnboundedReceiverStream::new(arrivals).then(|(due, frame)| async move {
                    tokio::time::sleep_until(due).await;
                    frame
                });
                Box::new(StreamBody::new(Box::pin(late))) as Box<DynBody>
            }))
        })
    }
}
