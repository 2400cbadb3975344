//! East-west service behaviours (docs/service-behaviours.md, 1-6,
//! the agent half of 7, 8-9 and 22 from pods, 10-17, 19, 20; 14 for
//! ClusterIP) end to end: API server fixture -> agent on every node -> pods
//! talking to service addresses.
//!
//! Every scenario is one function of the [`DataplaneMode`] and runs in all
//! four modes: eBPF with socket LB on and off (`socket_lb_on::*`,
//! `socket_lb_off::*`, [`both_socket_lb_modes!`]) and the kube-proxy
//! fallback modes (`iptables::*`, `nftables::*`, [`fallback_modes!`]).
//! Clients are always `podclient` processes in the client pod's network
//! namespace *and* in its node's test cgroup, which is the cgroup the agent
//! attaches its socket hooks to: with socket LB on they take the
//! connect()/sendmsg() path, with it off the per-packet tc path, in the
//! fallback modes the kernel's NAT rules. The kernel proves it: each
//! scenario ends with a probe that must be handled by the path under test
//! (`Scenario::assert_path`), and the totals must show it did the work
//! (`Scenario::assert_datapath`: the eBPF counters, or our rules' packet
//! counters and nothing pinned). Evidence about what is programmed is read
//! from the mode's kernel state too (`Scenario::frontends`: the eBPF
//! services map, our `iptables-save` rules, our nftables maps;
//! `Scenario::source_range_drops`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proxy_tests::cgroup::{Cgroup, cgroup_of};
use proxy_tests::cluster::{Cluster, ClusterSpec, TcpServer, UdpServer, tcp_request};
use proxy_tests::scenario::{
    AT_ONCE, ClientResult, DataplaneMode, Endpoint, EndpointSlice, ErrorKind, PodClient, Protocol,
    Request, Scenario, Service, SocketLb, StreamResult, TrafficPolicy, backends, names, on_path,
    tally, until_backends, until_refused,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// First sync after the agents start.
const START: Duration = Duration::from_secs(8);
/// A change in the API reflected in forwarding.
const CONVERGE: Duration = Duration::from_secs(3);

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// Service addresses; far from the 10.96.0.10 other test files use.
fn vip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 200, last)
}

