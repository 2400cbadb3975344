//! Typed handles on the eBPF maps, whether just loaded by the agent or
//! opened from their pins by `proxyctl`, and their decoded dump.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
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
    #[error("no pinned maps at {0}: is the agent running in ebpf mode with this --bpffs-path?")]
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
                backend: format!(
                    "{}:{}",
                    Ipv4Addr::from(k.addr.to_ne_bytes()),
                    u16::from_be(k.port)
                ),
                frontend: format!(
                    "{}:{}",
                    Ipv4Addr::from(v.addr.to_ne_bytes()),
                    u16::from_be(v.port)
                ),
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
                src: format!(
                    "{}:{}",
                    Ipv4Addr::from(k.saddr.to_ne_bytes()),
                    u16::from_be(v.sport)
                ),
                dst: format!(
                    "{}:{}",
                    Ipv4Addr::from(k.daddr.to_ne_bytes()),
                    u16::from_be(v.dport)
                ),
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
        Ok(dump)
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

fn proto_name(p: u8) -> String {
    Protocol::from_number(p)
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| p.to_string())
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
    fn new(ip: Ipv4Addr, port: u16, proto: u8) -> Addr {
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
#[derive(Debug, Serialize)]
pub struct Dump {
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

#[derive(Debug, Serialize)]
pub struct ServiceEntry {
    pub frontend: Addr,
    pub id: u32,
    pub count: u16,
    pub generation: u8,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct SlotEntry {
    pub service_id: u32,
    pub generation: u16,
    pub index: u16,
    pub backend_id: u32,
}

#[derive(Debug, Serialize)]
pub struct BackendEntry {
    pub id: u32,
    pub backend: Addr,
    pub terminating: bool,
    pub local: bool,
}

#[derive(Debug, Serialize)]
pub struct RevNatEntry {
    pub service_id: u32,
    pub address: String,
}

#[derive(Debug, Serialize)]
pub struct CtEntry {
    pub direction: &'static str,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct StatEntry {
    pub name: &'static str,
    pub value: u64,
}

#[derive(Debug, Serialize)]
pub struct AffinityEntry {
    pub service_id: u32,
    /// Client IP (per-packet path) or `netns:<cookie>` (socket path).
    pub client: String,
    pub backend_id: u32,
    pub last_used_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct SockRevNatEntry {
    pub cookie: u64,
    pub backend: String,
    pub frontend: String,
    pub service_id: u32,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatsEntry {
    pub service_id: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ConfigEntry {
    /// Where north-south traffic to remote backends is SNATed to.
    pub node_address: Option<Ipv4Addr>,
}

#[derive(Debug, Serialize)]
pub struct SourceRangeEntry {
    pub service_id: u32,
    pub cidr: String,
}

#[derive(Debug, Serialize)]
pub struct FragmentEntry {
    pub proto: String,
    /// Source address and port, as the fragments carry them.
    pub src: String,
    pub dst: String,
    pub ip_id: u16,
}

#[derive(Debug, Serialize)]
pub struct MaglevEntry {
    pub service_id: u32,
    pub slots: usize,
}
