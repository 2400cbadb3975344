//! `proxyctl`: inspect what the agent programmed.

use std::{io::Write, net::Ipv4Addr, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use proxy::{
    dataplane::ebpf::conntrack::monotonic_ns,
    inspect::{
        self, AddrFilter, Client, CtFilter, CtView, Explanation, ServiceView, Stats, Target,
        TrafficPolicy, Verdict,
    },
    maps::{Dump, Maps, kind_name},
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Inspect the eBPF service proxy's pinned maps.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// bpffs directory the agent pins under (its --bpffs-path).
    #[arg(long, global = true, default_value = "/sys/fs/bpf/kube-proxy-ebpf")]
    bpffs_path: PathBuf,
    /// Output format; the JSON is stable (docs/operations.md).
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print every pinned map, decoded, with entry counts and capacities.
    DumpMaps,
    /// Frontends and their backends with state (as `cilium service list`).
    Services,
    /// Conntrack entries, optionally filtered (filters combine with AND).
    Conntrack {
        /// Only flows of this frontend: id, ip, ip:port or ip:port/proto.
        #[arg(long)]
        service: Option<AddrFilter>,
        /// Only flows sent to this backend: id, ip, ip:port or ip:port/proto.
        #[arg(long)]
        backend: Option<AddrFilter>,
        /// Only flows with this address as source, destination or NAT address.
        #[arg(long)]
        address: Option<Ipv4Addr>,
    },
    /// Explain what happens to a packet to <ip>:<port>/<proto>: which
    /// frontend matches, which backend is (or may be) chosen and why, or
    /// why it is refused or dropped.
    Explain {
        /// Destination, e.g. 10.96.0.10:80/tcp.
        target: Target,
        /// Client address, optionally with its source port (ip or ip:port);
        /// needed for source ranges, affinity, conntrack and the Maglev slot.
        #[arg(long)]
        from: Option<Client>,
    },
    /// Per-frontend packet/byte counters, drops by reason and every
    /// data-path counter.
    Stats,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        // One line: the error and its causes.
        eprintln!("proxyctl: {e:#}");
        std::process::exit(1);
    }
}

fn emit<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, value)?;
            writeln!(out)?;
        }
        Output::Table => table(&mut out)?,
    }
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    let maps = Maps::open_pinned(&args.bpffs_path)?;
    let dump = maps.dump()?;
    match &args.cmd {
        Cmd::DumpMaps => emit(args.output, &dump, |o| print_table(o, &dump)),
        Cmd::Services => {
            let v = inspect::services(&dump);
            emit(args.output, &v, |o| print_services(o, &v))
        }
        Cmd::Conntrack {
            service,
            backend,
            address,
        } => {
            let f = CtFilter {
                service: service.clone(),
                backend: backend.clone(),
                address: *address,
            };
            let v = inspect::conntrack(&dump, &f);
            emit(args.output, &v, |o| print_conntrack(o, &v))
        }
        Cmd::Explain { target, from } => {
            let e = inspect::explain(&dump, &maps, *target, *from, monotonic_ns());
            emit(args.output, &e, |o| print_explain(o, &e))
        }
        Cmd::Stats => {
            let v = inspect::stats(&dump);
            emit(args.output, &v, |o| print_stats(o, &v))
        }
    }
}

fn print_services(out: &mut dyn Write, v: &[ServiceView]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>6}  {:<26} {:<13} {:<19} BACKENDS",
        "ID", "FRONTEND", "KIND", "STATE"
    )?;
    for s in v {
        let mut extra = Vec::new();
        if s.traffic_policy == TrafficPolicy::Local {
            extra.push("policy=Local".to_owned());
        }
        if s.affinity_timeout != 0 {
            extra.push(format!("affinity={}s", s.affinity_timeout));
        }
        if s.maglev_table_size != 0 {
            extra.push(format!("maglev={}", s.maglev_table_size));
        }
        if !s.source_ranges.is_empty() {
            let ranges: Vec<String> = s.source_ranges.iter().map(|r| r.to_string()).collect();
            extra.push(format!("ranges={}", ranges.join(",")));
        }
        let head = format!(
            "{:>6}  {:<26} {:<13} {:<19}",
            s.id,
            s.frontend.to_string(),
            kind_name(s.kind),
            s.state
        );
        let pad = " ".repeat(head.len());
        if s.backends.is_empty() {
            writeln!(
                out,
                "{}",
                format!("{head} -  {}", extra.join(" ")).trim_end()
            )?;
        }
        for (i, b) in s.backends.iter().enumerate() {
            let mut state = b.state.to_string();
            if b.local {
                state.push_str(", local");
            }
            let tail = if i == 0 {
                extra.join(" ")
            } else {
                String::new()
            };
            let line = format!(
                "{} {} => {} ({state})  {tail}",
                if i == 0 { &head } else { &pad },
                b.id,
                b.address
            );
            writeln!(out, "{}", line.trim_end())?;
        }
    }
    Ok(())
}

