//! `--mode ipvs`: IPVS over generic netlink. This part: the netlink
//! message encoding (pure, byte-tested against `include/uapi/linux/
//! genetlink.h` and `ip_vs.h`) and the probe that resolves the "IPVS"
//! generic netlink family, so a kernel without IP_VS is reported in one
//! sentence instead of failing later.

use std::io;

/// `NETLINK_GENERIC`'s controller family id (`GENL_ID_CTRL`).
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_NEWFAMILY: u8 = 1;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
/// `IPVS_GENL_NAME`.
pub const IPVS_GENL_NAME: &str = "IPVS";

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error(
        "IPVS is not available in this kernel (no \"IPVS\" generic netlink family: IP_VS not built in and no module loaded); use --mode iptables or --mode nftables"
    )]
    NotAvailable,
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("netlink: malformed reply: {0}")]
    Malformed(&'static str),
    #[error("netlink: kernel error {0}")]
    Kernel(i32),
}

/// Appends one attribute (`struct nlattr`: u16 length incl. header, u16
/// type, payload padded to 4 bytes), host byte order as netlink wants.
pub fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

/// A whole generic netlink message: `nlmsghdr` (len, type, flags, seq,
/// pid 0), `genlmsghdr` (cmd, version, reserved) and the attributes.
pub fn genl_message(
    family: u16,
    flags: u16,
    seq: u32,
    cmd: u8,
    version: u8,
    attrs: &[u8],
) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn encode_get_family(name: &str, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut z = name.as_bytes().to_vec();
    z.push(0);
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &z);
    genl_message(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        &attrs,
    )
}

/// Iterates the attributes in `buf`: (type without flag bits, payload).
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        let next = (len + 3) & !3;
        buf = buf.get(next..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

/// The family id in a reply to [`encode_get_family`]; ENOENT means the
/// family does not exist.
pub fn decode_family_reply(msg: &[u8]) -> Result<u16, IpvsError> {
    if msg.len() < 16 {
        return Err(IpvsError::Malformed("short netlink header"));
    }
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    if ty == NLMSG_ERROR {
        let code = msg
            .get(16..20)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(IpvsError::Malformed("short error message"))?;
        return Err(match -code {
            libc::ENOENT => IpvsError::NotAvailable,
            _ => IpvsError::Kernel(code),
        });
    }
    if ty != GENL_ID_CTRL || msg.get(16) != Some(&CTRL_CMD_NEWFAMILY) {
        return Err(IpvsError::Malformed("not a NEWFAMILY reply"));
    }
    attrs(msg.get(20..).unwrap_or(&[]))
        .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() == 2)
        .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
        .ok_or(IpvsError::Malformed("no family id"))
}

/// One request, one reply over a `NETLINK_GENERIC` socket.
fn roundtrip(req: &[u8]) -> Result<Vec<u8>, IpvsError> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_GENERIC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    // SAFETY: the kernel address is zeroed sockaddr_nl with the family set.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: req is a valid buffer; sa lives through the call.
    let n = unsafe {
        libc::sendto(
            raw,
            req.as_ptr().cast(),
            req.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Resolve the IPVS family: its id, or [`IpvsError::NotAvailable`].
pub fn probe() -> Result<u16, IpvsError> {
    decode_family_reply(&roundtrip(&encode_get_family(IPVS_GENL_NAME, 1))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_family_bytes() {
        // nlmsghdr{len 32, type 0x10, flags REQUEST|ACK, seq 7, pid 0},
        // genlmsghdr{cmd 3, version 1}, nlattr{len 9, type 2} "IPVS\0" + 3 pad.
        let mut want = Vec::new();
        want.extend_from_slice(&32u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[3, 1, 0, 0]);
        want.extend_from_slice(&9u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes());
        want.extend_from_slice(b"IPVS\0\0\0\0");
        assert_eq!(encode_get_family("IPVS", 7), want);
    }

    #[test]
    fn family_reply_and_enoent() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"IPVS\0");
        put_attr(&mut attrs, CTRL_ATTR_FAMILY_ID, &0x25u16.to_ne_bytes());
        let reply = genl_message(GENL_ID_CTRL, 0, 1, CTRL_CMD_NEWFAMILY, 2, &attrs);
        assert_eq!(decode_family_reply(&reply).expect("family id"), 0x25);
        let mut err = Vec::new();
        err.extend_from_slice(&36u32.to_ne_bytes());
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert!(matches!(
            decode_family_reply(&err),
            Err(IpvsError::NotAvailable)
        ));
    }
}
