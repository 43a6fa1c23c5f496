//! The push mode: an HTTP endpoint for the operator's role messages, the term timer, and the
//! state both drive, behind one lock so that commands apply in the order they were taken.
//!
//! The endpoint faces every pod in the cluster, so it is served with bounds of its own
//! ([`serve`]): a header deadline, a body deadline and size limit, and a cap on open
//! connections. A token is checked before a byte of the body is read.
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use podium_core::notify::{Command, NotifyRole, Receiver, RejectionKind, RoleMessage};
use ring::rand::SecureRandom;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify, oneshot, watch};
use tower::ServiceExt as _;

use super::child::{Exit, Role, Running};
use super::verify::{Keys, TokenError, bearer};

/// The largest role message taken; a real one is a few hundred bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a client may take to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client with a valid token may take to send the body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; see [`serve`] for what happens to one more.
pub const MAX_CONNECTIONS: usize = 64;
/// hyper's read buffer, which bounds the request head (a token is about 1 KiB); hyper's
/// smallest is 8 KiB.
const MAX_HEAD: usize = 32 * 1024;
/// At most one warning per this long for refused tokens or shed connections.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Lets one event in `interval` through to the log and counts the rest, so that a flood of
/// refusals cannot flood the log.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// An event at `now`: `Some(events suppressed since the last one logged)` if it is to be
    /// logged, `None` if it is only counted.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Everything the handlers, the timer and shutdown share.
pub struct Exec {
    argv: Vec<String>,
    grace: Duration,
    origin: Instant,
    keys: Arc<Keys>,
    rng: ring::rand::SystemRandom,
    inner: Mutex<Inner>,
    /// Wakes the term timer when the deadline moved.
    term_moved: Notify,
    /// What /role and /readyz read without waiting for a message in progress.
    view: StdMutex<View>,
    /// Messages answered so far: shutdown lingers until the operator's next one is answered.
    answered: watch::Sender<u64>,
    /// Shutdown began: /readyz answers 503 so that the pod turns NotReady and is demoted.
    closing: std::sync::atomic::AtomicBool,
    /// Refused tokens: a flood of them logs one line per interval, not one per request.
    refusals: StdMutex<Throttle>,
}

struct Inner {
    receiver: Receiver,
    child: Option<Running>,
    /// Set once shutdown began: nothing starts after it.
    closed: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct View {
    /// The role of the last message taken.
    role: Option<NotifyRole>,
    group: Option<String>,
    /// The highest epoch taken.
    epoch: u64,
    /// The epoch the command runs (or ran) under, while the term lasts.
    leading_epoch: Option<u64>,
    #[serde(skip)]
    deadline: Option<u64>,
    term_remaining_millis: Option<u64>,
    running: bool,
    pid: Option<u32>,
    last_exit: Option<String>,
    /// The command could not start, or exited on its own, while this pod leads.
    gave_up: Option<String>,
    #[serde(skip)]
    exit_watch: Option<watch::Receiver<Option<Exit>>>,
}

impl Exec {
    pub fn new(
        argv: Vec<String>,
        grace: Duration,
        receiver: Receiver,
        keys: Arc<Keys>,
    ) -> Arc<Exec> {
        Arc::new(Exec {
            argv,
            grace,
            origin: Instant::now(),
            keys,
            rng: ring::rand::SystemRandom::new(),
            inner: Mutex::new(Inner {
                receiver,
                child: None,
                closed: false,
            }),
            term_moved: Notify::new(),
            view: StdMutex::new(View::default()),
            answered: watch::channel(0).0,
            closing: std::sync::atomic::AtomicBool::new(false),
            refusals: StdMutex::new(Throttle::new(WARN_EVERY)),
        })
    }

    /// Logs a refused token, at most once per [`WARN_EVERY`].
    fn refused(&self, reason: &TokenError) {
        let admitted = self
            .refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            tracing::warn!(
                reason = %reason,
                suppressed,
                "refused a role message: its token does not verify (further refusals are counted, not logged, for {}s)",
                WARN_EVERY.as_secs()
            );
        }
    }

