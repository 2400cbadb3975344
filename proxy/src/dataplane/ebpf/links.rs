//! Program attachments that outlive the agent: every link is pinned under
//! `<bpffs-path>/links/`, so a restarted (or killed) agent leaves the data
//! path running, and the next one swaps its programs in atomically.

use std::{fs, io, os::fd::AsFd, path::Path};

use aya::programs::{
    CgroupAttachMode, ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};

#[derive(Debug, thiserror::Error)]
pub enum LinkPinError {
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{what}: {source}")]
    Link {
        what: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn pin_error(what: &str) -> impl FnOnce(aya::pin::PinError) -> LinkPinError + '_ {
    move |e| LinkPinError::Io {
        what: format!("pinning {what}"),
        source: io::Error::other(e.to_string()),
    }
}

/// Attach `prog` to `iface` (TCX), replacing in place the program of a link
/// pinned at `pin` by an earlier agent if there is one (no moment without a
/// program), and pin the result there.
pub fn attach_tc(
    prog: &mut SchedClassifier,
    iface: &str,
    direction: TcAttachType,
    pin: &Path,
) -> Result<PinnedLink, LinkPinError> {
    let what = format!("{iface} {direction:?}");
    let mut link_id = None;
    if pin.exists() {
        match PinnedLink::from_pin(pin) {
            Ok(old) => {
                let fd: FdLink = old.into();
                match SchedClassifierLink::try_from(fd) {
                    Ok(link) => match prog.attach_to_link(link) {
                        Ok(id) => link_id = Some(id),
                        // A link whose interface went away: start afresh.
                        Err(e) => tracing::debug!(iface, error = %e, "stale pinned link"),
                    },
                    Err(e) => tracing::debug!(iface, error = %e, "pinned link of another kind"),
                }
            }
            Err(e) => tracing::debug!(iface, error = %e, "unreadable pinned link"),
        }
        let _ = fs::remove_file(pin);
    }
    let id = match link_id {
        Some(id) => id,
        None => prog
            .attach(iface, direction)
            .map_err(|source| LinkPinError::Program {
                what: format!("attaching to {what}"),
                source: Box::new(source),
            })?,
    };
    let link = prog.take_link(id).map_err(|source| LinkPinError::Program {
        what: format!("taking the link of {what}"),
        source: Box::new(source),
    })?;
    let fd: FdLink = link.try_into().map_err(|source| LinkPinError::Link {
        what: format!("{what} is not an fd link (TCX needed to pin it)"),
        source: Box::new(source),
    })?;
    fd.pin(pin).map_err(pin_error(&what))
}

/// Attach a socket hook to a cgroup and pin the link. An earlier agent's
/// link at `pin` is released only after the new one is in place (both
/// translate the same way meanwhile, so nothing is missed).
pub fn attach_cgroup<P: CgroupProgram>(
    prog: &mut P,
    cgroup: impl AsFd,
    name: &str,
    pin: &Path,
) -> Result<PinnedLink, LinkPinError> {
    let old = if pin.exists() {
        let old = PinnedLink::from_pin(pin).ok();
        let _ = fs::remove_file(pin);
        old
    } else {
        None
    };
    // Cgroup *links* always coexist with other links (multi-attach); the
    // kernel rejects BPF_F_ALLOW_MULTI on bpf_link_create (aya#1078), so
    // the mode flag must stay empty.
    let id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|source| LinkPinError::Program {
            what: format!("attaching {name} to the cgroup"),
            source: Box::new(source),
        })?;
    let link = prog.take_link(id).map_err(|source| LinkPinError::Program {
        what: format!("taking the link of {name}"),
        source: Box::new(source),
    })?;
    let fd: FdLink = link.try_into().map_err(|source| LinkPinError::Link {
        what: format!("{name} is not an fd link"),
        source: Box::new(source),
    })?;
    let pinned = fd.pin(pin).map_err(pin_error(name))?;
    // Dropping the old link's last reference detaches it.
    drop(old);
    Ok(pinned)
}

