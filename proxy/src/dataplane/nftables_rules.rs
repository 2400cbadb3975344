//! kube-proxy's nftables mode for a set of frontends, as `nft -f` input:
//! one table of ours, verdict maps for service dispatch (one O(1) lookup
//! whatever the number of services), `numgen random` for the endpoint
//! choice, sets for node-port addresses and per-endpoint affinity. A sync
//! after the first rewrites only the chains and map elements that changed.
//! Pure: no kernel, no processes.
//!
//! ```text
//! table ip kube-proxy-rs
//!   nat-prerouting / nat-output (dstnat)   -> services
//!   services: ip daddr . l4proto . dport vmap @service-ips
//!             local daddr in @nodeport-ips: l4proto . dport vmap @service-nodeports
//!   filter-prerouting / filter-output (dstnat - 10), new connections:
//!             vmap @firewall-ips (loadBalancerSourceRanges)
//!             vmap @no-endpoint-services / @no-endpoint-nodeports -> reject
//!   nat-postrouting (srcnat)              -> masquerading (mark 0x4000)
//!   svc-<h>:  affinity (ip saddr @aff-*), numgen random mod n vmap { i: goto sep-* }
//!   ext-<h>:  goto svc-<h> (external frontends)
//!   fw-<h>:   ip saddr in ranges: return; else drop
//!   sep-<h>:  hairpin masquerade; for an external frontend and a remote
//!             backend, masquerade unless from a local pod (iifname
//!             prefix); affinity update, counter, dnat
//! ```
//!
//! No-endpoint rejects sit in prerouting (nft allows `reject` there), so
//! they work on nodes without a route for the service range too.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use super::fallback::{MASQ_MARK, RuleOptions, endpoint_hash, frontend_hash, proto_lower};
use crate::lb::{Frontend, FrontendKey, FrontendKind};

/// Our table (family `ip`).
pub const TABLE: &str = "kube-proxy-rs";

/// A chain: its base-chain declaration (hook) if any, and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub hook: Option<&'static str>,
    pub rules: Vec<String>,
}

/// Everything in our table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Chain>,
    /// Map / set name -> element key -> verdict (None for sets).
    pub elements: BTreeMap<&'static str, BTreeMap<String, Option<String>>>,
    /// Affinity sets: name -> declaration body.
    pub sets: BTreeMap<String, String>,
}

/// Maps and sets declared with the table: (kind, name, body).
const CONTAINERS: [(&str, &str, &str); 6] = [
    (
        "map",
        "service-ips",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    ),
    (
        "map",
        "service-nodeports",
        "type inet_proto . inet_service : verdict;",
    ),
    (
        "map",
        "no-endpoint-services",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    ),
    (
        "map",
        "no-endpoint-nodeports",
        "type inet_proto . inet_service : verdict;",
    ),
    (
        "map",
        "firewall-ips",
        "type ipv4_addr . inet_proto . inet_service : verdict;",
    ),
    ("set", "nodeport-ips", "type ipv4_addr;"),
];

fn fixed_chains() -> BTreeMap<String, Chain> {
    let c = |hook: Option<&'static str>, rules: &[&str]| Chain {
        hook,
        rules: rules.iter().map(|r| (*r).to_owned()).collect(),
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
                    "ip daddr . meta l4proto . th dport vmap @service-ips",
                    "fib daddr type local ip daddr @nodeport-ips counter meta l4proto . th dport vmap @service-nodeports",
                ],
            ),
        ),
        (
            "firewall-check".to_owned(),
            c(
                None,
                &["ip daddr . meta l4proto . th dport vmap @firewall-ips"],
            ),
        ),
        (
            "service-endpoints-check".to_owned(),
            c(
                None,
                &[
                    "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
                    "fib daddr type local ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
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
            Chain {
                hook: None,
                rules: vec![skip, unmark, "masquerade fully-random".to_owned()],
            },
        ),
        (
            "mark-for-masquerade".to_owned(),
            Chain {
                hook: None,
                rules: vec![masq],
            },
        ),
    ])
}

/// The chain hash of a frontend; NodePort frontends (one per node address
/// in [`crate::lb`]) share one chain per port, as they share one map entry.
fn chain_hash(k: &FrontendKey, f: &Frontend) -> String {
    if f.kind == FrontendKind::NodePort {
        frontend_hash(&FrontendKey {
            addr: Ipv4Addr::UNSPECIFIED,
            ..*k
        })
    } else {
        frontend_hash(k)
    }
}

