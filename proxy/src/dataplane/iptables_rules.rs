//! kube-proxy's iptables rules for a set of frontends, and the
//! `iptables-restore --noflush` input that moves the kernel from one rule
//! set to the next rewriting only the chains that changed (KEP-3453's
//! partial sync). Pure: no kernel, no processes.
//!
//! Chains (all in the tables kube-proxy uses, all named as kube-proxy names
//! them, so the rules read the same):
//!
//! * nat `KUBE-SERVICES` (from PREROUTING and OUTPUT): one rule per
//!   frontend with endpoints, `-d addr -p proto --dport port`, to its
//!   `KUBE-SVC-*` (ClusterIP), `KUBE-EXT-*` (ExternalIP, LoadBalancer) or
//!   `KUBE-FW-*` (with `loadBalancerSourceRanges`); last, local
//!   destinations go to `KUBE-NODEPORTS` (the NodePort frontends).
//! * `KUBE-EXT-<h>`: external traffic (NodePort, ExternalIP, LoadBalancer),
//!   on to `KUBE-SVC-<h>`; its `KUBE-SEP-*` chains send traffic to a backend
//!   on another node through `KUBE-MARK-MASQ-EXT`, which masquerades unless
//!   it came from a local pod (`-i <pod interface prefix>+`, kube-proxy's
//!   interface-name local detection), so the reply comes back through this
//!   node. Local backends see the client (kube-proxy masquerades all
//!   external traffic under `externalTrafficPolicy: Cluster`; the eBPF mode
//!   and this one only what must be).
//! * `KUBE-FW-<h>`: listed source ranges go on to `KUBE-EXT-<h>`, the rest
//!   is marked for the filter table's `KUBE-FIREWALL` to drop (and
//!   REDIRECTed, so it reaches INPUT on a node without a route for it).
//! * `KUBE-SVC-<h>`: one rule per backend with `-m statistic --mode random
//!   --probability 1/(n-i)` (uniform) that DNATs to it: no chain per
//!   endpoint (110k chains at 10k services x 10 endpoints make
//!   `iptables-restore` superlinearly slow). For an external frontend
//!   the local backends come first and one `-j KUBE-MARK-MASQ-EXT` sits
//!   before the first remote one.
//! * `KUBE-SEP-<h>`, with ClientIP affinity only: the service chain checks
//!   each endpoint's `-m recent` list and jumps here (external masquerade
//!   if remote, `--set`, DNAT).
//! * `KUBE-POSTROUTING` (from POSTROUTING): hairpin (a DNATed connection
//!   matching the `KUBE-RS-HAIRPIN` ip set `dst,dst,src`, entries
//!   `endpoint,proto:port,endpoint`) is marked; marked packets are
//!   masqueraded.
//! * filter `KUBE-SERVICES` (INPUT, FORWARD, OUTPUT) and
//!   `KUBE-EXTERNAL-SERVICES` (INPUT, FORWARD): REJECT for frontends
//!   without endpoints, matched on the conntrack original destination.
//!   Unlike kube-proxy, such traffic to a non-local address is first
//!   REDIRECTed in nat `KUBE-SERVICES`, so the reject also works on a node
//!   without a route for the service range (where FORWARD is never
//!   reached); TCP is refused with a reset (not rate-limited like ICMP).
//!
//! `<h>` is [`frontend_hash`] / [`endpoint_hash`]: one chain per frontend
//! (a ClusterIP and each node address of a NodePort are separate frontends
//! in [`crate::lb`]), stable across restarts.
//!
//! Per address family, as kube-proxy runs one proxier per family: the
//! IPv4 frontends' rules go to iptables, the IPv6 ones' to ip6tables
//! (same chains, same generator, [`IptablesRules::family`]: `/128`
//! matches, `icmp6-port-unreachable`, the IPv6 `recent` mask, `[addr]:port`
//! DNAT, and the hairpin set `KUBE-RS-HAIRPIN6` of family `inet6`).

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use super::fallback::{
    DROP_MARK, Family, MASQ_MARK, RuleOptions, endpoint_hash, frontend_hash,
    incremental::{Content, Delta, Found, Generator, Item, State, hash_lines},
    proto_lower,
};
use crate::lb::{Frontend, FrontendKey, FrontendKind};

