//! What the kube-proxy-style fallback dataplanes (iptables, nftables) share:
//! stable chain-name hashes, the running state they diff against, the
//! external commands they run, and the UDP conntrack flush kube-proxy does
//! for removed endpoints.
//!
//! Both families, as kube-proxy runs one proxier per family: the rule
//! generators are parameterised by [`Family`] and each mode writes one
//! set of rules per family (nftables: a table in family `ip` and one in
//! `ip6`; iptables: iptables and ip6tables), each frontend in its own
//! family's rules only. The IPVS mode is IPv4 only: it keeps IPv6
//! frontends in its programmed table (so the agent's diff is stable) but
//! programs none ([`programs`]), and says so in one log line whenever
//! their number changes ([`Ipv6Left`]).

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use tracing::{debug, info, warn};

pub mod incremental;

use super::ApplyStats;
use crate::{
    diff::Change,
    lb::{BackendAddr, Frontend, FrontendKey, LbTable},
    model::Protocol,
};

/// The packet mark bit that asks POSTROUTING to masquerade (kube-proxy's
/// default `--iptables-masquerade-bit` 14).
pub const MASQ_MARK: u32 = 0x4000;
/// The packet mark bit that asks the filter table to drop (source ranges).
pub const DROP_MARK: u32 = 0x8000;

/// What the rule generators need beyond the frontends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleOptions {
    /// Name prefixes of the pod-facing interfaces (kube-proxy's
    /// `--detect-local-mode=InterfaceNamePrefix`): traffic from local pods
    /// to external frontends is not masqueraded, so backends see the pod.
    pub pod_interface_prefixes: Vec<String>,
}

