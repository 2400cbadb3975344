//! `proxy`: the node agent.

use std::{io::IsTerminal, sync::Arc};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use proxy::{
    agent::{self, RunOptions},
    cli::{Args, LogFormat, Mode, XdpMode},
    dataplane::{
        Dataplane, cleanup,
        ebpf::{
            EbpfConfig, EbpfDataplane, Loader, SockTerminate,
            capacity::{ClusterSize, ClusterSizer},
            cgroup2_mount, interface_with_address,
        },
        iptables::IptablesDataplane,
        ipvs::IpvsDataplane,
        links::XdpAttach,
        nftables::NftablesDataplane,
    },
    events::EventRecorder,
    k8s,
    metrics::Telemetry,
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

fn init_logging(args: &Args) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?}", args.log_level))?;
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Text => b.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => b.json().with_current_span(false).init(),
    }
    Ok(())
}

/// The cluster's size as the dataplane will see it (the first table),
/// for `auto` map capacities: counted one service at a time, never the
/// whole table at once.
fn cluster_size(stores: &k8s::Stores, node: &NodeContext, maglev_size: u32) -> ClusterSize {
    let cache = match stores.cache.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    let mut node = node.clone();
    if node.nodeport.uses_host_addresses()
        && let Ok(all) = proxy::host::interface_addresses()
    {
        node.host_addresses = node.nodeport.host_addresses_used(&all);
    }
    if let Some(n) = cache.node() {
        node.addresses = proxy::model::node_addresses(&n).0;
        node.zone = proxy::model::node_zone(&n);
    }
    let mut sizer = ClusterSizer::new(maglev_size);
    let mut errors = Vec::new();
    cache.for_each_input(|svc, slices| {
        let slices: Vec<&proxy::model::SliceInfo> = slices.iter().map(|s| s.as_ref()).collect();
        for sp in proxy::model::build_service(svc, &slices, &node, &mut errors) {
            for (k, f) in proxy::lb::port_frontends(&sp, &node) {
                sizer.add(k, &f);
            }
        }
        errors.clear();
    });
    sizer.finish()
}

/// The eBPF dataplane as the flags configure it; `auto` capacities from
/// `cluster`.
fn ebpf_dataplane(
    args: &Args,
    cluster_cidrs: &[(std::net::IpAddr, u8)],
    cluster: &ClusterSize,
    loader: Loader,
) -> Result<EbpfDataplane> {
    let mut cfg = EbpfConfig::new(args.bpffs_path.clone());
    cfg.pod_devices = args.pod_devices.clone();
    // The fast exit is the per-packet path's, which is IPv4 only: IPv6
    // pod networks have nothing to skip.
    let v4: Vec<(std::net::Ipv4Addr, u8)> = cluster_cidrs
        .iter()
        .filter_map(|(a, len)| match a {
            std::net::IpAddr::V4(a) => Some((*a, *len)),
            std::net::IpAddr::V6(_) => None,
        })
        .collect();
    if v4.len() > proxy_common::POD_NETS {
        bail!(
            "--cluster-cidr: {} IPv4 networks, the eBPF mode takes at most {}",
            v4.len(),
            proxy_common::POD_NETS
        );
    }
    cfg.pod_networks = v4;
    if args.maglev_table_size != 0 && !proxy::maglev::is_prime(args.maglev_table_size) {
        bail!(
            "--maglev-table-size {} is not a prime number (default {})",
            args.maglev_table_size,
            proxy::maglev::DEFAULT_TABLE_SIZE
        );
    }
    cfg.maglev_table_size = args.maglev_table_size;
    if args.maglev_max_table_size == 0 || args.maglev_max_table_size > proxy::maglev::MAX_TABLE_SIZE
    {
        bail!(
            "--maglev-max-table-size {}: must be between 1 and {}",
            args.maglev_max_table_size,
            proxy::maglev::MAX_TABLE_SIZE
        );
    }
    cfg.map_max_entries = args.map_sizing().capacities(Some(cluster));
    info!(
        frontends = cluster.frontends,
        backends = cluster.backends,
        pairs = cluster.pairs,
        conntrack = cluster.conntrack,
        capacities = ?cfg.map_max_entries,
        "map capacities"
    );
    cfg.dsr = args.dsr;
    cfg.xdp_mode = match args.xdp_mode {
        XdpMode::Native => XdpAttach::Native,
        XdpMode::Generic => XdpAttach::Generic,
        XdpMode::Auto => XdpAttach::Auto,
        XdpMode::None => XdpAttach::None,
    };
    if args.socket_lb {
        cfg.socket_lb_cgroup = Some(match &args.cgroup_path {
            Some(p) => p.clone(),
            None => cgroup2_mount().context("finding the cgroup2 mount for socket LB")?,
        });
    }
    cfg.sock_terminate = SockTerminate {
        udp: args.bpf_lb_sock_terminate,
        tcp: args.bpf_lb_sock_terminate_tcp,
        netns_dir: Some(args.netns_dir.clone()),
    };
    let mut dp = EbpfDataplane::load_with(cfg, loader).context("setting up the eBPF dataplane")?;
    proxy::dataplane::Dataplane::housekeeping(&mut dp)?;
    Ok(dp)
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

fn main() {
    proxy::memory::tune_allocator();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run()));
    if let Err(e) = result {
        // One line, with the causes; also after logging is set up.
        eprintln!("proxy: {e:#}");
        tracing::error!("{e:#}");
        std::process::exit(1);
    }
}