/// Chains we own in the nat table whatever the services.
pub const NAT_FIXED: [&str; 6] = [
    "KUBE-MARK-MASQ-EXT",
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-MARK-DROP",
];
/// Chains we own in the filter table whatever the services.
pub const FILTER_FIXED: [&str; 3] = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FIREWALL"];
/// Prefixes of the per-service chains we own (nat table).
pub const NAT_PREFIXES: [&str; 4] = ["KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-FW-"];

/// Comment on the jumps from the built-in chains, so they are found again.
pub const JUMP_COMMENT: &str = "kube-proxy-rs";

/// Jumps from built-in chains into ours: (table, built-in chain, rule
/// spec). Inserted once (checked with `-C`), removed by cleanup.
pub fn jumps() -> Vec<(&'static str, &'static str, String)> {
    let c = format!("-m comment --comment {JUMP_COMMENT}");
    let new = "-m conntrack --ctstate NEW";
    vec![
        ("nat", "PREROUTING", format!("{c} -j KUBE-SERVICES")),
        ("nat", "OUTPUT", format!("{c} -j KUBE-SERVICES")),
        ("nat", "POSTROUTING", format!("{c} -j KUBE-POSTROUTING")),
        (
            "filter",
            "INPUT",
            format!("{c} {new} -j KUBE-EXTERNAL-SERVICES"),
        ),
        (
            "filter",
            "FORWARD",
            format!("{c} {new} -j KUBE-EXTERNAL-SERVICES"),
        ),
        ("filter", "INPUT", format!("{c} {new} -j KUBE-SERVICES")),
        ("filter", "FORWARD", format!("{c} {new} -j KUBE-SERVICES")),
        ("filter", "OUTPUT", format!("{c} {new} -j KUBE-SERVICES")),
        ("filter", "INPUT", format!("{c} -j KUBE-FIREWALL")),
        ("filter", "FORWARD", format!("{c} -j KUBE-FIREWALL")),
        ("filter", "OUTPUT", format!("{c} -j KUBE-FIREWALL")),
    ]
}

/// Chains that hold rules of many frontends (each such rule is its own
/// [`Item::Rule`], added and deleted alone) besides their fixed rules:
/// (table, chain).
pub const SHARED: [(&str, &str); 4] = [
    ("nat", "KUBE-SERVICES"),
    ("nat", "KUBE-NODEPORTS"),
    ("filter", "KUBE-SERVICES"),
    ("filter", "KUBE-EXTERNAL-SERVICES"),
];

fn shared(table: &str, chain: &str) -> Option<(&'static str, &'static str)> {
    SHARED
        .iter()
        .find(|(t, c)| *t == table && *c == chain)
        .copied()
}

/// kube-proxy's probability for backend `i` of `n`: 1/(n-i), printed as it
/// prints it (10 decimals).
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// `-m statistic` for rule `i` of `n` of a uniform cascade (none for the
/// last).
fn statistic(i: usize, n: usize) -> String {
    if i + 1 < n {
        format!(
            "-m statistic --mode random --probability {} ",
            probability(i, n)
        )
    } else {
        String::new()
    }
}

/// The ip set (`hash:ip,port,ip`) of endpoints that may reach themselves
/// through a service; KUBE-POSTROUTING masquerades DNATed connections
/// matching it `dst,dst,src` (kube-proxy's ipvs mode's KUBE-LOOP-BACK).
pub const HAIRPIN_SET: &str = "KUBE-RS-HAIRPIN";

/// [`HAIRPIN_SET`] of the IPv6 rules (an ip set holds one family).
pub const HAIRPIN_SET6: &str = "KUBE-RS-HAIRPIN6";

/// The hairpin ip set of `family`.
pub fn hairpin_set(family: Family) -> &'static str {
    match family {
        Family::V4 => HAIRPIN_SET,
        Family::V6 => HAIRPIN_SET6,
    }
}

/// The `ipset create` arguments of [`HAIRPIN_SET`] (after the name):
/// room for 10 endpoints x 2 ports of 50k services (the default, 65536,
/// is full before 10k services x 10 endpoints).
pub const HAIRPIN_SET_TYPE: [&str; 3] = ["hash:ip,port,ip", "maxelem", "1048576"];

/// The `ipset create` arguments of the hairpin set of `family`.
pub fn hairpin_set_type(family: Family) -> Vec<&'static str> {
    let mut v = HAIRPIN_SET_TYPE.to_vec();
    if family == Family::V6 {
        v.extend(["family", "inet6"]);
    }
    v
}

