//! `podclient`: a test client run as its own process inside a pod's network
//! namespace and a test cgroup (see `proxy_tests::scenario`), so cgroup
//! socket hooks apply to it.
//!
//! Request mode: `--count N` sequential requests (TCP: connect, send
//! `"hi\n"`, read one line, and `getpeername()`; UDP: one datagram, one reply
//! that must come from `--to`). Prints one [`ClientResult`] JSON object per
//! request on stdout.
//!
//! Hold mode (`--hold-secs S --streams K`): K TCP connections, each sent a
//! small chunk every 50 ms for S seconds; prints one [`StreamResult`] per
//! stream with the bytes sent and acknowledged and how it ended.
//!
//! Failures of requests are reported in the JSON, not by the exit status
//! (which is non-zero only for usage errors).

use std::io::{BufRead as _, BufReader, ErrorKind as IoKind, Read as _, Write as _};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use proxy_tests::cluster::{setsockopt_int, sockaddr_any, socklen};
use proxy_tests::scenario::{ClientResult, ErrorKind, StreamResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

/// Sequential TCP/UDP requests (or long-lived TCP streams), JSON lines out.
#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_enum, default_value = "tcp")]
    proto: Proto,
    /// Destination (a ClusterIP:port or a pod IP:port; `[ip6]:port` for
    /// IPv6).
    #[arg(long)]
    to: SocketAddr,
    /// Number of sequential requests.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Bound of each request (connect + reply), or of each connect in hold mode.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Bind every request to its own explicit source port (a per-process
    /// random base plus the request index), so no two requests share a tuple.
    #[arg(long)]
    sport_spread: bool,
    /// Every request from this one source port (the same tuple each time,
    /// as a long-lived UDP flow has).
    #[arg(long, conflicts_with = "sport_spread")]
    sport: Option<u16>,
    /// Pause between requests.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Hold mode: keep TCP streams open and sending for this many seconds.
    #[arg(long)]
    hold_secs: Option<f64>,
    /// Hold mode: number of streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// UDP: connect() the socket to `--to` and use send/recv (the socket
    /// path's connect4 and recvmsg4 hooks) instead of sendto.
    #[arg(long)]
    udp_connected: bool,
    /// Resolver mode: for this many seconds, one connected UDP socket sends
    /// a query every `--interval-ms` and waits `--timeout-ms` for the
    /// answer, as a stub resolver does; an error from send or recv (not a
    /// timeout) closes it and the next query comes from a new socket
    /// connected to `--to`. One [`ClientResult`] per query; its
    /// `elapsed_ms` is the time since the run started, `local` the socket.
    #[arg(long, conflicts_with = "hold_secs")]
    resolver_secs: Option<f64>,
}

fn main() {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut out = std::io::stdout().lock();
    if let Some(secs) = args.hold_secs {
        if args.proto != Proto::Tcp {
            eprintln!("podclient: --hold-secs needs --proto tcp");
            std::process::exit(2);
        }
        let hold = Duration::from_secs_f64(secs.max(0.0));
        for r in hold_streams(args.to, args.streams, hold, timeout) {
            print_json(&mut out, &r);
        }
        return;
    }
    if let Some(secs) = args.resolver_secs {
        let interval = Duration::from_millis(args.interval_ms);
        resolver(
            &mut out,
            args.to,
            Duration::from_secs_f64(secs.max(0.0)),
            interval,
            timeout,
        );
        return;
    }
    let base = sport_base();
    for i in 0..args.count {
        if i > 0 && args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let sport = args.sport.or_else(|| {
            args.sport_spread
                .then(|| 20_000 + u16::try_from((usize::from(base) + i * 7) % 40_000).unwrap_or(0))
        });
        let r = match args.proto {
            Proto::Tcp => tcp_request(args.to, sport, timeout),
            Proto::Udp => udp_request(args.to, sport, timeout, args.udp_connected),
        };
        print_json(&mut out, &r);
    }
}

fn print_json(out: &mut impl std::io::Write, v: &impl serde::Serialize) {
    let line = serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"bad\":\"{e}\"}}"));
    // Flushed per line: a killed client still leaves complete results.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn sport_base() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u16::try_from((std::process::id().wrapping_mul(7919) ^ nanos) % 40_000).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
}

/// The same classification as `proxy_tests::cluster::ClientError`.
fn classify(e: &std::io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ErrorKind::Refused,
        Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => ErrorKind::TimedOut,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES | libc::EPERM) => {
            ErrorKind::Unreachable
        }
        Some(libc::ECONNRESET | libc::EPIPE) => ErrorKind::Reset,
        _ => match e.kind() {
            IoKind::ConnectionRefused => ErrorKind::Refused,
            IoKind::TimedOut | IoKind::WouldBlock => ErrorKind::TimedOut,
            IoKind::HostUnreachable | IoKind::NetworkUnreachable => ErrorKind::Unreachable,
            IoKind::ConnectionReset | IoKind::BrokenPipe => ErrorKind::Reset,
            _ => ErrorKind::Other,
        },
    }
}

