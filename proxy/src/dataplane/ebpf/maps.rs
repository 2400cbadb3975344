//! Typed handles on the eBPF maps, whether just loaded by the agent or
//! opened from their pins by `proxyctl`, and their decoded dump.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
    },
};
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityMatchKey, AffinityValue, Backend, Backend6, Config, CtKey,
    CtKey6, CtValue, FragKey, FragKey6, FragValue, LAYOUT_VERSION, MaglevKey, MapDef, MapInfo,
    MapKind, RevNat, RevNat6, ServiceKey, ServiceKey6, ServiceValue, SlotKey, SockRevNatKey,
    SockRevNatKey6, SockRevNatValue, SockRevNatValue6, SourceRangeKey, SvcStats, maps as defs,
    stat, svc_flags,
};
use serde::{Serialize, Serializer};

use crate::{lb::FrontendKind, model::Protocol};

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
    #[error("map {name} pinned at {}: {field} is {pinned}, this layout's is {want}", path.display())]
    Layout {
        name: &'static str,
        path: PathBuf,
        field: &'static str,
        pinned: u32,
        want: u32,
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

/// The capacity of map `info` pinned in `dir` (None: not pinned). A pin
/// whose kind of entry differs from the descriptor (key or value size) is
/// an error: it is not this layout's map.
pub fn check_pinned(dir: &Path, info: &MapInfo) -> Result<Option<u32>, MapsError> {
    let path = dir.join(info.name);
    if !path.exists() {
        return Ok(None);
    }
    let open_err = |source| MapsError::Open {
        name: info.name,
        path: path.clone(),
        source: Box::new(source),
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let i = data.info().map_err(open_err)?;
    for (field, pinned, want) in [
        // An LPM trie's key starts with the 4-byte prefix length.
        (
            "key_size",
            i.key_size(),
            info.key_size + if info.kind == MapKind::LpmTrie { 4 } else { 0 },
        ),
        ("value_size", i.value_size(), info.value_size),
    ] {
        if pinned != want {
            return Err(MapsError::Layout {
                name: info.name,
                path,
                field,
                pinned,
                want,
            });
        }
    }
    Ok(Some(i.max_entries()))
}

fn capacity(info: &MapInfo, m: &MapData) -> Result<u32, MapsError> {
    m.info()
        .map(|i| i.max_entries())
        .map_err(|source| MapsError::Op {
            name: info.name,
            op: "info",
            source: Box::new(source),
        })
}

/// The kernel's key size of a map (an LPM trie's key starts with the 4-byte
/// prefix length).
fn key_size(info: &MapInfo) -> u32 {
    info.key_size + if info.kind == MapKind::LpmTrie { 4 } else { 0 }
}

/// Number of keys of a map, walked with `BPF_MAP_GET_NEXT_KEY` without
/// decoding them.
fn count_keys(m: &MapData, key_size: u32) -> std::io::Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};

    /// `union bpf_attr` for the element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let fd = m.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: BPF_MAP_GET_NEXT_KEY reads `key_size` bytes at `key` (or
        // none when null) and writes `key_size` bytes at `next_key`; both
        // buffers are that long and outlive the call; `attr` is the
        // command's layout of `union bpf_attr`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(n),
                _ => Err(e),
            };
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// `union bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The kernel's ENOTSUPP (not in libc): no batch ops for this map.
const ENOTSUPP: i32 = 524;

