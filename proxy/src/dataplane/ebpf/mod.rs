//! The eBPF dataplane: programs pinned maps, attaches the tc programs to
//! pod-facing interfaces and the socket-LB hooks to a cgroup, all through
//! pinned links (see [`links`]) so the data path outlives the agent.
//!
//! Layout: this file holds the dataplane's state and the [`Dataplane`]
//! glue; [`load`] loads the object (map capacities chosen by
//! [`capacity`], pinned maps grown by [`resize`]) and attaches programs,
//! [`frontends`] programs
//! frontends, [`adoption`] rebuilds state from pins, [`maglev_tables`] owns
//! the shared Maglev tables. The leaves ([`maps`], [`conntrack`],
//! [`links`], [`interfaces`]) know nothing of this module.
//!
//! Update order per frontend, so a packet never sees half an update: new
//! backends are written first, then the new slot generation, then the
//! service entry is replaced in one map update (count + generation), then
//! the old generation's slots are deleted, and finally backends nobody
//! references any more.

mod adoption;
mod backends;
pub mod capacity;
pub mod conntrack;
mod frontends;
pub mod interfaces;
pub mod links;
mod load;
pub mod maglev_tables;
pub mod maps;
mod resize;
pub mod sock_destroy;
mod stale_sockets;
pub mod vmlinux_btf;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::MapError,
    programs::{ProgramError, SchedClassifier, Xdp, links::PinnedLink},
};
use proxy_common::{Config, MapInfo, Net4, config_flags, maps as defs, progs};

use tracing::{debug, info, warn};

pub use interfaces::{cgroup2_mount, glob_match, interface_with_address};
pub use load::{Loader, needs_kernel_btf};
pub use stale_sockets::{SockDestroyCounters, SockTerminate};

use self::{
    conntrack::{GcStats, Timeouts},
    links::LinkPinError,
    maglev_tables::MaglevTables,
    maps::{Maps, MapsError},
};
use super::{ApplyStats, Dataplane, DataplaneStats, FrontendCounters, MapEvent, MapFill};
use crate::{
    diff::Change,
    lb::{BackendAddr, FrontendKey, LbTable},
};

/// The eBPF object built by `build.rs` from `proxy-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without its eBPF object (PROXY_SKIP_EBPF or clippy); rebuild after `cargo xtask setup`"
    )]
    NoObject,
    #[error("creating pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("attaching {program}: {source}")]
    Attach {
        program: &'static str,
        #[source]
        source: LinkPinError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("map {map}: {op} for frontend {frontend}: {source}")]
    Update {
        map: &'static str,
        op: &'static str,
        frontend: String,
        #[source]
        source: Box<MapError>,
    },
    /// An insert failed because the map holds `capacity` entries already.
    #[error(
        "map {map} is full ({capacity} entries): {op} for frontend {frontend} failed; raise {flag} (a pinned map smaller than the flag asks for is grown at the next start)"
    )]
    MapFull {
        map: &'static str,
        capacity: u32,
        flag: &'static str,
        op: &'static str,
        frontend: String,
    },
    #[error("frontend {0} has {1} backends, more than a frontend can hold")]
    TooManyBackends(FrontendKey, usize),
    #[error("counting possible CPUs: {0}")]
    Cpus(io::Error),
    #[error("listing network interfaces: {0}")]
    Interfaces(io::Error),
}

#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// Pin directory root (`--bpffs-path`).
    pub bpffs_path: PathBuf,
    /// Glob patterns (`*` only) of pod-facing host interfaces to attach to.
    pub pod_devices: Vec<String>,
    /// cgroup v2 directory for the socket-LB hooks; `None`: socket LB off
    /// (and any hooks an earlier agent pinned are removed).
    pub socket_lb_cgroup: Option<PathBuf>,
    pub ct_timeouts: Timeouts,
    /// How often conntrack is swept for idle entries.
    pub ct_gc_interval: Duration,
    /// Maglev table size for north-south frontends (prime); 0: random.
    pub maglev_table_size: u32,
    /// Direct server return for remote north-south backends.
    pub dsr: bool,
    /// How XDP attaches to the external interfaces.
    pub xdp_mode: links::XdpAttach,
    /// Capacities (`max_entries`) by map name overriding the defaults of
    /// `proxy_common::maps` (from [`capacity::MapSizing::capacities`]:
    /// `--bpf-lb-map-max`, `--maglev-map-max`, ...).
    pub map_max_entries: BTreeMap<&'static str, u32>,
    /// Destroying sockets connected to backends that went
    /// (`--bpf-lb-sock-terminate*`, `--netns-dir`).
    pub sock_terminate: SockTerminate,
    /// The cluster's pod networks (`--cluster-cidr`, at most
    /// [`proxy_common::POD_NETS`]): packets to them skip the frontend
    /// lookup while no frontend lies inside them.
    pub pod_networks: Vec<(Ipv4Addr, u8)>,
}

