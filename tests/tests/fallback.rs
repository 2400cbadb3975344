//! The kube-proxy fallback modes' kernel state: `--cleanup` leaves
//! `iptables-save` and `nft list ruleset` as they were before the agent
//! started (other software's rules included), switching modes removes the
//! previous mode's state, and `--mode ipvs` on a kernel without IP_VS exits
//! with one clear sentence.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions, binary},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec, TcpServer, tcp_request},
    netns::Netns,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 1);

/// `iptables-save` and `ip6tables-save` (filter and nat) and `nft list
/// ruleset` of `ns`, with the volatile parts (comment lines with dates,
/// counters) removed.
fn snapshot(ns: &Netns) -> String {
    let strip_counters = |l: &str| {
        // `:CHAIN POLICY [p:b]` -> `:CHAIN POLICY`
        match l.find(" [") {
            Some(i) if l.starts_with(':') => l[..i].to_owned(),
            _ => l.to_owned(),
        }
    };
    let mut out = String::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        out.push_str(&format!("--- {tool}\n"));
        for table in ["filter", "nat"] {
            let save = ns.exec(&[tool, "-t", table]).expect(tool);
            for l in save.lines().filter(|l| !l.starts_with('#')) {
                out.push_str(&strip_counters(l));
                out.push('\n');
            }
        }
    }
    out.push_str("--- nft\n");
    let nft = ns.exec(&["nft", "list", "ruleset"]).expect("nft list");
    // iptables-nft's own tables are compared above, in iptables syntax.
    out.push_str(&nft);
    out
}

fn objects(node: &str, backend: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: {node}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, nodePort: 30777, protocol: TCP, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: 10.96.7.2
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{backend}"], nodeName: {node}}}
"#
    )
}

fn start(node: &proxy_tests::cluster::Node, api: &ApiServer, mode: &str) -> Agent {
    let mut a = Agent::start(
        node,
        api,
        AgentOptions {
            args: vec!["--mode".into(), mode.into()],
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{mode} agent: {e:#}"));
    a.wait_for_log("sync done", Duration::from_secs(10))
        .expect("first sync");
    a
}

/// Run the agent binary once in `node`'s namespace (nsenter, so bpffs
/// stays visible) and return (success, stdout+stderr).
fn run_proxy(node: &proxy_tests::cluster::Node, args: &[&str]) -> (bool, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.ns.path().display()))
        .arg("--")
        .arg(binary("proxy").expect("proxy binary"))
        .args(["--hostname-override", &node.name])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running proxy");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn until_served(client: &Netns, to: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tcp_request(client, to, Duration::from_millis(500)) {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "{to} not served: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cleanup_restores_iptables_and_nft_rulesets_and_switching_modes_cleans_up() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .expect("cluster");
    let node = cluster.node(1);
    let pod = cluster.pod(1, 2);
    let _server =
        TcpServer::start(&pod.ns, &pod.name, SocketAddr::from((pod.ip, 8080))).expect("server");
    // Someone else's rules, in the tables and chains we use too.
    for rule in [
        "iptables -t nat -A POSTROUTING -s 192.168.99.0/24 -j MASQUERADE",
        "iptables -t filter -A INPUT -p tcp --dport 2222 -j DROP",
        "iptables -t filter -N OTHER-CHAIN",
        "iptables -t filter -A OTHER-CHAIN -j RETURN",
        "nft add table inet other",
        "nft add chain inet other input { type filter hook input priority 0; policy accept; }",
        "nft add rule inet other input tcp dport 2223 drop",
        "ip6tables -t filter -A INPUT -p tcp --dport 2224 -j DROP",
    ] {
        node.ns
            .exec(&rule.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{rule}: {e:#}"));
    }
    let before = snapshot(&node.ns);
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&objects(&node.name, pod.ip))
        .expect("objects");
    let client = &cluster.pod(1, 1).ns;

    // iptables mode programs its chains and serves.
    let mut ipt = start(node, &api, "iptables");
    until_served(client, SocketAddr::from((VIP, 80)));
    let during = snapshot(&node.ns);
    assert!(during.contains(":KUBE-SERVICES"), "{during}");
    assert!(during.contains("-j KUBE-SVC-"), "{during}");
    // And the same chains in ip6tables (IPv6 frontends' rules).
    let six = node
        .ns
        .exec(&["ip6tables-save", "-t", "nat"])
        .expect("ip6tables-save");
    assert!(six.contains(":KUBE-SERVICES"), "{six}");
    ipt.stop().expect("stop");

    // nftables mode: starting it removes the iptables mode's chains.
    let mut nft = start(node, &api, "nftables");
    until_served(client, SocketAddr::from((VIP, 80)));
    let during = snapshot(&node.ns);
    assert!(!during.contains("KUBE-"), "iptables state left: {during}");
    assert!(during.contains("table ip kube-proxy-rs"), "{during}");
    assert!(during.contains("table ip6 kube-proxy-rs"), "{during}");
    nft.stop().expect("stop");

    // --cleanup removes our tables; the rest is as before.
    let (ok, out) = run_proxy(
        node,
        &["--cleanup", "--bpffs-path", "/sys/fs/bpf/proxy-tests-none"],
    );
    assert!(ok, "{out}");
    assert_eq!(snapshot(&node.ns), before, "after nftables --cleanup");

    // And after iptables mode (stopped without cleanup), likewise.
    let mut ipt = start(node, &api, "iptables");
    until_served(client, SocketAddr::from((VIP, 80)));
    ipt.stop().expect("stop");
    assert_ne!(snapshot(&node.ns), before);
    let (ok, out) = run_proxy(
        node,
        &["--cleanup", "--bpffs-path", "/sys/fs/bpf/proxy-tests-none"],
    );
    assert!(ok, "{out}");
    assert_eq!(snapshot(&node.ns), before, "after iptables --cleanup");
    // A second cleanup finds nothing and changes nothing.
    let (ok, out) = run_proxy(
        node,
        &["--cleanup", "--bpffs-path", "/sys/fs/bpf/proxy-tests-none"],
    );
    assert!(ok, "{out}");
    assert_eq!(snapshot(&node.ns), before);
}

#[test]
fn cleanup_removes_ebpf_pins() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        ..Default::default()
    })
    .expect("cluster");
    let node = cluster.node(1);
    let pod = cluster.pod(1, 2);
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&objects(&node.name, pod.ip))
        .expect("objects");
    let mut ebpf = Agent::start(node, &api, AgentOptions::default()).expect("ebpf agent");
    ebpf.wait_for_log("sync done", Duration::from_secs(10))
        .expect("first sync");
    ebpf.stop().expect("stop");
    let pins = ebpf.bpffs_path.clone();
    assert!(
        pins.join("links").is_dir(),
        "links pinned by the eBPF agent"
    );
    let (ok, out) = run_proxy(
        node,
        &["--cleanup", "--bpffs-path", &pins.display().to_string()],
    );
    assert!(ok, "{out}");
    assert!(!pins.exists(), "{} still there: {out}", pins.display());
}

