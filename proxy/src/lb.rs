//! The service table flattened into frontends (address, port, protocol)
//! with their backend lists: what every dataplane programs. Pure.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use crate::model::{Protocol, ServicePortName, ServiceTable, usable_endpoints};

/// Where traffic is addressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
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
    pub addr: Ipv4Addr,
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
}

/// Frontends with the service port they came from (for display only: the
/// data path does not need it and [`crate::diff`] ignores it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LbTable {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub owners: BTreeMap<FrontendKey, ServicePortName>,
}

impl LbTable {
    /// ClusterIP frontends of every service port, with the endpoints the
    /// internal traffic policy allows (Local: this node's only; none local
    /// means no backend, so traffic is rejected here, never sent elsewhere).
    /// NodePort, ExternalIP and LoadBalancer frontends come with the
    /// north-south data path.
    pub fn from_services(table: &ServiceTable) -> LbTable {
        let mut lb = LbTable::default();
        for (name, sp) in &table.services {
            let backends: Vec<BackendAddr> =
                usable_endpoints(&sp.endpoints, sp.internal_policy_local)
                    .into_iter()
                    .map(|e| BackendAddr {
                        addr: e.ip,
                        port: e.port,
                        terminating: !e.ready,
                        local: e.local,
                    })
                    .collect();
            for ip in &sp.cluster_ips {
                let key = FrontendKey {
                    addr: *ip,
                    port: sp.port,
                    proto: sp.name.protocol,
                };
                lb.frontends.insert(
                    key,
                    Frontend {
                        kind: FrontendKind::ClusterIp,
                        backends: backends.clone(),
                        affinity_timeout: sp.affinity_timeout.unwrap_or(0),
                    },
                );
                lb.owners.insert(key, name.clone());
            }
        }
        lb
    }
}
