//! `--mode ipvs` live, in a VM: this machine's kernel has no IP_VS, so the
//! test boots Debian's own kernel (with its ip_vs modules) under qemu
//! (software emulation) with a busybox initramfs carrying the agent. The
//! agent is fed by the API server fixture on the host (qemu's user network
//! forwards the guest's 10.0.2.2 to the host's loopback). Two backends
//! (busybox httpd on local addresses) behind a ClusterIP and a NodePort;
//! then one endpoint is removed and only the other must answer.
//!
//! Ignored by default (downloads ~70 MB of .debs through apt on first use,
//! needs qemu-system-x86_64): run with `cargo xtask vm-test ipvs` (which
//! `cargo xtask test` runs too). On failure the serial transcript is kept in
//! `target/vm-cache/last-serial.log`; `VM_TEST_KEEP_INITRAMFS=1` keeps the
//! initramfs there as well.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use proxy_tests::{agent::binary, apiserver::ApiServer};

/// Modules in load order (dependencies first; busybox insmod does not
/// resolve them, nor the crc32c soft dependency of libcrc32c).
const MODULES: [&str; 9] = [
    "crc32c_generic",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "libcrc32c",
    "nf_conntrack",
    "ip_vs",
    "ip_vs_rr",
    "dummy",
    "e1000",
];

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cache of downloaded and extracted packages: (kernel image, modules
/// dir, busybox).
fn packages() -> (PathBuf, PathBuf, PathBuf) {
    let cache = proxy_tests::agent::bin_dir().join("../vm-cache");
    fs::create_dir_all(&cache).expect("cache dir");
    let has = |prefix: &str| {
        fs::read_dir(&cache)
            .expect("read cache")
            .flatten()
            .any(|e| {
                e.file_name().to_string_lossy().starts_with(prefix)
                    && e.file_name().to_string_lossy().ends_with(".deb")
            })
    };
    if !has("linux-image-") || !has("busybox-static") {
        // The kernel package linux-image-amd64 points at.
        let deps = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .expect("apt-cache");
        let image = String::from_utf8_lossy(&deps.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(str::to_owned))
            .expect("linux-image-amd64 depends on a kernel image");
        sh(Command::new("apt-get")
            .args(["download", &image, "busybox-static"])
            .current_dir(&cache));
    }
    for (prefix, dir) in [("linux-image-", "k"), ("busybox-static", "bb")] {
        if cache.join(dir).is_dir() {
            continue;
        }
        let deb = fs::read_dir(&cache)
            .expect("read cache")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .expect("downloaded .deb");
        sh(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(cache.join(dir)));
    }
    let boot = cache.join("k/boot");
    let kernel = fs::read_dir(&boot)
        .expect("boot dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .expect("vmlinuz");
    let modules = fs::read_dir(cache.join("k/lib/modules"))
        .expect("modules dir")
        .flatten()
        .map(|e| e.path())
        .next()
        .expect("modules version dir");
    (kernel, modules, cache.join("bb/bin/busybox"))
}

/// A `newc` cpio archive of (path in archive, mode, contents).
fn cpio(entries: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut put = |name: &str, mode: u32, data: &[u8], ino: usize| {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        put(name, *mode, data, i + 1);
    }
    put("TRAILER!!!", 0, &[], 0);
    out
}

const DIR: u32 = 0o040755;
const EXE: u32 = 0o100755;
const FILE: u32 = 0o100644;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in MODULES; do insmod /lib/modules/$m.ko || echo "VMTEST insmod $m failed"; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
ip addr add 10.244.0.2/32 dev lo
ip addr add 10.244.0.3/32 dev lo
mkdir -p /www/a /www/b /tmp
echo pod-a > /www/a/index.html
echo pod-b > /www/b/index.html
httpd -p 10.244.0.2:8080 -h /www/a
httpd -p 10.244.0.3:8080 -h /www/b
SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt /proxy --mode ipvs --kubeconfig /kubeconfig --hostname-override vm --bpffs-path /tmp/bpf >/tmp/agent.log 2>&1 &
echo VMTEST booted

i=0
while [ $i -lt 1500 ]; do
  c=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 10.96.0.10 80 2>/dev/null | tail -1)
  n=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 10.0.2.15 30080 2>/dev/null | tail -1)
  echo "VMTEST cip=$c np=$n"
  if [ $((i % 50)) -eq 49 ]; then tail -5 /tmp/agent.log | sed 's/^/VMTEST agent: /'; fi
  i=$((i+1))
  sleep 0.2
done
poweroff -f
"#;

fn objects(endpoints: &[&str]) -> String {
    let eps: String = endpoints
        .iter()
        .map(|ip| format!("- {{addresses: [\"{ip}\"], nodeName: vm}}\n"))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: vm}}
