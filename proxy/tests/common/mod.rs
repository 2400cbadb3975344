//! Shared by the integration tests that load the real eBPF dataplane.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

/// A private pin directory under /sys/fs/bpf (unique per process and
/// call), removed with everything pinned in it on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(label: &str) -> PinDir {
        static N: AtomicU32 = AtomicU32::new(0);
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/proxy-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
