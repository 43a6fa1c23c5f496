//! Re-checks an ElectionGroup spec in code. The CRD schema says the same, but an apiserver
//! older than CEL (or an old CRD still installed) lets bad specs through, and the operator
//! must answer them with a condition, never a panic.

use crate::crd::{
    ElectionGroupSpec, MAX_DRAIN_TAINTS, MAX_LEASE_DURATION_SECONDS, MAX_MIN_READY_SECONDS,
    MAX_NAME_LENGTH, MIN_LEASE_DURATION_SECONDS, ROLE_LABEL,
};
use crate::selector;

/// Every problem with a spec, each phrased for the user who wrote it.
pub fn validate(spec: &ElectionGroupSpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if selector::is_empty(&spec.selector) {
        problems.push(
            "spec.selector must not be empty: an empty selector would match every pod in the namespace"
                .to_string(),
        );
    }
    let uses_role_key = spec
        .selector
        .match_labels
        .iter()
        .flatten()
        .any(|(k, _)| k == ROLE_LABEL)
        || spec
            .selector
            .match_expressions
            .iter()
            .flatten()
            .any(|e| e.key == ROLE_LABEL);
    if uses_role_key {
        problems.push(format!(
            "spec.selector must not use the key {ROLE_LABEL}: podium writes that label itself"
        ));
    }
    for expr in spec.selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default();
        match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => problems.push(format!(
                "spec.selector.matchExpressions[{}]: operator {} needs at least one value",
                expr.key, expr.operator
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => problems.push(format!(
                "spec.selector.matchExpressions[{}]: operator {} takes no values",
                expr.key, expr.operator
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => problems.push(format!(
                "spec.selector.matchExpressions[{}]: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)",
                expr.key
            )),
        }
    }
    if !(MIN_LEASE_DURATION_SECONDS..=MAX_LEASE_DURATION_SECONDS)
        .contains(&spec.lease_duration_seconds)
    {
        problems.push(format!(
            "spec.leaseDurationSeconds is {}; it must be between {MIN_LEASE_DURATION_SECONDS} and {MAX_LEASE_DURATION_SECONDS}",
            spec.lease_duration_seconds
        ));
    }
    if !(0..=MAX_MIN_READY_SECONDS).contains(&spec.min_ready_seconds) {
        problems.push(format!(
            "spec.minReadySeconds is {}; it must be between 0 and {MAX_MIN_READY_SECONDS}",
            spec.min_ready_seconds
        ));
    }
    if spec.failover_delay_seconds < 0
        || spec.failover_delay_seconds > spec.lease_duration_seconds.max(0)
    {
        problems.push(format!(
            "spec.failoverDelaySeconds is {}; it must be between 0 and leaseDurationSeconds ({})",
            spec.failover_delay_seconds, spec.lease_duration_seconds
        ));
    }
    if spec.drain_taints.len() > MAX_DRAIN_TAINTS {
        problems.push(format!(
            "spec.drainTaints has {} keys; at most {MAX_DRAIN_TAINTS} are allowed",
            spec.drain_taints.len()
        ));
    }
    if spec
        .drain_taints
        .iter()
        .any(|k| k.is_empty() || k.len() > 317)
    {
        problems.push("spec.drainTaints: every taint key must be 1 to 317 characters".to_string());
    }
    if let Some(notify) = &spec.notify {
        if !(1..=65535).contains(&notify.port) {
            problems.push(format!(
                "spec.notify.port is {}; it must be between 1 and 65535",
                notify.port
            ));
        }
        if !is_notify_path(&notify.path) {
            problems.push(format!(
                "spec.notify.path {:?} must start with '/', be at most 256 characters and use only letters, digits and . _ ~ / -",
                notify.path
            ));
        }
    }
    if let Some(name) = &spec.preferred_leader
        && !is_dns_subdomain(name)
    {
        problems.push(format!(
            "spec.preferredLeader {name:?} is not a valid pod name (lowercase letters, digits, '-' and '.', at most {MAX_NAME_LENGTH} characters)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn is_notify_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 256
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~/-".contains(&b))
}

fn is_dns_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !name.is_empty()
        && name.len() <= MAX_NAME_LENGTH
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-' || *b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    fn spec() -> ElectionGroupSpec {
        ElectionGroupSpec::selecting(LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            ..Default::default()
        })
    }

    fn problems(spec: ElectionGroupSpec) -> String {
        validate(&spec)
            .expect_err("spec should be refused")
            .join("; ")
    }

    #[test]
    fn a_plain_spec_is_valid() {
        assert_eq!(validate(&spec()), Ok(()));
    }

    #[test]
    fn empty_selector_is_refused() {
        let mut s = spec();
        s.selector = LabelSelector::default();
        assert!(problems(s).contains("must not be empty"));
    }

    #[test]
    fn role_key_is_refused_in_labels_and_expressions() {
        let mut s = spec();
        s.selector.match_labels = Some([(ROLE_LABEL.to_string(), "leader".to_string())].into());
        assert!(problems(s).contains(ROLE_LABEL));
        let mut s = spec();
        s.selector.match_expressions = Some(vec![LabelSelectorRequirement {
            key: ROLE_LABEL.into(),
            operator: "Exists".into(),
            values: None,
        }]);
        assert!(problems(s).contains(ROLE_LABEL));
    }

    #[test]
    fn ttl_bounds_are_enforced() {
        for ttl in [0, -1, 1, 3601, i32::MAX, i32::MIN] {
            let mut s = spec();
            s.lease_duration_seconds = ttl;
            assert!(problems(s).contains("leaseDurationSeconds"), "ttl {ttl}");
        }
        for ttl in [2, 15, 3600] {
            let mut s = spec();
            s.lease_duration_seconds = ttl;
            assert_eq!(validate(&s), Ok(()), "ttl {ttl}");
        }
    }

    #[test]
    fn min_ready_bounds_are_enforced() {
        let mut s = spec();
        s.min_ready_seconds = -5;
        assert!(problems(s).contains("minReadySeconds"));
    }

    #[test]
    fn notify_port_and_path_are_checked() {
        use crate::crd::NotifySpec;
        let with = |port, path: &str| ElectionGroupSpec {
            notify: Some(NotifySpec {
                port,
                path: path.into(),
            }),
            ..spec()
        };
        assert!(validate(&with(8787, "/podium/notify")).is_ok());
        assert!(problems(with(0, "/x")).contains("spec.notify.port is 0"));
        assert!(problems(with(65536, "/x")).contains("spec.notify.port is 65536"));
        assert!(problems(with(80, "x")).contains("spec.notify.path"));
        assert!(problems(with(80, "/a b")).contains("spec.notify.path"));
        assert!(problems(with(80, &format!("/{}", "a".repeat(256)))).contains("spec.notify.path"));
    }

    #[test]
    fn preferred_leader_must_be_a_pod_name() {
        for bad in ["", "Web-0", "-a", "a-", "a_b", &"a".repeat(254), "ns/pod"] {
            let mut s = spec();
            s.preferred_leader = Some(bad.to_string());
            assert!(problems(s).contains("preferredLeader"), "{bad:?}");
        }
        let mut s = spec();
        s.preferred_leader = Some("web-0.x".into());
        assert_eq!(validate(&s), Ok(()));
    }

    #[test]
    fn bad_operators_are_refused() {
        let mut s = spec();
        s.selector.match_expressions = Some(vec![
            LabelSelectorRequirement {
                key: "a".into(),
                operator: "Like".into(),
                values: None,
            },
            LabelSelectorRequirement {
                key: "b".into(),
                operator: "In".into(),
                values: None,
            },
        ]);
        let p = problems(s);
        assert!(
            p.contains("unknown operator") && p.contains("needs at least one value"),
            "{p}"
        );
    }
}