fn at(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn tcp(to: SocketAddr, n: usize) -> Request {
    Request::tcp(to).count(n)
}

fn udp(to: SocketAddr, n: usize) -> Request {
    Request::udp(to).count(n)
}

/// Longest wait of a request that is expected to fail: a ClusterIP that is
/// no longer programmed is not ours to answer (here the node has no route
/// and sends ICMP net unreachable, but the kernel rate-limits those, so later
/// attempts may just time out).
const FAIL_WAIT: Duration = Duration::from_millis(300);

/// Waits until one request of `req`'s kind fails and returns it.
#[track_caller]
fn until_fails(c: &PodClient, req: &Request, within: Duration) -> ClientResult {
    let one = req.clone().count(1).timeout(req.timeout.min(FAIL_WAIT));
    scenario_eventually(within, || {
        let r = c.run(&one).map_err(|e| format!("{e:#}"))?.remove(0);
        if r.ok {
            Err(format!("{:?} {} still answered: {r}", req.proto, req.to))
        } else {
            Ok(r)
        }
    })
}

/// Every request of `req` fails (each waits at most [`FAIL_WAIT`]).
#[track_caller]
fn all_fail(c: &PodClient, req: &Request) -> Vec<ClientResult> {
    let req = req.clone().timeout(req.timeout.min(FAIL_WAIT));
    let rs = c.run(&req).unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(r) = rs.iter().find(|r| r.ok) {
        panic!("{:?} {} answered: {r}", req.proto, req.to);
    }
    rs
}

#[track_caller]
fn scenario_eventually<T>(within: Duration, f: impl FnMut() -> Result<T, String>) -> T {
    proxy_tests::scenario::eventually(within, f)
}

/// Waits until node `node` has programmed exactly the frontends `want`
/// (its agent may still be on its first sync).
#[track_caller]
fn until_frontends(s: &Scenario, node: usize, want: &[String]) {
    scenario_eventually(CONVERGE, || {
        let f = s.frontends(node);
        if f == want {
            Ok(())
        } else {
            Err(format!("node{node}: {f:?}, want {want:?}"))
        }
    });
}

/// Waits until the service answers at all (the agents synced).
#[track_caller]
fn until_up(c: &PodClient, req: &Request) {
    let one = req.clone().count(1);
    scenario_eventually(START, || {
        let r = c.run(&one).map_err(|e| format!("{e:#}"))?.remove(0);
        if r.ok {
            Ok(())
        } else {
            Err(format!("{:?} {} not up: {r}", req.proto, req.to))
        }
    });
}

/// Like [`on_path`] for a service without usable endpoints: refused at once,
/// by the path under test.
#[track_caller]
fn refused_on_path(s: &Scenario, c: &PodClient, proto: Protocol, to: SocketAddr) {
    let req = Request {
        proto,
        ..Request::tcp(to)
    }
    .count(3)
    .timeout(Duration::from_secs(2));
    for r in s.assert_path(c, &req) {
        assert!(
            r.is_refused() && r.elapsed() < AT_ONCE,
            "{proto:?} {to}: {r}"
        );
    }
}

/// Instantiates each scenario function with socket LB on and off. A
/// scenario returns its [`Scenario`], whose counters must then show that
/// the path under test did the work (socket hooks when on, tc when off).
macro_rules! both_socket_lb_modes {
    ($($name:ident),* $(,)?) => {
        mod socket_lb_on {
            $( #[test] fn $name() { super::$name(super::SocketLb::On).assert_datapath() } )*
        }
        mod socket_lb_off {
            $( #[test] fn $name() { super::$name(super::SocketLb::Off).assert_datapath() } )*
        }
    };
}

/// Instantiates each scenario function in the kube-proxy fallback modes
/// (`--mode iptables`, `--mode nftables`). Every scenario of this file runs
/// here too, unchanged: its evidence is our rules' packet counters (and
/// nothing pinned in bpffs), and [`Scenario::frontends`] /
/// [`Scenario::source_range_drops`] read the mode's rules.
macro_rules! fallback_modes {
    ($($name:ident),* $(,)?) => {
        mod iptables {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::Iptables).assert_datapath() } )*
        }
        mod nftables {
            $( #[test] fn $name() { super::$name(super::DataplaneMode::Nftables).assert_datapath() } )*
        }
    };
}

fallback_modes!(
    endpoints_added_and_removed,
    multiport_named_target_ports,
    ports_added_and_removed_on_a_live_service,
    source_ip_preserved_across_nodes,
    hairpin_pod_reaches_itself,
    service_deleted_and_recreated,
    same_port_tcp_and_udp,
    no_endpoints_refused_at_once,
    internal_traffic_policy_local,
    terminating_fallback,
    terminating_fallback_internal_local,
    session_affinity_client_ip,
    node_port_and_external_ip_from_pods_then_released,
    udp_flow_survives_backend_replacement,
    agent_kill_9_keeps_streams_and_new_connections,
    type_changes_and_headless_ignored,
    only_ready_endpoints_and_publish_not_ready,
    foreign_proxy_name_and_headless_labels_ignored,
    load_balancer_source_ranges_from_pods,
);

both_socket_lb_modes!(
    load_balancer_source_ranges_from_pods,
    endpoints_added_and_removed,
    multiport_named_target_ports,
    ports_added_and_removed_on_a_live_service,
    source_ip_preserved_across_nodes,
    hairpin_pod_reaches_itself,
    service_deleted_and_recreated,
    same_port_tcp_and_udp,
    type_changes_and_headless_ignored,
    only_ready_endpoints_and_publish_not_ready,
    foreign_proxy_name_and_headless_labels_ignored,
    no_endpoints_refused_at_once,
    internal_traffic_policy_local,
    terminating_fallback,
    terminating_fallback_internal_local,
    session_affinity_client_ip,
    udp_flow_survives_backend_replacement,
    agent_kill_9_keeps_streams_and_new_connections,
    node_port_and_external_ip_from_pods_then_released,
);

/// `web`: TCP 80 -> 8080 and UDP 53 -> 5353.
fn web(vip: Ipv4Addr) -> Service {
    Service::cluster_ip("web", vip)
        .tcp("http", 80, TCP_PORT)
        .udp("dns", 53, UDP_PORT)
}

fn web_slice() -> EndpointSlice {
    EndpointSlice::new("web-1", "web")
        .tcp_port("http", TCP_PORT)
        .udp_port("dns", UDP_PORT)
}

// ---------------------------------------------------------------------------
// 1. Endpoints added and removed
// ---------------------------------------------------------------------------

fn endpoints_added_and_removed(lb: SocketLb) -> Scenario {
    let ip = vip(1);
    let b = Scenario::builder("endpoints", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .tcp_server((2, 2), TCP_PORT)
        .udp_server((1, 2), UDP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .udp_server((2, 2), UDP_PORT);
    let s = b.object(&web(ip)).build().expect("scenario");
    let (p12, p21, p22) = (s.pod(1, 2), s.pod(2, 1), s.pod(2, 2));
    let c = s.client(1, 1);
    let (t, u) = (at(ip, 80), at(ip, 53));

    // Only one endpoint.
    let slice = web_slice().endpoint(Endpoint::ready(p12));
    s.apply(&slice);
    until_up(&c, &tcp(t, 1));
    until_backends(&c, &tcp(t, 20), &["pod-1-2"], CONVERGE);
    until_backends(&c, &udp(u, 20), &["pod-1-2"], CONVERGE);

    // Added endpoints take traffic (the remote node's too).
    let slice = slice.endpoint(Endpoint::ready(p21));
    s.apply(&slice);
    until_backends(&c, &tcp(t, 40), &["pod-1-2", "pod-2-1"], CONVERGE);
    until_backends(&c, &udp(u, 40), &["pod-1-2", "pod-2-1"], CONVERGE);
    let slice = slice.endpoint(Endpoint::ready(p22));
    s.apply(&slice);
    until_backends(
        &c,
        &tcp(t, 60),
        &["pod-1-2", "pod-2-1", "pod-2-2"],
        CONVERGE,
    );

    // A removed endpoint gets nothing new.
    let slice = slice.without_endpoint(p12.ip);
    s.apply(&slice);
    until_backends(&c, &tcp(t, 40), &["pod-2-1", "pod-2-2"], CONVERGE);
    until_backends(&c, &udp(u, 40), &["pod-2-1", "pod-2-2"], CONVERGE);
    let before = s.tcp_server("pod-1-2").served();
    let t2 = backends(&c, &tcp(t, 30)).expect("after removal");
    assert!(!t2.contains_key("pod-1-2"), "{t2:?}");
    assert_eq!(s.tcp_server("pod-1-2").served(), before);
    on_path(&s, &c, &tcp(t, 10), &["pod-2-1", "pod-2-2"]);
    on_path(&s, &c, &udp(u, 10), &["pod-2-1", "pod-2-2"]);
    s
}

// ---------------------------------------------------------------------------
// 2. Multiport with named target ports resolved per endpoint
// ---------------------------------------------------------------------------

fn multiport_named_target_ports(lb: SocketLb) -> Scenario {
    let ip = vip(2);
    // The pods name their ports alike but number them differently:
    // pod-1-2 has web=8080, metrics=9090; pod-2-1 has web=8081,
    // metrics=9091. Decoys answer on the other pod's numbers, so using the
    // wrong slice's number shows up as a wrong reply, not just a failure.
    let svc = Service::cluster_ip("multi", ip)
        .tcp("http", 80, "web")
        .tcp("metrics", 9100, "metrics");
    let s = Scenario::builder("multiport", lb)
        .tcp_server_named((1, 2), 8080, "pod-1-2/web")
        .tcp_server_named((1, 2), 9090, "pod-1-2/metrics")
        .tcp_server_named((1, 2), 8081, "pod-1-2/WRONG")
        .tcp_server_named((1, 2), 9091, "pod-1-2/WRONG")
        .tcp_server_named((2, 1), 8081, "pod-2-1/web")
        .tcp_server_named((2, 1), 9091, "pod-2-1/metrics")
        .tcp_server_named((2, 1), 8080, "pod-2-1/WRONG")
        .tcp_server_named((2, 1), 9090, "pod-2-1/WRONG")
        .object(&svc)
        .build()
        .expect("scenario");
    s.apply(
        &EndpointSlice::new("multi-a", "multi")
            .tcp_port("http", 8080)
            .tcp_port("metrics", 9090)
            .endpoint(Endpoint::ready(s.pod(1, 2))),
    );
    s.apply(
        &EndpointSlice::new("multi-b", "multi")
            .tcp_port("http", 8081)
            .tcp_port("metrics", 9091)
            .endpoint(Endpoint::ready(s.pod(2, 1))),
    );
    let c = s.client(1, 1);
    until_up(&c, &tcp(at(ip, 80), 1));
    until_backends(
        &c,
        &tcp(at(ip, 80), 40),
        &["pod-1-2/web", "pod-2-1/web"],
        CONVERGE,
    );
    until_backends(
        &c,
        &tcp(at(ip, 9100), 40),
        &["pod-1-2/metrics", "pod-2-1/metrics"],
        CONVERGE,
    );
    on_path(
        &s,
        &c,
        &tcp(at(ip, 80), 10),
        &["pod-1-2/web", "pod-2-1/web"],
    );
    s
}

// ---------------------------------------------------------------------------
// 3. Ports added to and removed from a live service
// ---------------------------------------------------------------------------

fn ports_added_and_removed_on_a_live_service(lb: SocketLb) -> Scenario {
    let ip = vip(3);
    let svc = Service::cluster_ip("live", ip).tcp("http", 80, 8080);
    let s = Scenario::builder("ports", lb)
        .tcp_server_named((1, 2), 8080, "pod-1-2/8080")
        .tcp_server_named((1, 2), 8443, "pod-1-2/8443")
        .tcp_server_named((2, 1), 8080, "pod-2-1/8080")
        .tcp_server_named((2, 1), 8443, "pod-2-1/8443")
        .object(&svc)
        .build()
        .expect("scenario");
    let slice = EndpointSlice::new("live-1", "live")
        .tcp_port("http", 8080)
        .endpoints([Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))]);
    s.apply(&slice);
    let c = s.client(1, 1);
    let (http, https) = (at(ip, 80), at(ip, 443));
    until_up(&c, &tcp(http, 1));
    until_backends(
        &c,
        &tcp(http, 30),
        &["pod-1-2/8080", "pod-2-1/8080"],
        CONVERGE,
    );
    all_fail(&c, &tcp(https, 3));

    // Add a port (service and slice, as the controller would).
    let svc = svc.tcp("https", 443, 8443);
    s.apply(&svc);
    s.apply(&slice.clone().tcp_port("https", 8443));
    until_backends(
        &c,
        &tcp(https, 30),
        &["pod-1-2/8443", "pod-2-1/8443"],
        CONVERGE,
    );
    until_backends(
        &c,
        &tcp(http, 30),
        &["pod-1-2/8080", "pod-2-1/8080"],
        CONVERGE,
    );

    // Remove a port from the service only: the slice still lists it, but a
    // port the service does not have is not served.
    s.apply(&svc.without_port("http"));
    until_fails(&c, &tcp(http, 1), CONVERGE);
    all_fail(&c, &tcp(http, 5));
    until_backends(
        &c,
        &tcp(https, 30),
        &["pod-1-2/8443", "pod-2-1/8443"],
        CONVERGE,
    );
    on_path(&s, &c, &tcp(https, 10), &["pod-1-2/8443", "pod-2-1/8443"]);
    s
}

// ---------------------------------------------------------------------------
// 4. Source IP preserved pod -> ClusterIP -> pod on another node
// ---------------------------------------------------------------------------

fn source_ip_preserved_across_nodes(lb: SocketLb) -> Scenario {
    let ip = vip(4);
    let s = Scenario::builder("srcip", lb)
        .tcp_server((2, 1), TCP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&web(ip))
        .build()
        .expect("scenario");
    s.apply(&web_slice().endpoint(Endpoint::ready(s.pod(2, 1))));
    let c = s.client(1, 1);
    until_up(&c, &tcp(at(ip, 80), 1));
    // `tally` checks the backend saw the client pod's own IP, and that the
    // client's peer is the ClusterIP.
    let t = tally(&c.run(&tcp(at(ip, 80), 20)).expect("tcp"), c.ip, at(ip, 80));
    assert_eq!(names(&t), ["pod-2-1"]);
    until_up(&c, &udp(at(ip, 53), 1));
    let u = tally(&c.run(&udp(at(ip, 53), 20)).expect("udp"), c.ip, at(ip, 53));
    assert_eq!(names(&u), ["pod-2-1"]);
    // On the backend's side too: every connection came from pod-1-1.
    let peers = s.tcp_server("pod-2-1").peers();
    assert!(peers.len() >= 20, "{peers:?}");
    assert!(
        peers.iter().all(|p| p.ip() == IpAddr::V4(c.ip)),
        "SNAT seen: {peers:?}"
    );
    assert!(
        s.udp_server("pod-2-1")
            .peers()
            .iter()
            .all(|p| p.ip() == IpAddr::V4(c.ip))
    );
    // And from a pod on the backend's own node (once node2's agent has
    // synced).
    let c22 = s.client(2, 2);
    until_backends(&c22, &tcp(at(ip, 80), 5), &["pod-2-1"], CONVERGE);
    let t = tally(
        &c22.run(&tcp(at(ip, 80), 10)).expect("tcp"),
        c22.ip,
        at(ip, 80),
    );
    assert_eq!(names(&t), ["pod-2-1"]);
    on_path(&s, &c, &tcp(at(ip, 80), 10), &["pod-2-1"]);
    on_path(&s, &c, &udp(at(ip, 53), 10), &["pod-2-1"]);
    s
}

// ---------------------------------------------------------------------------
// 5. Hairpin: a pod reaches itself through its own service
// ---------------------------------------------------------------------------

/// Like `tally`, but a reply from the client pod itself may show any
/// source: hairpin traffic is SNATed by some proxies (kube-proxy masquerades
/// it to the node, Cilium uses 169.254.42.1). Replies from other pods must
/// show the client's own IP.
#[track_caller]
fn hairpin_tally(rs: &[ClientResult], c: &PodClient, to: SocketAddr) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for r in rs {
        assert!(r.ok, "{to}: {r}");
        assert_eq!(r.peer, Some(to), "client peer: {r}");
        let (name, saw) = (
            r.backend().expect("backend"),
            r.seen_client().expect("seen"),
        );
        assert!(
            name == c.pod_name || saw.ip() == IpAddr::V4(c.ip),
            "{name} saw {saw}: {r}"
        );
        *seen.entry(name.to_owned()).or_insert(0) += 1;
    }
    seen
}

