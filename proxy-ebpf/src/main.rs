//! Kernel side of the service proxy.
//!
//! * [`tc_from_pod`]: tc ingress on a pod's host-side interface (packets the
//!   pod sends). A packet to a frontend (service address, port, protocol) is
//!   DNATed to a backend chosen at random, remembered in conntrack.
//! * [`tc_to_pod`]: tc egress on a pod's host-side interface (packets the pod
//!   receives). A reply from a backend is rewritten back to the frontend.
//!
//! Anything that is not IPv4 TCP/UDP, or is malformed, truncated, fragmented
//! or carries IP options, passes untouched and is counted.
#![no_std]
#![no_main]

mod maps;
mod packet;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use proxy_common::{Backend, CtKey, CtValue, ServiceKey, ServiceValue, SlotKey, ct_dir, stat};

use crate::{
    maps::{BACKENDS, CONNTRACK, REVNAT, SERVICES, SLOTS, count},
    packet::{Error, Packet},
};

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    verdict(try_from_pod(&ctx))
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    verdict(try_to_pod(&ctx))
}

/// Turn the outcome of a `try_*` function into a deliberate verdict, counting
/// why a packet was not translated.
#[inline(always)]
fn verdict(r: Result<i32, Error>) -> i32 {
    match r {
        Ok(v) => v,
        Err(e) => {
            count(e.stat());
            if e.drops() {
                TC_ACT_SHOT as i32
            } else {
                TC_ACT_OK as i32
            }
        }
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    count(stat::PACKETS);

    let key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: 0,
    };
    // SAFETY: the value is copied out at once; a concurrent update replaces
    // the whole value, so the copy is either the old or the new one.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    if svc.count == 0 {
        return Err(Error::NoBackend);
    }

    let ct_key = CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: ct_dir::SERVICE,
        _pad: 0,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp_flags = pkt.tcp_ct_flags();

    // An existing flow keeps its backend while that backend and the
    // frontend it belongs to still exist.
    let mut chosen: Option<(u32, Backend)> = None;
    if let Some(ct) = CONNTRACK.get_ptr_mut(&ct_key) {
        // SAFETY: pointer from a successful lookup; fields are plain integers.
        let (backend_id, service_id) = unsafe { ((*ct).backend_id, (*ct).service_id) };
        if service_id == svc.id {
            // SAFETY: copied out at once (see above).
            if let Some(b) = unsafe { BACKENDS.get(&backend_id) } {
                chosen = Some((backend_id, *b));
                // SAFETY: as above.
                unsafe {
                    (*ct).last_seen_ns = now;
                    (*ct).flags |= tcp_flags;
                }
            }
        }
    }

    let backend = match chosen {
        Some((_, b)) => b,
        None => {
            let (id, b) = select_backend(&svc).inspect_err(|_| {
                // Never expected (slots are written before the service
                // entry); rare enough to log.
                warn!(ctx, "frontend {} has a missing slot or backend", svc.id);
            })?;
            create_ct(&pkt, &ct_key, &svc, id, &b, now, tcp_flags);
            b
        }
    };

    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    count(stat::DNAT);
    Ok(TC_ACT_OK as i32)
}

/// Pick a backend of the live generation at random.
#[inline(always)]
fn select_backend(svc: &ServiceValue) -> Result<(u32, Backend), Error> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        service_id: svc.id,
        generation: svc.generation as u16,
        index: (r % svc.count as u32) as u16,
    };
    // SAFETY: values are copied out at once.
    let backend_id = unsafe { SLOTS.get(&slot) }.copied().ok_or(Error::NoSlot)?;
    let backend = unsafe { BACKENDS.get(&backend_id) }
        .copied()
        .ok_or(Error::NoSlot)?;
    Ok((backend_id, backend))
}

/// Remember the flow both ways: the client's tuple -> backend, and the
/// backend's reply tuple -> frontend (for reverse NAT).
#[inline(always)]
fn create_ct(
    pkt: &Packet,
    key: &CtKey,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &Backend,
    now: u64,
    flags: u32,
) {
    let value = CtValue {
        last_seen_ns: now,
        backend_id,
        service_id: svc.id,
        flags,
        _pad: 0,
    };
    let reply = CtKey {
        saddr: backend.addr,
        daddr: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    // The reply entry first: once the service entry exists, replies must be
    // translatable.
    if CONNTRACK.insert(&reply, &value, 0).is_err() || CONNTRACK.insert(key, &value, 0).is_err() {
        count(stat::CT_INSERT_FAIL);
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    count(stat::PACKETS);
    let key = CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let Some(ct) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let service_id = unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
        (*ct).service_id
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(&service_id) }).copied() else {
        // The frontend is gone: the reply cannot be made to look right.
        return Ok(TC_ACT_OK as i32);
    };
    pkt.rewrite_src(ctx, rev.addr, rev.port)?;
    count(stat::REV_NAT);
    Ok(TC_ACT_OK as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