/// Insert or replace `keys[i] -> values[i]` in a hash map, in order, with
/// one `BPF_MAP_UPDATE_BATCH` call instead of one syscall per entry (a
/// frontend's slots and affinity memberships: at 100,000 services x 10
/// endpoints, two million syscalls fewer in the first sync). As with one
/// insert after another, a failure leaves the entries before it written
/// and reports how many those are with the failing entry's error (`E2BIG`:
/// the map is full). A kernel without batch updates (before 5.6) gets one
/// insert per entry.
pub(super) fn insert_batch<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapError)> {
    use std::os::fd::{AsFd, AsRawFd};

    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    debug_assert_eq!(keys.len(), values.len());
    let n = keys.len().min(values.len());
    if n == 0 {
        return Ok(());
    }
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: n as u32,
        map_fd: fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: BPF_MAP_UPDATE_BATCH reads `count` keys and values of the
    // map's key and value sizes (`K` and `V`: aya checked them against the
    // map when it typed it) from the two slices, which outlive the call,
    // and writes `count` back into `attr`, the command's layout of `union
    // bpf_attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let io_error = std::io::Error::last_os_error();
    match io_error.raw_os_error() {
        Some(libc::EINVAL | ENOTSUPP) if attr.count == 0 => {
            for (i, (k, v)) in keys.iter().zip(values).enumerate() {
                map.insert(k, v, 0).map_err(|e| (i, e))?;
            }
            Ok(())
        }
        _ => Err((
            attr.count as usize,
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        )),
    }
}

/// Number of entries of a hash map read in batches (`BPF_MAP_LOOKUP_BATCH`,
/// thousands of entries per call instead of one call per key: a scrape of
/// millions of slots stays cheap). None when the kernel or the map kind has
/// no batch lookup (LPM tries): walk the keys instead.
fn count_batched(m: &MapData, info: &MapInfo) -> std::io::Result<Option<u64>> {
    use std::os::fd::{AsFd, AsRawFd};

    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    if info.kind == MapKind::LpmTrie {
        return Ok(None);
    }
    let value_size = match info.kind {
        MapKind::PerCpuHash | MapKind::PerCpuArray => {
            (info.value_size as usize).next_multiple_of(8) * nr_cpus()
        }
        _ => info.value_size as usize,
    };
    let fd = m.fd().as_fd().as_raw_fd();
    let mut chunk = 4096usize;
    let mut keys = vec![0u8; chunk * info.key_size as usize];
    let mut values = vec![0u8; chunk * value_size];
    // The position token (a bucket index for hash maps); 8 bytes covers
    // every kind.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    let mut n = 0u64;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: BPF_MAP_LOOKUP_BATCH writes at most `count` keys and
        // values into buffers sized for `chunk` of each, reads and writes
        // the position token (at most 8 bytes: a u32 bucket index for hash
        // maps) and writes `count` back into `attr`; all outlive the call,
        // and `attr` is the command's layout of `union bpf_attr`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let e = (r != 0).then(std::io::Error::last_os_error);
        match e.as_ref().and_then(|e| e.raw_os_error()) {
            None => {}
            // The last batch (possibly with entries).
            Some(libc::ENOENT) => return Ok(Some(n + u64::from(attr.count))),
            // A bucket holds more than a chunk: retry it with more room.
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                keys.resize(chunk * info.key_size as usize, 0);
                values.resize(chunk * value_size, 0);
                continue;
            }
            Some(libc::EINVAL | ENOTSUPP) if first => return Ok(None),
            Some(_) => return Err(e.unwrap_or_else(std::io::Error::last_os_error)),
        }
        n += u64::from(attr.count);
        first = false;
        token_in = token_out;
    }
}

fn nr_cpus() -> usize {
    aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1)
}

