//! Client-side fault injection: one client layer, [`Faults`], put between a kube `Client` and
//! the API server. It does two things, each off until asked:
//!
//! - [`Faults::freeze`] holds every write (anything but GET) until [`Faults::release`], the way
//!   a paused or partitioned replica would sit on its requests, and records what the server then
//!   answered;
//! - [`Faults::arm`] injects one [`Fault`] (409, 500, a timeout before or after the write was
//!   applied, or a crash) into the Nth write of the election protocol.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use kube::Client;
use kube::client::{Body, DynBody};
use tokio::sync::watch;
use tower::BoxError;

use crate::intercept::{self, Hook, Pending, Reply};

/// (method, path, status) of a write that was held and then sent.
pub type HeldWrite = (Method, String, u16);

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

/// The client layer: holds writes while frozen, and injects one [`Fault`] into the Nth protocol
/// write after [`Faults::arm`] (1 is the next one). Everything else passes through.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<FaultState>>,
    crashed: Arc<watch::Sender<bool>>,
    hold: Arc<watch::Sender<bool>>,
    released: Arc<Mutex<Vec<HeldWrite>>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            state: Arc::default(),
            crashed: Arc::new(watch::channel(false).0),
            hold: Arc::new(watch::channel(false).0),
            released: Arc::default(),
        }
    }
}

impl Faults {
    /// A client for `config` whose writes this layer can hold or fail.
    pub fn client(&self, config: kube::Config) -> Client {
        intercept::client(config, self.clone()).expect("client builder")
    }

    /// Holds every write from now on, until [`Faults::release`].
    pub fn freeze(&self) {
        self.hold.send_replace(true);
    }

    /// Sends the held writes, and lets later ones through.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    /// Writes that were held, with the status the server gave them once released.
    pub fn released(&self) -> Vec<HeldWrite> {
        self.released.lock().unwrap().clone()
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

/// What [`Faults`] decided about one request when it was made.
pub struct Decision {
    method: Method,
    path: String,
    held: bool,
    fault: Option<Fault>,
    /// Its place in [`Faults::seen`], for a protocol write.
    index: Option<usize>,
}

impl Hook for Faults {
    type Seen = Decision;

    fn see(&self, request: &Request<Body>) -> Decision {
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        let held = method != Method::GET && *self.hold.borrow();
        let (fault, index) = self.admit(&method, &path);
        Decision {
            method,
            path,
            held,
            fault,
            index,
        }
    }

    fn answer(&self, decision: Decision, send: Pending) -> Pending {
        let faults = self.clone();
        Box::pin(async move {
            if decision.held {
                let _ = faults.hold.subscribe().wait_for(|h| !*h).await;
            }
            let result = faults.inject(decision.fault, decision.index, send).await;
            if decision.held
                && let Ok(r) = &result
            {
                faults.released.lock().unwrap().push((
                    decision.method,
                    decision.path,
                    r.status().as_u16(),
                ));
            }
            result
        })
    }
}

impl Faults {
    /// What comes of a request given its fault. Not polling `send` drops the request unsent.
    async fn inject(&self, fault: Option<Fault>, index: Option<usize>, send: Pending) -> Reply {
        match fault {
            None => {
                let result = send.await;
                if let Ok(r) = &result {
                    self.record_status(index, r.status().as_u16());
                }
                result
            }
            Some(Fault::Conflict) => {
                self.record_status(index, 409);
                Ok(status_response(409, "Conflict"))
            }
            Some(Fault::ServerError) => {
                self.record_status(index, 500);
                Ok(status_response(500, "InternalError"))
            }
            Some(Fault::TimeoutBeforeSend(delay)) => {
                tokio::time::sleep(delay).await;
                Err(timeout_error())
            }
            Some(Fault::TimeoutAfterSend(delay)) => {
                if let Ok(r) = send.await {
                    self.record_status(index, r.status().as_u16());
                }
                tokio::time::sleep(delay).await;
                Err(timeout_error())
            }
            Some(Fault::Crash) => std::future::pending().await,
        }
    }
}

fn timeout_error() -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "injected by the test: request timed out",
    ))
}
