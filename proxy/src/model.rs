//! Kubernetes objects -> the desired service table. Pure: no I/O, no eBPF.
//!
//! Follows kube-proxy's reading of the API:
//! * headless services (`clusterIP: None`), `type: ExternalName`, and
//!   services labelled `service.kubernetes.io/headless` or with a
//!   `service.kubernetes.io/service-proxy-name` are ignored;
//! * endpoints come from EndpointSlices (label `kubernetes.io/service-name`,
//!   same namespace, `addressType: IPv4` or `IPv6`); a service port is
//!   matched to a slice port by name and protocol, so a named `targetPort`
//!   resolves per slice (two pods may map one name to different numbers);
//! * dual stack: addresses of both families are kept (`spec.clusterIPs` in
//!   order, ExternalIPs, LoadBalancer IPs, source ranges, endpoints, the
//!   Node's addresses); [`crate::lb`] gives a frontend of one family only
//!   the endpoints and source ranges of that family;
//! * only `ready` endpoints serve; when none is ready, `serving` and
//!   `terminating` ones do (graceful termination fallback);
//! * topology-aware routing from the endpoints' hints, per address family,
//!   for traffic policy Cluster only (see [`topology`]).
//!
//! Bad input never stops the rest: each problem becomes a [`ModelError`]
//! naming the object, the field and the value, and the offending piece is
//! left out.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::{
        core::v1::Service,
        discovery::v1::{EndpointConditions, EndpointPort},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer};

mod stored;
pub mod topology;
pub use stored::{
    AddressType, BadAddress, BadHint, EndpointInfo, HintSet, IpField, NO_HINTS, NO_NODE, PortInfo,
    ProtocolField, READY, SERVING, ServiceInfo, SliceEndpoints, SliceExtra, SliceHints, SliceInfo,
    SlicePortInfo, SpecInfo, TERMINATING,
};
pub use topology::{LABEL_ZONE, Topology, TrafficDistribution};

/// Label kube-proxy uses to let another proxy own a service.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label that marks a service headless whatever its spec says.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to its service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// When the change an EndpointSlice reflects was triggered (RFC 3339, set
/// by the EndpointSlice controller): the start of kube-proxy's network
/// programming latency.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Annotation overriding `--maglev-table-size` for one service (a prime).
pub const ANNOTATION_MAGLEV_TABLE_SIZE: &str = "kube-proxy-ebpf.io/maglev-table-size";
/// The label selector the agent watches services and slices with.
pub const WATCH_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// The parts of a `discovery.k8s.io/v1` EndpointSlice the model reads,
/// deserialized straight from the API server's JSON (the agent watches
/// EndpointSlices as this type): a k8s-openapi `EndpointSlice` costs 352
/// bytes per endpoint before its strings, an [`EndpointView`] 80. Field
/// names and meanings are the API's; everything else is skipped.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceView {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The `kubernetes.io/service-name` label, moved here by
    /// [`trim_slice`] (a label map costs a B-tree node).
    #[serde(skip)]
    pub service: Option<String>,
    /// The [`ANNOTATION_TRIGGER_TIME`] annotation, moved here by
    /// [`trim_slice`] (None: absent or not a timestamp).
    #[serde(skip)]
    pub trigger_time: Option<std::time::SystemTime>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint of a [`SliceView`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub node_name: Option<String>,
    /// `hints` (topology-aware routing); boxed: most endpoints have none.
    #[serde(default)]
    pub hints: Option<Box<HintsView>>,
}

/// An endpoint's `hints`: the zones and nodes it should serve.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HintsView {
    #[serde(default, deserialize_with = "null_as_default")]
    pub for_zones: Vec<HintName>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub for_nodes: Vec<HintName>,
}

/// One `forZones[]` or `forNodes[]` entry. `name` is required by the API;
/// read as optional so that an entry without one is reported, not a
/// reason to drop the whole slice.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HintName {
    #[serde(default)]
    pub name: Option<String>,
}

impl HintsView {
    /// Hints for the given zones and nodes (tests, fixtures).
    pub fn new(zones: &[&str], nodes: &[&str]) -> HintsView {
        let names = |l: &[&str]| {
            l.iter()
                .map(|n| HintName {
                    name: Some((*n).to_owned()),
                })
                .collect()
        };
        HintsView {
            for_zones: names(zones),
            for_nodes: names(nodes),
        }
    }
}

impl SliceView {
    /// The service this slice belongs to.
    pub fn service_name(&self) -> Option<&str> {
        self.service.as_deref().or_else(|| {
            self.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME))
                .map(String::as_str)
        })
    }
}

