//! deploy/'s ClusterRole is minimal: the real agent, run against the API
//! server fixture enforcing the role with one rule (or one verb of a rule)
//! removed, is refused a request it needs, for every rule and verb in turn.
//! (That the whole role is enough is shown by every scenario test: the
//! harness enforces it on every agent, see `tests/src/rbac.rs`.)

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::rbac::v1::PolicyRule;
use proxy_tests::{
    agent::{Agent, AgentOptions},
    apiserver::{ApiServer, RequestAttributes},
    cluster::{Cluster, ClusterSpec},
    rbac::{Rbac, deploy_cluster_role},
};
use serde_json::json;

/// One variant of the role and what the agent must then be refused.
struct Variant {
    label: String,
    rules: Vec<PolicyRule>,
    /// (verb, api group, resource) that the removed part allowed.
    removed: Vec<(String, String, String)>,
    whole_rule: bool,
}

fn describe(r: &PolicyRule) -> String {
    format!(
        "apiGroups {:?} resources {:?} verbs {:?}",
        r.api_groups.as_deref().unwrap_or_default(),
        r.resources.as_deref().unwrap_or_default(),
        r.verbs
    )
}

fn grants(r: &PolicyRule, verbs: &[String]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for g in r.api_groups.iter().flatten() {
        for res in r.resources.iter().flatten() {
            for v in verbs {
                out.push((v.clone(), g.clone(), res.clone()));
            }
        }
    }
    out
}

fn variants(rules: &[PolicyRule]) -> Vec<Variant> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let mut without = rules.to_vec();
        without.remove(i);
        out.push(Variant {
            label: format!("without rule {i} ({})", describe(rule)),
            rules: without,
            removed: grants(rule, &rule.verbs),
            whole_rule: true,
        });
        if rule.verbs.len() > 1 {
            for (j, verb) in rule.verbs.iter().enumerate() {
                let mut fewer = rules.to_vec();
                fewer[i].verbs.remove(j);
                out.push(Variant {
                    label: format!("rule {i} without verb {verb:?} ({})", describe(rule)),
                    rules: fewer,
                    removed: grants(rule, std::slice::from_ref(verb)),
                    whole_rule: false,
                });
            }
        }
    }
    out
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn matches(d: &RequestAttributes, (verb, group, res): &(String, String, String)) -> bool {
    d.verb == *verb && d.api_group == *group && d.resource == *res
}

/// A one-node cluster and a fixture holding its Node and a service the
/// agent cannot program (a port protocol it does not know): the agent
/// reports that with an Event, which the role must allow.
fn one_node_with_a_bad_service() -> Result<(Cluster, ApiServer)> {
    let cluster = Cluster::new(ClusterSpec {
        nodes: 1,
        pods_per_node: 0,
        external_client: false,
    })
    .context("cluster")?;
    let node = cluster.node(1);
    let api = ApiServer::start()?;
    api.create(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.77.1", "clusterIPs": ["10.96.77.1"],
                 "ports": [{"name": "x", "port": 80, "protocol": "ICMP", "targetPort": 80}]},
    }))?;
    api.create(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name},
        "status": {"addresses": [
            {"type": "InternalIP", "address": node.underlay_ip.to_string()},
        ]},
    }))?;
    Ok((cluster, api))
}

#[test]
fn removing_any_rule_or_verb_of_the_deploy_role_breaks_the_agent() -> Result<()> {
    let role = deploy_cluster_role()?;
    let rules = role.rules.clone().unwrap_or_default();
    if rules.is_empty() {
        bail!("deploy/'s ClusterRole has no rules");
    }
    let (cluster, api) = one_node_with_a_bad_service()?;
    let node = cluster.node(1);

    // The whole role: the agent syncs, watches all three kinds, and is
    // refused nothing.
    api.set_authorizer(Some(Rbac::new(rules.clone()).authorizer()));
    {
        let _agent = Agent::start(node, &api, AgentOptions::default())?;
        let watching = wait_for(Duration::from_secs(20), || {
            let reqs = api.requests();
            let all = ["/services?", "/endpointslices?", "/nodes?"]
                .iter()
                .all(|p| {
                    reqs.iter().any(|r| {
                        r.path.contains(p) && r.path.contains("watch=true") && r.status == 200
                    })
                });
            let event = reqs
                .iter()
                .any(|r| r.method == "POST" && r.path.contains("/events") && r.status == 201);
            (all && event).then_some(())
        });
        if watching.is_none() {
            bail!(
                "with the whole role the agent did not watch all three kinds and post an Event: {:#?}",
                api.requests()
            );
        }
        let denied = api.take_denied_requests();
        assert!(denied.is_empty(), "whole role, denied: {denied:#?}");
    }

    let all = variants(&rules);
    for v in &all {
        api.set_authorizer(Some(Rbac::new(v.rules.clone()).authorizer()));
        api.take_denied_requests();
        let mut agent = Agent::start(
            node,
            &api,
            AgentOptions {
                ready_line: None,
                ..Default::default()
            },
        )?;
        let denied = wait_for(Duration::from_secs(20), || {
            let d = api.denied_requests();
            d.iter()
                .any(|d| v.removed.iter().any(|r| matches(d, r)))
                .then_some(d)
        });
        let Some(denied) = denied else {
            bail!(
                "{}: the agent was never refused {:?}; denied: {:#?}\nagent log:\n{}",
                v.label,
                v.removed,
                api.denied_requests(),
                agent.log()
            );
        };
        if v.whole_rule && v.removed.iter().any(|(verb, _, _)| verb == "list") {
            // Its first list of that kind failed, so its caches never sync
            // (the watcher keeps retrying into the same 403).
            std::thread::sleep(Duration::from_secs(1));
            assert!(
                !agent.log().contains("caches synced"),
                "{}: the agent synced without the rule:\n{}",
                v.label,
                agent.log()
            );
        }
        agent.stop()?;
        drop(agent);
        api.take_denied_requests();
        eprintln!(
            "{}: refused {}",
            v.label,
            denied
                .iter()
                .map(|d| format!("{} {}/{}", d.verb, d.api_group, d.resource))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!("{} variants of the role, each refused", all.len());
    Ok(())
}

/// Agents started by the harness run under deploy/'s role without the test
/// asking for it: a request outside the role is refused.
#[test]
fn the_harness_enforces_the_deploy_role_on_its_agents() -> Result<()> {
    use std::io::{Read, Write};
    let (cluster, api) = one_node_with_a_bad_service()?;
    let node = cluster.node(1);
    assert!(!api.has_authorizer());
    let agent = Agent::start(node, &api, AgentOptions::default())?;
    assert!(api.has_authorizer(), "Agent::start installed no authorizer");
    assert!(
        api.denied_requests().is_empty(),
        "{:#?}",
        api.denied_requests()
    );
    // Outside the role: `get` of one Node (the agent only lists/watches).
    let addr = api.serve_local()?;
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /api/v1/nodes/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        node.name
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    // Taken, so dropping the fixture does not fail this test.
    let denied = api.take_denied_requests();
    assert_eq!(denied.len(), 1, "{denied:#?}");
    drop(agent);
    Ok(())
}
