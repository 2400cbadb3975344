//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), as
//! Katran and Cilium use it to choose a backend on the north-south path.
//!
//! Pure: no I/O, no randomness, no dependence on the Rust version. Every node
//! and every agent restart computes the same table from the same backend set,
//! so a flow reaches the same backend whichever node it enters by, without
//! shared state.
//!
//! # Algorithm
//!
//! * A backend's identity is its [`MaglevBackend::key`], by convention its
//!   address and port as text (`"10.244.1.2:8080"`, see
//!   [`MaglevBackend::from_addr`]); never a locally allocated id, which
//!   differs between nodes and restarts.
//! * Backends are sorted by key first, so the input order does not matter;
//!   slot values are indices into that sorted list.
//! * For a table of `M` slots (`M` prime), backend `i` walks the permutation
//!   `p_i(j) = (offset_i + j * skip_i) mod M`, where
//!   `offset_i = murmur3_32(key, OFFSET_SEED) mod M` and
//!   `skip_i = murmur3_32(key, SKIP_SEED) mod (M - 1) + 1`
//!   (`M` prime makes every `skip` coprime with `M`, so each permutation
//!   visits every slot).
//! * Backends take turns; on its turn a backend claims the next slot of its
//!   permutation that is still free. With equal weights the turns are plain
//!   round robin in key order (the paper's algorithm), so slot counts differ
//!   by at most one. With weights, the next turn goes to the backend with the
//!   smallest `(claimed + 1) / weight` (ties: lowest index), so a backend
//!   gets `M * w / sum(w)` slots, give or take one. Weight 0 takes no turn
//!   (the backend stays in [`MaglevTable::backends`] with no slot). Cilium
//!   also scales turns by weight; its exact schedule differs from this one.
//!
//! # Table size
//!
//! `M` must be prime, at most [`MAX_TABLE_SIZE`], and at least the number of
//! backends with a non-zero weight (else some would get no slot), otherwise
//! [`build`] fails with a [`MaglevError`] naming the value. Balance needs
//! more: Cilium asks for `M > 100 * N` ([`BALANCE_FACTOR`]); a smaller table
//! is accepted, and [`MaglevTable::is_well_balanced`] reports it. Disruption
//! when a backend is removed also grows as `M / N` shrinks. The default,
//! [`DEFAULT_TABLE_SIZE`] (16381, Cilium's default), suits up to 163
//! backends per frontend.
//!
//! # Flow hash (shared with the kernel)
//!
//! [`flow_hash`] is MurmurHash3 x86_32 (seed [`FLOW_SEED`]) over the 13
//! bytes `saddr (4) | daddr (4) | sport (2) | dport (2) | proto (1)`, all
//! in network byte order, i.e. exactly as they appear in the IPv4 and
//! TCP/UDP headers. The slot is `flow_hash % M`. On a little-endian BPF
//! target (bpfel), the three 4-byte blocks are plain `u32` loads of the wire
//! bytes (`iph->saddr`, `iph->daddr`, and `sport`/`dport` together as one
//! `u32`); see [`flow_hash`] for the unrolled steps.

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
    net::{Ipv4Addr, SocketAddr},
};

use thiserror::Error;

/// Default number of slots per frontend (prime; Cilium's default).
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Largest table size [`build`] accepts (a table of `M` slots holds `4 * M`
/// bytes per frontend in userspace, and as many map entries in the kernel).
/// Cilium's largest supported size is 131071.
pub const MAX_TABLE_SIZE: u32 = 1 << 20;

/// Default of `--maglev-max-table-size`: the largest size a Service's
/// annotation may ask for (a prime, 4x the default size).
pub const DEFAULT_MAX_ANNOTATED_SIZE: u32 = 65_537;

/// A table is well balanced when `M > BALANCE_FACTOR * N` (Cilium's rule).
pub const BALANCE_FACTOR: u64 = 100;

/// MurmurHash3 seed of a backend's permutation offset (`"offs"`).
pub const OFFSET_SEED: u32 = 0x6f66_6673;
/// MurmurHash3 seed of a backend's permutation skip (`"skip"`).
pub const SKIP_SEED: u32 = 0x736b_6970;
/// MurmurHash3 seed of [`flow_hash`] (`"flow"`).
pub const FLOW_SEED: u32 = 0x666c_6f77;

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MaglevError {
    /// Maglev needs a prime table size.
    #[error("maglev table size {0} is not prime")]
    NotPrime(u32),
    /// Larger than [`MAX_TABLE_SIZE`].
    #[error("maglev table size {size} exceeds the maximum {max}")]
    TooLarge { size: u32, max: u32 },
    /// Fewer slots than backends with a non-zero weight.
    #[error("maglev table size {size} is smaller than the number of backends ({backends})")]
    TooSmall { size: u32, backends: usize },
    /// Two backends with the same key would share one permutation.
    #[error("duplicate maglev backend key {0:?}")]
    DuplicateBackend(String),
}

/// A backend as Maglev sees it: a stable identity and a weight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// Stable identity hashed into the permutation; by convention
    /// `"addr:port"` (see [`MaglevBackend::from_addr`]).
    pub key: String,
    /// Relative share of slots; 0 excludes the backend.
    pub weight: u32,
}