/// Where the maps of this layout version are pinned under `--bpffs-path`.
pub fn pin_dir(bpffs_path: &Path) -> PathBuf {
    bpffs_path.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// A typed aya handle whose key and value types are `K` and `V`: ties a
/// [`Maps`] field to its descriptor's types at compile time.
pub trait TypedMap<K, V>: TryFrom<Map, Error = MapError> {
    fn data(&self) -> &MapData;
}

macro_rules! typed_map {
    ($t:ident<$($p:ident),*> as <$k:ty, $v:ty>) => {
        impl<$($p: aya::Pod),*> TypedMap<$k, $v> for $t<MapData, $($p),*> {
            fn data(&self) -> &MapData {
                self.map()
            }
        }
    };
}
typed_map!(HashMap<K, V> as <K, V>);
typed_map!(PerCpuHashMap<K, V> as <K, V>);
typed_map!(LpmTrie<K, V> as <K, V>);
typed_map!(Array<V> as <u32, V>);
typed_map!(PerCpuArray<V> as <u32, V>);

fn open_typed<K, V, T: TypedMap<K, V>>(
    def: &MapDef<K, V>,
    open: &mut impl FnMut(&'static str) -> Result<Map, MapsError>,
) -> Result<T, MapsError> {
    typed(def.name, open(def.name)?)
}

/// The one list of typed handles: a field per map, its aya type (whose key
/// and value types must be the descriptor's) and its descriptor, in
/// [`defs::ALL`] order (checked at compile time).
macro_rules! maps {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $def:ident,)*) => {
        pub struct Maps {
            $($(#[$doc])* pub $field: $ty,)*
        }

        impl Maps {
            /// Every map as a typed handle, from `open` (one call per map,
            /// by its descriptor's name).
            fn build(
                mut open: impl FnMut(&'static str) -> Result<Map, MapsError>,
            ) -> Result<Maps, MapsError> {
                Ok(Maps {
                    $($field: open_typed(&defs::$def, &mut open)?,)*
                })
            }

            /// Each map's descriptor and kernel handle, in [`defs::ALL`]
            /// order.
            fn each(&self) -> Vec<(MapInfo, &MapData)> {
                vec![$((defs::$def.info(), self.$field.data()),)*]
            }
        }

        const _: () = {
            let names = [$(defs::$def.name,)*];
            assert!(names.len() == defs::ALL.len(), "Maps lacks a map of maps::ALL");
            let mut i = 0;
            while i < names.len() {
                assert!(
                    proxy_common::str_eq(names[i], defs::ALL[i].name),
                    "Maps is not in maps::ALL order"
                );
                i += 1;
            }
        };
    };
}

maps! {
    services: HashMap<MapData, ServiceKey, ServiceValue> = SERVICES,
    slots: HashMap<MapData, SlotKey, u32> = SLOTS,
    backends: HashMap<MapData, u32, Backend> = BACKENDS,
    revnat: HashMap<MapData, u32, RevNat> = REVNAT,
    conntrack: HashMap<MapData, CtKey, CtValue> = CONNTRACK,
    affinity: HashMap<MapData, AffinityKey, AffinityValue> = AFFINITY,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8> = AFFINITY_MATCH,
    sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue> = SOCK_REVNAT,
    svc_stats: PerCpuHashMap<MapData, u32, SvcStats> = SVC_STATS,
    config: Array<MapData, Config> = CONFIG,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8> = SOURCE_RANGES,
    maglev: HashMap<MapData, MaglevKey, u32> = MAGLEV,
    fragments: HashMap<MapData, FragKey, FragValue> = FRAGMENTS,
    /// Slots set by the kernel only (see `proxy_common::reply_dst_slot`).
    reply_dsts: Array<MapData, u8> = REPLY_DSTS,
    services6: HashMap<MapData, ServiceKey6, ServiceValue> = SERVICES6,
    backends6: HashMap<MapData, u32, Backend6> = BACKENDS6,
    sock_revnat6: HashMap<MapData, SockRevNatKey6, SockRevNatValue6> = SOCK_REVNAT6,
    conntrack6: HashMap<MapData, CtKey6, CtValue> = CONNTRACK6,
    revnat6: HashMap<MapData, u32, RevNat6> = REVNAT6,
    affinity6: HashMap<MapData, AffinityKey6, AffinityValue> = AFFINITY6,
    fragments6: HashMap<MapData, FragKey6, FragValue> = FRAGMENTS6,
    stats: PerCpuArray<MapData, u64> = STATS,
}

impl Maps {
    /// Take the maps out of a loaded object (the agent's path).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        Maps::build(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Open the maps an agent pinned under `bpffs_path` (proxyctl's path).
    pub fn open_pinned(bpffs_path: &Path) -> Result<Maps, MapsError> {
        let dir = pin_dir(bpffs_path);
        if !dir.join(defs::SERVICES.name).exists() {
            return Err(MapsError::NotPinned(dir));
        }
        Maps::build(|name| {
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
        })
    }

    /// Entries of every map, in [`defs::ALL`] order: keys walked without
    /// decoding them (arrays: their length; `MAGLEV_V4`: the sizes of the
    /// distinct tables the frontends point at, without walking its slots).
    pub fn entries(&self) -> Result<Vec<u64>, MapsError> {
        self.entries_with(|_| None)
    }

    /// [`Maps::entries`], except for the maps `known` has a figure for
    /// (`/metrics`: the kernel-written LRU maps, counted less often).
    pub fn entries_with(
        &self,
        known: impl Fn(&MapInfo) -> Option<u64>,
    ) -> Result<Vec<u64>, MapsError> {
        let tables: std::collections::BTreeMap<u32, u32> = self
            .services()?
            .into_iter()
            .filter(|(_, v)| v.maglev_size != 0)
            .map(|(_, v)| (v.maglev_table, v.maglev_size))
            .collect();
        self.each()
            .into_iter()
            .map(|(info, m)| match (info.kind, known(&info)) {
                (_, Some(n)) => Ok(n),
                _ if info.name == defs::MAGLEV.name => {
                    Ok(tables.values().map(|m| u64::from(*m)).sum())
                }
                (MapKind::Array | MapKind::PerCpuArray, None) => capacity(&info, m).map(u64::from),
                _ => match count_batched(m, &info) {
                    Ok(Some(n)) => Ok(n),
                    _ => count_keys(m, key_size(&info)),
                }
                .map_err(|e| MapsError::Op {
                    name: info.name,
                    op: "iterate",
                    source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_get_next_key",
                        io_error: e,
                    })),
                }),
            })
            .collect()
    }

    /// Every map, decoded into typed entries (the decoding is the
    /// proxy-common types' own: `ServiceKey::ip`, `CtValue::nat`, ...).
    pub fn dump(&self) -> Result<Dump, MapsError> {
        let services = self
            .services()?
            .into_iter()
            .map(|(frontend, v)| ServiceEntry {
                frontend,
                id: v.id,
                count: v.count,
                generation: v.generation,
                kind: flags_kind(v.flags),
                flags: SvcFlags(v.flags),
                affinity_timeout: v.affinity_timeout,
                maglev_size: v.maglev_size,
                maglev_table: v.maglev_table,
            })
            .collect::<Vec<_>>();
        let slots = collect(defs::SLOTS.name, self.slots.iter())?
            .into_iter()
            .map(|(k, v)| SlotEntry {
                service_id: k.service_id,
                generation: k.generation,
                index: k.index,
                backend_id: v,
            })
            .collect();
        let backends = collect(defs::BACKENDS.name, self.backends.iter())?
            .into_iter()
            .map(|(id, b)| BackendEntry {
                id,
                backend: Addr::new(b.ip(), b.host_port(), b.proto),
                terminating: b.is_terminating(),
                local: b.is_local(),
            })
            .chain(
                collect(defs::BACKENDS6.name, self.backends6.iter())?
                    .into_iter()
                    .map(|(id, b)| BackendEntry {
                        id,
                        backend: Addr::new(b.ip(), b.host_port(), b.proto),
                        terminating: b.is_terminating(),
                        local: b.is_local(),
                    }),
            )
            .collect();
        let revnat = collect(defs::REVNAT.name, self.revnat.iter())?
            .into_iter()
            .map(|(id, r)| RevNatEntry {
                service_id: id,
                address: r.frontend().into(),
            })
            .chain(
                collect(defs::REVNAT6.name, self.revnat6.iter())?
                    .into_iter()
                    .map(|(id, r)| RevNatEntry {
                        service_id: id,
                        address: r.frontend().into(),
                    }),
            )
            .collect();
        let direction = |reply: bool| {
            if reply {
                Direction::Reply
            } else {
                Direction::Service
            }
        };
        let conntrack = collect(defs::CONNTRACK.name, self.conntrack.iter())?
            .into_iter()
            .map(|(k, v)| CtEntry {
                direction: direction(k.is_reply()),
                proto: Proto(k.proto),
                src: k.src().into(),
                dst: k.dst().into(),
                service_id: v.service_id,
                backend_id: v.backend_id,
                flags: v.flags,
                last_seen_ns: v.last_seen_ns,
                nat: v.nat().map(Into::into),
            })
            .chain(
                collect(defs::CONNTRACK6.name, self.conntrack6.iter())?
                    .into_iter()
                    .map(|(k, v)| CtEntry {
                        direction: direction(k.is_reply()),
                        proto: Proto(k.proto),
                        src: k.src().into(),
                        dst: k.dst().into(),
                        service_id: v.service_id,
                        backend_id: v.backend_id,
                        flags: v.flags,
                        last_seen_ns: v.last_seen_ns,
                        // IPv6 flows are never NATed beyond DNAT.
                        nat: None,
                    }),
            )
            .collect();
        let affinity = collect(defs::AFFINITY.name, self.affinity.iter())?
            .into_iter()
            .map(|(k, v)| AffinityEntry {
                service_id: k.service_id,
                client: match k.client_ip() {
                    Some(ip) => AffinityClient::Ip(ip.into()),
                    None => AffinityClient::Netns(k.client_netns),
                },
                backend_id: v.backend_id,
                last_used_ns: v.last_used_ns,
            })
            .chain(
                collect(defs::AFFINITY6.name, self.affinity6.iter())?
                    .into_iter()
                    .map(|(k, v)| AffinityEntry {
                        service_id: k.service_id,
                        client: AffinityClient::Ip(k.client_ip().into()),
                        backend_id: v.backend_id,
                        last_used_ns: v.last_used_ns,
                    }),
            )
            .collect();
        let sock_revnat = collect(defs::SOCK_REVNAT.name, self.sock_revnat.iter())?
            .into_iter()
            .map(|(k, v)| SockRevNatEntry {
                cookie: k.cookie,
                backend: k.backend().into(),
                frontend: v.frontend().into(),
                service_id: v.service_id,
            })
            .chain(
                collect(defs::SOCK_REVNAT6.name, self.sock_revnat6.iter())?
                    .into_iter()
                    .map(|(k, v)| SockRevNatEntry {
                        cookie: k.cookie,
                        backend: k.backend().into(),
                        frontend: v.frontend().into(),
                        service_id: v.service_id,
                    }),
            )
            .collect();
        let service_stats = self
            .service_counters()?
            .into_iter()
            .map(|(service_id, (packets, bytes))| ServiceStatsEntry {
                service_id,
                packets,
                bytes,
            })
            .collect();
        let config = self.config.get(&0, 0).map_err(|source| MapsError::Op {
            name: defs::CONFIG.name,
            op: "lookup",
            source: Box::new(source),
        })?;
        let source_ranges = collect(defs::SOURCE_RANGES.name, self.source_ranges.iter())?
            .into_iter()
            .map(|(k, _)| SourceRangeEntry {
                service_id: k.data().service_id(),
                cidr: Cidr {
                    addr: k.data().ip(),
                    len: k.prefix_len().saturating_sub(32) as u8,
                },
            })
            .collect();
        let mut maglev_slots: std::collections::BTreeMap<u32, usize> = Default::default();
        for k in self.maglev.keys() {
            let k = k.map_err(|source| MapsError::Op {
                name: defs::MAGLEV.name,
                op: "iterate",
                source: Box::new(source),
            })?;
            *maglev_slots.entry(k.table_id).or_default() += 1;
        }
        let maglev = maglev_slots
            .into_iter()
            .map(|(table_id, slots)| MaglevEntry {
                table_id,
                slots,
                frontends: services
                    .iter()
                    .filter(|s| s.maglev_size != 0 && s.maglev_table == table_id)
                    .map(|s| s.id)
                    .collect(),
            })
            .collect();
        let fragments = collect(defs::FRAGMENTS.name, self.fragments.iter())?
            .into_iter()
            .map(|(k, v)| {
                let (src, dst) = k.endpoints(&v);
                FragmentEntry {
                    proto: Proto(k.proto),
                    src: src.into(),
                    dst: dst.into(),
                    ip_id: k.ip_id().into(),
                }
            })
            .chain(
                collect(defs::FRAGMENTS6.name, self.fragments6.iter())?
                    .into_iter()
                    .map(|(k, v)| {
                        let (src, dst) = k.endpoints(&v);
                        FragmentEntry {
                            proto: Proto(k.proto),
                            src: src.into(),
                            dst: dst.into(),
                            ip_id: k.frag_id(),
                        }
                    }),
            )
            .collect();
        let stats = self
            .counters()?
            .into_iter()
            .map(|(name, value)| StatEntry { name, value })
            .collect();
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
            config: ConfigEntry {
                node_address: config.node_ip(),
                pod_networks: config
                    .pod_networks()
                    .map(|(addr, len)| Cidr { addr, len })
                    .collect(),
            },
            source_ranges,
            maglev,
            fragments,
            stats,
        };
        dump.sort();
        dump.maps = self
            .capacities()?
            .into_iter()
            .zip(self.entries()?)
            .map(|((name, max_entries), entries)| MapSummary {
                name,
                entries: entries as usize,
                max_entries,
            })
            .collect();
        Ok(dump)
    }

    /// Each map's capacity (`max_entries`), as the kernel reports it, in
    /// [`defs::ALL`] order.
    pub fn capacities(&self) -> Result<Vec<(&'static str, u32)>, MapsError> {
        self.each()
            .into_iter()
            .map(|(info, m)| Ok((info.name, capacity(&info, m)?)))
            .collect()
    }

    /// Number of entries of both conntrack maps (walks the keys).
    pub fn conntrack_entries(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
            + self.conntrack6.keys().filter(Result::is_ok).count()
    }
}

