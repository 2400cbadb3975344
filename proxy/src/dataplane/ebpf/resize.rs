//! Growing a pinned map at start, so a restart with larger capacities
//! (flags, or `auto` after the cluster grew) takes effect without
//! `--cleanup` and without a gap in service.
//!
//! The smaller map's pin is removed before the object loads ([`unpin`]):
//! the map itself lives on through the handle kept here and through the
//! programs still attached by the earlier agent, which keep serving from
//! it. The loader creates and pins the larger map, and [`copy_into`]
//! copies every entry over before any new program is attached (attaching
//! comes after loading). If loading fails, [`repin`] puts the old map back.
//! Shrinking is never done this way (entries could not all fit): a pinned
//! map larger than asked for is kept.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{Ebpf, maps::MapData};
use proxy_common::{MapInfo, MapKind};
use tracing::{info, warn};

use super::{EbpfError, load::nr_cpus_or_one, maps::MapsError};

/// A map whose pin was removed to make room for a larger one.
pub struct OldMap {
    data: MapData,
    path: PathBuf,
}

fn open_error(info: &MapInfo, path: &Path, source: aya::maps::MapError) -> EbpfError {
    EbpfError::Maps(MapsError::Open {
        name: info.name,
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// Keep a handle on the pinned map `info` and remove its pin.
pub fn unpin(dir: &Path, info: &MapInfo) -> Result<OldMap, EbpfError> {
    let path = dir.join(info.name);
    let data = MapData::from_pin(&path).map_err(|e| open_error(info, &path, e))?;
    fs::remove_file(&path).map_err(|e| open_error(info, &path, aya::maps::MapError::IoError(e)))?;
    Ok(OldMap { data, path })
}

/// Pin the old map again (loading the object failed).
pub fn repin(dir: &Path, info: &MapInfo, old: &OldMap) {
    let path = dir.join(info.name);
    let _ = fs::remove_file(&path);
    if let Err(e) = old.data.pin(&path) {
        warn!(map = info.name, path = %old.path.display(), error = %e, "cannot pin the old map again");
    }
}

/// Copy every entry of `old` into the map `info` of the loaded object.
pub fn copy_into(ebpf: &mut Ebpf, info: &MapInfo, old: &OldMap) -> Result<u64, EbpfError> {
    let Some(new) = ebpf.map(info.name) else {
        return Err(EbpfError::Maps(MapsError::Missing { name: info.name }));
    };
    let new_fd = match new {
        aya::maps::Map::HashMap(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::PerCpuHashMap(d)
        | aya::maps::Map::LpmTrie(d) => d.fd().as_fd().as_raw_fd(),
        _ => return Ok(0),
    };
    let key_size = info.key_size as usize + if info.kind == MapKind::LpmTrie { 4 } else { 0 };
    let value_size = match info.kind {
        // Per-CPU values: one 8-byte-aligned slot per possible CPU.
        MapKind::PerCpuHash | MapKind::PerCpuArray => {
            (info.value_size as usize).next_multiple_of(8) * nr_cpus_or_one()
        }
        _ => info.value_size as usize,
    };
    let old_fd = old.data.fd().as_fd().as_raw_fd();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut first = true;
    let mut copied = 0u64;
    let failed = |op: &'static str, e: std::io::Error| {
        EbpfError::Maps(MapsError::Op {
            name: info.name,
            op,
            source: Box::new(aya::maps::MapError::IoError(e)),
        })
    };
    loop {
        let k = if first { None } else { Some(key.as_slice()) };
        match bpf_elem(BPF_MAP_GET_NEXT_KEY, old_fd, k, next.as_mut_ptr() as u64, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(failed("copy: next key", e)),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        match bpf_elem(
            BPF_MAP_LOOKUP_ELEM,
            old_fd,
            Some(&key),
            value.as_mut_ptr() as u64,
            0,
        ) {
            Ok(()) => {}
            // Gone meanwhile (conntrack GC of the running programs).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(failed("copy: lookup", e)),
        }
        bpf_elem(
            BPF_MAP_UPDATE_ELEM,
            new_fd,
            Some(&key),
            value.as_ptr() as u64,
            0,
        )
        .map_err(|e| failed("copy: update", e))?;
        copied += 1;
    }
    info!(
        map = info.name,
        entries = copied,
        "copied into the grown map"
    );
    Ok(copied)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One element command on map `fd`: `key` (None: null, "the first key"
/// for GET_NEXT_KEY) and `value` (the value or next-key buffer).
fn bpf_elem(
    cmd: libc::c_long,
    fd: i32,
    key: Option<&[u8]>,
    value: u64,
    flags: u64,
) -> std::io::Result<()> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value,
        flags,
    };
    // SAFETY: the element commands read the map's key size at `key` and
    // read or write its value size (next key: key size) at `value`; the
    // callers' buffers have exactly those sizes and outlive the call;
    // `attr` has the commands' layout of `union bpf_attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
