//! The pure model on YAML fixtures (no kernel, no API server).

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use proxy::{
    lb::LbTable,
    model::{
        self, Endpoint, NodeContext, NodePortAddresses, NodePortAddressesError, Protocol,
        ServicePortName, ServiceTable, SliceView,
    },
};
use serde::Deserialize;

fn load<T: for<'de> Deserialize<'de>>(yaml: &str) -> Vec<T> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| T::deserialize(doc).expect("fixture parses"))
        .collect()
}

fn build() -> (ServiceTable, Vec<model::ModelError>) {
    let services: Vec<Service> = load(include_str!("fixtures/model/services.yaml"));
    let slices: Vec<SliceView> = load(include_str!("fixtures/model/slices.yaml"));
    model::build(
        &services,
        &slices,
        &NodeContext {
            node_name: "node1".into(),
            ..Default::default()
        },
    )
}

fn spn(name: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: "default".into(),
        name: name.into(),
        port: port.into(),
        protocol,
    }
}

fn ep(ip: [u8; 4], port: u16, terminating: bool, local: bool) -> Endpoint {
    Endpoint {
        ip: Ipv4Addr::from(ip).into(),
        port,
        ready: !terminating,
        terminating,
        local,
        in_topology: true,
    }
}

#[test]
fn ignores_headless_externalname_and_foreign_services() {
    let (table, _) = build();
    let names: Vec<String> = table.services.keys().map(|k| k.name.clone()).collect();
    for ignored in ["headless", "external", "other-proxy", "labelled-headless"] {
        assert!(
            !names.contains(&ignored.to_string()),
            "{ignored} must be ignored"
        );
    }
}

#[test]
fn named_target_ports_resolve_per_slice_and_only_ready_endpoints_serve() {
    let (table, _) = build();
    let http = &table.services[&spn("web", "http", Protocol::Tcp)];
    assert_eq!(
        http.cluster_ips,
        vec![std::net::IpAddr::from(Ipv4Addr::new(10, 96, 0, 10))]
    );
    assert_eq!(http.port, 80);
    // 10.244.1.3 is neither ready nor serving; 10.244.2.3 is a
    // serving+terminating candidate; the other namespace's slice and the
    // IPv6 slice are not used.
    assert_eq!(
        http.endpoints,
        vec![
            ep([10, 244, 1, 2], 8080, false, true),
            ep([10, 244, 2, 2], 9090, false, false),
            ep([10, 244, 2, 3], 8080, true, false),
        ]
    );
    // Ready ones exist, so the terminating one does not serve.
    let used: Vec<_> = model::usable_endpoints(&http.endpoints, false)
        .into_iter()
        .map(|e| e.ip.to_string())
        .collect();
    assert_eq!(used, ["10.244.1.2", "10.244.2.2"]);
    let dns = &table.services[&spn("web", "dns", Protocol::Udp)];
    assert_eq!(
        dns.endpoints,
        vec![
            ep([10, 244, 1, 2], 5353, false, true),
            ep([10, 244, 2, 3], 5353, true, false),
        ]
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let (table, _) = build();
    let d = &table.services[&spn("draining", "", Protocol::Tcp)];
    assert_eq!(d.endpoints, vec![ep([10, 244, 1, 7], 8080, true, true)]);
    let used = model::usable_endpoints(&d.endpoints, false);
    assert_eq!(used, vec![&ep([10, 244, 1, 7], 8080, true, true)]);
}

#[test]
fn local_policy_chooses_among_local_endpoints_with_the_same_fallback() {
    let eps = vec![
        ep([10, 244, 1, 2], 80, true, true),   // local, terminating
        ep([10, 244, 2, 2], 80, false, false), // remote, ready
    ];
    let local: Vec<_> = model::usable_endpoints(&eps, true);
    assert_eq!(local, vec![&eps[0]], "local terminating beats remote ready");
    let cluster: Vec<_> = model::usable_endpoints(&eps, false);
    assert_eq!(cluster, vec![&eps[1]]);
    let none = model::usable_endpoints(&eps[1..], true);
    assert!(
        none.is_empty(),
        "no local endpoint: nothing, never a remote one"
    );
}

#[test]
fn affinity_and_internal_policy_reach_the_frontends() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.20
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}
  internalTrafficPolicy: Local
  ports: [{port: 80, protocol: TCP}]
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node1}
- {addresses: [10.244.2.2], nodeName: node2}
"#,
    );
    let node = NodeContext {
        node_name: "node1".into(),
        ..Default::default()
    };
    let (table, errors) = model::build(&svc, &slices, &node);
    assert!(errors.is_empty(), "{errors:?}");
    let lb = LbTable::from_services(&table, &node);
    let fe = lb.frontends.values().next().expect("one frontend");
    assert_eq!(fe.affinity_timeout, 30);
    let backends: Vec<String> = fe.backends.iter().map(|b| b.addr.to_string()).collect();
    assert_eq!(backends, ["10.244.1.2"], "internalTrafficPolicy Local");
}

