//! Agent kill -9 and restart while 50 TCP flows stream through a ClusterIP
//! on the per-packet path (socket LB off): the pinned maps and links keep
//! the data path alive, the new agent adopts them, and no flow is reset.
//! New connections made while the agent is down succeed too. (The fallback
//! modes' `kill -9` scenario is eastwest's
//! `agent_kill_9_keeps_streams_and_new_connections`.)
//!
//! API server outage (behaviour 7 of docs/service-behaviours.md, second half), in every
//! mode: eBPF (socket LB off), iptables and nftables, with the same code.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec, TcpServer, tcp_connect, tcp_request},
    netns::Netns,
    scenario::{DataplaneMode, fallback_counter, stats},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

fn objects(sink1: Ipv4Addr, sink2: Ipv4Addr, reply: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
---
apiVersion: v1
kind: Service
metadata: {{name: stream, namespace: default}}
spec:
  clusterIP: {VIP}
  ports:
  - {{name: sink, port: 80, protocol: TCP, targetPort: 9000}}
  - {{name: reply, port: 81, protocol: TCP, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: stream-1
  namespace: default
  labels: {{kubernetes.io/service-name: stream}}
addressType: IPv4
ports: [{{name: sink, port: 9000, protocol: TCP}}]
endpoints:
- {{addresses: ["{sink1}"], nodeName: node1}}
- {{addresses: ["{sink2}"], nodeName: node2}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: stream-2
  namespace: default
  labels: {{kubernetes.io/service-name: stream}}
addressType: IPv4
ports: [{{name: reply, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{reply}"], nodeName: node2}}
"#
    )
}

#[test]
fn kill_9_and_restart_resets_no_flow() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    let sinks = [
        TcpServer::start_sink(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 9000))).expect("sink"),
        TcpServer::start_sink(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 9000))).expect("sink"),
    ];
    let _reply =
        TcpServer::start(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 8080))).expect("server");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&objects(p12.ip, p21.ip, p21.ip))
        .expect("objects");
    let mut agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: vec!["--socket-lb".into(), "false".into()],
            ..Default::default()
        },
    )
    .expect("agent");
    let client = cluster.pod(1, 1);
    let vip = SocketAddr::from((VIP, 80));
    let reply_vip = SocketAddr::from((VIP, 81));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_request(&client.ns, reply_vip, Duration::from_millis(300)).is_err() {
        assert!(Instant::now() < deadline, "service never answered");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut flows: Vec<_> = (0..50)
        .map(|i| {
            tcp_connect(&client.ns, vip, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("flow {i}: {e}"))
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut streams: Vec<_> = flows
            .iter_mut()
            .map(|s| s.try_clone().expect("clone"))
            .collect();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            let chunk = [0x5au8; 512];
            while !stop.load(Ordering::Relaxed) {
                for (i, s) in streams.iter_mut().enumerate() {
                    if let Err(e) = s.write_all(&chunk) {
                        errors.push(format!("flow {i}: {e}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let before: u64 = sinks.iter().map(|s| s.bytes_received()).sum();

    // kill -9 and, while the agent is down, make new connections.
    let t0 = Instant::now();
    let restarted = std::thread::scope(|scope| {
        let during = scope.spawn(|| {
            (0..10)
                .map(|_| tcp_request(&client.ns, reply_vip, Duration::from_millis(500)))
                .collect::<Vec<_>>()
        });
        agent.kill_and_restart().expect("restart");
        let restarted = t0.elapsed();
        for (i, r) in during.join().expect("join").into_iter().enumerate() {
            r.unwrap_or_else(|e| panic!("new connection {i} during the restart: {e}"));
        }
        restarted
    });
    assert!(
        agent.log().contains("adopted pinned state"),
        "the new agent adopts the pinned maps:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let errors = writer.join().expect("writer");
    assert!(errors.is_empty(), "flows broke: {errors:?}");
    let after: u64 = sinks.iter().map(|s| s.bytes_received()).sum();
    assert!(
        after > before,
        "traffic kept flowing ({before} -> {after} bytes)"
    );
    let open: usize = sinks.iter().map(|s| s.open_connections()).sum();
    assert_eq!(open, 50, "all 50 flows still open at the backends");
    // And the new agent still serves and programs changes.
    tcp_request(&client.ns, reply_vip, Duration::from_millis(500)).expect("after restart");
    eprintln!("agent restarted in {restarted:?}; 50 flows, 0 reset");
}

/// Packets the mode's data path translated on the node so far: the eBPF
/// per-packet `dnat` counter, or our fallback rules' packet counters.
fn translated(mode: DataplaneMode, agent: &Agent, ns: &Netns) -> u64 {
    if mode.is_ebpf() {
        stats(agent)
            .expect("dump-maps stats")
            .get("dnat")
            .copied()
            .unwrap_or(0)
    } else {
        fallback_counter(mode, ns).expect("our rules' counters")
    }
}

#[test]
fn api_server_outage_keeps_traffic_and_resyncs() {
    api_server_outage(DataplaneMode::EbpfTc);
}

mod iptables {
    #[test]
    fn api_server_outage_keeps_traffic_and_resyncs() {
        super::api_server_outage(super::DataplaneMode::Iptables);
    }
}

mod nftables {
    #[test]
    fn api_server_outage_keeps_traffic_and_resyncs() {
        super::api_server_outage(super::DataplaneMode::Nftables);
    }
}

/// The API server goes away and comes back: traffic keeps flowing meanwhile
/// through the mode's data path (which does not depend on the agent's
/// connection), and changes made after it returns are programmed.
fn api_server_outage(mode: DataplaneMode) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    let _servers = [
        TcpServer::start(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 8080))).expect("server"),
        TcpServer::start(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 8080))).expect("server"),
    ];
    let api = ApiServer::start().expect("api");
    let objects = format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP}
  ports: [{{port: 81, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{}"], nodeName: node1}}
- {{addresses: ["{}"], nodeName: node2}}
"#,
        p12.ip, p21.ip
    );
    api.apply_yaml(&objects).expect("objects");
    let agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: mode.agent_args(),
            ..Default::default()
        },
    )
    .expect("agent");
    let node_ns = &cluster.node(1).ns;
    let client = cluster.pod(1, 1);
    let to = SocketAddr::from((VIP, 81));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_request(&client.ns, to, Duration::from_millis(300)).is_err() {
        assert!(Instant::now() < deadline, "service never answered");
        std::thread::sleep(Duration::from_millis(20));
    }

    api.set_available(false);
    let before = translated(mode, &agent, node_ns);
    let outage = Instant::now();
    let mut requests = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        tcp_request(&client.ns, to, Duration::from_millis(500))
            .expect("traffic flows while the API server is down");
        requests += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every connection's first packet went through the mode's translation.
    let during = translated(mode, &agent, node_ns).saturating_sub(before);
    assert!(
        during >= requests,
        "{mode:?}: {requests} connections during the outage, data path counted +{during}"
    );
    api.set_available(true);

    // A change after the outage is picked up (watch re-established).
    api.modify("EndpointSlice", Some("default"), "web-1", |o| {
        if let Some(eps) = o["endpoints"].as_array_mut() {
            eps.retain(|e| e["nodeName"] == "node1");
        }
    })
    .expect("modify");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all_local = (0..10).all(|_| {
            tcp_request(&client.ns, to, Duration::from_millis(500))
                .map(|r| r.starts_with("pod-1-2 "))
                .unwrap_or(false)
        });
        if all_local {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{mode:?}: the change after the outage was not programmed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    if !mode.is_ebpf() {
        let pinned = std::fs::read_dir(&agent.bpffs_path)
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(pinned, 0, "{mode:?} mode pinned eBPF objects");
    }
}