/// The cgroup program types the socket LB attaches (sock_addr hooks and
/// sock_release), as one attach-and-pin path.
pub trait CgroupProgram {
    type Link: TryInto<FdLink, Error = aya::programs::links::LinkError>;
    type Id;
    fn attach(
        &mut self,
        cgroup: impl AsFd,
        mode: CgroupAttachMode,
    ) -> Result<Self::Id, aya::programs::ProgramError>;
    fn take_link(&mut self, id: Self::Id) -> Result<Self::Link, aya::programs::ProgramError>;
}

macro_rules! cgroup_program {
    ($t:ty, $link:ty, $id:ty) => {
        impl CgroupProgram for $t {
            type Link = $link;
            type Id = $id;
            fn attach(
                &mut self,
                cgroup: impl AsFd,
                mode: CgroupAttachMode,
            ) -> Result<$id, aya::programs::ProgramError> {
                <$t>::attach(self, cgroup, mode)
            }
            fn take_link(&mut self, id: $id) -> Result<$link, aya::programs::ProgramError> {
                <$t>::take_link(self, id)
            }
        }
    };
}

cgroup_program!(
    aya::programs::CgroupSockAddr,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLink,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId
);
cgroup_program!(
    aya::programs::CgroupSock,
    aya::programs::cgroup_sock::CgroupSockLink,
    aya::programs::cgroup_sock::CgroupSockLinkId
);

/// Remove a pinned link (detaching it once nothing else holds it).
pub fn unpin(link: PinnedLink) {
    if let Ok(fd) = link.unpin() {
        drop(fd);
    }
}

/// How [`attach_xdp`] attaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum XdpAttach {
    /// Driver mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
    /// Native, generic as a logged fallback.
    #[default]
    Auto,
    /// Not attached (an earlier agent's pinned XDP link is removed).
    None,
}

/// Attach XDP to `iface` in `mode`, replacing in place the program of a
/// link pinned at `pin`, and pin it.
pub fn attach_xdp(
    prog: &mut aya::programs::Xdp,
    iface: &str,
    pin: &Path,
    mode: XdpAttach,
) -> Result<(PinnedLink, &'static str), LinkPinError> {
    use aya::programs::{XdpMode, xdp::XdpLink};
    let mut attached = None;
    if pin.exists() {
        if let Ok(old) = PinnedLink::from_pin(pin) {
            let fd: FdLink = old.into();
            if let Ok(link) = XdpLink::try_from(fd)
                && let Ok(id) = prog.attach_to_link(link)
            {
                attached = Some((id, "replaced"));
            }
        }
        let _ = fs::remove_file(pin);
    }
    let generic = |prog: &mut aya::programs::Xdp| {
        prog.attach(iface, XdpMode::Skb)
            .map_err(|source| LinkPinError::Program {
                what: format!("attaching XDP to {iface} in generic mode"),
                source: Box::new(source),
            })
    };
    let (id, how) = match (attached, mode) {
        (Some(a), _) => a,
        (None, XdpAttach::Generic) => (generic(prog)?, "generic"),
        (None, XdpAttach::Native) => (
            prog.attach(iface, XdpMode::Driver)
                .map_err(|source| LinkPinError::Program {
                    what: format!("attaching XDP to {iface} in native mode (--xdp-mode native)"),
                    source: Box::new(source),
                })?,
            "native",
        ),
        (None, XdpAttach::None) => {
            // Callers skip the attach for this mode.
            return Err(LinkPinError::Program {
                what: format!("XDP on {iface} with attach mode none"),
                source: Box::new(aya::programs::ProgramError::NotAttached),
            });
        }
        (None, XdpAttach::Auto) => match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, "native"),
            Err(e) => {
                tracing::warn!(iface, error = %e, "native XDP failed; using generic (skb) mode");
                (generic(prog)?, "generic")
            }
        },
    };
    let link = prog.take_link(id).map_err(|source| LinkPinError::Program {
        what: format!("taking the XDP link of {iface}"),
        source: Box::new(source),
    })?;
    let fd: FdLink = link.try_into().map_err(|source| LinkPinError::Link {
        what: format!("XDP on {iface} is not an fd link"),
        source: Box::new(source),
    })?;
    Ok((fd.pin(pin).map_err(pin_error(iface))?, how))
}
