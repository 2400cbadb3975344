//! The one parser (Ethernet + IPv4 or IPv6 + TCP/UDP, bounds-checked) and
//! the NAT rewrites with their checksum fix-ups, for any hook ([`Ctx`]) and
//! either family ([`Wire`]).

use core::mem::offset_of;

use proxy_common::{Ip6, ct_flags, proto};

use crate::{
    ctx::{Ctx, L4Csum},
    error::Error,
    frag::Frag,
    hdr::{
        ETH_P_IP, ETH_P_IPV6, EthHdr, IP_CSUM_OFF, IP_DADDR_OFF, IP_DF, IP_SADDR_OFF,
        IP6_DADDR_OFF, IP6_MF, IP6_OFFSET_MASK, IP6_SADDR_OFF, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT,
        IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPV4_HLEN, IPV4_VERSION, IPV4_VERSION_IHL,
        IPV6_MAX_EXT_HDRS, IPV6_VERSION, Ipv4Hdr, Ipv6ExtHdr, Ipv6FragHdr, Ipv6Hdr, L3_OFF, L4_OFF,
        L4_OFF6, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST, TCP_SYN, TcpHdr, UDP_HLEN, UdpHdr,
    },
    tuple::{Addr, Tuple},
};

/// What the programs need of a TCP/UDP packet of family `A`.
pub struct Packet<A: Addr> {
    /// For a later fragment, the ports come from its first fragment.
    pub tuple: Tuple<A>,
    /// Where the L4 header starts in the frame (after IPv6 extension
    /// headers).
    pub l4_off: usize,
    /// Bytes from `l4_off` to the end of the IP datagram (L4 header and
    /// payload), from the IP header's length field.
    pub l4_len: u32,
    /// Raw TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
    /// IPv4 identification (zero-extended) or IPv6 fragment header
    /// identification, network order as loaded.
    pub id: u32,
    pub frag: Frag,
    /// The sender forbade fragmentation (IPv4 DF; always for IPv6, which
    /// routers never fragment).
    pub dont_fragment: bool,
}

/// How a family's packets look on the wire: where the addresses sit, how
/// the L3 header is parsed and which checksums cover an address.
pub trait Wire: Addr {
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;

    /// The L3 part of [`Packet::parse`]: the packet with its ports still 0
    /// and `l4_off` set. `Ok(None)` for traffic the proxy does not handle.
    fn parse_l3<C: Ctx>(ctx: &C) -> Result<Option<Packet<Self>>, Error>;

    /// Fix the checksums covering an address going from `old` to `new`:
    /// the L4 one (`csum`: None for a later fragment) through the
    /// pseudo-header, and the IPv4 header's (IPv6 has none).
    fn csum_addr<C: Ctx>(ctx: &C, csum: Option<L4Csum>, old: Self, new: Self) -> Result<(), Error>;

    /// The same packet seen as IPv4, for the IPv4-only features (DSR);
    /// None for IPv6.
    fn v4(pkt: &Packet<Self>) -> Option<&Packet<u32>>;
}

impl Wire for u32 {
    const SADDR_OFF: usize = IP_SADDR_OFF;
    const DADDR_OFF: usize = IP_DADDR_OFF;

    #[inline(always)]
    fn parse_l3<C: Ctx>(ctx: &C) -> Result<Option<Packet<u32>>, Error> {
        // Headers normally sit in the linear part; make sure they do.
        ctx.pull((L4_OFF + TCP_HLEN) as u32);

        let eth: EthHdr = ctx.read(0)?;
        if u16::from_be(eth.proto) != ETH_P_IP {
            return Ok(None);
        }
        let ip: Ipv4Hdr = ctx.read(L3_OFF)?;
        if ip.protocol != proto::TCP && ip.protocol != proto::UDP {
            return Ok(None);
        }
        if ip.version_ihl >> 4 != IPV4_VERSION {
            return Err(Error::Malformed);
        }
        if ip.version_ihl != IPV4_VERSION_IHL {
            return Err(Error::IpOptions);
        }
        let tot_len = u16::from_be(ip.tot_len);
        Ok(Some(Packet {
            tuple: Tuple {
                saddr: ip.saddr,
                daddr: ip.daddr,
                sport: 0,
                dport: 0,
                proto: ip.protocol,
            },
            l4_off: L4_OFF,
            l4_len: (tot_len as u32).saturating_sub(IPV4_HLEN as u32),
            tcp_flags: 0,
            id: ip.id as u32,
            frag: Frag::of(ip.frag_off),
            dont_fragment: u16::from_be(ip.frag_off) & IP_DF != 0,
        }))
    }

