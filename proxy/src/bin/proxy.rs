//! `proxy`: the node agent.

use std::{io::IsTerminal, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy::{
    agent,
    cli::{Args, Mode},
    dataplane::{
        Dataplane, cleanup,
        ebpf::{EbpfConfig, EbpfDataplane, cgroup2_mount, interface_with_address},
        iptables::IptablesDataplane,
        ipvs::IpvsDataplane,
        nftables::NftablesDataplane,
    },
    k8s,
    model::NodeContext,
};
use tokio::sync::Notify;
use tracing::{info, warn};

fn node_name(args: &Args) -> Result<String> {
    if let Some(n) = &args.hostname_override {
        return Ok(n.clone());
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname; pass --hostname-override")?;
    let h = h.trim().to_lowercase();
    if h.is_empty() {
        bail!("empty hostname; pass --hostname-override");
    }
    Ok(h)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log_level)?)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let node = NodeContext {
        node_name: node_name(&args)?,
        nodeport_cidrs: proxy::model::parse_cidrs(&args.nodeport_addresses)
            .map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}"))?,
        source_ranges_all: args.source_ranges_all,
        ..Default::default()
    };
    info!(node = %node.node_name, mode = ?args.mode, "starting");

    if args.cleanup {
        let failures = cleanup::all_but(None, &args.bpffs_path);
        if failures > 0 {
            bail!("cleanup: {failures} mode(s) could not be cleaned up (see the log)");
        }
        info!("cleanup done");
        return Ok(());
    }
    if let Mode::Ipvs = args.mode {
        // Before touching any state: a kernel without IP_VS ends here.
        proxy::dataplane::ipvs::probe()?;
        if !proxy::dataplane::ipvs::valid_scheduler(&args.ipvs_scheduler) {
            bail!(
                "--ipvs-scheduler {}: not one of {}",
                args.ipvs_scheduler,
                proxy::dataplane::ipvs::SCHEDULERS.join(", ")
            );
        }
    }
    // Switching modes: what another mode left goes first.
    let keep = match args.mode {
        Mode::Ebpf => cleanup::StateOf::Ebpf,
        Mode::Iptables => cleanup::StateOf::Iptables,
        Mode::Ipvs => cleanup::StateOf::Ipvs,
        Mode::Nftables => cleanup::StateOf::Nftables,
    };
    cleanup::all_but(Some(keep), &args.bpffs_path);
    match args.mode {
        Mode::Ebpf => {}
        Mode::Iptables => {
            let dp = IptablesDataplane::new(rule_options(&args))
                .context("setting up the iptables dataplane")?;
            return run_fallback(dp, &args, node).await;
        }
        Mode::Nftables => {
            let dp = NftablesDataplane::new(rule_options(&args))
                .context("setting up the nftables dataplane")?;
            return run_fallback(dp, &args, node).await;
        }
        Mode::Ipvs => {
            let dp = IpvsDataplane::new(&args.ipvs_scheduler)
                .context("setting up the ipvs dataplane")?;
            return run_fallback(dp, &args, node).await;
        }
    }
    let mut cfg = EbpfConfig::new(args.bpffs_path.clone());
    cfg.pod_devices = args.pod_devices.clone();
    if args.maglev_table_size != 0 && !proxy::maglev::is_prime(args.maglev_table_size) {
        bail!(
            "--maglev-table-size {} is not a prime number (default {})",
            args.maglev_table_size,
            proxy::maglev::DEFAULT_TABLE_SIZE
        );
    }
    cfg.maglev_table_size = args.maglev_table_size;
    cfg.dsr = args.dsr;
    if args.socket_lb {
        cfg.socket_lb_cgroup = Some(match &args.cgroup_path {
            Some(p) => p.clone(),
            None => cgroup2_mount().context("finding the cgroup2 mount for socket LB")?,
        });
    }
    let mut dp = EbpfDataplane::load(cfg).context("setting up the eBPF dataplane")?;
    proxy::dataplane::Dataplane::housekeeping(&mut dp)?;

    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let changed = Arc::new(Notify::new());
    let stores = k8s::start(client, &node.node_name, changed.clone());
    stores.ready().await?;
    info!("caches synced");

    // North-south: the node's first address is where remote-backend flows
    // are SNATed to; XDP goes on the interface that holds it.
    let node_addr = stores
        .nodes
        .state()
        .first()
        .and_then(|n| proxy::model::node_addresses(n).0.first().copied());
    let mut devices = args.devices.clone();
    if devices.is_empty()
        && let Some(ip) = node_addr
    {
        match interface_with_address(ip) {
            Ok(Some(dev)) => devices.push(dev),
            Ok(None) => warn!(%ip, "no interface holds the node address; no XDP"),
            Err(e) => warn!(error = %e, "listing addresses; no XDP"),
        }
    }
    dp.set_north_south(&devices, node_addr)
        .context("setting up north-south XDP")?;

    agent::run(dp, stores, changed, node, shutdown()).await;
    info!("stopped");
    Ok(())
}

/// Pod interfaces for the fallback modes' local-traffic detection.
fn rule_options(args: &Args) -> proxy::dataplane::fallback::RuleOptions {
    proxy::dataplane::fallback::RuleOptions::from_pod_device_globs(&args.pod_devices)
}

/// SIGINT or SIGTERM.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// The iptables / nftables modes: same watch, same agent loop.
async fn run_fallback<D: Dataplane>(dp: D, args: &Args, node: NodeContext) -> Result<()> {
    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let changed = Arc::new(Notify::new());
    let stores = k8s::start(client, &node.node_name, changed.clone());
    stores.ready().await?;
    info!(mode = dp.mode(), "caches synced");
    agent::run(dp, stores, changed, node, shutdown()).await;
    info!("stopped");
    Ok(())
}
