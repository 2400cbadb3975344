use proxy::maglev::*;
use std::net::{Ipv4Addr, SocketAddrV4};

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| {
            MaglevBackend::from_addr(
                SocketAddrV4::new(
                    Ipv4Addr::new(10, 244, (i / 200) as u8, (i % 200 + 1) as u8),
                    8080,
                ),
                1,
            )
        })
        .collect()
}
fn changed(a: &MaglevTable, b: &MaglevTable) -> (f64, f64) {
    let mut all = 0;
    let mut other = 0;
    for (x, y) in a.slots.iter().zip(&b.slots) {
        let ka = &a.backends[*x as usize];
        let kb = &b.backends[*y as usize];
        if ka != kb {
            all += 1;
            if b.backends.contains(ka) && a.backends.contains(kb) {
                other += 1;
            }
        }
    }
    (
        all as f64 / a.slots.len() as f64,
        other as f64 / a.slots.len() as f64,
    )
}
#[test]
fn measure() {
    for m in [16381u32, 32749, 65521, 131071] {
        for n in [10usize, 100] {
            println!("M={m}");
            let full = build(&backends(n), m).unwrap();
            let c = full.slot_counts();
            println!(
                "N={n} min {} max {}",
                c.iter().min().unwrap(),
                c.iter().max().unwrap()
            );
            let (mut mx, mut mxo, mut sum) = (0f64, 0f64, 0f64);
            for r in 0..n {
                let mut b = backends(n);
                b.remove(r);
                let t = build(&b, m).unwrap();
                let (a, o) = changed(&full, &t);
                mx = mx.max(a);
                mxo = mxo.max(o);
                sum += a;
            }
            println!(
                "N={n} remove: max all {mx:.4} mean {:.4} max other {mxo:.4} (1/N={:.4})",
                sum / n as f64,
                1.0 / n as f64
            );
            let small = build(&backends(n), m).unwrap();
            let big = build(&backends(n + 1), m).unwrap();
            let (a, o) = changed(&small, &big);
            println!(
                "N={n} add: all {a:.4} other {o:.4} (1/(N+1)={:.4})",
                1.0 / (n + 1) as f64
            );
        }
    }
}