impl Maps {
    /// Every frontend of both families.
    pub fn services(&self) -> Result<Vec<(Addr, ServiceValue)>, MapsError> {
        let v4 = collect(defs::SERVICES.name, self.services.iter())?
            .into_iter()
            .map(|(k, v)| (Addr::new(k.ip(), k.host_port(), k.proto), v));
        let v6 = collect(defs::SERVICES6.name, self.services6.iter())?
            .into_iter()
            .map(|(k, v)| (Addr::new(k.ip(), k.host_port(), k.proto), v));
        Ok(v4.chain(v6).collect())
    }

    /// Packets and bytes per frontend id, summed over the CPUs.
    pub fn service_counters(
        &self,
    ) -> Result<std::collections::HashMap<u32, (u64, u64)>, MapsError> {
        Ok(collect(defs::SVC_STATS.name, self.svc_stats.iter())?
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
            .collect())
    }

    /// Every data-path counter by name, summed over the CPUs.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        stat::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self
                    .stats
                    .get(&(i as u32), 0)
                    .map_err(|source| MapsError::Op {
                        name: defs::STATS.name,
                        op: "lookup",
                        source: Box::new(source),
                    })?;
                Ok((*name, v.iter().sum()))
            })
            .collect()
    }
}

/// Read access to Maglev tables, for `explain` (the maps, or a table in a
/// unit test).
pub trait MaglevSource {
    /// Backend id in slot `slot` of Maglev table `table_id`
    /// (`ServiceEntry::maglev_table`).
    fn maglev_slot(&self, table_id: u32, slot: u32) -> Option<u32>;
}