fn hairpin_pod_reaches_itself(lb: SocketLb) -> Scenario {
    let (own, mixed) = (vip(5), vip(6));
    let s = Scenario::builder("hairpin", lb)
        .tcp_server((1, 1), TCP_PORT)
        .udp_server((1, 1), UDP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&web(own))
        .object(
            &Service::cluster_ip("mixed", mixed)
                .tcp("http", 80, TCP_PORT)
                .udp("dns", 53, UDP_PORT),
        )
        .build()
        .expect("scenario");
    let (p11, p21) = (s.pod(1, 1), s.pod(2, 1));
    s.apply(&web_slice().endpoint(Endpoint::ready(p11)));
    s.apply(
        &EndpointSlice::new("mixed-1", "mixed")
            .tcp_port("http", TCP_PORT)
            .udp_port("dns", UDP_PORT)
            .endpoints([Endpoint::ready(p11), Endpoint::ready(p21)]),
    );
    let c = s.client(1, 1);
    // Its own service, whose only endpoint is itself.
    until_up(&c, &tcp(at(own, 80), 1));
    let rs = c.run(&tcp(at(own, 80), 20)).expect("tcp");
    assert_eq!(
        hairpin_tally(&rs, &c, at(own, 80))
            .keys()
            .collect::<Vec<_>>(),
        ["pod-1-1"]
    );
    let rs = c.run(&udp(at(own, 53), 20)).expect("udp");
    assert_eq!(
        hairpin_tally(&rs, &c, at(own, 53))
            .keys()
            .collect::<Vec<_>>(),
        ["pod-1-1"]
    );
    // A service with itself and a remote pod: both are reached.
    scenario_eventually(CONVERGE, || {
        let rs = c
            .run(&tcp(at(mixed, 80), 30))
            .map_err(|e| format!("{e:#}"))?;
        if let Some(r) = rs.iter().find(|r| !r.ok) {
            return Err(format!("mixed: {r}"));
        }
        let t = hairpin_tally(&rs, &c, at(mixed, 80));
        if t.len() == 2 {
            Ok(())
        } else {
            Err(format!("mixed reached {t:?}"))
        }
    });
    let rs = c.run(&udp(at(mixed, 53), 30)).expect("udp");
    assert_eq!(hairpin_tally(&rs, &c, at(mixed, 53)).len(), 2);
    let rs = s.assert_path(&c, &tcp(at(own, 80), 10));
    assert_eq!(
        hairpin_tally(&rs, &c, at(own, 80))
            .keys()
            .collect::<Vec<_>>(),
        ["pod-1-1"]
    );
    s
}

// ---------------------------------------------------------------------------
// 6. Deleting and recreating a service
// ---------------------------------------------------------------------------

fn service_deleted_and_recreated(lb: SocketLb) -> Scenario {
    let ip = vip(7);
    let s = Scenario::builder("updown", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .udp_server((1, 2), UDP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&web(ip))
        .build()
        .expect("scenario");
    s.apply(&web_slice().endpoints([Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))]));
    let c = s.client(1, 1);
    let (t, u) = (at(ip, 80), at(ip, 53));
    let both = ["pod-1-2", "pod-2-1"];
    until_up(&c, &tcp(t, 1));
    until_backends(&c, &tcp(t, 30), &both, CONVERGE);
    until_backends(&c, &udp(u, 30), &both, CONVERGE);

    for round in 0..2 {
        // Down: the service stops answering (the slice stays, as it may for
        // a while in a real cluster).
        s.delete("Service", "web");
        until_fails(&c, &tcp(t, 1), CONVERGE);
        until_fails(&c, &udp(u, 1), CONVERGE);
        all_fail(&c, &udp(u, 2));
        // The backends see none of it.
        let served = s.tcp_server("pod-1-2").served() + s.tcp_server("pod-2-1").served();
        all_fail(&c, &tcp(t, 3));
        assert_eq!(
            s.tcp_server("pod-1-2").served() + s.tcp_server("pod-2-1").served(),
            served,
            "round {round}"
        );
        // Up again.
        s.apply(&web(ip));
        until_backends(&c, &tcp(t, 30), &both, CONVERGE);
        until_backends(&c, &udp(u, 30), &both, CONVERGE);
    }
    on_path(&s, &c, &tcp(t, 10), &both);
    on_path(&s, &c, &udp(u, 10), &both);
    s
}

