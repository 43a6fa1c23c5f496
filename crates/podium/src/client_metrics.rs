//! The kube client's own request metrics: a tower layer in front of the client's service stack
//! that counts each API request by verb, API group, resource and status code, and times it.
//!
//! Labels come from [`podium_core::request`], the classification the test kit's request counts
//! use too. They never carry a namespace or an object name, so the number of series is bounded
//! by the resources the operator's code asks for, not by the cluster's size.
//!
//! A request is recorded when its answer comes; one whose caller gives up first (a dropped
//! future) is not, as it has no code to record.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::ClientBuilder;
use podium_core::request::{target, verb};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: &'static str,
    /// `core` for the core group: an empty label value would read as no label in PromQL.
    pub api_group: String,
    pub resource: String,
    /// The HTTP status, or `error` when no response came (connect, TLS, timeout).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub verb: &'static str,
    pub api_group: String,
    pub resource: String,
}

type LatencyFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// The request metrics, and the client layer that records them.
#[derive(Clone)]
pub struct ClientMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s: a loopback API server answers in about a millisecond, a throttled or
    // overloaded one in seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl ClientMetrics {
    /// Registers the metrics in `registry` (the caller chooses the prefix).
    pub fn register(registry: &mut Registry) -> ClientMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Kubernetes API requests of the operator's client, by verb, API group, resource and \
             status code (error: no response); retries inside the client count once",
            requests.clone(),
        );
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        // Until the response headers, not the end of the body: for a watch that is how long the
        // API server took to start the stream, whereas its whole lifetime (minutes, by design)
        // would fill the last bucket and drown the latency of every other request.
        registry.register(
            "request_duration_seconds",
            "Time from sending a Kubernetes API request to its response headers (for a watch: \
             until the stream starts), by verb, API group and resource",
            latency.clone(),
        );
        ClientMetrics { requests, latency }
    }

    /// A client for `config` whose every request these metrics record.
    pub fn client_for(&self, config: kube::Config) -> kube::Result<Client> {
        Ok(ClientBuilder::try_from(config)?.with_layer(self).build())
    }

    fn record(&self, request: &Seen, status: Option<StatusCode>, took: Duration) {
        let code = status.map_or_else(|| "error".to_string(), |s| s.as_u16().to_string());
        self.requests
            .get_or_create(&RequestLabels {
                verb: request.labels.verb,
                api_group: request.labels.api_group.clone(),
                resource: request.labels.resource.clone(),
                code,
            })
            .inc();
        self.latency
            .get_or_create(&request.labels)
            .observe(took.as_secs_f64());
    }
}

/// What the layer keeps of a request until its answer.
struct Seen {
    labels: LatencyLabels,
    started: Instant,
}

impl Seen {
    fn of<B>(request: &Request<B>) -> Seen {
        let addressed = target(request.uri().path());
        let verb = verb(request.method().as_str(), &addressed, request.uri().query());
        let api_group = if addressed.group.is_empty() {
            "core".to_string()
        } else {
            addressed.group
        };
        Seen {
            labels: LatencyLabels {
                verb,
                api_group,
                resource: addressed.resource,
            },
            started: Instant::now(),
        }
    }
}

impl<S> Layer<S> for ClientMetrics {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A client service stack whose requests [`ClientMetrics`] records.
#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: ClientMetrics,
}

impl<S, B, R> Service<Request<B>> for Measured<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let seen = Seen::of(&request);
        let answer = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = answer.await;
            let status = result.as_ref().ok().map(Response::status);
            metrics.record(&seen, status, seen.started.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt as _;

    fn encode(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    #[tokio::test]
    async fn requests_are_counted_by_verb_group_resource_and_code_without_names() {
        let mut registry = Registry::with_prefix("t");
        let metrics = ClientMetrics::register(&mut registry);
        let server = tower::service_fn(|request: Request<()>| async move {
            if request.uri().path().ends_with("/gone") {
                return Err("connection reset");
            }
            let status = if request.method() == http::Method::PUT {
                StatusCode::CONFLICT
            } else {
                StatusCode::OK
            };
            Ok(Response::builder().status(status).body(()).unwrap())
        });
        let mut client = metrics.layer(server);
        for (method, uri) in [
            (
                "GET",
                "/api/v1/namespaces/a/pods?watch=true&resourceVersion=5",
            ),
            ("GET", "/api/v1/namespaces/b/pods?watch=1"),
            ("PATCH", "/api/v1/namespaces/a/pods/web-0"),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/web",
            ),
            (
                "PATCH",
                "/apis/podium.dev/v1alpha1/namespaces/a/electiongroups/web/status",
            ),
            (
                "GET",
                "/apis/podium.dev/v1alpha1/namespaces/a/electiongroups/gone",
            ),
        ] {
            let request = Request::builder().method(method).uri(uri).body(()).unwrap();
            let _ = client.ready().await.unwrap().call(request).await;
        }
        let text = encode(&registry);
        for sample in [
            r#"t_requests_total{verb="watch",api_group="core",resource="pods",code="200"} 2"#,
            r#"t_requests_total{verb="patch",api_group="core",resource="pods",code="200"} 1"#,
            r#"t_requests_total{verb="update",api_group="coordination.k8s.io",resource="leases",code="409"} 1"#,
            r#"t_requests_total{verb="patch",api_group="podium.dev",resource="electiongroups/status",code="200"} 1"#,
            r#"t_requests_total{verb="get",api_group="podium.dev",resource="electiongroups",code="error"} 1"#,
            r#"t_request_duration_seconds_count{verb="watch",api_group="core",resource="pods"} 2"#,
        ] {
            assert!(text.contains(sample), "missing {sample} in\n{text}");
        }
        for private in ["web-0", "namespace", "\"a\"", "\"b\""] {
            assert!(!text.contains(private), "{private} leaked into\n{text}");
        }
    }
}
