//! The incremental sync equals a full rebuild, after every event.
//!
//! A seeded generator produces random watch events (Services created,
//! updated and deleted with every type, ports, conflicting frontends, bad
//! addresses and ports, affinity, traffic policies, source ranges, the
//! Maglev annotation, headless and foreign-proxy labels; EndpointSlices
//! created, changed, split and merged, moved between services by their
//! label, unlabelled and deleted, with and without topology hints (some
//! for this node or its zone, some bad); Node address and zone label
//! changes; addresses appearing on and leaving the host's interfaces, as
//! the agent's housekeeping hands them over; relists) and feeds
//! them one at a time through the cache and change tracker into
//! [`SyncState`], which programs a recording fake dataplane. After every
//! step the incremental state must equal a rebuild from scratch of the
//! same objects (kept by the test, not read back from the cache):
//! frontends and owners, what is programmed, errors, health-check ports,
//! counts, and the owner map `/metrics` keeps from the deltas. The fake
//! dataplane also refuses some batches, as a real one can, to exercise the
//! recovery (a full rebuild follows). `--nodeport-addresses` varies by
//! seed: unset, `primary` (seeds 3 mod 4) or CIDRs (loopback included).
//!
//! Seeds: `INCREMENTAL_SEEDS=1,2,3` (default four fixed seeds); steps per
//! seed: `INCREMENTAL_STEPS` (default 1500). A failure prints the seed and
//! step.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus,
            Service, ServicePort, ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{EndpointConditions, EndpointPort},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher::Event;
use proxy::{
    agent::{self, Limits, SyncState},
    changes::Cache,
    dataplane::{ApplyStats, Dataplane},
    diff::Change,
    health,
    lb::{Backends, LbTable},
    metrics::{OwnerChanges, Telemetry},
    model::{
        self, EndpointView, HintName, HintsView, NodeContext, NodePortAddresses, SliceView,
        Topology,
    },
};

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const SERVICES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
const SLICES: [&str; 8] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"];
const NODE: &str = "node1";

// --- a recording dataplane ---------------------------------------------------

#[derive(Default)]
struct Recorder {
    programmed: LbTable,
    node_address: Option<Ipv4Addr>,
    /// Refuse the next batch (before applying any of it).
    fail_next: bool,
    /// Hold at most this many frontends: a new one beyond it is refused
    /// (the others of the batch still apply), as a full map does.
    capacity: Option<usize>,
}

impl Dataplane for Recorder {
    type Error = std::io::Error;

