//! The per-packet path on a pod's host-side interface.
//!
//! * [`tc_from_pod`] (tc ingress: what the pod sends): a packet to a
//!   frontend is DNATed to a backend (conntrack keeps a flow on its backend;
//!   session affinity keeps a client on one); a frontend without backends is
//!   rejected (RST / ICMP port unreachable). A pod reaching itself through
//!   its service (hairpin) is also SNATed to [`HAIRPIN_ADDR`], and the
//!   replies to that address are translated back here.
//! * [`tc_to_pod`] (tc egress: what the pod receives): a reply from a
//!   backend is rewritten back to the frontend.

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_FRAG_NEEDED,
    },
    helpers::{bpf_check_mtu, bpf_ktime_get_ns},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    AffinityKey, Backend, CtKey, CtValue, DSR_OPT_TYPE, HAIRPIN_ADDR, ServiceKey, ServiceValue,
    ct_dir, ct_flags, stat,
};

use crate::{
    lb,
    maps::{BACKENDS, CONNTRACK, REVNAT, SERVICES, account, count},
    nodeport,
    packet::{Error, Packet},
    reject,
};

const HAIRPIN: u32 = u32::from_ne_bytes(HAIRPIN_ADDR);
/// Bytes the DSR option adds to the IPv4 header.
const DSR_OPT_LEN: i32 = 8;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    verdict(try_from_pod(&ctx))
}

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    verdict(try_to_pod(&ctx))
}

/// Turn the outcome of a `try_*` function into a deliberate verdict, counting
/// why a packet was not translated.
#[inline(always)]
fn verdict(r: Result<i32, Error>) -> i32 {
    match r {
        Ok(v) => v,
        Err(e) => {
            count(e.stat());
            if e.drops() {
                TC_ACT_SHOT as i32
            } else {
                TC_ACT_OK as i32
            }
        }
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    count(stat::PACKETS);
    if pkt.daddr == HAIRPIN {
        return hairpin_reply(ctx, &pkt);
    }

    let key = ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        proto: pkt.proto,
        scope: 0,
    };
    // SAFETY: the value is copied out at once; a concurrent update replaces
    // the whole value, so the copy is either the old or the new one.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return dsr_reply(ctx, &pkt);
    };
    // loadBalancerSourceRanges hold for clients inside the cluster too
    // (kube-proxy's firewall chain sees pods' traffic to the LB IP).
    lb::check_source(&svc, pkt.saddr)?;
    if svc.count == 0 {
        return reject::reject(ctx, &pkt);
    }

    let ct_key = pkt.ct_key(ct_dir::SERVICE);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp_flags = pkt.tcp_ct_flags();

    // An existing flow keeps its backend while that backend and the
    // frontend it belongs to still exist.
    let mut chosen: Option<(Backend, u32)> = None;
    if let Some(ct) = CONNTRACK.get_ptr_mut(&ct_key) {
        // SAFETY: pointer from a successful lookup; fields are plain integers.
        let (backend_id, service_id, flags) =
            unsafe { ((*ct).backend_id, (*ct).service_id, (*ct).flags) };
        if service_id == svc.id {
            // SAFETY: copied out at once (see above).
            if let Some(b) = unsafe { BACKENDS.get(&backend_id) } {
                chosen = Some((*b, flags));
                // SAFETY: as above.
                unsafe {
                    (*ct).last_seen_ns = now;
                    (*ct).flags |= tcp_flags;
                }
            }
        }
    }

    let (backend, flags) = match chosen {
        Some(c) => c,
        None => {
            if pkt.later_fragment() {
                // Its datagram's flow is gone: nothing to follow.
                return Err(Error::Fragment);
            }
            // Only a connection attempt may start a TCP flow (as kube-proxy
            // drops conntrack-INVALID packets).
            if pkt.proto == proxy_common::proto::TCP && pkt.tcp_flags() & 0x02 == 0 {
                return Err(Error::CtInvalid);
            }
            let client = AffinityKey {
                client_netns: 0,
                client_addr: pkt.saddr,
                service_id: svc.id,
            };
            let (id, b) = lb::select(&svc, client, now).inspect_err(|_| {
                // Never expected (slots are written before the service
                // entry); rare enough to log.
                warn!(ctx, "frontend {} has a missing slot or backend", svc.id);
            })?;
            let mut flags = tcp_flags;
            if b.addr == pkt.saddr {
                flags |= ct_flags::HAIRPIN;
                count(stat::HAIRPIN);
            }
            create_ct(&pkt, &ct_key, &svc, id, &b, now, flags);
            (b, flags)
        }
    };

    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    if flags & ct_flags::HAIRPIN != 0 {
        pkt.rewrite_src_addr(ctx, HAIRPIN)?;
    }
    account(svc.id, ctx.len() as u64);
    count(stat::DNAT);
    Ok(TC_ACT_OK as i32)
}

