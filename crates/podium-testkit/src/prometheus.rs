//! The operator's metrics as Prometheus sees them: a scrape of its HTTP port, the series names
//! a scrape of that text yields, and the metric names a PromQL expression reads. With these a
//! test can check that every query of the dashboard and the alert rules reads a real series.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::Duration;

/// A plain HTTP/1.0 GET against `127.0.0.1:port`: (status, body). Status 0 when the answer is
/// not HTTP.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The series names Prometheus stores from an OpenMetrics exposition: every sample's name, and
/// for each `# TYPE` line the names its samples take even while it has none yet (a labelled
/// counter before its first increment). A counter is queried as `<name>_total`, a histogram as
/// `_bucket`, `_sum` and `_count`, never by its bare name.
pub fn series_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut words = declared.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "gaugehistogram" => &["_bucket", "_gsum", "_gcount"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

/// The metric names in a PromQL expression that start with `prefix`. A small tokenizer: it
/// skips string literals (label values), comments, numbers and durations (`5m`) and Grafana
/// variables (`$__rate_interval`, `${group}`), so that only identifiers remain, and of those
/// label names and functions do not carry the prefix.
pub fn queried_metrics(expr: &str, prefix: &str) -> BTreeSet<String> {
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                while let Some(inner) = chars.next() {
                    if inner == '\\' && c != '`' {
                        chars.next();
                    } else if inner == c {
                        break;
                    }
                }
            }
            '#' => {
                for inner in chars.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '$' => {
                if chars.peek() == Some(&'{') {
                    for inner in chars.by_ref() {
                        if inner == '}' {
                            break;
                        }
                    }
                } else {
                    while chars.next_if(|c| is_part(*c)).is_some() {}
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // An exponent's sign ends the number early; its digits then form another.
                while chars.next_if(|c| is_part(*c) || *c == '.').is_some() {}
            }
            c if is_start(c) => {
                let mut word = c.to_string();
                while let Some(c) = chars.next_if(|c| is_part(*c)) {
                    word.push(c);
                }
                if word.starts_with(prefix) {
                    names.insert(word);
                }
            }
            _ => {}
        }
    }
    names
}

/// The samples of metric `name` (a series name: `..._total`, `..._count`) in an exposition:
/// each one's labels and value. Label values must not contain `,` or `"`, which holds for the
/// operator's (resource names, verbs, codes, Kubernetes names).
pub fn samples(exposition: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_metric_names_with_the_prefix_are_taken_from_a_query() {
        let expr = r#"histogram_quantile(0.99, sum by (le, verb) (rate(podium_kube_client_request_duration_seconds_bucket{resource!~"podium_.*"}[$__rate_interval])))
            / ignoring(x) group_left podium_groups # podium_in_a_comment
            + on() podium_leaders{namespace=~"${namespace}"} offset 5m + 1e3 - $podium_var"#;
        assert_eq!(
            queried_metrics(expr, "podium_"),
            BTreeSet::from([
                "podium_groups".to_string(),
                "podium_kube_client_request_duration_seconds_bucket".to_string(),
                "podium_leaders".to_string(),
            ])
        );
    }

    #[test]
    fn series_names_follow_the_types_suffixes() {
        let text = "# HELP podium_leader_changes Changes.\n\
                    # TYPE podium_leader_changes counter\n\
                    # TYPE podium_failover_seconds histogram\n\
                    podium_failover_seconds_sum 0.0\n\
                    # TYPE podium_groups gauge\n\
                    podium_groups 2\n\
                    # EOF\n";
        let names = series_names(text);
        for present in [
            "podium_leader_changes_total",
            "podium_failover_seconds_bucket",
            "podium_failover_seconds_count",
            "podium_groups",
        ] {
            assert!(names.contains(present), "{present} missing from {names:?}");
        }
        for absent in ["podium_leader_changes", "podium_failover_seconds"] {
            assert!(!names.contains(absent), "{absent} in {names:?}");
        }
    }

    #[test]
    fn samples_are_read_with_their_labels() {
        let text = "podium_groups 2\n\
                    podium_groups_without_leader 1\n\
                    t_requests_total{verb=\"get\",code=\"200\"} 3\n";
        assert_eq!(samples(text, "podium_groups"), [(BTreeMap::new(), 2.0)]);
        let labels = BTreeMap::from([
            ("verb".to_string(), "get".to_string()),
            ("code".to_string(), "200".to_string()),
        ]);
        assert_eq!(samples(text, "t_requests_total"), [(labels, 3.0)]);
    }
}
