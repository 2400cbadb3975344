//! Operability: `proxyctl` against a running agent's pins (services,
//! dump-maps, explain), the agent's kube-proxy endpoints (/metrics,
//! /proxyMode, /healthz through an API server outage), proxyctl without
//! pins, Kubernetes Events for objects that cannot be programmed, and a
//! full eBPF map (pressure metrics, one Event on the Node, retries).
//! The kube-proxy endpoints (behaviour 21 of docs/service-behaviours.md) are also checked
//! in every mode with one function (`ebpf::`, `iptables::`, `nftables::`
//! `kube_proxy_endpoints`).

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use proxy_tests::{
    agent::{Agent, AgentOptions, binary},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec, TcpServer, tcp_request},
    netns::Netns,
    scenario::{DataplaneMode, mode_frontends},
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_millis(500);

/// A ClusterIP service `name` on `vip:80` -> 8080 and its slice.
fn cluster_ip(name: &str, vip: &str, endpoints: &[(Ipv4Addr, &str)]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(ip, node)| format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n"))
        .collect();
    let eps = if eps.is_empty() {
        "[]\n".to_owned()
    } else {
        format!("\n{eps}")
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  ports: [{{name: http, port: 80, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: {eps}---
"#
    )
}

fn proxyctl_json(agent: &Agent, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    let out = agent
        .proxyctl(&a)
        .unwrap_or_else(|e| panic!("proxyctl {args:?}: {e:#}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("proxyctl {args:?} JSON: {e}\n{out}"))
}

/// The default cluster with a server on pod-1-2:8080 and the API fixture
/// holding the nodes and ClusterIP service `web` at `vip` (port 80) with
/// pod-1-2 as its one endpoint.
fn web_cluster(vip: &str) -> (Cluster, TcpServer, ApiServer) {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let p12 = cluster.pod(1, 2);
    let server =
        TcpServer::start(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 8080))).expect("server");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&(cluster.node_objects_yaml() + &cluster_ip("web", vip, &[(p12.ip, "node1")])))
        .expect("objects");
    (cluster, server, api)
}

fn poll<T>(within: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("not within {within:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// What the fixture holds for service `name`: its ClusterIP frontend
/// (`ip:port/PROTO` of the first port) and the `ip:port` of every ready
/// endpoint of its slices.
fn fixture_view(api: &ApiServer, name: &str) -> Option<(String, BTreeSet<String>)> {
    let svc = api.get("Service", Some("default"), name)?;
    let vip = svc["spec"]["clusterIP"].as_str()?.to_owned();
    let port = svc["spec"]["ports"][0]["port"].as_u64()?;
    let mut backends = BTreeSet::new();
    for slice in api.list("EndpointSlice") {
        if slice["metadata"]["labels"]["kubernetes.io/service-name"] != name {
            continue;
        }
        let Some(target) = slice["ports"][0]["port"].as_u64() else {
            continue;
        };
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == false {
                continue;
            }
            for a in e["addresses"].as_array().into_iter().flatten() {
                backends.insert(format!("{}:{target}", a.as_str().unwrap_or_default()));
            }
        }
    }
    Some((format!("{vip}:{port}/TCP"), backends))
}

fn addr(v: &Value) -> String {
    format!(
        "{}:{}/{}",
        v["ip"].as_str().unwrap_or_default(),
        v["port"],
        v["proto"].as_str().unwrap_or_default()
    )
}

/// `proxyctl services`: frontend -> backend `ip:port` set.
fn programmed(agent: &Agent) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let v = proxyctl_json(agent, &["services"]);
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            let backends = s["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "{}:{}",
                        b["address"]["ip"].as_str().unwrap_or_default(),
                        b["address"]["port"]
                    )
                })
                .collect();
            (addr(&s["frontend"]), backends)
        })
        .collect()
}

