//! kube-proxy's nftables mode for a set of frontends, as `nft -f` input:
//! one table of ours, verdict maps for service dispatch (one O(1) lookup
//! whatever the number of services), a `numgen random` cascade for the
//! endpoint choice, sets for node-port addresses, hairpin pairs and
//! per-endpoint affinity. No chain per endpoint (except for affinity):
//! at 10k services x 10 endpoints the table has ~10k chains, not 110k. A
//! sync after the first rewrites only the chains and elements that
//! changed. Pure: no kernel, no processes.
//!
//! One table per address family, as kube-proxy's nftables mode has
//! (`ip kube-proxy-rs` for the IPv4 frontends, `ip6 kube-proxy-rs` for the
//! IPv6 ones), both from this generator ([`NftablesRules::family`]): the
//! same chains, maps and sets, with the family's address type and
//! matches (`ip daddr` / `ip6 daddr`). The no-endpoint `reject` is the
//! family's default (ICMP / ICMPv6 port unreachable; TCP gets a reset).
//!
//! ```text
//! table ip kube-proxy-rs (and ip6 kube-proxy-rs)
//!   nat-prerouting / nat-output (dstnat)   -> services
//!   services: ip daddr . l4proto . dport vmap @service-ips
//!             local daddr in @nodeport-ips: l4proto . dport vmap @service-nodeports
//!   filter-prerouting / filter-output (dstnat - 10), new connections:
//!             vmap @firewall-ips (loadBalancerSourceRanges)
//!             vmap @no-endpoint-services / @no-endpoint-nodeports -> reject
//!   nat-postrouting (srcnat)              -> masquerading: hairpin
//!             (ct status dnat, saddr . daddr in @hairpin-endpoints) and
//!             mark 0x4000 -> masquerade
//!   svc-<h>:  rule i of n: numgen random mod (n-i) 0 ... dnat to ep_i
//!             (the last unconditional); external frontends: local
//!             endpoints first, one jump mark-for-masquerade-external
//!             (unless from a local pod) before the remote ones.
//!             With affinity: ip saddr @aff-* goto sep-*, then the
//!             cascade of goto sep-*
//!   fw-<h>:   ip saddr in ranges: return; else drop
//!   sep-<h>:  (affinity only) external masquerade if remote, affinity
//!             update, counter, dnat
//! ```
//!
//! Not an inline `numgen ... map { }` / `vmap { }` per service: each is an
//! anonymous set, and the kernel's naming of anonymous sets scans the
//! table's sets, so 10k of them cost seconds of system time.
//!
//! No-endpoint rejects sit in prerouting (nft allows `reject` there), so
//! they work on nodes without a route for the service range too.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use super::fallback::{
    Family, MASQ_MARK, RuleOptions, endpoint_hash, frontend_hash,
    incremental::{Content, Delta, Found, Generator, Item, State, hash_lines},
    proto_lower,
};
use crate::lb::{Frontend, FrontendKey, FrontendKind};

/// Our table's name (one in family `ip`, one in `ip6`).
pub const TABLE: &str = "kube-proxy-rs";

/// Names of the maps and sets declared with the table.
const CONTAINER_NAMES: [&str; 7] = [
    "service-ips",
    "service-nodeports",
    "no-endpoint-services",
    "no-endpoint-nodeports",
    "firewall-ips",
    "nodeport-ips",
    HAIRPIN_SET,
];

