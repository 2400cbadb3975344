//! Map capacities: one sizing knob per kind of entry (a flag taking a
//! number or `auto`), the maps each knob sizes, and auto-sizing from the
//! cluster's size at start.
//!
//! Defaults come from the descriptors in `proxy_common::maps` (the one
//! home of every map's default capacity); a knob's default is its primary
//! map's. `auto` picks `max(default, need x 1.5)` rounded up to a multiple
//! of [`ROUND`], where the need is counted from the first table the agent
//! programs ([`ClusterSize::of`]); conntrack's need is the live flows the
//! pinned map holds at start, so a conntrack under pressure grows at the
//! next start (see [`ClusterSize::conntrack`]).

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    str::FromStr,
};

use proxy_common::{MapInfo, maps as defs};

use crate::lb::{Frontend, FrontendKey, FrontendKind, LbTable};

/// Headroom over the counted need, in percent (growth until the next
/// restart).
pub const HEADROOM_PERCENT: u64 = 50;
/// Auto-sized capacities are rounded up to a multiple of this.
pub const ROUND: u64 = 4096;

/// A capacity flag's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sizing {
    /// From the cluster's size at start (never below the default).
    #[default]
    Auto,
    /// Exactly this many entries.
    Fixed(u32),
}

impl FromStr for Sizing {
    type Err = String;

    fn from_str(s: &str) -> Result<Sizing, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(Sizing::Auto);
        }
        match t.replace('_', "").parse::<u32>() {
            Ok(0) => Err(format!("{s:?}: a map needs at least one entry")),
            Ok(n) => Ok(Sizing::Fixed(n)),
            Err(_) => Err(format!(
                "{s:?} is not a capacity (`auto` or a number from 1 to {})",
                u32::MAX
            )),
        }
    }
}

impl fmt::Display for Sizing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sizing::Auto => f.write_str("auto"),
            Sizing::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// For clap: `auto` or a number.
pub fn parse_sizing(s: &str) -> Result<Sizing, String> {
    s.parse()
}

/// A sizing knob: what one flag sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Knob {
    /// Frontends: `SVC_V4`, `SVC_V6`, `REVNAT_V4`, `SVC_STATS`.
    Frontends,
    /// Distinct backends (address, port, protocol): `BACKENDS_V4`,
    /// `BACKENDS_V6`.
    Backends,
    /// (frontend, backend) pairs: `SLOTS_V4` (two generations while a
    /// frontend is updated) and `AFF_MATCH_V4`.
    Slots,
    /// Tracked flows: `CT_V4`; `SOCK_RNAT_V4` and `SOCK_RNAT_V6` (socket-LB
    /// reverse entries) get a quarter of it, never less than their default.
    /// `auto`: the live flows the pinned map holds at start x 1.5.
    Conntrack,
    /// Session-affinity entries: `AFFINITY_V4`.
    Affinity,
    /// loadBalancerSourceRanges entries: `SRC_RANGES_V4`.
    SourceRanges,
    /// Maglev slots over all distinct tables: `MAGLEV_V4`.
    Maglev,
}

impl Knob {
    pub const ALL: [Knob; 7] = [
        Knob::Frontends,
        Knob::Backends,
        Knob::Slots,
        Knob::Conntrack,
        Knob::Affinity,
        Knob::SourceRanges,
        Knob::Maglev,
    ];