/// The `-m recent --mask` of one address of `family`.
fn recent_mask(family: Family) -> &'static str {
    match family {
        Family::V4 => "255.255.255.255",
        Family::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// A [`HAIRPIN_SET`] entry as `ipset save` prints it.
pub fn hairpin_entry(k: &FrontendKey, b: &crate::lb::BackendAddr) -> String {
    format!("{},{}:{},{}", b.addr, proto_lower(k.proto), b.port, b.addr)
}

/// Splits a rule into words, a double-quoted string being one word
/// (without its quotes).
fn words(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    for ch in rule.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// A rule body (what follows `-A CHAIN`) in a form that does not depend on
/// how it was written or how `iptables-save` prints it: options (an option
/// word and its arguments; a `!` belongs to the option after it) sorted,
/// quotes dropped, `/32` (`/128` of an IPv6 address) dropped, decimals to
/// 6 places (iptables-save prints probabilities with 11).
pub fn normalise(rule: &str) -> String {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut negate = false;
    for w in words(rule) {
        let w = match w.strip_suffix("/32") {
            Some(a) if a.parse::<std::net::Ipv4Addr>().is_ok() => a.to_owned(),
            _ => match w.strip_suffix("/128") {
                Some(a) if a.parse::<std::net::Ipv6Addr>().is_ok() => a.to_owned(),
                _ => w,
            },
        };
        let w = match w.parse::<f64>() {
            Ok(x) if w.contains('.') => format!("{x:.6}"),
            _ => w,
        };
        if w == "!" {
            negate = true;
            continue;
        }
        if w.starts_with('-') || groups.is_empty() {
            let mut g = Vec::new();
            if std::mem::take(&mut negate) {
                g.push("!".to_owned());
            }
            g.push(w);
            groups.push(g);
        } else if let Some(g) = groups.last_mut() {
            if std::mem::take(&mut negate) {
                g.push("!".to_owned());
            }
            g.push(w);
        }
    }
    let mut parts: Vec<String> = groups.into_iter().map(|g| g.join(" ")).collect();
    parts.sort();
    parts.join(" | ")
}

/// kube-proxy's iptables rules of one family (iptables or ip6tables), one
/// frontend at a time (frontends of the other family contribute nothing).
#[derive(Clone, Debug, Default)]
pub struct IptablesRules {
    pub opts: RuleOptions,
    pub family: Family,
}

impl IptablesRules {
    pub fn new(opts: RuleOptions, family: Family) -> IptablesRules {
        IptablesRules { opts, family }
    }
}

fn chain(table: &'static str, name: &str) -> Item {
    Item::Chain(table, name.into())
}

/// Appends `rule` to chain `name` of `table` among `out` (creating it).
fn push(out: &mut Vec<(Item, Content)>, table: &'static str, name: &str, rule: String) {
    if let Some((t, c)) = shared(table, name) {
        let h = hash_lines([normalise(&rule).as_str()]);
        out.push((Item::Rule(t, c, h), Content::rules(vec![rule])));
        return;
    }
    match out
        .iter_mut()
        .find(|(i, _)| matches!(i, Item::Chain(t, n) if *t == table && **n == *name))
    {
        Some((_, c)) => c.lines.push(rule),
        None => out.push((chain(table, name), Content::rules(vec![rule]))),
    }
}

impl Generator for IptablesRules {
    fn fixed(&self) -> Vec<(Item, Content)> {
        let mut out: Vec<(Item, Content)> = FILTER_FIXED
            .iter()
            .map(|c| (chain("filter", c), Content::default()))
            .chain(
                NAT_FIXED
                    .iter()
                    .map(|c| (chain("nat", c), Content::default())),
            )
            .collect();
        let mut add = |table: &'static str, name: &str, rule: String| {
            if let Some((_, c)) = out
                .iter_mut()
                .find(|(i, _)| matches!(i, Item::Chain(t, n) if *t == table && **n == *name))
            {
                c.lines.push(rule);
            }
        };
        add(
            "nat",
            "KUBE-SERVICES",
            "-m comment --comment \"node ports; must be last\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
                .to_owned(),
        );
        // Marks as iptables-save prints them (--or-mark X is
        // --set-xmark X/X, --xor-mark X is --set-xmark X/0x0).
        add(
            "nat",
            "KUBE-MARK-MASQ",
            format!("-j MARK --set-xmark {MASQ_MARK:#x}/{MASQ_MARK:#x}"),
        );
        for prefix in &self.opts.pod_interface_prefixes {
            add(
                "nat",
                "KUBE-MARK-MASQ-EXT",
                format!(
                    "-i {prefix}+ -m comment --comment \"local pods keep their address\" -j RETURN"
                ),
            );
        }
        add("nat", "KUBE-MARK-MASQ-EXT", "-j KUBE-MARK-MASQ".to_owned());
        add(
            "nat",
            "KUBE-MARK-DROP",
            format!("-j MARK --set-xmark {DROP_MARK:#x}/{DROP_MARK:#x}"),
        );
        add(
            "nat",
            "KUBE-POSTROUTING",
            format!(
                "-m comment --comment \"hairpin: a pod reaching itself through a service\" -m conntrack --ctstate DNAT -m set --match-set {} dst,dst,src -j KUBE-MARK-MASQ",
                hairpin_set(self.family)
            ),
        );
        add(
            "nat",
            "KUBE-POSTROUTING",
            format!("-m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"),
        );
        add(
            "nat",
            "KUBE-POSTROUTING",
            format!("-j MARK --set-xmark {MASQ_MARK:#x}/0x0"),
        );
        add(
            "nat",
            "KUBE-POSTROUTING",
            "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
                .to_owned(),
        );
        add(
            "filter",
            "KUBE-FIREWALL",
            format!(
                "-m comment --comment \"dropped by loadBalancerSourceRanges\" -m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP"
            ),
        );
        out
    }

    fn frontend(&self, k: &FrontendKey, f: &Frontend, out: &mut Vec<(Item, Content)>) {
        if !self.family.has(k) {
            return;
        }
        let len = self.family.host_len();
        let mask = recent_mask(self.family);
        let p = proto_lower(k.proto);
        let m = format!("-d {}/{len} -p {p}", k.addr);
        let dport = format!("-m {p} --dport {}", k.port);
        let h = frontend_hash(k);
        if f.backends.is_empty() {
            let chain = match f.kind {
                FrontendKind::ClusterIp => "KUBE-SERVICES",
                _ => "KUBE-EXTERNAL-SERVICES",
            };
            // A node without a route for the service address would drop
            // the packet before FORWARD: REDIRECT makes it local (the
            // incoming interface's address), and the filter rule below,
            // matching the original destination, rejects it on INPUT.
            if f.kind != FrontendKind::NodePort {
                push(
                    out,
                    "nat",
                    "KUBE-SERVICES",
                    format!(
                        "{m} -m comment --comment \"{k} has no endpoints\" {dport} -j REDIRECT"
                    ),
                );
            }
            // TCP gets a reset: ICMP errors are rate-limited per peer
            // (net.ipv4.icmp_ratelimit), so a client retrying quickly
            // would wait for its SYN retransmit instead of being refused.
            let with = match (k.proto, self.family) {
                (crate::model::Protocol::Tcp, _) => "tcp-reset",
                (_, Family::V4) => "icmp-port-unreachable",
                (_, Family::V6) => "icmp6-port-unreachable",
            };
            push(
                out,
                "filter",
                chain,
                format!(
                    "-p {p} -m comment --comment \"{k} has no endpoints\" -m conntrack --ctorigdst {}/{len} --ctorigdstport {} -j REJECT --reject-with {with}",
                    k.addr, k.port
                ),
            );
            return;
        }
        let svc = format!("KUBE-SVC-{h}");
        let source_ranges = self.family.ranges(&f.source_ranges);
        let entry = match f.kind {
            FrontendKind::ClusterIp => svc.clone(),
            _ if !source_ranges.is_empty() => format!("KUBE-FW-{h}"),
            _ => format!("KUBE-EXT-{h}"),
        };
        let top = match f.kind {
            FrontendKind::NodePort => "KUBE-NODEPORTS",
            _ => "KUBE-SERVICES",
        };
        push(
            out,
            "nat",
            top,
            format!(
                "{m} -m comment --comment \"{k} {:?}\" {dport} -j {entry}",
                f.kind
            ),
        );
        if f.kind != FrontendKind::ClusterIp {
            let ext = format!("KUBE-EXT-{h}");
            if !source_ranges.is_empty() {
                let fw = format!("KUBE-FW-{h}");
                for (net, len) in &source_ranges {
                    push(out, "nat", &fw, format!("-s {net}/{len} -j {ext}"));
                }
                push(
                    out,
                    "nat",
                    &fw,
                    "-m comment --comment \"source not in loadBalancerSourceRanges\" -j KUBE-MARK-DROP"
                        .to_owned(),
                );
                // Made local so that filter INPUT's KUBE-FIREWALL sees and
                // drops it even on a node without a route for the address.
                push(out, "nat", &fw, "-j REDIRECT".to_owned());
            }
            push(out, "nat", &ext, format!("-j {svc}"));
        }
        // A pod reaching itself through the service is masqueraded in
        // KUBE-POSTROUTING, by one rule matching an ip set of
        // (endpoint, port, endpoint) entries: no chain per endpoint.
        for b in &f.backends {
            out.push((
                Item::Element(hairpin_set(self.family), hairpin_entry(k, &b).into()),
                Content::default(),
            ));
        }
        let external = f.kind != FrontendKind::ClusterIp;
        let order = super::nftables_rules::endpoint_order(f);
        let n = order.len();
        let mut svc_rules = Vec::new();
        if f.affinity_timeout > 0 {
            // ClientIP affinity needs per-endpoint state (the `recent`
            // list): a KUBE-SEP chain per endpoint, as kube-proxy has.
            let seps: Vec<String> = order
                .iter()
                .map(|b| format!("KUBE-SEP-{}", endpoint_hash(k, b)))
                .collect();
            for (b, sep) in order.iter().zip(&seps) {
                svc_rules.push(format!(
                    "-m comment --comment \"{}\" -m recent --rcheck --seconds {} --reap --name {sep} --mask {mask} --rsource -j {sep}",
                    SocketAddr::new(b.addr, b.port),
                    f.affinity_timeout
                ));
            }
            for (i, (b, sep)) in order.iter().zip(&seps).enumerate() {
                svc_rules.push(format!(
                    "-m comment --comment \"{}\" {}-j {sep}",
                    SocketAddr::new(b.addr, b.port),
                    statistic(i, n)
                ));
                let mut sep_rules = Vec::new();
                if external && !b.local {
                    sep_rules.push("-j KUBE-MARK-MASQ-EXT".to_owned());
                }
                sep_rules.push(format!(
                    "-p {p} -m recent --set --name {sep} --mask {mask} --rsource -m {p} -j DNAT --to-destination {}",
                    SocketAddr::new(b.addr, b.port)
                ));
                out.push((chain("nat", sep), Content::rules(sep_rules)));
            }
        } else {
            // DNAT straight from the service chain, rule i of n taken with
            // probability 1/(n-i). Local endpoints come first, so for an
            // external frontend every rule after the last local one picks
            // a remote endpoint: the masquerade mark for those goes in
            // once, before them.
            for (i, b) in order.iter().enumerate() {
                if external && !b.local && (i == 0 || order[i - 1].local) {
                    svc_rules.push("-j KUBE-MARK-MASQ-EXT".to_owned());
                }
                let to = SocketAddr::new(b.addr, b.port);
                svc_rules.push(format!(
                    "-p {p} -m comment --comment \"{to}\" {}-m {p} -j DNAT --to-destination {to}",
                    statistic(i, n),
                ));
            }
        }
        out.push((chain("nat", &svc), Content::rules(svc_rules)));
    }

    fn fingerprint(&self, item: &Item, c: &Content) -> u64 {
        match item {
            Item::Rule(_, _, h) => *h,
            _ => {
                let norm: Vec<String> = c.lines.iter().map(|l| normalise(l)).collect();
                hash_lines(norm.iter().map(String::as_str))
            }
        }
    }
}

/// What a render rewrites: chains (re)written and deleted (as
/// `table/chain`), and shared-chain rules added and deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub written: Vec<String>,
    pub deleted: Vec<String>,
    pub rules_added: usize,
    pub rules_deleted: usize,
}

