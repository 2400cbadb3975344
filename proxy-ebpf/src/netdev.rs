//! tc on the node's external interfaces: north-south flows next to XDP.
//!
//! * [`tc_from_netdev`] (ingress): the remote-backend flows XDP decided
//!   (conntrack says SNAT or DSR) are rewritten here, and their replies.
//!   Both carry the node's own address as source once translated, which
//!   the stack would drop as a martian if routed; `bpf_redirect_neigh`
//!   sends them out with a FIB and neighbour lookup instead. Without XDP
//!   (`--xdp-mode none`, or a packet XDP passed unfinished) this program
//!   starts the flow itself, through the same path XDP uses. It also
//!   rejects frontends without backends, and records DSR flows arriving
//!   for local backends. A packet to neither the node address nor a
//!   frontend (pod-to-pod traffic from other nodes) leaves after one
//!   service lookup.
//! * [`tc_to_netdev`] (egress): replies of local backends to north-south
//!   clients get the frontend as source, after routing (where a node
//!   address as source is fine).

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{ct_dir, ct_flags, stat};

use crate::{
    ctx::{Ctx, verdict},
    dsr,
    error::Error,
    flow, lb,
    maps::{CONFIG, CONNTRACK, REVNAT, account, count},
    packet::Packet,
    pod, reject,
};

const PASS: i32 = <TcContext as Ctx>::PASS;

#[classifier]
pub fn tc_from_netdev(ctx: TcContext) -> i32 {
    verdict::<TcContext>(try_from_netdev(&ctx))
}

#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    verdict::<TcContext>(try_to_netdev(&ctx))
}

#[inline(always)]
fn try_from_netdev(ctx: &TcContext) -> Result<i32, Error> {
    if let Some(v) = dsr::ingress(ctx)? {
        return Ok(v);
    }
    let Some(pkt) = Packet::<u32>::parse(ctx)? else {
        return Ok(PASS);
    };
    // Fast exit: only a packet to the node address (SNAT replies,
    // NodePorts) or to a frontend can need anything here. Anything else
    // (pod traffic from other nodes, whether socket LB or a remote node's
    // tc translated it) leaves after this one service lookup, conntrack
    // untouched. Flows are tracked under a frontend's address and SNAT
    // replies come back to the node address (`CONFIG`, an array map the
    // verifier inlines: no helper call).
    let svc = if pkt.tuple.daddr == node_addr() {
        None
    } else {
        match flow::service(&pkt) {
            Some(s) => Some(s),
            None => return Ok(PASS),
        }
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(p) = CONNTRACK.get_ptr_mut(pkt.tuple.ct_key(ct_dir::REPLY)) {
        // SAFETY: pointer from a successful lookup; a copy of plain integers.
        let ct = unsafe { *p };
        if ct.flags & ct_flags::SNAT == 0 {
            // Another tracked flow's reply (east-west, or a local
            // backend's): rewritten after routing, as XDP leaves it.
            return Ok(PASS);
        }
        // SAFETY: as above.
        unsafe {
            (*p).last_seen_ns = now;
            (*p).flags |= pkt.tcp_ct_flags();
        }
        // SAFETY: copied out at once.
        let Some(rev) = (unsafe { REVNAT.get(ct.service_id) }).copied() else {
            return Ok(PASS);
        };
        pkt.rewrite_src(ctx, rev.addr, rev.port)?;
        pkt.rewrite_dst(ctx, ct.nat_addr, ct.nat_port)?;
        count(stat::REV_NAT);
        return Ok(redirect_out(ctx));
    }
    // One lookup of the client's tuple serves every kind of flow XDP (or
    // this program) started.
    let (ct, backend) = match flow::established(&pkt, None, now) {
        Some(c) => c,
        None => {
            let Some(svc) = svc.or_else(|| flow::service(&pkt)) else {
                return Ok(PASS);
            };
            lb::check_source(&svc, pkt.tuple.saddr)?;
            if svc.count == 0 {
                // A frontend without backends: reject, as for pods.
                return reject::reject(ctx, &pkt);
            }
            flow::start_external(&svc, &pkt, now)?
        }
    };
    if ct.flags & ct_flags::DSR != 0 {
        return dsr::forward(ctx, &pkt, &ct);
    }
    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    account(ct.service_id, ctx.len() as u64);
    count(stat::DNAT);
    if ct.flags & ct_flags::SNAT != 0 {
        pkt.rewrite_src(ctx, ct.nat_addr, ct.nat_port)?;
        return Ok(redirect_out(ctx));
    }
    // A local backend: the stack routes the packet to the pod.
    Ok(PASS)
}

/// The node address north-south SNAT uses (`CONFIG`; 0 when not
/// configured).
#[inline(always)]
pub fn node_addr() -> u32 {
    CONFIG.get(0).map_or(0, |c| c.node_addr)
}

/// Out of the interface the route to the (new) destination uses, resolving
/// the neighbour.
#[inline(always)]
pub fn redirect_out(ctx: &TcContext) -> i32 {
    // SAFETY: the skb pointer is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no parameters: the kernel does the FIB lookup itself.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn try_to_netdev(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::<u32>::parse(ctx)? else {
        return Ok(PASS);
    };
    pod::reverse_nat(ctx, &pkt)
}
