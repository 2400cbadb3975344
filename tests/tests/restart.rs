//! Agent kill -9 and restart while 50 TCP flows stream through a ClusterIP
//! on the per-packet path (socket LB off): the pinned maps and links keep
//! the data path alive, the new agent adopts them, and no flow is reset.
//! New connections made while the agent is down succeed too. (The fallback
//! modes' `kill -9` scenario is eastwest's
//! `agent_kill_9_keeps_streams_and_new_connections`.)
//!
//! API server restart (behaviours 7, second half, and 23 of
//! docs/service-behaviours.md): three agents on one cluster, one per mode
//! (eBPF with socket LB off, iptables, nftables), face the same outages of
//! 5, 20 and 60 s of a server that restarts (410 Gone for the old
//! resourceVersions). The data path serves throughout, and a change made as
//! the server returns is served within 2 s in every mode.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
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

/// Node `i` (1-based) runs the agent in `MODES[i - 1]`.
const MODES: [DataplaneMode; 3] = [
    DataplaneMode::EbpfTc,
    DataplaneMode::Iptables,
    DataplaneMode::Nftables,
];
/// The outages, in sequence, each of a restarting server.
const OUTAGES: [Duration; 3] = [
    Duration::from_secs(5),
    Duration::from_secs(20),
    Duration::from_secs(60),
];
/// From the server's return to the change being served, in every mode.
const BACK_IN_SYNC: Duration = Duration::from_secs(2);
/// How long to keep measuring before giving up (the figure printed for a
/// slower agent is then "> GIVE_UP").
const GIVE_UP: Duration = Duration::from_secs(90);

/// Service of node `i`: VIP 10.96.0.(40+i), port 81, one endpoint.
fn vip(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 96, 0, 40 + i as u8), 81))
}

