//! Map capacities against the real eBPF dataplane (root, bpffs at
//! /sys/fs/bpf; each test pins in its own directory): 100,000 frontends x
//! 10 backends programmed with capacities sized for them; a map too small
//! fails with the clear error and its counter while the frontends that fit
//! serve; a restart with larger capacities grows the pinned maps and keeps
//! what they held.
//!
//! The scale test prints how long programming took and the process's RSS
//! (figures for the docs, not assertions):
//! `cargo test --release -p proxy --test map_capacity -- --nocapture`.

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use aya::programs::{TestRun, TestRunOptions};
use common::PinDir;
use proxy::{
    dataplane::{
        Dataplane, MapEvent,
        ebpf::{
            EbpfConfig, EbpfDataplane, EbpfError,
            capacity::{ClusterSize, Knob, MapSizing, Sizing},
        },
    },
    diff::Change,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind, LbTable},
    metrics::Telemetry,
    model::Protocol,
};
use proxy_common::{maps as defs, progs};

const TC_ACT_OK: u32 = 0;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 2);

/// Frontend `i`: 10.96.x.y:80/TCP; its `per` backends are distinct
/// addresses in 10.128.0.0/9 on port 8080.
fn table(n: u32, per: u32) -> LbTable {
    let mut t = LbTable::default();
    for i in 0..n {
        let backends = (0..per)
            .map(|j| BackendAddr {
                addr: Ipv4Addr::from(0x0a80_0000 + i * per + j).into(),
                port: 8080,
                terminating: false,
                local: true,
            })
            .collect();
        t.frontends.insert(
            vip(i),
            Frontend {
                kind: FrontendKind::ClusterIp,
                backends,
                affinity_timeout: 0,
                source_ranges: vec![],
                maglev_table_size: None,
                local_only: false,
            },
        );
    }
    t
}

fn vip(i: u32) -> FrontendKey {
    FrontendKey {
        addr: Ipv4Addr::from(0x0a60_0000 + i).into(),
        port: 80,
        proto: Protocol::Tcp,
    }
}

fn upserts(t: &LbTable) -> Vec<Change> {
    t.frontends
        .iter()
        .map(|(k, f)| Change::Upsert(*k, f.clone()))
        .collect()
}

/// Entries per map name, walked in the kernel.
fn entries(dp: &EbpfDataplane) -> BTreeMap<&'static str, u64> {
    defs::ALL
        .iter()
        .map(|i| i.name)
        .zip(dp.maps().entries().expect("count entries"))
        .collect()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn load(dir: &PinDir, caps: BTreeMap<&'static str, u32>) -> EbpfDataplane {
    let mut cfg = EbpfConfig::new(dir.0.clone());
    cfg.map_max_entries = caps;
    EbpfDataplane::load(cfg).expect("load eBPF dataplane (root and bpffs needed)")
}

