//! 1000 services created, updated and deleted through the API server
//! fixture: afterwards every map is back to its baseline entry count.

use std::time::{Duration, Instant};

use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::ApiServer,
    cluster::{Cluster, ClusterSpec},
};
use serde_json::{Value, json};

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
