//! Bounded packet access, parsing and NAT rewrites with checksum fix-ups.

use core::mem;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use proxy_common::{FragKey, FragValue, ct_flags, proto, stat};

use crate::maps::{FRAGMENTS, count};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;
/// Fragment offset bits of `frag_off`.
const IP_OFFSET_MASK: u16 = 0x1fff;
/// "More fragments" bit of `frag_off`.
const IP_MF: u16 = 0x2000;
/// "Don't fragment" bit of `frag_off`.
const IP_DF: u16 = 0x4000;

/// Where a packet stands in a fragmented IPv4 datagram.
///
/// Only the first fragment carries the L4 header. When a hook translates a
/// first fragment it records the datagram's ports in `FRAGMENTS` under the
/// tuple the fragments carry at that hook ([`remember_fragment`]); the later
/// fragments find their ports there ([`later_fragment_ports`]), take the
/// same conntrack path and get the same address rewrite (their L4 checksum
/// lives in the first fragment, which was already fixed for the whole
/// datagram). A later fragment that arrives before its first one, or whose
/// datagram is not a service flow, passes untouched (`pass_fragment`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    Whole,
    /// Offset 0, more fragments follow: has the L4 header.
    First,
    /// Offset > 0: no L4 header.
    Later,
}

impl Frag {
    #[inline(always)]
    pub fn of(frag_off_be: u16) -> Frag {
        let f = u16::from_be(frag_off_be);
        if f & IP_OFFSET_MASK != 0 {
            Frag::Later
        } else if f & IP_MF != 0 {
            Frag::First
        } else {
            Frag::Whole
        }
    }
}

#[inline(always)]
fn frag_key(saddr: u32, daddr: u32, id: u16, proto: u8) -> FragKey {
    FragKey {
        saddr,
        daddr,
        id,
        proto,
        _pad: 0,
    }
}

/// The ports of a later fragment's datagram, if its first fragment was
/// translated at this hook; `Err(Fragment)` (pass untouched) otherwise.
#[inline(always)]
pub fn later_fragment_ports(
    saddr: u32,
    daddr: u32,
    id: u16,
    proto: u8,
) -> Result<FragValue, Error> {
    // SAFETY: copied out at once.
    let v = unsafe { FRAGMENTS.get(&frag_key(saddr, daddr, id, proto)) }
        .copied()
        .ok_or(Error::Fragment)?;
    count(stat::FRAG_MATCHED);
    Ok(v)
}

/// A first fragment was translated: its later fragments must follow.
#[inline(always)]
pub fn remember_fragment(
    frag: Frag,
    saddr: u32,
    daddr: u32,
    id: u16,
    proto: u8,
    sport: u16,
    dport: u16,
) {
    if frag == Frag::First {
        let _ = FRAGMENTS.insert(
            &frag_key(saddr, daddr, id, proto),
            &FragValue { sport, dport },
            0,
        );
    }
}

/// Why a packet was not translated. Each maps to a counter and a verdict.
#[derive(Clone, Copy)]
pub enum Error {
    /// Truncated or inconsistent headers: passed untouched.
    Malformed,
    /// IPv4 header with options: passed untouched.
    IpOptions,
    /// A fragment: passed untouched.
    Fragment,
    /// Frontend without backends: dropped.
    NoBackend,
    /// Frontend whose slot or backend is missing: dropped.
    NoSlot,
    /// A store or checksum helper failed: dropped (half-rewritten).
    Rewrite,
    /// Mid-flow TCP to a frontend without a conntrack entry: dropped.
    CtInvalid,
    /// Client outside the frontend's source ranges: dropped.
    SourceRange,
    /// DSR packet too large for the egress MTU once the option is added:
    /// dropped.
    DsrMtu,
}

