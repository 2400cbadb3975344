//! What the agent keeps of each watched Service and EndpointSlice: only the
//! fields [`super::build_service`] reads, in compact types. The cache holds
//! one of these per object of the cluster (100,000 services and 1,000,000
//! endpoints at the largest scale the benchmark runs), so every byte here
//! is paid a million times: an endpoint of an IPv4 slice is 12 bytes (its
//! address, an index into its slice's node names, its conditions), one of
//! an IPv6 slice 24, where the watched form costs about 120 with its
//! strings. The address family is stored once per slice
//! ([`SliceEndpoints`]), not per endpoint. Topology hints, and addresses
//! that do not parse, are rare: they live in a side table of their slice
//! ([`SliceExtra`], [`SliceHints`]), so an endpoint without hints costs
//! not a byte more.
//!
//! Lossless for the model: every value the model can report in an error
//! (an address that does not parse, an unknown protocol, ...) is kept as
//! the API wrote it, so errors still name the object, the field and the
//! value.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Service;

use super::{
    ANNOTATION_MAGLEV_TABLE_SIZE, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME, Protocol, SliceView,
};

/// A protocol field: one the model knows, or the value as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolField {
    Known(Protocol),
    Unknown(Box<str>),
}

impl ProtocolField {
    /// The field as the API has it; unset means TCP.
    fn of(raw: Option<&str>) -> ProtocolField {
        let raw = raw.unwrap_or("TCP");
        match Protocol::parse(raw) {
            Some(p) => ProtocolField::Known(p),
            None => ProtocolField::Unknown(raw.into()),
        }
    }
}

/// An address field of a Service (`spec.clusterIPs`, `spec.externalIPs`,
/// `status.loadBalancer.ingress[].ip`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpField {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// Not an IP address (`None` for a headless service, or garbage): the
    /// value as written.
    Other(Box<str>),
}

impl IpField {
    fn of(raw: &str) -> IpField {
        match raw.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => IpField::V4(ip),
            Ok(IpAddr::V6(ip)) => IpField::V6(ip),
            Err(_) => IpField::Other(raw.into()),
        }
    }

    /// The value as written (an address as it prints).
    pub fn raw(&self) -> String {
        match self {
            IpField::V4(ip) => ip.to_string(),
            IpField::V6(ip) => ip.to_string(),
            IpField::Other(s) => s.to_string(),
        }
    }

    /// The address, if the field holds one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            IpField::V4(ip) => Some(IpAddr::V4(*ip)),
            IpField::V6(ip) => Some(IpAddr::V6(*ip)),
            IpField::Other(_) => None,
        }
    }

    fn list<'a>(raw: impl IntoIterator<Item = &'a str>) -> Box<[IpField]> {
        raw.into_iter().map(IpField::of).collect()
    }
}

/// One `spec.ports[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// `name`; empty when unset.
    pub name: Box<str>,
    pub protocol: ProtocolField,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// What the model reads of a Service's spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecInfo {
    /// `type`, as written (unset: ClusterIP).
    pub type_: Option<Box<str>>,
    /// `clusterIPs`, or `[clusterIP]` when that is empty.
    pub cluster_ips: Box<[IpField]>,
    pub external_ips: Box<[IpField]>,
    /// `sessionAffinity: ClientIP`.
    pub client_ip_affinity: bool,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
    /// `externalTrafficPolicy: Local`.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `loadBalancerSourceRanges`, as written.
    pub source_ranges: Box<[Box<str>]>,
    /// `trafficDistribution` (the EndpointSlice controller turns it into
    /// hints; the model reads the hints, not this).
    pub traffic_distribution: Option<super::TrafficDistribution>,
    pub health_check_node_port: Option<i32>,
    pub ports: Box<[PortInfo]>,
}

/// What the model reads of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Shared with the cache's keys (and interned there).
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// Labelled `service.kubernetes.io/service-proxy-name` or
    /// `service.kubernetes.io/headless`: not this proxy's.
    pub foreign: bool,
    /// The [`ANNOTATION_MAGLEV_TABLE_SIZE`] annotation, as written.
    pub maglev_table_size: Option<Box<str>>,
    /// None: the Service has no spec.
    pub spec: Option<SpecInfo>,
    /// `status.loadBalancer.ingress[].ip` (entries without one skipped).
    pub load_balancer_ips: Box<[IpField]>,
}