impl MaglevBackend {
    pub fn new(key: impl Into<String>, weight: u32) -> Self {
        Self {
            key: key.into(),
            weight,
        }
    }

    /// Key `"10.244.1.2:8080"` (IPv6: `"[fd00::1]:8080"`), the same on every
    /// node and across restarts.
    pub fn from_addr(addr: impl Into<SocketAddr>, weight: u32) -> Self {
        Self::new(addr.into().to_string(), weight)
    }
}

/// A populated Maglev lookup table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend keys, sorted; weight-0 backends included (they own no slot).
    pub backends: Vec<String>,
    /// `M` slots, each an index into [`MaglevTable::backends`]; empty when
    /// no backend has a non-zero weight.
    pub slots: Vec<u32>,
    /// `M`, the requested table size (also when `slots` is empty).
    pub size: u32,
}

impl MaglevTable {
    /// Backend index for a flow hash: `slots[flow_hash % M]`.
    pub fn lookup_index(&self, flow_hash: u32) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(flow_hash % self.size) as usize])
    }

    /// Backend key for a flow hash (see [`flow_hash`]); `None` without
    /// backends.
    pub fn lookup(&self, flow_hash: u32) -> Option<&str> {
        self.lookup_index(flow_hash)
            .map(|i| self.backends[i as usize].as_str())
    }

    /// Number of slots each backend owns, indexed like
    /// [`MaglevTable::backends`].
    pub fn slot_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends.len()];
        for &s in &self.slots {
            counts[s as usize] += 1;
        }
        counts
    }

    /// `M > 100 * N` (Cilium's rule for good balance and low disruption),
    /// where `N` counts backends that own slots.
    pub fn is_well_balanced(&self) -> bool {
        let n = self.slot_counts().iter().filter(|&&c| c > 0).count() as u64;
        u64::from(self.size) > BALANCE_FACTOR * n
    }
}

/// Build the table of `m` slots for `backends` (any order).
pub fn build(backends: &[MaglevBackend], m: u32) -> Result<MaglevTable, MaglevError> {
    validate_size(m)?;

    let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(w) = sorted.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(MaglevError::DuplicateBackend(w[0].key.clone()));
    }
    let active = sorted.iter().filter(|b| b.weight > 0).count();
    if (m as usize) < active {
        return Err(MaglevError::TooSmall {
            size: m,
            backends: active,
        });
    }

    let keys: Vec<String> = sorted.iter().map(|b| b.key.clone()).collect();
    if active == 0 {
        return Ok(MaglevTable {
            backends: keys,
            slots: Vec::new(),
            size: m,
        });
    }

    // Per backend: where its permutation is now, and its step.
    let m64 = u64::from(m);
    let mut pos = Vec::with_capacity(sorted.len());
    let mut skip = Vec::with_capacity(sorted.len());
    for b in &sorted {
        pos.push(u64::from(murmur3_32(b.key.as_bytes(), OFFSET_SEED)) % m64);
        skip.push(u64::from(murmur3_32(b.key.as_bytes(), SKIP_SEED)) % (m64 - 1) + 1);
    }

    let mut turns: BinaryHeap<Reverse<Turn>> = sorted
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(i, b)| {
            Reverse(Turn {
                next: 1,
                weight: u64::from(b.weight),
                index: i as u32,
            })
        })
        .collect();

    const FREE: u32 = u32::MAX;
    let mut slots = vec![FREE; m as usize];
    let mut filled = 0usize;
    while filled < slots.len() {
        let Some(Reverse(mut turn)) = turns.pop() else {
            unreachable!("at least one backend has a non-zero weight");
        };
        let i = turn.index as usize;
        // The permutation visits every slot, so a free one is found.
        while slots[pos[i] as usize] != FREE {
            pos[i] = (pos[i] + skip[i]) % m64;
        }
        slots[pos[i] as usize] = turn.index;
        pos[i] = (pos[i] + skip[i]) % m64;
        filled += 1;
        turn.next += 1;
        turns.push(Reverse(turn));
    }

    Ok(MaglevTable {
        backends: keys,
        slots,
        size: m,
    })
}

fn validate_size(m: u32) -> Result<(), MaglevError> {
    if m > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge {
            size: m,
            max: MAX_TABLE_SIZE,
        });
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    Ok(())
}

