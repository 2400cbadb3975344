//! Topology-aware routing end to end (docs/service-behaviours.md, 25):
//! Nodes labelled with `topology.kubernetes.io/zone`, a Service with
//! `trafficDistribution`, its EndpointSlice's endpoints hinted as the
//! EndpointSlice controller writes them (the fixture API server has no
//! controller, so each step writes the hints it would). The proxy decides
//! from the hints, as kube-proxy: a client reaches only the endpoints
//! hinted for its node's zone (or its node), unless some ready endpoint
//! has no hints or none is for here.
//!
//! One cluster per test function, several steps on it; every function runs
//! in every mode the east-west scenarios use: eBPF with socket LB on and
//! off, iptables and nftables ([`every_mode!`]). Each ends with a request
//! that must take the path under test (`Scenario::assert_path`) and the
//! mode's counters must show the work (`Scenario::assert_datapath`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use proxy_tests::scenario::{
    DataplaneMode, Endpoint, EndpointSlice, Request, Scenario, Service, on_path, until_backends,
};

/// First sync after the agents start.
const START: Duration = Duration::from_secs(8);
/// A change in the API reflected in forwarding.
const CONVERGE: Duration = Duration::from_secs(3);

const TCP_PORT: u16 = 8080;

/// Runs each scenario function in every mode.
macro_rules! every_mode {
    ($($name:ident),* $(,)?) => {
        mod socket_lb_on {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::EbpfSocketLb).assert_datapath() } )*
        }
        mod socket_lb_off {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::EbpfTc).assert_datapath() } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::Iptables).assert_datapath() } )*
        }
        mod nftables {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::Nftables).assert_datapath() } )*
        }
    };
}

every_mode!(zone_hints, same_node_hints_and_a_zone_label_change);

fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 210, last)
}

fn tcp(to: SocketAddr, n: usize) -> Request {
    Request::tcp(to).count(n)
}

/// Two nodes, zone a (node 1) and zone b (node 2), a TCP server on pod 2
/// of node 1 and pod 1 of node 2; clients are pod 1 of node 1 and pod 2
/// of node 2.
fn two_zones(label: &str, mode: DataplaneMode, svc: &Service) -> Scenario {
    Scenario::builder(label, mode)
        .node_zone(1, "a")
        .node_zone(2, "b")
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .object(svc)
        .build()
        .expect("scenario")
}

fn slice() -> EndpointSlice {
    EndpointSlice::new("web-1", "web").tcp_port("http", TCP_PORT)
}

// ---------------------------------------------------------------------------
// PreferClose / PreferSameZone: zone hints
// ---------------------------------------------------------------------------

fn zone_hints(mode: DataplaneMode) -> Scenario {
    let ip = vip(1);
    let svc = Service::cluster_ip("web", ip)
        .tcp("http", 80, TCP_PORT)
        .traffic_distribution("PreferClose");
    let s = two_zones("topo-zone", mode, &svc);
    let (p12, p21) = (s.pod(1, 2), s.pod(2, 1));
    let (c1, c2) = (s.client(1, 1), s.client(2, 2));
    let to = SocketAddr::from((ip, 80));
    // As the controller writes PreferClose: each endpoint for its zone.
    let a = || Endpoint::ready(p12).zone("a").for_zones(&["a"]);
    let b = || Endpoint::ready(p21).zone("b").for_zones(&["b"]);
    s.apply(&slice().endpoints([a(), b()]));
    until_backends(&c1, &tcp(to, 20), &["pod-1-2"], START);
    until_backends(&c2, &tcp(to, 20), &["pod-2-1"], CONVERGE);

    // One ready endpoint without hints (the controller mid-update, or a
    // zone it could not place): hints are ignored, both are reached.
    s.apply(&slice().endpoints([a(), Endpoint::ready(p21).zone("b")]));
    until_backends(&c1, &tcp(to, 40), &["pod-1-2", "pod-2-1"], CONVERGE);

    // PreferSameZone writes the same hints.
    s.apply(
        &Service::cluster_ip("web", ip)
            .tcp("http", 80, TCP_PORT)
            .traffic_distribution("PreferSameZone"),
    );
    s.apply(&slice().endpoints([a(), b()]));
    until_backends(&c1, &tcp(to, 20), &["pod-1-2"], CONVERGE);

    // The zone-a backend goes: the controller rewrites the slice with the
    // zone-b endpoint only (hinted for b). No endpoint is hinted for zone
    // a, so node 1 ignores the hints and reaches the zone-b backend.
    s.apply(&slice().endpoints([b()]));
    until_backends(&c1, &tcp(to, 20), &["pod-2-1"], CONVERGE);
    until_backends(&c2, &tcp(to, 20), &["pod-2-1"], CONVERGE);

    // Back: zone a again only to its own.
    s.apply(&slice().endpoints([a(), b()]));
    until_backends(&c1, &tcp(to, 20), &["pod-1-2"], CONVERGE);
    on_path(&s, &c1, &tcp(to, 10), &["pod-1-2"]);
    s
}

