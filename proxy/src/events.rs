//! Kubernetes Events (core/v1) for objects that cannot be programmed: one
//! Warning per distinct problem (object, field, value, reason) while it
//! lasts, posted in the background through a token bucket so a flood of bad
//! objects cannot flood the API server. A problem that goes away and comes
//! back is reported again. Warnings about the agent's own node (a full
//! eBPF map: [`crate::pressure`]) go to its Node object through the same
//! bucket.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tracing::{info, warn};

use crate::{metrics::Telemetry, model::ModelError};

/// `source.component` / `reportingComponent` of our Events.
pub const COMPONENT: &str = "kube-proxy-ebpf";
/// `reason` of our Events.
pub const REASON: &str = "FailedToProgram";

/// Token bucket: at most `burst` Events at once, then one per `refill`.
const BURST: f64 = 25.0;
const REFILL: Duration = Duration::from_secs(3);

type Key = (String, String, String, String, String);

fn key(e: &ModelError) -> Key {
    (
        e.kind.to_owned(),
        e.object.clone(),
        e.field.clone(),
        e.value.clone(),
        e.reason.clone(),
    )
}

/// The Event for a model error (pure; the namespace it goes to is the
/// object's, `default` for cluster-scoped objects, as kubelet does for Nodes).
pub fn event_for(e: &ModelError, node: &str, now: Timestamp) -> Event {
    let (namespace, name) = match e.object.split_once('/') {
        Some((ns, n)) => (Some(ns.to_owned()), n.to_owned()),
        None => (None, e.object.clone()),
    };
    let api_version = match e.kind {
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    };
    let message = format!(
        "cannot program {} {}: field {} = {:?}: {}",
        e.kind, e.object, e.field, e.value, e.reason
    );
    warning(
        namespace.clone().unwrap_or_else(|| "default".to_owned()),
        ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(e.kind.to_owned()),
            name: Some(name),
            namespace,
            field_path: Some(e.field.clone()),
            ..Default::default()
        },
        REASON,
        message,
        node,
        now,
    )
}

/// A Warning Event about node `node` itself (as kubelet posts them: in
/// `default`, the Node's name as its uid so `kubectl describe node` shows
/// it).
pub fn node_event(node: &str, reason: &str, message: &str, now: Timestamp) -> Event {
    warning(
        "default".to_owned(),
        ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            uid: Some(node.to_owned()),
            ..Default::default()
        },
        reason,
        message.to_owned(),
        node,
        now,
    )
}

/// A Warning Event about `involved`, in `namespace`, reported by this
/// node's agent.
fn warning(
    namespace: String,
    involved: ObjectReference,
    reason: &str,
    message: String,
    node: &str,
    now: Timestamp,
) -> Event {
    let name = involved.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            namespace: Some(namespace),
            ..Default::default()
        },
        involved_object: involved,
        reason: Some(reason.to_owned()),
        message: Some(message),
        type_: Some("Warning".to_owned()),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: Some(node.to_owned()),
        }),
        reporting_component: Some(COMPONENT.to_owned()),
        reporting_instance: Some(node.to_owned()),
        action: Some("Program".to_owned()),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        ..Default::default()
    }
}

/// Posts Events for model errors; call [`EventRecorder::report`] after
/// every sync with that sync's errors.
pub struct EventRecorder {
    client: Client,
    node: String,
    telemetry: Arc<Telemetry>,
    /// Problems reported (or being reported) and still present.
    reported: Arc<Mutex<HashSet<Key>>>,
    tokens: f64,
    last_refill: Instant,
}

impl EventRecorder {
    pub fn new(client: Client, node: String, telemetry: Arc<Telemetry>) -> EventRecorder {
        EventRecorder {
            client,
            node,
            telemetry,
            reported: Arc::default(),
            tokens: BURST,
            last_refill: Instant::now(),
        }
    }

