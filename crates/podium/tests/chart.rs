//! Tests of the Helm chart in `charts/podium`: lint, rendering, RBAC least privilege, the values
//! schema, the CRD copy, and server-side acceptance of the rendered manifests by the testbed's
//! real kube-apiserver (v1.20).
//!
//! These tests need `helm` (and `kubectl` for the server-side ones). They fail, never skip, when
//! a tool is missing: run `scripts/install-deps.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;
use serde_yaml::Value;

const RELEASE: &str = "podium";
const RELEASE_NAMESPACE: &str = "podium-system";

/// Verbs of the cluster-wide ClusterRole, per (API group, resource): exactly these, no more.
const CLUSTER_RULES: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["get", "list", "watch", "patch"]),
    ("", "nodes", &["get", "list", "watch"]),
    (
        "coordination.k8s.io",
        "leases",
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    ),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
    (
        "podium.dev",
        "electiongroups",
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "podium.dev",
        "electiongroups/status",
        &["get", "patch", "update"],
    ),
    ("podium.dev", "electiongroups/finalizers", &["update"]),
];

// ---------------------------------------------------------------------------------------------
// Helpers

fn repo() -> PathBuf {
    podium_testkit::repo_root()
}

fn chart() -> PathBuf {
    repo().join("charts/podium")
}

/// A tool from `$PODIUM_BIN_DIR`, `~/.cache/podium/bin` or `PATH`; panics (the test fails) with
/// an install hint when it is missing.
fn tool(name: &str) -> PathBuf {
    podium_testkit::testbed::find_binary(name).unwrap_or_else(|e| {
        let e = format!("{e:#}");
        let hint = if e.contains("install-deps") {
            ""
        } else {
            " (run scripts/install-deps.sh)"
        };
        panic!("{name} is required by the chart tests: {e}{hint}")
    })
}

fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for the child")
}

fn describe(program: &Path, args: &[&str], out: &Output) -> String {
    format!(
        "`{} {}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `helm` with `args` and returns its stdout; panics when it fails.
fn helm_ok(args: &[&str]) -> String {
    let helm = tool("helm");
    let out = run(&helm, args, None);
    assert!(out.status.success(), "{}", describe(&helm, args, &out));
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// Runs `helm` with `args`, expects it to fail, and returns its stderr.
fn helm_err(args: &[&str]) -> String {
    let helm = tool("helm");
    let out = run(&helm, args, None);
    assert!(
        !out.status.success(),
        "expected failure: {}",
        describe(&helm, args, &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `helm template` of the chart as release `podium` in `podium-system`, plus `extra` arguments.
fn template(extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().expect("UTF-8 path"),
        "--namespace",
        RELEASE_NAMESPACE,
    ];
    args.extend_from_slice(extra);
    helm_ok(&args)
}

/// Every non-empty YAML document of a multi-document stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_of(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name_of(doc: &Value) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace_of(doc: &Value) -> &str {
    doc["metadata"]["namespace"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| kind_of(d) == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, got {}",
        found.len()
    );
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The (API group, resource, verb) triples that the rules of a Role or ClusterRole grant; a
/// rule limited to named objects grants `resource#name`.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape: {rule:?}"
        );
        let names = strings(&rule["resourceNames"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    if names.is_empty() {
                        out.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                    for name in &names {
                        out.insert((group.clone(), format!("{resource}#{name}"), verb.clone()));
                    }
                }
            }
        }
    }
    out
}

/// The Role that lets the operator request tokens for its own ServiceAccount, which sign role
/// notifications: exactly that, in the release namespace, bound to that account. Returns the
/// other Roles.
fn without_notify_role(docs: &[Value]) -> Vec<&Value> {
    let account = name_of(one(docs, "ServiceAccount")).to_string();
    let (notify, others): (Vec<&Value>, Vec<&Value>) = find(docs, "Role")
        .into_iter()
        .partition(|r| name_of(r).ends_with("-notify"));
    assert_eq!(notify.len(), 1, "one notify Role");
    assert_eq!(namespace_of(notify[0]), RELEASE_NAMESPACE);
    assert_eq!(
        grants(notify[0]),
        [(
            String::new(),
            format!("serviceaccounts/token#{account}"),
            "create".to_string()
        )]
        .into_iter()
        .collect()
    );
    let binding = find(docs, "RoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"] == notify[0]["metadata"]["name"])
        .expect("the notify Role is bound");
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        Some(account.as_str())
    );
    others
}

fn expected_grants(with_nodes: bool) -> BTreeSet<(String, String, String)> {
    CLUSTER_RULES
        .iter()
        .filter(|(_, resource, _)| with_nodes || *resource != "nodes")
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect()
}

