//! `--mode ipvs`: IPVS over generic netlink, as kube-proxy's ipvs mode.
//!
//! Here: the generic netlink message encoding (pure, byte-tested against
//! `include/uapi/linux/genetlink.h` and `include/uapi/linux/ip_vs.h`), the
//! rule computation (which virtual servers and real servers an
//! [`LbTable`](crate::lb::LbTable) needs, which addresses go on the dummy
//! interface `kube-ipvs0`, and the ordered operations from one state to
//! the next), the probe that resolves the "IPVS" family so that a kernel
//! without IP_VS is reported in one sentence, and [`IpvsDataplane`].

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr},
};

use crate::{
    lb::{Frontend, FrontendKey, FrontendKind},
    model::Protocol,
};

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
    #[error("{op}: {source}")]
    Op {
        op: String,
        #[source]
        source: Box<IpvsError>,
    },
    #[error(transparent)]
    Command(#[from] super::fallback::FallbackError),
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

/// The outcome in an acknowledgement (`NLMSG_ERROR`; code 0 is success).
pub fn decode_ack(msg: &[u8]) -> Result<(), IpvsError> {
    if msg.len() < 20 {
        return Err(IpvsError::Malformed("short acknowledgement"));
    }
    if u16::from_ne_bytes([msg[4], msg[5]]) != NLMSG_ERROR {
        return Err(IpvsError::Malformed("not an acknowledgement"));
    }
    match i32::from_ne_bytes([msg[16], msg[17], msg[18], msg[19]]) {
        0 => Ok(()),
        code => Err(IpvsError::Kernel(code)),
    }
}

/// Resolve the IPVS family: its id, or [`IpvsError::NotAvailable`].
pub fn probe() -> Result<u16, IpvsError> {
    decode_family_reply(&roundtrip(&encode_get_family(IPVS_GENL_NAME, 1))?)
}

// --- include/uapi/linux/ip_vs.h ---------------------------------------

/// `IPVS_GENL_VERSION`.
pub const IPVS_GENL_VERSION: u8 = 1;
pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_SET_SERVICE: u8 = 2;
pub const IPVS_CMD_DEL_SERVICE: u8 = 3;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_DEL_DEST: u8 = 7;
pub const IPVS_CMD_FLUSH: u8 = 17;
/// Nested service / destination attributes of a command.
pub const IPVS_CMD_ATTR_SERVICE: u16 = 1;
pub const IPVS_CMD_ATTR_DEST: u16 = 2;
pub const IPVS_SVC_ATTR_AF: u16 = 1;
pub const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
pub const IPVS_SVC_ATTR_ADDR: u16 = 3;
pub const IPVS_SVC_ATTR_PORT: u16 = 4;
pub const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
pub const IPVS_SVC_ATTR_FLAGS: u16 = 7;
pub const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
pub const IPVS_SVC_ATTR_NETMASK: u16 = 9;
pub const IPVS_DEST_ATTR_ADDR: u16 = 1;
pub const IPVS_DEST_ATTR_PORT: u16 = 2;
pub const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
pub const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
pub const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
pub const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
pub const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
/// `IP_VS_SVC_F_PERSISTENT`: session affinity (ClientIP).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding (what kube-proxy uses).
pub const IP_VS_CONN_F_MASQ: u32 = 0x0000;
const AF_INET: u16 = libc::AF_INET as u16;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 0x8000;

/// Schedulers of the kernel's IPVS (`ip_vs_<name>` modules).
pub const SCHEDULERS: [&str; 14] = [
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos",
];

/// A virtual server: the frontend as IPVS sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VirtualServer {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
    pub scheduler: String,
    /// Persistence (session affinity) timeout in seconds; 0: none.
    pub persistence: u32,
}

/// A real server (destination) of a virtual server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

/// Appends a nested attribute whose payload `fill` writes.
fn put_nested(buf: &mut Vec<u8>, ty: u16, fill: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    fill(&mut inner);
    put_attr(buf, ty | NLA_F_NESTED, &inner);
}

/// `union nf_inet_addr` for an IPv4 address: the four bytes (network
/// order) then zeros, 16 bytes.
fn inet_addr(a: Ipv4Addr) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

