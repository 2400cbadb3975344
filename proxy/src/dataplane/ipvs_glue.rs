//! The iptables and ipset glue of `--mode ipvs`, as kube-proxy's ipvs mode
//! has it: IPVS only load-balances, so masquerading, source ranges and the
//! reject of traffic to service addresses on ports that are not services
//! are netfilter's job. The rules are fixed (they do not change with the
//! services); what changes is the content of the ip sets they match, so a
//! sync is one `ipset restore` of added and deleted entries.
//!
//! The ip sets have kube-proxy's names, types and meaning:
//!
//! | set | type | entries |
//! |---|---|---|
//! | `KUBE-CLUSTER-IP` | hash:ip,port | ClusterIP frontends |
//! | `KUBE-EXTERNAL-IP`, `-LOCAL` | hash:ip,port | ExternalIP frontends (all; `externalTrafficPolicy: Local` ones) |
//! | `KUBE-LOAD-BALANCER`, `-LOCAL` | hash:ip,port | LoadBalancer ingress frontends (all; Local ones) |
//! | `KUBE-LOAD-BALANCER-FW` | hash:ip,port | frontends with `loadBalancerSourceRanges` |
//! | `KUBE-LOAD-BALANCER-SOURCE-CIDR` | hash:ip,port,net | (frontend, allowed client network) |
//! | `KUBE-NODE-PORT-TCP`/`UDP`/`SCTP`, `-LOCAL-` | bitmap:port | node ports (all; Local ones) |
//! | `KUBE-LOOP-BACK` | hash:ip,port,ip | (endpoint, endpoint): hairpin |
//! | `KUBE-IPVS-IPS` | hash:ip | the addresses on `kube-ipvs0` |
//!
//! The chains are kube-proxy's with a `KUBE-IPVS-` prefix where the
//! iptables mode uses the same name for something else (both modes' state
//! must be removable on its own when a node switches modes):
//!
//! * nat `KUBE-IPVS-SERVICES` (PREROUTING, OUTPUT): ClusterIP traffic that
//!   does not come from a local pod (`-i <pod prefix>+`) is marked for
//!   masquerade (kube-proxy's local detection by interface name; without
//!   prefixes all of it, as `--masquerade-all`); ExternalIP traffic unless
//!   `Local`; LoadBalancer traffic through `KUBE-IPVS-LOAD-BALANCER`; local
//!   destinations through `KUBE-IPVS-NODE-PORT` (node ports unless
//!   `Local`).
//! * nat `KUBE-IPVS-POSTROUTING` (POSTROUTING): masquerade hairpin traffic
//!   (`KUBE-LOOP-BACK`: a pod reaching itself through its service) and
//!   everything marked. IPVS forwards at LOCAL_IN, before nat's source
//!   binding, so POSTROUTING still sees the first packet of the connection;
//!   `net.ipv4.vs.conntrack=1` keeps the conntrack entry for the reply.
//! * filter `KUBE-IPVS-FILTER` (INPUT): drop clients outside the source
//!   ranges of a guarded frontend; reject new connections to an address on
//!   `kube-ipvs0` unless they are for a service port (otherwise every
//!   host-network listener, sshd say, answers on every ClusterIP).
//! * filter `KUBE-IPVS-FORWARD` (FORWARD): accept marked and established
//!   traffic, drop INVALID, so a node whose FORWARD policy is DROP still
//!   passes replies of IPVS connections.
//!
//! Not here (and why): kube-proxy's `KUBE-LOAD-BALANCER-SOURCE-IP` (the
//! node reaching its own guarded LB IP; needs the node addresses) and the
//! health-check node port accept (the health server is the agent's; no
//! firewall is assumed on INPUT).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
};

use super::fallback::{FallbackError, MASQ_MARK, RuleOptions, proto_lower, run};
use crate::{
    lb::{Frontend, FrontendKey, FrontendKind},
    model::Protocol,
};

/// Comment on our jumps from the built-in chains (distinct from the
/// iptables mode's, so each mode's cleanup finds only its own).
pub const JUMP_COMMENT: &str = "kube-proxy-rs-ipvs";

