//! Every map entry the agent writes has an owner, through the real
//! dataplane against real maps (pinned in a private bpffs directory, nothing
//! attached): Maglev tables shared and freed with their last frontend, the
//! socket-LB reverse entries of removed frontends flushed, the node address
//! in `CONFIG` following what the agent hands over, IPv6 frontends in
//! `SVC_V6` with their backends in `BACKENDS_V6` (adopted by a restarted
//! agent, served by socket LB). Needs root and bpffs at /sys/fs/bpf
//! (`cargo xtask setup`).

mod common;

use common::PinDir as Dir;
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

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
use proxy_common::{
    MaglevKey, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6, ip6_words,
};

const NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 11);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

fn dir() -> Dir {
    Dir::new("owners")
}

fn load(d: &Dir) -> EbpfDataplane {
    EbpfDataplane::load(EbpfConfig::new(d.0.clone()))
        .expect("load eBPF dataplane (root and bpffs needed: cargo xtask setup)")
}

fn key(addr: impl Into<IpAddr>, port: u16) -> FrontendKey {
    FrontendKey {
        addr: addr.into(),
        port,
        proto: Protocol::Tcp,
    }
}

/// The test's IPv6 backend `i`.
fn backend6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 9, 0, 0, 0, 0, u16::from(i))
}

fn frontend(kind: FrontendKind, backends: &[u8], size: Option<u32>) -> Frontend {
    frontend_of(
        kind,
        backends
            .iter()
            .map(|i| Ipv4Addr::new(10, 244, 9, *i).into()),
        size,
    )
}

/// [`frontend`] with IPv6 backends.
fn frontend6(kind: FrontendKind, backends: &[u8], size: Option<u32>) -> Frontend {
    frontend_of(kind, backends.iter().map(|i| backend6(*i).into()), size)
}

