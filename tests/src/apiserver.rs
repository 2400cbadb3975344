//! An in-process Kubernetes API server fixture.
//!
//! [`ApiServer`] speaks the real Kubernetes REST protocol (JSON only) for
//! three resources, which is enough for a node agent built with kube-rs
//! (`kube::runtime::watcher` + reflector) and for `kubectl get`:
//!
//! * Services (`/api/v1/services`, `/api/v1/namespaces/{ns}/services[/{name}]`)
//! * EndpointSlices (`/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices[/{name}]`)
//! * Nodes (`/api/v1/nodes[/{name}]`)
//!
//! Supported: LIST (label and field selectors, `limit`/`continue`), WATCH
//! (history replay from a resourceVersion, selector transitions reported as
//! ADDED/DELETED, bookmarks, `sendInitialEvents`, `timeoutSeconds`, 410 Gone
//! after [`ApiServer::compact`]), GET, POST, PUT (optimistic concurrency),
//! PATCH (JSON merge patch; strategic merge patch is treated as a merge patch)
//! and DELETE, plus the discovery documents kubectl needs. Errors are
//! `kind: Status` bodies.
//!
//! The server owns its tokio runtime, so tests drive it with plain
//! synchronous calls.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// Events kept for watch resumption before the oldest ones are dropped
/// (as if etcd had compacted them).
const MAX_HISTORY: usize = 100_000;
/// Request records kept by [`ApiServer::requests`].
const MAX_REQUEST_RECORDS: usize = 100_000;
/// Kubernetes version reported by `/version`.
const VERSION_MAJOR: &str = "1";
const VERSION_MINOR: &str = "33";

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One HTTP request served by the fixture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Path including the query string, exactly as sent by the client.
    pub path: String,
    /// HTTP status code of the response (200 for watches that started).
    pub status: u16,
}

/// What a resource request wants to do, as seen by an authorizer (the same
/// attributes Kubernetes RBAC works on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAttributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: String,
    /// API group: `""` for core, `discovery.k8s.io` for EndpointSlices.
    pub api_group: String,
    /// API version, always `v1` here.
    pub api_version: String,
    /// Plural resource name: `services`, `endpointslices`, `nodes`.
    pub resource: String,
    /// Subresource (`status`, ...); the fixture serves none, so `None`.
    pub subresource: Option<String>,
    /// Namespace of the request, if namespaced.
    pub namespace: Option<String>,
    /// Object name; for list/watch it comes from a `metadata.name=` field
    /// selector, as in the real API server.
    pub name: Option<String>,
    /// Bearer token presented by the client, if any.
    pub token: Option<String>,
}

/// Authorization hook: return `false` to deny (403 Forbidden).
pub type Authorizer = Arc<dyn Fn(&RequestAttributes) -> bool + Send + Sync>;

/// An API error, carried as a Kubernetes `Status`.
///
/// Errors returned by [`ApiServer`] methods wrap this type; use
/// `err.downcast_ref::<ApiError>()` to inspect the code.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{reason} ({code}): {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Kubernetes `StatusReason`, e.g. `NotFound`, `Conflict`.
    pub reason: String,
    /// Human readable message.
    pub message: String,
    /// `details` of the Status (name/group/kind), if any.
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_owned(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, res: Res, name: &str) -> Self {
        self.details = Some(json!({
            "name": name,
            "group": res.group(),
            "kind": res.plural(),
        }));
        self
    }

    fn not_found(res: Res, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{}{} \"{name}\" not found", res.plural(), res.dot_group()),
        )
        .with_details(res, name)
    }

    fn path_not_found() -> Self {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    fn already_exists(res: Res, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!(
                "{}{} \"{name}\" already exists",
                res.plural(),
                res.dot_group()
            ),
        )
        .with_details(res, name)
    }

    fn conflict(res: Res, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {}{} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again",
                res.plural(),
                res.dot_group()
            ),
        )
        .with_details(res, name)
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    fn invalid(res: Res, name: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {message}", res.kind()),
        )
        .with_details(res, name)
    }

    fn expired(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    fn unavailable() -> Self {
        ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        )
    }

    fn method_not_allowed() -> Self {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    fn unsupported_media_type(ct: &str) -> Self {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/merge-patch+json, application/strategic-merge-patch+json (got {ct:?})"
            ),
        )
    }

    fn forbidden(attrs: &RequestAttributes) -> Self {
        let user = attrs.token.as_deref().unwrap_or("system:anonymous");
        let what = match &attrs.name {
            Some(name) => format!("{} \"{name}\"", attrs.resource),
            None => attrs.resource.clone(),
        };
        let scope = match &attrs.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        let mut e = ApiError::new(
            403,
            "Forbidden",
            format!(
                "{what} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
                attrs.verb, attrs.resource, attrs.api_group
            ),
        );
        e.details = Some(json!({
            "name": attrs.name.clone().unwrap_or_default(),
            "group": attrs.api_group,
            "kind": attrs.resource,
        }));
        e
    }

    /// The error as a Kubernetes `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(map)) = (&self.details, status.as_object_mut()) {
            map.insert("details".to_owned(), details.clone());
        }
        status
    }
}

// ---------------------------------------------------------------------------
// Resource table
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Res {
    Service,
    EndpointSlice,
    Node,
    /// core/v1 Events (what the agent posts about objects it cannot program).
    Event,
}

impl Res {
    const ALL: [Res; 4] = [Res::Service, Res::EndpointSlice, Res::Node, Res::Event];

    fn kind(self) -> &'static str {
        match self {
            Res::Service => "Service",
            Res::EndpointSlice => "EndpointSlice",
            Res::Node => "Node",
            Res::Event => "Event",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Res::Service => "ServiceList",
            Res::EndpointSlice => "EndpointSliceList",
            Res::Node => "NodeList",
            Res::Event => "EventList",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Res::Service | Res::Node | Res::Event => "",
            Res::EndpointSlice => "discovery.k8s.io",
        }
    }

    /// `.group` suffix used in messages (`endpointslices.discovery.k8s.io`).
    fn dot_group(self) -> String {
        match self.group() {
            "" => String::new(),
            g => format!(".{g}"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Res::Service | Res::Node | Res::Event => "v1",
            Res::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Res::Service => "services",
            Res::EndpointSlice => "endpointslices",
            Res::Node => "nodes",
            Res::Event => "events",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Res::Service => "service",
            Res::EndpointSlice => "endpointslice",
            Res::Node => "node",
            Res::Event => "event",
        }
    }

    fn short_names(self) -> &'static [&'static str] {
        match self {
            Res::Service => &["svc"],
            Res::EndpointSlice => &[],
            Res::Node => &["no"],
            Res::Event => &["ev"],
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Res::Node)
    }

    /// Resolve a kind given by a caller: kind, plural, singular or short name
    /// (case-insensitive).
    fn from_name(name: &str) -> Option<Res> {
        let lower = name.to_ascii_lowercase();
        Res::ALL.into_iter().find(|r| {
            r.kind().eq_ignore_ascii_case(&lower)
                || r.plural() == lower
                || r.singular() == lower
                || r.short_names().contains(&lower.as_str())
        })
    }

    fn from_path(group: &str, plural: &str) -> Option<Res> {
        Res::ALL
            .into_iter()
            .find(|r| r.group() == group && r.plural() == plural)
    }

    fn parse(kind: &str) -> Result<Res, ApiError> {
        Res::from_name(kind).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unsupported kind {kind:?} (supported: Service, EndpointSlice, Node, Event)"
            ))
        })
    }
}

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelReq {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
        }
    }
}

