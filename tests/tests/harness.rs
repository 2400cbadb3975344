//! End-to-end check of the namespace cluster harness as an external user of
//! the crate sees it.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use proxy_tests::cluster::{
    Cluster, ClusterSpec, TcpServer, UdpServer, parse_reply, ping, tcp_request, udp_request,
};
use proxy_tests::netns::list_namespaces;

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