#[test]
fn programs_100k_frontends_x_10_backends_with_auto_capacities() {
    const N: u32 = 100_000;
    const PER: u32 = 10;
    let dir = PinDir::new("scale");
    let desired = table(N, PER);
    // The agent's path for `auto`: counted from the first table.
    let cluster = ClusterSize::of(&desired, 0);
    let caps = MapSizing::default().capacities(Some(&cluster));
    assert!(caps[defs::SERVICES.name] >= N, "{caps:?}");
    let mut dp = load(&dir, caps.clone());
    for (name, n) in &caps {
        assert_eq!(dp.capacities().get(name), Some(n), "{name} loaded as sized");
    }
    let changes = upserts(&desired);
    let rss_before = rss_kib();
    let t = Instant::now();
    let stats = dp.apply(&changes).expect("everything fits");
    let apply = t.elapsed();
    let rss_after = rss_kib();
    assert_eq!(stats.upserted, N as usize);
    assert_eq!(stats.backends_added, (N * PER) as usize);
    let e = entries(&dp);
    assert_eq!(e[defs::SERVICES.name], u64::from(N));
    assert_eq!(e[defs::REVNAT.name], u64::from(N));
    assert_eq!(e[defs::SVC_STATS.name], u64::from(N));
    assert_eq!(e[defs::SLOTS.name], u64::from(N * PER));
    assert_eq!(e[defs::AFFINITY_MATCH.name], u64::from(N * PER));
    assert_eq!(e[defs::BACKENDS.name], u64::from(N * PER));
    assert_eq!(dp.programmed().frontends.len(), N as usize);
    for name in [defs::SERVICES.name, defs::SLOTS.name, defs::BACKENDS.name] {
        assert_eq!(dp.insert_failures(name), 0, "{name}");
    }

    // A sync that changes 1% of the frontends' backends: the work follows
    // the changes, not the table.
    let mut changed = desired.clone();
    let mut small = Vec::new();
    for (i, (k, f)) in changed.frontends.iter_mut().enumerate() {
        if i % 100 == 0 {
            f.backends = f.backends.iter().take(5).collect();
            small.push(Change::Upsert(*k, f.clone()));
        }
    }
    let t = Instant::now();
    let stats = dp.apply(&small).expect("update 1%");
    let update = t.elapsed();
    assert_eq!(stats.upserted, small.len());
    assert_eq!(stats.backends_removed, small.len() * 5);
    let e = entries(&dp);
    let pairs = u64::from(N * PER) - small.len() as u64 * 5;
    assert_eq!(e[defs::SLOTS.name], pairs);
    assert_eq!(e[defs::AFFINITY_MATCH.name], pairs);
    assert_eq!(e[defs::BACKENDS.name], pairs);

    // What a /metrics scrape reads: the fill gauges are the kernel's.
    let reader = dp.stats_reader().expect("a stats reader");
    let t = Instant::now();
    let read = reader.read().expect("read dataplane stats");
    let scrape = t.elapsed();
    let fill = |name: &str| {
        read.maps
            .iter()
            .find(|m| m.name == name)
            .map(|m| (m.entries, m.capacity))
            .unwrap_or_else(|| panic!("no fill for {name}"))
    };
    assert_eq!(
        fill(defs::SERVICES.name),
        (u64::from(N), u64::from(caps[defs::SERVICES.name]))
    );
    assert_eq!(fill(defs::SLOTS.name).0, pairs);
    assert_eq!(read.frontends.len(), N as usize);

    println!(
        "scale: {N} frontends x {PER} backends: apply {:.2} s ({:.1} us/frontend); \
         update of {} frontends {:.1} ms; stats read (a /metrics scrape) {:.2} s; capacities SVC_V4 {} SLOTS_V4 {} BACKENDS_V4 {}; \
         RSS {} MiB -> {} MiB (+{} MiB for the dataplane's state)",
        apply.as_secs_f64(),
        apply.as_secs_f64() * 1e6 / f64::from(N),
        small.len(),
        update.as_secs_f64() * 1e3,
        scrape.as_secs_f64(),
        caps[defs::SERVICES.name],
        caps[defs::SLOTS.name],
        caps[defs::BACKENDS.name],
        rss_before / 1024,
        rss_after / 1024,
        rss_after.saturating_sub(rss_before) / 1024,
    );
}