/// The attributes identifying a service (AF, protocol, address, port);
/// with `full`, also scheduler, flags, timeout and netmask, which
/// `IPVS_CMD_NEW_SERVICE` / `SET_SERVICE` require.
fn service_attrs(vs: &VirtualServer, full: bool) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |b: &mut Vec<u8>| {
        put_attr(b, IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
        put_attr(
            b,
            IPVS_SVC_ATTR_PROTOCOL,
            &u16::from(vs.proto.number()).to_ne_bytes(),
        );
        put_attr(b, IPVS_SVC_ATTR_ADDR, &inet_addr(vs.addr));
        // __be16.
        put_attr(b, IPVS_SVC_ATTR_PORT, &vs.port.to_be_bytes());
        if full {
            let mut sched = vs.scheduler.as_bytes().to_vec();
            sched.push(0);
            put_attr(b, IPVS_SVC_ATTR_SCHED_NAME, &sched);
            // struct ip_vs_flags { __u32 flags; __u32 mask; }
            let flags = if vs.persistence > 0 {
                IP_VS_SVC_F_PERSISTENT
            } else {
                0
            };
            let mut f = flags.to_ne_bytes().to_vec();
            f.extend_from_slice(&u32::MAX.to_ne_bytes());
            put_attr(b, IPVS_SVC_ATTR_FLAGS, &f);
            put_attr(b, IPVS_SVC_ATTR_TIMEOUT, &vs.persistence.to_ne_bytes());
            // __be32 netmask: /32.
            put_attr(b, IPVS_SVC_ATTR_NETMASK, &u32::MAX.to_be_bytes());
        }
    }
}

fn dest_attrs(rs: &RealServer, full: bool) -> impl FnOnce(&mut Vec<u8>) + '_ {
    move |b: &mut Vec<u8>| {
        put_attr(b, IPVS_DEST_ATTR_ADDR_FAMILY, &AF_INET.to_ne_bytes());
        put_attr(b, IPVS_DEST_ATTR_ADDR, &inet_addr(rs.addr));
        put_attr(b, IPVS_DEST_ATTR_PORT, &rs.port.to_be_bytes());
        if full {
            put_attr(
                b,
                IPVS_DEST_ATTR_FWD_METHOD,
                &IP_VS_CONN_F_MASQ.to_ne_bytes(),
            );
            put_attr(b, IPVS_DEST_ATTR_WEIGHT, &rs.weight.to_ne_bytes());
            put_attr(b, IPVS_DEST_ATTR_U_THRESH, &0u32.to_ne_bytes());
            put_attr(b, IPVS_DEST_ATTR_L_THRESH, &0u32.to_ne_bytes());
        }
    }
}

/// One IPVS request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpvsOp {
    AddAddress(Ipv4Addr),
    NewService(VirtualServer),
    SetService(VirtualServer),
    NewDest(VirtualServer, RealServer),
    DelDest(VirtualServer, RealServer),
    DelService(VirtualServer),
    DelAddress(Ipv4Addr),
}

/// The generic netlink message for `op` (None for the address changes,
/// which go to `kube-ipvs0` over rtnetlink, not IPVS).
pub fn encode(op: &IpvsOp, family: u16, seq: u32) -> Option<Vec<u8>> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let msg = |cmd: u8, attrs: Vec<u8>| {
        Some(genl_message(
            family,
            flags,
            seq,
            cmd,
            IPVS_GENL_VERSION,
            &attrs,
        ))
    };
    let mut a = Vec::new();
    match op {
        IpvsOp::AddAddress(_) | IpvsOp::DelAddress(_) => None,
        IpvsOp::NewService(vs) => {
            put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, service_attrs(vs, true));
            msg(IPVS_CMD_NEW_SERVICE, a)
        }
        IpvsOp::SetService(vs) => {
            put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, service_attrs(vs, true));
            msg(IPVS_CMD_SET_SERVICE, a)
        }
        IpvsOp::DelService(vs) => {
            put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, service_attrs(vs, false));
            msg(IPVS_CMD_DEL_SERVICE, a)
        }
        IpvsOp::NewDest(vs, rs) => {
            put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, service_attrs(vs, false));
            put_nested(&mut a, IPVS_CMD_ATTR_DEST, dest_attrs(rs, true));
            msg(IPVS_CMD_NEW_DEST, a)
        }
        IpvsOp::DelDest(vs, rs) => {
            put_nested(&mut a, IPVS_CMD_ATTR_SERVICE, service_attrs(vs, false));
            put_nested(&mut a, IPVS_CMD_ATTR_DEST, dest_attrs(rs, false));
            msg(IPVS_CMD_DEL_DEST, a)
        }
    }
}

