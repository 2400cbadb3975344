//! The service table flattened into frontends (address, port, protocol)
//! with their backend lists: what every dataplane programs. Pure.
//!
//! Dual stack: a frontend is of one address family and gets only the
//! endpoints and source ranges of that family; a Service of one family
//! never gets endpoints of the other.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use crate::model::{
    NodeContext, Protocol, ServicePort, ServicePortName, ServiceTable, usable_endpoints_where,
};

/// Where traffic is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `10.96.0.10:80/TCP`, `[fd00:96::10]:80/TCP`.
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// A backend as the data path sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub terminating: bool,
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// Backends in a stable order (sorted). Empty: traffic is rejected.
    pub backends: Vec<BackendAddr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0: none.
    pub affinity_timeout: u32,
    /// Client networks allowed (LoadBalancer frontends with
    /// `loadBalancerSourceRanges`), of the frontend's family only; empty:
    /// any client.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// Per-service Maglev table size (annotation); None: the agent's.
    pub maglev_table_size: Option<u32>,
    /// The traffic policy that applies to this frontend is `Local`
    /// (internal for ClusterIP, external for the others): `backends` are
    /// this node's endpoints only.
    pub local_only: bool,
}

/// Frontends with the service port they came from (for display only: the
/// data path does not need it and [`crate::diff`] ignores it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LbTable {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub owners: BTreeMap<FrontendKey, ServicePortName>,
}

impl LbTable {
    /// Every frontend of every service port (see [`port_frontends`]).
    /// When two services claim the same frontend, the first (by namespace,
    /// name, port) keeps it, as the API server's allocation would not allow
    /// the clash in the first place.
    pub fn from_services(table: &ServiceTable, node: &NodeContext) -> LbTable {
        let mut lb = LbTable::default();
        for (name, sp) in &table.services {
            for (key, fe) in port_frontends(sp, node) {
                if lb.frontends.contains_key(&key) {
                    continue;
                }
                lb.frontends.insert(key, fe);
                lb.owners.insert(key, name.clone());
            }
        }
        lb
    }
}

/// The frontends of one service port, each key once (the first wins):
/// * ClusterIP, with the endpoints `internalTrafficPolicy` allows;
/// * NodePort on each of the node's addresses, ExternalIPs and
///   LoadBalancer ingress IPs, with the endpoints `externalTrafficPolicy`
///   allows.
///
/// Local policy means this node's endpoints only; none local means no
/// backend, so traffic is rejected here, never sent to another node.
///
/// Families, as kube-proxy's per-family proxiers: the service is served in
/// the families of its ClusterIPs (IPv4 when it has none); an address of
/// another family (a NodePort node address, an ExternalIP) gets no
/// frontend. Each frontend gets the endpoints and source ranges of its own
/// family only.
pub fn port_frontends(sp: &ServicePort, node: &NodeContext) -> Vec<(FrontendKey, Frontend)> {
    let serves = |v6: bool| -> bool {
        if sp.cluster_ips.is_empty() {
            !v6
        } else {
            sp.cluster_ips.iter().any(|ip| ip.is_ipv6() == v6)
        }
    };
    // Backends per (family, traffic policy), index [v6][local_only].
    let backends = |v6: bool, local_only: bool| -> Vec<BackendAddr> {
        if !serves(v6) {
            return Vec::new();
        }
        usable_endpoints_where(&sp.endpoints, local_only, |e| e.ip.is_ipv6() == v6)
            .into_iter()
            .map(|e| BackendAddr {
                addr: e.ip,
                port: e.port,
                terminating: !e.ready,
                local: e.local,
            })
            .collect()
    };
    let lists = [false, true].map(|v6| {
        [
            backends(v6, sp.internal_policy_local),
            backends(v6, sp.external_policy_local),
        ]
    });
    let proto = sp.name.protocol;
    let affinity_timeout = sp.affinity_timeout.unwrap_or(0);
    let mut out: Vec<(FrontendKey, Frontend)> = Vec::new();
    let mut add = |addr: IpAddr, port: u16, kind: FrontendKind| {
        let v6 = addr.is_ipv6();
        if !serves(v6) {
            return;
        }
        let internal = kind == FrontendKind::ClusterIp;
        let local_only = if internal {
            sp.internal_policy_local
        } else {
            sp.external_policy_local
        };
        let key = FrontendKey { addr, port, proto };
        if out.iter().any(|(k, _)| *k == key) {
            return;
        }
        let guarded = kind == FrontendKind::LoadBalancer
            || (node.source_ranges_all && kind != FrontendKind::ClusterIp);
        let source_ranges = if guarded {
            sp.source_ranges
                .iter()
                .filter(|(net, _)| net.is_ipv6() == v6)
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        out.push((
            key,
            Frontend {
                kind,
                backends: lists[usize::from(v6)][usize::from(!internal)].clone(),
                affinity_timeout,
                source_ranges,
                maglev_table_size: sp.maglev_table_size,
                local_only,
            },
        ));
    };
    for ip in &sp.cluster_ips {
        add(*ip, sp.port, FrontendKind::ClusterIp);
    }
    if let Some(np) = sp.node_port {
        for ip in node.nodeport_addresses() {
            add(ip, np, FrontendKind::NodePort);
        }
    }
    for ip in &sp.external_ips {
        add(*ip, sp.port, FrontendKind::ExternalIp);
    }
    for ip in &sp.load_balancer_ips {
        add(*ip, sp.port, FrontendKind::LoadBalancer);
    }
    out
}
