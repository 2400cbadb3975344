//! North-south flow set-up shared by XDP and the external interface's tc
//! ingress (which does the whole job when XDP is not attached, or passed a
//! packet it could not finish).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{
    AffinityKey, Backend, CtKey, CtValue, ServiceValue, backend_flags, config_flags, ct_dir,
    ct_flags, proto, stat,
};

use crate::{
    lb,
    maps::{CONFIG, CONNTRACK, count},
    packet::{Error, Frag},
};

/// A new flow to a frontend with backends: only a TCP SYN (or any UDP)
/// starts one; the backend is chosen (Maglev, affinity or random) and the
/// flow recorded. Returns the SERVICE conntrack value and the backend.
#[inline(always)]
pub fn start_flow(
    svc: &ServiceValue,
    flow: &lb::Flow,
    frag: Frag,
    tcp_flags: u8,
    now: u64,
) -> Result<(CtValue, Backend), Error> {
    if frag == Frag::Later {
        // Its datagram's flow is gone: nothing to follow.
        return Err(Error::Fragment);
    }
    if flow.proto == proto::TCP && tcp_flags & 0x02 == 0 {
        return Err(Error::CtInvalid);
    }
    let client = AffinityKey {
        client_netns: 0,
        client_addr: flow.saddr,
        service_id: svc.id,
    };
    let (id, b) = lb::select_flow(svc, flow, client, now)?;
    let key = CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        dir: ct_dir::SERVICE,
        _pad: 0,
    };
    let ct = new_flow(&key, id, &b, svc.id, now)?;
    Ok((ct, b))
}

/// Conntrack entries for a new north-south flow; SNAT to the node when the
/// backend is on another node. Returns the SERVICE entry.
#[inline(always)]
fn new_flow(
    key: &CtKey,
    backend_id: u32,
    b: &proxy_common::Backend,
    service_id: u32,
    now: u64,
) -> Result<CtValue, Error> {
    let mut value = CtValue {
        last_seen_ns: now,
        backend_id,
        service_id,
        flags: 0,
        _pad: 0,
        nat_addr: 0,
        nat_port: 0,
        _pad2: 0,
    };
    let mut reply_dst = (key.saddr, key.sport);
    let cfg = CONFIG.get(0).copied().unwrap_or_default();
    if b.flags & backend_flags::LOCAL == 0 && cfg.flags & config_flags::DSR != 0 {
        // DSR: the backend's node answers the client; nothing comes back
        // here, so only the forward entry is kept.
        value.flags |= ct_flags::DSR;
        let fwd = CtKey {
            dir: ct_dir::SERVICE,
            ..*key
        };
        if CONNTRACK.insert(&fwd, &value, 0).is_err() {
            count(stat::CT_INSERT_FAIL);
        }
        return Ok(value);
    }
    if b.flags & backend_flags::LOCAL == 0 {
        let node = cfg.node_addr;
        if node == 0 {
            // No node address configured: a remote backend's reply could
            // not find its way back here.
            return Err(Error::NoSlot);
        }
        // Keep the client's port unless another client already holds it
        // towards this backend.
        let mut port = key.sport;
        for _ in 0..4 {
            let probe = CtKey {
                saddr: b.addr,
                daddr: node,
                sport: b.port,
                dport: port,
                proto: key.proto,
                dir: ct_dir::REPLY,
                _pad: 0,
            };
            // SAFETY: copied out at once.
            match unsafe { CONNTRACK.get(&probe) }.copied() {
                Some(other) if other.nat_addr != key.saddr || other.nat_port != key.sport => {
                    // SAFETY: no preconditions.
                    let r = unsafe { bpf_get_prandom_u32() };
                    port = ((32768 + r % 28232) as u16).to_be();
                }
                _ => break,
            }
        }
        value.flags |= ct_flags::SNAT;
        value.nat_addr = node;
        value.nat_port = port;
        reply_dst = (node, port);
    }
    let reply_key = CtKey {
        saddr: b.addr,
        daddr: reply_dst.0,
        sport: b.port,
        dport: reply_dst.1,
        proto: key.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let reply = CtValue {
        nat_addr: key.saddr,
        nat_port: key.sport,
        ..value
    };
    let fwd = CtKey {
        dir: ct_dir::SERVICE,
        ..*key
    };
    if CONNTRACK.insert(&reply_key, &reply, 0).is_err()
        || CONNTRACK.insert(&fwd, &value, 0).is_err()
    {
        count(stat::CT_INSERT_FAIL);
    }
    Ok(value)
}
