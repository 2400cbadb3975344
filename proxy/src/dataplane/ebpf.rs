//! The eBPF dataplane: programs pinned maps, attaches the tc programs to
//! pod-facing interfaces and the socket-LB hooks to a cgroup, all through
//! pinned links (see [`super::links`]) so the data path outlives the agent.
//!
//! Update order per frontend, so a packet never sees half an update: new
//! backends are written first, then the new slot generation, then the
//! service entry is replaced in one map update (count + generation), then
//! the old generation's slots are deleted, and finally backends nobody
//! references any more.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    ffi::CStr,
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, PerCpuValues, lpm_trie::Key as LpmKey},
    programs::{
        CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp, links::PinnedLink,
    },
    util::nr_cpus,
};
use proxy_common::{
    Backend, Config, MaglevKey, RevNat, ServiceKey, ServiceValue, SlotKey, SourceRangeKey,
    SvcStats, backend_flags, config_flags, progs, svc_flags,
};
use tracing::{debug, info, warn};

use crate::maglev::MaglevBackend;

use super::{
    ApplyStats, Dataplane,
    conntrack::{self, GcStats, Timeouts},
    links::{self, LinkPinError},
};
use crate::{
    diff::Change,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind, LbTable},
    maps::{Maps, MapsError, pin_dir},
    model::Protocol,
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
        }
    }
}

#[derive(Clone, Debug)]
struct Programmed {
    id: u32,
    generation: u8,
    flags: u16,
    affinity_timeout: u32,
    source_ranges: Vec<(Ipv4Addr, u8)>,
    backend_ids: Vec<u32>,
    /// Backend id per Maglev slot (empty: no table).
    maglev: Vec<u32>,
    /// The frontend's own table size (annotation), as last applied.
    maglev_override: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendIdentity {
    addr: Ipv4Addr,
    port: u16,
    proto: u8,
}

struct Attached {
    ifindex: u32,
    links: Vec<PinnedLink>,
}

pub struct EbpfDataplane {
    ebpf: Ebpf,
    maps: Maps,
    cfg: EbpfConfig,
    frontends: BTreeMap<FrontendKey, Programmed>,
    backends: HashMap<BackendIdentity, (u32, Backend)>,
    next_frontend_id: u32,
    next_backend_id: u32,
    attached: HashMap<String, Attached>,
    socket_links: Vec<PinnedLink>,
    xdp_links: Vec<PinnedLink>,
    /// Backends removed since the last conntrack sweep: their entries go.
    removed_backends: HashSet<u32>,
    last_gc: Instant,
    last_gc_stats: GcStats,
    // Keeps the aya-log ring buffer alive (rare error paths log through it).
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (progs::TC_FROM_POD, TcAttachType::Ingress, "ingress"),
    (progs::TC_TO_POD, TcAttachType::Egress, "egress"),
];
const NETDEV_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (progs::TC_FROM_NETDEV, TcAttachType::Ingress, "ingress"),
    (progs::TC_TO_NETDEV, TcAttachType::Egress, "egress"),
];
const SOCK_PROGRAMS: [&str; 4] = [
    progs::SOCK_CONNECT4,
    progs::SOCK_SENDMSG4,
    progs::SOCK_RECVMSG4,
    progs::SOCK_GETPEERNAME4,
];

/// The cgroup v2 mount point (the default cgroup for socket LB).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

/// Where links are pinned under `--bpffs-path`.
pub fn links_dir(bpffs_path: &Path) -> PathBuf {
    bpffs_path.join("links")
}