/// Split on `sep` outside parentheses.
fn split_top_level(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            c if c == sep && depth == 0 => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_label_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 316
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut reqs = Vec::new();
    if s.trim().is_empty() {
        return Ok(reqs);
    }
    for term in split_top_level(s, ',') {
        let t = term.trim();
        if t.is_empty() {
            return Err(format!("unable to parse requirement: empty term in {s:?}"));
        }
        let bad = || format!("unable to parse requirement: {t:?}");
        if let Some(key) = t.strip_prefix('!') {
            let key = key.trim();
            if !valid_label_token(key) {
                return Err(bad());
            }
            reqs.push(LabelReq::NotExists(key.to_owned()));
        } else if let Some(open) = t.find('(') {
            let inner = t[open + 1..].strip_suffix(')').ok_or_else(bad)?;
            let words: Vec<&str> = t[..open].split_whitespace().collect();
            let [key, op] = words.as_slice() else {
                return Err(bad());
            };
            if !valid_label_token(key) {
                return Err(bad());
            }
            let mut values = Vec::new();
            for v in inner.split(',') {
                let v = v.trim();
                if !valid_label_value(v) {
                    return Err(bad());
                }
                values.push(v.to_owned());
            }
            match *op {
                "in" => reqs.push(LabelReq::In((*key).to_owned(), values)),
                "notin" => reqs.push(LabelReq::NotIn((*key).to_owned(), values)),
                _ => return Err(bad()),
            }
        } else if let Some((k, v)) = t.split_once("!=") {
            let (k, v) = (k.trim(), v.trim());
            if !valid_label_token(k) || !valid_label_value(v) {
                return Err(bad());
            }
            reqs.push(LabelReq::NotEquals(k.to_owned(), v.to_owned()));
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_label_token(k) || !valid_label_value(v) {
                return Err(bad());
            }
            reqs.push(LabelReq::Equals(k.to_owned(), v.to_owned()));
        } else {
            if !valid_label_token(t) {
                return Err(bad());
            }
            reqs.push(LabelReq::Exists(t.to_owned()));
        }
    }
    Ok(reqs)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

impl FieldReq {
    fn matches(&self, obj: &Value) -> bool {
        let mut cur = Some(obj);
        for part in self.path.split('.') {
            cur = cur.and_then(|v| v.get(part));
        }
        let actual = match cur {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        (actual == self.value) != self.negate
    }
}

fn parse_field_selector(s: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    if s.trim().is_empty() {
        return Ok(reqs);
    }
    for term in s.split(',') {
        let t = term.trim();
        let (path, value, negate) = if let Some((k, v)) = t.split_once("!=") {
            (k, v, true)
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            (k, v, false)
        } else {
            return Err(format!("invalid selector: {t:?}; can't understand"));
        };
        let path = path.trim();
        if path.is_empty() {
            return Err(format!("invalid field selector term {t:?}"));
        }
        reqs.push(FieldReq {
            path: path.to_owned(),
            value: value.trim().to_owned(),
            negate,
        });
    }
    Ok(reqs)
}

/// Which objects a list or watch wants.
#[derive(Clone, Debug, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    /// No label or field selector (a namespace may be given).
    fn has_no_selector(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj.pointer("/metadata/namespace").and_then(Value::as_str) != Some(ns.as_str())
        {
            return false;
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        self.labels.iter().all(|r| r.matches(labels)) && self.fields.iter().all(|r| r.matches(obj))
    }
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

type Key = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
struct StoredEvent {
    rv: u64,
    res: Res,
    typ: EventType,
    /// New state; for deletions the last state stamped with the deletion RV.
    object: Value,
    /// State before the change (modifications and deletions).
    prev: Option<Value>,
}

struct Subscriber {
    id: u64,
    res: Res,
    tx: mpsc::UnboundedSender<Arc<StoredEvent>>,
}

struct State {
    rv: u64,
    objects: BTreeMap<Res, BTreeMap<Key, Value>>,
    history: VecDeque<Arc<StoredEvent>>,
    /// Events with rv <= this are forgotten.
    compacted_rv: u64,
    subscribers: Vec<Subscriber>,
    next_subscriber: u64,
    seed: u64,
    counter: u64,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn set_meta(obj: &mut Value, key: &str, value: Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(key.to_owned(), value);
    }
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(key))
        .and_then(Value::as_str)
}

/// Everything but metadata and status (what `generation` tracks).
fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

impl State {
    fn new() -> State {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id()).rotate_left(32);
        State {
            // Start above zero: "0" means "any" to clients.
            rv: 1,
            objects: Res::ALL.into_iter().map(|r| (r, BTreeMap::new())).collect(),
            history: VecDeque::new(),
            compacted_rv: 1,
            subscribers: Vec::new(),
            next_subscriber: 1,
            seed,
            counter: 0,
        }
    }

    fn random(&mut self) -> u64 {
        self.counter += 1;
        splitmix64(self.seed ^ self.counter.wrapping_mul(0x2545_F491_4F6C_DD1D))
    }

    fn uid(&mut self) -> String {
        let a = self.random();
        let b = self.random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    fn bucket(&self, res: Res) -> Option<&BTreeMap<Key, Value>> {
        self.objects.get(&res)
    }

    fn bucket_mut(&mut self, res: Res) -> &mut BTreeMap<Key, Value> {
        self.objects.entry(res).or_default()
    }

    fn get(&self, res: Res, key: &Key) -> Option<&Value> {
        self.bucket(res).and_then(|b| b.get(key))
    }

    fn emit(&mut self, res: Res, typ: EventType, object: Value, prev: Option<Value>) {
        let ev = Arc::new(StoredEvent {
            rv: self.rv,
            res,
            typ,
            object,
            prev,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        self.subscribers
            .retain(|s| s.res != res || s.tx.send(ev.clone()).is_ok());
    }

    /// Validate kind/apiVersion, default the namespace. Returns the object
    /// and its namespace key ("" for cluster-scoped kinds).
    fn normalize(
        res: Res,
        mut obj: Value,
        path_ns: Option<&str>,
    ) -> Result<(Value, String), ApiError> {
        let map = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the object must be a JSON object"))?;
        match map.get("kind") {
            None | Some(Value::Null) => {}
            Some(Value::String(k)) if k.is_empty() || k == res.kind() => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "kind {other} does not match the resource {}",
                    res.plural()
                )));
            }
        }
        match map.get("apiVersion") {
            None | Some(Value::Null) => {}
            Some(Value::String(v)) if v.is_empty() || v == res.api_version() => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "apiVersion {other} does not match {} (expected {})",
                    res.kind(),
                    res.api_version()
                )));
            }
        }
        map.insert("kind".to_owned(), Value::from(res.kind()));
        map.insert("apiVersion".to_owned(), Value::from(res.api_version()));
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if meta.is_null() {
            *meta = Value::Object(Map::new());
        }
        let meta = meta
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        let ns = if res.namespaced() {
            let body_ns = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned);
            let ns = match (body_ns, path_ns) {
                (Some(b), Some(p)) if b != p => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(b), _) => b,
                (None, Some(p)) => p.to_owned(),
                (None, None) => "default".to_owned(),
            };
            meta.insert("namespace".to_owned(), Value::from(ns.clone()));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        Ok((obj, ns))
    }

    fn create(&mut self, res: Res, obj: Value, path_ns: Option<&str>) -> Result<Value, ApiError> {
        let (mut obj, ns) = State::normalize(res, obj, path_ns)?;
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_owned();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName")
                .unwrap_or_default()
                .to_owned();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    res,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            loop {
                let mut r = self.random();
                let mut candidate = prefix.clone();
                for _ in 0..5 {
                    candidate.push(char::from(ALPHABET[(r % ALPHABET.len() as u64) as usize]));
                    r /= ALPHABET.len() as u64;
                }
                if self.get(res, &(ns.clone(), candidate.clone())).is_none() {
                    name = candidate;
                    break;
                }
            }
            set_meta(&mut obj, "name", Value::from(name.clone()));
        }
        let key = (ns, name.clone());
        if self.get(res, &key).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        self.rv += 1;
        let uid = self.uid();
        set_meta(&mut obj, "uid", Value::from(uid));
        set_meta(&mut obj, "creationTimestamp", Value::from(now_rfc3339()));
        set_meta(&mut obj, "generation", Value::from(1));
        set_meta(
            &mut obj,
            "resourceVersion",
            Value::from(self.rv.to_string()),
        );
        self.bucket_mut(res).insert(key, obj.clone());
        self.emit(res, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    /// Replace an object. `expected` is the (namespace, name) of the URL, if
    /// any; the body must agree with it.
    fn update(
        &mut self,
        res: Res,
        obj: Value,
        expected: Option<&Key>,
        precondition_required: bool,
    ) -> Result<Value, ApiError> {
        let path_ns = expected
            .map(|(ns, _)| ns.as_str())
            .filter(|s| !s.is_empty());
        let (mut obj, ns) = State::normalize(res, obj, path_ns)?;
        let name = meta_str(&obj, "name").unwrap_or_default().to_owned();
        if name.is_empty() {
            return Err(ApiError::invalid(
                res,
                "",
                "metadata.name: Required value: name is required",
            ));
        }
        if let Some((_, url_name)) = expected
            && *url_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name on the URL ({url_name})"
            )));
        }
        let key = (ns, name.clone());
        let existing = self
            .get(res, &key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, &name))?;
        let current_rv = meta_str(&existing, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        match meta_str(&obj, "resourceVersion") {
            Some(rv) if !rv.is_empty() && rv != current_rv => {
                return Err(ApiError::conflict(res, &name));
            }
            None | Some("") if precondition_required => {
                return Err(ApiError::invalid(
                    res,
                    &name,
                    "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                ));
            }
            _ => {}
        }
        for k in ["uid", "creationTimestamp"] {
            if let Some(v) = existing.get("metadata").and_then(|m| m.get(k)) {
                set_meta(&mut obj, k, v.clone());
            }
        }
        let mut generation = existing
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if spec_part(&obj) != spec_part(&existing) {
            generation += 1;
        }
        set_meta(&mut obj, "generation", Value::from(generation));
        set_meta(&mut obj, "resourceVersion", Value::from(current_rv));
        if obj == existing {
            // No-op updates neither bump the resourceVersion nor emit events.
            return Ok(existing);
        }
        self.rv += 1;
        set_meta(
            &mut obj,
            "resourceVersion",
            Value::from(self.rv.to_string()),
        );
        self.bucket_mut(res).insert(key, obj.clone());
        self.emit(res, EventType::Modified, obj.clone(), Some(existing));
        Ok(obj)
    }

    fn delete(&mut self, res: Res, key: &Key) -> Result<Value, ApiError> {
        let existing = self
            .bucket_mut(res)
            .remove(key)
            .ok_or_else(|| ApiError::not_found(res, &key.1))?;
        self.rv += 1;
        let mut obj = existing.clone();
        set_meta(
            &mut obj,
            "resourceVersion",
            Value::from(self.rv.to_string()),
        );
        self.emit(res, EventType::Deleted, obj.clone(), Some(existing));
        Ok(obj)
    }

    fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }
}

fn key_for(res: Res, namespace: Option<&str>, name: &str) -> Key {
    let ns = if res.namespaced() {
        namespace.filter(|s| !s.is_empty()).unwrap_or("default")
    } else {
        ""
    };
    (ns.to_owned(), name.to_owned())
}

/// JSON merge patch (RFC 7386). Strategic-merge directives (`$patch`,
/// `$setElementOrder/...`, ...) are dropped; lists are replaced.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if k.starts_with('$') {
                continue;
            }
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared server state
// ---------------------------------------------------------------------------

struct Shared {
    state: Mutex<State>,
    available: AtomicBool,
    bookmark_interval_ms: AtomicU64,
    authorizer: RwLock<Option<Authorizer>>,
    requests: Mutex<VecDeque<RequestRecord>>,
    /// Requests the authorizer refused, oldest first.
    denied: Mutex<Vec<RequestAttributes>>,
    /// Panic when the last handle is dropped if `denied` is not empty.
    fail_on_denied: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn bookmark_interval(&self) -> Duration {
        Duration::from_millis(self.bookmark_interval_ms.load(Ordering::Relaxed).max(1))
    }

    fn record(&self, method: &Method, path: String, status: u16) {
        let mut reqs = lock(&self.requests);
        reqs.push_back(RequestRecord {
            method: method.as_str().to_owned(),
            path,
            status,
        });
        while reqs.len() > MAX_REQUEST_RECORDS {
            reqs.pop_front();
        }
    }
}