    #[inline(always)]
    fn csum_addr<C: Ctx>(ctx: &C, csum: Option<L4Csum>, old: u32, new: u32) -> Result<(), Error> {
        if let Some(c) = csum {
            ctx.l4_csum_addr(c, old, new)?;
        }
        ctx.l3_csum(IP_CSUM_OFF, old, new)
    }

    #[inline(always)]
    fn v4(pkt: &Packet<u32>) -> Option<&Packet<u32>> {
        Some(pkt)
    }
}

impl Wire for Ip6 {
    const SADDR_OFF: usize = IP6_SADDR_OFF;
    const DADDR_OFF: usize = IP6_DADDR_OFF;

    /// The fixed header, then at most [`IPV6_MAX_EXT_HDRS`] extension
    /// headers (hop-by-hop, routing, destination options, fragment), each
    /// bounds-checked, to TCP or UDP. A longer chain, or an extension
    /// header it does not walk (AH, ESP, mobility, HIP, shim6,
    /// experimental), passes untouched (`Ipv6ExtHdrs`); any other next
    /// header (ICMPv6, no next header ...) is not the proxy's traffic. A
    /// fragment header with the M flag and offset 0 makes the packet a
    /// first fragment (the walk goes on to its L4 header); one with a
    /// nonzero offset a later fragment (the walk ends there: its ports come
    /// from the first fragment, see [`crate::frag`]); an atomic fragment
    /// (neither) is a whole packet.
    #[inline(always)]
    fn parse_l3<C: Ctx>(ctx: &C) -> Result<Option<Packet<Ip6>>, Error> {
        // One pull for the whole walk: the headers of a frame up to
        // `IPV6_PULL_LEN` bytes are made linear (a header past what is
        // linear fails its bounds check and passes untouched).
        ctx.pull(IPV6_PULL_LEN);

        let eth: EthHdr = ctx.read(0)?;
        if u16::from_be(eth.proto) != ETH_P_IPV6 {
            return Ok(None);
        }
        let ip: Ipv6Hdr = ctx.read(L3_OFF)?;
        if (u32::from_be(ip.vtc_flow) >> 28) as u8 != IPV6_VERSION {
            return Err(Error::Malformed);
        }
        let mut next = ip.nexthdr;
        let mut off = L4_OFF6;
        let mut frag = Frag::Whole;
        let mut id = 0u32;
        let mut i = 0;
        while i < IPV6_MAX_EXT_HDRS && next != proto::TCP && next != proto::UDP {
            match next {
                IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                    let h: Ipv6ExtHdr = ctx.read(off)?;
                    next = h.nexthdr;
                    off += (h.hdrlen as usize + 1) * 8;
                }
                IPPROTO_FRAGMENT => {
                    let h: Ipv6FragHdr = ctx.read(off)?;
                    let f = u16::from_be(h.frag_off);
                    next = h.nexthdr;
                    off += 8;
                    id = h.id;
                    if f & IP6_OFFSET_MASK != 0 {
                        // A later fragment: fragment data follows, no
                        // header to walk. Followed only when the upper
                        // layer comes right after the fragment header
                        // (what its first fragment recorded).
                        if next != proto::TCP && next != proto::UDP {
                            return Err(Error::Fragment);
                        }
                        frag = Frag::Later;
                        break;
                    }
                    if f & IP6_MF != 0 {
                        frag = Frag::First;
                    }
                }
                _ if is_unwalked_ext_hdr(next) => return Err(Error::Ipv6ExtHdrs),
                _ => return Ok(None),
            }
            i += 1;
        }
        if next != proto::TCP && next != proto::UDP {
            if i == IPV6_MAX_EXT_HDRS && is_ext_hdr(next) {
                // Past the bound.
                return Err(Error::Ipv6ExtHdrs);
            }
            return Ok(None);
        }
        let payload = u16::from_be(ip.payload_len) as u32;
        let ext = (off - L4_OFF6) as u32;
        if payload < ext {
            return Err(Error::Malformed);
        }
        Ok(Some(Packet {
            tuple: Tuple {
                saddr: ip.saddr,
                daddr: ip.daddr,
                sport: 0,
                dport: 0,
                proto: next,
            },
            l4_off: off,
            l4_len: payload - ext,
            tcp_flags: 0,
            id,
            frag,
            dont_fragment: true,
        }))
    }

    #[inline(always)]
    fn csum_addr<C: Ctx>(ctx: &C, csum: Option<L4Csum>, old: Ip6, new: Ip6) -> Result<(), Error> {
        // No IP header checksum; the pseudo-header holds all 16 bytes,
        // fixed one word at a time.
        if let Some(c) = csum {
            let mut i = 0;
            while i < 4 {
                if old[i] != new[i] {
                    ctx.l4_csum_addr(c, old[i], new[i])?;
                }
                i += 1;
            }
        }
        Ok(())
    }

    #[inline(always)]
    fn v4(_: &Packet<Ip6>) -> Option<&Packet<u32>> {
        None
    }
}