/// Maps and sets declared with the table of `family`: (kind, name, body).
fn containers(family: Family) -> [(&'static str, &'static str, String); 7] {
    let a = family.nft_addr_type();
    [
        (
            "map",
            "service-ips",
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        (
            "map",
            "service-nodeports",
            "type inet_proto . inet_service : verdict;".to_owned(),
        ),
        (
            "map",
            "no-endpoint-services",
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        (
            "map",
            "no-endpoint-nodeports",
            "type inet_proto . inet_service : verdict;".to_owned(),
        ),
        (
            "map",
            "firewall-ips",
            format!("type {a} . inet_proto . inet_service : verdict;"),
        ),
        ("set", "nodeport-ips", format!("type {a};")),
        ("set", HAIRPIN_SET, format!("type {a} . {a};")),
    ]
}

fn fixed_chains(family: Family) -> BTreeMap<String, Content> {
    let ip = family.nft();
    let c = |hook: Option<&'static str>, rules: &[&str]| Content {
        hook,
        lines: rules.iter().map(|r| (*r).to_owned()).collect(),
    };
    let masq = format!("meta mark set meta mark | {MASQ_MARK:#x}");
    let unmark = format!("meta mark set meta mark ^ {MASQ_MARK:#x}");
    let skip = format!("meta mark & {MASQ_MARK:#x} == 0 return");
    BTreeMap::from([
        (
            "nat-prerouting".to_owned(),
            c(
                Some("type nat hook prerouting priority dstnat; policy accept;"),
                &["jump services"],
            ),
        ),
        (
            "nat-output".to_owned(),
            c(
                Some("type nat hook output priority -100; policy accept;"),
                &["jump services"],
            ),
        ),
        (
            "nat-postrouting".to_owned(),
            c(
                Some("type nat hook postrouting priority srcnat; policy accept;"),
                &["jump masquerading"],
            ),
        ),
        (
            "filter-prerouting".to_owned(),
            c(
                Some("type filter hook prerouting priority dstnat - 10; policy accept;"),
                &[
                    "ct state new jump firewall-check",
                    "ct state new jump service-endpoints-check",
                ],
            ),
        ),
        (
            "filter-output".to_owned(),
            c(
                Some("type filter hook output priority -110; policy accept;"),
                &[
                    "ct state new jump firewall-check",
                    "ct state new jump service-endpoints-check",
                ],
            ),
        ),
        (
            "services".to_owned(),
            c(
                None,
                &[
                    &format!("{ip} daddr . meta l4proto . th dport vmap @service-ips"),
                    &format!(
                        "fib daddr type local {ip} daddr @nodeport-ips counter meta l4proto . th dport vmap @service-nodeports"
                    ),
                ],
            ),
        ),
        (
            "firewall-check".to_owned(),
            c(
                None,
                &[&format!(
                    "{ip} daddr . meta l4proto . th dport vmap @firewall-ips"
                )],
            ),
        ),
        (
            "service-endpoints-check".to_owned(),
            c(
                None,
                &[
                    &format!("{ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
                    &format!(
                        "fib daddr type local {ip} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
                    ),
                ],
            ),
        ),
        (
            "reject-chain".to_owned(),
            c(
                None,
                &[
                    "meta l4proto tcp counter reject with tcp reset",
                    "counter reject",
                ],
            ),
        ),
        (
            "masquerading".to_owned(),
            Content::rules(vec![
                format!(
                    "ct status dnat {ip} saddr . {ip} daddr @{HAIRPIN_SET} jump mark-for-masquerade"
                ),
                skip,
                unmark,
                "masquerade fully-random".to_owned(),
            ]),
        ),
        ("mark-for-masquerade".to_owned(), Content::rules(vec![masq])),
    ])
}

/// The chain hash of a frontend; NodePort frontends (one per node address
/// in [`crate::lb`]) share one chain per port, as they share one map entry.
fn chain_hash(k: &FrontendKey, f: &Frontend) -> String {
    if f.kind == FrontendKind::NodePort {
        frontend_hash(&FrontendKey {
            addr: NODEPORT_ADDR,
            ..*k
        })
    } else {
        frontend_hash(k)
    }
}

/// The address NodePort chains are keyed by (whatever the family: each
/// family has its own table).
const NODEPORT_ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// The set of `endpoint . endpoint` pairs whose connections (a pod
/// reaching itself through a service) are masqueraded.
pub const HAIRPIN_SET: &str = "hairpin-endpoints";

/// A frontend's endpoints in rule order: as given, except that for an
/// external frontend the local ones come first (see the service chain).
pub fn endpoint_order(f: &Frontend) -> Vec<crate::lb::BackendAddr> {
    let mut order: Vec<crate::lb::BackendAddr> = f.backends.iter().collect();
    if f.kind != FrontendKind::ClusterIp {
        order.sort_by_key(|b| !b.local);
    }
    order
}

/// The condition of rule `i` of `n` in a uniform cascade: taken with
/// probability 1/(n-i); the last one always.
fn pick(i: usize, n: usize) -> String {
    if i + 1 < n {
        format!("numgen random mod {} 0 ", n - i)
    } else {
        String::new()
    }
}

/// kube-proxy's nftables rules of one family's table, one frontend at a
/// time (frontends of the other family contribute nothing).
#[derive(Clone, Debug, Default)]
pub struct NftablesRules {
    pub opts: RuleOptions,
    pub family: Family,
}

impl NftablesRules {
    pub fn new(opts: RuleOptions, family: Family) -> NftablesRules {
        NftablesRules { opts, family }
    }
}

fn chain(name: String) -> Item {
    Item::Chain("", name.into())
}

fn elem(map: &'static str, key: String) -> Item {
    Item::Element(map, key.into())
}

fn value(v: String) -> Content {
    Content::rules(vec![v])
}

impl Generator for NftablesRules {
    fn fixed(&self) -> Vec<(Item, Content)> {
        let mut out: Vec<(Item, Content)> = fixed_chains(self.family)
            .into_iter()
            .map(|(n, c)| (chain(n), c))
            .collect();
        let mut rules: Vec<String> = self
            .opts
            .pod_interface_prefixes
            .iter()
            .map(|p| format!("iifname \"{p}*\" return"))
            .collect();
        rules.push("jump mark-for-masquerade".to_owned());
        out.push((
            chain("mark-for-masquerade-external".to_owned()),
            Content::rules(rules),
        ));
        out
    }

    fn frontend(&self, k: &FrontendKey, f: &Frontend, out: &mut Vec<(Item, Content)>) {
        if !self.family.has(k) {
            return;
        }
        let ip = self.family.nft();
        let p = proto_lower(k.proto);
        let h = chain_hash(k, f);
        let full_key = format!("{} . {p} . {}", k.addr, k.port);
        let port_key = format!("{p} . {}", k.port);
        let nodeport = f.kind == FrontendKind::NodePort;
        if nodeport {
            out.push((elem("nodeport-ips", k.addr.to_string()), Content::default()));
        }
        let source_ranges = self.family.ranges(&f.source_ranges);
        if !source_ranges.is_empty() {
            let fw = format!("fw-{}", frontend_hash(k));
            let ranges: Vec<String> = source_ranges
                .iter()
                .map(|(n, l)| format!("{n}/{l}"))
                .collect();
            out.push((
                chain(fw.clone()),
                Content::rules(vec![
                    format!("{ip} saddr {{ {} }} return", ranges.join(", ")),
                    "counter drop".to_owned(),
                ]),
            ));
            out.push((
                elem("firewall-ips", full_key.clone()),
                value(format!("goto {fw}")),
            ));
        }
        if f.backends.is_empty() {
            let (map, key) = if nodeport {
                ("no-endpoint-nodeports", port_key)
            } else {
                ("no-endpoint-services", full_key)
            };
            out.push((elem(map, key), value("goto reject-chain".to_owned())));
            return;
        }
        let svc = format!("svc-{h}");
        let (map, key) = if nodeport {
            ("service-nodeports", port_key)
        } else {
            ("service-ips", full_key)
        };
        out.push((elem(map, key), value(format!("goto {svc}"))));
        // A pod reaching itself through the service: masqueraded in
        // postrouting (one set element, not a chain per endpoint).
        let mut addrs: Vec<IpAddr> = f.backends.iter().map(|b| b.addr).collect();
        addrs.sort_unstable();
        addrs.dedup(); // one pair per address, whatever its ports
        for a in addrs {
            out.push((elem(HAIRPIN_SET, format!("{a} . {a}")), Content::default()));
        }
        // For NodePorts the chains are keyed by port only.
        let ck = if nodeport {
            FrontendKey {
                addr: NODEPORT_ADDR,
                ..*k
            }
        } else {
            *k
        };
        let external = f.kind != FrontendKind::ClusterIp;
        let order = endpoint_order(f);
        let n = order.len();
        let mut svc_rules = Vec::new();
        if f.affinity_timeout > 0 {
            // ClientIP affinity needs per-endpoint state: a set of clients
            // and a chain that records the client and DNATs.
            let seps: Vec<String> = order
                .iter()
                .map(|b| format!("sep-{}", endpoint_hash(&ck, b)))
                .collect();
            for (b, sep) in order.iter().zip(&seps) {
                let set = format!("aff-{}-{}", &sep[4..], f.affinity_timeout);
                out.push((
                    Item::Set(set.as_str().into()),
                    value(format!(
                        "type {}; flags dynamic,timeout; timeout {}s;",
                        self.family.nft_addr_type(),
                        f.affinity_timeout
                    )),
                ));
                svc_rules.push(format!("{ip} saddr @{set} goto {sep}"));
                let mut sep_rules = Vec::new();
                if external && !b.local {
                    sep_rules.push("jump mark-for-masquerade-external".to_owned());
                }
                sep_rules.push(format!("update @{set} {{ {ip} saddr }}"));
                sep_rules.push(format!(
                    "meta l4proto {p} counter dnat to {}",
                    SocketAddr::new(b.addr, b.port)
                ));
                out.push((chain(sep.clone()), Content::rules(sep_rules)));
            }
            for (i, sep) in seps.iter().enumerate() {
                svc_rules.push(format!("{}goto {sep}", pick(i, n)));
            }
        } else {
            // Uniform choice as kube-proxy's iptables mode makes it: rule i
            // of n is taken with probability 1/(n-i). Local endpoints come
            // first, so for an external frontend every rule after the last
            // local one picks a remote endpoint: the masquerade mark for
            // those goes in once, before them.
            for (i, b) in order.iter().enumerate() {
                if external && !b.local && (i == 0 || order[i - 1].local) {
                    svc_rules.push("jump mark-for-masquerade-external".to_owned());
                }
                svc_rules.push(format!(
                    "{}meta l4proto {p} counter dnat to {}",
                    pick(i, n),
                    SocketAddr::new(b.addr, b.port)
                ));
            }
        }
        out.push((chain(svc), Content::rules(svc_rules)));
    }

    fn fingerprint(&self, item: &Item, c: &Content) -> u64 {
        match item {
            // A set is right if it exists: its name holds its timeout.
            Item::Set(_) => hash_lines([]),
            _ => {
                let hook = c.hook.map(normalise);
                let norm: Vec<String> = c.lines.iter().map(|l| normalise(l)).collect();
                hash_lines(hook.iter().chain(&norm).map(String::as_str))
            }
        }
    }
}

/// A rule (or base-chain declaration, or element value) in a form that
/// does not depend on how it was written or how `nft list` prints it:
/// counters without their values, hexadecimal numbers in decimal, an
/// anonymous set of one element without braces.
pub fn normalise(rule: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut words = rule.split_whitespace().peekable();
    while let Some(w) = words.next() {
        if w == "packets" || w == "bytes" {
            words.next();
            continue;
        }
        let (core, semi) = match w.strip_suffix(';') {
            Some(c) => (c, ";"),
            None => (w, ""),
        };
        let core = match core.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
            Some(Ok(n)) => n.to_string(),
            _ => core.to_owned(),
        };
        out.push(format!("{core}{semi}"));
    }
    // `{ x }` -> `x`
    let mut i = 0;
    while i + 2 < out.len() {
        if out[i] == "{" && out[i + 2] == "}" && !out[i + 1].ends_with(',') {
            out.remove(i + 2);
            out.remove(i);
        }
        i += 1;
    }
    out.join(" ")
}

/// What a render changes: chains written and deleted, elements added and
/// deleted (as `container key`); with [`render_to`]'s `detail` off only
/// their numbers (a first sync adds ~10 elements per service: their text
/// is not kept).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub chains_written: Vec<String>,
    pub chains_deleted: Vec<String>,
    pub elements_added: Vec<String>,
    pub elements_deleted: Vec<String>,
    /// (chains written, chains deleted, elements added, elements deleted)
    pub counts: (usize, usize, usize, usize),
    detail: bool,
}

