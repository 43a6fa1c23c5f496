//! A pod as the operator reads it: [`ElectionPod`] is decoded straight from the API server's
//! JSON and keeps only what an election, the indexes and role notifications read.
//!
//! The operator caches every pod of the namespaces it watches. k8s-openapi's `Pod` is 2,416
//! bytes before any of its fields holds data, because each of PodSpec's and PodStatus's dozens
//! of optional fields takes its room inline; this type is under 500. Decoding into it also
//! skips containers, volumes and container statuses instead of building them to throw them
//! away. Every pod read, watch and patch response of the operator uses it; podium never sends a
//! whole pod back (label writes are merge patches of the labels alone), so nothing it leaves
//! out can be lost on the server.

use k8s_openapi::api::core::v1::PodCondition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::crd::{EPOCH_ANNOTATION, GROUP_ANNOTATION, PRIORITY_ANNOTATION};

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ElectionPod {
    #[serde(deserialize_with = "crate::meta::without_managed_fields")]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ElectionPodSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ElectionPodStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ElectionPodSpec {
    /// A NotReady node makes its pods ineligible; the node index files pods under it.
    #[serde(rename = "nodeName", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct ElectionPodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Where role notifications go.
    #[serde(rename = "podIP", default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
}

impl k8s_openapi::Resource for ElectionPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for ElectionPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Drops what the decoded type still carries but the election never reads, before a pod enters
/// the operator's cache: owner references, other tools' annotations (a
/// `last-applied-configuration` alone can be kilobytes) and every condition but Ready. (Managed
/// fields are never decoded.) Keep this in step with [`crate::election::member_from_pod`] (a
/// test checks they agree).
pub fn keep_election_fields(pod: &mut ElectionPod) {
    let meta = &mut pod.metadata;
    meta.owner_references = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| {
            [EPOCH_ANNOTATION, GROUP_ANNOTATION, PRIORITY_ANNOTATION].contains(&key.as_str())
        });
    }
    if let Some(conditions) = pod.status.as_mut().and_then(|s| s.conditions.as_mut()) {
        conditions.retain(|c| c.type_ == "Ready");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_the_operator_keeps_is_a_fifth_of_k8s_openapis() {
        let ours = std::mem::size_of::<ElectionPod>();
        let theirs = std::mem::size_of::<k8s_openapi::api::core::v1::Pod>();
        assert!(ours * 5 < theirs, "{ours} vs {theirs} bytes");
    }

    #[test]
    fn it_names_the_same_api_as_k8s_openapis_pod() {
        use k8s_openapi::Resource;
        type Theirs = k8s_openapi::api::core::v1::Pod;
        assert_eq!(
            (
                ElectionPod::API_VERSION,
                ElectionPod::GROUP,
                ElectionPod::KIND,
                ElectionPod::VERSION,
                ElectionPod::URL_PATH_SEGMENT
            ),
            (
                Theirs::API_VERSION,
                Theirs::GROUP,
                Theirs::KIND,
                Theirs::VERSION,
                Theirs::URL_PATH_SEGMENT
            )
        );
    }
}
