//! Secondary indexes over the watch caches. kube's reflector store is keyed by name only, so
//! "the pods a group selects" and "the groups that select a pod" were full scans: every renewal
//! checked every pod in the cache, which at 1000 groups × 3 pods cost 80 % of the operator's CPU.
//! An index maps a [`Key`] to the objects carrying it and is fed the same watch events as the
//! store, right after it, so a trigger never runs ahead of the index.
//!
//! The index narrows; it does not decide. Callers look the objects up in the store and check
//! the selector themselves, so an index that lags a moment behind the store costs a missed
//! candidate until the next event (which triggers a reconcile anyway), never a wrong match.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock};

use crate::pod::ElectionPod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Resource;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use crate::crd::{ElectionGroup, GROUP_ANNOTATION};
use crate::selector;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// Every indexed object of a namespace.
    Namespace(String),
    /// Pods carrying the label `key=value`.
    Label {
        namespace: String,
        key: String,
        value: String,
    },
    /// Pods annotated as touched by the named group.
    Touched { namespace: String, group: String },
    /// Pods bound to the named node.
    Node(String),
    /// Groups whose selector can only match pods with the label `key=value` (one such key per
    /// group: its first `matchLabels` pair, or every value of its first `In` expression).
    Requires {
        namespace: String,
        key: String,
        value: String,
    },
    /// Groups whose selector names no required label value.
    RequiresNothing(String),
}

/// Objects by key, kept in step with a reflector by [`Index::apply`].
pub struct Index<K: Resource<DynamicType = ()>> {
    keys_of: fn(&K) -> Vec<Key>,
    state: RwLock<State<K>>,
}

struct State<K: Resource<DynamicType = ()>> {
    live: Entries<K>,
    /// A relist in progress: like kube's store, the index switches to it only when complete,
    /// so objects gone during a watch outage disappear and the rest never blink out.
    relist: Option<Entries<K>>,
}

/// One copy of each object's reference and of each key, shared by both maps: the pod index
/// files each pod under half a dozen keys, and a copy per filing (each with its own name,
/// namespace, resourceVersion and uid strings) was most of the index's memory.
struct Entries<K: Resource<DynamicType = ()>> {
    by_key: HashMap<Arc<Key>, HashSet<Arc<ObjectRef<K>>>>,
    keys_by_object: HashMap<Arc<ObjectRef<K>>, Vec<Arc<Key>>>,
}

impl<K: Resource<DynamicType = ()>> Default for Entries<K> {
    fn default() -> Self {
        Entries {
            by_key: HashMap::new(),
            keys_by_object: HashMap::new(),
        }
    }
}

impl<K: Resource<DynamicType = ()>> Entries<K> {
    fn insert(&mut self, object: &K, keys: Vec<Key>) {
        // Equality ignores the resourceVersion and uid, so the reference is kept without them.
        let mut reference = ObjectRef::new(object.meta().name.as_deref().unwrap_or_default());
        if let Some(namespace) = &object.meta().namespace {
            reference = reference.within(namespace);
        }
        self.remove(&reference);
        let object = Arc::new(reference);
        let mut filed = Vec::with_capacity(keys.len());
        for key in keys {
            let key = match self.by_key.get_key_value(&key) {
                Some((shared, _)) => shared.clone(),
                None => Arc::new(key),
            };
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(object.clone());
            filed.push(key);
        }
        self.keys_by_object.insert(object, filed);
    }