/// The `iptables-restore --noflush` input for `delta`, one transaction per
/// table: rewritten and deleted chains are declared (which creates or
/// flushes them), shared-chain rules deleted by their text, rewritten
/// chains filled, new shared-chain rules inserted first in their chain
/// (before the fixed ones, like `node ports; must be last`), then chains
/// no longer wanted deleted. Everything else in the tables is left alone.
pub fn render(delta: &Delta) -> (String, Plan) {
    let mut out = String::new();
    let plan = render_to(&mut out, delta);
    (out, plan)
}

/// [`render`] into `out` (the tool's stdin: the input is not held whole).
pub fn render_to<W: std::fmt::Write + ?Sized>(out: &mut W, delta: &Delta) -> Plan {
    let mut plan = Plan::default();
    for table in ["filter", "nat"] {
        let ups = || {
            delta
                .upsert
                .iter()
                .filter(move |(i, _, _)| item_table(i) == Some(table))
        };
        let dels = || {
            delta
                .delete
                .iter()
                .filter(move |(i, _)| item_table(i) == Some(table))
        };
        if ups().next().is_none() && dels().next().is_none() {
            continue;
        }
        let _ = writeln!(out, "*{table}");
        for (i, _, _) in ups() {
            if let Item::Chain(_, c) = i {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
        }
        for (i, _) in dels() {
            if let Item::Chain(_, c) = i {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
        }
        for (i, text) in dels() {
            if let (Item::Rule(_, c, _), Some(text)) = (i, text) {
                let _ = writeln!(out, "-D {c} {text}");
                plan.rules_deleted += 1;
            }
        }
        for (i, content, _) in ups() {
            if let Item::Chain(_, c) = i {
                for r in &content.lines {
                    let _ = writeln!(out, "-A {c} {r}");
                }
                plan.written.push(format!("{table}/{c}"));
            }
        }
        for (i, content, _) in ups() {
            if let Item::Rule(_, c, _) = i {
                for r in &content.lines {
                    let _ = writeln!(out, "-I {c} 1 {r}");
                }
                plan.rules_added += 1;
            }
        }
        for (i, _) in dels() {
            if let Item::Chain(_, c) = i {
                let _ = writeln!(out, "-X {c}");
                plan.deleted.push(format!("{table}/{c}"));
            }
        }
        let _ = writeln!(out, "COMMIT");
    }
    plan
}

/// The `ipset restore -exist` inputs for `delta`'s [`HAIRPIN_SET`]
/// entries: (to add, before the rules go in; to delete, after they went).
pub fn render_ipset(delta: &Delta) -> (String, String) {
    let (mut add, mut del) = (String::new(), String::new());
    for (i, _, _) in &delta.upsert {
        if let Item::Element(set, e) = i {
            let _ = writeln!(add, "add {set} {e}");
        }
    }
    for (i, _) in &delta.delete {
        if let Item::Element(set, e) = i {
            let _ = writeln!(del, "del {set} {e}");
        }
    }
    (add, del)
}

/// The entries of the rules' family's hairpin set in `ipset save`
/// output, as [`Found`].
pub fn found_ipset(save: &str, rules: &IptablesRules) -> Vec<Found> {
    let name = hairpin_set(rules.family);
    save.lines()
        .filter_map(|l| l.strip_prefix("add ")?.split_once(' '))
        .filter(|(set, _)| *set == name)
        .map(|(_, e)| {
            let item = Item::Element(name, e.trim().into());
            Found {
                fingerprint: rules.fingerprint(&item, &Content::default()),
                item,
                text: None,
            }
        })
        .collect()
}

fn item_table(i: &Item) -> Option<&'static str> {
    match i {
        Item::Chain(t, _) | Item::Rule(t, _, _) => Some(t),
        _ => None,
    }
}

/// What our chains hold in `iptables-save -t <table>` output (`table` is
/// "filter" or "nat"), as [`Found`] items: whole chains with the
/// fingerprint of their rules, and each rule of a shared chain that is not
/// one of its fixed rules as an [`Item::Rule`].
pub fn found(save: &str, table: &'static str, rules: &IptablesRules) -> Vec<Found> {
    let fixed: BTreeMap<String, Vec<String>> = rules
        .fixed()
        .into_iter()
        .filter_map(|(i, c)| match i {
            Item::Chain(t, n) if t == table => {
                Some((n.into(), c.lines.iter().map(|l| normalise(l)).collect()))
            }
            _ => None,
        })
        .collect();
    let mut chains: BTreeMap<String, Vec<String>> = our_chains(save, table)
        .into_iter()
        .map(|c| (c, Vec::new()))
        .collect();
    let mut out = Vec::new();
    for line in save.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let (name, body) = rest.split_once(' ').unwrap_or((rest, ""));
        let Some(lines) = chains.get_mut(name) else {
            continue;
        };
        let norm = normalise(body);
        match shared(table, name) {
            Some((t, c)) if !fixed.get(name).is_some_and(|f| f.contains(&norm)) => {
                out.push(Found {
                    item: Item::Rule(t, c, hash_lines([norm.as_str()])),
                    fingerprint: hash_lines([norm.as_str()]),
                    text: Some(body.to_owned()),
                });
            }
            _ => lines.push(norm),
        }
    }
    for (name, lines) in chains {
        out.push(Found {
            item: Item::Chain(table, name.into()),
            fingerprint: hash_lines(lines.iter().map(String::as_str)),
            text: None,
        });
    }
    out
}