/// Keeps of a watched slice only what [`build`] reads (name, namespace,
/// service, address type, ports, endpoints) and its trigger time (for
/// the agent's metrics), sized to fit: the agent holds
/// every slice of the cluster.
pub fn trim_slice(s: &mut SliceView) {
    if s.service.is_none() {
        s.service = s
            .metadata
            .labels
            .as_mut()
            .and_then(|l| l.remove(LABEL_SERVICE_NAME));
    }
    if s.trigger_time.is_none() {
        s.trigger_time = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
            .and_then(|t| parse_timestamp(t));
    }
    s.metadata = ObjectMeta {
        name: s.metadata.name.take(),
        namespace: s.metadata.namespace.take(),
        ..Default::default()
    };
    s.endpoints.shrink_to_fit();
    for e in &mut s.endpoints {
        e.addresses.shrink_to_fit();
    }
}

/// An RFC 3339 timestamp (None: not one; the metric it feeds skips it).
pub fn parse_timestamp(t: &str) -> Option<std::time::SystemTime> {
    let ts: k8s_openapi::jiff::Timestamp = t.parse().ok()?;
    Some(std::time::SystemTime::from(ts))
}

/// Keeps of a watched service's metadata only what [`build`] reads (name,
/// namespace, our labels and annotation); spec and status stay.
pub fn trim_service(s: &mut Service) {
    let keep = |m: Option<BTreeMap<String, String>>, keys: &[&str]| {
        m.map(|mut m| {
            m.retain(|k, _| keys.contains(&k.as_str()));
            m
        })
        .filter(|m| !m.is_empty())
    };
    s.metadata = ObjectMeta {
        name: s.metadata.name.take(),
        namespace: s.metadata.namespace.take(),
        labels: keep(
            s.metadata.labels.take(),
            &[LABEL_SERVICE_PROXY_NAME, LABEL_HEADLESS],
        ),
        annotations: keep(
            s.metadata.annotations.take(),
            &[ANNOTATION_MAGLEV_TABLE_SIZE],
        ),
        ..Default::default()
    };
}

/// Keeps of the watched Node only its name, its zone label and its
/// addresses (what [`node_addresses`] and [`node_zone`] read; a node's
/// status also lists every image it holds).
pub fn trim_node(n: &mut k8s_openapi::api::core::v1::Node) {
    let labels = n
        .metadata
        .labels
        .take()
        .and_then(|mut l| l.remove_entry(LABEL_ZONE))
        .map(|(k, v)| BTreeMap::from([(k, v)]));
    n.metadata = ObjectMeta {
        name: n.metadata.name.take(),
        labels,
        ..Default::default()
    };
    n.spec = None;
    n.status = n
        .status
        .take()
        .map(|s| k8s_openapi::api::core::v1::NodeStatus {
            addresses: s.addresses,
            ..Default::default()
        });
}

/// `null` reads as the type's default, as an absent field does (the API
/// server writes `"endpoints": null` for an empty slice).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One port of one service: `namespace/name:port/PROTO` (kube-proxy's
/// ServicePortName).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The service port's name ("" when the service has one unnamed port).
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// A candidate backend of a service port: ready, or serving and
/// terminating (the graceful-termination fallback).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Target port, resolved from the EndpointSlice.
    pub port: u16,
    /// `ready`; otherwise the endpoint is serving and terminating and is
    /// used only when no ready one is available (see [`usable_endpoints`]).
    pub ready: bool,
    pub terminating: bool,
    /// On the node this agent runs on.
    pub local: bool,
    /// Chosen by its family's topology hints for this node (kube-proxy's
    /// `availableForTopology`; every endpoint when the hints are not used,
    /// see [`topology`]). Only traffic policy Cluster looks at it.
    pub in_topology: bool,
}

/// The endpoints traffic goes to, as kube-proxy chooses them: the ready
/// ones; if there is none, the serving+terminating ones. With `local_only`
/// (traffic policy Local) the same choice among this node's endpoints;
/// otherwise (policy Cluster) among those the topology hints choose
/// ([`Endpoint::in_topology`]: all of them when the hints are not used,
/// which is always the case when no endpoint of the family is ready).
pub fn usable_endpoints(endpoints: &[Endpoint], local_only: bool) -> Vec<&Endpoint> {
    usable_endpoints_where(endpoints, local_only, |_| true)
}

