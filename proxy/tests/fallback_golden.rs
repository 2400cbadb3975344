//! Golden files for the iptables and nftables modes and the ipvs mode's
//! iptables/ipset glue: the rules generated for a fixture set of frontends
//! equal files under `tests/fixtures/fallback/` (regenerate with
//! `UPDATE_GOLDEN=1`), and a one-endpoint change rewrites only the affected
//! chains / elements / set entries. The same for the IPv6 rules
//! (ip6tables, the `ip6` table) of the fixture's IPv6 twin, and a
//! dual-stack table gives each family's rules exactly their own
//! frontends'.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use proxy::{
    dataplane::{
        fallback::{
            Family,
            incremental::{Delta, Generator, State},
        },
        iptables_rules, ipvs, ipvs_glue, nftables_rules,
    },
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
    model::Protocol,
};

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fallback")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("writing golden file");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        want == actual,
        "{} differs (UPDATE_GOLDEN=1 to accept):\n--- want\n{want}\n--- got\n{actual}",
        path.display()
    );
}

fn opts() -> proxy::dataplane::fallback::RuleOptions {
    proxy::dataplane::fallback::RuleOptions {
        pod_interface_prefixes: vec!["veth".into()],
    }
}

fn key(a: [u8; 4], port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: Ipv4Addr::from(a).into(),
        port,
        proto,
    }
}

fn be(last: u8, node: u8, port: u16, local_node: u8) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::new(10, 244, node, last).into(),
        port,
        terminating: false,
        local: node == local_node,
    }
}

fn fe(kind: FrontendKind, backends: Vec<BackendAddr>) -> Frontend {
    Frontend {
        kind,
        backends: backends.into(),
        affinity_timeout: 0,
        source_ranges: vec![],
        maglev_table_size: None,
        local_only: false,
    }
}

/// Node 1's view of: `web` (TCP 80 + UDP 53, two backends, NodePort 30080
/// on the node's address), `sticky` (ClientIP affinity, three backends),
/// `empty` (no endpoints, ClusterIP + NodePort 30081), an ExternalIP with a
/// local-only backend (as externalTrafficPolicy Local) and a LoadBalancer
/// IP with loadBalancerSourceRanges.
fn fixture() -> BTreeMap<FrontendKey, Frontend> {
    use FrontendKind::*;
    use Protocol::*;
    let web = || vec![be(2, 1, 8080, 1), be(2, 2, 8080, 1)];
    let dns = vec![be(2, 1, 5353, 1), be(2, 2, 5353, 1)];
    let mut sticky = fe(
        ClusterIp,
        vec![be(3, 1, 8080, 1), be(3, 2, 8080, 1), be(4, 2, 8080, 1)],
    );
    sticky.affinity_timeout = 10800;
    let mut lb = fe(LoadBalancer, web());
    lb.source_ranges = vec![(Ipv4Addr::new(203, 0, 113, 0).into(), 24)];
    BTreeMap::from([
        (key([10, 96, 0, 10], 80, Tcp), fe(ClusterIp, web())),
        (key([10, 96, 0, 10], 53, Udp), fe(ClusterIp, dns)),
        (key([172, 18, 0, 11], 30080, Tcp), fe(NodePort, web())),
        (key([10, 96, 0, 20], 80, Tcp), sticky),
        (key([10, 96, 0, 30], 80, Tcp), fe(ClusterIp, vec![])),
        (key([172, 18, 0, 11], 30081, Tcp), fe(NodePort, vec![])),
        (
            key([192, 0, 2, 10], 80, Tcp),
            fe(ExternalIp, vec![be(2, 1, 8080, 1)]),
        ),
        (key([198, 51, 100, 1], 80, Tcp), lb),
    ])
}