// ---------------------------------------------------------------------------
// 10. Same port, TCP and UDP
// ---------------------------------------------------------------------------

fn same_port_tcp_and_udp(lb: SocketLb) -> Scenario {
    let ip = vip(10);
    let svc = Service::cluster_ip("dns", ip)
        .tcp("dns-tcp", 53, 5353)
        .udp("dns-udp", 53, 5353);
    let s = Scenario::builder("sameport", lb)
        .tcp_server_named((1, 2), 5353, "pod-1-2/tcp")
        .udp_server_named((1, 2), 5353, "pod-1-2/udp")
        .tcp_server_named((2, 1), 5353, "pod-2-1/tcp")
        .udp_server_named((2, 1), 5353, "pod-2-1/udp")
        .object(&svc)
        .build()
        .expect("scenario");
    let slice = EndpointSlice::new("dns-1", "dns")
        .tcp_port("dns-tcp", 5353)
        .udp_port("dns-udp", 5353)
        .endpoints([Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))]);
    s.apply(&slice);
    let c = s.client(1, 1);
    let to = at(ip, 53);
    until_up(&c, &tcp(to, 1));
    until_backends(&c, &tcp(to, 30), &["pod-1-2/tcp", "pod-2-1/tcp"], CONVERGE);
    until_backends(&c, &udp(to, 30), &["pod-1-2/udp", "pod-2-1/udp"], CONVERGE);

    // Remove UDP: UDP stops, TCP goes on.
    s.apply(&svc.clone().without_port("dns-udp"));
    s.apply(&slice.clone().without_port("dns-udp"));
    until_fails(&c, &udp(to, 1), CONVERGE);
    all_fail(&c, &udp(to, 5));
    until_backends(&c, &tcp(to, 30), &["pod-1-2/tcp", "pod-2-1/tcp"], CONVERGE);

    // Back, then remove TCP: TCP stops, UDP goes on.
    s.apply(&svc.clone().without_port("dns-tcp"));
    s.apply(&slice.without_port("dns-tcp"));
    until_backends(&c, &udp(to, 30), &["pod-1-2/udp", "pod-2-1/udp"], CONVERGE);
    until_fails(&c, &tcp(to, 1), CONVERGE);
    all_fail(&c, &tcp(to, 5));
    on_path(&s, &c, &udp(to, 10), &["pod-1-2/udp", "pod-2-1/udp"]);
    s
}

// ---------------------------------------------------------------------------
// 11. Type changes; ExternalName and headless are ignored
// ---------------------------------------------------------------------------

