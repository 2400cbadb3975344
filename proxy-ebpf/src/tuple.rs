//! The 5-tuple of a packet and every map key derived from it.
//!
//! Generic over the address type: IPv4 addresses are raw network-order
//! `u32`s; a second family implements [`Addr`] with its own key types and
//! the code built on [`Tuple`] stays one copy.

use proxy_common::{AffinityKey, CtKey, FragKey, ServiceKey};

/// An address family's address, and the shape of its map keys.
pub trait Addr: Copy + PartialEq {
    type ServiceKey;
    type CtKey;
    type FragKey;
    type AffinityKey;

    fn service_key(t: &Tuple<Self>) -> Self::ServiceKey;
    fn ct_key(t: &Tuple<Self>, dir: u8) -> Self::CtKey;
    fn frag_key(saddr: Self, daddr: Self, id: u16, proto: u8) -> Self::FragKey;
    fn affinity_key(client: Self, service_id: u32) -> Self::AffinityKey;
}

/// Addresses and ports as on the wire (network order).
#[derive(Clone, Copy)]
pub struct Tuple<A: Addr> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl<A: Addr> Tuple<A> {
    /// The frontend this packet is addressed to.
    #[inline(always)]
    pub fn service_key(&self) -> A::ServiceKey {
        A::service_key(self)
    }

    /// Conntrack key of this tuple seen in direction `dir`
    /// (`proxy_common::ct_dir`).
    #[inline(always)]
    pub fn ct_key(&self, dir: u8) -> A::CtKey {
        A::ct_key(self, dir)
    }

    /// The tuple the replies carry once this packet is sent to
    /// `backend:backend_port` from `src:src_port` (the client itself, or
    /// the address it was NATed to).
    #[inline(always)]
    pub fn reply(&self, backend: A, backend_port: u16, src: A, src_port: u16) -> Tuple<A> {
        Tuple {
            saddr: backend,
            daddr: src,
            sport: backend_port,
            dport: src_port,
            proto: self.proto,
        }
    }

    /// Session affinity key of this tuple's client for a frontend.
    #[inline(always)]
    pub fn affinity_key(&self, service_id: u32) -> A::AffinityKey {
        A::affinity_key(self.saddr, service_id)
    }
}

impl Addr for u32 {
    type ServiceKey = ServiceKey;
    type CtKey = CtKey;
    type FragKey = FragKey;
    type AffinityKey = AffinityKey;

    #[inline(always)]
    fn service_key(t: &Tuple<u32>) -> ServiceKey {
        ServiceKey {
            addr: t.daddr,
            port: t.dport,
            proto: t.proto,
            scope: 0,
        }
    }

    #[inline(always)]
    fn ct_key(t: &Tuple<u32>, dir: u8) -> CtKey {
        CtKey {
            saddr: t.saddr,
            daddr: t.daddr,
            sport: t.sport,
            dport: t.dport,
            proto: t.proto,
            dir,
            _pad: 0,
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

    #[inline(always)]
    fn affinity_key(client: u32, service_id: u32) -> AffinityKey {
        AffinityKey {
            client_netns: 0,
            client_addr: client,
            service_id,
        }
    }
}