#[test]
fn bad_fields_are_reported_by_object_field_and_value_and_the_rest_is_kept() {
    let (table, errors) = build();
    let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| msgs.iter().any(|m| m.contains(needle));
    assert!(
        has("Service default/broken: field spec.clusterIPs[0] = \"10.96.0.300\""),
        "{msgs:#?}"
    );
    assert!(
        has("Service default/broken: field spec.ports[1].protocol = \"ICMP\""),
        "{msgs:#?}"
    );
    assert!(
        has("EndpointSlice default/draining-1: field endpoints[2].addresses[0] = \"not-an-ip\""),
        "{msgs:#?}"
    );
    // The valid port of the broken service is kept (without a cluster IP).
    let a = &table.services[&spn("broken", "a", Protocol::Tcp)];
    assert!(a.cluster_ips.is_empty());
    assert_eq!(errors.len(), 3, "{msgs:#?}");
}

#[test]
fn frontends_are_cluster_ip_port_protocol() {
    let (table, _) = build();
    let lb = LbTable::from_services(&table, &NodeContext::default());
    let keys: Vec<String> = lb.frontends.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        keys,
        vec![
            "10.96.0.10:53/UDP",
            "10.96.0.10:80/TCP",
            "10.96.0.14:80/TCP"
        ]
    );
}

#[test]
fn node_ports_external_and_load_balancer_ips_use_the_external_policy() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: edge, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30080, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.7}]}
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: edge-1, namespace: default, labels: {kubernetes.io/service-name: edge}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node1}
- {addresses: [10.244.2.2], nodeName: node2}
"#,
    );
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = load(
        r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
status:
  addresses:
  - {type: InternalIP, address: 172.18.0.11}
  - {type: Hostname, address: node1}
  - {type: ExternalIP, address: not-an-ip}
"#,
    );
    let (addresses, errors) = model::node_addresses(&nodes[0]);
    assert_eq!(
        addresses,
        vec![std::net::IpAddr::from(Ipv4Addr::new(172, 18, 0, 11))]
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .contains("status.addresses[2].address = \"not-an-ip\"")
    );
    let node = NodeContext {
        node_name: "node1".into(),
        addresses,
        ..Default::default()
    };
    let (table, errors) = model::build(&svc, &slices, &node);
    assert!(errors.is_empty(), "{errors:?}");
    let lb = LbTable::from_services(&table, &node);
    let got: Vec<(String, Vec<String>)> = lb
        .frontends
        .iter()
        .map(|(k, f)| {
            (
                format!("{k} {:?}", f.kind),
                f.backends.iter().map(|b| b.addr.to_string()).collect(),
            )
        })
        .collect();
    let local = vec!["10.244.1.2".to_string()];
    let all = vec!["10.244.1.2".to_string(), "10.244.2.2".to_string()];
    assert_eq!(
        got,
        vec![
            ("10.96.0.30:80/TCP ClusterIp".to_string(), all),
            ("172.18.0.11:30080/TCP NodePort".to_string(), local.clone()),
            ("192.0.2.10:80/TCP ExternalIp".to_string(), local.clone()),
            ("198.51.100.7:80/TCP LoadBalancer".to_string(), local),
        ]
    );
}