fn type_changes_and_headless_ignored(lb: SocketLb) -> Scenario {
    let (ip, ip2) = (vip(11), vip(12));
    let svc = Service::cluster_ip("web", ip).tcp("http", 80, TCP_PORT);
    let s = Scenario::builder("types", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .object(&svc)
        .object(&Service::headless("hl").tcp("http", 80, TCP_PORT))
        .build()
        .expect("scenario");
    let (p12, p21) = (s.pod(1, 2), s.pod(2, 1));
    s.apply(
        &EndpointSlice::new("web-1", "web")
            .tcp_port("http", TCP_PORT)
            .endpoints([Endpoint::ready(p12), Endpoint::ready(p21)]),
    );
    s.apply(
        &EndpointSlice::new("hl-1", "hl")
            .tcp_port("http", TCP_PORT)
            .endpoint(Endpoint::ready(p21)),
    );
    let c = s.client(1, 1);
    let both = ["pod-1-2", "pod-2-1"];
    until_up(&c, &tcp(at(ip, 80), 1));
    until_backends(&c, &tcp(at(ip, 80), 30), &both, CONVERGE);
    // The headless service programs nothing: only web's frontend exists
    // (node2's agent may still be on its first sync: wait for it).
    for node in 1..=2 {
        until_frontends(&s, node, &[format!("{ip}:80/TCP")]);
    }

    // ClusterIP -> ExternalName: ignored, so the old ClusterIP is gone.
    s.apply(&svc.clone().with_external_name("web.example.com"));
    until_fails(&c, &tcp(at(ip, 80), 1), CONVERGE);
    all_fail(&c, &tcp(at(ip, 80), 5));
    // Nothing of it is left: no frontend, and no rule or element of ours
    // refers to the old address.
    for node in 1..=2 {
        scenario_eventually(CONVERGE, || {
            let f = s.frontends(node);
            if f.is_empty() && !s.programmed_mentions(node, ip) {
                Ok(())
            } else {
                Err(format!("node{node}: {f:?}, or {ip} still in our rules"))
            }
        });
    }

    // ExternalName -> ClusterIP: the API allocates a new address.
    s.apply(&svc.with_cluster_ip(ip2));
    until_backends(&c, &tcp(at(ip2, 80), 30), &both, CONVERGE);
    all_fail(&c, &tcp(at(ip, 80), 3));
    assert_eq!(s.frontends(1), [format!("{ip2}:80/TCP")]);
    assert!(!s.programmed_mentions(1, ip), "{ip} is programmed again");
    on_path(&s, &c, &tcp(at(ip2, 80), 10), &both);
    s
}

// ---------------------------------------------------------------------------
// 13. Only ready endpoints; publishNotReadyAddresses
// ---------------------------------------------------------------------------

fn only_ready_endpoints_and_publish_not_ready(lb: SocketLb) -> Scenario {
    let ip = vip(13);
    let svc = Service::cluster_ip("web", ip).tcp("http", 80, TCP_PORT);
    let s = Scenario::builder("ready", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .tcp_server((2, 2), TCP_PORT)
        .object(&svc)
        .build()
        .expect("scenario");
    let (p12, p21, p22) = (s.pod(1, 2), s.pod(2, 1), s.pod(2, 2));
    let slice = EndpointSlice::new("web-1", "web").tcp_port("http", TCP_PORT);
    // Not ready (failing readiness), and serving-but-not-ready without
    // terminating: neither is used while a ready one exists.
    s.apply(&slice.clone().endpoints([
        Endpoint::ready(p12),
        Endpoint::not_ready(p21),
        Endpoint::at(p22.ip, Some("node2")).conditions(false, true, false),
    ]));
    let c = s.client(1, 1);
    let to = at(ip, 80);
    until_up(&c, &tcp(to, 1));
    until_backends(&c, &tcp(to, 40), &["pod-1-2"], CONVERGE);

    // No conditions at all: the API says nil means ready.
    s.apply(&slice.clone().endpoints([
        Endpoint::ready(p12),
        Endpoint::unknown(p21),
        Endpoint::not_ready(p22),
    ]));
    until_backends(&c, &tcp(to, 40), &["pod-1-2", "pod-2-1"], CONVERGE);

    // publishNotReadyAddresses: the EndpointSlice controller publishes every
    // pod as ready, and the proxy uses them all.
    s.apply(&svc.clone().publish_not_ready_addresses(true));
    s.apply(&slice.clone().endpoints([
        Endpoint::ready(p12),
        Endpoint::ready(p21),
        Endpoint::ready(p22),
    ]));
    until_backends(
        &c,
        &tcp(to, 60),
        &["pod-1-2", "pod-2-1", "pod-2-2"],
        CONVERGE,
    );

    // Back to readiness-gated, nobody ready: nothing is usable, so the
    // service has no endpoints and refuses.
    s.apply(&svc.publish_not_ready_addresses(false));
    s.apply(&slice.endpoints([
        Endpoint::not_ready(p12),
        Endpoint::not_ready(p21),
        Endpoint::not_ready(p22),
    ]));
    until_refused(&c, Protocol::Tcp, to, CONVERGE);
    refused_on_path(&s, &c, Protocol::Tcp, to);
    s
}

// ---------------------------------------------------------------------------
// 15. service-proxy-name and headless labels
// ---------------------------------------------------------------------------

const PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS: &str = "service.kubernetes.io/headless";

fn foreign_proxy_name_and_headless_labels_ignored(lb: SocketLb) -> Scenario {
    let (ours, foreign, labelled) = (vip(15), vip(16), vip(17));
    let mk = |name: &str, ip: Ipv4Addr| Service::cluster_ip(name, ip).tcp("http", 80, TCP_PORT);
    let foreign_svc = mk("foreign", foreign).label(PROXY_NAME, "other-proxy");
    let s = Scenario::builder("labels", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .object(&mk("ours", ours))
        .object(&foreign_svc)
        .object(&mk("hl", labelled).label(HEADLESS, ""))
        .build()
        .expect("scenario");
    let eps = [Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))];
    let slice = |svc: &str| {
        EndpointSlice::new(&format!("{svc}-1"), svc)
            .tcp_port("http", TCP_PORT)
            .endpoints(eps.clone())
    };
    // The EndpointSlice controller copies the service's labels to its slices.
    s.apply(&slice("ours"));
    let foreign_slice = slice("foreign").label(PROXY_NAME, "other-proxy");
    s.apply(&foreign_slice);
    s.apply(&slice("hl").label(HEADLESS, ""));
    let c = s.client(1, 1);
    let both = ["pod-1-2", "pod-2-1"];
    until_up(&c, &tcp(at(ours, 80), 1));
    until_backends(&c, &tcp(at(ours, 80), 30), &both, CONVERGE);
    all_fail(&c, &tcp(at(foreign, 80), 5));
    all_fail(&c, &tcp(at(labelled, 80), 5));
    // Only our service is programmed; the others have no rules at all
    // (node2's agent may still be on its first sync: wait for it).
    for node in 1..=2 {
        until_frontends(&s, node, &[format!("{ours}:80/TCP")]);
        for ip in [foreign, labelled] {
            assert!(
                !s.programmed_mentions(node, ip),
                "node{node}: {ip} of an ignored service is in our rules"
            );
        }
    }

    // The label removed: now it is ours.
    s.apply(&foreign_svc.clone().without_label(PROXY_NAME));
    s.apply(&foreign_slice.clone().without_label(PROXY_NAME));
    until_backends(&c, &tcp(at(foreign, 80), 30), &both, CONVERGE);
    // And back to another proxy: we let go of it.
    s.apply(&foreign_svc);
    s.apply(&foreign_slice);
    until_fails(&c, &tcp(at(foreign, 80), 1), CONVERGE);
    all_fail(&c, &tcp(at(foreign, 80), 5));
    for node in 1..=2 {
        scenario_eventually(CONVERGE, || {
            if s.programmed_mentions(node, foreign) {
                Err(format!("node{node}: {foreign} still in our rules"))
            } else {
                Ok(())
            }
        });
    }
    until_backends(&c, &tcp(at(ours, 80), 30), &both, CONVERGE);
    on_path(&s, &c, &tcp(at(ours, 80), 10), &both);
    s
}

// ---------------------------------------------------------------------------
// 16. No endpoints: refused at once
// ---------------------------------------------------------------------------

fn no_endpoints_refused_at_once(lb: SocketLb) -> Scenario {
    let (ip, empty, no_slice) = (vip(20), vip(21), vip(22));
    let s = Scenario::builder("noeps", lb)
        .tcp_server((1, 2), TCP_PORT)
        .udp_server((1, 2), UDP_PORT)
        .object(&web(ip))
        .object(
            &Service::cluster_ip("empty", empty)
                .tcp("http", 80, TCP_PORT)
                .udp("dns", 53, UDP_PORT),
        )
        .object(
            &Service::cluster_ip("noslice", no_slice)
                .tcp("http", 80, TCP_PORT)
                .udp("dns", 53, UDP_PORT),
        )
        .build()
        .expect("scenario");
    let slice = web_slice().endpoint(Endpoint::ready(s.pod(1, 2)));
    s.apply(&slice);
    s.apply(
        &EndpointSlice::new("empty-1", "empty")
            .tcp_port("http", TCP_PORT)
            .udp_port("dns", UDP_PORT),
    );
    let c = s.client(1, 1);
    until_up(&c, &tcp(at(ip, 80), 1));

    // An empty slice, and no slice at all.
    for v in [empty, no_slice] {
        until_refused(&c, Protocol::Tcp, at(v, 80), CONVERGE);
        until_refused(&c, Protocol::Udp, at(v, 53), CONVERGE);
    }
    // The last endpoint removed from a working service.
    until_backends(&c, &udp(at(ip, 53), 10), &["pod-1-2"], CONVERGE);
    s.apply(&slice.without_endpoint(s.pod(1, 2).ip));
    until_refused(&c, Protocol::Tcp, at(ip, 80), CONVERGE);
    until_refused(&c, Protocol::Udp, at(ip, 53), CONVERGE);
    refused_on_path(&s, &c, Protocol::Tcp, at(ip, 80));
    refused_on_path(&s, &c, Protocol::Udp, at(ip, 53));
    s
}

// ---------------------------------------------------------------------------
// 17. internalTrafficPolicy: Local
// ---------------------------------------------------------------------------

fn internal_traffic_policy_local(lb: SocketLb) -> Scenario {
    let ip = vip(23);
    let svc = web(ip).internal_traffic_policy(TrafficPolicy::Local);
    let s = Scenario::builder("itp", lb)
        .tcp_server((1, 2), TCP_PORT)
        .udp_server((1, 2), UDP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&svc)
        .build()
        .expect("scenario");
    let (p12, p21) = (s.pod(1, 2), s.pod(2, 1));
    let slice = web_slice().endpoints([Endpoint::ready(p12), Endpoint::ready(p21)]);
    s.apply(&slice);
    let (c1, c2) = (s.client(1, 1), s.client(2, 2));
    let (t, u) = (at(ip, 80), at(ip, 53));
    until_up(&c1, &tcp(t, 1));
    // Each node's clients only reach their own node's endpoint.
    until_backends(&c1, &tcp(t, 30), &["pod-1-2"], CONVERGE);
    until_backends(&c1, &udp(u, 30), &["pod-1-2"], CONVERGE);
    until_backends(&c2, &tcp(t, 30), &["pod-2-1"], CONVERGE);
    until_backends(&c2, &udp(u, 30), &["pod-2-1"], CONVERGE);

    // node1 loses its local endpoint: refused or dropped locally, never sent
    // to node2's endpoint.
    let from_c1 =
        |peers: Vec<SocketAddr>| peers.iter().filter(|p| p.ip() == IpAddr::V4(c1.ip)).count();
    let before_tcp = from_c1(s.tcp_server("pod-2-1").peers());
    let before_udp = from_c1(s.udp_server("pod-2-1").peers());
    s.apply(&slice.without_endpoint(p12.ip));
    until_fails(&c1, &tcp(t, 1), CONVERGE);
    for (req, what) in [(tcp(t, 5), "TCP"), (udp(u, 5), "UDP")] {
        for r in all_fail(&c1, &req) {
            assert!(
                matches!(r.error, Some(ErrorKind::Refused | ErrorKind::TimedOut)),
                "{what}: no local endpoint must be refused or dropped: {r}"
            );
        }
    }
    assert_eq!(from_c1(s.tcp_server("pod-2-1").peers()), before_tcp);
    assert_eq!(from_c1(s.udp_server("pod-2-1").peers()), before_udp);
    // node2 is unaffected.
    until_backends(&c2, &tcp(t, 20), &["pod-2-1"], CONVERGE);
    on_path(&s, &c2, &tcp(t, 10), &["pod-2-1"]);
    s
}

// ---------------------------------------------------------------------------
// 19. Terminating fallback
// ---------------------------------------------------------------------------

fn terminating_fallback(lb: SocketLb) -> Scenario {
    let ip = vip(24);
    let svc = Service::cluster_ip("web", ip).tcp("http", 80, TCP_PORT);
    let s = Scenario::builder("terminating", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .tcp_server((2, 2), TCP_PORT)
        .object(&svc)
        .build()
        .expect("scenario");
    let (p12, p21, p22) = (s.pod(1, 2), s.pod(2, 1), s.pod(2, 2));
    let slice = EndpointSlice::new("web-1", "web").tcp_port("http", TCP_PORT);
    s.apply(&slice.clone().endpoints([
        Endpoint::terminating(p12),
        Endpoint::terminating_not_serving(p21),
        Endpoint::ready(p22),
    ]));
    let c = s.client(1, 1);
    let to = at(ip, 80);
    until_up(&c, &tcp(to, 1));
    // A ready endpoint exists: terminating ones get nothing.
    until_backends(&c, &tcp(to, 30), &["pod-2-2"], CONVERGE);

    // No ready endpoint: the serving+terminating one takes over, the
    // non-serving one does not.
    s.apply(&slice.clone().endpoints([
        Endpoint::terminating(p12),
        Endpoint::terminating_not_serving(p21),
    ]));
    until_backends(&c, &tcp(to, 30), &["pod-1-2"], CONVERGE);
    s.apply(
        &slice
            .clone()
            .endpoints([Endpoint::terminating(p12), Endpoint::terminating(p21)]),
    );
    until_backends(&c, &tcp(to, 40), &["pod-1-2", "pod-2-1"], CONVERGE);

    // A ready one is back: only it.
    s.apply(&slice.clone().endpoints([
        Endpoint::terminating(p12),
        Endpoint::terminating(p21),
        Endpoint::ready(p22),
    ]));
    until_backends(&c, &tcp(to, 30), &["pod-2-2"], CONVERGE);

    // Only terminating, not serving: nothing usable, refused.
    s.apply(&slice.endpoints([
        Endpoint::terminating_not_serving(p12),
        Endpoint::terminating_not_serving(p21),
    ]));
    until_refused(&c, Protocol::Tcp, to, CONVERGE);
    refused_on_path(&s, &c, Protocol::Tcp, to);
    s
}

/// With internalTrafficPolicy Local the fallback is per node: no ready local
/// endpoint means the local serving+terminating one, not a remote ready one.
fn terminating_fallback_internal_local(lb: SocketLb) -> Scenario {
    let ip = vip(25);
    let svc = Service::cluster_ip("web", ip)
        .tcp("http", 80, TCP_PORT)
        .internal_traffic_policy(TrafficPolicy::Local);
    let s = Scenario::builder("term-local", lb)
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .object(&svc)
        .build()
        .expect("scenario");
    s.apply(
        &EndpointSlice::new("web-1", "web")
            .tcp_port("http", TCP_PORT)
            .endpoints([
                Endpoint::terminating(s.pod(1, 2)),
                Endpoint::ready(s.pod(2, 1)),
            ]),
    );
    let (c1, c2) = (s.client(1, 1), s.client(2, 2));
    let to = at(ip, 80);
    until_up(&c1, &tcp(to, 1));
    until_backends(&c1, &tcp(to, 30), &["pod-1-2"], CONVERGE);
    until_backends(&c2, &tcp(to, 30), &["pod-2-1"], CONVERGE);
    on_path(&s, &c1, &tcp(to, 10), &["pod-1-2"]);
    s
}

// ---------------------------------------------------------------------------
// 14. Session affinity ClientIP
// ---------------------------------------------------------------------------

/// The single backend of a run, or an error if it reached several.
fn single_backend(c: &PodClient, req: &Request) -> Result<String, String> {
    let t = backends(c, req)?;
    match names(&t)[..] {
        [one] => Ok(one.to_owned()),
        _ => Err(format!("{:?} {} reached {t:?}", req.proto, req.to)),
    }
}

fn session_affinity_client_ip(lb: SocketLb) -> Scenario {
    let ip = vip(26);
    // Five backends (2 nodes x 3 pods, minus the client).
    let mut b = Scenario::builder("affinity", lb).cluster(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
        external_client: false,
    });
    let pods = [(1, 2), (1, 3), (2, 1), (2, 2), (2, 3)];
    for p in pods {
        b = b.tcp_server(p, TCP_PORT).udp_server(p, UDP_PORT);
    }
    let svc = web(ip).affinity_client_ip(1);
    let s = b.object(&svc).build().expect("scenario");
    s.apply(&web_slice().endpoints(pods.map(|(i, j)| Endpoint::ready(s.pod(i, j)))));
    let c = s.client(1, 1);
    let (t, u) = (at(ip, 80), at(ip, 53));
    until_up(&c, &tcp(t, 1));

    // 100 connections (each from its own source port) stick to one backend;
    // UDP too.
    let sticky =
        single_backend(&c, &tcp(t, 100).sport_spread()).unwrap_or_else(|e| panic!("affinity: {e}"));
    single_backend(&c, &udp(u, 30).sport_spread()).unwrap_or_else(|e| panic!("affinity: {e}"));
    // Traffic refreshes the timeout: requests 400 ms apart for longer than
    // the timeout stay on the same backend.
    for i in 0..4 {
        std::thread::sleep(Duration::from_millis(400));
        let now = single_backend(&c, &tcp(t, 3)).unwrap_or_else(|e| panic!("refresh {i}: {e}"));
        assert_eq!(now, sticky, "affinity lost after {i} refreshes");
    }

    // Idle for longer than the timeout: the next connection picks afresh
    // (then sticks again). With 5 backends, 6 rounds all picking the same
    // one again happen with probability 5^-6.
    let mut picks = vec![sticky.clone()];
    let started = Instant::now();
    while picks.iter().all(|p| *p == sticky) {
        assert!(
            picks.len() <= 6,
            "affinity never expired: {picks:?} after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2300));
        picks.push(
            single_backend(&c, &tcp(t, 10).sport_spread())
                .unwrap_or_else(|e| panic!("after expiry: {e}")),
        );
    }

    // Affinity with a long timeout, then switched off: spreads at once.
    s.apply(&web(ip).affinity_client_ip(60));
    scenario_eventually(CONVERGE, || single_backend(&c, &tcp(t, 30).sport_spread()));
    s.apply(&web(ip).no_affinity());
    scenario_eventually(CONVERGE, || {
        let t = backends(&c, &tcp(t, 30).sport_spread())?;
        if t.len() >= 2 {
            Ok(())
        } else {
            Err(format!("still sticky after affinity off: {t:?}"))
        }
    });
    // And on again: sticky at once.
    s.apply(&svc.affinity_client_ip(60));
    let one = scenario_eventually(CONVERGE, || single_backend(&c, &tcp(t, 50).sport_spread()));
    on_path(&s, &c, &tcp(t, 10).sport_spread(), &[one.as_str()]);
    s
}

// ---------------------------------------------------------------------------
// The socket path itself
// ---------------------------------------------------------------------------

mod socket_path {
    use super::*;

    fn setup(lb: SocketLb) -> Scenario {
        // The tc programs attach to no interface: only the socket hooks can
        // translate.
        let s = Scenario::builder("sockpath", lb)
            .tcp_server((1, 2), TCP_PORT)
            .udp_server((1, 2), UDP_PORT)
            .tcp_server((2, 1), TCP_PORT)
            .udp_server((2, 1), UDP_PORT)
            .agent_args(&["--pod-device", "no-such-device"])
            .object(&web(vip(30)))
            .build()
            .expect("scenario");
        s.apply(
            &web_slice().endpoints([Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))]),
        );
        scenario_eventually(START, || {
            let f = s.frontends(1);
            if f.iter().any(|x| x.starts_with(&vip(30).to_string())) {
                Ok(())
            } else {
                Err(format!("{f:?}"))
            }
        });
        s
    }

    /// Socket LB on: members of the node's cgroup are translated at
    /// connect()/sendmsg() time without any tc program; processes outside
    /// that cgroup are not.
    #[test]
    fn socket_lb_on_translates_members_of_the_cgroup_only() {
        let s = setup(SocketLb::On);
        let c = s.client(1, 1);
        let (t, u) = (at(vip(30), 80), at(vip(30), 53));
        let both = ["pod-1-2", "pod-2-1"];
        until_backends(&c, &tcp(t, 30), &both, START);
        until_backends(&c, &udp(u, 30), &both, CONVERGE);

        // The test process (not in the cgroup), in the same pod namespace.
        let e = tcp_request(&s.pod(1, 1).ns, t, Duration::from_millis(500))
            .expect_err("a thread outside the cgroup is not translated");
        assert!(!e.is_timed_out(), "{e}");
        // A podclient in an unrelated cgroup, same pod namespace.
        let elsewhere = Cgroup::new("no-hooks").expect("cgroup");
        let outside = PodClient::new(s.pod(1, 1), &elsewhere);
        all_fail(&outside, &tcp(t, 3));
    }

    /// Socket LB off: the hooks are not attached, so without tc programs
    /// nothing translates, even for members of the cgroup.
    #[test]
    fn socket_lb_off_attaches_no_hooks() {
        let s = setup(SocketLb::Off);
        let c = s.client(1, 1);
        all_fail(&c, &tcp(at(vip(30), 80), 3));
        all_fail(&c, &udp(at(vip(30), 53), 3));
    }
}

