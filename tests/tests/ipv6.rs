//! IPv6 and dual-stack ClusterIP services end to end in the eBPF mode:
//! API server fixture -> agent on every node -> `SVC_V6` / `BACKENDS_V6` /
//! `REVNAT_V6` -> either connect6/sendmsg6 in the client's cgroup (socket
//! LB on) or the tc programs on the pods' host interfaces (socket LB off:
//! DNAT, `CT_V6`, reverse NAT, RST / ICMPv6 rejects) -> IPv6 packets
//! between pods on different nodes.
//!
//! The counters prove which path served the traffic (`sock_xlate` for
//! socket LB; `dnat` and its IPv6 share `dnat_v6`, the rejects, for tc).
//! The services' backends run on node 2, the client on node 1: a request
//! that reaches a backend crossed the nodes on the address the proxy
//! chose.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proxy_tests::scenario::{
    Endpoint, EndpointSlice, PodClient, Protocol, Request, Scenario, Service, SocketLb, eventually,
    until_refused,
};
use serde_json::Value;

/// First sync after the agents start.
const START: Duration = Duration::from_secs(8);
/// A change in the API reflected in the maps.
const CONVERGE: Duration = Duration::from_secs(3);

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// The IPv6-only service's ClusterIP.
const SIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc8, 1);
/// The dual-stack service's ClusterIPs.
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 201, 2);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc8, 2);
/// An IPv6-only service without endpoints (the tc scenario's).
const NONE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc8, 3);

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Runs `req` from `c`: every request must succeed, the client's peer must
/// be the address it asked for (socket LB hides the backend) and the
/// backend must see the client pod's own address of the request's family.
/// Returns replies per backend.
fn backends(
    c: &PodClient,
    req: &Request,
    client: IpAddr,
) -> Result<BTreeMap<String, usize>, String> {
    let rs = c.run(req).map_err(|e| format!("{e:#}"))?;
    let mut seen = BTreeMap::new();
    for (i, r) in rs.iter().enumerate() {
        if !r.ok {
            return Err(format!(
                "{:?} {} request {i} failed: {r}",
                req.proto, req.to
            ));
        }
        if r.peer != Some(req.to) {
            return Err(format!(
                "{:?} {} request {i}: the client's peer is {:?}: {r}",
                req.proto, req.to, r.peer
            ));
        }
        let (Some(name), Some(saw)) = (r.backend(), r.seen_client()) else {
            return Err(format!("request {i}: unparsable reply: {r}"));
        };
        // A `[::]` listener shows an IPv4 client as `::ffff:a.b.c.d`.
        if saw.ip().to_canonical() != client {
            return Err(format!(
                "request {i}: backend {name} saw {saw}, not the client {client}: {r}"
            ));
        }
        *seen.entry(name.to_owned()).or_default() += 1;
    }
    Ok(seen)
}

/// Waits until `n` requests to `to` reach exactly the backends `want`.
#[track_caller]
fn until_backends(c: &PodClient, req: &Request, client: IpAddr, want: &[&str], within: Duration) {
    eventually(within, || {
        let t = backends(c, req, client)?;
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        if names == want {
            Ok(())
        } else {
            Err(format!(
                "{:?} {} reached {t:?}, want {want:?}",
                req.proto, req.to
            ))
        }
    });
}

/// `proxyctl dump-maps --output json` of node `i`'s agent.
fn dump(s: &Scenario, i: usize) -> Value {
    let out = s
        .agent(i)
        .proxyctl(&["dump-maps", "--output", "json"])
        .unwrap_or_else(|e| panic!("dump-maps on node {i}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dump-maps JSON: {e}"))
}