    /// This process's monotonic clock, in milliseconds.
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn nonce(&self) -> String {
        let mut bytes = [0u8; 16];
        self.rng
            .fill(&mut bytes)
            .expect("the system's random source failed");
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn router(self: &Arc<Self>, path: &str) -> Router {
        Router::new()
            .route(path, post(notify))
            .route("/readyz", get(readyz))
            .route("/role", get(role))
            .with_state(self.clone())
    }

    /// Takes one verified message; returns the status and the answer once its command is done.
    async fn take(self: Arc<Self>, message: RoleMessage) -> (StatusCode, serde_json::Value) {
        let mut inner = self.inner.lock().await;
        let now = self.now();
        let reply = match inner.receiver.handle(&message, now, self.nonce()) {
            Ok(reply) => reply,
            Err(rejection) => {
                drop(inner);
                let status = match rejection.kind {
                    RejectionKind::Identity => StatusCode::FORBIDDEN,
                    RejectionKind::Bounds => StatusCode::BAD_REQUEST,
                };
                return (status, json!({ "error": rejection.reason }));
            }
        };
        self.view().epoch = reply.ack.epoch;
        if reply.ack.accepted {
            let mut view = self.view();
            if view.role != Some(message.role) || view.epoch != message.epoch {
                tracing::info!(
                    role = message.role.as_str(),
                    epoch = message.epoch,
                    group = %message.group,
                    leader = message.leader.as_deref().unwrap_or(""),
                    "role"
                );
            }
            view.role = Some(message.role);
            view.group = Some(message.group.clone());
        } else {
            tracing::info!(
                role = message.role.as_str(),
                epoch = message.epoch,
                reason = reply.ack.reason.as_deref().unwrap_or(""),
                "refused a role message"
            );
        }
        self.apply(&mut inner, reply.command, &message.group).await;
        self.publish(&inner);
        let status = if reply.ack.accepted {
            StatusCode::OK
        } else {
            StatusCode::CONFLICT
        };
        drop(inner);
        self.answered.send_modify(|n| *n += 1);
        (status, json!(reply.ack))
    }

    /// Carries out `command`; a stop returns only once the command has exited.
    async fn apply(&self, inner: &mut Inner, command: Command, group: &str) {
        match command {
            Command::Nothing => {}
            Command::Stop => self.stop(inner).await,
            Command::Start { epoch } | Command::Restart { epoch } => {
                self.stop(inner).await;
                if inner.closed {
                    return;
                }
                let role = Role {
                    epoch,
                    group: group.to_string(),
                };
                match Running::start(&self.argv, &role) {
                    Ok(running) => {
                        let mut view = self.view();
                        view.gave_up = None;
                        view.exit_watch = Some(running.exit_watch());
                        inner.child = Some(running);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, command = ?self.argv, "cannot start the command");
                        self.view().gave_up = Some(format!("cannot start the command: {e}"));
                    }
                }
                self.term_moved.notify_one();
            }
        }
    }

    async fn stop(&self, inner: &mut Inner) {
        if let Some(running) = inner.child.take() {
            let exit = running.stop(self.grace).await;
            let mut view = self.view();
            view.last_exit = Some(exit.status);
            view.exit_watch = None;
            view.gave_up = None;
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &Inner) {
        let mut view = self.view();
        view.leading_epoch = inner.receiver.leading_epoch();
        view.deadline = inner.receiver.deadline();
        view.pid = inner.child.as_ref().map(Running::pid);
        self.term_moved.notify_one();
    }

    /// Sleeps until the term's end and ends it: the command stops when the operator falls
    /// silent. Runs until the process exits.
    pub async fn term_timer(self: Arc<Self>) {
        loop {
            let deadline = self.view().deadline;
            match deadline {
                Some(until) => {
                    let at = self.origin + Duration::from_millis(until);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = self.term_moved.notified() => continue,
                    }
                }
                None => {
                    self.term_moved.notified().await;
                    continue;
                }
            }
            let mut inner = self.inner.lock().await;
            let epoch = inner.receiver.leading_epoch();
            if inner.receiver.tick(self.now()) == Command::Stop {
                tracing::warn!(
                    epoch = epoch.unwrap_or_default(),
                    "the term ended without a renewal from the operator: stopping the command"
                );
                self.view().role = None;
                self.stop(&mut inner).await;
            }
            self.publish(&inner);
        }
    }

    /// Stops the command and refuses to start it again: the process is about to exit.
    pub async fn shutdown(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let mut inner = self.inner.lock().await;
        inner.closed = true;
        self.stop(&mut inner).await;
    }

    /// After [`Exec::shutdown`]: waits until one more message has been answered (the operator's
    /// demotion, which can then activate the next leader at once instead of waiting out the
    /// term), or `linger` has passed.
    pub async fn linger(&self, linger: Duration) {
        let mut answered = self.answered.subscribe();
        answered.borrow_and_update();
        let _ = tokio::time::timeout(linger, answered.changed()).await;
    }