    /// The command-line flag.
    pub fn flag(self) -> &'static str {
        match self {
            Knob::Frontends => "--bpf-lb-map-max",
            Knob::Backends => "--bpf-lb-backend-map-max",
            Knob::Slots => "--bpf-lb-slot-map-max",
            Knob::Conntrack => "--bpf-ct-map-max",
            Knob::Affinity => "--bpf-affinity-map-max",
            Knob::SourceRanges => "--bpf-source-ranges-map-max",
            Knob::Maglev => "--maglev-map-max",
        }
    }

    /// The map whose descriptor holds the knob's default.
    pub fn primary(self) -> MapInfo {
        match self {
            Knob::Frontends => defs::SERVICES.info(),
            Knob::Backends => defs::BACKENDS.info(),
            Knob::Slots => defs::SLOTS.info(),
            Knob::Conntrack => defs::CONNTRACK.info(),
            Knob::Affinity => defs::AFFINITY.info(),
            Knob::SourceRanges => defs::SOURCE_RANGES.info(),
            Knob::Maglev => defs::MAGLEV.info(),
        }
    }

    pub fn default_capacity(self) -> u32 {
        self.primary().max_entries
    }

    /// The knob that sizes map `name` (None: fixed at its default).
    pub fn of_map(name: &str) -> Option<Knob> {
        let n = |d: MapInfo| d.name == name;
        Some(match () {
            _ if n(defs::SERVICES.info())
                || n(defs::SERVICES6.info())
                || n(defs::REVNAT.info())
                || n(defs::REVNAT6.info())
                || n(defs::SVC_STATS.info()) =>
            {
                Knob::Frontends
            }
            _ if n(defs::BACKENDS.info()) || n(defs::BACKENDS6.info()) => Knob::Backends,
            _ if n(defs::SLOTS.info()) || n(defs::AFFINITY_MATCH.info()) => Knob::Slots,
            _ if n(defs::CONNTRACK.info())
                || n(defs::CONNTRACK6.info())
                || n(defs::SOCK_REVNAT.info())
                || n(defs::SOCK_REVNAT6.info()) =>
            {
                Knob::Conntrack
            }
            _ if n(defs::AFFINITY.info()) || n(defs::AFFINITY6.info()) => Knob::Affinity,
            _ if n(defs::SOURCE_RANGES.info()) => Knob::SourceRanges,
            _ if n(defs::MAGLEV.info()) => Knob::Maglev,
            _ => return None,
        })
    }

    /// Entries the cluster needs of this knob (0: not a function of the
    /// cluster's size: affinity follows traffic; conntrack too, so its
    /// need is the flows it held at start).
    pub fn need(self, c: &ClusterSize) -> u64 {
        match self {
            Knob::Frontends => c.frontends,
            Knob::Backends => c.backends,
            // The frontend being updated holds two generations at once.
            Knob::Slots => c.pairs + c.max_backends,
            Knob::SourceRanges => c.source_ranges,
            Knob::Maglev => c.maglev_slots,
            Knob::Conntrack => c.conntrack,
            Knob::Affinity => 0,
        }
    }
}

/// The cluster's size as the dataplane sees it: counted from a table of
/// frontends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterSize {
    pub frontends: u64,
    /// Distinct backends (address, port, protocol).
    pub backends: u64,
    /// (frontend, backend) pairs.
    pub pairs: u64,
    /// Most backends of one frontend.
    pub max_backends: u64,
    /// Source-range entries over all frontends.
    pub source_ranges: u64,
    /// Maglev slots over the distinct tables (backends, size) the
    /// north-south frontends need with table size `maglev_size` (0: off).
    pub maglev_slots: u64,
    /// Live flows in the conntrack map an earlier agent pinned (0: none).
    /// Conntrack is an LRU map: full, it evicts instead of refusing, so
    /// `auto` sizes it to 1.5x what it held: a map more than about two
    /// thirds full at a restart grows (a pinned map is never shrunk).
    pub conntrack: u64,
}

impl ClusterSize {
    pub fn of(table: &LbTable, maglev_size: u32) -> ClusterSize {
        let mut c = ClusterSizer::new(maglev_size);
        for (k, f) in &table.frontends {
            c.add(*k, f);
        }
        c.finish()
    }
}

/// Counts a [`ClusterSize`] one frontend at a time, so the agent sizes its
/// maps without building the whole table first (at 100,000 services that
/// table took 117 MB on top of the cache, for a moment). A frontend key
/// seen before is skipped (the first claim counts).
#[derive(Debug, Default)]
pub struct ClusterSizer {
    c: ClusterSize,
    maglev_size: u32,
    keys: HashSet<FrontendKey>,
    backends: HashSet<(std::net::IpAddr, u16, crate::model::Protocol)>,
    tables: HashSet<(Vec<(std::net::IpAddr, u16)>, u32)>,
}

impl ClusterSizer {
    pub fn new(maglev_size: u32) -> ClusterSizer {
        ClusterSizer {
            maglev_size,
            ..Default::default()
        }
    }