/// `proxyctl services` and `dump-maps --output json` agree with the
/// fixture's objects after a create, an update and a delete.
#[test]
fn proxyctl_services_and_dump_follow_the_fixture() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p11, p12, p21) = (cluster.pod(1, 1), cluster.pod(1, 2), cluster.pod(2, 1));
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("nodes");
    let agent = Agent::start(cluster.node(1), &api, AgentOptions::default()).expect("agent");

    let check = |names: &[&str], gone: &[&str]| {
        poll(Duration::from_secs(10), || {
            let got = programmed(&agent);
            for n in names {
                let (fe, backends) = fixture_view(&api, n).ok_or(format!("{n} not in fixture"))?;
                match got.get(&fe) {
                    Some(b) if *b == backends => {}
                    other => return Err(format!("{fe}: fixture {backends:?}, proxyctl {other:?}")),
                }
            }
            for fe in gone {
                if got.contains_key(*fe) {
                    return Err(format!("{fe} still programmed"));
                }
            }
            Ok(())
        });
        // dump-maps agrees: the frontends are there, every backend of them
        // is in BACKENDS_V4, and the MAPS summary counts what is listed.
        let d = proxyctl_json(&agent, &["dump-maps"]);
        let fronts: BTreeSet<String> = d["services"]
            .as_array()
            .expect("services")
            .iter()
            .map(|s| addr(&s["frontend"]))
            .collect();
        let backends: BTreeSet<String> = d["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                format!(
                    "{}:{}",
                    b["backend"]["ip"].as_str().unwrap_or_default(),
                    b["backend"]["port"]
                )
            })
            .collect();
        for n in names {
            let (fe, want) = fixture_view(&api, n).expect("in fixture");
            assert!(fronts.contains(&fe), "dump-maps lacks {fe}: {fronts:?}");
            assert!(want.is_subset(&backends), "{want:?} not in {backends:?}");
        }
        for fe in gone {
            assert!(!fronts.contains(*fe), "dump-maps still has {fe}");
        }
        let maps = d["maps"].as_array().expect("maps summary");
        assert_eq!(
            maps.len(),
            proxy_common::maps::ALL.len(),
            "every map summarised"
        );
        let svc = maps.iter().find(|m| m["name"] == "SVC_V4").expect("SVC_V4");
        assert_eq!(svc["entries"].as_u64(), Some(fronts.len() as u64));
        assert_eq!(svc["max_entries"].as_u64(), Some(65536));
        for m in maps {
            assert!(m["max_entries"].as_u64() > Some(0), "capacity of {m}");
        }
    };

    // Create.
    api.apply_yaml(
        &(cluster_ip("web", "10.96.4.1", &[(p11.ip, "node1"), (p21.ip, "node2")])
            + &cluster_ip("db", "10.96.4.2", &[(p12.ip, "node1")])),
    )
    .expect("create");
    check(&["web", "db"], &[]);

    // Update: one endpoint goes, another comes.
    api.apply_yaml(&cluster_ip(
        "web",
        "10.96.4.1",
        &[(p12.ip, "node1"), (p21.ip, "node2")],
    ))
    .expect("update");
    check(&["web", "db"], &[]);
    let v = proxyctl_json(&agent, &["services"]);
    let web = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|s| addr(&s["frontend"]) == "10.96.4.1:80/TCP")
        })
        .expect("web listed")
        .clone();
    assert_eq!(web["state"], "active");
    assert_eq!(web["kind"], "ClusterIP");
    let local: Vec<bool> = web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["local"].as_bool().unwrap_or_default())
        .collect();
    assert_eq!(local.iter().filter(|l| **l).count(), 1, "one local backend");

    // Delete.
    api.delete("Service", Some("default"), "db")
        .expect("delete");
    check(&["web"], &["10.96.4.2:80/TCP"]);
    let table = agent.proxyctl(&["services"]).expect("table");
    assert!(
        table.contains("10.96.4.1:80/TCP") && !table.contains("10.96.4.2"),
        "{table}"
    );
}

