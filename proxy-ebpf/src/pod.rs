//! The per-packet path on a pod's host-side interface.
//!
//! * [`tc_from_pod`] (tc ingress: what the pod sends): a packet to a
//!   frontend is DNATed to a backend (conntrack keeps a flow on its backend;
//!   session affinity keeps a client on one); a frontend without backends is
//!   rejected (RST / ICMP port unreachable). A pod reaching itself through
//!   its service (hairpin) is also SNATed to [`HAIRPIN`], and the replies to
//!   that address are translated back here. A packet to no frontend may be
//!   a DSR reply of a local backend (see [`dsr`](crate::dsr)), looked for
//!   only on a node running DSR: anything else to no frontend (traffic
//!   socket LB already sent to its backend at connect(), plain pod
//!   traffic) leaves after one hash lookup, with conntrack untouched.
//! * [`tc_to_pod`] (tc egress: what the pod receives): a reply from a
//!   backend is rewritten back to the frontend. Conntrack is looked up only
//!   for a destination some reply entry was addressed to (`REPLY_DSTS`):
//!   socket-LB and plain pod traffic leave without a hash lookup.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use proxy_common::{config_flags, ct_dir, ct_flags, stat};

use crate::{
    ctx::{Ctx, verdict},
    dsr,
    error::Error,
    flow::{self, HAIRPIN, Origin},
    lb,
    maps::{CONFIG, CONNTRACK, REVNAT, account, count, may_be_reply_dst},
    packet::Packet,
    reject,
};

const PASS: i32 = <TcContext as Ctx>::PASS;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    verdict::<TcContext>(try_from_pod(&ctx))
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    verdict::<TcContext>(try_to_pod(&ctx))
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(PASS);
    };
    count(stat::PACKETS);
    if pkt.tuple.daddr == HAIRPIN {
        return hairpin_reply(ctx, &pkt);
    }
    let Some(svc) = flow::service(&pkt) else {
        // Fast exit: not addressed to a frontend, so already at its
        // destination (a backend socket LB chose at connect(), or plain
        // pod traffic). Only a DSR reply needs more, and only a node
        // running DSR has those: the flag is read from an array map, which
        // the verifier inlines (no helper call). The service lookup above
        // stays the one hash lookup on this path.
        if dsr_enabled() {
            return dsr::reply(ctx, &pkt);
        }
        return Ok(PASS);
    };
    // loadBalancerSourceRanges hold for clients inside the cluster too
    // (kube-proxy's firewall chain sees pods' traffic to the LB IP).
    lb::check_source(&svc, pkt.tuple.saddr)?;
    if svc.count == 0 {
        return reject::reject(ctx, &pkt);
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // An existing flow keeps its backend while that backend and the
    // frontend it belongs to still exist.
    let (ct, backend) = match flow::established(&pkt, Some(svc.id), now) {
        Some(c) => c,
        None => flow::start(Origin::Pod, &svc, &pkt, now)?,
    };
    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        pkt.rewrite_src_addr(ctx, HAIRPIN)?;
    }
    account(svc.id, ctx.len() as u64);
    count(stat::DNAT);
    Ok(PASS)
}

/// Whether this node runs north-south DSR (its pods' replies may need
/// [`dsr::reply`]).
#[inline(always)]
fn dsr_enabled() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|c| c.flags & config_flags::DSR != 0)
}

/// A hairpinned backend answering [`HAIRPIN`]: make the reply come from the
/// frontend and go to the pod itself.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    // SAFETY: copied out at once.
    let Some(ct) = (unsafe { CONNTRACK.get(pkt.tuple.ct_key(ct_dir::REPLY)) }).copied() else {
        return Ok(PASS);
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(ct.service_id) }).copied() else {
        return Ok(PASS);
    };
    pkt.rewrite_src(ctx, rev.addr, rev.port)?;
    pkt.rewrite_dst_addr(ctx, pkt.tuple.saddr)?;
    count(stat::REV_NAT);
    Ok(PASS)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(PASS);
    };
    count(stat::PACKETS);
    reverse_nat(ctx, &pkt)
}

/// A reply of a tracked flow gets the frontend as its source.
///
/// Fast exit: a packet to an address no conntrack reply entry was ever
/// addressed to (`REPLY_DSTS`, an array slot the verifier inlines) is no
/// tracked flow's reply: it leaves without a hash lookup. That is all
/// socket-LB traffic and plain pod traffic, unless its destination shares
/// a slot with a per-packet flow's client.
#[inline(always)]
pub fn reverse_nat<C: Ctx>(ctx: &C, pkt: &Packet) -> Result<i32, Error> {
    if !may_be_reply_dst(pkt.tuple.daddr) {
        return Ok(C::PASS);
    }
    let Some(ct) = CONNTRACK.get_ptr_mut(pkt.tuple.ct_key(ct_dir::REPLY)) else {
        return Ok(C::PASS);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let service_id = unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
        (*ct).service_id
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(service_id) }).copied() else {
        // The frontend is gone: the reply cannot be made to look right.
        return Ok(C::PASS);
    };
    pkt.rewrite_src(ctx, rev.addr, rev.port)?;
    count(stat::REV_NAT);
    Ok(C::PASS)
}
