//! Conntrack: finding a packet's flow, and starting one: [`start_pod`]
//! (tc on pods' interfaces, either family) and [`start_external`] (IPv4
//! north-south: tc on external interfaces and XDP) share the admission
//! check and the conntrack writes.
//!
//! A flow has a SERVICE entry under the client's tuple (-> backend) and,
//! unless it is DSR, a REPLY entry under the tuple the backend's replies
//! carry (-> frontend, for reverse NAT). The reply entry is written first:
//! once the service entry exists, replies must be translatable. Before a
//! reply entry is written its destination is noted in `REPLY_DSTS`, which
//! lets the reverse-NAT hooks skip conntrack for every other packet.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use proxy_common::{
    Backend, CtValue, ServiceValue, backend_flags, config_flags, ct_dir, ct_flags, stat,
};

use crate::{
    error::Error,
    lb,
    maps::{CONFIG, CONNTRACK, count, note_reply_dst},
    packet::{Packet, Wire},
    tuple::{Addr, Tuple},
};

/// SNAT ports are drawn from here (as the kernel's default ephemeral
/// range, less the top).
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_RANGE: u32 = 28232;
/// Candidate ports tried for one new SNAT flow (the client's own port,
/// then random ones) before the packet is dropped.
pub const SNAT_PROBES: u32 = 16;

/// The frontend this packet is addressed to (see `Addr::service`: IPv4
/// skips the lookup for destinations inside the pod networks).
#[inline(always)]
pub fn service<A: Wire>(pkt: &Packet<A>) -> Option<ServiceValue> {
    A::service(&pkt.tuple)
}

/// The packet's existing flow (SERVICE entry) whose backend still exists,
/// and, when `service_id` is given, that still belongs to that frontend.
/// The entry is stamped `now` and takes the packet's TCP flags, so the
/// agent's sweep sees the flow alive and in its TCP state, whichever hook
/// follows it.
#[inline(always)]
pub fn established<A: Wire>(
    pkt: &Packet<A>,
    service_id: Option<u32>,
    now: u64,
) -> Option<(CtValue, A::Backend)> {
    let ct = A::ct_get_ptr_mut(&pkt.tuple.ct_key(ct_dir::SERVICE))?;
    // SAFETY: pointer from a successful lookup; a copy of plain integers.
    let value = unsafe { *ct };
    if service_id.is_some_and(|id| id != value.service_id) {
        return None;
    }
    let b = A::backend(value.backend_id)?;
    // SAFETY: as above.
    unsafe {
        (*ct).last_seen_ns = now;
        (*ct).flags |= pkt.tcp_ct_flags();
    }
    Some((value, b))
}

/// Whether this packet may start a flow: not a later fragment (its
/// datagram's flow is gone), and a TCP SYN or any UDP.
#[inline(always)]
fn may_start<A: Wire>(pkt: &Packet<A>) -> Result<(), Error> {
    if pkt.later_fragment() {
        return Err(Error::Fragment);
    }
    if !pkt.starts_flow() {
        return Err(Error::CtInvalid);
    }
    Ok(())
}

#[inline(always)]
fn new_value<A: Wire>(pkt: &Packet<A>, svc: &ServiceValue, backend_id: u32, now: u64) -> CtValue {
    CtValue {
        last_seen_ns: now,
        backend_id,
        service_id: svc.id,
        flags: pkt.tcp_ct_flags(),
        _pad: 0,
        nat_addr: 0,
        nat_port: 0,
        _pad2: 0,
    }
}

/// A new east-west flow (a pod on this node to a frontend with backends),
/// either family: random or affinity selection; the client keeps its
/// address unless it reaches itself (hairpin: the source becomes
/// `Addr::HAIRPIN`). Returns the SERVICE conntrack value and the backend.
#[inline(always)]
pub fn start_pod<A: Wire>(
    svc: &ServiceValue,
    pkt: &Packet<A>,
    now: u64,
) -> Result<(CtValue, A::Backend), Error> {
    may_start(pkt)?;
    let t = &pkt.tuple;
    let (backend_id, b) = lb::select::<A, _>(svc, t.affinity_key(svc.id), now)?;
    let mut value = new_value(pkt, svc, backend_id, now);
    let (addr, port) = A::backend_addr(&b);
    let mut src = t.saddr;
    if addr == t.saddr {
        value.flags |= ct_flags::HAIRPIN;
        src = A::HAIRPIN;
        count(stat::HAIRPIN);
    }
    let reply = t.reply(addr, port, src, t.sport);
    insert_pair(t, &value, &reply, &value);
    Ok((value, b))
}

