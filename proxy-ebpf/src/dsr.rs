//! Direct server return for remote north-south backends: the receiving
//! node DNATs the flow and adds an IPv4 option ([`DsrOpt`]) naming the
//! frontend; the backend's node records it and answers the client from
//! that frontend directly.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET, bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
    },
    helpers::{bpf_check_mtu, bpf_ktime_get_ns},
    programs::TcContext,
};
use proxy_common::{CtValue, ct_dir, ct_flags, proto, stat};

use crate::{
    ctx::Ctx,
    error::Error,
    frag::Frag,
    hdr::{
        DSR_OPT_LEN, DSR_OPT_TYPE, DsrOpt, IPV4_DSR_VERSION_IHL, Ipv4DsrHdr, Ipv4Hdr, L3_OFF,
        L4_OFF, UdpHdr,
    },
    maps::{BACKENDS, CONNTRACK, REVNAT, account, count, note_reply_dst},
    netdev,
    packet::Packet,
    reject,
    tuple::Tuple,
};

const PASS: i32 = <TcContext as Ctx>::PASS;

/// A backend on this node answering a DSR flow (tc ingress of its pod's
/// interface): the reply leaves from the frontend (on another node)
/// straight to the client. Only DSR entries are rewritten here, before
/// routing: the frontend is not a local address on this node, so that is
/// safe (east-west replies wait for `tc_to_pod`).
#[inline(always)]
pub fn reply(ctx: &TcContext, pkt: &Packet<u32>) -> Result<i32, Error> {
    let Some(ct) = CONNTRACK.get_ptr_mut(pkt.tuple.ct_key(ct_dir::REPLY)) else {
        return Ok(PASS);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let (flags, addr, port) = unsafe { ((*ct).flags, (*ct).nat_addr, (*ct).nat_port) };
    if flags & ct_flags::DSR == 0 {
        return Ok(PASS);
    }
    // SAFETY: as above.
    unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
    }
    pkt.rewrite_src(ctx, addr, port)?;
    count(stat::REV_NAT);
    Ok(PASS)
}

/// On the backend's node (tc ingress of the external interface): a DSR
/// packet records which frontend the backend must answer from, then goes
/// on to the pod with the option (Linux ignores unknown options on
/// receive). `None`: not a DSR packet.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Result<Option<i32>, Error> {
    let h: Ipv4DsrHdr = ctx.read(L3_OFF)?;
    if h.ip.version_ihl != IPV4_DSR_VERSION_IHL
        || h.opt.kind != DSR_OPT_TYPE
        || h.opt.len as usize != DSR_OPT_LEN
    {
        return Ok(None);
    }
    let protocol = h.ip.protocol;
    // A later fragment carries no ports: its first fragment recorded the
    // flow, and the pod reassembles the datagram.
    if (protocol != proto::TCP && protocol != proto::UDP) || Frag::of(h.ip.frag_off) == Frag::Later
    {
        return Ok(None);
    }
    let ports: UdpHdr = ctx.read(L4_OFF + DSR_OPT_LEN)?;
    // The backend's replies: from it to the client.
    let reply = Tuple {
        saddr: h.ip.daddr,
        daddr: h.ip.saddr,
        sport: ports.dport,
        dport: ports.sport,
        proto: protocol,
    };
    let key = reply.ct_key(ct_dir::REPLY);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ct) = CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*ct).last_seen_ns = now };
        return Ok(Some(PASS));
    }
    let value = CtValue {
        last_seen_ns: now,
        backend_id: 0,
        service_id: 0,
        flags: ct_flags::DSR | ct_flags::TCP_ESTABLISHED,
        _pad: 0,
        nat_addr: h.opt.addr,
        nat_port: h.opt.port,
        _pad2: 0,
    };
    note_reply_dst(reply.daddr);
    if CONNTRACK.insert(key, value, 0).is_err() {
        count(stat::CT_INSERT_FAIL);
    }
    Ok(Some(PASS))
}

/// On the receiving node: DNAT a DSR flow and add the option carrying the
/// frontend, then send it to the backend's node.
#[inline(always)]
pub fn forward(ctx: &TcContext, pkt: &Packet<u32>, ct: &CtValue) -> Result<i32, Error> {
    // SAFETY: copied out at once.
    let Some(b) = (unsafe { BACKENDS.get(ct.backend_id) }).copied() else {
        return Err(Error::NoSlot);
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(ct.service_id) }).copied() else {
        return Err(Error::NoSlot);
    };
    // The option must fit the egress MTU (GSO packets are segmented later
    // and are not checked here). Too large: a DF packet learns the MTU it
    // must use from an ICMP "fragmentation needed"; others are dropped.
    let mut mtu: u32 = 0;
    // SAFETY: the skb pointer is the program's context; `mtu` is a live
    // stack variable the helper writes.
    let over = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, 0, &mut mtu, DSR_OPT_LEN as i32, 0) }
        == BPF_MTU_CHK_RET_FRAG_NEEDED as i64;
    if over {
        if pkt.dont_fragment && !pkt.later_fragment() {
            return reject::frag_needed(ctx, pkt, (mtu as u16).saturating_sub(DSR_OPT_LEN as u16));
        }
        return Err(Error::DsrMtu);
    }
    pkt.rewrite_dst(ctx, b.addr, b.port)?;
    ctx.adjust_room(DSR_OPT_LEN as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| Error::Rewrite)?;
    let ip: Ipv4Hdr = ctx.read(L3_OFF)?;
    let mut h = Ipv4DsrHdr {
        ip: Ipv4Hdr {
            version_ihl: IPV4_DSR_VERSION_IHL,
            tot_len: (u16::from_be(ip.tot_len).wrapping_add(DSR_OPT_LEN as u16)).to_be(),
            check: 0,
            ..ip
        },
        opt: DsrOpt {
            kind: DSR_OPT_TYPE,
            len: DSR_OPT_LEN as u8,
            port: rev.port,
            addr: rev.addr,
        },
    };
    h.ip.check = reject::csum(&mut h);
    ctx.write(L3_OFF, &h)?;
    account(ct.service_id, ctx.len() as u64);
    count(stat::DNAT);
    Ok(netdev::redirect_out(ctx))
}