/// `--mode ipvs` checks for IP_VS before anything else: on a kernel without
/// it (no module either) the agent exits with one sentence; on a kernel
/// with it, the check passes and the next one (the scheduler, deliberately
/// bogus here so the agent exits before needing an API server) is the one
/// that fails. Which kernel this is: the same generic netlink probe, asked
/// from the node's namespace.
#[test]
fn ipvs_mode_without_ip_vs_exits_with_one_sentence() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 1,
        ..Default::default()
    })
    .expect("cluster");
    let node = cluster.node(1);
    let has_ip_vs = node
        .ns
        .run(|| proxy::dataplane::ipvs::probe().is_ok())
        .expect("probe in the node's namespace");
    let (ok, out) = run_proxy(
        node,
        &[
            "--mode",
            "ipvs",
            "--ipvs-scheduler",
            "bogus",
            "--bpffs-path",
            "/sys/fs/bpf/proxy-tests-none",
        ],
    );
    assert!(!ok, "ipvs mode must fail here: {out}");
    let err: Vec<&str> = out.lines().filter(|l| l.starts_with("proxy: ")).collect();
    let want = if has_ip_vs {
        format!(
            "proxy: --ipvs-scheduler bogus: not one of {}",
            proxy::dataplane::ipvs::SCHEDULERS.join(", ")
        )
    } else {
        "proxy: IPVS is not available in this kernel (no \"IPVS\" generic netlink family: IP_VS not built in and no module loaded); use --mode iptables or --mode nftables".to_owned()
    };
    assert_eq!(
        err,
        vec![want.as_str()],
        "IP_VS available: {has_ip_vs}\n{out}"
    );
}

