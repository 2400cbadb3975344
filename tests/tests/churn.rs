//! 1000 services created, updated and deleted through the API server
//! fixture: afterwards every map is back to its baseline entry count.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cgroup::Cgroup,
    cluster::{Cluster, ClusterSpec, TcpServer, UdpServer, tcp_request},
    scenario::{ClientResult, PodClient},
};
use serde_json::{Value, json};

/// Entries per pinned map of `agent` (every map of
/// `proxy_common::maps::ALL`, read from its pin with raw `bpf(2)` calls:
/// `proxyctl dump-maps` leaves some maps out and counts Maglev by table).
fn pinned_counts(agent: &Agent) -> Vec<(&'static str, usize)> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
        // SAFETY: `attr` is the bpf_attr prefix of `cmd`; its pointers point
        // at live buffers of the sizes the kernel expects.
        let r =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    let dir = agent
        .bpffs_path
        .join(format!("maps-v{}", proxy_common::LAYOUT_VERSION));
    proxy_common::maps::ALL
        .iter()
        .map(|m| {
            let path =
                std::ffi::CString::new(dir.join(m.name).display().to_string()).expect("path");
            let mut get = ObjGet {
                pathname: path.as_ptr() as u64,
                bpf_fd: 0,
                file_flags: 0,
            };
            let fd = bpf(7, &mut get).unwrap_or_else(|e| panic!("{}: {e}", m.name));
            // SAFETY: a fresh fd the kernel just returned; closed on drop.
            let fd: std::os::fd::OwnedFd =
                unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u32;
            let mut info = [0u8; 128];
            let mut by_fd = InfoByFd {
                bpf_fd: raw,
                info_len: info.len() as u32,
                info: info.as_mut_ptr() as u64,
            };
            bpf(15, &mut by_fd).unwrap_or_else(|e| panic!("{} info: {e}", m.name));
            // struct bpf_map_info: type, id, key_size, ...
            let key_size = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes")) as usize;
            let mut n = 0;
            let mut key: Option<Vec<u8>> = None;
            loop {
                let mut next = vec![0u8; key_size];
                let mut attr = NextKey {
                    map_fd: raw,
                    _pad: 0,
                    key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                    next_key: next.as_mut_ptr() as u64,
                    flags: 0,
                };
                match bpf(4, &mut attr) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                    Err(e) => panic!("{} next key: {e}", m.name),
                }
                n += 1;
                key = Some(next);
            }
            (m.name, n)
        })
        .collect()
}

const N: usize = 1000;

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "churn"},
        "spec": {
            "clusterIP": format!("10.97.{}.{}", i / 250, i % 250 + 1),
            "ports": [
                {"name": "tcp", "port": 80, "protocol": "TCP"},
                {"name": "udp", "port": 53, "protocol": "UDP"}
            ]
        }
    })
}

fn slice(i: usize, hosts: &[usize]) -> Value {
    let endpoints: Vec<Value> = hosts
        .iter()
        .map(|h| json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 250, i % 250, h)], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "churn",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"},
                  {"name": "udp", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    })
}

fn counts(agent: &Agent) -> Vec<(String, usize)> {
    let out = agent
        .proxyctl(&["dump-maps", "--output", "json"])
        .expect("dump-maps");
    let v: Value = serde_json::from_str(&out).expect("json");
    let obj = v.as_object().expect("object");
    obj.iter()
        // `stats` is a fixed array; `maps` is the per-map summary.
        .filter(|(k, _)| *k != "stats" && *k != "maps")
        .map(|(k, v)| (k.clone(), v.as_array().map(Vec::len).unwrap_or(0)))
        .collect()
}

fn count_of(c: &[(String, usize)], name: &str) -> usize {
    c.iter()
        .find(|(k, _)| k == name)
        .map(|(_, n)| *n)
        .unwrap_or(0)
}