/// `explain`: a served service, one without endpoints, externalTrafficPolicy
/// Local on a node without local endpoints, a client outside
/// loadBalancerSourceRanges (and one inside), and a Maglev NodePort.
#[test]
fn explain_tells_why() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (p12, p21) = (cluster.pod(1, 2), cluster.pod(2, 1));
    let api = ApiServer::start().expect("api");
    let node1 = cluster.node(1).underlay_ip;
    let objects = cluster.node_objects_yaml()
        + &cluster_ip("web", "10.96.5.1", &[(p12.ip, "node1")])
        + &cluster_ip("empty", "10.96.5.2", &[])
        + &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.5.3
  externalTrafficPolicy: Local
  ports: [{{port: 80, nodePort: 30150, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-1, namespace: default, labels: {{kubernetes.io/service-name: local}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{p21}"], nodeName: node2}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.4
  loadBalancerSourceRanges: ["172.18.0.100/32"]
  ports: [{{port: 80, nodePort: 30151, protocol: TCP, targetPort: 8080}}]
status:
  loadBalancer: {{ingress: [{{ip: 192.0.2.60}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{p12}"], nodeName: node1}}, {{addresses: ["{p21}"], nodeName: node2}}]
---
"#,
            p21 = p21.ip,
            p12 = p12.ip
        );
    api.apply_yaml(&objects).expect("objects");
    let mut agent = Agent::start(cluster.node(1), &api, AgentOptions::default()).expect("agent");
    let explain = |agent: &Agent, target: &str, from: Option<&str>| {
        let mut a = vec!["explain", target];
        if let Some(f) = from {
            a.extend(["--from", f]);
        }
        poll(Duration::from_secs(10), || {
            let e = proxyctl_json(agent, &a);
            if e["verdict"] == "not_a_service" {
                return Err(format!("{target} not programmed yet"));
            }
            Ok(e)
        })
    };

    let e = explain(&agent, "10.96.5.1:80/tcp", None);
    assert_eq!(e["verdict"], "forward", "{e}");
    assert_eq!(e["selection"], "random");
    let cands: Vec<&str> = e["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["address"]["ip"].as_str())
        .collect();
    assert_eq!(cands, vec![p12.ip.to_string()]);

    let e = explain(&agent, "10.96.5.2:80/tcp", None);
    assert_eq!(
        (&e["verdict"], &e["refusal"]),
        (&"reject".into(), &"no_endpoints".into()),
        "{e}"
    );

    let np = format!("{node1}:30150/tcp");
    let e = explain(&agent, &np, None);
    assert_eq!(
        (&e["verdict"], &e["refusal"]),
        (&"reject".into(), &"no_local_endpoints".into()),
        "{e}"
    );
    assert_eq!(e["service"]["traffic_policy"], "Local");
    // The same service's ClusterIP (internal policy Cluster) is served.
    assert_eq!(
        explain(&agent, "10.96.5.3:80/tcp", None)["verdict"],
        "forward"
    );

    let e = explain(&agent, "192.0.2.60:80/tcp", Some("10.1.2.3"));
    assert_eq!(
        (&e["verdict"], &e["refusal"]),
        (&"drop".into(), &"source_range".into()),
        "{e}"
    );
    let e = explain(&agent, "192.0.2.60:80/tcp", Some("172.18.0.100:40000"));
    assert_eq!(e["verdict"], "forward", "{e}");
    assert_eq!(
        e["selection"], "maglev",
        "LoadBalancer frontends use Maglev: {e}"
    );
    let chosen = e["backend"]["address"]["ip"]
        .as_str()
        .expect("a backend")
        .to_owned();
    assert!([p12.ip.to_string(), p21.ip.to_string()].contains(&chosen));
    // The computed choice is the data path's: connect from those source
    // ports (explained first, so no conntrack entry decides) and see which
    // backend answers.
    agent
        .wait_for_log("attached XDP", Duration::from_secs(10))
        .expect("XDP attached");
    let _servers: Vec<TcpServer> = [p12, p21]
        .iter()
        .map(|p| TcpServer::start(&p.ns, &p.name, SocketAddr::from((p.ip, 8080))).expect("server"))
        .collect();
    let ext = cluster.external();
    ext.add_route("192.0.2.60/32", node1)
        .expect("route to the LB IP");
    let mut seen = BTreeSet::new();
    for sport in 40001..40009u16 {
        let e = explain(
            &agent,
            "192.0.2.60:80/tcp",
            Some(&format!("{}:{sport}", ext.ip)),
        );
        assert_eq!(e["selection"], "maglev", "{e}");
        let want = e["backend"]["address"]["ip"]
            .as_str()
            .expect("backend")
            .to_owned();
        let reply = poll(Duration::from_secs(5), || {
            tcp_request_from(
                &ext.ns,
                sport,
                SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 60), 80),
            )
        });
        let name = reply.split(' ').next().unwrap_or_default();
        let got = [p12, p21]
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.ip.to_string())
            .unwrap_or_else(|| panic!("unknown backend in {reply:?}"));
        assert_eq!(
            got, want,
            "source port {sport}: explain said {want}, {name} answered"
        );
        seen.insert(got);
    }
    eprintln!("Maglev choices matched for 8 source ports; backends used: {seen:?}");
    for args in [
        &["services"][..],
        &[
            "explain",
            "192.0.2.60:80/tcp",
            "--from",
            "172.18.0.100:45000",
        ],
        &[
            "explain",
            "192.0.2.60:80/tcp",
            "--from",
            "172.18.0.100:40001",
        ],
        &["explain", "192.0.2.60:80/tcp", "--from", "10.1.2.3"],
        &["explain", "10.96.5.1:80/tcp"],
        &["explain", &np],
    ] {
        eprintln!(
            "$ proxyctl {}\n{}",
            args.join(" "),
            agent.proxyctl(args).expect("proxyctl")
        );
    }
    // Without the source port: both backends are candidates with their
    // shares of the 16381 slots.
    let e = explain(&agent, "192.0.2.60:80/tcp", Some("172.18.0.100"));
    let slots: u64 = e["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| c["maglev_slots"].as_u64().expect("slot count"))
        .sum();
    assert_eq!(slots, 16381);

    let table = agent
        .proxyctl(&["explain", "10.96.5.2:80/tcp"])
        .expect("table");
    assert!(
        table.contains("REJECT") && table.contains("no usable endpoint"),
        "{table}"
    );
    let out = agent
        .proxyctl(&["explain", "10.96.9.9:80/tcp"])
        .expect("other");
    assert!(out.contains("NOT A SERVICE"), "{out}");
}

/// From inside `ns`: a TCP request from source port `sport` (bound before
/// connecting, so the flow hash is known); returns the reply line.
fn tcp_request_from(ns: &Netns, sport: u16, to: SocketAddrV4) -> Result<String, String> {
    ns.run(move || -> Result<String, String> {
        let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        let sin = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket syscalls on a descriptor owned by `stream`
        // (closed on every return path); the sockaddr_in values live across
        // the calls.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(os("socket"));
            }
            let mut stream = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            // SO_SNDTIMEO bounds connect() too.
            stream
                .set_write_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .map_err(|e| e.to_string())?;
            let local = sin(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, sport));
            if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(os("bind"));
            }
            let remote = sin(to);
            if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
                return Err(os("connect"));
            }
            stream.write_all(b"hi\n").map_err(|e| e.to_string())?;
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line)
                .map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("closed without a reply".into());
            }
            Ok(line.trim_end().to_owned())
        }
    })
    .map_err(|e| e.to_string())?
}