/// The input a writer of `family` starting from nothing sends for
/// `frontends`.
pub fn full_input(
    frontends: &BTreeMap<FrontendKey, Frontend>,
    opts: &RuleOptions,
    family: Family,
) -> String {
    let g = IptablesRules::new(opts.clone(), family);
    let mut s = State::default();
    render(&s.plan(&g, frontends, None)).0
}

/// The input that removes all our chains (`--cleanup`): given the chain
/// names found in each table.
pub fn render_cleanup(filter: &[String], nat: &[String]) -> String {
    let mut out = String::new();
    for (name, chains) in [("filter", filter), ("nat", nat)] {
        if chains.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{name}");
        for c in chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in chains {
            let _ = writeln!(out, "-X {c}");
        }
        let _ = writeln!(out, "COMMIT");
    }
    out
}

/// Our chains among `iptables-save -t <table>` output lines (`:NAME ...`).
pub fn our_chains(save: &str, table: &str) -> Vec<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| {
            if table == "filter" {
                FILTER_FIXED.contains(c)
            } else {
                NAT_FIXED.contains(c) || NAT_PREFIXES.iter().any(|p| c.starts_with(p))
            }
        })
        .map(str::to_owned)
        .collect()
}

/// Whether `nft list chain` output is a base chain with policy accept and
/// no rules.
pub fn is_empty_accept_base_chain(list: &str) -> bool {
    let mut body = list.lines().map(str::trim).filter(|l| {
        !l.is_empty() && !l.starts_with("table ") && !l.starts_with("chain ") && *l != "}"
    });
    matches!(body.next(), Some(l) if l.starts_with("type ") && l.ends_with("policy accept;"))
        && body.next().is_none()
}

