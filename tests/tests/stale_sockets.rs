//! Stale UDP sockets (docs/service-behaviours.md, socket LB): socket LB
//! translates a connected UDP socket's ClusterIP once, at connect(), so
//! without help the socket keeps the backend it got after that backend left
//! the service. With `--bpf-lb-sock-terminate` (the default) the agent
//! destroys such sockets once the maps no longer offer the backend; a
//! client that reconnects on the error reaches the new backend.
//!
//! Clients are `podclient --resolver-secs` processes (one connected UDP
//! socket, a query every 20 ms, a new socket after an error) in a pod's
//! netns and in node1's own netns, both in node1's test cgroup where the
//! agent's socket hooks are attached. The service's only backend is
//! replaced (the EndpointSlice moves from pod-1-2 to pod-2-1); pod-1-2's
//! server keeps answering, so where each query went shows in its reply.
//!
//! `destroy_on`: every client reaches pod-2-1 within 1 s of the change and
//! nothing reaches pod-1-2 after that. `destroy_off` (the same with
//! `--bpf-lb-sock-terminate false`): the clients keep their old backend.
//! `service_deleted_*`: the service itself goes; with the destroy on the
//! client's socket fails within 1 s (and nothing answers any more), with it
//! off the socket keeps talking to the old backend. `tcp_*`: an
//! established TCP connection through the ClusterIP is aborted
//! (ECONNABORTED) within 1 s with `--bpf-lb-sock-terminate-tcp`, and kept
//! without it (the default). `ipv6_*`: the UDP case over an IPv6
//! ClusterIP.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proxy_tests::scenario::{
    ClientResult, Endpoint, EndpointSlice, ErrorKind, PodClient, Protocol, Request, RunningClient,
    Scenario, SocketLb, StreamResult, until_backends,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 201, 53);
const PORT: u16 = 53;
const TARGET: u16 = 5353;
/// How long each resolver runs; the backend changes after [`SWITCH_AFTER`].
const RUN: Duration = Duration::from_secs(5);
const SWITCH_AFTER: Duration = Duration::from_millis(1500);
/// The bound the issue sets: a reconnect reaches a live backend within it.
const WITHIN: Duration = Duration::from_secs(1);
/// How much later than the test's clock a client's may start.
const CLOCK_MARGIN: Duration = Duration::from_millis(100);

/// TCP port of the service (a sink behind it: `podclient --hold-secs`).
const TCP_PORT: u16 = 70;
const TCP_TARGET: u16 = 7000;

fn slice(backend: (usize, usize), s: &Scenario) -> EndpointSlice {
    EndpointSlice::new("dns-1", "dns")
        .port(Some("dns"), TARGET, Protocol::Udp)
        .port(Some("hold"), TCP_TARGET, Protocol::Tcp)
        .endpoint(Endpoint::ready(s.pod(backend.0, backend.1)))
}

fn setup(destroy: bool) -> Scenario {
    let flag = if destroy { "true" } else { "false" };
    setup_with(&["--bpf-lb-sock-terminate", flag])
}

fn setup_with(args: &[&str]) -> Scenario {
    let s = Scenario::builder("stale", SocketLb::On)
        .udp_server((1, 2), TARGET)
        .udp_server((2, 1), TARGET)
        .tcp_sink((1, 2), TCP_TARGET)
        .tcp_sink((2, 1), TCP_TARGET)
        .object(
            &proxy_tests::scenario::Service::cluster_ip("dns", VIP)
                .udp("dns", PORT, TARGET)
                .tcp("hold", TCP_PORT, TCP_TARGET),
        )
        .agent_args(args)
        .build()
        .expect("scenario");
    s.apply(&slice((1, 2), &s));
    let c = s.client(1, 1);
    until_backends(
        &c,
        &Request::udp(SocketAddr::from((VIP, PORT))).count(5),
        &["pod-1-2"],
        Duration::from_secs(8),
    );
    s
}