impl ServiceInfo {
    pub fn of(svc: &Service) -> ServiceInfo {
        let m = &svc.metadata;
        let foreign = m.labels.as_ref().is_some_and(|l| {
            l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS)
        });
        let maglev_table_size = m
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_MAGLEV_TABLE_SIZE))
            .map(|v| v.as_str().into());
        let spec = svc.spec.as_ref().map(|s| {
            let cluster_ips = match (&s.cluster_ips, &s.cluster_ip) {
                (Some(ips), _) if !ips.is_empty() => IpField::list(ips.iter().map(String::as_str)),
                (_, Some(ip)) if !ip.is_empty() => IpField::list([ip.as_str()]),
                _ => Box::default(),
            };
            SpecInfo {
                type_: s.type_.as_deref().map(Into::into),
                cluster_ips,
                external_ips: IpField::list(s.external_ips.iter().flatten().map(String::as_str)),
                client_ip_affinity: s.session_affinity.as_deref() == Some("ClientIP"),
                affinity_timeout: s
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds),
                external_policy_local: s.external_traffic_policy.as_deref() == Some("Local"),
                internal_policy_local: s.internal_traffic_policy.as_deref() == Some("Local"),
                source_ranges: s
                    .load_balancer_source_ranges
                    .iter()
                    .flatten()
                    .map(|r| r.as_str().into())
                    .collect(),
                health_check_node_port: s.health_check_node_port,
                traffic_distribution: s
                    .traffic_distribution
                    .as_deref()
                    .map(super::TrafficDistribution::parse),
                ports: s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| PortInfo {
                        name: p.name.as_deref().unwrap_or_default().into(),
                        protocol: ProtocolField::of(p.protocol.as_deref()),
                        port: p.port,
                        node_port: p.node_port,
                    })
                    .collect(),
            }
        });
        let load_balancer_ips = IpField::list(
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.as_deref()),
        );
        ServiceInfo {
            namespace: m.namespace.as_deref().unwrap_or_default().into(),
            name: m.name.as_deref().unwrap_or_default().into(),
            foreign,
            maglev_table_size,
            spec,
            load_balancer_ips,
        }
    }
}

/// One `ports[]` entry of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortInfo {
    /// `name`; empty when unset.
    pub name: Box<str>,
    pub protocol: ProtocolField,
    pub port: Option<i32>,
}

/// `conditions.ready` (unset: true).
pub const READY: u8 = 1;
/// `conditions.serving` (unset: as ready).
pub const SERVING: u8 = 2;
/// `conditions.terminating` (unset: false).
pub const TERMINATING: u8 = 4;

/// No node name.
pub const NO_NODE: u32 = u32::MAX;

/// One address of one endpoint of an EndpointSlice (an endpoint with two
/// addresses is two of these); `A` is the slice's address type
/// ([`Ipv4Addr`] or [`Ipv6Addr`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo<A = Ipv4Addr> {
    pub ip: A,
    /// Index into [`SliceInfo::nodes`]; [`NO_NODE`]: none.
    pub node: u32,
    /// [`READY`], [`SERVING`], [`TERMINATING`], defaults applied.
    pub conditions: u8,
}

/// An address of a slice that is not an address of the slice's
/// `addressType`, kept to be reported:
/// `endpoints[endpoint].addresses[address]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadAddress {
    pub endpoint: u32,
    pub address: u32,
    pub value: Box<str>,
}

/// A topology hint of a slice that cannot be used (it has no name):
/// `endpoints[endpoint].hints.<field>[index].name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadHint {
    pub endpoint: u32,
    /// `forZones` or `forNodes`.
    pub field: &'static str,
    pub index: u32,
    /// The name as written (None: unset).
    pub value: Option<Box<str>>,
}

/// No hints: an endpoint of [`SliceHints::of`] without any.
pub const NO_HINTS: u32 = u32::MAX;

/// One endpoint's `hints`: indexes into [`SliceHints::names`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HintSet {
    /// `forZones[].name`.
    pub zones: Box<[u32]>,
    /// `forNodes[].name`.
    pub nodes: Box<[u32]>,
}

/// The topology hints of a slice's endpoints. Endpoints of one zone (or
/// node) share one [`HintSet`], and every name is held once per slice: a
/// hinted endpoint costs its 4-byte index into [`SliceHints::sets`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceHints {
    /// The distinct zone and node names the hints give.
    pub names: Box<[Box<str>]>,
    /// The distinct hint sets.
    pub sets: Box<[HintSet]>,
    /// Per endpoint address, parallel to [`SliceInfo::endpoints`]: index
    /// into `sets`; [`NO_HINTS`]: none.
    pub of: Box<[u32]>,
}

impl SliceHints {
    /// The hints of the endpoint address at `index` (None: it has none).
    pub fn of(&self, index: usize) -> Option<&HintSet> {
        self.of.get(index).and_then(|s| self.sets.get(*s as usize))
    }

    /// The index of `name` in [`SliceHints::names`], if a hint gives it.
    pub fn name_index(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .position(|n| &**n == name)
            .map(|i| i as u32)
    }
}

