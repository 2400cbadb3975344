//! End-to-end check of the namespace cluster harness as an external user of
//! the crate sees it.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use proxy_tests::cgroup::Cgroup;
use proxy_tests::cluster::{
    Cluster, ClusterSpec, POD_NETWORK6, TcpServer, UdpServer, parse_reply, ping, tcp_request,
    udp_request,
};
use proxy_tests::netns::list_namespaces;
use proxy_tests::scenario::{PodClient, Request};

const T: Duration = Duration::from_secs(3);

fn any(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port))
}

#[test]
fn three_node_cluster_end_to_end() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 3,
        pods_per_node: 2,
        external_client: true,
    })
    .expect("build cluster");
    let names = cluster.namespace_names();
    assert_eq!(names.len(), 1 + 1 + 3 + 6);

    let target = cluster.pod(3, 2);
    let _tcp = TcpServer::start(&target.ns, "target", any(80)).expect("tcp server");
    let _udp = UdpServer::start(&target.ns, "target", any(53)).expect("udp server");
    for client in cluster.pods() {
        let to = SocketAddr::new(target.ip.into(), 80);
        let reply = tcp_request(&client.ns, to, T).expect("tcp");
        let (name, peer) = parse_reply(&reply).expect("reply line");
        assert_eq!((name, peer.ip()), ("target", client.ip.into()));
        let reply = udp_request(&client.ns, SocketAddr::new(target.ip.into(), 53), T).expect("udp");
        assert_eq!(parse_reply(&reply).expect("reply line").1.ip(), client.ip);
    }
    for node in cluster.nodes() {
        ping(&cluster.external().ns, node.underlay_ip, T).expect("ping");
    }
    drop(cluster);
    let left = list_namespaces().expect("list");
    assert!(names.iter().all(|n| !left.contains(n)));
}

fn any6(port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))
}

/// The cluster is dual-stack: IPv6 reaches every pod from every pod (same
/// node and across nodes, TCP and UDP, the peer seen with its own IPv6
/// address) and from the external client routed through a node, with no
/// wait for duplicate address detection.
#[test]
fn dual_stack_ipv6_between_pods_across_nodes_and_from_outside() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("build cluster");
    let target = cluster.pod(2, 1);
    assert_eq!(target.ip6.to_string(), "fd00:244:2::2");
    assert_eq!(cluster.node(1).underlay_ip6.to_string(), "fd00:18::11");
    let _tcp = TcpServer::start(&target.ns, "target6", any6(80)).expect("tcp server");
    let _udp = UdpServer::start(&target.ns, "target6", any6(53)).expect("udp server");
    for client in cluster.pods().filter(|p| p.name != target.name) {
        let reply = tcp_request(&client.ns, SocketAddr::new(target.ip6.into(), 80), T)
            .unwrap_or_else(|e| panic!("tcp over IPv6 from {}: {e}", client.name));
        let (name, peer) = parse_reply(&reply).expect("reply line");
        assert_eq!((name, peer.ip()), ("target6", client.ip6.into()));
        let reply = udp_request(&client.ns, SocketAddr::new(target.ip6.into(), 53), T)
            .unwrap_or_else(|e| panic!("udp over IPv6 from {}: {e}", client.name));
        assert_eq!(parse_reply(&reply).expect("reply line").1.ip(), client.ip6);
    }
    let ext = cluster.external();
    ext.add_route(POD_NETWORK6, cluster.node(1).underlay_ip6)
        .expect("route");
    let reply = tcp_request(&ext.ns, SocketAddr::new(target.ip6.into(), 80), T)
        .expect("external -> pod on node2 via node1 over IPv6");
    assert_eq!(parse_reply(&reply).expect("reply line").1.ip(), ext.ip6);
    // The scenarios' client process speaks IPv6 too (TCP, UDP sent and
    // connected, fixed source ports).
    let cg = Cgroup::new("harness-v6").expect("cgroup");
    let client = PodClient::new(cluster.pod(1, 1), &cg);
    let to6 = SocketAddr::new(target.ip6.into(), 80);
    for r in client.tcp(to6, 2).into_iter().chain(
        client
            .run(&Request::tcp(to6).sport_spread().count(2))
            .expect("podclient"),
    ) {
        assert!(r.ok, "{r:?}");
        assert_eq!(
            r.seen_client().map(|a| a.ip()),
            Some(cluster.pod(1, 1).ip6.into())
        );
    }
    let udp6 = SocketAddr::new(target.ip6.into(), 53);
    for r in client.udp(udp6, 2) {
        assert!(r.ok, "{r:?}");
    }
    // IPv4 is unchanged beside it.
    let reply = tcp_request(
        &cluster.pod(1, 1).ns,
        SocketAddr::new(target.ip.into(), 80),
        T,
    )
    .expect("tcp over IPv4 to the same dual-stack listener");
    // (an IPv6 listener sees an IPv4 peer as `::ffff:a.b.c.d`)
    assert_eq!(
        parse_reply(&reply)
            .expect("reply line")
            .1
            .ip()
            .to_canonical(),
        cluster.pod(1, 1).ip
    );
}

#[test]
fn panicking_test_still_cleans_up() {
    let mut names = Vec::new();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new(ClusterSpec::default()).expect("build cluster");
        names = cluster.namespace_names();
        panic!("simulated test failure");
    }));
    assert!(r.is_err());
    assert!(!names.is_empty());
    let left = list_namespaces().expect("list");
    assert!(
        names.iter().all(|n| !left.contains(n)),
        "{names:?} left in {left:?}"
    );
}
