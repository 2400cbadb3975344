//! Loading the object and attaching its programs (pinned links).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    net::Ipv4Addr,
    path::Path,
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier, TcAttachType, Xdp},
    util::nr_cpus,
};
use proxy_common::progs;
use tracing::{debug, info, warn};

use super::{
    Attached, EBPF_OBJECT, EbpfConfig, EbpfDataplane, EbpfError,
    conntrack::GcStats,
    interfaces::{glob_match, interfaces},
    links, links_dir,
    maglev_tables::MaglevTables,
    maps::{Maps, check_pinned, pin_dir},
    resize,
};

const TC_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (progs::TC_FROM_POD, TcAttachType::Ingress, "ingress"),
    (progs::TC_TO_POD, TcAttachType::Egress, "egress"),
];
const NETDEV_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    (progs::TC_FROM_NETDEV, TcAttachType::Ingress, "ingress"),
    (progs::TC_TO_NETDEV, TcAttachType::Egress, "egress"),
];
const SOCK_PROGRAMS: [&str; 8] = [
    progs::SOCK_CONNECT4,
    progs::SOCK_SENDMSG4,
    progs::SOCK_RECVMSG4,
    progs::SOCK_GETPEERNAME4,
    progs::SOCK_CONNECT6,
    progs::SOCK_SENDMSG6,
    progs::SOCK_RECVMSG6,
    progs::SOCK_GETPEERNAME6,
];

/// The object's loader, made before the agent lists the cluster: aya
/// parses the kernel's BTF (`/sys/kernel/btf/vmlinux`, about 14 MB while
/// it lasts) when a loader is made, and that must not pile onto the cache.
/// The BTF serves CO-RE relocations only, and the object has none (checked
/// on the object itself: [`needs_kernel_btf`]), so it goes at once.
pub struct Loader(EbpfLoader<'static>);

impl Loader {
    pub fn new() -> Loader {
        let mut loader = EbpfLoader::new();
        if needs_kernel_btf(EBPF_OBJECT) {
            debug!("the eBPF object has CO-RE relocations: kernel BTF kept for the load");
        } else {
            loader.btf(None);
        }
        Loader(loader)
    }
}

impl Default for Loader {
    fn default() -> Self {
        Loader::new()
    }
}

/// Whether an eBPF ELF object has CO-RE relocations (the `core_relo`
/// part of its `.BTF.ext`), which need the kernel's BTF. True when the
/// object cannot be read as expected (the safe answer).
pub fn needs_kernel_btf(obj: &[u8]) -> bool {
    core_relocations(obj).is_none_or(|n| n > 0)
}

/// Length of the `core_relo` part of the `.BTF.ext` section of a 64-bit
/// little-endian ELF (0: none, or no `.BTF.ext`); None: not readable.
fn core_relocations(obj: &[u8]) -> Option<u32> {
    let u16_at =
        |o: usize| -> Option<u16> { Some(u16::from_le_bytes(obj.get(o..o + 2)?.try_into().ok()?)) };
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(obj.get(o..o + 4)?.try_into().ok()?)) };
    let u64_at = |o: usize| -> Option<usize> {
        usize::try_from(u64::from_le_bytes(obj.get(o..o + 8)?.try_into().ok()?)).ok()
    };
    // ELFCLASS64, ELFDATA2LSB.
    if obj.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(at)?, u64_at(at + 0x18)?, u64_at(at + 0x20)?))
    };
    let (_, strtab, strtab_len) = section(shstrndx)?;
    let names = obj.get(strtab..strtab.checked_add(strtab_len)?)?;
    for i in 0..shnum {
        let (name, offset, _) = section(i)?;
        let name = names.get(name as usize..)?;
        if name.starts_with(b".BTF.ext\0") {
            // btf_ext_header: magic u16, version u8, flags u8, hdr_len u32,
            // func_info off/len, line_info off/len, then (hdr_len >= 32)
            // core_relo off/len.
            let hdr_len = u32_at(offset + 4)?;
            return if hdr_len >= 32 {
                u32_at(offset + 28)
            } else {
                Some(0)
            };
        }
    }
    Some(0)
}

/// Create `path` (and missing parents: `--bpffs-path` itself when new)
/// readable by root only, and make an existing `path` so: a pinned map's
/// directory mode is all that stands between another local process and the
/// load balancer's state. An existing parent keeps its mode (it may be the
/// bpffs root).
fn private_dir(path: &Path) -> Result<(), EbpfError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| EbpfError::PinDir {
        path: path.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(err)
}

impl EbpfDataplane {
    /// Load the programs, open (or create) the pinned maps and adopt what an
    /// earlier agent programmed there.
    pub fn load(cfg: EbpfConfig) -> Result<EbpfDataplane, EbpfError> {
        Self::load_with(cfg, Loader::new())
    }