impl Plan {
    fn note(&mut self, which: usize, what: impl FnOnce() -> String) {
        let (cw, cd, ea, ed) = &mut self.counts;
        let (n, list) = match which {
            0 => (cw, &mut self.chains_written),
            1 => (cd, &mut self.chains_deleted),
            2 => (ea, &mut self.elements_added),
            _ => (ed, &mut self.elements_deleted),
        };
        *n += 1;
        if self.detail {
            list.push(what());
        }
    }
}

fn element(key: &str, c: &Content) -> String {
    match c.lines.first() {
        Some(v) => format!("{key} : {v}"),
        None => key.to_owned(),
    }
}

/// Creates our table of `family` and its maps and sets unless they exist
/// (`add` leaves existing ones and their elements alone).
pub fn render_prelude(family: Family) -> String {
    let t = format!("{} {TABLE}", family.nft());
    let mut out = format!("add table {t}\n");
    for (kind, name, body) in containers(family) {
        let _ = writeln!(out, "add {kind} {t} {name} {{ {body} }}");
    }
    out
}

/// The `nft -f` input for `delta` in our table of `family`, one
/// transaction: new affinity sets,
/// chains declared then (flushed and) filled, map elements deleted (a
/// changed verdict is deleted and re-added) and added, then chains and
/// sets nothing refers to any more deleted.
pub fn render(delta: &Delta, family: Family) -> (String, Plan) {
    let mut out = String::new();
    let plan = render_to(&mut out, delta, true, family);
    (out, plan)
}

