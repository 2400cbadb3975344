//! Oracles for the incremental iptables and nftables writers.
//!
//! Pure: a seeded generator applies random sequences of changes
//! (ClusterIP, NodePort on two node addresses sharing ports, ExternalIP and
//! LoadBalancer frontends, each IPv4 or IPv6 (with endpoints of its
//! family); affinity; source ranges; local and remote backends; endpoints
//! appearing and disappearing; frontends removed) to one writer per
//! family, as the modes run them. Every script it emits is run on a model of the kernel (a
//! strict interpreter of the `iptables-restore` / `nft -f` subset the
//! writers use: deleting what is not there, or a chain still in use, is an
//! error), and at each step the model must equal, normalised, the model a
//! fresh writer builds for the same table; the writer's own belief (item
//! fingerprints) must equal the fresh writer's too.
//!
//! Root (`#[ignore]`-free, skipped when not root): the same sequences on
//! the real iptables / nftables in a new network namespace, compared
//! (`iptables-save` / `nft list table`, normalised) with a fresh agent's
//! output for the final table; then a restarted agent over those rules
//! must change nothing (rule handles unchanged), and one over damaged
//! rules must repair them.
//!
//! Seeds: `FALLBACK_ORACLE_SEEDS=1,2,3`, steps: `FALLBACK_ORACLE_STEPS`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use proxy::{
    dataplane::{
        Dataplane,
        fallback::{
            Family, RuleOptions, apply_in_place,
            incremental::{Generator, Item, State},
        },
        iptables::{self, IptablesDataplane},
        iptables_rules::{self, IptablesRules},
        nftables::{self, NftablesDataplane},
        nftables_rules::{self, NftablesRules},
    },
    diff::diff,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind, LbTable},
    model::Protocol,
};

// --- random tables ---------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const NODES: [[u8; 4]; 2] = [[172, 18, 0, 11], [10, 1, 0, 11]];
/// The nodes' IPv6 addresses (NodePorts of the IPv6 family).
const NODES6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, 0x11),
];

fn random_frontend(rng: &mut Rng, kind: FrontendKind) -> Frontend {
    let n = match rng.below(6) {
        0 => 0,
        k => k as usize,
    };
    let mut backends: Vec<BackendAddr> = (0..n)
        .map(|_| BackendAddr {
            addr: Ipv4Addr::new(10, 244, rng.below(3) as u8, 2 + rng.below(6) as u8).into(),
            port: 8080 + rng.below(2) as u16,
            terminating: false,
            local: rng.chance(50),
        })
        .collect();
    backends.sort();
    backends.dedup_by(|a, b| a.addr == b.addr && a.port == b.port);
    Frontend {
        kind,
        backends: backends.into(),
        affinity_timeout: if rng.chance(20) {
            [10800, 60][rng.below(2) as usize]
        } else {
            0
        },
        source_ranges: if kind == FrontendKind::LoadBalancer && rng.chance(50) {
            vec![(Ipv4Addr::new(203, 0, 113, 0).into(), 24)]
        } else {
            vec![]
        },
        maglev_table_size: None,
        local_only: false,
    }
}

/// `f` as a frontend of an IPv6 address: its backends' IPv6 twins
/// (10.244.c.d -> fd00:244:c::d), and an IPv6 source range beside the
/// IPv4 one (which the IPv6 rules leave out).
fn six(mut f: Frontend) -> Frontend {
    let mut backends = f.backends.to_vec();
    for b in &mut backends {
        if let IpAddr::V4(a) = b.addr {
            let [_, _, c, d] = a.octets();
            b.addr = Ipv6Addr::new(0xfd00, 0x244, c.into(), 0, 0, 0, 0, d.into()).into();
        }
    }
    f.backends = backends.into();
    if !f.source_ranges.is_empty() {
        f.source_ranges.push((
            Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0).into(),
            48,
        ));
    }
    f
}

