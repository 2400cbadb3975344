//! The agent's sync loop: cache -> model -> frontends -> diff -> dataplane,
//! one changed service at a time.
//!
//! [`SyncState`] keeps what every service contributes (service ports,
//! frontends, health-check ports, errors) and a claims index (frontend ->
//! the service ports claiming it, first by name wins), so a sync rebuilds
//! only the services the [`crate::changes`] tracker marked and diffs only
//! their frontends against [`Dataplane::programmed`]. A full rebuild runs
//! at start, every sync period, on a Node change or relist, after a
//! failed apply, and (with `--nodeport-addresses` CIDRs) when the host's
//! interface addresses inside them change.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    changes::{Batch, ObjectKey, ServiceInput},
    dataplane::Dataplane,
    diff::{Change, diff_one},
    events::EventRecorder,
    health::{HealthServers, ServiceHealth},
    k8s::Stores,
    lb::{self, Frontend, FrontendKey, LbTable},
    metrics::{OwnerChanges, Telemetry},
    model::{self, ModelError, NodeContext, ServiceInfo, ServicePort, ServicePortName, SliceInfo},
    pressure::PressureWatch,
};

/// How often a full rebuild runs when nothing else asks for one:
/// kube-proxy's `FullSyncPeriod` (its iptables and nftables modes sync
/// only what changed at every `syncPeriod` and rebuild everything hourly).
/// A rebuild re-reads every cached object (about 4 s of CPU at 100,000
/// services); the incremental syncs between are checked against it by
/// the property tests.
pub const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Shortest time between the starts of two syncs (kube-proxy's
/// `minSyncPeriod`, BoundedFrequencyRunner): an event that finds the loop
/// idle for longer is synced at once; events of a burst that arrive sooner
/// (or while a sync runs) are batched into the next sync.
pub const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(5);
/// Changes applied at once by a full rebuild.
const APPLY_CHUNK: usize = 16_384;
/// Housekeeping period (new interfaces, ...).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// kube-proxy's default `syncPeriod`.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    /// A full rebuild: `health` and `owners` list everything (replace).
    pub full: bool,
    pub changes: usize,
    /// Health-check ports the sync touched: what they report now (None:
    /// closed).
    pub health: Vec<(u16, Option<ServiceHealth>)>,
    /// Every current error, when the set changed (always after a full
    /// rebuild); None: unchanged.
    pub errors: Option<Vec<ModelError>>,
    /// Objects (or parts) that cannot be programmed, now.
    pub error_count: usize,
    /// Service ports whose Local policy finds no endpoint on this node
    /// while they have endpoints: [internal, external] (see
    /// [`model::ServicePort::no_local_endpoints`]).
    pub no_local: [usize; 2],
    /// Service ports in the desired state.
    pub services: usize,
    /// Distinct backends (address, port) in the desired state.
    pub endpoints: usize,
    /// Frontends whose owner changed: the service port owning it now.
    pub owners: Vec<(FrontendKey, Option<Arc<ServicePortName>>)>,
}

/// Agent limits a sync enforces on what objects ask for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `--maglev-max-table-size`: the largest Maglev table size a Service
    /// may ask for with [`model::ANNOTATION_MAGLEV_TABLE_SIZE`].
    pub maglev_max_table_size: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            maglev_max_table_size: crate::maglev::DEFAULT_MAX_ANNOTATED_SIZE,
        }
    }
}

/// Service ports (of one Service, or of a whole table) asking for a Maglev
/// table larger than `max` get the default size instead; one error per
/// Service.
pub fn cap_maglev_sizes<'a>(
    ports: impl IntoIterator<Item = &'a mut ServicePort>,
    max: u32,
) -> Vec<ModelError> {
    let mut errors: Vec<ModelError> = Vec::new();
    for port in ports {
        let Some(size) = port.maglev_table_size.filter(|s| *s > max) else {
            continue;
        };
        port.maglev_table_size = None;
        let object = format!("{}/{}", port.name.namespace, port.name.name);
        if errors.iter().any(|e| e.object == object) {
            continue;
        }
        errors.push(ModelError {
            kind: "Service",
            object,
            field: format!(
                "metadata.annotations[{}]",
                model::ANNOTATION_MAGLEV_TABLE_SIZE
            ),
            value: size.to_string(),
            reason: format!(
                "larger than --maglev-max-table-size {max}; the default table size is used"
            ),
        });
    }
    errors
}