/// [`render`] into `out` (the tool's stdin: the input is not held whole).
pub fn render_to<W: std::fmt::Write + ?Sized>(
    out: &mut W,
    delta: &Delta,
    detail: bool,
    family: Family,
) -> Plan {
    let mut plan = Plan {
        detail,
        ..Plan::default()
    };
    let t = format!("{} {TABLE}", family.nft());
    let addr_type = format!("type {};", family.nft_addr_type());
    let ups = || delta.upsert.iter().zip(&delta.existed);
    for ((item, c, _), existed) in ups() {
        if let (Item::Set(name), false) = (item, existed) {
            let body = c.lines.first().map_or(addr_type.as_str(), String::as_str);
            let _ = writeln!(out, "add set {t} {name} {{ {body} }}");
        }
    }
    // Declare every chain first (rules may jump to new ones).
    for ((item, c, _), _) in ups() {
        if let Item::Chain(_, name) = item {
            match c.hook {
                Some(h) => {
                    let _ = writeln!(out, "add chain {t} {name} {{ {h} }}");
                }
                None => {
                    let _ = writeln!(out, "add chain {t} {name}");
                }
            }
        }
    }
    for ((item, c, _), existed) in ups() {
        if let Item::Chain(_, name) = item {
            if *existed {
                let _ = writeln!(out, "flush chain {t} {name}");
            }
            for rule in &c.lines {
                let _ = writeln!(out, "add rule {t} {name} {rule}");
            }
            plan.note(0, || name.to_string());
        }
    }
    for (item, _) in &delta.delete {
        if let Item::Element(map, key) = item {
            let _ = writeln!(out, "delete element {t} {map} {{ {key} }}");
            plan.note(3, || format!("{map} {key}"));
        }
    }
    for ((item, _, _), existed) in ups() {
        if let (Item::Element(map, key), true) = (item, existed) {
            let _ = writeln!(out, "delete element {t} {map} {{ {key} }}");
            plan.note(3, || format!("{map} {key}"));
        }
    }
    // Added in batches: one command per 256 elements of a container (a
    // first sync adds ~10 per service).
    let mut batch: Option<(&str, usize)> = None;
    for ((item, c, _), _) in ups() {
        if let Item::Element(map, key) = item {
            let e = element(key, c);
            match batch {
                Some((m, k)) if m == *map && k < 256 => {
                    let _ = write!(out, ", {e}");
                    batch = Some((m, k + 1));
                }
                _ => {
                    if batch.is_some() {
                        let _ = writeln!(out, " }}");
                    }
                    let _ = write!(out, "add element {t} {map} {{ {e}");
                    batch = Some((map, 1));
                }
            }
            plan.note(2, || format!("{map} {e}"));
        }
    }
    if batch.is_some() {
        let _ = writeln!(out, " }}");
    }
    // Stale chains may jump to each other: flush all first, then delete.
    for (item, _) in &delta.delete {
        if let Item::Chain(_, name) = item {
            let _ = writeln!(out, "flush chain {t} {name}");
        }
    }
    for (item, _) in &delta.delete {
        if let Item::Chain(_, name) = item {
            let _ = writeln!(out, "delete chain {t} {name}");
            plan.note(1, || name.to_string());
        }
    }
    for (item, _) in &delta.delete {
        if let Item::Set(name) = item {
            let _ = writeln!(out, "delete set {t} {name}");
        }
    }
    plan
}

