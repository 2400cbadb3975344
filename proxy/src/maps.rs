//! Typed handles on the eBPF maps, whether just loaded by the agent or
//! opened from their pins by `proxyctl`, and their decoded dump.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
    },
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, FragKey, FragValue,
    LAYOUT_VERSION, MaglevKey, RevNat, ServiceKey, ServiceValue, SlotKey, SockRevNatKey,
    SockRevNatValue, SourceRangeKey, SvcStats, backend_flags, ct_dir, maps as names, stat,
    svc_flags,
};
use serde::Serialize;

use crate::model::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error(
        "no maps are pinned at {} (is the agent running in ebpf mode with this --bpffs-path?)",
        .0.display()
    )]
    NotPinned(PathBuf),
    #[error("map {name} at {path}: {source}")]
    Open {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("map {name}: {op}: {source}")]
    Op {
        name: &'static str,
        op: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// Where the maps of this layout version are pinned under `--bpffs-path`.
pub fn pin_dir(bpffs_path: &Path) -> PathBuf {
    bpffs_path.join(format!("maps-v{LAYOUT_VERSION}"))
}

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub revnat: HashMap<MapData, u32, RevNat>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    pub svc_stats: PerCpuHashMap<MapData, u32, SvcStats>,
    pub config: Array<MapData, Config>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub maglev: HashMap<MapData, MaglevKey, u32>,
    pub fragments: HashMap<MapData, FragKey, FragValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

impl Maps {
    /// Take the maps out of a loaded object (the agent's path).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { name });
        let services = take(names::SERVICES)?;
        let slots = take(names::SLOTS)?;
        let backends = take(names::BACKENDS)?;
        let revnat = take(names::REVNAT)?;
        let conntrack = take(names::CONNTRACK)?;
        let affinity = take(names::AFFINITY)?;
        let sock_revnat = take(names::SOCK_REVNAT)?;
        let svc_stats = take(names::SVC_STATS)?;
        let config = take(names::CONFIG)?;
        let source_ranges = take(names::SOURCE_RANGES)?;
        let maglev = take(names::MAGLEV)?;
        let fragments = take(names::FRAGMENTS)?;
        let stats = take(names::STATS)?;
        Ok(Maps {
            services: typed(names::SERVICES, services)?,
            slots: typed(names::SLOTS, slots)?,
            backends: typed(names::BACKENDS, backends)?,
            revnat: typed(names::REVNAT, revnat)?,
            conntrack: typed(names::CONNTRACK, conntrack)?,
            affinity: typed(names::AFFINITY, affinity)?,
            sock_revnat: typed(names::SOCK_REVNAT, sock_revnat)?,
            svc_stats: typed(names::SVC_STATS, svc_stats)?,
            config: typed(names::CONFIG, config)?,
            source_ranges: typed(names::SOURCE_RANGES, source_ranges)?,
            maglev: typed(names::MAGLEV, maglev)?,
            fragments: typed(names::FRAGMENTS, fragments)?,
            stats: typed(names::STATS, stats)?,
        })
    }

    /// Open the maps an agent pinned under `bpffs_path` (proxyctl's path).
    pub fn open_pinned(bpffs_path: &Path) -> Result<Maps, MapsError> {
        let dir = pin_dir(bpffs_path);
        if !dir.join(names::SERVICES).exists() {
            return Err(MapsError::NotPinned(dir));
        }
        let open = |name: &'static str| -> Result<Map, MapsError> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
                name,
                path: path.clone(),
                source: Box::new(source),
            })?;
            Map::from_map_data(data).map_err(|source| MapsError::Open {
                name,
                path,
                source: Box::new(source),
            })
        };
        Ok(Maps {
            services: typed(names::SERVICES, open(names::SERVICES)?)?,
            slots: typed(names::SLOTS, open(names::SLOTS)?)?,
            backends: typed(names::BACKENDS, open(names::BACKENDS)?)?,
            revnat: typed(names::REVNAT, open(names::REVNAT)?)?,
            conntrack: typed(names::CONNTRACK, open(names::CONNTRACK)?)?,
            affinity: typed(names::AFFINITY, open(names::AFFINITY)?)?,
            sock_revnat: typed(names::SOCK_REVNAT, open(names::SOCK_REVNAT)?)?,
            svc_stats: typed(names::SVC_STATS, open(names::SVC_STATS)?)?,
            config: typed(names::CONFIG, open(names::CONFIG)?)?,
            source_ranges: typed(names::SOURCE_RANGES, open(names::SOURCE_RANGES)?)?,
            maglev: typed(names::MAGLEV, open(names::MAGLEV)?)?,
            fragments: typed(names::FRAGMENTS, open(names::FRAGMENTS)?)?,
            stats: typed(names::STATS, open(names::STATS)?)?,
        })
    }

    /// Every map, decoded.
    pub fn dump(&self) -> Result<Dump, MapsError> {
        let services = collect(names::SERVICES, self.services.iter())?
            .into_iter()
            .map(|(k, v)| ServiceEntry {
                frontend: Addr::new(k.ip(), k.host_port(), k.proto),
                id: v.id,
                count: v.count,
                generation: v.generation,
                kind: kind_name(v.flags),
                flags: flag_names(v.flags),
                affinity_timeout: v.affinity_timeout,
                maglev_size: v.maglev_size,
            })
            .collect();
        let slots = collect(names::SLOTS, self.slots.iter())?
            .into_iter()
            .map(|(k, v)| SlotEntry {
                service_id: k.service_id,
                generation: k.generation,
                index: k.index,
                backend_id: v,
            })
            .collect();
        let backends = collect(names::BACKENDS, self.backends.iter())?
            .into_iter()
            .map(|(id, b)| BackendEntry {
                id,
                backend: Addr::new(b.ip(), b.host_port(), b.proto),
                terminating: b.flags & backend_flags::TERMINATING != 0,
                local: b.flags & backend_flags::LOCAL != 0,
            })
            .collect();
        let revnat = collect(names::REVNAT, self.revnat.iter())?
            .into_iter()
            .map(|(id, r)| RevNatEntry {
                service_id: id,
                address: format!("{}:{}", r.ip(), r.host_port()),
            })
            .collect();
        let conntrack = collect(names::CONNTRACK, self.conntrack.iter())?
            .into_iter()
            .map(|(k, v)| CtEntry {
                direction: if k.dir == ct_dir::REPLY {
                    "reply"
                } else {
                    "service"
                },
                proto: proto_name(k.proto),
                src: k.src().to_string(),
                dst: k.dst().to_string(),
                service_id: v.service_id,
                backend_id: v.backend_id,
                flags: v.flags,
                last_seen_ns: v.last_seen_ns,
                nat: (v.nat_addr != 0).then(|| wire_addr(v.nat_addr, v.nat_port)),
            })
            .collect();
        let affinity = collect(names::AFFINITY, self.affinity.iter())?
            .into_iter()
            .map(|(k, v)| AffinityEntry {
                service_id: k.service_id,
                client: if k.client_netns != 0 {
                    format!("netns:{}", k.client_netns)
                } else {
                    Ipv4Addr::from(k.client_addr.to_ne_bytes()).to_string()
                },
                backend_id: v.backend_id,
                last_used_ns: v.last_used_ns,
            })
            .collect();
        let sock_revnat = collect(names::SOCK_REVNAT, self.sock_revnat.iter())?
            .into_iter()
            .map(|(k, v)| SockRevNatEntry {
                cookie: k.cookie,
                backend: wire_addr(k.addr, k.port),
                frontend: wire_addr(v.addr, v.port),
                service_id: v.service_id,
            })
            .collect();
        let service_stats = collect(names::SVC_STATS, self.svc_stats.iter())?
            .into_iter()
            .map(|(id, per_cpu)| ServiceStatsEntry {
                service_id: id,
                packets: per_cpu.iter().map(|s| s.packets).sum(),
                bytes: per_cpu.iter().map(|s| s.bytes).sum(),
            })
            .collect();
        let node_addr = self
            .config
            .get(&0, 0)
            .map(|c| c.node_addr)
            .map_err(|source| MapsError::Op {
                name: names::CONFIG,
                op: "lookup",
                source: Box::new(source),
            })?;
        let mut source_ranges: Vec<SourceRangeEntry> =
            collect(names::SOURCE_RANGES, self.source_ranges.iter())?
                .into_iter()
                .map(|(k, _)| {
                    let d = k.data();
                    SourceRangeEntry {
                        service_id: u32::from_be(d.service_id_be),
                        cidr: format!(
                            "{}/{}",
                            Ipv4Addr::from(d.addr.to_ne_bytes()),
                            k.prefix_len().saturating_sub(32)
                        ),
                    }
                })
                .collect();
        source_ranges.sort_by(|a, b| (a.service_id, &a.cidr).cmp(&(b.service_id, &b.cidr)));
        let mut maglev_slots: std::collections::BTreeMap<u32, usize> = Default::default();
        for k in self.maglev.keys() {
            let k = k.map_err(|source| MapsError::Op {
                name: names::MAGLEV,
                op: "iterate",
                source: Box::new(source),
            })?;
            *maglev_slots.entry(k.service_id).or_default() += 1;
        }
        let maglev = maglev_slots
            .into_iter()
            .map(|(service_id, slots)| MaglevEntry { service_id, slots })
            .collect();
        let fragments = collect(names::FRAGMENTS, self.fragments.iter())?
            .into_iter()
            .map(|(k, v)| FragmentEntry {
                proto: proto_name(k.proto),
                src: wire_addr(k.saddr, v.sport),
                dst: wire_addr(k.daddr, v.dport),
                ip_id: u16::from_be(k.id),
            })
            .collect();
        let config = ConfigEntry {
            node_address: (node_addr != 0).then(|| Ipv4Addr::from(node_addr.to_ne_bytes())),
        };
        let mut stats = Vec::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let values = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| MapsError::Op {
                    name: names::STATS,
                    op: "lookup",
                    source: Box::new(source),
                })?;
            stats.push(StatEntry {
                name,
                value: values.iter().sum(),
            });
        }
        let mut dump = Dump {
            maps: Vec::new(),
            services,
            slots,
            backends,
            revnat,
            conntrack,
            affinity,
            sock_revnat,
            service_stats,
            config,
            source_ranges,
            maglev,
            fragments,
            stats,
        };
        dump.sort();
        let maglev_entries: usize = dump.maglev.iter().map(|m| m.slots).sum();
        let counts = [
            (names::SERVICES, dump.services.len()),
            (names::SLOTS, dump.slots.len()),
            (names::BACKENDS, dump.backends.len()),
            (names::REVNAT, dump.revnat.len()),
            (names::CONNTRACK, dump.conntrack.len()),
            (names::AFFINITY, dump.affinity.len()),
            (names::SOCK_REVNAT, dump.sock_revnat.len()),
            (names::SVC_STATS, dump.service_stats.len()),
            (names::CONFIG, 1),
            (names::SOURCE_RANGES, dump.source_ranges.len()),
            (names::MAGLEV, maglev_entries),
            (names::FRAGMENTS, dump.fragments.len()),
            (names::STATS, dump.stats.len()),
        ];
        let caps = self.capacities()?;
        dump.maps = counts
            .into_iter()
            .map(|(name, entries)| MapSummary {
                name,
                entries,
                max_entries: caps.iter().find(|c| c.0 == name).map(|c| c.1).unwrap_or(0),
            })
            .collect();
        Ok(dump)
    }

    /// Each map's capacity (`max_entries`), as the kernel reports it.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>, MapsError> {
        fn cap<K: aya::Pod, V>(
            name: &'static str,
            m: &impl IterableMap<K, V>,
        ) -> Result<(&'static str, u32), MapsError> {
            m.map()
                .info()
                .map(|i| (name, i.max_entries()))
                .map_err(|source| MapsError::Op {
                    name,
                    op: "info",
                    source: Box::new(source),
                })
        }
        Ok(vec![
            cap(names::SERVICES, &self.services)?,
            cap(names::SLOTS, &self.slots)?,
            cap(names::BACKENDS, &self.backends)?,
            cap(names::REVNAT, &self.revnat)?,
            cap(names::CONNTRACK, &self.conntrack)?,
            cap(names::AFFINITY, &self.affinity)?,
            cap(names::SOCK_REVNAT, &self.sock_revnat)?,
            cap(names::SVC_STATS, &self.svc_stats)?,
            cap(names::CONFIG, &self.config)?,
            cap(names::SOURCE_RANGES, &self.source_ranges)?,
            cap(names::MAGLEV, &self.maglev)?,
            cap(names::FRAGMENTS, &self.fragments)?,
            cap(names::STATS, &self.stats)?,
        ])
    }

    /// Number of entries of the conntrack map (walks the keys).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }
}