/// `IPVS_CMD_FLUSH`: every virtual server goes (cleanup).
pub fn encode_flush(family: u16, seq: u32) -> Vec<u8> {
    genl_message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        IPVS_CMD_FLUSH,
        IPVS_GENL_VERSION,
        &[],
    )
}

/// What IPVS holds for a set of frontends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpvsState {
    /// (address, port, protocol) -> virtual server and its real servers.
    pub services: BTreeMap<FrontendKey, (VirtualServer, BTreeSet<RealServer>)>,
    /// Addresses bound to `kube-ipvs0` (ClusterIPs, ExternalIPs,
    /// LoadBalancer IPs: IPVS only sees packets to local addresses; node
    /// addresses are local already).
    pub addresses: BTreeSet<Ipv4Addr>,
}

/// kube-proxy's ipvs rules for `frontends`: one virtual server per
/// frontend (NodePorts on each node address), real servers weight 1,
/// `persistence` for ClientIP affinity. Frontends without backends keep a
/// virtual server without destinations (as kube-proxy; the packet is then
/// dropped, the reject is the iptables glue's job).
pub fn desired(frontends: &BTreeMap<FrontendKey, Frontend>, scheduler: &str) -> IpvsState {
    let mut st = IpvsState::default();
    for (k, f) in frontends {
        // IPv4 only for now (see `fallback::programs`).
        let IpAddr::V4(addr) = k.addr else {
            continue;
        };
        if f.kind != FrontendKind::NodePort {
            st.addresses.insert(addr);
        }
        let vs = VirtualServer {
            addr,
            port: k.port,
            proto: k.proto,
            scheduler: scheduler.to_owned(),
            persistence: f.affinity_timeout,
        };
        let rs = f
            .backends
            .iter()
            .filter_map(|b| match b.addr {
                IpAddr::V4(addr) => Some(RealServer {
                    addr,
                    port: b.port,
                    weight: 1,
                }),
                IpAddr::V6(_) => None,
            })
            .collect();
        st.services.insert(*k, (vs, rs));
    }
    st
}

/// The operations from `old` to `new`, in an order the kernel accepts:
/// addresses and services first, destinations added before stale ones go
/// (no moment without a backend), then services and addresses removed.
pub fn plan(old: &IpvsState, new: &IpvsState) -> Vec<IpvsOp> {
    let mut ops: Vec<IpvsOp> = new
        .addresses
        .difference(&old.addresses)
        .map(|a| IpvsOp::AddAddress(*a))
        .collect();
    let mut dels = Vec::new();
    for (k, (vs, rs)) in &new.services {
        let before = old.services.get(k);
        match before {
            None => ops.push(IpvsOp::NewService(vs.clone())),
            Some((ovs, _)) if ovs != vs => ops.push(IpvsOp::SetService(vs.clone())),
            Some(_) => {}
        }
        let ors = before.map(|(_, r)| r.clone()).unwrap_or_default();
        // A weight change is a delete and an add of the same address.
        ops.extend(rs.difference(&ors).map(|r| IpvsOp::NewDest(vs.clone(), *r)));
        dels.extend(ors.difference(rs).map(|r| IpvsOp::DelDest(vs.clone(), *r)));
    }
    ops.extend(dels);
    for (k, (vs, _)) in &old.services {
        if !new.services.contains_key(k) {
            ops.push(IpvsOp::DelService(vs.clone()));
        }
    }
    ops.extend(
        old.addresses
            .difference(&new.addresses)
            .map(|a| IpvsOp::DelAddress(*a)),
    );
    ops
}

/// Checks `--ipvs-scheduler`-style names against the kernel's schedulers.
pub fn valid_scheduler(name: &str) -> bool {
    SCHEDULERS.contains(&name)
}

/// The dummy interface holding service addresses (kube-proxy's name).
pub const DUMMY: &str = "kube-ipvs0";

/// `--mode ipvs` as a [`super::Dataplane`]: the plan between the last
/// state and the desired one, one acknowledged generic netlink request per
/// operation, addresses on [`DUMMY`] with `ip`, and kube-proxy's
/// iptables/ipset glue ([`super::ipvs_glue`]) for masquerade, source
/// ranges and rejects. Exercised live in the VM test
/// (`tests/tests/vm_ipvs.rs`).
pub struct IpvsDataplane {
    family: u16,
    scheduler: String,
    seq: u32,
    state: IpvsState,
    programmed: crate::lb::LbTable,
    glue: super::ipvs_glue::Glue,
    ticks: u32,
    /// IPv6 frontends left out (IPv4 only for now).
    ipv6_left: super::fallback::Ipv6Left,
}

