//! Answers for frontends without backends, as kube-proxy's REJECT does: a
//! TCP RST for a SYN, ICMP (IPv4) / ICMPv6 port unreachable for UDP. One
//! path for both families ([`Answer`]: the pseudo-header checksums and the
//! IP header differ). The frame is rewritten
//! in place into the answer and sent back out of the interface it came in on
//! (from tc ingress of a pod's host interface: straight back to the pod).

use core::mem::size_of;

use aya_ebpf::{
    bindings::BPF_CSUM_LEVEL_RESET,
    helpers::{bpf_csum_diff, bpf_csum_level, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use proxy_common::{Ip6, proto, stat};

use crate::{
    ctx::Ctx,
    error::Error,
    hdr::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED,
        ICMP_PORT_UNREACH, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH, IP_DF, IP_TTL, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HLEN, IPV4_VERSION_IHL, IPV6_HOP_LIMIT, IPV6_VTC_FLOW, IcmpHdr,
        Ipv4Hdr, Ipv6Hdr, L3_OFF, TCP_ACK, TCP_DOFF_NO_OPTIONS, TCP_FIN, TCP_HLEN, TCP_RST, TcpHdr,
    },
    maps::count,
    packet::{Packet, Wire},
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

/// The IPv6 TCP pseudo-header (RFC 8200 section 8.1) followed by the
/// segment, for its checksum.
#[repr(C)]
struct TcpPseudo6 {
    saddr: Ip6,
    daddr: Ip6,
    len: u32,
    zero: [u8; 3],
    nexthdr: u8,
    tcp: TcpHdr,
}

/// What an ICMPv6 error quotes here: the IPv6 header and the 8 bytes after
/// it (the ports when there is no extension header).
#[repr(C)]
#[derive(Clone, Copy)]
struct Quote6 {
    ip: Ipv6Hdr,
    l4: [u8; 8],
}

/// ICMPv6 destination unreachable (RFC 4443 section 3.1) with the quote.
#[repr(C)]
#[derive(Clone, Copy)]
struct Icmp6Body {
    type_: u8,
    code: u8,
    check: u16,
    unused: u32,
    orig: Quote6,
}

/// The ICMPv6 pseudo-header followed by the message, for its checksum.
#[repr(C)]
struct Icmp6Pseudo {
    saddr: Ip6,
    daddr: Ip6,
    len: u32,
    zero: [u8; 3],
    nexthdr: u8,
    body: Icmp6Body,
}

const _: () = assert!(size_of::<TcpPseudo6>() == 60);
const _: () = assert!(size_of::<Icmp6Body>() == 56);
const _: () = assert!(size_of::<Icmp6Pseudo>() == 96);

/// How a family answers: the TCP checksum of a RST, the ICMP error for
/// UDP, and the frame around an answer.
pub trait Answer: Wire {
    /// Checksum of `tcp` (its `check` 0) sent from `saddr` to `daddr`.
    fn tcp_csum(saddr: Self, daddr: Self, tcp: &TcpHdr) -> u16;
    /// Send `l4` (protocol `proto`) from `saddr` to `daddr`, back out of
    /// the interface the packet arrived on.
    fn send_back<T: Copy>(
        ctx: &TcContext,
        saddr: Self,
        daddr: Self,
        proto: u8,
        l4: &T,
    ) -> Result<i32, Error>;
    /// ICMP (v4) / ICMPv6 port unreachable for a UDP packet.
    fn port_unreachable(ctx: &TcContext, pkt: &Packet<Self>) -> Result<i32, Error>;
}

impl Answer for u32 {
    #[inline(always)]
    fn tcp_csum(saddr: u32, daddr: u32, tcp: &TcpHdr) -> u16 {
        let mut pseudo = TcpPseudo {
            saddr,
            daddr,
            zero: 0,
            proto: proto::TCP,
            len: (TCP_HLEN as u16).to_be(),
            tcp: *tcp,
        };
        csum(&mut pseudo)
    }

    #[inline(always)]
    fn send_back<T: Copy>(
        ctx: &TcContext,
        saddr: u32,
        daddr: u32,
        proto: u8,
        l4: &T,
    ) -> Result<i32, Error> {
        let ip = ip_header((IPV4_HLEN + size_of::<T>()) as u16, proto, saddr, daddr);
        send_frame(ctx, ETH_P_IP, &ip, l4)
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, pkt: &Packet<u32>) -> Result<i32, Error> {
        icmp_unreachable(ctx, pkt, ICMP_PORT_UNREACH, 0)
    }
}

impl Answer for Ip6 {
    #[inline(always)]
    fn tcp_csum(saddr: Ip6, daddr: Ip6, tcp: &TcpHdr) -> u16 {
        let mut pseudo = TcpPseudo6 {
            saddr,
            daddr,
            len: (TCP_HLEN as u32).to_be(),
            zero: [0; 3],
            nexthdr: proto::TCP,
            tcp: *tcp,
        };
        csum(&mut pseudo)
    }

    #[inline(always)]
    fn send_back<T: Copy>(
        ctx: &TcContext,
        saddr: Ip6,
        daddr: Ip6,
        proto: u8,
        l4: &T,
    ) -> Result<i32, Error> {
        let ip = Ipv6Hdr {
            vtc_flow: IPV6_VTC_FLOW,
            payload_len: (size_of::<T>() as u16).to_be(),
            nexthdr: proto,
            hop_limit: IPV6_HOP_LIMIT,
            saddr,
            daddr,
        };
        send_frame(ctx, ETH_P_IPV6, &ip, l4)
    }

    /// ICMPv6 destination unreachable / port unreachable, from the address
    /// the packet was sent to, quoting its first 48 bytes of IPv6.
    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, pkt: &Packet<Ip6>) -> Result<i32, Error> {
        let orig: Quote6 = ctx.read(L3_OFF)?;
        let t = &pkt.tuple;
        let mut pseudo = Icmp6Pseudo {
            saddr: t.daddr,
            daddr: t.saddr,
            len: (size_of::<Icmp6Body>() as u32).to_be(),
            zero: [0; 3],
            nexthdr: IPPROTO_ICMPV6,
            body: Icmp6Body {
                type_: ICMPV6_DEST_UNREACH,
                code: ICMPV6_PORT_UNREACH,
                check: 0,
                unused: 0,
                orig,
            },
        };
        pseudo.body.check = csum(&mut pseudo);
        count(stat::REJECT_ICMP);
        Self::send_back(ctx, t.daddr, t.saddr, IPPROTO_ICMPV6, &pseudo.body)
    }
}

/// Reject the packet; the verdict to return.
#[inline(always)]
pub fn reject<A: Answer>(ctx: &TcContext, pkt: &Packet<A>) -> Result<i32, Error> {
    if pkt.later_fragment() {
        // No L4 header to answer: the first fragment was answered.
        return Err(Error::NoBackend);
    }
    match pkt.tuple.proto {
        proto::TCP => tcp_rst(ctx, pkt),
        proto::UDP => A::port_unreachable(ctx, pkt),
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

/// Resize the frame to Ethernet + `l3` + `l4`, write the three parts
/// (the Ethernet addresses swapped, EtherType `eth_p`) and send it back
/// out of the interface it arrived on.
#[inline(always)]
fn send_frame<H: Copy, T: Copy>(ctx: &TcContext, eth_p: u16, l3: &H, l4: &T) -> Result<i32, Error> {
    let m: EthHdr = ctx.read(0)?;
    let eth = EthHdr {
        dst: m.src,
        src: m.dst,
        proto: eth_p.to_be(),
    };
    let len = (ETH_HLEN + size_of::<H>() + size_of::<T>()) as u32;
    // SAFETY: the skb pointer is the program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Error::Rewrite);
    }
    ctx.write(0, &eth)?;
    ctx.write(L3_OFF, l3)?;
    ctx.write(L3_OFF + size_of::<H>(), l4)?;
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
fn tcp_rst<A: Answer>(ctx: &TcContext, pkt: &Packet<A>) -> Result<i32, Error> {
    // Only a connection attempt gets a RST; anything else is dropped.
    if !pkt.is_syn_only() {
        return Err(Error::NoBackend);
    }
    let syn: TcpHdr = ctx.read(pkt.l4_off)?;
    let seq = u32::from_be(syn.seq);
    let doff = ((syn.doff >> 4) as u32) * 4;
    let payload = pkt.l4_len.saturating_sub(doff);
    let mut ack = seq.wrapping_add(payload).wrapping_add(1);
    if pkt.tcp_flags & TCP_FIN != 0 {
        ack = ack.wrapping_add(1);
    }
    let t = &pkt.tuple;
    let mut tcp = TcpHdr {
        sport: t.dport,
        dport: t.sport,
        seq: 0,
        ack_seq: ack.to_be(),
        doff: TCP_DOFF_NO_OPTIONS,
        flags: TCP_RST | TCP_ACK,
        window: 0,
        check: 0,
        urg_ptr: 0,
    };
    tcp.check = A::tcp_csum(t.daddr, t.saddr, &tcp);
    count(stat::REJECT_TCP_RST);
    A::send_back(ctx, t.daddr, t.saddr, proto::TCP, &tcp)
}

/// Answer a packet that cannot go on without fragmentation (it carries DF)
/// with ICMP "fragmentation needed" and the next-hop MTU, from the address
/// it was sent to (this node is the router that cannot forward it).
#[inline(always)]
pub fn frag_needed(ctx: &TcContext, pkt: &Packet<u32>, mtu: u16) -> Result<i32, Error> {
    icmp_unreachable(ctx, pkt, ICMP_FRAG_NEEDED, mtu)
}

/// ICMP destination unreachable with `code`, quoting the IPv4 header and 8
/// bytes of the packet; `mtu` is the next-hop MTU field (code 4 only, else
/// 0).
#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Packet<u32>, code: u8, mtu: u16) -> Result<i32, Error> {
    let orig: Quote = ctx.read(L3_OFF)?;
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
    count(if code == ICMP_FRAG_NEEDED {
        stat::DROP_DSR_MTU
    } else {
        stat::REJECT_ICMP
    });
    u32::send_back(ctx, t.daddr, t.saddr, IPPROTO_ICMP, &body)
}
