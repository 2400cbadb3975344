//! What `proxyctl` shows, computed from a decoded [`Dump`] of the maps (pure,
//! so it is unit-tested without a kernel): the service list, filtered
//! conntrack, per-service statistics and the explanation of one packet's
//! fate. The binary only formats these structures; their JSON is the stable
//! interface documented in `docs/operations.md`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    str::FromStr,
};

use proxy_common::{ct_flags, stat};
use serde::Serialize;

use crate::{
    lb::FrontendKind,
    maglev,
    maps::{
        Addr, AffinityClient, BackendEntry, Cidr, CtEntry, Direction, Dump, MaglevSource, Proto,
        ServiceEntry, kind_name, ser_kind,
    },
    model::Protocol,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    #[error("{0:?} is not <ip>:<port>/<tcp|udp|sctp>")]
    BadTarget(String),
    #[error("{0:?} is not <ip> or <ip>:<port>")]
    BadClient(String),
    #[error("{0:?} is not a frontend id, <ip>, <ip>:<port> or <ip>:<port>/<proto>")]
    BadFilter(String),
}

/// `ip:port/proto`, the address `explain` asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl FromStr for Target {
    type Err = InspectError;
    fn from_str(s: &str) -> Result<Target, InspectError> {
        let bad = || InspectError::BadTarget(s.to_owned());
        let (addr, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let proto = Protocol::parse(&proto.to_ascii_uppercase()).ok_or_else(bad)?;
        let sa = SocketAddr::from_str(addr).map_err(|_| bad())?;
        Ok(Target {
            ip: sa.ip(),
            port: sa.port(),
            proto,
        })
    }
}

/// The client of `explain --from`: an address, with the source port when
/// known (it decides the Maglev slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for Client {
    type Err = InspectError;
    fn from_str(s: &str) -> Result<Client, InspectError> {
        if let Ok(ip) = Ipv4Addr::from_str(s) {
            return Ok(Client { ip, port: None });
        }
        let sa = SocketAddrV4::from_str(s).map_err(|_| InspectError::BadClient(s.to_owned()))?;
        Ok(Client {
            ip: *sa.ip(),
            port: Some(sa.port()),
        })
    }
}

// ---------------------------------------------------------------------------
// services
// ---------------------------------------------------------------------------

/// A backend's state as `proxyctl services` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Ready.
    Active,
    /// Serving and terminating (used only when nothing is ready).
    Terminating,
}

/// Whether a frontend forwards or refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Has backends.
    Active,
    /// Refused: no endpoints.
    NoEndpoints,
    /// Refused: the traffic policy is Local and this node has none.
    NoLocalEndpoints,
}

/// The traffic policy of the frontend's kind (internal for ClusterIP,
/// external for the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// `Display` as the JSON spells it.
macro_rules! display_as_json {
    ($t:ident { $($v:ident => $s:literal),* $(,)? }) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(match self { $($t::$v => $s),* })
            }
        }
    };
}
display_as_json!(BackendState { Active => "active", Terminating => "terminating" });
display_as_json!(ServiceState {
    Active => "active",
    NoEndpoints => "no-endpoints",
    NoLocalEndpoints => "no-local-endpoints",
});
display_as_json!(TrafficPolicy { Cluster => "Cluster", Local => "Local" });

/// A backend of a frontend, as `proxyctl services` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: Addr,
    pub state: BackendState,
    /// On this node.
    pub local: bool,
}

/// A frontend and where its traffic goes.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub id: u32,
    pub frontend: Addr,
    /// ClusterIP, NodePort, ExternalIP or LoadBalancer.
    #[serde(serialize_with = "ser_kind")]
    pub kind: FrontendKind,
    pub state: ServiceState,
    pub traffic_policy: TrafficPolicy,
    /// ClientIP session affinity timeout in seconds; 0: none.
    pub affinity_timeout: u32,
    /// Maglev table size; 0: random selection.
    pub maglev_table_size: u32,
    /// `loadBalancerSourceRanges` enforced on this frontend; empty: any.
    pub source_ranges: Vec<Cidr>,
    pub backends: Vec<BackendView>,
}

fn backend_view(d: &Dump, id: u32) -> Option<BackendView> {
    d.backends.iter().find(|b| b.id == id).map(view_of)
}

fn view_of(b: &BackendEntry) -> BackendView {
    BackendView {
        id: b.id,
        address: b.backend.clone(),
        state: if b.terminating {
            BackendState::Terminating
        } else {
            BackendState::Active
        },
        local: b.local,
    }
}

