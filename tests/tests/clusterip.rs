//! ClusterIP end to end: API server fixture -> agent (real binary, real
//! kube client) -> pinned maps -> tc programs -> packets between pods in a
//! netns cluster.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec, TcpServer, UdpServer, parse_reply, tcp_request, udp_request},
    netns::Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TIMEOUT: Duration = Duration::from_millis(500);

fn objects(backends: &[(Ipv4Addr, &str)]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|(ip, node)| {
            format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n")
        })
        .collect();
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
---
apiVersion: v1
kind: Node
metadata: {{name: node2}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  clusterIPs: ["{VIP}"]
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
{endpoints}"#
    )
}

struct Setup {
    // Field order is drop order: servers and agent before the cluster.
    _servers: Vec<TcpServer>,
    _udp: Vec<UdpServer>,
    agent: Agent,
    api: ApiServer,
    cluster: Cluster,
}

/// Two backends (pod-1-2 on node1, pod-2-1 on node2), client pod-1-1, the
/// agent on node1 with `extra_args`.
fn setup(extra_args: &[&str]) -> Setup {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let b1 = cluster.pod(1, 2);
    let b2 = cluster.pod(2, 1);
    let mut servers = Vec::new();
    let mut udp = Vec::new();
    for b in [b1, b2] {
        servers.push(
            TcpServer::start(&b.ns, &b.name, SocketAddr::from((b.ip, 8080))).expect("tcp server"),
        );
        udp.push(UdpServer::start(&b.ns, &b.name, SocketAddr::from((b.ip, 5353))).expect("udp"));
    }
    let api = ApiServer::start().expect("api server");
    api.apply_yaml(&objects(&[(b1.ip, "node1"), (b2.ip, "node2")]))
        .expect("objects");
    let agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    )
    .expect("agent");
    Setup {
        _servers: servers,
        _udp: udp,
        agent,
        api,
        cluster,
    }
}