impl MaglevSource for Maps {
    fn maglev_slot(&self, table_id: u32, slot: u32) -> Option<u32> {
        self.maglev.get(&MaglevKey { table_id, slot }, 0).ok()
    }
}

impl MaglevSource for std::collections::HashMap<(u32, u32), u32> {
    fn maglev_slot(&self, table_id: u32, slot: u32) -> Option<u32> {
        self.get(&(table_id, slot)).copied()
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

/// The frontend kind of [`svc_flags`](proxy_common::svc_flags) bits.
pub fn flags_kind(flags: u16) -> FrontendKind {
    if flags & svc_flags::NODE_PORT != 0 {
        FrontendKind::NodePort
    } else if flags & svc_flags::EXTERNAL_IP != 0 {
        FrontendKind::ExternalIp
    } else if flags & svc_flags::LOAD_BALANCER != 0 {
        FrontendKind::LoadBalancer
    } else {
        FrontendKind::ClusterIp
    }
}

/// The [`svc_flags`](proxy_common::svc_flags) kind bit of a frontend kind.
pub fn kind_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
        FrontendKind::NodePort => svc_flags::NODE_PORT,
        FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
    }
}

/// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
pub fn kind_name(kind: FrontendKind) -> &'static str {
    let bit = kind_flags(kind);
    svc_flags::KIND_NAMES
        .iter()
        .find(|(b, _)| *b == bit)
        .map(|(_, n)| *n)
        .unwrap_or("ClusterIP")
}

