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
//! * `KUBE-SVC-<h>`: `-m recent` affinity checks, then one rule per backend
//!   with `-m statistic --mode random --probability 1/(n-i)` (uniform).
//! * `KUBE-SEP-<h>`: hairpin (`-s backend`) masquerade, affinity `--set`,
//!   DNAT to the backend.
//! * `KUBE-POSTROUTING` (from POSTROUTING): masquerade marked packets.
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

use std::{collections::BTreeMap, fmt::Write as _};

use super::fallback::{
    DROP_MARK, MASQ_MARK, RuleOptions, endpoint_hash, frontend_hash, proto_lower,
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

/// One table's chains: name -> rules (each a full `-A CHAIN ...` line).
pub type Chains = BTreeMap<String, Vec<String>>;

/// The rules of our chains in the filter and nat tables.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub filter: Chains,
    pub nat: Chains,
}

/// A rule that never matches a generated one: marks chains whose content is
/// unknown (found in the kernel at start), so the next render rewrites or
/// deletes them.
const UNKNOWN: &str = "# unknown";

impl Tables {
    /// Chains found in the kernel, content unknown.
    pub fn unknown(filter: &[String], nat: &[String]) -> Tables {
        let f = |names: &[String]| {
            names
                .iter()
                .map(|n| (n.clone(), vec![UNKNOWN.to_owned()]))
                .collect()
        };
        Tables {
            filter: f(filter),
            nat: f(nat),
        }
    }

    /// How many rules in all.
    pub fn rule_count(&self) -> usize {
        self.filter
            .values()
            .chain(self.nat.values())
            .map(Vec::len)
            .sum()
    }
}

/// kube-proxy's probability for backend `i` of `n`: 1/(n-i), printed as it
/// prints it (10 decimals).
fn probability(i: usize, n: usize) -> String {
    format!("{:.10}", 1.0 / (n - i) as f64)
}

/// The rules for `frontends`.
pub fn generate(frontends: &BTreeMap<FrontendKey, Frontend>, opts: &RuleOptions) -> Tables {
    let mut t = Tables::default();
    for c in FILTER_FIXED {
        t.filter.insert(c.to_owned(), Vec::new());
    }
    for c in NAT_FIXED {
        t.nat.insert(c.to_owned(), Vec::new());
    }
    let push = |chains: &mut Chains, chain: &str, rule: String| {
        chains
            .entry(chain.to_owned())
            .or_default()
            .push(format!("-A {chain} {rule}"));
    };
    for (k, f) in frontends {
        let p = proto_lower(k.proto);
        let m = format!("-d {}/32 -p {p} -m {p} --dport {}", k.addr, k.port);
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
                    &mut t.nat,
                    "KUBE-SERVICES",
                    format!("-m comment --comment \"{k} has no endpoints\" {m} -j REDIRECT"),
                );
            }
            // TCP gets a reset: ICMP errors are rate-limited per peer
            // (net.ipv4.icmp_ratelimit), so a client retrying quickly
            // would wait for its SYN retransmit instead of being refused.
            let with = match k.proto {
                crate::model::Protocol::Tcp => "tcp-reset",
                _ => "icmp-port-unreachable",
            };
            push(
                &mut t.filter,
                chain,
                format!(
                    "-m comment --comment \"{k} has no endpoints\" -p {p} -m conntrack --ctorigdst {}/32 --ctorigdstport {} -j REJECT --reject-with {with}",
                    k.addr, k.port
                ),
            );
            continue;
        }
        let svc = format!("KUBE-SVC-{h}");
        let entry = match f.kind {
            FrontendKind::ClusterIp => svc.clone(),
            _ if !f.source_ranges.is_empty() => format!("KUBE-FW-{h}"),
            _ => format!("KUBE-EXT-{h}"),
        };
        let top = match f.kind {
            FrontendKind::NodePort => "KUBE-NODEPORTS",
            _ => "KUBE-SERVICES",
        };
        push(
            &mut t.nat,
            top,
            format!("-m comment --comment \"{k} {:?}\" {m} -j {entry}", f.kind),
        );
        if f.kind != FrontendKind::ClusterIp {
            let ext = format!("KUBE-EXT-{h}");
            if !f.source_ranges.is_empty() {
                let fw = format!("KUBE-FW-{h}");
                for (net, len) in &f.source_ranges {
                    push(&mut t.nat, &fw, format!("-s {net}/{len} -j {ext}"));
                }
                push(
                    &mut t.nat,
                    &fw,
                    "-m comment --comment \"source not in loadBalancerSourceRanges\" -j KUBE-MARK-DROP"
                        .to_owned(),
                );
                // Made local so that filter INPUT's KUBE-FIREWALL sees and
                // drops it even on a node without a route for the address.
                push(&mut t.nat, &fw, "-j REDIRECT".to_owned());
            }
            push(&mut t.nat, &ext, format!("-j {svc}"));
        }
        let seps: Vec<String> = f
            .backends
            .iter()
            .map(|b| format!("KUBE-SEP-{}", endpoint_hash(k, b)))
            .collect();
        // Make sure the chain exists even if (impossibly) nothing is pushed.
        t.nat.entry(svc.clone()).or_default();
        if f.affinity_timeout > 0 {
            for (b, sep) in f.backends.iter().zip(&seps) {
                push(
                    &mut t.nat,
                    &svc,
                    format!(
                        "-m comment --comment \"{}:{}\" -m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck --seconds {} --reap -j {sep}",
                        b.addr, b.port, f.affinity_timeout
                    ),
                );
            }
        }
        let n = seps.len();
        for (i, (b, sep)) in f.backends.iter().zip(&seps).enumerate() {
            let stat = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {} ",
                    probability(i, n)
                )
            } else {
                String::new()
            };
            push(
                &mut t.nat,
                &svc,
                format!(
                    "-m comment --comment \"{}:{}\" {stat}-j {sep}",
                    b.addr, b.port
                ),
            );
            push(
                &mut t.nat,
                sep,
                format!("-s {}/32 -j KUBE-MARK-MASQ", b.addr),
            );
            if f.kind != FrontendKind::ClusterIp && !b.local {
                push(&mut t.nat, sep, "-j KUBE-MARK-MASQ-EXT".to_owned());
            }
            let affinity = if f.affinity_timeout > 0 {
                format!("-m recent --name {sep} --mask 255.255.255.255 --rsource --set ")
            } else {
                String::new()
            };
            push(
                &mut t.nat,
                sep,
                format!(
                    "-p {p} {affinity}-m {p} -j DNAT --to-destination {}:{}",
                    b.addr, b.port
                ),
            );
        }
    }
    push(
        &mut t.nat,
        "KUBE-SERVICES",
        "-m comment --comment \"node ports; must be last\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .to_owned(),
    );
    push(
        &mut t.nat,
        "KUBE-MARK-MASQ",
        format!("-j MARK --or-mark {MASQ_MARK:#x}"),
    );
    for prefix in &opts.pod_interface_prefixes {
        push(
            &mut t.nat,
            "KUBE-MARK-MASQ-EXT",
            format!(
                "-m comment --comment \"local pods keep their address\" -i {prefix}+ -j RETURN"
            ),
        );
    }
    push(
        &mut t.nat,
        "KUBE-MARK-MASQ-EXT",
        "-j KUBE-MARK-MASQ".to_owned(),
    );
    push(
        &mut t.nat,
        "KUBE-MARK-DROP",
        format!("-j MARK --or-mark {DROP_MARK:#x}"),
    );
    push(
        &mut t.nat,
        "KUBE-POSTROUTING",
        format!("-m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"),
    );
    push(
        &mut t.nat,
        "KUBE-POSTROUTING",
        format!("-j MARK --xor-mark {MASQ_MARK:#x}"),
    );
    push(
        &mut t.nat,
        "KUBE-POSTROUTING",
        "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
            .to_owned(),
    );
    push(
        &mut t.filter,
        "KUBE-FIREWALL",
        format!(
            "-m comment --comment \"dropped by loadBalancerSourceRanges\" -m mark --mark {DROP_MARK:#x}/{DROP_MARK:#x} -j DROP"
        ),
    );
    t
}

