//! The 5-tuple of a packet and every map key derived from it.
//!
//! Generic over the address type: IPv4 addresses are raw network-order
//! `u32`s, IPv6 ones `proxy_common::Ip6` (four such words). Each family
//! implements [`Addr`]: its map keys and the maps they key. The code built
//! on [`Tuple`] (parser, conntrack, reverse NAT, reject) is one copy for
//! both families.

use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use proxy_common::{
    AffinityKey, AffinityKey6, CtKey, CtKey6, CtValue, FragKey, FragKey6, FragValue, HAIRPIN_ADDR,
    HAIRPIN_ADDR6, Ip6, POD_NETS, ServiceKey, ServiceKey6, ServiceValue, SourceRangeKey, svc_flags,
};

use crate::{
    error::Error,
    frag::Frag,
    lb::{Affinity, Backends},
    maps::{
        CONFIG, CONNTRACK, CONNTRACK6, FRAGMENTS, FRAGMENTS6, REVNAT, REVNAT6, SERVICES, SERVICES6,
        SOURCE_RANGES, count,
    },
};

/// An address family's address, its map keys and the maps they key.
pub trait Addr: Copy + PartialEq + Backends {
    type CtKey;
    type AffinityKey: Affinity;

    /// The hairpin source address ([`HAIRPIN_ADDR`] / [`HAIRPIN_ADDR6`]),
    /// raw.
    const HAIRPIN: Self;

    /// The frontend `t` is addressed to, if any.
    fn service(t: &Tuple<Self>) -> Option<ServiceValue>;
    fn ct_key(t: &Tuple<Self>, dir: u8) -> Self::CtKey;
    fn ct_get_ptr_mut(key: &Self::CtKey) -> Option<*mut CtValue>;
    /// Insert with `flags` (`BPF_NOEXIST` ...); false when it failed.
    fn ct_insert(key: &Self::CtKey, value: &CtValue, flags: u64) -> bool;
    /// The frontend (address, port) replies of frontend `service_id` must
    /// carry.
    fn revnat(service_id: u32) -> Option<(Self, u16)>;
    /// Session affinity key of a client (per-packet path).
    fn affinity_key(client: Self, service_id: u32) -> Self::AffinityKey;
    /// `loadBalancerSourceRanges` of a frontend flagged `SOURCE_RANGES`.
    fn check_source(svc: &ServiceValue, saddr: Self) -> Result<(), Error>;
    /// The address folded to one word, for `proxy_common::reply_dst_slot`.
    fn fold(self) -> u32;
    /// The ports of a later fragment's datagram (see [`crate::frag`]).
    fn later_ports(saddr: Self, daddr: Self, id: u32, proto: u8) -> Result<FragValue, Error>;
    /// A translated first fragment's later fragments must follow.
    fn remember_fragment(frag: Frag, t: &Tuple<Self>, id: u32);
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

impl Tuple<u32> {
    /// The frontend this packet is addressed to.
    #[inline(always)]
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.daddr,
            port: self.dport,
            proto: self.proto,
            scope: 0,
        }
    }
}

/// Whether `addr` (network order) is inside one of `CONFIG`'s pod networks.
#[inline(always)]
fn to_pod_network(addr: u32) -> bool {
    let Some(c) = CONFIG.get(0) else {
        return false;
    };
    let mut i = 0;
    while i < POD_NETS {
        if c.pod_nets[i].contains(addr) {
            return true;
        }
        i += 1;
    }
    false
}

impl Addr for u32 {
    type CtKey = CtKey;
    type AffinityKey = AffinityKey;

    const HAIRPIN: u32 = u32::from_ne_bytes(HAIRPIN_ADDR);