fn zero_value() -> ServiceValue {
    ServiceValue {
        id: 0,
        count: 0,
        generation: 0,
        _pad0: 0,
        flags: 0,
        _pad1: 0,
        affinity_timeout: 0,
        maglev_size: 0,
        maglev_table: 0,
    }
}

pub fn ser_kind<S: Serializer>(k: &FrontendKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(kind_name(*k))
}

/// An IP protocol number, serialized (and displayed) by name: `TCP`,
/// `UDP`, `SCTP`, or the number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Proto(pub u8);

impl From<Protocol> for Proto {
    fn from(p: Protocol) -> Proto {
        Proto(p.number())
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match proxy_common::proto_name(self.0) {
            Some(n) => f.pad(n),
            None => f.pad(&self.0.to_string()),
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// [`svc_flags`](proxy_common::svc_flags) bits other than the kind,
/// serialized as their names (`source-ranges`, `local-only`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcFlags(pub u16);

impl SvcFlags {
    pub fn local_only(self) -> bool {
        self.value().local_only()
    }
    pub fn source_ranges(self) -> bool {
        self.value().has_source_ranges()
    }
    pub fn names(self) -> Vec<&'static str> {
        self.value().flag_names().collect()
    }
    fn value(self) -> ServiceValue {
        ServiceValue {
            flags: self.0,
            ..zero_value()
        }
    }
}

impl Serialize for SvcFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names().serialize(s)
    }
}

