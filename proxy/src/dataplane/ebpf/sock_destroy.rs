//! Stale sockets: destroy the sockets socket LB connected to a backend
//! that has since left its frontend, so a connected UDP client (a
//! resolver talking to a CoreDNS pod that is gone) gets ECONNABORTED and
//! reconnects to a live backend, as Cilium does.
//!
//! The kernel's `bpf_sock_destroy()` kfunc (6.5+) may only be called from
//! `iter/udp` and `iter/tcp` programs, and aya 0.14 cannot load a program
//! that calls a kfunc (it has no kfunc BTF relocation). So this module
//! carries its own: a BPF socket iterator assembled here instruction by
//! instruction ([`program`]), loaded, linked and run with the bpf(2)
//! syscall directly, the kfunc's and the iterator context's BTF ids and
//! the `struct sock_common` member offsets read from the kernel's BTF
//! ([`super::vmlinux_btf`]).
//!
//! For every socket of the netns it runs in, the program
//! 1. takes its destination (`skc_daddr`/`skc_v6_daddr`, `skc_dport`;
//!    an IPv6 socket with an IPv4-mapped peer goes the IPv4 way, as
//!    socket LB translated it),
//! 2. looks `(cookie, destination)` up in the socket-LB reverse map
//!    (`SOCK_RNAT_V4`/`_V6`, written by connect()): no entry, the socket
//!    was not translated by socket LB (a client of the pod IP) and is left
//!    alone;
//! 3. looks `(destination, service id of that entry)` up in this module's
//!    kill map, filled by userspace with the (frontend, backend) pairs that
//!    went: no entry, left alone;
//! 4. calls `bpf_sock_destroy()` and counts it in the kill map's value.
//!
//! An iterator walks the netns current when its fd is created, so
//! [`SockDestroyer::destroy`] runs it from a thread of its own that enters
//! the agent's netns and then each netns file in a directory (`/run/netns`:
//! what `ip netns add`, CNI plugins and containerd bind-mount there).

use std::{
    collections::HashSet,
    ffi::CString,
    fs::File,
    io::Read,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::vmlinux_btf::{Btf, BtfError};

#[derive(Debug, thiserror::Error)]
pub enum SockDestroyError {
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("bpf({cmd}): {source}")]
    Syscall {
        cmd: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "loading the {proto} socket iterator failed ({source}); bpf_sock_destroy needs kernel 6.5 or later; verifier log: {log}"
    )]
    Load {
        proto: &'static str,
        #[source]
        source: std::io::Error,
        log: String,
    },
    #[error("entering netns {path}: {source}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running the {proto} socket iterator: {source}")]
    Run {
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the socket iterator thread panicked")]
    Thread,
}

/// A (frontend, backend) pair that went: sockets socket LB connected
/// through frontend `service_id` to `addr:port` are destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub service_id: u32,
    pub addr: IpAddr,
    pub port: u16,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Sockets destroyed per target, in the order given (UDP and TCP
    /// together: a target's frontend has one protocol).
    pub per_target: Vec<u64>,
    /// Network namespaces walked.
    pub netns: usize,
    /// Namespaces that could not be entered or walked (one line each).
    pub failures: Vec<String>,
}

// --- bpf(2) ---------------------------------------------------------------

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;
const BPF_LINK_CREATE: u32 = 28;
const BPF_ITER_CREATE: u32 = 33;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

/// `union bpf_attr`, as bytes: each command sets the few fields it uses
/// at the offset the kernel's uapi layout gives it; the rest stays zero.
#[repr(C, align(8))]
struct Attr([u8; 144]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 144])
    }
    fn u32(mut self, off: usize, v: u32) -> Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: u32, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded `union bpf_attr` of the size
    // passed; pointers inside it point at buffers the caller keeps alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A bpf(2) call that returns a new fd.
fn bpf_fd(cmd: u32, name: &'static str, attr: &mut Attr) -> Result<OwnedFd, SockDestroyError> {
    let fd = bpf(cmd, attr).map_err(|source| SockDestroyError::Syscall { cmd: name, source })?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn map_create(key_size: u32, value_size: u32, max: u32) -> Result<OwnedFd, SockDestroyError> {
    let mut a = Attr::new()
        .u32(0, BPF_MAP_TYPE_HASH)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max);
    bpf_fd(BPF_MAP_CREATE, "BPF_MAP_CREATE", &mut a)
}

