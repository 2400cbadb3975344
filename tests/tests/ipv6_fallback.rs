//! IPv6 and dual-stack Services in the kube-proxy fallback modes
//! (iptables: ip6tables; nftables: the `ip6 kube-proxy-rs` table), end to
//! end: API server fixture -> agent on every node (a dual-stack Node:
//! NodePorts on its IPv6 address too) -> ip6tables rules / ip6 table ->
//! IPv6 packets DNATed between pods on different nodes, or rejected.
//!
//! One cluster per mode. From pod-1-1 and from the external client:
//!
//! * `six`, IPv6-only, ClusterIP + NodePort 30610, endpoints pod-1-2 and
//!   pod-2-1: the ClusterIP from the pod reaches both; the NodePort on
//!   either node's IPv6 address answers the pod and the external client.
//! * `dual`, dual-stack, ClusterIP + NodePort 30611, the IPv4 slice holds
//!   pod-1-2, the IPv6 one pod-2-2: each family's ClusterIP and NodePort
//!   reach their family's endpoint only, from the pod and from outside
//!   (the external client's routes to the service ranges go through the
//!   node holding that family's endpoint: ClusterIP traffic is not
//!   masqueraded, as in kube-proxy).
//! * `none6`, IPv6-only, ClusterIP + NodePort 30612, no endpoints: TCP is
//!   refused (reset) and UDP too (ICMPv6 port unreachable), at once.
//! * `udp6`, IPv6-only UDP ClusterIP: a long-lived flow (one source port)
//!   moves to the new endpoint when its endpoint is replaced (the mode
//!   flushes the IPv6 conntrack entries of the removed backend).
//!
//! The ip6tables / ip6 table rule counters prove the IPv6 traffic went
//! through the mode under test (the IPv4 ones stay out of it: the eBPF
//! mode pins nothing).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use proxy_tests::cluster::{ClientError, parse_reply, tcp_request, udp_request};
use proxy_tests::scenario::{
    DataplaneMode, Endpoint, EndpointSlice, PodClient, Request, Scenario, Service, eventually,
    fallback_counter_of,
};

/// First sync after the agents start.
const START: Duration = Duration::from_secs(10);
const CONVERGE: Duration = Duration::from_secs(3);
const TIMEOUT: Duration = Duration::from_secs(2);
/// A reject is answered at once, not after a timeout.
const FAST: Duration = Duration::from_millis(500);

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

const SIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc9, 1);
const DUAL4: Ipv4Addr = Ipv4Addr::new(10, 96, 202, 2);
const DUAL6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc9, 2);
const NONE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc9, 3);
const UDP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc9, 4);
const NP_SIX: u16 = 30610;
const NP_DUAL: u16 = 30611;
const NP_NONE: u16 = 30612;

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn scenario(mode: DataplaneMode) -> Scenario {
    let web = |s: Service| s.tcp("http", 80, TCP_PORT);
    let s = Scenario::builder("ipv6-fallback", mode)
        .dual_stack_servers()
        .tcp_server((1, 2), TCP_PORT)
        .tcp_server((2, 1), TCP_PORT)
        .tcp_server((2, 2), TCP_PORT)
        .udp_server((1, 2), UDP_PORT)
        .udp_server((2, 1), UDP_PORT)
        .object(&Service::cluster_ip("udp6", UDP6).udp("dns", 53, UDP_PORT))
        .object(&web(Service::cluster_ip("six", SIX)).node_port("http", NP_SIX))
        .object(
            &web(Service::dual_stack("dual", DUAL4.into(), DUAL6.into()))
                .node_port("http", NP_DUAL),
        )
        .object(
            &web(Service::cluster_ip("none6", NONE6))
                .udp("dns", 53, UDP_PORT)
                .node_port("http", NP_NONE),
        )
        .build()
        .expect("scenario");
    let slice =
        |name: &str, service: &str| EndpointSlice::new(name, service).tcp_port("http", TCP_PORT);
    let (p12, p21, p22) = (s.pod(1, 2), s.pod(2, 1), s.pod(2, 2));
    s.apply(
        &slice("six-1", "six")
            .ipv6()
            .endpoint(Endpoint::ready(p12).ipv6(p12))
            .endpoint(Endpoint::ready(p21).ipv6(p21)),
    );
    s.apply(&slice("dual-v4", "dual").endpoint(Endpoint::ready(p12)));
    s.apply(&udp6_slice().endpoint(Endpoint::ready(p12).ipv6(p12)));
    s.apply(
        &slice("dual-v6", "dual")
            .ipv6()
            .endpoint(Endpoint::ready(p22).ipv6(p22)),
    );
    s
}

/// The `udp6` service's IPv6 slice (its endpoints added by the caller).
fn udp6_slice() -> EndpointSlice {
    EndpointSlice::new("udp6-1", "udp6")
        .ipv6()
        .udp_port("dns", UDP_PORT)
}