/// Our table's content for `frontends`.
pub fn generate(frontends: &BTreeMap<FrontendKey, Frontend>, opts: &RuleOptions) -> Ruleset {
    let mut r = Ruleset {
        chains: fixed_chains(),
        ..Default::default()
    };
    let mut rules: Vec<String> = opts
        .pod_interface_prefixes
        .iter()
        .map(|p| format!("iifname \"{p}*\" return"))
        .collect();
    rules.push("jump mark-for-masquerade".to_owned());
    r.chains.insert(
        "mark-for-masquerade-external".to_owned(),
        Chain { hook: None, rules },
    );
    for (_, name, _) in CONTAINERS {
        r.elements.insert(name, BTreeMap::new());
    }
    let elem = |r: &mut Ruleset, map: &'static str, key: String, v: Option<String>| {
        r.elements.entry(map).or_default().insert(key, v);
    };
    for (k, f) in frontends {
        let p = proto_lower(k.proto);
        let h = chain_hash(k, f);
        let full_key = format!("{} . {p} . {}", k.addr, k.port);
        let port_key = format!("{p} . {}", k.port);
        let nodeport = f.kind == FrontendKind::NodePort;
        if nodeport {
            elem(&mut r, "nodeport-ips", k.addr.to_string(), None);
        }
        if !f.source_ranges.is_empty() {
            let fw = format!("fw-{}", frontend_hash(k));
            let ranges: Vec<String> = f
                .source_ranges
                .iter()
                .map(|(n, l)| format!("{n}/{l}"))
                .collect();
            r.chains.insert(
                fw.clone(),
                Chain {
                    hook: None,
                    rules: vec![
                        format!("ip saddr {{ {} }} return", ranges.join(", ")),
                        "counter drop".to_owned(),
                    ],
                },
            );
            elem(
                &mut r,
                "firewall-ips",
                full_key.clone(),
                Some(format!("goto {fw}")),
            );
        }
        if f.backends.is_empty() {
            let (map, key) = if nodeport {
                ("no-endpoint-nodeports", port_key)
            } else {
                ("no-endpoint-services", full_key)
            };
            elem(&mut r, map, key, Some("goto reject-chain".to_owned()));
            continue;
        }
        let svc = format!("svc-{h}");
        let target = if f.kind == FrontendKind::ClusterIp {
            svc.clone()
        } else {
            let ext = format!("ext-{h}");
            r.chains.insert(
                ext.clone(),
                Chain {
                    hook: None,
                    rules: vec![format!("goto {svc}")],
                },
            );
            ext
        };
        if nodeport {
            elem(
                &mut r,
                "service-nodeports",
                port_key,
                Some(format!("goto {target}")),
            );
        } else {
            elem(
                &mut r,
                "service-ips",
                full_key,
                Some(format!("goto {target}")),
            );
        }
        // For NodePorts the chains are keyed by port only.
        let ck = if nodeport {
            FrontendKey {
                addr: Ipv4Addr::UNSPECIFIED,
                ..*k
            }
        } else {
            *k
        };
        let mut svc_rules = Vec::new();
        let mut arms = Vec::new();
        for (i, b) in f.backends.iter().enumerate() {
            let eh = endpoint_hash(&ck, b);
            let sep = format!("sep-{eh}");
            let mut sep_rules = vec![format!("ip saddr {} jump mark-for-masquerade", b.addr)];
            if f.kind != FrontendKind::ClusterIp && !b.local {
                sep_rules.push("jump mark-for-masquerade-external".to_owned());
            }
            if f.affinity_timeout > 0 {
                let set = format!("aff-{eh}-{}", f.affinity_timeout);
                r.sets.insert(
                    set.clone(),
                    format!(
                        "type ipv4_addr; flags dynamic,timeout; timeout {}s;",
                        f.affinity_timeout
                    ),
                );
                svc_rules.push(format!("ip saddr @{set} goto {sep}"));
                sep_rules.push(format!("update @{set} {{ ip saddr }}"));
            }
            sep_rules.push(format!(
                "meta l4proto {p} counter dnat to {}:{}",
                b.addr, b.port
            ));
            r.chains.insert(
                sep.clone(),
                Chain {
                    hook: None,
                    rules: sep_rules,
                },
            );
            arms.push(format!("{i} : goto {sep}"));
        }
        svc_rules.push(format!(
            "numgen random mod {} vmap {{ {} }}",
            arms.len(),
            arms.join(", ")
        ));
        r.chains.insert(
            svc,
            Chain {
                hook: None,
                rules: svc_rules,
            },
        );
    }
    r
}