/// HTTP GET inside a network namespace: (status, body).
fn http_get(ns: &Netns, to: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let path = path.to_owned();
    ns.run(move || -> Result<(u16, String), String> {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
        let (head, body) = buf.split_once("\r\n\r\n").ok_or("no header end")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        Ok((status, body.to_owned()))
    })
    .map_err(|e| e.to_string())?
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// /metrics: the sync histogram moves with syncs, per-service packet
/// counters grow with traffic; /proxyMode says ebpf.
#[test]
fn metrics_follow_syncs_and_traffic() {
    let (cluster, _server, api) = web_cluster("10.96.6.1");
    let (client, p12) = (cluster.pod(1, 1), cluster.pod(1, 2));
    let agent_started = std::time::SystemTime::now();
    let agent = Agent::start(cluster.node(1), &api, AgentOptions::default()).expect("agent");
    let ns = &cluster.node(1).ns;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 10249));
    let scrape = || {
        poll(Duration::from_secs(10), || {
            let (code, body) = http_get(ns, metrics_addr, "/metrics")?;
            (code == 200)
                .then_some(body)
                .ok_or(format!("status {code}"))
        })
    };
    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 6, 1), 80));
    poll(Duration::from_secs(10), || {
        tcp_request(&client.ns, vip, TIMEOUT).map_err(|e| e.to_string())
    });

    let packets = "kubeproxy_ebpf_service_packets_total{frontend=\"10.96.6.1:80/TCP\",kind=\"ClusterIP\",service=\"default/web:http/TCP\"}";
    let syncs = "kubeproxy_sync_proxy_rules_duration_seconds_count";
    let before = scrape();
    let (p0, s0) = (
        sample(&before, packets).unwrap_or_else(|| panic!("no {packets} in\n{before}")),
        sample(&before, syncs).expect("sync count"),
    );
    assert!(s0 >= 1.0, "at least one sync observed");
    for l in [
        "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
        "kubeproxy_ebpf_programmed_services 1",
        "kubeproxy_ebpf_programmed_endpoints 1",
        "kubeproxy_ebpf_map_capacity{map=\"CT_V4\"} 262144",
        "kubeproxy_ebpf_info{mode=\"ebpf\"} 1",
    ] {
        assert!(before.lines().any(|x| x == l), "missing {l:?} in\n{before}");
    }
    assert!(
        sample(
            &before,
            "kubeproxy_ebpf_drops_total{reason=\"source_range\"}"
        )
        .is_some()
    );

    for i in 0..20 {
        tcp_request(&client.ns, vip, TIMEOUT).unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    // A change makes another sync.
    api.apply_yaml(&cluster_ip("web2", "10.96.6.2", &[(p12.ip, "node1")]))
        .expect("second service");
    let after = poll(Duration::from_secs(10), || {
        let m = scrape();
        match (
            sample(&m, syncs),
            sample(&m, "kubeproxy_ebpf_programmed_services"),
        ) {
            (Some(s), Some(n)) if s > s0 && n == 2.0 => Ok(m),
            (s, n) => Err(format!(
                "sync count {s:?} (before: {s0}), programmed services {n:?}"
            )),
        }
    });
    let p1 = sample(&after, packets).expect("packets after");
    assert!(p1 >= p0 + 20.0, "packets grew by the traffic: {p0} -> {p1}");
    // kube-proxy's change metrics: the new Service and its slice are one
    // change each, synced (nothing pending), queued after the first scrape.
    let changes = |m: &str, kind: &str| -> (f64, f64) {
        let name = format!("kubeproxy_sync_proxy_rules_{kind}_changes");
        (
            sample(m, &format!("{name}_total"))
                .unwrap_or_else(|| panic!("no {name}_total in\n{m}")),
            sample(m, &format!("{name}_pending")).unwrap_or_else(|| panic!("no {name}_pending")),
        )
    };
    let synced = poll(Duration::from_secs(10), || {
        let m = scrape();
        for kind in ["service", "endpoint"] {
            let ((t0, _), (t1, pending)) = (changes(&before, kind), changes(&m, kind));
            if t1 < t0 + 1.0 || pending != 0.0 {
                return Err(format!(
                    "{kind} changes: total {t0} -> {t1}, pending {pending}"
                ));
            }
        }
        Ok(m)
    });
    let queued = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
    assert!(
        sample(&synced, queued) > sample(&before, queued),
        "{queued} moved with the change"
    );

    // kube-proxy's network_programming_duration_seconds: a slice whose
    // change the EndpointSlice controller stamped 1 s ago is observed once,
    // at 1 s or more (a stamp from before the agent started would not
    // count: it waits). sync_proxy_rules_no_local_endpoints_total: the same
    // service has internalTrafficPolicy Local and its only endpoint on
    // node2, so its ClusterIP finds none on node1.
    let programming = "kubeproxy_network_programming_duration_seconds";
    let (count0, sum0) = (
        sample(&synced, &format!("{programming}_count"))
            .unwrap_or_else(|| panic!("no {programming} in\n{synced}")),
        sample(&synced, &format!("{programming}_sum")).expect("sum"),
    );
    let no_local = |policy: &str| {
        format!(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"{policy}\"}}"
        )
    };
    assert_eq!(sample(&synced, &no_local("internal")), Some(0.0));
    if let Ok(up) = agent_started.elapsed() {
        std::thread::sleep(Duration::from_secs(3).saturating_sub(up));
    }
    let triggered = std::time::SystemTime::now() - Duration::from_secs(1);
    let triggered = k8s_openapi::jiff::Timestamp::try_from(triggered).expect("a timestamp");
    let yaml = cluster_ip("web3", "10.96.6.3", &[(p12.ip, "node2")])
        .replace(
            "  ports: [{name: http",
            "  internalTrafficPolicy: Local\n  ports: [{name: http",
        )
        .replace(
            "metadata: {name: web3-1, namespace: default,",
            &format!(
                "metadata: {{name: web3-1, namespace: default, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{triggered}\"}},"
            ),
        );
    assert!(yaml.contains("last-change-trigger-time") && yaml.contains("internalTrafficPolicy"));
    api.apply_yaml(&yaml).expect("third service");
    poll(Duration::from_secs(10), || {
        let m = scrape();
        let count = sample(&m, &format!("{programming}_count")).unwrap_or(0.0);
        let sum = sample(&m, &format!("{programming}_sum")).unwrap_or(0.0);
        let internal = sample(&m, &no_local("internal"));
        let external = sample(&m, &no_local("external"));
        if count == count0 + 1.0
            && (1.0..10.0).contains(&(sum - sum0))
            && internal == Some(1.0)
            && external == Some(0.0)
        {
            Ok(())
        } else {
            Err(format!(
                "{programming}: count {count0} -> {count}, sum {sum0} -> {sum}; no local endpoints: internal {internal:?}, external {external:?}"
            ))
        }
    });
    assert!(
        sample(&after, "kubeproxy_ebpf_conntrack_entries").is_some_and(|n| n > 0.0),
        "conntrack entries counted"
    );

    // proxyctl sees the same flows and counters.
    let st = proxyctl_json(&agent, &["stats"]);
    let web = st["services"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|x| addr(&x["frontend"]) == "10.96.6.1:80/TCP")
        })
        .expect("web in stats");
    assert!(
        web["packets"].as_f64() >= Some(p1),
        "stats {web} vs metrics {p1}"
    );
    let ct = proxyctl_json(
        &agent,
        &[
            "conntrack",
            "--service",
            "10.96.6.1:80/tcp",
            "--address",
            &client.ip.to_string(),
        ],
    );
    let ct = ct.as_array().expect("entries");
    assert!(!ct.is_empty(), "the client's flows are tracked");
    for e in ct {
        assert_eq!(addr(&e["frontend"]), "10.96.6.1:80/TCP", "{e}");
        assert_eq!(e["backend"]["ip"], p12.ip.to_string(), "{e}");
    }
    let none = proxyctl_json(&agent, &["conntrack", "--backend", "10.244.9.9"]);
    assert_eq!(
        none.as_array().map(Vec::len),
        Some(0),
        "filter by another backend"
    );

    let (code, mode) = http_get(ns, metrics_addr, "/proxyMode").expect("proxyMode");
    assert_eq!((code, mode.trim()), (200, "ebpf"));
    drop(agent);
}

