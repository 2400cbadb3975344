//! `cargo xtask demo` as a test: the demo binary builds its cluster, loads
//! `tests/fixtures/demo.yaml`, and every request it sends (TCP and UDP to
//! the IPv4 ClusterIP, TCP to the IPv6 one) must be answered by one of the
//! service's two backends, seen from the client's own address.

use std::process::Command;

#[test]
fn the_demo_reaches_both_clusterips_of_its_dual_stack_service() {
    let out = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--requests", "6"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let sections: Vec<&str> = stdout.split("==> ").collect();
    for (head, client) in [
        (
            "6 TCP requests from pod-1-1 (10.244.1.2) to ClusterIP 10.96.0.10:80",
            "10.244.1.2",
        ),
        (
            "6 UDP requests from pod-1-1 (10.244.1.2) to ClusterIP 10.96.0.10:53",
            "10.244.1.2",
        ),
        (
            "6 TCP requests from pod-1-1 (fd00:244:1::2) to ClusterIP [fd00:96::10]:80",
            "fd00:244:1::2",
        ),
    ] {
        let section = sections
            .iter()
            .find(|s| s.starts_with(head))
            .unwrap_or_else(|| panic!("no {head:?} in\n{stdout}"));
        let answered: usize = section
            .lines()
            .skip(1)
            .filter_map(|l| {
                let (n, rest) = l.trim().split_once(" answered by ")?;
                let backend_ok = rest.starts_with("pod-1-2 ") || rest.starts_with("pod-2-1 ");
                assert!(backend_ok, "{head}: {l}");
                assert!(
                    rest.ends_with(&format!("(saw client {client})")),
                    "{head}: {l}"
                );
                n.parse::<usize>().ok()
            })
            .sum();
        assert_eq!(answered, 6, "{head}:\n{section}");
    }
    assert!(
        stdout.contains("SVC_V6"),
        "dump-maps shows the IPv6 frontend:\n{stdout}"
    );
}
