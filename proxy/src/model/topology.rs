//! Topology-aware routing, as kube-proxy (v1.33) reads it
//! (`pkg/proxy/topology.go`: `CategorizeEndpoints`,
//! `topologyModeFromHints`, `availableForTopology`).
//!
//! The EndpointSlice controller writes `hints` on endpoints: `forZones`
//! for a service with `trafficDistribution: PreferClose` or
//! `PreferSameZone` (each endpoint's own zone) or the
//! `service.kubernetes.io/topology-mode: Auto` annotation (zones balanced
//! by CPU: an endpoint may be hinted for another zone), and also
//! `forNodes` (the endpoint's own node) for `PreferSameNode`. The proxy
//! decides from the hints alone, per service port and address family,
//! looking at the ready endpoints:
//! * every one has node hints and one is for this node: only the
//!   endpoints hinted for this node ([`Topology::SameNode`]);
//! * else every one has zone hints and one is for this node's zone (the
//!   Node's [`LABEL_ZONE`] label): only those hinted for this zone
//!   ([`Topology::SameZone`]);
//! * else every endpoint, hints ignored.
//!
//! The choice applies to the endpoints of traffic policy Cluster only: a
//! Local policy keeps this node's endpoints, hints or not. When no endpoint
//! of the family is ready the hints are not used, so the serving and
//! terminating fallback takes every such endpoint, as kube-proxy does.

use std::ops::BitOrAssign;

use super::{NodeContext, SliceHints};

/// The Node label that names its zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// A Service's `spec.trafficDistribution` (what it asks the EndpointSlice
/// controller for; one byte in the stored Service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum TrafficDistribution {
    PreferClose,
    PreferSameZone,
    PreferSameNode,
    /// A value this proxy does not know (the hints decide all the same).
    Other,
}

impl TrafficDistribution {
    pub fn parse(raw: &str) -> TrafficDistribution {
        match raw {
            "PreferClose" => TrafficDistribution::PreferClose,
            "PreferSameZone" => TrafficDistribution::PreferSameZone,
            "PreferSameNode" => TrafficDistribution::PreferSameNode,
            _ => TrafficDistribution::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TrafficDistribution::PreferClose => "PreferClose",
            TrafficDistribution::PreferSameZone => "PreferSameZone",
            TrafficDistribution::PreferSameNode => "PreferSameNode",
            TrafficDistribution::Other => "Other",
        }
    }
}

/// How a service port's endpoints of one family are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Every endpoint: some ready endpoint has no hints, or none is ready.
    #[default]
    Any,
    /// The endpoints hinted for this node.
    SameNode,
    /// The endpoints hinted for this node's zone.
    SameZone,
    /// Every endpoint: the endpoints have zone hints, but the Node has no
    /// zone label.
    NodeHasNoZone,
    /// Every endpoint: the endpoints have zone hints, none for this
    /// node's zone.
    NoHintForZone,
    /// Every endpoint: the endpoints have node hints (and not all zone
    /// hints), none for this node.
    NoHintForNode,
}

impl Topology {
    /// Whether an endpoint whose hints say `h` is used.
    pub fn admits(self, h: HintMatch) -> bool {
        match self {
            Topology::SameNode => h.0 & FOR_NODE != 0,
            Topology::SameZone => h.0 & FOR_ZONE != 0,
            _ => true,
        }
    }

    /// Hints were given but cannot be used here: why (for the log).
    pub fn ignored_because(self) -> Option<&'static str> {
        match self {
            Topology::NodeHasNoZone => Some(
                "the endpoints have zone hints but this Node has no topology.kubernetes.io/zone label",
            ),
            Topology::NoHintForZone => Some("no endpoint is hinted for this node's zone"),
            Topology::NoHintForNode => Some("no endpoint is hinted for this node"),
            _ => None,
        }
    }
}

const HAS_ZONE: u8 = 1;
const FOR_ZONE: u8 = 2;
const HAS_NODE: u8 = 4;
const FOR_NODE: u8 = 8;

/// What one endpoint's hints say about this node: whether it has zone
/// (node) hints, and whether one is for this node's zone (this node). An
/// address listed twice has the hints of both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HintMatch(u8);

impl BitOrAssign for HintMatch {
    fn bitor_assign(&mut self, o: HintMatch) {
        self.0 |= o.0;
    }
}