/// Poll until `f` succeeds, or fail after `within`.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not within {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Send `n` requests, return replies per backend name; every reply must
/// show the client's own address as the peer (no SNAT).
fn tally(
    client: &Netns,
    client_ip: Ipv4Addr,
    to: SocketAddr,
    n: usize,
    udp: bool,
) -> BTreeMap<String, usize> {
    try_tally(client, client_ip, to, n, udp).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tally`], a failed request an error: while a change reaches the data
/// path, a connection set up to a backend that is being removed may be cut
/// (its flow's backend entry goes with the backend).
fn try_tally(
    client: &Netns,
    client_ip: Ipv4Addr,
    to: SocketAddr,
    n: usize,
    udp: bool,
) -> Result<BTreeMap<String, usize>, String> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = if udp {
            udp_request(client, to, TIMEOUT)
        } else {
            tcp_request(client, to, TIMEOUT)
        };
        let line = r.map_err(|e| format!("request {i} to {to}: {e}"))?;
        let (name, peer) = parse_reply(&line).unwrap_or_else(|| panic!("bad reply {line:?}"));
        assert_eq!(
            peer.ip(),
            std::net::IpAddr::V4(client_ip),
            "backend sees the client pod's IP"
        );
        *seen.entry(name.to_owned()).or_default() += 1;
    }
    Ok(seen)
}

#[test]
fn clusterip_tcp_and_udp_reach_backends_on_both_nodes() {
    let s = setup(&[]);
    let client = s.cluster.pod(1, 1);
    let tcp_vip = SocketAddr::from((VIP, 80));
    let udp_vip = SocketAddr::from((VIP, 53));

    // The agent syncs after its caches fill; wait for the path to work.
    eventually(Duration::from_secs(5), || {
        tcp_request(&client.ns, tcp_vip, TIMEOUT).map_err(|e| e.to_string())
    });

    let tcp = tally(&client.ns, client.ip, tcp_vip, 50, false);
    assert_eq!(tcp.len(), 2, "both backends serve TCP: {tcp:?}");
    let udp = tally(&client.ns, client.ip, udp_vip, 50, true);
    assert_eq!(udp.len(), 2, "both backends serve UDP: {udp:?}");

    // What the agent programmed is visible through proxyctl.
    let dump: serde_json::Value = serde_json::from_str(
        &s.agent
            .proxyctl(&["dump-maps", "--output", "json"])
            .expect("dump"),
    )
    .expect("json");
    let frontends: Vec<String> = dump["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            format!(
                "{}:{}/{}",
                s["frontend"]["ip"].as_str().unwrap_or(""),
                s["frontend"]["port"],
                s["frontend"]["proto"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(frontends, vec!["10.96.0.10:53/UDP", "10.96.0.10:80/TCP"]);
    assert_eq!(dump["backends"].as_array().map(Vec::len), Some(4));

    // Remove the node2 endpoint: within 1 s every new connection goes to
    // the node1 backend.
    let b2 = s.cluster.pod(2, 1).ip.to_string();
    let t0 = Instant::now();
    s.api
        .modify("EndpointSlice", Some("default"), "web-1", |o| {
            if let Some(eps) = o["endpoints"].as_array_mut() {
                eps.retain(|e| e["addresses"][0].as_str() != Some(b2.as_str()));
            }
        })
        .expect("modify slice");
    eventually(Duration::from_secs(1), || {
        let t = try_tally(&client.ns, client.ip, tcp_vip, 10, false)?;
        if t.keys().eq(["pod-1-2"].iter()) {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    });
    let converged = t0.elapsed();
    assert!(converged < Duration::from_secs(1), "took {converged:?}");
    let after = tally(&client.ns, client.ip, tcp_vip, 50, false);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        vec!["pod-1-2"],
        "{after:?}"
    );
    let after = tally(&client.ns, client.ip, udp_vip, 20, true);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        vec!["pod-1-2"],
        "{after:?}"
    );

    // Delete the service: the ClusterIP stops answering (within 1 s). How
    // it fails is the node's business: without the proxy there is no route,
    // and the kernel rate-limits its ICMP unreachables, so later attempts
    // may time out rather than fail at once.
    s.api
        .delete("Service", Some("default"), "web")
        .expect("delete service");
    eventually(Duration::from_secs(1), || {
        match tcp_request(&client.ns, tcp_vip, TIMEOUT) {
            Ok(r) => Err(format!("still answered: {r}")),
            Err(e) => Ok(e),
        }
    });
    for _ in 0..3 {
        assert!(
            tcp_request(&client.ns, tcp_vip, TIMEOUT).is_err(),
            "a deleted service stays gone"
        );
    }
    assert!(
        udp_request(&client.ns, udp_vip, TIMEOUT).is_err(),
        "UDP stops too"
    );
}

/// The same path without the tc programs attached (the agent is told to
/// attach to no interface): the ClusterIP must not work, so the test above
/// passes only through the eBPF programs.
#[test]
fn clusterip_does_not_work_without_the_tc_programs() {
    let s = setup(&["--pod-device", "no-such-device"]);
    let client = s.cluster.pod(1, 1);
    // The maps are programmed all the same...
    eventually(Duration::from_secs(5), || {
        let out = s
            .agent
            .proxyctl(&["dump-maps", "--output", "json"])
            .map_err(|e| e.to_string())?;
        if out.contains("10.96.0.10") {
            Ok(())
        } else {
            Err(out)
        }
    });
    // ...but nothing translates: no other path carries ClusterIP traffic.
    let err = tcp_request(&client.ns, SocketAddr::from((VIP, 80)), TIMEOUT)
        .expect_err("no translation without the programs");
    eprintln!("without the programs: {err}");
    assert!(udp_request(&client.ns, SocketAddr::from((VIP, 53)), TIMEOUT).is_err());
    // While pod IPs themselves are reachable.
    let direct = tcp_request(
        &client.ns,
        SocketAddr::from((s.cluster.pod(2, 1).ip, 8080)),
        TIMEOUT,
    )
    .expect("pod IP reachable");
    assert!(direct.starts_with("pod-2-1 "), "{direct}");
}
