//! North-south through XDP: the external client (outside the cluster, on
//! the underlay) reaches NodePort services on node addresses, with backends
//! on the receiving node (DNAT only: the backend sees the client) and on the
//! other node (DNAT + SNAT to the node: the backend sees the node).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{
        ClientError, Cluster, ClusterSpec, TcpServer, UdpServer, http_get_status, parse_reply,
        tcp_request, udp_request, udp_request_payload,
    },
    netns::Netns,
    scenario::{DataplaneMode, fallback_counter},
};

const TIMEOUT: Duration = Duration::from_millis(500);

fn service(
    name: &str,
    vip: &str,
    node_port: u16,
    local: bool,
    backends: &[(Ipv4Addr, &str)],
) -> String {
    let policy = if local { "Local" } else { "Cluster" };
    let eps: String = backends
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: {vip}
  externalTrafficPolicy: {policy}
  ports:
  - {{name: http, port: 80, nodePort: {node_port}, protocol: TCP, targetPort: 8080}}
  - {{name: dns, port: 53, nodePort: {node_port}, protocol: UDP, targetPort: 5353}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
{eps}---
"#
    )
}

/// An agent on each of the two nodes, each having logged `ready`.
fn start_agents(cluster: &Cluster, api: &ApiServer, ready: &str) -> [Agent; 2] {
    start_agents_in(DataplaneMode::EbpfTc, cluster, api, ready)
}

/// Agent options for `mode`.
fn options(mode: DataplaneMode) -> AgentOptions {
    AgentOptions {
        args: vec!["--mode".into(), mode.mode().into()],
        ..Default::default()
    }
}

/// [`start_agents`] in `mode`; the fallback modes have no XDP to wait
/// for, their `ready` is the first sync.
fn start_agents_in(
    mode: DataplaneMode,
    cluster: &Cluster,
    api: &ApiServer,
    ready: &str,
) -> [Agent; 2] {
    start_agents_with(mode, &[], cluster, api, ready)
}