/// The address north-south flows to remote backends are SNATed to (and
/// DSR answers from): the node's primary IPv4 address, as the Node object
/// lists it now ([`NodeContext::primary`]: its first IPv4 InternalIP, else
/// its first IPv4 ExternalIP; the per-packet path is IPv4 only).
pub fn node_address(node: &NodeContext) -> Option<Ipv4Addr> {
    node.primary_ipv4()
}

/// Backend (address, port) -> programmed frontends using it, one map per
/// family (an IPv4 key stays 6 bytes).
#[derive(Debug, Default)]
struct BackendRefs {
    v4: HashMap<(Ipv4Addr, u16), u32>,
    v6: HashMap<(Ipv6Addr, u16), u32>,
}

impl BackendRefs {
    fn with_capacity(n: usize) -> BackendRefs {
        BackendRefs {
            v4: HashMap::with_capacity(n),
            v6: HashMap::new(),
        }
    }

    fn add(&mut self, addr: IpAddr, port: u16) {
        match addr {
            IpAddr::V4(a) => *self.v4.entry((a, port)).or_default() += 1,
            IpAddr::V6(a) => *self.v6.entry((a, port)).or_default() += 1,
        }
    }

    fn release(&mut self, addr: IpAddr, port: u16) {
        fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, u32>, k: K) {
            if let Some(n) = m.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&k);
                }
            }
        }
        match addr {
            IpAddr::V4(a) => dec(&mut self.v4, (a, port)),
            IpAddr::V6(a) => dec(&mut self.v6, (a, port)),
        }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// One service port's claim on a frontend.
#[derive(Debug)]
struct Claim {
    owner: Arc<ServicePortName>,
    frontend: Frontend,
}

/// One service port's claim on a health-check port: its ready, not
/// terminating endpoints on this node.
#[derive(Debug)]
struct HealthClaim {
    owner: Arc<ServicePortName>,
    local: Vec<IpAddr>,
}

/// What one Service contributes to the desired state (one per service of
/// the cluster: 48 bytes, boxed slices sized exactly).
#[derive(Debug, Default)]
struct Contribution {
    ports: u32,
    no_local: [u32; 2],
    frontends: Box<[(FrontendKey, Arc<ServicePortName>)]>,
    health: Box<[(u16, Arc<ServicePortName>)]>,
}

/// The desired state, kept between syncs and updated per changed service.
#[derive(Debug)]
pub struct SyncState {
    /// The node context from the flags (addresses come from the Node).
    base: NodeContext,
    node: NodeContext,
    limits: Limits,
    node_errors: Vec<ModelError>,
    services: HashMap<ObjectKey, Contribution>,
    /// Frontend -> claims, sorted by owner: the first one is programmed.
    claims: HashMap<FrontendKey, Vec<Claim>>,
    /// Health-check port -> claims, sorted by owner.
    health: HashMap<u16, Vec<HealthClaim>>,
    /// Backend (address, port) -> programmed frontends using it.
    backends: BackendRefs,
    /// Services with errors -> their errors.
    errors: BTreeMap<ObjectKey, Vec<ModelError>>,
    error_count: usize,
    ports: usize,
    /// Sum of the contributions' `no_local`.
    no_local: [usize; 2],
    /// Services whose endpoints have topology hints -> a digest of what
    /// the hints chose when it was last logged (logged again only when it
    /// changes, not at every sync).
    topology_logged: HashMap<ObjectKey, u64>,
}

/// `desired` equals what is programmed at `key`: make it hold the
/// programmed backend list instead of its equal copy, so the desired and
/// the programmed tables share one allocation again (a rebuild makes new
/// lists; without this, every periodic full rebuild would leave a second
/// copy of every unchanged list until the frontend changes).
fn share_programmed(programmed: &LbTable, key: &FrontendKey, desired: &mut Frontend) {
    if let Some(p) = programmed.frontends.get(key) {
        desired.backends = p.backends.clone();
    }
}

/// The winner of a frontend before a sync touched it.
type Before = HashMap<FrontendKey, Option<(Arc<ServicePortName>, Frontend)>>;

fn key_of(svc: &ServiceInfo) -> ObjectKey {
    (svc.namespace.clone(), svc.name.clone())
}

