//! `--mode ipvs` live, in a VM: this machine's kernel has no IP_VS, so the
//! test boots Debian's own kernel (with its ip_vs, netfilter and ip set
//! modules) under qemu (software emulation) with a busybox initramfs
//! carrying the agent, and this machine's `iptables` (legacy) and `ipset`
//! with their libraries. The agent is fed by the API server fixture on the
//! host (qemu's user network forwards the guest's 10.0.2.2 to the host's
//! loopback).
//!
//! Inside the VM, one node (`vm`: 10.0.2.15 on eth0, 192.168.100.1 and
//! 192.168.101.1 towards two clients) with two pods in network namespaces
//! on veths (`pod-a` 10.244.0.2, `pod-b` 10.244.0.3, busybox httpd whose
//! CGI answers its name and the client address it saw) and two outside
//! clients (`ext` 192.168.100.2, `ext2` 192.168.101.2). Every round, the
//! VM prints what each probe got; the test checks:
//!
//! * ClusterIP from pod-a reaches both pods; pod-b sees pod-a's address
//!   (no masquerade between pods), pod-a reaching itself (hairpin) sees a
//!   node address (`KUBE-LOOP-BACK` masquerade; without it the reply never
//!   arrives);
//! * the NodePort from outside, on both node addresses, reaches both pods
//!   and the pods see a node address (masqueraded, so replies come back
//!   through the node);
//! * a NodePort with `externalTrafficPolicy: Local` keeps the client's
//!   address;
//! * a service without endpoints is refused at once (IPVS's ICMP);
//! * a host-network listener is not reachable on a ClusterIP
//!   (`KUBE-IPVS-FILTER` rejects ports that are no service);
//! * a LoadBalancer IP with `loadBalancerSourceRanges` serves the listed
//!   client and never the other;
//! * then one endpoint is removed and only the other answers, through the
//!   ClusterIP and the NodePort.
//!
//! Ignored by default (downloads ~70 MB of .debs through apt on first use,
//! needs qemu-system-x86_64): run with `cargo xtask vm-test ipvs` (which
//! `cargo xtask test` runs too). On failure the serial transcript is kept in
//! `target/vm-cache/last-serial.log`; `VM_TEST_KEEP_INITRAMFS=1` keeps the
//! initramfs there as well.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use proxy_tests::{agent::binary, apiserver::ApiServer};

/// The modules the VM needs; their dependencies are added from each
/// module's own `depends=` (the .deb ships no modules.dep), in load order.
/// crc32c_generic first: libcrc32c's soft dependency, which busybox insmod
/// does not resolve.
const MODULES: [&str; 26] = [
    "crc32c_generic",
    "e1000",
    "dummy",
    "veth",
    "ip_vs",
    "ip_vs_rr",
    "ip_tables",
    "iptable_nat",
    "iptable_filter",
    "xt_comment",
    "xt_mark",
    "xt_set",
    "xt_addrtype",
    "xt_conntrack",
    "xt_tcpudp",
    "xt_MASQUERADE",
    "ipt_REJECT",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet",
    "ip_set_bitmap_port",
    "nf_conntrack",
    "nf_nat",
    "nf_defrag_ipv4",
];

/// Host programs carried into the VM (with their shared libraries):
/// (path on the host, path in the VM).
const PROGRAMS: [(&str, &str); 2] = [
    (
        "/usr/sbin/xtables-legacy-multi",
        "usr/sbin/xtables-legacy-multi",
    ),
    ("/usr/sbin/ipset", "usr/sbin/ipset"),
];
/// iptables' extensions (loaded at run time).
const XTABLES: &str = "/usr/lib/x86_64-linux-gnu/xtables";

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
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in MODULES; do insmod /lib/modules/$m.ko || echo "VMTEST insmod $m failed"; done
# Kernel messages (IPVS's "no destination available") would split lines.
dmesg -n 1
for t in iptables iptables-save iptables-restore; do ln -s xtables-legacy-multi /usr/sbin/$t; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