/// Entries of map `name` in a dump.
fn entries(dump: &Value, name: &str) -> u64 {
    dump["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["name"] == name))
        .and_then(|m| m["entries"].as_u64())
        .unwrap_or_else(|| panic!("{name} not in the dump"))
}

/// The IPv6 addresses of the dump's backend entries.
fn v6_backend_ips(d: &Value) -> Vec<String> {
    backend_ips(d)
        .into_iter()
        .filter(|ip| ip.contains(':'))
        .collect()
}

/// The backend addresses (`ip`) of a dump.
fn backend_ips(dump: &Value) -> Vec<String> {
    let mut v: Vec<String> = dump["backends"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|e| e["backend"]["ip"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// An IPv6-only ClusterIP (backends pod-2-1 and pod-2-2) and a dual-stack
/// one whose IPv4 slice holds pod-2-1 and whose IPv6 slice holds pod-2-2,
/// so each family's address must reach its own family's endpoint only.
fn scenario() -> Scenario {
    scenario_in("ipv6", SocketLb::On, false)
}

/// [`scenario`] in mode `lb`; with `none6`, also [`NONE6`] (TCP 80, UDP 53)
/// without endpoints.
fn scenario_in(label: &str, lb: SocketLb, none6: bool) -> Scenario {
    let svc = |s: Service| s.tcp("http", 80, TCP_PORT).udp("dns", 53, UDP_PORT);
    let mut b = Scenario::builder(label, lb);
    if none6 {
        b = b.object(&svc(Service::cluster_ip("none6", NONE6)));
    }
    let s = b
        .dual_stack_servers()
        .tcp_server((2, 1), TCP_PORT)
        .tcp_server((2, 2), TCP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .udp_server((2, 2), UDP_PORT)
        .object(&svc(Service::cluster_ip("six", SIX)))
        .object(&svc(Service::dual_stack(
            "dual",
            DUAL4.into(),
            DUAL6.into(),
        )))
        .build()
        .expect("scenario");
    let slice = |name: &str, service: &str| {
        EndpointSlice::new(name, service)
            .tcp_port("http", TCP_PORT)
            .udp_port("dns", UDP_PORT)
    };
    let (p21, p22) = (s.pod(2, 1), s.pod(2, 2));
    s.apply(
        &slice("six-1", "six")
            .ipv6()
            .endpoint(Endpoint::ready(p21).ipv6(p21))
            .endpoint(Endpoint::ready(p22).ipv6(p22)),
    );
    s.apply(&slice("dual-v4", "dual").endpoint(Endpoint::ready(p21)));
    s.apply(
        &slice("dual-v6", "dual")
            .ipv6()
            .endpoint(Endpoint::ready(p22).ipv6(p22)),
    );
    s
}

#[test]
fn ipv6_and_dual_stack_cluster_ips_through_socket_lb_then_removed() {
    let s = scenario();
    let c = s.client(1, 1);
    let (me4, me6): (IpAddr, IpAddr) = (s.pod(1, 1).ip.into(), s.pod(1, 1).ip6.into());
    let tcp = |to: SocketAddr, n| Request::tcp(to).count(n);
    let udp = |to: SocketAddr, n| Request::udp(to).count(n);
    let both = ["pod-2-1", "pod-2-2"];

    // The IPv6-only service: both backends, TCP and UDP.
    until_backends(&c, &tcp(at(SIX, 80), 30), me6, &both, START);
    until_backends(&c, &udp(at(SIX, 53), 30), me6, &both, CONVERGE);
    // The dual-stack service: each family to its own endpoint only.
    until_backends(&c, &tcp(at(DUAL6, 80), 10), me6, &["pod-2-2"], CONVERGE);
    until_backends(&c, &udp(at(DUAL6, 53), 10), me6, &["pod-2-2"], CONVERGE);
    until_backends(&c, &tcp(at(DUAL4, 80), 10), me4, &["pod-2-1"], CONVERGE);
    until_backends(&c, &udp(at(DUAL4, 53), 10), me4, &["pod-2-1"], CONVERGE);

    // Socket LB did it: every IPv6 request counted by the socket hooks,
    // none by the tc programs (which are IPv4 only anyway).
    for req in [
        tcp(at(SIX, 80), 5),
        udp(at(SIX, 53), 5),
        tcp(at(DUAL6, 80), 5),
    ] {
        for r in s.assert_path(&c, &req) {
            assert!(r.ok, "{:?} {}: {r}", req.proto, req.to);
        }
    }
    s.assert_datapath();

    // What node 1 programmed: the IPv6 frontends in SVC_V6 beside the
    // IPv4 one, their backends in BACKENDS_V6.
    let frontends = s.frontends(1);
    for want in [
        "10.96.201.2:53/UDP",
        "10.96.201.2:80/TCP",
        "[fd00:96::c8:1]:53/UDP",
        "[fd00:96::c8:1]:80/TCP",
        "[fd00:96::c8:2]:53/UDP",
        "[fd00:96::c8:2]:80/TCP",
    ] {
        assert!(
            frontends.iter().any(|f| f == want),
            "{want} in {frontends:?}"
        );
    }
    let d = dump(&s, 1);
    assert_eq!(entries(&d, "SVC_V6"), 4, "six and dual, TCP and UDP");
    let (ip21, ip22) = (s.pod(2, 1).ip6.to_string(), s.pod(2, 2).ip6.to_string());
    // (address, port, protocol) each: TCP and UDP per pod.
    assert_eq!(
        v6_backend_ips(&d),
        [ip21.clone(), ip21.clone(), ip22.clone(), ip22.clone()],
        "BACKENDS_V6"
    );
    assert_eq!(entries(&d, "BACKENDS_V6"), 4);

    // Part two: the IPv6-only service goes; its frontends and the backends
    // only it used leave the maps (pod-2-2 stays: the dual-stack service's
    // IPv6 family uses it), and its address is served no more.
    s.delete("Service", "six");
    eventually(CONVERGE, || {
        let f = s.frontends(1);
        if f.iter().any(|f| f.contains("fd00:96::c8:1")) {
            Err(format!("still programmed: {f:?}"))
        } else {
            Ok(())
        }
    });
    let d = dump(&s, 1);
    assert_eq!(entries(&d, "SVC_V6"), 2, "only the dual-stack service's");
    assert_eq!(
        v6_backend_ips(&d),
        [ip22.clone(), ip22],
        "BACKENDS_V6 after removal"
    );
    assert_eq!(entries(&d, "BACKENDS_V6"), 2);
    let gone = c
        .run(&tcp(at(SIX, 80), 1).timeout(Duration::from_millis(300)))
        .expect("podclient");
    assert!(
        !gone[0].ok,
        "the removed service still answered: {}",
        gone[0]
    );
    // The dual-stack service is untouched.
    until_backends(&c, &tcp(at(DUAL6, 80), 5), me6, &["pod-2-2"], CONVERGE);
    until_backends(&c, &tcp(at(DUAL4, 80), 5), me4, &["pod-2-1"], CONVERGE);
    s.assert_datapath();
}

/// Socket LB off ("ebpf-tc"): the tc programs on the pods' host interfaces
/// serve the IPv6 frontends. The same services as above reach their
/// family's backends with the client's own address (no SNAT) and the
/// frontend as the replies' source (reverse NAT: the client's peer is the
/// address it asked for); the counters prove the tc path translated the
/// IPv6 requests (`dnat_v6` grows by at least one per request, the socket
/// hooks never ran) and the flows are in `CT_V6`. An IPv6 service without
/// endpoints is refused at once over TCP (RST) and UDP (ICMPv6 port
/// unreachable), counted by the tc rejects.
#[test]
fn ipv6_cluster_ips_through_the_tc_path_with_socket_lb_off() {
    let s = scenario_in("ipv6-tc", SocketLb::Off, true);
    let c = s.client(1, 1);
    let (me4, me6): (IpAddr, IpAddr) = (s.pod(1, 1).ip.into(), s.pod(1, 1).ip6.into());
    let tcp = |to: SocketAddr, n| Request::tcp(to).count(n);
    let udp = |to: SocketAddr, n| Request::udp(to).count(n);
    let both = ["pod-2-1", "pod-2-2"];

    until_backends(&c, &tcp(at(SIX, 80), 30), me6, &both, START);
    until_backends(&c, &udp(at(SIX, 53), 30), me6, &both, CONVERGE);
    until_backends(&c, &tcp(at(DUAL6, 80), 10), me6, &["pod-2-2"], CONVERGE);
    until_backends(&c, &udp(at(DUAL6, 53), 10), me6, &["pod-2-2"], CONVERGE);
    until_backends(&c, &tcp(at(DUAL4, 80), 10), me4, &["pod-2-1"], CONVERGE);

    // The tc path did it, on IPv6: every request counted by the tc
    // programs, none by the socket hooks, and the IPv6 DNAT counter of the
    // client's node grew by at least one per IPv6 request.
    let v6_dnat = |s: &Scenario| s.stats(1).get("dnat_v6").copied().unwrap_or(0);
    let before = v6_dnat(&s);
    let reqs = [
        tcp(at(SIX, 80), 5),
        udp(at(SIX, 53), 5),
        tcp(at(DUAL6, 80), 5),
    ];
    for req in &reqs {
        for r in s.assert_path(&c, req) {
            assert!(r.ok, "{:?} {}: {r}", req.proto, req.to);
        }
    }
    let grew = v6_dnat(&s) - before;
    assert!(grew >= 15, "dnat_v6 grew by {grew} for 15 IPv6 requests");
    s.assert_datapath();

    // The flows are tracked in CT_V6, decoded with IPv6 endpoints; the
    // frontends have their REVNAT_V6 entries.
    let d = dump(&s, 1);
    assert!(entries(&d, "CT_V6") > 0, "CT_V6 holds the flows");
    let me = s.pod(1, 1).ip6.to_string();
    let ct = d["conntrack"].as_array().cloned().unwrap_or_default();
    assert!(
        ct.iter()
            .any(|e| e["src"].as_str().is_some_and(|a| a.contains(&me))),
        "a conntrack entry from [{me}]: {ct:?}"
    );
    assert_eq!(
        entries(&d, "REVNAT_V6"),
        6,
        "six, dual and none6, TCP and UDP"
    );

    // No endpoints: refused at once, by the tc path's rejects.
    let rejects = |s: &Scenario| {
        let st = s.stats(1);
        (
            st.get("reject_tcp_rst").copied().unwrap_or(0),
            st.get("reject_icmp").copied().unwrap_or(0),
        )
    };
    let (rst0, icmp0) = rejects(&s);
    until_refused(&c, Protocol::Tcp, at(NONE6, 80), CONVERGE);
    until_refused(&c, Protocol::Udp, at(NONE6, 53), CONVERGE);
    let (rst1, icmp1) = rejects(&s);
    assert!(rst1 >= rst0 + 6, "TCP RSTs: {rst0} -> {rst1}");
    assert!(
        icmp1 >= icmp0 + 6,
        "ICMPv6 port unreachables: {icmp0} -> {icmp1}"
    );
}