    /// [`Self::load`] with a loader made earlier (see [`Loader`]).
    pub fn load_with(cfg: EbpfConfig, loader: Loader) -> Result<EbpfDataplane, EbpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(EbpfError::NoObject);
        }
        let dir = pin_dir(&cfg.bpffs_path);
        private_dir(&dir)?;
        // Every map from its descriptor: its capacity, and a pin of the
        // same layout to adopt.
        let mut loader = loader.0;
        loader.default_map_pin_directory(&dir);
        let mut grown = Vec::new();
        for info in &proxy_common::maps::ALL {
            let want = cfg.max_entries(info);
            match check_pinned(&dir, info)? {
                Some(pinned) if pinned < want => {
                    // Grown: a new map replaces the pin, and takes its
                    // entries (below) before any program uses it.
                    let old = resize::unpin(&dir, info)?;
                    warn!(
                        map = info.name,
                        pinned,
                        configured = want,
                        "map is pinned with a smaller capacity: recreated with the new one, entries copied"
                    );
                    grown.push((info, old));
                }
                Some(pinned) if pinned > want => info!(
                    map = info.name,
                    pinned,
                    configured = want,
                    "map is pinned with a larger capacity: kept (shrinking could drop entries); `proxy --cleanup` applies the smaller one"
                ),
                _ => {}
            }
            loader.map_max_entries(info.name, want);
        }
        let loaded = loader.load(EBPF_OBJECT);
        drop(loader);
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                // Put the old maps back where they were.
                for (info, old) in &grown {
                    resize::repin(&dir, info, old);
                }
                return Err(EbpfError::Load(Box::new(e)));
            }
        };
        for (info, old) in &grown {
            resize::copy_into(&mut ebpf, info, old)?;
        }
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                debug!(error = %e, "no eBPF log buffer");
                None
            }
        };
        // Every program is verified here, before anything is attached.
        let failed = |name: &'static str| {
            move |source| EbpfError::Program {
                name,
                source: Box::new(source),
            }
        };
        for (name, _, _) in TC_PROGRAMS.into_iter().chain(NETDEV_PROGRAMS) {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(failed(name))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(failed(name))?;
        }
        let prog: &mut CgroupSock = program(&mut ebpf, progs::SOCK_RELEASE)?;
        prog.load().map_err(failed(progs::SOCK_RELEASE))?;
        let prog: &mut Xdp = program(&mut ebpf, progs::XDP_NODEPORT)?;
        prog.load().map_err(failed(progs::XDP_NODEPORT))?;
        let links = links_dir(&cfg.bpffs_path);
        private_dir(&links)?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let capacities = maps.capacities()?.into_iter().collect();
        let mut dp = EbpfDataplane {
            ebpf,
            maps,
            cfg,
            frontends: HashMap::new(),
            table: crate::lb::LbTable::default(),
            backends: Default::default(),
            unreferenced: HashSet::new(),
            capacities,
            insert_failures: Default::default(),
            swept_ct: Default::default(),
            map_events: Vec::new(),
            next_frontend_id: 1,
            next_backend_id: 1,
            attached: HashMap::new(),
            socket_links: Vec::new(),
            xdp_links: Vec::new(),
            removed_backends: HashSet::new(),
            removed_frontends: HashSet::new(),
            maglev_tables: MaglevTables::new(),
            node_addr: None,
            pod_net_frontends: BTreeSet::new(),
            config: None,
            last_gc: Instant::now(),
            last_gc_stats: GcStats::default(),
            sock_destroyer: super::stale_sockets::Destroyer::Off,
            sock_destroy_counters: Default::default(),
            netns_failure_logged: false,
            _logger: logger,
        };
        dp.sock_destroyer = super::stale_sockets::Destroyer::load(&dp);
        dp.adopt()?;
        dp.table = dp.table_from_maps();
        dp.count_backend_refs();
        dp.pod_net_frontends = dp
            .frontends
            .keys()
            .filter(|k| dp.in_pod_network(k.addr))
            .copied()
            .collect();
        // The node address an earlier agent wrote stays until the Node says
        // otherwise; the pod networks are this agent's.
        dp.node_addr = dp.maps.config.get(&0, 0).ok().and_then(|c| c.node_ip());
        dp.write_config()?;
        dp.socket_lb()?;
        dp.remove_other_layouts();
        Ok(dp)
    }

    /// Maps pinned by an agent of another layout version are not ours to
    /// reuse; their pins go (programs still using them keep them alive
    /// until their links are replaced).
    pub(super) fn remove_other_layouts(&self) {
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
    pub(super) fn socket_lb(&mut self) -> Result<(), EbpfError> {
        let dir = links_dir(&self.cfg.bpffs_path);
        let Some(cgroup) = self.cfg.socket_lb_cgroup.clone() else {
            for name in SOCK_PROGRAMS.into_iter().chain([progs::SOCK_RELEASE]) {
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
        // A closing socket's reverse entry goes with it.
        let name = progs::SOCK_RELEASE;
        let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
        let link = links::attach_cgroup(prog, &fd, name, &dir.join(format!("cgroup-{name}")))
            .map_err(|source| EbpfError::Attach {
                program: name,
                source,
            })?;
        self.socket_links.push(link);
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
        self.set_node_address(node_addr)?;
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

    pub(super) fn attach_devices(&mut self) -> Result<(), EbpfError> {
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

/// Possible CPUs (per-CPU values have one slot each), read once: every new
/// frontend's zeroed counters need it.
pub(super) fn nr_cpus_or_one() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| nr_cpus().map(|n| n.max(1)).unwrap_or(1))
}

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_object_needs_no_kernel_btf() {
        // CO-RE relocations would need the kernel's BTF at load (kept then,
        // at a memory cost: see `Loader`).
        if !EBPF_OBJECT.is_empty() {
            assert_eq!(core_relocations(EBPF_OBJECT), Some(0));
        }
        assert!(needs_kernel_btf(b"not an ELF object"));
        assert!(needs_kernel_btf(b"\x7fELF\x02\x01 truncated"));
    }
}
