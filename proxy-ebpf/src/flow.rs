//! Conntrack: finding a packet's flow, and the one flow-start path every
//! hook shares (tc on pods' interfaces, tc on external interfaces, XDP).
//!
//! A flow has a SERVICE entry under the client's tuple (-> backend) and,
//! unless it is DSR, a REPLY entry under the tuple the backend's replies
//! carry (-> frontend, for reverse NAT). The reply entry is written first:
//! once the service entry exists, replies must be translatable. Before a
//! reply entry is written its destination is noted in `REPLY_DSTS`, which
//! lets the reverse-NAT hooks skip conntrack for every other packet.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use proxy_common::{
    Backend, CtValue, HAIRPIN_ADDR, POD_NETS, ServiceValue, backend_flags, config_flags, ct_dir,
    ct_flags, stat,
};

use crate::{
    error::Error,
    lb,
    maps::{BACKENDS, CONFIG, CONNTRACK, SERVICES, count, note_reply_dst},
    packet::Packet,
    tuple::Tuple,
};

/// The hairpin source address, raw.
pub const HAIRPIN: u32 = u32::from_ne_bytes(HAIRPIN_ADDR);

/// Where a flow comes from, which decides how it is balanced and NATed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A pod on this node (east-west): random or affinity selection; the
    /// client keeps its address unless it reaches itself (hairpin).
    Pod,
    /// Outside the cluster (north-south): Maglev when the frontend has a
    /// table; a remote backend is SNATed to the node (or DSR).
    External,
}

/// SNAT ports are drawn from here (as the kernel's default ephemeral
/// range, less the top).
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_RANGE: u32 = 28232;
/// Candidate ports tried for one new SNAT flow (the client's own port,
/// then random ones) before the packet is dropped.
pub const SNAT_PROBES: u32 = 16;

/// The frontend this packet is addressed to.
#[inline(always)]
pub fn service(pkt: &Packet) -> Option<ServiceValue> {
    // Fast exit before the hash lookup: a destination inside the pod
    // networks is a pod (the agent clears them while a frontend lies
    // there). That is all pod-to-pod traffic, including what socket LB
    // translated at connect() and what the per-packet path already sent to
    // its backend: no hash lookup whose cost grows with the number of
    // frontends, just the array slot the verifier inlines.
    if to_pod_network(pkt.tuple.daddr) {
        return None;
    }
    // SAFETY: the value is copied out at once; a concurrent update replaces
    // the whole value, so the copy is either the old or the new one.
    unsafe { SERVICES.get(pkt.tuple.service_key()) }.copied()
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

/// The packet's existing flow (SERVICE entry) whose backend still exists,
/// and, when `service_id` is given, that still belongs to that frontend.
/// The entry is stamped `now` and takes the packet's TCP flags, so the
/// agent's sweep sees the flow alive and in its TCP state, whichever hook
/// follows it.
#[inline(always)]
pub fn established(pkt: &Packet, service_id: Option<u32>, now: u64) -> Option<(CtValue, Backend)> {
    let ct = CONNTRACK.get_ptr_mut(pkt.tuple.ct_key(ct_dir::SERVICE))?;
    // SAFETY: pointer from a successful lookup; a copy of plain integers.
    let value = unsafe { *ct };
    if service_id.is_some_and(|id| id != value.service_id) {
        return None;
    }
    // SAFETY: copied out at once.
    let b = unsafe { BACKENDS.get(value.backend_id) }.copied()?;
    // SAFETY: as above.
    unsafe {
        (*ct).last_seen_ns = now;
        (*ct).flags |= pkt.tcp_ct_flags();
    }
    Some((value, b))
}

/// A new flow to a frontend with backends: only a TCP SYN (or any UDP)
/// starts one; the backend is chosen and the flow recorded. Returns the
/// SERVICE conntrack value and the backend.
#[inline(always)]
pub fn start(
    origin: Origin,
    svc: &ServiceValue,
    pkt: &Packet,
    now: u64,
) -> Result<(CtValue, Backend), Error> {
    if pkt.later_fragment() {
        // Its datagram's flow is gone: nothing to follow.
        return Err(Error::Fragment);
    }
    if !pkt.starts_flow() {
        return Err(Error::CtInvalid);
    }
    let t = &pkt.tuple;
    let client = t.affinity_key(svc.id);
    let (backend_id, b) = match origin {
        Origin::Pod => lb::select::<u32>(svc, client, now)?,
        Origin::External => lb::select_flow(svc, t, client, now)?,
    };
    let mut value = CtValue {
        last_seen_ns: now,
        backend_id,
        service_id: svc.id,
        flags: pkt.tcp_ct_flags(),
        _pad: 0,
        nat_addr: 0,
        nat_port: 0,
        _pad2: 0,
    };
    match origin {
        Origin::Pod => {
            let mut src = t.saddr;
            if b.addr == t.saddr {
                value.flags |= ct_flags::HAIRPIN;
                src = HAIRPIN;
                count(stat::HAIRPIN);
            }
            let reply = t.reply(b.addr, b.port, src, t.sport);
            insert_pair(t, &value, &reply, &value);
        }
        Origin::External => north_south(t, &mut value, &b)?,
    }
    Ok((value, b))
}

/// Write the reply entry, then the service entry.
#[inline(always)]
fn insert_pair(t: &Tuple<u32>, value: &CtValue, reply: &Tuple<u32>, reply_value: &CtValue) {
    note_reply_dst(reply.daddr);
    if CONNTRACK
        .insert(reply.ct_key(ct_dir::REPLY), reply_value, 0)
        .is_err()
        || CONNTRACK
            .insert(t.ct_key(ct_dir::SERVICE), value, 0)
            .is_err()
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
    if CONNTRACK
        .insert(t.ct_key(ct_dir::SERVICE), value, 0)
        .is_err()
    {
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
        let key = reply.ct_key(ct_dir::REPLY);
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