    fn mode(&self) -> &'static str {
        "recorder"
    }

    fn programmed(&self) -> &LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, Self::Error> {
        if std::mem::take(&mut self.fail_next) {
            return Err(std::io::Error::other("refused on purpose"));
        }
        let mut stats = ApplyStats::default();
        let mut full = None;
        for c in changes {
            match c {
                Change::Upsert(k, _)
                    if !self.programmed.frontends.contains_key(k)
                        && self
                            .capacity
                            .is_some_and(|n| self.programmed.frontends.len() >= n) =>
                {
                    full.get_or_insert_with(|| std::io::Error::other(format!("full: {k}")));
                }
                Change::Upsert(k, f) => {
                    assert_ne!(
                        self.programmed.frontends.get(k),
                        Some(f),
                        "upsert of {k} changes nothing"
                    );
                    self.programmed.frontends.insert(*k, f.clone());
                    stats.upserted += 1;
                }
                Change::Remove(k) => {
                    assert!(
                        self.programmed.frontends.remove(k).is_some(),
                        "remove of {k}, which is not programmed"
                    );
                    stats.removed += 1;
                }
            }
        }
        match full {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    fn set_node_address(&mut self, addr: Option<Ipv4Addr>) -> Result<(), Self::Error> {
        self.node_address = addr;
        Ok(())
    }

    fn housekeeping(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

// --- random objects ----------------------------------------------------------

fn ip_pool(rng: &mut Rng) -> String {
    rng.pick(&[
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.3",
        "10.96.0.4",
        "192.0.2.10",
        "192.0.2.11",
        "10.0.0.1", // also a node address: clashes with NodePorts
        "fd00::1",
        "fd00::2",
        "fd00:18::1", // a node address too
        "300.1.1.1",
    ])
    .to_string()
}

fn random_service(rng: &mut Rng, topo: &mut Rng, ns: &str, name: &str) -> Service {
    let type_ = rng
        .pick(&[
            Some("ClusterIP"),
            None,
            Some("NodePort"),
            Some("LoadBalancer"),
            Some("LoadBalancer"),
            Some("ExternalName"),
            Some("Bogus"),
        ])
        .map(str::to_owned);
    let cluster_ip = if rng.chance(8) {
        "None".to_owned()
    } else {
        ip_pool(rng)
    };
    let cluster_ips = if rng.chance(30) {
        // Dual stack (or two addresses of one family, which the API server
        // refuses but the model must survive).
        Some(vec![
            cluster_ip.clone(),
            rng.pick(&["fd00::10", "fd00::1", "10.96.0.9"]).to_string(),
        ])
    } else {
        None
    };
    let mut ports = Vec::new();
    for _ in 0..1 + rng.below(2) {
        ports.push(ServicePort {
            name: rng
                .pick(&[None, Some("http"), Some("dns")])
                .map(str::to_owned),
            port: *rng.pick(&[80, 80, 443, 53, 0, 70_000]),
            protocol: rng
                .pick(&[None, Some("TCP"), Some("UDP"), Some("ICMP")])
                .map(str::to_owned),
            node_port: *rng.pick(&[None, Some(30080), Some(30081), Some(70_000)]),
            ..Default::default()
        });
    }
    let local = rng.chance(40);
    let mut annotations = BTreeMap::new();
    if rng.chance(30) {
        annotations.insert(
            model::ANNOTATION_MAGLEV_TABLE_SIZE.to_owned(),
            rng.pick(&["61", "251", "509", "12", "x"]).to_string(),
        );
    }
    let mut labels = BTreeMap::new();
    if rng.chance(5) {
        labels.insert(model::LABEL_HEADLESS.to_owned(), String::new());
    }
    if rng.chance(5) {
        labels.insert(model::LABEL_SERVICE_PROXY_NAME.to_owned(), "other".into());
    }
    let mut svc = Service {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: (!labels.is_empty()).then_some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_,
            cluster_ip: Some(cluster_ip),
            cluster_ips,
            ports: Some(ports),
            external_ips: rng.chance(25).then(|| vec![ip_pool(rng)]),
            session_affinity: rng.chance(30).then(|| "ClientIP".to_owned()),
            session_affinity_config: rng.chance(50).then(|| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: *rng.pick(&[None, Some(30), Some(0), Some(100_000)]),
                }),
            }),
            external_traffic_policy: Some(if local { "Local" } else { "Cluster" }.into()),
            internal_traffic_policy: rng.chance(25).then(|| "Local".to_owned()),
            health_check_node_port: *rng.pick(&[None, Some(32000), Some(32001), Some(99_999)]),
            traffic_distribution: topo
                .pick(&[None, None, Some("PreferClose"), Some("PreferSameNode")])
                .map(str::to_owned),
            load_balancer_source_ranges: rng.chance(30).then(|| {
                vec![
                    rng.pick(&[
                        "10.0.0.0/8",
                        "192.0.2.0/24",
                        "bad",
                        "fd00::/8",
                        "fd00:1::/129",
                    ])
                    .to_string(),
                ]
            }),
            ..Default::default()
        }),
        status: rng.chance(60).then(|| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip_pool(rng)),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }),
    };
    model::trim_service(&mut svc);
    svc
}