/// What our table holds, from `nft list table ip kube-proxy-rs` (or `ip6`)
/// output:
/// chains with the fingerprint of their (normalised) rules, elements of
/// our maps and sets with that of their value, affinity sets.
pub fn found(list: &str, rules: &NftablesRules) -> Vec<Found> {
    let mut out = Vec::new();
    let mut lines = list.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            // A base chain's declaration comes first; fingerprinted as
            // [`Generator::fingerprint`] does a hook and its rules.
            let mut norm = Vec::new();
            for l in lines.by_ref() {
                if l == "}" {
                    break;
                }
                if !l.is_empty() {
                    norm.push(normalise(l));
                }
            }
            let fp = hash_lines(norm.iter().map(String::as_str));
            out.push(Found {
                item: chain(name.to_owned()),
                fingerprint: fp,
                text: None,
            });
            continue;
        }
        let container = line
            .strip_prefix("map ")
            .or_else(|| line.strip_prefix("set "))
            .and_then(|l| l.strip_suffix(" {"));
        let Some(name) = container else { continue };
        let known = CONTAINER_NAMES.iter().find(|n| **n == name).copied();
        if known.is_none() && name.starts_with("aff-") {
            out.push(Found {
                item: Item::Set(name.into()),
                fingerprint: hash_lines([]),
                text: None,
            });
        }
        // The body up to the container's closing brace.
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "}" {
                break;
            }
            body.push_str(l);
            body.push(' ');
        }
        let Some(map) = known else { continue };
        let Some(start) = body.find("elements = {") else {
            continue;
        };
        let rest = &body[start + "elements = {".len()..];
        let rest = rest.rsplit_once('}').map_or(rest, |(r, _)| r);
        for e in rest.split(',') {
            let e = e.trim();
            if e.is_empty() {
                continue;
            }
            let (key, v) = match e.split_once(" : ") {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (e, None),
            };
            let c = Content::rules(v.map(str::to_owned).into_iter().collect());
            let item = elem(map, key.to_owned());
            out.push(Found {
                fingerprint: rules.fingerprint(&item, &c),
                item,
                text: None,
            });
        }
    }
    out
}

