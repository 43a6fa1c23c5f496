//! Section 2: the same failovers done the way applications do them themselves, on the same
//! control plane: every "pod" is a candidate task racing for one Lease with
//! kube-leader-election's `LeaseLock`. A crash is the holder's task aborted (no step-down);
//! a graceful exit is `step_down()`. Timed from the abort (or the step-down request) to the
//! harness's Lease watch showing another candidate as holder.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kube::Client;
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Progress, Rng};
use podium_testkit::observe::LeaseWatch;
use podium_testkit::testbed::Testbed;

/// Candidates per Lease, as pods in the podium group.
const CANDIDATES: usize = 4;

/// How a peer's candidates use the Lease.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Also the Lease's name.
    pub key: &'static str,
    pub title: String,
    pub ttl: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a non-holder tries to acquire.
    pub retry_every: Duration,
    /// client-go's `wait.JitterUntil` factor: a non-holder waits `retry × (1 + U[0, jitter))`.
    pub jitter: f64,
}

impl PeerConfig {
    /// kube-leader-election as its README uses it: one loop calling `try_acquire_or_renew`
    /// every 5 s, TTL 15 s.
    pub fn kube_leader_election(scale: f64) -> PeerConfig {
        PeerConfig {
            key: "kle",
            title: "kube-leader-election 0.44".into(),
            ttl: secs(15.0 * scale),
            renew_every: secs(5.0 * scale),
            retry_every: secs(5.0 * scale),
            jitter: 0.0,
        }
    }

    /// client-go's defaults (leaseDuration 15 s, renewDeadline 10 s, retryPeriod 2 s), modelled
    /// with the same `LeaseLock`: the holder renews every retryPeriod, a candidate retries every
    /// retryPeriod jittered by 1.2.
    pub fn client_go(scale: f64) -> PeerConfig {
        PeerConfig {
            key: "client-go",
            title: "client-go defaults (modelled)".into(),
            ttl: secs(15.0 * scale),
            renew_every: secs(2.0 * scale),
            retry_every: secs(2.0 * scale),
            jitter: 1.2,
        }
    }