/// What a render changes: chains written and deleted, elements added and
/// deleted (as `container key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub chains_written: Vec<String>,
    pub chains_deleted: Vec<String>,
    pub elements_added: Vec<String>,
    pub elements_deleted: Vec<String>,
}

fn element(key: &str, v: &Option<String>) -> String {
    match v {
        Some(v) => format!("{key} : {v}"),
        None => key.to_owned(),
    }
}

/// The `nft -f` input taking our table from `old` (None: unknown, the
/// table is recreated) to `new`, as one transaction.
pub fn render(new: &Ruleset, old: Option<&Ruleset>) -> (String, Plan) {
    let mut out = String::new();
    let mut plan = Plan::default();
    let t = format!("ip {TABLE}");
    let empty = Ruleset::default();
    let old = match old {
        Some(o) => o,
        None => {
            // Recreate: whatever an earlier run left goes.
            let _ = writeln!(out, "add table {t}\ndelete table {t}\nadd table {t}");
            for (kind, name, body) in CONTAINERS {
                let _ = writeln!(out, "add {kind} {t} {name} {{ {body} }}");
            }
            &empty
        }
    };
    // New affinity sets before the rules that use them.
    for (name, body) in &new.sets {
        if old.sets.get(name) != Some(body) {
            let _ = writeln!(out, "add set {t} {name} {{ {body} }}");
        }
    }
    let changed: Vec<(&String, &Chain)> = new
        .chains
        .iter()
        .filter(|(n, c)| old.chains.get(*n) != Some(c))
        .collect();
    // Declare every changed chain first (rules may jump to new ones).
    for (name, c) in &changed {
        match c.hook {
            Some(h) => {
                let _ = writeln!(out, "add chain {t} {name} {{ {h} }}");
            }
            None => {
                let _ = writeln!(out, "add chain {t} {name}");
            }
        }
    }
    for (name, c) in &changed {
        if old.chains.contains_key(*name) {
            let _ = writeln!(out, "flush chain {t} {name}");
        }
        for rule in &c.rules {
            let _ = writeln!(out, "add rule {t} {name} {rule}");
        }
        plan.chains_written.push((*name).clone());
    }
    // Elements: deletions first (changed verdicts are deleted and re-added).
    for (map, new_elems) in &new.elements {
        let old_elems = old.elements.get(map);
        for (key, v) in old_elems.into_iter().flatten() {
            if new_elems.get(key) != Some(v) {
                let _ = writeln!(out, "delete element {t} {map} {{ {key} }}");
                plan.elements_deleted
                    .push(format!("{map} {}", element(key, v)));
            }
        }
    }
    for (map, new_elems) in &new.elements {
        let old_elems = old.elements.get(map);
        for (key, v) in new_elems {
            if old_elems.and_then(|o| o.get(key)) != Some(v) {
                let _ = writeln!(out, "add element {t} {map} {{ {} }}", element(key, v));
                plan.elements_added
                    .push(format!("{map} {}", element(key, v)));
            }
        }
    }
    // Then chains and sets nothing refers to any more: flush all first
    // (stale chains may jump to each other), then delete.
    let stale: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &stale {
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    for name in &stale {
        let _ = writeln!(out, "delete chain {t} {name}");
        plan.chains_deleted.push((*name).clone());
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        let _ = writeln!(out, "delete set {t} {name}");
    }
    (out, plan)
}

/// The input that removes our table (`--cleanup`), whether or not it exists.
pub fn render_cleanup() -> String {
    format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_ruleset_renders_nothing() {
        let r = generate(&BTreeMap::new(), &RuleOptions::default());
        assert_eq!(render(&r, Some(&r)).0, "");
        let (full, _) = render(&r, None);
        assert!(
            full.starts_with("add table ip kube-proxy-rs\ndelete table"),
            "{full}"
        );
    }
}
