//! eBPF service proxy: a kube-proxy replacement.
//!
//! Data flows one way: [`k8s`] (watch) -> [`model`] (pure) -> [`lb`]
//! (frontends, pure) -> [`diff`] (pure) -> [`dataplane`] -> kernel.

pub mod agent;
pub mod changes;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod diff;
pub mod events;
pub mod health;
pub mod host;
pub mod http;
pub mod inspect;
pub mod k8s;
pub mod lb;
pub mod maglev;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod pressure;

/// The eBPF maps: typed handles and their decoded dump.
pub use dataplane::ebpf::maps;
