//! Integration harness for the service proxy.
//!
//! * [`netns`]: RAII network namespaces and a thread-in-namespace runner.
//! * [`cluster`]: a small cluster of nodes, pods and an external client built
//!   from network namespaces, routed like kindnet.
//! * [`agent`]: the agent binary run in a node namespace, and proxyctl.
//! * [`apiserver`]: a Kubernetes API server fixture speaking the real
//!   list/watch protocol for Services, EndpointSlices and Nodes.
//! * [`rbac`]: deploy/'s ClusterRole as the fixture's authorizer.
//! * [`privilege`]: deploy/'s capability set, to run the agent with it.

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod cgroup;
pub mod cluster;
pub mod netns;
pub mod privilege;
pub mod rbac;
pub mod scenario;