impl SyncState {
    /// `node`: the context from the flags; the Node object's addresses are
    /// added at every full rebuild.
    pub fn new(node: NodeContext, limits: Limits) -> SyncState {
        SyncState {
            base: node.clone(),
            node,
            limits,
            node_errors: Vec::new(),
            services: HashMap::new(),
            claims: HashMap::new(),
            health: HashMap::new(),
            backends: BackendRefs::default(),
            errors: BTreeMap::new(),
            error_count: 0,
            ports: 0,
            no_local: [0; 2],
            topology_logged: HashMap::new(),
        }
    }

    /// The node context the last full rebuild used.
    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// The host interface addresses the next full rebuild uses (see
    /// [`NodeContext::host_addresses`]).
    pub fn host_addresses(&self) -> &[IpAddr] {
        &self.base.host_addresses
    }

    /// Set the host interface addresses for the next full rebuild (the
    /// caller asks for one); whether they changed.
    pub fn set_host_addresses(&mut self, addresses: Vec<IpAddr>) -> bool {
        if self.base.host_addresses == addresses {
            return false;
        }
        self.base.host_addresses = addresses;
        true
    }

    /// Apply one batch of changes: rebuild what it names, diff the touched
    /// frontends against what is programmed, apply. After an error the
    /// caller must ask for a full rebuild (the desired state moved on, the
    /// dataplane may not have).
    pub fn sync<D: Dataplane>(&mut self, dp: &mut D, batch: Batch) -> Result<Synced, D::Error> {
        match batch {
            Batch::Full { services, node } => self.full(dp, services, node.as_deref()),
            Batch::Services(list) => self.incremental(dp, list),
        }
    }