impl crate::dataplane::StatsReader for Maps {
    fn read(
        &self,
    ) -> Result<crate::dataplane::DataplaneStats, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.stats()?)
    }
}

impl Maps {
    /// Counters and fill levels for `/metrics`: cheaper than [`Maps::dump`]
    /// (no Maglev walk: a frontend's table is always full, so its entries
    /// are the sum of the table sizes).
    pub fn stats(&self) -> Result<crate::dataplane::DataplaneStats, MapsError> {
        use crate::dataplane::{DataplaneStats, FrontendCounters, MapFill};
        let services = collect(names::SERVICES, self.services.iter())?;
        let per_service: std::collections::HashMap<u32, (u64, u64)> =
            collect(names::SVC_STATS, self.svc_stats.iter())?
                .into_iter()
                .map(|(id, per_cpu)| {
                    (
                        id,
                        (
                            per_cpu.iter().map(|s| s.packets).sum(),
                            per_cpu.iter().map(|s| s.bytes).sum(),
                        ),
                    )
                })
                .collect();
        let count = |n: usize| n as u64;
        let entries = [
            (names::SERVICES, count(services.len())),
            (
                names::SLOTS,
                count(self.slots.keys().filter(Result::is_ok).count()),
            ),
            (
                names::BACKENDS,
                count(self.backends.keys().filter(Result::is_ok).count()),
            ),
            (
                names::REVNAT,
                count(self.revnat.keys().filter(Result::is_ok).count()),
            ),
            (names::CONNTRACK, count(self.conntrack_entries())),
            (
                names::AFFINITY,
                count(self.affinity.keys().filter(Result::is_ok).count()),
            ),
            (
                names::SOCK_REVNAT,
                count(self.sock_revnat.keys().filter(Result::is_ok).count()),
            ),
            (names::SVC_STATS, count(per_service.len())),
            (names::CONFIG, 1),
            (
                names::SOURCE_RANGES,
                count(self.source_ranges.keys().filter(Result::is_ok).count()),
            ),
            (
                names::MAGLEV,
                services.iter().map(|(_, v)| u64::from(v.maglev_size)).sum(),
            ),
            (
                names::FRAGMENTS,
                count(self.fragments.keys().filter(Result::is_ok).count()),
            ),
            (names::STATS, u64::from(stat::COUNT)),
        ];
        let caps = self.capacities()?;
        let maps: Vec<MapFill> = entries
            .into_iter()
            .map(|(name, entries)| MapFill {
                name: name.to_owned(),
                entries,
                capacity: caps
                    .iter()
                    .find(|c| c.0 == name)
                    .map(|c| u64::from(c.1))
                    .unwrap_or(0),
            })
            .collect();
        let conntrack = maps.iter().find(|m| m.name == names::CONNTRACK).cloned();
        let mut frontends: Vec<FrontendCounters> = services
            .iter()
            .map(|(k, v)| {
                let (packets, bytes) = per_service.get(&v.id).copied().unwrap_or((0, 0));
                FrontendCounters {
                    frontend: Addr::new(k.ip(), k.host_port(), k.proto).to_string(),
                    kind: kind_name(v.flags).to_owned(),
                    packets,
                    bytes,
                }
            })
            .collect();
        frontends.sort_by(|a, b| a.frontend.cmp(&b.frontend));
        let mut drops = Vec::new();
        let mut counters = Vec::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let value: u64 = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| MapsError::Op {
                    name: names::STATS,
                    op: "lookup",
                    source: Box::new(source),
                })?
                .iter()
                .sum();
            match name.strip_prefix("drop_") {
                Some(reason) => drops.push((reason.to_owned(), value)),
                None => counters.push(((*name).to_owned(), value)),
            }
        }
        Ok(DataplaneStats {
            maps,
            conntrack,
            frontends,
            drops,
            counters,
        })
    }
}