impl Error {
    pub fn stat(self) -> u32 {
        match self {
            Error::Malformed => stat::PASS_MALFORMED,
            Error::IpOptions => stat::PASS_IP_OPTIONS,
            Error::Fragment => stat::PASS_FRAGMENT,
            Error::NoBackend => stat::DROP_NO_BACKEND,
            Error::NoSlot => stat::DROP_NO_SLOT,
            Error::Rewrite => stat::DROP_REWRITE,
            Error::CtInvalid => stat::DROP_CT_INVALID,
            Error::SourceRange => stat::DROP_SOURCE_RANGE,
            Error::DsrMtu => stat::DROP_DSR_MTU,
        }
    }

    pub fn drops(self) -> bool {
        matches!(
            self,
            Error::NoBackend
                | Error::NoSlot
                | Error::Rewrite
                | Error::CtInvalid
                | Error::SourceRange
                | Error::DsrMtu
        )
    }
}

/// A pointer to a `T` at `offset`, only if all of it lies inside the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Error::Malformed);
    }
    Ok((start + offset) as *const T)
}

#[repr(C)]
#[allow(dead_code)] // the layout needs every field; some are never read
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: u32,
    daddr: u32,
}

/// The fields of an IPv4 TCP/UDP packet the programs need. Addresses and
/// ports in network byte order.
pub struct Packet {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// IPv4 total length.
    pub tot_len: u16,
    tcp_flags: u8,
    /// IPv4 identification, network byte order.
    id: u16,
    pub frag: Frag,
    /// The sender forbade fragmentation (DF).
    pub dont_fragment: bool,
}

impl Packet {
    /// `Ok(None)` for traffic the proxy does not handle (not IPv4, not TCP or
    /// UDP); `Err` for IPv4 TCP/UDP it refuses to touch.
    #[inline(always)]
    pub fn parse(ctx: &TcContext) -> Result<Option<Packet>, Error> {
        // Headers normally sit in the linear part; make sure they do.
        let want = (L4_OFF + TCP_HLEN) as u32;
        if ctx.data_end() - ctx.data() < want as usize && ctx.len() >= want {
            let _ = ctx.pull_data(want);
        }

        let ethertype: *const u16 = ptr_at(ctx, 12)?;
        // SAFETY: bounds checked by ptr_at.
        if u16::from_be(unsafe { ethertype.read_unaligned() }) != ETH_P_IP {
            return Ok(None);
        }
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by ptr_at; read as a copy.
        let ip = unsafe { ip.read_unaligned() };
        if ip.protocol != proto::TCP && ip.protocol != proto::UDP {
            return Ok(None);
        }
        if ip.version_ihl >> 4 != 4 {
            return Err(Error::Malformed);
        }
        if ip.version_ihl & 0x0f != 5 {
            return Err(Error::IpOptions);
        }
        let frag = Frag::of(ip.frag_off);
        if frag == Frag::Later {
            let ports = later_fragment_ports(ip.saddr, ip.daddr, ip.id, ip.protocol)?;
            return Ok(Some(Packet {
                saddr: ip.saddr,
                daddr: ip.daddr,
                sport: ports.sport,
                dport: ports.dport,
                proto: ip.protocol,
                tot_len: u16::from_be(ip.tot_len),
                tcp_flags: 0,
                id: ip.id,
                frag,
                dont_fragment: false,
            }));
        }
        let l4_len = if ip.protocol == proto::TCP {
            TCP_HLEN
        } else {
            UDP_HLEN
        };
        if (u16::from_be(ip.tot_len) as usize) < IPV4_HLEN + l4_len {
            return Err(Error::Malformed);
        }
        let ports: *const [u16; 2] = ptr_at(ctx, L4_OFF)?;
        // SAFETY: bounds checked by ptr_at.
        let ports = unsafe { ports.read_unaligned() };
        let tcp_flags = if ip.protocol == proto::TCP {
            let hdr: *const [u8; TCP_HLEN] = ptr_at(ctx, L4_OFF)?;
            // SAFETY: bounds checked by ptr_at (the whole fixed TCP header).
            unsafe { (*hdr)[13] }
        } else {
            let _: *const [u8; UDP_HLEN] = ptr_at(ctx, L4_OFF)?;
            0
        };
        Ok(Some(Packet {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: ports[0],
            dport: ports[1],
            proto: ip.protocol,
            tot_len: u16::from_be(ip.tot_len),
            tcp_flags,
            id: ip.id,
            frag,
            dont_fragment: u16::from_be(ip.frag_off) & IP_DF != 0,
        }))
    }