/// [`start_agents_in`] with extra agent flags.
fn start_agents_with(
    mode: DataplaneMode,
    extra: &[&str],
    cluster: &Cluster,
    api: &ApiServer,
    ready: &str,
) -> [Agent; 2] {
    let ready = if mode.is_ebpf() { ready } else { "sync done" };
    let opts = || {
        let mut o = options(mode);
        o.args.extend(extra.iter().map(|a| (*a).to_owned()));
        o
    };
    let mut agents = [
        Agent::start(cluster.node(1), api, opts()).expect("agent1"),
        Agent::start(cluster.node(2), api, opts()).expect("agent2"),
    ];
    for a in &mut agents {
        a.wait_for_log(ready, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{ready}: {e:#}"));
    }
    agents
}

/// backend name -> peer addresses it saw.
fn tally(ns: &Netns, to: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, Vec<IpAddr>> {
    let mut seen: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for i in 0..n {
        let r = if udp {
            udp_request(ns, to, TIMEOUT)
        } else {
            tcp_request(ns, to, TIMEOUT)
        };
        let line = r.unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
        let (name, peer) = parse_reply(&line).unwrap_or_else(|| panic!("bad reply {line:?}"));
        seen.entry(name.to_owned()).or_default().push(peer.ip());
    }
    seen
}

fn wait_up(ns: &Netns, to: SocketAddr, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(8);
    while let Err(e) = tcp_request(ns, to, Duration::from_millis(300)) {
        assert!(
            Instant::now() < deadline,
            "{to} never answered ({e}); node1 maps:\n{}",
            agent.proxyctl(&["dump-maps"]).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(30));
    }
}

#[test]
fn node_port_from_outside_local_and_remote_backends_and_etp_local() {
    node_port_from_outside(DataplaneMode::EbpfTc)
}

/// The same without XDP (`--xdp-mode none`): the external interface's tc
/// ingress sets up and translates every north-south flow on its own.
#[test]
fn node_port_from_outside_by_tc_alone() {
    node_port_from_outside_with(DataplaneMode::EbpfTc, &["--xdp-mode", "none"])
}

/// Behaviours 8, 9 (LoadBalancer IP), 14 (NodePort), 18 and 22 (docs/service-behaviours.md) in the kube-proxy
/// fallback modes: the same test bodies.
mod fallback {
    use super::*;

    #[test]
    fn iptables_node_port_from_outside_and_etp_local() {
        node_port_from_outside(DataplaneMode::Iptables)
    }

    #[test]
    fn nftables_node_port_from_outside_and_etp_local() {
        node_port_from_outside(DataplaneMode::Nftables)
    }

    #[test]
    fn iptables_node_port_session_affinity() {
        node_port_session_affinity(DataplaneMode::Iptables)
    }

    #[test]
    fn nftables_node_port_session_affinity() {
        node_port_session_affinity(DataplaneMode::Nftables)
    }

    #[test]
    fn iptables_health_check_node_port() {
        health_check_node_port(DataplaneMode::Iptables)
    }

    #[test]
    fn nftables_health_check_node_port() {
        health_check_node_port(DataplaneMode::Nftables)
    }

    #[test]
    fn iptables_load_balancer_source_ranges() {
        source_ranges(DataplaneMode::Iptables)
    }

    #[test]
    fn nftables_load_balancer_source_ranges() {
        source_ranges(DataplaneMode::Nftables)
    }
}

fn node_port_from_outside(mode: DataplaneMode) {
    node_port_from_outside_with(mode, &[])
}

fn node_port_from_outside_with(mode: DataplaneMode, extra: &[&str]) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    let mut servers = Vec::new();
    let mut udp = Vec::new();
    for p in [p12, p21] {
        servers
            .push(TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("tcp"));
        udp.push(UdpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 5353))).expect("udp"));
    }
    let api = ApiServer::start().expect("api");
    let mut objects = cluster.node_objects_yaml();
    objects += &service(
        "both",
        "10.96.1.1",
        30080,
        false,
        &[(p12.ip, "node1"), (p21.ip, "node2")],
    );
    objects += &service("local", "10.96.1.2", 30081, true, &[(p12.ip, "node1")]);
    api.apply_yaml(&objects).expect("objects");
    let xdp = !extra.contains(&"none");
    let ready = if xdp {
        "attached XDP"
    } else {
        "north-south by tc only"
    };
    let agents = start_agents_with(mode, extra, &cluster, &api, ready);
    for a in &agents {
        assert_eq!(
            a.log().contains("attached XDP"),
            xdp && mode.is_ebpf(),
            "XDP attached or not as asked"
        );
    }
    let ext = cluster.external();
    let node1 = cluster.node(1).underlay_ip;
    let node2 = cluster.node(2).underlay_ip;
    let both = SocketAddr::from((node1, 30080));
    wait_up(&ext.ns, both, &agents[0]);

    // externalTrafficPolicy Cluster via node1: both backends; the local one
    // sees the client, the remote one sees node1 (SNAT), as kube-proxy.
    for udp in [false, true] {
        let t = tally(&ext.ns, both, 40, udp);
        assert_eq!(t.len(), 2, "udp={udp}: both backends serve: {t:?}");
        assert!(
            t["pod-1-2"].iter().all(|p| *p == IpAddr::V4(ext.ip)),
            "udp={udp}: {t:?}"
        );
        assert!(
            t["pod-2-1"].iter().all(|p| *p == IpAddr::V4(node1)),
            "udp={udp}: {t:?}"
        );
    }
    // The same service through node2's address.
    wait_up(&ext.ns, SocketAddr::from((node2, 30080)), &agents[1]);
    let t = tally(&ext.ns, SocketAddr::from((node2, 30080)), 40, false);
    assert_eq!(t.len(), 2, "{t:?}");

    // externalTrafficPolicy Local: node1 has the endpoint, the client IP is
    // kept; node2 has none and does not forward it anywhere.
    let t = tally(&ext.ns, SocketAddr::from((node1, 30081)), 20, false);
    assert_eq!(t.keys().collect::<Vec<_>>(), vec!["pod-1-2"]);
    assert!(
        t["pod-1-2"].iter().all(|p| *p == IpAddr::V4(ext.ip)),
        "{t:?}"
    );
    let err = tcp_request(&ext.ns, SocketAddr::from((node2, 30081)), TIMEOUT)
        .expect_err("no local endpoint on node2");
    assert!(
        !matches!(err, ClientError::Other { .. }),
        "dropped or refused at node2: {err}"
    );
    let served_before: u64 = servers.iter().map(|s| s.served()).sum();
    let _ = tcp_request(&ext.ns, SocketAddr::from((node2, 30081)), TIMEOUT);
    let served_after: u64 = servers.iter().map(|s| s.served()).sum();
    assert_eq!(
        served_before, served_after,
        "never sent to another node's endpoint"
    );

    if !mode.is_ebpf() {
        let n = fallback_counter(mode, &cluster.node(1).ns).expect("counters");
        assert!(n > 0, "{mode:?}: node1's rules counted nothing");
        return;
    }
    // XDP did the work: its translations show on node1's counters.
    let dump: serde_json::Value = serde_json::from_str(
        &agents[0]
            .proxyctl(&["dump-maps", "--output", "json"])
            .expect("dump"),
    )
    .expect("json");
    assert_eq!(
        dump["config"]["node_address"].as_str(),
        Some(node1.to_string().as_str())
    );
}

