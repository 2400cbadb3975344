//! The agent's command line (kept in the library so that manifests and
//! tests can check arguments against the same parser the agent uses).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

use crate::dataplane::ebpf::capacity::{Knob, MapSizing, Sizing, parse_sizing};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// eBPF programs and pinned maps.
    Ebpf,
    /// kube-proxy's iptables rules (iptables-restore).
    Iptables,
    /// kube-proxy's nftables mode (one table of ours, nft -f).
    Nftables,
    /// IPVS virtual servers over generic netlink (needs the kernel's IP_VS).
    Ipvs,
}

impl Mode {
    /// The name `/proxyMode` answers.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
            Mode::Ipvs => "ipvs",
        }
    }
}

/// How XDP attaches to the external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
    /// In the driver; fail if the driver cannot.
    Native,
    /// Generic (skb) mode, after the stack allocated the skb.
    Generic,
    /// Native, falling back to generic with a warning.
    Auto,
    /// No XDP: the external interfaces' tc programs do the whole
    /// north-south job (as Cilium without XDP acceleration). On veth-based
    /// nodes (kind) this keeps TSO on the veth peer, which any XDP program
    /// turns off.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Service proxy node agent: watches Services, EndpointSlices and its Node and
/// programs the data path so service traffic reaches ready pods.
///
/// Flags named as kube-proxy's mean the same thing. Command-line flags
/// (and their environment variables) override the --config file.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Args {
    /// KubeProxyConfiguration YAML (apiVersion
    /// kubeproxy.config.k8s.io/v1alpha1): mode, clusterCIDR,
    /// hostnameOverride, metricsBindAddress, healthzBindAddress,
    /// nodePortAddresses, syncPeriod, clientConnection.kubeconfig, and this
    /// agent's own settings under `kubeProxyEbpf` (see docs/operations.md).
    /// Flags given on the command line win over the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Which dataplane programs the services.
    #[arg(long, value_enum, default_value = "ebpf")]
    pub mode: Mode,
    /// Remove what every mode left in the kernel (eBPF pins under
    /// --bpffs-path, our iptables chains, our nftables table) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Path to a kubeconfig; in-cluster configuration when omitted.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (as in the Node object); defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub hostname_override: Option<String>,
    /// bpffs directory the maps are pinned under (one per agent).
    #[arg(long, default_value = "/sys/fs/bpf/kube-proxy-ebpf")]
    pub bpffs_path: PathBuf,
    /// Glob of pod-facing host interfaces the per-packet programs attach to
    /// (repeatable; kindnet names them veth*).
    #[arg(long = "pod-device", default_values = ["veth*"])]
    pub pod_devices: Vec<String>,
    /// Translate service addresses at connect()/sendmsg() time with cgroup
    /// socket hooks (as Cilium's socket LB) for processes in --cgroup-path.
    /// The per-packet tc path stays on for everything else.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub socket_lb: bool,
    /// cgroup v2 directory the socket hooks attach to; default: the cgroup2
    /// mount point found in /proc/mounts (all processes of the node).
    #[arg(long)]
    pub cgroup_path: Option<PathBuf>,
    /// With socket LB: when a backend leaves a service (or the service
    /// goes), destroy the connected UDP sockets socket LB had pointed at it
    /// (in the agent's netns and every netns under --netns-dir), so the
    /// client gets ECONNABORTED and reconnects to a live backend (Cilium's
    /// socket termination). Needs kernel 6.5 or later (bpf_sock_destroy);
    /// without it, a warning and nothing else.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub bpf_lb_sock_terminate: bool,
    /// The same for TCP connections (off by default: a TCP client sees its
    /// connection reset where it might have finished against a terminating
    /// backend).
    #[arg(long)]
    pub bpf_lb_sock_terminate_tcp: bool,
    /// Directory of network-namespace files (as `ip netns add`, CNI
    /// plugins and containerd bind-mount them) whose sockets
    /// --bpf-lb-sock-terminate walks besides the agent's own netns.
    #[arg(long, default_value = "/run/netns")]
    pub netns_dir: PathBuf,
    /// External interfaces for north-south XDP (NodePort, ExternalIP,
    /// LoadBalancer from outside), repeatable; default: the interface
    /// holding the node's InternalIP.
    #[arg(long = "devices", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Where NodePorts are served, as kube-proxy's --nodeport-addresses:
    /// `primary` (the node's primary IP of each family, from its Node
    /// object), or comma-separated IPv4/IPv6 CIDRs (every address of the
    /// host's interfaces inside them, followed at run time; loopback only
    /// if a CIDR covers it); not both. Default: every InternalIP and
    /// ExternalIP of the Node object.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Direct server return for NodePort/ExternalIP/LoadBalancer traffic to
    /// backends on other nodes: the backend answers the client directly
    /// (the frontend travels in an IPv4 option) instead of the flow being
    /// SNATed to this node. Every node must run with the same setting.
    #[arg(long)]
    pub dsr: bool,
    /// Apply loadBalancerSourceRanges to the service's NodePorts and
    /// ExternalIPs too (by default only to its LoadBalancer IPs).
    #[arg(long)]
    pub source_ranges_all: bool,
    /// Maglev table size (prime) for NodePort, ExternalIP and LoadBalancer
    /// frontends, so every node picks the same backend for a flow; 0 turns
    /// Maglev off (random selection).
    #[arg(long, default_value_t = crate::maglev::DEFAULT_TABLE_SIZE)]
    pub maglev_table_size: u32,
    /// Largest Maglev table size a Service may ask for with the
    /// `kube-proxy-ebpf.io/maglev-table-size` annotation; larger requests
    /// are reported (Event, log) and get --maglev-table-size.
    #[arg(long, default_value_t = crate::maglev::DEFAULT_MAX_ANNOTATED_SIZE)]
    pub maglev_max_table_size: u32,
    /// Capacity of the Maglev slot map (`MAGLEV_V4`, entries over all
    /// distinct tables: a table of size M takes M): a number, or `auto`
    /// (see --bpf-lb-map-max; default 4194304).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub maglev_map_max: Sizing,
    /// Capacity of the frontend maps (`SVC_V4`, `REVNAT_V4`, `SVC_STATS`):
    /// one entry per frontend (ClusterIP, NodePort per node address,
    /// ExternalIP, LoadBalancer IP, per port). A number, or `auto`: the
    /// cluster's count at start x 1.5, rounded up to a multiple of 4096,
    /// never below the default (65536). A pinned map smaller than this is
    /// grown at start (entries copied); a larger one is kept.
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_lb_map_max: Sizing,
    /// Capacity of the backend map (`BACKENDS_V4`): one entry per distinct
    /// endpoint address, port and protocol. A number or `auto` (default
    /// 262144).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_lb_backend_map_max: Sizing,
    /// Capacity of the slot maps (`SLOTS_V4`, `AFF_MATCH_V4`): one entry
    /// per (frontend, backend) pair, plus one frontend's backends while it
    /// is updated. A number or `auto` (default 262144).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_lb_slot_map_max: Sizing,
    /// Capacity of connection tracking (`CT_V4`, LRU: two entries per
    /// flow); socket-LB reverse entries (`SOCK_RNAT_V4`) get a quarter of
    /// it, at least 65536. A number, or `auto`: the default (262144), or
    /// 1.5x the live flows the pinned map holds at start when more (a
    /// conntrack under pressure grows at the next start).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_ct_map_max: Sizing,
    /// Capacity of the session-affinity map (`AFFINITY_V4`, LRU: one entry
    /// per client and frontend). A number or `auto` (the default, 65536).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_affinity_map_max: Sizing,
    /// Capacity of the source-range map (`SRC_RANGES_V4`: one entry per
    /// frontend and loadBalancerSourceRanges CIDR). A number or `auto`
    /// (default 16384).
    #[arg(long, default_value = "auto", value_parser = parse_sizing)]
    pub bpf_source_ranges_map_max: Sizing,
    /// The pod network(s), comma-separated CIDRs (kube-proxy's
    /// --cluster-cidr; at most 4 IPv4 ones in the eBPF mode). The eBPF mode
    /// never masquerades east-west traffic; it uses the IPv4 ones to let
    /// packets to pods leave the per-packet programs (IPv4 only) without a
    /// frontend lookup (off while a frontend lies inside them). Unset:
    /// every packet takes the lookup.
    #[arg(long, value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,
    /// Where /healthz and /livez are served (ip:port, or ip for port
    /// 10256; empty disables). /healthz answers 200 with lastUpdated and
    /// currentTime while syncs succeed, 503 before the first sync or when a
    /// change (or an unreachable API server) has been pending longer than
    /// twice --sync-period.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: String,
    /// Where /metrics (Prometheus) and /proxyMode are served (ip:port, or
    /// ip for port 10249; empty disables).
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: String,
    /// kube-proxy's syncPeriod (e.g. 30s, 1m, 500ms): the health
    /// staleness limit is twice this. Syncs are incremental; the whole
    /// state is rebuilt hourly, as kube-proxy's full sync (or every sync
    /// period, if that is longer), on a Node change and after a failure.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: std::time::Duration,
    /// XDP attach mode on the external interfaces: native (driver),
    /// generic (skb), auto (native, generic as a logged fallback), or none
    /// (tc only).
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpMode,
    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// IPVS scheduler for `--mode ipvs` (rr, wrr, lc, wlc, sh, mh, ...).
    #[arg(long, default_value = "rr")]
    pub ipvs_scheduler: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

