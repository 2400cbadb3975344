//! The dataplane's side of [`super::sock_destroy`]: which (frontend,
//! backend) pairs a batch of changes ends, and destroying the sockets
//! socket LB connected through them once the maps no longer offer those
//! backends (so a client that reconnects cannot get the dead one again).

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing::{debug, info, warn};

use super::{
    EbpfDataplane,
    sock_destroy::{SockDestroyer, Target},
};
use crate::{diff::Change, model::Protocol};

/// `--bpf-lb-sock-terminate*` and `--netns-dir`.
#[derive(Clone, Debug)]
pub struct SockTerminate {
    /// Destroy connected UDP sockets of backends that went.
    pub udp: bool,
    /// The same for TCP.
    pub tcp: bool,
    /// Directory of netns files walked besides the agent's own netns.
    pub netns_dir: Option<PathBuf>,
}

impl Default for SockTerminate {
    fn default() -> Self {
        SockTerminate {
            udp: true,
            tcp: false,
            netns_dir: Some(PathBuf::from("/run/netns")),
        }
    }
}

/// Counters for `/metrics` (shared with its reader).
#[derive(Debug, Default)]
pub struct SockDestroyCounters {
    pub udp: AtomicU64,
    pub tcp: AtomicU64,
    /// Runs (or loads) that failed, and namespaces that could not be walked.
    pub failures: AtomicU64,
}

impl SockDestroyCounters {
    /// `(proto, destroyed)` pairs and the failures.
    pub fn read(&self) -> (Vec<(String, u64)>, u64) {
        (
            vec![
                ("tcp".to_owned(), self.tcp.load(Ordering::Relaxed)),
                ("udp".to_owned(), self.udp.load(Ordering::Relaxed)),
            ],
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// The destroyer's state in the dataplane.
pub(super) enum Destroyer {
    /// Off by flags (or socket LB off: nothing to destroy).
    Off,
    Ready(SockDestroyer),
    /// Loading failed; logged once, nothing more is tried.
    Unavailable,
}

impl Destroyer {
    /// Load the iterators when the flags ask for them. A kernel that cannot
    /// (before 6.5, no BTF) is logged once and counted, never fatal.
    pub(super) fn load(dp: &EbpfDataplane) -> Destroyer {
        let t = &dp.cfg.sock_terminate;
        if dp.cfg.socket_lb_cgroup.is_none() || !(t.udp || t.tcp) {
            return Destroyer::Off;
        }
        use aya::maps::IterableMap;
        let revnat4 = dp.maps.sock_revnat.map().fd();
        let revnat6 = dp.maps.sock_revnat6.map().fd();
        use std::os::fd::AsFd;
        match SockDestroyer::new(revnat4.as_fd(), revnat6.as_fd(), t.tcp) {
            Ok(d) => {
                info!(
                    udp = t.udp,
                    tcp = t.tcp,
                    netns_dir = ?t.netns_dir,
                    "stale sockets: sockets connected to a backend that leaves its service are destroyed"
                );
                Destroyer::Ready(d)
            }
            Err(e) => {
                dp.sock_destroy_counters
                    .failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    error = %e,
                    "stale sockets: cannot destroy sockets of removed backends (--bpf-lb-sock-terminate); connected clients keep a removed backend until they reconnect"
                );
                Destroyer::Unavailable
            }
        }
    }
}

impl EbpfDataplane {
    /// The (frontend, backend) pairs `change` ends, for the protocols whose
    /// sockets are destroyed (before the change is applied).
    pub(super) fn departing(&self, change: &Change) -> Vec<(Target, Protocol)> {
        if !matches!(self.sock_destroyer, Destroyer::Ready(_)) {
            return Vec::new();
        }
        let (key, new) = match change {
            Change::Upsert(k, f) => (k, Some(f)),
            Change::Remove(k) => (k, None),
        };
        let t = &self.cfg.sock_terminate;
        let wanted = match key.proto {
            Protocol::Udp => t.udp,
            Protocol::Tcp => t.tcp,
            Protocol::Sctp => false,
        };
        let (Some(old), Some(p)) = (self.table.frontends.get(key), self.frontends.get(key)) else {
            return Vec::new();
        };
        if !wanted {
            return Vec::new();
        }
        // What stays (a set: a frontend may have thousands of backends).
        let staying: std::collections::HashSet<_> = new
            .map(|f| f.backends.iter().map(|n| (n.addr, n.port)).collect())
            .unwrap_or_default();
        old.backends
            .iter()
            .filter(|b| !staying.contains(&(b.addr, b.port)))
            .map(|b| {
                (
                    Target {
                        service_id: p.id,
                        addr: b.addr,
                        port: b.port,
                    },
                    key.proto,
                )
            })
            .collect()
    }

    /// Destroy the sockets of the pairs a batch ended (after its map
    /// updates).
    pub(super) fn destroy_stale_sockets(&mut self, gone: Vec<(Target, Protocol)>) {
        let Destroyer::Ready(d) = &self.sock_destroyer else {
            return;
        };
        if gone.is_empty() {
            return;
        }
        let targets: Vec<Target> = gone.iter().map(|(t, _)| *t).collect();
        let c = &self.sock_destroy_counters;
        let started = std::time::Instant::now();
        let result = d.destroy(&targets, self.cfg.sock_terminate.netns_dir.as_deref());
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(r) => {
                for ((_, proto), n) in gone.iter().zip(&r.per_target) {
                    match proto {
                        Protocol::Tcp => c.tcp.fetch_add(*n, Ordering::Relaxed),
                        _ => c.udp.fetch_add(*n, Ordering::Relaxed),
                    };
                }
                if !r.failures.is_empty() {
                    c.failures
                        .fetch_add(r.failures.len() as u64, Ordering::Relaxed);
                    // Once (then at debug): without CAP_SYS_ADMIN every run
                    // fails the same way.
                    if !self.netns_failure_logged {
                        self.netns_failure_logged = true;
                        warn!(
                            failures = ?r.failures,
                            "stale sockets: network namespaces under --netns-dir could not be walked (entering one needs CAP_SYS_ADMIN); sockets there keep removed backends (logged once, counted in kubeproxy_ebpf_sock_destroy_failures_total)"
                        );
                    } else {
                        debug!(failures = ?r.failures, "stale sockets: network namespaces not walked");
                    }
                }
                let sockets: u64 = r.per_target.iter().sum();
                if sockets > 0 {
                    info!(
                        sockets,
                        pairs = targets.len(),
                        netns = r.netns,
                        took_ms,
                        "stale sockets destroyed"
                    );
                } else {
                    debug!(
                        pairs = targets.len(),
                        netns = r.netns,
                        took_ms,
                        "no stale sockets"
                    );
                }
            }
            Err(e) => {
                c.failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, pairs = targets.len(), "stale sockets: destroying failed");
            }
        }
    }
}