fn failure(kind: ErrorKind, detail: impl Into<String>, started: Instant) -> ClientResult {
    ClientResult {
        ok: false,
        reply: None,
        peer: None,
        local: None,
        error: Some(kind),
        detail: Some(detail.into()),
        elapsed_ms: ms(started.elapsed()),
    }
}

fn io_failure(e: &std::io::Error, what: &str, started: Instant) -> ClientResult {
    failure(classify(e), format!("{what}: {e}"), started)
}

fn tcp_request(to: SocketAddr, sport: Option<u16>, timeout: Duration) -> ClientResult {
    let started = Instant::now();
    let stream = match connect(to, sport, timeout) {
        Ok(s) => s,
        Err(e) => return io_failure(&e, "connect", started),
    };
    let peer = stream.peer_addr().ok();
    let local = stream.local_addr().ok();
    let exchange = || -> std::io::Result<String> {
        let remaining = timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(remaining))?;
        stream.set_write_timeout(Some(remaining))?;
        (&stream).write_all(b"hi\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok(line)
    };
    let mut r = match exchange() {
        Ok(line) if line.is_empty() => failure(
            ErrorKind::Other,
            "connection closed without a reply",
            started,
        ),
        Ok(line) => ClientResult {
            ok: true,
            reply: Some(line.trim_end().to_owned()),
            peer: None,
            local: None,
            error: None,
            detail: None,
            elapsed_ms: ms(started.elapsed()),
        },
        Err(e) => io_failure(&e, "exchange", started),
    };
    r.peer = peer;
    r.local = local;
    r
}

fn udp_request(
    to: SocketAddr,
    sport: Option<u16>,
    timeout: Duration,
    connected: bool,
) -> ClientResult {
    let started = Instant::now();
    let attempt = || -> Result<ClientResult, (std::io::Error, &'static str)> {
        let socket =
            UdpSocket::bind((unspecified(to), sport.unwrap_or(0))).map_err(|e| (e, "bind"))?;
        let (level, recverr) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_RECVERR)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        };
        setsockopt_int(socket.as_raw_fd(), level, recverr, 1).map_err(|e| (e, "IP_RECVERR"))?;
        let local = socket.local_addr().ok();
        if connected {
            socket.connect(to).map_err(|e| (e, "connect"))?;
            socket.send(b"hi\n").map_err(|e| (e, "send"))?;
        } else {
            socket.send_to(b"hi\n", to).map_err(|e| (e, "send"))?;
        }
        let remaining = timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err((IoKind::TimedOut.into(), "recv"));
        }
        socket
            .set_read_timeout(Some(remaining))
            .map_err(|e| (e, "recv timeout"))?;
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf).map_err(|e| (e, "recv"))?;
        let reply = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
        let mut r = ClientResult {
            ok: true,
            reply: Some(reply),
            peer: Some(from),
            local,
            error: None,
            detail: None,
            elapsed_ms: ms(started.elapsed()),
        };
        if from != to {
            r.ok = false;
            r.error = Some(ErrorKind::WrongSource);
            r.detail = Some(format!("reply from {from}, sent to {to}"));
        }
        Ok(r)
    };
    attempt().unwrap_or_else(|(e, what)| io_failure(&e, what, started))
}

/// Resolver mode (see `--resolver-secs`).
fn resolver(
    out: &mut impl std::io::Write,
    to: SocketAddr,
    run_for: Duration,
    interval: Duration,
    timeout: Duration,
) {
    let started = Instant::now();
    let mut socket: Option<UdpSocket> = None;
    while started.elapsed() < run_for {
        let at = |r: ClientResult| ClientResult {
            elapsed_ms: ms(started.elapsed()),
            ..r
        };
        let s = match socket.take() {
            Some(s) => s,
            None => {
                let fresh = UdpSocket::bind((unspecified(to), 0))
                    .and_then(|s| s.set_read_timeout(Some(timeout)).map(|()| s))
                    .and_then(|s| s.connect(to).map(|()| s));
                match fresh {
                    Ok(s) => s,
                    Err(e) => {
                        print_json(out, &at(io_failure(&e, "connect", started)));
                        std::thread::sleep(interval);
                        continue;
                    }
                }
            }
        };
        let local = s.local_addr().ok();
        let mut buf = [0u8; 2048];
        let r = s
            .send(b"hi\n")
            .map_err(|e| (e, "send"))
            .and_then(|_| s.recv_from(&mut buf).map_err(|e| (e, "recv")));
        let mut r = match r {
            Ok((n, from)) => {
                let mut r = ClientResult {
                    ok: from == to,
                    reply: Some(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()),
                    peer: Some(from),
                    local,
                    error: None,
                    detail: None,
                    elapsed_ms: 0.0,
                };
                if from != to {
                    r.error = Some(ErrorKind::WrongSource);
                    r.detail = Some(format!("reply from {from}, sent to {to}"));
                }
                socket = Some(s);
                r
            }
            Err((e, what)) => {
                let r = io_failure(&e, what, started);
                // A timeout keeps the socket (the answer may be late); any
                // other error: a new socket for the next query.
                if r.error == Some(ErrorKind::TimedOut) {
                    socket = Some(s);
                }
                ClientResult { local, ..r }
            }
        };
        r = at(r);
        print_json(out, &r);
        std::thread::sleep(interval);
    }
}