/// A hairpinned backend answering [`HAIRPIN_ADDR`]: make the reply come from
/// the frontend and go to the pod itself.
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    let key = pkt.ct_key(ct_dir::REPLY);
    // SAFETY: copied out at once.
    let Some(ct) = (unsafe { CONNTRACK.get(&key) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(&ct.service_id) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    pkt.rewrite_src(ctx, rev.addr, rev.port)?;
    pkt.rewrite_dst_addr(ctx, pkt.saddr)?;
    count(stat::REV_NAT);
    Ok(TC_ACT_OK as i32)
}

/// Remember the flow both ways: the client's tuple -> backend, and the
/// backend's reply tuple -> frontend (for reverse NAT).
#[inline(always)]
fn create_ct(
    pkt: &Packet,
    key: &CtKey,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &Backend,
    now: u64,
    flags: u32,
) {
    let value = CtValue {
        last_seen_ns: now,
        backend_id,
        service_id: svc.id,
        flags,
        _pad: 0,
        nat_addr: 0,
        nat_port: 0,
        _pad2: 0,
    };
    let reply = CtKey {
        saddr: backend.addr,
        daddr: if flags & ct_flags::HAIRPIN != 0 {
            HAIRPIN
        } else {
            pkt.saddr
        },
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    // The reply entry first: once the service entry exists, replies must be
    // translatable.
    if CONNTRACK.insert(&reply, &value, 0).is_err() || CONNTRACK.insert(key, &value, 0).is_err() {
        count(stat::CT_INSERT_FAIL);
    }
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    count(stat::PACKETS);
    reverse_nat(ctx, &pkt)
}

/// A reply of a tracked flow gets the frontend as its source.
#[inline(always)]
fn reverse_nat(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    let key = pkt.ct_key(ct_dir::REPLY);
    let Some(ct) = CONNTRACK.get_ptr_mut(&key) else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let service_id = unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
        (*ct).service_id
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(&service_id) }).copied() else {
        // The frontend is gone: the reply cannot be made to look right.
        return Ok(TC_ACT_OK as i32);
    };
    pkt.rewrite_src(ctx, rev.addr, rev.port)?;
    count(stat::REV_NAT);
    Ok(TC_ACT_OK as i32)
}

/// tc ingress on the node's external interfaces: the north-south flows XDP
/// chose a remote backend for (conntrack says SNAT), and their replies.
/// Both carry the node's own address as source once translated, which the
/// stack would drop as a martian if routed; `bpf_redirect_neigh` sends them
/// out with a FIB and neighbour lookup instead.
#[classifier]
pub fn tc_from_netdev(ctx: TcContext) -> i32 {
    verdict(try_from_netdev(&ctx))
}

/// tc egress on the node's external interfaces: replies of local backends
/// to north-south clients get the frontend as source, after routing (where
/// a node address as source is fine).
#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    verdict(try_to_netdev(&ctx))
}

/// A backend on this node answering a DSR flow: the reply leaves from the
/// frontend (on another node) straight to the client. Only DSR entries are
/// rewritten here, before routing: the frontend is not a local address on
/// this node, so that is safe (east-west replies wait for `tc_to_pod`).
#[inline(always)]
fn dsr_reply(ctx: &TcContext, pkt: &Packet) -> Result<i32, Error> {
    let Some(ct) = CONNTRACK.get_ptr_mut(&pkt.ct_key(ct_dir::REPLY)) else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: pointer from a successful lookup; plain integers.
    let (flags, addr, port) = unsafe { ((*ct).flags, (*ct).nat_addr, (*ct).nat_port) };
    if flags & ct_flags::DSR == 0 {
        return Ok(TC_ACT_OK as i32);
    }
    // SAFETY: as above.
    unsafe {
        (*ct).last_seen_ns = bpf_ktime_get_ns();
        (*ct).flags |= pkt.tcp_ct_flags();
    }
    pkt.rewrite_src(ctx, addr, port)?;
    count(stat::REV_NAT);
    Ok(TC_ACT_OK as i32)
}

