//! What the agent reads from the host itself (not from Kubernetes): the
//! addresses of its interfaces, for `--nodeport-addresses` CIDRs.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every address (both families) of every interface of this network
/// namespace, sorted, each once (`getifaddrs`, a netlink dump).
pub fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    // SAFETY: walking the list getifaddrs returned; an address of family
    // AF_INET is a sockaddr_in, of AF_INET6 a sockaddr_in6.
    unsafe {
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = a as *const libc::sockaddr_in;
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            (*sin).sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = a as *const libc::sockaddr_in6;
                        out.push(IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_the_interface_addresses() {
        let all = interface_addresses().expect("getifaddrs");
        assert!(all.windows(2).all(|w| w[0] < w[1]), "sorted, once: {all:?}");
        // Every network namespace has lo; it is up in the test's.
        if all.iter().any(|a| a.is_ipv4()) {
            assert!(all.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{all:?}");
        }
    }
}