#[test]
fn a_full_map_fails_clearly_counts_and_the_frontends_that_fit_serve() {
    let dir = PinDir::new("full");
    // SVC_V4 alone is small, so every other write of a frontend that does
    // not fit (slots, affinity membership, counters, rev-NAT) happened and
    // must be undone.
    let mut dp = load(&dir, [(defs::SERVICES.name, 10)].into());
    let telemetry = Telemetry::new("ebpf", std::time::Duration::from_secs(30));
    telemetry.set_reader(dp.stats_reader());
    let desired = table(25, 2);
    let changes = upserts(&desired);

    let err = dp.apply(&changes).expect_err("10 of 25 fit");
    assert!(
        matches!(
            &err,
            EbpfError::MapFull {
                map: "SVC_V4",
                capacity: 10,
                flag: "--bpf-lb-map-max",
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("map SVC_V4 is full (10 entries): insert for frontend 10.96.0.")
            && text.contains("raise --bpf-lb-map-max"),
        "{text}"
    );
    assert_eq!(
        dp.insert_failures(defs::SERVICES.name),
        15,
        "one failed insert per frontend that did not fit"
    );
    assert_eq!(dp.insert_failures(defs::SLOTS.name), 0);
    // The agent hears of it once for the batch (it logs it and posts the
    // Event), naming the first frontend that did not fit.
    let events = dp.take_map_events();
    assert!(
        matches!(
            &events[..],
            [MapEvent::Full {
                map: "SVC_V4",
                capacity: 10,
                flag: "--bpf-lb-map-max",
                what,
            }] if what.starts_with("10.96.0.")
        ),
        "{events:?}"
    );
    assert!(dp.take_map_events().is_empty(), "taken");

    // The 10 that fit are whole; the 15 others left nothing behind.
    assert_eq!(dp.programmed().frontends.len(), 10);
    let e = entries(&dp);
    assert_eq!(e[defs::SERVICES.name], 10);
    assert_eq!(e[defs::REVNAT.name], 10);
    assert_eq!(e[defs::SVC_STATS.name], 10);
    assert_eq!(e[defs::SLOTS.name], 20);
    assert_eq!(e[defs::AFFINITY_MATCH.name], 20);
    assert_eq!(
        e[defs::BACKENDS.name],
        20,
        "backends of failed frontends go"
    );

    // /metrics: the counter and the fill gauges.
    let m = telemetry.render();
    let failures_line = |map: &str| {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "kubeproxy_ebpf_map_insert_failures_total{{map=\"{map}\"}} "
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no failure counter for {map} in\n{m}"))
    };
    assert_eq!(failures_line("SVC_V4"), 15);
    assert_eq!(failures_line("SLOTS_V4"), 0);
    assert!(
        m.lines()
            .any(|l| l == "kubeproxy_ebpf_map_entries{map=\"SVC_V4\"} 10"),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l == "kubeproxy_ebpf_map_capacity{map=\"SVC_V4\"} 10"),
        "{m}"
    );
    // Pressure: entries / capacity (20 slots of 262144).
    for (map, want) in [
        ("SVC_V4", "1".to_owned()),
        (
            "SLOTS_V4",
            (20.0 / f64::from(defs::SLOTS.max_entries)).to_string(),
        ),
    ] {
        let line = format!("kubeproxy_ebpf_map_pressure{{map=\"{map}\"}} {want}");
        assert!(m.lines().any(|l| l == line), "no {line:?} in\n{m}");
    }

    // The next sync retries the 15 and fails again: counted again.
    let retry: Vec<Change> = desired
        .frontends
        .iter()
        .filter(|(k, _)| !dp.programmed().frontends.contains_key(k))
        .map(|(k, f)| Change::Upsert(*k, f.clone()))
        .collect();
    assert_eq!(retry.len(), 15);
    assert!(dp.apply(&retry).is_err());
    assert_eq!(dp.insert_failures(defs::SERVICES.name), 30);
    assert_eq!(
        entries(&dp)[defs::SLOTS.name],
        20,
        "no leftovers after a retry"
    );

    // Traffic: a programmed frontend is translated to one of its
    // backends, one that did not fit passes untouched.
    let (fits, fitted) = dp
        .programmed()
        .frontends
        .iter()
        .next()
        .map(|(k, f)| (*k, f.clone()))
        .expect("a programmed frontend");
    let (rc, out) = run_tc(&dp, &syn(CLIENT, 40000, v4(fits.addr), fits.port));
    assert_eq!(rc, TC_ACT_OK);
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert!(
        fitted.backends.iter().any(|b| b.addr == dst),
        "{fits} went to {dst}, not one of its backends"
    );
    let left_out = retry
        .iter()
        .find_map(|c| match c {
            Change::Upsert(k, _) => Some(*k),
            Change::Remove(_) => None,
        })
        .expect("a frontend that did not fit");
    let frame = syn(CLIENT, 40001, v4(left_out.addr), left_out.port);
    let (rc, out) = run_tc(&dp, &frame);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        out, frame,
        "a frontend that is not programmed is not touched"
    );
}