/// Shuts the runtime down without blocking when the last handle goes away.
struct RuntimeOwner(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeOwner {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Fails the test (panics) when the last [`ApiServer`] handle goes away
/// with denied requests recorded while [`ApiServer::fail_on_denied`] is on.
struct DeniedCheck(Arc<Shared>);

impl Drop for DeniedCheck {
    fn drop(&mut self) {
        if !self.0.fail_on_denied.load(Ordering::Relaxed) || std::thread::panicking() {
            return;
        }
        let denied = lock(&self.0.denied);
        if !denied.is_empty() {
            panic!(
                "the API server fixture denied {} request(s) the authorizer (deploy/'s ClusterRole) does not allow: {:#?}",
                denied.len(),
                *denied
            );
        }
    }
}

/// The API server fixture. Cheap to clone; the server (and its runtime) stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    _runtime: Arc<RuntimeOwner>,
    _denied_check: Arc<DeniedCheck>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("resource_version", &self.resource_version())
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Create the fixture with its own multi-threaded runtime. Nothing is
    /// served until [`serve`](Self::serve) or [`serve_local`](Self::serve_local).
    pub fn start() -> anyhow::Result<ApiServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fixture-apiserver")
            .enable_all()
            .build()
            .context("building the API server fixture runtime")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            available: AtomicBool::new(true),
            bookmark_interval_ms: AtomicU64::new(1000),
            authorizer: RwLock::new(None),
            requests: Mutex::new(VecDeque::new()),
            denied: Mutex::new(Vec::new()),
            fail_on_denied: AtomicBool::new(false),
        });
        Ok(ApiServer {
            _denied_check: Arc::new(DeniedCheck(shared.clone())),
            shared,
            handle: rt.handle().clone(),
            _runtime: Arc::new(RuntimeOwner(Some(rt))),
        })
    }

    /// Serve on an already-bound listener (possibly bound inside another
    /// network namespace, which is then the namespace served). Can be called
    /// several times. Returns the listener's address.
    pub fn serve(&self, listener: StdTcpListener) -> anyhow::Result<SocketAddr> {
        listener
            .set_nonblocking(true)
            .context("setting the listener non-blocking")?;
        let addr = listener.local_addr().context("listener address")?;
        let listener = {
            let _guard = self.handle.enter();
            tokio::net::TcpListener::from_std(listener)
                .context("registering the listener with the runtime")?
        };
        let app = axum::Router::new()
            .fallback(handle_request)
            .with_state(self.shared.clone());
        self.handle.spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(%addr, error = %e, "fixture API server stopped");
            }
        });
        tracing::debug!(%addr, "fixture API server listening");
        Ok(addr)
    }

    /// Bind `127.0.0.1:0` in the current network namespace and serve.
    pub fn serve_local(&self) -> anyhow::Result<SocketAddr> {
        let listener = StdTcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        self.serve(listener)
    }

    /// Apply multi-document YAML (a `kind: List` document is expanded):
    /// create each object, or replace it if it exists. Replacing with
    /// identical content is a no-op (no event), as in Kubernetes.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<Value>> {
        let mut docs = Vec::new();
        for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
            let value: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing YAML document {i}"))?;
            match value {
                Value::Null => {}
                Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                    let items = m.get("items").and_then(Value::as_array).cloned();
                    docs.extend(items.unwrap_or_default());
                }
                other => docs.push(other),
            }
        }
        let mut out = Vec::with_capacity(docs.len());
        for (i, obj) in docs.into_iter().enumerate() {
            let kind = obj
                .get("kind")
                .and_then(Value::as_str)
                .with_context(|| format!("YAML object {i} has no kind"))?
                .to_owned();
            let res = Res::parse(&kind)?;
            let mut st = self.shared.state();
            let (obj, ns) = State::normalize(res, obj, None)?;
            let name = meta_str(&obj, "name").unwrap_or_default().to_owned();
            let stored = if !name.is_empty() && st.get(res, &(ns, name)).is_some() {
                let mut obj = obj;
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
                st.update(res, obj, None, false)
            } else {
                st.create(res, obj, None)
            }
            .with_context(|| format!("applying YAML object {i} ({kind})"))?;
            out.push(stored);
        }
        Ok(out)
    }

    /// Create an object (its `kind` says which resource). Emits ADDED.
    pub fn create(&self, obj: Value) -> anyhow::Result<Value> {
        let res = res_of(&obj)?;
        Ok(self.shared.state().create(res, obj, None)?)
    }

    /// Replace an existing object. A non-empty `metadata.resourceVersion`
    /// must be current (else Conflict). Emits MODIFIED unless nothing changed.
    pub fn update(&self, obj: Value) -> anyhow::Result<Value> {
        let res = res_of(&obj)?;
        Ok(self.shared.state().update(res, obj, None, false)?)
    }

    /// Delete an object, returning its last state. Emits DELETED.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> anyhow::Result<Value> {
        let res = Res::parse(kind)?;
        Ok(self
            .shared
            .state()
            .delete(res, &key_for(res, namespace, name))?)
    }

    /// Get an object (namespace defaults to `default`; ignored for Nodes).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let res = Res::from_name(kind)?;
        self.shared
            .state()
            .get(res, &key_for(res, namespace, name))
            .cloned()
    }

    /// All objects of a kind, sorted by namespace/name (empty for unknown kinds).
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Some(res) = Res::from_name(kind) else {
            tracing::warn!(kind, "list of unsupported kind");
            return Vec::new();
        };
        self.shared
            .state()
            .bucket(res)
            .map(|b| b.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Read-modify-write an object atomically. Emits MODIFIED unless the
    /// closure changed nothing.
    pub fn modify(
        &self,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> anyhow::Result<Value> {
        let res = Res::parse(kind)?;
        let key = key_for(res, namespace, name);
        let mut st = self.shared.state();
        let mut obj = st
            .get(res, &key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))?;
        f(&mut obj);
        Ok(st.update(res, obj, Some(&key), false)?)
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Forget the event history: watches resuming from an older
    /// resourceVersion get `410 Gone` (Expired). Open watches are unaffected.
    pub fn compact(&self) {
        self.shared.state().compact();
    }

    /// Simulate an outage. While unavailable every request gets
    /// `503 ServiceUnavailable` and open watch streams are ended. State is kept.
    pub fn set_available(&self, up: bool) {
        self.shared.available.store(up, Ordering::SeqCst);
        if !up {
            // Dropping the senders ends every watch stream.
            self.shared.state().subscribers.clear();
        }
    }

    /// Simulate a restart of the API server: like `set_available(false)`,
    /// then when it comes back (`set_available(true)`) its watch cache
    /// starts over, as a restarted kube-apiserver's does: a watch resuming
    /// from a resourceVersion older than the restart gets `410 Gone`
    /// (Expired) and must relist; lists work. The restart itself moves the
    /// resourceVersion on (a real server writes on startup), so even a
    /// watch that was up to date before the outage is too old after it.
    pub fn restart(&self) {
        self.set_available(false);
        let mut st = self.shared.state();
        st.rv += 1;
        st.compact();
    }

    /// Interval between watch bookmarks (for watches with
    /// `allowWatchBookmarks=true` started after this call). Default 1s.
    pub fn set_bookmark_interval(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared
            .bookmark_interval_ms
            .store(ms, Ordering::Relaxed);
    }

    /// Whether an authorization hook is installed.
    pub fn has_authorizer(&self) -> bool {
        self.shared
            .authorizer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Requests the authorizer refused (403) so far.
    pub fn denied_requests(&self) -> Vec<RequestAttributes> {
        lock(&self.shared.denied).clone()
    }

    /// Return and forget the refused requests.
    pub fn take_denied_requests(&self) -> Vec<RequestAttributes> {
        std::mem::take(&mut *lock(&self.shared.denied))
    }

    /// With `on`, dropping the last handle of this fixture panics (fails the
    /// test) if any request was refused and not taken with
    /// [`take_denied_requests`](Self::take_denied_requests).
    pub fn fail_on_denied(&self, on: bool) {
        self.shared.fail_on_denied.store(on, Ordering::Relaxed);
    }

    /// Install (or remove) the authorization hook for resource requests.
    /// Discovery and `/version` are always allowed.
    pub fn set_authorizer(&self, authorizer: Option<Authorizer>) {
        *self
            .shared
            .authorizer
            .write()
            .unwrap_or_else(|e| e.into_inner()) = authorizer;
    }

    /// Requests served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).iter().cloned().collect()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Number of watch streams currently open.
    pub fn active_watches(&self) -> usize {
        let mut st = self.shared.state();
        st.subscribers.retain(|s| !s.tx.is_closed());
        st.subscribers.len()
    }

    /// Write a kubeconfig for `http://{addr}` (no TLS, dummy bearer token,
    /// namespace `default`).
    pub fn write_kubeconfig(addr: SocketAddr, path: &Path) -> anyhow::Result<()> {
        let doc = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "fixture",
                "cluster": { "server": format!("http://{addr}") },
            }],
            "users": [{
                "name": "fixture",
                "user": { "token": "fixture-token" },
            }],
            "contexts": [{
                "name": "fixture",
                "context": { "cluster": "fixture", "user": "fixture", "namespace": "default" },
            }],
            "current-context": "fixture",
            "preferences": {},
        });
        let text = serde_yaml::to_string(&doc).context("serializing kubeconfig")?;
        std::fs::write(path, text).with_context(|| format!("writing kubeconfig {}", path.display()))
    }
}

fn res_of(obj: &Value) -> anyhow::Result<Res> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .context("object has no kind")?;
    Ok(Res::parse(kind)?)
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

fn json_response(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Body::from(bytes));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hi = b.get(i + 1).copied().and_then(hex_val);
                let lo = b.get(i + 2).copied().and_then(hex_val);
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k, true), percent_decode(v, true))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1" | "True" | "TRUE"))
    }
}

fn hex_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn hex_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let bytes = b
        .chunks(2)
        .map(|c| Some(hex_val(c[0])? << 4 | hex_val(c[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Continue token: the list's resourceVersion and the last key served.
fn encode_continue(rv: u64, key: &Key) -> String {
    hex_encode(&format!("{rv}/{}/{}", key.0, key.1))
}

fn decode_continue(token: &str) -> Option<(u64, Key)> {
    let text = hex_decode(token)?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let ns = parts.next()?.to_owned();
    let name = parts.next()?.to_owned();
    Some((rv, (ns, name)))
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

async fn handle_request(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| uri.path().to_owned());
    let resp = if shared.available.load(Ordering::SeqCst) {
        route(&shared, &method, &uri, &headers, &body).unwrap_or_else(|e| error_response(&e))
    } else {
        error_response(&ApiError::unavailable())
    };
    let status = resp.status().as_u16();
    tracing::debug!(%method, %path, status, "fixture API request");
    shared.record(&method, path, status);
    resp
}

fn discovery_resources(group: &str) -> Value {
    let resources: Vec<Value> = Res::ALL
        .into_iter()
        .filter(|r| r.group() == group)
        .map(|r| {
            json!({
                "name": r.plural(),
                "singularName": r.singular(),
                "namespaced": r.namespaced(),
                "kind": r.kind(),
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": r.short_names(),
            })
        })
        .collect();
    let gv = if group.is_empty() {
        "v1".to_owned()
    } else {
        format!("{group}/v1")
    };
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    })
}

fn discovery_group() -> Value {
    let gv = json!({ "groupVersion": "discovery.k8s.io/v1", "version": "v1" });
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "discovery.k8s.io",
        "versions": [gv],
        "preferredVersion": gv,
    })
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let segs: Vec<String> = uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode(s, false))
        .collect();
    let segs_ref: Vec<&str> = segs.iter().map(String::as_str).collect();
    let discovery = |v: Value| {
        if *method == Method::GET {
            Ok(json_response(200, &v))
        } else {
            Err(ApiError::method_not_allowed())
        }
    };
    match segs_ref.as_slice() {
        ["version"] => discovery(json!({
            "major": VERSION_MAJOR,
            "minor": VERSION_MINOR,
            "gitVersion": format!("v{VERSION_MAJOR}.{VERSION_MINOR}.0-fixture"),
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["healthz"] | ["livez"] | ["readyz"] => {
            let mut resp = Response::new(Body::from("ok"));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(resp)
        }
        ["api"] => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1");
            discovery(json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": host }],
            }))
        }
        ["apis"] => discovery(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [discovery_group()],
        })),
        ["api", "v1"] => discovery(discovery_resources("")),
        ["apis", "discovery.k8s.io"] => discovery(discovery_group()),
        ["apis", "discovery.k8s.io", "v1"] => discovery(discovery_resources("discovery.k8s.io")),
        ["api", "v1", rest @ ..] => resource_request(shared, "", rest, method, uri, headers, body),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => {
            resource_request(shared, "discovery.k8s.io", rest, method, uri, headers, body)
        }
        _ => Err(ApiError::path_not_found()),
    }
}