/// [`usable_endpoints`] among the endpoints `keep` accepts (one address
/// family: each family chooses on its own, as kube-proxy's per-family
/// proxiers do).
pub fn usable_endpoints_where(
    endpoints: &[Endpoint],
    local_only: bool,
    keep: impl Fn(&Endpoint) -> bool,
) -> Vec<&Endpoint> {
    let candidates = || {
        endpoints
            .iter()
            .filter(|e| if local_only { e.local } else { e.in_topology })
            .filter(|e| keep(e))
    };
    let ready: Vec<&Endpoint> = candidates().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates().filter(|e| e.terminating).collect()
}

/// The desired state of one service port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (both families, in order: the first is the
    /// service's primary family).
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub external_policy_local: bool,
    pub internal_policy_local: bool,
    /// `healthCheckNodePort` (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges`: (network, prefix length), both
    /// families; empty: any.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// Maglev table size from [`ANNOTATION_MAGLEV_TABLE_SIZE`].
    pub maglev_table_size: Option<u32>,
    /// Ready and serving+terminating endpoints of both families, sorted,
    /// without duplicates (an address ready in one slice is not repeated
    /// as terminating).
    pub endpoints: Vec<Endpoint>,
    /// `spec.trafficDistribution` (for display: the choice follows the
    /// hints the EndpointSlice controller writes from it).
    pub traffic_distribution: Option<TrafficDistribution>,
    /// How the topology hints choose the Cluster-policy endpoints, per
    /// family: `[IPv4, IPv6]`.
    pub topology: [Topology; 2],
}

impl ServicePort {
    /// Whether the port is served in IPv6 (`true`) or IPv4, as kube-proxy's
    /// per-family proxiers: in the families of its ClusterIPs (IPv4 when it
    /// has none).
    pub fn serves(&self, v6: bool) -> bool {
        if self.cluster_ips.is_empty() {
            !v6
        } else {
            self.cluster_ips.iter().any(|ip| ip.is_ipv6() == v6)
        }
    }

    /// Reachable from outside the cluster: a NodePort, ExternalIPs or
    /// LoadBalancer IPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// kube-proxy's `sync_proxy_rules_no_local_endpoints_total` for this
    /// port, [internal, external]: per family it is served in, 1 when the
    /// port has endpoints but its Local traffic policy (internal; external
    /// for an externally accessible port) finds none on this node, so that
    /// traffic is dropped here.
    pub fn no_local_endpoints(&self) -> [usize; 2] {
        let mut n = [0; 2];
        for v6 in [false, true] {
            if !self.serves(v6) {
                continue;
            }
            let family = |e: &Endpoint| e.ip.is_ipv6() == v6;
            if usable_endpoints_where(&self.endpoints, false, family).is_empty()
                || !usable_endpoints_where(&self.endpoints, true, family).is_empty()
            {
                continue;
            }
            n[0] += usize::from(self.internal_policy_local);
            n[1] += usize::from(self.external_policy_local && self.externally_accessible());
        }
        n
    }
}

/// Everything the agent should program.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceTable {
    pub services: BTreeMap<ServicePortName, ServicePort>,
}

/// An object (or part of one) that could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: field {field} = {value:?}: {reason}")]
pub struct ModelError {
    pub kind: &'static str,
    /// `namespace/name`.
    pub object: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// `--nodeport-addresses` (the config file's `nodePortAddresses`): which
/// addresses of the node serve NodePorts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Unset: every InternalIP and ExternalIP of the Node object (loopback
    /// ones excepted).
    #[default]
    NodeObject,
    /// `primary` (kube-proxy's default in nftables mode): the node's
    /// primary IP of each family it has, as [`NodeContext::primary`]
    /// chooses it from the Node object.
    Primary,
    /// CIDRs (both families): every address of the host's interfaces
    /// ([`NodeContext::host_addresses`]) inside one of them, as
    /// kube-proxy; a loopback address only when a CIDR covers it.
    Cidrs(Vec<(IpAddr, u8)>),
}

/// A `--nodeport-addresses` value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodePortAddressesError {
    #[error("{0:?} is neither \"primary\" nor an IPv4 or IPv6 CIDR")]
    Invalid(String),
    /// kube-proxy rejects the mix too ("can't use both 'primary' and
    /// CIDRs").
    #[error("can't use both \"primary\" and CIDRs ({0:?}): give one or the other")]
    PrimaryAndCidrs(String),
}

impl NodePortAddresses {
    /// The keyword for the node's primary IPs.
    pub const PRIMARY: &'static str = "primary";