/// Behaviour 21 in every mode, with the same code: `/healthz`
/// on the node's address :10256 answers 200 with `lastUpdated`, `/metrics`
/// on :10249 carries kube-proxy's sync histogram (moving with syncs) and the
/// programmed counts, which match the frontends read from the kernel (the
/// eBPF services map, our iptables rules, our nftables maps), and
/// `/proxyMode` names the mode.
fn kube_proxy_endpoints(mode: DataplaneMode) {
    let (cluster, _server, api) = web_cluster("10.96.6.11");
    let (client, p12) = (cluster.pod(1, 1), cluster.pod(1, 2));
    let agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: mode.agent_args(),
            ..Default::default()
        },
    )
    .expect("agent");
    let ns = &cluster.node(1).ns;
    let vip = SocketAddr::from((Ipv4Addr::new(10, 96, 6, 11), 80));
    poll(Duration::from_secs(10), || {
        tcp_request(&client.ns, vip, TIMEOUT).map_err(|e| e.to_string())
    });

    // /healthz on the node's address (0.0.0.0:10256 by default).
    let healthz = SocketAddr::from((cluster.node(1).underlay_ip, 10256));
    let body = poll(Duration::from_secs(10), || {
        let (code, body) = http_get(ns, healthz, "/healthz")?;
        if code == 200 {
            Ok(body)
        } else {
            Err(format!("status {code}: {body}"))
        }
    });
    let v: Value = serde_json::from_str(&body).expect("healthz JSON body");
    assert!(
        v["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{mode:?}: {v}"
    );
    assert!(v["currentTime"].is_string(), "{mode:?}: {v}");

    // /metrics: kube-proxy's sync histogram and what is programmed.
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 10249));
    let scrape = || {
        poll(Duration::from_secs(10), || {
            let (code, body) = http_get(ns, metrics_addr, "/metrics")?;
            (code == 200)
                .then_some(body)
                .ok_or(format!("status {code}"))
        })
    };
    let hist = "kubeproxy_sync_proxy_rules_duration_seconds";
    let syncs = format!("{hist}_count");
    let frontends_metric = "kubeproxy_ebpf_programmed_frontends";
    let before = scrape();
    for l in [
        format!("# TYPE {hist} histogram"),
        format!("kubeproxy_ebpf_info{{mode=\"{}\"}} 1", mode.mode()),
        "kubeproxy_ebpf_programmed_services 1".to_owned(),
        "kubeproxy_ebpf_programmed_endpoints 1".to_owned(),
    ] {
        assert!(
            before.lines().any(|x| x == l),
            "{mode:?}: missing {l:?} in\n{before}"
        );
    }
    let s0 = sample(&before, &syncs).unwrap_or_else(|| panic!("no {syncs} in\n{before}"));
    assert!(s0 >= 1.0, "{mode:?}: at least one sync observed");
    assert_eq!(
        sample(&before, &format!("{hist}_bucket{{le=\"+Inf\"}}")),
        Some(s0),
        "{mode:?}: the +Inf bucket counts every sync"
    );
    assert!(
        sample(&before, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            .is_some_and(|t| t > 0.0),
        "{mode:?}: last sync timestamp in\n{before}"
    );
    let kernel = mode_frontends(mode, &agent, ns).expect("frontends from the kernel");
    assert_eq!(kernel, ["10.96.6.11:80/TCP"], "{mode:?}");
    assert_eq!(sample(&before, frontends_metric), Some(1.0), "{mode:?}");

    // A change makes another sync, and both the metrics and the kernel
    // follow it.
    api.apply_yaml(&cluster_ip("web2", "10.96.6.12", &[(p12.ip, "node1")]))
        .expect("second service");
    let after = poll(Duration::from_secs(10), || {
        let m = scrape();
        // The Service and its slice may arrive in two syncs: wait until
        // the kernel has the frontend with its endpoint too.
        let kernel = mode_frontends(mode, &agent, ns).map_err(|e| e.to_string())?;
        match (
            sample(&m, &syncs),
            sample(&m, "kubeproxy_ebpf_programmed_services"),
        ) {
            (Some(s), Some(n)) if s > s0 && n == 2.0 && kernel.len() == 2 => Ok(m),
            (s, n) => Err(format!(
                "sync count {s:?} (before: {s0}), programmed services {n:?}, kernel {kernel:?}"
            )),
        }
    });
    let kernel = mode_frontends(mode, &agent, ns).expect("frontends from the kernel");
    assert_eq!(
        kernel,
        ["10.96.6.11:80/TCP", "10.96.6.12:80/TCP"],
        "{mode:?}"
    );
    assert_eq!(sample(&after, frontends_metric), Some(2.0), "{mode:?}");
    tcp_request(
        &client.ns,
        SocketAddr::from((Ipv4Addr::new(10, 96, 6, 12), 80)),
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{mode:?}: the second service: {e}"));

    let (code, answer) = http_get(ns, metrics_addr, "/proxyMode").expect("proxyMode");
    assert_eq!((code, answer.trim()), (200, mode.mode()), "{mode:?}");
    drop(agent);
}

mod ebpf {
    #[test]
    fn kube_proxy_endpoints() {
        super::kube_proxy_endpoints(super::DataplaneMode::EbpfTc);
    }
}

mod iptables {
    #[test]
    fn kube_proxy_endpoints() {
        super::kube_proxy_endpoints(super::DataplaneMode::Iptables);
    }
}

mod nftables {
    #[test]
    fn kube_proxy_endpoints() {
        super::kube_proxy_endpoints(super::DataplaneMode::Nftables);
    }
}

/// /healthz: 200 with lastUpdated and currentTime while syncs succeed, 503
/// once the API server has been unreachable for longer than 2x the sync
/// period, 200 again when it is back. /livez stays 200 throughout.
#[test]
fn healthz_goes_stale_without_the_api_server_and_recovers() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("nodes");
    let agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: vec!["--sync-period".into(), "1s".into()],
            ..Default::default()
        },
    )
    .expect("agent");
    let ns = &cluster.node(1).ns;
    let healthz = SocketAddr::from((cluster.node(1).underlay_ip, 10256));
    let wait_for = |want: u16, within: Duration| {
        poll(within, || {
            let (code, body) = http_get(ns, healthz, "/healthz")?;
            (code == want)
                .then_some(body)
                .ok_or(format!("status {code}"))
        })
    };
    let body = wait_for(200, Duration::from_secs(10));
    let v: Value = serde_json::from_str(&body).expect("JSON body");
    assert!(
        v["lastUpdated"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{v}"
    );
    assert!(v["currentTime"].is_string(), "{v}");

    api.set_available(false);
    let down = Instant::now();
    wait_for(503, Duration::from_secs(15));
    let took = down.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "stale only after 2x the sync period ({took:?})"
    );
    let (code, _) = http_get(ns, healthz, "/livez").expect("livez");
    assert_eq!(code, 200, "livez ignores the API server");

    api.set_available(true);
    wait_for(200, Duration::from_secs(45));
    drop(agent);
}

