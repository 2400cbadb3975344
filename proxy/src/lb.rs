//! The service table flattened into frontends (address, port, protocol)
//! with their backend lists: what every dataplane programs. Pure.
//!
//! Dual stack: a frontend is of one address family and gets only the
//! endpoints and source ranges of that family; a Service of one family
//! never gets endpoints of the other.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
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

/// An IPv4 backend as a frontend's list keeps it: 8 bytes where a
/// [`BackendAddr`] takes 22 (at 100,000 services x 10 endpoints the lists
/// hold a million of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend4 {
    addr: Ipv4Addr,
    port: u16,
    /// Bit 0: terminating; bit 1: local.
    flags: u8,
}

impl Backend4 {
    const TERMINATING: u8 = 1;
    const LOCAL: u8 = 2;

    fn new(addr: Ipv4Addr, b: &BackendAddr) -> Backend4 {
        let mut flags = 0;
        if b.terminating {
            flags |= Self::TERMINATING;
        }
        if b.local {
            flags |= Self::LOCAL;
        }
        Backend4 {
            addr,
            port: b.port,
            flags,
        }
    }

    fn get(&self) -> BackendAddr {
        BackendAddr {
            addr: IpAddr::V4(self.addr),
            port: self.port,
            terminating: self.flags & Self::TERMINATING != 0,
            local: self.flags & Self::LOCAL != 0,
        }
    }
}

/// A frontend's backend list, in a stable order. Immutable and shared: the
/// desired state, the programmed state and every NodePort frontend of one
/// service port hold the same allocation (a clone is a reference count).
/// An all-IPv4 list (every IPv4 frontend's) keeps 8-byte entries; any other
/// list keeps [`BackendAddr`]s.
#[derive(Clone, PartialEq, Eq)]
pub enum Backends {
    V4(Arc<[Backend4]>),
    Any(Arc<[BackendAddr]>),
}

impl Default for Backends {
    fn default() -> Backends {
        Backends::V4(Arc::from([]))
    }
}

impl Backends {
    pub fn len(&self) -> usize {
        match self {
            Backends::V4(l) => l.len(),
            Backends::Any(l) => l.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Option<BackendAddr> {
        match self {
            Backends::V4(l) => l.get(i).map(Backend4::get),
            Backends::Any(l) => l.get(i).copied(),
        }
    }

    /// A copy to edit (then `.into()` makes a list again).
    pub fn to_vec(&self) -> Vec<BackendAddr> {
        self.iter().collect()
    }

    pub fn contains(&self, b: &BackendAddr) -> bool {
        self.iter().any(|x| x == *b)
    }

    /// The backends, by value.
    pub fn iter(&self) -> BackendsIter<'_> {
        BackendsIter {
            list: self,
            next: 0,
        }
    }
}

/// Iterator over [`Backends`] (by value: an IPv4 entry is expanded).
#[derive(Clone)]
pub struct BackendsIter<'a> {
    list: &'a Backends,
    next: usize,
}

impl Iterator for BackendsIter<'_> {
    type Item = BackendAddr;

    fn next(&mut self) -> Option<BackendAddr> {
        let b = self.list.get(self.next)?;
        self.next += 1;
        Some(b)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.list.len().saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for BackendsIter<'_> {}

impl<'a> IntoIterator for &'a Backends {
    type Item = BackendAddr;
    type IntoIter = BackendsIter<'a>;

    fn into_iter(self) -> BackendsIter<'a> {
        self.iter()
    }
}

