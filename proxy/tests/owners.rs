//! Every map entry the agent writes has an owner, through the real
//! dataplane against real maps (pinned in a private bpffs directory, nothing
//! attached): Maglev tables shared and freed with their last frontend, the
//! socket-LB reverse entries of removed frontends flushed, the node address
//! in `CONFIG` following what the agent hands over. Needs root and bpffs at
//! /sys/fs/bpf (`cargo xtask setup`).

mod common;

use common::PinDir as Dir;
use std::{net::Ipv4Addr, path::PathBuf};

use proxy::{
    dataplane::{
        Dataplane,
        ebpf::{EbpfConfig, EbpfDataplane, maps::Maps},
    },
    diff::Change,
    lb::{BackendAddr, Frontend, FrontendKey, FrontendKind},
    maglev::DEFAULT_TABLE_SIZE,
    model::Protocol,
};
use proxy_common::{MaglevKey, SockRevNatKey, SockRevNatValue};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn dir() -> Dir {
    Dir::new("owners")
}

fn load(d: &Dir) -> EbpfDataplane {
    EbpfDataplane::load(EbpfConfig::new(d.0.clone()))
        .expect("load eBPF dataplane (root and bpffs needed: cargo xtask setup)")
}

fn key(addr: Ipv4Addr, port: u16) -> FrontendKey {
    FrontendKey {
        addr,
        port,
        proto: Protocol::Tcp,
    }
}

fn frontend(kind: FrontendKind, backends: &[u8], size: Option<u32>) -> Frontend {
    Frontend {
        kind,
        backends: backends
            .iter()
            .map(|i| BackendAddr {
                addr: Ipv4Addr::new(10, 244, 9, *i),
                port: 8080,
                terminating: false,
                local: false,
            })
            .collect(),
        affinity_timeout: 0,
        source_ranges: vec![],
        maglev_table_size: size,
        local_only: false,
    }
}

/// Entries in `MAGLEV_V4`, walked.
fn maglev_entries(dp: &EbpfDataplane) -> usize {
    dp.maps().maglev.keys().filter(Result::is_ok).count()
}

/// What the frontends point at: (table id, size) per frontend.
fn tables(dp: &EbpfDataplane) -> Vec<(u32, u32)> {
    let mut t: Vec<(u32, u32)> = dp
        .maps()
        .services()
        .expect("services")
        .into_iter()
        .filter(|(_, v)| v.maglev_size != 0)
        .map(|(_, v)| (v.maglev_table, v.maglev_size))
        .collect();
    t.sort();
    t
}

#[test]
fn frontends_with_the_same_backends_share_one_maglev_table() {
    let d = dir();
    let mut dp = load(&d);
    let np = key(NODE, 30090);
    let lb = key(LB_IP, 80);
    dp.apply(&[
        Change::Upsert(np, frontend(FrontendKind::NodePort, &[2, 3, 4], None)),
        Change::Upsert(lb, frontend(FrontendKind::LoadBalancer, &[2, 3, 4], None)),
    ])
    .expect("program");
    let t = tables(&dp);
    assert_eq!(t.len(), 2);
    assert_eq!(t[0], t[1], "one table for both frontends");
    assert_eq!(maglev_entries(&dp), DEFAULT_TABLE_SIZE as usize);
    assert_eq!(dp.maglev_tables(), (1, u64::from(DEFAULT_TABLE_SIZE)));
    // dump-maps and /metrics count from the descriptors: walked keys, the
    // Maglev tables by size, arrays by length.
    let d = dp.maps().dump().expect("dump");
    let entries = |name: &str| {
        d.maps
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.entries)
            .expect("map listed")
    };
    assert_eq!(d.maps.len(), proxy_common::maps::ALL.len());
    assert_eq!(entries("SVC_V4"), 2);
    assert_eq!(entries("SLOTS_V4"), 6);
    assert_eq!(entries("BACKENDS_V4"), 3);
    assert_eq!(entries("AFF_MATCH_V4"), 6);
    assert_eq!(entries("MAGLEV_V4"), DEFAULT_TABLE_SIZE as usize);
    assert_eq!(entries("STATS"), proxy_common::stat::COUNT as usize);
    assert_eq!(d.maglev.len(), 1);
    assert_eq!(d.maglev[0].frontends.len(), 2);

    // One frontend's backends change: two tables.
    dp.apply(&[Change::Upsert(
        lb,
        frontend(FrontendKind::LoadBalancer, &[2, 3], None),
    )])
    .expect("reprogram");
    assert_eq!(maglev_entries(&dp), 2 * DEFAULT_TABLE_SIZE as usize);
    // Back to the same set: shared again, the other table is gone.
    dp.apply(&[Change::Upsert(
        lb,
        frontend(FrontendKind::LoadBalancer, &[2, 3, 4], None),
    )])
    .expect("reprogram");
    assert_eq!(maglev_entries(&dp), DEFAULT_TABLE_SIZE as usize);

    // Removing one keeps the table; removing the last deletes every slot.
    dp.apply(&[Change::Remove(np)]).expect("remove");
    assert_eq!(maglev_entries(&dp), DEFAULT_TABLE_SIZE as usize);
    dp.apply(&[Change::Remove(lb)]).expect("remove");
    assert_eq!(maglev_entries(&dp), 0, "no orphaned Maglev slots");
    assert_eq!(dp.maglev_tables(), (0, 0));
}