// ---------------------------------------------------------------------------
// The client itself (no agent)
// ---------------------------------------------------------------------------

mod podclient {
    use super::*;

    fn small() -> Cluster {
        Cluster::new(ClusterSpec {
            nodes: 1,
            pods_per_node: 2,
            external_client: false,
        })
        .expect("cluster")
    }

    #[test]
    fn requests_and_errors_are_reported() {
        let cluster = small();
        let (p1, p2) = (cluster.pod(1, 1), cluster.pod(1, 2));
        let _tcp =
            TcpServer::start(&p2.ns, "srv", at(Ipv4Addr::UNSPECIFIED, TCP_PORT)).expect("tcp");
        let _udp =
            UdpServer::start(&p2.ns, "srv", at(Ipv4Addr::UNSPECIFIED, UDP_PORT)).expect("udp");
        let cg = Cgroup::new("podclient").expect("cgroup");
        let c = PodClient::new(p1, &cg);

        let rs = c
            .run(&tcp(at(p2.ip, TCP_PORT), 5).sport_spread())
            .expect("tcp");
        assert_eq!(tally(&rs, p1.ip, at(p2.ip, TCP_PORT)).get("srv"), Some(&5));
        let ports: std::collections::BTreeSet<_> = rs
            .iter()
            .filter_map(|r| r.local.map(|l| l.port()))
            .collect();
        assert_eq!(ports.len(), 5, "--sport-spread: {rs:?}");
        let rs = c.run(&udp(at(p2.ip, UDP_PORT), 5)).expect("udp");
        assert_eq!(tally(&rs, p1.ip, at(p2.ip, UDP_PORT)).get("srv"), Some(&5));

        let r = c.one(Protocol::Tcp, at(p2.ip, 1));
        assert!(r.is_refused() && r.elapsed() < AT_ONCE, "{r}");
        let r = c.one(Protocol::Udp, at(p2.ip, 1));
        assert!(r.is_refused() && r.elapsed() < AT_ONCE, "{r}");
        let r = c.one(Protocol::Tcp, at(Ipv4Addr::new(10, 244, 1, 200), 80));
        assert_eq!(r.error, Some(ErrorKind::Unreachable), "{r}");
        let r = c
            .run(
                &tcp(at(Ipv4Addr::new(172, 18, 0, 200), 80), 1).timeout(Duration::from_millis(300)),
            )
            .expect("run")
            .remove(0);
        assert_eq!(r.error, Some(ErrorKind::TimedOut), "{r}");
        assert!(r.elapsed() >= Duration::from_millis(300), "{r}");
    }