fn elem_attr(map: BorrowedFd<'_>, key: &[u8], value: u64) -> Attr {
    Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value)
}

fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<(), SockDestroyError> {
    let mut a = elem_attr(map, key, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map_err(|source| SockDestroyError::Syscall {
        cmd: "BPF_MAP_UPDATE_ELEM",
        source,
    })?;
    Ok(())
}

fn map_lookup_u64(map: BorrowedFd<'_>, key: &[u8]) -> Option<u64> {
    let mut v = [0u8; 8];
    let mut a = elem_attr(map, key, v.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a).ok()?;
    Some(u64::from_ne_bytes(v))
}

fn map_delete(map: BorrowedFd<'_>, key: &[u8]) {
    let mut a = elem_attr(map, key, 0);
    let _ = bpf(BPF_MAP_DELETE_ELEM, &mut a);
}

// --- the program ------------------------------------------------------------

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
const FP: u8 = 10;

// Opcodes (class | mode/op | size/source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const LDX_H: u8 = 0x69; // BPF_LDX | BPF_MEM | BPF_H
const LDX_B: u8 = 0x71; // BPF_LDX | BPF_MEM | BPF_B
const LDX_DW: u8 = 0x79; // BPF_LDX | BPF_MEM | BPF_DW
const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const STX_H: u8 = 0x6b; // BPF_STX | BPF_MEM | BPF_H
const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W (store immediate)
const ST_H: u8 = 0x6a; // BPF_ST | BPF_MEM | BPF_H
const ATOMIC_DW: u8 = 0xdb; // BPF_STX | BPF_ATOMIC | BPF_DW (imm BPF_ADD)
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const OR_X: u8 = 0x4f; // BPF_ALU64 | BPF_OR | BPF_X
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
const JA: u8 = 0x05; // BPF_JMP | BPF_JA
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JEQ32_K: u8 = 0x16; // BPF_JMP32 | BPF_JEQ | BPF_K
const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

const PSEUDO_MAP_FD: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_GET_SOCKET_COOKIE: i32 = 46;

const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const TCP_TIME_WAIT: i32 = 6;
const TCP_NEW_SYN_RECV: i32 = 12;
/// The third word of `::ffff:a.b.c.d` as a little-endian load sees it.
const V4_MAPPED_WORD: i32 = 0xffff_0000_u32 as i32;

/// A tiny assembler: forward jumps to named labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
    }
    fn jmp(&mut self, code: u8, dst: u8, imm: i32, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(code, dst, 0, 0, imm);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }
    /// `dst = map fd`: the kernel swaps in the map's address.
    fn ld_map(&mut self, dst: u8, fd: BorrowedFd<'_>) {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd.as_raw_fd());
        self.op(0, 0, 0, 0, 0);
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, name) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| *t)
                .expect("jump to a defined label");
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// What the program needs from the kernel's BTF.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// `bpf_iter__udp.udp_sk` / `bpf_iter__tcp.sk_common` in the context.
    pub ctx_sk: i16,
    /// `struct sock_common` members.
    pub family: i16,
    pub state: i16,
    pub daddr: i16,
    pub v6_daddr: i16,
    pub dport: i16,
    /// BTF id of FUNC `bpf_sock_destroy`.
    pub sock_destroy: i32,
}

/// The maps the program reads.
pub struct ProgMaps<'a> {
    pub revnat4: BorrowedFd<'a>,
    pub revnat6: BorrowedFd<'a>,
    pub kill4: BorrowedFd<'a>,
    pub kill6: BorrowedFd<'a>,
}

/// Byte offset of the service id in `SockRevNatValue` / `SockRevNatValue6`.
const REVNAT4_SVC: i16 = std::mem::offset_of!(proxy_common::SockRevNatValue, service_id) as i16;
const REVNAT6_SVC: i16 = std::mem::offset_of!(proxy_common::SockRevNatValue6, service_id) as i16;