/// The fixture with one endpoint (10.244.2.3) removed from `sticky`.
fn one_endpoint_removed() -> BTreeMap<FrontendKey, Frontend> {
    let mut f = fixture();
    let sticky = f
        .get_mut(&key([10, 96, 0, 20], 80, Protocol::Tcp))
        .expect("fixture has sticky");
    sticky.backends = sticky
        .backends
        .iter()
        .filter(|b| b.addr != std::net::IpAddr::from(Ipv4Addr::new(10, 244, 2, 3)))
        .collect();
    f
}

/// What a writer that programmed `before` sends to get to `after`.
fn partial<G: Generator>(
    g: &G,
    before: &BTreeMap<FrontendKey, Frontend>,
    after: &BTreeMap<FrontendKey, Frontend>,
) -> Delta {
    let mut s = State::default();
    let d = s.plan(g, before, None);
    s.commit(d);
    let changed: Vec<(FrontendKey, Option<Frontend>)> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(k) != after.get(k))
        .map(|k| (*k, before.get(k).cloned()))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    s.plan(g, after, Some(&changed))
}

/// An IPv4 address of the fixture as its IPv6 twin: 10.96.0.10 ->
/// fd00:96::10 (hex digits as written), 10.244.2.3 -> fd00:244:2::3,
/// node 172.18.0.11 -> fd00:18::11, 192.0.2.10 -> 2001:db8:2::10,
/// 198.51.100.1 -> 2001:db8:100::1.
fn six(a: IpAddr) -> IpAddr {
    let IpAddr::V4(v4) = a else { return a };
    let [p, q, r, t] = v4.octets();
    let hex = |n: u8| u16::from_str_radix(&n.to_string(), 16).expect("decimal digits");
    let v6 = match (p, q) {
        (10, 96) => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, hex(t)),
        (10, 244) => Ipv6Addr::new(0xfd00, 0x244, hex(r), 0, 0, 0, 0, hex(t)),
        (172, 18) => Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, hex(t)),
        (192, 0) => Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, hex(t)),
        _ => Ipv6Addr::new(0x2001, 0xdb8, hex(r), 0, 0, 0, 0, hex(t)),
    };
    v6.into()
}

/// The fixture's IPv6 twin: every address mapped by [`six`]; the
/// LoadBalancer's source ranges are 2001:db8:113::/48 and the IPv4
/// 203.0.113.0/24 (the IPv6 rules list only the first).
fn fixture6() -> BTreeMap<FrontendKey, Frontend> {
    fixture()
        .into_iter()
        .map(|(k, mut f)| {
            f.backends = f
                .backends
                .iter()
                .map(|b| BackendAddr {
                    addr: six(b.addr),
                    ..b
                })
                .collect();
            if !f.source_ranges.is_empty() {
                f.source_ranges
                    .insert(0, ("2001:db8:113::".parse().expect("address"), 48));
            }
            (
                FrontendKey {
                    addr: six(k.addr),
                    ..k
                },
                f,
            )
        })
        .collect()
}

/// Both: a dual-stack node's table.
fn dual() -> BTreeMap<FrontendKey, Frontend> {
    let mut t = fixture();
    t.extend(fixture6());
    t
}

/// [`one_endpoint_removed`] of the IPv6 twin (fd00:244:2::3).
fn one_endpoint_removed6() -> BTreeMap<FrontendKey, Frontend> {
    let mut f = dual();
    let sticky = f
        .get_mut(&FrontendKey {
            addr: six(Ipv4Addr::new(10, 96, 0, 20).into()),
            port: 80,
            proto: Protocol::Tcp,
        })
        .expect("fixture has sticky");
    sticky.backends = sticky
        .backends
        .iter()
        .filter(|b| b.addr != six(Ipv4Addr::new(10, 244, 2, 3).into()))
        .collect();
    f
}

fn ipt() -> iptables_rules::IptablesRules {
    iptables_rules::IptablesRules::new(opts(), Family::V4)
}

fn nftr() -> nftables_rules::NftablesRules {
    nftables_rules::NftablesRules::new(opts(), Family::V4)
}

