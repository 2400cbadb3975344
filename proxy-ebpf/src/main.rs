//! Kernel side of the service proxy.
//!
//! Programs, one module per hook:
//! * [`pod`]: tc on pods' host interfaces (DNAT, conntrack, reverse NAT,
//!   reject, hairpin, affinity).
//! * [`netdev`]: tc on the node's external interfaces (north-south
//!   rewrites that need the skb: SNAT, DSR, reject).
//! * [`xdp`]: XDP on the external interfaces (decides north-south flows,
//!   DNATs local backends).
//! * [`sock`]: socket LB, cgroup hooks translating at connect() time.
//!
//! Shared by the per-packet programs:
//! * [`ctx`]: one packet view over tc and XDP contexts; [`hdr`]: header
//!   layouts and constants; [`packet`]: the parser and NAT rewrites;
//!   [`tuple`]: the 5-tuple and the map keys built from it; [`flow`]:
//!   conntrack lookups and the one flow-start path; [`lb`]: backend
//!   selection; [`frag`]: fragments; [`dsr`]: direct server return;
//!   [`reject`]: RST / ICMP answers; [`error`]: why a packet was not
//!   translated (a counter and a verdict each).
//!
//! [`pod`] serves IPv4 and IPv6 through one generic path ([`packet`],
//! [`tuple`], [`flow`], [`reject`] are generic over the address family);
//! [`netdev`] and [`xdp`] (north-south) are IPv4 only and pass IPv6
//! untouched. Anything that is not TCP/UDP of a family the hook serves,
//! or is malformed, truncated, carries IPv4 options or an IPv6
//! extension-header chain past the parser's bound, passes untouched and
//! is counted. Fragmented datagrams of service flows are translated whole:
//! the later fragments follow their first fragment (see [`frag`]).
#![no_std]
#![no_main]

mod ctx;
mod dsr;
mod error;
mod flow;
mod frag;
mod hdr;
mod lb;
mod maps;
mod netdev;
mod packet;
mod pod;
mod reject;
mod sock;
mod tuple;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
