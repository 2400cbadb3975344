//! The agent with exactly the privileges deploy/'s DaemonSet grants, in
//! every mode: the capability set is read from the manifest
//! (`securityContext.capabilities`, on top of the container runtime's
//! default set unless it drops `ALL`) and applied with `setpriv` before the
//! agent starts. The agent must come up, program a ClusterIP and a NodePort,
//! follow an endpoint change, and adopt its own state after `kill -9`.
//!
//! `PROXY_TESTS_MANIFEST_CAPS=1` runs every other scenario's agents with the
//! same set.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use proxy_tests::{
    cluster::{parse_reply, tcp_request},
    privilege::{agent_capabilities, effective_capabilities},
    scenario::{DataplaneMode, Endpoint, EndpointSlice, Request, Scenario, Service, try_tally},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 210, 1);
const PORT: u16 = 8080;
const NODE_PORT: u16 = 30210;
const CONVERGE: Duration = Duration::from_secs(10);

fn web() -> Service {
    Service::cluster_ip("web", VIP)
        .tcp("http", 80, PORT)
        .node_port("http", NODE_PORT)
}

fn slice(s: &Scenario, pods: &[(usize, usize)]) -> EndpointSlice {
    pods.iter().fold(
        EndpointSlice::new("web-1", "web").tcp_port("http", PORT),
        |sl, (i, j)| sl.endpoint(Endpoint::ready(s.pod(*i, *j))),
    )
}

/// Backends `n` requests from the external client to node1's NodePort
/// reach (by the name the servers answer with).
fn node_port_backends(s: &Scenario, n: usize) -> Result<BTreeMap<String, usize>, String> {
    let to = SocketAddr::from((s.cluster.node(1).underlay_ip, NODE_PORT));
    let mut t = BTreeMap::new();
    for _ in 0..n {
        let line = tcp_request(&s.cluster.external().ns, to, Duration::from_secs(1))
            .map_err(|e| format!("{to}: {e}"))?;
        let (name, _) = parse_reply(&line).ok_or_else(|| format!("reply {line:?}"))?;
        *t.entry(name.to_owned()).or_insert(0) += 1;
    }
    Ok(t)
}

/// Waits until ClusterIP (from pod-1-1) and NodePort (from outside) reach
/// exactly `want`.
#[track_caller]
fn until_backends(s: &Scenario, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|w| (*w).to_owned()).collect();
    let c = s.client(1, 1);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let cluster_ip = c
            .run(&Request::tcp(SocketAddr::from((VIP, 80))).count(20))
            .map_err(|e| format!("{e:#}"))
            .and_then(|rs| try_tally(&rs, c.ip));
        let node_port = node_port_backends(s, 20);
        let got = match (&cluster_ip, &node_port) {
            (Ok(a), Ok(b)) => {
                let a: BTreeSet<String> = a.keys().cloned().collect();
                let b: BTreeSet<String> = b.keys().cloned().collect();
                if a == want && b == want {
                    return;
                }
                format!("ClusterIP {a:?}, NodePort {b:?}")
            }
            _ => format!("ClusterIP {cluster_ip:?}, NodePort {node_port:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "{:?}: want {want:?} within {CONVERGE:?}, got {got}\n{}",
            s.socket_lb,
            s.agent(1).log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn with_manifest_capabilities(mode: DataplaneMode) -> Scenario {
    let caps = agent_capabilities().expect("deploy/'s capability set");
    let mut s = Scenario::builder("privilege", mode)
        .tcp_server((1, 2), PORT)
        .tcp_server((2, 1), PORT)
        .object(&web())
        .capabilities(caps.clone())
        .build()
        .expect("scenario");
    // What the manifest grants, less what this machine withholds from the
    // test itself (a sandbox may lack some, e.g. SYS_RESOURCE).
    let own = effective_capabilities(std::process::id()).expect("own capabilities");
    let want: BTreeSet<String> = caps.intersection(&own).cloned().collect();
    for i in [1, 2] {
        let pid = s.agent(i).pid().expect("agent running");
        let eff = effective_capabilities(pid).expect("agent's capabilities");
        assert_eq!(
            eff,
            want,
            "node{i}'s agent runs with exactly the manifest's set (not granted here: {:?})",
            caps.difference(&own).collect::<Vec<_>>()
        );
    }
    s.apply(&slice(&s, &[(1, 2), (2, 1)]));
    until_backends(&s, &["pod-1-2", "pod-2-1"]);
    if mode.is_ebpf() {
        // The pins are root's alone.
        let root = &s.agent(1).bpffs_path;
        let mut dirs = vec![root.clone()];
        dirs.extend(
            std::fs::read_dir(root)
                .expect("pin directory")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir()),
        );
        assert!(dirs.len() >= 3, "maps and links directories: {dirs:?}");
        for d in dirs {
            let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}: mode {mode:o}", d.display());
        }
    }

    // Changes keep being programmed.
    s.apply(&slice(&s, &[(2, 1)]));
    until_backends(&s, &["pod-2-1"]);

    // Restarted without a clean shutdown, still with the same set: it
    // adopts (eBPF: its pinned maps and links; fallback modes: its rules).
    s.agent_mut(1).kill_and_restart().expect("restart");
    let pid = s.agent(1).pid().expect("agent running");
    assert_eq!(effective_capabilities(pid).expect("caps"), want);
    s.apply(&slice(&s, &[(1, 2), (2, 1)]));
    until_backends(&s, &["pod-1-2", "pod-2-1"]);
    let c = s.client(1, 1);
    s.assert_path(&c, &Request::tcp(SocketAddr::from((VIP, 80))).count(5));
    s
}

/// The harness really withholds what the set lacks: without NET_ADMIN the
/// agent cannot attach (eBPF) or write rules (iptables), and says so.
#[test]
fn an_agent_without_net_admin_fails_with_a_clear_error() {
    let mut caps = agent_capabilities().expect("deploy/'s capability set");
    assert!(caps.remove("NET_ADMIN"), "the manifest grants NET_ADMIN");
    for mode in [DataplaneMode::EbpfSocketLb, DataplaneMode::Iptables] {
        let r = Scenario::builder("privilege-denied", mode)
            .object(&web())
            .capabilities(caps.clone())
            .build();
        let Err(e) = r else {
            panic!("{mode:?}: the agent started without NET_ADMIN");
        };
        let msg = format!("{e:#}");
        assert!(
            msg.contains("agent exited") && msg.to_lowercase().contains("permi"),
            "{mode:?}: {msg}"
        );
    }
}

mod manifest_capabilities {
    use super::{DataplaneMode, with_manifest_capabilities};

    #[test]
    fn ebpf_socket_lb() {
        with_manifest_capabilities(DataplaneMode::EbpfSocketLb).assert_datapath()
    }

    #[test]
    fn ebpf_tc() {
        with_manifest_capabilities(DataplaneMode::EbpfTc).assert_datapath()
    }

    #[test]
    fn iptables() {
        with_manifest_capabilities(DataplaneMode::Iptables).assert_datapath()
    }

    #[test]
    fn nftables() {
        with_manifest_capabilities(DataplaneMode::Nftables).assert_datapath()
    }
}