/// The unspecified address of `to`'s family.
fn unspecified(to: SocketAddr) -> IpAddr {
    match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Non-blocking connect bounded by `timeout`, optionally from `sport`.
/// Returns a blocking stream.
fn connect(to: SocketAddr, sport: Option<u16>, timeout: Duration) -> std::io::Result<TcpStream> {
    let Some(sport) = sport else {
        return TcpStream::connect_timeout(&to, timeout);
    };
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let mut bound = Err(std::io::Error::from(IoKind::AddrInUse));
    for k in 0..16u32 {
        let off = (u32::from(sport.saturating_sub(20_000)) + k * 4093) % 40_000;
        let port = 20_000 + u16::try_from(off).unwrap_or(0);
        let (local, len) = sockaddr_any(SocketAddr::new(unspecified(to), port));
        // SAFETY: valid fd and a sockaddr of the stated size.
        let rc = unsafe { libc::bind(sock.as_raw_fd(), (&raw const local).cast(), len) };
        if rc == 0 {
            bound = Ok(());
            break;
        }
        bound = Err(std::io::Error::last_os_error());
    }
    bound?;
    let (addr, len) = sockaddr_any(to);
    // SAFETY: valid fd and a sockaddr of the stated size.
    let rc = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), len) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(IoKind::TimedOut.into());
        }
        let err = getsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR)?;
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err));
        }
    }
    let stream = TcpStream::from(sock);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

struct Stream {
    tcp: Option<TcpStream>,
    result: StreamResult,
}

fn hold_streams(to: SocketAddr, k: usize, hold: Duration, timeout: Duration) -> Vec<StreamResult> {
    let started = Instant::now();
    let mut streams: Vec<Stream> = (0..k)
        .map(|i| {
            let mut result = StreamResult {
                stream: i,
                ok: true,
                sent: 0,
                acked: 0,
                peer: None,
                local: None,
                error: None,
                detail: None,
                elapsed_ms: 0.0,
            };
            let tcp = match TcpStream::connect_timeout(&to, timeout)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
            {
                Ok(s) => {
                    result.peer = s.peer_addr().ok();
                    result.local = s.local_addr().ok();
                    Some(s)
                }
                Err(e) => {
                    fail_stream(&mut result, &e, "connect", started);
                    None
                }
            };
            Stream { tcp, result }
        })
        .collect();
    let chunk = [b'x'; 64];
    let mut buf = [0u8; 512];
    while started.elapsed() < hold {
        for s in &mut streams {
            let Some(tcp) = s.tcp.as_mut() else { continue };
            // The sink never writes: a readable socket is EOF or an error.
            let err = match tcp.read(&mut buf) {
                Ok(0) => Some(std::io::Error::new(
                    IoKind::UnexpectedEof,
                    "closed by the peer",
                )),
                Ok(_) => None,
                Err(e) if e.kind() == IoKind::WouldBlock => None,
                Err(e) => Some(e),
            }
            .or_else(|| match tcp.write(&chunk) {
                Ok(n) => {
                    s.result.sent += n as u64;
                    None
                }
                Err(e) if e.kind() == IoKind::WouldBlock => None,
                Err(e) => Some(e),
            });
            if let Some(e) = err {
                s.result.acked = acked(tcp.as_raw_fd(), s.result.sent);
                fail_stream(&mut s.result, &e, "stream", started);
                s.tcp = None;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give the last chunks time to be acknowledged.
    let drain = Instant::now() + Duration::from_secs(1);
    for s in &mut streams {
        if let Some(tcp) = &s.tcp {
            loop {
                s.result.acked = acked(tcp.as_raw_fd(), s.result.sent);
                if s.result.acked == s.result.sent || Instant::now() > drain {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            s.result.elapsed_ms = ms(started.elapsed());
        }
    }
    streams.into_iter().map(|s| s.result).collect()
}

fn fail_stream(r: &mut StreamResult, e: &std::io::Error, what: &str, started: Instant) {
    r.ok = false;
    r.error = Some(if e.kind() == IoKind::UnexpectedEof {
        ErrorKind::Other
    } else {
        classify(e)
    });
    r.detail = Some(format!("{what}: {e}"));
    r.elapsed_ms = ms(started.elapsed());
}

/// Bytes of `sent` the peer acknowledged: sent minus what is still in the
/// send queue (`SIOCOUTQ`: unacknowledged + unsent).
fn acked(fd: RawFd, sent: u64) -> u64 {
    let mut outq: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return 0;
    }
    sent.saturating_sub(u64::try_from(outq).unwrap_or(0))
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> std::io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = socklen::<libc::c_int>();
    // SAFETY: valid fd, pointer/length of a live c_int.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