fn assert_no_wildcards_or_secrets(docs: &[Value]) {
    for role in docs
        .iter()
        .filter(|d| matches!(kind_of(d), "Role" | "ClusterRole"))
    {
        for (group, resource, verb) in grants(role) {
            for field in [&group, &resource, &verb] {
                assert!(
                    !field.contains('*'),
                    "{} {} grants a wildcard: ({group:?}, {resource:?}, {verb:?})",
                    kind_of(role),
                    name_of(role)
                );
            }
            assert!(
                !resource.starts_with("secrets"),
                "{} {} grants access to secrets",
                kind_of(role),
                name_of(role)
            );
        }
    }
}

fn operator_container(docs: &[Value]) -> &Value {
    let deployment = one(docs, "Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

fn env_field_ref(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["valueFrom"]["fieldRef"]["fieldPath"]
        .as_str()
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// Offline: lint and render

#[test]
fn helm_lint_passes() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for extra in [
        &[][..],
        &["--strict"],
        &["--strict", "--set", "watchNamespace=team-a"],
    ] {
        let mut args = vec!["lint", chart];
        args.extend_from_slice(extra);
        let out = helm_ok(&args);
        assert!(
            out.contains("0 chart(s) failed"),
            "helm lint {extra:?}:\n{out}"
        );
        assert!(
            !out.contains("[WARNING]"),
            "helm lint {extra:?} warns:\n{out}"
        );
        assert!(
            !out.contains("[ERROR]"),
            "helm lint {extra:?} errors:\n{out}"
        );
    }
}

#[test]
fn chart_version_matches_the_crate() {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ChartYaml {
        api_version: String,
        name: String,
        version: String,
        app_version: String,
    }
    let text = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    let chart: ChartYaml = serde_yaml::from_str(&text).unwrap();
    assert_eq!(chart.api_version, "v2");
    assert_eq!(chart.name, "podium");
    assert_eq!(
        chart.version,
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml version"
    );
    assert_eq!(
        chart.app_version,
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion"
    );
}

#[test]
fn chart_crd_is_identical_to_the_generated_one() {
    let generated = std::fs::read(repo().join("crds/electiongroup.yaml")).unwrap();
    let copy = std::fs::read(chart().join("crds/electiongroup.yaml")).unwrap();
    assert!(
        generated == copy,
        "charts/podium/crds/electiongroup.yaml differs from crds/electiongroup.yaml; \
         run: cp crds/electiongroup.yaml charts/podium/crds/electiongroup.yaml"
    );
    // And it is the only thing in the chart's crds/.
    let entries: Vec<_> = std::fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["electiongroup.yaml"]);
}

#[test]
fn default_render_is_a_cluster_wide_ha_operator() {
    let docs = documents(&template(&[]));
    let kinds: BTreeMap<&str, usize> = docs.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry(kind_of(d)).or_default() += 1;
        m
    });
    let expected: BTreeMap<&str, usize> = [
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Deployment", 1),
        ("PodDisruptionBudget", 1),
        // Tokens for its own ServiceAccount, to sign role notifications.
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 1),
        ("ServiceAccount", 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(kinds, expected);

    // Standard labels everywhere; namespaced objects in the release namespace.
    for doc in &docs {
        let labels = &doc["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/name"].as_str(),
            Some("podium"),
            "{doc:?}"
        );
        assert_eq!(labels["app.kubernetes.io/instance"].as_str(), Some(RELEASE));
        assert_eq!(
            labels["app.kubernetes.io/managed-by"].as_str(),
            Some("Helm")
        );
        assert_eq!(labels["helm.sh/chart"].as_str(), Some("podium-0.1.0"));
        if !kind_of(doc).starts_with("Cluster") {
            assert_eq!(namespace_of(doc), RELEASE_NAMESPACE, "{}", kind_of(doc));
        }
    }

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some("podium"));
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(
        anti[0]["podAffinityTerm"]["labelSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
        "anti-affinity must select the operator's own pods"
    );

    let c = operator_container(&docs);
    assert_eq!(c["image"].as_str(), Some("ghcr.io/podium-dev/podium:0.1.0"));
    assert_eq!(
        strings(&c["args"]),
        [
            "run",
            "--leader-elect=true",
            "--http-addr=0.0.0.0:8080",
            "--log-format=json"
        ]
    );
    assert_eq!(
        env_field_ref(c, "POD_NAME").as_deref(),
        Some("metadata.name")
    );
    assert_eq!(
        env_field_ref(c, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(65532));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );

    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    let service = one(&docs, "Service");
    assert_eq!(service["metadata"]["name"].as_str(), Some("podium-metrics"));
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
}

#[test]
fn cluster_rbac_grants_exactly_the_operator_verbs() {
    let docs = documents(&template(&[]));
    assert_no_wildcards_or_secrets(&docs);
    assert!(without_notify_role(&docs).is_empty());
    assert_eq!(find(&docs, "RoleBinding").len(), 1);
    let role = one(&docs, "ClusterRole");
    assert_eq!(grants(role), expected_grants(true));

    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some(name_of(role)));
    assert_eq!(
        binding["subjects"][0]["kind"].as_str(),
        Some("ServiceAccount")
    );
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        Some(name_of(one(&docs, "ServiceAccount")))
    );
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some(RELEASE_NAMESPACE)
    );
}

