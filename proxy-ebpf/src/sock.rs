//! Socket LB: cgroup v2 hooks that translate a frontend to a backend once,
//! at connect()/sendmsg() time, for processes in the cgroup the agent
//! attached them to. No per-packet NAT and no conntrack for these flows.
//!
//! * connect4 / sendmsg4: frontend -> backend (random or affinity); no
//!   backend: the call fails with ECONNREFUSED.
//! * recvmsg4 / getpeername4: the backend a socket was pointed at shows as
//!   the frontend, from the LRU keyed by socket cookie.
//! * sock_release: a closing socket's reverse entry goes with it (keyed by
//!   its cookie and its peer, the backend connect() pointed it at).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    AffinityKey, ServiceKey, SockRevNatKey, SockRevNatValue, proto, stat, svc_flags,
};

use crate::{
    lb,
    maps::{SERVICES, SOCK_REVNAT, account, count},
};

const ECONNREFUSED: i32 = 111;
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    ALLOW
}

/// A socket is going away: forget its reverse entry. Only a connected
/// socket has a peer; an unconnected UDP socket's `sendmsg4` entries (one
/// per backend it sent to) are left to the LRU.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run; plain
    // fields read as copies.
    let (addr, port) = unsafe { ((*ctx.sock).dst_ip4, (*ctx.sock).dst_port) };
    if addr != 0 {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // `dst_ip4` and `dst_port` are in network order, as connect4 stored
        // the backend (`user_port`'s low 16 bits).
        let key = SockRevNatKey {
            cookie,
            addr,
            port,
            _pad: 0,
        };
        let _ = SOCK_REVNAT.remove(key);
    }
    ALLOW
}

#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let protocol = sa.protocol as u8;
    // SCTP is translated at connect() too (no per-packet SCTP path: its
    // CRC32c cannot be fixed up incrementally).
    if protocol != proto::TCP && protocol != proto::UDP && protocol != proto::SCTP {
        return ALLOW;
    }
    let key = ServiceKey {
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        proto: protocol,
        scope: 0,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        // loadBalancerSourceRanges: the client's source address is not
        // known at connect() time; the per-packet path checks it.
        return ALLOW;
    }
    if svc.count == 0 {
        count(stat::SOCK_REFUSED);
        // SAFETY: plain helper call; makes the syscall fail with
        // ECONNREFUSED instead of EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    // The client's network namespace and the time matter to affinity
    // only: two helper calls saved for the other frontends.
    let (netns, now) = if svc.affinity_timeout != 0 {
        // SAFETY: helpers on the program's own context.
        unsafe { (bpf_get_netns_cookie(ctx.as_ptr()), bpf_ktime_get_ns()) }
    } else {
        (0, 0)
    };
    let client = AffinityKey {
        client_netns: netns,
        client_addr: 0,
        service_id: svc.id,
    };
    let Ok((_, backend)) = lb::select(&svc, client, now) else {
        count(stat::DROP_NO_SLOT);
        // SAFETY: as above.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev_key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let rev = SockRevNatValue {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        service_id: svc.id,
    };
    let _ = SOCK_REVNAT.insert(rev_key, rev, 0);
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    account(svc.id, 0);
    count(stat::SOCK_XLATE);
    ALLOW
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(rev) = (unsafe { SOCK_REVNAT.get(key) }).copied() {
        sa.user_ip4 = rev.addr;
        sa.user_port = rev.port as u32;
    }
}