/// Matches a slice's endpoints' hints against this node (the node's name
/// and zone looked up once per slice).
pub(crate) struct SliceMatcher<'a> {
    hints: Option<&'a SliceHints>,
    node: Option<u32>,
    zone: Option<u32>,
}

impl<'a> SliceMatcher<'a> {
    pub(crate) fn new(hints: Option<&'a SliceHints>, node: &NodeContext) -> SliceMatcher<'a> {
        SliceMatcher {
            hints,
            node: hints.and_then(|h| h.name_index(&node.node_name)),
            zone: hints.and_then(|h| node.zone.as_deref().and_then(|z| h.name_index(z))),
        }
    }

    /// The hints of the slice's endpoint address `index`.
    pub(crate) fn of(&self, index: usize) -> HintMatch {
        let Some(set) = self.hints.and_then(|h| h.of(index)) else {
            return HintMatch::default();
        };
        let mut m = 0;
        if !set.zones.is_empty() {
            m |= HAS_ZONE;
            if self.zone.is_some_and(|z| set.zones.contains(&z)) {
                m |= FOR_ZONE;
            }
        }
        if !set.nodes.is_empty() {
            m |= HAS_NODE;
            if self.node.is_some_and(|n| set.nodes.contains(&n)) {
                m |= FOR_NODE;
            }
        }
        HintMatch(m)
    }
}

/// kube-proxy's `topologyModeFromHints`, from the hints of the ready
/// endpoints of one family.
pub(crate) fn choose(ready: impl Iterator<Item = HintMatch>, node: &NodeContext) -> Topology {
    let (mut any, mut all) = (0u8, HAS_ZONE | HAS_NODE);
    let mut seen = false;
    for h in ready {
        seen = true;
        any |= h.0;
        all &= h.0;
    }
    if !seen {
        return Topology::Any;
    }
    if all & HAS_NODE != 0 && any & FOR_NODE != 0 {
        return Topology::SameNode;
    }
    if all & HAS_ZONE != 0 {
        if any & FOR_ZONE != 0 {
            return Topology::SameZone;
        }
        return if node.zone.is_none() {
            Topology::NodeHasNoZone
        } else {
            Topology::NoHintForZone
        };
    }
    if all & HAS_NODE != 0 {
        return Topology::NoHintForNode;
    }
    Topology::Any
}

#[cfg(test)]
mod tests {
    //! On Services and EndpointSlices as the API server serves them (the
    //! hints as the EndpointSlice controller writes them), through the
    //! model and [`crate::lb::port_frontends`]: what each frontend gets.

    use std::net::IpAddr;

    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::{
        lb::{FrontendKind, port_frontends},
        model::{self, ServicePort, SliceView},
    };

    const SERVICE: &str = r#"
metadata: {namespace: default, name: web}
spec:
  type: NodePort
  clusterIPs: [10.96.0.10]
  ports: [{port: 80, nodePort: 30080}]
  trafficDistribution: PreferClose
"#;

    fn node(zone: Option<&str>) -> NodeContext {
        NodeContext {
            node_name: "node1".into(),
            addresses: vec!["192.0.2.1".parse().expect("an address")],
            zone: zone.map(str::to_owned),
            ..Default::default()
        }
    }