// The program builds the reverse keys on its stack at the offsets below
// (see [`program`]): they must be `SockRevNatKey`'s and `SockRevNatKey6`'s.
const _: () = {
    use proxy_common::{SockRevNatKey, SockRevNatKey6};
    use std::mem::{offset_of, size_of};
    assert!(offset_of!(SockRevNatKey, cookie) == 0);
    assert!(offset_of!(SockRevNatKey, addr) == 8);
    assert!(offset_of!(SockRevNatKey, port) == 12);
    assert!(size_of::<SockRevNatKey>() == 16);
    assert!(offset_of!(SockRevNatKey6, cookie) == 0);
    assert!(offset_of!(SockRevNatKey6, addr) == 8);
    assert!(offset_of!(SockRevNatKey6, port) == 24);
    assert!(size_of::<SockRevNatKey6>() == 32);
};

/// The iterator program. Stack layout (fp = r10):
///
/// IPv4: fp-24 cookie (u64) | fp-16 addr | fp-12 port | fp-10 0 | fp-8
/// service id | fp-4 0. The reverse key (`SockRevNatKey`, 16 bytes) is at
/// fp-24, the kill key ([`kill4_key`], 16 bytes) at fp-16.
///
/// IPv6: fp-40 cookie | fp-32 addr (16) | fp-16 port | fp-14 0 | fp-12 0 |
/// fp-8 service id | fp-4 0. Reverse key (`SockRevNatKey6`, 32 bytes) at
/// fp-40, kill key ([`kill6_key`], 32 bytes) at fp-32.
pub fn program(l: &Layout, maps: &ProgMaps<'_>, tcp: bool) -> Vec<Insn> {
    let mut a = Asm::default();
    // r6 = ctx->udp_sk (ctx->sk_common): NULL once per batch.
    a.op(LDX_DW, R6, R1, l.ctx_sk, 0);
    a.jmp(JEQ_K, R6, 0, "out");
    if tcp {
        // Time-wait and request sockets are no full `struct sock`.
        a.op(LDX_B, R2, R6, l.state, 0);
        a.jmp(JEQ_K, R2, TCP_TIME_WAIT, "out");
        a.jmp(JEQ_K, R2, TCP_NEW_SYN_RECV, "out");
    }
    // r2 = sk->skc_family
    a.op(LDX_H, R2, R6, l.family, 0);
    a.jmp(JEQ_K, R2, AF_INET, "v4");
    a.jmp(JNE_K, R2, AF_INET6, "out");

    // IPv6: the peer's four words to fp-32..fp-16.
    a.op(LDX_W, R2, R6, l.v6_daddr, 0);
    a.op(LDX_W, R3, R6, l.v6_daddr + 4, 0);
    a.op(LDX_W, R4, R6, l.v6_daddr + 8, 0);
    a.op(LDX_W, R5, R6, l.v6_daddr + 12, 0);
    a.op(STX_W, FP, R2, -32, 0);
    a.op(STX_W, FP, R3, -28, 0);
    a.op(STX_W, FP, R4, -24, 0);
    a.op(STX_W, FP, R5, -20, 0);
    // ::ffff:a.b.c.d (words 0, 1 zero, word 2 0x0000ffff): socket LB
    // translated it through the IPv4 maps; skc_daddr holds a.b.c.d.
    a.op(OR_X, R2, R3, 0, 0);
    a.jmp(JNE_K, R2, 0, "v6");
    a.jmp(JEQ32_K, R4, V4_MAPPED_WORD, "v4");
    a.label("v6");
    // fp-16 = skc_dport, fp-14 = 0, fp-12 = 0, fp-4 = 0
    a.op(LDX_H, R2, R6, l.dport, 0);
    a.op(STX_H, FP, R2, -16, 0);
    a.op(ST_H, FP, 0, -14, 0);
    a.op(ST_W, FP, 0, -12, 0);
    a.op(ST_W, FP, 0, -4, 0);
    // fp-40 = bpf_get_socket_cookie(sk)
    a.op(MOV_X, R1, R6, 0, 0);
    a.op(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE);
    a.op(STX_DW, FP, R0, -40, 0);
    // r0 = SOCK_RNAT_V6[fp-40]; none: not a socket-LB socket
    a.ld_map(R1, maps.revnat6);
    a.op(MOV_X, R2, FP, 0, 0);
    a.op(ADD_K, R2, 0, 0, -40);
    a.op(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jmp(JEQ_K, R0, 0, "out");
    // fp-8 = its service id
    a.op(LDX_W, R2, R0, REVNAT6_SVC, 0);
    a.op(STX_W, FP, R2, -8, 0);
    // r0 = kill6[fp-32]; none: the pair did not go
    a.ld_map(R1, maps.kill6);
    a.op(MOV_X, R2, FP, 0, 0);
    a.op(ADD_K, R2, 0, 0, -32);
    a.op(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jmp(JEQ_K, R0, 0, "out");
    a.jmp(JA, 0, 0, "destroy");

    a.label("v4");
    // fp-16 = skc_daddr, fp-12 = skc_dport, fp-10 = 0, fp-4 = 0
    a.op(LDX_W, R2, R6, l.daddr, 0);
    a.op(STX_W, FP, R2, -16, 0);
    a.op(LDX_H, R2, R6, l.dport, 0);
    a.op(STX_H, FP, R2, -12, 0);
    a.op(ST_H, FP, 0, -10, 0);
    a.op(ST_W, FP, 0, -4, 0);
    // fp-24 = bpf_get_socket_cookie(sk)
    a.op(MOV_X, R1, R6, 0, 0);
    a.op(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE);
    a.op(STX_DW, FP, R0, -24, 0);
    // r0 = SOCK_RNAT_V4[fp-24]
    a.ld_map(R1, maps.revnat4);
    a.op(MOV_X, R2, FP, 0, 0);
    a.op(ADD_K, R2, 0, 0, -24);
    a.op(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jmp(JEQ_K, R0, 0, "out");
    // fp-8 = its service id
    a.op(LDX_W, R2, R0, REVNAT4_SVC, 0);
    a.op(STX_W, FP, R2, -8, 0);
    // r0 = kill4[fp-16]
    a.ld_map(R1, maps.kill4);
    a.op(MOV_X, R2, FP, 0, 0);
    a.op(ADD_K, R2, 0, 0, -16);
    a.op(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jmp(JEQ_K, R0, 0, "out");

    a.label("destroy");
    // r7 = the kill entry's counter; bpf_sock_destroy(sk)
    a.op(MOV_X, R7, R0, 0, 0);
    a.op(MOV_X, R1, R6, 0, 0);
    a.op(CALL, 0, PSEUDO_KFUNC_CALL, 0, l.sock_destroy);
    a.jmp(JNE32_K, R0, 0, "out");
    // counter += 1 (atomically: iterators of two netns may run at once)
    a.op(MOV_K, R1, 0, 0, 1);
    a.op(ATOMIC_DW, R7, R1, 0, 0);

    a.label("out");
    // return 0
    a.op(MOV_K, R0, 0, 0, 0);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

/// Kill map key, IPv4 (16 bytes): addr, port (network order), 0, service
/// id, 0 — as the program lays it out from fp-16.
pub fn kill4_key(addr: [u8; 4], port: u16, service_id: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[0..4].copy_from_slice(&addr);
    k[4..6].copy_from_slice(&port.to_be_bytes());
    k[8..12].copy_from_slice(&service_id.to_ne_bytes());
    k
}

/// Kill map key, IPv6 (32 bytes): addr, port, 0, 0, service id, 0.
pub fn kill6_key(addr: [u8; 16], port: u16, service_id: u32) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[0..16].copy_from_slice(&addr);
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[24..28].copy_from_slice(&service_id.to_ne_bytes());
    k
}

/// Targets per run at most (the kill maps' capacity); more are done in
/// several runs.
const KILL_MAX: usize = 4096;

/// A loaded iterator program and its link.
struct Iter {
    proto: &'static str,
    link: OwnedFd,
    _prog: OwnedFd,
}

fn load_iter(
    btf: &Btf,
    proto: &'static str,
    maps: &ProgMaps<'_>,
) -> Result<Iter, SockDestroyError> {
    let tcp = proto == "tcp";
    let (ctx, field, target) = if tcp {
        ("bpf_iter__tcp", "sk_common", "bpf_iter_tcp")
    } else {
        ("bpf_iter__udp", "udp_sk", "bpf_iter_udp")
    };
    let off = |s: &str, m: &str| btf.member_offset(s, m).map(|o| o as i16);
    let layout = Layout {
        ctx_sk: off(ctx, field)?,
        family: off("sock_common", "skc_family")?,
        state: off("sock_common", "skc_state")?,
        daddr: off("sock_common", "skc_daddr")?,
        v6_daddr: off("sock_common", "skc_v6_daddr")?,
        dport: off("sock_common", "skc_dport")?,
        sock_destroy: btf.func_id("bpf_sock_destroy")? as i32,
    };
    let attach = btf.func_id(target)?;
    let insns = program(&layout, maps, tcp);
    let license = c"GPL";
    let name = CString::new(format!("kp_sockterm_{proto}")).unwrap_or_default();
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new()
        .u32(0, BPF_PROG_TYPE_TRACING)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, BPF_TRACE_ITER)
        .u32(108, attach);
    let n = name.as_bytes().len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    let prog = bpf_fd(BPF_PROG_LOAD, "BPF_PROG_LOAD", &mut a).map_err(|e| match e {
        SockDestroyError::Syscall { source, .. } => {
            let end = log.iter().position(|c| *c == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            // The verdict is at the end of the log.
            let tail: Vec<&str> = text.lines().rev().take(4).collect();
            SockDestroyError::Load {
                proto,
                source,
                log: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            }
        }
        e => e,
    })?;
    let mut a = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(8, BPF_TRACE_ITER);
    let link = bpf_fd(BPF_LINK_CREATE, "BPF_LINK_CREATE", &mut a)?;
    Ok(Iter {
        proto,
        link,
        _prog: prog,
    })
}

impl Iter {
    /// Walk the sockets of the calling thread's netns.
    fn run(&self) -> Result<(), SockDestroyError> {
        let mut a = Attr::new().u32(0, self.link.as_raw_fd() as u32);
        let fd = bpf_fd(BPF_ITER_CREATE, "BPF_ITER_CREATE", &mut a)?;
        let mut f = File::from(fd);
        // The program prints nothing: each read runs it over a batch, and
        // 0 means every socket was seen.
        let mut buf = [0u8; 64];
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SockDestroyError::Run {
                        proto: self.proto,
                        source,
                    });
                }
            }
        }
    }
}