/// proxyctl with nothing pinned: non-zero exit and one clear sentence.
#[test]
fn proxyctl_without_pins_says_so_in_one_sentence() {
    let dir = std::env::temp_dir().join(format!("proxy-tests-nopins-{}", std::process::id()));
    for cmd in [
        &["dump-maps"][..],
        &["services"],
        &["conntrack"],
        &["stats"],
        &["explain", "10.96.0.1:80/tcp"],
    ] {
        let out = Command::new(binary("proxyctl").expect("proxyctl built"))
            .arg("--bpffs-path")
            .arg(&dir)
            .args(cmd)
            .output()
            .expect("run proxyctl");
        assert!(!out.status.success(), "{cmd:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{cmd:?}: one line: {err:?}");
        assert!(
            err.contains("no maps are pinned at") && err.contains(&dir.display().to_string()),
            "{cmd:?}: {err:?}"
        );
        assert!(out.stdout.is_empty(), "{cmd:?} printed to stdout");
    }
}

/// A bad field produces one Warning Event naming the object, field and
/// value (not one per sync); the rest of the service is programmed.
#[test]
fn bad_object_produces_one_event() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let p12 = cluster.pod(1, 2);
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("nodes");
    let agent = Agent::start(cluster.node(1), &api, AgentOptions::default()).expect("agent");
    api.apply_yaml(
        r#"apiVersion: v1
kind: Service
metadata: {name: bad, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.7.1
  loadBalancerSourceRanges: ["not-a-cidr"]
  ports: [{port: 80, nodePort: 30170, protocol: TCP, targetPort: 8080}]
"#,
    )
    .expect("objects");
    let ours = |api: &ApiServer| -> Vec<Value> {
        api.list("Event")
            .into_iter()
            .filter(|e| e["involvedObject"]["name"] == "bad")
            .collect()
    };
    let events = poll(Duration::from_secs(10), || {
        let e = ours(&api);
        if e.is_empty() {
            Err("no Event yet".to_owned())
        } else {
            Ok(e)
        }
    });
    let e = &events[0];
    let msg = e["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("spec.loadBalancerSourceRanges[0]") && msg.contains("not-a-cidr"),
        "{e}"
    );
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "FailedToProgram");
    assert_eq!(e["involvedObject"]["kind"], "Service");
    assert_eq!(e["metadata"]["namespace"], "default");
    // The rest of the object is programmed.
    poll(Duration::from_secs(5), || {
        programmed(&agent)
            .contains_key("10.96.7.1:80/TCP")
            .then_some(())
            .ok_or("ClusterIP of the bad service not programmed".to_owned())
    });
    // More syncs (another object) do not repeat the Event.
    api.apply_yaml(&cluster_ip("other", "10.96.7.3", &[(p12.ip, "node1")]))
        .expect("other");
    poll(Duration::from_secs(5), || {
        programmed(&agent)
            .contains_key("10.96.7.3:80/TCP")
            .then_some(())
            .ok_or("other not programmed".to_owned())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ours(&api).len(), 1, "one Event per distinct problem");
    assert!(
        agent.log().contains("cannot program object"),
        "the log line too"
    );
}

