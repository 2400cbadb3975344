//! The maps, declared from their `proxy-common` descriptors.
//! All are pinned by name so a restarted agent finds them again.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityMatchKey, AffinityValue, Backend, Backend6, Config, CtKey,
    CtKey6, CtValue, FragKey, FragKey6, FragValue, MaglevKey, RevNat, RevNat6, ServiceKey,
    ServiceKey6, ServiceValue, SlotKey, SockRevNatKey, SockRevNatKey6, SockRevNatValue,
    SockRevNatValue6, SourceRangeKey, SvcStats, maps as def, reply_dst_slot, str_eq,
};

/// Declares a map static from its `proxy_common::maps` descriptor. The
/// `#[map(name)]` attribute needs a literal: it is checked against the
/// descriptor's name at compile time.
macro_rules! map_from_def {
    ($name:literal, $static:ident: $ty:ty = $def:expr) => {
        const _: () = assert!(str_eq($name, $def.name));
        #[map(name = $name)]
        pub static $static: $ty = <$ty>::pinned($def.max_entries, $def.flags);
    };
}

map_from_def!("SVC_V4", SERVICES: HashMap<ServiceKey, ServiceValue> = def::SERVICES);
map_from_def!("SLOTS_V4", SLOTS: HashMap<SlotKey, u32> = def::SLOTS);
map_from_def!("BACKENDS_V4", BACKENDS: HashMap<u32, Backend> = def::BACKENDS);
map_from_def!("REVNAT_V4", REVNAT: HashMap<u32, RevNat> = def::REVNAT);
map_from_def!("CT_V4", CONNTRACK: LruHashMap<CtKey, CtValue> = def::CONNTRACK);
map_from_def!("AFFINITY_V4", AFFINITY: LruHashMap<AffinityKey, AffinityValue> = def::AFFINITY);
map_from_def!("AFF_MATCH_V4", AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> = def::AFFINITY_MATCH);
map_from_def!("SOCK_RNAT_V4", SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> = def::SOCK_REVNAT);
map_from_def!("SVC_STATS", SVC_STATS: PerCpuHashMap<u32, SvcStats> = def::SVC_STATS);
map_from_def!("CONFIG", CONFIG: Array<Config> = def::CONFIG);
map_from_def!("SRC_RANGES_V4", SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = def::SOURCE_RANGES);
map_from_def!("MAGLEV_V4", MAGLEV: HashMap<MaglevKey, u32> = def::MAGLEV);
map_from_def!("FRAGS_V4", FRAGMENTS: LruHashMap<FragKey, FragValue> = def::FRAGMENTS);
map_from_def!("REPLY_DSTS", REPLY_DSTS: Array<u8> = def::REPLY_DSTS);
map_from_def!("SVC_V6", SERVICES6: HashMap<ServiceKey6, ServiceValue> = def::SERVICES6);
map_from_def!("BACKENDS_V6", BACKENDS6: HashMap<u32, Backend6> = def::BACKENDS6);
map_from_def!("SOCK_RNAT_V6", SOCK_REVNAT6: LruHashMap<SockRevNatKey6, SockRevNatValue6> = def::SOCK_REVNAT6);
map_from_def!("CT_V6", CONNTRACK6: LruHashMap<CtKey6, CtValue> = def::CONNTRACK6);
map_from_def!("REVNAT_V6", REVNAT6: HashMap<u32, RevNat6> = def::REVNAT6);
map_from_def!("AFFINITY_V6", AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = def::AFFINITY6);
map_from_def!("FRAGS_V6", FRAGMENTS6: LruHashMap<FragKey6, FragValue> = def::FRAGMENTS6);
map_from_def!("STATS", STATS: PerCpuArray<u64> = def::STATS);

/// Record that a conntrack REPLY entry addressed to `daddr` is about to be
/// written (before it is): see `proxy_common::reply_dst_slot` (an IPv6
/// address is folded to one word first, `tuple::Addr::fold`: one slot set
/// for both families). A set slot
/// is left alone (no store, its cache line stays clean).
#[inline(always)]
pub fn note_reply_dst(daddr: u32) {
    if let Some(p) = REPLY_DSTS.get_ptr_mut(reply_dst_slot(daddr)) {
        // SAFETY: valid pointer from a successful lookup; a racing store
        // writes the same 1.
        unsafe {
            if *p == 0 {
                *p = 1;
            }
        }
    }
}

/// Whether some conntrack REPLY entry may be addressed to `daddr` (one
/// array lookup, inlined by the verifier: no helper call).
#[inline(always)]
pub fn may_be_reply_dst(daddr: u32) -> bool {
    REPLY_DSTS
        .get(reply_dst_slot(daddr))
        .is_none_or(|v| *v != 0)
}

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
    if let Some(s) = SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value, valid pointer from a successful lookup.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}
