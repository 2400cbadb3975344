//! Backend selection shared by the per-packet and the socket paths.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    AffinityKey, AffinityKey6, AffinityMatchKey, AffinityValue, Backend, Backend6, Ip6,
    MAGLEV_FLOW_SEED, MaglevKey, ServiceValue, SlotKey, stat,
};

use crate::{
    error::Error,
    maps::{AFFINITY, AFFINITY_MATCH, AFFINITY6, BACKENDS, BACKENDS6, MAGLEV, SLOTS, count},
    tuple::{Addr, Tuple},
};

/// The backend map of an address family, implemented on its address type.
/// Backend ids are one space across both families; a frontend's slots
/// hold ids of its own family's backends only.
pub trait Backends: Sized {
    type Backend: Copy;
    fn backend(id: u32) -> Option<Self::Backend>;
    /// The backend's address and port (network order).
    fn backend_addr(b: &Self::Backend) -> (Self, u16);
}

impl Backends for u32 {
    type Backend = Backend;
    #[inline(always)]
    fn backend(id: u32) -> Option<Backend> {
        // SAFETY: copied out at once.
        unsafe { BACKENDS.get(id) }.copied()
    }
    #[inline(always)]
    fn backend_addr(b: &Backend) -> (u32, u16) {
        (b.addr, b.port)
    }
}

impl Backends for Ip6 {
    type Backend = Backend6;
    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: copied out at once.
        unsafe { BACKENDS6.get(id) }.copied()
    }
    #[inline(always)]
    fn backend_addr(b: &Backend6) -> (Ip6, u16) {
        (b.addr, b.port)
    }
}

/// A session-affinity key and the map it keys: `AFFINITY_V4` (socket path,
/// per-packet IPv4) or `AFFINITY_V6` (per-packet IPv6).
pub trait Affinity: Copy {
    fn get_ptr_mut(&self) -> Option<*mut AffinityValue>;
    fn insert(&self, v: &AffinityValue);
}

impl Affinity for AffinityKey {
    #[inline(always)]
    fn get_ptr_mut(&self) -> Option<*mut AffinityValue> {
        AFFINITY.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert(&self, v: &AffinityValue) {
        let _ = AFFINITY.insert(self, v, 0);
    }
}

impl Affinity for AffinityKey6 {
    #[inline(always)]
    fn get_ptr_mut(&self) -> Option<*mut AffinityValue> {
        AFFINITY6.get_ptr_mut(self)
    }
    #[inline(always)]
    fn insert(&self, v: &AffinityValue) {
        let _ = AFFINITY6.insert(self, v, 0);
    }
}

/// `loadBalancerSourceRanges`: a frontend flagged `SOURCE_RANGES` serves
/// only clients inside one of its ranges; others are dropped.
#[inline(always)]
pub fn check_source<A: Addr>(svc: &ServiceValue, saddr: A) -> Result<(), Error> {
    A::check_source(svc, saddr)
}

#[inline(always)]
fn mixk(k: u32) -> u32 {
    k.wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593)
}

/// MurmurHash3 x86_32 over saddr, daddr, sport, dport (13 bytes with the
/// protocol), exactly as `proxy::maglev::flow_hash`.
#[inline(always)]
pub fn flow_hash(f: &Tuple<u32>) -> u32 {
    let mut h = MAGLEV_FLOW_SEED;
    let ports = f.sport as u32 | (f.dport as u32) << 16;
    for k in [f.saddr, f.daddr, ports] {
        h ^= mixk(k);
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    h ^= mixk(f.proto as u32);
    h ^= 13;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// North-south selection: the frontend's Maglev table when it has one (so
/// every node picks the same backend for a flow), else [`select`].
#[inline(always)]
pub fn select_flow(
    svc: &ServiceValue,
    flow: &Tuple<u32>,
    client: AffinityKey,
    now: u64,
) -> Result<(u32, Backend), Error> {
    if svc.maglev_size != 0 && svc.affinity_timeout == 0 {
        let key = MaglevKey {
            table_id: svc.maglev_table,
            slot: flow_hash(flow) % svc.maglev_size,
        };
        // SAFETY: values copied out at once.
        if let Some(id) = unsafe { MAGLEV.get(key) }.copied()
            && let Some(b) = unsafe { BACKENDS.get(id) }.copied()
        {
            return Ok((id, b));
        }
    }
    select::<u32, _>(svc, client, now)
}

/// Pick a backend for a new flow: the client's affinity backend while it is
/// fresh and still exists, otherwise a random slot of the live generation.
#[inline(always)]
pub fn select<A: Backends, K: Affinity>(
    svc: &ServiceValue,
    client: K,
    now: u64,
) -> Result<(u32, A::Backend), Error> {
    if svc.affinity_timeout != 0
        && let Some(a) = client.get_ptr_mut()
    {
        // SAFETY: pointer from a successful lookup; plain integers.
        let (last, id) = unsafe { ((*a).last_used_ns, (*a).backend_id) };
        let timeout = svc.affinity_timeout as u64 * 1_000_000_000;
        if now.wrapping_sub(last) < timeout
            && let Some(b) = A::backend(id)
            && is_slot_member(svc, id)
        {
            // SAFETY: as above.
            unsafe { (*a).last_used_ns = now };
            count(stat::AFFINITY_HIT);
            return Ok((id, b));
        }
    }
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        service_id: svc.id,
        generation: svc.generation as u16,
        index: (r % svc.count as u32) as u16,
    };
    // SAFETY: values are copied out at once.
    let id = unsafe { SLOTS.get(slot) }.copied().ok_or(Error::NoSlot)?;
    let b = A::backend(id).ok_or(Error::NoSlot)?;
    if svc.affinity_timeout != 0 {
        let v = AffinityValue {
            last_used_ns: now,
            backend_id: id,
            _pad: 0,
        };
        client.insert(&v);
    }
    Ok((id, b))
}

/// Whether backend `id` is still in the frontend's live backend set (a
/// backend that left this service may live on for another one): one lookup
/// in the membership map the agent keeps with the slots, for any size.
#[inline(always)]
fn is_slot_member(svc: &ServiceValue, id: u32) -> bool {
    let key = AffinityMatchKey {
        service_id: svc.id,
        backend_id: id,
    };
    // SAFETY: only presence is read.
    unsafe { AFFINITY_MATCH.get(key) }.is_some()
}
