//! Answers for frontends without backends, as kube-proxy's REJECT does: a
//! TCP RST for a SYN, ICMP port unreachable for UDP. The frame is rewritten
//! in place into the answer and sent back out of the interface it came in on
//! (from tc ingress of a pod's host interface: straight back to the pod).

use core::mem::size_of;

use aya_ebpf::{
    bindings::BPF_CSUM_LEVEL_RESET,
    helpers::{bpf_csum_diff, bpf_csum_level, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{proto, stat};

use crate::{
    ctx::Ctx,
    error::Error,
    hdr::{
        ETH_HLEN, ETH_P_IP, EthHdr, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACH, IP_DF,
        IP_TTL, IPPROTO_ICMP, IPV4_HLEN, IPV4_VERSION_IHL, IcmpHdr, Ipv4Hdr, L3_OFF, L4_OFF,
        TCP_ACK, TCP_DOFF_NO_OPTIONS, TCP_FIN, TCP_HLEN, TCP_RST, TcpHdr,
    },
    maps::count,
    packet::Packet,
};

/// What an ICMP error quotes: the original IPv4 header and the first 8
/// bytes of its payload (the ports).
#[repr(C)]
#[derive(Clone, Copy)]
struct Quote {
    ip: Ipv4Hdr,
    l4: [u8; 8],
}

/// ICMP header + the quote.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpBody {
    icmp: IcmpHdr,
    orig: Quote,
}

// Checksummed with bpf_csum_diff: whole 32-bit words, no padding.
const _: () = assert!(size_of::<IcmpBody>() == 36);
const _: () = assert!(size_of::<TcpPseudo>() == 32);

/// The TCP pseudo-header followed by the segment, for its checksum.
#[repr(C)]
struct TcpPseudo {
    saddr: u32,
    daddr: u32,
    zero: u8,
    proto: u8,
    len: u16,
    tcp: TcpHdr,
}

/// Reject the packet; the verdict to return.
#[inline(always)]
pub fn reject(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    if pkt.later_fragment() {
        // No L4 header to answer: the first fragment was answered.
        return Err(Error::NoBackend);
    }
    match pkt.tuple.proto {
        proto::TCP => tcp_rst(ctx, pkt),
        proto::UDP => icmp_unreachable(ctx, pkt, ICMP_PORT_UNREACH, 0),
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
            size_of::<T>() as u32,
            0,
        )
    };
    fold(r)
}

/// A fresh IPv4 header (no options, DF, id 0) with its checksum.
#[inline(always)]
fn ip_header(tot_len: u16, protocol: u8, saddr: u32, daddr: u32) -> Ipv4Hdr {
    let mut ip = Ipv4Hdr {
        version_ihl: IPV4_VERSION_IHL,
        tos: 0,
        tot_len: tot_len.to_be(),
        id: 0,
        frag_off: IP_DF.to_be(),
        ttl: IP_TTL,
        protocol,
        check: 0,
        saddr,
        daddr,
    };
    ip.check = csum(&mut ip);
    ip
}

/// The Ethernet header with source and destination swapped.
#[inline(always)]
fn eth_swapped(ctx: &TcContext) -> Result<EthHdr, Error> {
    let m: EthHdr = ctx.read(0)?;
    Ok(EthHdr {
        dst: m.src,
        src: m.dst,
        proto: ETH_P_IP.to_be(),
    })
}

/// Resize the frame to Ethernet + IPv4 + `l4`, write the three parts and
/// send it back out of the interface it arrived on.
#[inline(always)]
fn send_back<T: Copy>(ctx: &TcContext, eth: &EthHdr, ip: &Ipv4Hdr, l4: &T) -> Result<i32, Error> {
    let len = (ETH_HLEN + IPV4_HLEN + size_of::<T>()) as u32;
    // SAFETY: the skb pointer is the program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Error::Rewrite);
    }
    ctx.write(0, eth)?;
    ctx.write(L3_OFF, ip)?;
    ctx.write(L4_OFF, l4)?;
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
    // Only a connection attempt gets a RST; anything else is dropped.
    if !pkt.is_syn_only() {
        return Err(Error::NoBackend);
    }
    let syn: TcpHdr = ctx.read(L4_OFF)?;
    let seq = u32::from_be(syn.seq);
    let doff = ((syn.doff >> 4) as u32) * 4;
    let payload = (pkt.tot_len as u32).saturating_sub(IPV4_HLEN as u32 + doff);
    let mut ack = seq.wrapping_add(payload).wrapping_add(1);
    if pkt.tcp_flags & TCP_FIN != 0 {
        ack = ack.wrapping_add(1);
    }
    let eth = eth_swapped(ctx)?;
    let t = &pkt.tuple;
    let mut pseudo = TcpPseudo {
        saddr: t.daddr,
        daddr: t.saddr,
        zero: 0,
        proto: proto::TCP,
        len: (TCP_HLEN as u16).to_be(),
        tcp: TcpHdr {
            sport: t.dport,
            dport: t.sport,
            seq: 0,
            ack_seq: ack.to_be(),
            doff: TCP_DOFF_NO_OPTIONS,
            flags: TCP_RST | TCP_ACK,
            window: 0,
            check: 0,
            urg_ptr: 0,
        },
    };
    pseudo.tcp.check = csum(&mut pseudo);
    let ip = ip_header((IPV4_HLEN + TCP_HLEN) as u16, proto::TCP, t.daddr, t.saddr);
    count(stat::REJECT_TCP_RST);
    send_back(ctx, &eth, &ip, &pseudo.tcp)
}

/// Answer a packet that cannot go on without fragmentation (it carries DF)
/// with ICMP "fragmentation needed" and the next-hop MTU, from the address
/// it was sent to (this node is the router that cannot forward it).
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, pkt: &Packet, mtu: u16) -> Result<i32, Error> {
    icmp_unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu)
}

/// ICMP destination unreachable with `code`, quoting the IPv4 header and 8
/// bytes of the packet; `mtu` is the next-hop MTU field (code 4 only, else
/// 0).
#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Packet, code: u8, mtu: u16) -> Result<i32, Error> {
    let orig: Quote = ctx.read(L3_OFF)?;
    let eth = eth_swapped(ctx)?;
    let mut body = IcmpBody {
        icmp: IcmpHdr {
            type_: ICMP_DEST_UNREACH,
            code,
            check: 0,
            unused: 0,
            mtu: mtu.to_be(),
        },
        orig,
    };
    body.icmp.check = csum(&mut body);
    let t = &pkt.tuple;
    let ip = ip_header(
        (IPV4_HLEN + size_of::<IcmpBody>()) as u16,
        IPPROTO_ICMP,
        t.daddr,
        t.saddr,
    );
    count(if code == ICMP_FRAG_NEEDED {
        stat::DROP_DSR_MTU
    } else {
        stat::REJECT_ICMP
    });
    send_back(ctx, &eth, &ip, &body)
}
