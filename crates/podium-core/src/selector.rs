//! Label-selector matching, done locally against the reflector's cache so that mapping a pod
//! event to its groups costs no API call.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether `labels` satisfy `selector`, with the semantics of `metav1.LabelSelectorAsSelector`.
/// An empty selector matches nothing here: validation refuses it, and matching every pod in a
/// namespace by accident is the one outcome we never want.
pub fn matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    if is_empty(selector) {
        return false;
    }
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(key, value)| labels.get(key) == Some(value));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|expr| {
        let values = expr.values.as_deref().unwrap_or_default();
        let actual = labels.get(&expr.key);
        match expr.operator.as_str() {
            "In" => actual.is_some_and(|v| values.contains(v)),
            "NotIn" => actual.is_none_or(|v| !values.contains(v)),
            "Exists" => actual.is_some(),
            "DoesNotExist" => actual.is_none(),
            // Unknown operators are refused by validation; never match on one.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

pub fn is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}

/// The selector in the string form the API accepts as `labelSelector`, for list calls and
/// for humans reading a condition message.
pub fn to_query(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.as_deref().unwrap_or_default().join(",");
        parts.push(match expr.operator.as_str() {
            "In" => format!("{} in ({values})", expr.key),
            "NotIn" => format!("{} notin ({values})", expr.key),
            "Exists" => expr.key.clone(),
            "DoesNotExist" => format!("!{}", expr.key),
            other => format!("{} {other} ({values})", expr.key),
        });
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "db")])),
            ..Default::default()
        };
        assert!(matches(
            &sel,
            Some(&labels(&[("app", "web"), ("tier", "db"), ("x", "y")]))
        ));
        assert!(!matches(&sel, Some(&labels(&[("app", "web")]))));
        assert!(!matches(&sel, None));
    }

    #[test]
    fn expressions_follow_kubernetes_semantics() {
        let sel = LabelSelector {
            match_expressions: Some(vec![
                expr("app", "In", &["web", "api"]),
                expr("canary", "DoesNotExist", &[]),
                expr("zone", "NotIn", &["b"]),
                expr("team", "Exists", &[]),
            ]),
            ..Default::default()
        };
        assert!(matches(
            &sel,
            Some(&labels(&[("app", "api"), ("team", "x")]))
        ));
        assert!(matches(
            &sel,
            Some(&labels(&[("app", "web"), ("team", "x"), ("zone", "a")]))
        ));
        assert!(!matches(
            &sel,
            Some(&labels(&[("app", "web"), ("team", "x"), ("zone", "b")]))
        ));
        assert!(!matches(
            &sel,
            Some(&labels(&[("app", "web"), ("team", "x"), ("canary", "1")]))
        ));
        assert!(!matches(&sel, Some(&labels(&[("app", "web")]))));
        assert!(!matches(
            &sel,
            Some(&labels(&[("app", "db"), ("team", "x")]))
        ));
    }

    #[test]
    fn empty_selector_matches_nothing() {
        assert!(!matches(
            &LabelSelector::default(),
            Some(&labels(&[("a", "b")]))
        ));
        let sel = LabelSelector {
            match_labels: Some(BTreeMap::new()),
            match_expressions: Some(vec![]),
        };
        assert!(!matches(&sel, Some(&labels(&[("a", "b")]))));
    }

    #[test]
    fn unknown_operator_never_matches() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("a", "Like", &["b"])]),
            ..Default::default()
        };
        assert!(!matches(&sel, Some(&labels(&[("a", "b")]))));
    }

    #[test]
    fn query_string_round_trips_the_meaning() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("x", "DoesNotExist", &[]),
            ]),
        };
        assert_eq!(to_query(&sel), "app=web,zone in (a,b),!x");
    }
}
