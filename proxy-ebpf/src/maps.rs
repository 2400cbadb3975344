//! The maps, declared once with the names and layouts from `proxy-common`.
//! All are pinned by name so a restarted agent finds them again.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtValue, FragKey, FragValue, MAX_AFFINITY,
    MAX_BACKENDS, MAX_CONNTRACK, MAX_FRAGMENTS, MAX_MAGLEV_SLOTS, MAX_SERVICES, MAX_SLOTS,
    MAX_SOCK_REVNAT, MAX_SOURCE_RANGES, MaglevKey, RevNat, ServiceKey, ServiceValue, SlotKey,
    SockRevNatKey, SockRevNatValue, SourceRangeKey, SvcStats, stat,
};

#[map(name = "SVC_V4")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "SLOTS_V4")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(MAX_SLOTS, 0);

#[map(name = "BACKENDS_V4")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

#[map(name = "REVNAT_V4")]
pub static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "CT_V4")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CONNTRACK, 0);

#[map(name = "AFFINITY_V4")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

#[map(name = "SOCK_RNAT_V4")]
pub static SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::pinned(MAX_SOCK_REVNAT, 0);

#[map(name = "SVC_STATS")]
pub static SVC_STATS: PerCpuHashMap<u32, SvcStats> = PerCpuHashMap::pinned(MAX_SERVICES, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "SRC_RANGES_V4")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(MAX_SOURCE_RANGES, 0);

#[map(name = "MAGLEV_V4")]
pub static MAGLEV: HashMap<MaglevKey, u32> =
    HashMap::pinned(MAX_MAGLEV_SLOTS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "FRAGS_V4")]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(MAX_FRAGMENTS, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

/// Bump a per-CPU counter (no atomics needed: the slot is this CPU's).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, valid pointer from a successful lookup.
        unsafe { *c += 1 };
    }
}

/// Account one translated packet (or connection) of `bytes` to a frontend.
/// The agent creates the entry with the frontend; if it is missing the
/// packet simply goes uncounted.
#[inline(always)]
pub fn account(service_id: u32, bytes: u64) {
    if let Some(s) = SVC_STATS.get_ptr_mut(&service_id) {
        // SAFETY: per-CPU value, valid pointer from a successful lookup.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}
