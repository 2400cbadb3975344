//! The per-packet path on a pod's host-side interface.
//!
//! * [`tc_from_pod`] (tc ingress: what the pod sends): a packet to a
//!   frontend is DNATed to a backend (conntrack keeps a flow on its backend;
//!   session affinity keeps a client on one); a frontend without backends is
//!   rejected (RST / ICMP or ICMPv6 port unreachable). A pod reaching
//!   itself through its service (hairpin) is also SNATed to the family's
//!   hairpin address (`Addr::HAIRPIN`), and the replies to that address are
//!   translated back here. A packet to no frontend may be
//!   a DSR reply of a local backend (see [`dsr`](crate::dsr)), looked for
//!   only on a node running DSR: anything else to no frontend (traffic
//!   socket LB already sent to its backend at connect(), plain pod
//!   traffic) leaves after one hash lookup, with conntrack untouched.
//! * [`tc_to_pod`] (tc egress: what the pod receives): a reply from a
//!   backend is rewritten back to the frontend. Conntrack is looked up only
//!   for a destination some reply entry was addressed to (`REPLY_DSTS`):
//!   socket-LB and plain pod traffic leave without a hash lookup.
//!
//! Both programs serve IPv4 and IPv6: the entry reads the EtherType and
//! runs one generic path per family (`Packet<A>`, `flow`, `reject`), the
//! family's maps chosen by `tuple::Addr`. IPv6 has no DSR (north-south
//! is IPv4 only).

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext};
use proxy_common::{Ip6, config_flags, ct_dir, ct_flags, stat};

use crate::{
    ctx::{Ctx, verdict},
    dsr,
    error::Error,
    flow,
    hdr::{ETH_P_IP, ETH_P_IPV6, EthHdr},
    lb,
    maps::{CONFIG, account, count, may_be_reply_dst},
    packet::{Packet, Wire},
    reject::{self, Answer},
};

const PASS: i32 = <TcContext as Ctx>::PASS;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    verdict::<TcContext>(match ether_type(&ctx) {
        Ok(ETH_P_IP) => try_from_pod::<u32>(&ctx),
        Ok(ETH_P_IPV6) => try_from_pod::<Ip6>(&ctx),
        Ok(_) => Ok(PASS),
        Err(e) => Err(e),
    })
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    verdict::<TcContext>(match ether_type(&ctx) {
        Ok(ETH_P_IP) => try_to_pod::<u32>(&ctx),
        Ok(ETH_P_IPV6) => try_to_pod::<Ip6>(&ctx),
        Ok(_) => Ok(PASS),
        Err(e) => Err(e),
    })
}

/// The frame's EtherType (host order): which family's path it takes.
#[inline(always)]
fn ether_type(ctx: &TcContext) -> Result<u16, Error> {
    let eth: EthHdr = ctx.read(0)?;
    Ok(u16::from_be(eth.proto))
}

#[inline(always)]
fn try_from_pod<A: Answer>(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::<A>::parse(ctx)? else {
        return Ok(PASS);
    };
    count(stat::PACKETS);
    if pkt.tuple.daddr == A::HAIRPIN {
        return hairpin_reply(ctx, &pkt);
    }
    let Some(svc) = flow::service(&pkt) else {
        // Fast exit: not addressed to a frontend, so already at its
        // destination (a backend socket LB chose at connect(), or plain
        // pod traffic). Only a DSR reply needs more, and only a node
        // running DSR has those (IPv4 only): the flag is read from an
        // array map, which the verifier inlines (no helper call). The
        // service lookup above stays the one hash lookup on this path.
        if let Some(p4) = A::v4(&pkt)
            && dsr_enabled()
        {
            return dsr::reply(ctx, p4);
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
        None => flow::start_pod(&svc, &pkt, now)?,
    };
    let (addr, port) = A::backend_addr(&backend);
    pkt.rewrite_dst(ctx, addr, port)?;
    if ct.flags & ct_flags::HAIRPIN != 0 {
        pkt.rewrite_src_addr(ctx, A::HAIRPIN)?;
    }
    account(svc.id, ctx.len() as u64);
    count(stat::DNAT);
    if A::v4(&pkt).is_none() {
        count(stat::DNAT_V6);
    }
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

/// A hairpinned backend answering `Addr::HAIRPIN`: make the reply come
/// from the frontend and go to the pod itself.
#[inline(always)]
fn hairpin_reply<A: Wire>(ctx: &TcContext, pkt: &Packet<A>) -> Result<i32, Error> {
    let Some(ct) = A::ct_get_ptr_mut(&pkt.tuple.ct_key(ct_dir::REPLY)) else {
        return Ok(PASS);
    };
    // SAFETY: pointer from a successful lookup; copied out at once.
    let service_id = unsafe { (*ct).service_id };
    let Some((addr, port)) = A::revnat(service_id) else {
        return Ok(PASS);
    };
    pkt.rewrite_src(ctx, addr, port)?;
    pkt.rewrite_dst_addr(ctx, pkt.tuple.saddr)?;
    count(stat::REV_NAT);
    Ok(PASS)
}

#[inline(always)]
fn try_to_pod<A: Wire>(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::<A>::parse(ctx)? else {
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
pub fn reverse_nat<C: Ctx, A: Wire>(ctx: &C, pkt: &Packet<A>) -> Result<i32, Error> {
    if !may_be_reply_dst(pkt.tuple.daddr.fold()) {
        return Ok(C::PASS);
    }
    let Some(ct) = A::ct_get_ptr_mut(&pkt.tuple.ct_key(ct_dir::REPLY)) else {
        return Ok(C::PASS);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let service_id = unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
        (*ct).service_id
    };
    let Some((addr, port)) = A::revnat(service_id) else {
        // The frontend is gone: the reply cannot be made to look right.
        return Ok(C::PASS);
    };
    pkt.rewrite_src(ctx, addr, port)?;
    count(stat::REV_NAT);
    Ok(C::PASS)
}