    /// Whether the command gave up while this pod leads: it exited on its own, or never started.
    fn gave_up(&self) -> Option<String> {
        let view = self.view();
        if let Some(reason) = &view.gave_up {
            return Some(reason.clone());
        }
        let watch = view.exit_watch.as_ref()?;
        let exit = watch.borrow();
        match exit.as_ref() {
            Some(exit) if !exit.requested => {
                Some(format!("the command exited on its own ({})", exit.status))
            }
            _ => None,
        }
    }
}

/// A JSON body (axum's `json` feature is off in this workspace).
fn json_body(value: &impl Serialize) -> impl IntoResponse {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    ([(header::CONTENT_TYPE, "application/json")], body)
}

fn refusal(status: StatusCode, reason: impl std::fmt::Display) -> Response {
    (status, json_body(&json!({ "error": reason.to_string() }))).into_response()
}

async fn notify(State(exec): State<Arc<Exec>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // The token first: a stranger's request is refused before a byte of its body is read.
    let verified = match bearer(authorization(&parts.headers)) {
        Ok(token) => exec.keys.verify(token).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = verified {
        exec.refused(&e);
        return refusal(StatusCode::UNAUTHORIZED, e);
    }
    let body = match read_body(&parts.headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let message: RoleMessage = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(e) => return refusal(StatusCode::BAD_REQUEST, format!("not a role message: {e}")),
    };
    // On a task of its own: if the operator hangs up mid-stop, the stop still completes and
    // the lock is still released in order.
    match tokio::spawn(exec.take(message)).await {
        Ok((status, ack)) => (status, json_body(&ack)).into_response(),
        Err(e) => refusal(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
}

/// At most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`]; a declared length above the limit is
/// refused without reading.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, Response> {
    let too_large = || {
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a role message is at most {MAX_BODY} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(refusal(
            StatusCode::BAD_REQUEST,
            format!("reading the body: {e}"),
        )),
        Err(_) => Err(refusal(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body took longer than {BODY_TIMEOUT:?}"),
        )),
    }
}

async fn readyz(State(exec): State<Arc<Exec>>) -> Response {
    if exec.closing.load(std::sync::atomic::Ordering::Acquire) {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match exec.gave_up() {
        Some(reason) => refusal(StatusCode::SERVICE_UNAVAILABLE, reason),
        None => (StatusCode::OK, "ok\n").into_response(),
    }
}

/// The role for anyone (it is on the pod's label anyway); the rest (group, epochs, pid, exits)
/// only for a token that verifies for this pod.
async fn role(State(exec): State<Arc<Exec>>, headers: HeaderMap) -> Response {
    let trusted = match bearer(authorization(&headers)) {
        Ok(token) => exec.keys.verify(token).await.is_ok(),
        Err(_) => false,
    };
    if !trusted {
        let role = exec.view().role;
        return (StatusCode::OK, json_body(&json!({ "role": role }))).into_response();
    }
    let now = exec.now();
    let gave_up = exec.gave_up();
    let mut view = exec.view().clone();
    view.term_remaining_millis = view.deadline.map(|until| until.saturating_sub(now));
    let exited = view
        .exit_watch
        .as_ref()
        .and_then(|watch| watch.borrow().clone());
    view.running = view.pid.is_some() && exited.is_none();
    if let Some(exit) = exited {
        view.last_exit = Some(exit.status);
    }
    view.gave_up = gave_up;
    (StatusCode::OK, json_body(&view)).into_response()
}

/// Serves `router` on `listener` until the task is dropped. Each connection gets
/// [`HEADER_TIMEOUT`] for its head and carries one request (no keep-alive: an idle connection
/// would hold a slot, and hyper's header timer would close it under the operator's pooled
/// client at an arbitrary moment).
///
/// At most `max_connections` are open. One more evicts the oldest connection still waiting
/// for its request head (which is what a slowloris client holds, and what a genuine request
/// spends microseconds in), so that a flood of idle connections cannot lock the operator
/// out: waiting for a free slot would delay it by the header timeout for every queued
/// attacker, and refusing the newest would refuse the operator for as long as the flood
/// lasts. If every connection is past its head (each then ends within seconds: a token
/// check waits at most [`Keys::REFETCH_WAIT`], a body [`BODY_TIMEOUT`]; or it is the
/// operator's, waiting for its command to stop), the newest is closed at once.
pub async fn serve(listener: TcpListener, router: Router, max_connections: usize) -> Infallible {
    let slots = Arc::new(Slots::new(max_connections));
    let mut errors = Throttle::new(WARN_EVERY);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or a connection reset before it was taken: transient.
                if let Some(suppressed) = errors.admit(Instant::now()) {
                    tracing::warn!(error = %e, suppressed, "cannot accept a connection");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = slots.admit() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, router.clone(), slot));
    }
}

async fn connection(stream: tokio::net::TcpStream, router: Router, slot: Slot) {
    let Slot {
        started,
        evicted,
        _guard,
    } = slot;
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            started.store(true, Ordering::Release);
            router.clone().oneshot(request)
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Errors are the client's (a timeout, a malformed request, a reset): nothing to do.
        _ = served => {}
        // Dropping the connection closes it.
        _ = evicted => {}
    }
}