fn ipt6() -> iptables_rules::IptablesRules {
    iptables_rules::IptablesRules::new(opts(), Family::V6)
}

fn nftr6() -> nftables_rules::NftablesRules {
    nftables_rules::NftablesRules::new(opts(), Family::V6)
}

#[test]
fn iptables_full_sync_matches_golden() {
    let input = iptables_rules::full_input(&fixture(), &opts(), Family::V4);
    golden("iptables-full.rules", &input);
    assert!(!input.contains("-X "), "{input}");
}

#[test]
fn iptables_full_hairpin_set_matches_golden() {
    let mut s = State::default();
    let d = s.plan(&ipt(), &fixture(), None);
    let (add, del) = iptables_rules::render_ipset(&d);
    golden("iptables-full.ipset", &add);
    assert!(del.is_empty(), "{del}");
}

#[test]
fn iptables_one_endpoint_change_rewrites_only_its_chains() {
    let d = partial(&ipt(), &fixture(), &one_endpoint_removed());
    let (input, plan) = iptables_rules::render(&d);
    golden("iptables-partial.rules", &input);
    assert_eq!(
        iptables_rules::render_ipset(&d),
        (
            String::new(),
            "del KUBE-RS-HAIRPIN 10.244.2.3,tcp:8080,10.244.2.3\n".to_owned()
        )
    );
    let svc = format!(
        "nat/KUBE-SVC-{}",
        proxy::dataplane::fallback::frontend_hash(&key([10, 96, 0, 20], 80, Protocol::Tcp))
    );
    assert_eq!(plan.written, vec![svc], "{input}");
    assert_eq!(plan.deleted.len(), 1, "{input}");
    assert!(plan.deleted[0].starts_with("nat/KUBE-SEP-"), "{input}");
    assert_eq!((plan.rules_added, plan.rules_deleted), (0, 0), "{input}");
    // Nothing else is declared (declaring flushes).
    assert_eq!(
        input.lines().filter(|l| l.starts_with(':')).count(),
        2,
        "{input}"
    );
}

#[test]
fn nftables_full_sync_matches_golden() {
    let input = nftables_rules::full_input(&fixture(), &opts(), Family::V4);
    golden("nftables-full.nft", &input);
    assert!(!input.contains("delete "), "{input}");
}

#[test]
fn nftables_one_endpoint_change_rewrites_only_its_chains() {
    let d = partial(&nftr(), &fixture(), &one_endpoint_removed());
    let (input, plan) = nftables_rules::render(&d, Family::V4);
    golden("nftables-partial.nft", &input);
    let h = proxy::dataplane::fallback::frontend_hash(&key([10, 96, 0, 20], 80, Protocol::Tcp));
    assert_eq!(plan.chains_written, vec![format!("svc-{h}")], "{input}");
    assert_eq!(plan.chains_deleted.len(), 1, "{input}");
    assert!(plan.chains_deleted[0].starts_with("sep-"), "{input}");
    // The endpoint's hairpin pair goes with it; no other element moves.
    assert!(plan.elements_added.is_empty(), "{input}");
    assert_eq!(
        plan.elements_deleted,
        vec!["hairpin-endpoints 10.244.2.3 . 10.244.2.3"],
        "{input}"
    );
    assert!(!input.contains("delete table"), "{input}");
}

#[test]
fn nftables_endpoints_appearing_swap_one_map_element() {
    let mut before = fixture();
    before
        .get_mut(&key([10, 96, 0, 10], 80, Protocol::Tcp))
        .expect("web")
        .backends = Default::default();
    let d = partial(&nftr(), &before, &fixture());
    let (input, plan) = nftables_rules::render(&d, Family::V4);
    assert_eq!(plan.elements_deleted.len(), 1, "{input}");
    assert!(
        plan.elements_deleted[0].starts_with("no-endpoint-services 10.96.0.10 . tcp . 80"),
        "{input}"
    );
    assert_eq!(plan.elements_added.len(), 1, "{input}");
    assert!(
        plan.elements_added[0].starts_with("service-ips 10.96.0.10 . tcp . 80 : goto svc-"),
        "{input}"
    );
}