impl EbpfDataplane {
    /// Load the programs, open (or create) the pinned maps and adopt what an
    /// earlier agent programmed there.
    pub fn load(cfg: EbpfConfig) -> Result<EbpfDataplane, EbpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let dir = pin_dir(&cfg.bpffs_path);
        fs::create_dir_all(&dir).map_err(|source| EbpfError::PinDir {
            path: dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .load(EBPF_OBJECT)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!(error = %e, "no eBPF log buffer");
                None
            }
        };
        for (name, _, _) in TC_PROGRAMS.into_iter().chain(NETDEV_PROGRAMS) {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|source| EbpfError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| EbpfError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        {
            let name = progs::XDP_NODEPORT;
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().map_err(|source| EbpfError::Program {
                name,
                source: Box::new(source),
            })?;
        }
        let links = links_dir(&cfg.bpffs_path);
        fs::create_dir_all(&links).map_err(|source| EbpfError::PinDir {
            path: links.clone(),
            source,
        })?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let mut dp = EbpfDataplane {
            ebpf,
            maps,
            cfg,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            next_frontend_id: 1,
            next_backend_id: 1,
            attached: HashMap::new(),
            socket_links: Vec::new(),
            xdp_links: Vec::new(),
            removed_backends: HashSet::new(),
            last_gc: Instant::now(),
            last_gc_stats: GcStats::default(),
            _logger: logger,
        };
        dp.adopt()?;
        dp.socket_lb()?;
        dp.remove_other_layouts();
        Ok(dp)
    }