/// One random step from `table`: a few frontends added, changed or
/// removed, about a third of them IPv6. NodePorts come in pairs (both
/// node addresses of the family), as the model makes them, sometimes (as
/// during a change) with different contents.
fn step(rng: &mut Rng, table: &LbTable) -> LbTable {
    let mut next = table.clone();
    for _ in 0..1 + rng.below(4) {
        let proto = [Protocol::Tcp, Protocol::Udp][rng.below(2) as usize];
        let v6 = rng.chance(35);
        let family = |f: Frontend| if v6 { six(f) } else { f };
        match rng.below(5) {
            0 | 1 => {
                let host = 1 + rng.below(12) as u8;
                let addr: IpAddr = if v6 {
                    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, host.into()).into()
                } else {
                    Ipv4Addr::new(10, 96, 0, host).into()
                };
                let k = FrontendKey {
                    addr,
                    port: 80,
                    proto,
                };
                let f = family(random_frontend(rng, FrontendKind::ClusterIp));
                next.frontends.insert(k, f);
            }
            2 => {
                let port = 30000 + rng.below(4) as u16;
                let f = family(random_frontend(rng, FrontendKind::NodePort));
                for i in 0..NODES.len() {
                    let addr: IpAddr = if v6 {
                        NODES6[i].into()
                    } else {
                        Ipv4Addr::from(NODES[i]).into()
                    };
                    let k = FrontendKey { addr, port, proto };
                    let f = if i == 1 && rng.chance(20) {
                        family(random_frontend(rng, FrontendKind::NodePort))
                    } else {
                        f.clone()
                    };
                    next.frontends.insert(k, f);
                }
            }
            3 => {
                let kind =
                    [FrontendKind::ExternalIp, FrontendKind::LoadBalancer][rng.below(2) as usize];
                let host = 1 + rng.below(4) as u8;
                let addr: IpAddr = if v6 {
                    Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, host.into()).into()
                } else {
                    Ipv4Addr::new(198, 51, 100, host).into()
                };
                let k = FrontendKey {
                    addr,
                    port: 443,
                    proto,
                };
                next.frontends.insert(k, family(random_frontend(rng, kind)));
            }
            _ => {
                let keys: Vec<FrontendKey> = next.frontends.keys().copied().collect();
                if !keys.is_empty() {
                    let k = keys[rng.below(keys.len() as u64) as usize];
                    next.frontends.remove(&k);
                }
            }
        }
    }
    next
}