async fn run() -> Result<()> {
    let matches = Args::command().get_matches();
    let (args, config_warnings) = proxy::config::resolve(&matches)?;
    init_logging(&args)?;
    for w in config_warnings {
        warn!(config = ?args.config, "{w}");
    }
    let healthz = proxy::http::parse_bind_address(&args.healthz_bind_address, 10256)
        .map_err(|e| anyhow::anyhow!("--healthz-bind-address: {e}"))?;
    let metrics = proxy::http::parse_bind_address(&args.metrics_bind_address, 10249)
        .map_err(|e| anyhow::anyhow!("--metrics-bind-address: {e}"))?;
    let cluster_cidrs = proxy::model::parse_cidrs(&args.cluster_cidr)
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    let node = NodeContext {
        node_name: node_name(&args)?,
        nodeport: args.nodeport().map_err(anyhow::Error::msg)?,
        source_ranges_all: args.source_ranges_all,
        ..Default::default()
    };
    info!(node = %node.node_name, mode = args.mode.name(), cluster_cidrs = ?cluster_cidrs, nodeport_addresses = %node.nodeport, "starting");

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

    // Health and metrics come up first: /healthz answers 503 until the
    // first sync, /livez 200 (the process is alive).
    let telemetry = Arc::new(Telemetry::new(args.mode.name(), args.sync_period));
    let _servers = proxy::http::start(telemetry.clone(), healthz, metrics);

    match args.mode {
        Mode::Ebpf => {
            // The loader before the cluster is listed (its transient
            // memory must not add to the cache's: see `Loader`).
            let loader = Loader::new();
            // The cluster first, then the maps sized for it (programs an
            // earlier agent attached keep serving meanwhile).
            let client = k8s::client(args.kubeconfig.as_deref()).await?;
            let changed = Arc::new(Notify::new());
            let stores = k8s::start(client.clone(), &node.node_name, changed.clone());
            stores.ready().await;
            proxy::memory::log("caches listed");
            let mut size = cluster_size(&stores, &node, args.maglev_table_size);
            // Conntrack follows the flows: what an earlier agent's map
            // holds now (`auto` grows a map under pressure).
            match proxy::dataplane::conntrack::pinned_live(
                &args.bpffs_path,
                &proxy::dataplane::conntrack::Timeouts::default(),
            ) {
                Ok(n) => size.conntrack = n.unwrap_or(0),
                Err(e) => warn!(error = %e, "counting the pinned conntrack entries"),
            }
            proxy::memory::log("cluster sized");
            let mut dp = ebpf_dataplane(&args, &cluster_cidrs, &size, loader)?;
            proxy::memory::log("maps loaded");
            // Logged once the maps are loaded too (the pinned state
            // adopted): the point from which the agent programs.
            info!("caches synced");

            // North-south: the node's first address is where remote-backend
            // flows are SNATed to (the agent rewrites it when the Node
            // changes); XDP goes on the interface that holds it now.
            let node_addr = stores.node().and_then(|n| {
                agent::node_address(&NodeContext {
                    addresses: proxy::model::node_addresses(&n).0,
                    ..Default::default()
                })
            });
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

            let opts = run_options(&args, client, &node, &telemetry);
            agent::run(dp, stores, changed, node, opts, shutdown_signal()).await;
        }
        Mode::Iptables => {
            let dp = IptablesDataplane::new(rule_options(&args))
                .context("setting up the iptables dataplane")?;
            run_fallback(dp, &args, node, &telemetry).await?;
        }
        Mode::Nftables => {
            let dp = NftablesDataplane::new(rule_options(&args))
                .context("setting up the nftables dataplane")?;
            run_fallback(dp, &args, node, &telemetry).await?;
        }
        Mode::Ipvs => {
            let dp = IpvsDataplane::new(&args.ipvs_scheduler, rule_options(&args))
                .context("setting up the ipvs dataplane")?;
            run_fallback(dp, &args, node, &telemetry).await?;
        }
    }
    info!("stopped");
    Ok(())
}

/// What the sync loop needs besides the dataplane, whatever the mode.
fn run_options(
    args: &Args,
    client: kube::Client,
    node: &NodeContext,
    telemetry: &Arc<Telemetry>,
) -> RunOptions {
    RunOptions {
        sync_period: args.sync_period,
        full_sync_period: proxy::agent::FULL_SYNC_PERIOD.max(args.sync_period),
        telemetry: telemetry.clone(),
        events: Some(EventRecorder::new(
            client,
            node.node_name.clone(),
            telemetry.clone(),
        )),
        limits: agent::Limits {
            maglev_max_table_size: args.maglev_max_table_size,
        },
    }
}

/// Pod interfaces for the fallback modes' local-traffic detection.
fn rule_options(args: &Args) -> proxy::dataplane::fallback::RuleOptions {
    proxy::dataplane::fallback::RuleOptions::from_pod_device_globs(&args.pod_devices)
}

/// The iptables / nftables / ipvs modes: same watch, same agent loop.
async fn run_fallback<D: Dataplane>(
    dp: D,
    args: &Args,
    node: NodeContext,
    telemetry: &Arc<Telemetry>,
) -> Result<()> {
    let client = k8s::client(args.kubeconfig.as_deref()).await?;
    let changed = Arc::new(Notify::new());
    let stores = k8s::start(client.clone(), &node.node_name, changed.clone());
    stores.ready().await;
    info!(mode = dp.mode(), "caches synced");
    let opts = run_options(args, client, &node, telemetry);
    agent::run(dp, stores, changed, node, opts, shutdown_signal()).await;
    Ok(())
}