fn print_conntrack(out: &mut dyn Write, v: &[CtView]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<8} {:<5} {:<22} {:<22} {:<26} {:<26} {:<22} FLAGS",
        "DIR", "PROTO", "SRC", "DST", "FRONTEND", "BACKEND", "NAT"
    )?;
    let opt =
        |a: &Option<proxy::maps::Addr>| a.as_ref().map(|a| a.to_string()).unwrap_or("-".into());
    for c in v {
        writeln!(
            out,
            "{:<8} {:<5} {:<22} {:<22} {:<26} {:<26} {:<22} {}",
            c.entry.direction,
            c.entry.proto,
            c.entry.src,
            c.entry.dst,
            opt(&c.frontend),
            opt(&c.backend),
            c.entry
                .nat
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            c.flag_names.join(",")
        )?;
    }
    writeln!(out, "{} entries", v.len())
}

fn print_explain(out: &mut dyn Write, e: &Explanation) -> std::io::Result<()> {
    let verdict = match e.verdict {
        Verdict::Forward => "FORWARD",
        Verdict::Reject => "REJECT",
        Verdict::Drop => "DROP",
        Verdict::NotAService => "NOT A SERVICE",
    };
    match &e.client {
        Some(c) => writeln!(out, "{c} -> {}: {verdict}", e.target)?,
        None => writeln!(out, "{}: {verdict}", e.target)?,
    }
    for r in &e.reasons {
        writeln!(out, "  - {r}")?;
    }
    if let Some(b) = &e.backend {
        writeln!(
            out,
            "  backend: {} {} ({}{})",
            b.id,
            b.address,
            b.state,
            if b.local { ", local" } else { "" }
        )?;
    }
    if !e.candidates.is_empty() {
        writeln!(out, "  candidates:")?;
        for c in &e.candidates {
            let share = c
                .maglev_slots
                .map(|n| format!(", {n} Maglev slots"))
                .unwrap_or_default();
            writeln!(
                out,
                "    {} {} ({}{}{share})",
                c.backend.id,
                c.backend.address,
                c.backend.state,
                if c.backend.local { ", local" } else { "" }
            )?;
        }
    }
    Ok(())
}

fn print_stats(out: &mut dyn Write, s: &Stats) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>6}  {:<26} {:<13} {:>12} {:>14}",
        "ID", "FRONTEND", "KIND", "PACKETS", "BYTES"
    )?;
    for v in &s.services {
        writeln!(
            out,
            "{:>6}  {:<26} {:<13} {:>12} {:>14}",
            v.id,
            v.frontend.to_string(),
            kind_name(v.kind),
            v.packets,
            v.bytes
        )?;
    }
    writeln!(out, "\nDROPS BY REASON")?;
    for c in &s.drops {
        writeln!(out, "  {:<20} {}", c.name, c.value)?;
    }
    writeln!(out, "\nREJECTS")?;
    for c in &s.rejects {
        writeln!(out, "  {:<20} {}", c.name, c.value)?;
    }
    writeln!(out, "\nCOUNTERS")?;
    for c in &s.counters {
        writeln!(out, "  {:<20} {}", c.name, c.value)?;
    }
    Ok(())
}