/// How much of an IPv6 frame tc makes linear before the walk: the fixed
/// header, several extension headers and TCP.
const IPV6_PULL_LEN: u32 = 256;

/// The extension headers the parser walks.
#[inline(always)]
fn is_ext_hdr(next: u8) -> bool {
    matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) || is_unwalked_ext_hdr(next)
}

/// Extension headers (RFC 8200, IANA's list) the parser does not walk:
/// ESP (50), AH (51), mobility (135), HIP (139), shim6 (140), the
/// experimental 253 and 254.
#[inline(always)]
fn is_unwalked_ext_hdr(next: u8) -> bool {
    matches!(next, 50 | 51 | 135 | 139 | 140 | 253 | 254)
}

impl<A: Wire> Packet<A> {
    /// `Ok(None)` for traffic the proxy does not handle (not family `A`,
    /// not TCP or UDP); `Err` for TCP/UDP it refuses to touch.
    #[inline(always)]
    pub fn parse<C: Ctx>(ctx: &C) -> Result<Option<Packet<A>>, Error> {
        let Some(mut pkt) = A::parse_l3(ctx)? else {
            return Ok(None);
        };
        if pkt.frag == Frag::Later {
            let t = &pkt.tuple;
            let ports = A::later_ports(t.saddr, t.daddr, pkt.id, t.proto)?;
            pkt.tuple.sport = ports.sport;
            pkt.tuple.dport = ports.dport;
            pkt.dont_fragment = false;
            return Ok(Some(pkt));
        }
        let l4_len = if pkt.tuple.proto == proto::TCP {
            TCP_HLEN
        } else {
            UDP_HLEN
        };
        if pkt.l4_len < l4_len as u32 {
            return Err(Error::Malformed);
        }
        if pkt.tuple.proto == proto::TCP {
            let tcp: TcpHdr = ctx.read(pkt.l4_off)?;
            (pkt.tuple.sport, pkt.tuple.dport) = (tcp.sport, tcp.dport);
            pkt.tcp_flags = tcp.flags;
        } else {
            let udp: UdpHdr = ctx.read(pkt.l4_off)?;
            (pkt.tuple.sport, pkt.tuple.dport) = (udp.sport, udp.dport);
        }
        Ok(Some(pkt))
    }

