//! Backend selection shared by the per-packet and the socket paths.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{AffinityKey, AffinityValue, Backend, ServiceValue, SlotKey, stat};

use crate::{
    maps::{AFFINITY, BACKENDS, SLOTS, count},
    packet::Error,
};

/// Pick a backend for a new flow: the client's affinity backend while it is
/// fresh and still exists, otherwise a random slot of the live generation.
#[inline(always)]
pub fn select(svc: &ServiceValue, client: AffinityKey, now: u64) -> Result<(u32, Backend), Error> {
    if svc.affinity_timeout != 0 {
        if let Some(a) = AFFINITY.get_ptr_mut(&client) {
            // SAFETY: pointer from a successful lookup; plain integers.
            let (last, id) = unsafe { ((*a).last_used_ns, (*a).backend_id) };
            let timeout = svc.affinity_timeout as u64 * 1_000_000_000;
            if now.wrapping_sub(last) < timeout
                // SAFETY: copied out at once.
                && let Some(b) = unsafe { BACKENDS.get(&id) }.copied()
                && is_slot_member(svc, id)
            {
                // SAFETY: as above.
                unsafe { (*a).last_used_ns = now };
                count(stat::AFFINITY_HIT);
                return Ok((id, b));
            }
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
    let id = unsafe { SLOTS.get(&slot) }.copied().ok_or(Error::NoSlot)?;
    let b = unsafe { BACKENDS.get(&id) }.copied().ok_or(Error::NoSlot)?;
    if svc.affinity_timeout != 0 {
        let v = AffinityValue {
            last_used_ns: now,
            backend_id: id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(&client, &v, 0);
    }
    Ok((id, b))
}

/// Whether backend `id` is still among the frontend's live slots (a backend
/// that left this service may live on for another one). Bounded scan.
#[inline(always)]
fn is_slot_member(svc: &ServiceValue, id: u32) -> bool {
    let n = if svc.count > 64 { 64 } else { svc.count };
    for index in 0..n {
        let slot = SlotKey {
            service_id: svc.id,
            generation: svc.generation as u16,
            index,
        };
        // SAFETY: copied out at once.
        if unsafe { SLOTS.get(&slot) }.copied() == Some(id) {
            return true;
        }
    }
    // Large services: trust that the backend exists.
    svc.count > 64
}
