//! What the agent keeps of each watched Service and EndpointSlice: only the
//! fields [`super::build_service`] reads, in compact types. The cache holds
//! one of these per object of the cluster (100,000 services and 1,000,000
//! endpoints at the largest scale the benchmark runs), so every byte here
//! is paid a million times: an endpoint is 12 bytes (its IPv4 address, an
//! index into its slice's node names, its conditions), where the watched
//! form costs about 120 with its strings.
//!
//! Lossless for the model: every value the model can report in an error
//! (an address that does not parse, an unknown protocol, ...) is kept as
//! the API wrote it, so errors still name the object, the field and the
//! value.

use std::{
    net::{IpAddr, Ipv4Addr},
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
    /// IPv6: served once dual stack lands, skipped meanwhile.
    V6,
    /// Not an IP address (`None` for a headless service, or garbage): the
    /// value as written.
    Other(Box<str>),
}

impl IpField {
    fn of(raw: &str) -> IpField {
        match raw.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => IpField::V4(ip),
            Ok(IpAddr::V6(_)) => IpField::V6,
            Err(_) => IpField::Other(raw.into()),
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

/// One address of one endpoint of an IPv4 EndpointSlice (an endpoint with
/// two addresses is two of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: Ipv4Addr,
    /// Index into [`SliceInfo::nodes`]; [`NO_NODE`]: none.
    pub node: u32,
    /// [`READY`], [`SERVING`], [`TERMINATING`], defaults applied.
    pub conditions: u8,
}

/// An address of an IPv4 slice that is not an IPv4 address, kept to be
/// reported: `endpoints[endpoint].addresses[address]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadAddress {
    pub endpoint: u32,
    pub address: u32,
    pub value: Box<str>,
}

/// What the model reads of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceInfo {
    /// Shared with the cache's keys (and interned there).
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label.
    pub service: Option<Arc<str>>,
    /// `addressType: IPv4`: the only slices the model reads (the others
    /// keep no ports or endpoints).
    pub ipv4: bool,
    pub ports: Box<[SlicePortInfo]>,
    /// The distinct node names of the endpoints.
    pub nodes: Box<[Box<str>]>,
    pub endpoints: Box<[EndpointInfo]>,
    pub bad_addresses: Box<[BadAddress]>,
}

impl SliceInfo {
    pub fn of(s: &SliceView) -> SliceInfo {
        let ipv4 = s.address_type == "IPv4";
        let mut info = SliceInfo {
            namespace: s.metadata.namespace.as_deref().unwrap_or_default().into(),
            name: s.metadata.name.as_deref().unwrap_or_default().into(),
            service: s.service_name().map(Into::into),
            ipv4,
            ..Default::default()
        };
        if !ipv4 {
            return info;
        }
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
        let mut nodes: Vec<&str> = Vec::new();
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        let mut bad = Vec::new();
        for (i, ep) in s.endpoints.iter().enumerate() {
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
                Some(n) => match nodes.iter().position(|x| *x == n) {
                    Some(at) => at as u32,
                    None => {
                        nodes.push(n);
                        (nodes.len() - 1) as u32
                    }
                },
            };
            for (j, addr) in ep.addresses.iter().enumerate() {
                match addr.parse::<Ipv4Addr>() {
                    Ok(ip) => endpoints.push(EndpointInfo {
                        ip,
                        node,
                        conditions,
                    }),
                    Err(_) => bad.push(BadAddress {
                        endpoint: i as u32,
                        address: j as u32,
                        value: addr.as_str().into(),
                    }),
                }
            }
        }
        info.nodes = nodes.into_iter().map(Into::into).collect();
        info.endpoints = endpoints.into_boxed_slice();
        info.bad_addresses = bad.into_boxed_slice();
        info
    }

    /// The node name of an endpoint.
    pub fn node_of(&self, e: &EndpointInfo) -> Option<&str> {
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
        assert_eq!(std::mem::size_of::<EndpointInfo>(), 12);
        assert!(std::mem::size_of::<SliceInfo>() <= 120);
        assert!(std::mem::size_of::<ServiceInfo>() <= 176);
        assert!(std::mem::size_of::<IpField>() <= 24);
    }
}