impl Args {
    /// `--nodeport-addresses`, checked; the error names the flag and the
    /// value.
    pub fn nodeport(&self) -> Result<crate::model::NodePortAddresses, String> {
        crate::model::NodePortAddresses::parse(&self.nodeport_addresses)
            .map_err(|e| format!("--nodeport-addresses: {e}"))
    }

    /// The map capacity flags, by knob.
    pub fn map_sizing(&self) -> MapSizing {
        MapSizing(
            [
                (Knob::Frontends, self.bpf_lb_map_max),
                (Knob::Backends, self.bpf_lb_backend_map_max),
                (Knob::Slots, self.bpf_lb_slot_map_max),
                (Knob::Conntrack, self.bpf_ct_map_max),
                (Knob::Affinity, self.bpf_affinity_map_max),
                (Knob::SourceRanges, self.bpf_source_ranges_map_max),
                (Knob::Maglev, self.maglev_map_max),
            ]
            .into(),
        )
    }
}

/// A Go-style duration: a sequence of `<number><unit>` with units ns, us,
/// ms, s, m, h (e.g. `30s`, `1m30s`, `500ms`); a bare `0` is zero.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 30s, 1m, 500ms)");
    let t = s.trim();
    if t == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[u..];
    }
    std::time::Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodePortAddresses;

    #[test]
    fn nodeport_addresses_primary_cidrs_not_both() {
        let parse = |v: &[&str]| {
            let mut argv = vec!["proxy"];
            for x in v {
                argv.extend(["--nodeport-addresses", x]);
            }
            Args::try_parse_from(argv).expect("parses").nodeport()
        };
        assert_eq!(parse(&[]), Ok(NodePortAddresses::NodeObject));
        assert_eq!(parse(&["primary"]), Ok(NodePortAddresses::Primary));
        assert_eq!(
            parse(&["10.1.2.3/8,fd00:18::1/64"]),
            Ok(NodePortAddresses::Cidrs(vec![
                ("10.0.0.0".parse().expect("ip"), 8),
                ("fd00:18::".parse().expect("ip"), 64),
            ]))
        );
        // Repeated flags add up, as comma-separated values.
        assert_eq!(
            parse(&["127.0.0.0/8", "172.18.0.0/16"]).map(|n| n.to_string()),
            Ok("127.0.0.0/8,172.18.0.0/16".to_owned())
        );
        for mix in [&["primary,10.0.0.0/8"][..], &["10.0.0.0/8", "primary"]] {
            let e = parse(mix).expect_err("a mix");
            assert!(e.starts_with("--nodeport-addresses: "), "{e}");
            assert!(e.contains("can't use both \"primary\" and CIDRs"), "{e}");
        }
        for bad in ["Primary", "10.0.0.1", "10.0.0.0/33", "fd00::/129", "all"] {
            let e = parse(&[bad]).expect_err(bad);
            assert_eq!(
                e,
                format!(
                    "--nodeport-addresses: {bad:?} is neither \"primary\" nor an IPv4 or IPv6 CIDR"
                )
            );
        }
    }

    #[test]
    fn defaults_parse() {
        let a = Args::try_parse_from(["proxy"]).expect("no arguments parse");
        assert!(a.socket_lb);
        assert_eq!(a.maglev_table_size, crate::maglev::DEFAULT_TABLE_SIZE);
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn map_capacity_flags() {
        let a = Args::try_parse_from(["proxy"]).expect("no arguments parse");
        let s = a.map_sizing();
        for k in Knob::ALL {
            assert_eq!(s.get(k), Sizing::Auto, "{k:?}");
        }
        let a = Args::try_parse_from([
            "proxy",
            "--bpf-lb-map-max",
            "200000",
            "--bpf-lb-backend-map-max",
            "2000000",
            "--bpf-lb-slot-map-max",
            "auto",
            "--bpf-ct-map-max",
            "1048576",
            "--bpf-affinity-map-max",
            "1000",
            "--bpf-source-ranges-map-max",
            "100",
            "--maglev-map-max",
            "8000000",
        ])
        .expect("capacity flags parse");
        let s = a.map_sizing();
        assert_eq!(s.get(Knob::Frontends), Sizing::Fixed(200_000));
        assert_eq!(s.get(Knob::Backends), Sizing::Fixed(2_000_000));
        assert_eq!(s.get(Knob::Slots), Sizing::Auto);
        assert_eq!(s.get(Knob::Conntrack), Sizing::Fixed(1 << 20));
        assert_eq!(s.get(Knob::Affinity), Sizing::Fixed(1000));
        assert_eq!(s.get(Knob::SourceRanges), Sizing::Fixed(100));
        assert_eq!(s.get(Knob::Maglev), Sizing::Fixed(8_000_000));
        // Every knob's flag is a flag of the parser.
        for k in Knob::ALL {
            let argv = ["proxy", k.flag(), "5"];
            assert!(Args::try_parse_from(argv).is_ok(), "{}", k.flag());
        }
        for bad in ["0", "many", "1.5"] {
            let e = Args::try_parse_from(["proxy", "--bpf-lb-map-max", bad]).expect_err(bad);
            assert!(e.to_string().contains("--bpf-lb-map-max"), "{e}");
        }
    }

    #[test]
    fn unknown_flags_are_refused() {
        assert!(Args::try_parse_from(["proxy", "--no-such-flag"]).is_err());
    }

    #[test]
    fn fallback_modes_parse() {
        for m in ["iptables", "nftables", "ipvs", "ebpf"] {
            assert!(Args::try_parse_from(["proxy", "--mode", m]).is_ok(), "{m}");
        }
        let a = Args::try_parse_from(["proxy", "--cleanup"]).expect("--cleanup parses");
        assert!(a.cleanup);
    }
}