fn wait_for(agent: &Agent, what: &str, f: impl Fn(&[(String, usize)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = counts(agent);
        if f(&c) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: maps are {c:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn thousand_services_leave_no_orphans() {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 0,
        external_client: false,
    })
    .expect("cluster");
    let api = ApiServer::start().expect("api");
    api.apply_yaml("apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n")
        .expect("node");
    let agent = Agent::start(cluster.node(1), &api, AgentOptions::default()).expect("agent");
    let baseline = counts(&agent);
    assert!(baseline.iter().all(|(_, n)| *n == 0), "{baseline:?}");

    for i in 0..N {
        api.create(service(i)).expect("service");
        api.create(slice(i, &[2, 3])).expect("slice");
    }
    wait_for(&agent, "1000 services x 2 ports", |c| {
        count_of(c, "services") == 2 * N && count_of(c, "backends") == 4 * N
    });
    let c = counts(&agent);
    assert_eq!(count_of(&c, "slots"), 2 * 2 * N, "two slots per frontend");
    assert_eq!(count_of(&c, "revnat"), 2 * N);
    assert_eq!(count_of(&c, "service_stats"), 2 * N);

    // Update every service: one endpoint replaced, one port's number changed.
    for i in 0..N {
        api.update(slice(i, &[3, 4])).expect("update slice");
        api.modify("Service", Some("churn"), &format!("svc-{i}"), |s| {
            s["spec"]["ports"][0]["port"] = json!(8080);
        })
        .expect("update service");
    }
    wait_for(&agent, "updated", |c| {
        count_of(c, "services") == 2 * N && count_of(c, "backends") == 4 * N
    });
    let out = agent
        .proxyctl(&["dump-maps", "--output", "json"])
        .expect("dump");
    assert!(
        !out.contains("\"port\": 80,"),
        "old port 80 frontends are gone"
    );

    for i in 0..N {
        api.delete("Service", Some("churn"), &format!("svc-{i}"))
            .expect("delete service");
        api.delete("EndpointSlice", Some("churn"), &format!("svc-{i}-1"))
            .expect("delete slice");
    }
    wait_for(&agent, "back to baseline", |c| c == baseline.as_slice());
}

/// North-south churn: rounds of NodePort and LoadBalancer services (Maglev
/// on, the LoadBalancer with `sessionAffinity: ClientIP`) created, reached
/// from the external client, and deleted; with them a UDP NodePort service
/// reached through socket LB from a pod with connected UDP sockets. After
/// the deletions every map is back to its baseline entry count (conntrack,
/// affinity and socket rev-NAT included: the entries of removed frontends
/// and closed sockets go with them).
#[test]
fn north_south_churn_returns_every_map_to_baseline() {
    const ROUNDS: usize = 3;
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 2,
        external_client: true,
    })
    .expect("cluster");
    let pods = [cluster.pod(1, 1), cluster.pod(1, 2)];
    let _udp_server = UdpServer::start(
        &pods[1].ns,
        &pods[1].name,
        SocketAddr::from((pods[1].ip, 5353)),
    )
    .expect("udp server");
    let _servers: Vec<TcpServer> = pods
        .iter()
        .map(|p| TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("server"))
        .collect();
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("node");
    let cgroup = Cgroup::new("ns-churn").expect("cgroup");
    let mut agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: vec![
                "--socket-lb".into(),
                "true".into(),
                "--cgroup-path".into(),
                cgroup.path().display().to_string(),
            ],
            ..Default::default()
        },
    )
    .expect("agent");
    let client = PodClient::new(pods[0], &cgroup);
    agent
        .wait_for_log("attached XDP", Duration::from_secs(10))
        .expect("XDP attached");
    let node_ip = cluster.node(1).underlay_ip;
    let ext = cluster.external();
    let baseline = pinned_counts(&agent);

    for round in 0..ROUNDS {
        let lb_ip = Ipv4Addr::new(192, 0, 2, 70 + round as u8);
        ext.add_route(&format!("{lb_ip}/32"), node_ip)
            .expect("route to the LB IP");
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|p| json!({"addresses": [p.ip.to_string()], "nodeName": "node1"}))
            .collect();
        let np = format!("np-{round}");
        let lb = format!("lb-{round}");
        api.create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": np, "namespace": "ns"},
            "spec": {"type": "NodePort", "clusterIP": format!("10.96.50.{}", 10 + round),
                     "ports": [{"port": 80, "nodePort": 30300 + round, "protocol": "TCP", "targetPort": 8080}]}
        }))
        .expect("NodePort service");
        api.create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": lb, "namespace": "ns"},
            "spec": {"type": "LoadBalancer", "clusterIP": format!("10.96.51.{}", 10 + round),
                     "sessionAffinity": "ClientIP",
                     "ports": [{"port": 80, "nodePort": 30400 + round, "protocol": "TCP", "targetPort": 8080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": lb_ip.to_string()}]}}
        }))
        .expect("LoadBalancer service");
        let udp = format!("udp-{round}");
        let udp_vip = Ipv4Addr::new(10, 96, 52, 10 + round as u8);
        api.create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": udp, "namespace": "ns"},
            "spec": {"type": "NodePort", "clusterIP": udp_vip.to_string(),
                     "ports": [{"port": 53, "nodePort": 30500 + round, "protocol": "UDP", "targetPort": 5353}]}
        }))
        .expect("UDP service");
        api.create(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{udp}-1"), "namespace": "ns",
                         "labels": {"kubernetes.io/service-name": udp}},
            "addressType": "IPv4",
            "ports": [{"port": 5353, "protocol": "UDP"}],
            "endpoints": [{"addresses": [pods[1].ip.to_string()], "nodeName": "node1"}],
        }))
        .expect("UDP slice");
        for name in [&np, &lb] {
            api.create(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-1"), "namespace": "ns",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .expect("slice");
        }
        for to in [
            SocketAddr::from((node_ip, 30300 + round as u16)),
            SocketAddr::from((lb_ip, 80)),
        ] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(e) = tcp_request(&ext.ns, to, Duration::from_millis(500)) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {to} not served: {e}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            for _ in 0..5 {
                tcp_request(&ext.ns, to, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("round {round}: {to}: {e}"));
            }
        }
        // Connected UDP sockets through the socket hooks (each request its
        // own socket), replies from the frontend.
        let args: Vec<String> = [
            "--proto",
            "udp",
            "--to",
            &format!("{udp_vip}:53"),
            "--count",
            "3",
            "--timeout-ms",
            "1000",
            "--udp-connected",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let results: Vec<ClientResult> = client
                .spawn(&args)
                .expect("podclient")
                .wait(Duration::from_secs(10))
                .expect("podclient results");
            if results.len() == 3 && results.iter().all(|r| r.ok) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {udp_vip}:53 over connected UDP: {results:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for name in [&np, &lb, &udp] {
            api.delete("Service", Some("ns"), name)
                .expect("delete service");
            api.delete("EndpointSlice", Some("ns"), &format!("{name}-1"))
                .expect("delete slice");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = pinned_counts(&agent);
        if c == baseline {
            break;
        }
        let differ: Vec<String> = c
            .iter()
            .zip(&baseline)
            .filter(|(a, b)| a != b)
            .map(|((name, n), (_, was))| format!("{name}: {n} (baseline {was})"))
            .collect();
        assert!(
            Instant::now() < deadline,
            "maps not back to baseline 60 s after the north-south churn: {}",
            differ.join(", ")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
