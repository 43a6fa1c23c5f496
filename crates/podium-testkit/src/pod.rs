//! What the harness reads off a pod, the way the EndpointSlice controller and podium read it.

use k8s_openapi::api::core::v1::Pod;

/// The pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod has a deletion timestamp (it is Terminating).
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// The pod is Ready and not Terminating: a Service routes to it, and podium may elect it.
pub fn is_serving(pod: &Pod) -> bool {
    is_ready(pod) && !is_terminating(pod)
}

/// The pod's IP, empty before the kubelet reported one.
pub fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}