    /// Maps pinned by an agent of another layout version are not ours to
    /// reuse; their pins go (programs still using them keep them alive
    /// until their links are replaced).
    fn remove_other_layouts(&self) {
        let current = pin_dir(&self.cfg.bpffs_path);
        let Ok(entries) = fs::read_dir(&self.cfg.bpffs_path) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("maps-v") && path != current {
                match fs::remove_dir_all(&path) {
                    Ok(()) => {
                        info!(path = %path.display(), "removed maps of another layout version")
                    }
                    Err(e) => warn!(path = %path.display(), error = %e, "cannot remove old maps"),
                }
            }
        }
    }

    /// Attach the socket hooks to the configured cgroup, or remove hooks an
    /// earlier agent pinned when socket LB is off.
    fn socket_lb(&mut self) -> Result<(), EbpfError> {
        let dir = links_dir(&self.cfg.bpffs_path);
        let Some(cgroup) = self.cfg.socket_lb_cgroup.clone() else {
            for name in SOCK_PROGRAMS {
                let pin = dir.join(format!("cgroup-{name}"));
                if pin.exists() {
                    let _ = fs::remove_file(&pin);
                    info!(program = name, "socket LB off: removed pinned hook");
                }
            }
            return Ok(());
        };
        let fd = fs::File::open(&cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let link = links::attach_cgroup(prog, &fd, name, &dir.join(format!("cgroup-{name}")))
                .map_err(|source| EbpfError::Attach {
                program: name,
                source,
            })?;
            self.socket_links.push(link);
        }
        info!(cgroup = %cgroup.display(), "socket LB attached");
        Ok(())
    }

    /// North-south: SNAT remote-backend flows to `node_addr` and attach XDP
    /// to `devices` (the node's external interfaces).
    pub fn set_north_south(
        &mut self,
        devices: &[String],
        node_addr: Option<Ipv4Addr>,
    ) -> Result<(), EbpfError> {
        let cfg = Config {
            node_addr: node_addr
                .map(|a| u32::from_ne_bytes(a.octets()))
                .unwrap_or(0),
            flags: if self.cfg.dsr { config_flags::DSR } else { 0 },
        };
        self.maps
            .config
            .set(0, cfg, 0)
            .map_err(|source| EbpfError::Update {
                map: "CONFIG",
                op: "set",
                frontend: "(node address)".to_owned(),
                source: Box::new(source),
            })?;
        let dir = links_dir(&self.cfg.bpffs_path);
        for dev in devices {
            let pin = dir.join(format!("xdp-{dev}"));
            if self.cfg.xdp_mode == links::XdpAttach::None {
                // tc alone; an earlier agent's XDP goes with its pin.
                if let Ok(old) = aya::programs::links::PinnedLink::from_pin(&pin) {
                    links::unpin(old);
                    info!(iface = %dev, "removed XDP pinned by an earlier agent");
                }
                info!(iface = %dev, "north-south by tc only (--xdp-mode none)");
            } else {
                let prog: &mut Xdp = program(&mut self.ebpf, progs::XDP_NODEPORT)?;
                let (link, mode) =
                    links::attach_xdp(prog, dev, &pin, self.cfg.xdp_mode).map_err(|source| {
                        EbpfError::Attach {
                            program: progs::XDP_NODEPORT,
                            source,
                        }
                    })?;
                info!(iface = %dev, mode, "attached XDP");
                self.xdp_links.push(link);
            }
            for (name, direction, dir_name) in NETDEV_PROGRAMS {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                let pin = dir.join(format!("netdev-{dev}-{dir_name}"));
                let link = links::attach_tc(prog, dev, direction, &pin).map_err(|source| {
                    EbpfError::Attach {
                        program: name,
                        source,
                    }
                })?;
                self.xdp_links.push(link);
            }
        }
        Ok(())
    }

    /// Sweep conntrack now (idle entries, entries of removed backends).
    pub fn sweep_conntrack(&mut self) -> Result<GcStats, EbpfError> {
        let stats = conntrack::sweep(
            &mut self.maps.conntrack,
            conntrack::monotonic_ns(),
            &self.cfg.ct_timeouts,
            &self.removed_backends,
        )
        .map_err(|source| EbpfError::Update {
            map: "CT_V4",
            op: "sweep",
            frontend: "(all)".to_owned(),
            source: Box::new(source),
        })?;
        // Affinity entries of removed backends are useless too.
        let stale: Vec<_> = self
            .maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, v)| self.removed_backends.contains(&v.backend_id))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            let _ = self.maps.affinity.remove(&k);
        }
        self.removed_backends.clear();
        self.last_gc = Instant::now();
        self.last_gc_stats = stats;
        if stats.expired + stats.flushed > 0 {
            debug!(?stats, "conntrack sweep");
        }
        Ok(stats)
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

    /// Interfaces the tc programs are attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.attached.keys().cloned().collect();
        v.sort();
        v
    }

    /// Rebuild in-memory state from pinned maps, dropping what is
    /// inconsistent (slots of a dead generation, orphaned rev-NAT entries).
    fn adopt(&mut self) -> Result<(), EbpfError> {
        let m = &mut self.maps;
        let backends: Vec<(u32, Backend)> = collect(m.backends.iter(), "BACKENDS")?;
        for (id, b) in backends {
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1));
            self.backends.insert(
                BackendIdentity {
                    addr: b.ip(),
                    port: b.host_port(),
                    proto: b.proto,
                },
                (id, b),
            );
        }
        let mut ranges: HashMap<u32, Vec<(Ipv4Addr, u8)>> = HashMap::new();
        for k in m.source_ranges.keys().filter_map(Result::ok) {
            let d = k.data();
            ranges
                .entry(u32::from_be(d.service_id_be))
                .or_default()
                .push((
                    Ipv4Addr::from(d.addr.to_ne_bytes()),
                    k.prefix_len().saturating_sub(32) as u8,
                ));
        }
        let sizes: HashMap<u32, u32> = m
            .services
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| (v.id, v.maglev_size))
            .collect();
        let mut maglev: HashMap<u32, Vec<u32>> = HashMap::new();
        for (k, id) in m.maglev.iter().filter_map(Result::ok) {
            let size = sizes.get(&k.service_id).copied().unwrap_or(0) as usize;
            if (k.slot as usize) < size {
                maglev.entry(k.service_id).or_insert_with(|| vec![0; size])[k.slot as usize] = id;
            }
        }
        let services: Vec<(ServiceKey, ServiceValue)> = collect(m.services.iter(), "SERVICES")?;
        let mut live_slots = BTreeSet::new();
        for (k, v) in services {
            self.next_frontend_id = self.next_frontend_id.max(v.id.wrapping_add(1));
            let Some(proto) = Protocol::from_number(k.proto) else {
                continue;
            };
            let mut ids = Vec::with_capacity(v.count as usize);
            for index in 0..v.count {
                let slot = SlotKey {
                    service_id: v.id,
                    generation: v.generation as u16,
                    index,
                };
                live_slots.insert(slot);
                if let Ok(id) = m.slots.get(&slot, 0) {
                    ids.push(id);
                }
            }
            let key = FrontendKey {
                addr: k.ip(),
                port: k.host_port(),
                proto,
            };
            self.frontends.insert(
                key,
                Programmed {
                    id: v.id,
                    generation: v.generation,
                    flags: v.flags,
                    affinity_timeout: v.affinity_timeout,
                    source_ranges: ranges.remove(&v.id).unwrap_or_default(),
                    backend_ids: ids,
                    maglev: maglev
                        .remove(&v.id)
                        .filter(|t| t.len() == v.maglev_size as usize && !t.contains(&0))
                        .unwrap_or_default(),
                    // Not pinned: a size other than the agent's must have
                    // come from an annotation.
                    maglev_override: (v.maglev_size != 0
                        && v.maglev_size != self.cfg.maglev_table_size)
                        .then_some(v.maglev_size),
                },
            );
        }
        let stale: Vec<SlotKey> = collect(m.slots.keys().map(|r| r.map(|k| (k, ()))), "SLOTS")?
            .into_iter()
            .map(|(k, ())| k)
            .filter(|k| !live_slots.contains(k))
            .collect();
        for k in stale {
            let _ = m.slots.remove(&k);
        }
        let ids: BTreeSet<u32> = self.frontends.values().map(|p| p.id).collect();
        let orphans: Vec<u32> = collect(m.revnat.keys().map(|r| r.map(|k| (k, ()))), "REVNAT")?
            .into_iter()
            .map(|(k, ())| k)
            .filter(|k| !ids.contains(k))
            .collect();
        for k in orphans {
            let _ = m.revnat.remove(&k);
        }
        if !self.frontends.is_empty() {
            info!(
                frontends = self.frontends.len(),
                backends = self.backends.len(),
                "adopted pinned state"
            );
        }
        Ok(())
    }

    fn backend_id(
        &mut self,
        b: &BackendAddr,
        proto: u8,
        stats: &mut ApplyStats,
    ) -> Result<u32, EbpfError> {
        let identity = BackendIdentity {
            addr: b.addr,
            port: b.port,
            proto,
        };
        let mut flags = 0;
        if b.terminating {
            flags |= backend_flags::TERMINATING;
        }
        if b.local {
            flags |= backend_flags::LOCAL;
        }
        let value = Backend::new(b.addr, b.port, proto, flags);
        let (id, is_new) = match self.backends.get(&identity) {
            Some((id, old)) if *old == value => return Ok(*id),
            Some((id, _)) => (*id, false),
            None => {
                let id = self.next_backend_id;
                self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
                (id, true)
            }
        };
        self.maps
            .backends
            .insert(id, value, 0)
            .map_err(|source| EbpfError::Update {
                map: "BACKENDS",
                op: "insert",
                frontend: format!("{}:{}", b.addr, b.port),
                source: Box::new(source),
            })?;
        self.backends.insert(identity, (id, value));
        if is_new {
            stats.backends_added += 1;
        }
        Ok(id)
    }

    fn upsert(
        &mut self,
        key: &FrontendKey,
        fe: &Frontend,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let proto = key.proto.number();
        if fe.backends.len() > proxy_common::MAX_BACKENDS_PER_SERVICE as usize {
            return Err(EbpfError::TooManyBackends(*key, fe.backends.len()));
        }
        let ids = fe
            .backends
            .iter()
            .map(|b| self.backend_id(b, proto, stats))
            .collect::<Result<Vec<u32>, _>>()?;
        let mut flags = kind_flags(fe.kind);
        if !fe.source_ranges.is_empty() {
            flags |= svc_flags::SOURCE_RANGES;
        }
        if fe.local_only {
            flags |= svc_flags::LOCAL_ONLY;
        }
        let update = |op: &'static str, map: &'static str| {
            let frontend = key.to_string();
            move |source| EbpfError::Update {
                map,
                op,
                frontend,
                source: Box::new(source),
            }
        };

        let maglev = self.maglev_table(key, fe, &ids);
        let (id, generation, old) = match self.frontends.get(key) {
            Some(p)
                if p.backend_ids == ids
                    && p.flags == flags
                    && p.affinity_timeout == fe.affinity_timeout
                    && p.source_ranges == fe.source_ranges
                    && p.maglev == maglev
                    && p.maglev_override == fe.maglev_table_size =>
            {
                return Ok(());
            }
            Some(p) => (p.id, 1 - p.generation, Some(p.clone())),
            None => {
                let id = self.next_frontend_id;
                self.next_frontend_id = self.next_frontend_id.wrapping_add(1).max(1);
                (id, 0, None)
            }
        };
        for (index, backend_id) in ids.iter().enumerate() {
            let slot = SlotKey {
                service_id: id,
                generation: generation as u16,
                index: index as u16,
            };
            self.maps
                .slots
                .insert(slot, *backend_id, 0)
                .map_err(update("insert", "SLOTS"))?;
        }
        if old.is_none() {
            let zero = PerCpuValues::try_from(vec![SvcStats::default(); nr_cpus_or_one()])
                .map_err(EbpfError::Cpus)?;
            self.maps
                .svc_stats
                .insert(id, zero, 0)
                .map_err(update("insert", "SVC_STATS"))?;
            let rev = RevNat {
                addr: u32::from_ne_bytes(key.addr.octets()),
                port: key.port.to_be(),
                _pad: 0,
            };
            self.maps
                .revnat
                .insert(id, rev, 0)
                .map_err(update("insert", "REVNAT"))?;
        }
        // Maglev slots that change (each flips atomically to a backend that
        // exists), before the service entry that may enable the table.
        let old_table = old
            .as_ref()
            .map(|o| o.maglev.as_slice())
            .unwrap_or_default();
        for (slot, backend_id) in maglev.iter().enumerate() {
            if old_table.get(slot) != Some(backend_id) {
                self.maps
                    .maglev
                    .insert(
                        MaglevKey {
                            service_id: id,
                            slot: slot as u32,
                        },
                        *backend_id,
                        0,
                    )
                    .map_err(update("insert", "MAGLEV_V4"))?;
            }
        }
        // Allowed ranges before the service entry that enables the check.
        for (addr, len) in &fe.source_ranges {
            self.maps
                .source_ranges
                .insert(&range_key(id, *addr, *len), 1, 0)
                .map_err(update("insert", "SRC_RANGES_V4"))?;
        }
        let value = ServiceValue {
            id,
            count: ids.len() as u16,
            generation,
            _pad0: 0,
            flags,
            _pad1: 0,
            affinity_timeout: fe.affinity_timeout,
            maglev_size: maglev.len() as u32,
        };
        self.maps
            .services
            .insert(ServiceKey::new(key.addr, key.port, proto), value, 0)
            .map_err(update("insert", "SERVICES"))?;
        if let Some(old) = old {
            self.delete_slots(old.id, old.generation, old.backend_ids.len());
            for (addr, len) in old
                .source_ranges
                .iter()
                .filter(|r| !fe.source_ranges.contains(r))
            {
                let _ = self.maps.source_ranges.remove(&range_key(id, *addr, *len));
            }
        }
        self.frontends.insert(
            *key,
            Programmed {
                id,
                generation,
                flags,
                affinity_timeout: fe.affinity_timeout,
                source_ranges: fe.source_ranges.clone(),
                backend_ids: ids,
                maglev,
                maglev_override: fe.maglev_table_size,
            },
        );
        stats.upserted += 1;
        Ok(())
    }

    /// The Maglev table (backend id per slot) of a north-south frontend;
    /// empty for ClusterIP frontends, with Maglev off, or without backends.
    fn maglev_table(&self, key: &FrontendKey, fe: &Frontend, ids: &[u32]) -> Vec<u32> {
        let m = fe.maglev_table_size.unwrap_or(self.cfg.maglev_table_size);
        if m == 0 || fe.kind == FrontendKind::ClusterIp || ids.is_empty() {
            return Vec::new();
        }
        let mut by_key = HashMap::new();
        let backends: Vec<MaglevBackend> = fe
            .backends
            .iter()
            .zip(ids)
            .map(|(b, id)| {
                let k = MaglevBackend::from_addr((b.addr, b.port), 1);
                by_key.insert(k.key.clone(), *id);
                k
            })
            .collect();
        match crate::maglev::build(&backends, m) {
            Ok(t) => t
                .slots
                .iter()
                .filter_map(|i| {
                    t.backends
                        .get(*i as usize)
                        .and_then(|k| by_key.get(k))
                        .copied()
                })
                .collect(),
            Err(e) => {
                warn!(frontend = %key, error = %e, "no Maglev table; random selection");
                Vec::new()
            }
        }
    }

    fn remove(&mut self, key: &FrontendKey, stats: &mut ApplyStats) -> Result<(), EbpfError> {
        let Some(p) = self.frontends.remove(key) else {
            return Ok(());
        };
        let skey = ServiceKey::new(key.addr, key.port, key.proto.number());
        match self.maps.services.remove(&skey) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(EbpfError::Update {
                    map: "SERVICES",
                    op: "delete",
                    frontend: key.to_string(),
                    source: Box::new(source),
                });
            }
        }
        self.delete_slots(p.id, p.generation, p.backend_ids.len());
        let _ = self.maps.revnat.remove(&p.id);
        let _ = self.maps.svc_stats.remove(&p.id);
        for (addr, len) in &p.source_ranges {
            let _ = self
                .maps
                .source_ranges
                .remove(&range_key(p.id, *addr, *len));
        }
        stats.removed += 1;
        Ok(())
    }

    fn delete_slots(&mut self, id: u32, generation: u8, count: usize) {
        for index in 0..count {
            let _ = self.maps.slots.remove(&SlotKey {
                service_id: id,
                generation: generation as u16,
                index: index as u16,
            });
        }
    }

    /// Delete backends no frontend references any more.
    fn release_backends(&mut self, stats: &mut ApplyStats) {
        let used: BTreeSet<u32> = self
            .frontends
            .values()
            .flat_map(|p| p.backend_ids.iter().copied())
            .collect();
        let unused: Vec<BackendIdentity> = self
            .backends
            .iter()
            .filter(|(_, (id, _))| !used.contains(id))
            .map(|(k, _)| *k)
            .collect();
        for k in unused {
            if let Some((id, _)) = self.backends.remove(&k) {
                let _ = self.maps.backends.remove(&id);
                self.removed_backends.insert(id);
                stats.backends_removed += 1;
            }
        }
    }

    fn attach_devices(&mut self) -> Result<(), EbpfError> {
        let present = interfaces().map_err(EbpfError::Interfaces)?;
        // Forget interfaces that vanished or were recreated (the kernel
        // detached their programs); their pins go too.
        let gone: Vec<String> = self
            .attached
            .iter()
            .filter(|(name, a)| present.get(*name) != Some(&a.ifindex))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(a) = self.attached.remove(&name) {
                a.links.into_iter().for_each(links::unpin);
                debug!(iface = %name, "interface gone");
            }
        }
        let dir = links_dir(&self.cfg.bpffs_path);
        for (name, ifindex) in &present {
            if self.attached.contains_key(name)
                || !self.cfg.pod_devices.iter().any(|g| glob_match(g, name))
            {
                continue;
            }
            let mut pinned = Vec::with_capacity(TC_PROGRAMS.len());
            for (prog_name, direction, dir_name) in TC_PROGRAMS {
                let prog: &mut SchedClassifier = program(&mut self.ebpf, prog_name)?;
                let pin = dir.join(format!("tc-{name}-{dir_name}"));
                match links::attach_tc(prog, name, direction, &pin) {
                    Ok(l) => pinned.push(l),
                    // The interface may have vanished between listing and
                    // attaching; report and retry on the next pass.
                    Err(source) => warn!(
                        error = %EbpfError::Attach { program: prog_name, source },
                        "attach failed"
                    ),
                }
            }
            if pinned.len() == TC_PROGRAMS.len() {
                info!(iface = %name, "attached tc programs");
                self.attached.insert(
                    name.clone(),
                    Attached {
                        ifindex: *ifindex,
                        links: pinned,
                    },
                );
            } else {
                pinned.into_iter().for_each(links::unpin);
            }
        }
        // Pins of interfaces that no longer exist (left by an earlier agent).
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if let Some(rest) = file.strip_prefix("tc-")
                    && let Some((iface, _)) = rest.rsplit_once('-')
                    && !present.contains_key(iface)
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