    /// Parse the flag's list: empty (blank entries ignored), `primary`, or
    /// CIDRs; a mix of `primary` and CIDRs is an error.
    pub fn parse(list: &[String]) -> Result<NodePortAddresses, NodePortAddressesError> {
        let mut primary = false;
        let mut cidrs = Vec::new();
        for raw in list {
            let s = raw.trim();
            if s.is_empty() {
                continue;
            }
            if s == Self::PRIMARY {
                primary = true;
            } else {
                cidrs.push(
                    parse_cidr(s).ok_or_else(|| NodePortAddressesError::Invalid(raw.clone()))?,
                );
            }
            if primary && !cidrs.is_empty() {
                return Err(NodePortAddressesError::PrimaryAndCidrs(list.join(",")));
            }
        }
        Ok(match (primary, cidrs.is_empty()) {
            (true, _) => NodePortAddresses::Primary,
            (false, true) => NodePortAddresses::NodeObject,
            (false, false) => NodePortAddresses::Cidrs(cidrs),
        })
    }

    /// The host interface addresses this setting serves NodePorts on, of
    /// `all` (sorted, each once): those inside the CIDRs; none otherwise
    /// (only CIDRs look at the host's interfaces).
    pub fn host_addresses_used(&self, all: &[IpAddr]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = all.iter().copied().filter(|a| self.covers(*a)).collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether the host's interface addresses matter (CIDRs given).
    pub fn uses_host_addresses(&self) -> bool {
        matches!(self, NodePortAddresses::Cidrs(_))
    }

    fn covers(&self, a: IpAddr) -> bool {
        match self {
            NodePortAddresses::Cidrs(cidrs) => {
                cidrs.iter().any(|(net, len)| cidr_contains(*net, *len, a))
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodePortAddresses::NodeObject => f.write_str("<the Node's addresses>"),
            NodePortAddresses::Primary => f.write_str(Self::PRIMARY),
            NodePortAddresses::Cidrs(c) => {
                for (i, (net, len)) in c.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{net}/{len}")?;
                }
                Ok(())
            }
        }
    }
}

/// What the model needs to know about the node it runs on.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub node_name: String,
    /// The node's addresses of both families (InternalIPs, then
    /// ExternalIPs of its Node object, as [`node_addresses`] orders them):
    /// the primary IPs and, by default, where NodePorts are served.
    pub addresses: Vec<IpAddr>,
    /// `--nodeport-addresses`: which addresses serve NodePorts.
    pub nodeport: NodePortAddresses,
    /// The addresses of the host's interfaces the agent found (with CIDRs
    /// in `nodeport`; unused otherwise). Filtered here, not by the agent.
    pub host_addresses: Vec<IpAddr>,
    /// `--source-ranges-all`: `loadBalancerSourceRanges` also guard the
    /// service's NodePorts and ExternalIPs, not only its LoadBalancer IPs.
    pub source_ranges_all: bool,
    /// The Node's [`LABEL_ZONE`] label (see [`node_zone`]); None: unset.
    pub zone: Option<String>,
}

impl NodeContext {
    /// The addresses NodePorts are served on (both families), each once.
    pub fn nodeport_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let list: &[IpAddr] = if self.nodeport.uses_host_addresses() {
            &self.host_addresses
        } else {
            &self.addresses
        };
        list.iter()
            .enumerate()
            .filter(move |(i, a)| {
                !list[..*i].contains(a)
                    && match &self.nodeport {
                        NodePortAddresses::NodeObject => !a.is_loopback(),
                        NodePortAddresses::Primary => self.primary(a.is_ipv6()) == Some(**a),
                        NodePortAddresses::Cidrs(_) => self.nodeport.covers(**a),
                    }
            })
            .map(|(_, a)| *a)
    }

    /// The node's primary IP of a family, as kube-proxy picks it: the
    /// first of [`NodeContext::addresses`] of that family (InternalIPs
    /// before ExternalIPs), not a loopback one.
    pub fn primary(&self, v6: bool) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.is_ipv6() == v6)
            .filter(|a| !a.is_loopback())
            .copied()
    }

    /// The node's primary IPv4 address, if it has one: what north-south
    /// flows are SNATed to and DSR answers from.
    pub fn primary_ipv4(&self) -> Option<Ipv4Addr> {
        match self.primary(false) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        }
    }
}