fn random_slice(rng: &mut Rng, topo: &mut Rng, ns: &str, name: &str) -> SliceView {
    let mut labels = BTreeMap::new();
    if !rng.chance(10) {
        labels.insert(
            model::LABEL_SERVICE_NAME.to_owned(),
            rng.pick(&SERVICES).to_string(),
        );
    }
    let mut ports = Vec::new();
    for _ in 0..1 + rng.below(2) {
        ports.push(EndpointPort {
            name: rng
                .pick(&[None, Some("http"), Some("dns")])
                .map(str::to_owned),
            port: *rng.pick(&[Some(8080), Some(9090), None, Some(70_000)]),
            protocol: rng.pick(&[None, Some("UDP")]).map(str::to_owned),
            ..Default::default()
        });
    }
    // Both families (dual-stack services read one slice of each); now and
    // then an address of the other family or garbage, to be reported.
    let address_type = rng
        .pick(&["IPv4", "IPv4", "IPv6", "IPv6", "FQDN"])
        .to_string();
    let mut endpoints = Vec::new();
    // Slices carry topology hints (as the EndpointSlice controller writes
    // them for trafficDistribution or topology-mode Auto), most of those
    // of s0 and s1, few of the others; now and then one endpoint of such a
    // slice lacks them, or has a bad one.
    let for_topology = matches!(
        labels.get(model::LABEL_SERVICE_NAME).map(String::as_str),
        Some("s0" | "s1")
    );
    let hinted = topo.chance(if for_topology { 90 } else { 60 });
    for _ in 0..rng.below(4) {
        let v4 = format!("10.244.{}.{}", rng.below(2), 1 + rng.below(5));
        let v6 = format!("fd00:244:{}::{}", rng.below(2), 1 + rng.below(5));
        let addr = if rng.chance(5) {
            "bogus".to_owned()
        } else if (address_type == "IPv6") != rng.chance(5) {
            v6
        } else {
            v4
        };
        endpoints.push(EndpointView {
            addresses: vec![addr],
            conditions: rng.chance(80).then(|| EndpointConditions {
                ready: *rng.pick(&[None, Some(true), Some(true), Some(false)]),
                serving: *rng.pick(&[None, Some(true), Some(false)]),
                terminating: *rng.pick(&[None, Some(false), Some(true)]),
            }),
            node_name: rng
                .pick(&[Some(NODE), Some("node2"), None])
                .map(str::to_owned),
            hints: (hinted && !topo.chance(5)).then(|| Box::new(random_hints(topo))),
        });
    }
    let mut s = SliceView {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: Some(labels),
            ..Default::default()
        },
        service: None,
        trigger_time: None,
        address_type,
        ports: Some(ports),
        endpoints,
    };
    model::trim_slice(&mut s);
    s
}

fn random_hints(rng: &mut Rng) -> HintsView {
    let zones: [&[&str]; 4] = [&["a"], &["b"], &["a", "c"], &["c"]];
    let nodes: [&[&str]; 4] = [&[], &[], &[NODE], &["node2"]];
    let (z, n) = (*rng.pick(&zones), *rng.pick(&nodes));
    let mut h = HintsView::new(z, n);
    if rng.chance(3) {
        h.for_zones.push(HintName {
            name: rng.pick(&[None, Some("")]).map(str::to_owned),
        });
    }
    h
}

fn random_node(rng: &mut Rng, topo: &mut Rng) -> Node {
    let mut addresses = Vec::new();
    for _ in 0..rng.below(3) {
        addresses.push(NodeAddress {
            address: rng
                .pick(&[
                    "10.0.0.1",
                    "10.0.0.2",
                    "192.0.2.1",
                    "fd00:18::1",
                    "fd00::1",
                    "bogus",
                ])
                .to_string(),
            type_: rng
                .pick(&["InternalIP", "ExternalIP", "Hostname"])
                .to_string(),
        });
    }
    let zone = topo.pick(&[None, Some("a"), Some("b"), Some("")]);
    let mut n = Node {
        metadata: ObjectMeta {
            name: Some(NODE.into()),
            labels: zone.map(|z| {
                BTreeMap::from([
                    (model::LABEL_ZONE.to_owned(), z.to_owned()),
                    ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                ])
            }),
            ..Default::default()
        },
        status: Some(NodeStatus {
            addresses: Some(addresses),
            ..Default::default()
        }),
        ..Default::default()
    };
    model::trim_node(&mut n);
    n
}

// --- the world and the oracle ------------------------------------------------

#[derive(Default)]
struct World {
    services: BTreeMap<(String, String), Service>,
    slices: BTreeMap<(String, String), SliceView>,
    node: Option<Node>,
    /// The host's interface addresses.
    host: Vec<IpAddr>,
}

/// Addresses the host's interfaces may hold.
const HOST_ADDRESSES: [&str; 6] = [
    "10.0.0.1",
    "10.0.0.7",
    "192.0.2.9",
    "127.0.0.1",
    "fd00:18::7",
    "::1",
];

