//! Userspace conntrack maintenance: idle timeouts by protocol and TCP state
//! (the kernel side only stamps `last_seen_ns`; the LRU evicts under
//! pressure), and flushing entries that point at removed backends so a
//! replaced UDP backend does not keep receiving a flow (kube-proxy's
//! conntrack cleanup). The same for both families' maps (`CT_V4`,
//! `CT_V6`: one value type, keys differing in the address width).

use std::collections::HashSet;

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use proxy_common::{CtKey, CtKey6, CtValue, ct_flags, ct_timeout, proto};

/// A conntrack key of either family: what the sweep needs of it.
pub trait CtKeyOf: Pod {
    fn proto(&self) -> u8;
}

impl CtKeyOf for CtKey {
    fn proto(&self) -> u8 {
        self.proto
    }
}

impl CtKeyOf for CtKey6 {
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// Idle timeouts in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: u64,
    pub tcp_syn: u64,
    pub tcp_closing: u64,
    pub other: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: ct_timeout::TCP_ESTABLISHED,
            tcp_syn: ct_timeout::TCP_SYN,
            tcp_closing: ct_timeout::TCP_CLOSING,
            other: ct_timeout::OTHER,
        }
    }
}

impl Timeouts {
    /// The idle timeout of an entry, in nanoseconds.
    pub fn for_entry(&self, key: &impl CtKeyOf, value: &CtValue) -> u64 {
        let s = if key.proto() != proto::TCP {
            self.other
        } else if value.flags & (ct_flags::TCP_FIN | ct_flags::TCP_RST) != 0 {
            self.tcp_closing
        } else if value.flags & ct_flags::TCP_ESTABLISHED != 0 {
            self.tcp_established
        } else {
            self.tcp_syn
        };
        s.saturating_mul(1_000_000_000)
    }
}

/// What a maintenance pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub scanned: usize,
    pub expired: usize,
    pub flushed: usize,
    pub remaining: usize,
}

impl GcStats {
    /// Both families' passes together.
    pub fn and(self, o: GcStats) -> GcStats {
        GcStats {
            scanned: self.scanned + o.scanned,
            expired: self.expired + o.expired,
            flushed: self.flushed + o.flushed,
            remaining: self.remaining + o.remaining,
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// One pass: delete entries idle past their timeout, and entries whose
/// backend is in `removed_backends`.
pub fn sweep<K: CtKeyOf>(
    ct: &mut HashMap<MapData, K, CtValue>,
    now_ns: u64,
    timeouts: &Timeouts,
    removed_backends: &HashSet<u32>,
) -> Result<GcStats, MapError> {
    let mut stats = GcStats::default();
    let mut doomed = Vec::new();
    for entry in ct.iter() {
        let (k, v) = match entry {
            Ok(e) => e,
            // An entry evicted while iterating: not an error.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e),
        };
        stats.scanned += 1;
        if removed_backends.contains(&v.backend_id) {
            stats.flushed += 1;
            doomed.push(k);
        } else if now_ns.saturating_sub(v.last_seen_ns) > timeouts.for_entry(&k, &v) {
            stats.expired += 1;
            doomed.push(k);
        }
    }
    for k in &doomed {
        match ct.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    stats.remaining = stats.scanned - doomed.len();
    Ok(stats)
}

/// Entries of `ct` that are not idle past their timeout at `now_ns` (what
/// a sweep would leave): the flows an earlier agent's conntrack holds,
/// for `auto` sizing at start.
pub fn live<K: CtKeyOf>(
    ct: &HashMap<MapData, K, CtValue>,
    now_ns: u64,
    timeouts: &Timeouts,
) -> Result<u64, MapError> {
    let mut n = 0u64;
    for entry in ct.iter() {
        let (k, v) = match entry {
            Ok(e) => e,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e),
        };
        if now_ns.saturating_sub(v.last_seen_ns) <= timeouts.for_entry(&k, &v) {
            n += 1;
        }
    }
    Ok(n)
}

/// The live entries (see [`live`]) of the conntrack map `name` pinned
/// under `bpffs_path` (None: none pinned, a first start).
fn pinned_live_of<K: CtKeyOf>(
    bpffs_path: &std::path::Path,
    name: &str,
    timeouts: &Timeouts,
) -> Result<Option<u64>, MapError> {
    let path = super::maps::pin_dir(bpffs_path).join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path)?;
    let ct: HashMap<MapData, K, CtValue> = HashMap::try_from(aya::maps::Map::from_map_data(data)?)?;
    live(&ct, monotonic_ns(), timeouts).map(Some)
}

/// The live entries of both families' pinned conntrack maps together
/// (they share `--bpf-ct-map-max`; None: none pinned, a first start).
pub fn pinned_live(
    bpffs_path: &std::path::Path,
    timeouts: &Timeouts,
) -> Result<Option<u64>, MapError> {
    let v4 = pinned_live_of::<CtKey>(bpffs_path, proxy_common::maps::CONNTRACK.name, timeouts)?;
    let v6 = pinned_live_of::<CtKey6>(bpffs_path, proxy_common::maps::CONNTRACK6.name, timeouts)?;
    Ok(match (v4, v6) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u8) -> CtKey {
        CtKey {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto: p,
            dir: 0,
            _pad: 0,
        }
    }

    fn value(flags: u32) -> CtValue {
        CtValue {
            last_seen_ns: 0,
            backend_id: 1,
            service_id: 1,
            flags,
            _pad: 0,
            nat_addr: 0,
            nat_port: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn timeouts_follow_protocol_and_tcp_state() {
        let t = Timeouts::default();
        let s = 1_000_000_000;
        assert_eq!(t.for_entry(&key(17), &value(0)), ct_timeout::OTHER * s);
        assert_eq!(
            t.for_entry(&key(6), &value(ct_flags::TCP_SYN)),
            ct_timeout::TCP_SYN * s
        );
        assert_eq!(
            t.for_entry(
                &key(6),
                &value(ct_flags::TCP_SYN | ct_flags::TCP_ESTABLISHED)
            ),
            ct_timeout::TCP_ESTABLISHED * s
        );
        assert_eq!(
            t.for_entry(
                &key(6),
                &value(ct_flags::TCP_ESTABLISHED | ct_flags::TCP_FIN)
            ),
            ct_timeout::TCP_CLOSING * s
        );
    }
}
