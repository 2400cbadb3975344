//! Answers for frontends without backends, as kube-proxy's REJECT does: a
//! TCP RST for a SYN, ICMP port unreachable for UDP. The frame is rewritten
//! in place into the answer and sent back out of the interface it came in on
//! (from tc ingress of a pod's host interface: straight back to the pod).

use core::mem;

use aya_ebpf::{
    bindings::BPF_CSUM_LEVEL_RESET,
    helpers::{bpf_csum_diff, bpf_csum_level, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{proto, stat};

use crate::{
    maps::count,
    packet::{ETH_HLEN, Error, L4_OFF, Packet, ptr_at},
};

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;

/// ICMP header + original IPv4 header + first 8 bytes of its payload.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpBody {
    icmp: [u32; 2],
    orig: [u32; 7],
}

#[repr(C)]
struct Pseudo {
    saddr: u32,
    daddr: u32,
    zero_proto_len: [u8; 4],
    tcp: [u32; 5],
}

/// Reject the packet; the verdict to return.
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    if pkt.later_fragment() {
        // No L4 header to answer: the first fragment was answered.
        return Err(Error::NoBackend);
    }
    match pkt.proto {
        proto::TCP => tcp_rst(ctx, pkt),
        proto::UDP => icmp_unreachable(ctx, pkt, ICMP_PORT_UNREACHABLE, 0),
        _ => Err(Error::NoBackend),
    }
}

#[inline(always)]
fn fold(c: i64) -> u16 {
    let mut s = c as u64 as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Checksum of a buffer on the stack (size a multiple of 4).
#[inline(always)]
pub(crate) fn csum<T>(v: &mut T) -> u16 {
    // SAFETY: `v` is a live stack object of the size given.
    let r = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            v as *mut T as *mut u32,
            mem::size_of::<T>() as u32,
            0,
        )
    };
    fold(r)
}

#[inline(always)]
fn ip_header(tot_len: u16, protocol: u8, saddr: u32, daddr: u32) -> [u32; 5] {
    let mut ip = [
        u32::from_ne_bytes([0x45, 0, (tot_len >> 8) as u8, tot_len as u8]),
        u32::from_ne_bytes([0, 0, 0x40, 0]), // id 0, DF
        u32::from_ne_bytes([64, protocol, 0, 0]),
        saddr,
        daddr,
    ];
    let c = csum(&mut ip).to_ne_bytes();
    ip[2] = u32::from_ne_bytes([64, protocol, c[0], c[1]]);
    ip
}

