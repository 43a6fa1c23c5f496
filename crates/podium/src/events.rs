//! Kubernetes Events leave the reconcile through a queue with one sender of its own. An Event is
//! an API write like any other (about 1–2 ms here); published inline, the one each election and
//! failover records held its reconcile, and with it one of the reconciles allowed at once, until
//! the API server answered. Events are best effort, as in client-go's recorder: when the queue is
//! full (an election of thousands of groups at once), the newest are dropped and logged.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

/// The reason of the Warning Event that names a member which started stalling its group's
/// notifications (`podium_core::notify::stall`).
pub const NOTIFICATIONS_STALLED: &str = "NotificationsStalled";

/// Events waiting to be sent, at most.
const QUEUE: usize = 4096;

#[derive(Clone)]
pub struct Events {
    queue: mpsc::Sender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the sender. It sends in the order events were queued, and stops once every
    /// `Events` handle is dropped and the queue is empty.
    pub fn start(recorder: Recorder) -> Events {
        let (queue, mut queued) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        tokio::spawn(async move {
            while let Some((event, regarding)) = queued.recv().await {
                if let Err(e) = recorder.publish(&event, &regarding).await {
                    tracing::debug!(error = %e, reason = %event.reason, "could not publish event");
                }
            }
        });
        Events { queue }
    }

    pub fn publish(&self, event: Event, regarding: ObjectReference) {
        if let Err(e) = self.queue.try_send((event, regarding)) {
            let (event, _) = e.into_inner();
            tracing::warn!(reason = %event.reason, "event queue full or closed; event dropped");
        }
    }
}