/// A backend's next turn, ordered by `next / weight` (the share it would
/// have after this turn), then by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Turn {
    /// Slots claimed after this turn.
    next: u64,
    weight: u64,
    index: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // next <= 2^20 and weight < 2^32: the products fit in u64.
        (self.next * other.weight)
            .cmp(&(other.next * self.weight))
            .then(self.index.cmp(&other.index))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Deterministic primality test (trial division; fine for `u32`).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline]
fn mix_k(k: u32) -> u32 {
    k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2)
}

#[inline]
fn mix_h(h: u32, k: u32) -> u32 {
    (h ^ mix_k(k))
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// MurmurHash3 x86_32 (Austin Appleby, public domain): blocks read as
/// little-endian `u32`, independent of the host's byte order.
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        h = mix_h(h, u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, &byte) in tail.iter().enumerate() {
            k |= u32::from(byte) << (8 * i);
        }
        h ^= mix_k(k);
    }
    // Truncation is MurmurHash3's definition (length mod 2^32).
    fmix(h ^ data.len() as u32)
}

/// Hash of an IPv4 flow, to pick a slot: `table.lookup(flow_hash(..))`.
///
/// MurmurHash3 x86_32, seed [`FLOW_SEED`] (`0x666c6f77`), over the 13 bytes
/// `saddr | daddr | sport | dport | proto`, addresses and ports in network
/// byte order (as on the wire). Unrolled, for the eBPF side, with
/// `w0 = iph->saddr`, `w1 = iph->daddr`, `w2 = *(u32 *)&l4->source` (source
/// and destination port together) loaded as `u32` on a little-endian target
/// (on a big-endian host, byte-swap them), all arithmetic wrapping `u32`:
///
/// ```text
/// c1 = 0xcc9e2d51; c2 = 0x1b873593
/// mixk(k) = rotl(k * c1, 15) * c2
/// h = 0x666c6f77
/// for k in [w0, w1, w2]: h = rotl(h ^ mixk(k), 13) * 5 + 0xe6546b64
/// h ^= mixk(proto)           // tail: the one remaining byte
/// h ^= 13                    // length
/// h ^= h >> 16; h *= 0x85ebca6b; h ^= h >> 13; h *= 0xc2b2ae35; h ^= h >> 16
/// slot = h % M
/// ```
pub fn flow_hash(saddr: Ipv4Addr, daddr: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut buf = [0u8; 13];
    buf[0..4].copy_from_slice(&saddr.octets());
    buf[4..8].copy_from_slice(&daddr.octets());
    buf[8..10].copy_from_slice(&sport.to_be_bytes());
    buf[10..12].copy_from_slice(&dport.to_be_bytes());
    buf[12] = proto;
    murmur3_32(&buf, FLOW_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_reference_vectors() {
        // SMHasher / widely published MurmurHash3_x86_32 vectors.
        assert_eq!(murmur3_32(b"", 0), 0);
        assert_eq!(murmur3_32(b"", 1), 0x514e_28b7);
        assert_eq!(murmur3_32(b"", 0xffff_ffff), 0x81f1_6f39);
        assert_eq!(murmur3_32(&[0, 0, 0, 0], 0), 0x2362_f9de);
        assert_eq!(murmur3_32(b"aaaa", 0x9747_b28c), 0x5a97_808a);
        assert_eq!(murmur3_32(b"abc", 0), 0xb3dd_93fa);
        assert_eq!(murmur3_32(b"Hello, world!", 0x9747_b28c), 0x2488_4cba);
        assert_eq!(
            murmur3_32(b"The quick brown fox jumps over the lazy dog", 0x9747_b28c),
            0x2fa8_26cd
        );
    }

    /// The unrolled word form documented for eBPF equals [`flow_hash`].
    #[test]
    fn flow_hash_word_form_matches() {
        fn ebpf_form(w0: u32, w1: u32, w2: u32, proto: u8) -> u32 {
            let mut h = FLOW_SEED;
            for k in [w0, w1, w2] {
                h = (h ^ mix_k(k))
                    .rotate_left(13)
                    .wrapping_mul(5)
                    .wrapping_add(0xe654_6b64);
            }
            h ^= mix_k(u32::from(proto));
            h ^= 13;
            fmix(h)
        }
        let (s, d) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(192, 168, 7, 9));
        let (sp, dp) = (40000u16, 80u16);
        // What a little-endian load of the wire bytes yields.
        let w0 = u32::from_le_bytes(s.octets());
        let w1 = u32::from_le_bytes(d.octets());
        let mut ports = [0u8; 4];
        ports[..2].copy_from_slice(&sp.to_be_bytes());
        ports[2..].copy_from_slice(&dp.to_be_bytes());
        let w2 = u32::from_le_bytes(ports);
        assert_eq!(ebpf_form(w0, w1, w2, 6), flow_hash(s, d, sp, dp, 6));
        assert_ne!(flow_hash(s, d, sp, dp, 6), flow_hash(s, d, sp, dp, 17));
        assert_ne!(flow_hash(s, d, sp, dp, 6), flow_hash(d, s, dp, sp, 6));
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        for p in [
            251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
        ] {
            assert!(is_prime(p), "{p}");
        }
        assert!(is_prime(4_294_967_291)); // largest u32 prime
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(16383)); // 3 * 43 * 127
        assert!(!is_prime(25));
        assert!(!is_prime(65537 * 3));
    }

    #[test]
    fn sizes_validated() {
        let b = [MaglevBackend::new("a", 1)];
        assert_eq!(build(&b, 0), Err(MaglevError::NotPrime(0)));
        assert_eq!(build(&b, 1), Err(MaglevError::NotPrime(1)));
        assert_eq!(build(&b, 16384), Err(MaglevError::NotPrime(16384)));
        assert_eq!(
            build(&b, 4_294_967_291),
            Err(MaglevError::TooLarge {
                size: 4_294_967_291,
                max: MAX_TABLE_SIZE
            })
        );
        assert!(build(&b, 2).is_ok());
    }

    #[test]
    fn empty_and_all_zero_weight() {
        let t = build(&[], DEFAULT_TABLE_SIZE).unwrap();
        assert!(t.slots.is_empty() && t.backends.is_empty());
        assert_eq!(t.lookup(12345), None);
        let t = build(&[MaglevBackend::new("a", 0)], 7).unwrap();
        assert!(t.slots.is_empty());
        assert_eq!(t.backends, ["a"]);
        assert_eq!(t.lookup(0), None);
        assert_eq!(t.slot_counts(), [0]);
    }

    #[test]
    fn duplicate_rejected() {
        let b = [MaglevBackend::new("a", 1), MaglevBackend::new("a", 2)];
        assert_eq!(build(&b, 7), Err(MaglevError::DuplicateBackend("a".into())));
    }

    #[test]
    fn single_backend_owns_everything() {
        let t = build(&[MaglevBackend::new("10.0.0.1:80", 3)], 13).unwrap();
        assert_eq!(t.slots, [0; 13]);
        assert_eq!(t.lookup(u32::MAX), Some("10.0.0.1:80"));
    }

    #[test]
    fn weight_turns_are_exactly_proportional() {
        let b = [
            MaglevBackend::new("a", 1),
            MaglevBackend::new("b", 2),
            MaglevBackend::new("c", 3),
            MaglevBackend::new("d", 0),
        ];
        let t = build(&b, 61).unwrap();
        // 61 * (1, 2, 3) / 6 = 10.2, 20.3, 30.5
        assert_eq!(t.slot_counts(), [10, 20, 31, 0]);
    }

    /// With equal weights the table is exactly the paper's Pseudocode 1
    /// (full permutations, `next[]`, round robin over backends).
    #[test]
    fn equal_weights_match_paper_pseudocode() {
        fn paper(keys: &[String], m: u32) -> Vec<u32> {
            let m = m as usize;
            let perm: Vec<Vec<usize>> = keys
                .iter()
                .map(|k| {
                    let offset = murmur3_32(k.as_bytes(), OFFSET_SEED) as usize % m;
                    let skip = murmur3_32(k.as_bytes(), SKIP_SEED) as usize % (m - 1) + 1;
                    (0..m).map(|j| (offset + j * skip) % m).collect()
                })
                .collect();
            let mut next = vec![0; keys.len()];
            let mut entry = vec![u32::MAX; m];
            let mut n = 0;
            loop {
                for i in 0..keys.len() {
                    let mut c = perm[i][next[i]];
                    while entry[c] != u32::MAX {
                        next[i] += 1;
                        c = perm[i][next[i]];
                    }
                    entry[c] = i as u32;
                    next[i] += 1;
                    n += 1;
                    if n == m {
                        return entry;
                    }
                }
            }
        }
        for (n, m) in [(1, 2), (3, 13), (7, 7), (10, 251), (37, 4093)] {
            let b: Vec<_> = (0..n)
                .map(|i| MaglevBackend::new(format!("10.1.{}.{}:443", i / 100, i % 100), 1))
                .collect();
            let t = build(&b, m).unwrap();
            assert_eq!(t.slots, paper(&t.backends, m), "N={n} M={m}");
        }
    }

    #[test]
    fn balance_flag() {
        let b: Vec<_> = (0..2)
            .map(|i| MaglevBackend::new(format!("b{i}"), 1))
            .collect();
        assert!(!build(&b, 199).unwrap().is_well_balanced());
        assert!(build(&b, 211).unwrap().is_well_balanced());
    }
}