fn seeds() -> Vec<u64> {
    std::env::var("FALLBACK_ORACLE_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3])
}

fn steps() -> usize {
    std::env::var("FALLBACK_ORACLE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn opts() -> RuleOptions {
    RuleOptions {
        pod_interface_prefixes: vec!["veth".into()],
    }
}

// --- a model of the kernel --------------------------------------------------

/// iptables: table -> chain -> rules; and the hairpin ip set's entries.
#[derive(Default)]
struct IptModel(
    BTreeMap<String, BTreeMap<String, Vec<String>>>,
    BTreeSet<String>,
);

impl IptModel {
    /// `ipset restore` input: adding an entry that is there, or deleting
    /// one that is not, is an error (the writer knows what is there).
    fn run_ipset(&mut self, script: &str, family: Family) {
        let set = iptables_rules::hairpin_set(family);
        for line in script.lines() {
            if let Some(e) = line.strip_prefix(&format!("add {set} ")) {
                assert!(self.1.insert(e.to_owned()), "ipset add of present {e}");
            } else if let Some(e) = line.strip_prefix(&format!("del {set} ")) {
                assert!(self.1.remove(e), "ipset del of missing {e}");
            } else {
                panic!("unexpected ipset line {line} ({family:?})");
            }
        }
    }

    fn run(&mut self, script: &str) {
        let mut table = String::new();
        for line in script.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_owned();
                continue;
            }
            let chains = self.0.entry(table.clone()).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().expect("chain name");
                chains.insert(name.to_owned(), Vec::new());
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (c, r) = rest.split_once(' ').expect("rule");
                chains
                    .get_mut(c)
                    .unwrap_or_else(|| panic!("-A to missing chain {c}: {line}"))
                    .push(r.to_owned());
            } else if let Some(rest) = line.strip_prefix("-I ") {
                let (c, r) = rest.split_once(" 1 ").expect("insert at 1");
                chains
                    .get_mut(c)
                    .unwrap_or_else(|| panic!("-I to missing chain {c}: {line}"))
                    .insert(0, r.to_owned());
            } else if let Some(rest) = line.strip_prefix("-D ") {
                let (c, r) = rest.split_once(' ').expect("rule");
                let rules = chains
                    .get_mut(c)
                    .unwrap_or_else(|| panic!("-D in missing chain {c}"));
                let at = rules
                    .iter()
                    .position(|x| x == r)
                    .unwrap_or_else(|| panic!("-D of a missing rule: {line}"));
                rules.remove(at);
            } else if let Some(c) = line.strip_prefix("-X ") {
                let rules = chains
                    .remove(c)
                    .unwrap_or_else(|| panic!("-X of missing chain {c}"));
                assert!(rules.is_empty(), "-X of non-empty chain {c}");
                let used = chains
                    .values()
                    .flatten()
                    .any(|r| r.split_whitespace().any(|w| w == c));
                assert!(!used, "-X of chain {c} still jumped to");
            } else {
                assert!(
                    line == "COMMIT" || line.is_empty(),
                    "unexpected line {line}"
                );
            }
        }
    }

    /// Normalised: rules normalised; shared chains (whose order between
    /// frontends does not matter) sorted.
    fn normalised(&self) -> Vec<String> {
        let mut out = normalised_ipt(&self.0);
        out.extend(self.1.iter().map(|e| format!("hairpin {e}")));
        out
    }
}

fn normalised_ipt(t: &BTreeMap<String, BTreeMap<String, Vec<String>>>) -> Vec<String> {
    let mut out = Vec::new();
    for (table, chains) in t {
        for (chain, rules) in chains {
            let mut rules: Vec<String> =
                rules.iter().map(|r| iptables_rules::normalise(r)).collect();
            if iptables_rules::SHARED.contains(&(table.as_str(), chain.as_str())) {
                rules.sort();
            }
            out.push(format!("{table} {chain}: {}", rules.join(" ; ")));
        }
    }
    out
}

/// nftables: chains, map/set elements, affinity sets.
#[derive(Default, Debug, PartialEq)]
struct NftModel {
    chains: BTreeMap<String, Vec<String>>,
    elements: BTreeMap<String, BTreeMap<String, String>>,
    sets: BTreeSet<String>,
}

fn braces(s: &str) -> &str {
    s.trim()
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(s)
        .trim()
}