#[test]
fn nodeport_addresses_limit_where_node_ports_are_served() {
    let cidrs = |l: &[&str]| {
        let list: Vec<String> = l.iter().map(|s| (*s).to_owned()).collect();
        NodePortAddresses::parse(&list).expect("cidrs")
    };
    let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
    let mut node = NodeContext {
        node_name: "node1".into(),
        addresses: vec![ip("172.18.0.11"), ip("fd00:18::11"), ip("192.168.5.1")],
        // The host's interfaces: CIDRs look at these, not at the Node.
        host_addresses: vec![
            ip("127.0.0.1"),
            ip("172.18.0.11"),
            ip("172.18.0.111"),
            ip("192.168.5.1"),
            ip("::1"),
            ip("fd00:18::11"),
        ],
        nodeport: cidrs(&["192.168.0.0/16"]),
        ..Default::default()
    };
    let served = |n: &NodeContext| {
        n.nodeport_addresses()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(served(&node), ["192.168.5.1"]);
    // Every interface address inside the CIDRs, Node object or not.
    node.nodeport = cidrs(&["172.18.0.0/16", "fd00:18::/64"]);
    assert_eq!(
        served(&node),
        ["172.18.0.11", "172.18.0.111", "fd00:18::11"]
    );
    // Loopback only when a CIDR covers it.
    node.nodeport = cidrs(&["127.0.0.0/8", "::1/128"]);
    assert_eq!(served(&node), ["127.0.0.1", "::1"]);
    node.nodeport = cidrs(&["0.0.0.0/0"]);
    assert_eq!(
        served(&node),
        ["127.0.0.1", "172.18.0.11", "172.18.0.111", "192.168.5.1"]
    );
    // primary: the first address of each family of the Node object.
    node.nodeport = NodePortAddresses::Primary;
    assert_eq!(served(&node), ["172.18.0.11", "fd00:18::11"]);
    // Unset: every address of the Node object, never loopback.
    node.nodeport = NodePortAddresses::NodeObject;
    node.addresses.push(ip("127.0.0.1"));
    assert_eq!(served(&node), ["172.18.0.11", "fd00:18::11", "192.168.5.1"]);
    // primary never picks a loopback address (kube-proxy neither).
    node.nodeport = NodePortAddresses::Primary;
    node.addresses = vec![ip("127.0.0.1"), ip("fd00:18::11")];
    assert_eq!(served(&node), ["fd00:18::11"]);
    // What the agent hands over: the interface addresses the CIDRs use.
    let all = [
        ip("10.0.0.2"),
        ip("172.18.0.11"),
        ip("fe80::1"),
        ip("172.18.0.11"),
    ];
    assert_eq!(
        cidrs(&["172.18.0.0/16"]).host_addresses_used(&all),
        [ip("172.18.0.11")]
    );
    assert!(
        NodePortAddresses::Primary
            .host_addresses_used(&all)
            .is_empty()
    );
    assert!(!NodePortAddresses::Primary.uses_host_addresses());
}

#[test]
fn nodeport_addresses_parse_as_kube_proxy() {
    let parse = |l: &[&str]| {
        let list: Vec<String> = l.iter().map(|s| (*s).to_owned()).collect();
        NodePortAddresses::parse(&list)
    };
    assert_eq!(parse(&[]), Ok(NodePortAddresses::NodeObject));
    assert_eq!(parse(&["", " "]), Ok(NodePortAddresses::NodeObject));
    assert_eq!(parse(&["primary"]), Ok(NodePortAddresses::Primary));
    assert_eq!(parse(&[" primary "]), Ok(NodePortAddresses::Primary));
    assert_eq!(
        parse(&["10.0.0.0/8", "fd00::/64"]).map(|n| n.to_string()),
        Ok("10.0.0.0/8,fd00::/64".to_owned())
    );
    assert_eq!(
        parse(&["primary", "127.0.0.1/32"]),
        Err(NodePortAddressesError::PrimaryAndCidrs(
            "primary,127.0.0.1/32".into()
        ))
    );
    assert_eq!(
        parse(&["127.0.0.1/32", "primary"]),
        Err(NodePortAddressesError::PrimaryAndCidrs(
            "127.0.0.1/32,primary".into()
        ))
    );
    for bad in [
        "foo",
        "1.2.3",
        "10.20.30.40",
        "::1",
        "10.0.0.0/33",
        "fd00::/129",
        "PRIMARY",
    ] {
        assert_eq!(
            parse(&["10.0.0.0/8", bad]),
            Err(NodePortAddressesError::Invalid(bad.into())),
            "{bad}"
        );
    }
    let e = parse(&["10.0.0.0/33"]).expect_err("bad");
    assert_eq!(
        e.to_string(),
        "\"10.0.0.0/33\" is neither \"primary\" nor an IPv4 or IPv6 CIDR"
    );
}

#[test]
fn source_ranges_guard_load_balancer_ips_and_with_the_flag_node_ports_too() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  loadBalancerSourceRanges: [203.0.113.0/24, "2001:db8::/32", not-a-cidr]
  ports: [{port: 80, nodePort: 30500, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.9}]}