/// `addr` with the bits past the first `len` cleared (`len` at most the
/// family's width).
pub fn network(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// Whether `addr` lies in the network `net/len` (never across families).
pub fn cidr_contains(net: IpAddr, len: u8, addr: IpAddr) -> bool {
    net.is_ipv4() == addr.is_ipv4() && network(addr, len) == net
}

/// Parse CIDRs (`--cluster-cidr`: `a.b.c.d/n`, `fd00::/64`);
/// the error names the bad value.
pub fn parse_cidrs(list: &[String]) -> Result<Vec<(IpAddr, u8)>, String> {
    list.iter()
        .map(|s| parse_cidr(s.trim()).ok_or_else(|| format!("{s:?} is not an IPv4 or IPv6 CIDR")))
        .collect()
}

/// InternalIP/ExternalIP addresses of a Node, both families, each once:
/// the InternalIPs, then the ExternalIPs, each in the Node's order (the
/// first of a family is the node's primary IP of that family); other types
/// are skipped, unparsable addresses reported.
pub fn node_addresses(node: &k8s_openapi::api::core::v1::Node) -> (Vec<IpAddr>, Vec<ModelError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let name = node.metadata.name.clone().unwrap_or_default();
    let addrs = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    // kube-proxy's order (GetNodeHostIPs): InternalIPs, then ExternalIPs.
    let ordered = ["InternalIP", "ExternalIP"]
        .into_iter()
        .flat_map(|t| addrs.iter().enumerate().filter(move |(_, a)| a.type_ == t));
    let mut bad = Vec::new();
    for (i, a) in ordered {
        match a.address.parse::<IpAddr>() {
            Ok(ip) if !out.contains(&ip) => out.push(ip),
            Ok(_) => {}
            Err(_) => bad.push(i),
        }
    }
    // Reported in the Node's order.
    bad.sort_unstable();
    for i in bad {
        errors.push(ModelError {
            kind: "Node",
            object: name.clone(),
            field: format!("status.addresses[{i}].address"),
            value: addrs[i].address.clone(),
            reason: "not an IP address".to_owned(),
        });
    }
    (out, errors)
}

/// The Node's zone: its [`LABEL_ZONE`] label (None when unset or empty;
/// topology hints for zones are then ignored).
pub fn node_zone(node: &k8s_openapi::api::core::v1::Node) -> Option<String> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ZONE))
        .filter(|z| !z.is_empty())
        .cloned()
}

/// Build the desired table. Errors are returned alongside; the table holds
/// everything that was usable. A loop over [`build_service`] on the stored
/// forms ([`ServiceInfo`], [`SliceInfo`]): the agent's incremental path
/// builds one service at a time with the same code.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a SliceView>,
    node: &NodeContext,
) -> (ServiceTable, Vec<ModelError>) {
    let slices: Vec<SliceInfo> = slices.into_iter().map(SliceInfo::of).collect();
    let services: Vec<ServiceInfo> = services.into_iter().map(ServiceInfo::of).collect();
    build_stored(&services, &slices, node)
}

