//! Wire formats: the header layouts the programs read and write, and every
//! protocol constant they use. Multi-byte fields are kept in network byte
//! order exactly as on the wire (addresses and ports are never converted:
//! the maps hold them raw too).

use core::mem::{offset_of, size_of};

pub use proxy_common::DSR_OPT_TYPE;

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// EtherType, network order.
    pub proto: u16,
}

pub const ETH_HLEN: usize = size_of::<EthHdr>();
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

pub const IPV4_HLEN: usize = size_of::<Ipv4Hdr>();
/// Version 4, header length 5 words: no options.
pub const IPV4_VERSION_IHL: u8 = 0x45;
pub const IPV4_VERSION: u8 = 4;
/// Fragment offset bits of `frag_off` (host order).
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// "More fragments" bit of `frag_off` (host order).
pub const IP_MF: u16 = 0x2000;
/// "Don't fragment" bit of `frag_off` (host order).
pub const IP_DF: u16 = 0x4000;
/// TTL of the packets the programs originate (RST, ICMP).
pub const IP_TTL: u8 = 64;
pub const IPPROTO_ICMP: u8 = 1;

/// IPv6 fixed header (RFC 8200). Addresses as four raw words
/// (`proxy_common::Ip6`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class, flow label; network order.
    pub vtc_flow: u32,
    /// Length after this header, network order.
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

pub const IPV6_HLEN: usize = size_of::<Ipv6Hdr>();
pub const IPV6_VERSION: u8 = 6;
/// Extension headers the parser walks (RFC 8200 section 4).
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_ICMPV6: u8 = 58;
/// At most this many extension headers are walked; a longer chain passes
/// untouched (`PASS_IPV6_EXT_HDRS`).
pub const IPV6_MAX_EXT_HDRS: usize = 6;

/// The first two bytes every walked extension header starts with.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6ExtHdr {
    pub nexthdr: u8,
    /// Length in 8-byte units, not counting the first 8 bytes (hop-by-hop,
    /// routing, destination options; the fragment header is always 8).
    pub hdrlen: u8,
}

/// IPv6 fragment header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    pub nexthdr: u8,
    pub reserved: u8,
    /// Offset (13 high bits, in 8-byte units) and the M flag (bit 0);
    /// network order.
    pub frag_off: u16,
    pub id: u32,
}

/// Offset bits and M flag of `Ipv6FragHdr::frag_off` (host order).
pub const IP6_OFFSET_MASK: u16 = 0xfff8;
pub const IP6_MF: u16 = 0x0001;

/// ICMPv6 destination unreachable, code "port unreachable" (RFC 4443).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PORT_UNREACH: u8 = 4;
/// Hop limit of the packets the programs originate (RST, ICMPv6).
pub const IPV6_HOP_LIMIT: u8 = 64;
/// Version 6, traffic class and flow label 0, as the first word holds it
/// (network order).
pub const IPV6_VTC_FLOW: u32 = 0x6000_0000u32.to_be();

/// TCP header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack_seq: u32,
    /// Data offset (high nibble, in words) and reserved bits.
    pub doff: u8,
    pub flags: u8,
    pub window: u16,
    pub check: u16,
    pub urg_ptr: u16,
}

pub const TCP_HLEN: usize = size_of::<TcpHdr>();
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// `doff` of a TCP header without options (5 words).
pub const TCP_DOFF_NO_OPTIONS: u8 = 0x50;

/// UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub check: u16,
}

pub const UDP_HLEN: usize = size_of::<UdpHdr>();

/// ICMP destination-unreachable header (RFC 792, RFC 1191 next-hop MTU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub type_: u8,
    pub code: u8,
    pub check: u16,
    pub unused: u16,
    /// Next-hop MTU (code 4), network order.
    pub mtu: u16,
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// The IPv4 option a DSR packet carries to the backend's node: the
/// frontend the backend must answer from.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DsrOpt {
    /// [`DSR_OPT_TYPE`].
    pub kind: u8,
    /// Option length in bytes: [`DSR_OPT_LEN`].
    pub len: u8,
    pub port: u16,
    pub addr: u32,
}

pub const DSR_OPT_LEN: usize = size_of::<DsrOpt>();
/// IPv4 header followed by the DSR option (IHL 7).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4DsrHdr {
    pub ip: Ipv4Hdr,
    pub opt: DsrOpt,
}
pub const IPV4_DSR_VERSION_IHL: u8 = 0x47;

/// Where the headers sit in a frame (no VLAN tag, no IPv4 options).
pub const L3_OFF: usize = ETH_HLEN;
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
pub const IP_CSUM_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, check);
pub const IP_SADDR_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, saddr);
pub const IP_DADDR_OFF: usize = L3_OFF + offset_of!(Ipv4Hdr, daddr);
pub const IP6_SADDR_OFF: usize = L3_OFF + offset_of!(Ipv6Hdr, saddr);
pub const IP6_DADDR_OFF: usize = L3_OFF + offset_of!(Ipv6Hdr, daddr);
/// Where L4 starts after an IPv6 header without extension headers.
pub const L4_OFF6: usize = ETH_HLEN + IPV6_HLEN;

const _: () = {
    assert!(ETH_HLEN == 14);
    assert!(IPV4_HLEN == 20);
    assert!(TCP_HLEN == 20);
    assert!(UDP_HLEN == 8);
    assert!(IPV6_HLEN == 40);
    assert!(size_of::<Ipv6FragHdr>() == 8);
    assert!(size_of::<IcmpHdr>() == 8);
    assert!(DSR_OPT_LEN == 8);
    assert!(size_of::<Ipv4DsrHdr>() == 28);
    // TCP and UDP ports sit at the same place.
    assert!(offset_of!(TcpHdr, sport) == offset_of!(UdpHdr, sport));
    assert!(offset_of!(TcpHdr, dport) == offset_of!(UdpHdr, dport));
};