/// On the backend's node: a DSR packet (IPv4 header + our 8-byte option)
/// records which frontend the backend must answer from, then goes on to
/// the pod with the option (Linux ignores unknown options on receive).
#[inline(always)]
fn dsr_ingress(ctx: &TcContext) -> Result<Option<i32>, Error> {
    let hdr: *const [u8; 28] = crate::packet::ptr_at(ctx, crate::packet::ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { hdr.read_unaligned() };
    if h[0] != 0x47 || h[20] != DSR_OPT_TYPE || h[21] != 8 {
        return Ok(None);
    }
    let protocol = h[9];
    // A later fragment carries no ports: its first fragment recorded the
    // flow, and the pod reassembles the datagram.
    if (protocol != proxy_common::proto::TCP && protocol != proxy_common::proto::UDP)
        || crate::packet::Frag::of(u16::from_ne_bytes([h[6], h[7]])) == crate::packet::Frag::Later
    {
        return Ok(None);
    }
    let ports: *const [u16; 2] = crate::packet::ptr_at(ctx, crate::packet::L4_OFF + 8)?;
    // SAFETY: bounds checked by ptr_at.
    let ports = unsafe { ports.read_unaligned() };
    let word = |i: usize| u32::from_ne_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let key = CtKey {
        saddr: word(16),
        daddr: word(12),
        sport: ports[1],
        dport: ports[0],
        proto: protocol,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(ct) = CONNTRACK.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*ct).last_seen_ns = now };
        return Ok(Some(TC_ACT_OK as i32));
    }
    let value = CtValue {
        last_seen_ns: now,
        backend_id: 0,
        service_id: 0,
        flags: ct_flags::DSR | ct_flags::TCP_ESTABLISHED,
        _pad: 0,
        nat_addr: word(24),
        nat_port: u16::from_ne_bytes([h[22], h[23]]),
        _pad2: 0,
    };
    if CONNTRACK.insert(&key, &value, 0).is_err() {
        count(stat::CT_INSERT_FAIL);
    }
    Ok(Some(TC_ACT_OK as i32))
}

/// On the receiving node: DNAT a DSR flow and add the option carrying the
/// frontend, then send it to the backend's node.
#[inline(always)]
fn dsr_forward(ctx: &TcContext, pkt: &Packet, ct: &CtValue) -> Result<i32, Error> {
    // SAFETY: copied out at once.
    let Some(b) = (unsafe { BACKENDS.get(&ct.backend_id) }).copied() else {
        return Err(Error::NoSlot);
    };
    // SAFETY: copied out at once.
    let Some(rev) = (unsafe { REVNAT.get(&ct.service_id) }).copied() else {
        return Err(Error::NoSlot);
    };
    // The option must fit the egress MTU (GSO packets are segmented later
    // and are not checked here). Too large: a DF packet learns the MTU it
    // must use from an ICMP "fragmentation needed"; others are dropped.
    let mut mtu: u32 = 0;
    // SAFETY: the skb pointer is the program's context; `mtu` is a live
    // stack variable the helper writes.
    let over = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, 0, &mut mtu, DSR_OPT_LEN, 0) }
        == BPF_MTU_CHK_RET_FRAG_NEEDED as i64;
    if over {
        if pkt.dont_fragment && !pkt.later_fragment() {
            return reject::frag_needed(ctx, pkt, (mtu as u16).saturating_sub(DSR_OPT_LEN as u16));
        }
        return Err(Error::DsrMtu);
    }
    pkt.rewrite_dst(ctx, b.addr, b.port)?;
    ctx.adjust_room(DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| Error::Rewrite)?;
    let p = rev.port.to_ne_bytes();
    let a = rev.addr.to_ne_bytes();
    let opt = [DSR_OPT_TYPE, 8, p[0], p[1], a[0], a[1], a[2], a[3]];
    ctx.store(crate::packet::L4_OFF, &opt, 0)
        .map_err(|_| Error::Rewrite)?;
    // The IPv4 header: IHL 7, total length + 8, checksum over 28 bytes.
    let hdr: *const [u8; 20] = crate::packet::ptr_at(ctx, crate::packet::ETH_HLEN)?;
    // SAFETY: bounds checked by ptr_at.
    let mut h = unsafe { hdr.read_unaligned() };
    let tot = u16::from_be_bytes([h[2], h[3]])
        .wrapping_add(8)
        .to_be_bytes();
    h[0] = 0x47;
    h[2] = tot[0];
    h[3] = tot[1];
    h[10] = 0;
    h[11] = 0;
    let mut words = [0u32; 7];
    for (i, w) in words.iter_mut().take(5).enumerate() {
        *w = u32::from_ne_bytes([h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]]);
    }
    words[5] = u32::from_ne_bytes([opt[0], opt[1], opt[2], opt[3]]);
    words[6] = u32::from_ne_bytes([opt[4], opt[5], opt[6], opt[7]]);
    let c = reject::csum(&mut words).to_ne_bytes();
    h[10] = c[0];
    h[11] = c[1];
    ctx.store(crate::packet::ETH_HLEN, &h, 0)
        .map_err(|_| Error::Rewrite)?;
    account(ct.service_id, ctx.len() as u64);
    count(stat::DNAT);
    Ok(redirect_out(ctx))
}

