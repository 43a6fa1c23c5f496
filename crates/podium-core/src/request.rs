//! What a Kubernetes API request addresses, from its method and URL alone: the API server's
//! verb, and the API group, resource, namespace and name. One classification for the
//! operator's client metrics and the test kit's request counting, so that a bench count and a
//! production metric mean the same thing.

/// What a request path addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The API group; `""` for the core group (`/api/v1`).
    pub group: String,
    /// `pods`, `pods/status`, `leases`, `electiongroups/status`, ...; `-` for paths that
    /// address no resource (discovery, `/version`).
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/<group>/<version>/...` paths. Anything else (discovery,
/// `/version`, `/metrics`) is resource `-` with the path as its name.
pub fn target(path: &str) -> Target {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => ("", &[][..]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some(ns.to_string()), more),
        other => (None, other),
    };
    let (resource, name) = match rest {
        [] => {
            return Target {
                group: String::new(),
                resource: "-".into(),
                namespace: None,
                name: Some(path.into()),
            };
        }
        [resource] => (resource.to_string(), None),
        [resource, name] => (resource.to_string(), Some(name.to_string())),
        [resource, name, sub, ..] => (format!("{resource}/{sub}"), Some(name.to_string())),
    };
    Target {
        group: group.into(),
        resource,
        namespace,
        name,
    }
}

/// The API server's verb for a request with HTTP `method` (upper case, as on the wire) on
/// `target`, with the URL's `query`.
pub fn verb(method: &str, target: &Target, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match method {
        "GET" if watch => "watch",
        "GET" if target.name.is_none() => "list",
        "GET" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if target.name.is_none() => "deletecollection",
        "DELETE" => "delete",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_api_servers_verbs_and_resources() {
        let t = target("/api/v1/namespaces/ns/pods/web-1/status");
        assert_eq!(
            (
                t.group.as_str(),
                t.resource.as_str(),
                t.namespace.as_deref(),
                t.name.as_deref()
            ),
            ("", "pods/status", Some("ns"), Some("web-1"))
        );
        assert_eq!(verb("PATCH", &t, None), "patch");
        let t = target("/apis/coordination.k8s.io/v1/namespaces/ns/leases/web");
        assert_eq!(
            (t.group.as_str(), t.resource.as_str()),
            ("coordination.k8s.io", "leases")
        );
        assert_eq!(verb("PUT", &t, None), "update");
        assert_eq!(verb("GET", &t, None), "get");
        assert_eq!(verb("DELETE", &t, None), "delete");
        let t = target("/api/v1/pods");
        assert_eq!(
            (t.resource.as_str(), t.namespace.as_deref()),
            ("pods", None)
        );
        assert_eq!(
            verb("GET", &t, Some("watch=true&resourceVersion=1")),
            "watch"
        );
        assert_eq!(verb("GET", &t, Some("limit=500")), "list");
        assert_eq!(verb("DELETE", &t, None), "deletecollection");
        let t = target("/api/v1/namespaces/ns");
        assert_eq!(
            (t.resource.as_str(), t.name.as_deref()),
            ("namespaces", Some("ns"))
        );
        let t = target("/apis/events.k8s.io/v1/namespaces/ns/events");
        assert_eq!(verb("POST", &t, None), "create");
        let t = target("/apis/podium.dev/v1alpha1/namespaces/ns/electiongroups/web/status");
        assert_eq!(
            (t.group.as_str(), t.resource.as_str()),
            ("podium.dev", "electiongroups/status")
        );
        for discovery in ["/version", "/apis/podium.dev/v1alpha1", "/api", ""] {
            let t = target(discovery);
            assert_eq!(
                (t.group.as_str(), t.resource.as_str()),
                ("", "-"),
                "{discovery}"
            );
        }
    }
}