/// Our nat chains.
pub const NAT_CHAINS: [&str; 6] = [
    "KUBE-IPVS-SERVICES",
    "KUBE-IPVS-CLUSTER-IP",
    "KUBE-IPVS-LOAD-BALANCER",
    "KUBE-IPVS-NODE-PORT",
    "KUBE-IPVS-MARK-MASQ",
    "KUBE-IPVS-POSTROUTING",
];
/// Our filter chains.
pub const FILTER_CHAINS: [&str; 2] = ["KUBE-IPVS-FILTER", "KUBE-IPVS-FORWARD"];

/// The ip set types we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetType {
    HashIpPort,
    HashIpPortIp,
    HashIpPortNet,
    HashIp,
    BitmapPort,
}

impl SetType {
    /// The `create` arguments after the name.
    fn create_args(self) -> &'static str {
        // 1 Mi entries: 10k services x 10 endpoints fit KUBE-LOOP-BACK; the
        // hash grows on demand, so the bound costs nothing until used.
        match self {
            SetType::HashIpPort => "hash:ip,port family inet hashsize 1024 maxelem 1048576",
            SetType::HashIpPortIp => "hash:ip,port,ip family inet hashsize 1024 maxelem 1048576",
            SetType::HashIpPortNet => "hash:ip,port,net family inet hashsize 1024 maxelem 1048576",
            SetType::HashIp => "hash:ip family inet hashsize 1024 maxelem 1048576",
            SetType::BitmapPort => "bitmap:port range 0-65535",
        }
    }
}

/// Every set of ours, with its type.
pub const SETS: [(&str, SetType); 15] = [
    ("KUBE-CLUSTER-IP", SetType::HashIpPort),
    ("KUBE-EXTERNAL-IP", SetType::HashIpPort),
    ("KUBE-EXTERNAL-IP-LOCAL", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-LOCAL", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-FW", SetType::HashIpPort),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", SetType::HashIpPortNet),
    ("KUBE-NODE-PORT-TCP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-LOCAL-TCP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-UDP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-LOCAL-UDP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-SCTP", SetType::BitmapPort),
    ("KUBE-NODE-PORT-LOCAL-SCTP", SetType::BitmapPort),
    ("KUBE-LOOP-BACK", SetType::HashIpPortIp),
    ("KUBE-IPVS-IPS", SetType::HashIp),
];

/// Set name -> entries, in `ipset` syntax (`10.96.0.10,tcp:80`).
pub type IpSets = BTreeMap<&'static str, BTreeSet<String>>;

fn ip_port(k: &FrontendKey) -> String {
    format!("{},{}:{}", k.addr, proto_lower(k.proto), k.port)
}

fn node_port_sets(p: Protocol) -> (&'static str, &'static str) {
    match p {
        Protocol::Tcp => ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP"),
        Protocol::Udp => ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"),
        Protocol::Sctp => ("KUBE-NODE-PORT-SCTP", "KUBE-NODE-PORT-LOCAL-SCTP"),
    }
}

/// The content of every set for `frontends`, with `ipvs_addresses` the
/// addresses on `kube-ipvs0`. Every set is present, empty or not.
pub fn sets(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    ipvs_addresses: &BTreeSet<Ipv4Addr>,
) -> IpSets {
    let mut s: IpSets = SETS.iter().map(|(n, _)| (*n, BTreeSet::new())).collect();
    let mut add = |set: &'static str, entry: String| {
        if let Some(v) = s.get_mut(set) {
            v.insert(entry);
        }
    };
    for (k, f) in frontends
        .iter()
        .filter(|(k, _)| super::fallback::programs(k))
    {
        match f.kind {
            FrontendKind::ClusterIp => add("KUBE-CLUSTER-IP", ip_port(k)),
            FrontendKind::ExternalIp => {
                add("KUBE-EXTERNAL-IP", ip_port(k));
                if f.local_only {
                    add("KUBE-EXTERNAL-IP-LOCAL", ip_port(k));
                }
            }
            FrontendKind::LoadBalancer => {
                add("KUBE-LOAD-BALANCER", ip_port(k));
                if f.local_only {
                    add("KUBE-LOAD-BALANCER-LOCAL", ip_port(k));
                }
            }
            FrontendKind::NodePort => {
                let (all, local) = node_port_sets(k.proto);
                add(all, k.port.to_string());
                if f.local_only {
                    add(local, k.port.to_string());
                }
            }
        }
        if !f.source_ranges.is_empty() {
            add("KUBE-LOAD-BALANCER-FW", ip_port(k));
            for (net, len) in &f.source_ranges {
                add(
                    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                    format!("{},{net}/{len}", ip_port(k)),
                );
            }
        }
        for b in &f.backends {
            add(
                "KUBE-LOOP-BACK",
                format!("{},{}:{},{}", b.addr, proto_lower(k.proto), b.port, b.addr),
            );
        }
    }
    for a in ipvs_addresses {
        add("KUBE-IPVS-IPS", a.to_string());
    }
    s
}