    fn parse<T: for<'de> serde::Deserialize<'de>>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).expect("fixture parses")
    }

    /// One endpoint of a slice: address, node, zone, hints (YAML flow).
    fn ep(ip: &str, node: &str, zone: &str, hints: &str) -> String {
        format!(
            "  - addresses: [{ip}]\n    nodeName: {node}\n    zone: {zone}\n    conditions: {{ready: true, serving: true, terminating: false}}\n{hints}"
        )
    }

    fn zones(z: &[&str]) -> String {
        let l: Vec<String> = z.iter().map(|z| format!("{{name: {z}}}")).collect();
        format!("    hints: {{forZones: [{}]}}\n", l.join(", "))
    }

    fn zones_and_nodes(z: &[&str], n: &[&str]) -> String {
        let lz: Vec<String> = z.iter().map(|z| format!("{{name: {z}}}")).collect();
        let ln: Vec<String> = n.iter().map(|n| format!("{{name: {n}}}")).collect();
        format!(
            "    hints: {{forZones: [{}], forNodes: [{}]}}\n",
            lz.join(", "),
            ln.join(", ")
        )
    }

    fn slice(name: &str, family: &str, endpoints: &[String]) -> SliceView {
        parse(&format!(
            "metadata:\n  namespace: default\n  name: {name}\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {family}\nports: [{{port: 8080, protocol: TCP}}]\nendpoints:\n{}",
            endpoints.concat()
        ))
    }

    fn build_with(svc: &str, slices: &[SliceView], node: &NodeContext) -> ServicePort {
        let svc: Service = parse(svc);
        let (table, errors) = model::build([&svc], slices, node);
        assert!(errors.is_empty(), "{errors:?}");
        table
            .services
            .into_values()
            .next()
            .expect("one service port")
    }

    /// The backends of the frontend of `kind` and the family of `ip`.
    fn backends(sp: &ServicePort, node: &NodeContext, kind: FrontendKind, v6: bool) -> Vec<String> {
        port_frontends(sp, node)
            .into_iter()
            .find(|(k, f)| f.kind == kind && k.addr.is_ipv6() == v6)
            .expect("the frontend")
            .1
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    fn cluster(sp: &ServicePort, node: &NodeContext) -> Vec<String> {
        backends(sp, node, FrontendKind::ClusterIp, false)
    }

    /// Two zones, an endpoint on node1 (zone a), node2 (zone a), node3
    /// (zone b), hinted as `hint` writes for each (address, node, zone).
    fn three(hint: impl Fn(&str, &str) -> String) -> Vec<SliceView> {
        vec![slice(
            "web-1",
            "IPv4",
            &[
                ep("10.244.1.2", "node1", "a", &hint("node1", "a")),
                ep("10.244.2.2", "node2", "a", &hint("node2", "a")),
                ep("10.244.3.2", "node3", "b", &hint("node3", "b")),
            ],
        )]
    }

    #[test]
    fn prefer_close_and_prefer_same_zone_keep_this_zone() {
        let slices = three(|_, z| zones(&[z]));
        for zone in ["a", "b"] {
            let n = node(Some(zone));
            let sp = build_with(SERVICE, &slices, &n);
            assert_eq!(sp.topology, [Topology::SameZone, Topology::Any]);
            assert_eq!(
                sp.traffic_distribution,
                Some(TrafficDistribution::PreferClose)
            );
            let want: &[&str] = if zone == "a" {
                &["10.244.1.2", "10.244.2.2"]
            } else {
                &["10.244.3.2"]
            };
            assert_eq!(cluster(&sp, &n), want, "zone {zone}");
            // NodePort (external policy Cluster) too.
            assert_eq!(backends(&sp, &n, FrontendKind::NodePort, false), want);
        }
    }

    #[test]
    fn prefer_same_node_keeps_this_node_else_this_zone() {
        let slices = three(|n, z| zones_and_nodes(&[z], &[n]));
        let n = node(Some("a"));
        let sp = build_with(SERVICE, &slices, &n);
        assert_eq!(sp.topology[0], Topology::SameNode);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2"]);
        // A node without an endpoint of its own: its zone's.
        let n4 = NodeContext {
            node_name: "node4".into(),
            ..node(Some("b"))
        };
        let sp = build_with(SERVICE, &slices, &n4);
        assert_eq!(sp.topology[0], Topology::SameZone);
        assert_eq!(cluster(&sp, &n4), ["10.244.3.2"]);
    }

    #[test]
    fn topology_mode_auto_hints_may_send_a_zone_to_another_zones_endpoint() {
        // The controller balanced zone c (no endpoint of its own) onto
        // the zone b endpoint; zone a keeps its own.
        let slices = vec![slice(
            "web-1",
            "IPv4",
            &[
                ep("10.244.1.2", "node1", "a", &zones(&["a"])),
                ep("10.244.3.2", "node3", "b", &zones(&["b", "c"])),
            ],
        )];
        let n = node(Some("c"));
        let sp = build_with(SERVICE, &slices, &n);
        assert_eq!(cluster(&sp, &n), ["10.244.3.2"]);
        let a = node(Some("a"));
        assert_eq!(
            cluster(&build_with(SERVICE, &slices, &a), &a),
            ["10.244.1.2"]
        );
    }

    #[test]
    fn hints_are_ignored_unless_every_ready_endpoint_has_one_and_one_is_for_here() {
        // One endpoint without hints (the controller is mid-update): all.
        let slices = vec![slice(
            "web-1",
            "IPv4",
            &[
                ep("10.244.1.2", "node1", "a", &zones(&["a"])),
                ep("10.244.3.2", "node3", "b", ""),
            ],
        )];
        let n = node(Some("a"));
        let sp = build_with(SERVICE, &slices, &n);
        assert_eq!(sp.topology[0], Topology::Any);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2", "10.244.3.2"]);
        // No endpoint for this zone: all, and why.
        let slices = three(|_, z| zones(&[z]));
        let c = node(Some("c"));
        let sp = build_with(SERVICE, &slices, &c);
        assert_eq!(sp.topology[0], Topology::NoHintForZone);
        assert!(sp.topology[0].ignored_because().is_some());
        assert_eq!(cluster(&sp, &c).len(), 3);
        // The Node has no zone label: all.
        let none = node(None);
        let sp = build_with(SERVICE, &slices, &none);
        assert_eq!(sp.topology[0], Topology::NodeHasNoZone);
        assert_eq!(cluster(&sp, &none).len(), 3);
        // Node hints only, none for this node: all.
        let slices = three(|n, _| zones_and_nodes(&[], &[n]));
        let n9 = NodeContext {
            node_name: "node9".into(),
            ..node(Some("a"))
        };
        let sp = build_with(SERVICE, &slices, &n9);
        assert_eq!(sp.topology[0], Topology::NoHintForNode);
        assert_eq!(cluster(&sp, &n9).len(), 3);
    }

    #[test]
    fn not_ready_endpoints_without_hints_do_not_disable_them() {
        // kube-proxy looks at ready endpoints only.
        let mut eps = vec![
            ep("10.244.1.2", "node1", "a", &zones(&["a"])),
            ep("10.244.3.2", "node3", "b", &zones(&["b"])),
        ];
        eps.push(ep("10.244.3.3", "node3", "b", "").replace(
            "ready: true, serving: true, terminating: false",
            "ready: false, serving: true, terminating: true",
        ));
        let slices = vec![slice("web-1", "IPv4", &eps)];
        let n = node(Some("a"));
        let sp = build_with(SERVICE, &slices, &n);
        assert_eq!(sp.topology[0], Topology::SameZone);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2"]);
    }

    #[test]
    fn local_traffic_policy_is_not_affected_by_hints() {
        let svc =
            format!("{SERVICE}  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n");
        // This node's endpoint is hinted for zone b only (Auto balancing).
        let slices = vec![slice(
            "web-1",
            "IPv4",
            &[
                ep("10.244.1.2", "node1", "a", &zones(&["b"])),
                ep("10.244.2.2", "node2", "a", &zones(&["a"])),
            ],
        )];
        let n = node(Some("a"));
        let sp = build_with(&svc, &slices, &n);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2"]);
        assert_eq!(
            backends(&sp, &n, FrontendKind::NodePort, false),
            ["10.244.1.2"]
        );
        // Internal Local, external Cluster: the NodePort follows the hints.
        let svc = format!("{SERVICE}  internalTrafficPolicy: Local\n");
        let sp = build_with(&svc, &slices, &n);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2"]);
        assert_eq!(
            backends(&sp, &n, FrontendKind::NodePort, false),
            ["10.244.2.2"]
        );
    }

    #[test]
    fn terminating_fallback_takes_every_serving_terminating_endpoint() {
        // No ready endpoint: the hints are not used (kube-proxy), the
        // fallback takes the serving+terminating ones of every zone.
        let term = |ip: &str, node: &str, zone: &str| {
            ep(ip, node, zone, &zones(&[zone])).replace(
                "ready: true, serving: true, terminating: false",
                "ready: false, serving: true, terminating: true",
            )
        };
        let slices = vec![slice(
            "web-1",
            "IPv4",
            &[
                term("10.244.1.2", "node1", "a"),
                term("10.244.3.2", "node3", "b"),
            ],
        )];
        let n = node(Some("a"));
        let sp = build_with(SERVICE, &slices, &n);
        assert_eq!(sp.topology[0], Topology::Any);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2", "10.244.3.2"]);
        // With a ready endpoint in another zone: that one (its zone's
        // hints are not for here, so all ready ones; no fallback).
        let mut eps = vec![term("10.244.1.2", "node1", "a")];
        eps.push(ep("10.244.3.3", "node3", "b", &zones(&["b"])));
        let sp = build_with(SERVICE, &[slice("web-1", "IPv4", &eps)], &n);
        assert_eq!(sp.topology[0], Topology::NoHintForZone);
        assert_eq!(cluster(&sp, &n), ["10.244.3.3"]);
    }

    #[test]
    fn each_family_chooses_on_its_own() {
        let svc = SERVICE.replace("[10.96.0.10]", "[10.96.0.10, fd00:96::10]")
            + "  ipFamilies: [IPv4, IPv6]\n";
        // IPv4: hinted, one for zone a. IPv6: one endpoint lacks hints.
        let slices = vec![
            slice(
                "web-v4",
                "IPv4",
                &[
                    ep("10.244.1.2", "node1", "a", &zones(&["a"])),
                    ep("10.244.3.2", "node3", "b", &zones(&["b"])),
                ],
            ),
            slice(
                "web-v6",
                "IPv6",
                &[
                    ep("fd00:244::1:2", "node1", "a", &zones(&["a"])),
                    ep("fd00:244::3:2", "node3", "b", ""),
                ],
            ),
        ];
        let n = node(Some("a"));
        let sp = build_with(&svc, &slices, &n);
        assert_eq!(sp.topology, [Topology::SameZone, Topology::Any]);
        assert_eq!(cluster(&sp, &n), ["10.244.1.2"]);
        let v6 = backends(&sp, &n, FrontendKind::ClusterIp, true);
        let want: Vec<String> = ["fd00:244::1:2", "fd00:244::3:2"]
            .iter()
            .map(|a| a.parse::<IpAddr>().expect("an address").to_string())
            .collect();
        assert_eq!(v6, want);
    }

    #[test]
    fn a_hint_without_a_name_is_reported_and_ignored() {
        let slices = vec![slice(
            "web-1",
            "IPv4",
            &[
                ep(
                    "10.244.1.2",
                    "node1",
                    "a",
                    "    hints: {forZones: [{name: \"\"}]}\n",
                ),
                ep("10.244.3.2", "node3", "b", &zones(&["b"])),
            ],
        )];
        let svc: Service = parse(SERVICE);
        let n = node(Some("b"));
        let (table, errors) = model::build([&svc], &slices, &n);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = &errors[0];
        assert_eq!(e.kind, "EndpointSlice");
        assert_eq!(e.object, "default/web-1");
        assert_eq!(e.field, "endpoints[0].hints.forZones[0].name");
        assert_eq!(e.value, "");
        // The first endpoint is left without hints: all endpoints.
        let sp = table.services.values().next().expect("the port");
        assert_eq!(sp.topology[0], Topology::Any);
        assert_eq!(cluster(sp, &n).len(), 2);
        // A hint entry without `name` at all does not drop the slice.
        let s: SliceView = parse(
            "metadata: {namespace: default, name: x}\naddressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\n  hints: {forNodes: [{}], forZones: null}\n",
        );
        assert_eq!(s.endpoints.len(), 1);
    }

    #[test]
    fn the_nodes_zone_is_its_label_and_survives_the_trim() {
        let mut n: k8s_openapi::api::core::v1::Node = parse(
            "metadata:\n  name: node1\n  labels: {topology.kubernetes.io/zone: a, kubernetes.io/os: linux}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}\n",
        );
        model::trim_node(&mut n);
        assert_eq!(model::node_zone(&n).as_deref(), Some("a"));
        assert_eq!(n.metadata.labels.as_ref().map(|l| l.len()), Some(1));
        let mut bare: k8s_openapi::api::core::v1::Node =
            parse("metadata: {name: node1, labels: {topology.kubernetes.io/zone: \"\"}}\n");
        model::trim_node(&mut bare);
        assert_eq!(model::node_zone(&bare), None, "an empty label is no zone");
    }

    #[test]
    fn hints_are_stored_once_per_slice_and_cost_nothing_without() {
        let n = node(Some("a"));
        let plain = slice("p", "IPv4", &[ep("10.244.1.2", "node1", "a", "")]);
        let info = model::SliceInfo::of(&plain);
        assert!(info.extra.is_none(), "no side table without hints");
        let hinted = three(|_, z| zones(&[z]));
        let info = model::SliceInfo::of(&hinted[0]);
        let h = info.hints().expect("hints");
        assert_eq!(h.names.len(), 2, "{h:?}");
        assert_eq!(h.sets.len(), 2, "one set per zone: {h:?}");
        assert_eq!(h.of.len(), 3);
        let m = SliceMatcher::new(Some(h), &n);
        assert_eq!(m.of(0), HintMatch(HAS_ZONE | FOR_ZONE));
        assert_eq!(m.of(2), HintMatch(HAS_ZONE));
    }
}