fn nr_cpus_or_one() -> usize {
    nr_cpus().map(|n| n.max(1)).unwrap_or(1)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(EbpfError::MissingProgram { name })?
        .try_into()
        .map_err(|source| EbpfError::Program {
            name,
            source: Box::new(source),
        })
}

impl Dataplane for EbpfDataplane {
    type Error = EbpfError;

    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn programmed(&self) -> LbTable {
        let by_id: HashMap<u32, &Backend> =
            self.backends.values().map(|(id, b)| (*id, b)).collect();
        let mut lb = LbTable::default();
        for (k, p) in &self.frontends {
            let backends = p
                .backend_ids
                .iter()
                .filter_map(|id| by_id.get(id))
                .map(|b| BackendAddr {
                    addr: b.ip(),
                    port: b.host_port(),
                    terminating: b.flags & backend_flags::TERMINATING != 0,
                    local: b.flags & backend_flags::LOCAL != 0,
                })
                .collect();
            lb.frontends.insert(
                *k,
                Frontend {
                    kind: flags_kind(p.flags),
                    backends,
                    affinity_timeout: p.affinity_timeout,
                    source_ranges: p.source_ranges.clone(),
                    maglev_table_size: p.maglev_override,
                    local_only: p.flags & svc_flags::LOCAL_ONLY != 0,
                },
            );
        }
        lb
    }