/// What a render rewrites: chains (re)written and chains deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub written: Vec<String>,
    pub deleted: Vec<String>,
}

fn render_table(out: &mut String, name: &str, new: &Chains, old: &Chains, plan: &mut Plan) {
    let changed: Vec<&String> = new
        .iter()
        .filter(|(c, rules)| old.get(*c) != Some(rules))
        .map(|(c, _)| c)
        .collect();
    let stale: Vec<&String> = old.keys().filter(|c| !new.contains_key(*c)).collect();
    if changed.is_empty() && stale.is_empty() {
        return;
    }
    let _ = writeln!(out, "*{name}");
    // Declaring a chain creates it, or flushes it under --noflush.
    for c in changed.iter().chain(&stale) {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for c in &changed {
        for r in &new[*c] {
            let _ = writeln!(out, "{r}");
        }
        plan.written.push(format!("{name}/{c}"));
    }
    for c in &stale {
        let _ = writeln!(out, "-X {c}");
        plan.deleted.push(format!("{name}/{c}"));
    }
    let _ = writeln!(out, "COMMIT");
}

/// The `iptables-restore --noflush` input taking the kernel from `old` (what
/// the last successful render wrote, or [`Tables::unknown`] at start) to
/// `new`: only changed chains are declared (flushed) and rewritten, chains
/// no longer wanted are deleted; every other rule of the system is left
/// alone. One transaction per table.
pub fn render(new: &Tables, old: &Tables) -> (String, Plan) {
    let mut out = String::new();
    let mut plan = Plan::default();
    render_table(&mut out, "filter", &new.filter, &old.filter, &mut plan);
    render_table(&mut out, "nat", &new.nat, &old.nat, &mut plan);
    (out, plan)
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
        let t = generate(&BTreeMap::new(), &RuleOptions::default());
        assert_eq!(render(&t, &t).0, "");
        let (full, plan) = render(&t, &Tables::default());
        assert!(full.contains("*nat") && full.contains("*filter"), "{full}");
        assert!(plan.deleted.is_empty());
    }
}
