//! Network interfaces and cgroups of this node.

use std::{collections::HashMap, ffi::CStr, fs, io, net::Ipv4Addr, path::PathBuf};

/// The cgroup v2 mount point (the default cgroup for socket LB).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 mount in /proc/mounts"))
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((prefix, rest)) => {
            let Some(tail) = name.strip_prefix(prefix) else {
                return false;
            };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// The interface holding IPv4 address `ip` in this network namespace.
pub fn interface_with_address(ip: Ipv4Addr) -> io::Result<Option<String>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut p = head;
    // SAFETY: walking the list getifaddrs returned; addresses of family
    // AF_INET are sockaddr_in.
    unsafe {
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = a as *const libc::sockaddr_in;
                let addr = Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr));
                if addr == ip && !(*p).ifa_name.is_null() {
                    found = Some(CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned());
                    break;
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(found)
}

/// Interfaces of this network namespace: name -> ifindex.
pub(super) fn interfaces() -> io::Result<HashMap<String, u32>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // or null on error; it is freed with if_freenameindex below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut p = head;
    // SAFETY: walking the array up to its terminator; names are C strings.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.insert(name, (*p).if_index);
            p = p.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1a2b3c4d"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("lxc*x", "lxc12x"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
        assert!(!glob_match("eth0", "eth01"));
    }
}
