//! XDP on the node's external interfaces: NodePort, ExternalIP and
//! LoadBalancer traffic from outside the cluster.
//!
//! XDP decides and records every new north-south flow (through the same
//! flow-start path as tc) and finishes only what it can finish alone:
//! translated packets are handed to the stack with `XDP_PASS`, which routes
//! them to the pod's interface. Redirecting from XDP instead would need
//! NAPI on a receiving veth and leave the sending side's checksum offload
//! to handle; routing costs the stack's routing step only.
//!
//! * Local backend: DNAT here; the client's address is kept. The pod's
//!   reply leaves through the external interface, where `tc_to_netdev`
//!   restores the frontend as source after routing.
//! * Remote backend: XDP chooses the backend and records the flow (SNAT to
//!   the node address from `CONFIG`, so the reply comes back through this
//!   node, or DSR) and passes the packet unchanged; `tc_from_netdev` on the
//!   same interface rewrites it and its replies and sends them out with
//!   `bpf_redirect_neigh`: with the node's own address as source the stack
//!   would drop them as martians, and an `XDP_TX` on veth needs NAPI on
//!   the peer.
//! * Replies of tracked flows and frontends without backends (a RST or
//!   ICMP answer needs the skb helpers) are left to tc.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext};
use proxy_common::{ct_dir, ct_flags, stat};

use crate::{
    ctx::{Ctx, verdict},
    error::Error,
    flow, lb,
    maps::{CONNTRACK, account, count},
    netdev,
    packet::Packet,
};

const PASS: i32 = <XdpContext as Ctx>::PASS;

#[xdp]
pub fn xdp_nodeport(ctx: XdpContext) -> u32 {
    verdict::<XdpContext>(try_xdp(&ctx)) as u32
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::<u32>::parse(ctx)? else {
        return Ok(PASS);
    };
    count(stat::PACKETS);
    // Fast exit: a packet to neither the node address nor a frontend (pod
    // traffic from other nodes) leaves after this one service lookup, as
    // in `tc_from_netdev`.
    let svc = if pkt.tuple.daddr == netdev::node_addr() {
        None
    } else {
        match flow::service(&pkt) {
            Some(s) => Some(s),
            None => return Ok(PASS),
        }
    };
    if CONNTRACK.get_ptr(pkt.tuple.ct_key(ct_dir::REPLY)).is_some() {
        // A reply of a tracked flow: SNATed ones are finished by tc (they
        // need a neighbour lookup), east-west ones by tc after routing (a
        // NodePort frontend is a local address, which the stack would drop
        // as a martian source before routing).
        return Ok(PASS);
    }
    let Some(svc) = svc.or_else(|| flow::service(&pkt)) else {
        return Ok(PASS);
    };
    lb::check_source(&svc, pkt.tuple.saddr)?;
    if svc.count == 0 {
        // Rejected by tc on this interface.
        return Ok(PASS);
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (ct, backend) = match flow::established(&pkt, Some(svc.id), now) {
        Some(c) => c,
        None => flow::start_external(&svc, &pkt, now)?,
    };
    if ct.flags & (ct_flags::SNAT | ct_flags::DSR) != 0 {
        // Remote backend: the flow is decided and tracked; tc on this
        // interface rewrites it and sends it on with a neighbour lookup.
        return Ok(PASS);
    }
    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    account(svc.id, ctx.len() as u64);
    count(stat::DNAT);
    Ok(PASS)
}