    fn full<D: Dataplane>(
        &mut self,
        dp: &mut D,
        services: Vec<ServiceInput>,
        node: Option<&k8s_openapi::api::core::v1::Node>,
    ) -> Result<Synced, D::Error> {
        let old_zone = std::mem::take(&mut self.node.zone);
        self.node = self.base.clone();
        self.node_errors = Vec::new();
        if let Some(n) = node {
            let (addresses, errs) = model::node_addresses(n);
            self.node.addresses = addresses;
            self.node_errors = errs;
            self.node.zone = model::node_zone(n);
        }
        if self.node.zone != old_zone {
            info!(
                zone = self.node.zone.as_deref().unwrap_or("<none>"),
                label = model::LABEL_ZONE,
                "node zone (for topology hints)"
            );
        }
        // The node address follows the Node object (before frontends that
        // may need it for SNAT).
        dp.set_node_address(node_address(&self.node))?;
        // Drop the old state before building the new one: one copy at a
        // time.
        // Sized once: a table that doubles while it fills holds both
        // copies for a moment (at 100,000 services, tens of MB of peak).
        self.services = HashMap::with_capacity(services.len());
        self.claims = HashMap::with_capacity(services.len());
        self.health = HashMap::new();
        let endpoints: usize = services
            .iter()
            .flat_map(|i| i.slices.iter())
            .map(|s| s.endpoints.len())
            .sum();
        self.backends = BackendRefs::with_capacity(endpoints);
        self.errors = BTreeMap::new();
        self.error_count = self.node_errors.len();
        self.ports = 0;
        self.no_local = [0; 2];
        let mut touched_health = BTreeSet::new();
        for input in services {
            let key = key_of(&input.service);
            self.add_service(key, &input, None, &mut touched_health);
        }
        let services = &self.services;
        self.topology_logged.retain(|k, _| services.contains_key(k));
        let mut keys: Vec<FrontendKey> = self.claims.keys().copied().collect();
        keys.sort_unstable();
        let mut owners = Vec::with_capacity(keys.len());
        for k in &keys {
            let Some(winner) = self.claims.get(k).and_then(|c| c.first()) else {
                continue;
            };
            for b in &winner.frontend.backends {
                self.backends.add(b.addr, b.port);
            }
            owners.push((*k, Some(winner.owner.clone())));
        }
        dp.reserve(keys.len(), self.backends.len());
        let mut removed: Vec<FrontendKey> = dp
            .programmed()
            .frontends
            .keys()
            .filter(|k| !self.claims.contains_key(k))
            .copied()
            .collect();
        removed.sort_unstable();
        // Applied in chunks (the changes never hold a second copy of the
        // whole table), removals first: they make room in a full map for
        // the upserts. A failed chunk does not stop the others (the first
        // error is returned: a full sync retries what failed).
        let mut changes = 0;
        let mut first_error = None;
        for chunk in removed.chunks(APPLY_CHUNK) {
            let batch: Vec<Change> = chunk.iter().map(|k| Change::Remove(*k)).collect();
            changes += batch.len();
            if let Err(e) = self.apply(dp, &batch) {
                first_error.get_or_insert(e);
            }
        }
        for chunk in keys.chunks(APPLY_CHUNK) {
            let programmed = dp.programmed();
            let mut batch: Vec<Change> = Vec::new();
            for k in chunk {
                let Some(w) = self.claims.get_mut(k).and_then(|c| c.first_mut()) else {
                    continue;
                };
                match diff_one(programmed, *k, Some(&w.frontend)) {
                    Some(c) => batch.push(c),
                    None => share_programmed(programmed, k, &mut w.frontend),
                }
            }
            changes += batch.len();
            if let Err(e) = self.apply(dp, &batch) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let health = touched_health
            .into_iter()
            .map(|p| (p, self.health_of(p)))
            .collect();
        Ok(Synced {
            full: true,
            changes,
            health,
            errors: Some(self.errors()),
            error_count: self.error_count,
            no_local: self.no_local,
            services: self.ports,
            endpoints: self.backends.len(),
            owners,
        })
    }

    fn incremental<D: Dataplane>(
        &mut self,
        dp: &mut D,
        list: Vec<(ObjectKey, Option<ServiceInput>)>,
    ) -> Result<Synced, D::Error> {
        let mut before: Before = HashMap::new();
        let mut touched_health = BTreeSet::new();
        let mut errors_changed = false;
        for (key, input) in list {
            let old_errors = self.remove_service(&key, &mut before, &mut touched_health);
            match input {
                Some(input) => {
                    self.add_service(key.clone(), &input, Some(&mut before), &mut touched_health)
                }
                None => {
                    self.topology_logged.remove(&key);
                }
            }
            errors_changed |= self.errors.get(&key) != old_errors.as_ref();
        }
        let programmed = dp.programmed();
        let mut keys: Vec<FrontendKey> = before.keys().copied().collect();
        keys.sort_unstable();
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        let mut owners = Vec::new();
        for k in keys {
            let old = before.remove(&k).flatten();
            let mut new = self.claims.get_mut(&k).and_then(|c| c.first_mut());
            let change = diff_one(programmed, k, new.as_deref().map(|n| &n.frontend));
            if change.is_none()
                && let Some(n) = new.as_deref_mut()
            {
                share_programmed(programmed, &k, &mut n.frontend);
            }
            let new = new.as_deref();
            if old.as_ref().map(|o| &o.0) != new.map(|n| &n.owner) {
                owners.push((k, new.map(|n| n.owner.clone())));
            }
            if old.as_ref().map(|o| &o.1) != new.map(|n| &n.frontend) {
                if let Some((_, f)) = &old {
                    for b in &f.backends {
                        self.backends.release(b.addr, b.port);
                    }
                }
                if let Some(n) = new {
                    for b in &n.frontend.backends {
                        self.backends.add(b.addr, b.port);
                    }
                }
            }
            match change {
                Some(c @ Change::Upsert(..)) => upserts.push(c),
                Some(c) => removes.push(c),
                None => {}
            }
        }
        upserts.extend(removes);
        let changes = upserts;
        let health = touched_health
            .into_iter()
            .map(|p| (p, self.health_of(p)))
            .collect();
        self.apply(dp, &changes)?;
        Ok(Synced {
            full: false,
            changes: changes.len(),
            health,
            errors: errors_changed.then(|| self.errors()),
            error_count: self.error_count,
            no_local: self.no_local,
            services: self.ports,
            endpoints: self.backends.len(),
            owners,
        })
    }

    fn apply<D: Dataplane>(&self, dp: &mut D, changes: &[Change]) -> Result<(), D::Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let stats = dp.apply(changes)?;
        info!(
            changes = changes.len(),
            upserted = stats.upserted,
            removed = stats.removed,
            backends_added = stats.backends_added,
            backends_removed = stats.backends_removed,
            "synced"
        );
        Ok(())
    }

    /// Remember a frontend's winner before the first change to its claims.
    fn touch(before: &mut Before, claims: &HashMap<FrontendKey, Vec<Claim>>, k: FrontendKey) {
        before.entry(k).or_insert_with(|| {
            claims
                .get(&k)
                .and_then(|c| c.first())
                .map(|c| (c.owner.clone(), c.frontend.clone()))
        });
    }