"#,
    );
    let mut node = NodeContext {
        node_name: "node1".into(),
        addresses: vec![Ipv4Addr::new(172, 18, 0, 11).into()],
        ..Default::default()
    };
    let (table, errors) = model::build(&svc, &[], &node);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .to_string()
            .contains("spec.loadBalancerSourceRanges[2] = \"not-a-cidr\"")
    );
    let guarded = |lb: &LbTable| -> Vec<String> {
        lb.frontends
            .iter()
            .filter(|(_, f)| !f.source_ranges.is_empty())
            .map(|(k, _)| k.to_string())
            .collect()
    };
    let lb = LbTable::from_services(&table, &node);
    assert_eq!(guarded(&lb), ["198.51.100.9:80/TCP"]);
    let fe = lb
        .frontends
        .values()
        .find(|f| !f.source_ranges.is_empty())
        .expect("guarded");
    assert_eq!(
        fe.source_ranges,
        vec![(Ipv4Addr::new(203, 0, 113, 0).into(), 24)],
        "the IPv6 range is not the IPv4 frontend's"
    );
    node.source_ranges_all = true;
    let lb = LbTable::from_services(&table, &node);
    assert_eq!(
        guarded(&lb),
        ["172.18.0.11:30500/TCP", "198.51.100.9:80/TCP"]
    );
}

#[test]
fn maglev_table_size_annotation() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: a
  namespace: default
  annotations: {kube-proxy-ebpf.io/maglev-table-size: "65521"}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  ports: [{port: 80, nodePort: 30600, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata:
  name: b
  namespace: default
  annotations: {kube-proxy-ebpf.io/maglev-table-size: "1000"}
spec:
  clusterIP: 10.96.0.51
  ports: [{port: 80, protocol: TCP}]
"#,
    );
    let (table, errors) = model::build(&svc, &[], &NodeContext::default());
    assert_eq!(
        table.services[&spn("a", "", Protocol::Tcp)].maglev_table_size,
        Some(65521)
    );
    assert_eq!(
        table.services[&spn("b", "", Protocol::Tcp)].maglev_table_size,
        None
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .contains("metadata.annotations[kube-proxy-ebpf.io/maglev-table-size] = \"1000\""),
        "{}",
        errors[0]
    );
}

