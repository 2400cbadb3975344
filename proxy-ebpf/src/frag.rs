//! IPv4 fragments of service flows.
//!
//! Only the first fragment carries the L4 header. When a hook translates a
//! first fragment it records the datagram's ports in `FRAGMENTS` under the
//! tuple the fragments carry at that hook ([`remember`]); the later
//! fragments find their ports there ([`later_ports`]), take the same
//! conntrack path and get the same address rewrite (their L4 checksum lives
//! in the first fragment, which was already fixed for the whole datagram).
//! A later fragment that arrives before its first one, or whose datagram is
//! not a service flow, passes untouched (`PASS_FRAGMENT`).

use proxy_common::{FragValue, stat};

use crate::{
    error::Error,
    hdr::{IP_MF, IP_OFFSET_MASK},
    maps::{FRAGMENTS, count},
    tuple::{Addr, Tuple},
};

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

/// The ports of a later fragment's datagram, if its first fragment was
/// translated at this hook; `Err(Fragment)` (pass untouched) otherwise.
#[inline(always)]
pub fn later_ports(saddr: u32, daddr: u32, id: u16, proto: u8) -> Result<FragValue, Error> {
    // SAFETY: copied out at once.
    let v = unsafe { FRAGMENTS.get(u32::frag_key(saddr, daddr, id, proto)) }
        .copied()
        .ok_or(Error::Fragment)?;
    count(stat::FRAG_MATCHED);
    Ok(v)
}

/// A first fragment with tuple `t` was translated: its later fragments
/// must follow.
#[inline(always)]
pub fn remember(frag: Frag, t: &Tuple<u32>, id: u16) {
    if frag == Frag::First {
        let _ = FRAGMENTS.insert(
            u32::frag_key(t.saddr, t.daddr, id, t.proto),
            FragValue {
                sport: t.sport,
                dport: t.dport,
            },
            0,
        );
    }
}
