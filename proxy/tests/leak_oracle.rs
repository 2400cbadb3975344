//! Leak oracle for the eBPF dataplane's map programming.
//!
//! A seeded generator applies random sequences of changes (ClusterIP,
//! NodePort and LoadBalancer frontends of both families, IPv6 ones with
//! IPv6 backends in `SVC_V6`/`BACKENDS_V6`; Maglev with the agent's size or a
//! per-frontend one; source ranges; affinity; `local_only`; backends shared
//! between frontends; table sizes changed; backend lists grown and shrunk;
//! frontends removed) to one dataplane. At checkpoints every map the agent
//! writes is compared, entry for entry, with a fresh dataplane (its own
//! bpffs directory) programmed once with the same final table. Ids are
//! normalised: frontends by (addr, port, proto), backends by their value,
//! Maglev tables by their content, slots by the live generation's list.
//! At the end everything is removed and every hash/LPM map must be empty.
//!
//! Maps only the kernel writes (conntrack, affinity, socket rev-NAT,
//! fragments, counters) are left out of the comparison; no traffic runs
//! here, so they are empty anyway and the final emptiness check covers them.
//!
//! The maps are read from their pins with raw `bpf(2)` calls, driven by
//! [`proxy_common::maps::ALL`], so the test depends on the dataplane only
//! through `Dataplane::apply`.
//!
//! Needs root and bpffs at /sys/fs/bpf. Seeds: `LEAK_ORACLE_SEEDS=1,2,3`
//! (default three fixed seeds), steps: `LEAK_ORACLE_STEPS` (default 40).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use common::PinDir;
use proxy::{
    dataplane::{
        Dataplane,
        ebpf::{EbpfConfig, EbpfDataplane},
    },
    diff::Change,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
    model::Protocol,
};
use proxy_common::{
    AffinityMatchKey, Backend, Backend6, MaglevKey, MapKind, RevNat, ServiceKey, ServiceKey6,
    ServiceValue, SlotKey, SourceRangeKey, maps,
};

/// The agent-wide Maglev table size of the dataplanes under test (small,
/// so tables are cheap to write).
const DEFAULT_MAGLEV: u32 = 61;

// --- a dataplane in its own pin directory ---------------------------------

struct Fixture {
    dp: EbpfDataplane,
    dir: PinDir,
}

fn fixture() -> Fixture {
    let dir = PinDir::new("leak");
    let mut cfg = EbpfConfig::new(dir.0.clone());
    cfg.maglev_table_size = DEFAULT_MAGLEV;
    let dp = EbpfDataplane::load(cfg)
        .expect("load eBPF dataplane (root and bpffs needed: cargo xtask setup)");
    Fixture { dp, dir }
}

impl Fixture {
    fn pin_dir(&self) -> PathBuf {
        self.dir
            .0
            .join(format!("maps-v{}", proxy_common::LAYOUT_VERSION))
    }
}

// --- raw map reading ---------------------------------------------------------

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for the element commands;
    // the pointers in it point at buffers of the map's key/value sizes that
    // outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Every entry of a pinned map as raw (key, value) bytes. Per-CPU maps:
/// keys only (their values are counters, not programming).
fn raw_entries(path: &Path, kind: MapKind) -> Vec<RawEntry> {
    let map = MapData::from_pin(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let info = map.info().expect("map info");
    let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let per_cpu = matches!(kind, MapKind::PerCpuHash | MapKind::PerCpuArray);
    let mut out = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = ElemAttr {
            map_fd: fd,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value_or_next_key: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => panic!("{}: next key: {e}", path.display()),
        }
        let mut value = vec![0u8; if per_cpu { 0 } else { value_size }];
        if !per_cpu {
            let mut attr = ElemAttr {
                map_fd: fd,
                key: next.as_ptr() as u64,
                value_or_next_key: value.as_mut_ptr() as u64,
                ..Default::default()
            };
            if let Err(e) = bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
                // Deleted between the two calls: nothing writes here, so no.
                panic!("{}: lookup: {e}", path.display());
            }
        }
        out.push((next.clone(), value));
        key = Some(next);
        assert!(
            out.len() <= 1 << 22,
            "{}: iteration does not end",
            path.display()
        );
    }
    out
}