/// `ipset restore` input from `old` (None: unknown, as at start: every set
/// is created if missing and flushed) to `new`: only the entries that
/// changed. Empty when nothing did.
pub fn render_sets(old: Option<&IpSets>, new: &IpSets) -> String {
    let mut out = String::new();
    let empty = BTreeSet::new();
    for (name, ty) in SETS {
        let want = new.get(name).unwrap_or(&empty);
        match old {
            None => {
                let _ = writeln!(out, "create {name} {}", ty.create_args());
                let _ = writeln!(out, "flush {name}");
                for e in want {
                    let _ = writeln!(out, "add {name} {e}");
                }
            }
            Some(old) => {
                let had = old.get(name).unwrap_or(&empty);
                for e in want.difference(had) {
                    let _ = writeln!(out, "add {name} {e}");
                }
                for e in had.difference(want) {
                    let _ = writeln!(out, "del {name} {e}");
                }
            }
        }
    }
    out
}

/// `ipset restore` input destroying `present` sets of ours (cleanup).
pub fn render_destroy(present: &[String]) -> String {
    SETS.iter()
        .filter(|(n, _)| present.iter().any(|p| p == n))
        .map(|(n, _)| format!("destroy {n}\n"))
        .collect()
}

/// `iptables-restore --noflush` input writing all our chains (declaring a
/// chain flushes it, so this replaces whatever an earlier run left).
pub fn rules(opts: &RuleOptions) -> String {
    let m = format!("0x{MASQ_MARK:x}");
    let set = |name: &str, dirs: &str| format!("-m set --match-set {name} {dirs}");
    let mut nat: Vec<String> = Vec::new();
    let mut a = |chain: &str, rule: String| nat.push(format!("-A {chain} {rule}"));

    // Services: ClusterIPs, ExternalIPs, LoadBalancer IPs, node ports.
    let svc = "KUBE-IPVS-SERVICES";
    a(
        svc,
        format!(
            "{} -j KUBE-IPVS-CLUSTER-IP",
            set("KUBE-CLUSTER-IP", "dst,dst")
        ),
    );
    a(
        svc,
        format!("{} -j RETURN", set("KUBE-CLUSTER-IP", "dst,dst")),
    );
    a(
        svc,
        format!("{} -j RETURN", set("KUBE-EXTERNAL-IP-LOCAL", "dst,dst")),
    );
    a(
        svc,
        format!(
            "{} -j KUBE-IPVS-MARK-MASQ",
            set("KUBE-EXTERNAL-IP", "dst,dst")
        ),
    );
    a(
        svc,
        format!("{} -j RETURN", set("KUBE-EXTERNAL-IP", "dst,dst")),
    );
    a(
        svc,
        format!(
            "{} -j KUBE-IPVS-LOAD-BALANCER",
            set("KUBE-LOAD-BALANCER", "dst,dst")
        ),
    );
    a(
        svc,
        format!("{} -j RETURN", set("KUBE-LOAD-BALANCER", "dst,dst")),
    );
    a(
        svc,
        "-m addrtype --dst-type LOCAL -j KUBE-IPVS-NODE-PORT".to_owned(),
    );

    // ClusterIP: local pods keep their address (the backend sees the
    // client pod), everyone else is masqueraded.
    for p in &opts.pod_interface_prefixes {
        a("KUBE-IPVS-CLUSTER-IP", format!("-i {p}+ -j RETURN"));
    }
    a("KUBE-IPVS-CLUSTER-IP", "-j KUBE-IPVS-MARK-MASQ".to_owned());

    a(
        "KUBE-IPVS-LOAD-BALANCER",
        format!("{} -j RETURN", set("KUBE-LOAD-BALANCER-LOCAL", "dst,dst")),
    );
    a(
        "KUBE-IPVS-LOAD-BALANCER",
        "-j KUBE-IPVS-MARK-MASQ".to_owned(),
    );

    for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let (all, local) = node_port_sets(p);
        let proto = proto_lower(p);
        a(
            "KUBE-IPVS-NODE-PORT",
            format!("-p {proto} {} -j RETURN", set(local, "dst")),
        );
        a(
            "KUBE-IPVS-NODE-PORT",
            format!("-p {proto} {} -j KUBE-IPVS-MARK-MASQ", set(all, "dst")),
        );
    }

    a("KUBE-IPVS-MARK-MASQ", format!("-j MARK --or-mark {m}"));

    let post = "KUBE-IPVS-POSTROUTING";
    a(
        post,
        format!("{} -j MASQUERADE", set("KUBE-LOOP-BACK", "dst,dst,src")),
    );
    a(post, format!("-m mark ! --mark {m}/{m} -j RETURN"));
    a(post, format!("-j MARK --xor-mark {m}"));
    a(post, "-j MASQUERADE".to_owned());

    let mut filter: Vec<String> = Vec::new();
    let mut f = |chain: &str, rule: String| filter.push(format!("-A {chain} {rule}"));
    let flt = "KUBE-IPVS-FILTER";
    f(
        flt,
        format!(
            "{} -m set ! --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j DROP",
            set("KUBE-LOAD-BALANCER-FW", "dst,dst")
        ),
    );
    for s in ["KUBE-CLUSTER-IP", "KUBE-EXTERNAL-IP", "KUBE-LOAD-BALANCER"] {
        f(flt, format!("{} -j RETURN", set(s, "dst,dst")));
    }
    f(
        flt,
        format!(
            "-m conntrack --ctstate NEW {} -j REJECT",
            set("KUBE-IPVS-IPS", "dst")
        ),
    );
    let fwd = "KUBE-IPVS-FORWARD";
    f(fwd, "-m conntrack --ctstate INVALID -j DROP".to_owned());
    f(fwd, format!("-m mark --mark {m}/{m} -j ACCEPT"));
    f(
        fwd,
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
    );

    let mut out = String::new();
    for (table, chains, body) in [
        ("nat", &NAT_CHAINS[..], &nat),
        ("filter", &FILTER_CHAINS[..], &filter),
    ] {
        let _ = writeln!(out, "*{table}");
        for c in chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for r in body {
            let _ = writeln!(out, "{r}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

/// Jumps from the built-in chains into ours: (table, chain, rule spec).
pub fn jumps() -> Vec<(&'static str, &'static str, String)> {
    let c = format!("-m comment --comment {JUMP_COMMENT}");
    vec![
        ("nat", "PREROUTING", format!("{c} -j KUBE-IPVS-SERVICES")),
        ("nat", "OUTPUT", format!("{c} -j KUBE-IPVS-SERVICES")),
        (
            "nat",
            "POSTROUTING",
            format!("{c} -j KUBE-IPVS-POSTROUTING"),
        ),
        ("filter", "INPUT", format!("{c} -j KUBE-IPVS-FILTER")),
        ("filter", "FORWARD", format!("{c} -j KUBE-IPVS-FORWARD")),
    ]
}

/// The sysctls kube-proxy's ipvs mode sets: forwarding; IPVS keeping
/// conntrack entries (needed for the masquerade); connections to a removed
/// real server expire instead of hanging, as do affinity templates of a
/// weight-0 one; addresses on `kube-ipvs0` are neither answered in ARP nor
/// announced.
pub const SYSCTLS: [(&str, &str); 6] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/vs/conntrack", "1"),
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    ("net/ipv4/vs/expire_quiescent_template", "1"),
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// Writes [`SYSCTLS`].
pub fn set_sysctls() -> Result<(), FallbackError> {
    for (key, value) in SYSCTLS {
        let path = format!("/proc/sys/{key}");
        std::fs::write(&path, value).map_err(|source| FallbackError::Spawn {
            cmd: format!("writing {value} to {path}"),
            source,
        })?;
    }
    Ok(())
}

/// The glue as it stands in the kernel: installs the chains and jumps, then
/// keeps the sets in step with the frontends.
#[derive(Debug, Default)]
pub struct Glue {
    opts: RuleOptions,
    /// The sets as last written; None: unknown (rewrite them whole).
    written: Option<IpSets>,
}

impl Glue {
    /// Creates the sets (empty), writes the chains and inserts the jumps.
    pub fn install(opts: RuleOptions) -> Result<Glue, FallbackError> {
        let mut g = Glue {
            opts,
            written: None,
        };
        // Rules reference the sets: sets first.
        g.sync(&BTreeMap::new(), &BTreeSet::new())?;
        g.write_rules()?;
        Ok(g)
    }

    fn write_rules(&self) -> Result<(), FallbackError> {
        run(
            "iptables-restore",
            &["-w", "5", "--noflush"],
            Some(&rules(&self.opts)),
        )?;
        super::iptables::ensure_jumps(&jumps())
    }

    /// Brings the sets to what `frontends` need. On failure the sets are
    /// unknown and the next call rewrites them whole.
    pub fn sync(
        &mut self,
        frontends: &BTreeMap<FrontendKey, Frontend>,
        ipvs_addresses: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), FallbackError> {
        let want = sets(frontends, ipvs_addresses);
        let input = render_sets(self.written.as_ref(), &want);
        if !input.is_empty()
            && let Err(e) = run("ipset", &["restore", "-exist"], Some(&input))
        {
            self.written = None;
            return Err(e);
        }
        self.written = Some(want);
        Ok(())
    }

    /// Puts back jumps someone flushed.
    pub fn housekeeping(&self) -> Result<(), FallbackError> {
        super::iptables::ensure_jumps(&jumps())
    }
}

/// Removes our jumps, chains and sets. Returns whether anything was found.
/// Without `ipset` on the node there can be no sets of ours.
pub fn cleanup() -> Result<bool, FallbackError> {
    let mut found = super::iptables::remove_jumps(JUMP_COMMENT)?;
    let mut flush = String::new();
    for (table, ours) in [("nat", &NAT_CHAINS[..]), ("filter", &FILTER_CHAINS[..])] {
        let save = run("iptables-save", &["-t", table], None)?;
        let present: Vec<&str> = save
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| ours.contains(c))
            .collect();
        if present.is_empty() {
            continue;
        }
        found = true;
        let _ = writeln!(flush, "*{table}");
        for c in &present {
            let _ = writeln!(flush, ":{c} - [0:0]");
        }
        for c in &present {
            let _ = writeln!(flush, "-X {c}");
        }
        let _ = writeln!(flush, "COMMIT");
    }
    if !flush.is_empty() {
        run("iptables-restore", &["-w", "5", "--noflush"], Some(&flush))?;
    }
    let names = match run("ipset", &["list", "-n"], None) {
        Ok(out) => out.lines().map(str::to_owned).collect::<Vec<_>>(),
        Err(FallbackError::Spawn { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    let destroy = render_destroy(&names);
    if !destroy.is_empty() {
        found = true;
        run("ipset", &["restore"], Some(&destroy))?;
    }
    if found {
        super::iptables::remove_empty_nft_builtins();
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendAddr;

    fn key(a: [u8; 4], port: u16, proto: Protocol) -> FrontendKey {
        FrontendKey {
            addr: Ipv4Addr::from(a).into(),
            port,
            proto,
        }
    }

    fn fe(kind: FrontendKind, backends: &[[u8; 4]]) -> Frontend {
        Frontend {
            kind,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: Ipv4Addr::from(*b).into(),
                    port: 8080,
                    terminating: false,
                    local: true,
                })
                .collect(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        }
    }

    #[test]
    fn sets_follow_kinds_policies_and_ranges() {
        let mut f = BTreeMap::new();
        f.insert(
            key([10, 96, 0, 10], 80, Protocol::Tcp),
            fe(FrontendKind::ClusterIp, &[[10, 244, 0, 2]]),
        );
        let mut np = fe(FrontendKind::NodePort, &[[10, 244, 0, 2]]);
        np.local_only = true;
        f.insert(key([192, 168, 0, 1], 30080, Protocol::Udp), np);
        let mut lb = fe(FrontendKind::LoadBalancer, &[]);
        lb.source_ranges = vec![(Ipv4Addr::new(192, 168, 100, 0).into(), 24)];
        f.insert(key([1, 2, 3, 4], 443, Protocol::Tcp), lb);
        let addrs = [Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(1, 2, 3, 4)].into();
        let s = sets(&f, &addrs);
        let get = |n: &str| s[n].iter().cloned().collect::<Vec<_>>();
        assert_eq!(get("KUBE-CLUSTER-IP"), ["10.96.0.10,tcp:80"]);
        assert_eq!(get("KUBE-NODE-PORT-UDP"), ["30080"]);
        assert_eq!(get("KUBE-NODE-PORT-LOCAL-UDP"), ["30080"]);
        assert!(get("KUBE-NODE-PORT-TCP").is_empty());
        assert_eq!(get("KUBE-LOAD-BALANCER"), ["1.2.3.4,tcp:443"]);
        assert!(get("KUBE-LOAD-BALANCER-LOCAL").is_empty());
        assert_eq!(get("KUBE-LOAD-BALANCER-FW"), ["1.2.3.4,tcp:443"]);
        assert_eq!(
            get("KUBE-LOAD-BALANCER-SOURCE-CIDR"),
            ["1.2.3.4,tcp:443,192.168.100.0/24"]
        );
        // The same endpoint behind two frontends is one hairpin entry per
        // protocol and port.
        assert_eq!(
            get("KUBE-LOOP-BACK"),
            [
                "10.244.0.2,tcp:8080,10.244.0.2",
                "10.244.0.2,udp:8080,10.244.0.2"
            ]
        );
        assert_eq!(get("KUBE-IPVS-IPS"), ["1.2.3.4", "10.96.0.10"]);
        assert_eq!(s.len(), SETS.len());
    }

    #[test]
    fn set_updates_are_differences_and_start_flushes() {
        let k = key([10, 96, 0, 10], 80, Protocol::Tcp);
        let mut f = BTreeMap::new();
        f.insert(
            k,
            fe(FrontendKind::ClusterIp, &[[10, 244, 0, 2], [10, 244, 0, 3]]),
        );
        let none = BTreeSet::new();
        let a = sets(&f, &none);
        let first = render_sets(None, &a);
        assert_eq!(
            first.lines().filter(|l| l.starts_with("create ")).count(),
            SETS.len()
        );
        assert_eq!(
            first.lines().filter(|l| l.starts_with("flush ")).count(),
            SETS.len()
        );
        assert!(first.contains("add KUBE-CLUSTER-IP 10.96.0.10,tcp:80\n"));
        assert_eq!(render_sets(Some(&a), &a), "");
        f.insert(k, fe(FrontendKind::ClusterIp, &[[10, 244, 0, 2]]));
        let b = sets(&f, &none);
        assert_eq!(
            render_sets(Some(&a), &b),
            "del KUBE-LOOP-BACK 10.244.0.3,tcp:8080,10.244.0.3\n"
        );
    }

    #[test]
    fn rules_reference_only_our_chains_and_sets() {
        let text = rules(&RuleOptions {
            pod_interface_prefixes: vec!["veth".into(), "cali".into()],
        });
        let names: BTreeSet<&str> = SETS.iter().map(|(n, _)| *n).collect();
        for l in text.lines().filter(|l| l.starts_with("-A ")) {
            let w: Vec<&str> = l.split_whitespace().collect();
            assert!(
                NAT_CHAINS.contains(&w[1]) || FILTER_CHAINS.contains(&w[1]),
                "{l}"
            );
            if let Some(i) = w.iter().position(|x| *x == "--match-set") {
                assert!(names.contains(w[i + 1]), "{l}");
            }
            if let Some(i) = w.iter().position(|x| *x == "-j") {
                let t = w[i + 1];
                assert!(
                    t.chars().all(|c| c.is_ascii_uppercase())
                        || NAT_CHAINS.contains(&t)
                        || FILTER_CHAINS.contains(&t),
                    "{l}"
                );
            }
        }
        assert!(text.contains("-A KUBE-IPVS-CLUSTER-IP -i veth+ -j RETURN\n"));
        assert!(text.contains("-A KUBE-IPVS-CLUSTER-IP -i cali+ -j RETURN\n"));
    }
}