/// A UDP flow (one source port, a datagram every 25 ms) to `udp6` from
/// `c` while its endpoint pod-1-2 is replaced by pod-2-1 (the old server
/// keeps answering, so only the proxy can move the flow).
fn udp6_flow_moves_to_the_new_endpoint(s: &Scenario, c: &PodClient) {
    eventually(CONVERGE, || {
        let r = c.one(proxy_tests::scenario::Protocol::Udp, at(UDP6, 53));
        match r.backend() {
            Some("pod-1-2") if r.ok => Ok(()),
            _ => Err(format!("UDP to {UDP6}: {r}")),
        }
    });
    let to = at(UDP6, 53).to_string();
    let flow = c
        .spawn(
            &[
                "--proto",
                "udp",
                "--to",
                &to,
                "--count",
                "60",
                "--timeout-ms",
                "200",
                "--sport",
                "41236",
                "--interval-ms",
                "25",
            ]
            .map(String::from),
        )
        .expect("spawn flow");
    std::thread::sleep(Duration::from_millis(500));
    let p21 = s.pod(2, 1);
    s.apply(&udp6_slice().endpoint(Endpoint::ready(p21).ipv6(p21)));
    let results: Vec<proxy_tests::scenario::ClientResult> =
        flow.wait(Duration::from_secs(30)).expect("flow");
    assert_eq!(results.len(), 60);
    assert_eq!(results[0].backend(), Some("pod-1-2"), "{}", results[0]);
    for r in &results[results.len() - 15..] {
        assert!(
            r.ok && r.backend() == Some("pod-2-1"),
            "the IPv6 flow moved to the new backend and stays there: {r}"
        );
    }
}

