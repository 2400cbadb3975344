//! The agent's cache of watched objects and its change tracker, as
//! kube-proxy's ServiceChangeTracker / EndpointsChangeTracker: every watch
//! event updates the cache and marks the services it affects, so a sync
//! rebuilds those services only. Pure: no I/O.
//!
//! * A Service event marks that service (namespace/name).
//! * An EndpointSlice event marks the service its
//!   `kubernetes.io/service-name` label names; a slice whose label changes,
//!   or that is deleted, marks the service it belonged to as well.
//! * A Node event, or the end of a relist of any kind, asks for a full
//!   rebuild (the node's addresses are in every NodePort frontend).
//!
//! The cache keeps an index from service to its slices, so building one
//! service never walks the other slices.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::runtime::watcher::Event;

use crate::model::{ServiceInfo, SliceInfo, SliceView};

/// `(namespace, name)` of a Service (or of an EndpointSlice): the strings
/// of the stored object, shared (a key costs no allocation of its own).
pub type ObjectKey = (Arc<str>, Arc<str>);

/// Which services changed since the last sync, or whether everything must
/// be rebuilt; and kube-proxy's change counts (see [`ChangeCounts`]).
#[derive(Debug)]
pub struct ChangeTracker {
    /// Services whose Service object changed.
    service_marks: HashSet<ObjectKey>,
    /// Services whose EndpointSlices changed.
    endpoint_marks: HashSet<ObjectKey>,
    full: bool,
    service_total: u64,
    endpoint_total: u64,
    last_queued: Option<SystemTime>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` of every
    /// EndpointSlice change queued since the last sync (kube-proxy's
    /// `lastChangeTriggerTimes`), for `network_programming_duration_seconds`.
    trigger_times: Vec<SystemTime>,
    /// When the tracker started: older trigger times are not this agent's
    /// to report (the change was programmed by whoever ran before).
    started: SystemTime,
}

impl Default for ChangeTracker {
    fn default() -> ChangeTracker {
        ChangeTracker {
            service_marks: HashSet::new(),
            endpoint_marks: HashSet::new(),
            full: false,
            service_total: 0,
            endpoint_total: 0,
            last_queued: None,
            trigger_times: Vec::new(),
            started: SystemTime::now(),
        }
    }
}

/// kube-proxy's `sync_proxy_rules_{service,endpoint}_changes_{pending,total}`
/// and `sync_proxy_rules_last_queued_timestamp_seconds`: distinct services
/// with a change not yet synced (per kind of object), changes seen since
/// the agent started, and when the last one was queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    pub service_pending: usize,
    pub endpoint_pending: usize,
    pub service_total: u64,
    pub endpoint_total: u64,
    pub last_queued: Option<SystemTime>,
}

impl ChangeTracker {
    /// A Service object of `key` changed: rebuild that service.
    pub fn service_changed(&mut self, key: ObjectKey) {
        self.service_total += 1;
        self.last_queued = Some(SystemTime::now());
        self.service_marks.insert(key);
    }

    /// One EndpointSlice changed: rebuild the services it belonged to and
    /// belongs to (one change, however many services). `trigger`: the
    /// slice's last-change trigger time, if it has one.
    pub fn endpoints_changed(
        &mut self,
        services: impl IntoIterator<Item = ObjectKey>,
        trigger: Option<SystemTime>,
    ) {
        let now = SystemTime::now();
        self.endpoint_total += 1;
        self.last_queued = Some(now);
        self.endpoint_marks.extend(services);
        if let Some(t) = trigger.filter(|t| *t >= self.started) {
            self.trigger_times.push(t);
        }
    }

    /// The trigger times queued since the last call (see
    /// [`ChangeTracker::endpoints_changed`]).
    pub fn take_trigger_times(&mut self) -> Vec<SystemTime> {
        std::mem::take(&mut self.trigger_times)
    }

    /// Ask for a full rebuild (the marks then only count as pending
    /// changes; the rebuild covers them).
    pub fn full(&mut self) {
        self.full = true;
    }

    /// Nothing marked.
    pub fn is_empty(&self) -> bool {
        !self.full && self.service_marks.is_empty() && self.endpoint_marks.is_empty()
    }

    /// Take the marks: (full rebuild, services marked; empty when full).
    pub fn take(&mut self) -> (bool, Vec<ObjectKey>) {
        let full = std::mem::take(&mut self.full);
        let mut services = std::mem::take(&mut self.service_marks);
        let endpoints = std::mem::take(&mut self.endpoint_marks);
        if full {
            return (true, Vec::new());
        }
        services.extend(endpoints);
        (false, services.into_iter().collect())
    }

    /// The counts as they stand.
    pub fn counts(&self) -> ChangeCounts {
        ChangeCounts {
            service_pending: self.service_marks.len(),
            endpoint_pending: self.endpoint_marks.len(),
            service_total: self.service_total,
            endpoint_total: self.endpoint_total,
            last_queued: self.last_queued,
        }
    }
}

/// What the model reads to build one service.
#[derive(Clone, Debug)]
pub struct ServiceInput {
    pub service: Arc<ServiceInfo>,
    /// The slices labelled with the service's name, in its namespace.
    pub slices: Vec<Arc<SliceInfo>>,
}

/// What one sync works on.
#[derive(Debug)]
pub enum Batch {
    /// Rebuild everything: every service and the node.
    Full {
        services: Vec<ServiceInput>,
        node: Option<Arc<Node>>,
    },
    /// Rebuild these services (None: the service is gone).
    Services(Vec<(ObjectKey, Option<ServiceInput>)>),
}

/// The kinds the cache holds (readiness, relists).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service = 0,
    EndpointSlice = 1,
    Node = 2,
}

/// Watched objects in their stored forms ([`ServiceInfo`], [`SliceInfo`]:
/// what the model reads, compact), a service -> slices index, and the
/// change tracker.
#[derive(Debug, Default)]
pub struct Cache {
    services: HashMap<ObjectKey, Arc<ServiceInfo>>,
    /// Labelled slices only, by (namespace, slice name).
    slices: HashMap<ObjectKey, Arc<SliceInfo>>,
    /// (namespace, service name) -> its slices.
    by_service: HashMap<ObjectKey, Vec<Arc<SliceInfo>>>,
    node: Option<Arc<Node>>,
    relist_services: Option<HashMap<ObjectKey, Arc<ServiceInfo>>>,
    relist_slices: Option<HashMap<ObjectKey, Arc<SliceInfo>>>,
    relist_node: Option<Option<Arc<Node>>>,
    ready: [bool; 3],
    tracker: ChangeTracker,
    /// Every namespace name seen (see [`Cache::intern`]).
    namespaces: HashSet<Arc<str>>,
}

impl Cache {
    /// The one copy of a namespace's name (every object of a namespace
    /// shares it). Namespaces are few; the set keeps those ever seen.
    fn intern(&mut self, namespace: &str) -> Arc<str> {
        if let Some(ns) = self.namespaces.get(namespace) {
            return ns.clone();
        }
        let ns: Arc<str> = namespace.into();
        self.namespaces.insert(ns.clone());
        ns
    }

    fn key_of(
        &mut self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> ObjectKey {
        (
            self.intern(meta.namespace.as_deref().unwrap_or_default()),
            meta.name.as_deref().unwrap_or_default().into(),
        )
    }

    fn service_info(&mut self, s: &Service) -> (ObjectKey, Arc<ServiceInfo>) {
        let mut info = ServiceInfo::of(s);
        info.namespace = self.intern(&info.namespace);
        ((info.namespace.clone(), info.name.clone()), Arc::new(info))
    }

    fn slice_info(&mut self, s: &SliceView) -> (ObjectKey, Arc<SliceInfo>) {
        let mut info = SliceInfo::of(s);
        info.namespace = self.intern(&info.namespace);
        ((info.namespace.clone(), info.name.clone()), Arc::new(info))
    }

    /// A Service watch event.
    pub fn service_event(&mut self, ev: Event<Service>) {
        match ev {
            Event::Apply(s) => {
                let (key, info) = self.service_info(&s);
                self.tracker.service_changed(key.clone());
                self.services.insert(key, info);
            }
            Event::Delete(s) => {
                let key = self.key_of(&s.metadata);
                self.services.remove(&key);
                self.tracker.service_changed(key);
            }
            Event::Init => self.relist_services = Some(HashMap::new()),
            Event::InitApply(s) => {
                let (key, info) = self.service_info(&s);
                self.relist_services
                    .get_or_insert_with(HashMap::new)
                    .insert(key, info);
            }
            Event::InitDone => {
                self.services = self.relist_services.take().unwrap_or_default();
                self.services.shrink_to_fit();
                self.ready[Kind::Service as usize] = true;
                self.tracker.full();
            }
        }
    }

    /// An EndpointSlice watch event.
    pub fn slice_event(&mut self, ev: Event<SliceView>) {
        match ev {
            Event::Apply(s) => {
                let (key, new) = self.slice_info(&s);
                let service = new.service.clone();
                let old = match &service {
                    Some(_) => self.slices.insert(key.clone(), new.clone()),
                    None => self.slices.remove(&key),
                };
                let old_service = old.as_ref().and_then(|o| o.service.clone());
                if let Some(o) = &old_service {
                    self.unindex(&key, o);
                }
                if let Some(n) = &service {
                    // Most services have one slice: room for exactly that.
                    let list = self
                        .by_service
                        .entry((key.0.clone(), n.clone()))
                        .or_default();
                    list.reserve_exact(1);
                    list.push(new);
                }
                let ns = key.0.clone();
                self.tracker.endpoints_changed(
                    old_service
                        .into_iter()
                        .chain(service)
                        .map(|s| (ns.clone(), s)),
                    s.trigger_time,
                );
            }
            Event::Delete(s) => {
                let key = self.key_of(&s.metadata);
                let mut owners = Vec::with_capacity(2);
                if let Some(old) = self.slices.remove(&key)
                    && let Some(o) = old.service.clone()
                {
                    self.unindex(&key, &o);
                    owners.push((key.0.clone(), o));
                }
                if let Some(n) = s.service_name() {
                    owners.push((key.0.clone(), n.into()));
                }
                self.tracker.endpoints_changed(owners, None);
            }
            Event::Init => self.relist_slices = Some(HashMap::new()),
            Event::InitApply(s) => {
                if s.service_name().is_some() {
                    let (key, info) = self.slice_info(&s);
                    self.relist_slices
                        .get_or_insert_with(HashMap::new)
                        .insert(key, info);
                }
            }
            Event::InitDone => {
                self.slices = self.relist_slices.take().unwrap_or_default();
                self.slices.shrink_to_fit();
                let mut index: HashMap<ObjectKey, Vec<Arc<SliceInfo>>> = HashMap::new();
                for ((ns, _), s) in &self.slices {
                    if let Some(svc) = &s.service {
                        let list = index.entry((ns.clone(), svc.clone())).or_default();
                        list.reserve_exact(1);
                        list.push(s.clone());
                    }
                }
                self.by_service = index;
                self.ready[Kind::EndpointSlice as usize] = true;
                self.tracker.full();
            }
        }
    }

    /// A Node watch event (the agent watches its own Node only).
    pub fn node_event(&mut self, ev: Event<Node>) {
        match ev {
            Event::Apply(n) => {
                self.node = Some(Arc::new(n));
                self.tracker.full();
            }
            Event::Delete(_) => {
                self.node = None;
                self.tracker.full();
            }
            Event::Init => self.relist_node = Some(None),
            Event::InitApply(n) => self.relist_node = Some(Some(Arc::new(n))),
            Event::InitDone => {
                self.node = self.relist_node.take().flatten();
                self.ready[Kind::Node as usize] = true;
                self.tracker.full();
            }
        }
    }

    fn unindex(&mut self, slice: &ObjectKey, service: &Arc<str>) {
        let k = (slice.0.clone(), service.clone());
        if let Some(names) = self.by_service.get_mut(&k) {
            names.retain(|s| *s.name != *slice.1);
            if names.is_empty() {
                self.by_service.remove(&k);
            }
        }
    }

    /// Every kind has completed its first list.
    pub fn ready(&self) -> bool {
        self.ready.iter().all(|r| *r)
    }

    /// Whether `kind` has completed its first list.
    pub fn kind_ready(&self, kind: Kind) -> bool {
        self.ready[kind as usize]
    }

    /// Ask for a full rebuild at the next [`Cache::take`] (sync period,
    /// failed apply).
    pub fn request_full(&mut self) {
        self.tracker.full();
    }

    /// Something is marked.
    pub fn pending(&self) -> bool {
        !self.tracker.is_empty()
    }

    /// kube-proxy's change counts.
    pub fn change_counts(&self) -> ChangeCounts {
        self.tracker.counts()
    }

    /// The Node, if known.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.clone()
    }

    /// Every Service (for a full rebuild, tests and inspection).
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceInfo>> {
        self.services.values()
    }

    /// Every labelled EndpointSlice.
    pub fn slices(&self) -> impl Iterator<Item = &Arc<SliceInfo>> {
        self.slices.values()
    }

    /// Every Service with its slices (what a full rebuild reads), one at
    /// a time.
    pub fn for_each_input(&self, mut f: impl FnMut(&ServiceInfo, &[Arc<SliceInfo>])) {
        for (k, s) in &self.services {
            let slices = self
                .by_service
                .get(k)
                .map(Vec::as_slice)
                .unwrap_or_default();
            f(s, slices);
        }
    }

    fn input(&self, key: &ObjectKey, service: &Arc<ServiceInfo>) -> ServiceInput {
        let slices = self.by_service.get(key).cloned().unwrap_or_default();
        ServiceInput {
            service: service.clone(),
            slices,
        }
    }

    /// Take what changed since the last call and the EndpointSlice trigger
    /// times it includes: None when nothing did.
    pub fn take_with_trigger_times(&mut self) -> Option<(Batch, Vec<SystemTime>)> {
        let batch = self.take()?;
        Some((batch, self.tracker.take_trigger_times()))
    }

    /// Take what changed since the last call: None when nothing did.
    pub fn take(&mut self) -> Option<Batch> {
        if self.tracker.is_empty() {
            return None;
        }
        let (full, marked) = self.tracker.take();
        if full {
            let services = self
                .services
                .iter()
                .map(|(k, s)| self.input(k, s))
                .collect();
            return Some(Batch::Full {
                services,
                node: self.node.clone(),
            });
        }
        let batch = marked
            .into_iter()
            .map(|k| {
                let input = self.services.get(&k).map(|s| self.input(&k, s));
                (k, input)
            })
            .collect();
        Some(Batch::Services(batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn slice(name: &str, service: Option<&str>) -> SliceView {
        SliceView {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            service: service.map(str::to_owned),
            address_type: "IPv4".into(),
            ..Default::default()
        }
    }

    fn marked(c: &mut Cache) -> (bool, Vec<String>) {
        match c.take() {
            None => (false, vec![]),
            Some(Batch::Full { .. }) => (true, vec![]),
            Some(Batch::Services(v)) => {
                let mut names: Vec<String> = v.into_iter().map(|(k, _)| k.1.to_string()).collect();
                names.sort();
                (false, names)
            }
        }
    }

    fn slice_names(c: &mut Cache, service: &str) -> Vec<String> {
        c.request_full();
        let Some(Batch::Full { services, .. }) = c.take() else {
            panic!("full batch expected");
        };
        let mut names: Vec<String> = services
            .iter()
            .filter(|i| &*i.service.name == service)
            .flat_map(|i| i.slices.iter().map(|s| s.name.to_string()))
            .collect();
        names.sort();
        names
    }

    /// kube-proxy's network programming latency starts at a slice's trigger
    /// time: each change's time is handed over once, with the batch that
    /// programs it; times from before the agent started are not its own.
    #[test]
    fn trigger_times_go_with_the_batch_that_programs_them() {
        use std::time::Duration;
        let mut c = Cache::default();
        c.service_event(Event::Apply(svc("a")));
        let stamped = |name: &str, t: SystemTime| SliceView {
            trigger_time: Some(t),
            ..slice(name, Some("a"))
        };
        let before_start = SystemTime::now() - Duration::from_secs(60);
        c.slice_event(Event::Apply(stamped("a-1", before_start)));
        let now = SystemTime::now();
        c.slice_event(Event::Apply(stamped("a-2", now)));
        c.slice_event(Event::Apply(slice("a-3", Some("a"))));
        let (_, times) = c.take_with_trigger_times().expect("a batch");
        assert_eq!(times, vec![now]);
        c.slice_event(Event::Delete(slice("a-2", Some("a"))));
        let (_, times) = c.take_with_trigger_times().expect("a batch");
        assert!(times.is_empty(), "{times:?}");
    }

    #[test]
    fn relabelled_and_deleted_slices_mark_the_old_service() {
        let mut c = Cache::default();
        c.service_event(Event::Apply(svc("a")));
        c.service_event(Event::Apply(svc("b")));
        assert_eq!(marked(&mut c), (false, vec!["a".into(), "b".into()]));
        c.slice_event(Event::Apply(slice("a-1", Some("a"))));
        assert_eq!(marked(&mut c), (false, vec!["a".into()]));
        assert_eq!(slice_names(&mut c, "a"), vec!["a-1".to_owned()]);
        // Moved to b by its label: both services.
        c.slice_event(Event::Apply(slice("a-1", Some("b"))));
        assert_eq!(marked(&mut c), (false, vec!["a".into(), "b".into()]));
        assert!(slice_names(&mut c, "a").is_empty());
        assert_eq!(slice_names(&mut c, "b"), vec!["a-1".to_owned()]);
        // Label removed: b loses it.
        c.slice_event(Event::Apply(slice("a-1", None)));
        assert_eq!(marked(&mut c), (false, vec!["b".into()]));
        assert!(slice_names(&mut c, "b").is_empty());
        c.slice_event(Event::Apply(slice("a-1", Some("a"))));
        let _ = c.take();
        // Deleted with a stale label in the event: the stored owner is marked.
        c.slice_event(Event::Delete(slice("a-1", Some("b"))));
        assert_eq!(marked(&mut c), (false, vec!["a".into(), "b".into()]));
        assert!(slice_names(&mut c, "a").is_empty());
    }

    #[test]
    fn change_counts_follow_kube_proxys_metrics() {
        let mut c = Cache::default();
        assert_eq!(c.change_counts(), ChangeCounts::default());
        c.service_event(Event::Apply(svc("a")));
        c.service_event(Event::Apply(svc("a")));
        c.slice_event(Event::Apply(slice("a-1", Some("a"))));
        c.slice_event(Event::Apply(slice("b-1", Some("b"))));
        // Moved from a to b: one change, both services pending.
        c.slice_event(Event::Apply(slice("a-1", Some("b"))));
        let n = c.change_counts();
        assert_eq!((n.service_pending, n.endpoint_pending), (1, 2));
        assert_eq!((n.service_total, n.endpoint_total), (2, 3));
        assert!(n.last_queued.is_some());
        // A sync takes the pending changes; the totals stay.
        let _ = c.take();
        let m = c.change_counts();
        assert_eq!((m.service_pending, m.endpoint_pending), (0, 0));
        assert_eq!((m.service_total, m.endpoint_total), (2, 3));
        assert_eq!(m.last_queued, n.last_queued);
        // A full rebuild (sync period) queues no change of its own, and
        // takes the pending ones with it.
        c.slice_event(Event::Delete(slice("b-1", Some("b"))));
        c.request_full();
        assert_eq!(c.change_counts().endpoint_pending, 1);
        assert_eq!(marked(&mut c), (true, vec![]));
        assert_eq!(c.change_counts().endpoint_pending, 0);
        assert_eq!(c.change_counts().endpoint_total, 4);
    }

    #[test]
    fn node_events_and_relists_ask_for_a_full_rebuild() {
        let mut c = Cache::default();
        assert!(!c.ready());
        c.node_event(Event::Init);
        c.node_event(Event::InitDone);
        assert_eq!(marked(&mut c), (true, vec![]));
        c.node_event(Event::Apply(Node::default()));
        assert_eq!(marked(&mut c), (true, vec![]));
        c.service_event(Event::Apply(svc("gone")));
        c.service_event(Event::Init);
        c.service_event(Event::InitApply(svc("a")));
        c.service_event(Event::InitDone);
        c.slice_event(Event::Init);
        c.slice_event(Event::InitApply(slice("a-1", Some("a"))));
        c.slice_event(Event::InitDone);
        assert!(c.ready());
        let Some(Batch::Full { services, .. }) = c.take() else {
            panic!("full batch expected");
        };
        assert_eq!(services.len(), 1, "the relist replaced the old state");
        assert_eq!(services[0].slices.len(), 1);
        assert!(c.take().is_none(), "marks are taken once");
    }
}