/// The open connections, oldest first.
struct Slots {
    max: usize,
    open: StdMutex<(u64, BTreeMap<u64, Open>)>,
    shed: StdMutex<Throttle>,
}

struct Open {
    /// Its request head has been read.
    started: Arc<AtomicBool>,
    evict: oneshot::Sender<()>,
}

/// A connection's place among [`Slots`]; frees it when dropped.
struct Slot {
    started: Arc<AtomicBool>,
    evicted: oneshot::Receiver<()>,
    _guard: SlotGuard,
}

struct SlotGuard {
    id: u64,
    slots: Arc<Slots>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.lock().1.remove(&self.id);
    }
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots {
            max: max.max(1),
            open: StdMutex::new((0, BTreeMap::new())),
            shed: StdMutex::new(Throttle::new(WARN_EVERY)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, Open>)> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection, evicting the oldest one still waiting for its head if
    /// all are taken; `None` if every open connection is past its head.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.lock();
        let mut shed = false;
        if open.1.len() >= self.max {
            let idle = open
                .1
                .iter()
                .find(|(_, conn)| !conn.started.load(Ordering::Acquire))
                .map(|(&id, _)| id);
            shed = true;
            match idle.and_then(|id| open.1.remove(&id)) {
                Some(oldest) => {
                    let _ = oldest.evict.send(());
                }
                None => {
                    drop(open);
                    self.note_shed();
                    return None;
                }
            }
        }
        let id = open.0;
        open.0 += 1;
        let started = Arc::new(AtomicBool::new(false));
        let (evict, evicted) = oneshot::channel();
        open.1.insert(
            id,
            Open {
                started: started.clone(),
                evict,
            },
        );
        drop(open);
        if shed {
            self.note_shed();
        }
        Some(Slot {
            started,
            evicted,
            _guard: SlotGuard {
                id,
                slots: self.clone(),
            },
        })
    }

    fn note_shed(&self) {
        let admitted = self
            .shed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            tracing::warn!(
                max = self.max,
                suppressed,
                "too many open connections: closed one (further ones are counted, not logged, for {}s)",
                WARN_EVERY.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_event_per_interval_through_with_the_count_of_the_rest() {
        let mut throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        for i in 1..=999 {
            assert_eq!(throttle.admit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.admit(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(25)), Some(1));
        // A clock read out of order is not a reason to log.
        assert_eq!(throttle.admit(t0), None);
    }

    #[test]
    fn a_connection_over_the_cap_evicts_the_oldest_idle_one_or_is_refused() {
        let slots = Arc::new(Slots::new(3));
        let mut a = slots.admit().unwrap();
        let mut b = slots.admit().unwrap();
        let c = slots.admit().unwrap();
        // a is serving a request; b and c still wait for their heads.
        a.started.store(true, Ordering::Release);
        let d = slots.admit().unwrap();
        assert!(b.evicted.try_recv().is_ok(), "the oldest idle one goes");
        assert!(a.evicted.try_recv().is_err());
        drop(b);
        assert_eq!(slots.lock().1.len(), 3);
        c.started.store(true, Ordering::Release);
        d.started.store(true, Ordering::Release);
        assert!(slots.admit().is_none(), "all busy: the newest is refused");
        drop(c);
        let e = slots.admit().expect("a slot freed by a closed connection");
        assert_eq!(slots.lock().1.len(), 3);
        drop((a, d, e));
        assert!(slots.lock().1.is_empty());
    }
}
