//! XDP on the node's external interfaces: NodePort, ExternalIP and
//! LoadBalancer traffic from outside the cluster, and the replies of flows
//! it SNATed.
//!
//! Translated packets are handed to the stack with `XDP_PASS`, which routes
//! them to the pod's interface (local backend) or back out to the other
//! node (remote backend). That avoids the veth `XDP_REDIRECT` traps noted in
//! DESIGN.md (receiving veth needs NAPI, sending side checksum offload) at
//! the cost of the stack's routing step.
//!
//! * Local backend: DNAT only; the client's address is kept, and the pod's
//!   reply is reverse-translated by `tc_from_pod` on the pod's interface.
//! * Remote backend: XDP chooses the backend and records the flow (SNAT to
//!   the node address from `CONFIG`, so the reply comes back through this
//!   node); `tc_from_netdev` on the same interface rewrites it and its
//!   replies and sends them out with `bpf_redirect_neigh`: with the node's
//!   own address as source, the stack would drop them as martians, and on
//!   veth an `XDP_TX` needs NAPI on the peer (DESIGN.md).
//! * Local backend replies leave through the external interface, where
//!   `tc_to_netdev` restores the frontend as source after routing.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::xdp,
    programs::XdpContext,
};
use proxy_common::{CtKey, ServiceKey, ct_dir, ct_flags, proto, stat};

use crate::{
    lb,
    maps::{BACKENDS, CONNTRACK, SERVICES, account, count},
    nodeport,
    packet::{Error, Frag, later_fragment_ports, remember_fragment},
};

const ETH_HLEN: usize = 14;
const L4_OFF: usize = ETH_HLEN + 20;