    /// A non-first fragment: no L4 header (ports from its first fragment).
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.frag == Frag::Later
    }

    /// Only a connection attempt (SYN) may start a TCP flow, as kube-proxy
    /// drops conntrack-INVALID packets; any UDP packet may.
    #[inline(always)]
    pub fn starts_flow(&self) -> bool {
        self.tuple.proto != proto::TCP || self.tcp_flags & TCP_SYN != 0
    }

    /// Conntrack flag bits for this packet's TCP flags.
    #[inline(always)]
    pub fn tcp_ct_flags(&self) -> u32 {
        let mut f = 0;
        if self.frag == Frag::Later {
            return f;
        }
        if self.tuple.proto == proto::TCP && self.tcp_flags & TCP_SYN == 0 {
            f |= ct_flags::TCP_ESTABLISHED;
        }
        if self.tcp_flags & TCP_SYN != 0 {
            f |= ct_flags::TCP_SYN;
        }
        if self.tcp_flags & TCP_FIN != 0 {
            f |= ct_flags::TCP_FIN;
        }
        if self.tcp_flags & TCP_RST != 0 {
            f |= ct_flags::TCP_RST;
        }
        f
    }

    /// Whether the raw flags are a bare connection attempt (SYN, no RST or
    /// ACK).
    #[inline(always)]
    pub fn is_syn_only(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0 && self.tcp_flags & (TCP_RST | TCP_ACK) == 0
    }

    #[inline(always)]
    fn l4_csum(&self) -> L4Csum {
        if self.tuple.proto == proto::TCP {
            L4Csum {
                off: self.l4_off + offset_of!(TcpHdr, check),
                udp: false,
            }
        } else {
            L4Csum {
                off: self.l4_off + offset_of!(UdpHdr, check),
                udp: true,
            }
        }
    }

    #[inline(always)]
    fn sport_off(&self) -> usize {
        self.l4_off + offset_of!(UdpHdr, sport)
    }

    #[inline(always)]
    fn dport_off(&self) -> usize {
        self.l4_off + offset_of!(UdpHdr, dport)
    }

    /// DNAT: destination address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_dst<C: Ctx>(&self, ctx: &C, addr: A, port: u16) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            A::DADDR_OFF,
            t.daddr,
            addr,
            self.dport_off(),
            t.dport,
            port,
        )
    }

    /// Reverse NAT / SNAT: source address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_src<C: Ctx>(&self, ctx: &C, addr: A, port: u16) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            A::SADDR_OFF,
            t.saddr,
            addr,
            self.sport_off(),
            t.sport,
            port,
        )
    }

    /// Source address only (hairpin SNAT); the port stays.
    #[inline(always)]
    pub fn rewrite_src_addr<C: Ctx>(&self, ctx: &C, addr: A) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            A::SADDR_OFF,
            t.saddr,
            addr,
            self.sport_off(),
            t.sport,
            t.sport,
        )
    }

    /// Destination address only (hairpin reply); the port stays.
    #[inline(always)]
    pub fn rewrite_dst_addr<C: Ctx>(&self, ctx: &C, addr: A) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            A::DADDR_OFF,
            t.daddr,
            addr,
            self.dport_off(),
            t.dport,
            t.dport,
        )
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rewrite<C: Ctx>(
        &self,
        ctx: &C,
        addr_off: usize,
        old_addr: A,
        new_addr: A,
        port_off: usize,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), Error> {
        // A later fragment has no L4 header: only the addresses change
        // (the first fragment's L4 checksum covers the whole datagram).
        let csum = (self.frag != Frag::Later).then(|| self.l4_csum());
        // The L4 checksum covers the pseudo-header (addresses) and the
        // ports.
        A::csum_addr(ctx, csum, old_addr, new_addr)?;
        if let Some(c) = csum
            && old_port != new_port
        {
            ctx.l4_csum_port(c, old_port, new_port)?;
            ctx.write(port_off, &new_port)?;
        }
        ctx.write(addr_off, &new_addr)?;
        A::remember_fragment(self.frag, &self.tuple, self.id);
        Ok(())
    }
}