/// A frontend's backends are written in one batch: when the map fills in
/// the middle of it, the backends written before the failing one must not
/// stay behind as orphans (nothing references them).
#[test]
fn a_backend_map_that_fills_mid_frontend_keeps_no_orphans() {
    let dir = PinDir::new("full-backends");
    // Room for 5 backends: frontends of 2 each, so the third frontend's
    // first backend fits and its second does not.
    let mut dp = load(&dir, [(defs::BACKENDS.name, 5)].into());
    let desired = table(3, 2);
    let err = dp.apply(&upserts(&desired)).expect_err("2 of 3 fit");
    assert!(
        matches!(
            &err,
            EbpfError::MapFull {
                map: "BACKENDS_V4",
                capacity: 5,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(dp.insert_failures(defs::BACKENDS.name), 1);
    assert_eq!(dp.programmed().frontends.len(), 2);
    let e = entries(&dp);
    assert_eq!(e[defs::SERVICES.name], 2);
    assert_eq!(e[defs::SLOTS.name], 4);
    assert_eq!(
        e[defs::BACKENDS.name],
        4,
        "the failed frontend's backend that fit is deleted with it"
    );
    // Once there is room (one frontend goes; its backends are released at
    // the end of that batch), the third one fits whole.
    let gone = vip(0);
    dp.apply(&[Change::Remove(gone)]).expect("remove");
    let rest: Vec<Change> = upserts(&desired)
        .into_iter()
        .filter(|c| !matches!(c, Change::Upsert(k, _) if *k == gone))
        .collect();
    dp.apply(&rest).expect("fits now");
    let e = entries(&dp);
    assert_eq!(e[defs::BACKENDS.name], 4);
    assert_eq!(e[defs::SLOTS.name], 4);
    assert_eq!(dp.programmed().frontends.len(), 2);
}

#[test]
fn a_restart_with_larger_capacities_grows_pinned_maps_and_keeps_their_entries() {
    let dir = PinDir::new("grow");
    let mut small = MapSizing::default();
    small.0.insert(Knob::Frontends, Sizing::Fixed(10));
    small.0.insert(Knob::Backends, Sizing::Fixed(20));
    let first = table(10, 2);
    {
        let mut dp = load(&dir, small.capacities(None));
        dp.apply(&upserts(&first)).expect("10 fit");
        assert!(
            dp.apply(&upserts(&table(11, 2))).is_err(),
            "the 11th does not"
        );
    }
    // The pins stay; the next agent asks for more.
    let mut large = MapSizing::default();
    large.0.insert(Knob::Frontends, Sizing::Fixed(1000));
    large.0.insert(Knob::Backends, Sizing::Fixed(2000));
    let mut dp = load(&dir, large.capacities(None));
    for name in [defs::SERVICES.name, defs::REVNAT.name, defs::SVC_STATS.name] {
        assert_eq!(dp.capacities()[name], 1000, "{name} grown");
    }
    assert_eq!(dp.capacities()[defs::BACKENDS.name], 2000);
    // What the first agent programmed was copied and adopted.
    assert_eq!(dp.programmed(), &first, "adopted as programmed");
    let e = entries(&dp);
    assert_eq!(e[defs::SERVICES.name], 10);
    assert_eq!(e[defs::SLOTS.name], 20);
    assert_eq!(e[defs::BACKENDS.name], 20);
    let (k, f) = first.frontends.iter().next().expect("one");
    let (_, out) = run_tc(&dp, &syn(CLIENT, 40002, v4(k.addr), k.port));
    let dst = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
    assert!(f.backends.iter().any(|b| b.addr == dst), "{k} -> {dst}");
    // And there is room now.
    let more = table(500, 2);
    dp.apply(&upserts(&more)).expect("500 fit now");
    assert_eq!(entries(&dp)[defs::SERVICES.name], 500);
    // Asking for less keeps the larger pinned maps (no entry is lost).
    drop(dp);
    let dp = load(&dir, small.capacities(None));
    assert_eq!(dp.capacities()[defs::SERVICES.name], 1000);
    assert_eq!(dp.programmed().frontends.len(), 500);
}

// ---- traffic ----------------------------------------------------------------

fn run_tc(dp: &EbpfDataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    let p = dp.program(progs::TC_FROM_POD).expect("program loaded");
    let mut out = vec![0u8; frame.len() + 256];
    let res = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP SYN frame with valid checksums.
/// The IPv4 address of a frontend of this (IPv4-only) test.
fn v4(a: std::net::IpAddr) -> Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a}: an IPv6 frontend in an IPv4 test"),
    }
}

fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&1u32.to_be_bytes());
    l4.extend_from_slice(&0u32.to_be_bytes());
    l4.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let c = fold(sum16(&pseudo) + sum16(&l4));
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// Conntrack under pressure grows at the next start: the live flows of the
/// pinned map (idle ones past their timeout not counted) are `auto`'s
/// need, and the restarted agent's map is 1.5x that, with every entry
/// copied.
#[test]
fn a_conntrack_under_pressure_grows_at_the_next_start() {
    use proxy::dataplane::conntrack::{self, Timeouts};
    use proxy_common::{CtKey, CtValue, ct_flags, proto};

    let dir = PinDir::new("ct-grow");
    let default = defs::CONNTRACK.max_entries;
    let (live, stale) = (200_000u32, 1_000u32);
    {
        let dp = load(&dir, MapSizing::default().capacities(None));
        assert_eq!(dp.capacities()[defs::CONNTRACK.name], default);
        let mut maps = proxy::maps::Maps::open_pinned(&dir.0).expect("pinned maps");
        let now = conntrack::monotonic_ns();
        for i in 0..live + stale {
            let (p, last_seen, flags) = if i < live {
                (proto::TCP, now, ct_flags::TCP_ESTABLISHED)
            } else {
                // UDP idle for 2 minutes: past its 60 s.
                (proto::UDP, now.saturating_sub(120_000_000_000), 0)
            };
            let k = CtKey {
                saddr: i,
                daddr: 1,
                sport: 1,
                dport: 1,
                proto: p,
                dir: 0,
                _pad: 0,
            };
            let v = CtValue {
                last_seen_ns: last_seen,
                backend_id: 1,
                service_id: 1,
                flags,
                _pad: 0,
                nat_addr: 0,
                nat_port: 0,
                _pad2: 0,
            };
            maps.conntrack.insert(k, v, 0).expect("ct entry");
        }
    }
    let found = conntrack::pinned_live(&dir.0, &Timeouts::default())
        .expect("count")
        .expect("pinned");
    assert_eq!(found, u64::from(live), "live flows only");
    let size = ClusterSize {
        conntrack: found,
        ..Default::default()
    };
    let caps = MapSizing::default().capacities(Some(&size));
    // 200,000 x 1.5 = 300,000, rounded up to a multiple of 4096.
    assert_eq!(caps[defs::CONNTRACK.name], 303_104);
    let dp = load(&dir, caps);
    assert_eq!(dp.capacities()[defs::CONNTRACK.name], 303_104, "grown");
    assert_eq!(
        entries(&dp)[defs::CONNTRACK.name],
        u64::from(live + stale),
        "every entry copied"
    );
}