    fn remove(&mut self, object: &ObjectRef<K>) {
        for key in self.keys_by_object.remove(object).unwrap_or_default() {
            if let Some(set) = self.by_key.get_mut(&key) {
                set.remove(object);
                if set.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
    }
}

impl<K: Resource<DynamicType = ()> + Clone> Index<K> {
    pub fn new(keys_of: fn(&K) -> Vec<Key>) -> Self {
        Index {
            keys_of,
            state: RwLock::new(State {
                live: Entries::default(),
                relist: None,
            }),
        }
    }

    /// Follows one watch event, exactly as the reflector store does.
    pub fn apply(&self, event: &watcher::Event<K>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(object) => {
                let keys = (self.keys_of)(object);
                state.live.insert(object, keys);
            }
            watcher::Event::Delete(object) => state.live.remove(&ObjectRef::from_obj(object)),
            watcher::Event::Init => state.relist = Some(Entries::default()),
            watcher::Event::InitApply(object) => {
                let keys = (self.keys_of)(object);
                state
                    .relist
                    .get_or_insert_with(Entries::default)
                    .insert(object, keys);
            }
            watcher::Event::InitDone => {
                if let Some(relist) = state.relist.take() {
                    state.live = relist;
                }
            }
        }
    }

    /// The objects filed under `key`.
    pub fn get(&self, key: &Key) -> Vec<ObjectRef<K>> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state
            .live
            .by_key
            .get(key)
            .map(|set| set.iter().map(|r| ObjectRef::clone(r)).collect())
            .unwrap_or_default()
    }

    /// The objects of `store` filed under `key`, looked up under the index's lock instead of
    /// through a copy of their references (a reconcile makes several such lookups).
    pub fn objects(&self, store: &Store<K>, key: &Key) -> Vec<Arc<K>>
    where
        K: 'static,
    {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state
            .live
            .by_key
            .get(key)
            .map(|set| set.iter().filter_map(|r| store.get(r)).collect())
            .unwrap_or_default()
    }

    /// How many objects are filed under `key`, to pick the narrowest of several.
    fn len(&self, key: &Key) -> usize {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.live.by_key.get(key).map_or(0, HashSet::len)
    }
}

pub fn pod_keys(pod: &ElectionPod) -> Vec<Key> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut keys = vec![Key::Namespace(namespace.clone())];
    keys.extend(pod.labels().iter().map(|(key, value)| Key::Label {
        namespace: namespace.clone(),
        key: key.clone(),
        value: value.clone(),
    }));
    if let Some(group) = pod.annotations().get(GROUP_ANNOTATION) {
        keys.push(Key::Touched {
            namespace: namespace.clone(),
            group: group.clone(),
        });
    }
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
        keys.push(Key::Node(node));
    }
    keys
}

pub fn group_keys(group: &ElectionGroup) -> Vec<Key> {
    let namespace = group.namespace().unwrap_or_default();
    let mut keys = vec![Key::Namespace(namespace.clone())];
    let required = required_labels(&group.spec.selector);
    if required.is_empty() {
        keys.push(Key::RequiresNothing(namespace));
    } else {
        keys.extend(required.into_iter().map(|(key, value)| Key::Requires {
            namespace: namespace.clone(),
            key,
            value,
        }));
    }
    keys
}