#[test]
fn watch_namespace_renders_namespaced_rbac() {
    let docs = documents(&template(&["--set", "watchNamespace=team-a"]));
    assert_no_wildcards_or_secrets(&docs);
    assert!(
        find(&docs, "ClusterRole").is_empty() && find(&docs, "ClusterRoleBinding").is_empty(),
        "no cluster-scoped RBAC in single-namespace mode"
    );

    let roles = without_notify_role(&docs);
    let bindings = find(&docs, "RoleBinding");
    assert_eq!((roles.len(), bindings.len()), (2, 3));

    // The watched namespace: everything but nodes (cluster-scoped, cannot be granted there).
    let watched = roles
        .iter()
        .find(|r| namespace_of(r) == "team-a")
        .expect("a Role in team-a");
    assert_eq!(grants(watched), expected_grants(false));

    // The release namespace: the operator's own Lease (and its events), nothing else.
    let own = roles
        .iter()
        .find(|r| namespace_of(r) == RELEASE_NAMESPACE)
        .expect("a Role in the release namespace");
    let own_resources: BTreeSet<String> = grants(own)
        .into_iter()
        .map(|(g, r, _)| format!("{g}/{r}"))
        .collect();
    assert_eq!(
        own_resources,
        [
            "/events",
            "coordination.k8s.io/leases",
            "events.k8s.io/events"
        ]
        .map(String::from)
        .into_iter()
        .collect()
    );
    assert!(grants(own).is_subset(&expected_grants(false)));

    for role in &roles {
        let binding = bindings
            .iter()
            .find(|b| {
                namespace_of(b) == namespace_of(role)
                    && b["roleRef"]["name"] == role["metadata"]["name"]
            })
            .unwrap_or_else(|| {
                panic!(
                    "no RoleBinding for Role {}/{}",
                    namespace_of(role),
                    name_of(role)
                )
            });
        assert_eq!(binding["roleRef"]["kind"].as_str(), Some("Role"));
        assert_eq!(binding["subjects"][0]["name"].as_str(), Some("podium"));
        assert_eq!(
            binding["subjects"][0]["namespace"].as_str(),
            Some(RELEASE_NAMESPACE)
        );
    }

    let args = strings(&operator_container(&docs)["args"]);
    assert!(
        args.contains(&"--watch-namespace=team-a".to_string()),
        "{args:?}"
    );
}

#[test]
fn values_schema_rejects_bad_values() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (set, field) in [
        ("replicaCount=two", "replicaCount"),
        ("logFormat=xml", "logFormat"),
        ("watchNamespace=Team_A", "watchNamespace"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("replicas=2", "replicas"),
        ("grafanaDashboard.sidecarLabel=not a label", "sidecarLabel"),
        ("grafanaDashboard.dashboards=x", "dashboards"),
    ] {
        let err = helm_err(&["template", RELEASE, chart, "--set", set]);
        assert!(
            err.contains("schema") && err.contains(field),
            "--set {set}: expected a schema error about {field}, got:\n{err}"
        );
    }
    // ... and accepts good ones.
    helm_ok(&[
        "template",
        RELEASE,
        chart,
        "--set",
        "replicaCount=3",
        "--set",
        "logFormat=text",
        "--set",
        "podDisruptionBudget.maxUnavailable=50%",
    ]);
}