/// Map pressure (`--bpf-lb-map-max 4`, six ClusterIP services): the four
/// that fit are programmed and answer, the other two are not programmed;
/// `/metrics` counts the refused inserts and shows the map's pressure at
/// 1; one log line and one Warning Event on the Node name the map, its
/// capacity and the flag (not one per retry); deleting two services lets
/// the other two in.
#[test]
fn map_pressure_full_map_keeps_serving_what_fits() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let (client, p12) = (cluster.pod(1, 1), cluster.pod(1, 2));
    let _server =
        TcpServer::start(&p12.ns, &p12.name, SocketAddr::from((p12.ip, 8080))).expect("server");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("nodes");
    let agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: vec!["--bpf-lb-map-max".into(), "4".into()],
            ..Default::default()
        },
    )
    .expect("agent");
    let vip = |i: u8| format!("10.96.8.{}", i + 1);
    let frontend = |i: u8| format!("{}:80/TCP", vip(i));
    for i in 0..6u8 {
        api.apply_yaml(&cluster_ip(
            &format!("web{i}"),
            &vip(i),
            &[(p12.ip, "node1")],
        ))
        .expect("service");
    }
    let reachable = |i: u8| {
        let to = SocketAddr::from((vip(i).parse::<Ipv4Addr>().expect("vip"), 80));
        tcp_request(&client.ns, to, TIMEOUT).is_ok()
    };
    // Four frontends fit; which four depends on the order the agent saw
    // the services in.
    let fits: Vec<u8> = poll(Duration::from_secs(15), || {
        let p = programmed(&agent);
        let fits: Vec<u8> = (0..6).filter(|i| p.contains_key(&frontend(*i))).collect();
        if fits.len() == 4 && api.list("Service").len() >= 6 {
            Ok(fits)
        } else {
            Err(format!("programmed: {:?}", p.keys().collect::<Vec<_>>()))
        }
    });
    for i in 0..6u8 {
        if fits.contains(&i) {
            poll(Duration::from_secs(5), || {
                reachable(i)
                    .then_some(())
                    .ok_or(format!("{} not reachable", frontend(i)))
            });
        } else {
            assert!(
                !reachable(i),
                "{} answers but is not programmed",
                frontend(i)
            );
        }
    }

    // The Warning on the Node: map, capacity, flag.
    let node_warnings = |api: &ApiServer| -> Vec<Value> {
        api.list("Event")
            .into_iter()
            .filter(|e| e["involvedObject"]["kind"] == "Node" && e["reason"] == "MapFull")
            .collect()
    };
    let events = poll(Duration::from_secs(10), || {
        let e = node_warnings(&api);
        (!e.is_empty())
            .then_some(e)
            .ok_or("no MapFull Event on the Node".to_owned())
    });
    let e = &events[0];
    let msg = e["message"].as_str().unwrap_or_default().to_owned();
    assert_eq!(e["type"], "Warning", "{e}");
    assert_eq!(e["involvedObject"]["name"], "node1", "{e}");
    assert!(
        msg.contains("is full (4 entries)") && msg.contains("raise --bpf-lb-map-max"),
        "{msg}"
    );
    // The map it names (the first insert a new frontend needs that a
    // full map refuses: SVC_STATS, REVNAT_V4 or SVC_V4).
    let full_map = msg
        .strip_prefix("eBPF map ")
        .and_then(|m| m.split(' ').next())
        .unwrap_or_default()
        .to_owned();

    // /metrics: the refused inserts and the pressure of the full map.
    let ns = &cluster.node(1).ns;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 10249));
    let m = poll(Duration::from_secs(10), || {
        let (code, body) = http_get(ns, metrics_addr, "/metrics")?;
        (code == 200)
            .then_some(body)
            .ok_or(format!("status {code}"))
    });
    let label = |metric: &str, map: &str| format!("kubeproxy_ebpf_{metric}{{map=\"{map}\"}}");
    let failures = sample(&m, &label("map_insert_failures_total", &full_map));
    assert!(
        failures.is_some_and(|n| n >= 1.0),
        "insert failures of {full_map}: {failures:?}\n{m}"
    );
    for map in [full_map.as_str(), "SVC_V4"] {
        let p = sample(&m, &label("map_pressure", map));
        assert_eq!(p, Some(1.0), "pressure of {map}\n{m}");
    }
    assert_eq!(
        sample(&m, &label("map_pressure", "SLOTS_V4")).map(|p| p < 0.01),
        Some(true),
        "a map with room\n{m}"
    );
    let warned = format!(
        "kubeproxy_ebpf_map_pressure_warnings_total{{map=\"{full_map}\",reason=\"MapFull\"}}"
    );
    assert_eq!(sample(&m, &warned), Some(1.0), "{m}");

    // Retries (a full sync every second) repeat neither the Event nor the
    // log line.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        node_warnings(&api).len(),
        1,
        "one Event while the map is full"
    );
    let line = "do not fit and are not programmed";
    assert_eq!(agent.log().matches(line).count(), 1, "one log line");

    // Room again: the two that did not fit are programmed.
    for i in fits.iter().take(2) {
        api.delete("Service", Some("default"), &format!("web{i}"))
            .expect("delete");
    }
    let waiting: Vec<u8> = (0..6).filter(|i| !fits.contains(i)).collect();
    poll(Duration::from_secs(15), || {
        let p = programmed(&agent);
        let missing: Vec<String> = waiting
            .iter()
            .map(|i| frontend(*i))
            .filter(|f| !p.contains_key(f))
            .collect();
        missing
            .is_empty()
            .then_some(())
            .ok_or(format!("not programmed yet: {missing:?}"))
    });
    for i in &waiting {
        poll(Duration::from_secs(5), || {
            reachable(*i)
                .then_some(())
                .ok_or(format!("{} not reachable", frontend(*i)))
        });
    }
    poll(Duration::from_secs(5), || {
        agent
            .log()
            .contains("has room again")
            .then_some(())
            .ok_or("no \"has room again\" line".to_owned())
    });
}

