//! The agent's command line (kept in the library so that manifests and
//! tests can check arguments against the same parser the agent uses).

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
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

/// Service proxy node agent: watches Services, EndpointSlices and its Node and
/// programs the data path so service traffic reaches ready pods.
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
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
    /// External interfaces for north-south XDP (NodePort, ExternalIP,
    /// LoadBalancer from outside), repeatable; default: the interface
    /// holding the node's InternalIP.
    #[arg(long = "devices", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Networks whose node addresses serve NodePorts (comma-separated
    /// CIDRs, as kube-proxy's --nodeport-addresses); default: all of the
    /// node's addresses.
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
    /// IPVS scheduler for `--mode ipvs` (rr, wrr, lc, wlc, sh, mh, ...).
    #[arg(long, default_value = "rr")]
    pub ipvs_scheduler: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let a = Args::try_parse_from(["proxy"]).expect("no arguments parse");
        assert!(a.socket_lb);
        assert_eq!(a.maglev_table_size, crate::maglev::DEFAULT_TABLE_SIZE);
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
