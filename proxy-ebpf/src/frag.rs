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
//! IPv6 the same way, in `FRAGS_V6` (keyed by the 32-bit fragment header
//! identification): the parser's walk marks a fragment header with the M
//! flag and offset 0 as the first fragment (its upper-layer header follows
//! the rest of the chain) and one with a nonzero offset as a later
//! fragment, whose walk ends at the fragment header. A later fragment is
//! followed only when the upper layer comes right after its fragment
//! header (no extension header in the fragmentable part); otherwise it
//! passes untouched (`PASS_FRAGMENT`).

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