/// A client in node1's own netns (the host), in node1's cgroup.
fn host_client(s: &Scenario) -> PodClient {
    let node = &s.cluster.nodes()[0];
    PodClient {
        pod_name: node.name.clone(),
        ip: node.underlay_ip,
        netns_path: node.ns.path(),
        cgroup_path: s.cgroup(1).path().to_owned(),
    }
}

fn resolver(c: &PodClient) -> RunningClient {
    resolver_to(c, SocketAddr::from((VIP, PORT)))
}

fn resolver_to(c: &PodClient, to: SocketAddr) -> RunningClient {
    c.spawn(&[
        "--proto".into(),
        "udp".into(),
        "--to".into(),
        to.to_string(),
        "--resolver-secs".into(),
        RUN.as_secs_f64().to_string(),
        "--interval-ms".into(),
        "20".into(),
        "--timeout-ms".into(),
        "200".into(),
    ])
    .expect("spawn resolver")
}

/// Start both resolvers, replace the backend after [`SWITCH_AFTER`];
/// returns each client's queries and the change's time on the clients'
/// clock (an upper bound: the clients started a little after `t0`).
fn run(s: &Scenario) -> (Vec<(String, Vec<ClientResult>)>, Duration) {
    let clients = [s.client(1, 1), host_client(s)];
    let t0 = Instant::now();
    let running: Vec<_> = clients.iter().map(resolver).collect();
    std::thread::sleep(SWITCH_AFTER);
    let switched = t0.elapsed();
    s.apply(&slice((2, 1), s));
    let results = clients
        .iter()
        .zip(running)
        .map(|(c, r)| {
            let rs: Vec<ClientResult> = r.wait(RUN + Duration::from_secs(5)).expect("resolver");
            (c.pod_name.clone(), rs)
        })
        .collect();
    (results, switched)
}

fn answered_by<'a>(rs: &'a [ClientResult], name: &str) -> impl Iterator<Item = &'a ClientResult> {
    rs.iter().filter(move |r| r.ok && r.backend() == Some(name))
}

