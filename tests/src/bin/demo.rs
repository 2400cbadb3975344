//! `cargo xtask demo`: a two-node cluster of network namespaces, the API
//! server fixture loaded with `tests/fixtures/demo.yaml`, the agent on each
//! node, requests from a pod to a dual-stack service's ClusterIPs (TCP and
//! UDP to the IPv4 one, TCP to the IPv6 one, both through socket LB), and
//! `proxyctl dump-maps`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cgroup::Cgroup,
    cluster::{Cluster, ClusterSpec, TcpServer, UdpServer},
    scenario::{PodClient, Request},
};

/// Run the demo.
#[derive(Parser)]
struct Args {
    /// Objects to load into the API server fixture.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/demo.yaml"))]
    objects: std::path::PathBuf,
    /// Requests to send per protocol.
    #[arg(long, default_value_t = 20)]
    requests: usize,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);

fn main() -> Result<()> {
    let args = Args::parse();
    let yaml = std::fs::read_to_string(&args.objects)
        .with_context(|| format!("reading {}", args.objects.display()))?;

    println!("==> building a 2-node cluster of network namespaces");
    let cluster = Cluster::new(ClusterSpec::default())?;
    for n in cluster.nodes() {
        let pods: Vec<String> = n
            .pods
            .iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect();
        println!("    {} {} pods: {}", n.name, n.underlay_ip, pods.join(", "));
    }
    let b1 = cluster.pod(1, 2);
    let b2 = cluster.pod(2, 1);
    let _servers = [
        TcpServer::start(&b1.ns, &b1.name, SocketAddr::from((b1.ip, 8080)))?,
        TcpServer::start(&b2.ns, &b2.name, SocketAddr::from((b2.ip, 8080)))?,
        TcpServer::start(&b1.ns, &b1.name, SocketAddr::from((b1.ip6, 8080)))?,
        TcpServer::start(&b2.ns, &b2.name, SocketAddr::from((b2.ip6, 8080)))?,
    ];
    let _udp = [
        UdpServer::start(&b1.ns, &b1.name, SocketAddr::from((b1.ip, 5353)))?,
        UdpServer::start(&b2.ns, &b2.name, SocketAddr::from((b2.ip, 5353)))?,
    ];

    println!("==> API server fixture with {}", args.objects.display());
    let api = ApiServer::start()?;
    let objs = api.apply_yaml(&yaml)?;
    println!("    {} objects loaded", objs.len());

    println!(
        "==> starting the agent (--mode ebpf, socket LB on each node's pod cgroup) on both nodes"
    );
    let cgroups = [Cgroup::new("demo-node1")?, Cgroup::new("demo-node2")?];
    let agent_options = |cg: &Cgroup| AgentOptions {
        args: vec![
            "--socket-lb".into(),
            "true".into(),
            "--cgroup-path".into(),
            cg.path().display().to_string(),
        ],
        ..Default::default()
    };
    let agents = [
        Agent::start(cluster.node(1), &api, agent_options(&cgroups[0]))?,
        Agent::start(cluster.node(2), &api, agent_options(&cgroups[1]))?,
    ];

    // The client runs in pod-1-1's namespace and node1's pod cgroup, where
    // socket LB picks a backend at connect()/sendmsg().
    let pod = cluster.pod(1, 1);
    let client = PodClient::new(pod, &cgroups[0]);
    let tcp = SocketAddr::from((VIP, 80));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .run(&Request::tcp(tcp))
        .is_ok_and(|r| r.iter().all(|r| r.ok))
    {
        if Instant::now() > deadline {
            bail!("{tcp} never answered; agent log:\n{}", agents[0].log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let requests = [
        Request::tcp(tcp),
        Request::udp(SocketAddr::from((VIP, 53))),
        Request::tcp(SocketAddr::from((VIP6, 80))),
    ];
    for req in requests {
        let req = req.count(args.requests);
        let from: IpAddr = if req.to.is_ipv6() {
            pod.ip6.into()
        } else {
            pod.ip.into()
        };
        println!(
            "==> {} {} requests from {} ({from}) to ClusterIP {}",
            args.requests,
            req.proto.k8s(),
            pod.name,
            req.to
        );
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, r) in client.run(&req)?.iter().enumerate() {
            let (Some(name), Some(peer)) = (r.backend(), r.seen_client()) else {
                bail!("{} request {i} to {} failed: {r}", req.proto.k8s(), req.to);
            };
            *seen
                .entry(format!("{name} (saw client {})", peer.ip().to_canonical()))
                .or_default() += 1;
        }
        for (backend, n) in seen {
            println!("    {n:>3} answered by {backend}");
        }
    }

    println!("==> proxyctl dump-maps (node1)");
    print!("{}", agents[0].proxyctl(&["dump-maps"])?);
    println!("==> done; cleaning up");
    Ok(())
}