impl NftModel {
    fn run(&mut self, script: &str, family: Family) {
        let t = format!("{} {} ", family.nft(), nftables_rules::TABLE);
        for line in script.lines() {
            if line.starts_with("add table") || line.starts_with("add map") {
                continue;
            }
            if let Some(rest) = line.strip_prefix(&format!("add set {t}")) {
                let name = rest.split_whitespace().next().expect("set name");
                if name.starts_with("aff-") {
                    assert!(self.sets.insert(name.to_owned()), "set {name} exists");
                }
            } else if let Some(rest) = line.strip_prefix(&format!("add chain {t}")) {
                let name = rest.split_whitespace().next().expect("chain");
                self.chains.entry(name.to_owned()).or_default();
            } else if let Some(name) = line.strip_prefix(&format!("flush chain {t}")) {
                self.chains
                    .get_mut(name)
                    .unwrap_or_else(|| panic!("flush of missing chain {name}"))
                    .clear();
            } else if let Some(rest) = line.strip_prefix(&format!("add rule {t}")) {
                let (c, r) = rest.split_once(' ').expect("rule");
                self.chains
                    .get_mut(c)
                    .unwrap_or_else(|| panic!("rule in missing chain {c}"))
                    .push(r.to_owned());
            } else if let Some(name) = line.strip_prefix(&format!("delete chain {t}")) {
                let rules = self
                    .chains
                    .remove(name)
                    .unwrap_or_else(|| panic!("delete of missing chain {name}"));
                assert!(rules.is_empty(), "delete of non-empty chain {name}");
                let goto = format!("goto {name}");
                let used = self.chains.values().flatten().any(|r| r.contains(&goto))
                    || self
                        .elements
                        .values()
                        .flat_map(|m| m.values())
                        .any(|v| *v == goto);
                assert!(!used, "chain {name} deleted while in use");
            } else if let Some(name) = line.strip_prefix(&format!("delete set {t}")) {
                assert!(self.sets.remove(name), "delete of missing set {name}");
            } else if let Some(rest) = line.strip_prefix(&format!("add element {t}")) {
                let (map, e) = rest.split_once(' ').expect("element");
                for e in braces(e).split(", ") {
                    let (k, v) = e.split_once(" : ").unwrap_or((e, ""));
                    let old = self
                        .elements
                        .entry(map.to_owned())
                        .or_default()
                        .insert(k.to_owned(), v.to_owned());
                    assert!(old.is_none(), "element {map} {k} exists: {line}");
                }
            } else if let Some(rest) = line.strip_prefix(&format!("delete element {t}")) {
                let (map, e) = rest.split_once(' ').expect("element");
                let gone = self.elements.get_mut(map).and_then(|m| m.remove(braces(e)));
                assert!(gone.is_some(), "delete of missing element: {line}");
            } else {
                assert!(line.is_empty(), "unexpected line {line} ({family:?})");
            }
        }
        self.elements.retain(|_, m| !m.is_empty());
    }

    fn normalised(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .chains
            .iter()
            .map(|(c, rules)| {
                let rules: Vec<String> =
                    rules.iter().map(|r| nftables_rules::normalise(r)).collect();
                format!("chain {c}: {}", rules.join(" ; "))
            })
            .collect();
        for (m, elems) in &self.elements {
            for (k, v) in elems {
                out.push(format!("element {m} {k} : {v}"));
            }
        }
        out.extend(self.sets.iter().map(|s| format!("set {s}")));
        out
    }
}

// --- pure oracle -------------------------------------------------------------

fn fresh_delta<G: Generator>(
    g: &G,
    t: &LbTable,
) -> (State, proxy::dataplane::fallback::incremental::Delta) {
    let mut s = State::default();
    let d = s.plan(g, &t.frontends, None);
    (s, d)
}