#[inline(always)]
fn try_from_netdev(ctx: &TcContext) -> Result<i32, Error> {
    if let Some(v) = dsr_ingress(ctx)? {
        return Ok(v);
    }
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    // SAFETY: copied out at once.
    if let Some(ct) = unsafe { CONNTRACK.get(&pkt.ct_key(ct_dir::REPLY)) }.copied() {
        if ct.flags & ct_flags::SNAT == 0 {
            // Another tracked flow's reply (east-west, or a local
            // backend's): rewritten after routing, as XDP leaves it.
            return Ok(TC_ACT_OK as i32);
        }
        // SAFETY: copied out at once.
        let Some(rev) = (unsafe { REVNAT.get(&ct.service_id) }).copied() else {
            return Ok(TC_ACT_OK as i32);
        };
        pkt.rewrite_src(ctx, rev.addr, rev.port)?;
        pkt.rewrite_dst(ctx, ct.nat_addr, ct.nat_port)?;
        count(stat::REV_NAT);
        return Ok(redirect_out(ctx));
    }
    // One lookup of the client's tuple serves every kind of flow XDP (or
    // this program) started.
    // SAFETY: copied out at once.
    let existing = unsafe { CONNTRACK.get(&pkt.ct_key(ct_dir::SERVICE)) }
        .copied()
        // SAFETY: copied out at once.
        .and_then(|ct| Some((ct, unsafe { BACKENDS.get(&ct.backend_id) }.copied()?)));
    let (ct, backend) = match existing {
        Some(c) => c,
        None => {
            // Not started by XDP (not attached: `--xdp-mode none`, or it
            // passed a packet it could not finish): a frontend's new flow
            // is set up here, as XDP would.
            let key = ServiceKey {
                addr: pkt.daddr,
                port: pkt.dport,
                proto: pkt.proto,
                scope: 0,
            };
            // SAFETY: copied out at once.
            let Some(svc) = unsafe { SERVICES.get(&key) }.copied() else {
                return Ok(TC_ACT_OK as i32);
            };
            lb::check_source(&svc, pkt.saddr)?;
            if svc.count == 0 {
                // A frontend without backends: reject, as for pods.
                return reject::reject(ctx, &pkt);
            }
            let flow = lb::Flow {
                saddr: pkt.saddr,
                daddr: pkt.daddr,
                sport: pkt.sport,
                dport: pkt.dport,
                proto: pkt.proto,
            };
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            nodeport::start_flow(&svc, &flow, pkt.frag, pkt.tcp_flags(), now)?
        }
    };
    if ct.flags & ct_flags::DSR != 0 {
        return dsr_forward(ctx, &pkt, &ct);
    }
    pkt.rewrite_dst(ctx, backend.addr, backend.port)?;
    account(ct.service_id, ctx.len() as u64);
    count(stat::DNAT);
    if ct.flags & ct_flags::SNAT != 0 {
        pkt.rewrite_src(ctx, ct.nat_addr, ct.nat_port)?;
        return Ok(redirect_out(ctx));
    }
    // A local backend: the stack routes the packet to the pod.
    Ok(TC_ACT_OK as i32)
}

/// Out of the interface the route to the (new) destination uses, resolving
/// the neighbour.
#[inline(always)]
fn redirect_out(ctx: &TcContext) -> i32 {
    // SAFETY: the skb pointer is the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no parameters: the kernel does the FIB lookup itself.
    unsafe { aya_ebpf::helpers::bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

#[inline(always)]
fn try_to_netdev(ctx: &TcContext) -> Result<i32, Error> {
    let Some(pkt) = Packet::parse(ctx)? else {
        return Ok(TC_ACT_OK as i32);
    };
    reverse_nat(ctx, &pkt)
}
