//! `connrate`: the benchmark's TCP tool (run inside pod namespaces by
//! `bench`; clients are started inside the node's test cgroup so socket LB
//! sees them).
//!
//! * `serve --bind ADDR`: a pool of threads accepting connections and
//!   echoing whatever arrives until the peer closes.
//! * `rate --to ADDR --threads T --duration S`: every thread loops over
//!   connect, one 16-byte request, its 16-byte echo, close, for S seconds.
//!   Close is abortive (SO_LINGER 0: RST, no TIME_WAIT), so back-to-back
//!   connections never collide with a TIME_WAIT of the same 4-tuple.
//!   Prints JSON: connections, errors, rate and the connect+request
//!   latency percentiles.
//! * `latency --to ADDR --duration S`: one persistent connection
//!   (TCP_NODELAY), 16-byte request / echo round trips back to back for S
//!   seconds. Prints JSON: round trips, p10/p50/p90/p99 in microseconds
//!   and the share of round trips over 50 us. `--cpu N` pins the client
//!   (as `serve --cpu N` pins the server's threads).
//! * `probe`: reads one `IP:PORT` per stdin line and connects (3 ms
//!   timeout, retried every 200 us) until it succeeds, then prints
//!   `ok <microseconds>`; `bench` uses it to time changes reaching the data
//!   path.

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(about = "TCP connection-rate and latency tool for the benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo server.
    Serve {
        #[arg(long)]
        bind: SocketAddr,
        /// Accepting threads (each serves one connection at a time).
        #[arg(long, default_value_t = 32)]
        threads: usize,
        /// Run every thread on this CPU only (sched_setaffinity).
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// New connections per second: connect, 1 request, 1 reply, close.
    Rate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 8)]
        threads: usize,
        /// Seconds.
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
    },
    /// Round-trip latency on one persistent connection.
    Latency {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        /// Run on this CPU only (sched_setaffinity).
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Connect to each address read from stdin until it answers.
    Probe {
        /// Give up on one address after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        give_up: f64,
    },
}

const MSG: usize = 16;
/// A probe's connect gives up after this and tries again with a new
/// socket: until the change is programmed its SYN goes nowhere, and a
/// timeout this short bounds how late the probe notices the data path is
/// ready (a 20 ms timeout made every change look at least 20 ms slow).
/// A connect on the netns cluster takes well under 1 ms.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(3);

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { bind, threads, cpu } => {
            pin(cpu)?;
            serve(bind, threads)
        }
        Cmd::Rate {
            to,
            threads,
            duration,
        } => rate(to, threads, Duration::from_secs_f64(duration)),
        Cmd::Latency { to, duration, cpu } => {
            pin(cpu)?;
            latency(to, Duration::from_secs_f64(duration))
        }
        Cmd::Probe { give_up } => probe(Duration::from_secs_f64(give_up)),
    }
}

/// Restrict this process (and the threads it starts later) to one CPU.
fn pin(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for cpu < CPU_SETSIZE, checked first.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            anyhow::bail!("--cpu {cpu}: beyond CPU_SETSIZE");
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sched_setaffinity to CPU {cpu}"));
        }
    }
    Ok(())
}

fn serve(bind: SocketAddr, threads: usize) -> Result<()> {
    let listener = Arc::new(TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?);
    // Tell the parent we listen.
    println!("listening {bind}");
    std::io::stdout().flush()?;
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let l = listener.clone();
            std::thread::spawn(move || {
                loop {
                    let Ok((mut s, _)) = l.accept() else { continue };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

/// Abortive close: RST instead of FIN, no TIME_WAIT left behind.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(&[b'x'; MSG])?;
    let mut buf = [0u8; MSG];
    s.read_exact(&mut buf)?;
    linger_zero(&s);
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rate(to: SocketAddr, threads: usize, duration: Duration) -> Result<()> {
    let start = Instant::now();
    let deadline = start + duration;
    let results: Vec<(u64, u64, Vec<u32>, String)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(move || {
                    let (mut ok, mut err, mut lat, mut last_err) =
                        (0u64, 0u64, Vec::new(), String::new());
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match one_connection(to) {
                            Ok(()) => {
                                ok += 1;
                                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                            }
                            Err(e) => {
                                err += 1;
                                last_err = e.to_string();
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    (ok, err, lat, last_err)
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().unwrap_or_default())
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let ok: u64 = results.iter().map(|r| r.0).sum();
    let errors: u64 = results.iter().map(|r| r.1).sum();
    let mut lat: Vec<u32> = results.iter().flat_map(|r| r.2.iter().copied()).collect();
    lat.sort_unstable();
    let last_error = results
        .iter()
        .map(|r| r.3.as_str())
        .find(|e| !e.is_empty())
        .unwrap_or("");
    println!(
        "{}",
        json!({
            "connections": ok,
            "errors": errors,
            "last_error": last_error,
            "seconds": secs,
            "rate": ok as f64 / secs,
            "p50_us": percentile(&lat, 0.50),
            "p99_us": percentile(&lat, 0.99),
        })
    );
    Ok(())
}

fn latency(to: SocketAddr, duration: Duration) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let msg = [b'y'; MSG];
    let mut buf = [0u8; MSG];
    let mut rtts = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf).context("reading the echo")?;
        rtts.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    rtts.sort_unstable();
    println!(
        "{}",
        json!({
            "round_trips": rtts.len(),
            "p10_us": percentile(&rtts, 0.10),
            "p50_us": percentile(&rtts, 0.50),
            "p90_us": percentile(&rtts, 0.90),
            "p99_us": percentile(&rtts, 0.99),
            // The slow mode's share: round trips over 50 us.
            "over_50us": rtts.iter().filter(|&&r| r > 50).count() as f64 / rtts.len().max(1) as f64,
        })
    );
    Ok(())
}

fn probe(give_up: Duration) -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let to: SocketAddr = match line.trim().parse() {
            Ok(a) => a,
            Err(e) => {
                writeln!(out, "error {line:?}: {e}")?;
                out.flush()?;
                continue;
            }
        };
        let t = Instant::now();
        let mut answered = false;
        while t.elapsed() < give_up {
            if let Ok(s) = TcpStream::connect_timeout(&to, PROBE_CONNECT_TIMEOUT) {
                linger_zero(&s);
                answered = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if answered {
            writeln!(out, "ok {}", t.elapsed().as_micros())?;
        } else {
            writeln!(out, "timeout {to}")?;
        }
        out.flush()?;
    }
    Ok(())
}