#[test]
fn random_changes_leave_what_a_fresh_writer_writes() {
    for seed in seeds() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let ipt = Family::BOTH.map(|f| IptablesRules::new(opts(), f));
        let nft = Family::BOTH.map(|f| NftablesRules::new(opts(), f));
        let (mut ipt_state, mut nft_state) = (
            [State::default(), State::default()],
            [State::default(), State::default()],
        );
        let (mut ipt_kernel, mut nft_kernel) = (
            [IptModel::default(), IptModel::default()],
            [NftModel::default(), NftModel::default()],
        );
        let mut programmed = LbTable::default();
        let mut first = true;
        // Bytes of partial syncs, and IPv6 frontends seen, per family.
        let mut partial_bytes = [0usize; 2];
        let mut v6_seen = 0;
        for i in 0..steps() {
            let desired = if i + 1 == steps() {
                LbTable::default()
            } else {
                step(&mut rng, &programmed)
            };
            v6_seen += desired
                .frontends
                .keys()
                .filter(|k| k.addr.is_ipv6())
                .count();
            let changes = diff(&programmed, &desired);
            let before = apply_in_place(&mut programmed, &changes);
            let changed = (!first).then_some(&before[..]);
            for (x, family) in Family::BOTH.into_iter().enumerate() {
                let d = ipt_state[x].plan(&ipt[x], &programmed.frontends, changed);
                let script = iptables_rules::render(&d).0;
                let (set_add, set_del) = iptables_rules::render_ipset(&d);
                if !first {
                    partial_bytes[x] += script.len() + set_add.len() + set_del.len();
                }
                ipt_kernel[x].run_ipset(&set_add, family);
                ipt_kernel[x].run(&script);
                ipt_kernel[x].run_ipset(&set_del, family);
                ipt_state[x].commit(d);
                let d = nft_state[x].plan(&nft[x], &programmed.frontends, changed);
                let mut script = nftables_rules::render(&d, family).0;
                if first {
                    script.insert_str(0, &nftables_rules::render_prelude(family));
                }
                nft_kernel[x].run(&script, family);
                nft_state[x].commit(d);

                // A fresh writer for the same table.
                let (fresh, d) = fresh_delta(&ipt[x], &programmed);
                let mut want = IptModel::default();
                want.run(&iptables_rules::render(&d).0);
                want.run_ipset(&iptables_rules::render_ipset(&d).0, family);
                assert_eq!(
                    ipt_kernel[x].normalised(),
                    want.normalised(),
                    "seed {seed} step {i}: iptables {family:?}"
                );
                let mut fresh_state = fresh;
                fresh_state.commit(d);
                assert_eq!(
                    ipt_state[x].believed(),
                    fresh_state.believed(),
                    "seed {seed} step {i}: iptables {family:?} belief"
                );
                let (fresh, d) = fresh_delta(&nft[x], &programmed);
                let mut want = NftModel::default();
                want.run(&nftables_rules::render(&d, family).0, family);
                assert_eq!(
                    nft_kernel[x].normalised(),
                    want.normalised(),
                    "seed {seed} step {i}: nftables {family:?}"
                );
                let mut fresh_state = fresh;
                fresh_state.commit(d);
                assert_eq!(
                    nft_state[x].believed(),
                    fresh_state.believed(),
                    "seed {seed} step {i}: nftables {family:?} belief"
                );
            }
            first = false;
        }
        assert!(v6_seen > 0, "seed {seed}: no IPv6 frontend generated");
        for (x, family) in Family::BOTH.into_iter().enumerate() {
            assert!(
                partial_bytes[x] > 0,
                "seed {seed}: no partial sync wrote anything ({family:?})"
            );
        }
    }
}

// --- root: the real tools in a new network namespace -------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `f` on a thread in a new network namespace (processes it starts
/// inherit it).
fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("netns thread")
}

fn sh(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our chains in iptables-save and ip6tables-save output, normalised,
/// each line prefixed with its family.
fn ipt_kernel() -> Vec<String> {
    let mut out = Vec::new();
    for family in Family::BOTH {
        let mut t: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for table in ["filter", "nat"] {
            let save = sh(&[family.iptables_save(), "-t", table]);
            let ours = iptables_rules::our_chains(&save, table);
            let chains = t.entry(table.to_owned()).or_default();
            for c in &ours {
                chains.insert(c.clone(), Vec::new());
            }
            for line in save.lines() {
                if let Some(rest) = line.strip_prefix("-A ")
                    && let Some((c, r)) = rest.split_once(' ')
                    && let Some(rules) = chains.get_mut(c)
                {
                    rules.push(r.to_owned());
                }
            }
        }
        let set_name = iptables_rules::hairpin_set(family);
        let set = sh(&["ipset", "save", set_name]);
        let mut entries: Vec<String> = set
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("add {set_name} ")))
            .map(|e| format!("hairpin {e}"))
            .collect();
        entries.sort();
        out.extend(
            normalised_ipt(&t)
                .into_iter()
                .chain(entries)
                .map(|l| format!("{family:?} {l}")),
        );
    }
    out
}

/// Our nft tables (`ip` and `ip6`), normalised (chains with rules;
/// elements sorted), each line prefixed with its family.
fn nft_kernel() -> Vec<String> {
    Family::BOTH
        .into_iter()
        .flat_map(|family| {
            nft_table(family)
                .into_iter()
                .map(move |l| format!("{family:?} {l}"))
        })
        .collect()
}