fn service_yaml(i: usize, backend: Ipv4Addr) -> String {
    let to = vip(i);
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web{i}, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{port: 81, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web{i}-1, namespace: default, labels: {{kubernetes.io/service-name: web{i}}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{backend}"], nodeName: node{i}}}
---
"#,
        ip = to.ip()
    )
}

/// Whether the next `n` requests from `ns` to `to` are all answered by
/// `pod`.
fn served_by(ns: &Netns, to: SocketAddr, pod: &str, n: usize) -> bool {
    (0..n).all(|_| {
        tcp_request(ns, to, Duration::from_millis(300))
            .map(|r| r.starts_with(&format!("{pod} ")))
            .unwrap_or(false)
    })
}

#[test]
fn api_server_restart_back_in_sync_within_2s_in_every_mode() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 3,
        pods_per_node: 3,
        external_client: false,
    })
    .expect("cluster");
    // On node i: client pod-i-1, backends pod-i-2 and pod-i-3 (the
    // service's endpoint alternates between them, one change per outage).
    let _servers: Vec<TcpServer> = (1..=3)
        .flat_map(|i| [cluster.pod(i, 2), cluster.pod(i, 3)])
        .map(|p| TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("server"))
        .collect();
    let api = ApiServer::start().expect("api");
    let mut objects = cluster.node_objects_yaml();
    for i in 1..=3 {
        objects.push_str(&service_yaml(i, cluster.pod(i, 2).ip));
    }
    api.apply_yaml(&objects).expect("objects");
    let agents: Vec<Agent> = MODES
        .iter()
        .enumerate()
        .map(|(k, mode)| {
            Agent::start(
                cluster.node(k + 1),
                &api,
                AgentOptions {
                    args: mode.agent_args(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{mode:?} agent on node{}: {e:#}", k + 1))
        })
        .collect();
    let mut backend = 2; // pod-i-2 serves now
    for i in 1..=3 {
        let pod = &cluster.pod(i, backend).name;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !served_by(&cluster.pod(i, 1).ns, vip(i), pod, 1) {
            assert!(
                Instant::now() < deadline,
                "{:?}: web{i} never answered",
                MODES[i - 1]
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    let mut figures: Vec<(Duration, DataplaneMode, Option<Duration>)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for outage in OUTAGES {
        let next = if backend == 2 { 3 } else { 2 };
        api.restart();
        let down = Instant::now();
        // During the outage every node keeps serving the current endpoint,
        // each connection translated by the mode's data path.
        let results: Vec<(u64, u64, Vec<String>)> = thread::scope(|scope| {
            let handles: Vec<_> = (1..=3)
                .map(|i| {
                    let (cluster, agents) = (&cluster, &agents);
                    scope.spawn(move || {
                        let mode = MODES[i - 1];
                        let node_ns = &cluster.node(i).ns;
                        let client = cluster.pod(i, 1);
                        let pod = &cluster.pod(i, backend).name;
                        let before = translated(mode, &agents[i - 1], node_ns);
                        let (mut requests, mut errors) = (0u64, Vec::new());
                        while down.elapsed() < outage {
                            // 2 s: room for one SYN retransmission (1 s) on
                            // a machine busy with other tests.
                            match tcp_request(&client.ns, vip(i), Duration::from_secs(2)) {
                                Ok(r) if r.starts_with(&format!("{pod} ")) => {}
                                Ok(r) => errors.push(format!("answered by {r:?}, not {pod}")),
                                Err(e) => errors.push(e.to_string()),
                            }
                            requests += 1;
                            thread::sleep(Duration::from_millis(250));
                        }
                        let during =
                            translated(mode, &agents[i - 1], node_ns).saturating_sub(before);
                        (requests, during, errors)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("traffic thread"))
                .collect()
        });
        for (k, (requests, during, errors)) in results.into_iter().enumerate() {
            let mode = MODES[k];
            assert!(
                errors.is_empty(),
                "{mode:?}, {outage:?} outage: {} of {requests} connections failed while the API server was down: {errors:?}",
                errors.len()
            );
            assert!(
                during >= requests,
                "{mode:?}, {outage:?} outage: {requests} connections, data path counted +{during}"
            );
        }

        // The server returns; the change is made at once.
        api.set_available(true);
        let back = Instant::now();
        for i in 1..=3 {
            let ip = cluster.pod(i, next).ip.to_string();
            api.modify(
                "EndpointSlice",
                Some("default"),
                &format!("web{i}-1"),
                |o| {
                    o["endpoints"][0]["addresses"] = serde_json::json!([ip]);
                },
            )
            .expect("modify");
        }
        let synced: Vec<Option<Duration>> = thread::scope(|scope| {
            let handles: Vec<_> = (1..=3)
                .map(|i| {
                    let cluster = &cluster;
                    scope.spawn(move || {
                        let client = cluster.pod(i, 1);
                        let pod = &cluster.pod(i, next).name;
                        loop {
                            // Three answers in a row from the new endpoint.
                            if served_by(&client.ns, vip(i), pod, 3) {
                                return Some(back.elapsed());
                            }
                            if back.elapsed() > GIVE_UP {
                                return None;
                            }
                            thread::sleep(Duration::from_millis(20));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("sync thread"))
                .collect()
        });
        for (k, t) in synced.into_iter().enumerate() {
            let mode = MODES[k];
            match t {
                Some(t) => eprintln!(
                    "{outage:?} outage (restarted server): {mode:?} served the change {:.2} s after the server's return",
                    t.as_secs_f64()
                ),
                None => eprintln!(
                    "{outage:?} outage (restarted server): {mode:?} did not serve the change within {GIVE_UP:?} of the server's return"
                ),
            }
            if t.is_none_or(|t| t > BACK_IN_SYNC) {
                failures.push(format!(
                    "{mode:?} after a {outage:?} outage: {}",
                    t.map_or(format!("> {GIVE_UP:?}"), |t| format!("{t:.2?}"))
                ));
            }
            figures.push((outage, mode, t));
        }
        backend = next;
    }
    for (k, agent) in agents.iter().enumerate() {
        if !MODES[k].is_ebpf() {
            let pinned = std::fs::read_dir(&agent.bpffs_path)
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(pinned, 0, "{:?} mode pinned eBPF objects", MODES[k]);
        }
    }
    assert!(
        failures.is_empty(),
        "not back in sync within {BACK_IN_SYNC:?} of the API server's return: {failures:?} (all: {figures:?})"
    );
}