#[test]
fn pdb_api_version_follows_the_kubernetes_version() {
    let pdb_version = |kube: &str| {
        let docs = documents(&template(&["--kube-version", kube]));
        one(&docs, "PodDisruptionBudget")["apiVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(pdb_version("1.20.2"), "policy/v1beta1");
    assert_eq!(pdb_version("1.21.0"), "policy/v1");
    assert_eq!(pdb_version("1.33.0"), "policy/v1");
}

#[test]
fn monitoring_objects_are_optional() {
    let docs = documents(&template(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ]));
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"].as_str(),
        Some("http-metrics")
    );
    assert_eq!(
        monitor["spec"]["endpoints"][0]["honorLabels"].as_bool(),
        Some(true),
        "the group's namespace label must win over the target's"
    );
    let rule = one(&docs, "PrometheusRule");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let by_alert = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("alert {name} missing"))
    };
    let no_leader = by_alert("PodiumGroupWithoutLeader");
    assert!(
        no_leader["expr"]
            .as_str()
            .unwrap()
            .contains("podium_groups_without_leader")
    );
    assert!(no_leader["expr"].as_str().unwrap().ends_with("> 0"));
    assert!(no_leader["for"].is_string());
    let many = by_alert("PodiumMultipleLeaders");
    assert!(many["expr"].as_str().unwrap().contains("podium_leaders"));
    assert!(many["expr"].as_str().unwrap().ends_with("> 1"));
    let renewals = by_alert("PodiumRenewalsFailing");
    let expr = renewals["expr"].as_str().unwrap();
    assert!(
        expr.contains(r#"podium_renewals_total{result="failed"}"#),
        "{expr}"
    );
    assert!(expr.ends_with("> 0.1"), "{expr}");
    assert_eq!(renewals["for"].as_str(), Some("10m"));
    assert!(
        renewals["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("{{ $value | humanizePercentage }}")
    );
    // Prometheus templating survives Helm's.
    assert!(
        many["annotations"]["description"]
            .as_str()
            .unwrap()
            .contains("{{ $labels.namespace }}")
    );

    let off = documents(&template(&[]));
    assert!(find(&off, "ServiceMonitor").is_empty() && find(&off, "PrometheusRule").is_empty());
}

/// The PromQL of the rendered dashboard (panel targets, variables) and of the PrometheusRule.
fn monitoring_queries() -> Vec<String> {
    let docs = documents(&template(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ]));
    let dashboard = dashboard_json(&docs);
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    let rule = one(&docs, "PrometheusRule");
    for group in rule["spec"]["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            queries.push(rule["expr"].as_str().unwrap().to_string());
        }
    }
    queries
}

/// The dashboard JSON of the rendered ConfigMap.
fn dashboard_json(docs: &[Value]) -> serde_json::Value {
    let config_map = one(docs, "ConfigMap");
    let text = config_map["data"]["podium.json"]
        .as_str()
        .expect("the ConfigMap holds podium.json");
    serde_json::from_str(text).expect("the dashboard is JSON")
}

/// Grafana keeps PromQL in a target's `expr` and a variable's `query` (a string, or an object
/// with its own `query`) and `definition`.
fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (key, field) in fields {
                match (key.as_str(), field) {
                    ("expr" | "query" | "definition", serde_json::Value::String(q)) => {
                        out.push(q.clone())
                    }
                    _ => collect_queries(field, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_queries(i, out)),
        _ => {}
    }
}

#[test]
fn grafana_dashboard_is_optional_and_labelled_for_the_sidecar() {
    let off = documents(&template(&[]));
    assert!(find(&off, "ConfigMap").is_empty());

    let docs = documents(&template(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Podium",
    ]));
    let config_map = one(&docs, "ConfigMap");
    assert_eq!(namespace_of(config_map), RELEASE_NAMESPACE);
    assert_eq!(
        config_map["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    assert_eq!(
        config_map["metadata"]["annotations"]["grafana_folder"].as_str(),
        Some("Podium")
    );
    let dashboard = dashboard_json(&docs);
    assert_eq!(dashboard["uid"].as_str(), Some("podium"));
    let titles: BTreeSet<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for title in [
        "Leaders per group",
        "Groups without a leader",
        "Leader changes per group",
        "Failover duration",
        "Reconcile errors",
        "Requests by verb and code",
        "Request latency (p99)",
        "Operator leadership",
    ] {
        assert!(titles.contains(title), "no panel {title:?} in {titles:?}");
    }
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    assert!(
        queries
            .iter()
            .any(|q| q.contains("label_values(podium_leaders"))
    );

    let custom = documents(&template(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.sidecarLabel=dashboards",
        "--set",
        "grafanaDashboard.sidecarLabelValue=podium",
        "--set",
        "grafanaDashboard.namespace=monitoring",
    ]));
    let config_map = one(&custom, "ConfigMap");
    assert_eq!(namespace_of(config_map), "monitoring");
    let labels = &config_map["metadata"]["labels"];
    assert_eq!(labels["dashboards"].as_str(), Some("podium"));
    assert!(labels["grafana_dashboard"].is_null());
}

#[test]
fn notes_tell_what_to_run_next() {
    let chart = chart();
    let out = helm_ok(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NAMESPACE,
        "--dry-run=client",
    ]);
    let notes = out
        .split("NOTES:")
        .nth(1)
        .expect("NOTES in helm install output");
    for needle in [
        "examples/electiongroup.yaml",
        "kubectl get electiongroups",
        "kubectl delete pod",
        "web-leader",
    ] {
        assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
    }
}