    pub fn add(&mut self, k: FrontendKey, f: &Frontend) {
        if !self.keys.insert(k) {
            return;
        }
        let c = &mut self.c;
        c.frontends += 1;
        c.pairs += f.backends.len() as u64;
        c.max_backends = c.max_backends.max(f.backends.len() as u64);
        // Only IPv4 frontends' ranges (and Maglev tables) are written: the
        // per-packet path is IPv4 only.
        let v4 = k.addr.is_ipv4();
        if v4 {
            c.source_ranges += f.source_ranges.len() as u64;
        }
        for b in &f.backends {
            self.backends.insert((b.addr, b.port, k.proto));
        }
        let m = f.maglev_table_size.unwrap_or(self.maglev_size);
        if v4 && m != 0 && f.kind != FrontendKind::ClusterIp && !f.backends.is_empty() {
            let ids: Vec<_> = f.backends.iter().map(|b| (b.addr, b.port)).collect();
            if self.tables.insert((ids, m)) {
                c.maglev_slots += u64::from(m);
            }
        }
    }

    pub fn finish(self) -> ClusterSize {
        ClusterSize {
            backends: self.backends.len() as u64,
            ..self.c
        }
    }
}

/// Every knob's setting (flags; a knob not set here is `auto`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapSizing(pub BTreeMap<Knob, Sizing>);

impl MapSizing {
    pub fn get(&self, k: Knob) -> Sizing {
        self.0.get(&k).copied().unwrap_or_default()
    }

    /// The capacity of knob `k`: the flag's number, or for `auto`
    /// `max(default, need x (1 + headroom))` rounded up (the default when
    /// the cluster's size is unknown).
    pub fn capacity(&self, k: Knob, cluster: Option<&ClusterSize>) -> u32 {
        match self.get(k) {
            Sizing::Fixed(n) => n,
            Sizing::Auto => auto(k.default_capacity(), cluster.map_or(0, |c| k.need(c))),
        }
    }

    /// `max_entries` for every map a knob sizes, by map name.
    pub fn capacities(&self, cluster: Option<&ClusterSize>) -> BTreeMap<&'static str, u32> {
        let mut out = BTreeMap::new();
        for info in &defs::ALL {
            let Some(k) = Knob::of_map(info.name) else {
                continue;
            };
            let mut n = self.capacity(k, cluster);
            if info.name == defs::SOCK_REVNAT.name || info.name == defs::SOCK_REVNAT6.name {
                n = (n / 4).max(info.max_entries);
            }
            out.insert(info.name, n);
        }
        out
    }
}

/// `max(default, need x (1 + headroom))`, rounded up to [`ROUND`], at
/// most `u32::MAX`.
pub fn auto(default: u32, need: u64) -> u32 {
    if need == 0 {
        return default;
    }
    let want = need.saturating_mul(100 + HEADROOM_PERCENT).div_ceil(100);
    let rounded = want.div_ceil(ROUND).saturating_mul(ROUND);
    u32::try_from(rounded.max(u64::from(default))).unwrap_or(u32::MAX)
}