#[cfg(test)]
mod tests {
    #[test]
    fn empty_base_chains() {
        let empty = "table ip nat {\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t}\n}\n";
        assert!(super::is_empty_accept_base_chain(empty));
        let rule = "table ip nat {\n\tchain PREROUTING {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tcounter\n\t}\n}\n";
        assert!(!super::is_empty_accept_base_chain(rule));
        let drop = "table ip filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy drop;\n\t}\n}\n";
        assert!(!super::is_empty_accept_base_chain(drop));
    }

    use super::*;

    #[test]
    fn probabilities_are_uniform() {
        assert_eq!(probability(0, 3), "0.3333333333");
        assert_eq!(probability(1, 3), "0.5000000000");
        assert_eq!(probability(2, 3), "1.0000000000");
    }

    #[test]
    fn our_chains_from_save() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n:DOCKER - [0:0]\nCOMMIT\n";
        assert_eq!(
            our_chains(save, "nat"),
            vec!["KUBE-SERVICES", "KUBE-SVC-ABC"]
        );
        assert_eq!(our_chains(save, "filter"), vec!["KUBE-SERVICES"]);
    }

    #[test]
    fn unchanged_tables_render_nothing() {
        let g = IptablesRules::default();
        let mut s = State::default();
        let d = s.plan(&g, &BTreeMap::new(), None);
        let (full, plan) = render(&d);
        assert!(full.contains("*nat") && full.contains("*filter"), "{full}");
        assert!(plan.deleted.is_empty());
        s.commit(d);
        assert!(s.plan(&g, &BTreeMap::new(), None).is_empty());
    }

    fn cluster(n: u8, backends: u8) -> BTreeMap<FrontendKey, Frontend> {
        (1..=n)
            .map(|i| {
                let k = FrontendKey {
                    addr: std::net::Ipv4Addr::new(10, 96, 0, i).into(),
                    port: 80,
                    proto: crate::model::Protocol::Tcp,
                };
                let f = Frontend {
                    kind: FrontendKind::ClusterIp,
                    backends: (1..=backends)
                        .map(|b| crate::lb::BackendAddr {
                            addr: std::net::Ipv4Addr::new(10, 244, i, b).into(),
                            port: 8080,
                            terminating: false,
                            local: true,
                        })
                        .collect(),
                    affinity_timeout: 0,
                    source_ranges: vec![],
                    maglev_table_size: None,
                    local_only: false,
                };
                (k, f)
            })
            .collect()
    }

    /// A writer that programmed `before`, and the delta to `after`.
    fn step(
        before: &BTreeMap<FrontendKey, Frontend>,
        after: &BTreeMap<FrontendKey, Frontend>,
    ) -> (String, Plan) {
        let g = IptablesRules::default();
        let mut s = State::default();
        let d = s.plan(&g, before, None);
        s.commit(d);
        let changed: Vec<(FrontendKey, Option<Frontend>)> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(k) != after.get(k))
            .map(|k| (*k, before.get(k).cloned()))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        render(&s.plan(&g, after, Some(&changed)))
    }

    #[test]
    fn a_new_service_inserts_one_rule_and_writes_only_its_chains() {
        let before = cluster(50, 3);
        let after = cluster(51, 3);
        let (input, plan) = step(&before, &after);
        // Its KUBE-SVC chain (which DNATs: no KUBE-SEP chains);
        // KUBE-SERVICES is not declared (that would flush it), one rule
        // goes in at the top.
        assert_eq!(plan.written.len(), 1, "{input}");
        assert!(plan.deleted.is_empty(), "{input}");
        assert_eq!((plan.rules_added, plan.rules_deleted), (1, 0), "{input}");
        assert!(!input.contains(":KUBE-SERVICES"), "{input}");
        let inserts: Vec<&str> = input.lines().filter(|l| l.starts_with("-I ")).collect();
        assert_eq!(inserts.len(), 1, "{input}");
        assert!(
            inserts[0].starts_with("-I KUBE-SERVICES 1 -d 10.96.0.51/32 -p tcp"),
            "{input}"
        );
        assert!(input.lines().all(|l| !l.contains("10.96.0.50")), "{input}");
    }

    #[test]
    fn a_removed_service_deletes_its_rule_and_chains() {
        let (input, plan) = step(&cluster(50, 3), &cluster(49, 3));
        assert_eq!((plan.rules_added, plan.rules_deleted), (0, 1), "{input}");
        assert!(plan.written.is_empty(), "{input}");
        assert_eq!(plan.deleted.len(), 1, "{input}");
        let del = input
            .lines()
            .position(|l| l.starts_with("-D KUBE-SERVICES"));
        let x = input.lines().position(|l| l.starts_with("-X "));
        assert!(
            del.is_some() && del < x,
            "jump deleted before the chains: {input}"
        );
    }

    #[test]
    fn normalise_equals_iptables_save_forms() {
        // Ours, and as iptables-save (nf_tables 1.8.9) prints them.
        for (ours, saved) in [
            (
                "-p tcp -m comment --comment \"10.96.0.30:80/TCP has no endpoints\" -m conntrack --ctorigdst 10.96.0.30/32 --ctorigdstport 80 -j REJECT --reject-with tcp-reset",
                "-p tcp -m comment --comment \"10.96.0.30:80/TCP has no endpoints\" -m conntrack --ctorigdst 10.96.0.30 --ctorigdstport 80 -j REJECT --reject-with tcp-reset",
            ),
            (
                "-m comment --comment \"10.244.1.3:8080\" -m statistic --mode random --probability 0.3333333333 -j KUBE-SEP-N6XICNRJMV5QIC4D",
                "-m comment --comment \"10.244.1.3:8080\" -m statistic --mode random --probability 0.33333333349 -j KUBE-SEP-N6XICNRJMV5QIC4D",
            ),
            (
                "-p tcp -m recent --name KUBE-SEP-X --mask 255.255.255.255 --rsource --set -m tcp -j DNAT --to-destination 10.244.2.4:8080",
                "-p tcp -m recent --set --name KUBE-SEP-X --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.2.4:8080",
            ),
        ] {
            assert_eq!(normalise(ours), normalise(saved));
        }
        assert_ne!(
            normalise("-s 10.244.1.2/32 -j KUBE-MARK-MASQ"),
            normalise("-s 10.244.1.3/32 -j KUBE-MARK-MASQ")
        );
        assert_ne!(
            normalise("-m mark ! --mark 0x4000/0x4000 -j RETURN"),
            normalise("-m mark --mark 0x4000/0x4000 -j RETURN")
        );
    }
}