    /// Take a service's contribution out; returns its errors.
    fn remove_service(
        &mut self,
        key: &ObjectKey,
        before: &mut Before,
        touched_health: &mut BTreeSet<u16>,
    ) -> Option<Vec<ModelError>> {
        let errors = self.errors.remove(key);
        self.error_count -= errors.as_ref().map_or(0, Vec::len);
        let contribution = self.services.remove(key)?;
        self.ports -= contribution.ports as usize;
        for (total, n) in self
            .no_local
            .iter_mut()
            .zip(contribution.no_local.map(|n| n as usize))
        {
            *total -= n;
        }
        for (k, owner) in contribution.frontends.into_vec() {
            Self::touch(before, &self.claims, k);
            if let Some(list) = self.claims.get_mut(&k) {
                list.retain(|c| c.owner != owner);
                if list.is_empty() {
                    self.claims.remove(&k);
                }
            }
        }
        for (port, owner) in contribution.health.into_vec() {
            touched_health.insert(port);
            if let Some(list) = self.health.get_mut(&port) {
                list.retain(|c| c.owner != owner);
                if list.is_empty() {
                    self.health.remove(&port);
                }
            }
        }
        errors
    }

    /// Build one service and add what it contributes.
    fn add_service(
        &mut self,
        key: ObjectKey,
        input: &ServiceInput,
        mut before: Option<&mut Before>,
        touched_health: &mut BTreeSet<u16>,
    ) {
        let mut errors = Vec::new();
        let slices: Vec<&SliceInfo> = input.slices.iter().map(|s| s.as_ref()).collect();
        let mut ports = model::build_service(&input.service, &slices, &self.node, &mut errors);
        errors.extend(cap_maglev_sizes(
            ports.iter_mut(),
            self.limits.maglev_max_table_size,
        ));
        self.log_topology(&key, &ports);
        let mut no_local = [0u32; 2];
        let mut contributed = Vec::new();
        let mut health = Vec::new();
        self.ports += ports.len();
        for sp in &ports {
            for (i, n) in sp.no_local_endpoints().into_iter().enumerate() {
                no_local[i] += n as u32;
                self.no_local[i] += n;
            }
            let owner = Arc::new(sp.name.clone());
            let frontends = lb::port_frontends(sp, &self.node);
            contributed.reserve_exact(frontends.len());
            for (k, frontend) in frontends {
                if let Some(b) = before.as_deref_mut() {
                    Self::touch(b, &self.claims, k);
                }
                let list = self.claims.entry(k).or_default();
                let at = list.partition_point(|c| c.owner < owner);
                // Most frontends have one claim: room for exactly that
                // (a first push would make room for 4, 216 bytes unused
                // per frontend).
                list.reserve_exact(1);
                list.insert(
                    at,
                    Claim {
                        owner: owner.clone(),
                        frontend,
                    },
                );
                contributed.push((k, owner.clone()));
            }
            if let Some(port) = sp.health_check_node_port {
                let mut local: Vec<IpAddr> = sp
                    .endpoints
                    .iter()
                    .filter(|e| e.local && e.ready && !e.terminating)
                    .map(|e| e.ip)
                    .collect();
                local.dedup();
                let list = self.health.entry(port).or_default();
                let at = list.partition_point(|c| c.owner < owner);
                list.insert(
                    at,
                    HealthClaim {
                        owner: owner.clone(),
                        local,
                    },
                );
                health.push((port, owner.clone()));
                touched_health.insert(port);
            }
        }
        if !errors.is_empty() {
            self.error_count += errors.len();
            self.errors.insert(key.clone(), errors);
        }
        if !ports.is_empty() {
            let contribution = Contribution {
                ports: ports.len() as u32,
                no_local,
                frontends: contributed.into_boxed_slice(),
                health: health.into_boxed_slice(),
            };
            self.services.insert(key, contribution);
        }
    }