/// Which way a conntrack entry was seen ([`proxy_common::ct_dir`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Service,
    Reply,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Direction::Service => "service",
            Direction::Reply => "reply",
        })
    }
}

/// The client of an affinity entry: an IP (per-packet path) or a network
/// namespace cookie (socket path), serialized as the IP or `netns:<cookie>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AffinityClient {
    Ip(IpAddr),
    Netns(u64),
}

impl std::fmt::Display for AffinityClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AffinityClient::Ip(ip) => f.pad(&ip.to_string()),
            AffinityClient::Netns(c) => f.pad(&format!("netns:{c}")),
        }
    }
}

impl Serialize for AffinityClient {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A client network, serialized as `addr/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        if self.len > 32 {
            return false;
        }
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&format!("{}/{}", self.addr, self.len))
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `ip:port/PROTO`, serialized as separate fields.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Addr {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl Addr {
    pub fn new(ip: impl Into<IpAddr>, port: u16, proto: u8) -> Addr {
        Addr {
            ip: ip.into(),
            port,
            proto: Proto(proto),
        }
    }
}

impl std::fmt::Display for Addr {
    /// `10.96.0.10:80/TCP`, `[fd00:96::10]:80/TCP`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.ip, self.port), self.proto)
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
        self.conntrack.sort_by_key(|c| (c.direction, c.src, c.dst));
        self.affinity.sort_by_key(|a| (a.service_id, a.client));
        self.sock_revnat.sort_by_key(|s| (s.cookie, s.backend));
        self.source_ranges.sort_by_key(|r| (r.service_id, r.cidr));
        self.service_stats.sort_by_key(|s| s.service_id);
        self.fragments.sort_by_key(|f| (f.src, f.dst, f.ip_id));
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
    #[serde(serialize_with = "ser_kind")]
    pub kind: FrontendKind,
    /// Other flag bits set: `source-ranges`, `local-only`.
    pub flags: SvcFlags,
    /// ClientIP affinity timeout in seconds; 0: none.
    pub affinity_timeout: u32,
    /// Maglev table size; 0: random selection.
    pub maglev_size: u32,
    /// Maglev table id (`maglev` entry) when `maglev_size` is not 0.
    pub maglev_table: u32,
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
    pub address: SocketAddr,
}

#[derive(Clone, Debug, Serialize)]
pub struct CtEntry {
    pub direction: Direction,
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub service_id: u32,
    pub backend_id: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
    /// SNAT/DSR flows: on the service entry the address the client was
    /// rewritten to, on the reply entry the client's own address.
    pub nat: Option<SocketAddr>,
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
    pub client: AffinityClient,
    pub backend_id: u32,
    pub last_used_ns: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SockRevNatEntry {
    pub cookie: u64,
    pub backend: SocketAddr,
    pub frontend: SocketAddr,
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
    /// Packets to these skip the frontend lookup (`--cluster-cidr`; empty
    /// while a frontend lies inside one).
    pub pod_networks: Vec<Cidr>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SourceRangeEntry {
    pub service_id: u32,
    pub cidr: Cidr,
}

#[derive(Clone, Debug, Serialize)]
pub struct FragmentEntry {
    pub proto: Proto,
    /// Source address and port, as the fragments carry them.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// IPv4 identification, or the IPv6 fragment header's.
    pub ip_id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct MaglevEntry {
    /// Table id (`ServiceValue::maglev_table`).
    pub table_id: u32,
    /// Slots present (the table's size when it is whole).
    pub slots: usize,
    /// Ids of the frontends pointing at it (none: an orphan, a bug).
    pub frontends: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/architecture.md's map table lists exactly `maps::ALL`, in
    /// order, with the default capacities.
    #[test]
    fn docs_map_table_is_maps_all() {
        let doc = include_str!("../../../../docs/architecture.md");
        let section = doc
            .split("\n## Maps")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("a Maps section");
        let rows: Vec<(String, String)> = section
            .lines()
            .filter_map(|l| {
                let mut cells = l.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                let _kind = cells.next()?;
                let cap = cells.next()?;
                Some((name.to_owned(), cap.to_owned()))
            })
            .collect();
        let want: Vec<(String, String)> = defs::ALL
            .iter()
            .map(|m| (m.name.to_owned(), m.max_entries.to_string()))
            .collect();
        assert_eq!(rows, want);
    }

    #[test]
    fn typed_values_display_padded() {
        assert_eq!(format!("{:<5}|", Proto(6)), "TCP  |");
        assert_eq!(format!("{:<5}|", Proto(99)), "99   |");
        assert_eq!(
            format!("{:<12}|", AffinityClient::Netns(7)),
            "netns:7     |"
        );
        let c = Cidr {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            len: 8,
        };
        assert!(c.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        let all = Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            len: 0,
        };
        assert!(all.contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(kind_name(FrontendKind::ExternalIp), "ExternalIP");
        assert_eq!(
            flags_kind(kind_flags(FrontendKind::NodePort)),
            FrontendKind::NodePort
        );
    }
}