fn nft_table(family: Family) -> Vec<String> {
    let list = sh(&["nft", "list", "table", family.nft(), nftables_rules::TABLE]);
    let mut m = NftModel::default();
    let mut lines = list.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            let mut rules = Vec::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                if !l.is_empty() && !l.starts_with("type ") {
                    rules.push(l.to_owned());
                }
            }
            m.chains.insert(name.to_owned(), rules);
        } else if let Some(name) = line
            .strip_prefix("map ")
            .or_else(|| line.strip_prefix("set "))
            .and_then(|l| l.strip_suffix(" {"))
        {
            let mut body = String::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                body.push_str(l);
                body.push(' ');
            }
            if name.starts_with("aff-") {
                m.sets.insert(name.to_owned());
            }
            if let Some(at) = body.find("elements = {") {
                let rest = &body[at + "elements = {".len()..];
                let rest = rest.rsplit_once('}').map_or(rest, |(r, _)| r);
                for e in rest.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    let (k, v) = e.split_once(" : ").unwrap_or((e, ""));
                    m.elements
                        .entry(name.to_owned())
                        .or_default()
                        .insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
        }
    }
    m.normalised()
}

/// Handles of every rule in the ruleset (`nft -a`): a rewritten rule gets
/// a new one.
fn handles() -> BTreeSet<String> {
    sh(&["nft", "-a", "list", "ruleset"])
        .lines()
        .filter_map(|l| l.rsplit_once("# handle ").map(|(_, h)| h.trim().to_owned()))
        .collect()
}

fn drive<D: Dataplane>(dp: &mut D, to: &LbTable) {
    let changes = diff(dp.programmed(), to);
    if !changes.is_empty() {
        dp.apply(&changes).expect("apply");
    }
}

fn kernel_oracle<D: Dataplane>(
    mode: &str,
    new: impl Fn() -> D,
    cleanup: impl Fn(),
    kernel: impl Fn() -> Vec<String>,
    damage: impl Fn(),
) {
    for seed in seeds() {
        let mut rng = Rng(0x51f1_5eed ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut dp = new();
        let mut table = LbTable::default();
        for _ in 0..steps() {
            table = step(&mut rng, &table);
            drive(&mut dp, &table);
        }
        let incremental = kernel();
        drop(dp);

        // Restarted over right rules: nothing rewritten.
        let before = handles();
        let mut again = new();
        drive(&mut again, &table);
        assert_eq!(
            handles(),
            before,
            "{mode} seed {seed}: restart rewrote rules"
        );
        assert_eq!(kernel(), incremental, "{mode} seed {seed}: restart");
        drop(again);

        // Restarted over damaged rules: repaired.
        damage();
        let mut again = new();
        drive(&mut again, &table);
        assert_eq!(kernel(), incremental, "{mode} seed {seed}: repair");
        drop(again);

        // A fresh agent for the final table.
        cleanup();
        let mut fresh = new();
        drive(&mut fresh, &table);
        assert_eq!(kernel(), incremental, "{mode} seed {seed}: fresh agent");
        drop(fresh);
        cleanup();
    }
}

#[test]
fn iptables_random_changes_in_the_kernel_equal_a_fresh_agent() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    in_new_netns(|| {
        kernel_oracle(
            "iptables",
            || IptablesDataplane::new(opts()).expect("iptables dataplane"),
            || {
                iptables::cleanup().expect("cleanup");
            },
            ipt_kernel,
            || {
                // A rule of ours gone, one of ours changed, a stray chain.
                let save = sh(&["iptables-save", "-t", "nat"]);
                if let Some(l) = save.lines().find(|l| l.starts_with("-A KUBE-SEP-")) {
                    let mut args = vec!["iptables", "-t", "nat", "-D"];
                    args.extend(l[3..].split_whitespace().filter(|w| !w.contains('"')));
                    let _ = std::process::Command::new(args[0])
                        .args(&args[1..])
                        .status();
                }
                sh(&["iptables", "-t", "nat", "-N", "KUBE-SVC-STRAYSTRAYSTRAY"]);
                sh(&["ip6tables", "-t", "nat", "-N", "KUBE-SVC-STRAYSTRAYSTRAY"]);
                sh(&["ip6tables", "-t", "nat", "-F", "KUBE-MARK-MASQ"]);
                sh(&["iptables", "-t", "nat", "-F", "KUBE-MARK-MASQ"]);
                sh(&[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "KUBE-SERVICES",
                    "-d",
                    "10.99.99.99/32",
                    "-j",
                    "KUBE-SVC-STRAYSTRAYSTRAY",
                ]);
            },
        )
    });
}