#[test]
fn maglev_churn_leaves_exactly_the_live_tables() {
    let d = dir();
    let mut dp = load(&d);
    let sizes = [Some(13), Some(31), None, Some(7)];
    for round in 0..40u32 {
        let n = 1 + (round % 5) as u8;
        let backends: Vec<u8> = (2..2 + n).collect();
        let size = sizes[(round % 4) as usize];
        let mut changes = vec![
            Change::Upsert(
                key(NODE, 30100),
                frontend(FrontendKind::NodePort, &backends, size),
            ),
            Change::Upsert(
                key(LB_IP, 443),
                frontend(FrontendKind::LoadBalancer, &backends[..1], Some(13)),
            ),
        ];
        // A frontend that comes and goes.
        if round % 3 == 0 {
            changes.push(Change::Upsert(
                key(NODE, 30101),
                frontend(FrontendKind::NodePort, &backends, Some(31)),
            ));
        } else {
            changes.push(Change::Remove(key(NODE, 30101)));
        }
        dp.apply(&changes).expect("program");
        let mut live: Vec<(u32, u32)> = tables(&dp);
        live.dedup();
        let want: usize = live.iter().map(|(_, m)| *m as usize).sum();
        assert_eq!(maglev_entries(&dp), want, "round {round}: {live:?}");
    }
    dp.apply(&[
        Change::Remove(key(NODE, 30100)),
        Change::Remove(key(LB_IP, 443)),
        Change::Remove(key(NODE, 30101)),
    ])
    .expect("remove");
    assert_eq!(maglev_entries(&dp), 0);
}

#[test]
fn a_restarted_agent_adopts_shared_tables_and_deletes_orphans() {
    let d = dir();
    let mut dp = load(&d);
    dp.apply(&[
        Change::Upsert(
            key(NODE, 30090),
            frontend(FrontendKind::NodePort, &[2, 3], Some(13)),
        ),
        Change::Upsert(
            key(LB_IP, 80),
            frontend(FrontendKind::LoadBalancer, &[2, 3], Some(13)),
        ),
    ])
    .expect("program");
    let before = tables(&dp);
    drop(dp);
    // An orphaned table, as an older agent leaked them.
    let mut pinned = Maps::open_pinned(&d.0).expect("pinned maps");
    for slot in 0..7 {
        pinned
            .maglev
            .insert(
                MaglevKey {
                    table_id: 999,
                    slot,
                },
                1,
                0,
            )
            .expect("insert");
    }
    drop(pinned);
    let mut dp = load(&d);
    assert_eq!(tables(&dp), before, "ids kept");
    assert_eq!(dp.maglev_tables(), (1, 13));
    assert_eq!(maglev_entries(&dp), 13, "the orphan went");
    // Still shared after adoption: the table goes with the last user.
    dp.apply(&[Change::Remove(key(NODE, 30090))])
        .expect("remove");
    assert_eq!(maglev_entries(&dp), 13);
    dp.apply(&[Change::Remove(key(LB_IP, 80))]).expect("remove");
    assert_eq!(maglev_entries(&dp), 0);
}