#[test]
fn examples_fit_together() {
    let read =
        |f: &str| documents(&std::fs::read_to_string(repo().join("examples").join(f)).unwrap());
    let group = read("electiongroup.yaml");
    let group = one(&group, "ElectionGroup");
    assert_eq!(group["apiVersion"].as_str(), Some("podium.dev/v1alpha1"));
    assert_eq!(name_of(group), "web");
    assert_eq!(
        group["spec"]["selector"]["matchLabels"]["app"].as_str(),
        Some("web")
    );
    assert_eq!(group["spec"]["leaseDurationSeconds"].as_u64(), Some(15));

    let deployment = read("deployment.yaml");
    let deployment = one(&deployment, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(4));
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["app"].as_str(),
        Some("web")
    );

    let service = read("service.yaml");
    let service = one(&service, "Service");
    assert_eq!(name_of(service), "web-leader");
    assert_eq!(service["spec"]["selector"]["app"].as_str(), Some("web"));
    assert_eq!(
        service["spec"]["selector"]["podium.dev/role"].as_str(),
        Some("leader")
    );

    let downward = read("downward-api.yaml");
    let pod = &one(&downward, "Deployment")["spec"]["template"]["spec"];
    let files: BTreeSet<&str> = pod["volumes"][0]["downwardAPI"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["fieldRef"]["fieldPath"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["metadata.annotations", "metadata.labels"].into());
    let script = pod["containers"][0]["args"][0].as_str().unwrap();
    assert!(script.contains("podium.dev/role") && script.contains("podium.dev/epoch"));
}

// ---------------------------------------------------------------------------------------------
// On the testbed: the real kube-apiserver v1.20

mod on_testbed {
    use std::net::TcpListener;
    use std::process::Child;
    use std::time::{Duration, Instant};

    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{Pod, Secret};
    use kube::Client;
    use kube::api::{Api, DynamicObject, ListParams};
    use kube::core::{ApiResource, GroupVersionKind};
    use podium_testkit::prometheus::{http_get, queried_metrics, samples, series_names};
    use podium_testkit::testbed::{Kubelet, KubeletOptions, Testbed};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(90);

    fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
        let kubectl = tool("kubectl");
        let mut full = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
        full.extend_from_slice(args);
        let out = run(&kubectl, &full, stdin);
        assert!(out.status.success(), "{}", describe(&kubectl, &full, &out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn helm_on(kubeconfig: &Path, args: &[&str]) -> String {
        let mut full = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
        full.extend_from_slice(args);
        helm_ok(&full)
    }

    /// Applies `manifests` with `kubectl apply --dry-run=server`, client-side and server-side
    /// apply, and checks that the API server accepted every object.
    /// `namespace` is for objects that name none.
    fn server_dry_run(kubeconfig: &Path, namespace: Option<&str>, manifests: &str) {
        let objects = documents(manifests).len();
        assert!(objects > 0);
        for mode in [&[][..], &["--server-side"]] {
            let mut args = vec!["apply", "--dry-run=server", "-f", "-"];
            if let Some(namespace) = namespace {
                args.extend(["--namespace", namespace]);
            }
            args.extend_from_slice(mode);
            let out = kubectl(kubeconfig, &args, Some(manifests));
            assert_eq!(
                out.lines()
                    .filter(|l| l.ends_with("(server dry run)"))
                    .count(),
                objects,
                "kubectl {args:?} did not accept every object:\n{out}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rendered_chart_and_examples_pass_server_side_dry_run() {
        let tb = Testbed::shared();
        tb.install_crd().await.unwrap_or_else(|e| panic!("{e:#}"));
        let kc = tb.kubeconfig_path();
        let release_ns = tb.create_namespace("chart-dry-run").await.unwrap();
        let watch_ns = tb.create_namespace("chart-dry-run-team").await.unwrap();
        let chart = chart();
        let chart = chart.to_str().unwrap();

        for values in [
            vec![],
            vec!["--set".to_string(), format!("watchNamespace={watch_ns}")],
        ] {
            let mut args = vec![
                "template",
                "podium",
                chart,
                "--namespace",
                &release_ns,
                "--kube-version",
                "1.20.2",
            ];
            args.extend(values.iter().map(String::as_str));
            let rendered = helm_ok(&args);
            let docs = documents(&rendered);
            assert_eq!(
                one(&docs, "PodDisruptionBudget")["apiVersion"].as_str(),
                Some("policy/v1beta1")
            );
            server_dry_run(kc, None, &rendered);
        }

        // The examples, against the installed CRD.
        let mut examples = String::new();
        for file in [
            "electiongroup.yaml",
            "deployment.yaml",
            "service.yaml",
            "downward-api.yaml",
        ] {
            examples.push_str("---\n");
            examples
                .push_str(&std::fs::read_to_string(repo().join("examples").join(file)).unwrap());
        }
        server_dry_run(kc, Some(&watch_ns), &examples);
    }

    /// `helm install` in single-namespace mode on the shared testbed (the CRD comes from
    /// `install_crd`, hence `--skip-crds`), then the real operator binary with the Deployment's
    /// arguments, as the chart's ServiceAccount: the chart's Roles must be enough to elect.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn helm_install_in_one_namespace_runs_the_operator_with_the_chart_rbac() {
        let tb = Testbed::shared();
        tb.install_crd().await.unwrap_or_else(|e| panic!("{e:#}"));
        let release_ns = tb.create_namespace("chart-ns-mode").await.unwrap();
        let watch_ns = tb.create_namespace("chart-ns-mode-team").await.unwrap();
        let watch_value = format!("watchNamespace={watch_ns}");
        let release = format!("p-{}", &release_ns[release_ns.len() - 8..]);
        install_and_elect(
            tb,
            &release,
            &release_ns,
            &watch_ns,
            &["--skip-crds", "--set", &watch_value],
        )
        .await;
    }

    /// `helm install` on a fresh v1.20 control plane, cluster-wide, with the chart's CRD.
    /// Helm 4 applies server-side by default, and v1.20's server-side apply rejects the CRD's
    /// `x-kubernetes-validations` ("field not declared in schema"), so `--server-side=false`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn helm_install_on_a_fresh_cluster_installs_the_crd_and_runs_the_operator() {
        let tb = Testbed::start().await.unwrap_or_else(|e| panic!("{e:#}"));
        let release_ns = tb.create_namespace("podium-system").await.unwrap();
        let apps_ns = tb.create_namespace("apps").await.unwrap();
        install_and_elect(
            &tb,
            "podium",
            &release_ns,
            &apps_ns,
            &["--server-side=false"],
        )
        .await;
        let crd = kubectl(
            tb.kubeconfig_path(),
            &["get", "crd", "electiongroups.podium.dev", "-o", "name"],
            None,
        );
        assert_eq!(
            crd.trim(),
            "customresourcedefinition.apiextensions.k8s.io/electiongroups.podium.dev"
        );
    }

    /// Kills the operator and uninstalls the release when the test ends, pass or fail.
    struct Cleanup<'a> {
        kubeconfig: &'a Path,
        release: String,
        namespace: String,
        operator: Option<Child>,
        log: PathBuf,
    }

    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if let Some(mut child) = self.operator.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if std::thread::panicking() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "--- operator log, last 40 lines ({})\n{}",
                    self.log.display(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
            let _ = Command::new(tool("helm"))
                .args(["--kubeconfig", self.kubeconfig.to_str().unwrap()])
                .args(["uninstall", &self.release, "--namespace", &self.namespace])
                .output();
        }
    }

