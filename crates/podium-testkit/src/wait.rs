//! Polling for a condition the harness cannot watch for: one loop for the tests (which panic
//! when it never holds) and the bench and demo (which report it).

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::anyhow;

/// Polls `check` every `every` until it yields a value. After `timeout` the error names `what`
/// and, if the last check failed, why: a flaky read is retried, not fatal.
pub async fn poll<T>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= deadline {
            let timed_out = format!("timed out after {timeout:?} waiting for {what}");
            return Err(match last_error {
                Some(e) => anyhow!("{timed_out}; last error: {e:#}"),
                None => anyhow!(timed_out),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` every 20 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let checked = poll(timeout, Duration::from_millis(20), what, async || {
        Ok(check().await)
    });
    checked.await.unwrap_or_else(|e| panic!("{e:#}"))
}
