//! An RBAC authorizer for the API server fixture, fed with the ClusterRole
//! shipped in `deploy/`, so the scenario tests prove that role is enough
//! for the agent (every request outside it is refused with 403 and fails
//! the test), and `tests/tests/rbac.rs` that each of its rules is needed.
//!
//! Rule matching follows Kubernetes' RBAC authorizer
//! (`plugin/pkg/auth/authorizer/rbac`): a resource request is allowed when
//! one rule matches its verb (or `*`), its API group (or `*`), its resource
//! (`*`, the plural, `plural/subresource`, or `*/subresource` for a
//! subresource request) and, when the rule lists `resourceNames`, its
//! object name. A request without a name (list, watch, create without a
//! `metadata.name` field selector) never matches a rule with
//! `resourceNames`. Rules are additive; there is no deny.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use serde_json::Value;

use crate::apiserver::{ApiServer, Authorizer, RequestAttributes};

/// Name of the agent's ClusterRole, ClusterRoleBinding and ServiceAccount
/// in `deploy/manifests/`.
pub const AGENT_NAME: &str = "kube-proxy-ebpf";

/// `deploy/` at the workspace root.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of one file, as JSON values (empty documents
/// skipped), with the file and document index in errors.
pub fn yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let v: Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("{}: document {i} is not valid YAML", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Every document of every `*.yaml` file directly in `dir`, sorted by file.
pub fn manifests_in(dir: &Path) -> Result<Vec<(PathBuf, Value)>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    let mut out = Vec::new();
    for f in files {
        for doc in yaml_documents(&f)? {
            out.push((f.clone(), doc));
        }
    }
    Ok(out)
}

/// The one object of `kind` named `name` among the agent's manifests
/// (`deploy/manifests/`).
pub fn agent_manifest(kind: &str, name: &str) -> Result<Value> {
    let dir = deploy_dir().join("manifests");
    let mut found: Vec<Value> = manifests_in(&dir)?
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("{}: expected one {kind} {name:?}, found {n}", dir.display()),
    }
}

/// The agent's ClusterRole from `deploy/manifests/`, after checking that
/// the ClusterRoleBinding there grants it to the agent's ServiceAccount.
pub fn deploy_cluster_role() -> Result<ClusterRole> {
    let role: ClusterRole = serde_json::from_value(agent_manifest("ClusterRole", AGENT_NAME)?)
        .context("deploy/ ClusterRole does not parse as rbac.authorization.k8s.io/v1")?;
    let binding: ClusterRoleBinding =
        serde_json::from_value(agent_manifest("ClusterRoleBinding", AGENT_NAME)?)
            .context("deploy/ ClusterRoleBinding does not parse")?;
    let sa = agent_manifest("ServiceAccount", AGENT_NAME)?;
    let sa_ns = sa["metadata"]["namespace"].as_str().unwrap_or("default");
    if binding.role_ref.kind != "ClusterRole" || binding.role_ref.name != AGENT_NAME {
        bail!(
            "ClusterRoleBinding {AGENT_NAME}: roleRef is {} {:?}, not ClusterRole {AGENT_NAME:?}",
            binding.role_ref.kind,
            binding.role_ref.name
        );
    }
    let bound = binding.subjects.iter().flatten().any(|s| {
        s.kind == "ServiceAccount" && s.name == AGENT_NAME && s.namespace.as_deref() == Some(sa_ns)
    });
    if !bound {
        bail!("ClusterRoleBinding {AGENT_NAME}: no subject is ServiceAccount {sa_ns}/{AGENT_NAME}");
    }
    Ok(role)
}

/// A set of RBAC rules (one role; bindings are checked when loading).
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    pub rules: Vec<PolicyRule>,
}

impl Rbac {
    pub fn new(rules: Vec<PolicyRule>) -> Rbac {
        Rbac { rules }
    }

    pub fn from_cluster_role(role: &ClusterRole) -> Rbac {
        Rbac::new(role.rules.clone().unwrap_or_default())
    }

    /// The agent's role from `deploy/`.
    pub fn from_deploy() -> Result<Rbac> {
        Ok(Rbac::from_cluster_role(&deploy_cluster_role()?))
    }

    /// Whether some rule allows the request.
    pub fn allows(&self, a: &RequestAttributes) -> bool {
        self.rules.iter().any(|r| rule_allows(r, a))
    }

    /// The rules as a fixture authorizer.
    pub fn authorizer(self) -> Authorizer {
        let rbac = Arc::new(self);
        Arc::new(move |a: &RequestAttributes| rbac.allows(a))
    }
}

