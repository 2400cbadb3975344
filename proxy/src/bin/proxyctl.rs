//! `proxyctl`: inspect what the agent programmed.

use std::{io::Write, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use proxy::maps::{Dump, Maps};

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
    #[arg(long, short, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print every pinned map, decoded.
    DumpMaps,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("proxyctl: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    match args.cmd {
        Cmd::DumpMaps => {
            let maps = Maps::open_pinned(&args.bpffs_path)?;
            let dump = maps.dump()?;
            let mut out = std::io::stdout().lock();
            match args.output {
                Output::Json => {
                    serde_json::to_writer_pretty(&mut out, &dump)?;
                    writeln!(out)?;
                }
                Output::Table => print_table(&mut out, &dump)?,
            }
        }
    }
    Ok(())
}

fn print_table(out: &mut impl Write, d: &Dump) -> std::io::Result<()> {
    writeln!(out, "SERVICES ({} entries)", d.services.len())?;
    writeln!(
        out,
        "  {:<28} {:>6} {:>6} {:>4}  KIND",
        "FRONTEND", "ID", "COUNT", "GEN"
    )?;
    for s in &d.services {
        writeln!(
            out,
            "  {:<28} {:>6} {:>6} {:>4}  {}",
            s.frontend.to_string(),
            s.id,
            s.count,
            s.generation,
            s.kind
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
