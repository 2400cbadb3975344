//! IPv4 fragments of service flows.
//!
//! Only the first fragment carries the L4 header. When a hook translates a
//! first fragment it records the datagram's ports in `FRAGMENTS` under the
//! tuple the fragments carry at that hook (`Addr::remember_fragment`); the
//! later fragments find their ports there (`Addr::later_ports`), take the same
//! conntrack path and get the same address rewrite (their L4 checksum lives
//! in the first fragment, which was already fixed for the whole datagram).
//! A later fragment that arrives before its first one, or whose datagram is
//! not a service flow, passes untouched (`PASS_FRAGMENT`).
//!
//! IPv6 fragments are not followed: the parser refuses every packet with a
//! non-atomic fragment header (`PASS_FRAGMENT`), so a fragmented IPv6
//! datagram passes untouched whole, its first fragment included (never
//! half-translated).

use crate::hdr::{IP_MF, IP_OFFSET_MASK};

/// Where a packet stands in a fragmented datagram.
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
    /// From the IPv4 `frag_off` field as on the wire.
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
