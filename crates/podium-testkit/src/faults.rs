//! Client-side fault injection: tower layers put between a kube `Client` and the API server.
//! `HoldWrites` freezes every write (anything but GET) until released, the way a paused or
//! partitioned replica would sit on its requests, and records what the server then answered.
//! `Faults` injects one fault (409, 500, a timeout before or after the write was applied, or a
//! crash) into the Nth write of the election protocol after it is armed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use kube::Client;
use kube::client::{ClientBuilder, DynBody};
use tokio::sync::watch;
use tower::{BoxError, Layer, Service};

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

/// What to do to one write of the operator's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer 409 Conflict without sending the request, as if someone else wrote first.
    Conflict,
    /// Answer 500 without sending the request.
    ServerError,
    /// Never send the request; fail after the delay, as a client-side timeout does.
    TimeoutBeforeSend(Duration),
    /// Send the request (the server applies it), lose the response, fail after the delay: the
    /// write happened but the operator does not know.
    TimeoutAfterSend(Duration),
    /// The operator dies here: this request and every later one hang forever (nothing more
    /// reaches the server) and [`Faults::crashed`] fires so the test can `abort()` it.
    Crash,
}

/// One write the layer saw after [`Faults::arm`]: what it was and what came of it.
#[derive(Clone, Debug)]
pub struct SeenWrite {
    pub method: Method,
    pub path: String,
    /// The status the server (or the fault) answered; `None` for an error or a hang.
    pub status: Option<u16>,
    pub fault: Option<Fault>,
}

/// Writes that belong to the election protocol: Leases, pods, ElectionGroups. Events and the
/// operator's own Lease are not counted.
pub fn is_protocol_write(method: &Method, path: &str) -> bool {
    method != Method::GET
        && (path.contains("/leases/")
            || path.contains("/pods/")
            || path.contains("/electiongroups/"))
        && !path.contains("/leases/podium-operator")
}

#[derive(Default)]
struct FaultState {
    /// The fault and how many protocol writes still pass before it.
    armed: Option<(Fault, usize)>,
    fired: Option<Fault>,
    seen: Vec<SeenWrite>,
}

/// A tower layer that injects one [`Fault`] into the Nth protocol write after [`Faults::arm`]
/// (1 is the next one): a 409, a 500, a timeout before or after the server applied the write,
/// or a crash between two writes. Everything else passes through.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    crashed: Arc<watch::Sender<bool>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            state: Arc::default(),
            crashed: Arc::new(watch::channel(false).0),
        }
    }
}

impl Faults {
    /// A client for `config` whose writes this layer can fail.
    pub fn client(&self, config: kube::Config) -> Client {
        ClientBuilder::try_from(config)
            .expect("client builder")
            .with_layer(self)
            .build()
    }

    /// Injects `fault` into the `nth` protocol write from now on (1: the next one).
    pub fn arm(&self, fault: Fault, nth: usize) {
        assert!(nth >= 1, "writes are counted from 1");
        let mut state = self.state.lock().unwrap();
        state.armed = Some((fault, nth - 1));
        state.fired = None;
        state.seen.clear();
    }

    /// The fault, once it was injected.
    pub fn fired(&self) -> Option<Fault> {
        self.state.lock().unwrap().fired
    }

    /// The protocol writes seen since [`Faults::arm`].
    pub fn seen(&self) -> Vec<SeenWrite> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Resolves once a [`Fault::Crash`] was injected.
    pub async fn crashed(&self) {
        let mut crashed = self.crashed.subscribe();
        let _ = crashed.wait_for(|c| *c).await;
    }

    /// Decides what happens to one request; records protocol writes.
    fn admit(&self, method: &Method, path: &str) -> (Option<Fault>, Option<usize>) {
        if *self.crashed.borrow() {
            return (Some(Fault::Crash), None);
        }
        if !is_protocol_write(method, path) {
            return (None, None);
        }
        let mut state = self.state.lock().unwrap();
        let fault = match &mut state.armed {
            Some((fault, 0)) => {
                let fault = *fault;
                state.armed = None;
                state.fired = Some(fault);
                Some(fault)
            }
            Some((_, before)) => {
                *before -= 1;
                None
            }
            None => None,
        };
        state.seen.push(SeenWrite {
            method: method.clone(),
            path: path.to_string(),
            status: None,
            fault,
        });
        let index = state.seen.len() - 1;
        drop(state);
        if fault == Some(Fault::Crash) {
            self.crashed.send_replace(true);
        }
        (fault, Some(index))
    }

    fn record_status(&self, index: Option<usize>, status: u16) {
        if let Some(i) = index {
            self.state.lock().unwrap().seen[i].status = Some(status);
        }
    }
}

impl<S> Layer<S> for Faults {
    type Service = FaultsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FaultsService {
            inner,
            faults: self.clone(),
        }
    }
}

pub struct FaultsService<S> {
    inner: S,
    faults: Faults,
}

/// A Kubernetes `Status` response, as the API server sends for an error.
fn status_response(code: u16, reason: &str) -> Response<Box<DynBody>> {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("injected by the test: {reason}"),
        "reason": reason,
        "code": code,
    })
    .to_string();
    let body: Box<DynBody> = Box::new(Full::new(Bytes::from(body)).map_err(|e| match e {}));
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a valid response")
}

impl<S> Service<Request<kube::client::Body>> for FaultsService<S>
where
    S: Service<Request<kube::client::Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<kube::client::Body>) -> Self::Future {
        let (fault, index) = self.faults.admit(req.method(), req.uri().path());
        let faults = self.faults.clone();
        // The inner future sends nothing until polled, so not polling it drops the request.
        let response = self.inner.call(req);
        Box::pin(async move {
            match fault {
                None => {
                    let result = response.await;
                    if let Ok(r) = &result {
                        faults.record_status(index, r.status().as_u16());
                    }
                    result
                }
                Some(Fault::Conflict) => {
                    faults.record_status(index, 409);
                    Ok(status_response(409, "Conflict"))
                }
                Some(Fault::ServerError) => {
                    faults.record_status(index, 500);
                    Ok(status_response(500, "InternalError"))
                }
                Some(Fault::TimeoutBeforeSend(delay)) => {
                    tokio::time::sleep(delay).await;
                    Err(timeout_error())
                }
                Some(Fault::TimeoutAfterSend(delay)) => {
                    if let Ok(r) = response.await {
                        faults.record_status(index, r.status().as_u16());
                    }
                    tokio::time::sleep(delay).await;
                    Err(timeout_error())
                }
                Some(Fault::Crash) => std::future::pending().await,
            }
        })
    }
}

fn timeout_error() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "injected by the test: request timed out",
    ))
}