fn rule_allows(rule: &PolicyRule, a: &RequestAttributes) -> bool {
    verb_matches(rule, &a.verb)
        && api_group_matches(rule, &a.api_group)
        && resource_matches(rule, &a.resource, a.subresource.as_deref())
        && resource_name_matches(rule, a.name.as_deref())
}

fn verb_matches(rule: &PolicyRule, verb: &str) -> bool {
    rule.verbs.iter().any(|v| v == "*" || v == verb)
}

fn api_group_matches(rule: &PolicyRule, group: &str) -> bool {
    rule.api_groups
        .iter()
        .flatten()
        .any(|g| g == "*" || g == group)
}

fn resource_matches(rule: &PolicyRule, resource: &str, subresource: Option<&str>) -> bool {
    let combined = match subresource {
        Some(sub) if !sub.is_empty() => format!("{resource}/{sub}"),
        _ => resource.to_owned(),
    };
    rule.resources.iter().flatten().any(|r| {
        if r == "*" || *r == combined {
            return true;
        }
        // `*/status` matches the status subresource of every resource.
        match (subresource, r.strip_prefix("*/")) {
            (Some(sub), Some(rule_sub)) => !sub.is_empty() && rule_sub == sub,
            _ => false,
        }
    })
}

fn resource_name_matches(rule: &PolicyRule, name: Option<&str>) -> bool {
    match rule.resource_names.as_deref() {
        None | Some([]) => true,
        Some(names) => name.is_some_and(|n| names.iter().any(|r| r == n)),
    }
}