    async fn install_and_elect(
        tb: &Testbed,
        release: &str,
        release_ns: &str,
        apps_ns: &str,
        helm_args: &[&str],
    ) {
        let kc = tb.kubeconfig_path();
        let client = tb.client();
        let chart = chart();
        let mut args = vec![
            "install",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            release_ns,
        ];
        args.extend_from_slice(helm_args);
        let out = helm_on(kc, &args);
        assert!(out.contains("STATUS: deployed"), "{out}");
        let scratch = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup {
            kubeconfig: kc,
            release: release.to_string(),
            namespace: release_ns.to_string(),
            operator: None,
            log: scratch.path().join("operator.log"),
        };

        // What Helm installed, as the cluster's discovery made it render.
        let manifest = helm_on(kc, &["get", "manifest", release, "--namespace", release_ns]);
        let docs = documents(&manifest);
        assert_eq!(
            one(&docs, "PodDisruptionBudget")["apiVersion"].as_str(),
            Some("policy/v1beta1"),
            "v1.20 serves PodDisruptionBudget in policy/v1beta1 only"
        );
        let container = operator_container(&docs);
        let service_account = one(&docs, "ServiceAccount")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_string();

        // The ServiceAccount's token (v1.20's token controller writes it into a Secret).
        let token = service_account_token(&client, release_ns, &service_account).await;
        let sa_kubeconfig = scratch.path().join("sa.kubeconfig");
        write_token_kubeconfig(kc, &token, &sa_kubeconfig);

        // The example workload, made Running+Ready by the testbed's kubelet.
        let _kubelet = Kubelet::start(
            &client,
            KubeletOptions::new(format!("{apps_ns}-node")).namespace(apps_ns),
        )
        .await
        .unwrap();
        let examples = repo().join("examples");
        for file in ["deployment.yaml", "electiongroup.yaml", "service.yaml"] {
            kubectl(
                kc,
                &[
                    "apply",
                    "-n",
                    apps_ns,
                    "-f",
                    examples.join(file).to_str().unwrap(),
                ],
                None,
            );
        }

        // The operator, with the Deployment's arguments and environment.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let args: Vec<String> = strings(&container["args"])
            .into_iter()
            .map(|a| {
                if a.starts_with("--http-addr=") {
                    format!("--http-addr=127.0.0.1:{port}")
                } else {
                    a
                }
            })
            .collect();
        assert_eq!(args.first().map(String::as_str), Some("run"));
        let identity = format!("{release}-operator-0");
        let rust_log = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some("RUST_LOG"))
            .and_then(|e| e["value"].as_str())
            .unwrap_or("info")
            .to_string();
        let log = std::fs::File::create(&cleanup.log).unwrap();
        cleanup.operator = Some(
            Command::new(env!("CARGO_BIN_EXE_podium"))
                .args(&args)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("PODIUM_WATCH_NAMESPACE")
                .env_remove("PODIUM_LEADER_ELECT")
                .env("KUBECONFIG", &sa_kubeconfig)
                .env("POD_NAME", &identity)
                .env("POD_NAMESPACE", release_ns)
                .env("RUST_LOG", rust_log)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting the podium binary"),
        );