    #[inline(always)]
    fn service(t: &Tuple<u32>) -> Option<ServiceValue> {
        // Fast exit before the hash lookup: a destination inside the pod
        // networks is a pod (the agent clears them while a frontend lies
        // there). That is all pod-to-pod traffic, including what socket LB
        // translated at connect() and what the per-packet path already
        // sent to its backend: no hash lookup whose cost grows with the
        // number of frontends, just the array slot the verifier inlines.
        if to_pod_network(t.daddr) {
            return None;
        }
        // SAFETY: the value is copied out at once; a concurrent update
        // replaces the whole value, so the copy is either the old or the
        // new one.
        unsafe { SERVICES.get(t.service_key()) }.copied()
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
    fn ct_get_ptr_mut(key: &CtKey) -> Option<*mut CtValue> {
        CONNTRACK.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey, value: &CtValue, flags: u64) -> bool {
        CONNTRACK.insert(key, value, flags).is_ok()
    }

    #[inline(always)]
    fn revnat(service_id: u32) -> Option<(u32, u16)> {
        // SAFETY: copied out at once.
        unsafe { REVNAT.get(service_id) }.map(|r| (r.addr, r.port))
    }

    #[inline(always)]
    fn affinity_key(client: u32, service_id: u32) -> AffinityKey {
        AffinityKey {
            client_netns: 0,
            client_addr: client,
            service_id,
        }
    }

    #[inline(always)]
    fn check_source(svc: &ServiceValue, saddr: u32) -> Result<(), Error> {
        if svc.flags & svc_flags::SOURCE_RANGES == 0 {
            return Ok(());
        }
        let k = LpmKey::new(
            64,
            SourceRangeKey {
                service_id_be: svc.id.to_be(),
                addr: saddr,
            },
        );
        if SOURCE_RANGES.get(&k).is_none() {
            return Err(Error::SourceRange);
        }
        Ok(())
    }

    #[inline(always)]
    fn fold(self) -> u32 {
        self
    }

    #[inline(always)]
    fn later_ports(saddr: u32, daddr: u32, id: u32, proto: u8) -> Result<FragValue, Error> {
        let key = FragKey {
            saddr,
            daddr,
            id: id as u16,
            proto,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let v = unsafe { FRAGMENTS.get(key) }
            .copied()
            .ok_or(Error::Fragment)?;
        count(proxy_common::stat::FRAG_MATCHED);
        Ok(v)
    }

    #[inline(always)]
    fn remember_fragment(frag: Frag, t: &Tuple<u32>, id: u32) {
        if frag == Frag::First {
            let key = FragKey {
                saddr: t.saddr,
                daddr: t.daddr,
                id: id as u16,
                proto: t.proto,
                _pad: 0,
            };
            let v = FragValue {
                sport: t.sport,
                dport: t.dport,
            };
            let _ = FRAGMENTS.insert(key, v, 0);
        }
    }
}

impl Addr for Ip6 {
    type CtKey = CtKey6;
    type AffinityKey = AffinityKey6;

    const HAIRPIN: Ip6 = {
        let a = HAIRPIN_ADDR6;
        [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ]
    };

    #[inline(always)]
    fn service(t: &Tuple<Ip6>) -> Option<ServiceValue> {
        // No pod-network fast exit: `Config` holds IPv4 networks only.
        let key = ServiceKey6 {
            addr: t.daddr,
            port: t.dport,
            proto: t.proto,
            scope: 0,
        };
        // SAFETY: copied out at once (see the IPv4 twin).
        unsafe { SERVICES6.get(key) }.copied()
    }

    #[inline(always)]
    fn ct_key(t: &Tuple<Ip6>, dir: u8) -> CtKey6 {
        CtKey6 {
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
    fn ct_get_ptr_mut(key: &CtKey6) -> Option<*mut CtValue> {
        CONNTRACK6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey6, value: &CtValue, flags: u64) -> bool {
        CONNTRACK6.insert(key, value, flags).is_ok()
    }

    #[inline(always)]
    fn revnat(service_id: u32) -> Option<(Ip6, u16)> {
        // SAFETY: copied out at once.
        unsafe { REVNAT6.get(service_id) }.map(|r| (r.addr, r.port))
    }

    #[inline(always)]
    fn affinity_key(client: Ip6, service_id: u32) -> AffinityKey6 {
        AffinityKey6 {
            client_addr: client,
            service_id,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn check_source(svc: &ServiceValue, _saddr: Ip6) -> Result<(), Error> {
        // No IPv6 source-range map: a guarded IPv6 frontend is closed
        // rather than open to every client (as socket LB leaves it).
        if svc.flags & svc_flags::SOURCE_RANGES != 0 {
            return Err(Error::SourceRange);
        }
        Ok(())
    }

    #[inline(always)]
    fn fold(self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }

    #[inline(always)]
    fn later_ports(saddr: Ip6, daddr: Ip6, id: u32, proto: u8) -> Result<FragValue, Error> {
        let key = FragKey6 {
            saddr,
            daddr,
            id,
            proto,
            _pad: [0; 3],
        };
        // SAFETY: copied out at once.
        let v = unsafe { FRAGMENTS6.get(key) }
            .copied()
            .ok_or(Error::Fragment)?;
        count(proxy_common::stat::FRAG_MATCHED);
        Ok(v)
    }

    #[inline(always)]
    fn remember_fragment(frag: Frag, t: &Tuple<Ip6>, id: u32) {
        if frag == Frag::First {
            let key = FragKey6 {
                saddr: t.saddr,
                daddr: t.daddr,
                id,
                proto: t.proto,
                _pad: [0; 3],
            };
            let v = FragValue {
                sport: t.sport,
                dport: t.dport,
            };
            let _ = FRAGMENTS6.insert(key, v, 0);
        }
    }
}