#[test]
fn nftables_random_changes_in_the_kernel_equal_a_fresh_agent() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    in_new_netns(|| {
        let t = nftables_rules::TABLE;
        kernel_oracle(
            "nftables",
            || NftablesDataplane::new(opts()).expect("nftables dataplane"),
            || {
                nftables::cleanup().expect("cleanup");
            },
            nft_kernel,
            || {
                sh(&["nft", "add", "chain", "ip", t, "svc-STRAYSTRAYSTRAY"]);
                sh(&["nft", "flush", "chain", "ip", t, "mark-for-masquerade"]);
                sh(&["nft", "add", "chain", "ip6", t, "svc-STRAYSTRAYSTRAY"]);
                sh(&["nft", "flush", "chain", "ip6", t, "mark-for-masquerade"]);
                sh(&[
                    "nft",
                    "add",
                    "element",
                    "ip",
                    t,
                    "service-ips",
                    "{ 10.99.99.99 . tcp . 1 : goto svc-STRAYSTRAYSTRAY }",
                ]);
                let list = sh(&["nft", "list", "table", "ip", t]);
                if let Some(c) = list.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("chain sep-")?
                        .strip_suffix(" {")
                        .map(str::to_owned)
                }) {
                    sh(&["nft", "flush", "chain", "ip", t, &format!("sep-{c}")]);
                }
            },
        )
    });
}

// --- locality: a change writes only the changed frontend's items -------------

/// The items `g` generates for `f` at `k`, and how many lines (rules,
/// element values) they hold.
fn items_of<G: Generator>(
    g: &G,
    k: &FrontendKey,
    f: Option<&Frontend>,
) -> (
    BTreeSet<proxy::dataplane::fallback::incremental::Item>,
    usize,
) {
    let mut out = Vec::new();
    if let Some(f) = f {
        g.frontend(k, f, &mut out);
    }
    let lines = out.iter().map(|(_, c)| c.lines.len().max(1)).sum();
    (out.into_iter().map(|(i, _)| i).collect(), lines)
}