/// A map entry's key and value bytes.
type RawEntry = (Vec<u8>, Vec<u8>);

fn dump(pin_dir: &Path) -> BTreeMap<&'static str, Vec<RawEntry>> {
    maps::ALL
        .iter()
        .map(|m| (m.name, raw_entries(&pin_dir.join(m.name), m.kind)))
        .collect()
}

fn pod<T: Copy>(bytes: &[u8], what: &str) -> T {
    assert_eq!(
        bytes.len(),
        std::mem::size_of::<T>(),
        "{what}: entry size differs from proxy_common's type"
    );
    // SAFETY: length checked; the proxy_common types are plain repr(C)
    // integers, valid for any bit pattern.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

fn ip(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

// --- canonical form ----------------------------------------------------------

/// Maps only the kernel writes.
fn kernel_written(name: &str) -> bool {
    [
        maps::CONNTRACK.name,
        maps::AFFINITY.name,
        maps::SOCK_REVNAT.name,
        maps::SOCK_REVNAT6.name,
        maps::FRAGMENTS.name,
        maps::STATS.name,
    ]
    .contains(&name)
}

/// Each agent-written map as a sorted list of entries rendered without ids.
fn canonical(pin_dir: &Path) -> BTreeMap<String, Vec<String>> {
    let raw = dump(pin_dir);
    let get = |name: &str| raw.get(name).map(Vec::as_slice).unwrap_or_default();

    // Frontends of both families by id (ids are one space): the map that
    // holds each, the frontend rendered, its value.
    let mut services: BTreeMap<u32, (&'static str, String, ServiceValue)> = BTreeMap::new();
    let render = |a: IpAddr, port: u16, proto: u8| {
        format!(
            "{}/{}",
            std::net::SocketAddr::new(a, u16::from_be(port)),
            proxy_proto(proto)
        )
    };
    for (k, v) in get(maps::SERVICES.name) {
        let k: ServiceKey = pod(k, "SVC key");
        let v: ServiceValue = pod(v, "SVC value");
        let f = render(ip(k.addr).into(), k.port, k.proto);
        services.insert(v.id, (maps::SERVICES.name, f, v));
    }
    for (k, v) in get(maps::SERVICES6.name) {
        let k: ServiceKey6 = pod(k, "SVC_V6 key");
        let v: ServiceValue = pod(v, "SVC_V6 value");
        let f = render(proxy_common::ip6_addr(k.addr).into(), k.port, k.proto);
        let twice = services.insert(v.id, (maps::SERVICES6.name, f, v));
        assert!(twice.is_none(), "frontend id {} in SVC_V4 and SVC_V6", v.id);
    }
    let fe = |id: u32| -> String {
        match services.get(&id) {
            Some((_, f, _)) => f.clone(),
            None => format!("orphan-frontend#{id}"),
        }
    };
    // Backends of both families by id: the map that holds each, rendered.
    let mut backends: BTreeMap<u32, (&'static str, String)> = BTreeMap::new();
    let render_backend = |a: IpAddr, port: u16, proto: u8, flags: u8| {
        format!("{} flags={flags:#x}", render(a, port, proto))
    };
    for (k, v) in get(maps::BACKENDS.name) {
        let b: Backend = pod(v, "BACKENDS value");
        let r = render_backend(ip(b.addr).into(), b.port, b.proto, b.flags);
        backends.insert(pod(k, "BACKENDS key"), (maps::BACKENDS.name, r));
    }
    for (k, v) in get(maps::BACKENDS6.name) {
        let b: Backend6 = pod(v, "BACKENDS_V6 value");
        let r = render_backend(
            proxy_common::ip6_addr(b.addr).into(),
            b.port,
            b.proto,
            b.flags,
        );
        let id: u32 = pod(k, "BACKENDS_V6 key");
        let twice = backends.insert(id, (maps::BACKENDS6.name, r));
        assert!(
            twice.is_none(),
            "backend id {id} in BACKENDS_V4 and BACKENDS_V6"
        );
    }
    let be = |id: u32| -> String {
        match backends.get(&id) {
            Some((_, b)) => b.clone(),
            None => format!("dangling-backend#{id}"),
        }
    };

    // Maglev tables by content.
    let mut tables: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for (k, v) in get(maps::MAGLEV.name) {
        let k: MaglevKey = pod(k, "MAGLEV key");
        tables
            .entry(k.table_id)
            .or_default()
            .insert(k.slot, pod(v, "MAGLEV value"));
    }
    // A table by its content: the slots below `limit` (what the data path
    // of a frontend with that size reads), or all of them.
    let table_name = |table_id: u32, limit: u32| -> String {
        match tables.get(&table_id) {
            None => "missing".to_owned(),
            Some(t) => {
                let mut h = DefaultHasher::new();
                for (slot, b) in t.range(..limit) {
                    (slot, be(*b)).hash(&mut h);
                }
                let n = t.range(..limit).count();
                let max = t.range(..limit).next_back().map_or(0, |(s, _)| *s);
                format!("{n} slots (max {max}) #{:016x}", h.finish())
            }
        }
    };

    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut put = |map: &str, entry: String| out.entry(map.to_owned()).or_default().push(entry);

    for (id, (map, _, v)) in &services {
        let table = if v.maglev_size != 0 {
            table_name(v.maglev_table, v.maglev_size)
        } else {
            "-".to_owned()
        };
        put(
            map,
            format!(
                "{} count={} flags={:#x} affinity={} maglev_size={} table={table}",
                fe(*id),
                v.count,
                v.flags,
                v.affinity_timeout,
                v.maglev_size
            ),
        );
    }

    // Slots: the live generation as one list per frontend; anything else
    // (the other generation, beyond the count, unknown frontend) as strays.
    let mut live: BTreeMap<u32, BTreeMap<u16, u32>> = BTreeMap::new();
    for (k, v) in get(maps::SLOTS.name) {
        let k: SlotKey = pod(k, "SLOTS key");
        let v: u32 = pod(v, "SLOTS value");
        match services.get(&k.service_id) {
            Some((_, _, s)) if k.generation == s.generation as u16 && k.index < s.count => {
                live.entry(k.service_id).or_default().insert(k.index, v);
            }
            _ => put(
                maps::SLOTS.name,
                format!(
                    "stray slot {} gen={} index={} -> {}",
                    fe(k.service_id),
                    k.generation,
                    k.index,
                    be(v)
                ),
            ),
        }
    }
    for (id, slots) in &live {
        let list: Vec<String> = slots.values().map(|b| be(*b)).collect();
        put(
            maps::SLOTS.name,
            format!("{} [{}]", fe(*id), list.join(", ")),
        );
    }
    for (map, b) in backends.values() {
        put(map, b.clone());
    }
    for (k, v) in get(maps::REVNAT.name) {
        let id: u32 = pod(k, "REVNAT key");
        let r: RevNat = pod(v, "REVNAT value");
        put(
            maps::REVNAT.name,
            format!("{} -> {}:{}", fe(id), ip(r.addr), u16::from_be(r.port)),
        );
    }
    for (k, _) in get(maps::SVC_STATS.name) {
        let id: u32 = pod(k, "SVC_STATS key");
        put(maps::SVC_STATS.name, fe(id));
    }
    for (k, v) in get(maps::SOURCE_RANGES.name) {
        // LPM key: prefix length (host order), then the data.
        let (len, data) = k.split_at(4);
        let len = u32::from_ne_bytes(len.try_into().expect("4 bytes"));
        let d: SourceRangeKey = pod(data, "SRC_RANGES key data");
        put(
            maps::SOURCE_RANGES.name,
            format!(
                "{} {}/{} = {v:?}",
                fe(u32::from_be(d.service_id_be)),
                ip(d.addr),
                len.saturating_sub(32)
            ),
        );
    }
    for (k, v) in get(maps::AFFINITY_MATCH.name) {
        let k: AffinityMatchKey = pod(k, "AFF_MATCH key");
        put(
            maps::AFFINITY_MATCH.name,
            format!("{} member {} = {v:?}", fe(k.service_id), be(k.backend_id)),
        );
    }
    let used: BTreeSet<u32> = services
        .values()
        .filter(|(_, _, v)| v.maglev_size != 0)
        .map(|(_, _, v)| v.maglev_table)
        .collect();
    for table_id in tables.keys() {
        let users: Vec<String> = services
            .values()
            .filter(|(_, _, v)| v.maglev_size != 0 && v.maglev_table == *table_id)
            .map(|(_, _, v)| fe(v.id))
            .collect();
        put(
            maps::MAGLEV.name,
            format!(
                "table {} used by [{}]{}",
                table_name(*table_id, u32::MAX),
                users.join(", "),
                if used.contains(table_id) {
                    ""
                } else {
                    " (unreferenced)"
                }
            ),
        );
    }
    for (name, entries) in &raw {
        let known = [
            maps::SERVICES.name,
            maps::SERVICES6.name,
            maps::SLOTS.name,
            maps::BACKENDS.name,
            maps::BACKENDS6.name,
            maps::REVNAT.name,
            maps::SVC_STATS.name,
            maps::SOURCE_RANGES.name,
            maps::AFFINITY_MATCH.name,
            maps::MAGLEV.name,
        ];
        if kernel_written(name) || known.contains(name) {
            continue;
        }
        if *name == maps::CONFIG.name {
            for (k, v) in entries {
                put(name, format!("{k:02x?} = {v:02x?}"));
            }
        } else {
            // A map this oracle does not know how to normalise: its size.
            put(name, format!("{} entries", entries.len()));
        }
    }
    for entries in out.values_mut() {
        entries.sort();
    }
    out
}

fn proxy_proto(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    }
}

/// The maps that differ, with the entries only one side has (the first few).
fn differences(
    churned: &BTreeMap<String, Vec<String>>,
    fresh: &BTreeMap<String, Vec<String>>,
) -> String {
    let names: BTreeSet<&String> = churned.keys().chain(fresh.keys()).collect();
    let mut msg = String::new();
    for name in names {
        let a = churned.get(name).cloned().unwrap_or_default();
        let b = fresh.get(name).cloned().unwrap_or_default();
        if a == b {
            continue;
        }
        let only = |x: &[String], y: &[String]| -> Vec<String> {
            let mut y = y.to_vec();
            x.iter()
                .filter(|e| match y.iter().position(|f| f == *e) {
                    Some(i) => {
                        y.remove(i);
                        false
                    }
                    None => true,
                })
                .cloned()
                .collect()
        };
        let (extra, missing) = (only(&a, &b), only(&b, &a));
        let _ = writeln!(
            msg,
            "  {name}: {} entries after churn, {} fresh; only after churn ({}): {:#?}; only fresh ({}): {:#?}",
            a.len(),
            b.len(),
            extra.len(),
            &extra[..extra.len().min(6)],
            missing.len(),
            &missing[..missing.len().min(6)],
        );
    }
    msg
}

// --- the generator -----------------------------------------------------------

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The frontends the generator draws from: a kind per key, both families.
fn pool() -> Vec<(FrontendKey, FrontendKind)> {
    let k = |a: [u8; 4], port, proto| FrontendKey {
        addr: Ipv4Addr::from(a).into(),
        port,
        proto,
    };
    let k6 = |a: &str, port, proto| FrontendKey {
        addr: a.parse().expect("an IPv6 address"),
        port,
        proto,
    };
    use FrontendKind::*;
    use Protocol::*;
    vec![
        (k([10, 96, 0, 1], 80, Tcp), ClusterIp),
        (k([10, 96, 0, 1], 53, Udp), ClusterIp),
        (k([10, 96, 0, 2], 80, Tcp), ClusterIp),
        (k([192, 168, 50, 10], 30001, Tcp), NodePort),
        (k([192, 168, 50, 10], 30002, Udp), NodePort),
        (k([192, 168, 50, 11], 30001, Tcp), NodePort),
        (k([172, 18, 0, 1], 80, Tcp), LoadBalancer),
        (k([172, 18, 0, 1], 443, Tcp), LoadBalancer),
        (k([172, 18, 0, 2], 53, Udp), LoadBalancer),
        (k([172, 18, 0, 3], 80, Tcp), LoadBalancer),
        (k6("fd00:96::1", 80, Tcp), ClusterIp),
        (k6("fd00:96::1", 53, Udp), ClusterIp),
        (k6("fd00:96::2", 80, Tcp), ClusterIp),
        (k6("fd00:18::10", 30001, Tcp), NodePort),
        (k6("fd00:18::1", 80, Tcp), LoadBalancer),
        (k6("fd00:18::2", 53, Udp), LoadBalancer),
    ]
}

/// Backends are shared between frontends: the same few addresses (of the
/// frontend's family) and a port per protocol. Their flags are a function
/// of the address, so a backend's value never depends on which frontend
/// wrote it last.
fn backend(i: usize, v6: bool) -> (IpAddr, bool, bool) {
    let (subnet, host) = (1 + (i % 2) as u16, 2 + i as u16);
    let addr = if v6 {
        Ipv6Addr::new(0xfd00, 0x244, subnet, 0, 0, 0, 0, host).into()
    } else {
        Ipv4Addr::new(10, 244, subnet as u8, host as u8).into()
    };
    (addr, i % 5 == 4, i.is_multiple_of(2))
}
const BACKENDS: usize = 9;

fn backend_list(idx: &BTreeSet<usize>, key: &FrontendKey) -> Vec<BackendAddr> {
    let port = if key.proto == Protocol::Udp {
        5353
    } else {
        8080
    };
    let mut v: Vec<BackendAddr> = idx
        .iter()
        .map(|i| {
            let (addr, terminating, local) = backend(*i, key.addr.is_ipv6());
            BackendAddr {
                addr,
                port,
                terminating,
                local,
            }
        })
        .collect();
    v.sort();
    v
}

/// What the generator keeps per frontend (the backend indices, to grow and
/// shrink them).
#[derive(Clone, Debug)]
struct Spec {
    kind: FrontendKind,
    backends: BTreeSet<usize>,
    affinity: u32,
    /// Indices into [`RANGES`] (the frontend's family's).
    ranges: Vec<usize>,
    maglev: Option<u32>,
    local_only: bool,
}

impl Spec {
    fn frontend(&self, key: &FrontendKey) -> Frontend {
        Frontend {
            kind: self.kind,
            backends: backend_list(&self.backends, key).into(),
            affinity_timeout: self.affinity,
            source_ranges: self
                .ranges
                .iter()
                .map(|i| {
                    let (net, len) = RANGES[usize::from(key.addr.is_ipv6())][*i];
                    (net.parse().expect("a network address"), len)
                })
                .collect(),
            maglev_table_size: self.maglev,
            local_only: self.local_only,
        }
    }
}

fn random_backends(rng: &mut Rng) -> BTreeSet<usize> {
    let n = rng.below(6);
    (0..n).map(|_| rng.below(BACKENDS)).collect()
}

fn random_maglev(rng: &mut Rng) -> Option<u32> {
    [None, None, Some(251), Some(1021), Some(13)][rng.below(5)]
}

/// Source ranges by family (IPv4, IPv6), as `lb` gives a frontend only
/// its own family's.
const RANGES: [[(&str, u8); 3]; 2] = [
    [("192.168.0.0", 16), ("10.1.0.0", 24), ("203.0.113.7", 32)],
    [("fd00:1::", 32), ("2001:db8::", 48), ("2001:db8:1::7", 128)],
];

fn random_ranges(rng: &mut Rng, kind: FrontendKind) -> Vec<usize> {
    if kind != FrontendKind::LoadBalancer || rng.chance(50) {
        return Vec::new();
    }
    let mut v: Vec<usize> = (0..RANGES[0].len()).filter(|_| rng.chance(60)).collect();
    if v.is_empty() {
        v.push(rng.below(RANGES[0].len()));
    }
    v
}

fn random_spec(rng: &mut Rng, kind: FrontendKind) -> Spec {
    Spec {
        kind,
        backends: random_backends(rng),
        affinity: if rng.chance(30) { 10_800 } else { 0 },
        ranges: random_ranges(rng, kind),
        maglev: random_maglev(rng),
        local_only: kind != FrontendKind::ClusterIp && rng.chance(30),
    }
}

/// One step: a batch of changes (applied in one `apply`), described.
fn step(rng: &mut Rng, state: &mut BTreeMap<FrontendKey, Spec>) -> (Vec<Change>, String) {
    let pool = pool();
    let existing: Vec<FrontendKey> = state.keys().copied().collect();
    let pick_existing = |rng: &mut Rng| existing[rng.below(existing.len())];
    let mut changed: Vec<FrontendKey> = Vec::new();
    let mut removed: Vec<FrontendKey> = Vec::new();
    // Few frontends: mostly add some.
    let action = if existing.is_empty() || (existing.len() < 4 && rng.chance(50)) {
        0
    } else {
        rng.below(9)
    };
    let what = match action {
        // New or replaced frontend (sometimes two at once).
        0 | 1 => {
            for _ in 0..1 + rng.below(2) {
                let (key, kind) = pool[rng.below(pool.len())];
                state.insert(key, random_spec(rng, kind));
                changed.push(key);
            }
            "upsert"
        }
        2 => {
            let key = pick_existing(rng);
            let s = state.get_mut(&key).expect("existing");
            for _ in 0..1 + rng.below(3) {
                s.backends.insert(rng.below(BACKENDS));
            }
            changed.push(key);
            "grow backends"
        }
        3 => {
            let key = pick_existing(rng);
            let s = state.get_mut(&key).expect("existing");
            for _ in 0..1 + rng.below(3) {
                if let Some(b) = s.backends.iter().nth(rng.below(s.backends.len().max(1))) {
                    let b = *b;
                    s.backends.remove(&b);
                }
            }
            changed.push(key);
            "shrink backends"
        }
        4 => {
            let key = pick_existing(rng);
            let s = state.get_mut(&key).expect("existing");
            s.maglev = random_maglev(rng);
            changed.push(key);
            "table size"
        }
        5 => {
            let key = pick_existing(rng);
            let s = state.get_mut(&key).expect("existing");
            match rng.below(3) {
                0 => s.affinity = if s.affinity == 0 { 30 } else { 0 },
                1 => s.ranges = random_ranges(rng, s.kind),
                _ => s.local_only = !s.local_only,
            }
            changed.push(key);
            "affinity/ranges/local"
        }
        6 | 7 => {
            for _ in 0..1 + rng.below(2) {
                let key = pick_existing(rng);
                if state.remove(&key).is_some() {
                    removed.push(key);
                }
            }
            "remove"
        }
        _ => {
            // Remove one and give another the same backends (a Maglev table
            // of the same content).
            let gone = pick_existing(rng);
            let spec = state.remove(&gone).expect("existing");
            removed.push(gone);
            let (key, kind) = pool[rng.below(pool.len())];
            state.insert(key, Spec { kind, ..spec });
            changed.push(key);
            removed.retain(|k| *k != key);
            "move"
        }
    };
    let mut changes: Vec<Change> = changed
        .iter()
        .filter_map(|k| state.get(k).map(|s| Change::Upsert(*k, s.frontend(k))))
        .collect();
    changes.extend(removed.iter().map(|k| Change::Remove(*k)));
    let desc = format!(
        "{what}: {}",
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(k, f) => format!(
                    "+{k} {:?} n={} aff={} ranges={} maglev={:?} local={}",
                    f.kind,
                    f.backends.len(),
                    f.affinity_timeout,
                    f.source_ranges.len(),
                    f.maglev_table_size,
                    f.local_only
                ),
                Change::Remove(k) => format!("-{k}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    (changes, desc)
}

/// Compare the churned dataplane's maps with a fresh dataplane programmed
/// once with `state`.
fn check(churned: &Fixture, state: &BTreeMap<FrontendKey, Spec>, context: &str) {
    let mut fresh = fixture();
    let all: Vec<Change> = state
        .iter()
        .map(|(k, s)| Change::Upsert(*k, s.frontend(k)))
        .collect();
    fresh.dp.apply(&all).expect("program the fresh dataplane");
    let (a, b) = (canonical(&churned.pin_dir()), canonical(&fresh.pin_dir()));
    let diff = differences(&a, &b);
    assert!(
        diff.is_empty(),
        "{context}: maps differ from a fresh dataplane programmed with the same {} frontends:\n{diff}",
        state.len()
    );
}

fn run_seed(seed: u64, steps: usize) {
    let mut rng = Rng::new(seed);
    let mut dp = fixture();
    let mut state: BTreeMap<FrontendKey, Spec> = BTreeMap::new();
    let mut history = String::new();
    for n in 1..=steps {
        let (changes, desc) = step(&mut rng, &mut state);
        let _ = writeln!(history, "  step {n}: {desc}");
        dp.dp
            .apply(&changes)
            .unwrap_or_else(|e| panic!("seed {seed} step {n}: apply: {e}\n{history}"));
        if n % 8 == 0 || n == steps {
            check(
                &dp,
                &state,
                &format!("seed {seed} after step {n}\nsteps:\n{history}"),
            );
        }
    }
    // Both families were exercised (the pool has both; a seed that never
    // drew an IPv6 frontend would prove nothing about SVC_V6).
    assert!(
        history.contains("+[fd00"),
        "seed {seed}: no IPv6 frontend in {steps} steps:\n{history}"
    );
    // Everything goes: every hash and LPM map must be empty again (arrays
    // always hold all their entries).
    let all: Vec<Change> = state.keys().map(|k| Change::Remove(*k)).collect();
    dp.dp.apply(&all).expect("remove everything");
    let raw = dump(&dp.pin_dir());
    let mut left = String::new();
    for m in maps::ALL {
        if matches!(m.kind, MapKind::Array | MapKind::PerCpuArray) {
            continue;
        }
        let n = raw[m.name].len();
        if n != 0 {
            let _ = writeln!(left, "  {}: {n} entries", m.name);
        }
    }
    assert!(
        left.is_empty(),
        "seed {seed}: after removing every frontend, maps still hold entries:\n{left}steps:\n{history}"
    );
}

#[test]
fn random_churn_leaves_the_maps_of_a_fresh_dataplane() {
    let seeds: Vec<u64> = std::env::var("LEAK_ORACLE_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    let steps: usize = std::env::var("LEAK_ORACLE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in seeds {
        run_seed(seed, steps);
    }
}
