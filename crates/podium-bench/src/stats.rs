//! Latency summaries: nearest-rank percentiles over the measured samples.

use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub min: Duration,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        Some(Summary {
            n: sorted.len(),
            p50: percentile(&sorted, 50.0),
            p95: percentile(&sorted, 95.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            min: sorted[0],
        })
    }
}

/// Nearest rank: the smallest sample with at least `p`% of the samples at or below it. With
/// fewer than 100 samples, p99 is the maximum.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of counts (the lower middle for an even number), 0 for none.
pub fn median(values: &[u64]) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

/// Milliseconds with one decimal below 10 ms, whole above.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=50).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(s.p50, Duration::from_millis(25));
        assert_eq!(s.p95, Duration::from_millis(48));
        assert_eq!(s.p99, Duration::from_millis(50));
        assert_eq!(s.max, Duration::from_millis(50));
        let one = Summary::of(&[Duration::from_millis(7)]).unwrap();
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_millis(7), Duration::from_millis(7))
        );
        assert!(Summary::of(&[]).is_none());
        assert_eq!(median(&[5, 1, 3, 9]), 3);
        assert_eq!(ms(Duration::from_micros(2345)), "2.3");
        assert_eq!(ms(Duration::from_millis(123)), "123");
    }
}
