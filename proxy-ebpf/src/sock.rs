//! Socket LB: cgroup v2 hooks that translate a frontend to a backend once,
//! at connect()/sendmsg() time, for processes in the cgroup the agent
//! attached them to. No per-packet NAT and no conntrack for these flows.
//!
//! * connect4/6, sendmsg4/6: frontend -> backend (random or affinity); no
//!   backend: the call fails with ECONNREFUSED.
//! * recvmsg4/6, getpeername4/6: the backend a socket was pointed at shows
//!   as the frontend, from the LRU keyed by socket cookie.
//! * sock_release: a closing socket's reverse entry goes with it (keyed by
//!   its cookie and its peer, the backend connect() pointed it at).
//!
//! One body serves both families ([`SockFamily`]). An IPv6 socket given an
//! IPv4-mapped address (`::ffff:a.b.c.d`) talks IPv4 on the wire: it is
//! translated through the IPv4 maps, as an IPv4 socket would be.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    AffinityKey, Ip6, ServiceKey, ServiceKey6, ServiceValue, SockRevNatKey, SockRevNatKey6,
    SockRevNatValue, SockRevNatValue6, proto, stat, svc_flags,
};

use crate::{
    lb::{self, Backends},
    maps::{SERVICES, SERVICES6, SOCK_REVNAT, SOCK_REVNAT6, account, count},
};

const ECONNREFUSED: i32 = 111;
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const AF_INET6: u32 = 10;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

/// A socket is going away: forget its reverse entry. Only a connected
/// socket has a peer; an unconnected UDP socket's `sendmsg` entries (one
/// per backend it sent to) are left to the LRU.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run; plain
    // fields read as copies.
    let (family, addr, port) = unsafe {
        (
            (*ctx.sock).family,
            (*ctx.sock).dst_ip4,
            (*ctx.sock).dst_port,
        )
    };
    // `dst_port` is in network order in its low 16 bits, as connect stored
    // the backend. An IPv6 socket connected to an IPv4-mapped peer has it
    // in `dst_ip4` as well.
    let port = port as u16;
    if addr != 0 {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        u32::forget(cookie, addr, port);
    } else if family == AF_INET6 {
        // SAFETY: as above.
        let addr6: Ip6 = unsafe { (*ctx.sock).dst_ip6 };
        if addr6 != [0; 4] {
            // SAFETY: helper on the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            Ip6::forget(cookie, addr6, port);
        }
    }
    ALLOW
}

/// What connect()/sendmsg() does with an address.
enum Verdict<A> {
    /// Not a frontend (or one the per-packet path decides): untouched.
    Pass,
    /// A frontend without a usable backend: ECONNREFUSED.
    Refuse,
    /// Go to this backend address and port (network order).
    To(A, u16),
}

/// An address family's frontend and socket reverse maps.
trait SockFamily: Backends + Copy {
    /// The reverse map's key: a socket and the backend it was pointed at.
    type RevKey;
    fn rev_key(cookie: u64, addr: Self, port: u16) -> Self::RevKey;
    fn service(addr: Self, port: u16, proto: u8) -> Option<ServiceValue>;
    fn remember(cookie: u64, backend: (Self, u16), frontend: (Self, u16), service_id: u32);
    fn recall(cookie: u64, addr: Self, port: u16) -> Option<(Self, u16)>;
    fn forget(cookie: u64, addr: Self, port: u16);
}