impl RuleOptions {
    /// From `--pod-device` globs: those of the form `prefix*` count.
    pub fn from_pod_device_globs(globs: &[String]) -> RuleOptions {
        RuleOptions {
            pod_interface_prefixes: globs
                .iter()
                .filter_map(|g| g.strip_suffix('*'))
                .filter(|p| !p.is_empty() && !p.contains(['*', '?', '[']))
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// Errors of the fallback dataplanes.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

/// An address family, as kube-proxy's per-family proxiers see it: what
/// differs between the IPv4 and the IPv6 rules of the iptables and
/// nftables modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    #[default]
    V4,
    V6,
}

impl Family {
    /// Both, in the order the modes write them.
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Whether frontend `k` belongs to this family's rules.
    pub fn has(self, k: &FrontendKey) -> bool {
        Family::of(k.addr) == self
    }

    /// `IPv4` / `IPv6` (logs).
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The nftables table family, which is also the keyword of its
    /// address matches (`ip daddr`, `ip6 daddr`).
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The nftables address type (`ipv4_addr`, `ipv6_addr`).
    pub fn nft_addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }

    /// The prefix length of one address (`/32`, `/128`).
    pub fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The unspecified address (`0.0.0.0`, `::`).
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// The iptables command of the family (`iptables`, `ip6tables`);
    /// `-save` and `-restore` are [`Family::iptables_save`] and
    /// [`Family::iptables_restore`].
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    pub fn iptables_save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    pub fn iptables_restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The source ranges of `ranges` in this family (kube-proxy's
    /// per-family proxier sees only those: a service whose ranges are
    /// all of the other family has no firewall in this one).
    pub fn ranges(self, ranges: &[(IpAddr, u8)]) -> Vec<(IpAddr, u8)> {
        ranges
            .iter()
            .filter(|(n, _)| Family::of(*n) == self)
            .copied()
            .collect()
    }
}

/// Whether the IPVS mode programs frontend `k`: IPv4 ones only (its IPv6
/// frontends are not programmed yet).
pub fn programs(k: &FrontendKey) -> bool {
    k.addr.is_ipv4()
}

/// The IPv6 frontends a mode leaves out (the IPVS mode): counted after
/// every sync, logged (info) when their number changed, not once per
/// frontend.
#[derive(Debug, Default)]
pub struct Ipv6Left {
    count: usize,
}

impl Ipv6Left {
    /// After a sync: `programmed` is the mode's table now. Returns the
    /// number of IPv6 frontends it leaves out.
    pub fn after_sync(
        &mut self,
        mode: &str,
        programmed: &BTreeMap<FrontendKey, Frontend>,
    ) -> usize {
        // Keys order by address and IPv4 sorts before IPv6: the IPv6
        // frontends are the tail of the table.
        let first = FrontendKey {
            addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            port: 0,
            proto: Protocol::Tcp,
        };
        let n = programmed.range(first..).count();
        if n != self.count {
            info!(
                mode,
                ipv6_frontends = n,
                "{n} IPv6 frontend(s) not programmed: the {mode} mode programs IPv4 only (the eBPF, iptables and nftables modes serve IPv6)"
            );
            self.count = n;
        }
        n
    }
}

/// Runs `program args...` with `stdin` fed in; returns stdout.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, FallbackError> {
    let cmd = format!("{program} {}", args.join(" "));
    debug!(%cmd, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FallbackError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    // A tool that fails early stops reading: its exit status and stderr
    // say why, not the broken pipe.
    let mut write_err = None;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        write_err = pipe.write_all(input.as_bytes()).err();
    }
    let out = child
        .wait_with_output()
        .map_err(|source| FallbackError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(FallbackError::Failed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    if let Some(source) = write_err {
        return Err(FallbackError::Spawn { cmd, source });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` with its stdin written by `input` as it goes
/// (a full sync's input is tens of megabytes: it is not held whole);
/// stdout and stderr are read meanwhile, so a chatty tool cannot block.
pub fn run_streamed(
    program: &str,
    args: &[&str],
    input: impl FnOnce(&mut dyn std::fmt::Write),
) -> Result<String, FallbackError> {
    use std::io::Read as _;
    let cmd = format!("{program} {}", args.join(" "));
    debug!(%cmd, "running");
    let spawn_err = |source| FallbackError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let reader = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    /// fmt::Write over a pipe, keeping the first I/O error.
    struct Pipe<W: std::io::Write>(W, Option<std::io::Error>);
    impl<W: std::io::Write> std::fmt::Write for Pipe<W> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.1.is_none()
                && let Err(e) = self.0.write_all(s.as_bytes())
            {
                self.1 = Some(e);
            }
            Ok(())
        }
    }
    let write_result = match child.stdin.take() {
        Some(stdin) => {
            let mut pipe = Pipe(std::io::BufWriter::with_capacity(1 << 16, stdin), None);
            input(&mut pipe);
            let flushed = pipe.0.flush();
            match pipe.1 {
                Some(e) => Err(e),
                None => flushed,
            }
        }
        None => Ok(()),
    };
    let status = child.wait().map_err(spawn_err)?;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        return Err(FallbackError::Failed {
            cmd,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        });
    }
    write_result.map_err(spawn_err)?;
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// A stable 16-character name suffix (base32 of a 80-bit FNV-1a based
/// hash), as kube-proxy derives its `KUBE-SVC-<hash>` names from a SHA-256.
/// Stable across agent restarts and releases: the golden files pin it.
pub fn hash16(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for b in input.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let (a, b) = (fnv(0), fnv(0x9e37_79b9_7f4a_7c15));
    // 64 bits of `a` and 16 of `b`: 16 base32 digits.
    let bits = (u128::from(a) << 16) | u128::from(b & 0xffff);
    (0..16)
        .map(|i| ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// The chain-name hash of a frontend.
pub fn frontend_hash(key: &FrontendKey) -> String {
    hash16(&key.to_string())
}

/// The chain-name hash of one backend of a frontend.
pub fn endpoint_hash(key: &FrontendKey, b: &BackendAddr) -> String {
    hash16(&format!("{key}>{}:{}", b.addr, b.port))
}

/// Lower-case protocol name for iptables/nft (`tcp`, `udp`, `sctp`).
pub fn proto_lower(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// `table` with `changes` applied (what the dataplane programs next).
pub fn applied(table: &LbTable, changes: &[Change]) -> LbTable {
    let mut next = table.clone();
    for c in changes {
        match c {
            Change::Upsert(k, f) => {
                next.frontends.insert(*k, f.clone());
            }
            Change::Remove(k) => {
                next.frontends.remove(k);
                next.owners.remove(k);
            }
        }
    }
    next
}

/// Applies `changes` to `table` in place; returns each changed key once,
/// with its frontend before (None: it is new), in key order.
pub fn apply_in_place(
    table: &mut LbTable,
    changes: &[Change],
) -> Vec<(FrontendKey, Option<Frontend>)> {
    let mut before: BTreeMap<FrontendKey, Option<Frontend>> = BTreeMap::new();
    for c in changes {
        let (k, prev) = match c {
            Change::Upsert(k, f) => (k, table.frontends.insert(*k, f.clone())),
            Change::Remove(k) => {
                table.owners.remove(k);
                (k, table.frontends.remove(k))
            }
        };
        before.entry(*k).or_insert(prev);
    }
    before.into_iter().collect()
}

/// Undoes [`apply_in_place`] (a write failed: the agent diffs against
/// what is programmed, so the same changes come again).
pub fn revert(table: &mut LbTable, before: Vec<(FrontendKey, Option<Frontend>)>) {
    for (k, f) in before {
        match f {
            Some(f) => table.frontends.insert(k, f),
            None => table.frontends.remove(&k),
        };
    }
}

/// Counts for the sync log line, from the changed keys' frontends before
/// and `after`.
pub fn change_stats(
    before: &[(FrontendKey, Option<Frontend>)],
    after: &BTreeMap<FrontendKey, Frontend>,
) -> ApplyStats {
    let mut s = ApplyStats::default();
    for (k, old) in before {
        let old = old.as_ref().map(|o| &o.backends);
        match after.get(k) {
            Some(f) => {
                s.upserted += 1;
                s.backends_added += f
                    .backends
                    .iter()
                    .filter(|b| old.is_none_or(|o| !o.contains(b)))
                    .count();
                if let Some(o) = old {
                    s.backends_removed += o.iter().filter(|b| !f.backends.contains(b)).count();
                }
            }
            None => {
                s.removed += 1;
                s.backends_removed += old.map_or(0, |o| o.len());
            }
        }
    }
    s
}

/// kube-proxy's UDP conntrack cleanup for a sync from `old` to `new`:
/// entries to a frontend that had no backend (they may hold the reject; a
/// frontend new to the table had no rules, so nothing to flush) and
/// entries DNATed to a backend that is gone (so a long-lived UDP flow moves
/// to a live backend instead of blackholing). Returns the deletions to run
/// as (frontend address, port, backend address if any).
pub fn stale_udp_flows(
    old: &BTreeMap<FrontendKey, Frontend>,
    new: &BTreeMap<FrontendKey, Frontend>,
) -> Vec<(IpAddr, u16, Option<IpAddr>)> {
    let keys: std::collections::BTreeSet<&FrontendKey> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        stale_udp_flows_of(k, old.get(k), new.get(k), &mut out);
    }
    // Frontends gaining backends first, as before.
    out.sort_by_key(|(_, _, b)| b.is_some());
    out
}

/// [`stale_udp_flows`] for the changed keys only.
pub fn stale_udp_flows_changed(
    before: &[(FrontendKey, Option<Frontend>)],
    after: &BTreeMap<FrontendKey, Frontend>,
) -> Vec<(IpAddr, u16, Option<IpAddr>)> {
    let mut out = Vec::new();
    for (k, old) in before {
        stale_udp_flows_of(k, old.as_ref(), after.get(k), &mut out);
    }
    out
}

fn stale_udp_flows_of(
    k: &FrontendKey,
    old: Option<&Frontend>,
    new: Option<&Frontend>,
    out: &mut Vec<(IpAddr, u16, Option<IpAddr>)>,
) {
    if k.proto != Protocol::Udp {
        return;
    }
    let vip = k.addr;
    if let Some(f) = new
        && !f.backends.is_empty()
        && old.is_some_and(|b| b.backends.is_empty())
    {
        out.push((vip, k.port, None));
    }
    if let Some(f) = old {
        let now: Vec<IpAddr> = new
            .map(|n| n.backends.iter().map(|b| b.addr).collect())
            .unwrap_or_default();
        let mut gone: Vec<IpAddr> = f
            .backends
            .iter()
            .map(|b| b.addr)
            .filter(|a| !now.contains(a))
            .collect();
        gone.dedup();
        out.extend(gone.into_iter().map(|a| (vip, k.port, Some(a))));
    }
}

/// Deletes conntrack entries with the `conntrack` tool (as kube-proxy does).
/// "0 flow entries" exits 1: not an error.
pub fn flush_udp_flows(flows: &[(IpAddr, u16, Option<IpAddr>)]) {
    for (vip, port, backend) in flows {
        let family = if vip.is_ipv6() { "ipv6" } else { "ipv4" };
        let (vip, port) = (vip.to_string(), port.to_string());
        let mut args = vec![
            "-D",
            "-f",
            family,
            "-p",
            "udp",
            "--orig-dst",
            &vip,
            "--orig-port-dst",
            &port,
        ];
        let b;
        if let Some(a) = backend {
            b = a.to_string();
            args.extend(["--dst-nat", &b]);
        }
        match run("conntrack", &args, None) {
            Ok(_) => debug!(?args, "flushed conntrack entries"),
            Err(FallbackError::Failed { .. }) => {}
            Err(e) => warn!(error = %e, "conntrack flush"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interface_prefixes_from_globs() {
        let o = RuleOptions::from_pod_device_globs(&["veth*".into(), "eth0".into(), "c?i*".into()]);
        assert_eq!(o.pod_interface_prefixes, vec!["veth"]);
    }

    #[test]
    fn hash16_is_stable_and_distinct() {
        let a = hash16("10.96.0.10:80/TCP");
        assert_eq!(a.len(), 16);
        assert_eq!(a, hash16("10.96.0.10:80/TCP"));
        assert_ne!(a, hash16("10.96.0.10:80/UDP"));
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_uppercase() || (b'2'..=b'7').contains(&c))
        );
    }

    fn fe(backends: &[u8]) -> Frontend {
        Frontend {
            kind: crate::lb::FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: Ipv4Addr::new(10, 244, 1, *b).into(),
                    port: 53,
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
    fn udp_flows_to_flush() {
        let vip: IpAddr = Ipv4Addr::new(10, 96, 0, 10).into();
        let k = FrontendKey {
            addr: vip,
            port: 53,
            proto: Protocol::Udp,
        };
        let old = BTreeMap::from([(k, fe(&[2, 3]))]);
        let new = BTreeMap::from([(k, fe(&[3]))]);
        assert_eq!(
            stale_udp_flows(&old, &new),
            vec![(vip, 53, Some(Ipv4Addr::new(10, 244, 1, 2).into()))]
        );
        let empty = BTreeMap::from([(k, fe(&[]))]);
        assert_eq!(stale_udp_flows(&empty, &new), vec![(vip, 53, None)]);
        let tcp = FrontendKey {
            proto: Protocol::Tcp,
            ..k
        };
        let old = BTreeMap::from([(tcp, fe(&[2]))]);
        assert!(stale_udp_flows(&old, &BTreeMap::new()).is_empty());
        // IPv6 frontends' flows as well.
        let six = FrontendKey {
            addr: "fd00:96::10".parse().expect("address"),
            ..k
        };
        let old = BTreeMap::from([(six, fe6(&[2, 3]))]);
        let new = BTreeMap::from([(six, fe6(&[3]))]);
        assert_eq!(
            stale_udp_flows(&old, &new),
            vec![(
                six.addr,
                53,
                Some("fd00:244:1::2".parse().expect("address"))
            )]
        );
    }

    fn fe6(backends: &[u16]) -> Frontend {
        let mut f = fe(&[]);
        f.backends = backends
            .iter()
            .map(|b| BackendAddr {
                addr: Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, *b).into(),
                port: 53,
                terminating: false,
                local: true,
            })
            .collect();
        f
    }

    #[test]
    fn ipv6_frontends_left_out_by_ipvs_are_counted() {
        let v4 = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 80,
            proto: Protocol::Tcp,
        };
        let v6 = |port| FrontendKey {
            addr: "fd00:96::10".parse().expect("address"),
            port,
            proto: Protocol::Udp,
        };
        assert!(programs(&v4));
        assert!(!programs(&v6(53)));
        let mut table = BTreeMap::from([(v4, fe(&[2])), (v6(53), fe6(&[2]))]);
        let mut left = Ipv6Left::default();
        assert_eq!(left.after_sync("test", &table), 1);
        table.insert(v6(54), fe6(&[3]));
        table.insert(v6(1), fe6(&[3]));
        assert_eq!(left.after_sync("test", &table), 3);
        table.retain(|k, _| k.addr.is_ipv4());
        assert_eq!(left.after_sync("test", &table), 0);
    }

    #[test]
    fn each_familys_generators_write_only_its_frontends() {
        use super::super::{iptables_rules::IptablesRules, nftables_rules::NftablesRules};
        use incremental::{Content, Generator, Item};
        let v4 = FrontendKey {
            addr: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 80,
            proto: Protocol::Tcp,
        };
        let v6 = FrontendKey {
            addr: "fd00:96::10".parse().expect("address"),
            ..v4
        };
        type Gen = Box<dyn Fn(&FrontendKey, &Frontend, &mut Vec<(Item, Content)>)>;
        let gens = |family| -> [Gen; 2] {
            let ipt = IptablesRules::new(RuleOptions::default(), family);
            let nft = NftablesRules::new(RuleOptions::default(), family);
            [
                Box::new(move |k, f, out| ipt.frontend(k, f, out)),
                Box::new(move |k, f, out| nft.frontend(k, f, out)),
            ]
        };
        for g in gens(Family::V4) {
            let mut out = Vec::new();
            g(&v6, &fe6(&[2]), &mut out);
            assert!(out.is_empty(), "{out:?}");
            g(&v4, &fe(&[2]), &mut out);
            assert!(!out.is_empty(), "an IPv4 frontend has IPv4 rules");
        }
        for g in gens(Family::V6) {
            let mut out = Vec::new();
            g(&v4, &fe(&[2]), &mut out);
            assert!(out.is_empty(), "{out:?}");
            g(&v6, &fe6(&[2]), &mut out);
            assert!(!out.is_empty(), "an IPv6 frontend has IPv6 rules");
        }
        assert_eq!(Family::of(v6.addr), Family::V6);
        assert_eq!(
            Family::V6.ranges(&[
                (Ipv4Addr::new(203, 0, 113, 0).into(), 24),
                ("2001:db8::".parse().expect("address"), 32)
            ]),
            vec![("2001:db8::".parse().expect("address"), 32)]
        );
    }
}
