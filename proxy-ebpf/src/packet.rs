//! The one parser (Ethernet + IPv4 + TCP/UDP, bounds-checked) and the NAT
//! rewrites with their checksum fix-ups, for any hook ([`Ctx`]).

use proxy_common::{ct_flags, proto};

use crate::{
    ctx::{Ctx, L4Csum},
    error::Error,
    frag::{self, Frag},
    hdr::{
        ETH_P_IP, EthHdr, IP_CSUM_OFF, IP_DADDR_OFF, IP_DF, IP_SADDR_OFF, IPV4_HLEN, IPV4_VERSION,
        IPV4_VERSION_IHL, Ipv4Hdr, L3_OFF, L4_DPORT_OFF, L4_OFF, L4_SPORT_OFF, TCP_ACK,
        TCP_CSUM_OFF, TCP_FIN, TCP_HLEN, TCP_RST, TCP_SYN, TcpHdr, UDP_CSUM_OFF, UDP_HLEN, UdpHdr,
    },
    tuple::Tuple,
};

/// What the programs need of an IPv4 TCP/UDP packet.
pub struct Packet {
    /// For a later fragment, the ports come from its first fragment.
    pub tuple: Tuple<u32>,
    /// IPv4 total length.
    pub tot_len: u16,
    /// Raw TCP flags (0 for UDP and later fragments).
    pub tcp_flags: u8,
    /// IPv4 identification, network order.
    pub id: u16,
    pub frag: Frag,
    /// The sender forbade fragmentation (DF).
    pub dont_fragment: bool,
}

impl Packet {
    /// `Ok(None)` for traffic the proxy does not handle (not IPv4, not TCP or
    /// UDP); `Err` for IPv4 TCP/UDP it refuses to touch.
    #[inline(always)]
    pub fn parse<C: Ctx>(ctx: &C) -> Result<Option<Packet>, Error> {
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
        let frag = Frag::of(ip.frag_off);
        let tot_len = u16::from_be(ip.tot_len);
        let mut pkt = Packet {
            tuple: Tuple {
                saddr: ip.saddr,
                daddr: ip.daddr,
                sport: 0,
                dport: 0,
                proto: ip.protocol,
            },
            tot_len,
            tcp_flags: 0,
            id: ip.id,
            frag,
            dont_fragment: u16::from_be(ip.frag_off) & IP_DF != 0,
        };
        if frag == Frag::Later {
            let ports = frag::later_ports(ip.saddr, ip.daddr, ip.id, ip.protocol)?;
            pkt.tuple.sport = ports.sport;
            pkt.tuple.dport = ports.dport;
            pkt.dont_fragment = false;
            return Ok(Some(pkt));
        }
        let l4_len = if ip.protocol == proto::TCP {
            TCP_HLEN
        } else {
            UDP_HLEN
        };
        if (tot_len as usize) < IPV4_HLEN + l4_len {
            return Err(Error::Malformed);
        }
        if ip.protocol == proto::TCP {
            let tcp: TcpHdr = ctx.read(L4_OFF)?;
            (pkt.tuple.sport, pkt.tuple.dport) = (tcp.sport, tcp.dport);
            pkt.tcp_flags = tcp.flags;
        } else {
            let udp: UdpHdr = ctx.read(L4_OFF)?;
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
                off: TCP_CSUM_OFF,
                udp: false,
            }
        } else {
            L4Csum {
                off: UDP_CSUM_OFF,
                udp: true,
            }
        }
    }

    /// DNAT: destination address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_dst<C: Ctx>(&self, ctx: &C, addr: u32, port: u16) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            IP_DADDR_OFF,
            t.daddr,
            addr,
            L4_DPORT_OFF,
            t.dport,
            port,
        )
    }

    /// Reverse NAT / SNAT: source address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_src<C: Ctx>(&self, ctx: &C, addr: u32, port: u16) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            IP_SADDR_OFF,
            t.saddr,
            addr,
            L4_SPORT_OFF,
            t.sport,
            port,
        )
    }

    /// Source address only (hairpin SNAT); the port stays.
    #[inline(always)]
    pub fn rewrite_src_addr<C: Ctx>(&self, ctx: &C, addr: u32) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            IP_SADDR_OFF,
            t.saddr,
            addr,
            L4_SPORT_OFF,
            t.sport,
            t.sport,
        )
    }

    /// Destination address only (hairpin reply); the port stays.
    #[inline(always)]
    pub fn rewrite_dst_addr<C: Ctx>(&self, ctx: &C, addr: u32) -> Result<(), Error> {
        let t = &self.tuple;
        self.rewrite(
            ctx,
            IP_DADDR_OFF,
            t.daddr,
            addr,
            L4_DPORT_OFF,
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
        old_addr: u32,
        new_addr: u32,
        port_off: usize,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), Error> {
        // A later fragment has no L4 header: only the addresses change
        // (the first fragment's L4 checksum covers the whole datagram).
        if self.frag != Frag::Later {
            let csum = self.l4_csum();
            // The L4 checksum covers the pseudo-header (addresses) and the
            // ports.
            ctx.l4_csum_addr(csum, old_addr, new_addr)?;
            if old_port != new_port {
                ctx.l4_csum_port(csum, old_port, new_port)?;
                ctx.write(port_off, &new_port)?;
            }
        }
        ctx.l3_csum(IP_CSUM_OFF, old_addr, new_addr)?;
        ctx.write(addr_off, &new_addr)?;
        frag::remember(self.frag, &self.tuple, self.id);
        Ok(())
    }
}
