//! A Lease as the operator decodes it from the API server: k8s-openapi's `Lease` without its
//! managed fields (see [`crate::meta`]). Every renewal brings two of them, the write's answer
//! and its watch event; both are decoded into this type and turned into a `Lease` by moving
//! its two fields, so the rest of the operator and the core keep using k8s-openapi's type.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct LeanLease {
    #[serde(deserialize_with = "crate::meta::without_managed_fields")]
    pub metadata: ObjectMeta,
    pub spec: Option<LeaseSpec>,
}

/// The body of a Lease write: the same JSON as k8s-openapi's `Lease`, `apiVersion` and `kind`
/// included.
impl Serialize for LeanLease {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use k8s_openapi::Resource;
        let mut lease = serializer.serialize_struct(Self::KIND, 4)?;
        lease.serialize_field("apiVersion", Self::API_VERSION)?;
        lease.serialize_field("kind", Self::KIND)?;
        lease.serialize_field("metadata", &self.metadata)?;
        if let Some(spec) = &self.spec {
            lease.serialize_field("spec", spec)?;
        }
        lease.end()
    }
}

impl From<LeanLease> for Lease {
    fn from(lease: LeanLease) -> Self {
        Lease {
            metadata: lease.metadata,
            spec: lease.spec,
        }
    }
}

impl From<Lease> for LeanLease {
    fn from(lease: Lease) -> Self {
        LeanLease {
            metadata: lease.metadata,
            spec: lease.spec,
        }
    }
}

impl k8s_openapi::Resource for LeanLease {
    const API_VERSION: &'static str = <Lease as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Lease as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Lease as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Lease as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Lease as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Lease as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for LeanLease {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn it_decodes_what_k8s_openapi_decodes_less_the_managed_fields() {
        let answer = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "g", "namespace": "default", "resourceVersion": "7",
                "labels": { "app.kubernetes.io/managed-by": "podium" },
                "managedFields": [{ "manager": "podium", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": { "f:spec": { "f:renewTime": {} } } }]
            },
            "spec": {
                "holderIdentity": "web-1", "leaseDurationSeconds": 15, "leaseTransitions": 3,
                "acquireTime": "2026-12-06T10:00:00.000000Z",
                "renewTime": "2026-12-06T10:00:07.500000Z"
            }
        });
        let mut theirs: Lease = serde_json::from_value(answer.clone()).unwrap();
        theirs.metadata.managed_fields = None;
        let ours: LeanLease = serde_json::from_value(answer).unwrap();
        assert_eq!(Lease::from(ours), theirs);
    }

    #[test]
    fn it_writes_the_body_k8s_openapi_writes() {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some("g".into()),
                resource_version: Some("7".into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("web-1".into()),
                lease_transitions: Some(3),
                ..LeaseSpec::default()
            }),
        };
        let without_spec = Lease {
            spec: None,
            ..lease.clone()
        };
        for lease in [lease, without_spec] {
            assert_eq!(
                serde_json::to_string(&LeanLease::from(lease.clone())).unwrap(),
                serde_json::to_string(&lease).unwrap()
            );
        }
    }
}