impl IpvsDataplane {
    /// Resolves the family (failing in one sentence without IP_VS), sets
    /// kube-proxy's sysctls, creates the dummy interface, starts from an
    /// empty IPVS table and installs the iptables/ipset glue.
    pub fn new(
        scheduler: &str,
        opts: super::fallback::RuleOptions,
    ) -> Result<IpvsDataplane, IpvsError> {
        let family = probe()?;
        super::ipvs_glue::set_sysctls()?;
        let glue = super::ipvs_glue::Glue::install(opts)?;
        let mut dp = IpvsDataplane {
            family,
            scheduler: scheduler.to_owned(),
            seq: 1,
            state: IpvsState::default(),
            programmed: crate::lb::LbTable::default(),
            glue,
            ticks: 0,
            ipv6_left: super::fallback::Ipv6Left::default(),
        };
        dp.reset()?;
        Ok(dp)
    }

    /// Flush IPVS and the dummy interface's addresses.
    fn reset(&mut self) -> Result<(), IpvsError> {
        self.seq = self.seq.wrapping_add(1);
        decode_ack(&roundtrip(&encode_flush(self.family, self.seq))?)?;
        if super::fallback::run("ip", &["link", "show", DUMMY], None).is_err() {
            super::fallback::run("ip", &["link", "add", DUMMY, "type", "dummy"], None)?;
        }
        super::fallback::run("ip", &["addr", "flush", "dev", DUMMY], None)?;
        self.state = IpvsState::default();
        Ok(())
    }

    fn execute(&mut self, op: &IpvsOp) -> Result<(), IpvsError> {
        let wrap = |e: IpvsError| IpvsError::Op {
            op: format!("{op:?}"),
            source: Box::new(e),
        };
        match op {
            IpvsOp::AddAddress(a) | IpvsOp::DelAddress(a) => {
                let verb = if matches!(op, IpvsOp::AddAddress(_)) {
                    "add"
                } else {
                    "del"
                };
                let cidr = format!("{a}/32");
                super::fallback::run("ip", &["addr", verb, &cidr, "dev", DUMMY], None)
                    .map(|_| ())
                    .map_err(|e| wrap(e.into()))
            }
            _ => {
                self.seq = self.seq.wrapping_add(1);
                let msg = encode(op, self.family, self.seq)
                    .ok_or_else(|| wrap(IpvsError::Malformed("no message")))?;
                roundtrip(&msg).and_then(|r| decode_ack(&r)).map_err(wrap)
            }
        }
    }
}

impl super::Dataplane for IpvsDataplane {
    type Error = IpvsError;

    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn programmed(&self) -> &crate::lb::LbTable {
        &self.programmed
    }

    fn apply(&mut self, changes: &[crate::diff::Change]) -> Result<super::ApplyStats, IpvsError> {
        let next = super::fallback::applied(&self.programmed, changes);
        let want = desired(&next.frontends, &self.scheduler);
        // The sets first: a new service's rules (masquerade, the reject
        // exemption) hold before its virtual server takes traffic.
        self.glue.sync(&next.frontends, &want.addresses)?;
        for op in plan(&self.state, &want) {
            if let Err(e) = self.execute(&op) {
                // State unknown: start over on the next sync.
                let _ = self.reset();
                self.programmed = crate::lb::LbTable::default();
                return Err(e);
            }
        }
        self.state = want;
        // IPv4 only: the IPv6 frontends are not programmed here.
        let mut flows =
            super::fallback::stale_udp_flows(&self.programmed.frontends, &next.frontends);
        flows.retain(|(vip, _, _)| vip.is_ipv4());
        super::fallback::flush_udp_flows(&flows);
        let stats = super::iptables::stats(&self.programmed, changes);
        self.programmed = next;
        self.ipv6_left
            .after_sync(self.mode(), &self.programmed.frontends);
        Ok(stats)
    }

    fn housekeeping(&mut self) -> Result<(), IpvsError> {
        // Someone flushing the built-in chains drops our jumps: put them
        // back (every 30 ticks: each check is a process).
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(30) {
            self.glue.housekeeping()?;
        }
        Ok(())
    }
}