impl FromIterator<BackendAddr> for Backends {
    fn from_iter<I: IntoIterator<Item = BackendAddr>>(iter: I) -> Backends {
        Backends::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl From<Vec<BackendAddr>> for Backends {
    fn from(v: Vec<BackendAddr>) -> Backends {
        let v4: Option<Arc<[Backend4]>> = v
            .iter()
            .map(|b| match b.addr {
                IpAddr::V4(a) => Some(Backend4::new(a, b)),
                IpAddr::V6(_) => None,
            })
            .collect();
        match v4 {
            Some(l) => Backends::V4(l),
            None => Backends::Any(Arc::from(v)),
        }
    }
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl serde::Serialize for Backends {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// Backends in a stable order (sorted). Empty: traffic is rejected.
    pub backends: Backends,
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
    let serves = |v6: bool| sp.serves(v6);
    // Backends per (family, traffic policy), index [v6][local_only].
    let backends = |v6: bool, local_only: bool| -> Backends {
        if !serves(v6) {
            return Backends::default();
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
    // One list per (family, policy): when both policies are the same, the
    // ClusterIP and the external frontends share it.
    let lists = [false, true].map(|v6| {
        let internal = backends(v6, sp.internal_policy_local);
        let external = if sp.external_policy_local == sp.internal_policy_local {
            internal.clone()
        } else {
            backends(v6, sp.external_policy_local)
        };
        [internal, external]
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

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::model::ServiceType;

    fn backend(addr: IpAddr, port: u16, terminating: bool, local: bool) -> BackendAddr {
        BackendAddr {
            addr,
            port,
            terminating,
            local,
        }
    }

    #[test]
    fn an_ipv4_list_keeps_eight_byte_entries_and_reads_back_what_was_given() {
        assert_eq!(std::mem::size_of::<Backend4>(), 8);
        let given: Vec<BackendAddr> = (0..4u8)
            .map(|i| {
                backend(
                    Ipv4Addr::new(10, 244, 1, i).into(),
                    8080 + u16::from(i),
                    i % 2 == 0,
                    i >= 2,
                )
            })
            .collect();
        let list = Backends::from(given.clone());
        assert!(matches!(list, Backends::V4(_)), "{list:?}");
        assert_eq!(list.to_vec(), given);
        assert_eq!(list.len(), 4);
        assert_eq!(list.get(3), Some(given[3]));
        assert_eq!(list.get(4), None);
        assert!(list.contains(&given[1]));
        assert!(!list.contains(&backend(
            Ipv4Addr::new(10, 244, 1, 1).into(),
            8081,
            true,
            false
        )));
        assert_eq!(
            serde_json::to_value(&list).expect("serialize"),
            serde_json::to_value(&given).expect("serialize")
        );
    }

    #[test]
    fn a_list_with_an_ipv6_backend_keeps_full_entries() {
        let given = vec![
            backend(
                Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 5).into(),
                80,
                false,
                true,
            ),
            backend(Ipv4Addr::new(10, 244, 1, 5).into(), 80, true, false),
        ];
        let list: Backends = given.iter().copied().collect();
        assert!(matches!(list, Backends::Any(_)), "{list:?}");
        assert_eq!(list.to_vec(), given);
        assert!(Backends::default().is_empty());
        assert_eq!(Backends::default(), Backends::from(Vec::new()));
    }

    #[test]
    fn the_nodeport_frontends_of_a_port_share_one_backend_list() {
        let mut sp = crate::model::test_port(&[
            ("10.244.1.1", true),
            ("10.244.1.2", false),
            ("10.244.1.3", false),
        ]);
        sp.service_type = ServiceType::NodePort;
        sp.node_port = Some(30080);
        let node = NodeContext {
            node_name: "node1".into(),
            addresses: vec![
                Ipv4Addr::new(192, 168, 0, 1).into(),
                Ipv4Addr::new(172, 18, 0, 1).into(),
            ],
            ..Default::default()
        };
        let fes = port_frontends(&sp, &node);
        let lists: Vec<&Backends> = fes.iter().map(|(_, f)| &f.backends).collect();
        assert_eq!(lists.len(), 3, "ClusterIP and two NodePorts: {fes:?}");
        assert_eq!(lists[0].len(), 3);
        let (Backends::V4(a), Backends::V4(b), Backends::V4(c)) = (lists[0], lists[1], lists[2])
        else {
            panic!("IPv4 lists: {lists:?}");
        };
        assert!(Arc::ptr_eq(a, b) && Arc::ptr_eq(b, c), "one allocation");
    }
}