/// Read access to Maglev tables, for `explain` (the maps, or a table in a
/// unit test).
pub trait MaglevSource {
    /// Backend id in slot `slot` of frontend `service_id`'s table.
    fn maglev_slot(&self, service_id: u32, slot: u32) -> Option<u32>;
}

impl MaglevSource for Maps {
    fn maglev_slot(&self, service_id: u32, slot: u32) -> Option<u32> {
        self.maglev.get(&MaglevKey { service_id, slot }, 0).ok()
    }
}

impl MaglevSource for std::collections::HashMap<(u32, u32), u32> {
    fn maglev_slot(&self, service_id: u32, slot: u32) -> Option<u32> {
        self.get(&(service_id, slot)).copied()
    }
}

fn typed<T>(name: &'static str, map: Map) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(|source| MapsError::Op {
        name,
        op: "open",
        source: Box::new(source),
    })
}

fn collect<K, V>(
    name: &'static str,
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
) -> Result<Vec<(K, V)>, MapsError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| MapsError::Op {
            name,
            op: "iterate",
            source: Box::new(source),
        })
}

/// `ip:port` of an address and port stored in network byte order.
fn wire_addr(addr: u32, port: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(addr.to_ne_bytes()),
        u16::from_be(port)
    )
}

pub fn proto_name(p: u8) -> String {
    Protocol::from_number(p)
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| p.to_string())
}