/// The last log line containing `needle`, and the value of `key=` in it.
fn last_field(log: &str, needle: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(needle))?;
    let strip = |s: &str| {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "=_. ".contains(*c))
            .collect::<String>()
    };
    strip(line)
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// 1000 services (TCP + UDP, two endpoints each) programmed in one sync,
/// then one endpoint of one service replaced: the partial sync rewrites
/// only that service's two KUBE-SVC / svc- chains (which DNAT to the
/// endpoints themselves: there is no chain per endpoint), deletes no
/// chain, and swaps the two hairpin entries of the endpoint (ip set /
/// nft set elements). Prints both sync times (measured, not asserted).
fn thousand_services_then_one_endpoint(mode: &str) {
    const N: usize = 1000;
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 0,
        external_client: false,
    })
    .expect("cluster");
    let node = cluster.node(1);
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n",
        node.name
    ))
    .expect("node");
    let service = |i: usize| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "churn"},
            "spec": {
                "clusterIP": format!("10.97.{}.{}", i / 250, i % 250 + 1),
                "ports": [
                    {"name": "tcp", "port": 80, "protocol": "TCP"},
                    {"name": "udp", "port": 53, "protocol": "UDP"}
                ]
            }
        })
    };
    let slice = |i: usize, hosts: [u8; 2]| {
        let endpoints: Vec<serde_json::Value> = hosts
            .iter()
            .map(|h| serde_json::json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 250, i % 250, h)], "conditions": {"ready": true}}))
            .collect();
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{i}-1"), "namespace": "churn",
                         "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"},
                      {"name": "udp", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        })
    };
    for i in 0..N {
        api.create(service(i)).expect("service");
        api.create(slice(i, [2, 3])).expect("slice");
    }
    let mut agent = start(node, &api, mode);
    // DNAT rules (one per endpoint of each frontend), and chains per
    // endpoint (none: no service has affinity).
    let count_dnats = || -> (usize, usize) {
        match mode {
            "iptables" => {
                let save = node
                    .ns
                    .exec(&["iptables-save", "-t", "nat"])
                    .expect("iptables-save");
                (
                    save.lines()
                        .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("-j DNAT"))
                        .count(),
                    save.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
                )
            }
            _ => {
                let list = node
                    .ns
                    .exec(&["nft", "list", "table", "ip", "kube-proxy-rs"])
                    .expect("nft list");
                (
                    list.lines().filter(|l| l.contains(" dnat to ")).count(),
                    list.lines()
                        .filter(|l| l.trim_start().starts_with("chain sep-"))
                        .count(),
                )
            }
        }
    };
    let count_seps = || count_dnats().0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_seps() < 4 * N {
        assert!(
            Instant::now() < deadline,
            "{mode}: {} endpoint chains",
            count_seps()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(count_seps(), 4 * N);
    let full_ms = last_field(&agent.log(), "sync done", "elapsed_ms");

    let syncs = agent.log().matches("sync done").count();
    api.update(slice(7, [2, 9])).expect("update slice");
    agent
        .wait_for_log_count("sync done", syncs + 1, Duration::from_secs(20))
        .expect("partial sync");
    let log = agent.log();
    let partial_ms = last_field(&log, "sync done", "elapsed_ms");
    let (needle, written, deleted, added_e, deleted_e) = match mode {
        "iptables" => (
            "iptables chains",
            "written",
            "deleted",
            "hairpin_added",
            "hairpin_deleted",
        ),
        _ => (
            "nft table",
            "chains_written",
            "chains_deleted",
            "elements_added",
            "elements_deleted",
        ),
    };
    assert_eq!(
        last_field(&log, needle, written),
        Some(2),
        "{mode}: the 2 svc chains:\n{log}"
    );
    assert_eq!(
        last_field(&log, needle, deleted),
        Some(0),
        "{mode}: no chain deleted:\n{log}"
    );
    // iptables' set holds (endpoint, port, endpoint): one per port; nft's
    // holds endpoint . endpoint: one for both.
    let hairpin = if mode == "iptables" { 2 } else { 1 };
    assert_eq!(
        (
            last_field(&log, needle, added_e),
            last_field(&log, needle, deleted_e)
        ),
        (Some(hairpin), Some(hairpin)),
        "{mode}: hairpin entries of the new / old endpoint:\n{log}"
    );
    assert_eq!(count_dnats(), (4 * N, 0));
    println!(
        "{mode}: 1000 services x 2 ports: full sync {full_ms:?} ms, one-endpoint sync {partial_ms:?} ms"
    );
}

#[test]
fn iptables_thousand_services_partial_sync() {
    thousand_services_then_one_endpoint("iptables")
}

#[test]
fn nftables_thousand_services_partial_sync() {
    thousand_services_then_one_endpoint("nftables")
}

/// `ipset save` of our sets plus `iptables-save` (filter, nat), counters
/// and comments stripped, via [`snapshot`].
fn snapshot_with_sets(ns: &Netns) -> String {
    let mut s = snapshot(ns);
    s.push_str("--- ipset\n");
    s.push_str(&ns.exec(&["ipset", "save"]).expect("ipset save"));
    s
}

/// The packets counted by the first rule of `iptables-save -c -t table`
/// that contains `needle`.
fn rule_packets(ns: &Netns, table: &str, needle: &str) -> u64 {
    let save = ns
        .exec(&["iptables-save", "-c", "-t", table])
        .expect("iptables-save");
    let line = save
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in:\n{save}"));
    line.trim_start_matches('[')
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no counters in {line}"))
}

/// One TCP connect from `ns` to `to`: Ok on accept, else the error kind.
fn connect(ns: &Netns, to: SocketAddr) -> Result<(), std::io::ErrorKind> {
    ns.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_millis(700)))
        .expect("run in netns")
        .map(drop)
        .map_err(|e| e.kind())
}