/// [`build`] from the stored forms.
pub fn build_stored<'a>(
    services: impl IntoIterator<Item = &'a ServiceInfo>,
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    node: &NodeContext,
) -> (ServiceTable, Vec<ModelError>) {
    let mut errors = Vec::new();
    let mut by_service: BTreeMap<(&str, &str), Vec<&SliceInfo>> = BTreeMap::new();
    for slice in slices {
        let Some(svc) = slice.service.as_deref() else {
            continue;
        };
        by_service
            .entry((&slice.namespace, svc))
            .or_default()
            .push(slice);
    }

    let mut table = ServiceTable::default();
    for svc in services {
        let slices = by_service
            .get(&(&*svc.namespace, &*svc.name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in build_service(svc, slices, node, &mut errors) {
            table.services.insert(port.name.clone(), port);
        }
    }
    (table, errors)
}

/// The address families a Service is served in: those of its ClusterIPs
/// (kube-proxy's per-family proxiers each take the services with a
/// ClusterIP of their family); IPv4 when none is an address.
pub fn service_families(svc: &ServiceInfo) -> Vec<AddressType> {
    let ips = svc.spec.as_ref().map_or(&[][..], |s| &s.cluster_ips[..]);
    let mut out = Vec::new();
    for f in ips.iter().filter_map(IpField::ip) {
        let family = if f.is_ipv4() {
            AddressType::V4
        } else {
            AddressType::V6
        };
        if !out.contains(&family) {
            out.push(family);
        }
    }
    if out.is_empty() {
        out.push(AddressType::V4);
    }
    out
}

/// The service ports of one Service, from the Service, the EndpointSlices
/// labelled with its name (those of `addressType` `IPv4` or `IPv6` that
/// match a family of the service, see [`service_families`]: a Service of
/// one family never gets endpoints of the other) and the node context,
/// sorted by name (a port name given twice: the later one, as a table
/// insert keeps). Errors go to `errors`.
pub fn build_service(
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    node: &NodeContext,
    errors: &mut Vec<ModelError>,
) -> Vec<ServicePort> {
    let families = service_families(svc);
    let read: Vec<&SliceInfo> = slices
        .iter()
        .copied()
        .filter(|s| s.address_type().is_some_and(|t| families.contains(&t)))
        .collect();
    let mut ports = service_ports(svc, &svc.namespace, &svc.name, &read, node, errors);
    // Stable sort: among equal names the later one ends up last; keep it.
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out: Vec<ServicePort> = Vec::with_capacity(ports.len());
    for p in ports {
        match out.last_mut() {
            Some(last) if last.name == p.name => *last = p,
            _ => out.push(p),
        }
    }
    out
}

/// Largest `sessionAffinityConfig.clientIP.timeoutSeconds` the API server
/// accepts (one day).
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

fn err(
    object: &str,
    field: impl Into<String>,
    value: impl Into<String>,
    reason: &str,
) -> ModelError {
    ModelError {
        kind: "Service",
        object: object.to_owned(),
        field: field.into(),
        value: value.into(),
        reason: reason.to_owned(),
    }
}

fn service_ports(
    svc: &ServiceInfo,
    ns: &str,
    name: &str,
    slices: &[&SliceInfo],
    node: &NodeContext,
    errors: &mut Vec<ModelError>,
) -> Vec<ServicePort> {
    let object = format!("{ns}/{name}");
    if svc.foreign {
        return Vec::new();
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => return Vec::new(),
        other => {
            errors.push(err(&object, "spec.type", other, "unknown service type"));
            return Vec::new();
        }
    };

    // clusterIPs (dual-stack aware) wins over clusterIP; "None" is headless.
    if spec
        .cluster_ips
        .iter()
        .any(|ip| matches!(ip, IpField::Other(s) if &**s == "None"))
    {
        return Vec::new();
    }
    let cluster_ips = parse_ips(&spec.cluster_ips, &object, "spec.clusterIPs", errors);
    let external_ips = parse_ips(&spec.external_ips, &object, "spec.externalIPs", errors);
    let load_balancer_ips = if service_type == ServiceType::LoadBalancer {
        parse_ips(
            &svc.load_balancer_ips,
            &object,
            "status.loadBalancer.ingress[].ip",
            errors,
        )
    } else {
        Vec::new()
    };
    let affinity_timeout = if spec.client_ip_affinity {
        let t = spec.affinity_timeout.unwrap_or(10_800);
        // The API server's range (ValidateClientIPAffinityConfig).
        match u32::try_from(t) {
            Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
            _ => {
                errors.push(err(
                    &object,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t.to_string(),
                    "must be between 1 and 86400",
                ));
                Some(10_800)
            }
        }
    } else {
        None
    };
    let external_policy_local = spec.external_policy_local;
    let internal_policy_local = spec.internal_policy_local;
    let maglev_table_size =
        svc.maglev_table_size
            .as_deref()
            .and_then(|v| match v.trim().parse::<u32>() {
                Ok(n) if crate::maglev::is_prime(n) && n <= crate::maglev::MAX_TABLE_SIZE => {
                    Some(n)
                }
                _ => {
                    errors.push(err(
                        &object,
                        format!("metadata.annotations[{ANNOTATION_MAGLEV_TABLE_SIZE}]"),
                        v,
                        "must be a prime number no larger than 1048576",
                    ));
                    None
                }
            });
    let mut source_ranges = Vec::new();
    for (i, r) in spec.source_ranges.iter().enumerate() {
        match parse_cidr(r.trim()) {
            Some(c) => source_ranges.push(c),
            None => errors.push(err(
                &object,
                format!("spec.loadBalancerSourceRanges[{i}]"),
                &**r,
                "not a CIDR",
            )),
        }
    }
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(p) => match u16::try_from(p) {
            Ok(p) if external_policy_local => Some(p),
            Ok(_) => None,
            Err(_) => {
                errors.push(err(
                    &object,
                    "spec.healthCheckNodePort",
                    p.to_string(),
                    "not a port number",
                ));
                None
            }
        },
    };

    let mut out = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let protocol = match &p.protocol {
            ProtocolField::Known(p) => *p,
            ProtocolField::Unknown(raw) => {
                errors.push(err(
                    &object,
                    format!("spec.ports[{i}].protocol"),
                    &**raw,
                    "unsupported protocol",
                ));
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            errors.push(err(
                &object,
                format!("spec.ports[{i}].port"),
                p.port.to_string(),
                "not a port number",
            ));
            continue;
        };
        if port == 0 {
            errors.push(err(
                &object,
                format!("spec.ports[{i}].port"),
                "0",
                "not a port number",
            ));
            continue;
        }
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => match u16::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    errors.push(err(
                        &object,
                        format!("spec.ports[{i}].nodePort"),
                        n.to_string(),
                        "not a port number",
                    ));
                    None
                }
            },
        };
        let port_name = p.name.to_string();
        let (endpoints, topology) =
            endpoints_for(slices, &port_name, protocol, node, &object, errors);
        out.push(ServicePort {
            name: ServicePortName {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                port: port_name,
                protocol,
            },
            service_type,
            cluster_ips: cluster_ips.clone(),
            port,
            node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            affinity_timeout,
            external_policy_local,
            internal_policy_local,
            health_check_node_port,
            source_ranges: source_ranges.clone(),
            maglev_table_size,
            endpoints,
            traffic_distribution: spec.traffic_distribution,
            topology,
        });
    }
    out
}