impl EbpfConfig {
    pub fn new(bpffs_path: PathBuf) -> EbpfConfig {
        EbpfConfig {
            bpffs_path,
            pod_devices: Vec::new(),
            socket_lb_cgroup: None,
            ct_timeouts: Timeouts::default(),
            ct_gc_interval: Duration::from_secs(10),
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            dsr: false,
            xdp_mode: links::XdpAttach::Auto,
            map_max_entries: BTreeMap::new(),
            pod_networks: Vec::new(),
            sock_terminate: SockTerminate::default(),
        }
    }

    /// The capacity map `info` is created with: the override, else the
    /// descriptor's default.
    pub fn max_entries(&self, info: &MapInfo) -> u32 {
        self.map_max_entries
            .get(info.name)
            .copied()
            .unwrap_or(info.max_entries)
    }
}

#[derive(Clone, Debug)]
struct Programmed {
    id: u32,
    generation: u8,
    flags: u16,
    affinity_timeout: u32,
    source_ranges: Box<[(Ipv4Addr, u8)]>,
    backend_ids: Box<[u32]>,
    /// The Maglev table it points at (shared: see [`maglev_tables`]).
    maglev_table: Option<u32>,
    /// The frontend's own table size (annotation), as last applied.
    maglev_override: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendIdentity {
    addr: IpAddr,
    port: u16,
    proto: u8,
}

/// A backend as the dataplane keeps it (1M of these at 100,000 services x
/// 10 endpoints: the address, port and protocol are the key, so only the
/// flags of the `Backend` value are kept).
#[derive(Clone, Copy, Debug)]
struct BackendEntry {
    id: u32,
    refs: u32,
    /// `Backend::flags`.
    flags: u8,
}

/// Map events kept for the agent at most.
const MAX_MAP_EVENTS: usize = 64;

/// Failed inserts per map, indexed like `proxy_common::maps::ALL`.
#[derive(Debug, Default)]
pub struct InsertFailures([AtomicU64; proxy_common::maps::ALL.len()]);

impl InsertFailures {
    pub fn count(&self, map: &str) {
        if let Some(i) = proxy_common::maps::ALL.iter().position(|m| m.name == map) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, map: &str) -> u64 {
        proxy_common::maps::ALL
            .iter()
            .position(|m| m.name == map)
            .map_or(0, |i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Conntrack entries the last sweep left (shared with the `/metrics`
/// reader: the sweep walks the map anyway, so a scrape need not).
#[derive(Debug)]
/// One figure per conntrack map (`CT_V4`, `CT_V6`).
pub struct SweptEntries([AtomicU64; 2]);

impl Default for SweptEntries {
    fn default() -> Self {
        SweptEntries([AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)])
    }
}

impl SweptEntries {
    fn slot(&self, map: &str) -> Option<&AtomicU64> {
        if map == defs::CONNTRACK.name {
            Some(&self.0[0])
        } else if map == defs::CONNTRACK6.name {
            Some(&self.0[1])
        } else {
            None
        }
    }

    /// Record conntrack map `map`'s entries (other maps: ignored).
    pub fn set(&self, map: &str, n: u64) {
        if let Some(a) = self.slot(map) {
            a.store(n, Ordering::Relaxed);
        }
    }

    /// None before the first sweep, or for a map that is no conntrack map.
    pub fn get(&self, map: &str) -> Option<u64> {
        self.slot(map)
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|n| *n != u64::MAX)
    }
}

struct Attached {
    ifindex: u32,
    links: Vec<PinnedLink>,
}

pub struct EbpfDataplane {
    ebpf: Ebpf,
    maps: Maps,
    cfg: EbpfConfig,
    /// What is programmed per frontend (a hash map: sized once by a full
    /// sync, about 70 bytes a frontend where a B-tree took about 160).
    frontends: HashMap<FrontendKey, Programmed>,
    /// What `frontends` programs, as the agent asked for it (lent to the
    /// diff): kept with `frontends`, entry for entry.
    table: LbTable,
    /// Every backend in `BACKENDS_V4` and `BACKENDS_V6`: its id, value and
    /// how many frontends' lists hold it.
    backends: backends::Backends,
    /// Backends whose reference count dropped to 0 (or that were written
    /// for a frontend that then failed) since the last apply: the only
    /// candidates for deletion, so releasing is O(changes), not O(all).
    unreferenced: HashSet<BackendIdentity>,
    /// Capacity of each map as loaded (a pinned map keeps its own).
    capacities: BTreeMap<&'static str, u32>,
    /// Inserts that failed, per map (shared with the `/metrics` reader).
    insert_failures: Arc<InsertFailures>,
    /// Conntrack entries after the last sweep (shared with `/metrics`).
    swept_ct: Arc<SweptEntries>,
    /// Full maps and sweeps since the agent last took them.
    map_events: Vec<MapEvent>,
    next_frontend_id: u32,
    next_backend_id: u32,
    attached: HashMap<String, Attached>,
    socket_links: Vec<PinnedLink>,
    xdp_links: Vec<PinnedLink>,
    /// Backends removed since the last conntrack sweep: their entries go.
    removed_backends: HashSet<u32>,
    /// Frontends removed since the last housekeeping: their socket-LB
    /// reverse and affinity entries go.
    removed_frontends: HashSet<u32>,
    /// Owner of every `MAGLEV_V4` entry.
    maglev_tables: MaglevTables,
    /// The node address last written to `CONFIG`.
    node_addr: Option<Ipv4Addr>,
    /// Programmed frontends inside `cfg.pod_networks`: while there is one,
    /// `CONFIG` carries no pod networks (their fast exit would skip it).
    pod_net_frontends: BTreeSet<FrontendKey>,
    /// What `CONFIG` holds, once this agent wrote or read it.
    config: Option<Config>,
    last_gc: Instant,
    last_gc_stats: GcStats,
    /// Destroys sockets of backends that went (see [`sock_destroy`]).
    sock_destroyer: stale_sockets::Destroyer,
    /// Its counters (shared with the `/metrics` reader).
    sock_destroy_counters: Arc<SockDestroyCounters>,
    /// Whether a netns the destroyer could not walk was logged already.
    netns_failure_logged: bool,
    // Keeps the aya-log ring buffer alive (rare error paths log through it).
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Where links are pinned under `--bpffs-path`.
pub fn links_dir(bpffs_path: &Path) -> PathBuf {
    bpffs_path.join("links")
}

impl EbpfDataplane {
    /// Sweep conntrack now (idle entries, entries of removed backends).
    pub fn sweep_conntrack(&mut self) -> Result<GcStats, EbpfError> {
        let now = conntrack::monotonic_ns();
        let err = |map: &'static str| {
            move |source| EbpfError::Update {
                map,
                op: "sweep",
                frontend: "(all)".to_owned(),
                source: Box::new(source),
            }
        };
        let v4 = conntrack::sweep(
            &mut self.maps.conntrack,
            now,
            &self.cfg.ct_timeouts,
            &self.removed_backends,
        )
        .map_err(err(defs::CONNTRACK.name))?;
        let v6 = conntrack::sweep(
            &mut self.maps.conntrack6,
            now,
            &self.cfg.ct_timeouts,
            &self.removed_backends,
        )
        .map_err(err(defs::CONNTRACK6.name))?;
        let stats = v4.and(v6);
        // Affinity entries of removed backends are useless too (a walk
        // only when some backend went).
        let stale: Vec<_> = if self.removed_backends.is_empty() {
            Vec::new()
        } else {
            self.maps
                .affinity
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| self.removed_backends.contains(&v.backend_id))
                .map(|(k, _)| k)
                .collect()
        };
        for k in stale {
            let _ = self.maps.affinity.remove(&k);
        }
        let stale6: Vec<_> = if self.removed_backends.is_empty() {
            Vec::new()
        } else {
            self.maps
                .affinity6
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, v)| self.removed_backends.contains(&v.backend_id))
                .map(|(k, _)| k)
                .collect()
        };
        for k in stale6 {
            let _ = self.maps.affinity6.remove(&k);
        }
        self.removed_backends.clear();
        self.last_gc = Instant::now();
        self.last_gc_stats = stats;
        for (ct, family) in [(defs::CONNTRACK.name, v4), (defs::CONNTRACK6.name, v6)] {
            self.swept_ct.set(ct, family.remaining as u64);
            self.push_event(MapEvent::Swept {
                map: ct,
                entries: family.remaining as u64,
                capacity: self.capacities.get(ct).copied().unwrap_or(0),
                flag: capacity::flag_of_map(ct).unwrap_or("--bpf-ct-map-max"),
            });
        }
        if stats.expired + stats.flushed > 0 {
            debug!(?stats, "conntrack sweep");
        }
        Ok(stats)
    }