fn frontend_of(
    kind: FrontendKind,
    backends: impl Iterator<Item = IpAddr>,
    size: Option<u32>,
) -> Frontend {
    Frontend {
        kind,
        backends: backends
            .map(|addr| BackendAddr {
                addr,
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
    let id_of = |ip: IpAddr| ids.iter().find(|(a, _)| *a == ip).expect("frontend").1;
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
                    addr: match fe.addr {
                        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
                        IpAddr::V6(a) => panic!("an IPv4 test frontend is {a}"),
                    },
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
        (Ipv4Addr::new(10, 0, 0, 0).into(), 8),
        (Ipv4Addr::new(192, 168, 0, 0).into(), 16),
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
    closed_socket_roundtrip(
        Ipv4Addr::new(10, 96, 0, 77).into(),
        Ipv4Addr::LOCALHOST.into(),
    );
}

/// IPv6 socket LB end to end in the kernel: connect6 finds the frontend in
/// `SVC_V6`, its backend in `BACKENDS_V6`, writes `SOCK_RNAT_V6`, and
/// sock_release deletes it.
#[test]
fn ipv6_socket_lb_connects_and_a_closed_socket_takes_its_reverse_entry_with_it() {
    closed_socket_roundtrip(
        "fd00:96::77".parse().expect("address"),
        Ipv6Addr::LOCALHOST.into(),
    );
}

/// A client in a cgroup with socket LB connects to `vip`:80; the frontend's
/// one backend listens on `loopback`.
fn closed_socket_roundtrip(vip: IpAddr, loopback: IpAddr) {
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
    let server = std::net::TcpListener::bind((loopback, 0)).expect("listen");
    let port = server.local_addr().expect("addr").port();
    dp.apply(&[Change::Upsert(
        key(vip, 80),
        Frontend {
            kind: FrontendKind::ClusterIp,
            backends: vec![BackendAddr {
                addr: loopback,
                port,
                terminating: false,
                local: true,
            }]
            .into(),
            affinity_timeout: 0,
            source_ranges: vec![],
            maglev_table_size: None,
            local_only: false,
        },
    )])
    .expect("program");
    let procs = cg.0.join("cgroup.procs");
    let mut cmd = Command::new("bash");
    let script = format!("exec 3<>/dev/tcp/{vip}/80 && echo up && read x");
    cmd.args(["-c", &script])
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
    // Not translated, the client would hang on an address nobody has: a
    // bounded wait, then the test fails (and the client is killed).
    server.set_nonblocking(true).expect("nonblocking");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let _conn = loop {
        match server.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the client did not reach the backend through {vip}:80");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "up");
    let entries = |dp: &EbpfDataplane| dp.maps().dump().expect("dump").sock_revnat.len();
    assert_eq!(entries(&dp), 1, "connect4/6 wrote the reverse entry");
    let sock = dp.maps().dump().expect("dump").sock_revnat;
    assert_eq!(sock[0].frontend, std::net::SocketAddr::new(vip, 80));
    assert_eq!(sock[0].backend, std::net::SocketAddr::new(loopback, port));
    // The client closes its socket and exits.
    writeln!(child.stdin.take().expect("stdin")).expect("write");
    child.wait().expect("exit");
    assert_eq!(entries(&dp), 0, "sock_release deleted it");
}

/// The id of frontend `ip` in the dump (either family).
fn service_id(dp: &EbpfDataplane, ip: IpAddr) -> u32 {
    dp.maps()
        .services()
        .expect("services")
        .into_iter()
        .find(|(k, _)| k.ip == ip)
        .unwrap_or_else(|| panic!("frontend {ip} is programmed"))
        .1
        .id
}

#[test]
fn ipv6_frontends_go_to_svc_v6_with_their_backends_in_backends_v6() {
    let d = dir();
    let mut dp = load(&d);
    let vip4 = Ipv4Addr::new(10, 96, 0, 10);
    let vip6: Ipv6Addr = "fd00:96::10".parse().expect("address");
    let lb6: Ipv6Addr = "fd00:18::100".parse().expect("address");
    let mut guarded = frontend6(FrontendKind::LoadBalancer, &[3], Some(13));
    guarded.source_ranges = vec![("2001:db8::".parse().expect("address"), 32)];
    dp.apply(&[
        Change::Upsert(key(vip4, 80), frontend(FrontendKind::ClusterIp, &[2], None)),
        Change::Upsert(
            key(vip6, 80),
            frontend6(FrontendKind::ClusterIp, &[2, 3], None),
        ),
        Change::Upsert(key(lb6, 80), guarded),
    ])
    .expect("program");
    let dump = dp.maps().dump().expect("dump");
    let count = |name: &str| {
        dump.maps
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} listed"))
            .entries
    };
    assert_eq!(count("SVC_V4"), 1);
    assert_eq!(count("SVC_V6"), 2);
    assert_eq!(count("BACKENDS_V4"), 1);
    assert_eq!(count("BACKENDS_V6"), 2, "fd00:244:9::2 and ::3, once each");
    let svc = |ip: IpAddr| {
        dump.services
            .iter()
            .find(|s| s.frontend.ip == ip)
            .unwrap_or_else(|| panic!("{ip} in the dump"))
    };
    let cluster = svc(vip6.into());
    assert_eq!(
        (cluster.frontend.to_string(), cluster.count),
        ("[fd00:96::10]:80/TCP".to_owned(), 2)
    );
    // The live slots hold ids of IPv6 backends, the kernel's reading.
    let mut behind: Vec<String> = dump
        .slots
        .iter()
        .filter(|s| s.service_id == cluster.id && s.generation == u16::from(cluster.generation))
        .map(|s| {
            let b = dump
                .backends
                .iter()
                .find(|b| b.id == s.backend_id)
                .expect("a slot points at a backend");
            b.backend.to_string()
        })
        .collect();
    behind.sort();
    assert_eq!(
        behind,
        ["[fd00:244:9::2]:8080/TCP", "[fd00:244:9::3]:8080/TCP"]
    );
    // Reverse NAT for the east-west per-packet path: one REVNAT_V6 entry
    // per IPv6 frontend. What only the north-south path reads is not
    // written for IPv6: no Maglev table, no IPv4 source ranges; the
    // guarded frontend is flagged, so socket LB leaves it alone and the
    // per-packet path drops its packets (not served: closed).
    let guarded = svc(lb6.into());
    assert!(guarded.flags.source_ranges(), "source-ranges flag");
    assert_eq!(guarded.maglev_size, 0, "no Maglev for IPv6");
    let rev = |id: u32| {
        dump.revnat
            .iter()
            .find(|r| r.service_id == id)
            .map(|r| r.address.to_string())
    };
    assert_eq!(rev(cluster.id).as_deref(), Some("[fd00:96::10]:80"));
    assert!(rev(guarded.id).is_some());
    assert_eq!(count("REVNAT_V4"), 1, "the IPv4 frontend's");
    assert_eq!(count("REVNAT_V6"), 2);
    assert!(dump.source_ranges.is_empty());
    assert_eq!(maglev_entries(&dp), 0);
    // Removing the IPv6 frontends leaves nothing of them.
    dp.apply(&[Change::Remove(key(vip6, 80)), Change::Remove(key(lb6, 80))])
        .expect("remove");
    let dump = dp.maps().dump().expect("dump");
    assert_eq!(
        dump.services
            .iter()
            .map(|s| s.frontend.to_string())
            .collect::<Vec<_>>(),
        ["10.96.0.10:80/TCP"]
    );
    assert!(
        dump.backends.iter().all(|b| b.backend.ip.is_ipv4()),
        "IPv6 backends deleted: {:?}",
        dump.backends
    );
    assert_eq!(dump.slots.len(), 1);
    assert_eq!(
        dump.revnat
            .iter()
            .map(|r| r.address.to_string())
            .collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "REVNAT_V6 entries deleted with their frontends"
    );
}

#[test]
fn a_restarted_agent_adopts_ipv6_frontends_and_changes_nothing() {
    let d = dir();
    let mut dp = load(&d);
    let vip6: Ipv6Addr = "fd00:96::10".parse().expect("address");
    let mut guarded = frontend6(FrontendKind::LoadBalancer, &[3], Some(13));
    guarded.source_ranges = vec![("2001:db8::".parse().expect("address"), 32)];
    let desired = [
        Change::Upsert(
            key(Ipv4Addr::new(10, 96, 0, 10), 80),
            frontend(FrontendKind::ClusterIp, &[2], None),
        ),
        Change::Upsert(
            key(vip6, 80),
            frontend6(FrontendKind::ClusterIp, &[2, 3], None),
        ),
        Change::Upsert(
            key("fd00:18::100".parse::<Ipv6Addr>().expect("address"), 80),
            guarded,
        ),
    ];
    dp.apply(&desired).expect("program");
    let first = dp.programmed().clone();
    let before = serde_json::to_string(&dp.maps().dump().expect("dump")).expect("json");
    drop(dp);
    let mut dp = load(&d);
    let adopted = dp.programmed().clone();
    for (k, f) in &first.frontends {
        let a = adopted
            .frontends
            .get(k)
            .unwrap_or_else(|| panic!("{k} adopted"));
        assert_eq!(a.backends, f.backends, "{k}: backends adopted");
        assert_eq!(a.kind, f.kind);
    }
    assert_eq!(adopted.frontends.len(), first.frontends.len());
    // The agent's first sync after the restart: whatever it upserts, the
    // maps stay as they were (same ids, same generations).
    let table = proxy::lb::LbTable {
        frontends: first.frontends.clone(),
        owners: Default::default(),
    };
    let changes = proxy::diff::diff(dp.programmed(), &table);
    dp.apply(&changes).expect("first sync");
    let after = serde_json::to_string(&dp.maps().dump().expect("dump")).expect("json");
    assert_eq!(before, after, "a restart changes nothing in the maps");
    assert_eq!(dp.programmed().frontends, first.frontends);
    // Ids continue past the adopted ones: a new IPv6 frontend gets a
    // fresh id and a fresh backend id.
    dp.apply(&[Change::Upsert(
        key("fd00:96::11".parse::<Ipv6Addr>().expect("address"), 80),
        frontend6(FrontendKind::ClusterIp, &[7], None),
    )])
    .expect("program");
    let dump = dp.maps().dump().expect("dump");
    let ids: std::collections::BTreeSet<u32> = dump.services.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 4, "distinct frontend ids");
    let bids: std::collections::BTreeSet<u32> = dump.backends.iter().map(|b| b.id).collect();
    assert_eq!(bids.len(), dump.backends.len(), "distinct backend ids");
}

#[test]
fn ipv6_socket_reverse_entries_of_removed_frontends_are_flushed() {
    let d = dir();
    let mut dp = load(&d);
    let vip = key("fd00:96::10".parse::<Ipv6Addr>().expect("address"), 80);
    let other = key("fd00:96::11".parse::<Ipv6Addr>().expect("address"), 80);
    dp.apply(&[
        Change::Upsert(vip, frontend6(FrontendKind::ClusterIp, &[2], None)),
        Change::Upsert(other, frontend6(FrontendKind::ClusterIp, &[3], None)),
    ])
    .expect("program");
    // What connect6 writes for a socket to each frontend.
    let mut pinned = Maps::open_pinned(&d.0).expect("pinned maps");
    for (cookie, fe, backend) in [(1u64, vip, 2u8), (2, other, 3)] {
        let IpAddr::V6(addr) = fe.addr else {
            panic!("{fe} is an IPv6 frontend")
        };
        pinned
            .sock_revnat6
            .insert(
                SockRevNatKey6 {
                    cookie,
                    addr: ip6_words(backend6(backend)),
                    port: 8080u16.to_be(),
                    _pad: 0,
                    _pad2: 0,
                },
                SockRevNatValue6 {
                    addr: ip6_words(addr),
                    port: fe.port.to_be(),
                    _pad: 0,
                    service_id: service_id(&dp, fe.addr),
                },
                0,
            )
            .expect("insert");
    }
    let live = service_id(&dp, other.addr);
    dp.apply(&[Change::Remove(vip)]).expect("remove");
    dp.housekeeping().expect("housekeeping");
    let left: Vec<u32> = pinned
        .sock_revnat6
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| v.service_id)
        .collect();
    assert_eq!(left, vec![live], "only the live frontend's entry");
}