/// The loaded iterators and their kill maps.
pub struct SockDestroyer {
    iters: Vec<Iter>,
    kill4: OwnedFd,
    kill6: OwnedFd,
}

impl SockDestroyer {
    /// Load the `iter/udp` program (and `iter/tcp` with `tcp`), reading
    /// socket LB's reverse maps `revnat4` and `revnat6`.
    pub fn new(
        revnat4: BorrowedFd<'_>,
        revnat6: BorrowedFd<'_>,
        tcp: bool,
    ) -> Result<SockDestroyer, SockDestroyError> {
        let btf = Btf::vmlinux()?;
        let kill4 = map_create(16, 8, KILL_MAX as u32)?;
        let kill6 = map_create(32, 8, KILL_MAX as u32)?;
        let maps = ProgMaps {
            revnat4,
            revnat6,
            kill4: kill4.as_fd(),
            kill6: kill6.as_fd(),
        };
        let mut iters = vec![load_iter(&btf, "udp", &maps)?];
        if tcp {
            iters.push(load_iter(&btf, "tcp", &maps)?);
        }
        Ok(SockDestroyer {
            iters,
            kill4,
            kill6,
        })
    }

    /// Destroy the sockets of `targets` in the agent's own netns and in
    /// every netns file under `netns_dir` (None: own netns only).
    pub fn destroy(
        &self,
        targets: &[Target],
        netns_dir: Option<&Path>,
    ) -> Result<Destroyed, SockDestroyError> {
        let mut out = Destroyed::default();
        for chunk in targets.chunks(KILL_MAX) {
            let keys: Vec<(BorrowedFd<'_>, Vec<u8>)> = chunk
                .iter()
                .map(|t| match t.addr {
                    IpAddr::V4(a) => (
                        self.kill4.as_fd(),
                        kill4_key(a.octets(), t.port, t.service_id).to_vec(),
                    ),
                    IpAddr::V6(a) => match a.to_ipv4_mapped() {
                        Some(a) => (
                            self.kill4.as_fd(),
                            kill4_key(a.octets(), t.port, t.service_id).to_vec(),
                        ),
                        None => (
                            self.kill6.as_fd(),
                            kill6_key(a.octets(), t.port, t.service_id).to_vec(),
                        ),
                    },
                })
                .collect();
            let filled: Result<(), _> = keys
                .iter()
                .try_for_each(|(m, k)| map_update(*m, k, &0u64.to_ne_bytes()));
            let run = filled.and_then(|()| self.walk(netns_dir));
            for (m, k) in &keys {
                out.per_target.push(map_lookup_u64(*m, k).unwrap_or(0));
                map_delete(*m, k);
            }
            let (netns, failures) = run?;
            out.netns = netns;
            out.failures = failures;
        }
        Ok(out)
    }

    /// Run every iterator in each netns, from a thread of its own (entering
    /// a netns changes the calling thread only).
    fn walk(&self, netns_dir: Option<&Path>) -> Result<(usize, Vec<String>), SockDestroyError> {
        std::thread::scope(|s| {
            s.spawn(|| self.walk_here(netns_dir))
                .join()
                .map_err(|_| SockDestroyError::Thread)?
        })
    }

    fn walk_here(
        &self,
        netns_dir: Option<&Path>,
    ) -> Result<(usize, Vec<String>), SockDestroyError> {
        let mut failures = Vec::new();
        let mut seen = HashSet::new();
        // The agent's own netns first (the thread starts there).
        if let Ok(m) = std::fs::metadata("/proc/thread-self/ns/net") {
            seen.insert((m.dev(), m.ino()));
        }
        for it in &self.iters {
            it.run()?;
        }
        let mut walked = 1;
        let mut paths: Vec<PathBuf> = match netns_dir.map(std::fs::read_dir) {
            Some(Ok(d)) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Some(Err(e)) => {
                failures.push(format!(
                    "listing {}: {e}",
                    netns_dir.unwrap_or(Path::new("")).display()
                ));
                Vec::new()
            }
            None => Vec::new(),
        };
        paths.sort();
        for path in paths {
            match self.walk_netns(&path, &mut seen) {
                Ok(true) => walked += 1,
                Ok(false) => {}
                Err(e) => failures.push(e.to_string()),
            }
        }
        Ok((walked, failures))
    }

    /// Enter the netns file `path` and walk it; false: already walked (two
    /// names for one netns) or gone meanwhile.
    fn walk_netns(
        &self,
        path: &Path,
        seen: &mut HashSet<(u64, u64)>,
    ) -> Result<bool, SockDestroyError> {
        let netns_err = |source| SockDestroyError::Netns {
            path: path.to_owned(),
            source,
        };
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(netns_err(e)),
        };
        let m = f.metadata().map_err(netns_err)?;
        if !seen.insert((m.dev(), m.ino())) {
            return Ok(false);
        }
        // SAFETY: plain syscall on an fd we own; affects this thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(netns_err(std::io::Error::last_os_error()));
        }
        for it in &self.iters {
            it.run()?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
        os::fd::AsRawFd,
    };