    /// Log what the topology hints of a service choose, once per change:
    /// info when they are given but ignored here (and why), debug when
    /// they are used.
    fn log_topology(&mut self, key: &ObjectKey, ports: &[ServicePort]) {
        use std::hash::{Hash, Hasher};
        let notes: Vec<(&ServicePortName, &'static str, model::Topology)> = ports
            .iter()
            .flat_map(|p| {
                ["IPv4", "IPv6"]
                    .into_iter()
                    .zip(p.topology)
                    .filter(|(_, t)| *t != model::Topology::Any)
                    .map(move |(f, t)| (&p.name, f, t))
            })
            .collect();
        if notes.is_empty() {
            if self.topology_logged.remove(key).is_some() {
                debug!(service = %format_args!("{}/{}", key.0, key.1), "topology hints no longer used");
            }
            return;
        }
        let mut h = std::hash::DefaultHasher::new();
        notes.hash(&mut h);
        let digest = h.finish();
        if self.topology_logged.insert(key.clone(), digest) == Some(digest) {
            return;
        }
        for (name, family, t) in notes {
            let distribution = ports
                .iter()
                .find(|p| &p.name == name)
                .and_then(|p| p.traffic_distribution)
                .map_or("<unset>", model::TrafficDistribution::as_str);
            match t.ignored_because() {
                Some(reason) => info!(
                    service = %name,
                    family,
                    traffic_distribution = distribution,
                    zone = self.node.zone.as_deref().unwrap_or("<none>"),
                    reason,
                    "topology hints ignored; every endpoint is used"
                ),
                None => debug!(
                    service = %name,
                    family,
                    traffic_distribution = distribution,
                    topology = ?t,
                    "topology hints used"
                ),
            }
        }
    }

    /// What a health-check port reports: named after its first claimant,
    /// counting the distinct local ready endpoints of all of them.
    fn health_of(&self, port: u16) -> Option<ServiceHealth> {
        let claims = self.health.get(&port)?;
        let first = claims.first()?;
        let mut ips: Vec<IpAddr> = claims
            .iter()
            .flat_map(|c| c.local.iter().copied())
            .collect();
        ips.sort_unstable();
        ips.dedup();
        Some(ServiceHealth {
            namespace: first.owner.namespace.clone(),
            name: first.owner.name.clone(),
            local_endpoints: ips.len(),
        })
    }

    /// Every current error: the Node's, then each service's.
    pub fn errors(&self) -> Vec<ModelError> {
        self.node_errors
            .iter()
            .chain(self.errors.values().flatten())
            .cloned()
            .collect()
    }

    /// The desired table (frontends and owners). Walks everything: for
    /// tests and inspection, not for the sync path.
    pub fn desired(&self) -> LbTable {
        let mut t = LbTable::default();
        for (k, c) in &self.claims {
            if let Some(w) = c.first() {
                t.frontends.insert(*k, w.frontend.clone());
                t.owners.insert(*k, (*w.owner).clone());
            }
        }
        t
    }

    /// What every health-check port reports. Walks every port: for tests.
    pub fn health(&self) -> BTreeMap<u16, ServiceHealth> {
        self.health
            .keys()
            .filter_map(|p| self.health_of(*p).map(|h| (*p, h)))
            .collect()
    }

    /// Service ports in the desired state.
    pub fn services(&self) -> usize {
        self.ports
    }

    /// Distinct backends (address, port) of the programmed frontends.
    pub fn endpoints(&self) -> usize {
        self.backends.len()
    }
}

/// What [`run`] needs besides the dataplane and the stores.
pub struct RunOptions {
    /// kube-proxy's `syncPeriod`: sets when `/healthz` calls the agent
    /// stale (a change queued for 2x as long).
    pub sync_period: Duration,
    /// How often the whole desired state is rebuilt from the cache when
    /// nothing asked for it ([`FULL_SYNC_PERIOD`]).
    pub full_sync_period: Duration,
    pub telemetry: Arc<Telemetry>,
    /// Kubernetes Events for objects that cannot be programmed.
    pub events: Option<EventRecorder>,
    pub limits: Limits,
}

/// The dataplane's map events since the last call: logged, counted and
/// posted as Warning Events on the Node as [`PressureWatch`] decides.
fn report_pressure<D: Dataplane>(
    watch: &mut PressureWatch,
    dp: &mut D,
    telemetry: &Telemetry,
    events: Option<&mut EventRecorder>,
) {
    let map_events = dp.take_map_events();
    if map_events.is_empty() {
        return;
    }
    let warnings = watch.observe(map_events, std::time::Instant::now());
    for w in &warnings {
        telemetry.map_warning(w.map, w.reason);
    }
    if let Some(ev) = events {
        for w in warnings {
            ev.warn_node(w.reason, w.message);
        }
    }
}

/// With `--nodeport-addresses` CIDRs: read the host's interface addresses
/// and, when those inside the CIDRs changed, hand them to the state and ask
/// for a full rebuild (NodePorts follow addresses added and removed at run
/// time). `failing`: the last read failed (logged once until it works).
fn refresh_host_addresses(state: &mut SyncState, stores: &Stores, failing: &mut bool) {
    let nodeport = &state.base.nodeport;
    if !nodeport.uses_host_addresses() {
        return;
    }
    let all = match crate::host::interface_addresses() {
        Ok(all) => {
            *failing = false;
            all
        }
        Err(e) => {
            if !std::mem::replace(failing, true) {
                warn!(error = %e, "reading the interface addresses; NodePorts stay where they are");
            }
            return;
        }
    };
    let used = nodeport.host_addresses_used(&all);
    let old = state.host_addresses();
    let added: Vec<&IpAddr> = used.iter().filter(|a| !old.contains(a)).collect();
    let removed: Vec<&IpAddr> = old.iter().filter(|a| !used.contains(a)).collect();
    if added.is_empty() && removed.is_empty() {
        return;
    }
    info!(
        nodeport_addresses = %nodeport,
        ?added,
        ?removed,
        now = ?used,
        "NodePort addresses changed on the host's interfaces; full rebuild"
    );
    state.set_host_addresses(used);
    stores.request_full();
}

/// Run until `shutdown` resolves.
pub async fn run<D: Dataplane>(
    mut dp: D,
    stores: Stores,
    changed: Arc<Notify>,
    node: NodeContext,
    mut opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = SyncState::new(node, opts.limits);
    let mut failed = false;
    let mut first_synced = false;
    let mut last_full = Instant::now();
    let mut last_start: Option<Instant> = None;
    let mut health_servers = HealthServers::default();
    let mut problems = std::collections::HashSet::new();
    let mut pressure = PressureWatch::default();
    // The last failed sync's error: a failure repeating itself (a full
    // map, retried every second) is logged at debug.
    let mut last_failure: Option<String> = None;
    let telemetry = opts.telemetry.clone();
    telemetry.set_reader(dp.stats_reader());
    let wh = stores.watch_health.clone();
    telemetry.set_pending_source(Box::new(move || wh.stale_since()));
    let st = stores.clone();
    telemetry.set_change_source(Box::new(move || st.change_counts()));
    let mut host_error = false;
    refresh_host_addresses(&mut state, &stores, &mut host_error);
    stores.request_full();
    loop {
        // Every change queued so far is in the batch taken next.
        stores.watch_health.take_pending();
        if let Some((batch, trigger_times)) = stores.take() {
            let start = Instant::now();
            last_start = Some(start);
            let full = matches!(batch, Batch::Full { .. });
            if full {
                last_full = start;
            }
            failed = match state.sync(&mut dp, batch) {
                Ok(mut s) => {
                    if s.changes > 0 {
                        info!(
                            elapsed_ms = start.elapsed().as_millis() as u64,
                            full, "sync done"
                        );
                    }
                    let owners = OwnerChanges {
                        reset: s.full,
                        changes: std::mem::take(&mut s.owners),
                    };
                    telemetry.sync_succeeded(start.elapsed(), s.services, s.endpoints, owners);
                    telemetry.programmed(&trigger_times);
                    telemetry.set_invalid_objects(s.error_count);
                    telemetry.set_no_local_endpoints(s.no_local[0], s.no_local[1]);
                    if let Some(errors) = &s.errors {
                        // Warn once per problem while it lasts; debug when
                        // a later sync lists it again.
                        let now_problems: std::collections::HashSet<String> =
                            errors.iter().map(|e| e.to_string()).collect();
                        for e in errors {
                            if problems.contains(&e.to_string()) {
                                debug!(kind = e.kind, object = %e.object, field = %e.field, value = %e.value, reason = %e.reason, "cannot program object");
                            } else {
                                warn!(kind = e.kind, object = %e.object, field = %e.field, value = %e.value, reason = %e.reason, "cannot program object");
                            }
                        }
                        problems = now_problems;
                        if let Some(ev) = opts.events.as_mut() {
                            ev.report(errors);
                        }
                    }
                    pressure.sync_succeeded();
                    last_failure = None;
                    health_servers.update(s.full, s.health).await;
                    if s.full && !first_synced {
                        first_synced = true;
                        crate::memory::log("first sync done");
                    }
                    false
                }
                Err(e) => {
                    telemetry.sync_failed(start.elapsed());
                    let msg = e.to_string();
                    if last_failure.as_ref() == Some(&msg) {
                        debug!(error = %e, "sync failed again; a full sync follows on the next event or tick");
                    } else {
                        warn!(error = %e, "sync failed; a full sync follows on the next event or tick");
                    }
                    last_failure = Some(msg);
                    stores.request_full();
                    true
                }
            };
            report_pressure(&mut pressure, &mut dp, &telemetry, opts.events.as_mut());
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = changed.notified() => {
                // Bounded frequency: at once when idle, batched in a burst.
                if let Some(next) = last_start.map(|s| s + MIN_SYNC_INTERVAL)
                    && Instant::now() < next
                {
                    tokio::time::sleep_until(next).await;
                }
                if failed {
                    stores.request_full();
                }
            }
            _ = tick.tick() => {
                if let Err(e) = dp.housekeeping() {
                    telemetry.error("housekeeping", 1);
                    warn!(error = %e, "housekeeping failed");
                }
                report_pressure(&mut pressure, &mut dp, &telemetry, opts.events.as_mut());
                refresh_host_addresses(&mut state, &stores, &mut host_error);
                // A full rebuild after a failed sync, and once per
                // `full_sync_period` (kube-proxy's FullSyncPeriod); the
                // sync period itself only bounds how long a queued change
                // may wait (`/healthz`): syncs are incremental.
                if failed || last_full.elapsed() >= opts.full_sync_period {
                    stores.request_full();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePort, ServicePortName, ServiceTable, ServiceType};

    fn port(name: &str, port: &str, size: Option<u32>) -> (ServicePortName, ServicePort) {
        let n = ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: port.into(),
            protocol: Protocol::Tcp,
        };
        let mut p = crate::model::test_port(&[]);
        p.name = n.clone();
        p.service_type = ServiceType::NodePort;
        p.cluster_ips = vec![];
        p.node_port = Some(30080);
        p.maglev_table_size = size;
        (n, p)
    }

    /// One of these per service of the cluster: kept small.
    #[test]
    fn a_contribution_stays_small() {
        assert!(std::mem::size_of::<Contribution>() <= 48);
    }

    #[test]
    fn maglev_sizes_above_the_flag_are_reported_once_per_service_and_dropped() {
        let mut t = ServiceTable::default();
        t.services.extend([
            port("big", "http", Some(65_537)),
            port("big", "https", Some(65_537)),
            port("ok", "", Some(251)),
        ]);
        let errors = cap_maglev_sizes(t.services.values_mut(), 16_381);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.object, "default/big");
        assert_eq!(
            e.field,
            "metadata.annotations[kube-proxy-ebpf.io/maglev-table-size]"
        );
        assert_eq!(e.value, "65537");
        assert!(e.reason.contains("--maglev-max-table-size 16381"), "{e:?}");
        let sizes: Vec<Option<u32>> = t.services.values().map(|p| p.maglev_table_size).collect();
        assert_eq!(sizes, vec![None, None, Some(251)], "default size instead");
        // At the limit is fine.
        let mut t = ServiceTable::default();
        t.services.extend([port("edge", "", Some(16_381))]);
        assert!(cap_maglev_sizes(t.services.values_mut(), 16_381).is_empty());
    }

    #[test]
    fn the_node_address_is_the_nodes_primary_ipv4_internal_before_external() {
        let n: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "node1"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "192.0.2.1"},
                {"type": "InternalIP", "address": "fd00:18::3"},
                {"type": "Hostname", "address": "node1"},
                {"type": "InternalIP", "address": "172.18.0.3"},
                {"type": "InternalIP", "address": "172.18.0.4"},
            ]}
        }))
        .expect("node");
        let node = NodeContext {
            addresses: model::node_addresses(&n).0,
            ..Default::default()
        };
        assert_eq!(
            node_address(&node),
            Some(std::net::Ipv4Addr::new(172, 18, 0, 3))
        );
        assert_eq!(node_address(&NodeContext::default()), None);
        // A loopback address is never the node address.
        let lo = NodeContext {
            addresses: vec![std::net::Ipv4Addr::LOCALHOST.into()],
            ..Default::default()
        };
        assert_eq!(node_address(&lo), None);
    }
}