/// Enforce `deploy/`'s ClusterRole on `api` unless the test installed its
/// own authorizer, and make any refused request fail the test when the
/// last handle of `api` is dropped. The harness calls this for every agent
/// it starts.
pub fn enforce_deploy_role(api: &ApiServer) -> Result<()> {
    if api.has_authorizer() {
        return Ok(());
    }
    api.set_authorizer(Some(Rbac::from_deploy()?.authorizer()));
    api.fail_on_denied(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str], names: &[&str]) -> PolicyRule {
        let v = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        PolicyRule {
            api_groups: Some(v(groups)),
            resources: Some(v(resources)),
            verbs: v(verbs),
            resource_names: (!names.is_empty()).then(|| v(names)),
            non_resource_urls: None,
        }
    }

    fn req(verb: &str, group: &str, resource: &str) -> RequestAttributes {
        RequestAttributes {
            verb: verb.into(),
            api_group: group.into(),
            api_version: "v1".into(),
            resource: resource.into(),
            subresource: None,
            namespace: None,
            name: None,
            token: None,
        }
    }

    fn with_sub(mut r: RequestAttributes, sub: &str) -> RequestAttributes {
        r.subresource = Some(sub.into());
        r
    }

    fn named(mut r: RequestAttributes, name: &str) -> RequestAttributes {
        r.name = Some(name.into());
        r
    }

    #[test]
    fn verbs_match_exactly_or_by_star() {
        let rbac = Rbac::new(vec![rule(&[""], &["services"], &["list", "watch"], &[])]);
        assert!(rbac.allows(&req("list", "", "services")));
        assert!(rbac.allows(&req("watch", "", "services")));
        assert!(!rbac.allows(&req("get", "", "services")));
        assert!(!rbac.allows(&req("create", "", "services")));
        let star = Rbac::new(vec![rule(&[""], &["services"], &["*"], &[])]);
        for verb in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            assert!(star.allows(&req(verb, "", "services")), "{verb}");
        }
    }

    #[test]
    fn api_group_must_match() {
        let rbac = Rbac::new(vec![rule(
            &["discovery.k8s.io"],
            &["endpointslices"],
            &["list"],
            &[],
        )]);
        assert!(rbac.allows(&req("list", "discovery.k8s.io", "endpointslices")));
        // Same plural in the core group is another resource.
        assert!(!rbac.allows(&req("list", "", "endpointslices")));
        let star = Rbac::new(vec![rule(&["*"], &["endpointslices"], &["list"], &[])]);
        assert!(star.allows(&req("list", "", "endpointslices")));
        assert!(star.allows(&req("list", "discovery.k8s.io", "endpointslices")));
        // No apiGroups at all matches nothing.
        let mut none = rule(&[], &["services"], &["list"], &[]);
        none.api_groups = None;
        assert!(!Rbac::new(vec![none]).allows(&req("list", "", "services")));
    }

    #[test]
    fn resources_and_subresources() {
        let rbac = Rbac::new(vec![rule(&[""], &["nodes"], &["get"], &[])]);
        assert!(rbac.allows(&req("get", "", "nodes")));
        assert!(!rbac.allows(&req("get", "", "services")));
        // A rule on the resource does not cover its subresources.
        assert!(!rbac.allows(&with_sub(req("get", "", "nodes"), "status")));
        let sub = Rbac::new(vec![rule(&[""], &["nodes/status"], &["get"], &[])]);
        assert!(sub.allows(&with_sub(req("get", "", "nodes"), "status")));
        assert!(!sub.allows(&req("get", "", "nodes")));
        assert!(!sub.allows(&with_sub(req("get", "", "nodes"), "proxy")));
        let any_status = Rbac::new(vec![rule(&[""], &["*/status"], &["get"], &[])]);
        assert!(any_status.allows(&with_sub(req("get", "", "nodes"), "status")));
        assert!(any_status.allows(&with_sub(req("get", "", "services"), "status")));
        assert!(!any_status.allows(&req("get", "", "nodes")));
        let star = Rbac::new(vec![rule(&[""], &["*"], &["get"], &[])]);
        assert!(star.allows(&req("get", "", "nodes")));
        assert!(star.allows(&with_sub(req("get", "", "nodes"), "status")));
    }

    #[test]
    fn resource_names_need_a_name() {
        let rbac = Rbac::new(vec![rule(&[""], &["nodes"], &["get", "list"], &["node1"])]);
        assert!(rbac.allows(&named(req("get", "", "nodes"), "node1")));
        assert!(!rbac.allows(&named(req("get", "", "nodes"), "node2")));
        // A list without a metadata.name field selector has no name.
        assert!(!rbac.allows(&req("list", "", "nodes")));
        assert!(rbac.allows(&named(req("list", "", "nodes"), "node1")));
        // An empty list means "any name", as in Kubernetes.
        let mut empty = rule(&[""], &["nodes"], &["list"], &[]);
        empty.resource_names = Some(Vec::new());
        assert!(Rbac::new(vec![empty]).allows(&req("list", "", "nodes")));
    }

    #[test]
    fn rules_add_up_and_nothing_is_allowed_by_default() {
        assert!(!Rbac::default().allows(&req("list", "", "services")));
        let rbac = Rbac::new(vec![
            rule(&[""], &["services"], &["list"], &[]),
            rule(&[""], &["services"], &["watch"], &[]),
        ]);
        assert!(rbac.allows(&req("list", "", "services")));
        assert!(rbac.allows(&req("watch", "", "services")));
        assert!(!rbac.allows(&req("get", "", "services")));
        // A rule with nonResourceURLs only never allows a resource request.
        let mut urls = rule(&[], &[], &["get"], &[]);
        urls.non_resource_urls = Some(vec!["*".into()]);
        assert!(!Rbac::new(vec![urls]).allows(&req("get", "", "services")));
    }

    /// Under enforcement, a request outside the role gets 403 and dropping
    /// the fixture's last handle fails the test.
    #[test]
    fn enforced_role_refuses_and_fails_loudly() -> Result<()> {
        use std::io::{Read, Write};
        let api = ApiServer::start()?;
        enforce_deploy_role(&api)?;
        let addr = api.serve_local()?;
        // `get` of one Service: the agent's role only lists and watches.
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(
            b"GET /api/v1/namespaces/default/services/web HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        let denied = api.denied_requests();
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert_eq!(
            (denied[0].verb.as_str(), denied[0].resource.as_str()),
            ("get", "services")
        );
        let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(api)));
        assert!(
            dropped.is_err(),
            "dropping the fixture did not fail the test"
        );
        Ok(())
    }

    #[test]
    fn deploy_role_allows_the_agents_reads_and_nothing_else() -> Result<()> {
        let rbac = Rbac::from_deploy()?;
        let reads = [
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "nodes"),
        ];
        for (group, res) in reads {
            for verb in ["list", "watch"] {
                assert!(rbac.allows(&req(verb, group, res)), "{verb} {res}");
            }
            for verb in ["get", "create", "update", "patch", "delete"] {
                assert!(!rbac.allows(&req(verb, group, res)), "{verb} {res}");
            }
        }
        assert!(!rbac.allows(&req("list", "", "pods")));
        assert!(!rbac.allows(&req("list", "", "secrets")));
        assert!(!rbac.allows(&req("list", "", "endpoints")));
        Ok(())
    }
}