/// What the agent keeps of each watched object ([`model::trim_service`],
/// [`model::trim_slice`], [`model::trim_node`]) builds the same table with
/// the same errors as the objects as they came (the fixtures carry labels,
/// annotations and fields the model does not read).
#[test]
fn trimmed_objects_build_the_same_table() {
    let services: Vec<Service> = load(include_str!("fixtures/model/services.yaml"));
    let slices: Vec<SliceView> = load(include_str!("fixtures/model/slices.yaml"));
    let node = NodeContext {
        node_name: "node1".into(),
        ..Default::default()
    };
    let (want, want_errors) = model::build(&services, &slices, &node);
    let mut services = services;
    let mut slices = slices;
    services.iter_mut().for_each(model::trim_service);
    slices.iter_mut().for_each(model::trim_slice);
    assert!(slices.iter().all(|s| s.metadata.labels.is_none()));
    assert!(slices.iter().any(|s| s.service.is_some()));
    let (got, got_errors) = model::build(&services, &slices, &node);
    assert_eq!(got, want);
    assert_eq!(format!("{got_errors:?}"), format!("{want_errors:?}"));

    let mut n: k8s_openapi::api::core::v1::Node = serde_yaml::from_str(
        "metadata: {name: node1, labels: {a: b}, annotations: {c: d}}\nstatus:\n  addresses: [{type: InternalIP, address: 172.18.0.2}]\n  images: [{names: [busybox], sizeBytes: 1}]\n",
    )
    .expect("node");
    let want = model::node_addresses(&n).0;
    model::trim_node(&mut n);
    assert_eq!(model::node_addresses(&n).0, want);
    assert!(n.status.as_ref().is_some_and(|s| s.images.is_none()));
}

