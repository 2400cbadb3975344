//! Kernel side of the service proxy.
//!
//! * [`tc`]: the per-packet path on pods' host interfaces (DNAT, conntrack,
//!   reverse NAT, reject, hairpin, affinity).
//! * [`sock`]: socket LB, cgroup hooks translating at connect() time.
//! * [`xdp`]: NodePort / ExternalIP / LoadBalancer from outside.
//!
//! Anything that is not IPv4 TCP/UDP, or is malformed, truncated or carries
//! IP options, passes untouched and is counted. Fragmented datagrams of
//! service flows are translated whole: the later fragments follow their
//! first fragment (see `packet::Frag`).
#![no_std]
#![no_main]

mod lb;
mod maps;
mod nodeport;
mod packet;
mod reject;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