/// The Ethernet header with source and destination swapped.
#[inline(always)]
fn eth_swapped(ctx: &TcContext) -> Result<[u8; 14], Error> {
    let hdr: *const [u8; 14] = ptr_at(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let m = unsafe { hdr.read_unaligned() };
    Ok([
        m[6], m[7], m[8], m[9], m[10], m[11], m[0], m[1], m[2], m[3], m[4], m[5], 0x08, 0x00,
    ])
}

/// Resize the frame to Ethernet + IPv4 + `l4`, write the three parts and
/// send it back out of the interface it arrived on.
#[inline(always)]
fn send_back<T>(ctx: &TcContext, eth: &[u8; 14], ip: &[u32; 5], l4: &T) -> Result<i32, Error> {
    let len = (ETH_HLEN + 20 + mem::size_of::<T>()) as u32;
    // SAFETY: the skb pointer is the program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Error::Rewrite);
    }
    ctx.store(0, eth, 0).map_err(|_| Error::Rewrite)?;
    ctx.store(ETH_HLEN, ip, 0).map_err(|_| Error::Rewrite)?;
    ctx.store(L4_OFF, l4, 0).map_err(|_| Error::Rewrite)?;
    // The frame's checksums are complete: make the receiver verify them
    // instead of trusting a partial-checksum state left from the original.
    // SAFETY: skb context; a plain flag change.
    unsafe { bpf_csum_level(ctx.skb.skb, BPF_CSUM_LEVEL_RESET as u64) };
    // SAFETY: the skb pointer is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: bpf_redirect has no memory preconditions.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}

#[inline(always)]
fn tcp_rst(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    let flags = pkt.tcp_flags();
    // Only a connection attempt gets a RST; anything else is dropped.
    if flags & TCP_SYN == 0 || flags & (TCP_RST | TCP_ACK) != 0 {
        return Err(Error::NoBackend);
    }
    let seq_p: *const u32 = ptr_at(ctx, L4_OFF + 4)?;
    // SAFETY: bounds checked by ptr_at.
    let seq = u32::from_be(unsafe { seq_p.read_unaligned() });
    let doff_p: *const u8 = ptr_at(ctx, L4_OFF + 12)?;
    // SAFETY: bounds checked by ptr_at.
    let doff = ((unsafe { *doff_p } >> 4) as u32) * 4;
    let payload = (pkt.tot_len as u32).saturating_sub(20 + doff);
    let mut ack = seq.wrapping_add(payload).wrapping_add(1);
    if flags & TCP_FIN != 0 {
        ack = ack.wrapping_add(1);
    }
    let eth = eth_swapped(ctx)?;
    // Reply ports: ours = their destination, theirs = their source; both
    // already network order, laid out as [sport, dport] in memory.
    let reply_ports = u32::from_ne_bytes({
        let d = pkt.dport.to_ne_bytes();
        let s = pkt.sport.to_ne_bytes();
        [d[0], d[1], s[0], s[1]]
    });
    let mut pseudo = Pseudo {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        zero_proto_len: [0, proto::TCP, 0, 20],
        tcp: [
            reply_ports,
            0,
            ack.to_be(),
            u32::from_ne_bytes([0x50, TCP_RST | TCP_ACK, 0, 0]),
            0,
        ],
    };
    let c = csum(&mut pseudo).to_ne_bytes();
    let mut tcp = pseudo.tcp;
    tcp[4] = u32::from_ne_bytes([c[0], c[1], 0, 0]);
    let ip = ip_header(40, proto::TCP, pkt.daddr, pkt.saddr);
    count(stat::REJECT_TCP_RST);
    send_back(ctx, &eth, &ip, &tcp)
}

/// ICMP destination unreachable codes.
const ICMP_PORT_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;

/// Answer a packet that cannot go on without fragmentation (it carries DF)
/// with ICMP "fragmentation needed" and the next-hop MTU, from the address
/// it was sent to (this node is the router that cannot forward it).
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Result<i32, Error> {
    icmp_unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu)
}

/// ICMP destination unreachable (type 3) with `code`, quoting the IPv4
/// header and 8 bytes of the packet; `mtu` is the next-hop MTU field
/// (code 4 only, else 0).
#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<i32, Error> {
    let orig: *const [u32; 7] = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at (IPv4 header + 8 bytes of UDP).
    let orig = unsafe { orig.read_unaligned() };
    let eth = eth_swapped(ctx)?;
    let m = mtu.to_be_bytes();
    let mut body = IcmpBody {
        // type 3 (destination unreachable); unused, next-hop MTU.
        icmp: [
            u32::from_ne_bytes([3, code, 0, 0]),
            u32::from_ne_bytes([0, 0, m[0], m[1]]),
        ],
        orig,
    };
    let c = csum(&mut body).to_ne_bytes();
    body.icmp[0] = u32::from_ne_bytes([3, code, c[0], c[1]]);
    let ip = ip_header(
        (20 + mem::size_of::<IcmpBody>()) as u16,
        1,
        pkt.daddr,
        pkt.saddr,
    );
    count(if code == ICMP_FRAG_NEEDED {
        stat::DROP_DSR_MTU
    } else {
        stat::REJECT_ICMP
    });
    send_back(ctx, &eth, &ip, &body)
}