#[test]
fn each_family_writes_only_its_own_frontends() {
    for (family, own) in [(Family::V4, fixture()), (Family::V6, fixture6())] {
        assert_eq!(
            iptables_rules::full_input(&dual(), &opts(), family),
            iptables_rules::full_input(&own, &opts(), family),
            "{family:?}: iptables"
        );
        assert_eq!(
            nftables_rules::full_input(&dual(), &opts(), family),
            nftables_rules::full_input(&own, &opts(), family),
            "{family:?}: nftables"
        );
    }
    // No IPv4 address in the IPv6 rules and no IPv6 one in the IPv4 ones
    // (but for the ip6tables `recent` mask).
    let v6 = iptables_rules::full_input(&dual(), &opts(), Family::V6)
        + &nftables_rules::full_input(&dual(), &opts(), Family::V6);
    for a in [
        "10.96.",
        "10.244.",
        "172.18.",
        "203.0.113",
        "ipv4_addr",
        " ip daddr",
    ] {
        assert!(!v6.contains(a), "{a} in the IPv6 rules:\n{v6}");
    }
    let v4 = iptables_rules::full_input(&dual(), &opts(), Family::V4)
        + &nftables_rules::full_input(&dual(), &opts(), Family::V4);
    for a in ["fd00:", "2001:db8", "ipv6_addr", "ip6 "] {
        assert!(!v4.contains(a), "{a} in the IPv4 rules:\n{v4}");
    }
}

#[test]
fn ip6tables_full_sync_matches_golden() {
    let input = iptables_rules::full_input(&dual(), &opts(), Family::V6);
    golden("ip6tables-full.rules", &input);
    for want in [
        "-d fd00:96::10/128 -p tcp",
        "--ctorigdst fd00:96::30/128 --ctorigdstport 80 -j REJECT --reject-with tcp-reset",
        "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "-j DNAT --to-destination [fd00:244:2::2]:8080",
        "--match-set KUBE-RS-HAIRPIN6 dst,dst,src",
        "-s 2001:db8:113::/48 -j KUBE-EXT-",
    ] {
        assert!(input.contains(want), "{want} in:\n{input}");
    }
    let mut s = State::default();
    let d = s.plan(&ipt6(), &dual(), None);
    let (add, del) = iptables_rules::render_ipset(&d);
    golden("ip6tables-full.ipset", &add);
    assert!(
        add.contains("add KUBE-RS-HAIRPIN6 fd00:244:1::2,tcp:8080,fd00:244:1::2"),
        "{add}"
    );
    assert!(del.is_empty(), "{del}");
}

#[test]
fn ip6tables_udp_reject_is_icmpv6() {
    let mut t = fixture6();
    let dns = FrontendKey {
        addr: six(Ipv4Addr::new(10, 96, 0, 10).into()),
        port: 53,
        proto: Protocol::Udp,
    };
    t.get_mut(&dns).expect("dns").backends = Default::default();
    let input = iptables_rules::full_input(&t, &opts(), Family::V6);
    assert!(
        input.contains(
            "--ctorigdst fd00:96::10/128 --ctorigdstport 53 -j REJECT --reject-with icmp6-port-unreachable"
        ),
        "{input}"
    );
}