/// The iptables/ipset glue of `--mode ipvs`, live on this kernel (which has
/// ip sets but no IP_VS, so there are no virtual servers: the node's own
/// listeners stand in for them, and the service addresses go on `lo`: this
/// kernel has no dummy interfaces either). Two clients reach the node on
/// their own links.
/// Shows: a new connection to a `kube-ipvs0` address on a port that is no
/// service is rejected at once (without the glue the node's listener on
/// that port would answer); a service port is exempt; a LoadBalancer
/// frontend with source ranges drops unlisted clients; traffic from
/// outside to ClusterIPs and node ports is marked for masquerade, from a
/// pod interface it is not; set updates follow the frontends; cleanup
/// (library and `proxy --cleanup`) leaves iptables and ipset as before.
#[test]
fn ipvs_glue_rejects_guards_marks_and_cleans_up() {
    use proxy::{
        dataplane::{fallback::RuleOptions, ipvs_glue},
        lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
        model::Protocol,
    };
    use std::collections::{BTreeMap, BTreeSet};

    let node = Netns::new("glue-node").expect("node ns");
    let listed = Netns::new("glue-listed").expect("client ns");
    let other = Netns::new("glue-other").expect("client ns");
    let (cip, lbip) = (
        Ipv4Addr::new(10, 96, 9, 10),
        Ipv4Addr::new(198, 51, 100, 10),
    );
    let node_ip = Ipv4Addr::new(192, 168, 61, 1);
    // `listed` is on a link named like a pod interface (`vethg…`), `other`
    // on `ext0`: the masquerade rules tell them apart by that.
    node.ip_batch(&format!(
        "link set lo up
         link add vethglue type veth peer name eth0 netns {listed}
         link add ext0 type veth peer name eth0 netns {other}
         addr add {node_ip}/24 dev vethglue
         addr add 192.168.62.1/24 dev ext0
         link set vethglue up
         link set ext0 up
         addr add {cip}/32 dev lo
         addr add {lbip}/32 dev lo",
        listed = listed.name(),
        other = other.name()
    ))
    .expect("node links");
    for (ns, me, gw) in [
        (&listed, "192.168.61.2/24", "192.168.61.1"),
        (&other, "192.168.62.2/24", "192.168.62.1"),
    ] {
        ns.ip_batch(&format!(
            "link set lo up
             addr add {me} dev eth0
             link set eth0 up
             route add default via {gw}"
        ))
        .expect("client links");
    }
    // Stand-ins: port 80 for the service port IPVS would take, 2222 for
    // some host-network listener (sshd, say), 30080 for the node port.
    let _servers: Vec<TcpServer> = [80, 2222, 30080]
        .into_iter()
        .map(|p| {
            TcpServer::start(&node, "node", SocketAddr::from(([0, 0, 0, 0], p))).expect("listener")
        })
        .collect();
    let before = snapshot_with_sets(&node);

    let be = BackendAddr {
        addr: Ipv4Addr::new(10, 244, 0, 2).into(),
        port: 8080,
        terminating: false,
        local: true,
    };
    let fe = |kind, ranges: Vec<(Ipv4Addr, u8)>| Frontend {
        kind,
        backends: vec![be].into(),
        affinity_timeout: 0,
        source_ranges: ranges.into_iter().map(|(a, l)| (a.into(), l)).collect(),
        maglev_table_size: None,
        local_only: false,
    };
    let key = |addr: Ipv4Addr, port| FrontendKey {
        addr: addr.into(),
        port,
        proto: Protocol::Tcp,
    };
    let mut frontends = BTreeMap::new();
    frontends.insert(key(cip, 80), fe(FrontendKind::ClusterIp, vec![]));
    frontends.insert(key(node_ip, 30080), fe(FrontendKind::NodePort, vec![]));
    frontends.insert(
        key(lbip, 80),
        fe(
            FrontendKind::LoadBalancer,
            vec![(Ipv4Addr::new(192, 168, 61, 0), 24)],
        ),
    );
    let dummy: BTreeSet<Ipv4Addr> = [cip, lbip].into();
    let opts = RuleOptions {
        pod_interface_prefixes: vec!["veth".into()],
    };
    let mut glue = node
        .run(|| {
            let mut g = ipvs_glue::Glue::install(opts)?;
            g.sync(&frontends, &dummy)?;
            Ok::<_, proxy::dataplane::fallback::FallbackError>(g)
        })
        .expect("run")
        .expect("glue installed");

    use std::io::ErrorKind::{ConnectionRefused, TimedOut};
    let to = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));
    // Service ports are exempt from the reject, other ports refused at once.
    for c in [&listed, &other] {
        assert_eq!(connect(c, to(cip, 80)), Ok(()), "ClusterIP service port");
        let t = Instant::now();
        assert_eq!(connect(c, to(cip, 2222)), Err(ConnectionRefused));
        assert!(t.elapsed() < Duration::from_millis(500), "refused at once");
        assert_eq!(connect(c, to(node_ip, 30080)), Ok(()), "node port");
    }
    // Source ranges: 192.168.61.0/24 only.
    assert_eq!(connect(&listed, to(lbip, 80)), Ok(()));
    assert_eq!(connect(&other, to(lbip, 80)), Err(TimedOut));
    assert!(rule_packets(&node, "filter", "SOURCE-CIDR dst,dst,src -j DROP") >= 1);
    // Masquerade marks: the ClusterIP from `ext0` (not a pod) went through
    // KUBE-IPVS-MARK-MASQ, from `vethglue` returned before it; node ports
    // are marked from anywhere; the LB IP too (externalTrafficPolicy
    // Cluster).
    let cluster_ret = rule_packets(&node, "nat", "KUBE-IPVS-CLUSTER-IP -i veth+ -j RETURN");
    let cluster_masq = rule_packets(
        &node,
        "nat",
        "-A KUBE-IPVS-CLUSTER-IP -j KUBE-IPVS-MARK-MASQ",
    );
    // (One connection each: the sets hold the service port, not 2222.)
    assert_eq!((cluster_ret, cluster_masq), (1, 1), "ClusterIP marks");
    assert_eq!(
        rule_packets(
            &node,
            "nat",
            "-p tcp -m set --match-set KUBE-NODE-PORT-TCP dst"
        ),
        2,
        "node port marks"
    );
    assert!(rule_packets(&node, "nat", "-A KUBE-IPVS-MARK-MASQ -j MARK") >= 5);

    // The LB frontend goes: its address, still on kube-ipvs0, is no
    // service any more and refuses; the ClusterIP is untouched.
    frontends.remove(&key(lbip, 80));
    node.run(|| glue.sync(&frontends, &dummy))
        .expect("run")
        .expect("sync");
    assert_eq!(connect(&listed, to(lbip, 80)), Err(ConnectionRefused));
    assert_eq!(connect(&other, to(lbip, 80)), Err(ConnectionRefused));
    assert_eq!(connect(&other, to(cip, 80)), Ok(()));
    let sets = node.exec(&["ipset", "save"]).expect("ipset save");
    assert!(!sets.contains(&format!("{lbip},tcp:80")), "{sets}");

    // Cleanup: everything as before, by the library and by the binary.
    assert!(node.run(ipvs_glue::cleanup).expect("run").expect("cleanup"));
    assert_eq!(snapshot_with_sets(&node), before);
    assert_eq!(connect(&other, to(cip, 2222)), Ok(()), "no reject left");
    node.run(|| ipvs_glue::Glue::install(RuleOptions::default()))
        .expect("run")
        .expect("glue installed again");
    assert_ne!(snapshot_with_sets(&node), before);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .arg("--")
        .arg(binary("proxy").expect("proxy binary"))
        .args(["--cleanup", "--bpffs-path", "/sys/fs/bpf/proxy-tests-none"])
        .output()
        .expect("proxy --cleanup");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(snapshot_with_sets(&node), before, "after proxy --cleanup");
}