/// The health-check node port of an externalTrafficPolicy Local service
/// answers as kube-proxy's: 200 with a ready local endpoint, 503 without,
/// 503 when only a terminating one remains.
#[test]
fn health_check_node_port_follows_local_endpoints() {
    health_check_node_port(DataplaneMode::EbpfTc)
}

fn health_check_node_port(mode: DataplaneMode) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let p12 = cluster.pod(1, 2);
    let api = ApiServer::start().expect("api");
    let slice = |conditions: &str| {
        format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{}"], nodeName: node1, conditions: {conditions}}}
"#,
            p12.ip
        )
    };
    let objects = cluster.node_objects_yaml()
        + r#"apiVersion: v1
kind: Service
metadata: {name: lb, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.3
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{port: 80, nodePort: 30090, protocol: TCP, targetPort: 8080}]
---
"# + &slice("{ready: true, serving: true, terminating: false}");
    api.apply_yaml(&objects).expect("objects");
    let _agents = start_agents_in(mode, &cluster, &api, "caches synced");
    let ext = cluster.external();
    let check = |node: usize| {
        let to = SocketAddr::from((cluster.node(node).underlay_ip, 32000));
        http_get_status(&ext.ns, to, "/", TIMEOUT).map_err(|e| e.to_string())
    };
    let until = |node: usize, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match check(node) {
                Ok(line) if line.starts_with(want) => return,
                other => assert!(
                    Instant::now() < deadline,
                    "node{node}: want {want:?}, got {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until(1, "HTTP/1.1 200 OK");
    until(2, "HTTP/1.1 503 Service Unavailable");
    // Only a terminating endpoint left on node1: 503.
    api.apply_yaml(&slice("{ready: false, serving: true, terminating: true}"))
        .expect("terminating");
    until(1, "HTTP/1.1 503 Service Unavailable");
    // Ready again, then gone.
    api.apply_yaml(&slice("{ready: true, serving: true, terminating: false}"))
        .expect("ready");
    until(1, "HTTP/1.1 200 OK");
    api.delete("Service", Some("default"), "lb")
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(5);
    while check(1).is_ok() {
        assert!(
            Instant::now() < deadline,
            "health-check port still open after delete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 50 NodePort flows from outside (to a local and a remote backend) keep
/// streaming across `kill -9` of the receiving node's agent; a NodePort
/// without endpoints is refused at once.
#[test]
fn node_port_flows_survive_agent_restart_and_empty_service_is_refused() {
    use std::io::Write;
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    let sinks = [
        TcpServer::start_sink(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 8080))).expect("sink"),
        TcpServer::start_sink(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 8080))).expect("sink"),
    ];
    let api = ApiServer::start().expect("api");
    let objects = cluster.node_objects_yaml()
        + &service(
            "stream",
            "10.96.1.4",
            30100,
            false,
            &[(p12.ip, "node1"), (p21.ip, "node2")],
        )
        + &service("empty", "10.96.1.5", 30101, false, &[]);
    api.apply_yaml(&objects).expect("objects");
    let mut agents = start_agents(&cluster, &api, "attached XDP");
    let ext = cluster.external();
    let node1 = cluster.node(1).underlay_ip;

    // No endpoints: refused, not left to time out.
    let empty = SocketAddr::from((node1, 30101));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tcp_request(&ext.ns, empty, TIMEOUT) {
            Err(ClientError::Refused { elapsed }) => {
                assert!(elapsed < Duration::from_secs(1));
                break;
            }
            other => assert!(Instant::now() < deadline, "want refused, got {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let udp = udp_request(&ext.ns, empty, TIMEOUT).expect_err("UDP refused");
    assert!(matches!(udp, ClientError::Refused { .. }), "{udp}");

    let to = SocketAddr::from((node1, 30100));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut flows = Vec::new();
    while flows.len() < 50 {
        match proxy_tests::cluster::tcp_connect(&ext.ns, to, Duration::from_secs(1)) {
            Ok(s) => flows.push(s),
            Err(e) => assert!(Instant::now() < deadline, "connect: {e}"),
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (i, s) in flows.iter_mut().enumerate() {
                    if let Err(e) = s.write_all(&[0x5a; 256]) {
                        errors.push(format!("flow {i}: {e}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let open: usize = sinks.iter().map(|s| s.open_connections()).sum();
    assert_eq!(open, 50);
    assert!(
        sinks.iter().all(|s| s.open_connections() > 0),
        "both backends carry flows"
    );
    let before: u64 = sinks.iter().map(|s| s.bytes_received()).sum();
    agents[0].kill_and_restart().expect("restart");
    std::thread::sleep(Duration::from_millis(500));
    // Counted while the client still holds the flows (they close when the
    // writer thread ends).
    let open: usize = sinks.iter().map(|s| s.open_connections()).sum();
    let after: u64 = sinks.iter().map(|s| s.bytes_received()).sum();
    stop.store(true, Ordering::Relaxed);
    let errors = writer.join().expect("writer");
    assert!(errors.is_empty(), "flows broke: {errors:?}");
    assert!(after > before, "traffic kept flowing ({before} -> {after})");
    assert_eq!(open, 50, "0 reset");
}

/// loadBalancerSourceRanges: only listed client networks reach the
/// LoadBalancer IP; others are dropped (as kube-proxy does), and a change to
/// the ranges takes effect.
#[test]
fn load_balancer_source_ranges() {
    source_ranges(DataplaneMode::EbpfTc)
}

fn source_ranges(mode: DataplaneMode) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let p12 = cluster.pod(1, 2);
    let _server =
        TcpServer::start(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 8080))).expect("server");
    let api = ApiServer::start().expect("api");
    let lb_ip = Ipv4Addr::new(192, 0, 2, 50);
    let svc = |range: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.1.6
  loadBalancerSourceRanges: ["{range}"]
  ports: [{{port: 80, nodePort: 30110, protocol: TCP, targetPort: 8080}}]
status:
  loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}
---
"#
        )
    };
    let objects = cluster.node_objects_yaml()
        + &svc("172.18.0.100/32")
        + &format!(
            r#"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{}"], nodeName: node1}}
"#,
            p12.ip
        );
    api.apply_yaml(&objects).expect("objects");
    let mut agent = Agent::start(cluster.node(1), &api, options(mode)).expect("agent");
    agent
        .wait_for_log(
            if mode.is_ebpf() {
                "attached XDP"
            } else {
                "synced"
            },
            Duration::from_secs(5),
        )
        .expect("XDP attached / first sync");
    let ext = cluster.external();
    ext.add_route(&format!("{lb_ip}/32"), cluster.node(1).underlay_ip)
        .expect("route to the LB IP");
    let to = SocketAddr::from((lb_ip, 80));
    wait_up(&ext.ns, to, &agent);
    let t = tally(&ext.ns, to, 10, false);
    assert_eq!(t.keys().collect::<Vec<_>>(), vec!["pod-1-2"]);

    // The client's network is no longer listed: dropped.
    api.apply_yaml(&svc("10.0.0.0/8")).expect("ranges");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_request(&ext.ns, to, Duration::from_millis(300)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "a source outside the ranges still served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if !mode.is_ebpf() {
        // Our drop rule counted them (iptables: KUBE-FIREWALL's DROP;
        // nftables: the fw-* chain's counter).
        let ns = &cluster.node(1).ns;
        let dropped = match mode {
            DataplaneMode::Iptables => ns
                .exec(&["iptables-save", "-c", "-t", "filter"])
                .expect("iptables-save")
                .lines()
                .filter(|l| l.contains("-A KUBE-FIREWALL") && l.contains("-j DROP"))
                .filter_map(|l| l.strip_prefix('[')?.split(':').next()?.parse::<u64>().ok())
                .sum::<u64>(),
            _ => {
                let list = ns
                    .exec(&["nft", "list", "table", "ip", "kube-proxy-rs"])
                    .expect("nft list");
                list.lines()
                    .filter(|l| l.contains("counter packets") && l.contains("drop"))
                    .filter_map(|l| {
                        l.split("counter packets ")
                            .nth(1)?
                            .split_whitespace()
                            .next()?
                            .parse::<u64>()
                            .ok()
                    })
                    .sum::<u64>()
            }
        };
        assert!(dropped > 0, "{mode:?}: no drop counted");
        return;
    }
    let dump: serde_json::Value = serde_json::from_str(
        &agent
            .proxyctl(&["dump-maps", "--output", "json"])
            .expect("dump"),
    )
    .expect("json");
    let dropped = dump["stats"]
        .as_array()
        .and_then(|s| s.iter().find(|e| e["name"] == "drop_source_range"))
        .and_then(|e| e["value"].as_u64())
        .unwrap_or(0);
    assert!(dropped > 0, "counted as drop_source_range");
    assert!(
        dump["source_ranges"]
            .as_array()
            .is_some_and(|r| r.iter().any(|e| e["cidr"] == "10.0.0.0/8")),
        "{}",
        dump["source_ranges"]
    );
}

/// Maglev: a flow to an ExternalIP (same client address and port, same
/// destination) that the outside network sends to node1 or to node2 reaches
/// the same backend, without the nodes sharing any state.
#[test]
fn two_nodes_send_the_same_flow_to_the_same_backend() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 2,
        pods_per_node: 3,
        external_client: true,
    })
    .expect("cluster");
    let mut udp = Vec::new();
    let mut eps = String::new();
    for p in cluster.pods() {
        udp.push(UdpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 5353))).expect("udp"));
        eps += &format!(
            "- {{addresses: [\"{}\"], nodeName: {}}}\n",
            p.ip, p.node_name
        );
    }
    let ext_ip = Ipv4Addr::new(192, 0, 2, 60);
    let api = ApiServer::start().expect("api");
    api.apply_yaml(
        &(cluster.node_objects_yaml()
            + &format!(
                r#"apiVersion: v1
kind: Service
metadata: {{name: mag, namespace: default}}
spec:
  clusterIP: 10.96.1.7
  externalIPs: ["{ext_ip}"]
  ports: [{{port: 53, protocol: UDP, targetPort: 5353}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: mag-1, namespace: default, labels: {{kubernetes.io/service-name: mag}}}}
addressType: IPv4
ports: [{{port: 5353, protocol: UDP}}]
endpoints:
{eps}"#
            )),
    )
    .expect("objects");
    let _agents = start_agents(&cluster, &api, "sync done");
    let ext = cluster.external();
    let podclient = proxy_tests::scenario::podclient_path().expect("podclient");
    let to = SocketAddr::from((ext_ip, 53));
    // The outside network's choice of node: a route to the ExternalIP.
    let ask = |node: usize, sport: u16| -> String {
        let via = cluster.node(node).underlay_ip.to_string();
        ext.ns
            .exec(&[
                "ip",
                "route",
                "replace",
                &format!("{ext_ip}/32"),
                "via",
                &via,
            ])
            .expect("route");
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ext.ns.path().display()))
            .arg("--")
            .arg(&podclient)
            .args(["--proto", "udp", "--to", &to.to_string(), "--count", "1"])
            .args(["--timeout-ms", "1000", "--sport", &sport.to_string()])
            .output()
            .expect("podclient");
        let r: proxy_tests::scenario::ClientResult =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        r.backend()
            .unwrap_or_else(|| panic!("via node{node}, sport {sport}: {r}"))
            .to_owned()
    };
    let mut seen = std::collections::BTreeSet::new();
    for sport in 42000..42016 {
        let (a, b) = (ask(1, sport), ask(2, sport));
        assert_eq!(
            a, b,
            "flow from port {sport}: node1 chose {a}, node2 chose {b}"
        );
        seen.insert(a);
    }
    assert!(
        seen.len() >= 3,
        "16 flows spread over the 6 backends: {seen:?}"
    );
}

