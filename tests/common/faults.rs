//! Client-side fault injection: a tower layer put between a kube `Client` and the API server.
//! `HoldWrites` freezes every write (anything but GET) until released, the way a paused or
//! partitioned replica would sit on its requests, and records what the server then answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::ClientBuilder;
use tokio::sync::watch;
use tower::{Layer, Service};

/// (method, path, status) of a write that was held and then sent.
pub type HeldWrite = (Method, String, u16);

#[derive(Clone)]
pub struct HoldWrites {
    hold: Arc<watch::Sender<bool>>,
    released: Arc<Mutex<Vec<HeldWrite>>>,
}

impl Default for HoldWrites {
    fn default() -> Self {
        HoldWrites {
            hold: Arc::new(watch::channel(false).0),
            released: Arc::default(),
        }
    }
}

impl HoldWrites {
    /// A client for `config` whose writes this layer can freeze.
    pub fn client(&self, config: kube::Config) -> Client {
        ClientBuilder::try_from(config)
            .expect("client builder")
            .with_layer(self)
            .build()
    }
    pub fn freeze(&self) {
        self.hold.send_replace(true);
    }
    pub fn release(&self) {
        self.hold.send_replace(false);
    }
    /// Writes that were held, with the status the server gave them once released.
    pub fn released(&self) -> Vec<HeldWrite> {
        self.released.lock().unwrap().clone()
    }
}

impl<S> Layer<S> for HoldWrites {
    type Service = HoldWritesService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HoldWritesService {
            inner,
            layer: self.clone(),
        }
    }
}

pub struct HoldWritesService<S> {
    inner: S,
    layer: HoldWrites,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for HoldWritesService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let held = method != Method::GET && *self.layer.hold.borrow();
        let mut hold = self.layer.hold.subscribe();
        let released = self.layer.released.clone();
        // The inner future does nothing until polled, so holding it holds the request.
        let response = self.inner.call(req);
        Box::pin(async move {
            if held {
                let _ = hold.wait_for(|h| !*h).await;
            }
            let result = response.await;
            if held && let Ok(r) = &result {
                released
                    .lock()
                    .unwrap()
                    .push((method, path, r.status().as_u16()));
            }
            result
        })
    }
}