/// A new north-south flow (IPv4; from outside the cluster): Maglev when
/// the frontend has a table; a remote backend is SNATed to the node (or
/// DSR). Returns the SERVICE conntrack value and the backend.
#[inline(always)]
pub fn start_external(
    svc: &ServiceValue,
    pkt: &Packet<u32>,
    now: u64,
) -> Result<(CtValue, Backend), Error> {
    may_start(pkt)?;
    let t = &pkt.tuple;
    let (backend_id, b) = lb::select_flow(svc, t, t.affinity_key(svc.id), now)?;
    let mut value = new_value(pkt, svc, backend_id, now);
    north_south(t, &mut value, &b)?;
    Ok((value, b))
}

/// Write the reply entry, then the service entry.
#[inline(always)]
fn insert_pair<A: Addr>(t: &Tuple<A>, value: &CtValue, reply: &Tuple<A>, reply_value: &CtValue) {
    note_reply_dst(reply.daddr.fold());
    if !A::ct_insert(&reply.ct_key(ct_dir::REPLY), reply_value, 0)
        || !A::ct_insert(&t.ct_key(ct_dir::SERVICE), value, 0)
    {
        count(stat::CT_INSERT_FAIL);
    }
}

/// North-south NAT of a new flow: a local backend sees the client; a
/// remote one is reached by DSR (its node answers the client) or SNAT to
/// this node's address (the reply comes back here).
#[inline(always)]
fn north_south(t: &Tuple<u32>, value: &mut CtValue, b: &Backend) -> Result<(), Error> {
    // The reply entry remembers the client, for the SNAT reply path.
    let reply_value = |v: &CtValue| CtValue {
        nat_addr: t.saddr,
        nat_port: t.sport,
        ..*v
    };
    if b.flags & backend_flags::LOCAL != 0 {
        let reply = t.reply(b.addr, b.port, t.saddr, t.sport);
        insert_pair(t, value, &reply, &reply_value(value));
        return Ok(());
    }
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    if cfg.flags & config_flags::DSR != 0 {
        // DSR: the backend's node answers the client; nothing comes back
        // here, so only the service entry is kept.
        value.flags |= ct_flags::DSR;
        if CONNTRACK
            .insert(t.ct_key(ct_dir::SERVICE), value, 0)
            .is_err()
        {
            count(stat::CT_INSERT_FAIL);
        }
        return Ok(());
    }
    let node = cfg.node_addr;
    if node == 0 {
        // No node address configured: a remote backend's reply could not
        // find its way back here.
        return Err(Error::NoSlot);
    }
    value.flags |= ct_flags::SNAT;
    value.nat_addr = node;
    let reply = snat_port(t, value, b, node)?;
    value.nat_port = reply.dport;
    if !u32::ct_insert(&t.ct_key(ct_dir::SERVICE), value, 0) {
        count(stat::CT_INSERT_FAIL);
    }
    Ok(())
}

/// Claim a node port for a SNAT flow towards `b`: the REPLY entry
/// (backend -> node:port) is created only if no flow holds it yet
/// (`BPF_NOEXIST`), trying the client's own port first, then random ones.
/// The same client's flow already holding a port keeps it (a retransmitted
/// SYN after its service entry was lost). Returns the reply tuple.
#[inline(always)]
fn snat_port(t: &Tuple<u32>, value: &CtValue, b: &Backend, node: u32) -> Result<Tuple<u32>, Error> {
    let mut port = t.sport;
    let reply_value = CtValue {
        nat_addr: t.saddr,
        nat_port: t.sport,
        ..*value
    };
    note_reply_dst(node);
    for _ in 0..SNAT_PROBES {
        let reply = t.reply(b.addr, b.port, node, port);
        let key = &reply.ct_key(ct_dir::REPLY);
        if CONNTRACK
            .insert(key, reply_value, BPF_NOEXIST as u64)
            .is_ok()
        {
            return Ok(reply);
        }
        // SAFETY: copied out at once.
        if let Some(other) = unsafe { CONNTRACK.get(key) }.copied()
            && other.nat_addr == t.saddr
            && other.nat_port == t.sport
        {
            if CONNTRACK.insert(key, reply_value, 0).is_err() {
                count(stat::CT_INSERT_FAIL);
            }
            return Ok(reply);
        }
        // SAFETY: no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        port = ((SNAT_PORT_MIN + r % SNAT_PORT_RANGE) as u16).to_be();
    }
    Err(Error::SnatExhausted)
}