/// A table of 300 frontends of every kind; then, one at a time, 60 of
/// them changed (an endpoint added, one removed, all removed, the
/// frontend removed, affinity switched on), and a new one added: the
/// delta holds only items the changed frontend generates (before or
/// after), and no more of them than it has. A layout where a change
/// rewrites a chain or element that lists other frontends (a whole
/// KUBE-SERVICES, a per-node chain of endpoints) fails here.
fn changes_stay_local<G: Generator>(mode: &str, g: &G) {
    let mut rng = Rng(0x10ca_1175);
    let mut table = LbTable::default();
    for i in 0..300u16 {
        let proto = [Protocol::Tcp, Protocol::Udp][usize::from(i % 2)];
        let (addr, kind) = match i % 10 {
            0 => (Ipv4Addr::from(NODES[0]), FrontendKind::NodePort),
            1 => (Ipv4Addr::from(NODES[1]), FrontendKind::NodePort),
            2 => (Ipv4Addr::new(198, 51, 100, 1), FrontendKind::ExternalIp),
            3 => (Ipv4Addr::new(198, 51, 100, 2), FrontendKind::LoadBalancer),
            _ => (
                Ipv4Addr::new(10, 96, (i / 200) as u8, (i % 200) as u8 + 1),
                FrontendKind::ClusterIp,
            ),
        };
        let k = FrontendKey {
            addr: addr.into(),
            port: 30000 + i,
            proto,
        };
        table.frontends.insert(k, random_frontend(&mut rng, kind));
    }
    let mut state = State::default();
    let d = state.plan(g, &table.frontends, None);
    state.commit(d);
    let keys: Vec<FrontendKey> = table.frontends.keys().copied().collect();
    let new_key = FrontendKey {
        addr: Ipv4Addr::new(10, 96, 9, 9).into(),
        port: 80,
        proto: Protocol::Tcp,
    };
    let mut checked = 0;
    // Spread over the table, greatest key first (the one whose content
    // wins where several frontends generate the same item).
    for (n, k) in keys
        .iter()
        .rev()
        .step_by(5)
        .copied()
        .chain([new_key])
        .enumerate()
    {
        let old = table.frontends.get(&k).cloned();
        let mut next = table.clone();
        let mut f = old
            .clone()
            .unwrap_or_else(|| random_frontend(&mut rng, FrontendKind::ClusterIp));
        let mut backends = f.backends.to_vec();
        match n % 5 {
            0 => backends.push(BackendAddr {
                addr: Ipv4Addr::new(10, 244, 7, n as u8).into(),
                port: 8080,
                terminating: false,
                local: n % 2 == 0,
            }),
            1 => {
                backends.pop();
            }
            2 => backends.clear(),
            3 => f.affinity_timeout = if f.affinity_timeout > 0 { 0 } else { 60 },
            _ => {}
        }
        f.backends = backends.into();
        if n % 5 == 4 && old.is_some() {
            next.frontends.remove(&k);
        } else {
            next.frontends.insert(k, f);
        }
        if next.frontends.get(&k) == old.as_ref() {
            continue;
        }
        let ((was, was_lines), (is, is_lines)) = (
            items_of(g, &k, old.as_ref()),
            items_of(g, &k, next.frontends.get(&k)),
        );
        let mine: BTreeSet<_> = was.union(&is).cloned().collect();
        // Chains other frontends generate too (a shared chain written
        // whole would hold their rules).
        let others: BTreeSet<_> = next
            .frontends
            .iter()
            .filter(|(o, _)| **o != k)
            .flat_map(|(o, f)| items_of(g, o, Some(f)).0)
            .filter(|i| matches!(i, Item::Chain(..)))
            .collect();
        let mut s = state.clone();
        let before = apply_in_place(&mut table.clone(), &diff(&table, &next));
        let d = s.plan(g, &next.frontends, Some(&before));
        let touched: Vec<_> = d
            .upsert
            .iter()
            .map(|(i, _, _)| i)
            .chain(d.delete.iter().map(|(i, _)| i))
            .collect();
        if touched.is_empty() {
            // E.g. affinity switched on a frontend without endpoints.
            continue;
        }
        for i in &touched {
            assert!(
                mine.contains(i),
                "{mode}: change {n} of {k} wrote {i:?}, not one of its own items {mine:?}"
            );
        }
        for i in &touched {
            assert!(
                !others.contains(i),
                "{mode}: change {n} of {k} rewrote {i:?}, which other frontends fill too"
            );
        }
        assert!(touched.len() <= mine.len(), "{mode}: {touched:?}");
        let lines: usize = d.upsert.iter().map(|(_, c, _)| c.lines.len().max(1)).sum();
        assert!(
            lines <= was_lines + is_lines,
            "{mode}: change {n} of {k} wrote {lines} lines; the frontend has {was_lines} before, {is_lines} after"
        );
        checked += 1;
    }
    assert!(
        checked >= 40,
        "{mode}: only {checked} changes wrote anything"
    );
}

#[test]
fn iptables_a_change_writes_only_the_changed_frontends_items() {
    changes_stay_local("iptables", &IptablesRules::new(opts(), Family::V4));
}

#[test]
fn nftables_a_change_writes_only_the_changed_frontends_items() {
    changes_stay_local("nftables", &NftablesRules::new(opts(), Family::V4));
}