struct Target {
    res: Res,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_target(group: &str, rest: &[&str]) -> Option<Target> {
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    let res = Res::from_path(group, plural)?;
    // A namespaced item needs a namespace; cluster-scoped kinds have none.
    if res.namespaced() != namespace.is_some() && (name.is_some() || !res.namespaced()) {
        return None;
    }
    Some(Target {
        res,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }
}

fn build_filter(target: &Target, query: &Query) -> Result<Filter, ApiError> {
    let labels = parse_label_selector(query.get("labelSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let mut fields = parse_field_selector(query.get("fieldSelector").unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    if let Some(name) = &target.name {
        // Watch on an item path.
        fields.push(FieldReq {
            path: "metadata.name".to_owned(),
            value: name.clone(),
            negate: false,
        });
    }
    Ok(Filter {
        namespace: target.namespace.clone(),
        labels,
        fields,
    })
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn resource_request(
    shared: &Arc<Shared>,
    group: &str,
    rest: &[&str],
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let target = parse_target(group, rest).ok_or_else(ApiError::path_not_found)?;
    let query = Query::parse(uri.query());
    let is_watch = query.flag("watch");
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, _) if is_watch => Verb::Watch,
        (&Method::GET, false) => Verb::List,
        (&Method::GET, true) => Verb::Get,
        (&Method::POST, false) => Verb::Create,
        (&Method::PUT, true) => Verb::Update,
        (&Method::PATCH, true) => Verb::Patch,
        (&Method::DELETE, true) => Verb::Delete,
        _ => return Err(ApiError::method_not_allowed()),
    };

    let authorizer = shared
        .authorizer
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(authorize) = authorizer {
        let mut name = target.name.clone();
        if matches!(verb, Verb::List | Verb::Watch)
            && name.is_none()
            && let Some(fs) = query.get("fieldSelector")
        {
            name = parse_field_selector(fs)
                .ok()
                .and_then(|reqs| {
                    reqs.into_iter()
                        .find(|r| r.path == "metadata.name" && !r.negate)
                })
                .map(|r| r.value);
        }
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|t| t.trim().to_owned());
        let attrs = RequestAttributes {
            verb: verb.as_str().to_owned(),
            api_group: group.to_owned(),
            api_version: "v1".to_owned(),
            resource: target.res.plural().to_owned(),
            subresource: None,
            namespace: target.namespace.clone(),
            name,
            token,
        };
        if !authorize(&attrs) {
            tracing::warn!(?attrs, "fixture API server: request denied (403)");
            let e = ApiError::forbidden(&attrs);
            lock(&shared.denied).push(attrs);
            return Err(e);
        }
    }

    let res = target.res;
    let item_key = || {
        target
            .name
            .as_deref()
            .map(|name| key_for(res, target.namespace.as_deref(), name))
            .ok_or_else(ApiError::method_not_allowed)
    };
    match verb {
        Verb::List => list_request(shared, &target, &query),
        Verb::Watch => watch_request(shared, &target, &query),
        Verb::Get => {
            let key = item_key()?;
            let st = shared.state();
            let obj = st
                .get(res, &key)
                .ok_or_else(|| ApiError::not_found(res, &key.1))?;
            Ok(json_response(200, obj))
        }
        Verb::Create => {
            let obj = parse_body(body)?;
            let created = shared
                .state()
                .create(res, obj, target.namespace.as_deref())?;
            Ok(json_response(201, &created))
        }
        Verb::Update => {
            let key = item_key()?;
            let obj = parse_body(body)?;
            let updated = shared.state().update(res, obj, Some(&key), false)?;
            Ok(json_response(200, &updated))
        }
        Verb::Patch => {
            let key = item_key()?;
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if !(ct.starts_with("application/merge-patch+json")
                || ct.starts_with("application/strategic-merge-patch+json"))
            {
                return Err(ApiError::unsupported_media_type(ct));
            }
            let patch = parse_body(body)?;
            let mut st = shared.state();
            let mut obj = st
                .get(res, &key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(res, &key.1))?;
            // A resourceVersion in the patch is a precondition.
            let precondition = patch
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_owned);
            merge_patch(&mut obj, &patch);
            if let Some(rv) = precondition {
                set_meta(&mut obj, "resourceVersion", Value::from(rv));
            }
            let updated = st.update(res, obj, Some(&key), false)?;
            Ok(json_response(200, &updated))
        }
        Verb::Delete => {
            let key = item_key()?;
            let deleted = shared.state().delete(res, &key)?;
            Ok(json_response(200, &deleted))
        }
    }
}

fn list_request(shared: &Shared, target: &Target, query: &Query) -> Result<Response, ApiError> {
    let filter = build_filter(target, query)?;
    let limit = match query.get("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
    };
    let st = shared.state();
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (st.rv, None),
        Some(token) => {
            let (rv, key) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if rv < st.compacted_rv {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some(key))
        }
    };
    let empty = BTreeMap::new();
    let bucket = st.bucket(target.res).unwrap_or(&empty);
    // Pages start after the continue key by a range query (not a walk from
    // the first key), so a paginated list of N objects costs O(N log N),
    // not O(N^2 / limit).
    let from = match &after {
        Some(a) => Bound::Excluded(a),
        None => Bound::Unbounded,
    };
    let mut matching = bucket
        .range((from, Bound::Unbounded))
        .filter(|(_, v)| filter.matches(v));
    let mut items = Vec::new();
    let mut last_key = None;
    for (k, v) in matching.by_ref() {
        if limit > 0 && items.len() == limit {
            break;
        }
        items.push(v.clone());
        last_key = Some(k.clone());
    }
    let mut metadata = Map::new();
    metadata.insert(
        "resourceVersion".to_owned(),
        Value::from(list_rv.to_string()),
    );
    if limit > 0
        && items.len() == limit
        && let Some(last) = &last_key
    {
        // The item consumed by the break shows whether anything is left.
        // As the real API server does, `remainingItemCount` is given only
        // for a list without selectors (counting a selected rest would
        // evaluate the selectors over every remaining object on every page).
        let more = if filter.has_no_selector() {
            let n = bucket
                .range((Bound::Excluded(last), Bound::Unbounded))
                .filter(|(_, v)| filter.matches(v))
                .count();
            if n > 0 {
                metadata.insert("remainingItemCount".to_owned(), Value::from(n));
            }
            n > 0
        } else {
            matching.next().is_some()
        };
        if more {
            metadata.insert(
                "continue".to_owned(),
                Value::from(encode_continue(list_rv, last)),
            );
        }
    }
    let list = json!({
        "kind": target.res.list_kind(),
        "apiVersion": target.res.api_version(),
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(200, &list))
}

// ---------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    typ: &'a str,
    object: &'a Value,
}

fn wire_line(typ: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&WireEvent { typ, object }).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark_line(res: Res, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end && let Some(m) = metadata.as_object_mut() {
        m.insert(
            "annotations".to_owned(),
            json!({ "k8s.io/initial-events-end": "true" }),
        );
    }
    let object = json!({
        "kind": res.kind(),
        "apiVersion": res.api_version(),
        "metadata": metadata,
    });
    wire_line("BOOKMARK", &object)
}

/// What a stored event looks like to a watcher with `filter`.
fn render_event(ev: &StoredEvent, filter: &Filter) -> Option<Bytes> {
    match ev.typ {
        EventType::Added => filter
            .matches(&ev.object)
            .then(|| wire_line("ADDED", &ev.object)),
        EventType::Deleted => filter
            .matches(&ev.object)
            .then(|| wire_line("DELETED", &ev.object)),
        EventType::Modified => {
            let now = filter.matches(&ev.object);
            let before = ev.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some(wire_line("MODIFIED", &ev.object)),
                (false, true) => Some(wire_line("ADDED", &ev.object)),
                (true, false) => {
                    // Like the real cacher: the previous state, stamped with
                    // the event's resourceVersion.
                    let mut prev = ev.prev.clone().unwrap_or(Value::Null);
                    set_meta(&mut prev, "resourceVersion", Value::from(ev.rv.to_string()));
                    Some(wire_line("DELETED", &prev))
                }
                (false, false) => None,
            }
        }
    }
}

enum Initial {
    Event(Arc<StoredEvent>),
    Snapshot(Value),
}

struct WatchPlan {
    res: Res,
    filter: Filter,
    initial: Vec<Initial>,
    initial_events_end: Option<u64>,
    bookmarks: bool,
    timeout: Option<Duration>,
    subscriber: u64,
}

fn watch_request(
    shared: &Arc<Shared>,
    target: &Target,
    query: &Query,
) -> Result<Response, ApiError> {
    let filter = build_filter(target, query)?;
    let rv_param = query.get("resourceVersion").unwrap_or("");
    let start = match rv_param {
        "" | "0" => None,
        s => Some(
            s.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))?,
        ),
    };
    let send_initial = query.flag("sendInitialEvents");
    let timeout = match query.get("timeoutSeconds") {
        None | Some("") => None,
        Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {t:?}"))
        })?)),
    };
    let res = target.res;
    let (tx, rx) = mpsc::unbounded_channel();
    let plan = {
        let mut st = shared.state();
        // Re-checked under the lock: set_available(false) clears subscribers
        // under it, so no watch can slip in and survive an outage.
        if !shared.available.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable());
        }
        let (initial, initial_events_end) = match start {
            Some(from) if !send_initial => {
                if from < st.compacted_rv {
                    let gone = ApiError::expired(format!(
                        "too old resource version: {from} ({})",
                        st.compacted_rv
                    ));
                    drop(st);
                    let line = wire_line("ERROR", &gone.to_status());
                    let mut resp = Response::new(Body::from(line));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    return Ok(resp);
                }
                let backlog = st
                    .history
                    .iter()
                    .filter(|e| e.rv > from && e.res == res)
                    .cloned()
                    .map(Initial::Event)
                    .collect();
                (backlog, None)
            }
            _ => {
                let snapshot = st
                    .bucket(res)
                    .map(|b| b.values().cloned().map(Initial::Snapshot).collect())
                    .unwrap_or_default();
                (snapshot, send_initial.then_some(st.rv))
            }
        };
        let id = st.next_subscriber;
        st.next_subscriber += 1;
        st.subscribers.push(Subscriber { id, res, tx });
        WatchPlan {
            res,
            filter,
            initial,
            initial_events_end,
            bookmarks: query.flag("allowWatchBookmarks"),
            timeout,
            subscriber: id,
        }
    };

    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(watch_task(shared.clone(), plan, rx, out_tx));
    let stream = futures::stream::poll_fn(move |cx| {
        out_rx
            .poll_recv(cx)
            .map(|o| o.map(Ok::<Bytes, std::convert::Infallible>))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

/// Removes the subscriber when the watch ends, however it ends.
struct SubscriberGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.shared.state().subscribers.retain(|s| s.id != self.id);
    }
}