fn summary(rs: &[ClientResult]) -> String {
    rs.iter()
        .map(|r| match (r.ok, r.backend()) {
            (true, Some(b)) => format!("{:.0}ms {b}", r.elapsed_ms),
            _ => format!("{:.0}ms {r}", r.elapsed_ms),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn destroy_on_connected_udp_clients_reach_the_new_backend_within_1s() {
    let s = setup(true);
    let (results, switched) = run(&s);
    for (who, rs) in &results {
        assert!(
            answered_by(rs, "pod-1-2").any(|r| r.elapsed() < switched),
            "{who}: the old backend answered before the change: {}",
            summary(rs)
        );
        let first_new = answered_by(rs, "pod-2-1")
            .next()
            .unwrap_or_else(|| panic!("{who}: never reached pod-2-1: {}", summary(rs)));
        let took = first_new.elapsed().saturating_sub(switched);
        eprintln!("{who}: first answer from pod-2-1 {took:?} after the change");
        // The client's clock starts when it runs, a few ms after `t0`:
        // `took` may be short by that much, hence the margin.
        assert!(
            took + CLOCK_MARGIN < WITHIN,
            "{who}: took {took:?}: {}",
            summary(rs)
        );
        // Nothing reaches the old backend once the new one answered.
        assert!(
            !answered_by(rs, "pod-1-2").any(|r| r.elapsed() > first_new.elapsed()),
            "{who}: the old backend answered after the new one: {}",
            summary(rs)
        );
        // The socket was destroyed: between the old backend's last answer
        // and the new one's first, the client saw an error and reconnected
        // (a new local port).
        let last_old = answered_by(rs, "pod-1-2")
            .map(ClientResult::elapsed)
            .max()
            .unwrap_or_default();
        let failed = rs
            .iter()
            .find(|r| !r.ok && r.elapsed() >= last_old && r.elapsed() <= first_new.elapsed())
            .unwrap_or_else(|| panic!("{who}: no error before the new backend: {}", summary(rs)));
        eprintln!("{who}: the error: {failed}");
        assert_ne!(failed.local, first_new.local, "{who}: a new socket");
    }
    let log = std::fs::read_to_string(&s.agent(1).log_path).unwrap_or_default();
    assert!(log.contains("stale sockets destroyed"), "agent log:\n{log}");
    for l in log.lines().filter(|l| l.contains("stale sockets")) {
        eprintln!("agent: {l}");
    }
}

#[test]
fn destroy_off_connected_udp_clients_keep_the_old_backend() {
    let s = setup(false);
    let (results, switched) = run(&s);
    for (who, rs) in &results {
        let late: Vec<_> = rs
            .iter()
            .filter(|r| r.elapsed() > switched + WITHIN)
            .collect();
        assert!(!late.is_empty(), "{who}: {}", summary(rs));
        assert!(
            late.iter().all(|r| r.ok && r.backend() == Some("pod-1-2")),
            "{who}: without destroy the socket keeps its backend: {}",
            summary(rs)
        );
    }
}

/// A pod resolver for [`RUN`]; the service is deleted after
/// [`SWITCH_AFTER`]. Returns the queries and the deletion's time.
fn run_and_delete_service(s: &Scenario) -> (Vec<ClientResult>, Duration) {
    let c = s.client(1, 1);
    let t0 = Instant::now();
    let running = resolver(&c);
    std::thread::sleep(SWITCH_AFTER);
    let deleted = t0.elapsed();
    s.delete("Service", "dns");
    let rs = running
        .wait(RUN + Duration::from_secs(5))
        .expect("resolver");
    (rs, deleted)
}

#[test]
fn service_deleted_destroy_on_the_connected_socket_fails() {
    let s = setup(true);
    let (rs, deleted) = run_and_delete_service(&s);
    assert!(
        answered_by(&rs, "pod-1-2").any(|r| r.elapsed() < deleted),
        "{}",
        summary(&rs)
    );
    // An error of the socket itself (not a timeout, not a reply from an
    // unexpected source), from the deletion on.
    let failed = rs
        .iter()
        .find(|r| {
            r.reply.is_none()
                && r.error.is_some_and(|e| e != ErrorKind::TimedOut)
                && r.elapsed() + CLOCK_MARGIN >= deleted
        })
        .unwrap_or_else(|| panic!("no error after the deletion: {}", summary(&rs)));
    assert!(
        failed.elapsed() + CLOCK_MARGIN < deleted + WITHIN,
        "{failed}: {}",
        summary(&rs)
    );
    // Nothing reaches the old backend after that.
    assert!(
        !rs.iter()
            .any(|r| r.reply.is_some() && r.elapsed() > failed.elapsed()),
        "answered after the socket failed: {}",
        summary(&rs)
    );
}

#[test]
fn service_deleted_destroy_off_the_connected_socket_keeps_its_backend() {
    let s = setup(false);
    let (rs, deleted) = run_and_delete_service(&s);
    let late: Vec<_> = rs
        .iter()
        .filter(|r| r.elapsed() > deleted + WITHIN)
        .collect();
    assert!(!late.is_empty(), "{}", summary(&rs));
    // Its datagrams still reach the old backend. The replies come back
    // from the pod's address now (WrongSource): the deleted frontend's
    // reverse entries are gone, so recvmsg() no longer shows the ClusterIP.
    assert!(
        late.iter().all(|r| r.backend() == Some("pod-1-2")),
        "{}",
        summary(&rs)
    );
}

/// A TCP stream (a chunk every 50 ms, to a sink) through the ClusterIP
/// while the backend is replaced; returns it and the change's time.
fn hold_across_the_change(s: &Scenario) -> (StreamResult, Duration) {
    let c = s.client(1, 1);
    let t0 = Instant::now();
    let running = c
        .spawn_hold(SocketAddr::from((VIP, TCP_PORT)), 3.0, 1)
        .expect("hold");
    std::thread::sleep(SWITCH_AFTER);
    let switched = t0.elapsed();
    s.apply(&slice((2, 1), s));
    let mut rs: Vec<StreamResult> = running.wait(Duration::from_secs(8)).expect("hold");
    assert_eq!(rs.len(), 1);
    (rs.remove(0), switched)
}

/// `--bpf-lb-sock-terminate-tcp`: the connection to the removed backend
/// is aborted within 1 s (ECONNABORTED).
#[test]
fn tcp_flag_on_the_connection_to_the_removed_backend_is_aborted() {
    let s = setup_with(&["--bpf-lb-sock-terminate-tcp"]);
    let (r, switched) = hold_across_the_change(&s);
    eprintln!("stream: {r:?}");
    assert!(!r.ok, "the connection survived: {r:?}");
    let at = Duration::from_secs_f64(r.elapsed_ms / 1000.0);
    assert!(
        at + CLOCK_MARGIN >= switched && at + CLOCK_MARGIN < switched + WITHIN,
        "failed at {at:?}, the change at {switched:?}: {r:?}"
    );
    let detail = r.detail.as_deref().unwrap_or("");
    assert!(detail.contains("os error 103"), "ECONNABORTED: {r:?}");
    assert!(r.sent > 0, "{r:?}");
}

/// TCP is not destroyed by default: the established connection keeps its
/// (removed, still running) backend.
#[test]
fn tcp_by_default_the_connection_keeps_its_backend() {
    let s = setup(true);
    let (r, _) = hold_across_the_change(&s);
    assert!(r.ok, "{r:?}");
}

/// The same over IPv6 (an IPv6-only ClusterIP: `SOCK_RNAT_V6`, the
/// iterator's IPv6 branch), from a pod.
#[test]
fn ipv6_destroy_on_connected_udp_clients_reach_the_new_backend_within_1s() {
    let vip6 = std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0xc9, 0x53);
    let to = SocketAddr::from((vip6, PORT));
    let slice6 = |s: &Scenario, (i, j): (usize, usize)| {
        let p = s.pod(i, j);
        EndpointSlice::new("dns6-1", "dns6")
            .ipv6()
            .port(Some("dns"), TARGET, Protocol::Udp)
            .endpoint(Endpoint::ready(p).ipv6(p))
    };
    let s = Scenario::builder("stale6", SocketLb::On)
        .dual_stack_servers()
        .udp_server((1, 2), TARGET)
        .udp_server((2, 1), TARGET)
        .object(&proxy_tests::scenario::Service::cluster_ip("dns6", vip6).udp("dns", PORT, TARGET))
        .build()
        .expect("scenario");
    s.apply(&slice6(&s, (1, 2)));
    let c = s.client(1, 1);
    // (The harness' `until_backends` checks an IPv4 client address.)
    proxy_tests::scenario::eventually(Duration::from_secs(8), || {
        let rs = c
            .run(&Request::udp(to).count(3))
            .map_err(|e| e.to_string())?;
        if rs.iter().all(|r| r.ok && r.backend() == Some("pod-1-2")) {
            Ok(())
        } else {
            Err(summary(&rs))
        }
    });
    let t0 = Instant::now();
    let running = resolver_to(&c, to);
    std::thread::sleep(SWITCH_AFTER);
    let switched = t0.elapsed();
    s.apply(&slice6(&s, (2, 1)));
    let rs: Vec<ClientResult> = running
        .wait(RUN + Duration::from_secs(5))
        .expect("resolver");
    let first_new = answered_by(&rs, "pod-2-1")
        .next()
        .unwrap_or_else(|| panic!("never reached pod-2-1: {}", summary(&rs)));
    let took = first_new.elapsed().saturating_sub(switched);
    eprintln!("IPv6: first answer from pod-2-1 {took:?} after the change");
    assert!(
        took + CLOCK_MARGIN < WITHIN,
        "took {took:?}: {}",
        summary(&rs)
    );
    assert!(
        !answered_by(&rs, "pod-1-2").any(|r| r.elapsed() > first_new.elapsed()),
        "{}",
        summary(&rs)
    );
}