/// What few slices have: addresses that do not parse, topology hints.
/// Boxed in [`SliceInfo::extra`]: a slice without them pays one pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceExtra {
    pub bad_addresses: Box<[BadAddress]>,
    /// None: no endpoint of the slice has hints.
    pub hints: Option<SliceHints>,
    pub bad_hints: Box<[BadHint]>,
}

/// What the model reads of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceInfo {
    /// Shared with the cache's keys (and interned there).
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<Arc<str>>,
    pub ports: Box<[SlicePortInfo]>,
    /// The distinct node names of the endpoints.
    pub nodes: Box<[Box<str>]>,
    /// The endpoints, typed by the slice's `addressType`.
    pub endpoints: SliceEndpoints,
    /// Bad addresses and topology hints; None: neither.
    pub extra: Option<Box<SliceExtra>>,
}

/// The endpoints of a slice, by its `addressType`: `IPv4` and `IPv6`
/// slices are read; the others (`FQDN`) keep no ports or endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SliceEndpoints {
    #[default]
    Other,
    V4(Box<[EndpointInfo<Ipv4Addr>]>),
    V6(Box<[EndpointInfo<Ipv6Addr>]>),
}

impl SliceEndpoints {
    /// Every endpoint address, the address widened to [`IpAddr`].
    pub fn iter(&self) -> impl Iterator<Item = EndpointInfo<IpAddr>> + '_ {
        fn widen<A: Copy + Into<IpAddr>>(e: &EndpointInfo<A>) -> EndpointInfo<IpAddr> {
            EndpointInfo {
                ip: e.ip.into(),
                node: e.node,
                conditions: e.conditions,
            }
        }
        let (v4, v6) = match self {
            SliceEndpoints::Other => (&[][..], &[][..]),
            SliceEndpoints::V4(e) => (&e[..], &[][..]),
            SliceEndpoints::V6(e) => (&[][..], &e[..]),
        };
        v4.iter().map(widen).chain(v6.iter().map(widen))
    }

    pub fn len(&self) -> usize {
        match self {
            SliceEndpoints::Other => 0,
            SliceEndpoints::V4(e) => e.len(),
            SliceEndpoints::V6(e) => e.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An EndpointSlice's `addressType`, as far as the model reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    V4,
    V6,
}

impl AddressType {
    /// `IPv4` or `IPv6`; None for any other type (`FQDN`).
    pub fn of(raw: &str) -> Option<AddressType> {
        match raw {
            "IPv4" => Some(AddressType::V4),
            "IPv6" => Some(AddressType::V6),
            _ => None,
        }
    }

    /// The API's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            AddressType::V4 => "IPv4",
            AddressType::V6 => "IPv6",
        }
    }
}

/// Parses the addresses of a slice of one address type `A`; what does not
/// parse as an `A` becomes a [`BadAddress`].
fn parse_endpoints<A: std::str::FromStr>(
    s: &SliceView,
    nodes: &mut Vec<Box<str>>,
    extra: &mut SliceExtra,
) -> Box<[EndpointInfo<A>]> {
    let mut names: Vec<&str> = Vec::new();
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    let mut hints = HintsBuilder::default();
    let mut bad = Vec::new();
    let mut bad_hints = Vec::new();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let set = hints.add(i, ep.hints.as_deref(), &mut bad_hints);
        let cond = ep.conditions.as_ref();
        // Per the API, an unset `ready` or `serving` means true.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let conditions = (u8::from(ready) * READY)
            | (u8::from(serving) * SERVING)
            | (u8::from(terminating) * TERMINATING);
        let node = match ep.node_name.as_deref() {
            None => NO_NODE,
            Some(n) => match names.iter().position(|x| *x == n) {
                Some(at) => at as u32,
                None => {
                    names.push(n);
                    (names.len() - 1) as u32
                }
            },
        };
        for (j, addr) in ep.addresses.iter().enumerate() {
            match addr.parse::<A>() {
                Ok(ip) => {
                    endpoints.push(EndpointInfo {
                        ip,
                        node,
                        conditions,
                    });
                    hints.of.push(set);
                }
                Err(_) => bad.push(BadAddress {
                    endpoint: i as u32,
                    address: j as u32,
                    value: addr.as_str().into(),
                }),
            }
        }
    }
    *nodes = names.into_iter().map(Into::into).collect();
    extra.bad_addresses = bad.into_boxed_slice();
    extra.bad_hints = bad_hints.into_boxed_slice();
    extra.hints = hints.finish();
    endpoints.into_boxed_slice()
}

/// Collects a slice's hints into a [`SliceHints`]: names and sets each
/// once.
#[derive(Default)]
struct HintsBuilder<'a> {
    names: Vec<&'a str>,
    sets: Vec<HintSet>,
    of: Vec<u32>,
}