/// Remove our ipvs-mode state (`--cleanup`): the iptables/ipset glue, then
/// (with IP_VS) flush the table and delete the dummy interface. Returns
/// whether anything was found.
pub fn cleanup() -> Result<bool, IpvsError> {
    let glue = super::ipvs_glue::cleanup()?;
    let family = match probe() {
        Ok(f) => f,
        Err(IpvsError::NotAvailable) => return Ok(glue),
        Err(e) => return Err(e),
    };
    decode_ack(&roundtrip(&encode_flush(family, 1))?)?;
    let had_dummy = super::fallback::run("ip", &["link", "show", DUMMY], None).is_ok();
    if had_dummy {
        super::fallback::run("ip", &["link", "del", DUMMY], None)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendAddr;

    #[test]
    fn acks() {
        let ack = |code: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&code.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        assert!(decode_ack(&ack(0)).is_ok());
        assert!(
            matches!(decode_ack(&ack(-libc::EEXIST)), Err(IpvsError::Kernel(c)) if c == -libc::EEXIST)
        );
        assert!(decode_ack(&[0; 8]).is_err());
    }

    fn vs() -> VirtualServer {
        VirtualServer {
            addr: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            proto: Protocol::Tcp,
            scheduler: "rr".into(),
            persistence: 0,
        }
    }

    /// Hand-built nlattr: u16 len, u16 type, payload, pad.
    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn header(len: u32, family: u16, seq: u32, cmd: u8) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&family.to_ne_bytes());
        v.extend_from_slice(&5u16.to_ne_bytes()); // REQUEST | ACK
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&[cmd, 1, 0, 0]);
        v
    }

    fn svc_id() -> Vec<u8> {
        let mut v = attr(1, &2u16.to_ne_bytes()); // AF_INET
        v.extend(attr(2, &6u16.to_ne_bytes())); // IPPROTO_TCP
        v.extend(attr(
            3,
            &[10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ));
        v.extend(attr(4, &[0, 80])); // port 80, big-endian
        v
    }

    #[test]
    fn new_service_bytes() {
        let mut svc = svc_id();
        svc.extend(attr(6, b"rr\0")); // 7 bytes + 1 pad
        let mut flags = 0u32.to_ne_bytes().to_vec();
        flags.extend_from_slice(&0xffff_ffffu32.to_ne_bytes());
        svc.extend(attr(7, &flags));
        svc.extend(attr(8, &0u32.to_ne_bytes()));
        svc.extend(attr(9, &[0xff, 0xff, 0xff, 0xff]));
        // Sizes by hand: AF 8 + proto 8 + addr 20 + port 8 + sched 8 +
        // flags 12 + timeout 8 + netmask 8 = 80; nested header 4 -> 84.
        assert_eq!(svc.len(), 80);
        let nested = attr(1 | 0x8000, &svc);
        let mut want = header(20 + 84, 0x25, 9, 1);
        want.extend(nested);
        assert_eq!(want.len(), 104);
        let got = encode(&IpvsOp::NewService(vs()), 0x25, 9).expect("message");
        assert_eq!(got, want);
    }

    #[test]
    fn persistent_service_sets_flag_and_timeout() {
        let mut v = vs();
        v.persistence = 10800;
        let got = encode(&IpvsOp::NewService(v), 0x25, 1).expect("message");
        // flags attr: after header(20) + nested hdr(4) + id(44) + sched(8).
        let flags = &got[20 + 4 + 44 + 8..][..12];
        assert_eq!(&flags[4..8], &1u32.to_ne_bytes());
        let timeout = &got[20 + 4 + 44 + 8 + 12..][..8];
        assert_eq!(&timeout[4..], &10800u32.to_ne_bytes());
    }

    #[test]
    fn new_and_del_dest_bytes() {
        let rs = RealServer {
            addr: Ipv4Addr::new(10, 244, 1, 2),
            port: 8080,
            weight: 1,
        };
        let mut dest = attr(11, &2u16.to_ne_bytes());
        dest.extend(attr(
            1,
            &[10, 244, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ));
        dest.extend(attr(2, &8080u16.to_be_bytes()));
        let id_only = dest.clone();
        dest.extend(attr(3, &0u32.to_ne_bytes())); // masquerading
        dest.extend(attr(4, &1u32.to_ne_bytes()));
        dest.extend(attr(5, &0u32.to_ne_bytes()));
        dest.extend(attr(6, &0u32.to_ne_bytes()));
        let mut body = attr(1 | 0x8000, &svc_id());
        body.extend(attr(2 | 0x8000, &dest));
        let mut want = header(20 + body.len() as u32, 0x25, 3, 5);
        want.extend(body);
        assert_eq!(encode(&IpvsOp::NewDest(vs(), rs), 0x25, 3), Some(want));

        let mut body = attr(1 | 0x8000, &svc_id());
        body.extend(attr(2 | 0x8000, &id_only));
        let mut want = header(20 + body.len() as u32, 0x25, 4, 7);
        want.extend(body);
        assert_eq!(encode(&IpvsOp::DelDest(vs(), rs), 0x25, 4), Some(want));
    }

    #[test]
    fn del_service_and_flush_bytes() {
        let body = attr(1 | 0x8000, &svc_id());
        let mut want = header(20 + body.len() as u32, 0x25, 2, 3);
        want.extend(body);
        assert_eq!(encode(&IpvsOp::DelService(vs()), 0x25, 2), Some(want));
        assert_eq!(encode_flush(0x25, 8), header(20, 0x25, 8, 17));
        assert_eq!(encode(&IpvsOp::AddAddress(Ipv4Addr::LOCALHOST), 1, 1), None);
    }

    fn frontends(backends: &[u8]) -> BTreeMap<FrontendKey, Frontend> {
        let fe = |kind, backends: &[u8]| Frontend {
            kind,
            backends: backends
                .iter()
                .map(|b| BackendAddr {
                    addr: Ipv4Addr::new(10, 244, 1, *b).into(),
                    port: 8080,
                    terminating: false,
                    local: true,
                })
                .collect(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        };
        BTreeMap::from([
            (
                FrontendKey {
                    addr: Ipv4Addr::new(10, 96, 0, 10).into(),
                    port: 80,
                    proto: Protocol::Tcp,
                },
                fe(FrontendKind::ClusterIp, backends),
            ),
            (
                FrontendKey {
                    addr: Ipv4Addr::new(172, 18, 0, 11).into(),
                    port: 30080,
                    proto: Protocol::Tcp,
                },
                fe(FrontendKind::NodePort, backends),
            ),
        ])
    }

    #[test]
    fn ipv6_frontends_get_no_virtual_server() {
        let mut fes = frontends(&[2, 3]);
        let mut six = fes.values().next().cloned().expect("a frontend");
        six.backends = vec![BackendAddr {
            addr: "fd00:244:1::2".parse().expect("address"),
            port: 8080,
            terminating: false,
            local: true,
        }]
        .into();
        fes.insert(
            FrontendKey {
                addr: "fd00:96::10".parse().expect("address"),
                port: 80,
                proto: Protocol::Tcp,
            },
            six,
        );
        assert_eq!(desired(&fes, "rr"), desired(&frontends(&[2, 3]), "rr"));
    }

    #[test]
    fn desired_state_and_dummy_addresses() {
        let st = desired(&frontends(&[2, 3]), "mh");
        assert_eq!(st.services.len(), 2);
        // Node addresses are local already: only the ClusterIP is bound.
        assert_eq!(
            st.addresses.iter().copied().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(10, 96, 0, 10)]
        );
        assert!(
            st.services
                .values()
                .all(|(vs, rs)| vs.scheduler == "mh" && rs.len() == 2)
        );
    }

    #[test]
    fn one_endpoint_removed_is_one_del_dest_per_frontend() {
        let old = desired(&frontends(&[2, 3]), "rr");
        let new = desired(&frontends(&[2]), "rr");
        let ops = plan(&old, &new);
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(
            ops.iter().all(
                |o| matches!(o, IpvsOp::DelDest(_, rs) if rs.addr == Ipv4Addr::new(10, 244, 1, 3))
            ),
            "{ops:?}"
        );
        assert!(plan(&new, &new).is_empty());
    }

    #[test]
    fn from_nothing_and_back() {
        let st = desired(&frontends(&[2]), "rr");
        let up = plan(&IpvsState::default(), &st);
        assert_eq!(
            up.first(),
            Some(&IpvsOp::AddAddress(Ipv4Addr::new(10, 96, 0, 10)))
        );
        assert_eq!(
            up.iter()
                .filter(|o| matches!(o, IpvsOp::NewService(_)))
                .count(),
            2
        );
        assert_eq!(
            up.iter()
                .filter(|o| matches!(o, IpvsOp::NewDest(..)))
                .count(),
            2
        );
        let down = plan(&st, &IpvsState::default());
        assert_eq!(
            down.iter()
                .filter(|o| matches!(o, IpvsOp::DelService(_)))
                .count(),
            2
        );
        assert_eq!(
            down.last(),
            Some(&IpvsOp::DelAddress(Ipv4Addr::new(10, 96, 0, 10)))
        );
        assert!(valid_scheduler("mh") && !valid_scheduler("random"));
    }

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