fn service_view(d: &Dump, s: &ServiceEntry) -> ServiceView {
    let local_only = s.flags.local_only();
    let backends = d
        .slots
        .iter()
        .filter(|sl| {
            sl.service_id == s.id && sl.generation == u16::from(s.generation) && sl.index < s.count
        })
        .filter_map(|sl| backend_view(d, sl.backend_id))
        .collect::<Vec<_>>();
    let state = match (backends.is_empty(), local_only) {
        (false, _) => ServiceState::Active,
        (true, false) => ServiceState::NoEndpoints,
        (true, true) => ServiceState::NoLocalEndpoints,
    };
    ServiceView {
        id: s.id,
        frontend: s.frontend.clone(),
        kind: s.kind,
        state,
        traffic_policy: if local_only {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        },
        affinity_timeout: s.affinity_timeout,
        maglev_table_size: s.maglev_size,
        source_ranges: if s.flags.source_ranges() {
            d.source_ranges
                .iter()
                .filter(|r| r.service_id == s.id)
                .map(|r| r.cidr)
                .collect()
        } else {
            Vec::new()
        },
        backends,
    }
}

/// Every frontend with its live backends, sorted by frontend.
pub fn services(d: &Dump) -> Vec<ServiceView> {
    d.services.iter().map(|s| service_view(d, s)).collect()
}

// ---------------------------------------------------------------------------
// conntrack
// ---------------------------------------------------------------------------

/// What `proxyctl conntrack --service/--backend/--address` match.
#[derive(Clone, Debug, Default)]
pub struct CtFilter {
    /// Entries of this frontend.
    pub service: Option<AddrFilter>,
    /// Entries whose chosen backend matches.
    pub backend: Option<AddrFilter>,
    /// Entries with this address as source, destination or NAT address.
    pub address: Option<Ipv4Addr>,
}

/// A frontend or backend given as an id, an address, `ip:port` or
/// `ip:port/proto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrFilter {
    Id(u32),
    Addr {
        ip: IpAddr,
        port: Option<u16>,
        proto: Option<Protocol>,
    },
}

impl FromStr for AddrFilter {
    type Err = InspectError;
    fn from_str(s: &str) -> Result<AddrFilter, InspectError> {
        if let Ok(id) = s.parse::<u32>() {
            return Ok(AddrFilter::Id(id));
        }
        let bad = || InspectError::BadFilter(s.to_owned());
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, p)) => (
                a,
                Some(Protocol::parse(&p.to_ascii_uppercase()).ok_or_else(bad)?),
            ),
            None => (s, None),
        };
        if let Ok(ip) = IpAddr::from_str(addr) {
            return Ok(AddrFilter::Addr {
                ip,
                port: None,
                proto,
            });
        }
        let sa = SocketAddr::from_str(addr).map_err(|_| bad())?;
        Ok(AddrFilter::Addr {
            ip: sa.ip(),
            port: Some(sa.port()),
            proto,
        })
    }
}

impl AddrFilter {
    fn matches(&self, id: u32, a: Option<&Addr>) -> bool {
        match self {
            AddrFilter::Id(want) => *want == id,
            AddrFilter::Addr { ip, port, proto } => a.is_some_and(|a| {
                a.ip == *ip
                    && port.is_none_or(|p| p == a.port)
                    && proto.is_none_or(|p| Proto::from(p) == a.proto)
            }),
        }
    }
}

/// A conntrack entry with its frontend and backend resolved.
#[derive(Clone, Debug, Serialize)]
pub struct CtView {
    #[serde(flatten)]
    pub entry: CtEntry,
    /// The frontend the flow belongs to (None: it was removed since).
    pub frontend: Option<Addr>,
    /// The backend chosen (None: it was removed since).
    pub backend: Option<Addr>,
    /// Names of the flag bits: syn, fin, rst, established, hairpin, snat, dsr.
    pub flag_names: Vec<&'static str>,
}

fn ct_flag_names(f: u32) -> Vec<&'static str> {
    ct_flags::NAMES
        .iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// Conntrack entries matching every given filter.