# Network namespaces, each held by a sleeping process (busybox ip has no
# `netns`): two pods and two outside clients.
unshare -n sleep 100000 & PA=$!
unshare -n sleep 100000 & PB=$!
unshare -n sleep 100000 & EXT=$!
unshare -n sleep 100000 & EXT2=$!
sleep 0.5
# link PID HOST_IF HOST_ADDR NS_ADDR GATEWAY: a veth (busybox names the
# peer veth0) moved into the namespace as eth0.
link() {
  ip link add $2 type veth
  ip link set veth0 netns $1
  nsenter -t $1 -n ip link set veth0 name eth0
  nsenter -t $1 -n ip link set lo up
  nsenter -t $1 -n ip link set eth0 up
  ip link set $2 up
  ip addr add $3 dev $2
  nsenter -t $1 -n ip addr add $4 dev eth0
  nsenter -t $1 -n ip route add $5 dev eth0
  nsenter -t $1 -n ip route add default via $5
}
# Pods as kindnet wires them: /32 routes to each veth, the node's gateway
# address on every pod veth.
link $PA veth-pa 10.244.0.1/32 10.244.0.2/32 10.244.0.1
ip route add 10.244.0.2/32 dev veth-pa
link $PB veth-pb 10.244.0.1/32 10.244.0.3/32 10.244.0.1
ip route add 10.244.0.3/32 dev veth-pb
link $EXT ext0 192.168.100.1/24 192.168.100.2/24 192.168.100.1
link $EXT2 ext1 192.168.101.1/24 192.168.101.2/24 192.168.101.1

# Backends: busybox httpd whose CGI answers the pod's name and the client
# address it saw.
# (httpd listens on IPv6 and reports IPv4 clients as [::ffff:a.b.c.d].)
for p in a b; do
  mkdir -p /www/$p/cgi-bin
  cat > /www/$p/cgi-bin/who <<EOF
#!/bin/sh
echo Content-Type: text/plain
echo
echo pod-$p \$(echo \$REMOTE_ADDR | sed 's/^\\[::ffff://; s/\\]\$//')
EOF
  chmod +x /www/$p/cgi-bin/who
done
nsenter -t $PA -n httpd -p 8080 -h /www/a
nsenter -t $PB -n httpd -p 8080 -h /www/b
# A host-network listener on every address (sshd, say).
mkdir -p /www/host/cgi-bin
printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho host-listener\n' > /www/host/cgi-bin/who
chmod +x /www/host/cgi-bin/who
httpd -p 2222 -h /www/host

mkdir -p /tmp /run
SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt /proxy --mode ipvs --kubeconfig /kubeconfig --hostname-override vm --bpffs-path /tmp/bpf >/tmp/agent.log 2>&1 &
AGENT=$!
echo VMTEST booted

# get PID ADDR PORT: what a request from PID's namespace got: `pod-x@seen`,
# `refused`, `none` (timed out) or the last line of whatever answered.
# (busybox nc's -w bounds the connect only: a connection whose real server
# went away mid-request would hang it.)
get() {
  out=$(printf 'GET /cgi-bin/who HTTP/1.0\r\n\r\n' | timeout 4 nsenter -t $1 -n nc -w 2 $2 $3 2>&1 | tail -1)
  case "$out" in
    *refused*) echo refused;;
    ""|*"timed out"*) echo none;;
    *) echo "$out" | tr ' ' '@';;
  esac
}
i=0
while [ $i -lt 1000 ]; do
  echo "VMTEST cip=$(get $PA 10.96.0.10 80) np1=$(get $EXT 192.168.100.1 30080) np2=$(get $EXT 10.0.2.15 30080) loc=$(get $EXT 192.168.100.1 30081) empty=$(get $PA 10.96.0.11 80) filt=$(get $PA 10.96.0.10 2222) lbok=$(get $EXT 192.168.200.10 80) lbdeny=$(get $EXT2 192.168.200.10 80)"
  if [ $((i % 20)) -eq 19 ]; then tail -5 /tmp/agent.log | sed 's/^/VMTEST agent: /'; fi
  if ! kill -0 $AGENT 2>/dev/null; then
    tail -5 /tmp/agent.log | sed 's/^/VMTEST agent: /'
    echo VMTEST agent exited
  fi
  i=$((i+1))