    /// "TTL 15 s, renew 5 s, retry 5 s"-style summary.
    pub fn timings(&self) -> String {
        let jitter = if self.jitter > 0.0 {
            format!(" + U[0, {:.1}×)", self.jitter)
        } else {
            String::new()
        };
        format!(
            "TTL {}, renew every {}, retry every {}{jitter}",
            human(self.ttl),
            human(self.renew_every),
            human(self.retry_every)
        )
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

#[derive(Clone, Debug, Default)]
pub struct PeerResults {
    pub crash: Vec<Duration>,
    pub graceful: Vec<Duration>,
    /// Rounds in which more than one candidate acquired the Lease (both believed they led).
    pub double_acquisitions: usize,
    pub failures: Vec<String>,
}

struct Candidate {
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

/// Runs `crash_rounds` crashes and `graceful_rounds` step-downs for `config`.
pub async fn run(
    testbed: &Testbed,
    client: &Client,
    config: &PeerConfig,
    crash_rounds: usize,
    graceful_rounds: usize,
    rng: &mut Rng,
) -> Result<PeerResults> {
    let ns = testbed
        .create_namespace(&format!("bench-peer-{}", config.key))
        .await?;
    let watch = LeaseWatch::start(client, &ns, config.key);
    let (acquired_tx, mut acquired_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let mut candidates: HashMap<String, Candidate> = HashMap::new();
    let mut next_id = 0usize;
    let mut spawn = |candidates: &mut HashMap<String, Candidate>, rng: &mut Rng| {
        let id = format!("{}-{next_id}", config.key);
        next_id += 1;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(candidate(
            client.clone(),
            ns.clone(),
            id.clone(),
            config.clone(),
            acquired_tx.clone(),
            stopped,
            rng.next_u64(),
        ));
        candidates.insert(
            id,
            Candidate {
                task,
                stop: Some(stop),
            },
        );
    };
    for _ in 0..CANDIDATES {
        spawn(&mut candidates, rng);
    }
    let wait = config.ttl * 3 + config.retry_every * 3;
    watch.wait_holder(wait, |_| true).await?;

    let mut results = PeerResults::default();
    for (graceful, rounds) in [(false, crash_rounds), (true, graceful_rounds)] {
        let what = if graceful { "step-down" } else { "crash" };
        let mut progress = Progress::new(format!("{} {what}", config.title));
        for round in 1..=rounds {
            // A random point of the holder's renewal cycle.
            let phase = config.renew_every.mul_f64(rng.unit());
            progress.say(format!(
                "{round}/{rounds}: waiting {:.1}s, then {what} of the holder (up to ~{:.0}s)",
                phase.as_secs_f64(),
                if graceful {
                    (config.retry_every.mul_f64(1.0 + config.jitter) + Duration::from_secs(1))
                        .as_secs_f64()
                } else {
                    (config.ttl + config.retry_every.mul_f64(1.0 + config.jitter)).as_secs_f64()
                }
            ));
            tokio::time::sleep(phase).await;
            let holder = watch
                .now()
                .holder
                .filter(|h| candidates.contains_key(h))
                .ok_or_else(|| anyhow!("no live candidate holds the Lease"))?;
            while acquired_rx.try_recv().is_ok() {}
            let mut leaving = candidates
                .remove(&holder)
                .ok_or_else(|| anyhow!("lost candidate {holder}"))?;
            let t0 = Instant::now();
            if graceful {
                if let Some(stop) = leaving.stop.take() {
                    let _ = stop.send(());
                }
            } else {
                leaving.task.abort();
            }
            let moved = watch
                .wait_holder(wait, |h| h != holder && candidates.contains_key(h))
                .await;
            match moved {
                Ok(s) => {
                    let took = s.since.saturating_duration_since(t0);
                    if graceful {
                        results.graceful.push(took);
                    } else {
                        results.crash.push(took);
                    }
                    progress.say(format!(
                        "{round}/{rounds}: {} took over after {}",
                        s.holder.unwrap_or_default(),
                        super::stats::ms(took)
                    ));
                }
                Err(e) => results
                    .failures
                    .push(format!("{what} round {round}: {e:#}")),
            }
            // Anyone else who believed they had won the same race?
            tokio::time::sleep(config.renew_every).await;
            let mut winners = std::collections::BTreeSet::new();
            while let Ok((id, at)) = acquired_rx.try_recv() {
                if at >= t0 {
                    winners.insert(id);
                }
            }
            if winners.len() > 1 {
                results.double_acquisitions += 1;
            }
            // The departed pod's replacement joins the race.
            spawn(&mut candidates, rng);
            let _ = tokio::time::timeout(Duration::from_secs(10), leaving.task).await;
        }
        progress.done();
    }
    for (_, c) in candidates {
        c.task.abort();
    }
    Ok(results)
}

/// One candidate: `try_acquire_or_renew` in a loop, renewing while it holds the Lease, else
/// retrying (with jitter). On a stop request it steps down if it leads, then exits.
async fn candidate(
    client: Client,
    namespace: String,
    id: String,
    config: PeerConfig,
    acquired: mpsc::UnboundedSender<(String, Instant)>,
    mut stop: oneshot::Receiver<()>,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let lock = LeaseLock::new(
        client,
        &namespace,
        LeaseLockParams {
            lease_name: config.key.to_string(),
            holder_id: id.clone(),
            lease_ttl: config.ttl,
        },
    );
    let mut leading = false;
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(LeaseLockResult::Acquired(_)) => {
                if !leading {
                    let _ = acquired.send((id.clone(), Instant::now()));
                }
                leading = true;
            }
            Ok(LeaseLockResult::NotAcquired(_)) => leading = false,
            // A lost create race (409) or a failed write: not leading this round.
            Err(_) => leading = false,
        }
        let wait = if leading {
            config.renew_every
        } else {
            config.retry_every.mul_f64(1.0 + config.jitter * rng.unit())
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => {
                if leading {
                    let _ = lock.step_down().await;
                }
                return;
            }
        }
    }
}