/// `--config`: the file's settings apply (healthz address, sync period, XDP
/// mode, JSON logs), a flag on the command line wins over the file, and a
/// kube-proxy field that does not apply is only warned about.
#[test]
fn config_file_flags_win_and_json_logs() {
    let cluster = Cluster::new(ClusterSpec::default()).expect("cluster");
    let api = ApiServer::start().expect("api");
    api.apply_yaml(&cluster.node_objects_yaml()).expect("nodes");
    let dir = std::env::temp_dir().join(format!("proxy-tests-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("kube-proxy.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ebpf
metricsBindAddress: 127.0.0.1:19249
healthzBindAddress: 127.0.0.1:19256
syncPeriod: 1s
iptables:
  masqueradeAll: false
kubeProxyEbpf:
  xdpMode: generic
  logFormat: json
"#,
    )
    .expect("write config");
    let mut agent = Agent::start(
        cluster.node(1),
        &api,
        AgentOptions {
            args: vec![
                "--config".into(),
                path.display().to_string(),
                "--metrics-bind-address".into(),
                "127.0.0.1:19250".into(),
            ],
            ..Default::default()
        },
    )
    .expect("agent");
    agent
        .wait_for_log("attached XDP", Duration::from_secs(10))
        .expect("XDP attached");
    let ns = &cluster.node(1).ns;
    let mode = poll(Duration::from_secs(10), || {
        http_get(ns, SocketAddr::from(([127, 0, 0, 1], 19250)), "/proxyMode")
    });
    assert_eq!(
        (mode.0, mode.1.trim()),
        (200, "ebpf"),
        "the flag's metrics address"
    );
    assert!(
        http_get(ns, SocketAddr::from(([127, 0, 0, 1], 19249)), "/proxyMode").is_err(),
        "the file's metrics address is overridden"
    );
    let (code, _) = poll(Duration::from_secs(10), || {
        http_get(ns, SocketAddr::from(([127, 0, 0, 1], 19256)), "/healthz").and_then(|r| {
            if r.0 == 200 {
                Ok(r)
            } else {
                Err(format!("status {}", r.0))
            }
        })
    });
    assert_eq!(code, 200, "the file's healthz address");
    // Every line is JSON; XDP went on in the file's mode; the n/a field was
    // warned about.
    let log = agent.log();
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "attached XDP" && l["fields"]["mode"] == "generic"),
        "XDP in generic mode:\n{log}"
    );
    assert!(
        lines.iter().any(|l| l["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("iptables does not apply"))),
        "warning for iptables:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bad --config stops the agent at once with one line naming the field
/// and value.
#[test]
fn bad_config_names_field_and_value() {
    let dir = std::env::temp_dir().join(format!("proxy-tests-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for (yaml, want) in [
        (
            "metricsBindAdress: 0.0.0.0:10249\n",
            "field metricsBindAdress = \"0.0.0.0:10249\": unknown field",
        ),
        (
            "kubeProxyEbpf:\n  xdpMode: turbo\n",
            "field kubeProxyEbpf.xdpMode = \"turbo\": must be one of native, generic, auto",
        ),
    ] {
        let path = dir.join("c.yaml");
        std::fs::write(
            &path,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{yaml}"
            ),
        )
        .expect("write");
        let out = Command::new(binary("proxy").expect("proxy built"))
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("run proxy");
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
