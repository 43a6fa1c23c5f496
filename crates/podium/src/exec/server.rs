//! The push mode: an HTTP endpoint for the operator's role messages, the term timer, and the
//! state both drive, behind one lock so that commands apply in the order they were taken.
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use podium_core::notify::{Command, NotifyRole, Receiver, RejectionKind, RoleMessage};
use ring::rand::SecureRandom;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Mutex, Notify, watch};

use super::child::{Exit, Role, Running};
use super::verify::{Keys, bearer};

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
        })
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

async fn notify(State(exec): State<Arc<Exec>>, headers: HeaderMap, body: Bytes) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let token = match bearer(authorization) {
        Ok(token) => token,
        Err(e) => return refusal(StatusCode::UNAUTHORIZED, e),
    };
    if let Err(e) = exec.keys.verify(token).await {
        tracing::warn!(reason = %e, "refused a role message: its token does not verify");
        return refusal(StatusCode::UNAUTHORIZED, e);
    }
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

async fn readyz(State(exec): State<Arc<Exec>>) -> Response {
    if exec.closing.load(std::sync::atomic::Ordering::Acquire) {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match exec.gave_up() {
        Some(reason) => refusal(StatusCode::SERVICE_UNAVAILABLE, reason),
        None => (StatusCode::OK, "ok\n").into_response(),
    }
}

async fn role(State(exec): State<Arc<Exec>>) -> Response {
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