#[xdp]
pub fn xdp_nodeport(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(v) => v,
        Err(e) => {
            count(e.stat());
            if e.drops() { XDP_DROP } else { XDP_PASS }
        }
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Error> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Error::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// Pointers to the fields a translation touches, all bounds-checked, and
/// the tuple as it arrived.
struct Hdrs {
    daddr_p: *mut u32,
    ip_csum: *mut u16,
    /// Source and destination port; None for a later fragment (no L4
    /// header: its ports come from the first fragment).
    ports: Option<(*mut u16, *mut u16)>,
    /// None for UDP without checksum and for later fragments.
    l4_csum: Option<*mut u16>,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    /// IPv4 identification, network byte order.
    id: u16,
    frag: Frag,
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Option<Hdrs>, Error> {
    let ethertype: *mut u16 = ptr_at(ctx, 12)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { *ethertype }) != 0x0800 {
        return Ok(None);
    }
    let ip: *mut [u8; 20] = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let protocol = ip[9];
    if protocol != proto::TCP && protocol != proto::UDP {
        return Ok(None);
    }
    if ip[0] >> 4 != 4 {
        return Err(Error::Malformed);
    }
    if ip[0] & 0x0f != 5 {
        return Err(Error::IpOptions);
    }
    let word = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
    let (saddr, daddr) = (word(12), word(16));
    let id = u16::from_ne_bytes([ip[4], ip[5]]);
    let frag = Frag::of(u16::from_ne_bytes([ip[6], ip[7]]));
    let mut h = Hdrs {
        daddr_p: ptr_at(ctx, ETH_HLEN + 16)?,
        ip_csum: ptr_at(ctx, ETH_HLEN + 10)?,
        ports: None,
        l4_csum: None,
        saddr,
        daddr,
        sport: 0,
        dport: 0,
        proto: protocol,
        tcp_flags: 0,
        id,
        frag,
    };
    if frag == Frag::Later {
        let ports = later_fragment_ports(saddr, daddr, id, protocol)?;
        h.sport = ports.sport;
        h.dport = ports.dport;
        return Ok(Some(h));
    }
    if protocol == proto::TCP {
        let tcp: *mut [u8; 20] = ptr_at(ctx, L4_OFF)?;
        // SAFETY: bounds checked by ptr_at.
        h.tcp_flags = unsafe { (*tcp)[13] };
        h.l4_csum = Some(ptr_at::<u16>(ctx, L4_OFF + 16)?);
    } else {
        let c: *mut u16 = ptr_at(ctx, L4_OFF + 6)?;
        // SAFETY: bounds checked by ptr_at.
        if unsafe { *c } != 0 {
            h.l4_csum = Some(c);
        }
    }
    let (sport, dport): (*mut u16, *mut u16) = (ptr_at(ctx, L4_OFF)?, ptr_at(ctx, L4_OFF + 2)?);
    // SAFETY: bounds checked by ptr_at.
    (h.sport, h.dport) = unsafe { (*sport, *dport) };
    h.ports = Some((sport, dport));
    Ok(Some(h))
}

/// RFC 1624 incremental update of a ones'-complement checksum, on raw
/// (network-order) words: byte order does not matter to the arithmetic as
/// long as everything is loaded the same way.
#[inline(always)]
fn ip_csum_replace(check: u16, old: u32, new: u32) -> u16 {
    let mut sum: u32 = (!check) as u32;
    sum += (!(old as u16)) as u32 + (!((old >> 16) as u16)) as u32;
    sum += (new as u16) as u32 + ((new >> 16) as u16) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The same for an L4 checksum: a result of 0 is sent as 0xffff (0 means
/// "no checksum" for UDP; equivalent for TCP).
#[inline(always)]
fn csum_replace(check: u16, old: u32, new: u32) -> u16 {
    match ip_csum_replace(check, old, new) {
        0 => 0xffff,
        r => r,
    }
}

impl Hdrs {
    /// DNAT: the destination becomes `addr:port`, both checksums fixed
    /// (a later fragment has neither ports nor L4 checksum). A translated
    /// first fragment is remembered so its later fragments follow.
    #[inline(always)]
    fn dst(&self, new_addr: u32, new_port: u16) {
        // SAFETY: all pointers were bounds-checked by `parse`.
        unsafe {
            *self.ip_csum = ip_csum_replace(*self.ip_csum, self.daddr, new_addr);
            if let Some(c) = self.l4_csum {
                let mut v = csum_replace(*c, self.daddr, new_addr);
                v = csum_replace(v, self.dport as u32, new_port as u32);
                *c = v;
            }
            *self.daddr_p = new_addr;
            if let Some((_, dport)) = self.ports {
                *dport = new_port;
            }
        }
        remember_fragment(
            self.frag, self.saddr, self.daddr, self.id, self.proto, self.sport, self.dport,
        );
    }
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, Error> {
    let Some(h) = parse(ctx)? else {
        return Ok(XDP_PASS);
    };
    count(stat::PACKETS);
    let (saddr, daddr, sport, dport) = (h.saddr, h.daddr, h.sport, h.dport);
    let key = CtKey {
        saddr,
        daddr,
        sport,
        dport,
        proto: h.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    if CONNTRACK.get_ptr(&key).is_some() {
        // A reply of a tracked flow: SNATed ones are finished by tc (they
        // need a neighbour lookup), east-west ones by tc after routing (a
        // NodePort frontend is a local address, which the stack would drop
        // as a martian source before routing).
        return Ok(XDP_PASS);
    }

    let skey = ServiceKey {
        addr: daddr,
        port: dport,
        proto: h.proto,
        scope: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = unsafe { SERVICES.get(&skey) }.copied() else {
        return Ok(XDP_PASS);
    };
    lb::check_source(&svc, saddr)?;
    if svc.count == 0 {
        // Rejected by tc on this interface (a RST or ICMP reply needs the
        // skb helpers to resize and send back).
        return Ok(XDP_PASS);
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = CtKey {
        dir: ct_dir::SERVICE,
        ..key
    };
    // SAFETY: copied out at once.
    let existing = unsafe { CONNTRACK.get(&fwd) }.copied().and_then(|ct| {
        // SAFETY: copied out at once.
        let b = unsafe { BACKENDS.get(&ct.backend_id) }.copied()?;
        (ct.service_id == svc.id).then_some((ct, b))
    });
    let (ct, backend) = match existing {
        Some(c) => c,
        None => {
            let flow = lb::Flow {
                saddr,
                daddr,
                sport,
                dport,
                proto: h.proto,
            };
            nodeport::start_flow(&svc, &flow, h.frag, h.tcp_flags, now)?
        }
    };
    if ct.flags & (ct_flags::SNAT | ct_flags::DSR) != 0 {
        // Remote backend: the flow is decided and tracked; tc on this
        // interface rewrites it and sends it on with a neighbour lookup
        // (routing it would drop it: its source becomes a local address).
        return Ok(XDP_PASS);
    }
    h.dst(backend.addr, backend.port);
    account(svc.id, (ctx.data_end() - ctx.data()) as u64);
    count(stat::DNAT);
    Ok(XDP_PASS)
}