/// `--dsr`: a remote backend sees the outside client's own address and
/// answers it directly (the frontend travels in an IPv4 option), TCP and
/// UDP; the client gets its replies from the address it asked.
#[test]
fn dsr_remote_backend_sees_the_client_and_answers_directly() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let p21 = cluster.pod(2, 1);
    let _tcp = TcpServer::start(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 8080))).expect("tcp");
    let _udp = UdpServer::start(&p21.ns, &p21.name, SocketAddr::from((p21.ip, 5353))).expect("udp");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(
        &(cluster.node_objects_yaml()
            + &service("dsr", "10.96.1.8", 30130, false, &[(p21.ip, "node2")])),
    )
    .expect("objects");
    let agents = start_agents_with(
        DataplaneMode::EbpfTc,
        &["--dsr"],
        &cluster,
        &api,
        "sync done",
    );
    let ext = cluster.external();
    let to = SocketAddr::from((cluster.node(1).underlay_ip, 30130));
    wait_up(&ext.ns, to, &agents[0]);
    for udp in [false, true] {
        let t = tally(&ext.ns, to, 20, udp);
        assert_eq!(t.keys().collect::<Vec<_>>(), vec!["pod-2-1"]);
        assert!(
            t["pod-2-1"].iter().all(|p| *p == IpAddr::V4(ext.ip)),
            "udp={udp}: the remote backend sees the client, not node1: {t:?}"
        );
    }
}

