//! The agent's HTTP endpoints, on kube-proxy's addresses and paths:
//! `--healthz-bind-address` (default `0.0.0.0:10256`) serves `/healthz` and
//! `/livez`; `--metrics-bind-address` (default `127.0.0.1:10249`) serves
//! `/metrics` and `/proxyMode` (and `/healthz`, `/livez` too, as
//! kube-proxy's metrics server does).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
    time::Sleep,
};
use tracing::{debug, info, warn};

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

/// Connections one server (listening socket) handles at once; further
/// clients wait in the kernel's accept backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection's reads must be done within this time from accept: idle
/// or slow clients do not keep a connection slot.
pub const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Longest pause after a failing `accept` (the pause doubles from 10 ms
/// per consecutive failure): no busy loop when, say, file descriptors run
/// out.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A listener that accepts a connection only while fewer than `max` are
/// open, backs off on accept errors, and gives every connection a read
/// deadline. What every HTTP server of the agent listens with.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    read_deadline: Duration,
    backoff: Duration,
}

impl BoundedListener {
    pub fn new(inner: TcpListener, max: usize, read_deadline: Duration) -> BoundedListener {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
            read_deadline,
            backoff: Duration::ZERO,
        }
    }

    /// The connection slots (available permits: free slots).
    pub fn slots(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }
}

/// Errors of one connection (the client went away before it was
/// accepted): accept the next one at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (BoundedConn, SocketAddr) {
        // Never closed: the listener owns it.
        let permit = loop {
            if let Ok(p) = self.permits.clone().acquire_owned().await {
                break p;
            }
        };
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    self.backoff = Duration::ZERO;
                    let conn = BoundedConn {
                        stream,
                        deadline: Box::pin(tokio::time::sleep(self.read_deadline)),
                        _permit: permit,
                    };
                    return (conn, addr);
                }
                Err(e) if is_connection_error(&e) => debug!(error = %e, "accept"),
                Err(e) => {
                    self.backoff = (self.backoff * 2)
                        .max(Duration::from_millis(10))
                        .min(MAX_ACCEPT_BACKOFF);
                    warn!(error = %e, backoff = ?self.backoff, "accept failed");
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection holding its slot until dropped; reads fail with
/// `TimedOut` after the listener's read deadline.
pub struct BoundedConn {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for BoundedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serve `router` on an open listener with the agent's bounds
/// ([`MAX_CONNECTIONS`], [`READ_DEADLINE`], accept backoff): `/healthz`,
/// `/metrics` and the health-check node ports alike.
pub async fn serve(listener: TcpListener, router: Router) -> io::Result<()> {
    axum::serve(
        BoundedListener::new(listener, MAX_CONNECTIONS, READ_DEADLINE),
        router,
    )
    .await
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
                    if let Err(e) = serve(listener, router.clone()).await {
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

    /// Idle clients beyond the bound wait in the backlog instead of each
    /// getting a task; the read deadline frees their slots, so a real
    /// request behind them is served without any of them closing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_bounded_and_idle_ones_time_out() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let listener = BoundedListener::new(tcp, 3, Duration::from_millis(400));
        let slots = listener.slots();
        let router = Router::new().route("/x", get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let mut idle = Vec::new();
        for _ in 0..9 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(slots.available_permits(), 0, "3 of 9 idle clients accepted");
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out))
            .await
            .expect("served within 10 s")
            .expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("ok"), "{out}");
        // The idle clients were closed by the server.
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf))
            .await
            .expect("closed within 5 s");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Every connection gone; the listener's pending accept holds one.
        assert_eq!(slots.available_permits(), 2, "slots free again");
        server.abort();
    }

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