impl<'a> HintsBuilder<'a> {
    /// The set of endpoint `endpoint`'s hints ([`NO_HINTS`]: none); names
    /// that cannot be used go to `bad`.
    fn add(
        &mut self,
        endpoint: usize,
        hints: Option<&'a super::HintsView>,
        bad: &mut Vec<BadHint>,
    ) -> u32 {
        let Some(h) = hints else {
            return NO_HINTS;
        };
        let mut names = |field: &'static str, list: &'a [super::HintName]| -> Box<[u32]> {
            let mut out = Vec::new();
            for (j, n) in list.iter().enumerate() {
                match n.name.as_deref() {
                    Some(name) if !name.is_empty() => {
                        let at = match self.names.iter().position(|x| *x == name) {
                            Some(at) => at,
                            None => {
                                self.names.push(name);
                                self.names.len() - 1
                            }
                        };
                        if !out.contains(&(at as u32)) {
                            out.push(at as u32);
                        }
                    }
                    other => bad.push(BadHint {
                        endpoint: endpoint as u32,
                        field,
                        index: j as u32,
                        value: other.map(Into::into),
                    }),
                }
            }
            out.into_boxed_slice()
        };
        let set = HintSet {
            zones: names("forZones", &h.for_zones),
            nodes: names("forNodes", &h.for_nodes),
        };
        if set.zones.is_empty() && set.nodes.is_empty() {
            return NO_HINTS;
        }
        match self.sets.iter().position(|s| *s == set) {
            Some(at) => at as u32,
            None => {
                self.sets.push(set);
                (self.sets.len() - 1) as u32
            }
        }
    }

    fn finish(self) -> Option<SliceHints> {
        if self.sets.is_empty() {
            return None;
        }
        Some(SliceHints {
            names: self.names.into_iter().map(Into::into).collect(),
            sets: self.sets.into_boxed_slice(),
            of: self.of.into_boxed_slice(),
        })
    }
}

impl SliceInfo {
    pub fn of(s: &SliceView) -> SliceInfo {
        let mut info = SliceInfo {
            namespace: s.metadata.namespace.as_deref().unwrap_or_default().into(),
            name: s.metadata.name.as_deref().unwrap_or_default().into(),
            service: s.service_name().map(Into::into),
            ..Default::default()
        };
        let Some(family) = AddressType::of(&s.address_type) else {
            return info;
        };
        info.ports = s
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePortInfo {
                name: p.name.as_deref().unwrap_or_default().into(),
                protocol: ProtocolField::of(p.protocol.as_deref()),
                port: p.port,
            })
            .collect();
        let mut nodes = Vec::new();
        let mut extra = SliceExtra::default();
        info.endpoints = match family {
            AddressType::V4 => SliceEndpoints::V4(parse_endpoints(s, &mut nodes, &mut extra)),
            AddressType::V6 => SliceEndpoints::V6(parse_endpoints(s, &mut nodes, &mut extra)),
        };
        info.nodes = nodes.into_boxed_slice();
        if extra != SliceExtra::default() {
            info.extra = Some(Box::new(extra));
        }
        info
    }

    /// The addresses of the slice that are not of its `addressType`.
    pub fn bad_addresses(&self) -> &[BadAddress] {
        self.extra.as_ref().map_or(&[], |e| &e.bad_addresses)
    }

    /// The topology hints of the slice's endpoints, if any has one.
    pub fn hints(&self) -> Option<&SliceHints> {
        self.extra.as_ref().and_then(|e| e.hints.as_ref())
    }

    /// The hints that cannot be used.
    pub fn bad_hints(&self) -> &[BadHint] {
        self.extra.as_ref().map_or(&[], |e| &e.bad_hints)
    }

    /// The slice's address type, if the model reads it (`IPv4`, `IPv6`).
    pub fn address_type(&self) -> Option<AddressType> {
        match self.endpoints {
            SliceEndpoints::Other => None,
            SliceEndpoints::V4(_) => Some(AddressType::V4),
            SliceEndpoints::V6(_) => Some(AddressType::V6),
        }
    }

    /// The node name of an endpoint.
    pub fn node_of<A>(&self, e: &EndpointInfo<A>) -> Option<&str> {
        self.nodes.get(e.node as usize).map(|n| &**n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-object footprint the cache pays (a regression guard: these
    /// are held once per Service, slice or endpoint of the cluster).
    #[test]
    fn stored_forms_stay_compact() {
        assert_eq!(std::mem::size_of::<EndpointInfo<Ipv4Addr>>(), 12);
        assert_eq!(std::mem::size_of::<EndpointInfo<Ipv6Addr>>(), 24);
        assert!(std::mem::size_of::<SliceInfo>() <= 120);
        assert!(std::mem::size_of::<ServiceInfo>() <= 176);
        assert!(std::mem::size_of::<IpField>() <= 24);
    }
}