        // It takes its own Lease, elects a leader among the four web pods and labels them.
        let leases: Api<Lease> = Api::namespaced(client.clone(), release_ns);
        eventually(
            &mut cleanup,
            "the operator to hold its Lease podium-operator",
            || async {
                let lease = leases.get_opt("podium-operator").await.ok()??;
                (lease.spec?.holder_identity? == identity).then_some(())
            },
        )
        .await;
        let groups: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            apps_ns,
            &ApiResource::from_gvk(&GroupVersionKind::gvk(
                "podium.dev",
                "v1alpha1",
                "ElectionGroup",
            )),
        );
        let pods: Api<Pod> = Api::namespaced(client.clone(), apps_ns);
        let leader = eventually(
            &mut cleanup,
            "a leader labelled among the web pods",
            || async {
                let group = groups.get("web").await.ok()?;
                let leader = group.data["status"]["leader"].as_str()?.to_string();
                let members = pods
                    .list(&ListParams::default().labels("app=web"))
                    .await
                    .ok()?;
                let roles: Vec<(String, String)> = members
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .map(|p| {
                        let role = p
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("podium.dev/role"))
                            .cloned()
                            .unwrap_or_default();
                        (p.metadata.name.clone().unwrap_or_default(), role)
                    })
                    .collect();
                let leaders: Vec<_> = roles.iter().filter(|(_, r)| r == "leader").collect();
                let followers = roles.iter().filter(|(_, r)| r == "follower").count();
                (roles.len() == 4 && leaders.len() == 1 && leaders[0].0 == leader && followers == 3)
                    .then_some(leader)
            },
        )
        .await;
        let leader_pod = pods.get(&leader).await.unwrap();
        assert!(
            leader_pod
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("podium.dev/epoch")),
            "the leader {leader} lacks the podium.dev/epoch annotation"
        );

        // Probes and metrics as the kubelet and Prometheus would see them.
        let http_get = |path| http_get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let (status, _) = http_get("/healthz");
        assert_eq!(status, 200);
        let (status, _) = http_get("/readyz");
        assert_eq!(status, 200);
        let (status, metrics) = http_get("/metrics");
        assert_eq!(status, 200);
        for name in [
            "podium_groups",
            "podium_groups_without_leader",
            "podium_is_operator_leader",
            "podium_leaders",
        ] {
            assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
        }
        assert_dashboard_and_alerts_query_exposed_metrics(&metrics);
        assert_client_requests_are_counted(&metrics);

        // What the ServiceAccount may do, as the API server's authorizer answers.
        let cluster_wide = !helm_args.iter().any(|a| a.starts_with("watchNamespace="));
        let sa = format!("system:serviceaccount:{release_ns}:{service_account}");
        let only_cluster_wide = if cluster_wide { "yes" } else { "no" };
        for (question, expected) in [
            (vec!["patch", "pods", "-n", apps_ns], "yes"),
            (
                vec!["update", "electiongroups.podium.dev/status", "-n", apps_ns],
                "yes",
            ),
            (
                vec!["create", "leases.coordination.k8s.io", "-n", release_ns],
                "yes",
            ),
            (vec!["list", "nodes"], only_cluster_wide),
            (vec!["patch", "pods", "-n", "default"], only_cluster_wide),
            (vec!["get", "secrets", "-n", apps_ns], "no"),
            (vec!["create", "pods", "-n", apps_ns], "no"),
            (vec!["delete", "pods", "-n", apps_ns], "no"),
        ] {
            let kubectl_bin = tool("kubectl");
            let mut args = vec![
                "--kubeconfig",
                kc.to_str().unwrap(),
                "auth",
                "can-i",
                "--as",
                &sa,
            ];
            args.extend(question.iter());
            let out = run(&kubectl_bin, &args, None);
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                expected,
                "{}",
                describe(&kubectl_bin, &args, &out)
            );
        }

        // RBAC was enough: nothing but the (expected, tolerated) nodes was forbidden.
        let forbidden = forbidden_lines(&cleanup.log);
        assert!(
            forbidden.is_empty(),
            "the operator was refused:\n{}",
            forbidden.join("\n")
        );
        drop(cleanup);
    }

    async fn eventually<T, F, Fut>(cleanup: &mut Cleanup<'_>, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if let Some(child) = cleanup.operator.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("the operator exited with {status} while waiting for {what}");
            }
            // A missing permission shows up as a 403 in the operator's log: fail fast with it.
            let forbidden = forbidden_lines(&cleanup.log);
            assert!(
                forbidden.is_empty(),
                "the chart's RBAC refused the operator while waiting for {what}:\n{}",
                forbidden[..forbidden.len().min(3)].join("\n")
            );
            assert!(
                Instant::now() < deadline,
                "timed out after {}s waiting for {what}",
                TIMEOUT.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Lines of the operator's log that report a 403, except for nodes, which a namespaced
    /// install cannot read and the operator does without.
    fn forbidden_lines(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains("forbidden") && !l.contains("nodes"))
            .map(str::to_string)
            .collect()
    }

    async fn service_account_token(client: &Client, namespace: &str, account: &str) -> String {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let list = secrets.list(&ListParams::default()).await.unwrap();
            let token = list.items.iter().find_map(|s| {
                let annotations = s.metadata.annotations.as_ref()?;
                (s.type_.as_deref() == Some("kubernetes.io/service-account-token")
                    && annotations
                        .get("kubernetes.io/service-account.name")
                        .map(String::as_str)
                        == Some(account))
                .then(|| s.data.as_ref()?.get("token").cloned())
                .flatten()
            });
            if let Some(token) = token {
                return String::from_utf8(token.0).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no token Secret for ServiceAccount {namespace}/{account}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A kubeconfig for the testbed's API server that authenticates with `token`.
    fn write_token_kubeconfig(admin: &Path, token: &str, path: &Path) {
        let mut config: Value =
            serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
        let mut user = serde_yaml::Mapping::new();
        user.insert("token".into(), token.into());
        config["users"][0]["user"] = Value::Mapping(user);
        std::fs::write(path, serde_yaml::to_string(&config).unwrap()).unwrap();
    }

    /// Every metric a dashboard panel, a dashboard variable or an alert rule queries is a series
    /// of the real operator's exposition, with its type's suffix (`_total`, `_bucket`, ...).
    fn assert_dashboard_and_alerts_query_exposed_metrics(exposition: &str) {
        let exposed = series_names(exposition);
        let queries = monitoring_queries();
        let queried: BTreeSet<String> = queries
            .iter()
            .flat_map(|q| queried_metrics(q, "podium_"))
            .collect();
        // The dashboard and the alerts cover these; an extraction that found none would pass
        // vacuously.
        for needed in [
            "podium_leaders",
            "podium_groups_without_leader",
            "podium_failover_seconds_bucket",
            "podium_leader_changes_total",
            "podium_reconcile_errors_total",
            "podium_is_operator_leader",
            "podium_renewals_total",
            "podium_kube_client_requests_total",
            "podium_kube_client_request_duration_seconds_bucket",
        ] {
            assert!(
                queried.contains(needed),
                "no query reads {needed}: {queried:?}"
            );
        }
        let missing: Vec<&String> = queried.iter().filter(|m| !exposed.contains(*m)).collect();
        assert!(
            missing.is_empty(),
            "the dashboard or the PrometheusRule query metrics the operator does not expose: \
             {missing:?}\nexposed: {exposed:?}"
        );
    }

    /// The kube client's requests, by verb and code, for the resources the operator works on.
    fn assert_client_requests_are_counted(exposition: &str) {
        let samples = samples(exposition, "podium_kube_client_requests_total");
        let label = |s: &(BTreeMap<String, String>, f64), name: &str| {
            s.0.get(name).cloned().unwrap_or_default()
        };
        let seen = |verb: &str, resource: &str, code: &str| {
            samples.iter().any(|s| {
                label(s, "verb") == verb
                    && label(s, "resource") == resource
                    && label(s, "code") == code
                    && s.1 > 0.0
            })
        };
        for (verb, resource, code) in [
            ("list", "pods", "200"),
            ("watch", "pods", "200"),
            ("patch", "pods", "200"),
            ("watch", "leases", "200"),
            ("list", "electiongroups", "200"),
            ("watch", "electiongroups", "200"),
        ] {
            assert!(
                seen(verb, resource, code),
                "no {verb} {resource} {code} in {samples:?}"
            );
        }
        // The group's Lease and the operator's own are written: created or replaced.
        assert!(
            samples.iter().any(|s| label(s, "resource") == "leases"
                && matches!(label(s, "verb").as_str(), "create" | "update" | "patch")
                && label(s, "code").starts_with('2')),
            "no Lease write in {samples:?}"
        );
        // Resources are lower-case words (`-` for discovery): no pod, Lease or group name.
        assert!(
            samples.iter().all(|s| {
                let resource = label(s, "resource");
                resource == "-" || resource.chars().all(|c| c.is_ascii_lowercase() || c == '/')
            }),
            "an object name leaked into a resource label: {samples:?}"
        );
    }
}