#[test]
fn ip6tables_one_endpoint_change_rewrites_only_its_chains() {
    let d = partial(&ipt6(), &dual(), &one_endpoint_removed6());
    let (input, plan) = iptables_rules::render(&d);
    golden("ip6tables-partial.rules", &input);
    assert_eq!(
        iptables_rules::render_ipset(&d),
        (
            String::new(),
            "del KUBE-RS-HAIRPIN6 fd00:244:2::3,tcp:8080,fd00:244:2::3\n".to_owned()
        )
    );
    assert_eq!(plan.written.len(), 1, "{input}");
    assert_eq!(plan.deleted.len(), 1, "{input}");
    assert!(plan.deleted[0].starts_with("nat/KUBE-SEP-"), "{input}");
    assert_eq!((plan.rules_added, plan.rules_deleted), (0, 0), "{input}");
    // The IPv4 rules of the same change: nothing.
    assert!(partial(&ipt(), &dual(), &one_endpoint_removed6()).is_empty());
}

#[test]
fn nftables_ipv6_full_sync_matches_golden() {
    let input = nftables_rules::full_input(&dual(), &opts(), Family::V6);
    golden("nftables6-full.nft", &input);
    assert!(!input.contains("delete "), "{input}");
    for want in [
        "add table ip6 kube-proxy-rs",
        "service-ips { type ipv6_addr . inet_proto . inet_service : verdict; }",
        "ip6 daddr . meta l4proto . th dport vmap @service-ips",
        "fib daddr type local ip6 daddr @nodeport-ips",
        "ct status dnat ip6 saddr . ip6 daddr @hairpin-endpoints",
        "dnat to [fd00:244:2::2]:8080",
        "ip6 saddr { 2001:db8:113::/48 } return",
        "type ipv6_addr; flags dynamic,timeout; timeout 10800s;",
        "update @aff-",
        "nodeport-ips { fd00:18::11",
        "no-endpoint-services { fd00:96::30 . tcp . 80 : goto reject-chain",
    ] {
        assert!(input.contains(want), "{want} in:\n{input}");
    }
}

#[test]
fn nftables_ipv6_one_endpoint_change_rewrites_only_its_chains() {
    let d = partial(&nftr6(), &dual(), &one_endpoint_removed6());
    let (input, plan) = nftables_rules::render(&d, Family::V6);
    golden("nftables6-partial.nft", &input);
    assert_eq!(plan.chains_written.len(), 1, "{input}");
    assert!(plan.chains_written[0].starts_with("svc-"), "{input}");
    assert_eq!(plan.chains_deleted.len(), 1, "{input}");
    assert!(plan.elements_added.is_empty(), "{input}");
    assert_eq!(
        plan.elements_deleted,
        vec!["hairpin-endpoints fd00:244:2::3 . fd00:244:2::3"],
        "{input}"
    );
    assert!(
        input.lines().all(|l| l.contains(" ip6 kube-proxy-rs ")),
        "{input}"
    );
    assert!(partial(&nftr(), &dual(), &one_endpoint_removed6()).is_empty());
}

/// The ipvs mode's glue for the fixture: the (fixed) chains and the ip set
/// contents, with the `kube-ipvs0` addresses the ipvs plan puts there.
fn ipvs_sets(f: &BTreeMap<FrontendKey, Frontend>) -> ipvs_glue::IpSets {
    ipvs_glue::sets(f, &ipvs::desired(f, "rr").addresses)
}

#[test]
fn ipvs_glue_matches_golden() {
    golden("ipvs-glue.rules", &ipvs_glue::rules(&opts()));
    golden(
        "ipvs-glue.ipset",
        &ipvs_glue::render_sets(None, &ipvs_sets(&fixture())),
    );
}

#[test]
fn ipvs_glue_one_endpoint_change_is_one_set_entry() {
    let old = ipvs_sets(&fixture());
    let new = ipvs_sets(&one_endpoint_removed());
    // Only the hairpin entry of the removed endpoint goes; the rules are
    // fixed and IPVS itself loses one real server (tested in ipvs.rs).
    assert_eq!(
        ipvs_glue::render_sets(Some(&old), &new),
        "del KUBE-LOOP-BACK 10.244.2.3,tcp:8080,10.244.2.3\n"
    );
}