pub fn conntrack(d: &Dump, f: &CtFilter) -> Vec<CtView> {
    d.conntrack
        .iter()
        .filter_map(|c| {
            let frontend = d
                .services
                .iter()
                .find(|s| s.id == c.service_id)
                .map(|s| s.frontend.clone());
            let backend = d
                .backends
                .iter()
                .find(|b| b.id == c.backend_id)
                .map(|b| b.backend.clone());
            if let Some(sf) = &f.service
                && !sf.matches(c.service_id, frontend.as_ref())
            {
                return None;
            }
            if let Some(bf) = &f.backend
                && !bf.matches(c.backend_id, backend.as_ref())
            {
                return None;
            }
            if let Some(a) = f.address {
                let hit = [Some(c.src), Some(c.dst), c.nat]
                    .into_iter()
                    .flatten()
                    .any(|s| s.ip() == IpAddr::V4(a));
                if !hit {
                    return None;
                }
            }
            Some(CtView {
                entry: c.clone(),
                frontend,
                backend,
                flag_names: ct_flag_names(c.flags),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatsView {
    pub id: u32,
    pub frontend: Addr,
    #[serde(serialize_with = "ser_kind")]
    pub kind: FrontendKind,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Per-frontend counters (packets on the per-packet paths, connections
    /// or sends on the socket path; bytes on the per-packet paths).
    pub services: Vec<ServiceStatsView>,
    /// Dropped packets by reason (the `drop_*` counters without the prefix).
    pub drops: Vec<Counter>,
    /// Clients refused because the frontend has no backend, by how.
    pub rejects: Vec<Counter>,
    /// Every data-path counter (`STATS`), by name.
    pub counters: Vec<Counter>,
}

pub fn stats(d: &Dump) -> Stats {
    let services = d
        .services
        .iter()
        .map(|s| {
            let st = d.service_stats.iter().find(|x| x.service_id == s.id);
            ServiceStatsView {
                id: s.id,
                frontend: s.frontend.clone(),
                kind: s.kind,
                packets: st.map(|x| x.packets).unwrap_or(0),
                bytes: st.map(|x| x.bytes).unwrap_or(0),
            }
        })
        .collect();
    let counters: Vec<Counter> = d
        .stats
        .iter()
        .map(|s| Counter {
            name: s.name,
            value: s.value,
        })
        .collect();
    let drops = counters
        .iter()
        .filter_map(|c| {
            c.name.strip_prefix("drop_").map(|r| Counter {
                name: r,
                value: c.value,
            })
        })
        .collect();
    let rejects = counters
        .iter()
        .filter(|c| {
            [
                stat::NAMES[stat::REJECT_TCP_RST as usize],
                stat::NAMES[stat::REJECT_ICMP as usize],
                stat::NAMES[stat::SOCK_REFUSED as usize],
            ]
            .contains(&c.name)
        })
        .cloned()
        .collect();
    Stats {
        services,
        drops,
        rejects,
        counters,
    }
}

// ---------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------

/// What happens to a packet (or connect()) to the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Translated to a backend.
    Forward,
    /// Refused: TCP RST / ICMP port unreachable / ECONNREFUSED.
    Reject,
    /// Dropped silently.
    Drop,
    /// Not a frontend: passes untouched.
    NotAService,
}

/// Why a packet is refused or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The service has no usable endpoint.
    NoEndpoints,
    /// Traffic policy Local and no usable endpoint on this node.
    NoLocalEndpoints,
    /// Client outside `loadBalancerSourceRanges`.
    SourceRange,
}

/// How the backend is (or would be) chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// An existing flow keeps its backend (conntrack).
    Conntrack,
    /// ClientIP session affinity.
    Affinity,
    /// Maglev slot `flow_hash % M` (north-south, from outside the node).
    Maglev,
    /// Random slot per new flow / connect().
    Random,
}

/// A backend a new flow may go to, with its share of the Maglev table.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    #[serde(flatten)]
    pub backend: BackendView,
    /// Maglev slots pointing at it (None: random selection).
    pub maglev_slots: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The question, as `ip:port/PROTO`.
    pub target: String,
    /// `--from`, as given.
    pub client: Option<String>,
    pub verdict: Verdict,
    pub refusal: Option<Refusal>,
    /// The matching frontend.
    pub service: Option<ServiceView>,
    pub selection: Option<Selection>,
    /// The backend this flow goes to, when it is determined.
    pub backend: Option<BackendView>,
    /// Otherwise the backends a new flow may go to.
    pub candidates: Vec<Candidate>,
    /// The reasoning, one sentence per step.
    pub reasons: Vec<String>,
}

/// What the rules of [`explain`] look at.
struct Ask<'a> {
    d: &'a Dump,
    maglev: &'a dyn MaglevSource,
    target: Target,
    client: Option<Client>,
    now_ns: u64,
    service: &'a ServiceEntry,
    view: &'a ServiceView,
}

/// One step of the data path's decision, in the order the data path takes
/// them: true when it decides the packet's fate (the explanation is
/// complete), false to go on.
type Rule = fn(&Ask, &mut Explanation) -> bool;

const RULES: [Rule; 6] = [
    source_ranges,
    no_backend,
    tracked_flow,
    affinity,
    maglev_slot,
    random,
];

/// Explain what the data path does with a packet to `target` from `client`.
/// `now_ns` is `CLOCK_MONOTONIC` (the clock of the affinity timestamps).
pub fn explain(
    d: &Dump,
    maglev_src: &dyn MaglevSource,
    target: Target,
    client: Option<Client>,
    now_ns: u64,
) -> Explanation {
    let target_s = format!(
        "{}/{}",
        SocketAddr::new(target.ip, target.port),
        target.proto
    );
    let mut e = Explanation {
        target: target_s.clone(),
        client: client.map(|c| match c.port {
            Some(p) => format!("{}:{p}", c.ip),
            None => c.ip.to_string(),
        }),
        verdict: Verdict::NotAService,
        refusal: None,
        service: None,
        selection: None,
        backend: None,
        candidates: Vec::new(),
        reasons: Vec::new(),
    };
    let wanted = Addr {
        ip: target.ip,
        port: target.port,
        proto: target.proto.into(),
    };
    let Some(s) = d.services.iter().find(|s| s.frontend == wanted) else {
        not_a_service(d, target, &mut e);
        return e;
    };
    let view = service_view(d, s);
    e.reasons.push(format!(
        "{target_s} is {} frontend {} (traffic policy {}){}",
        kind_name(s.kind),
        s.id,
        view.traffic_policy,
        if view.backends.is_empty() {
            String::new()
        } else {
            format!(" with {} backend(s)", view.backends.len())
        }
    ));
    let ask = Ask {
        d,
        maglev: maglev_src,
        target,
        client,
        now_ns,
        service: s,
        view: &view,
    };
    for rule in RULES {
        if rule(&ask, &mut e) {
            break;
        }
    }
    e.service = Some(view);
    e
}

/// No frontend: the packet passes (perhaps straight to a backend).
fn not_a_service(d: &Dump, target: Target, e: &mut Explanation) {
    e.reasons.push(format!(
        "no frontend {} is programmed: the packet passes untouched",
        e.target
    ));
    let backends: Vec<String> = d
        .backends
        .iter()
        .filter(|b| b.backend.ip == target.ip)
        .map(|b| b.backend.to_string())
        .collect();
    if !backends.is_empty() {
        e.reasons.push(format!(
            "{} is a backend address ({}), reached directly",
            target.ip,
            backends.join(", ")
        ));
    }
}

fn join(ranges: &[Cidr]) -> String {
    ranges
        .iter()
        .map(Cidr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// 1. loadBalancerSourceRanges (checked first, in XDP).
fn source_ranges(a: &Ask, e: &mut Explanation) -> bool {
    let ranges = &a.view.source_ranges;
    if ranges.is_empty() {
        return false;
    }
    let Some(c) = a.client else {
        e.reasons.push(format!(
            "only clients in {} are served from outside the node (give --from to check one)",
            join(ranges)
        ));
        return false;
    };
    if ranges.iter().any(|r| r.contains(c.ip)) {
        e.reasons.push(format!(
            "client {} is inside loadBalancerSourceRanges ({})",
            c.ip,
            join(ranges)
        ));
        return false;
    }
    e.verdict = Verdict::Drop;
    e.refusal = Some(Refusal::SourceRange);
    e.reasons.push(format!(
        "client {} is outside loadBalancerSourceRanges ({}): dropped when it arrives from outside the node (XDP, counter drop_source_range)",
        c.ip,
        join(ranges)
    ));
    true
}

/// 2. No backend: refused. Otherwise the packet is forwarded.
fn no_backend(a: &Ask, e: &mut Explanation) -> bool {
    if !a.view.backends.is_empty() {
        e.verdict = Verdict::Forward;
        if a.view
            .backends
            .iter()
            .all(|b| b.state == BackendState::Terminating)
        {
            e.reasons.push(
                "no endpoint is ready: the serving+terminating ones are used (graceful termination)"
                    .to_owned(),
            );
        }
        return false;
    }
    e.verdict = Verdict::Reject;
    if a.view.traffic_policy == TrafficPolicy::Local {
        e.refusal = Some(Refusal::NoLocalEndpoints);
        e.reasons.push(format!(
            "{}TrafficPolicy is Local and this node has no usable endpoint of the service: refused (TCP RST, ICMP port unreachable, ECONNREFUSED at connect())",
            if a.service.kind == FrontendKind::ClusterIp {
                "internal"
            } else {
                "external"
            }
        ));
    } else {
        e.refusal = Some(Refusal::NoEndpoints);
        e.reasons.push(
            "the service has no usable endpoint: refused (TCP RST, ICMP port unreachable, ECONNREFUSED at connect())"
                .to_owned(),
        );
    }
    true
}

/// 3. An existing flow keeps its backend.
fn tracked_flow(a: &Ask, e: &mut Explanation) -> bool {
    let Some(Client {
        ip,
        port: Some(sport),
    }) = a.client
    else {
        return false;
    };
    // The client is an IPv4 address (see `Client`): only an IPv4
    // frontend's flows can be its.
    let IpAddr::V4(target_ip) = a.target.ip else {
        return false;
    };
    let src = SocketAddr::V4(SocketAddrV4::new(ip, sport));
    let dst = SocketAddr::V4(SocketAddrV4::new(target_ip, a.target.port));
    let proto = Proto::from(a.target.proto);
    let Some(b) =
        a.d.conntrack
            .iter()
            .find(|c| {
                c.direction == Direction::Service
                    && c.proto == proto
                    && c.src == src
                    && c.dst == dst
                    && c.service_id == a.service.id
            })
            .and_then(|ct| backend_view(a.d, ct.backend_id))
    else {
        return false;
    };
    e.selection = Some(Selection::Conntrack);
    e.reasons.push(format!(
        "flow {src} -> {dst} is tracked: it stays on backend {} ({})",
        b.id, b.address
    ));
    e.backend = Some(b);
    true
}

/// 4. ClientIP affinity.
fn affinity(a: &Ask, e: &mut Explanation) -> bool {
    let timeout = a.service.affinity_timeout;
    if timeout == 0 {
        return false;
    }
    let timeout_ns = u64::from(timeout) * 1_000_000_000;
    let fresh = a.client.and_then(|c| {
        a.d.affinity
            .iter()
            .find(|x| x.service_id == a.service.id && x.client == AffinityClient::Ip(c.ip.into()))
            .filter(|x| a.now_ns.wrapping_sub(x.last_used_ns) < timeout_ns)
            .and_then(|x| {
                a.view
                    .backends
                    .iter()
                    .find(|b| b.id == x.backend_id)
                    .cloned()
            })
    });
    let Some(b) = fresh else {
        e.reasons.push(format!(
            "sessionAffinity ClientIP ({timeout}s): no fresh entry for this client IP (clients of the socket path are keyed by network namespace: see dump-maps affinity); a new flow picks a slot at random and sticks to it"
        ));
        return false;
    };
    e.selection = Some(Selection::Affinity);
    e.reasons.push(format!(
        "sessionAffinity ClientIP ({timeout}s): the client was last sent to backend {} ({}), within the timeout",
        b.id, b.address
    ));
    e.backend = Some(b);
    true
}

/// 5. Maglev (north-south from outside the node, without affinity).
fn maglev_slot(a: &Ask, e: &mut Explanation) -> bool {
    let s = a.service;
    if s.maglev_size == 0 || s.affinity_timeout != 0 {
        return false;
    }
    let m = s.maglev_size;
    let Some(Client {
        ip,
        port: Some(sport),
    }) = a.client
    else {
        let mut counts: std::collections::HashMap<u32, u32> = Default::default();
        for slot in 0..m {
            if let Some(id) = a.maglev.maglev_slot(s.maglev_table, slot) {
                *counts.entry(id).or_default() += 1;
            }
        }
        e.selection = Some(Selection::Maglev);
        e.reasons.push(format!(
            "from outside the node a new flow goes to Maglev slot flow_hash(saddr, daddr, sport, dport, proto) % {m}; give --from <ip>:<port> to compute it"
        ));
        e.candidates = a
            .view
            .backends
            .iter()
            .map(|b| Candidate {
                backend: b.clone(),
                maglev_slots: Some(counts.get(&b.id).copied().unwrap_or(0)),
            })
            .collect();
        return true;
    };
    let t = a.target;
    // Maglev tables serve IPv4 frontends only.
    let IpAddr::V4(target_ip) = t.ip else {
        return false;
    };
    let h = maglev::flow_hash(ip, target_ip, sport, t.port, t.proto.number());
    let slot = h % m;
    let Some(b) = a
        .maglev
        .maglev_slot(s.maglev_table, slot)
        .and_then(|id| backend_view(a.d, id))
    else {
        e.reasons.push(format!(
            "Maglev slot {slot} of {m} is empty: random selection"
        ));
        return false;
    };
    e.selection = Some(Selection::Maglev);
    e.reasons.push(format!(
        "from outside the node a new flow hashes to Maglev slot {slot} of {m} (flow hash {h:#010x}): backend {} ({}); from pods and host sockets it picks a slot at random",
        b.id, b.address
    ));
    e.backend = Some(b);
    true
}

/// 6. Random.
fn random(a: &Ask, e: &mut Explanation) -> bool {
    e.selection = Some(Selection::Random);
    e.reasons.push(format!(
        "a new flow picks one of the {} backend slot(s) at random",
        a.view.backends.len()
    ));
    e.candidates = a
        .view
        .backends
        .iter()
        .map(|b| Candidate {
            backend: b.clone(),
            maglev_slots: None,
        })
        .collect();
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use proxy_common::svc_flags;

    use crate::maps::{
        AffinityEntry, BackendEntry, ServiceStatsEntry, SlotEntry, SourceRangeEntry, StatEntry,
        SvcFlags,
    };

    fn addr(ip: [u8; 4], port: u16) -> Addr {
        Addr::new(Ipv4Addr::from(ip), port, 6)
    }

    fn svc(id: u32, ip: [u8; 4], port: u16, kind: FrontendKind, count: u16) -> ServiceEntry {
        ServiceEntry {
            frontend: addr(ip, port),
            id,
            count,
            generation: 1,
            kind,
            flags: SvcFlags::default(),
            affinity_timeout: 0,
            maglev_size: 0,
            maglev_table: 0,
        }
    }

    fn backend(id: u32, last: u8, local: bool) -> BackendEntry {
        BackendEntry {
            id,
            backend: addr([10, 244, 1, last], 8080),
            terminating: false,
            local,
        }
    }

    fn slots(service_id: u32, ids: &[u32]) -> Vec<SlotEntry> {
        ids.iter()
            .enumerate()
            .map(|(i, b)| SlotEntry {
                service_id,
                generation: 1,
                index: i as u16,
                backend_id: *b,
            })
            .collect()
    }

    fn dump() -> Dump {
        let mut lb = svc(3, [192, 168, 0, 100], 80, FrontendKind::LoadBalancer, 2);
        lb.flags = SvcFlags(svc_flags::SOURCE_RANGES);
        let mut local = svc(4, [172, 18, 0, 2], 30080, FrontendKind::NodePort, 0);
        local.flags = SvcFlags(svc_flags::LOCAL_ONLY);
        let mut maglev = svc(5, [172, 18, 0, 2], 30081, FrontendKind::NodePort, 2);
        maglev.maglev_size = 7;
        // Its table's id differs from its frontend id (tables are shared).
        maglev.maglev_table = 42;
        let mut d = Dump {
            services: vec![
                svc(1, [10, 96, 0, 10], 80, FrontendKind::ClusterIp, 2),
                svc(2, [10, 96, 0, 11], 80, FrontendKind::ClusterIp, 0),
                lb,
                local,
                maglev,
            ],
            backends: vec![backend(1, 2, true), backend(2, 3, false)],
            source_ranges: vec![SourceRangeEntry {
                service_id: 3,
                cidr: Cidr {
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                    len: 8,
                },
            }],
            service_stats: vec![ServiceStatsEntry {
                service_id: 1,
                packets: 5,
                bytes: 500,
            }],
            stats: stat::NAMES
                .iter()
                .enumerate()
                .map(|(i, name)| StatEntry {
                    name,
                    value: i as u64,
                })
                .collect(),
            ..Default::default()
        };
        d.slots.extend(slots(1, &[1, 2]));
        d.slots.extend(slots(3, &[1, 2]));
        d.slots.extend(slots(5, &[1, 2]));
        // A stale slot of the other generation is not a backend.
        d.slots.push(SlotEntry {
            service_id: 2,
            generation: 0,
            index: 0,
            backend_id: 1,
        });
        d
    }

    fn maglev_table() -> HashMap<(u32, u32), u32> {
        (0..7)
            .map(|s| ((42, s), if s < 4 { 1 } else { 2 }))
            .collect()
    }

    fn ask(d: &Dump, target: &str, from: Option<&str>) -> Explanation {
        explain(
            d,
            &maglev_table(),
            target.parse().expect("target"),
            from.map(|f| f.parse().expect("client")),
            0,
        )
    }

    #[test]
    fn parses_targets_and_clients() {
        assert_eq!(
            "10.96.0.10:80/tcp".parse::<Target>(),
            Ok(Target {
                ip: Ipv4Addr::new(10, 96, 0, 10).into(),
                port: 80,
                proto: Protocol::Tcp
            })
        );
        assert!("10.96.0.10:80".parse::<Target>().is_err());
        assert!("10.96.0.10/udp".parse::<Target>().is_err());
        assert_eq!(
            "1.2.3.4:5".parse::<Client>(),
            Ok(Client {
                ip: Ipv4Addr::new(1, 2, 3, 4),
                port: Some(5)
            })
        );
        assert_eq!("7".parse::<AddrFilter>(), Ok(AddrFilter::Id(7)));
        assert!("x".parse::<AddrFilter>().is_err());
    }

    #[test]
    fn services_show_live_backends_and_state() {
        let v = services(&dump());
        assert_eq!(v[0].backends.len(), 2);
        assert_eq!(v[0].state, ServiceState::Active);
        assert_eq!(v[1].state, ServiceState::NoEndpoints);
        assert!(v[1].backends.is_empty(), "other generation ignored");
        assert_eq!(v[2].source_ranges[0].to_string(), "10.0.0.0/8");
        assert_eq!(v[3].state, ServiceState::NoLocalEndpoints);
        assert_eq!(v[3].traffic_policy, TrafficPolicy::Local);
    }

    #[test]
    fn explain_served_service_lists_random_candidates() {
        let e = ask(&dump(), "10.96.0.10:80/TCP", None);
        assert_eq!(e.verdict, Verdict::Forward);
        assert_eq!(e.selection, Some(Selection::Random));
        assert_eq!(e.candidates.len(), 2);
    }

    #[test]
    fn explain_refusals() {
        let d = dump();
        let e = ask(&d, "10.96.0.11:80/TCP", None);
        assert_eq!(
            (e.verdict, e.refusal),
            (Verdict::Reject, Some(Refusal::NoEndpoints))
        );
        let e = ask(&d, "172.18.0.2:30080/TCP", None);
        assert_eq!(
            (e.verdict, e.refusal),
            (Verdict::Reject, Some(Refusal::NoLocalEndpoints))
        );
        let e = ask(&d, "192.168.0.100:80/TCP", Some("192.0.2.1"));
        assert_eq!(
            (e.verdict, e.refusal),
            (Verdict::Drop, Some(Refusal::SourceRange))
        );
        let e = ask(&d, "192.168.0.100:80/TCP", Some("10.1.2.3"));
        assert_eq!(e.verdict, Verdict::Forward);
        let e = ask(&d, "10.96.0.99:80/TCP", None);
        assert_eq!(e.verdict, Verdict::NotAService);
        let e = ask(&d, "10.96.0.10:80/UDP", None);
        assert_eq!(
            e.verdict,
            Verdict::NotAService,
            "protocol is part of the key"
        );
    }

    #[test]
    fn explain_maglev_computes_the_slot_with_a_source_port() {
        let d = dump();
        let e = ask(&d, "172.18.0.2:30081/TCP", Some("172.18.0.100:40000"));
        let h = maglev::flow_hash(
            Ipv4Addr::new(172, 18, 0, 100),
            Ipv4Addr::new(172, 18, 0, 2),
            40000,
            30081,
            6,
        );
        let want = if h % 7 < 4 { 1 } else { 2 };
        assert_eq!(e.selection, Some(Selection::Maglev));
        assert_eq!(e.backend.map(|b| b.id), Some(want));
        // Without a source port: candidates with their slot shares.
        let e = ask(&d, "172.18.0.2:30081/TCP", Some("172.18.0.100"));
        let shares: Vec<_> = e.candidates.iter().map(|c| c.maglev_slots).collect();
        assert_eq!(shares, vec![Some(4), Some(3)]);
    }

    #[test]
    fn explain_existing_flow_and_affinity() {
        let mut d = dump();
        d.conntrack.push(CtEntry {
            direction: Direction::Service,
            proto: Proto(6),
            src: "10.244.2.7:5555".parse().expect("addr"),
            dst: "10.96.0.10:80".parse().expect("addr"),
            service_id: 1,
            backend_id: 2,
            flags: 0,
            last_seen_ns: 0,
            nat: None,
        });
        let e = ask(&d, "10.96.0.10:80/TCP", Some("10.244.2.7:5555"));
        assert_eq!(e.selection, Some(Selection::Conntrack));
        assert_eq!(e.backend.map(|b| b.id), Some(2));

        d.services[0].affinity_timeout = 10;
        d.affinity.push(AffinityEntry {
            service_id: 1,
            client: AffinityClient::Ip(Ipv4Addr::new(10, 244, 2, 8).into()),
            backend_id: 1,
            last_used_ns: 0,
        });
        let e = ask(&d, "10.96.0.10:80/TCP", Some("10.244.2.8"));
        assert_eq!(e.selection, Some(Selection::Affinity));
        assert_eq!(e.backend.map(|b| b.id), Some(1));
    }

    #[test]
    fn conntrack_filters() {
        let mut d = dump();
        let ct = |src: &str, sid, bid| CtEntry {
            direction: Direction::Service,
            proto: Proto(6),
            src: src.parse().expect("addr"),
            dst: "10.96.0.10:80".parse().expect("addr"),
            service_id: sid,
            backend_id: bid,
            flags: ct_flags::TCP_SYN | ct_flags::TCP_ESTABLISHED,
            last_seen_ns: 0,
            nat: None,
        };
        d.conntrack = vec![ct("10.244.2.7:1", 1, 1), ct("10.244.2.8:1", 1, 2)];
        let all = conntrack(&d, &CtFilter::default());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].flag_names, vec!["syn", "established"]);
        let f = CtFilter {
            backend: Some("10.244.1.3:8080".parse().expect("filter")),
            ..Default::default()
        };
        assert_eq!(conntrack(&d, &f).len(), 1);
        let f = CtFilter {
            service: Some("10.96.0.10:80/tcp".parse().expect("filter")),
            address: Some(Ipv4Addr::new(10, 244, 2, 7)),
            ..Default::default()
        };
        assert_eq!(conntrack(&d, &f).len(), 1);
        let f = CtFilter {
            service: Some(AddrFilter::Id(9)),
            ..Default::default()
        };
        assert!(conntrack(&d, &f).is_empty());
    }

    fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    /// The JSON shapes docs/operations.md documents as stable.
    #[test]
    fn json_shapes_are_the_documented_ones() {
        let d = dump();
        let s = serde_json::to_value(&services(&d)[0]).expect("json");
        assert_eq!(
            keys(&s),
            [
                "affinity_timeout",
                "backends",
                "frontend",
                "id",
                "kind",
                "maglev_table_size",
                "source_ranges",
                "state",
                "traffic_policy"
            ]
        );
        assert_eq!(keys(&s["frontend"]), ["ip", "port", "proto"]);
        assert_eq!(keys(&s["backends"][0]), ["address", "id", "local", "state"]);
        let e = serde_json::to_value(ask(&d, "10.96.0.10:80/TCP", None)).expect("json");
        assert_eq!(
            keys(&e),
            [
                "backend",
                "candidates",
                "client",
                "reasons",
                "refusal",
                "selection",
                "service",
                "target",
                "verdict"
            ]
        );
        assert_eq!(
            keys(&e["candidates"][0]),
            ["address", "id", "local", "maglev_slots", "state"]
        );
        let st = serde_json::to_value(stats(&d)).expect("json");
        assert_eq!(keys(&st), ["counters", "drops", "rejects", "services"]);
        assert_eq!(
            keys(&st["services"][0]),
            ["bytes", "frontend", "id", "kind", "packets"]
        );
    }

    /// `dump-maps` JSON: typed entries serialize as the strings
    /// docs/operations.md documents.
    #[test]
    fn dump_json_spells_typed_values_as_strings() {
        let mut d = dump();
        d.conntrack.push(CtEntry {
            direction: Direction::Reply,
            proto: Proto(17),
            src: "10.244.1.2:53".parse().expect("addr"),
            dst: "10.244.2.7:5555".parse().expect("addr"),
            service_id: 1,
            backend_id: 1,
            flags: 0,
            last_seen_ns: 0,
            nat: Some("172.18.0.2:40000".parse().expect("addr")),
        });
        d.affinity.push(AffinityEntry {
            service_id: 1,
            client: AffinityClient::Netns(4096),
            backend_id: 1,
            last_used_ns: 0,
        });
        let v = serde_json::to_value(&d).expect("json");
        let lb = &v["services"][2];
        assert_eq!(lb["kind"], "LoadBalancer");
        assert_eq!(lb["flags"], serde_json::json!(["source-ranges"]));
        assert_eq!(lb["frontend"]["proto"], "TCP");
        assert_eq!(
            keys(lb),
            [
                "affinity_timeout",
                "count",
                "flags",
                "frontend",
                "generation",
                "id",
                "kind",
                "maglev_size",
                "maglev_table",
            ]
        );
        let ct = &v["conntrack"][0];
        assert_eq!(ct["direction"], "reply");
        assert_eq!(ct["proto"], "UDP");
        assert_eq!(ct["src"], "10.244.1.2:53");
        assert_eq!(ct["nat"], "172.18.0.2:40000");
        assert_eq!(v["affinity"][0]["client"], "netns:4096");
        assert_eq!(v["source_ranges"][0]["cidr"], "10.0.0.0/8");
    }

    #[test]
    fn stats_split_drops_and_rejects() {
        let s = stats(&dump());
        assert_eq!(s.services[0].packets, 5);
        assert!(s.drops.iter().any(|c| c.name == "source_range"));
        assert!(s.drops.iter().all(|c| !c.name.starts_with("drop_")));
        assert_eq!(s.rejects.len(), 3);
        assert_eq!(s.counters.len(), stat::COUNT as usize);
    }
}