/// `a.b.c.d/n` or `fd00::/n` -> (network, n), host bits cleared; garbage
/// (or a prefix longer than the family's width) -> None.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    let ip = ip.parse::<IpAddr>().ok()?;
    let width = if ip.is_ipv4() { 32 } else { 128 };
    (len <= width).then(|| (network(ip, len), len))
}

fn parse_ips(
    raw: &[IpField],
    object: &str,
    field: &str,
    errors: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (i, ip) in raw.iter().enumerate() {
        match ip.ip() {
            Some(ip) => out.push(ip),
            None => errors.push(err(
                object,
                format!("{field}[{i}]"),
                ip.raw(),
                "not an IP address",
            )),
        }
    }
    out
}

/// The candidate endpoints of `port_name`/`protocol`: ready ones and
/// serving+terminating ones, with what the topology hints choose per
/// family (`[IPv4, IPv6]`).
fn endpoints_for(
    slices: &[&SliceInfo],
    port_name: &str,
    protocol: Protocol,
    node: &NodeContext,
    service: &str,
    errors: &mut Vec<ModelError>,
) -> (Vec<Endpoint>, [Topology; 2]) {
    // Endpoint (not yet placed in its topology) -> what its hints say
    // about this node; an address listed twice has the hints of both.
    let mut ready: BTreeMap<Endpoint, topology::HintMatch> = BTreeMap::new();
    let mut terminating: BTreeMap<Endpoint, topology::HintMatch> = BTreeMap::new();
    for slice in slices {
        let slice_name = || format!("{}/{}", slice.namespace, slice.name);
        let Some(target) = slice.ports.iter().find_map(|p| {
            let name_matches = &*p.name == port_name;
            let proto_matches = p.protocol == ProtocolField::Known(protocol);
            (name_matches && proto_matches).then_some(p.port)
        }) else {
            continue;
        };
        let Some(Ok(target)) = target.map(u16::try_from) else {
            errors.push(ModelError {
                kind: "EndpointSlice",
                object: slice_name(),
                field: format!("ports[name={port_name:?}].port"),
                value: format!("{target:?}"),
                reason: format!("no usable port number for service {service}"),
            });
            continue;
        };
        let hints = topology::SliceMatcher::new(slice.hints(), node);
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let is_ready = ep.conditions & READY != 0;
            let is_serving = ep.conditions & SERVING != 0;
            let is_terminating = ep.conditions & TERMINATING != 0;
            let local = slice.node_of(&ep) == Some(node.node_name.as_str());
            let hint = hints.of(i);
            // As kube-proxy: `ready` decides (publishNotReadyAddresses
            // makes the controller report every address ready).
            let into = if is_ready {
                &mut ready
            } else if is_serving && is_terminating {
                &mut terminating
            } else {
                continue;
            };
            let e = Endpoint {
                ip: ep.ip,
                port: target,
                ready: is_ready,
                terminating: is_terminating,
                local,
                in_topology: true,
            };
            *into.entry(e).or_default() |= hint;
        }
        let family = slice.address_type().map_or("", AddressType::name);
        for b in slice.bad_addresses().iter() {
            errors.push(ModelError {
                kind: "EndpointSlice",
                object: slice_name(),
                field: format!("endpoints[{}].addresses[{}]", b.endpoint, b.address),
                value: b.value.to_string(),
                reason: format!("not an {family} address"),
            });
        }
        for b in slice.bad_hints().iter() {
            errors.push(ModelError {
                kind: "EndpointSlice",
                object: slice_name(),
                field: format!(
                    "endpoints[{}].hints.{}[{}].name",
                    b.endpoint, b.field, b.index
                ),
                value: b.value.as_deref().unwrap_or_default().to_owned(),
                reason: "a hint without a name; the hint is ignored".to_owned(),
            });
        }
    }
    // An address listed ready in one slice wins over a terminating copy.
    let ready_addrs: BTreeSet<(IpAddr, u16)> = ready.keys().map(|e| (e.ip, e.port)).collect();
    let candidates: Vec<(Endpoint, topology::HintMatch)> = ready
        .into_iter()
        .chain(
            terminating
                .into_iter()
                .filter(|(e, _)| !ready_addrs.contains(&(e.ip, e.port))),
        )
        .collect();
    // Each family chooses on its own, from its ready endpoints.
    let choice = [false, true].map(|v6| {
        topology::choose(
            candidates
                .iter()
                .filter(|(e, _)| e.ready && e.ip.is_ipv6() == v6)
                .map(|(_, h)| *h),
            node,
        )
    });
    let endpoints = candidates
        .into_iter()
        .map(|(mut e, h)| {
            e.in_topology = choice[usize::from(e.ip.is_ipv6())].admits(h);
            e
        })
        .collect();
    (endpoints, choice)
}