#[test]
fn socket_reverse_entries_of_removed_frontends_are_flushed() {
    let d = dir();
    let mut dp = load(&d);
    let vip = key(Ipv4Addr::new(10, 96, 0, 10), 80);
    let other = key(Ipv4Addr::new(10, 96, 0, 11), 80);
    dp.apply(&[
        Change::Upsert(vip, frontend(FrontendKind::ClusterIp, &[2], None)),
        Change::Upsert(other, frontend(FrontendKind::ClusterIp, &[3], None)),
    ])
    .expect("program");
    let ids: Vec<(std::net::IpAddr, u32)> = dp
        .maps()
        .services()
        .expect("services")
        .into_iter()
        .map(|(k, v)| (k.ip, v.id))
        .collect();
    let id_of = |ip: Ipv4Addr| {
        ids.iter()
            .find(|(a, _)| *a == std::net::IpAddr::V4(ip))
            .expect("frontend")
            .1
    };
    // What connect4 writes for a socket to each frontend.
    let mut pinned = Maps::open_pinned(&d.0).expect("pinned maps");
    for (cookie, fe, backend) in [(1u64, vip, 2u8), (2, other, 3)] {
        pinned
            .sock_revnat
            .insert(
                SockRevNatKey {
                    cookie,
                    addr: u32::from_ne_bytes([10, 244, 9, backend]),
                    port: 8080u16.to_be(),
                    _pad: 0,
                },
                SockRevNatValue {
                    addr: u32::from_ne_bytes(fe.addr.octets()),
                    port: fe.port.to_be(),
                    _pad: 0,
                    service_id: id_of(fe.addr),
                },
                0,
            )
            .expect("insert");
    }
    dp.apply(&[Change::Remove(vip)]).expect("remove");
    dp.housekeeping().expect("housekeeping");
    let left: Vec<u32> = pinned
        .sock_revnat
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| v.service_id)
        .collect();
    assert_eq!(
        left,
        vec![id_of(other.addr)],
        "only the live frontend's entry"
    );
}

#[test]
fn config_follows_the_node_address() {
    let d = dir();
    let mut dp = load(&d);
    let node_ip = |dp: &EbpfDataplane| dp.maps().dump().expect("dump").config.node_address;
    assert_eq!(node_ip(&dp), None);
    dp.set_north_south(&[], Some(NODE)).expect("start");
    assert_eq!(node_ip(&dp), Some(NODE));
    // The Node's InternalIP changes: the next sync hands over the new one.
    let new = Ipv4Addr::new(172, 18, 0, 99);
    Dataplane::set_node_address(&mut dp, Some(new)).expect("set");
    assert_eq!(node_ip(&dp), Some(new));
    Dataplane::set_node_address(&mut dp, None).expect("unset");
    assert_eq!(node_ip(&dp), None);
}

#[test]
fn lpm_trie_entries_are_counted() {
    let d = dir();
    let mut dp = load(&d);
    let mut fe = frontend(FrontendKind::LoadBalancer, &[2], None);
    fe.source_ranges = vec![
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
    ];
    dp.apply(&[Change::Upsert(key(LB_IP, 80), fe)])
        .expect("program");
    let dump = dp.maps().dump().expect("dump");
    let src = dump
        .maps
        .iter()
        .find(|m| m.name == "SRC_RANGES_V4")
        .expect("listed");
    assert_eq!(src.entries, 2);
    assert_eq!(dump.source_ranges.len(), 2);
}

/// A cgroup of its own, removed on drop (when empty).
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_closed_socket_takes_its_reverse_entry_with_it() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let cg = Cgroup(
        proxy::dataplane::ebpf::cgroup2_mount()
            .expect("cgroup2")
            .join(format!("proxy-owners-{}", std::process::id())),
    );
    std::fs::create_dir_all(&cg.0).expect("cgroup");
    let d = dir();
    let mut cfg = EbpfConfig::new(d.0.clone());
    cfg.socket_lb_cgroup = Some(cg.0.clone());
    let mut dp = EbpfDataplane::load(cfg).expect("load with socket LB");
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = server.local_addr().expect("addr").port();
    let vip = Ipv4Addr::new(10, 96, 0, 77);
    dp.apply(&[Change::Upsert(
        key(vip, 80),
        Frontend {
            kind: FrontendKind::ClusterIp,
            backends: vec![BackendAddr {
                addr: Ipv4Addr::LOCALHOST,
                port,
                terminating: false,
                local: true,
            }],
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        },
    )])
    .expect("program");
    let procs = cg.0.join("cgroup.procs");
    let mut cmd = Command::new("bash");
    cmd.args(["-c", "exec 3<>/dev/tcp/10.96.0.77/80 && echo up && read x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec (open,
    // write, close on a path prepared before the fork).
    let path = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes()).expect("path");
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().expect("client");
    let (_conn, _) = server.accept().expect("the client reached the backend");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "up");
    let entries = |dp: &EbpfDataplane| dp.maps().dump().expect("dump").sock_revnat.len();
    assert_eq!(entries(&dp), 1, "connect4 wrote the reverse entry");
    // The client closes its socket and exits.
    writeln!(child.stdin.take().expect("stdin")).expect("write");
    child.wait().expect("exit");
    assert_eq!(entries(&dp), 0, "sock_release deleted it");
}