/// The flag that sizes map `name`, for error messages.
pub fn flag_of_map(name: &str) -> Option<&'static str> {
    Knob::of_map(name).map(Knob::flag)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        lb::{BackendAddr, Frontend, FrontendKey},
        model::Protocol,
    };

    #[test]
    fn sizing_parses() {
        assert_eq!("auto".parse(), Ok(Sizing::Auto));
        assert_eq!("AUTO".parse(), Ok(Sizing::Auto));
        assert_eq!("150000".parse(), Ok(Sizing::Fixed(150_000)));
        assert_eq!("1_048_576".parse(), Ok(Sizing::Fixed(1 << 20)));
        let e = "0".parse::<Sizing>().expect_err("zero");
        assert!(e.contains("at least one entry"), "{e}");
        let e = "lots".parse::<Sizing>().expect_err("word");
        assert!(e.contains("\"lots\" is not a capacity"), "{e}");
        assert!("-5".parse::<Sizing>().is_err());
        assert!("4294967296".parse::<Sizing>().is_err());
        assert_eq!(Sizing::Fixed(7).to_string(), "7");
        assert_eq!(Sizing::Auto.to_string(), "auto");
    }

    #[test]
    fn auto_is_default_or_need_with_headroom_rounded() {
        // Small clusters keep the default.
        assert_eq!(auto(65_536, 0), 65_536);
        assert_eq!(auto(65_536, 10_000), 65_536);
        // 100,000 frontends: 150,000 rounded up to a multiple of 4096.
        assert_eq!(auto(65_536, 100_000), 151_552);
        assert_eq!(151_552 % ROUND as u32, 0);
        assert!(151_552 >= 150_000 && 151_552 - 150_000 < ROUND as u32);
        // 1,000,010 slots -> 1,500,015 -> 1,503,232.
        assert_eq!(auto(262_144, 1_000_010), 1_503_232);
        // Never beyond u32.
        assert_eq!(auto(1, u64::MAX), u32::MAX);
    }

    fn table(n: u32, per: u32, kind: FrontendKind) -> LbTable {
        let mut t = LbTable::default();
        for i in 0..n {
            let backends = (0..per)
                .map(|j| BackendAddr {
                    addr: Ipv4Addr::from(0x0a00_0000 + i * per + j).into(),
                    port: 8080,
                    terminating: false,
                    local: false,
                })
                .collect();
            t.frontends.insert(
                FrontendKey {
                    addr: Ipv4Addr::from(0x0a60_0000 + i).into(),
                    port: 80,
                    proto: Protocol::Tcp,
                },
                Frontend {
                    kind,
                    backends,
                    affinity_timeout: 0,
                    source_ranges: vec![(Ipv4Addr::new(192, 0, 2, 0).into(), 24)],
                    maglev_table_size: None,
                    local_only: false,
                },
            );
        }
        t
    }

    #[test]
    fn cluster_size_counts_the_table() {
        let c = ClusterSize::of(&table(3, 4, FrontendKind::ClusterIp), 251);
        assert_eq!(
            c,
            ClusterSize {
                frontends: 3,
                backends: 12,
                pairs: 12,
                max_backends: 4,
                source_ranges: 3,
                maglev_slots: 0,
                conntrack: 0,
            }
        );
        // North-south frontends need one Maglev table per distinct set.
        let c = ClusterSize::of(&table(3, 4, FrontendKind::LoadBalancer), 251);
        assert_eq!(c.maglev_slots, 3 * 251);
        let c = ClusterSize::of(&table(3, 4, FrontendKind::LoadBalancer), 0);
        assert_eq!(c.maglev_slots, 0);
        // An IPv6 frontend counts as a frontend with its backends; its
        // ranges and Maglev table are not written, so not counted.
        let mut t = table(3, 4, FrontendKind::LoadBalancer);
        let mut six = t.frontends.values().next().cloned().expect("a frontend");
        six.backends = vec![BackendAddr {
            addr: "fd00:244::2".parse().expect("address"),
            port: 8080,
            terminating: false,
            local: false,
        }]
        .into();
        six.source_ranges = vec![("2001:db8::".parse().expect("address"), 32)];
        t.frontends.insert(
            FrontendKey {
                addr: "fd00:96::1".parse().expect("address"),
                port: 80,
                proto: Protocol::Tcp,
            },
            six,
        );
        let c = ClusterSize::of(&t, 251);
        assert_eq!(
            (c.frontends, c.backends, c.source_ranges, c.maglev_slots),
            (4, 13, 3, 3 * 251)
        );
    }

    #[test]
    fn capacities_for_100k_services_x_10_endpoints() {
        let c = ClusterSize {
            frontends: 100_000,
            backends: 1_000_000,
            pairs: 1_000_000,
            max_backends: 10,
            ..Default::default()
        };
        let caps = MapSizing::default().capacities(Some(&c));
        assert_eq!(caps[defs::SERVICES.name], 151_552);
        assert_eq!(caps[defs::REVNAT.name], 151_552);
        assert_eq!(caps[defs::SVC_STATS.name], 151_552);
        assert_eq!(caps[defs::BACKENDS.name], 1_503_232);
        // The IPv6 maps follow the same flags (frontend and backend ids
        // are one space: either family may hold all of them).
        assert_eq!(caps[defs::SERVICES6.name], 151_552);
        assert_eq!(caps[defs::BACKENDS6.name], 1_503_232);
        assert_eq!(caps[defs::SLOTS.name], 1_503_232);
        assert_eq!(caps[defs::AFFINITY_MATCH.name], 1_503_232);
        // Traffic-driven maps and Maglev (no north-south) keep defaults.
        assert_eq!(caps[defs::CONNTRACK.name], defs::CONNTRACK.max_entries);
        assert_eq!(caps[defs::SOCK_REVNAT.name], defs::SOCK_REVNAT.max_entries);
        assert_eq!(caps[defs::MAGLEV.name], defs::MAGLEV.max_entries);
        // Fixed maps are not sized.
        assert!(!caps.contains_key(defs::CONFIG.name));
        assert!(!caps.contains_key(defs::STATS.name));
        // Without a cluster size: every default.
        for (name, n) in MapSizing::default().capacities(None) {
            let info = defs::ALL.iter().find(|i| i.name == name).expect("a map");
            assert_eq!(n, info.max_entries, "{name}");
        }
    }

    /// Conntrack follows what the pinned map held at start: a map filled
    /// past about two thirds grows by half at the next start (rounded); a
    /// flag's number is kept as given.
    #[test]
    fn auto_conntrack_grows_with_the_flows_found_at_start() {
        let ct = defs::CONNTRACK.max_entries;
        let caps = |flows: u64, sizing: &MapSizing| {
            let c = ClusterSize {
                conntrack: flows,
                ..Default::default()
            };
            let caps = sizing.capacities(Some(&c));
            (caps[defs::CONNTRACK.name], caps[defs::SOCK_REVNAT.name])
        };
        let auto = MapSizing::default();
        // Half full: the default is enough.
        assert_eq!(caps(u64::from(ct / 2), &auto).0, ct);
        // Full (an LRU map evicting): 1.5x, rounded up to ROUND.
        let grown = caps(u64::from(ct), &auto);
        assert_eq!(grown.0, 393_216);
        assert_eq!(grown.0 % ROUND as u32, 0);
        // Socket-LB reverse entries follow (a quarter).
        assert_eq!(grown.1, 98_304);
        // 90% full: 1.35x, rounded.
        let c90 = caps(u64::from(ct) * 9 / 10, &auto).0;
        assert!(c90 > ct && c90 < 393_216, "{c90}");
        // A number on the flag wins.
        let mut fixed = MapSizing::default();
        fixed.0.insert(Knob::Conntrack, Sizing::Fixed(1000));
        assert_eq!(caps(u64::from(ct), &fixed).0, 1000);
    }

    #[test]
    fn fixed_wins_and_derived_maps_follow() {
        let mut s = MapSizing::default();
        s.0.insert(Knob::Frontends, Sizing::Fixed(10));
        s.0.insert(Knob::Conntrack, Sizing::Fixed(4_000_000));
        let c = ClusterSize {
            frontends: 100_000,
            ..Default::default()
        };
        let caps = s.capacities(Some(&c));
        assert_eq!(caps[defs::SERVICES.name], 10);
        assert_eq!(caps[defs::CONNTRACK.name], 4_000_000);
        assert_eq!(caps[defs::SOCK_REVNAT.name], 1_000_000);
    }

    /// docs/architecture.md's map table names the flag that sizes each
    /// map ("fixed": none).
    #[test]
    fn docs_map_table_names_the_flags() {
        let doc = include_str!("../../../../docs/architecture.md");
        let rows: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                let sized_by = cells.nth(2)?;
                let flag = sized_by.split('`').nth(1).unwrap_or(sized_by);
                defs::ALL
                    .iter()
                    .any(|m| m.name == name)
                    .then(|| (name.to_owned(), flag.to_owned()))
            })
            .collect();
        let want: Vec<(String, String)> = defs::ALL
            .iter()
            .map(|m| {
                let flag = flag_of_map(m.name).unwrap_or("fixed");
                (m.name.to_owned(), flag.to_owned())
            })
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn every_sized_map_names_its_flag() {
        for info in &defs::ALL {
            let fixed = [
                defs::CONFIG.name,
                defs::STATS.name,
                defs::FRAGMENTS.name,
                defs::FRAGMENTS6.name,
                defs::REPLY_DSTS.name,
            ];
            assert_eq!(
                flag_of_map(info.name).is_none(),
                fixed.contains(&info.name),
                "{}",
                info.name
            );
        }
        assert_eq!(flag_of_map("SVC_V4"), Some("--bpf-lb-map-max"));
    }
}
