//! Health-check node ports for `externalTrafficPolicy: Local` services, as
//! kube-proxy serves them: an HTTP listener on `healthCheckNodePort` that
//! answers 200 while this node has a ready local endpoint of the service and
//! 503 otherwise (also when only terminating ones remain), with kube-proxy's
//! JSON body, so cloud load balancers send traffic only to nodes that can
//! serve it locally.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::model::ServiceTable;

/// What a health-check port reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready (not terminating) endpoints on this node.
    pub local_endpoints: usize,
}

/// Health-check port -> what it reports, from the desired table.
pub fn desired(table: &ServiceTable) -> BTreeMap<u16, ServiceHealth> {
    let mut out: BTreeMap<u16, (ServiceHealth, Vec<IpAddr>)> = BTreeMap::new();
    for sp in table.services.values() {
        let Some(port) = sp.health_check_node_port else {
            continue;
        };
        let entry = out.entry(port).or_insert_with(|| {
            (
                ServiceHealth {
                    namespace: sp.name.namespace.clone(),
                    name: sp.name.name.clone(),
                    local_endpoints: 0,
                },
                Vec::new(),
            )
        });
        for e in &sp.endpoints {
            if e.local && e.ready && !e.terminating && !entry.1.contains(&e.ip) {
                entry.1.push(e.ip);
            }
        }
    }
    out.into_iter()
        .map(|(port, (mut h, ips))| {
            h.local_endpoints = ips.len();
            (port, h)
        })
        .collect()
}

/// Status and JSON body for a health state, as kube-proxy answers (any
/// path): 200 with a ready local endpoint, 503 without.
pub fn answer(h: &ServiceHealth) -> (StatusCode, String) {
    let body = serde_json::json!({
        "service": {"namespace": h.namespace, "name": h.name},
        "localEndpoints": h.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if h.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

type State = Arc<RwLock<BTreeMap<u16, ServiceHealth>>>;

/// The router of one health-check port: every path answers [`answer`] for
/// the port's current state.
pub fn router(state: State, port: u16) -> Router {
    Router::new().fallback(move || {
        let state = state.clone();
        async move {
            let h = state
                .read()
                .ok()
                .and_then(|s| s.get(&port).cloned())
                .unwrap_or_default();
            let (status, body) = answer(&h);
            let r: Response = (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                body,
            )
                .into_response();
            r
        }
    })
}

/// The listeners, one per health-check port, kept in line with the table.
#[derive(Default)]
pub struct HealthServers {
    state: Arc<RwLock<BTreeMap<u16, ServiceHealth>>>,
    listeners: HashMap<u16, JoinHandle<()>>,
}

impl HealthServers {
    /// Update what every port reports; open new ports, close gone ones.
    /// Must run inside a tokio runtime.
    pub async fn sync(&mut self, desired: BTreeMap<u16, ServiceHealth>) {
        self.update(
            true,
            desired.into_iter().map(|(p, h)| (p, Some(h))).collect(),
        )
        .await;
    }

    /// Apply what a sync changed: `(port, Some(state))` opens or updates a
    /// port, `(port, None)` closes it; with `reset` every port not listed
    /// closes. Ports that failed to open are retried when listed again.
    /// Must run inside a tokio runtime.
    pub async fn update(&mut self, reset: bool, changes: Vec<(u16, Option<ServiceHealth>)>) {
        let mut open: Vec<u16> = Vec::new();
        let mut closed: Vec<u16> = Vec::new();
        {
            let mut s = match self.state.write() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            if reset {
                s.clear();
            }
            for (port, h) in changes {
                match h {
                    Some(h) => {
                        s.insert(port, h);
                        open.push(port);
                    }
                    None => {
                        s.remove(&port);
                        closed.push(port);
                    }
                }
            }
            if reset {
                closed.extend(self.listeners.keys().filter(|p| !s.contains_key(p)));
            }
        }
        for port in closed {
            if let Some(task) = self.listeners.remove(&port) {
                task.abort();
                info!(port, "health-check node port closed");
            }
        }
        for port in open {
            if self.listeners.contains_key(&port) {
                continue;
            }
            match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await {
                Ok(listener) => {
                    info!(port, "health-check node port open");
                    // The same HTTP stack and bounds as /healthz.
                    let router = router(self.state.clone(), port);
                    self.listeners.insert(
                        port,
                        tokio::spawn(async move {
                            if let Err(e) = crate::http::serve(listener, router).await {
                                warn!(port, error = %e, "health-check node port failed");
                            }
                        }),
                    );
                }
                // Retried on a later sync that lists the port.
                Err(e) => warn!(port, error = %e, "cannot open health-check node port"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_follows_local_ready_endpoints() {
        let mut h = ServiceHealth {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let (status, body) = answer(&h);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            r#"{"localEndpoints":2,"service":{"name":"web","namespace":"default"},"serviceProxyHealthy":true}"#
        );
        h.local_endpoints = 0;
        assert_eq!(answer(&h).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