/// A ClusterIP service port `default/web`, 10.96.0.10:80/TCP, with ready
/// `endpoints` (address, on this node) on port 8080: what unit tests start
/// from.
#[cfg(test)]
pub(crate) fn test_port(endpoints: &[(&str, bool)]) -> ServicePort {
    ServicePort {
        name: ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port: String::new(),
            protocol: Protocol::Tcp,
        },
        service_type: ServiceType::ClusterIP,
        cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 10).into()],
        port: 80,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        affinity_timeout: None,
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        source_ranges: vec![],
        maglev_table_size: None,
        endpoints: endpoints
            .iter()
            .map(|(ip, local)| Endpoint {
                ip: ip.parse().expect("an address"),
                port: 8080,
                ready: true,
                terminating: false,
                local: *local,
                in_topology: true,
            })
            .collect(),
        traffic_distribution: None,
        topology: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_slice_keeps_its_trigger_time_and_nothing_else_of_its_annotations() {
        let mut s: SliceView = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
                "annotations": {
                    "endpoints.kubernetes.io/last-change-trigger-time": "2026-12-06T03:40:01.5Z",
                    "other": "x",
                },
            },
            "addressType": "IPv4",
            "endpoints": [],
        }))
        .expect("a slice");
        trim_slice(&mut s);
        assert_eq!(s.service.as_deref(), Some("web"));
        assert_eq!(
            s.trigger_time,
            Some(UNIX_EPOCH + Duration::from_millis(1_796_528_401_500))
        );
        assert!(s.metadata.annotations.is_none() && s.metadata.labels.is_none());
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    /// kube-proxy counts a service port (per family) when it has endpoints
    /// but its Local policy finds none on this node; external only when
    /// the port is reachable from outside.
    #[test]
    fn no_local_endpoints_counts_local_policies_that_drop_here() {
        let remote = [("10.244.2.5", false)];
        let mut sp = test_port(&remote);
        assert_eq!(sp.no_local_endpoints(), [0, 0], "Cluster policies");
        sp.internal_policy_local = true;
        sp.external_policy_local = true;
        assert_eq!(sp.no_local_endpoints(), [1, 0], "not externally accessible");
        sp.node_port = Some(30080);
        assert_eq!(sp.no_local_endpoints(), [1, 1]);
        let mut local = test_port(&[("10.244.2.5", false), ("10.244.1.5", true)]);
        local.internal_policy_local = true;
        local.external_policy_local = true;
        local.node_port = Some(30080);
        assert_eq!(local.no_local_endpoints(), [0, 0], "a local endpoint");
        let mut none = test_port(&[]);
        none.internal_policy_local = true;
        assert_eq!(none.no_local_endpoints(), [0, 0], "no endpoints at all");
        let mut dual = test_port(&[("10.244.2.5", false), ("fd00:244:2::5", false)]);
        dual.cluster_ips
            .push("fd00:96::10".parse().expect("an address"));
        dual.internal_policy_local = true;
        assert_eq!(dual.no_local_endpoints(), [2, 0], "one per family");
    }
}