/// Label pairs of which a matching pod must carry at least one: the first `matchLabels` pair,
/// else the values of the first `In` expression; empty when the selector requires no value.
fn required_labels(selector: &LabelSelector) -> Vec<(String, String)> {
    if let Some((key, value)) = selector.match_labels.iter().flatten().next() {
        return vec![(key.clone(), value.clone())];
    }
    selector
        .match_expressions
        .iter()
        .flatten()
        .find(|e| e.operator == "In")
        .map(|e| {
            e.values
                .iter()
                .flatten()
                .map(|v| (e.key.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The pods in `namespace` that `selector` matches.
pub fn selected_pods(
    pods: &Store<ElectionPod>,
    index: &Index<ElectionPod>,
    namespace: &str,
    selector: &LabelSelector,
) -> Vec<Arc<ElectionPod>> {
    let candidates = candidate_keys(namespace, selector)
        .into_iter()
        .map(|key| (index.len(&key), key))
        .min_by_key(|(len, _)| *len)
        .map(|(_, key)| key)
        .unwrap_or_else(|| Key::Namespace(namespace.to_owned()));
    index
        .objects(pods, &candidates)
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| selector::matches(selector, p.metadata.labels.as_ref()))
        .collect()
}

/// Keys under which every pod the selector matches is filed; any one of them will do.
fn candidate_keys(namespace: &str, selector: &LabelSelector) -> Vec<Key> {
    let label = |key: &String, value: &String| Key::Label {
        namespace: namespace.to_owned(),
        key: key.clone(),
        value: value.clone(),
    };
    let mut keys: Vec<Key> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| label(k, v))
        .collect();
    // An `In` with one value is as good as a matchLabels pair; with several it would need a union.
    keys.extend(
        selector
            .match_expressions
            .iter()
            .flatten()
            .filter(|e| e.operator == "In" && e.values.as_ref().is_some_and(|v| v.len() == 1))
            .filter_map(|e| Some(label(&e.key, e.values.as_ref()?.first()?))),
    );
    keys
}

/// The pods in `namespace` carrying the group's annotation.
pub fn touched_pods(
    pods: &Store<ElectionPod>,
    index: &Index<ElectionPod>,
    namespace: &str,
    group: &str,
) -> Vec<Arc<ElectionPod>> {
    index
        .objects(
            pods,
            &Key::Touched {
                namespace: namespace.to_owned(),
                group: group.to_owned(),
            },
        )
        .into_iter()
        .filter(|p| p.annotations().get(GROUP_ANNOTATION).map(String::as_str) == Some(group))
        .collect()
}

/// The groups in the pod's namespace whose selector matches it.
pub fn groups_selecting(
    groups: &Store<ElectionGroup>,
    index: &Index<ElectionGroup>,
    pod: &ElectionPod,
) -> Vec<Arc<ElectionGroup>> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut keys: Vec<Key> = pod
        .labels()
        .iter()
        .map(|(key, value)| Key::Requires {
            namespace: namespace.clone(),
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    keys.push(Key::RequiresNothing(namespace.clone()));
    let mut found: Vec<Arc<ElectionGroup>> = Vec::new();
    for group in keys.iter().flat_map(|key| index.objects(groups, key)) {
        // A group may be filed under several of the pod's labels.
        if !found.iter().any(|g| g.metadata.name == group.metadata.name)
            && group.metadata.namespace.as_deref() == Some(namespace.as_str())
            && selector::matches(&group.spec.selector, pod.metadata.labels.as_ref())
        {
            found.push(group);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};
    use kube::runtime::reflector;
    use std::collections::BTreeMap;

    fn pod(name: &str, labels: &[(&str, &str)]) -> ElectionPod {
        ElectionPod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn group(name: &str, selector: LabelSelector) -> ElectionGroup {
        let mut g = ElectionGroup::new(
            name,
            serde_json::from_value(serde_json::json!({ "selector": selector })).unwrap(),
        );
        g.metadata.namespace = Some("ns".into());
        g
    }

    fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        }
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
            ..Default::default()
        }
    }

    /// A store and its index fed the same events, as the controller wires them.
    struct Fed<K: Resource<DynamicType = ()> + Clone + 'static> {
        store: Store<K>,
        writer: reflector::store::Writer<K>,
        index: Index<K>,
    }

    impl<K: Resource<DynamicType = ()> + Clone + 'static> Fed<K> {
        fn new(keys_of: fn(&K) -> Vec<Key>) -> Self {
            let (store, writer) = reflector::store();
            Fed {
                store,
                writer,
                index: Index::new(keys_of),
            }
        }
        fn send(&mut self, event: watcher::Event<K>) {
            self.writer.apply_watcher_event(&event);
            self.index.apply(&event);
        }
    }

    fn names<K: Resource>(objects: &[Arc<K>]) -> Vec<String> {
        let mut names: Vec<String> = objects.iter().map(|o| o.name_any()).collect();
        names.sort();
        names
    }

    #[test]
    fn selected_pods_agree_with_a_full_scan() {
        let mut pods = Fed::new(pod_keys);
        for (name, labels) in [
            ("a", vec![("app", "x"), ("tier", "db")]),
            ("b", vec![("app", "x")]),
            ("c", vec![("app", "y"), ("tier", "db")]),
            ("d", vec![]),
        ] {
            pods.send(watcher::Event::Apply(pod(name, &labels)));
        }
        let selectors = [
            labels(&[("app", "x")]),
            labels(&[("app", "x"), ("tier", "db")]),
            expression("app", "In", &["x", "y"]),
            expression("app", "In", &["y"]),
            expression("tier", "Exists", &[]),
            expression("app", "NotIn", &["x"]),
            expression("tier", "DoesNotExist", &[]),
        ];
        for selector in selectors {
            let scanned: Vec<Arc<ElectionPod>> = pods
                .store
                .state()
                .into_iter()
                .filter(|p| selector::matches(&selector, p.metadata.labels.as_ref()))
                .collect();
            assert_eq!(
                names(&selected_pods(&pods.store, &pods.index, "ns", &selector)),
                names(&scanned),
                "{selector:?}"
            );
        }
        assert!(
            selected_pods(&pods.store, &pods.index, "other", &labels(&[("app", "x")])).is_empty()
        );
    }

    #[test]
    fn relabels_deletes_and_relists_move_pods_between_keys() {
        let mut pods = Fed::new(pod_keys);
        let x = labels(&[("app", "x")]);
        pods.send(watcher::Event::Apply(pod("a", &[("app", "x")])));
        pods.send(watcher::Event::Apply(pod("b", &[("app", "x")])));
        pods.send(watcher::Event::Apply(pod("a", &[("app", "y")])));
        assert_eq!(
            names(&selected_pods(&pods.store, &pods.index, "ns", &x)),
            ["b"]
        );
        pods.send(watcher::Event::Delete(pod("b", &[("app", "x")])));
        assert!(selected_pods(&pods.store, &pods.index, "ns", &x).is_empty());

        // A relist that no longer lists `a` but lists `c`: the old view holds until it is done.
        pods.send(watcher::Event::Apply(pod("a", &[("app", "x")])));
        pods.send(watcher::Event::Init);
        pods.send(watcher::Event::InitApply(pod("c", &[("app", "x")])));
        assert_eq!(
            names(&selected_pods(&pods.store, &pods.index, "ns", &x)),
            ["a"]
        );
        pods.send(watcher::Event::InitDone);
        assert_eq!(
            names(&selected_pods(&pods.store, &pods.index, "ns", &x)),
            ["c"]
        );
    }

    #[test]
    fn touched_pods_follow_the_annotation() {
        let mut pods = Fed::new(pod_keys);
        let mut p = pod("a", &[]);
        p.annotations_mut()
            .insert(GROUP_ANNOTATION.into(), "g".into());
        pods.send(watcher::Event::Apply(p.clone()));
        assert_eq!(
            names(&touched_pods(&pods.store, &pods.index, "ns", "g")),
            ["a"]
        );
        p.annotations_mut().remove(GROUP_ANNOTATION);
        pods.send(watcher::Event::Apply(p));
        assert!(touched_pods(&pods.store, &pods.index, "ns", "g").is_empty());
    }

    #[test]
    fn groups_selecting_a_pod_agree_with_a_full_scan() {
        let mut groups = Fed::new(group_keys);
        for (name, selector) in [
            ("by-label", labels(&[("app", "x")])),
            ("by-two-labels", labels(&[("app", "x"), ("tier", "db")])),
            ("by-in", expression("app", "In", &["x", "y"])),
            ("by-exists", expression("tier", "Exists", &[])),
            ("by-notin", expression("app", "NotIn", &["y"])),
            ("other-app", labels(&[("app", "z")])),
        ] {
            groups.send(watcher::Event::Apply(group(name, selector)));
        }
        for labels in [
            vec![("app", "x"), ("tier", "db")],
            vec![("app", "y")],
            vec![("tier", "web")],
            vec![],
        ] {
            let p = pod("p", &labels);
            let scanned: Vec<Arc<ElectionGroup>> = groups
                .store
                .state()
                .into_iter()
                .filter(|g| selector::matches(&g.spec.selector, p.metadata.labels.as_ref()))
                .collect();
            assert_eq!(
                names(&groups_selecting(&groups.store, &groups.index, &p)),
                names(&scanned),
                "{labels:?}"
            );
        }
    }
}