/// Runs `n` TCP requests from pod client `c` to `to`; all must succeed.
/// Returns replies per backend.
fn from_pod(c: &PodClient, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>, String> {
    let rs = c
        .run(&Request::tcp(to).count(n))
        .map_err(|e| format!("{e:#}"))?;
    let mut seen = BTreeMap::new();
    for (i, r) in rs.iter().enumerate() {
        let Some(name) = r.backend().filter(|_| r.ok) else {
            return Err(format!("{to} request {i}: {r}"));
        };
        *seen.entry(name.to_owned()).or_default() += 1;
    }
    Ok(seen)
}

/// Until `n` requests from `c` to `to` reach exactly `want`.
#[track_caller]
fn pod_reaches(c: &PodClient, to: SocketAddr, n: usize, want: &[&str], within: Duration) {
    eventually(within, || {
        let t = from_pod(c, to, n)?;
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        if names == want {
            Ok(())
        } else {
            Err(format!("{to} from the pod reached {t:?}, want {want:?}"))
        }
    });
}

/// Until `n` TCP requests from the external client to `to` all succeed
/// and reach exactly `want`.
#[track_caller]
fn external_reaches(s: &Scenario, to: SocketAddr, n: usize, want: &[&str], within: Duration) {
    let ext = s.cluster.external();
    eventually(within, || {
        let mut seen = BTreeMap::<String, usize>::new();
        for i in 0..n {
            let line = tcp_request(&ext.ns, to, TIMEOUT)
                .map_err(|e| format!("{to} from outside, request {i}: {e}"))?;
            let (name, _) = parse_reply(&line).ok_or_else(|| format!("bad reply {line:?}"))?;
            *seen.entry(name.to_owned()).or_default() += 1;
        }
        let names: Vec<&str> = seen.keys().map(String::as_str).collect();
        if names == want {
            Ok(())
        } else {
            Err(format!("{to} from outside reached {seen:?}, want {want:?}"))
        }
    });
}

/// Packets counted by both nodes' IPv6 rules (ip6tables / the ip6 table).
fn v6_counters(s: &Scenario) -> u64 {
    (1..=2)
        .map(|i| {
            fallback_counter_of(s.socket_lb, &s.cluster.node(i).ns, true)
                .unwrap_or_else(|e| panic!("IPv6 rule counters on node {i}: {e:#}"))
        })
        .sum()
}

fn ipv6_and_dual_stack_services(mode: DataplaneMode) {
    let s = scenario(mode);
    let ext = s.cluster.external();
    let (n1, n2) = (s.cluster.node(1), s.cluster.node(2));
    // Service ranges from outside: IPv4 via node1 (dual's IPv4 endpoint
    // is there), IPv6 via node2 (dual's IPv6 endpoint is there).
    ext.add_route("10.96.202.0/24", n1.underlay_ip)
        .expect("IPv4 service route");
    ext.add_route("fd00:96::c9:0/112", n2.underlay_ip6)
        .expect("IPv6 service route");
    let c = s.client(1, 1);

    // Programmed: the IPv6 frontends (ClusterIPs and NodePorts on the
    // nodes' IPv6 addresses) beside the IPv4 ones, in the mode's rules.
    eventually(START, || {
        let f = s.frontends(1);
        let want = [
            format!("[{SIX}]:80/TCP"),
            format!("[{DUAL6}]:80/TCP"),
            format!("{DUAL4}:80/TCP"),
            format!("[{NONE6}]:80/TCP"),
            format!("[{NONE6}]:53/UDP"),
            format!("[{}]:{NP_SIX}/TCP", n1.underlay_ip6),
            format!("[{}]:{NP_DUAL}/TCP", n1.underlay_ip6),
            format!("{}:{NP_DUAL}/TCP", n1.underlay_ip),
            format!("[{}]:{NP_NONE}/TCP", n1.underlay_ip6),
        ];
        match want.iter().find(|w| !f.contains(w)) {
            None => Ok(()),
            Some(w) => Err(format!("{w} not in {f:?}")),
        }
    });
    let before = v6_counters(&s);

    // From a pod: the IPv6-only service on its ClusterIP (both
    // endpoints, one on each node) and NodePort.
    let both = ["pod-1-2", "pod-2-1"];
    pod_reaches(&c, at(SIX, 80), 24, &both, CONVERGE);
    pod_reaches(&c, at(n1.underlay_ip6, NP_SIX), 24, &both, CONVERGE);
    // Each family of the dual-stack service to its own endpoint.
    pod_reaches(&c, at(DUAL6, 80), 4, &["pod-2-2"], CONVERGE);
    pod_reaches(&c, at(DUAL4, 80), 4, &["pod-1-2"], CONVERGE);
    pod_reaches(&c, at(n2.underlay_ip6, NP_DUAL), 4, &["pod-2-2"], CONVERGE);
    pod_reaches(&c, at(n2.underlay_ip, NP_DUAL), 4, &["pod-1-2"], CONVERGE);

    // From outside: NodePorts on both nodes' IPv6 addresses, and each
    // family's ClusterIP and NodePort of the dual-stack service.
    external_reaches(&s, at(n1.underlay_ip6, NP_SIX), 24, &both, CONVERGE);
    external_reaches(&s, at(n2.underlay_ip6, NP_SIX), 24, &both, CONVERGE);
    external_reaches(&s, at(DUAL6, 80), 3, &["pod-2-2"], CONVERGE);
    external_reaches(&s, at(DUAL4, 80), 3, &["pod-1-2"], CONVERGE);
    external_reaches(&s, at(n1.underlay_ip6, NP_DUAL), 3, &["pod-2-2"], CONVERGE);
    external_reaches(&s, at(n1.underlay_ip, NP_DUAL), 3, &["pod-1-2"], CONVERGE);

    // No endpoint: refused at once (TCP reset; UDP ICMPv6 port
    // unreachable), from the pod and from outside.
    let r = c.one(proxy_tests::scenario::Protocol::Tcp, at(NONE6, 80));
    assert!(r.is_refused() && r.elapsed() < FAST, "TCP to {NONE6}: {r}");
    let r = c.one(proxy_tests::scenario::Protocol::Udp, at(NONE6, 53));
    assert!(r.is_refused() && r.elapsed() < FAST, "UDP to {NONE6}: {r}");
    for to in [at(n1.underlay_ip6, NP_NONE), at(NONE6, 80)] {
        match tcp_request(&ext.ns, to, TIMEOUT) {
            Err(ClientError::Refused { elapsed }) if elapsed < FAST => {}
            other => panic!("{to} from outside: {other:?}"),
        }
    }
    match udp_request(&ext.ns, at(NONE6, 53), TIMEOUT) {
        Err(ClientError::Refused { elapsed }) if elapsed < FAST => {}
        other => panic!("UDP to {NONE6} from outside: {other:?}"),
    }

    // The mode's IPv6 rules did it: their counters grew by at least the
    // IPv6 connections above (DNAT and reject rules count the first
    // packet of each).
    let grown = v6_counters(&s).saturating_sub(before);
    assert!(
        grown >= 24 * 4 + 4 * 2 + 3 * 2 + 4,
        "{mode:?}: the IPv6 rules counted only +{grown} packets"
    );
    s.assert_datapath();

    udp6_flow_moves_to_the_new_endpoint(&s, &c);

    // The IPv6-only service goes: its frontends leave the rules, its
    // address is served no more; the dual-stack one is untouched.
    s.delete("Service", "six");
    eventually(CONVERGE, || {
        let f = s.frontends(1);
        if f.iter()
            .any(|f| f.contains(&SIX.to_string()) || f.contains(&format!(":{NP_SIX}/")))
        {
            Err(format!("still programmed: {f:?}"))
        } else {
            Ok(())
        }
    });
    let gone = c
        .run(&Request::tcp(at(SIX, 80)).timeout(Duration::from_millis(300)))
        .expect("podclient");
    assert!(
        !gone[0].ok,
        "the removed service still answered: {}",
        gone[0]
    );
    pod_reaches(&c, at(DUAL6, 80), 2, &["pod-2-2"], CONVERGE);
    pod_reaches(&c, at(DUAL4, 80), 2, &["pod-1-2"], CONVERGE);
}

#[test]
fn iptables_ipv6_and_dual_stack_services() {
    ipv6_and_dual_stack_services(DataplaneMode::Iptables)
}

#[test]
fn nftables_ipv6_and_dual_stack_services() {
    ipv6_and_dual_stack_services(DataplaneMode::Nftables)
}