fn flag_names(flags: u16) -> Vec<&'static str> {
    let mut v = Vec::new();
    if flags & svc_flags::SOURCE_RANGES != 0 {
        v.push("source-ranges");
    }
    if flags & svc_flags::LOCAL_ONLY != 0 {
        v.push("local-only");
    }
    v
}

fn kind_name(flags: u16) -> &'static str {
    if flags & svc_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & svc_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else if flags & svc_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else {
        "ClusterIP"
    }
}

/// `ip:port/PROTO`, serialized as separate fields.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Addr {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: String,
}

impl Addr {
    pub fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Addr {
        Addr {
            ip,
            port,
            proto: proto_name(proto),
        }
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.proto)
    }
}

/// Decoded contents of every map (the JSON of `proxyctl dump-maps`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Dump {
    /// Every map with its entry count and capacity, in
    /// `proxy_common::maps::ALL` order.
    pub maps: Vec<MapSummary>,
    pub services: Vec<ServiceEntry>,
    pub slots: Vec<SlotEntry>,
    pub backends: Vec<BackendEntry>,
    pub revnat: Vec<RevNatEntry>,
    pub conntrack: Vec<CtEntry>,
    pub affinity: Vec<AffinityEntry>,
    pub sock_revnat: Vec<SockRevNatEntry>,
    pub service_stats: Vec<ServiceStatsEntry>,
    pub config: ConfigEntry,
    pub source_ranges: Vec<SourceRangeEntry>,
    /// Maglev table sizes per frontend (the slots themselves are too many
    /// to print).
    pub maglev: Vec<MaglevEntry>,
    /// Fragmented datagrams in flight whose first fragment was translated.
    pub fragments: Vec<FragmentEntry>,
    pub stats: Vec<StatEntry>,
}