async fn watch_task(
    shared: Arc<Shared>,
    plan: WatchPlan,
    mut events: mpsc::UnboundedReceiver<Arc<StoredEvent>>,
    out: mpsc::Sender<Bytes>,
) {
    let _guard = SubscriberGuard {
        shared: shared.clone(),
        id: plan.subscriber,
    };
    let WatchPlan {
        res,
        filter,
        initial,
        initial_events_end,
        bookmarks,
        timeout,
        ..
    } = plan;
    for item in initial {
        let line = match item {
            Initial::Event(ev) => render_event(&ev, &filter),
            Initial::Snapshot(obj) => filter.matches(&obj).then(|| wire_line("ADDED", &obj)),
        };
        if let Some(line) = line
            && out.send(line).await.is_err()
        {
            return;
        }
    }
    if let Some(rv) = initial_events_end
        && out.send(bookmark_line(res, rv, true)).await.is_err()
    {
        return;
    }

    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut next_bookmark = tokio::time::Instant::now() + shared.bookmark_interval();
    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                if let Some(line) = render_event(&ev, &filter)
                    && out.send(line).await.is_err()
                {
                    break;
                }
            }
            _ = tokio::time::sleep_until(next_bookmark), if bookmarks => {
                // Drain under the lock so the bookmark never overtakes an
                // event that is already committed.
                let (pending, rv) = {
                    let st = shared.state();
                    let mut pending = Vec::new();
                    while let Ok(ev) = events.try_recv() {
                        pending.push(ev);
                    }
                    (pending, st.rv)
                };
                let mut lines: Vec<Bytes> =
                    pending.iter().filter_map(|ev| render_event(ev, &filter)).collect();
                lines.push(bookmark_line(res, rv, false));
                for line in lines {
                    if out.send(line).await.is_err() {
                        return;
                    }
                }
                next_bookmark = tokio::time::Instant::now() + shared.bookmark_interval();
            }
            _ = &mut deadline => break,
            _ = out.closed() => break,
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::Future;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    use futures::{Stream, StreamExt};
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
    use kube::runtime::{reflector, watcher};

    /// Upper bound for any single test body.
    const TEST_TIMEOUT: Duration = Duration::from_secs(15);
    /// Upper bound for waiting on one event.
    const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

    const BASIC_YAML: &str = include_str!("../fixtures/apiserver/basic.yaml");

    struct Fixture {
        server: ApiServer,
        addr: SocketAddr,
        kubeconfig: PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.kubeconfig);
        }
    }

    fn fixture() -> anyhow::Result<Fixture> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let server = ApiServer::start()?;
        let addr = server.serve_local()?;
        let kubeconfig = std::env::temp_dir().join(format!(
            "fixture-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        ApiServer::write_kubeconfig(addr, &kubeconfig)?;
        Ok(Fixture {
            server,
            addr,
            kubeconfig,
        })
    }

    /// Run an async test body on a fresh current-thread runtime, with a timeout.
    fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            tokio::time::timeout(TEST_TIMEOUT, f)
                .await
                .map_err(|_| anyhow::anyhow!("test timed out"))?
        })
    }

    /// NB: `kube::Client::try_from` builds a rustls config even for `http://`
    /// servers, so kube needs a rustls crypto provider feature (`ring` or
    /// `aws-lc-rs`); without one it panics here.
    async fn client(f: &Fixture) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&f.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    async fn next<S, T, E>(stream: &mut S) -> anyhow::Result<T>
    where
        S: Stream<Item = Result<T, E>> + Unpin,
        E: std::fmt::Debug,
    {
        match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
            Err(_) => anyhow::bail!("no event within {EVENT_TIMEOUT:?}"),
            Ok(None) => anyhow::bail!("stream ended"),
            Ok(Some(Err(e))) => anyhow::bail!("stream error: {e:?}"),
            Ok(Some(Ok(v))) => Ok(v),
        }
    }

    /// Poll a condition until it holds.
    async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        while !cond() {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn svc(ns: &str, name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.100",
                "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080 }],
            },
        })
    }

    fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": { "kubernetes.io/service-name": service },
            },
            "addressType": "IPv4",
            "ports": [{ "port": 8080, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [ip], "conditions": { "ready": true } }],
        })
    }

    fn node(name: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name },
            "status": { "addresses": [{ "type": "InternalIP", "address": "172.18.0.2" }] },
        })
    }

    fn rv_of(obj: &Value) -> u64 {
        meta_str(obj, "resourceVersion")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn api_status(e: &kube::Error) -> Option<(u16, String)> {
        match e {
            kube::Error::Api(s) => Some((s.code, s.reason.clone())),
            _ => None,
        }
    }

    fn name_of<K: kube::Resource>(k: &K) -> String {
        k.meta().name.clone().unwrap_or_default()
    }

    fn watcher_event_name<K: kube::Resource>(ev: &watcher::Event<K>) -> String {
        match ev {
            watcher::Event::Init => "Init".to_owned(),
            watcher::Event::InitApply(k) => format!("InitApply({})", name_of(k)),
            watcher::Event::InitDone => "InitDone".to_owned(),
            watcher::Event::Apply(k) => format!("Apply({})", name_of(k)),
            watcher::Event::Delete(k) => format!("Delete({})", name_of(k)),
        }
    }

    async fn expect_events<K, S>(stream: &mut S, expected: &[&str]) -> anyhow::Result<()>
    where
        K: kube::Resource,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
    {
        for want in expected {
            let ev = next(stream).await?;
            let got = watcher_event_name(&ev);
            anyhow::ensure!(got == *want, "expected {want}, got {got}");
        }
        Ok(())
    }

    // --- raw HTTP helpers (for what kube hides) -----------------------------

    fn send_request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<BufReader<TcpStream>> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(EVENT_TIMEOUT))?;
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        Ok(BufReader::new(stream))
    }

    /// Read the status line and headers; returns (status, chunked, content-length).
    fn read_head(r: &mut BufReader<TcpStream>) -> anyhow::Result<(u16, bool, Option<usize>)> {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut chunked, mut len) = (false, None);
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if lower == "transfer-encoding: chunked" {
                chunked = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            }
        }
        Ok((status, chunked, len))
    }

    /// Read one chunk of a chunked body; `None` at the final chunk.
    fn read_chunk(r: &mut BufReader<TcpStream>) -> anyhow::Result<Option<String>> {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            anyhow::bail!("connection closed mid-body");
        }
        let size = usize::from_str_radix(line.trim(), 16)
            .with_context(|| format!("bad chunk size {line:?}"))?;
        let mut buf = vec![0; size + 2];
        r.read_exact(&mut buf)?;
        buf.truncate(size);
        Ok((size > 0).then(|| String::from_utf8_lossy(&buf).into_owned()))
    }

    fn http(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = send_request(addr, method, path, body)?;
        let (status, chunked, len) = read_head(&mut r)?;
        let mut text = String::new();
        if chunked {
            while let Some(c) = read_chunk(&mut r)? {
                text.push_str(&c);
            }
        } else if let Some(len) = len {
            let mut buf = vec![0; len];
            r.read_exact(&mut buf)?;
            text = String::from_utf8_lossy(&buf).into_owned();
        } else {
            r.read_to_string(&mut text)?;
        }
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .or_else(|_| serde_json::from_str(&format!("{:?}", text)))
                .with_context(|| format!("body is not JSON: {text:?}"))?
        };
        Ok((status, value))
    }

    // --- unit tests ----------------------------------------------------------

    #[test]
    fn label_selector_parsing_and_matching() -> anyhow::Result<()> {
        let labels = json!({ "app": "web", "tier": "front", "empty": "" });
        let labels = labels.as_object();
        let check = |sel: &str| -> anyhow::Result<bool> {
            let reqs = parse_label_selector(sel).map_err(|e| anyhow::anyhow!(e))?;
            Ok(reqs.iter().all(|r| r.matches(labels)))
        };
        assert!(check("")?);
        assert!(check("app")?);
        assert!(!check("!app")?);
        assert!(check("!service.kubernetes.io/service-proxy-name")?);
        assert!(check("app=web")?);
        assert!(check("app==web")?);
        assert!(!check("app=db")?);
        assert!(check("app!=db")?);
        assert!(check("missing!=x")?);
        assert!(check("empty=")?);
        assert!(check("app in (db, web)")?);
        assert!(!check("app in (db)")?);
        assert!(check("app notin (db,cache)")?);
        assert!(check("missing notin (x)")?);
        assert!(!check("missing in (x)")?);
        assert!(check("app=web, tier in (front,back),!missing")?);
        assert!(!check("app=web,tier=back")?);
        for bad in ["app in (a", "a b", "app ni (a)", "=x", "app,,tier", "!"] {
            assert!(
                parse_label_selector(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        Ok(())
    }

    #[test]
    fn field_selector_and_helpers() -> anyhow::Result<()> {
        let obj = json!({ "metadata": { "name": "a", "namespace": "ns" }, "spec": { "unschedulable": true } });
        let check = |sel: &str| -> anyhow::Result<bool> {
            let reqs = parse_field_selector(sel).map_err(|e| anyhow::anyhow!(e))?;
            Ok(reqs.iter().all(|r| r.matches(&obj)))
        };
        assert!(check("metadata.name=a")?);
        assert!(check("metadata.name==a,metadata.namespace=ns")?);
        assert!(!check("metadata.name!=a")?);
        assert!(check("spec.unschedulable=true")?);
        assert!(check("spec.nodeName=")?);
        assert!(parse_field_selector("metadata.name").is_err());

        let key = ("ns".to_owned(), "name-1".to_owned());
        assert_eq!(decode_continue(&encode_continue(42, &key)), Some((42, key)));
        assert_eq!(decode_continue("zz"), None);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(percent_decode("a%21b+c%2", true), "a!b c%2");
        Ok(())
    }

    #[test]
    fn rust_api_create_update_delete() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let rv0 = server.resource_version();
        let created = server.create(json!({
            "kind": "Service",
            "metadata": { "name": "a" },
            "spec": { "clusterIP": "10.96.0.1" },
        }))?;
        assert_eq!(created["apiVersion"], "v1");
        assert_eq!(created["metadata"]["namespace"], "default");
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(meta_str(&created, "uid").is_some_and(|u| !u.is_empty()));
        assert!(meta_str(&created, "creationTimestamp").is_some_and(|t| t.ends_with('Z')));
        assert_eq!(rv_of(&created), rv0 + 1);
        assert_eq!(server.resource_version(), rv0 + 1);

        let err = server
            .create(svc("default", "a", json!({})))
            .err()
            .context("duplicate create must fail")?;
        let api = err.downcast_ref::<ApiError>().context("ApiError")?;
        assert_eq!((api.code, api.reason.as_str()), (409, "AlreadyExists"));

        // Nodes are cluster-scoped: a namespace is dropped.
        let n = server
            .create(json!({ "kind": "Node", "metadata": { "name": "n", "namespace": "x" } }))?;
        assert!(n["metadata"].get("namespace").is_none());
        assert!(server.get("Node", Some("whatever"), "n").is_some());

        // modify: spec change bumps generation; a no-op emits nothing.
        let m = server.modify("Service", None, "a", |o| {
            o["spec"]["clusterIP"] = json!("10.96.0.2");
        })?;
        assert_eq!(m["metadata"]["generation"], 2);
        assert_eq!(m["metadata"]["uid"], created["metadata"]["uid"]);
        let rv = server.resource_version();
        let same = server.modify("Service", None, "a", |_| {})?;
        assert_eq!(server.resource_version(), rv);
        assert_eq!(same, m);
        let l = server.modify("svc", Some("default"), "a", |o| {
            o["metadata"]["labels"] = json!({ "x": "y" });
        })?;
        assert_eq!(l["metadata"]["generation"], 2, "metadata-only change");

        // Stale update conflicts; unconditional update works.
        let mut stale = created.clone();
        stale["spec"]["clusterIP"] = json!("10.96.0.3");
        let err = server.update(stale.clone()).err().context("stale update")?;
        let api = err.downcast_ref::<ApiError>().context("ApiError")?;
        assert_eq!((api.code, api.reason.as_str()), (409, "Conflict"));
        if let Some(meta) = stale["metadata"].as_object_mut() {
            meta.remove("resourceVersion");
        }
        let u = server.update(stale)?;
        assert_eq!(u["spec"]["clusterIP"], "10.96.0.3");

        let d = server.delete("Service", None, "a")?;
        assert_eq!(rv_of(&d), server.resource_version());
        assert!(server.get("Service", None, "a").is_none());
        let err = server
            .delete("Service", None, "a")
            .err()
            .context("second delete")?;
        assert_eq!(err.downcast_ref::<ApiError>().map(|e| e.code), Some(404));
        assert!(
            server
                .create(json!({ "kind": "Pod", "metadata": { "name": "p" } }))
                .is_err()
        );
        assert!(
            server
                .create(
                    json!({ "kind": "Service", "apiVersion": "v2", "metadata": { "name": "p" } })
                )
                .is_err()
        );

        // generateName
        let g = server.create(json!({
            "kind": "EndpointSlice",
            "metadata": { "generateName": "web-" },
            "addressType": "IPv4",
            "endpoints": [],
        }))?;
        let name = meta_str(&g, "name").unwrap_or_default();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        Ok(())
    }

    #[test]
    fn apply_yaml_creates_then_replaces() -> anyhow::Result<()> {
        let server = ApiServer::start()?;
        let objs = server.apply_yaml(BASIC_YAML)?;
        assert_eq!(objs.len(), 6);
        assert_eq!(server.list("Service").len(), 3);
        assert_eq!(server.list("EndpointSlice").len(), 1);
        assert_eq!(server.list("nodes").len(), 2);
        let rv = server.resource_version();
        // Identical re-apply: no change.
        server.apply_yaml(BASIC_YAML)?;
        assert_eq!(server.resource_version(), rv);
        // Changed document: replaced in place, uid kept.
        let before = server.get("Service", None, "web").context("web")?;
        let changed = BASIC_YAML.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.20");
        server.apply_yaml(&changed)?;
        let after = server.get("Service", None, "web").context("web")?;
        assert_eq!(after["spec"]["clusterIP"], "10.96.0.20");
        assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
        assert_eq!(server.resource_version(), rv + 1);
        // List documents and errors.
        let list = "apiVersion: v1\nkind: List\nitems:\n- kind: Node\n  apiVersion: v1\n  metadata: {name: node-c}\n";
        assert_eq!(server.apply_yaml(list)?.len(), 1);
        assert!(
            server
                .apply_yaml("kind: Pod\nmetadata: {name: x}\n")
                .is_err()
        );
        assert!(server.apply_yaml("kind: [").is_err());
        Ok(())
    }

    // --- protocol tests with kube-rs ------------------------------------------

    #[test]
    fn kube_client_lists_and_gets_services() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.apply_yaml(BASIC_YAML)?;
        block_on(async {
            let c = client(&f).await?;
            let all: Api<Service> = Api::all(c.clone());
            let list = all.list(&ListParams::default()).await?;
            let names: Vec<String> = list.items.iter().map(name_of).collect();
            assert_eq!(names, ["web", "web-nodeport", "not-ours"]);
            assert_eq!(
                list.metadata.resource_version,
                Some(f.server.resource_version().to_string())
            );
            let ns: Api<Service> = Api::namespaced(c.clone(), "default");
            let web = ns.get("web").await?;
            assert_eq!(
                web.spec.and_then(|s| s.cluster_ip).as_deref(),
                Some("10.96.0.10")
            );
            let err = ns.get("nope").await.err().context("missing get")?;
            assert_eq!(api_status(&err), Some((404, "NotFound".to_owned())));
            let in_system: Api<Service> = Api::namespaced(c.clone(), "kube-system");
            assert_eq!(in_system.list(&ListParams::default()).await?.items.len(), 1);

            let nodes: Api<Node> = Api::all(c.clone());
            assert_eq!(nodes.list(&ListParams::default()).await?.items.len(), 2);
            assert!(nodes.get("node-a").await?.status.is_some());
            let slices: Api<EndpointSlice> = Api::all(c.clone());
            let sl = slices.list(&ListParams::default()).await?;
            assert_eq!(sl.items.len(), 1);
            assert_eq!(sl.items[0].endpoints.len(), 2);

            let reqs = f.server.requests();
            assert!(
                reqs.iter().any(|r| r.method == "GET"
                    && r.path.starts_with("/api/v1/services")
                    && r.status == 200),
                "{reqs:?}"
            );
            assert!(
                reqs.iter().any(
                    |r| r.path == "/api/v1/namespaces/default/services/nope" && r.status == 404
                )
            );
            Ok(())
        })
    }

    #[test]
    fn watcher_sees_endpointslice_lifecycle() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.set_bookmark_interval(Duration::from_millis(50));
        f.server
            .create(slice("default", "web-1", "web", "10.244.0.1"))?;
        block_on(async {
            let api: Api<EndpointSlice> = Api::all(client(&f).await?);
            let mut w = watcher(api, watcher::Config::default()).boxed();
            expect_events(&mut w, &["Init", "InitApply(web-1)", "InitDone"]).await?;
            // Let a couple of bookmarks go by; they must not surface or break anything.
            tokio::time::sleep(Duration::from_millis(120)).await;

            let created = f
                .server
                .create(slice("default", "web-2", "web", "10.244.0.2"))?;
            match next(&mut w).await? {
                watcher::Event::Apply(s) => {
                    assert_eq!(name_of(&s), "web-2");
                    assert_eq!(
                        s.metadata.resource_version,
                        meta_str(&created, "resourceVersion").map(str::to_owned)
                    );
                    assert_eq!(s.endpoints[0].addresses, ["10.244.0.2"]);
                }
                other => anyhow::bail!("expected Apply, got {}", watcher_event_name(&other)),
            }
            f.server
                .modify("EndpointSlice", Some("default"), "web-2", |o| {
                    o["endpoints"][0]["addresses"] = json!(["10.244.0.3"]);
                })?;
            match next(&mut w).await? {
                watcher::Event::Apply(s) => assert_eq!(s.endpoints[0].addresses, ["10.244.0.3"]),
                other => anyhow::bail!("expected Apply, got {}", watcher_event_name(&other)),
            }
            f.server.delete("EndpointSlice", Some("default"), "web-2")?;
            expect_events(&mut w, &["Delete(web-2)"]).await?;
            // The watch was resumed with bookmarks enabled.
            assert!(
                f.server
                    .requests()
                    .iter()
                    .any(|r| r.path.contains("watch=true")
                        && r.path.contains("allowWatchBookmarks=true"))
            );
            Ok(())
        })
    }

    #[test]
    fn label_selector_filters_lists_and_watches() -> anyhow::Result<()> {
        const SEL: &str = "!service.kubernetes.io/service-proxy-name";
        let f = fixture()?;
        let other = json!({ "service.kubernetes.io/service-proxy-name": "other" });
        f.server
            .create(svc("default", "a", json!({ "app": "a" })))?;
        f.server.create(svc("default", "b", other.clone()))?;
        block_on(async {
            let api: Api<Service> = Api::all(client(&f).await?);
            let list = api.list(&ListParams::default().labels(SEL)).await?;
            assert_eq!(list.items.iter().map(name_of).collect::<Vec<_>>(), ["a"]);
            let list = api
                .list(
                    &ListParams::default()
                        .labels("service.kubernetes.io/service-proxy-name in (other)"),
                )
                .await?;
            assert_eq!(list.items.iter().map(name_of).collect::<Vec<_>>(), ["b"]);
            let err = api
                .list(&ListParams::default().labels("a in (b"))
                .await
                .err()
                .context("bad selector")?;
            assert_eq!(api_status(&err).map(|s| s.0), Some(400));

            let mut w = watcher(api.clone(), watcher::Config::default().labels(SEL)).boxed();
            expect_events(&mut w, &["Init", "InitApply(a)", "InitDone"]).await?;
            // a starts carrying the label: it leaves the selection (DELETED).
            f.server.modify("Service", None, "a", |o| {
                o["metadata"]["labels"] = other.clone();
            })?;
            match next(&mut w).await? {
                watcher::Event::Delete(s) => {
                    assert_eq!(name_of(&s), "a");
                    assert_eq!(
                        s.metadata.resource_version,
                        Some(f.server.resource_version().to_string())
                    );
                }
                ev => anyhow::bail!("expected Delete(a), got {}", watcher_event_name(&ev)),
            }
            // b loses the label: it enters the selection (ADDED).
            f.server.modify("Service", None, "b", |o| {
                o["metadata"]["labels"] = json!({});
            })?;
            expect_events(&mut w, &["Apply(b)"]).await?;
            // Changes to non-matching objects are invisible.
            f.server.create(svc("default", "c", other.clone()))?;
            f.server.modify("Service", None, "a", |o| {
                o["spec"]["clusterIP"] = json!("10.96.0.200");
            })?;
            f.server.create(svc("default", "d", json!({})))?;
            expect_events(&mut w, &["Apply(d)"]).await?;
            Ok(())
        })
    }

    #[test]
    fn field_selector_on_nodes() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.create(node("node-a"))?;
        f.server.create(node("node-b"))?;
        block_on(async {
            let api: Api<Node> = Api::all(client(&f).await?);
            let l = api
                .list(&ListParams::default().fields("metadata.name=node-b"))
                .await?;
            assert_eq!(l.items.iter().map(name_of).collect::<Vec<_>>(), ["node-b"]);
            let l = api
                .list(&ListParams::default().fields("metadata.name!=node-b"))
                .await?;
            assert_eq!(l.items.iter().map(name_of).collect::<Vec<_>>(), ["node-a"]);

            let cfg = watcher::Config::default().fields("metadata.name=node-a");
            let mut w = watcher(api, cfg).boxed();
            expect_events(&mut w, &["Init", "InitApply(node-a)", "InitDone"]).await?;
            f.server.modify("Node", None, "node-b", |o| {
                o["metadata"]["labels"] = json!({ "x": "b" });
            })?;
            f.server.modify("Node", None, "node-a", |o| {
                o["metadata"]["labels"] = json!({ "x": "a" });
            })?;
            match next(&mut w).await? {
                watcher::Event::Apply(n) => {
                    assert_eq!(name_of(&n), "node-a");
                    assert_eq!(
                        n.metadata
                            .labels
                            .and_then(|l| l.get("x").cloned())
                            .as_deref(),
                        Some("a")
                    );
                }
                ev => anyhow::bail!("expected Apply(node-a), got {}", watcher_event_name(&ev)),
            }
            Ok(())
        })
    }

    #[test]
    fn gone_after_compaction_makes_watcher_relist_and_converge() -> anyhow::Result<()> {
        let f = fixture()?;
        // No bookmarks during the test: they would move the watcher's
        // resourceVersion past the compaction point.
        f.server.set_bookmark_interval(Duration::from_secs(60));
        f.server.create(svc("default", "s1", json!({})))?;
        f.server.create(svc("default", "s2", json!({})))?;
        block_on(async {
            let api: Api<Service> = Api::all(client(&f).await?);
            let (reader, writer) = reflector::store::<Service>();
            let stream = reflector(writer, watcher(api, watcher::Config::default()));
            let log = Arc::new(Mutex::new(Vec::<String>::new()));
            let log2 = log.clone();
            let driver = tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    let entry = match item {
                        Ok(ev) => watcher_event_name(&ev),
                        Err(watcher::Error::WatchError(s)) => format!("WatchError({})", s.code),
                        Err(e) => {
                            // Cheap stand-in for the agent's backoff.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            format!("Err({e})")
                        }
                    };
                    lock(&log2).push(entry);
                }
            });
            tokio::time::timeout(EVENT_TIMEOUT, reader.wait_until_ready()).await??;
            let names = |r: &reflector::Store<Service>| {
                let mut v: Vec<String> = r.state().iter().map(|s| name_of(s.as_ref())).collect();
                v.sort();
                v
            };
            assert_eq!(names(&reader), ["s1", "s2"]);

            // Outage: the watch stream ends and re-watches fail with 503.
            f.server.set_available(false);
            eventually("a 503 while down", || {
                f.server.requests().iter().any(|r| r.status == 503)
            })
            .await?;
            f.server.delete("Service", None, "s1")?;
            f.server.modify("Service", None, "s2", |o| {
                o["metadata"]["labels"] = json!({ "changed": "yes" });
            })?;
            f.server.create(svc("default", "s3", json!({})))?;
            f.server.compact();
            f.server.set_available(true);

            eventually("store converged after relist", || {
                names(&reader) == ["s2", "s3"]
                    && reader.state().iter().any(|s| {
                        s.metadata
                            .labels
                            .as_ref()
                            .is_some_and(|l| l.contains_key("changed"))
                    })
            })
            .await?;
            let entries = lock(&log).clone();
            let gone = entries
                .iter()
                .position(|e| e == "WatchError(410)")
                .with_context(|| format!("no 410 in {entries:?}"))?;
            assert!(
                entries[gone..].iter().any(|e| e == "InitDone"),
                "relist after 410: {entries:?}"
            );
            driver.abort();
            Ok(())
        })
    }

    #[test]
    fn restart_expires_every_older_resource_version() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.create(svc("default", "a", json!({})))?;
        // Up to date before the outage: the newest resourceVersion.
        let before = f.server.resource_version();
        block_on(async {
            let api: Api<Service> = Api::all(client(&f).await?);
            let wp = WatchParams::default().disable_bookmarks();
            let mut open = api.watch(&wp, &before.to_string()).await?.boxed();
            f.server.restart();
            // Down: open watches end (requests get 503 as with
            // set_available(false)).
            let end = tokio::time::timeout(EVENT_TIMEOUT, open.next()).await?;
            assert!(end.is_none(), "the open watch ends at the restart");
            f.server.set_available(true);
            // Back: resuming from before the restart is 410 Gone ...
            let mut s = api.watch(&wp, &before.to_string()).await?.boxed();
            match next(&mut s).await? {
                WatchEvent::Error(status) => {
                    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
                }
                other => anyhow::bail!("expected 410 after the restart, got {other:?}"),
            }
            // ... lists work and give a resourceVersion to watch from.
            let list = api.list(&ListParams::default()).await?;
            assert_eq!(list.items.len(), 1);
            let now = list
                .metadata
                .resource_version
                .context("list resourceVersion")?;
            assert!(now.parse::<u64>()? > before, "{now} after {before}");
            let mut s = api.watch(&wp, &now).await?.boxed();
            f.server.create(svc("default", "b", json!({})))?;
            match next(&mut s).await? {
                WatchEvent::Added(o) => assert_eq!(name_of(&o), "b"),
                other => anyhow::bail!("expected ADDED b, got {other:?}"),
            }
            Ok(())
        })
    }

    #[test]
    fn raw_watch_replays_history_and_expires() -> anyhow::Result<()> {
        let f = fixture()?;
        let rv0 = f.server.resource_version();
        f.server.create(svc("default", "a", json!({})))?;
        f.server.modify("Service", None, "a", |o| {
            o["spec"]["clusterIP"] = json!("10.96.0.9")
        })?;
        f.server.create(svc("other", "b", json!({})))?;
        f.server
            .create(slice("default", "a-1", "a", "10.244.0.1"))?;
        block_on(async {
            let api: Api<Service> = Api::all(client(&f).await?);
            let wp = WatchParams::default().disable_bookmarks();
            let mut s = api.watch(&wp, &rv0.to_string()).await?.boxed();
            let mut seen = Vec::new();
            for _ in 0..3 {
                seen.push(match next(&mut s).await? {
                    WatchEvent::Added(o) => format!("ADDED {}", name_of(&o)),
                    WatchEvent::Modified(o) => format!("MODIFIED {}", name_of(&o)),
                    other => format!("{other:?}"),
                });
            }
            assert_eq!(seen, ["ADDED a", "MODIFIED a", "ADDED b"]);

            // "0": synthetic ADDED for the current state, namespaced.
            let ns: Api<Service> = Api::namespaced(api.clone().into_client(), "other");
            let mut s = ns.watch(&wp, "0").await?.boxed();
            match next(&mut s).await? {
                WatchEvent::Added(o) => assert_eq!(name_of(&o), "b"),
                other => anyhow::bail!("expected ADDED b, got {other:?}"),
            }

            f.server.compact();
            let mut s = api.watch(&wp, &rv0.to_string()).await?.boxed();
            match next(&mut s).await? {
                WatchEvent::Error(status) => {
                    assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
                    assert!(
                        status.message.starts_with("too old resource version"),
                        "{}",
                        status.message
                    );
                }
                other => anyhow::bail!("expected 410, got {other:?}"),
            }
            let end = tokio::time::timeout(EVENT_TIMEOUT, s.next()).await?;
            assert!(end.is_none(), "stream must end after the error");
            // Resuming from the current RV is fine after compaction.
            let now = f.server.resource_version().to_string();
            let mut s = api.watch(&wp, &now).await?.boxed();
            f.server.delete("Service", Some("other"), "b")?;
            match next(&mut s).await? {
                WatchEvent::Deleted(o) => {
                    assert_eq!(name_of(&o), "b");
                    assert_eq!(
                        o.metadata.resource_version,
                        Some(f.server.resource_version().to_string())
                    );
                }
                other => anyhow::bail!("expected DELETED b, got {other:?}"),
            }
            Ok(())
        })
    }

    #[test]
    fn bookmarks_initial_events_and_timeout() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.set_bookmark_interval(Duration::from_millis(50));
        f.server.create(node("n1"))?;
        block_on(async {
            let api: Api<Node> = Api::all(client(&f).await?);
            let rv = f.server.resource_version();
            let started = tokio::time::Instant::now();
            let mut s = api
                .watch(&WatchParams::default().timeout(1), &rv.to_string())
                .await?
                .boxed();
            match next(&mut s).await? {
                WatchEvent::Bookmark(b) => {
                    assert_eq!(b.metadata.resource_version, rv.to_string());
                    assert_eq!(b.types.kind, "Node");
                }
                other => anyhow::bail!("expected BOOKMARK, got {other:?}"),
            }
            f.server.create(node("n2"))?;
            // Skip bookmarks until the ADDED arrives; later bookmarks carry the new RV.
            loop {
                match next(&mut s).await? {
                    WatchEvent::Added(n) => {
                        assert_eq!(name_of(&n), "n2");
                        break;
                    }
                    WatchEvent::Bookmark(_) => {}
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
            match next(&mut s).await? {
                WatchEvent::Bookmark(b) => {
                    assert_eq!(
                        b.metadata.resource_version,
                        f.server.resource_version().to_string()
                    )
                }
                other => anyhow::bail!("expected BOOKMARK, got {other:?}"),
            }
            // timeoutSeconds=1 ends the stream.
            while let Some(ev) = tokio::time::timeout(EVENT_TIMEOUT, s.next()).await? {
                ev?;
            }
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(900) && took < Duration::from_secs(3),
                "{took:?}"
            );

            // Streaming list: ADDED for the state, then the initial-events-end bookmark.
            let wp = WatchParams::default().initial_events();
            let mut s = api.watch(&wp, "").await?.boxed();
            let mut added = Vec::new();
            loop {
                match next(&mut s).await? {
                    WatchEvent::Added(n) => added.push(name_of(&n)),
                    WatchEvent::Bookmark(b) => {
                        assert!(
                            b.metadata
                                .annotations
                                .contains_key("k8s.io/initial-events-end")
                        );
                        break;
                    }
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
            assert_eq!(added, ["n1", "n2"]);

            // kube's streaming-list watcher works too.
            let mut w = watcher(api, watcher::Config::default().streaming_lists()).boxed();
            expect_events(
                &mut w,
                &["Init", "InitApply(n1)", "InitApply(n2)", "InitDone"],
            )
            .await?;
            f.server.delete("Node", None, "n1")?;
            expect_events(&mut w, &["Delete(n1)"]).await?;
            Ok(())
        })
    }

    #[test]
    fn pagination_with_limit_and_continue() -> anyhow::Result<()> {
        let f = fixture()?;
        for i in 0..5 {
            f.server
                .create(svc("default", &format!("svc-{i}"), json!({})))?;
        }
        f.server.create(svc("zzz", "elsewhere", json!({})))?;
        block_on(async {
            let c = client(&f).await?;
            let api: Api<Service> = Api::namespaced(c.clone(), "default");
            let p1 = api.list(&ListParams::default().limit(2)).await?;
            assert_eq!(
                p1.items.iter().map(name_of).collect::<Vec<_>>(),
                ["svc-0", "svc-1"]
            );
            assert_eq!(p1.metadata.remaining_item_count, Some(3));
            let token = p1.metadata.continue_.clone().context("continue token")?;
            let list_rv = p1.metadata.resource_version.clone();

            // A change between pages; later pages keep the first page's RV.
            f.server.create(svc("default", "svc-9", json!({})))?;
            let p2 = api
                .list(&ListParams::default().limit(2).continue_token(&token))
                .await?;
            assert_eq!(
                p2.items.iter().map(name_of).collect::<Vec<_>>(),
                ["svc-2", "svc-3"]
            );
            assert_eq!(p2.metadata.resource_version, list_rv);
            let token = p2.metadata.continue_.clone().context("continue token")?;
            let p3 = api
                .list(&ListParams::default().limit(2).continue_token(&token))
                .await?;
            assert_eq!(
                p3.items.iter().map(name_of).collect::<Vec<_>>(),
                ["svc-4", "svc-9"]
            );
            assert!(p3.metadata.continue_.as_deref().unwrap_or("").is_empty());
            assert_eq!(p3.metadata.resource_version, list_rv);

            let err = api
                .list(&ListParams::default().limit(2).continue_token("not-a-token"))
                .await
                .err()
                .context("bad continue")?;
            assert_eq!(api_status(&err).map(|s| s.0), Some(400));

            // A paging watcher sees everything exactly once.
            let all: Api<Service> = Api::all(c);
            let mut w = watcher(all, watcher::Config::default().page_size(2)).boxed();
            let mut names = Vec::new();
            loop {
                match next(&mut w).await? {
                    watcher::Event::Init => {}
                    watcher::Event::InitApply(s) => names.push(name_of(&s)),
                    watcher::Event::InitDone => break,
                    ev => anyhow::bail!("unexpected {}", watcher_event_name(&ev)),
                }
            }
            assert_eq!(
                names,
                [
                    "svc-0",
                    "svc-1",
                    "svc-2",
                    "svc-3",
                    "svc-4",
                    "svc-9",
                    "elsewhere"
                ]
            );
            let pages = f
                .server
                .requests()
                .iter()
                .filter(|r| r.path.starts_with("/api/v1/services?") && r.path.contains("limit=2"))
                .count();
            assert_eq!(pages, 4);
            Ok(())
        })
    }

    #[test]
    fn writes_over_rest_and_stale_put_conflict() -> anyhow::Result<()> {
        let f = fixture()?;
        block_on(async {
            let api: Api<Service> = Api::namespaced(client(&f).await?, "default");
            let s: Service = serde_json::from_value(svc("default", "x", json!({})))?;
            let created = api.create(&PostParams::default(), &s).await?;
            assert!(created.metadata.uid.is_some());
            let err = api
                .create(&PostParams::default(), &s)
                .await
                .err()
                .context("dup")?;
            assert_eq!(api_status(&err), Some((409, "AlreadyExists".to_owned())));

            f.server.modify("Service", None, "x", |o| {
                o["metadata"]["labels"] = json!({ "a": "b" })
            })?;
            let mut stale = created.clone();
            stale.metadata.labels = Some([("c".to_owned(), "d".to_owned())].into());
            let err = api
                .replace("x", &PostParams::default(), &stale)
                .await
                .err()
                .context("stale")?;
            assert_eq!(api_status(&err), Some((409, "Conflict".to_owned())));

            let mut fresh = api.get("x").await?;
            fresh.metadata.labels = Some([("c".to_owned(), "d".to_owned())].into());
            let replaced = api.replace("x", &PostParams::default(), &fresh).await?;
            assert_eq!(
                replaced.metadata.resource_version,
                Some(f.server.resource_version().to_string())
            );
            assert_eq!(replaced.metadata.uid, created.metadata.uid);

            let err = api
                .replace("y", &PostParams::default(), &fresh)
                .await
                .err()
                .context("name mismatch")?;
            assert_eq!(api_status(&err).map(|s| s.0), Some(400));

            let patch = kube::api::Patch::Merge(
                json!({ "metadata": { "labels": { "c": null, "e": "f" } } }),
            );
            let patched = api
                .patch("x", &kube::api::PatchParams::default(), &patch)
                .await?;
            let labels = patched.metadata.labels.unwrap_or_default();
            assert_eq!(labels.get("e").map(String::as_str), Some("f"));
            assert!(!labels.contains_key("c"));

            api.delete("x", &Default::default()).await?;
            assert!(f.server.get("Service", None, "x").is_none());
            let err = api
                .delete("x", &Default::default())
                .await
                .err()
                .context("missing delete")?;
            assert_eq!(api_status(&err), Some((404, "NotFound".to_owned())));
            let err = api
                .replace("x", &PostParams::default(), &fresh)
                .await
                .err()
                .context("missing put")?;
            assert_eq!(api_status(&err), Some((404, "NotFound".to_owned())));
            Ok(())
        })
    }

    #[test]
    fn raw_http_statuses() -> anyhow::Result<()> {
        let f = fixture()?;
        let (code, body) = http(f.addr, "GET", "/api/v1/pods", None)?;
        assert_eq!(
            (code, body["kind"].as_str(), body["code"].as_u64()),
            (404, Some("Status"), Some(404))
        );
        let (code, _) = http(f.addr, "GET", "/api/v1/services/foo", None)?;
        assert_eq!(code, 404, "namespaced item needs a namespace");
        let (code, _) = http(f.addr, "GET", "/api/v1/namespaces/x/nodes", None)?;
        assert_eq!(code, 404);

        let body = svc("default", "a", json!({})).to_string();
        let (code, created) = http(
            f.addr,
            "POST",
            "/api/v1/namespaces/default/services",
            Some(&body),
        )?;
        assert_eq!(code, 201);
        assert_eq!(created["metadata"]["name"], "a");
        let (code, st) = http(
            f.addr,
            "POST",
            "/api/v1/namespaces/default/services",
            Some(&body),
        )?;
        assert_eq!((code, st["reason"].as_str()), (409, Some("AlreadyExists")));
        let (code, st) = http(
            f.addr,
            "POST",
            "/api/v1/namespaces/other/services",
            Some(&body),
        )?;
        assert_eq!((code, st["reason"].as_str()), (400, Some("BadRequest")));
        let (code, _) = http(
            f.addr,
            "POST",
            "/api/v1/namespaces/default/services",
            Some("{"),
        )?;
        assert_eq!(code, 400);
        let (code, st) = http(
            f.addr,
            "DELETE",
            "/api/v1/namespaces/default/services/zz",
            None,
        )?;
        assert_eq!((code, st["reason"].as_str()), (404, Some("NotFound")));
        let (code, deleted) = http(
            f.addr,
            "DELETE",
            "/api/v1/namespaces/default/services/a",
            None,
        )?;
        assert_eq!((code, deleted["kind"].as_str()), (200, Some("Service")));

        // Discovery.
        let (code, v) = http(f.addr, "GET", "/version", None)?;
        assert_eq!((code, v["major"].as_str()), (200, Some("1")));
        let (_, v) = http(f.addr, "GET", "/apis/discovery.k8s.io/v1", None)?;
        assert_eq!(v["resources"][0]["name"], "endpointslices");
        let (_, v) = http(f.addr, "GET", "/api/v1", None)?;
        assert_eq!(v["resources"].as_array().map(Vec::len), Some(3)); // services, nodes, events

        // List document shape.
        f.server.create(slice("default", "s", "svc", "10.0.0.1"))?;
        let (code, list) = http(
            f.addr,
            "GET",
            "/apis/discovery.k8s.io/v1/endpointslices",
            None,
        )?;
        assert_eq!(code, 200);
        assert_eq!(list["kind"], "EndpointSliceList");
        assert_eq!(list["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(list["items"][0]["kind"], "EndpointSlice");
        assert_eq!(list["items"][0]["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(
            list["metadata"]["resourceVersion"],
            f.server.resource_version().to_string()
        );

        // Outage.
        f.server.set_available(false);
        let (code, st) = http(f.addr, "GET", "/api/v1/nodes", None)?;
        assert_eq!(
            (code, st["reason"].as_str()),
            (503, Some("ServiceUnavailable"))
        );
        f.server.set_available(true);
        let (code, _) = http(f.addr, "GET", "/api/v1/nodes", None)?;
        assert_eq!(code, 200);
        let last = f.server.requests().pop().context("recorded")?;
        assert_eq!(
            last,
            RequestRecord {
                method: "GET".into(),
                path: "/api/v1/nodes".into(),
                status: 200
            }
        );
        Ok(())
    }

    #[test]
    fn watch_streams_end_on_disconnect_outage_and_timeout() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.create(node("n1"))?;
        let wait_watches = |n: usize| -> anyhow::Result<()> {
            let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
            while f.server.active_watches() != n {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "watch count never reached {n}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(())
        };

        // Client disconnect frees the watcher.
        let mut r = send_request(f.addr, "GET", "/api/v1/nodes?watch=true", None)?;
        let (code, chunked, _) = read_head(&mut r)?;
        assert_eq!((code, chunked), (200, true));
        let first = read_chunk(&mut r)?.context("first event")?;
        let ev: Value = serde_json::from_str(first.trim())?;
        assert_eq!(
            (ev["type"].as_str(), ev["object"]["kind"].as_str()),
            (Some("ADDED"), Some("Node"))
        );
        wait_watches(1)?;
        drop(r);
        wait_watches(0)?;

        // An outage ends open streams cleanly.
        let rv = f.server.resource_version();
        let mut r = send_request(
            f.addr,
            "GET",
            &format!("/api/v1/nodes?watch=1&resourceVersion={rv}"),
            None,
        )?;
        assert_eq!(read_head(&mut r)?.0, 200);
        wait_watches(1)?;
        f.server.set_available(false);
        assert_eq!(read_chunk(&mut r)?, None, "stream must end");
        wait_watches(0)?;
        f.server.set_available(true);

        // timeoutSeconds ends the stream.
        let mut r = send_request(
            f.addr,
            "GET",
            &format!("/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
            None,
        )?;
        assert_eq!(read_head(&mut r)?.0, 200);
        let t = std::time::Instant::now();
        assert_eq!(read_chunk(&mut r)?, None);
        assert!(t.elapsed() < Duration::from_secs(3));
        wait_watches(0)?;

        // Bad parameters.
        let (code, _) = http(
            f.addr,
            "GET",
            "/api/v1/nodes?watch=true&resourceVersion=abc",
            None,
        )?;
        assert_eq!(code, 400);
        Ok(())
    }

    #[test]
    fn authorizer_denies_with_403() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.create(node("node-a"))?;
        let seen = Arc::new(Mutex::new(Vec::<RequestAttributes>::new()));
        let seen2 = seen.clone();
        f.server
            .set_authorizer(Some(Arc::new(move |a: &RequestAttributes| {
                lock(&seen2).push(a.clone());
                a.resource != "endpointslices"
            })));
        block_on(async {
            let c = client(&f).await?;
            let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), "default");
            let err = slices
                .list(&ListParams::default())
                .await
                .err()
                .context("denied")?;
            assert_eq!(api_status(&err), Some((403, "Forbidden".to_owned())));
            let nodes: Api<Node> = Api::all(c);
            let l = nodes
                .list(&ListParams::default().fields("metadata.name=node-a"))
                .await?;
            assert_eq!(l.items.len(), 1);
            Ok(())
        })?;
        let denied = f.server.take_denied_requests();
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert_eq!(denied[0].resource, "endpointslices");
        let seen = lock(&seen).clone();
        assert_eq!(
            seen,
            [
                RequestAttributes {
                    verb: "list".into(),
                    api_group: "discovery.k8s.io".into(),
                    api_version: "v1".into(),
                    resource: "endpointslices".into(),
                    subresource: None,
                    namespace: Some("default".into()),
                    name: None,
                    token: Some("fixture-token".into()),
                },
                RequestAttributes {
                    verb: "list".into(),
                    api_group: "".into(),
                    api_version: "v1".into(),
                    resource: "nodes".into(),
                    subresource: None,
                    namespace: None,
                    name: Some("node-a".into()),
                    token: Some("fixture-token".into()),
                },
            ]
        );
        f.server.set_authorizer(None);
        let (code, _) = http(
            f.addr,
            "GET",
            "/apis/discovery.k8s.io/v1/endpointslices",
            None,
        )?;
        assert_eq!(code, 200);
        Ok(())
    }

    #[test]
    fn serves_several_listeners_and_kubectl() -> anyhow::Result<()> {
        let f = fixture()?;
        f.server.apply_yaml(BASIC_YAML)?;
        let second = f.server.serve(StdTcpListener::bind("127.0.0.1:0")?)?;
        assert_ne!(second, f.addr);
        let (code, list) = http(second, "GET", "/api/v1/nodes", None)?;
        assert_eq!(
            (code, list["items"].as_array().map(Vec::len)),
            (200, Some(2))
        );

        let kubectl = Path::new("/usr/bin/kubectl");
        if !kubectl.exists() {
            eprintln!("kubectl not installed; skipping the kubectl part");
            return Ok(());
        }
        let run = |args: &[&str]| -> anyhow::Result<String> {
            let out = std::process::Command::new(kubectl)
                .arg("--kubeconfig")
                .arg(&f.kubeconfig)
                .args(args)
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        assert_eq!(
            run(&["get", "svc", "-o", "name"])?,
            "service/web\nservice/web-nodeport\n"
        );
        let table = run(&["get", "svc", "-A"])?;
        assert!(
            table.contains("not-ours") && table.contains("web-nodeport"),
            "{table}"
        );
        assert_eq!(
            run(&[
                "get",
                "nodes",
                "--field-selector",
                "metadata.name=node-b",
                "-o",
                "name"
            ])?,
            "node/node-b\n"
        );
        assert_eq!(
            run(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
                "-o",
                "name"
            ])?,
            "endpointslice.discovery.k8s.io/web-abc12\n"
        );
        let json: Value = serde_json::from_str(&run(&["get", "svc", "web", "-o", "json"])?)?;
        assert_eq!(json["spec"]["clusterIP"], "10.96.0.10");
        run(&["label", "svc", "web", "extra=yes"])?;
        let web = f.server.get("Service", None, "web").context("web")?;
        assert_eq!(web["metadata"]["labels"]["extra"], "yes");
        run(&["delete", "svc", "web-nodeport"])?;
        assert!(f.server.get("Service", None, "web-nodeport").is_none());
        Ok(())
    }
}
