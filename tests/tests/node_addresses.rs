//! Node addresses that change at run time, as kube-proxy 1.33 treats them
//! (`--nodeport-addresses`):
//!
//! * CIDRs: every address of the node's interfaces inside them serves
//!   NodePorts; one added with `ip addr add` is served within seconds (the
//!   agent re-reads the interfaces in housekeeping), and stops being served
//!   once `ip addr del` removes it.
//! * `primary`: the Node object's primary IP (first InternalIP) serves
//!   NodePorts; when the Node object's address changes, NodePorts move to
//!   the new address and north-south SNAT (eBPF) follows it.
//!
//! Each in the eBPF mode and in a kube-proxy fallback mode. One agent, on
//! node1; the backends are on node1 (DNAT only) and node2 (SNAT).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{ClientError, Cluster, ClusterSpec, TcpServer, parse_reply, tcp_request},
    netns::Netns,
    scenario::{DataplaneMode, eventually, mode_frontends},
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_millis(300);
const NODE_PORT: u16 = 30080;
/// An extra address on node1's underlay (`172.18.0.0/24`).
const EXTRA: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 111);
/// How long an address change may take to be served (housekeeping reads
/// the interfaces every second).
const WITHIN: Duration = Duration::from_secs(5);

/// A NodePort service with a backend on each node.
fn objects(cluster: &Cluster) -> String {
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    cluster.node_objects_yaml()
        + &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: np, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.1.1
  ports:
  - {{name: http, port: 80, nodePort: {NODE_PORT}, protocol: TCP, targetPort: 8080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: np-1, namespace: default, labels: {{kubernetes.io/service-name: np}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
- {{addresses: ["{}"], nodeName: node1}}
- {{addresses: ["{}"], nodeName: node2}}
"#,
            p12.ip, p21.ip
        )
}

struct Setup {
    cluster: Cluster,
    api: ApiServer,
    _servers: Vec<TcpServer>,
    agent: Agent,
}

/// The cluster, the service, backends, and node1's agent in `mode` with
/// `--nodeport-addresses nodeport_addresses`, synced. `before`: run in
/// node1's namespace before the agent starts.
fn setup(mode: DataplaneMode, nodeport_addresses: &str, before: &[&str]) -> Setup {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let mut servers = Vec::new();
    for p in [cluster.pod(1, 2), cluster.pod(2, 1)] {
        servers
            .push(TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("tcp"));
    }
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&objects(&cluster)).expect("objects");
    if !before.is_empty() {
        cluster.node(1).ns.ip(before).expect("before the agent");
    }
    let mut args = mode.agent_args();
    args.extend(["--nodeport-addresses".into(), nodeport_addresses.into()]);
    let mut agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args,
            ..Default::default()
        },
    )
    .expect("agent");
    let ready = if mode.is_ebpf() {
        "attached XDP"
    } else {
        "sync done"
    };
    agent
        .wait_for_log(ready, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{ready}: {e:#}"));
    Setup {
        cluster,
        api,
        _servers: servers,
        agent,
    }
}

impl Setup {
    fn ext(&self) -> &Netns {
        &self.cluster.external().ns
    }

    /// The NodePort frontends node1's agent programmed.
    fn node_ports(&self, mode: DataplaneMode) -> Vec<String> {
        mode_frontends(mode, &self.agent, &self.cluster.node(1).ns)
            .expect("frontends")
            .into_iter()
            .filter(|f| f.ends_with(&format!(":{NODE_PORT}/TCP")))
            .collect()
    }

    /// Both backends answer on `ip`'s NodePort from outside; the backend
    /// on node2 sees `snat` as the client (SNAT to node1), node1's sees
    /// the client. Err: what went wrong (for [`eventually`]).
    fn served_on(&self, ip: Ipv4Addr, snat: Option<Ipv4Addr>) -> Result<(), String> {
        let to = SocketAddr::from((ip, NODE_PORT));
        let mut seen = std::collections::BTreeMap::new();
        for i in 0..16 {
            let r = tcp_request(self.ext(), to, TIMEOUT).map_err(|e| format!("{to} #{i}: {e}"))?;
            let (name, peer) = parse_reply(&r).ok_or_else(|| format!("bad reply {r:?}"))?;
            seen.insert(name.to_owned(), peer.ip());
        }
        if seen.len() != 2 {
            return Err(format!("{to}: not both backends: {seen:?}"));
        }
        if seen.get("pod-1-2") != Some(&IpAddr::V4(self.cluster.external().ip)) {
            return Err(format!("{to}: the local backend saw {seen:?}"));
        }
        if let Some(snat) = snat
            && seen.get("pod-2-1") != Some(&IpAddr::V4(snat))
        {
            return Err(format!("{to}: the remote backend saw {seen:?}, not {snat}"));
        }
        Ok(())
    }

    /// Nothing serves `ip`'s NodePort: no answer, or a refusal (nothing
    /// listens on the node itself).
    fn not_served_on(&self, ip: Ipv4Addr) -> Result<(), String> {
        let to = SocketAddr::from((ip, NODE_PORT));
        match tcp_request(self.ext(), to, TIMEOUT) {
            Ok(r) => Err(format!("{to} still served: {r:?}")),
            Err(ClientError::Refused { .. } | ClientError::TimedOut { .. }) => Ok(()),
            Err(e) => Err(format!("{to}: {e}")),
        }
    }
}

fn cidr_addresses_follow_the_interfaces(mode: DataplaneMode) {
    let s = setup(mode, "172.18.0.0/24", &[]);
    let node1 = s.cluster.node(1);
    let (ip1, ns1) = (node1.underlay_ip, &node1.ns);
    eventually(WITHIN, || s.served_on(ip1, None));
    let want = |ips: &[Ipv4Addr]| -> Vec<String> {
        let mut v: Vec<String> = ips.iter().map(|i| format!("{i}:{NODE_PORT}/TCP")).collect();
        v.sort();
        v
    };
    assert_eq!(
        s.node_ports(mode),
        want(&[ip1]),
        "the CIDR holds one address"
    );

    // An address appears on the interface: served within seconds, with
    // both backends (the remote one SNATed to the node's primary address).
    ns1.ip(&["addr", "add", &format!("{EXTRA}/24"), "dev", "eth0"])
        .expect("ip addr add");
    let snat = mode.is_ebpf().then_some(ip1);
    eventually(WITHIN, || s.served_on(EXTRA, snat));
    assert_eq!(s.node_ports(mode), want(&[ip1, EXTRA]));
    assert!(
        s.agent
            .log()
            .contains("NodePort addresses changed on the host's interfaces"),
        "the change is logged"
    );

    // Removed: no longer served. The client keeps sending to node1 (a
    // static neighbour entry), so only the missing frontend stops it.
    ns1.ip(&["addr", "del", &format!("{EXTRA}/24"), "dev", "eth0"])
        .expect("ip addr del");
    let link = ns1.ip(&["-br", "link", "show", "eth0"]).expect("link");
    let mac = link.split_whitespace().nth(2).expect("eth0's MAC");
    s.ext()
        .ip(&[
            "neigh",
            "replace",
            &EXTRA.to_string(),
            "lladdr",
            mac,
            "dev",
            "eth0",
        ])
        .expect("neighbour");
    eventually(WITHIN, || {
        let now = s.node_ports(mode);
        (now == want(&[ip1]))
            .then_some(())
            .ok_or_else(|| format!("NodePorts {now:?}"))
    });
    s.not_served_on(EXTRA).unwrap_or_else(|e| panic!("{e}"));
    s.served_on(ip1, None).unwrap_or_else(|e| panic!("{e}"));
}

fn primary_follows_the_node_object(mode: DataplaneMode) {
    // The extra address is on the interface from the start: only the Node
    // object decides which one is primary.
    let s = setup(
        mode,
        "primary",
        &["addr", "add", &format!("{EXTRA}/24"), "dev", "eth0"],
    );
    let node1 = s.cluster.node(1);
    let ip1 = node1.underlay_ip;
    let snat = |ip| mode.is_ebpf().then_some(ip);
    eventually(WITHIN, || s.served_on(ip1, snat(ip1)));
    assert_eq!(
        s.node_ports(mode),
        [format!("{ip1}:{NODE_PORT}/TCP")],
        "primary: the Node's IPv4 only (the service is IPv4)"
    );
    s.not_served_on(EXTRA).unwrap_or_else(|e| panic!("{e}"));

    // The Node object's primary IPv4 changes.
    let ip6 = node1.underlay_ip6.to_string();
    s.api
        .modify("Node", None, &node1.name, |o| {
            o["status"]["addresses"] = json!([
                {"type": "InternalIP", "address": EXTRA.to_string()},
                {"type": "InternalIP", "address": ip6},
                {"type": "ExternalIP", "address": ip1.to_string()},
            ]);
        })
        .expect("modify Node");
    eventually(WITHIN, || s.served_on(EXTRA, snat(EXTRA)));
    assert_eq!(s.node_ports(mode), [format!("{EXTRA}:{NODE_PORT}/TCP")]);
    s.not_served_on(ip1).unwrap_or_else(|e| panic!("{e}"));
    if mode.is_ebpf() {
        let dump: serde_json::Value = serde_json::from_str(
            &s.agent
                .proxyctl(&["dump-maps", "--output", "json"])
                .expect("dump"),
        )
        .expect("json");
        assert_eq!(
            dump["config"]["node_address"].as_str(),
            Some(EXTRA.to_string().as_str()),
            "SNAT/DSR source follows the primary address"
        );
    }
}

#[test]
fn cidr_node_ports_follow_addresses_added_and_removed() {
    cidr_addresses_follow_the_interfaces(DataplaneMode::EbpfTc)
}

#[test]
fn primary_node_ports_and_snat_follow_the_node_object() {
    primary_follows_the_node_object(DataplaneMode::EbpfTc)
}

mod fallback {
    use super::*;

    #[test]
    fn nftables_cidr_node_ports_follow_addresses_added_and_removed() {
        cidr_addresses_follow_the_interfaces(DataplaneMode::Nftables)
    }

    #[test]
    fn iptables_primary_node_ports_follow_the_node_object() {
        primary_follows_the_node_object(DataplaneMode::Iptables)
    }
}
