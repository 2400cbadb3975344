//! The agent's HTTP endpoints, on kube-proxy's addresses and paths:
//! `--healthz-bind-address` (default `0.0.0.0:10256`) serves `/healthz` and
//! `/livez`; `--metrics-bind-address` (default `127.0.0.1:10249`) serves
//! `/metrics` and `/proxyMode` (and `/healthz`, `/livez` too, as
//! kube-proxy's metrics server does).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::metrics::{HealthAnswer, Telemetry};

/// Parse a bind address as kube-proxy accepts it: `ip:port`, or `ip` alone
/// (then `default_port`); the empty string disables the server.
pub fn parse_bind_address(s: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(Some(SocketAddr::new(ip, default_port)));
    }
    Err(format!("{s:?} is not an address (ip:port, or ip)"))
}

fn health(a: HealthAnswer) -> Response {
    let status = if a.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        a.body,
    )
        .into_response()
}

async fn healthz(State(t): State<Arc<Telemetry>>) -> Response {
    health(t.healthz())
}

async fn livez(State(t): State<Arc<Telemetry>>) -> Response {
    health(t.livez())
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> Response {
    // Reading the maps walks them: off the async workers.
    let text = match tokio::task::spawn_blocking(move || t.render()).await {
        Ok(text) => text,
        Err(e) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response();
        }
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn proxy_mode(State(t): State<Arc<Telemetry>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], t.mode().to_owned()).into_response()
}

/// `/healthz` and `/livez`.
pub fn healthz_router(t: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(t)
}

/// `/metrics`, `/proxyMode`, `/healthz`, `/livez`.
pub fn metrics_router(t: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(t)
}

/// Serve `router` on `addr` in the background. Binding is retried every 5 s
/// (as kube-proxy does) so a port still held by a previous agent does not
/// stop this one.
pub fn spawn(what: &'static str, addr: SocketAddr, router: Router) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => {
                    info!(%addr, "{what} server listening");
                    if let Err(e) = axum::serve(listener, router.clone()).await {
                        warn!(%addr, error = %e, "{what} server failed");
                    }
                }
                Err(e) => warn!(%addr, error = %e, "cannot listen for {what}; retrying in 5s"),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
}

/// Start the healthz and metrics servers (None: disabled).
pub fn start(
    t: Arc<Telemetry>,
    healthz: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
) -> Vec<JoinHandle<()>> {
    let mut v = Vec::new();
    if let Some(a) = healthz {
        v.push(spawn("healthz", a, healthz_router(t.clone())));
    }
    if let Some(a) = metrics {
        v.push(spawn("metrics", a, metrics_router(t)));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses() {
        assert_eq!(
            parse_bind_address("0.0.0.0:10256", 1),
            Ok(Some("0.0.0.0:10256".parse().expect("addr")))
        );
        assert_eq!(
            parse_bind_address("127.0.0.1", 10249),
            Ok(Some("127.0.0.1:10249".parse().expect("addr")))
        );
        assert_eq!(
            parse_bind_address("[::1]:9", 1),
            Ok(Some("[::1]:9".parse().expect("addr")))
        );
        assert_eq!(parse_bind_address("", 1), Ok(None));
        assert!(parse_bind_address("localhost:x", 1).is_err());
    }
}
