//! One view of a packet for the tc (`__sk_buff`) and XDP (`xdp_md`) hooks:
//! bounds-checked loads and stores, and incremental checksum updates. On tc
//! the kernel helpers do the stores and checksums (they know the skb's
//! checksum state); on XDP the bytes are written directly and checksums are
//! updated by hand (RFC 1624), with the same semantics.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    programs::{TcContext, XdpContext},
};

use crate::error::Error;

/// Where an L4 checksum lives and how it behaves.
#[derive(Clone, Copy)]
pub struct L4Csum {
    pub off: usize,
    /// UDP: a zero checksum means "none" and stays zero; a computed zero is
    /// sent as 0xffff.
    pub udp: bool,
}

pub trait Ctx {
    /// The hook's "let it through" and "drop" verdicts.
    const PASS: i32;
    const DROP: i32;

    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole packet.
    fn len(&self) -> u32;

    /// Make sure the first `len` bytes (or the whole packet, if shorter)
    /// are in the linear area (tc); XDP's buffer is always linear.
    #[inline(always)]
    fn pull(&self, _len: u32) {}

    /// A pointer to a `T` at `off`, only if all of it lies in the packet.
    #[inline(always)]
    fn ptr_at<T>(&self, off: usize) -> Result<*mut T, Error> {
        let start = self.data();
        if start + off + size_of::<T>() > self.data_end() {
            return Err(Error::Malformed);
        }
        Ok((start + off) as *mut T)
    }

    /// A copy of the `T` at `off`.
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Result<T, Error> {
        let p: *const T = self.ptr_at(off)?;
        // SAFETY: bounds checked by ptr_at; read as an unaligned copy.
        Ok(unsafe { p.read_unaligned() })
    }

    /// Overwrite the bytes at `off` with `v`.
    fn write<T: Copy>(&self, off: usize, v: &T) -> Result<(), Error>;

    /// The IPv4 header checksum at `off` for a 4-byte field going from
    /// `from` to `to`.
    fn l3_csum(&self, off: usize, from: u32, to: u32) -> Result<(), Error>;

    /// The L4 checksum for an address of the pseudo-header going from
    /// `from` to `to`.
    fn l4_csum_addr(&self, c: L4Csum, from: u32, to: u32) -> Result<(), Error>;

    /// The L4 checksum for a port going from `from` to `to`.
    fn l4_csum_port(&self, c: L4Csum, from: u16, to: u16) -> Result<(), Error>;
}

/// Turn the outcome of a `try_*` function into a deliberate verdict, counting
/// why a packet was not translated.
#[inline(always)]
pub fn verdict<C: Ctx>(r: Result<i32, Error>) -> i32 {
    match r {
        Ok(v) => v,
        Err(e) => {
            crate::maps::count(e.stat());
            if e.drops() { C::DROP } else { C::PASS }
        }
    }
}

impl Ctx for TcContext {
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn pull(&self, len: u32) {
        let len = len.min(TcContext::len(self));
        if self.data_end() - self.data() < len as usize {
            let _ = self.pull_data(len);
        }
    }

    #[inline(always)]
    fn write<T: Copy>(&self, off: usize, v: &T) -> Result<(), Error> {
        TcContext::store(self, off, v, 0).map_err(|_| Error::Rewrite)
    }

    #[inline(always)]
    fn l3_csum(&self, off: usize, from: u32, to: u32) -> Result<(), Error> {
        TcContext::l3_csum_replace(self, off, from as u64, to as u64, 4).map_err(|_| Error::Rewrite)
    }

    #[inline(always)]
    fn l4_csum_addr(&self, c: L4Csum, from: u32, to: u32) -> Result<(), Error> {
        let flags = BPF_F_PSEUDO_HDR as u64 | mangled_0(c) | 4;
        TcContext::l4_csum_replace(self, c.off, from as u64, to as u64, flags)
            .map_err(|_| Error::Rewrite)
    }

    #[inline(always)]
    fn l4_csum_port(&self, c: L4Csum, from: u16, to: u16) -> Result<(), Error> {
        TcContext::l4_csum_replace(self, c.off, from as u64, to as u64, mangled_0(c) | 2)
            .map_err(|_| Error::Rewrite)
    }
}

#[inline(always)]
fn mangled_0(c: L4Csum) -> u64 {
    if c.udp {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

impl Ctx for XdpContext {
    const PASS: i32 = XDP_PASS as i32;
    const DROP: i32 = XDP_DROP as i32;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    #[inline(always)]
    fn write<T: Copy>(&self, off: usize, v: &T) -> Result<(), Error> {
        let p: *mut T = self.ptr_at(off)?;
        // SAFETY: bounds checked by ptr_at; `T` is plain data.
        unsafe { p.write_unaligned(*v) };
        Ok(())
    }

    #[inline(always)]
    fn l3_csum(&self, off: usize, from: u32, to: u32) -> Result<(), Error> {
        let p: *mut u16 = self.ptr_at(off)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { p.write_unaligned(csum_replace4(p.read_unaligned(), from, to)) };
        Ok(())
    }

    #[inline(always)]
    fn l4_csum_addr(&self, c: L4Csum, from: u32, to: u32) -> Result<(), Error> {
        xdp_l4_csum(self, c, from, to)
    }

    #[inline(always)]
    fn l4_csum_port(&self, c: L4Csum, from: u16, to: u16) -> Result<(), Error> {
        xdp_l4_csum(self, c, from as u32, to as u32)
    }
}

#[inline(always)]
fn xdp_l4_csum(ctx: &XdpContext, c: L4Csum, from: u32, to: u32) -> Result<(), Error> {
    let p: *mut u16 = ctx.ptr_at(c.off)?;
    // SAFETY: bounds checked by ptr_at.
    let check = unsafe { p.read_unaligned() };
    if c.udp && check == 0 {
        return Ok(());
    }
    let mut v = csum_replace4(check, from, to);
    if c.udp && v == 0 {
        v = 0xffff;
    }
    // SAFETY: as above.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// RFC 1624 incremental update of a ones'-complement checksum for a 32-bit
/// field (a 16-bit one is passed zero-extended), on raw network-order
/// words: byte order does not matter to the arithmetic as long as
/// everything is loaded the same way.
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let mut sum: u32 = (!check) as u32;
    sum += (!(old as u16)) as u32 + (!((old >> 16) as u16)) as u32;
    sum += (new as u16) as u32 + ((new >> 16) as u16) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