/// The input a writer starting from an empty table of `family` sends for
/// `frontends`.
pub fn full_input(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    opts: &RuleOptions,
    family: Family,
) -> String {
    let g = NftablesRules::new(opts.clone(), family);
    let mut s = State::default();
    let mut out = render_prelude(family);
    out.push_str(&render(&s.plan(&g, frontends, None), family).0);
    out
}

/// The input that removes our table of `family` (`--cleanup`), whether or
/// not it exists.
pub fn render_cleanup(family: Family) -> String {
    let t = format!("{} {TABLE}", family.nft());
    format!("add table {t}\ndelete table {t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_ruleset_renders_nothing() {
        let g = NftablesRules::default();
        let mut s = State::default();
        let d = s.plan(&g, &BTreeMap::new(), None);
        assert!(!d.is_empty());
        s.commit(d);
        assert!(s.plan(&g, &BTreeMap::new(), None).is_empty());
    }

    #[test]
    fn normalise_matches_listing() {
        assert_eq!(
            normalise("meta mark & 0x4000 == 0 return"),
            normalise("meta mark & 0x00004000 == 0x00000000 return")
        );
        assert_eq!(
            normalise("ip saddr { 203.0.113.0/24 } return"),
            normalise("ip saddr 203.0.113.0/24 return")
        );
        assert_eq!(
            normalise("meta l4proto tcp counter dnat to 10.0.0.1:80"),
            normalise("meta l4proto tcp counter packets 3 bytes 180 dnat to 10.0.0.1:80")
        );
    }

    #[test]
    fn a_new_service_adds_one_element_and_its_chains() {
        let k = |i: u8| FrontendKey {
            addr: std::net::Ipv4Addr::new(10, 96, 0, i).into(),
            port: 80,
            proto: crate::model::Protocol::Tcp,
        };
        let f = |i: u8| Frontend {
            kind: FrontendKind::ClusterIp,
            backends: vec![crate::lb::BackendAddr {
                addr: std::net::Ipv4Addr::new(10, 244, 0, i).into(),
                port: 8080,
                terminating: false,
                local: true,
            }]
            .into(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        };
        let before: BTreeMap<_, _> = (1..=40).map(|i| (k(i), f(i))).collect();
        let mut after = before.clone();
        after.insert(k(41), f(41));
        let g = NftablesRules::default();
        let mut s = State::default();
        let d = s.plan(&g, &before, None);
        s.commit(d);
        let (input, plan) = render(&s.plan(&g, &after, Some(&[(k(41), None)])), Family::V4);
        assert_eq!(plan.chains_written.len(), 1, "svc only: {input}");
        // Its service-ips element and its endpoint's hairpin pair.
        assert_eq!(plan.elements_added.len(), 2, "{input}");
        assert!(plan.elements_deleted.is_empty() && plan.chains_deleted.is_empty());
        assert!(
            input.contains(
                "add element ip kube-proxy-rs service-ips { 10.96.0.41 . tcp . 80 : goto svc-"
            ),
            "{input}"
        );
        assert_eq!(input.lines().count(), 4, "{input}");
    }

    #[test]
    fn nodeport_chains_shared_by_node_addresses_stay_while_one_remains() {
        let k = |a: u8| FrontendKey {
            addr: std::net::Ipv4Addr::new(172, 18, 0, a).into(),
            port: 30080,
            proto: crate::model::Protocol::Tcp,
        };
        let f = Frontend {
            kind: FrontendKind::NodePort,
            backends: vec![crate::lb::BackendAddr {
                addr: std::net::Ipv4Addr::new(10, 244, 0, 2).into(),
                port: 8080,
                terminating: false,
                local: true,
            }]
            .into(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        };
        let both: BTreeMap<_, _> = [(k(11), f.clone()), (k(12), f.clone())].into();
        let g = NftablesRules::default();
        let mut s = State::default();
        let d = s.plan(&g, &both, None);
        s.commit(d);
        let one: BTreeMap<_, _> = [(k(11), f.clone())].into();
        let (input, plan) = render(&s.plan(&g, &one, Some(&[(k(12), Some(f))])), Family::V4);
        assert!(
            plan.chains_deleted.is_empty() && plan.chains_written.is_empty(),
            "{input}"
        );
        assert_eq!(
            plan.elements_deleted,
            vec!["nodeport-ips 172.18.0.12"],
            "{input}"
        );
    }
}