done
poweroff -f
"#;

/// The node, and `web` (NodePort 30080, pod-a and pod-b, or only pod-a
/// with `both == false`), `loc` (NodePort 30081, externalTrafficPolicy
/// Local, pod-a), `empty` (no endpoints) and `lb` (LoadBalancer
/// 192.168.200.10 for 192.168.100.0/24 only, both pods).
fn objects(both: bool) -> String {
    let ep = |ip: &str| format!("- {{addresses: [\"{ip}\"], nodeName: vm}}\n");
    let web_eps = if both {
        ep("10.244.0.2") + &ep("10.244.0.3")
    } else {
        ep("10.244.0.2")
    };
    let slice = |name: &str, eps: &str| {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints:
{eps}"#
        )
    };
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: vm}}
status: {{addresses: [{{type: InternalIP, address: 10.0.2.15}}, {{type: ExternalIP, address: 192.168.100.1}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports: [{{port: 80, nodePort: 30080, protocol: TCP, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: loc, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{{port: 80, nodePort: 30081, protocol: TCP, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  clusterIP: 10.96.0.11
  ports: [{{port: 80, protocol: TCP, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.13
  loadBalancerSourceRanges: [192.168.100.0/24]
  ports: [{{port: 80, nodePort: 30082, protocol: TCP, targetPort: 8080}}]
status: {{loadBalancer: {{ingress: [{{ip: 192.168.200.10}}]}}}}
{}{}{}"#,
        slice("web", &web_eps),
        slice("loc", &ep("10.244.0.2")),
        slice("lb", &(ep("10.244.0.2") + &ep("10.244.0.3"))),
    )
}

/// The module names in `depends=` of a module file's `.modinfo`.
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|b| *b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `wanted` and everything they depend on, dependencies first, as (name,
/// file contents). Modules built into the kernel are skipped.
fn module_closure(modules: &Path, wanted: &[&str]) -> Vec<(String, Vec<u8>)> {
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |m: &str| {
        builtin
            .lines()
            .any(|l| l.rsplit('/').next() == Some(&format!("{m}.ko")))
    };
    fn visit(
        m: &str,
        modules: &Path,
        is_builtin: &dyn Fn(&str) -> bool,
        out: &mut Vec<(String, Vec<u8>)>,
        seen: &mut BTreeSet<String>,
    ) {
        if !seen.insert(m.to_owned()) || is_builtin(m) {
            return;
        }
        let path = walk_find(modules, &format!("{m}.ko"))
            .or_else(|| walk_find(modules, &format!("{}.ko", m.replace('_', "-"))))
            .unwrap_or_else(|| panic!("module {m} not in {}", modules.display()));
        let ko = fs::read(path).expect("module");
        for d in module_depends(&ko) {
            visit(&d, modules, is_builtin, out, seen);
        }
        out.push((m.to_owned(), ko));
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for m in wanted {
        visit(m, modules, &is_builtin, &mut out, &mut seen);
    }
    out
}

/// The shared libraries `file` needs (ldd), as absolute paths.
fn libraries(file: &Path) -> Vec<String> {
    let ldd = Command::new("ldd").arg(file).output().expect("ldd");
    String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

fn initramfs(dir: &Path, modules: &Path, busybox: &Path, kubeconfig: &Path) -> PathBuf {
    // path in the archive -> (mode, contents); parents are added below.
    let mut files: BTreeMap<String, (u32, Vec<u8>)> = BTreeMap::new();
    let mut put = |path: &str, mode: u32, data: Vec<u8>| {
        files.insert(path.trim_start_matches('/').to_owned(), (mode, data));
    };
    for d in ["proc", "sys", "dev", "tmp", "usr/bin", "sbin"] {
        put(d, DIR, Vec::new());
    }
    put("bin/busybox", EXE, fs::read(busybox).expect("busybox"));
    let closure = module_closure(modules, &MODULES);
    let order: Vec<&str> = closure.iter().map(|(m, _)| m.as_str()).collect();
    put(
        "init",
        EXE,
        INIT.replace("MODULES", &order.join(" ")).into_bytes(),
    );
    for (m, ko) in &closure {
        put(&format!("lib/modules/{m}.ko"), FILE, ko.clone());
    }
    // The agent, stripped; the host's iptables (legacy), its extensions,
    // and ipset; all with their shared libraries.
    let stripped = dir.join("proxy");
    sh(Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(binary("proxy").expect("proxy built")));
    let mut needs_libs = vec![stripped.clone()];
    put("proxy", EXE, fs::read(&stripped).expect("proxy"));
    for (host, guest) in PROGRAMS {
        put(
            guest,
            EXE,
            fs::read(host)
                .unwrap_or_else(|e| panic!("{host}: {e} (cargo xtask setup installs it)")),
        );
        needs_libs.push(PathBuf::from(host));
    }
    for e in fs::read_dir(XTABLES)
        .expect("iptables extensions")
        .flatten()
    {
        let p = e.path();
        put(&p.to_string_lossy(), EXE, fs::read(&p).expect("extension"));
        needs_libs.push(p);
    }
    let libs: BTreeSet<String> = needs_libs.iter().flat_map(|p| libraries(p)).collect();
    for lib in libs {
        let real = fs::canonicalize(&lib).expect("library");
        put(&lib, EXE, fs::read(real).expect("lib"));
    }
    put(
        "kubeconfig",
        FILE,
        fs::read(kubeconfig).expect("kubeconfig"),
    );
    // ipset and iptables name protocols (`tcp:80`) through netbase's table.
    put(
        "/etc/protocols",
        FILE,
        fs::read("/etc/protocols").expect("/etc/protocols (netbase)"),
    );
    // The kube client's TLS stack loads the system roots even for http.
    let roots = "/etc/ssl/certs/ca-certificates.crt";
    put(
        roots,
        FILE,
        fs::read(roots).expect("system CA bundle (ca-certificates)"),
    );

    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for path in files.keys() {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    // Parents before children (sorted paths put "a" before "a/b").
    let mut entries: Vec<(String, u32, Vec<u8>)> = dirs
        .into_iter()
        .filter(|d| !files.contains_key(d))
        .map(|d| (d, DIR, Vec::new()))
        .collect();
    entries.extend(files.into_iter().map(|(p, (m, d))| (p, m, d)));
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

/// One round of the VM's probes: probe -> what it got.
type Round = BTreeMap<String, String>;

fn parse_round(line: &str) -> Option<Round> {
    let rest = line.strip_prefix("VMTEST cip=")?;
    Some(
        format!("cip={rest}")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// What must hold in every round once the agent has synced (the ClusterIP
/// answers): Err names the probe and what it got.
fn invariants(r: &Round) -> Result<(), String> {
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("missing");
    let answered = |v: &str| v.starts_with("pod-");
    let check = |k: &str, ok: &dyn Fn(&str) -> bool, want: &str| {
        let v = get(k);
        if ok(v) {
            Ok(())
        } else {
            Err(format!("{k} got {v}, want {want}"))
        }
    };
    // Pods see each other's address; a pod reaching itself sees the node.
    check(
        "cip",
        &|v| v == "pod-b@10.244.0.2" || v == "pod-a@10.244.0.1",
        "pod-b@10.244.0.2 or (hairpin, masqueraded) pod-a@10.244.0.1",
    )?;
    for k in ["np1", "np2", "lbok"] {
        check(
            k,
            &|v| answered(v) && v.ends_with("@10.244.0.1"),
            "a pod seeing the node's 10.244.0.1 (masqueraded)",
        )?;
    }
    check(
        "loc",
        &|v| v == "pod-a@192.168.100.2",
        "pod-a@192.168.100.2 (client kept)",
    )?;
    check("empty", &|v| v == "refused", "refused")?;
    check("filt", &|v| v == "refused", "refused (not a service port)")?;
    Ok(())
}

struct Vm {
    qemu: std::process::Child,
    rx: mpsc::Receiver<String>,
    transcript: String,
}

impl Vm {
    fn next(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.checked_duration_since(Instant::now())?;
        let line = self.rx.recv_timeout(left).ok()?;
        self.transcript.push_str(&line);
        self.transcript.push('\n');
        Some(line)
    }

    /// Kills the VM, keeps the serial transcript and panics with it.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.qemu.kill();
        let _ = fs::write(
            proxy_tests::agent::bin_dir().join("../vm-cache/last-serial.log"),
            &self.transcript,
        );
        panic!(
            "{why}; serial (also in target/vm-cache/last-serial.log):\n{}",
            self.transcript
        );
    }
}

#[test]
#[ignore = "boots a VM; run with `cargo xtask vm-test ipvs`"]
fn ipvs_mode_in_a_vm_masquerades_guards_rejects_and_follows_endpoints() {
    let (kernel, modules, busybox) = packages();
    let scratch = proxy_tests::agent::Scratch::new("vm-ipvs").expect("scratch");
    let api = ApiServer::start().expect("api");
    let addr = api.serve_local().expect("serve");
    api.apply_yaml(&objects(true)).expect("objects");
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
    let mut vm = Vm {
        qemu,
        rx,
        transcript: String::new(),
    };
    let started = Instant::now();

    // Phase 1: every probe, until each has shown what it must.
    let deadline = started + Duration::from_secs(240);
    let must_see = [
        ("cip", "pod-a@10.244.0.1"),
        ("cip", "pod-b@10.244.0.2"),
        ("np1", "pod-a@10.244.0.1"),
        ("np1", "pod-b@10.244.0.1"),
        ("np2", "pod-a@10.244.0.1"),
        ("np2", "pod-b@10.244.0.1"),
        ("lbok", "pod-a@10.244.0.1"),
        ("lbok", "pod-b@10.244.0.1"),
        ("loc", "pod-a@192.168.100.2"),
    ];
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut synced_rounds = 0;
    // (At least 4 synced rounds, so the invariants are checked more than
    // the 2 the round robin may need.)
    while synced_rounds < 4
        || must_see
            .iter()
            .any(|(k, v)| !seen.contains(&((*k).to_owned(), (*v).to_owned())))
    {
        let Some(line) = vm.next(deadline) else {
            vm.fail(&format!("phase 1 not reached; seen {seen:?}"));
        };
        if line.contains("VMTEST insmod") {
            vm.fail(&format!("a module did not load: {line}"));
        }
        if line == "VMTEST agent exited" {
            vm.fail("the agent exited");
        }
        let Some(round) = parse_round(&line) else {
            continue;
        };
        // The source-range guard never lets ext2 through, synced or not.
        if round.get("lbdeny").map(String::as_str) != Some("none") {
            vm.fail(&format!("lbdeny (unlisted client) got through: {line}"));
        }
        if !round.get("cip").is_some_and(|v| v.starts_with("pod-")) {
            continue; // not synced yet
        }
        synced_rounds += 1;
        if let Err(e) = invariants(&round) {
            vm.fail(&format!("round {synced_rounds} after sync: {e}: {line}"));
        }
        seen.extend(round);
    }
    let phase1 = started.elapsed();

    // Phase 2: pod-b's endpoint removed; only pod-a answers, both ways.
    api.apply_yaml(&objects(false)).expect("remove one");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut streak = 0;
    while streak < 10 {
        let Some(line) = vm.next(deadline) else {
            vm.fail("phase 2 not reached");
        };
        let Some(round) = parse_round(&line) else {
            continue;
        };
        let only_a = |k: &str| round.get(k).map(String::as_str) == Some("pod-a@10.244.0.1");
        if only_a("cip") && only_a("np1") {
            streak += 1;
        } else {
            streak = 0;
        }
    }
    let _ = vm.qemu.kill();
    let _ = vm.qemu.wait();
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "ipvs VM: every probe as expected after {:.1} s ({synced_rounds} synced rounds: ClusterIP with hairpin masquerade, NodePort on 2 addresses masqueraded, ETP Local client kept, no-endpoint and non-service-port refused, source ranges held); removal effective, 10 rounds in a row from pod-a only, after {:.1} s",
        phase1.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
