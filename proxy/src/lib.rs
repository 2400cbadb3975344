//! eBPF service proxy: a kube-proxy replacement.
//!
//! Data flows one way: [`k8s`] (watch) -> [`model`] (pure) -> [`lb`]
//! (frontends, pure) -> [`diff`] (pure) -> [`dataplane`] -> kernel.

pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod diff;
pub mod health;
pub mod inspect;
pub mod k8s;
pub mod lb;
pub mod maglev;
pub mod maps;
pub mod model;