/// One random event, applied to the world and handed to the cache.
/// `topo` draws the topology parts (hints, trafficDistribution, the
/// Node's zone): the other draws stay those of the seed without them.
fn step(rng: &mut Rng, topo: &mut Rng, world: &mut World, cache: &mut Cache) -> String {
    let ns = rng.pick(&NAMESPACES).to_string();
    match rng.below(100) {
        0..=29 => {
            let name = rng.pick(&SERVICES).to_string();
            let s = random_service(rng, topo, &ns, &name);
            world.services.insert((ns.clone(), name.clone()), s.clone());
            cache.service_event(Event::Apply(s));
            format!("apply service {ns}/{name}")
        }
        30..=37 => {
            let name = rng.pick(&SERVICES).to_string();
            match world.services.remove(&(ns.clone(), name.clone())) {
                Some(s) => {
                    cache.service_event(Event::Delete(s));
                    format!("delete service {ns}/{name}")
                }
                None => "nothing".into(),
            }
        }
        38..=77 => {
            let name = rng.pick(&SLICES).to_string();
            let s = random_slice(rng, topo, &ns, &name);
            let what = format!("apply slice {ns}/{name} -> {:?}", s.service_name());
            world.slices.insert((ns, name), s.clone());
            cache.slice_event(Event::Apply(s));
            what
        }
        78..=89 => {
            let name = rng.pick(&SLICES).to_string();
            match world.slices.remove(&(ns.clone(), name.clone())) {
                Some(mut s) => {
                    // A delete event may carry a stale label.
                    if rng.chance(30) {
                        s.service = Some(rng.pick(&SERVICES).to_string());
                    }
                    cache.slice_event(Event::Delete(s));
                    format!("delete slice {ns}/{name}")
                }
                None => "nothing".into(),
            }
        }
        90..=94 => {
            let n = random_node(rng, topo);
            world.node = Some(n.clone());
            cache.node_event(Event::Apply(n));
            "node addresses and zone".into()
        }
        95..=96 => {
            cache.service_event(Event::Init);
            for s in world.services.values() {
                cache.service_event(Event::InitApply(s.clone()));
            }
            cache.service_event(Event::InitDone);
            "relist services".into()
        }
        _ => {
            cache.slice_event(Event::Init);
            for s in world.slices.values() {
                cache.slice_event(Event::InitApply(s.clone()));
            }
            cache.slice_event(Event::InitDone);
            "relist slices".into()
        }
    }
}

struct Oracle {
    lb: LbTable,
    errors: Vec<String>,
    health: BTreeMap<u16, health::ServiceHealth>,
    services: usize,
    endpoints: usize,
    /// kube-proxy's no-local-endpoints counts, [internal, external].
    no_local: [usize; 2],
    /// Service ports whose hints choose endpoints here, and those whose
    /// hints are ignored (coverage).
    topology_used: usize,
    topology_ignored: usize,
}

fn oracle(world: &World, base: &NodeContext, limits: &Limits) -> Oracle {
    let mut node = base.clone();
    let mut errors = Vec::new();
    if let Some(n) = &world.node {
        let (addresses, errs) = model::node_addresses(n);
        node.addresses = addresses;
        node.zone = model::node_zone(n);
        errors.extend(errs);
    }
    node.host_addresses = base.nodeport.host_addresses_used(&world.host);
    let (mut table, errs) = model::build(world.services.values(), world.slices.values(), &node);
    errors.extend(errs);
    errors.extend(agent::cap_maglev_sizes(
        table.services.values_mut(),
        limits.maglev_max_table_size,
    ));
    let lb = LbTable::from_services(&table, &node);
    let endpoints: BTreeSet<(IpAddr, u16)> = lb
        .frontends
        .values()
        .flat_map(|f| f.backends.iter().map(|b| (b.addr, b.port)))
        .collect();
    let mut errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    errors.sort();
    let mut no_local = [0; 2];
    for sp in table.services.values() {
        for (total, n) in no_local.iter_mut().zip(sp.no_local_endpoints()) {
            *total += n;
        }
    }
    let topologies = || table.services.values().flat_map(|p| p.topology);
    Oracle {
        no_local,
        topology_used: topologies()
            .filter(|t| matches!(t, Topology::SameNode | Topology::SameZone))
            .count(),
        topology_ignored: topologies()
            .filter(|t| t.ignored_because().is_some())
            .count(),
        health: health::desired(&table),
        services: table.services.len(),
        endpoints: endpoints.len(),
        lb,
        errors,
    }
}