    #[test]
    fn hold_streams_run_inside_the_cgroup() {
        let cluster = small();
        let (p1, p2) = (cluster.pod(1, 1), cluster.pod(1, 2));
        let sink =
            TcpServer::start_sink(&p2.ns, "sink", at(Ipv4Addr::UNSPECIFIED, 7000)).expect("sink");
        let cg = Cgroup::new("hold").expect("cgroup");
        let c = PodClient::new(p1, &cg);

        let run = c.spawn_hold(at(p2.ip, 7000), 1.0, 3).expect("spawn");
        let pid = run.id().expect("pid");
        // The client is a member of the cgroup (and the test process is not).
        let deadline = Instant::now() + Duration::from_secs(2);
        while sink.open_connections() < 3 {
            assert!(Instant::now() < deadline, "streams never opened");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cg.procs().expect("procs").contains(&pid));
        let rel = cgroup_of(pid).expect("cgroup of client");
        assert!(cg.path().ends_with(rel.trim_start_matches('/')), "{rel}");
        assert_ne!(cgroup_of(std::process::id()).expect("self"), rel);
        let rs: Vec<StreamResult> = run.wait(Duration::from_secs(5)).expect("wait");
        assert_eq!(rs.len(), 3);
        for r in &rs {
            assert!(r.ok && r.sent > 0 && r.acked == r.sent, "{r:?}");
            assert_eq!(r.peer, Some(at(p2.ip, 7000)));
        }
        let total: u64 = rs.iter().map(|r| r.acked).sum();
        assert_eq!(sink.bytes_received(), total);
        assert!(sink.peers().iter().all(|p| p.ip() == IpAddr::V4(p1.ip)));

        // The server going away mid-run is reported per stream.
        let run = c.spawn_hold(at(p2.ip, 7000), 1.0, 2).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(2);
        while sink.open_connections() < 2 {
            assert!(Instant::now() < deadline, "streams never opened");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(sink);
        let rs: Vec<StreamResult> = run.wait(Duration::from_secs(5)).expect("wait");
        assert_eq!(rs.len(), 2);
        for r in &rs {
            assert!(!r.ok && r.error.is_some() && r.elapsed_ms < 1000.0, "{r:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// 20. UDP: a long-lived flow survives its backend being replaced
// ---------------------------------------------------------------------------

fn udp_flow_survives_backend_replacement(lb: SocketLb) -> Scenario {
    let ip = vip(40);
    let s = Scenario::builder("udpstale", lb)
        .udp_server((1, 2), UDP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&web(ip))
        .build()
        .expect("scenario");
    let (old, new) = (s.pod(1, 2), s.pod(2, 1));
    s.apply(&web_slice().endpoint(Endpoint::ready(old)));
    let c = s.client(1, 1);
    until_backends(&c, &udp(at(ip, 53), 5), &["pod-1-2"], CONVERGE);

    // One flow: the same source port every time, a datagram every 25 ms.
    let to = at(ip, 53).to_string();
    let flow = c
        .spawn(
            &[
                "--proto",
                "udp",
                "--to",
                &to,
                "--count",
                "100",
                "--timeout-ms",
                "200",
                "--sport",
                "41234",
                "--interval-ms",
                "25",
            ]
            .map(String::from),
        )
        .expect("spawn flow");
    std::thread::sleep(Duration::from_millis(800));
    // The pod is replaced: the old endpoint goes, a new one comes (the old
    // server keeps answering, so only the proxy can move the flow).
    s.apply(&web_slice().endpoints([Endpoint::ready(new)]));
    let results: Vec<ClientResult> = flow.wait(Duration::from_secs(30)).expect("flow");
    assert_eq!(results.len(), 100);
    assert_eq!(results[0].backend(), Some("pod-1-2"), "{}", results[0]);
    let tail = &results[results.len() - 30..];
    for r in tail {
        assert!(
            r.ok && r.backend() == Some("pod-2-1"),
            "the flow moved to the new backend and stays there: {r}"
        );
    }
    s
}

// ---------------------------------------------------------------------------
// 7. Agent restart (kill -9) with streams running, in both modes
// ---------------------------------------------------------------------------

fn agent_kill_9_keeps_streams_and_new_connections(lb: SocketLb) -> Scenario {
    let ip = vip(41);
    let mut s = Scenario::builder("restart", lb)
        .tcp_sink((1, 2), 9000)
        .tcp_sink((2, 1), 9000)
        .tcp_server((2, 2), TCP_PORT)
        .object(
            &Service::cluster_ip("sink", ip)
                .tcp("sink", 80, 9000)
                .tcp("http", 81, TCP_PORT),
        )
        .build()
        .expect("scenario");
    s.apply(
        &EndpointSlice::new("sink-1", "sink")
            .tcp_port("sink", 9000)
            .endpoints([Endpoint::ready(s.pod(1, 2)), Endpoint::ready(s.pod(2, 1))]),
    );
    s.apply(
        &EndpointSlice::new("sink-2", "sink")
            .tcp_port("http", TCP_PORT)
            .endpoints([Endpoint::ready(s.pod(2, 2))]),
    );
    let c = s.client(1, 1);
    until_up(&c, &tcp(at(ip, 81), 1));
    let streams = c.spawn_hold(at(ip, 80), 3.0, 20).expect("streams");
    std::thread::sleep(Duration::from_millis(500));
    s.agent_mut(1).kill_and_restart().expect("restart");
    // New connections right after the restart.
    for r in c.run(&tcp(at(ip, 81), 10)).expect("requests") {
        assert!(r.ok, "new connection after restart: {r}");
    }
    let rs: Vec<StreamResult> = streams.wait(Duration::from_secs(15)).expect("streams");
    assert_eq!(rs.len(), 20);
    for r in &rs {
        assert!(
            r.ok && r.acked == r.sent && r.sent > 0,
            "stream survived: {r:?}"
        );
    }
    s
}

// ---------------------------------------------------------------------------
// 8 (from inside), 9 (from inside), 12: NodePort on node addresses and an
// ExternalIP reached from pods; after delete nothing answers there.
// ---------------------------------------------------------------------------

fn node_port_and_external_ip_from_pods_then_released(lb: SocketLb) -> Scenario {
    let ip = vip(42);
    let ext = Ipv4Addr::new(192, 0, 2, 42);
    let svc = Service::cluster_ip("np", ip)
        .tcp("http", 80, TCP_PORT)
        .udp("dns", 53, UDP_PORT)
        .node_port("http", 30080)
        .node_port("dns", 30053)
        .external_ip(ext);
    let s = Scenario::builder("nodeport", lb)
        .tcp_server((2, 1), TCP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&svc)
        .build()
        .expect("scenario");
    s.apply(
        &EndpointSlice::new("np-1", "np")
            .tcp_port("http", TCP_PORT)
            .udp_port("dns", UDP_PORT)
            .endpoints([Endpoint::ready(s.pod(2, 1))]),
    );
    let c = s.client(1, 1);
    let node1 = s.cluster.node(1).underlay_ip;
    until_up(&c, &tcp(at(ip, 80), 1));
    // The node's own address on the node port, and the external IP.
    until_backends(&c, &tcp(at(node1, 30080), 5), &["pod-2-1"], CONVERGE);
    until_backends(&c, &udp(at(node1, 30053), 5), &["pod-2-1"], CONVERGE);
    until_backends(&c, &tcp(at(ext, 80), 5), &["pod-2-1"], CONVERGE);

    s.delete("Service", "np");
    // Released: the node port is refused at once (nothing listens there).
    until_refused(&c, Protocol::Tcp, at(node1, 30080), CONVERGE);
    s
}

/// Behaviour 22 (docs/service-behaviours.md) from inside the cluster: `loadBalancerSourceRanges`
/// hold for pods reaching the LoadBalancer IP too (kube-proxy's firewall
/// chain sees their traffic). With socket LB on, the socket hooks leave such
/// frontends to the per-packet path, which knows the client's address.
fn load_balancer_source_ranges_from_pods(lb: SocketLb) -> Scenario {
    let ip = vip(43);
    let lb_ip = Ipv4Addr::new(192, 0, 2, 43);
    let s = Scenario::builder("lbranges", lb)
        .tcp_server((2, 1), TCP_PORT)
        .build()
        .expect("scenario");
    let allowed = s.pod(1, 1).ip;
    s.apply(
        &Service::cluster_ip("lbr", ip)
            .tcp("http", 80, TCP_PORT)
            .load_balancer(lb_ip, &[&format!("{allowed}/32")]),
    );
    s.apply(
        &EndpointSlice::new("lbr-1", "lbr")
            .tcp_port("http", TCP_PORT)
            .endpoints([Endpoint::ready(s.pod(2, 1))]),
    );
    let c = s.client(1, 1);
    until_up(&c, &tcp(at(lb_ip, 80), 1));
    until_backends(&c, &tcp(at(lb_ip, 80), 5), &["pod-2-1"], CONVERGE);
    // Another pod is not listed: dropped (not refused: kube-proxy drops).
    let other = s.client(1, 2);
    let rs = other
        .run(&tcp(at(lb_ip, 80), 3).timeout(Duration::from_millis(300)))
        .expect("run");
    assert!(
        rs.iter().all(|r| r.error == Some(ErrorKind::TimedOut)),
        "a pod outside loadBalancerSourceRanges was served or refused, not dropped: {rs:?}"
    );
    // Dropped by our source-range check on the client's node (the eBPF
    // drop counter, or the packet counter of the mode's drop rule).
    let drops = s.source_range_drops(1);
    assert!(
        drops > 0,
        "{lb:?}: no source-range drop counted on node1 ({drops})"
    );
    // The ClusterIP of the same service is not guarded.
    until_backends(&other, &tcp(at(ip, 80), 3), &["pod-2-1"], CONVERGE);
    s
}