    /// A non-first fragment: no L4 header (ports from its first fragment).
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.frag == Frag::Later
    }

    /// Conntrack key for this packet's own tuple, seen in direction `dir`.
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> proxy_common::CtKey {
        proxy_common::CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    /// Raw TCP flags (0 for UDP).
    #[inline(always)]
    pub fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }

    /// Conntrack flag bits for this packet's TCP flags.
    #[inline(always)]
    pub fn tcp_ct_flags(&self) -> u32 {
        let mut f = 0;
        if self.frag == Frag::Later {
            return f;
        }
        if self.proto == proto::TCP && self.tcp_flags & 0x02 == 0 {
            f |= ct_flags::TCP_ESTABLISHED;
        }
        if self.tcp_flags & 0x02 != 0 {
            f |= ct_flags::TCP_SYN;
        }
        if self.tcp_flags & 0x01 != 0 {
            f |= ct_flags::TCP_FIN;
        }
        if self.tcp_flags & 0x04 != 0 {
            f |= ct_flags::TCP_RST;
        }
        f
    }

    #[inline(always)]
    fn l4_csum(&self) -> (usize, u64) {
        if self.proto == proto::TCP {
            (TCP_CSUM_OFF, 0)
        } else {
            // A zero UDP checksum means "none": leave it so.
            (UDP_CSUM_OFF, BPF_F_MARK_MANGLED_0 as u64)
        }
    }

    /// DNAT: destination address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_dst(&self, ctx: &TcContext, addr: u32, port: u16) -> Result<(), Error> {
        self.rewrite(
            ctx,
            IP_DADDR_OFF,
            self.daddr,
            addr,
            L4_OFF + 2,
            self.dport,
            port,
        )
    }

    /// Reverse NAT: source address and port become `addr:port`.
    #[inline(always)]
    pub fn rewrite_src(&self, ctx: &TcContext, addr: u32, port: u16) -> Result<(), Error> {
        self.rewrite(
            ctx,
            IP_SADDR_OFF,
            self.saddr,
            addr,
            L4_OFF,
            self.sport,
            port,
        )
    }

    /// Source address only (hairpin SNAT); the port stays.
    #[inline(always)]
    pub fn rewrite_src_addr(&self, ctx: &TcContext, addr: u32) -> Result<(), Error> {
        self.rewrite(
            ctx,
            IP_SADDR_OFF,
            self.saddr,
            addr,
            L4_OFF,
            self.sport,
            self.sport,
        )
    }

    /// Destination address only (hairpin reply); the port stays.
    #[inline(always)]
    pub fn rewrite_dst_addr(&self, ctx: &TcContext, addr: u32) -> Result<(), Error> {
        self.rewrite(
            ctx,
            IP_DADDR_OFF,
            self.daddr,
            addr,
            L4_OFF + 2,
            self.dport,
            self.dport,
        )
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn rewrite(
        &self,
        ctx: &TcContext,
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
            let (csum_off, mangled) = self.l4_csum();
            // L4 checksum covers the pseudo-header (addresses) and the ports.
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )
            .map_err(|_| Error::Rewrite)?;
            if old_port != new_port {
                ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)
                    .map_err(|_| Error::Rewrite)?;
                ctx.store(port_off, &new_port, 0)
                    .map_err(|_| Error::Rewrite)?;
            }
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| Error::Rewrite)?;
        ctx.store(addr_off, &new_addr, 0)
            .map_err(|_| Error::Rewrite)?;
        remember_fragment(
            self.frag, self.saddr, self.daddr, self.id, self.proto, self.sport, self.dport,
        );
        Ok(())
    }
}