/// EndpointSlices are read as [`SliceView`] straight from the API's JSON:
/// the fields it keeps, `null` lists, and everything else skipped.
#[test]
fn slice_view_reads_api_json() {
    let v: SliceView = serde_json::from_str(
        r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
            "metadata":{"name":"web-1","namespace":"default","labels":{"kubernetes.io/service-name":"web"},
                        "managedFields":[{"manager":"x"}]},
            "addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],
            "endpoints":[{"addresses":["10.244.1.2"],"conditions":{"ready":false,"terminating":true},
                          "nodeName":"node1","zone":"z","hints":{"forZones":[{"name":"z"}]},
                          "targetRef":{"kind":"Pod","name":"p"}}]}"#,
    )
    .expect("slice");
    assert_eq!(v.service_name(), Some("web"));
    assert_eq!(v.address_type, "IPv4");
    assert_eq!(v.endpoints.len(), 1);
    assert_eq!(v.endpoints[0].addresses, ["10.244.1.2"]);
    assert_eq!(v.endpoints[0].node_name.as_deref(), Some("node1"));
    let c = v.endpoints[0].conditions.as_ref().expect("conditions");
    assert_eq!((c.ready, c.terminating), (Some(false), Some(true)));
    let empty: SliceView =
        serde_json::from_str(r#"{"metadata":{"name":"e"},"addressType":"IPv4","endpoints":null}"#)
            .expect("null endpoints");
    assert!(empty.endpoints.is_empty());
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` is validated as the API
/// server does (1..=86400): out of range is an error naming the object, the
/// field and the value; the service is still programmed (with the default
/// timeout), as with the other field errors.
#[test]
fn affinity_timeout_out_of_range_is_reported_and_the_service_kept() {
    let doc = |name: &str, ip: &str, timeout: i64| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec:\n  clusterIP: {ip}\n  sessionAffinity: ClientIP\n  \
             sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout}}}}}\n  \
             ports: [{{port: 80, protocol: TCP}}]\n"
        )
    };
    let yaml = [
        doc("min", "10.96.0.60", 1),
        doc("max", "10.96.0.61", 86_400),
        doc("over", "10.96.0.62", 86_401),
        doc("zero", "10.96.0.63", 0),
        doc("negative", "10.96.0.64", -5),
    ]
    .join("---\n");
    let svc: Vec<Service> = load(&yaml);
    let (table, errors) = model::build(&svc, &[], &NodeContext::default());
    let msgs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for (name, value) in [("over", "86401"), ("zero", "0"), ("negative", "-5")] {
        let needle = format!(
            "Service default/{name}: field spec.sessionAffinityConfig.clientIP.timeoutSeconds = \"{value}\""
        );
        assert!(
            msgs.iter().any(|m| m.contains(&needle)),
            "{needle} in {msgs:#?}"
        );
    }
    assert_eq!(errors.len(), 3, "{msgs:#?}");
    let timeout = |name: &str| table.services[&spn(name, "", Protocol::Tcp)].affinity_timeout;
    assert_eq!(timeout("min"), Some(1));
    assert_eq!(timeout("max"), Some(86_400));
    for name in ["over", "zero", "negative"] {
        // Kept, with kube-proxy's default timeout.
        assert_eq!(timeout(name), Some(10_800), "{name}");
        assert_eq!(
            table.services[&spn(name, "", Protocol::Tcp)]
                .cluster_ips
                .len(),
            1,
            "{name}"
        );
    }
}

#[test]
fn one_service_at_a_time_builds_what_the_whole_table_holds() {
    let services: Vec<Service> = load(include_str!("fixtures/model/services.yaml"));
    let slices: Vec<SliceView> = load(include_str!("fixtures/model/slices.yaml"));
    let node = NodeContext {
        node_name: "node1".into(),
        ..Default::default()
    };
    let (table, errors) = model::build(&services, &slices, &node);
    let mut ports = Vec::new();
    let mut per_service_errors = Vec::new();
    for svc in &services {
        // Only the slices labelled with this service, in its namespace: what
        // the agent's cache index hands over.
        let mine: Vec<model::SliceInfo> = slices
            .iter()
            .filter(|s| {
                s.metadata.namespace == svc.metadata.namespace
                    && s.service_name() == svc.metadata.name.as_deref()
            })
            .map(model::SliceInfo::of)
            .collect();
        let mine: Vec<&model::SliceInfo> = mine.iter().collect();
        ports.extend(model::build_service(
            &model::ServiceInfo::of(svc),
            &mine,
            &node,
            &mut per_service_errors,
        ));
    }
    let whole: Vec<_> = table.services.values().cloned().collect();
    ports.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(ports, whole);
    assert_eq!(per_service_errors.len(), errors.len());
    assert!(!whole.is_empty());
}

#[test]
fn a_port_name_given_twice_keeps_the_later_and_other_address_types_are_skipped() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: twice, namespace: default}
spec:
  clusterIP: 10.96.0.30
  ports: [{name: web, port: 80, protocol: TCP}, {name: web, port: 8080, protocol: TCP}]
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: twice-v6, namespace: default, labels: {kubernetes.io/service-name: twice}}
addressType: IPv6
ports: [{name: web, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00::2"]}
"#,
    );
    let infos: Vec<model::SliceInfo> = slices.iter().map(model::SliceInfo::of).collect();
    let infos: Vec<&model::SliceInfo> = infos.iter().collect();
    let mut errors = Vec::new();
    let ports = model::build_service(
        &model::ServiceInfo::of(&svc[0]),
        &infos,
        &NodeContext::default(),
        &mut errors,
    );
    assert!(errors.is_empty(), "an IPv6 slice is not read: {errors:?}");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].port, 8080,
        "the later port, as a table insert keeps"
    );
    assert!(ports[0].endpoints.is_empty());
    let (table, _) = model::build(&svc, &slices, &NodeContext::default());
    assert_eq!(table.services.values().cloned().collect::<Vec<_>>(), ports);
}

// --- dual stack ---------------------------------------------------------------

/// (frontend and kind, backend addresses) of every frontend.
fn frontends_with_backends(lb: &LbTable) -> Vec<(String, Vec<String>)> {
    lb.frontends
        .iter()
        .map(|(k, f)| {
            (
                format!("{k} {:?}", f.kind),
                f.backends
                    .iter()
                    .map(|b| std::net::SocketAddr::new(b.addr, b.port).to_string())
                    .collect(),
            )
        })
        .collect()
}

fn dual_stack_node() -> NodeContext {
    NodeContext {
        node_name: "node1".into(),
        addresses: vec![
            Ipv4Addr::new(172, 18, 0, 11).into(),
            "fd00:18::11".parse().expect("address"),
        ],
        ..Default::default()
    }
}

#[test]
fn a_dual_stack_service_gives_each_family_only_its_own_endpoints() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, "fd00:96::50"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{port: 80, nodePort: 30050, protocol: TCP}]
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v4, namespace: default, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: [10.244.1.2], nodeName: node1}
- {addresses: [10.244.2.2], nodeName: node2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v6, namespace: default, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00:244:1::2"], nodeName: node1}
- {addresses: ["fd00:244:2::2"], nodeName: node2, conditions: {ready: false, serving: true, terminating: true}}
"#,
    );
    let node = dual_stack_node();
    let (table, errors) = model::build(&svc, &slices, &node);
    assert!(errors.is_empty(), "{errors:?}");
    let sp = &table.services[&spn("dual", "", Protocol::Tcp)];
    assert_eq!(
        sp.cluster_ips,
        vec![
            std::net::IpAddr::from(Ipv4Addr::new(10, 96, 0, 50)),
            "fd00:96::50".parse::<std::net::IpAddr>().expect("address"),
        ],
        "both families, in spec.clusterIPs order"
    );
    let lb = LbTable::from_services(&table, &node);
    // The IPv6 family has one ready endpoint: the terminating one does not
    // serve there, whatever the IPv4 family has.
    assert_eq!(
        frontends_with_backends(&lb),
        vec![
            (
                "10.96.0.50:80/TCP ClusterIp".to_owned(),
                vec!["10.244.1.2:8080".to_owned(), "10.244.2.2:8080".to_owned()]
            ),
            (
                "172.18.0.11:30050/TCP NodePort".to_owned(),
                vec!["10.244.1.2:8080".to_owned(), "10.244.2.2:8080".to_owned()]
            ),
            (
                "[fd00:18::11]:30050/TCP NodePort".to_owned(),
                vec!["[fd00:244:1::2]:8080".to_owned()]
            ),
            (
                "[fd00:96::50]:80/TCP ClusterIp".to_owned(),
                vec!["[fd00:244:1::2]:8080".to_owned()]
            ),
        ]
    );
}

#[test]
fn an_ipv6_only_service_reads_ipv6_slices_and_serves_on_ipv6_node_addresses() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec:
  type: NodePort
  clusterIP: "fd00:96::60"
  clusterIPs: ["fd00:96::60"]
  ipFamilies: [IPv6]
  externalIPs: ["2001:db8::60", 192.0.2.60]
  ports: [{name: dns, port: 53, nodePort: 30053, protocol: UDP}]
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-a, namespace: default, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: ["fd00:244:1::7"], nodeName: node1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-stray, namespace: default, labels: {kubernetes.io/service-name: six}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.7], nodeName: node1}
"#,
    );
    let node = dual_stack_node();
    let (table, errors) = model::build(&svc, &slices, &node);
    assert!(errors.is_empty(), "{errors:?}");
    let sp = &table.services[&spn("six", "dns", Protocol::Udp)];
    assert_eq!(
        sp.endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect::<Vec<_>>(),
        ["fd00:244:1::7"],
        "the IPv4 slice of an IPv6-only service is not read"
    );
    let lb = LbTable::from_services(&table, &node);
    let v6 = vec!["[fd00:244:1::7]:5353".to_owned()];
    // No IPv4 frontend: not on the node's IPv4 address, not for the IPv4
    // ExternalIP (kube-proxy's IPv4 proxier does not take the service).
    assert_eq!(
        frontends_with_backends(&lb),
        vec![
            ("[2001:db8::60]:53/UDP ExternalIp".to_owned(), v6.clone()),
            ("[fd00:18::11]:30053/UDP NodePort".to_owned(), v6.clone()),
            ("[fd00:96::60]:53/UDP ClusterIp".to_owned(), v6),
        ]
    );
}

#[test]
fn a_bad_address_in_an_ipv6_slice_is_reported_with_its_field() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec:
  clusterIPs: ["fd00:96::61", "fd00:96::zz"]
  ports: [{port: 80, protocol: TCP}]
"#,
    );
    let slices: Vec<SliceView> = load(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-1, namespace: default, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00:244:1::8"]}
- {addresses: [10.244.1.8, "fd00:244:1::9"]}
- {addresses: [garbage]}
"#,
    );
    let (table, errors) = model::build(&svc, &slices, &NodeContext::default());
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        [
            "Service default/six: field spec.clusterIPs[1] = \"fd00:96::zz\": not an IP address",
            "EndpointSlice default/six-1: field endpoints[1].addresses[0] = \"10.244.1.8\": not an IPv6 address",
            "EndpointSlice default/six-1: field endpoints[2].addresses[0] = \"garbage\": not an IPv6 address",
        ]
    );
    // The rest is used: the good ClusterIP, the good addresses.
    let sp = &table.services[&spn("six", "", Protocol::Tcp)];
    assert_eq!(
        sp.cluster_ips,
        vec!["fd00:96::61".parse::<std::net::IpAddr>().expect("address")]
    );
    assert_eq!(
        sp.endpoints
            .iter()
            .map(|e| e.ip.to_string())
            .collect::<Vec<_>>(),
        ["fd00:244:1::8", "fd00:244:1::9"]
    );
}

#[test]
fn source_ranges_apply_per_family() {
    let svc: Vec<Service> = load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: default}
spec:
  type: LoadBalancer
  clusterIPs: [10.96.0.70, "fd00:96::70"]
  loadBalancerSourceRanges: [203.0.113.9/24, "2001:db8:1::5/48", "2001:db8::/129"]
  ports: [{port: 443, nodePort: 30443, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.70}, {ip: "2001:db8:ff::70"}]}
"#,
    );
    let node = dual_stack_node();
    let (table, errors) = model::build(&svc, &[], &node);
    let msgs: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        msgs,
        [
            "Service default/guarded: field spec.loadBalancerSourceRanges[2] = \"2001:db8::/129\": not a CIDR"
        ]
    );
    let ranges = |lb: &LbTable| -> Vec<(String, Vec<String>)> {
        lb.frontends
            .iter()
            .filter(|(_, f)| !f.source_ranges.is_empty())
            .map(|(k, f)| {
                (
                    k.to_string(),
                    f.source_ranges
                        .iter()
                        .map(|(n, l)| format!("{n}/{l}"))
                        .collect(),
                )
            })
            .collect()
    };
    let lb = LbTable::from_services(&table, &node);
    // Host bits cleared; each LoadBalancer IP gets its own family's range.
    assert_eq!(
        ranges(&lb),
        vec![
            (
                "198.51.100.70:443/TCP".to_owned(),
                vec!["203.0.113.0/24".to_owned()]
            ),
            (
                "[2001:db8:ff::70]:443/TCP".to_owned(),
                vec!["2001:db8:1::/48".to_owned()]
            ),
        ]
    );
    let mut all = node.clone();
    all.source_ranges_all = true;
    let lb = LbTable::from_services(&table, &all);
    let guarded: Vec<String> = ranges(&lb).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        guarded,
        [
            "172.18.0.11:30443/TCP",
            "198.51.100.70:443/TCP",
            "[2001:db8:ff::70]:443/TCP",
            "[fd00:18::11]:30443/TCP",
        ]
    );
}

#[test]
fn node_addresses_and_nodeport_cidrs_take_both_families() {
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = load(
        r#"
apiVersion: v1
kind: Node
metadata: {name: node1}
status:
  addresses:
  - {type: InternalIP, address: 172.18.0.11}
  - {type: InternalIP, address: "fd00:18::11"}
  - {type: ExternalIP, address: "2001:db8::11"}
  - {type: InternalIP, address: "fd00:18::11"}
  - {type: ExternalIP, address: "fd00::zz"}
"#,
    );
    let (addresses, errors) = model::node_addresses(&nodes[0]);
    assert_eq!(
        addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["172.18.0.11", "fd00:18::11", "2001:db8::11"]
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .contains("status.addresses[4].address = \"fd00::zz\""),
        "{errors:?}"
    );
    let node = NodeContext {
        host_addresses: addresses.clone(),
        addresses,
        nodeport: NodePortAddresses::parse(&["fd00:18::/64".to_string(), "10.0.0.0/8".to_string()])
            .expect("cidrs"),
        ..Default::default()
    };
    assert_eq!(
        node.nodeport_addresses()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["fd00:18::11"]
    );
    assert_eq!(node.primary_ipv4(), Some(Ipv4Addr::new(172, 18, 0, 11)));
    assert_eq!(node.primary(true), Some("fd00:18::11".parse().expect("ip")));
    let err = model::parse_cidrs(&["fd00::/129".to_string()]).expect_err("bad");
    assert!(err.contains("\"fd00::/129\""), "{err}");
}