impl Dump {
    fn sort(&mut self) {
        self.services.sort_by(|a, b| a.frontend.cmp(&b.frontend));
        self.slots
            .sort_by_key(|s| (s.service_id, s.generation, s.index));
        self.backends.sort_by_key(|b| b.id);
        self.revnat.sort_by_key(|r| r.service_id);
        self.conntrack
            .sort_by(|a, b| (a.direction, &a.src, &a.dst).cmp(&(b.direction, &b.src, &b.dst)));
        self.affinity
            .sort_by(|a, b| (a.service_id, &a.client).cmp(&(b.service_id, &b.client)));
        self.sock_revnat
            .sort_by(|a, b| (a.cookie, &a.backend).cmp(&(b.cookie, &b.backend)));
        self.service_stats.sort_by_key(|s| s.service_id);
        self.fragments
            .sort_by(|a, b| (&a.src, &a.dst, a.ip_id).cmp(&(&b.src, &b.dst, b.ip_id)));
    }
}

/// One map's fill level.
#[derive(Clone, Debug, Serialize)]
pub struct MapSummary {
    pub name: &'static str,
    /// Entries now (for `STATS` and `CONFIG`, the fixed array length).
    pub entries: usize,
    /// Capacity (`max_entries`).
    pub max_entries: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntry {
    pub frontend: Addr,
    pub id: u32,
    /// Backend slots in the live generation (0: traffic is refused).
    pub count: u16,
    pub generation: u8,
    pub kind: &'static str,
    /// Other flag bits set: `source-ranges`, `local-only`.
    pub flags: Vec<&'static str>,
    /// ClientIP affinity timeout in seconds; 0: none.
    pub affinity_timeout: u32,
    /// Maglev table size; 0: random selection.
    pub maglev_size: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotEntry {
    pub service_id: u32,
    pub generation: u16,
    pub index: u16,
    pub backend_id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub backend: Addr,
    pub terminating: bool,
    pub local: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct RevNatEntry {
    pub service_id: u32,
    pub address: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct CtEntry {
    pub direction: &'static str,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
    /// SNAT/DSR flows: on the service entry the address the client was
    /// rewritten to, on the reply entry the client's own address.
    pub nat: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StatEntry {
    pub name: &'static str,
    pub value: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AffinityEntry {
    pub service_id: u32,
    /// Client IP (per-packet path) or `netns:<cookie>` (socket path).
    pub client: String,
    pub backend_id: u32,
    pub last_used_ns: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SockRevNatEntry {
    pub cookie: u64,
    pub backend: String,
    pub frontend: String,
    pub service_id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceStatsEntry {
    pub service_id: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigEntry {
    /// Where north-south traffic to remote backends is SNATed to.
    pub node_address: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceRangeEntry {
    pub service_id: u32,
    pub cidr: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct FragmentEntry {
    pub proto: String,
    /// Source address and port, as the fragments carry them.
    pub src: String,
    pub dst: String,
    pub ip_id: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevEntry {
    pub service_id: u32,
    pub slots: usize,
}