status: {{addresses: [{{type: InternalIP, address: 10.0.2.15}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{{port: 80, nodePort: 30080, protocol: TCP, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
{eps}"#
    )
}

fn initramfs(dir: &Path, modules: &Path, busybox: &Path, kubeconfig: &Path) -> PathBuf {
    let mut entries: Vec<(String, u32, Vec<u8>)> = Vec::new();
    for d in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "lib",
        "lib64",
        "lib/modules",
        "lib/x86_64-linux-gnu",
        "usr",
        "usr/bin",
        "usr/sbin",
    ] {
        entries.push((d.to_owned(), DIR, Vec::new()));
    }
    entries.push((
        "bin/busybox".into(),
        EXE,
        fs::read(busybox).expect("busybox"),
    ));
    let init = INIT.replace("MODULES", &MODULES.join(" "));
    entries.push(("init".into(), EXE, init.into_bytes()));
    for m in MODULES {
        let path = walk_find(modules, &format!("{m}.ko")).unwrap_or_else(|| panic!("module {m}"));
        entries.push((
            format!("lib/modules/{m}.ko"),
            FILE,
            fs::read(path).expect("module"),
        ));
    }
    // The agent, stripped, with its shared libraries.
    let stripped = dir.join("proxy");
    sh(Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(binary("proxy").expect("proxy built")));
    entries.push(("proxy".into(), EXE, fs::read(&stripped).expect("proxy")));
    let ldd = Command::new("ldd").arg(&stripped).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let real = fs::canonicalize(lib).expect("library");
        entries.push((
            lib.trim_start_matches('/').to_owned(),
            EXE,
            fs::read(real).expect("lib"),
        ));
    }
    entries.push((
        "kubeconfig".into(),
        FILE,
        fs::read(kubeconfig).expect("kubeconfig"),
    ));
    // The kube client's TLS stack loads the system roots even for http.
    for d in ["etc", "etc/ssl", "etc/ssl/certs"] {
        entries.push((d.to_owned(), DIR, Vec::new()));
    }
    let roots = "/etc/ssl/certs/ca-certificates.crt";
    entries.push((
        roots.trim_start_matches('/').to_owned(),
        FILE,
        fs::read(roots).expect("system CA bundle (ca-certificates)"),
    ));
    let out = dir.join("initramfs.cpio");
    fs::write(&out, cpio(&entries)).expect("write initramfs");
    if std::env::var_os("VM_TEST_KEEP_INITRAMFS").is_some() {
        let _ = fs::copy(
            &out,
            proxy_tests::agent::bin_dir().join("../vm-cache/last-initramfs.cpio"),
        );
    }
    out
}

fn walk_find(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = walk_find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

#[test]
#[ignore = "boots a VM; run with `cargo xtask vm-test ipvs`"]
fn ipvs_mode_in_a_vm_serves_cluster_ip_and_node_port_and_follows_endpoint_removal() {
    let (kernel, modules, busybox) = packages();
    let scratch = proxy_tests::agent::Scratch::new("vm-ipvs").expect("scratch");
    let api = ApiServer::start().expect("api");
    let addr = api.serve_local().expect("serve");
    api.apply_yaml(&objects(&["10.244.0.2", "10.244.0.3"]))
        .expect("objects");
    // The guest reaches the host's loopback as 10.0.2.2.
    let kubeconfig = scratch.path().join("kubeconfig");
    ApiServer::write_kubeconfig(SocketAddr::from(([10, 0, 2, 2], addr.port())), &kubeconfig)
        .expect("kubeconfig");
    let initrd = initramfs(scratch.path(), &modules, &busybox, &kubeconfig);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1"])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .args(["-netdev", "user,id=n0", "-device", "e1000,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    let stdout = qemu.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The serial console ends lines with CR LF.
            if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                break;
            }
        }
    });
    let mut transcript = String::new();
    let next = |deadline: Instant, transcript: &mut String| -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = rx.recv_timeout(left).ok()?;
        transcript.push_str(&line);
        transcript.push('\n');
        Some(line)
    };
    let started = Instant::now();
    // Phase 1: both backends through the ClusterIP and the NodePort.
    let deadline = started + Duration::from_secs(120);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 4 {
        let Some(line) = next(deadline, &mut transcript) else {
            let _ = qemu.kill();
            let _ = fs::write(
                proxy_tests::agent::bin_dir().join("../vm-cache/last-serial.log"),
                &transcript,
            );
            panic!(
                "phase 1 not reached; serial (also in target/vm-cache/last-serial.log):\n{transcript}"
            );
        };
        if let Some(rest) = line.strip_prefix("VMTEST cip=") {
            let (c, n) = rest.split_once(" np=").unwrap_or((rest, ""));
            for (path, v) in [("cip", c), ("np", n)] {
                if v == "pod-a" || v == "pod-b" {
                    seen.insert(format!("{path}:{v}"));
                }
            }
        }
    }
    let phase1 = started.elapsed();
    // Phase 2: pod-b's endpoint removed; only pod-a answers, both ways.
    api.apply_yaml(&objects(&["10.244.0.2"]))
        .expect("remove one");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut streak = 0;
    while streak < 20 {
        let Some(line) = next(deadline, &mut transcript) else {
            let _ = qemu.kill();
            let _ = fs::write(
                proxy_tests::agent::bin_dir().join("../vm-cache/last-serial.log"),
                &transcript,
            );
            panic!(
                "phase 2 not reached; serial (also in target/vm-cache/last-serial.log):\n{transcript}"
            );
        };
        if let Some(rest) = line.strip_prefix("VMTEST cip=") {
            if rest == "pod-a np=pod-a" {
                streak += 1;
            } else {
                streak = 0;
            }
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "ipvs VM: both backends via ClusterIP and NodePort after {:.1} s; removal effective, 20 answers in a row from pod-a only, after {:.1} s",
        phase1.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
