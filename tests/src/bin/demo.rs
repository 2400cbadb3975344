//! `cargo xtask demo`: a two-node cluster of network namespaces, the API
//! server fixture loaded with `tests/fixtures/demo.yaml`, the agent on each
//! node, requests from a pod to a ClusterIP, and `proxyctl dump-maps`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec, TcpServer, UdpServer, parse_reply, tcp_request, udp_request},
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
    ];
    let _udp = [
        UdpServer::start(&b1.ns, &b1.name, SocketAddr::from((b1.ip, 5353)))?,
        UdpServer::start(&b2.ns, &b2.name, SocketAddr::from((b2.ip, 5353)))?,
    ];

    println!("==> API server fixture with {}", args.objects.display());
    let api = ApiServer::start()?;
    let objs = api.apply_yaml(&yaml)?;
    println!("    {} objects loaded", objs.len());

    println!("==> starting the agent (--mode ebpf) on both nodes");
    let agents = [
        Agent::start(cluster.node(1), &api, AgentOptions::default())?,
        Agent::start(cluster.node(2), &api, AgentOptions::default())?,
    ];

    let client = cluster.pod(1, 1);
    let tcp = SocketAddr::from((VIP, 80));
    let udp = SocketAddr::from((VIP, 53));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_request(&client.ns, tcp, Duration::from_millis(300)).is_err() {
        if Instant::now() > deadline {
            bail!("{tcp} never answered; agent log:\n{}", agents[0].log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    for (proto, to) in [("TCP", tcp), ("UDP", udp)] {
        println!(
            "==> {} {proto} requests from {} ({}) to ClusterIP {to}",
            args.requests, client.name, client.ip
        );
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..args.requests {
            let line = if proto == "TCP" {
                tcp_request(&client.ns, to, Duration::from_millis(500))
            } else {
                udp_request(&client.ns, to, Duration::from_millis(500))
            }
            .with_context(|| format!("{proto} request to {to}"))?;
            let (name, peer) = parse_reply(&line).context("unexpected reply")?;
            *seen
                .entry(format!("{name} (saw client {})", peer.ip()))
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