/// Session affinity ClientIP on a NodePort from outside: every connection
/// of the client goes to one backend, local or remote.
#[test]
fn node_port_session_affinity_from_outside() {
    node_port_session_affinity(DataplaneMode::EbpfTc)
}

fn node_port_session_affinity(mode: DataplaneMode) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let mut servers = Vec::new();
    let mut eps = String::new();
    for p in cluster.pods() {
        servers
            .push(TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("tcp"));
        eps += &format!(
            "- {{addresses: [\"{}\"], nodeName: {}}}\n",
            p.ip, p.node_name
        );
    }
    let api = ApiServer::start().expect("api");
    api.apply_yaml(
        &(cluster.node_objects_yaml()
            + &format!(
                r#"apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.1.9
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}
  ports: [{{port: 80, nodePort: 30140, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky-1, namespace: default, labels: {{kubernetes.io/service-name: sticky}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
{eps}"#
            )),
    )
    .expect("objects");
    let agents = start_agents_in(mode, &cluster, &api, "sync done");
    let ext = cluster.external();
    let to = SocketAddr::from((cluster.node(1).underlay_ip, 30140));
    wait_up(&ext.ns, to, &agents[0]);
    let t = tally(&ext.ns, to, 50, false);
    assert_eq!(
        t.len(),
        1,
        "50 connections of one client, one backend: {t:?}"
    );
}

/// Datagrams larger than the underlay's MTU arrive in fragments; only the
/// first carries the ports. Every fragment must reach the same backend, or
/// the pod never reassembles the datagram and never answers. Checked for a
/// local backend (XDP DNAT), a remote one (SNAT by tc), and with `--dsr`.
#[test]
fn fragmented_udp_reaches_local_and_remote_backends() {
    for dsr in [false, true] {
        let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
        let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
        let mut servers = (Vec::new(), Vec::new());
        for p in [p12, p21] {
            servers.0.push(
                TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("tcp"),
            );
            servers.1.push(
                UdpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 5353))).expect("udp"),
            );
        }
        let api = ApiServer::start().expect("api");
        api.apply_yaml(
            &(cluster.node_objects_yaml()
                + &service(
                    "frag",
                    "10.96.1.9",
                    30140,
                    false,
                    &[(p12.ip, "node1"), (p21.ip, "node2")],
                )),
        )
        .expect("objects");
        let extra: &[&str] = if dsr { &["--dsr"] } else { &[] };
        let agents = start_agents_with(DataplaneMode::EbpfTc, extra, &cluster, &api, "sync done");
        let ext = cluster.external();
        let to = SocketAddr::from((cluster.node(1).underlay_ip, 30140));
        wait_up(&ext.ns, to, &agents[0]);
        let payload = vec![b'x'; 4000];
        if dsr {
            // DSR adds an 8-byte IPv4 option on the way to the backend's
            // node, so full-size frames do not fit (as with Cilium's DSR).
            // Fragments of flows to the remote backend are dropped and
            // counted; a datagram with DF is answered with ICMP
            // "fragmentation needed", so the client's path MTU adapts.
            for _ in 0..20 {
                let _ = udp_request_payload(&ext.ns, to, &payload, Duration::from_millis(150));
            }
            let dropped = proxy_tests::scenario::stats(&agents[0])
                .expect("stats")
                .get("drop_dsr_mtu")
                .copied()
                .unwrap_or(0);
            assert!(dropped > 0, "fragments too large for DSR are counted");
            for _ in 0..20 {
                send_full_size_with_df(&ext.ns, to);
            }
            let route = ext
                .ns
                .ip(&["-o", "route", "get", &to.ip().to_string()])
                .expect("route");
            assert!(
                route.contains("mtu 1492"),
                "the client learned the MTU DSR leaves (1500 - 8): {route}"
            );
            // With that headroom on the client's link, every fragment fits.
            let dev = route
                .split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .expect("route device")
                .to_owned();
            ext.ns
                .ip(&["link", "set", "dev", &dev, "mtu", "1492"])
                .expect("client MTU");
        }
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..30 {
            let line = udp_request_payload(&ext.ns, to, &payload, TIMEOUT)
                .unwrap_or_else(|e| panic!("dsr={dsr}: fragmented datagram {i} to {to}: {e}"));
            let (name, _) = parse_reply(&line).unwrap_or_else(|| panic!("bad reply {line:?}"));
            *seen.entry(name.to_owned()).or_default() += 1;
        }
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            vec!["pod-1-2", "pod-2-1"],
            "dsr={dsr}: local and remote backends both reassembled datagrams: {seen:?}"
        );
        let matched = proxy_tests::scenario::stats(&agents[0])
            .expect("stats")
            .get("frag_matched")
            .copied()
            .unwrap_or(0);
        assert!(
            matched >= 30 * 2,
            "dsr={dsr}: node1 matched {matched} later fragments (>= 2 per datagram expected)"
        );
    }
}

/// One UDP datagram that fills a 1500-byte frame, with DF set (path MTU
/// discovery on); sent from a fresh source port, reply not awaited.
fn send_full_size_with_df(ns: &Netns, to: SocketAddr) {
    ns.run(|| -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        proxy_tests::cluster::setsockopt_int(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        // An EMSGSIZE once the path MTU is known is fine.
        let _ = socket.send_to(&[b'y'; 1472], to);
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    })
    .expect("entering the client namespace")
    .expect("DF datagram");
}