    /// Take a token of the bucket (false: rate limited).
    fn token(&mut self) -> bool {
        let elapsed = self.last_refill.elapsed();
        self.tokens = (self.tokens + elapsed.as_secs_f64() / REFILL.as_secs_f64()).min(BURST);
        self.last_refill = Instant::now();
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Post a Warning Event about this agent's Node (the caller
    /// deduplicates: [`crate::pressure::PressureWatch`]). Must run inside
    /// a tokio runtime.
    pub fn warn_node(&mut self, reason: &'static str, message: String) {
        if !self.token() {
            warn!(reason, "Event rate limit reached; a Node Event is dropped");
            return;
        }
        let ev = node_event(&self.node, reason, &message, Timestamp::now());
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            match api.create(&PostParams::default(), &ev).await {
                Ok(_) => info!(reason, "posted Event {reason} on the Node"),
                Err(err) => {
                    warn!(reason, error = %err, "posting an Event failed");
                    telemetry.error("event", 1);
                }
            }
        });
    }

    /// Post an Event for each problem not reported yet (as far as the rate
    /// limit allows; the rest wait for a later sync) and forget problems
    /// that are gone. Must run inside a tokio runtime.
    pub fn report(&mut self, errors: &[ModelError]) {
        let current: HashSet<Key> = errors.iter().map(key).collect();
        let shared = self.reported.clone();
        let mut reported = match shared.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        reported.retain(|k| current.contains(k));
        for e in errors {
            let k = key(e);
            if reported.contains(&k) {
                continue;
            }
            if !self.token() {
                warn!("Event rate limit reached; remaining problems are reported later");
                break;
            }
            reported.insert(k.clone());
            let ev = event_for(e, &self.node, Timestamp::now());
            let ns = ev
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned());
            let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
            let reported = self.reported.clone();
            let telemetry = self.telemetry.clone();
            let object = format!("{} {}", e.kind, e.object);
            tokio::spawn(async move {
                match api.create(&PostParams::default(), &ev).await {
                    Ok(_) => info!(%object, "posted Event {REASON}"),
                    Err(err) => {
                        warn!(%object, error = %err, "posting an Event failed");
                        telemetry.error("event", 1);
                        // Try again on a later sync.
                        if let Ok(mut r) = reported.lock() {
                            r.remove(&k);
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_object_field_and_value() {
        let e = ModelError {
            kind: "Service",
            object: "default/web".into(),
            field: "spec.ports[0].port".into(),
            value: "70000".into(),
            reason: "not a port number".into(),
        };
        let ev = event_for(&e, "node1", Timestamp::UNIX_EPOCH);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(ev.involved_object.name.as_deref(), Some("web"));
        assert_eq!(ev.involved_object.kind.as_deref(), Some("Service"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        let msg = ev.message.unwrap_or_default();
        assert!(
            msg.contains("spec.ports[0].port") && msg.contains("70000"),
            "{msg}"
        );
        let node = ModelError {
            kind: "Node",
            object: "node1".into(),
            ..e
        };
        let ev = event_for(&node, "node1", Timestamp::UNIX_EPOCH);
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(ev.involved_object.namespace, None);
    }

    #[test]
    fn node_event_is_on_the_node() {
        let ev = node_event(
            "node1",
            "MapFull",
            "eBPF map SVC_V4 is full",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(ev.metadata.namespace.as_deref(), Some("default"));
        let o = &ev.involved_object;
        assert_eq!(
            (o.kind.as_deref(), o.name.as_deref(), o.namespace.as_deref()),
            (Some("Node"), Some("node1"), None)
        );
        assert_eq!(o.uid.as_deref(), Some("node1"));
        assert_eq!(ev.type_.as_deref(), Some("Warning"));
        assert_eq!(ev.reason.as_deref(), Some("MapFull"));
        assert_eq!(ev.message.as_deref(), Some("eBPF map SVC_V4 is full"));
    }
}