    use super::*;

    fn is_root() -> bool {
        // SAFETY: no arguments, no side effects.
        unsafe { libc::geteuid() == 0 }
    }

    fn cookie(s: &impl AsRawFd) -> u64 {
        let mut c = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: SO_COOKIE writes a u64 into `c`.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut c).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "SO_COOKIE");
        c
    }

    /// A thread in a netns of its own (unshared, gone with the thread).
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: affects this thread only.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
                let up = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status()
                    .expect("ip");
                assert!(up.success());
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    /// Every jump lands inside the program, the kfunc call carries its
    /// BTF id, and map loads take two slots.
    #[test]
    fn program_shape() {
        let l = Layout {
            ctx_sk: 8,
            family: 16,
            state: 18,
            daddr: 0,
            v6_daddr: 56,
            dport: 12,
            sock_destroy: 4242,
        };
        // SAFETY: fd 0 only as a number in the instructions.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let maps = ProgMaps {
            revnat4: fd,
            revnat6: fd,
            kill4: fd,
            kill6: fd,
        };
        for tcp in [false, true] {
            let p = program(&l, &maps, tcp);
            assert_eq!(p.last().map(|i| i.code), Some(EXIT));
            for (i, insn) in p.iter().enumerate() {
                if insn.code & 0x07 == 0x05 && ![CALL, EXIT].contains(&insn.code)
                    || insn.code == JEQ32_K
                    || insn.code == JNE32_K
                {
                    let to = i as i64 + 1 + insn.off as i64;
                    assert!(to > i as i64 && (to as usize) < p.len(), "jump at {i}");
                }
            }
            let kfunc: Vec<_> = p
                .iter()
                .filter(|i| i.code == CALL && i.regs >> 4 == PSEUDO_KFUNC_CALL)
                .collect();
            assert_eq!(kfunc.len(), 1);
            assert_eq!(kfunc[0].imm, 4242);
            assert_eq!(p.iter().filter(|i| i.code == LD_IMM64).count(), 4);
        }
    }

    /// The real thing: connected UDP sockets whose (cookie, peer) socket
    /// LB recorded for service 7 are destroyed when (peer, 7) is a target;
    /// one to another backend, one recorded for another service and one
    /// socket LB never saw survive. IPv4 and IPv6 alike.
    #[test]
    fn destroys_the_targeted_sockets_only() {
        if !is_root() || !Path::new(super::super::vmlinux_btf::VMLINUX).exists() {
            eprintln!("skipped: needs root and kernel BTF");
            return;
        }
        in_fresh_netns(|| {
            // Something listens at every peer: a send to a closed port
            // would fail (ICMP port unreachable) for reasons of its own.
            let _servers: Vec<UdpSocket> = ["127.0.0.1:5301", "127.0.0.1:5302", "[::1]:5301"]
                .iter()
                .map(|a| UdpSocket::bind(a).expect("server"))
                .collect();
            let rev4 = map_create(16, 12, 64).expect("revnat4");
            let rev6 = map_create(32, 24, 64).expect("revnat6");
            let d = SockDestroyer::new(rev4.as_fd(), rev6.as_fd(), false).expect("load");
            let connect = |to: SocketAddr| {
                let bind: SocketAddr = if to.is_ipv4() {
                    (Ipv4Addr::LOCALHOST, 0).into()
                } else {
                    (Ipv6Addr::LOCALHOST, 0).into()
                };
                let s = UdpSocket::bind(bind).expect("bind");
                s.connect(to).expect("connect");
                s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                    .expect("timeout");
                s.send(b"x").expect("first send");
                s
            };
            // What socket LB's connect() would have recorded.
            let record = |s: &UdpSocket, service_id: u32| match s.peer_addr().expect("peer") {
                SocketAddr::V4(p) => {
                    let mut k = [0u8; 16];
                    k[0..8].copy_from_slice(&cookie(s).to_ne_bytes());
                    k[8..12].copy_from_slice(&p.ip().octets());
                    k[12..14].copy_from_slice(&p.port().to_be_bytes());
                    let mut v = [0u8; 12];
                    v[8..12].copy_from_slice(&service_id.to_ne_bytes());
                    map_update(rev4.as_fd(), &k, &v).expect("record v4");
                }
                SocketAddr::V6(p) => {
                    let mut k = [0u8; 32];
                    k[0..8].copy_from_slice(&cookie(s).to_ne_bytes());
                    k[8..24].copy_from_slice(&p.ip().octets());
                    k[24..26].copy_from_slice(&p.port().to_be_bytes());
                    let mut v = [0u8; 24];
                    v[20..24].copy_from_slice(&service_id.to_ne_bytes());
                    map_update(rev6.as_fd(), &k, &v).expect("record v6");
                }
            };
            let dead4: SocketAddr = "127.0.0.1:5301".parse().unwrap();
            let live4: SocketAddr = "127.0.0.1:5302".parse().unwrap();
            let dead6: SocketAddr = "[::1]:5301".parse().unwrap();
            let doomed4 = connect(dead4);
            record(&doomed4, 7);
            let doomed6 = connect(dead6);
            record(&doomed6, 7);
            let other_backend = connect(live4);
            record(&other_backend, 7);
            let other_service = connect(dead4);
            record(&other_service, 8);
            let direct = connect(dead4);

            let targets = [
                Target {
                    service_id: 7,
                    addr: dead4.ip(),
                    port: dead4.port(),
                },
                Target {
                    service_id: 7,
                    addr: dead6.ip(),
                    port: dead6.port(),
                },
            ];
            let r = d.destroy(&targets, None).expect("destroy");
            assert_eq!(r.per_target, [1, 1], "{r:?}");
            assert_eq!(r.netns, 1);
            for s in [&doomed4, &doomed6] {
                // The pending error first, then the socket is unconnected.
                let e = s
                    .recv(&mut [0u8; 8])
                    .expect_err("recv on a destroyed socket");
                assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
                assert!(s.send(b"x").is_err(), "send on a destroyed socket");
            }
            for s in [&other_backend, &other_service, &direct] {
                s.send(b"x").expect("untouched socket still sends");
                assert!(s.peer_addr().is_ok(), "still connected");
            }
            // The kill maps are empty again: a second run destroys nothing.
            let r = d.destroy(&targets, None).expect("second run");
            assert_eq!(r.per_target, [0, 0]);
        });
    }

    /// `iter/tcp` (`--bpf-lb-sock-terminate-tcp`): the targeted connection
    /// is aborted, one to another backend and the accepted (server) side
    /// are not.
    #[test]
    fn destroys_targeted_tcp_connections() {
        if !is_root() || !Path::new(super::super::vmlinux_btf::VMLINUX).exists() {
            eprintln!("skipped: needs root and kernel BTF");
            return;
        }
        use std::io::{Read as _, Write as _};
        use std::net::{TcpListener, TcpStream};
        in_fresh_netns(|| {
            let rev4 = map_create(16, 12, 64).expect("revnat4");
            let rev6 = map_create(32, 24, 64).expect("revnat6");
            let d = SockDestroyer::new(rev4.as_fd(), rev6.as_fd(), true).expect("load");
            let dead = TcpListener::bind("127.0.0.1:5401").expect("listen");
            let live = TcpListener::bind("127.0.0.1:5402").expect("listen");
            let record = |s: &TcpStream, service_id: u32| {
                let SocketAddr::V4(p) = s.peer_addr().expect("peer") else {
                    panic!("IPv4 peer");
                };
                let mut k = [0u8; 16];
                k[0..8].copy_from_slice(&cookie(s).to_ne_bytes());
                k[8..12].copy_from_slice(&p.ip().octets());
                k[12..14].copy_from_slice(&p.port().to_be_bytes());
                let mut v = [0u8; 12];
                v[8..12].copy_from_slice(&service_id.to_ne_bytes());
                map_update(rev4.as_fd(), &k, &v).expect("record");
            };
            let doomed = TcpStream::connect("127.0.0.1:5401").expect("connect");
            let (mut doomed_server, _) = dead.accept().expect("accept");
            let other = TcpStream::connect("127.0.0.1:5402").expect("connect");
            let (_other_server, _) = live.accept().expect("accept");
            record(&doomed, 7);
            record(&other, 7);
            let r = d
                .destroy(
                    &[Target {
                        service_id: 7,
                        addr: Ipv4Addr::LOCALHOST.into(),
                        port: 5401,
                    }],
                    None,
                )
                .expect("destroy");
            assert_eq!(r.per_target, [1], "{r:?}");
            doomed
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
            let e = (&doomed)
                .read(&mut [0u8; 8])
                .expect_err("read on an aborted connection");
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
            (&other)
                .write_all(b"x")
                .expect("the other connection lives");
            // The server side saw the reset the abort sends.
            doomed_server
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .expect("timeout");
            assert!(
                matches!(doomed_server.read(&mut [0u8; 8]), Ok(0) | Err(_)),
                "server side closed"
            );
        });
    }
}