    /// Delete the socket-LB reverse entries and affinity entries of
    /// frontends removed since the last call. Returns how many went.
    pub fn flush_removed_frontends(&mut self) -> usize {
        if self.removed_frontends.is_empty() {
            return 0;
        }
        let removed = std::mem::take(&mut self.removed_frontends);
        let sock: Vec<_> = self
            .maps
            .sock_revnat
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| removed.contains(&v.service_id))
            .map(|(k, _)| k)
            .collect();
        let sock6: Vec<_> = self
            .maps
            .sock_revnat6
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| removed.contains(&v.service_id))
            .map(|(k, _)| k)
            .collect();
        let aff: Vec<_> = self
            .maps
            .affinity
            .keys()
            .filter_map(Result::ok)
            .filter(|k| removed.contains(&k.service_id))
            .collect();
        let n = sock.len() + sock6.len() + aff.len();
        for k in sock {
            let _ = self.maps.sock_revnat.remove(&k);
        }
        for k in sock6 {
            let _ = self.maps.sock_revnat6.remove(&k);
        }
        for k in aff {
            let _ = self.maps.affinity.remove(&k);
        }
        if n > 0 {
            debug!(
                entries = n,
                frontends = removed.len(),
                "flushed entries of removed frontends"
            );
        }
        n
    }

    /// Write the node address north-south SNAT and DSR use (`CONFIG`), when
    /// it differs from what is there.
    pub fn set_node_address(&mut self, addr: Option<Ipv4Addr>) -> Result<(), EbpfError> {
        let changed = self.node_addr != addr;
        self.node_addr = addr;
        self.write_config()?;
        if changed {
            info!(node_address = ?addr, "north-south node address");
        }
        Ok(())
    }

    /// `CONFIG` as the settings and the programmed frontends make it now.
    fn desired_config(&self) -> Config {
        let mut pod_nets = [Net4::default(); proxy_common::POD_NETS];
        if self.pod_net_frontends.is_empty() {
            for (slot, (addr, len)) in pod_nets.iter_mut().zip(&self.cfg.pod_networks) {
                *slot = Net4::new(u32::from_ne_bytes(addr.octets()), *len);
            }
        }
        Config {
            node_addr: self
                .node_addr
                .map(|a| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            flags: if self.cfg.dsr { config_flags::DSR } else { 0 },
            pod_nets,
        }
    }

    /// Write `CONFIG` when it differs from what it holds.
    fn write_config(&mut self) -> Result<(), EbpfError> {
        let cfg = self.desired_config();
        if self.config.is_none() {
            self.config = self.maps.config.get(&0, 0).ok();
        }
        if self.config == Some(cfg) {
            return Ok(());
        }
        self.maps
            .config
            .set(0, cfg, 0)
            .map_err(|source| EbpfError::Update {
                map: proxy_common::maps::CONFIG.name,
                op: "set",
                frontend: format!(
                    "(node address {:?}, pod networks {:?})",
                    self.node_addr, self.cfg.pod_networks
                ),
                source: Box::new(source),
            })?;
        self.config = Some(cfg);
        Ok(())
    }

    /// Whether `addr` lies inside `--cluster-cidr` (its IPv4 networks: the
    /// fast exit is the IPv4 per-packet path's).
    fn in_pod_network(&self, addr: IpAddr) -> bool {
        let IpAddr::V4(addr) = addr else {
            return false;
        };
        let raw = u32::from_ne_bytes(addr.octets());
        self.cfg
            .pod_networks
            .iter()
            .any(|(a, len)| Net4::new(u32::from_ne_bytes(a.octets()), *len).contains(raw))
    }

    /// Before a batch: frontends it puts inside the pod networks turn their
    /// fast exit off first, so no packet to them skips the lookup.
    fn before_apply(&mut self, changes: &[Change]) -> Result<(), EbpfError> {
        let was_empty = self.pod_net_frontends.is_empty();
        for c in changes {
            if let Change::Upsert(k, _) = c
                && self.in_pod_network(k.addr)
            {
                self.pod_net_frontends.insert(*k);
            }
        }
        if was_empty && let Some(k) = self.pod_net_frontends.first() {
            warn!(
                frontend = %k,
                cluster_cidr = ?self.cfg.pod_networks,
                "a frontend lies inside --cluster-cidr: packets to pods take the frontend lookup while one does"
            );
            self.write_config()?;
        }
        Ok(())
    }

    /// After a batch: only programmed frontends keep the fast exit off.
    fn after_apply(&mut self) -> Result<(), EbpfError> {
        if self.pod_net_frontends.is_empty() {
            return Ok(());
        }
        let frontends = &self.frontends;
        self.pod_net_frontends.retain(|k| frontends.contains_key(k));
        if self.pod_net_frontends.is_empty() {
            info!(
                "no frontend inside --cluster-cidr any more: packets to pods skip the frontend lookup again"
            );
            self.write_config()?;
        }
        Ok(())
    }

    /// Maglev tables in use and the `MAGLEV_V4` entries they own.
    pub fn maglev_tables(&self) -> (usize, u64) {
        (self.maglev_tables.len(), self.maglev_tables.slots())
    }

    /// The last conntrack sweep's figures.
    pub fn conntrack_stats(&self) -> GcStats {
        self.last_gc_stats
    }

    /// The loaded XDP program, for BPF_PROG_TEST_RUN.
    pub fn xdp_program(&self) -> Option<&Xdp> {
        self.ebpf
            .program(progs::XDP_NODEPORT)
            .and_then(|p| p.try_into().ok())
    }

    /// A loaded tc program, for BPF_PROG_TEST_RUN.
    pub fn program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf.program(name).and_then(|p| p.try_into().ok())
    }

    /// The maps, for inspection.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The table as the maps hold it (after adoption: what an earlier agent
    /// programmed).
    fn table_from_maps(&self) -> LbTable {
        let by_id: HashMap<u32, BackendAddr> = self
            .backends
            .iter()
            .map(|(k, e)| {
                let b = BackendAddr {
                    addr: k.addr,
                    port: k.port,
                    terminating: e.flags & proxy_common::backend_flags::TERMINATING != 0,
                    local: e.flags & proxy_common::backend_flags::LOCAL != 0,
                };
                (e.id, b)
            })
            .collect();
        let mut lb = LbTable::default();
        for (k, p) in &self.frontends {
            let backends = p
                .backend_ids
                .iter()
                .filter_map(|id| by_id.get(id))
                .copied()
                .collect();
            lb.frontends.insert(*k, frontends::frontend_of(p, backends));
        }
        lb
    }

    /// Failed inserts into map `name` since the agent started.
    pub fn insert_failures(&self, name: &str) -> u64 {
        self.insert_failures.get(name)
    }

    /// The capacity of each map as loaded.
    pub fn capacities(&self) -> &BTreeMap<&'static str, u32> {
        &self.capacities
    }

    /// The error for a failed map operation: [`EbpfError::MapFull`] when
    /// the map is out of entries (`E2BIG` from hash maps, `ENOSPC` from
    /// LPM tries), else [`EbpfError::Update`]. Failed inserts are counted
    /// per map for `/metrics`.
    pub(super) fn map_error(
        &self,
        map: &'static str,
        op: &'static str,
        frontend: String,
        source: MapError,
    ) -> EbpfError {
        if op == "insert" {
            self.insert_failures.count(map);
        }
        let full = matches!(
            &source,
            MapError::SyscallError(e)
                if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        );
        match (full, capacity::flag_of_map(map)) {
            (true, Some(flag)) => EbpfError::MapFull {
                map,
                capacity: self.capacities.get(map).copied().unwrap_or(0),
                flag,
                op,
                frontend,
            },
            _ => EbpfError::Update {
                map,
                op,
                frontend,
                source: Box::new(source),
            },
        }
    }

    /// Queue a map event for the agent (bounded: a caller that never takes
    /// them keeps the newest few).
    fn push_event(&mut self, e: MapEvent) {
        if self.map_events.len() >= MAX_MAP_EVENTS {
            self.map_events.remove(0);
        }
        self.map_events.push(e);
    }

    /// When `e` is a full map: queue a [`MapEvent::Full`] (one per map per
    /// batch) and log it at debug only. Returns whether it was.
    fn note_full(&mut self, e: &EbpfError) -> bool {
        let EbpfError::MapFull {
            map,
            capacity,
            flag,
            frontend,
            ..
        } = e
        else {
            return false;
        };
        debug!(error = %e, "programming a frontend failed");
        let queued = self
            .map_events
            .iter()
            .any(|m| matches!(m, MapEvent::Full { map: n, .. } if n == map));
        if !queued {
            self.push_event(MapEvent::Full {
                map,
                capacity: *capacity,
                flag,
                what: frontend.clone(),
            });
        }
        true
    }

    /// Interfaces the tc programs are attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.attached.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Dataplane for EbpfDataplane {
    type Error = EbpfError;

    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn programmed(&self) -> &LbTable {
        &self.table
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, EbpfError> {
        self.before_apply(changes)?;
        let mut stats = ApplyStats::default();
        let mut first_error = None;
        let mut other = 0usize;
        // (frontend, backend) pairs this batch ends: their sockets go.
        let mut gone = Vec::new();
        for change in changes {
            let departing = self.departing(change);
            // One bad frontend must not stop the others.
            let r = match change {
                Change::Upsert(k, f) => self.upsert(k, f, &mut stats),
                Change::Remove(k) => self.remove(k, &mut stats),
            };
            if r.is_ok() {
                gone.extend(departing);
            }
            if let Err(e) = r {
                // A full map fails every frontend after it: the agent logs
                // it once per map (from the event), not one line per
                // frontend per retry; other errors: a few lines and a count.
                if !self.note_full(&e) {
                    if other < 3 {
                        warn!(error = %e, "programming a frontend failed");
                    }
                    other += 1;
                }
                first_error.get_or_insert(e);
            }
        }
        if other > 3 {
            warn!(
                failed = other,
                of = changes.len(),
                "programming frontends failed (first 3 logged)"
            );
        }
        // Backends are reference-counted: this visits only those whose
        // count fell to zero in this batch.
        self.release_backends(&mut stats);
        self.after_apply()?;
        // After the maps stopped offering them: a client that reconnects
        // gets a live backend.
        self.destroy_stale_sockets(gone);
        match first_error {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    fn reserve(&mut self, frontends: usize, backends: usize) {
        self.frontends
            .reserve(frontends.saturating_sub(self.frontends.len()));
        // Backends are also keyed by protocol: at least this many.
        self.backends.reserve(backends);
    }

    fn housekeeping(&mut self) -> Result<(), EbpfError> {
        self.attach_devices()?;
        if self.last_gc.elapsed() >= self.cfg.ct_gc_interval || !self.removed_backends.is_empty() {
            self.sweep_conntrack()?;
        }
        self.flush_removed_frontends();
        Ok(())
    }

    fn set_node_address(&mut self, addr: Option<Ipv4Addr>) -> Result<(), EbpfError> {
        EbpfDataplane::set_node_address(self, addr)
    }

    fn take_map_events(&mut self) -> Vec<MapEvent> {
        std::mem::take(&mut self.map_events)
    }

    fn stats_reader(&self) -> Option<Box<dyn super::StatsReader>> {
        // Its own handles on the pinned maps: reads need no access to the
        // dataplane the sync loop owns.
        match Maps::open_pinned(&self.cfg.bpffs_path) {
            Ok(maps) => Some(Box::new(PinnedStats {
                maps,
                insert_failures: self.insert_failures.clone(),
                swept_ct: self.swept_ct.clone(),
                sock_destroy: self.sock_destroy_counters.clone(),
                lru: Default::default(),
            })),
            Err(e) => {
                warn!(error = %e, "no map statistics for /metrics");
                None
            }
        }
    }
}

/// How often `/metrics` walks the kernel-written LRU maps (affinity,
/// socket-LB reverse entries, fragments) at most: a walk costs up to the
/// map's capacity, so scrapes in between reuse the last count. Conntrack
/// is never walked for `/metrics`: the sweep counts it every
/// `--conntrack-gc-interval`.
pub const LRU_RECOUNT: Duration = Duration::from_secs(30);

/// The last counts of the LRU maps `/metrics` walked, and when.
#[derive(Debug, Default)]
struct LruCounts {
    at: Option<Instant>,
    counts: BTreeMap<&'static str, u64>,
}

impl LruCounts {
    /// Whether the LRU maps are walked on this read.
    fn stale(&self, now: Instant) -> bool {
        self.at
            .is_none_or(|t| now.saturating_duration_since(t) >= LRU_RECOUNT)
    }

    /// The figure a read uses for map `info` without walking it (None:
    /// walk). Hash maps are walked on every read: only the agent writes
    /// them, so they hold exactly what it programmed, and a batched walk
    /// is cheap (the scrape decodes every service anyway). Conntrack: the
    /// last sweep's count; the other LRU maps: the last walk's, until it
    /// is [`LRU_RECOUNT`] old.
    fn known(&self, info: &MapInfo, swept_ct: &SweptEntries, recount: bool) -> Option<u64> {
        if info.kind != proxy_common::MapKind::LruHash {
            return None;
        }
        if let Some(n) = swept_ct.get(info.name) {
            return Some(n);
        }
        if recount {
            None
        } else {
            self.counts.get(info.name).copied()
        }
    }
}

/// `/metrics`'s reader: its own handles on the pinned maps, so reads need
/// no access to the dataplane the sync loop owns.
struct PinnedStats {
    maps: Maps,
    insert_failures: Arc<InsertFailures>,
    swept_ct: Arc<SweptEntries>,
    sock_destroy: Arc<SockDestroyCounters>,
    lru: std::sync::Mutex<LruCounts>,
}

impl super::StatsReader for PinnedStats {
    fn read(&self) -> Result<DataplaneStats, Box<dyn std::error::Error + Send + Sync>> {
        let now = Instant::now();
        let mut lru = match self.lru.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let recount = lru.stale(now);
        let swept = &*self.swept_ct;
        let mut s = dataplane_stats_with(&self.maps, |info| lru.known(info, swept, recount))?;
        if recount {
            for info in &proxy_common::maps::ALL {
                if info.kind == proxy_common::MapKind::LruHash
                    && let Some(m) = s.maps.iter().find(|m| m.name == info.name)
                {
                    lru.counts.insert(info.name, m.entries);
                }
            }
            lru.at = Some(now);
        }
        for m in &mut s.maps {
            m.insert_failures = self.insert_failures.get(&m.name);
        }
        (s.sock_destroyed, s.sock_destroy_failures) = self.sock_destroy.read();
        Ok(s)
    }
}

/// Counters and fill levels for `/metrics`: cheaper than [`Maps::dump`]
/// (no Maglev walk: a table is always full, so its entries are the sizes
/// of the distinct tables).
pub fn dataplane_stats(m: &Maps) -> Result<DataplaneStats, MapsError> {
    dataplane_stats_with(m, |_| None)
}

/// [`dataplane_stats`] with the entries of the maps `known` has a figure
/// for taken from it instead of counted.
fn dataplane_stats_with(
    m: &Maps,
    known: impl Fn(&MapInfo) -> Option<u64>,
) -> Result<DataplaneStats, MapsError> {
    let maps: Vec<MapFill> = m
        .capacities()?
        .into_iter()
        .zip(m.entries_with(known)?)
        .map(|((name, capacity), entries)| MapFill {
            name: name.to_owned(),
            entries,
            capacity: u64::from(capacity),
            insert_failures: 0,
        })
        .collect();
    let conntrack = maps
        .iter()
        .find(|f| f.name == proxy_common::maps::CONNTRACK.name)
        .cloned();
    let per_service = m.service_counters()?;
    let mut frontends: Vec<FrontendCounters> = m
        .services()?
        .into_iter()
        .map(|(k, v)| {
            let (packets, bytes) = per_service.get(&v.id).copied().unwrap_or((0, 0));
            FrontendCounters {
                frontend: k.to_string(),
                kind: v.kind_name().to_owned(),
                packets,
                bytes,
            }
        })
        .collect();
    frontends.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    let mut drops = Vec::new();
    let mut counters = Vec::new();
    for (name, value) in m.counters()? {
        match name.strip_prefix("drop_") {
            Some(reason) => drops.push((reason.to_owned(), value)),
            None => counters.push((name.to_owned(), value)),
        }
    }
    Ok(DataplaneStats {
        maps,
        conntrack,
        frontends,
        drops,
        counters,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pressure as `/metrics` shows it: hash maps from their walk (what
    /// the agent wrote), conntrack from the last sweep, the other LRU maps
    /// from a walk at most every [`LRU_RECOUNT`].
    #[test]
    fn pressure_figures_and_where_they_come_from() {
        let t0 = Instant::now();
        let mut lru = LruCounts::default();
        assert!(lru.stale(t0), "the first read walks");
        // Before any sweep, everything is walked.
        let none = SweptEntries::default();
        let nine = SweptEntries::default();
        nine.set(defs::CONNTRACK.name, 9);
        nine.set(defs::CONNTRACK6.name, 9);
        for info in &defs::ALL {
            assert_eq!(lru.known(info, &none, true), None, "{}", info.name);
        }
        lru.counts.insert(defs::AFFINITY.name, 7);
        lru.counts.insert(defs::CONNTRACK.name, 3);
        lru.at = Some(t0);
        assert!(!lru.stale(t0 + LRU_RECOUNT / 2));
        assert!(lru.stale(t0 + LRU_RECOUNT));
        // Between walks: LRU maps from the cache, conntrack from the sweep
        // (also when a walk is due), hash maps always walked.
        assert_eq!(lru.known(&defs::AFFINITY.info(), &nine, false), Some(7));
        assert_eq!(lru.known(&defs::AFFINITY.info(), &nine, true), None);
        assert_eq!(lru.known(&defs::CONNTRACK.info(), &nine, false), Some(9));
        assert_eq!(lru.known(&defs::CONNTRACK.info(), &nine, true), Some(9));
        assert_eq!(lru.known(&defs::CONNTRACK6.info(), &nine, true), Some(9));
        assert_eq!(lru.known(&defs::CONNTRACK.info(), &none, false), Some(3));
        assert_eq!(lru.known(&defs::SERVICES.info(), &nine, false), None);
        assert_eq!(lru.known(&defs::SLOTS.info(), &nine, false), None);

        // entries / capacity.
        let fill = |entries, capacity| MapFill {
            name: "X".into(),
            entries,
            capacity,
            insert_failures: 0,
        };
        assert_eq!(fill(4, 4).pressure(), 1.0, "a full hash map");
        assert_eq!(fill(0, 262_144).pressure(), 0.0);
        assert_eq!(fill(235_930, 262_144).pressure(), 235_930.0 / 262_144.0);
        assert!((fill(235_930, 262_144).pressure() - 0.9).abs() < 1e-4);
        assert_eq!(fill(3, 0).pressure(), 0.0, "no capacity: no pressure");
    }

    #[test]
    fn swept_entries_are_none_before_the_first_sweep() {
        let s = SweptEntries::default();
        let (v4, v6) = (defs::CONNTRACK.name, defs::CONNTRACK6.name);
        assert_eq!(s.get(v4), None);
        assert_eq!(s.get(v6), None);
        s.set(v4, 0);
        assert_eq!(s.get(v4), Some(0));
        s.set(v4, 12);
        assert_eq!(s.get(v4), Some(12));
        assert_eq!(s.get(v6), None, "one figure per map");
        s.set(v6, 5);
        assert_eq!(s.get(v6), Some(5));
        s.set(defs::AFFINITY.name, 1);
        assert_eq!(s.get(defs::AFFINITY.name), None, "not a conntrack map");
    }
}