impl SockFamily for u32 {
    type RevKey = SockRevNatKey;
    #[inline(always)]
    fn rev_key(cookie: u64, addr: u32, port: u16) -> SockRevNatKey {
        SockRevNatKey {
            cookie,
            addr,
            port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn service(addr: u32, port: u16, proto: u8) -> Option<ServiceValue> {
        let key = ServiceKey {
            addr,
            port,
            proto,
            scope: 0,
        };
        // SAFETY: copied out at once.
        unsafe { SERVICES.get(key) }.copied()
    }
    #[inline(always)]
    fn remember(cookie: u64, backend: (u32, u16), frontend: (u32, u16), service_id: u32) {
        let rev = SockRevNatValue {
            addr: frontend.0,
            port: frontend.1,
            _pad: 0,
            service_id,
        };
        let _ = SOCK_REVNAT.insert(Self::rev_key(cookie, backend.0, backend.1), rev, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, addr: u32, port: u16) -> Option<(u32, u16)> {
        // SAFETY: copied out at once.
        unsafe { SOCK_REVNAT.get(Self::rev_key(cookie, addr, port)) }.map(|r| (r.addr, r.port))
    }
    #[inline(always)]
    fn forget(cookie: u64, addr: u32, port: u16) {
        let _ = SOCK_REVNAT.remove(Self::rev_key(cookie, addr, port));
    }
}

impl SockFamily for Ip6 {
    type RevKey = SockRevNatKey6;
    #[inline(always)]
    fn rev_key(cookie: u64, addr: Ip6, port: u16) -> SockRevNatKey6 {
        SockRevNatKey6 {
            cookie,
            addr,
            port,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn service(addr: Ip6, port: u16, proto: u8) -> Option<ServiceValue> {
        let key = ServiceKey6 {
            addr,
            port,
            proto,
            scope: 0,
        };
        // SAFETY: copied out at once.
        unsafe { SERVICES6.get(key) }.copied()
    }
    #[inline(always)]
    fn remember(cookie: u64, backend: (Ip6, u16), frontend: (Ip6, u16), service_id: u32) {
        let rev = SockRevNatValue6 {
            addr: frontend.0,
            port: frontend.1,
            _pad: 0,
            service_id,
        };
        let _ = SOCK_REVNAT6.insert(Self::rev_key(cookie, backend.0, backend.1), rev, 0);
    }
    #[inline(always)]
    fn recall(cookie: u64, addr: Ip6, port: u16) -> Option<(Ip6, u16)> {
        // SAFETY: copied out at once.
        unsafe { SOCK_REVNAT6.get(Self::rev_key(cookie, addr, port)) }.map(|r| (r.addr, r.port))
    }
    #[inline(always)]
    fn forget(cookie: u64, addr: Ip6, port: u16) {
        let _ = SOCK_REVNAT6.remove(Self::rev_key(cookie, addr, port));
    }
}

/// Whether connect()/sendmsg() may translate this protocol. SCTP is
/// translated at connect() too (no per-packet SCTP path: its CRC32c cannot
/// be fixed up incrementally).
#[inline(always)]
fn translatable(protocol: u8) -> bool {
    protocol == proto::TCP || protocol == proto::UDP || protocol == proto::SCTP
}

/// `::ffff:a.b.c.d`: an IPv4 peer of an IPv6 socket.
#[inline(always)]
fn v4_mapped(a: &Ip6) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0xffffu32.to_be()
}

/// The one socket-LB decision, for either family.
#[inline(always)]
fn pick<A: SockFamily>(ctx: &SockAddrContext, addr: A, port: u16, protocol: u8) -> Verdict<A> {
    let Some(svc) = A::service(addr, port, protocol) else {
        return Verdict::Pass;
    };
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        // loadBalancerSourceRanges: the client's source address is not
        // known at connect() time; the per-packet path checks it.
        return Verdict::Pass;
    }
    if svc.count == 0 {
        count(stat::SOCK_REFUSED);
        return Verdict::Refuse;
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
    let Ok((_, backend)) = lb::select::<A, _>(&svc, client, now) else {
        count(stat::DROP_NO_SLOT);
        return Verdict::Refuse;
    };
    let to = A::backend_addr(&backend);
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    A::remember(cookie, to, (addr, port), svc.id);
    account(svc.id, 0);
    count(stat::SOCK_XLATE);
    Verdict::To(to.0, to.1)
}

/// The program's return for a verdict; `set` writes the backend into the
/// context.
#[inline(always)]
fn finish<A>(verdict: Verdict<A>, set: impl FnOnce(A, u16)) -> i32 {
    match verdict {
        Verdict::Pass => ALLOW,
        Verdict::Refuse => {
            // SAFETY: plain helper call; makes the syscall fail with
            // ECONNREFUSED instead of EPERM.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
        Verdict::To(addr, port) => {
            set(addr, port);
            ALLOW
        }
    }
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the context pointer is valid for the program's run, and the
    // program is its only user.
    unsafe { &mut *ctx.sock_addr }
}

/// Write `user_ip6` word by word: the verifier takes only stores at a
/// constant offset from the context pointer itself, and a whole-array copy
/// is lowered through a pointer into the context.
#[inline(always)]
fn set_ip6(sa: &mut bpf_sock_addr, a: Ip6) {
    // SAFETY: in-bounds fields of the context; volatile keeps the four
    // stores separate.
    unsafe {
        core::ptr::write_volatile(&raw mut sa.user_ip6[0], a[0]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[1], a[1]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[2], a[2]);
        core::ptr::write_volatile(&raw mut sa.user_ip6[3], a[3]);
    }
}

#[inline(always)]
fn translate4(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    let protocol = sa.protocol as u8;
    if !translatable(protocol) {
        return ALLOW;
    }
    let verdict = pick::<u32>(ctx, sa.user_ip4, sa.user_port as u16, protocol);
    finish(verdict, |addr, port| {
        sa.user_ip4 = addr;
        sa.user_port = port as u32;
    })
}

#[inline(always)]
fn translate6(ctx: &SockAddrContext) -> i32 {
    let sa = sock_addr(ctx);
    let protocol = sa.protocol as u8;
    if !translatable(protocol) {
        return ALLOW;
    }
    let addr: Ip6 = sa.user_ip6;
    let port = sa.user_port as u16;
    if v4_mapped(&addr) {
        let verdict = pick::<u32>(ctx, addr[3], port, protocol);
        return finish(verdict, |a, p| {
            sa.user_ip6[3] = a;
            sa.user_port = p as u32;
        });
    }
    let verdict = pick::<Ip6>(ctx, addr, port, protocol);
    finish(verdict, |a, p| {
        set_ip6(sa, a);
        sa.user_port = p as u32;
    })
}

#[inline(always)]
fn reverse4(ctx: &SockAddrContext) {
    let sa = sock_addr(ctx);
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some((addr, port)) = u32::recall(cookie, sa.user_ip4, sa.user_port as u16) {
        sa.user_ip4 = addr;
        sa.user_port = port as u32;
    }
}

#[inline(always)]
fn reverse6(ctx: &SockAddrContext) {
    let sa = sock_addr(ctx);
    let addr: Ip6 = sa.user_ip6;
    let port = sa.user_port as u16;
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if v4_mapped(&addr) {
        if let Some((a, p)) = u32::recall(cookie, addr[3], port) {
            sa.user_ip6[3] = a;
            sa.user_port = p as u32;
        }
    } else if let Some((a, p)) = Ip6::recall(cookie, addr, port) {
        set_ip6(sa, a);
        sa.user_port = p as u32;
    }
}