    fn apply(&mut self, changes: &[Change]) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        let mut first_error = None;
        let mut failed = 0usize;
        for change in changes {
            // One bad frontend must not stop the others.
            let r = match change {
                Change::Upsert(k, f) => self.upsert(k, f, &mut stats),
                Change::Remove(k) => self.remove(k, &mut stats),
            };
            if let Err(e) = r {
                // A full map fails every frontend after it: a few lines
                // and a count, not one line per frontend per retry.
                if failed < 3 {
                    warn!(error = %e, "programming a frontend failed");
                }
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        if failed > 3 {
            warn!(
                failed,
                of = changes.len(),
                "programming frontends failed (first 3 logged)"
            );
        }
        self.release_backends(&mut stats);
        match first_error {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    fn housekeeping(&mut self) -> Result<(), EbpfError> {
        self.attach_devices()?;
        if self.last_gc.elapsed() >= self.cfg.ct_gc_interval || !self.removed_backends.is_empty() {
            self.sweep_conntrack()?;
        }
        Ok(())
    }

    fn stats_reader(&self) -> Option<Box<dyn super::StatsReader>> {
        // Its own handles on the pinned maps: reads need no access to the
        // dataplane the sync loop owns.
        match Maps::open_pinned(&self.cfg.bpffs_path) {
            Ok(maps) => Some(Box::new(maps)),
            Err(e) => {
                warn!(error = %e, "no map statistics for /metrics");
                None
            }
        }
    }
}

fn range_key(id: u32, addr: Ipv4Addr, len: u8) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + u32::from(len),
        SourceRangeKey {
            service_id_be: id.to_be(),
            addr: u32::from_ne_bytes(addr.octets()),
        },
    )
}

fn kind_flags(kind: FrontendKind) -> u16 {
    match kind {
        FrontendKind::ClusterIp => svc_flags::CLUSTER_IP,
        FrontendKind::NodePort => svc_flags::NODE_PORT,
        FrontendKind::ExternalIp => svc_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => svc_flags::LOAD_BALANCER,
    }
}

fn flags_kind(flags: u16) -> FrontendKind {
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

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, EbpfError> {
    iter.collect::<Result<Vec<_>, _>>()
        .map_err(|source| EbpfError::Update {
            map,
            op: "iterate",
            frontend: "(adopting pinned state)".to_owned(),
            source: Box::new(source),
        })
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// The interface holding IPv4 address `ip` in this network namespace.
pub fn interface_with_address(ip: Ipv4Addr) -> io::Result<Option<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut p = head;
    // SAFETY: walking the list getifaddrs returned; addresses of family
    // AF_INET are sockaddr_in.
    unsafe {
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = a as *const libc::sockaddr_in;
                let addr = Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr));
                if addr == ip && !(*p).ifa_name.is_null() {
                    found = Some(CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned());
                    break;
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(found)
}

/// Interfaces of this network namespace: name -> ifindex.
fn interfaces() -> io::Result<HashMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // or null on error; it is freed with if_freenameindex below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut p = head;
    // SAFETY: walking the array up to its terminator; names are C strings.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1a2b3c4d"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("lxc*x", "lxc12x"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }
}