/// The same allocation (not only equal contents).
fn same_list(a: &Backends, b: &Backends) -> bool {
    match (a, b) {
        (Backends::V4(a), Backends::V4(b)) => std::sync::Arc::ptr_eq(a, b),
        (Backends::Any(a), Backends::Any(b)) => std::sync::Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn seeds() -> Vec<u64> {
    std::env::var("INCREMENTAL_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3, 0x5eed])
}

fn steps() -> usize {
    std::env::var("INCREMENTAL_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500)
}

/// Runs one seed; Ok: in how many syncs a Local policy (internal,
/// external) found no local endpoint (coverage of that count).
fn run_seed(seed: u64, steps: usize) -> Result<[usize; 2], String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut topo = Rng(seed.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1);
    // The host's interface addresses draw from their own generator: the other draws stay those of the seed without them.
    let mut hosts = Rng(seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
    let base = NodeContext {
        node_name: NODE.into(),
        nodeport: if rng.chance(30) {
            NodePortAddresses::Cidrs(vec![
                (Ipv4Addr::new(10, 0, 0, 0).into(), 8),
                ("fd00:18::".parse().expect("an IPv6 address"), 64),
                (Ipv4Addr::new(127, 0, 0, 0).into(), 8),
            ])
        } else if seed % 4 == 3 {
            // Seed 3 of the default ones.
            NodePortAddresses::Primary
        } else {
            NodePortAddresses::NodeObject
        },
        source_ranges_all: rng.chance(50),
        ..Default::default()
    };
    let limits = Limits {
        maglev_max_table_size: 251,
    };
    let mut world = World::default();
    let mut cache = Cache::default();
    let mut state = SyncState::new(base.clone(), limits);
    let mut dp = Recorder::default();
    let telemetry = Telemetry::new("recorder", Duration::from_secs(30));
    let mut health_ports: BTreeMap<u16, health::ServiceHealth> = BTreeMap::new();
    let mut error_count;
    let mut no_local;
    cache.request_full();
    let mut full_syncs = 0;
    let mut incremental_syncs = 0;
    let (mut v6_served, mut dual_stack, mut no_local_seen) = (0, 0, [0; 2]);
    let (mut topology_used, mut topology_ignored) = (0, 0);
    let mut host_changes = 0;
    for i in 0..steps {
        let mut what = step(&mut rng, &mut topo, &mut world, &mut cache);
        // Addresses come and go on the host's interfaces: as the agent's
        // housekeeping, hand over those the flag uses and rebuild.
        if hosts.chance(4) {
            world.host = HOST_ADDRESSES
                .iter()
                .filter(|_| hosts.chance(40))
                .map(|a| a.parse().expect("an IP address"))
                .collect();
            let used = base.nodeport.host_addresses_used(&world.host);
            if state.set_host_addresses(used) {
                cache.request_full();
                host_changes += 1;
            }
            what += &format!(", host addresses {:?}", world.host);
        }
        let fail = rng.chance(3);
        dp.fail_next = fail;
        let Some(batch) = cache.take() else {
            continue;
        };
        let full = matches!(batch, proxy::changes::Batch::Full { .. });
        match state.sync(&mut dp, batch) {
            Ok(s) => {
                if s.full {
                    full_syncs += 1;
                    health_ports.clear();
                } else {
                    incremental_syncs += 1;
                }
                for (port, h) in s.health {
                    match h {
                        Some(h) => health_ports.insert(port, h),
                        None => health_ports.remove(&port),
                    };
                }
                telemetry.sync_succeeded(
                    Duration::ZERO,
                    s.services,
                    s.endpoints,
                    OwnerChanges {
                        reset: s.full,
                        changes: s.owners.clone(),
                    },
                );
                error_count = s.error_count;
                no_local = s.no_local;
                if let Some(errors) = s.errors {
                    assert_eq!(errors.len(), s.error_count);
                }
            }
            Err(_) if fail => {
                // As the agent does: a full rebuild next.
                cache.request_full();
                continue;
            }
            Err(e) => return Err(format!("step {i} ({what}): sync failed: {e}")),
        }
        let want = oracle(&world, &base, &limits);
        let ctx = |m: &str| format!("seed {seed} step {i} ({what}, full: {full}): {m}");
        let got = state.desired();
        if got.frontends != want.lb.frontends {
            return Err(ctx(&format!(
                "desired frontends differ\n got: {:#?}\nwant: {:#?}",
                got.frontends, want.lb.frontends
            )));
        }
        if got.owners != want.lb.owners {
            return Err(ctx(&format!(
                "owners differ\n got: {:#?}\nwant: {:#?}",
                got.owners, want.lb.owners
            )));
        }
        if dp.programmed.frontends != want.lb.frontends {
            return Err(ctx("programmed frontends differ from a full rebuild"));
        }
        // One copy of each backend list: the desired state holds the very
        // list the dataplane programmed (also after a rebuild made an
        // equal one).
        if let Some((k, _)) = got.frontends.iter().find(|(k, f)| {
            dp.programmed
                .frontends
                .get(k)
                .is_some_and(|p| !same_list(&p.backends, &f.backends))
        }) {
            return Err(ctx(&format!(
                "{k}: the desired and programmed backend lists are two copies"
            )));
        }
        // The primary IPv4, as kube-proxy: the first InternalIP, else the
        // first ExternalIP.
        let node_addr = world.node.as_ref().and_then(|n| {
            let addrs = n.status.as_ref()?.addresses.as_ref()?;
            ["InternalIP", "ExternalIP"].iter().find_map(|t| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == *t)
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            })
        });
        // Coverage of the IPv6 paths: served IPv6 frontends, and
        // dual-stack service ports (frontends of both families).
        if want
            .lb
            .frontends
            .iter()
            .any(|(k, f)| k.addr.is_ipv6() && !f.backends.is_empty())
        {
            v6_served += 1;
        }
        topology_used += usize::from(want.topology_used > 0);
        topology_ignored += usize::from(want.topology_ignored > 0);
        let mut families: BTreeMap<&model::ServicePortName, (bool, bool)> = BTreeMap::new();
        for (k, owner) in &want.lb.owners {
            let e = families.entry(owner).or_default();
            if k.addr.is_ipv4() {
                e.0 = true;
            } else {
                e.1 = true;
            }
        }
        if families.values().any(|(a, b)| *a && *b) {
            dual_stack += 1;
        }
        if dp.node_address != node_addr {
            return Err(ctx(&format!(
                "node address {:?}, want {node_addr:?}",
                dp.node_address
            )));
        }
        let mut errors: Vec<String> = state.errors().iter().map(ToString::to_string).collect();
        errors.sort();
        if errors != want.errors || error_count != want.errors.len() {
            return Err(ctx(&format!(
                "errors differ ({error_count} counted)\n got: {errors:#?}\nwant: {:#?}",
                want.errors
            )));
        }
        if state.health() != want.health || health_ports != want.health {
            return Err(ctx(&format!(
                "health ports differ\n got: {:?}\n delta-applied: {health_ports:?}\nwant: {:?}",
                state.health(),
                want.health
            )));
        }
        for (seen, n) in no_local_seen.iter_mut().zip(want.no_local) {
            *seen += usize::from(n > 0);
        }
        if no_local != want.no_local {
            return Err(ctx(&format!(
                "no-local-endpoints counts {no_local:?}, want {:?}",
                want.no_local
            )));
        }
        if state.services() != want.services || state.endpoints() != want.endpoints {
            return Err(ctx(&format!(
                "counts: services {} endpoints {}, want {} {}",
                state.services(),
                state.endpoints(),
                want.services,
                want.endpoints
            )));
        }
        let owners: BTreeMap<String, String> = telemetry.owners().into_iter().collect();
        let want_owners: BTreeMap<String, String> = want
            .lb
            .owners
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if owners != want_owners {
            return Err(ctx(&format!(
                "metrics owners differ\n got: {owners:?}\nwant: {want_owners:?}"
            )));
        }
    }
    // The run must have exercised both paths, and both families; with
    // CIDRs, host address changes.
    if steps >= 200 && base.nodeport.uses_host_addresses() && host_changes == 0 {
        return Err(format!("seed {seed}: no host address change used"));
    }
    if incremental_syncs < steps / 2 || full_syncs == 0 {
        return Err(format!(
            "seed {seed}: {incremental_syncs} incremental and {full_syncs} full syncs"
        ));
    }
    if steps >= 200 && (v6_served < steps / 100 || dual_stack < steps / 100) {
        return Err(format!(
            "seed {seed}: IPv6 frontends with backends after {v6_served} syncs, dual-stack service ports after {dual_stack}, of {steps} steps"
        ));
    }
    if steps >= 200 && (topology_used < steps / 100 || topology_ignored < steps / 100) {
        return Err(format!(
            "seed {seed}: topology hints used after {topology_used} syncs, ignored after {topology_ignored}, of {steps} steps"
        ));
    }
    Ok(no_local_seen)
}

#[test]
fn incremental_sync_equals_a_full_rebuild_after_every_event() {
    let steps = steps();
    let mut no_local_seen = [0; 2];
    for seed in seeds() {
        match run_seed(seed, steps) {
            Ok(seen) => {
                for (total, n) in no_local_seen.iter_mut().zip(seen) {
                    *total += n;
                }
            }
            Err(e) => panic!("INCREMENTAL_SEEDS={seed} failed: {e}"),
        }
    }
    // The seeds together must have exercised the no-local-endpoints counts.
    assert!(
        steps < 300 || no_local_seen.iter().all(|n| *n > 0),
        "Local policies without local endpoints in {no_local_seen:?} syncs (internal, external)"
    );
}

/// Service `default/name` with ClusterIP `vip`, port 80/TCP.
fn cluster_ip_service(name: &str, vip: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("default".into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(vip.into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A frontend two services claim goes to the first by namespace/name; when
/// that one lets go, the next claimant gets it with its own backends.
#[test]
fn a_contested_frontend_passes_to_the_next_claimant() {
    let svc = |name: &str| cluster_ip_service(name, "10.96.0.10");
    fn slice(service: &str, ip: &str) -> SliceView {
        let mut s = SliceView {
            metadata: ObjectMeta {
                namespace: Some("default".into()),
                name: Some(format!("{service}-1")),
                ..Default::default()
            },
            service: Some(service.into()),
            trigger_time: None,
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: vec![EndpointView {
                addresses: vec![ip.into()],
                ..Default::default()
            }],
        };
        model::trim_slice(&mut s);
        s
    }
    let mut cache = Cache::default();
    let mut state = SyncState::new(NodeContext::default(), Limits::default());
    let mut dp = Recorder::default();
    for (s, ip) in [("b", "10.244.0.2"), ("a", "10.244.0.1")] {
        cache.service_event(Event::Apply(svc(s)));
        cache.slice_event(Event::Apply(slice(s, ip)));
    }
    let sync = |cache: &mut Cache, state: &mut SyncState, dp: &mut Recorder| {
        let batch = cache.take().expect("something changed");
        state.sync(dp, batch).expect("sync")
    };
    let s = sync(&mut cache, &mut state, &mut dp);
    let backends = |dp: &Recorder| -> Vec<String> {
        dp.programmed
            .frontends
            .values()
            .flat_map(|f| f.backends.iter().map(|b| b.addr.to_string()))
            .collect()
    };
    assert_eq!(backends(&dp), ["10.244.0.1"], "a wins over b");
    assert_eq!(s.owners.len(), 1);
    assert_eq!(s.owners[0].1.as_ref().map(|o| o.name.as_str()), Some("a"));
    cache.service_event(Event::Delete(svc("a")));
    let s = sync(&mut cache, &mut state, &mut dp);
    assert_eq!(backends(&dp), ["10.244.0.2"], "b takes over");
    assert_eq!(s.changes, 1);
    assert_eq!(s.owners[0].1.as_ref().map(|o| o.name.as_str()), Some("b"));
}

/// A full dataplane (room for 2 frontends, 3 services): the full sync after
/// the failure programs the one waiting as soon as another service is
/// deleted, in that same sync (removals go first and a failed chunk does
/// not stop the rest).
#[test]
fn a_full_sync_removes_first_so_a_waiting_frontend_fits() {
    let svc = cluster_ip_service;
    let mut cache = Cache::default();
    let mut state = SyncState::new(NodeContext::default(), Limits::default());
    let mut dp = Recorder {
        capacity: Some(2),
        ..Default::default()
    };
    for (name, vip) in [("a", "10.96.0.1"), ("b", "10.96.0.2"), ("c", "10.96.0.3")] {
        cache.service_event(Event::Apply(svc(name, vip)));
    }
    let batch = cache.take().expect("services");
    let err = state.sync(&mut dp, batch).expect_err("c does not fit");
    assert_eq!(err.to_string(), "full: 10.96.0.3:80/TCP");
    let vips = |dp: &Recorder| -> Vec<String> {
        dp.programmed
            .frontends
            .keys()
            .map(|k| k.addr.to_string())
            .collect()
    };
    assert_eq!(vips(&dp), ["10.96.0.1", "10.96.0.2"]);
    // The agent asks for a full sync after a failure; a is deleted.
    cache.service_event(Event::Delete(svc("a", "10.96.0.1")));
    cache.request_full();
    let batch = cache.take().expect("full");
    state.sync(&mut dp, batch).expect("room for c after a went");
    assert_eq!(vips(&dp), ["10.96.0.2", "10.96.0.3"]);
}