fn print_table(out: &mut dyn Write, d: &Dump) -> std::io::Result<()> {
    writeln!(out, "MAPS")?;
    writeln!(out, "  {:<16} {:>10} {:>10}", "NAME", "ENTRIES", "CAPACITY")?;
    for m in &d.maps {
        writeln!(
            out,
            "  {:<16} {:>10} {:>10}",
            m.name, m.entries, m.max_entries
        )?;
    }
    writeln!(out, "\nSERVICES ({} entries)", d.services.len())?;
    writeln!(
        out,
        "  {:<28} {:>6} {:>6} {:>4}  {:<13} {:>8} {:>7}  FLAGS",
        "FRONTEND", "ID", "COUNT", "GEN", "KIND", "AFFINITY", "MAGLEV"
    )?;
    for s in &d.services {
        writeln!(
            out,
            "  {:<28} {:>6} {:>6} {:>4}  {:<13} {:>8} {:>7}  {}",
            s.frontend.to_string(),
            s.id,
            s.count,
            s.generation,
            kind_name(s.kind),
            s.affinity_timeout,
            s.maglev_size,
            s.flags.names().join(",")
        )?;
    }
    writeln!(out, "\nSLOTS ({} entries)", d.slots.len())?;
    writeln!(
        out,
        "  {:>10} {:>4} {:>6} {:>8}",
        "SERVICE_ID", "GEN", "INDEX", "BACKEND"
    )?;
    for s in &d.slots {
        writeln!(
            out,
            "  {:>10} {:>4} {:>6} {:>8}",
            s.service_id, s.generation, s.index, s.backend_id
        )?;
    }
    writeln!(out, "\nBACKENDS ({} entries)", d.backends.len())?;
    writeln!(out, "  {:>6}  {:<28} FLAGS", "ID", "BACKEND")?;
    for b in &d.backends {
        let mut flags = Vec::new();
        if b.local {
            flags.push("local");
        }
        if b.terminating {
            flags.push("terminating");
        }
        writeln!(
            out,
            "  {:>6}  {:<28} {}",
            b.id,
            b.backend.to_string(),
            flags.join(",")
        )?;
    }
    writeln!(out, "\nREVNAT ({} entries)", d.revnat.len())?;
    writeln!(out, "  {:>10}  ADDRESS", "SERVICE_ID")?;
    for r in &d.revnat {
        writeln!(out, "  {:>10}  {}", r.service_id, r.address)?;
    }
    writeln!(out, "\nCONNTRACK ({} entries)", d.conntrack.len())?;
    writeln!(
        out,
        "  {:<8} {:<5} {:<22} {:<22} {:>10} {:>8}",
        "DIR", "PROTO", "SRC", "DST", "SERVICE_ID", "BACKEND"
    )?;
    for c in &d.conntrack {
        writeln!(
            out,
            "  {:<8} {:<5} {:<22} {:<22} {:>10} {:>8}",
            c.direction, c.proto, c.src, c.dst, c.service_id, c.backend_id
        )?;
    }
    writeln!(out, "\nAFFINITY ({} entries)", d.affinity.len())?;
    writeln!(
        out,
        "  {:>10}  {:<24} {:>8}",
        "SERVICE_ID", "CLIENT", "BACKEND"
    )?;
    for a in &d.affinity {
        writeln!(
            out,
            "  {:>10}  {:<24} {:>8}",
            a.service_id, a.client, a.backend_id
        )?;
    }
    writeln!(out, "\nSOCK_REVNAT ({} entries)", d.sock_revnat.len())?;
    writeln!(
        out,
        "  {:>20}  {:<22} {:<22}",
        "COOKIE", "BACKEND", "FRONTEND"
    )?;
    for r in &d.sock_revnat {
        writeln!(
            out,
            "  {:>20}  {:<22} {:<22}",
            r.cookie, r.backend, r.frontend
        )?;
    }
    writeln!(out, "\nSERVICE_STATS ({} entries)", d.service_stats.len())?;
    writeln!(
        out,
        "  {:>10} {:>12} {:>14}",
        "SERVICE_ID", "PACKETS", "BYTES"
    )?;
    for s in &d.service_stats {
        writeln!(
            out,
            "  {:>10} {:>12} {:>14}",
            s.service_id, s.packets, s.bytes
        )?;
    }
    writeln!(out, "\nMAGLEV ({} tables)", d.maglev.len())?;
    writeln!(out, "  {:>8} {:>8}  FRONTENDS", "TABLE", "SLOTS")?;
    for m in &d.maglev {
        let users: Vec<String> = m.frontends.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "  {:>8} {:>8}  {}",
            m.table_id,
            m.slots,
            users.join(",")
        )?;
    }
    writeln!(out, "\nFRAGMENTS ({} entries)", d.fragments.len())?;
    writeln!(
        out,
        "  {:<5} {:<22} {:<22} {:>6}",
        "PROTO", "SRC", "DST", "IP_ID"
    )?;
    for f in &d.fragments {
        writeln!(
            out,
            "  {:<5} {:<22} {:<22} {:>6}",
            f.proto, f.src, f.dst, f.ip_id
        )?;
    }
    writeln!(out, "\nSTATS")?;
    for s in &d.stats {
        writeln!(out, "  {:<20} {}", s.name, s.value)?;
    }
    Ok(())
}