// ---------------------------------------------------------------------------
// PreferSameNode: node and zone hints; a Node's zone label changing
// ---------------------------------------------------------------------------

fn same_node_hints_and_a_zone_label_change(mode: DataplaneMode) -> Scenario {
    let ip = vip(2);
    let svc = Service::cluster_ip("web", ip)
        .tcp("http", 80, TCP_PORT)
        .traffic_distribution("PreferSameNode");
    let s = two_zones("topo-node", mode, &svc);
    let (p12, p21) = (s.pod(1, 2), s.pod(2, 1));
    let (n1, n2) = (p12.node_name.clone(), p21.node_name.clone());
    let (c1, c2) = (s.client(1, 1), s.client(2, 2));
    let to = SocketAddr::from((ip, 80));
    // Auto-style zone hints first: node 2 (zone b) gets the zone-b
    // endpoint.
    let za = || Endpoint::ready(p12).zone("a").for_zones(&["a"]);
    let zb = || Endpoint::ready(p21).zone("b").for_zones(&["b"]);
    s.apply(&slice().endpoints([za(), zb()]));
    until_backends(&c2, &tcp(to, 20), &["pod-2-1"], START);

    // Node 2 moves to zone a (a Node label change): it now takes the
    // endpoint hinted for zone a.
    s.set_node_label(2, proxy_tests::scenario::LABEL_ZONE, Some("a"));
    until_backends(&c2, &tcp(to, 20), &["pod-1-2"], CONVERGE);
    // Its zone label removed: zone hints are ignored there.
    s.set_node_label(2, proxy_tests::scenario::LABEL_ZONE, None);
    until_backends(&c2, &tcp(to, 40), &["pod-1-2", "pod-2-1"], CONVERGE);
    s.set_node_label(2, proxy_tests::scenario::LABEL_ZONE, Some("a"));

    // PreferSameNode as the controller writes it, both nodes in zone a:
    // each endpoint for its own node and zone. Each client reaches only
    // its own node's backend (zone hints alone would give both).
    let na = || {
        Endpoint::ready(p12)
            .zone("a")
            .for_zones(&["a"])
            .for_nodes(&[n1.as_str()])
    };
    let nb = || {
        Endpoint::ready(p21)
            .zone("a")
            .for_zones(&["a"])
            .for_nodes(&[n2.as_str()])
    };
    s.apply(&slice().endpoints([na(), nb()]));
    until_backends(&c1, &tcp(to, 20), &["pod-1-2"], CONVERGE);
    until_backends(&c2, &tcp(to, 20), &["pod-2-1"], CONVERGE);

    // Node hints on only one endpoint: node hints are ignored, the zone
    // hints (both zone a) give both.
    s.apply(&slice().endpoints([na(), Endpoint::ready(p21).zone("a").for_zones(&["a"])]));
    until_backends(&c1, &tcp(to, 40), &["pod-1-2", "pod-2-1"], CONVERGE);

    // Node 1's backend goes; node 1 has no endpoint hinted for it, falls
    // back to the zone hints and reaches node 2's.
    s.apply(&slice().endpoints([nb()]));
    until_backends(&c1, &tcp(to, 20), &["pod-2-1"], CONVERGE);
    s.apply(&slice().endpoints([na(), nb()]));
    until_backends(&c1, &tcp(to, 20), &["pod-1-2"], CONVERGE);
    on_path(&s, &c1, &tcp(to, 10), &["pod-1-2"]);
    s
}
