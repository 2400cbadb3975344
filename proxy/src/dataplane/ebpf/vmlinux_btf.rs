//! Just enough of a BTF reader for [`super::sock_destroy`]: the id of a
//! named FUNC and the byte offset of a named struct member (found through
//! anonymous struct/union members, as the C compiler resolves
//! `sk->skc_daddr`) in the kernel's own BTF (`/sys/kernel/btf/vmlinux`).
//! aya finds neither for us (its BTF type table is crate-private).

use std::path::Path;

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data (bad magic, header or type section)")]
    Malformed,
    #[error("no {kind} named {name} in the kernel's BTF")]
    NotFound { kind: &'static str, name: String },
}

/// One type's header: kind, name, `size_or_type`, and where its members
/// (struct/union) start in the blob.
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u32,
    name_off: u32,
    size_or_type: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset of what follows the header in [`Btf::data`].
    extra: usize,
}

/// A BTF blob, indexed: the raw bytes and where each type starts (a few
/// MB for the kernel's 100,000-odd types, dropped once the iterators are
/// loaded).
pub struct Btf {
    data: Vec<u8>,
    /// Offset of each type's header in `data`, by type id (0: `void`).
    types: Vec<u32>,
    str_off: usize,
    str_len: usize,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Bytes after the common header of a type of `kind` with `vlen` entries.
fn extra_len(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        _ => 0,
    }
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(data).ok_or(BtfError::Malformed)
    }

    /// Little-endian BTF only (the machines this agent runs on).
    pub fn parse(data: Vec<u8>) -> Option<Btf> {
        let b = &data;
        if u16_at(b, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let type_off = hdr_len + u32_at(b, 8)? as usize;
        let type_len = u32_at(b, 12)? as usize;
        let str_off = hdr_len + u32_at(b, 16)? as usize;
        let str_len = u32_at(b, 20)? as usize;
        b.get(str_off..str_off + str_len)?;
        let end = type_off + type_len;
        b.get(type_off..end)?;
        let mut types = vec![0u32];
        let mut at = type_off;
        while at < end {
            let info = u32_at(b, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            types.push(u32::try_from(at).ok()?);
            at += 12 + extra_len(kind, vlen);
        }
        if at != end {
            return None;
        }
        Some(Btf {
            data,
            types,
            str_off,
            str_len,
        })
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.types.get(id as usize)? as usize;
        if id == 0 {
            return None;
        }
        let info = u32_at(&self.data, at + 4)?;
        Some(Type {
            kind: (info >> 24) & 0x1f,
            name_off: u32_at(&self.data, at)?,
            size_or_type: u32_at(&self.data, at + 8)?,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 != 0,
            extra: at + 12,
        })
    }

    /// Struct/union members: (name offset, type id, bit offset).
    fn members(&self, t: &Type) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let (base, kind_flag) = (t.extra, t.kind_flag);
        let n = if matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            t.vlen
        } else {
            0
        };
        (0..n).filter_map(move |i| {
            let m = base + i * 12;
            let off = u32_at(&self.data, m + 8)?;
            // kind_flag: bitfield size in the top 8 bits.
            let bits = if kind_flag { off & 0xff_ffff } else { off };
            Some((u32_at(&self.data, m)?, u32_at(&self.data, m + 4)?, bits))
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let strings = &self.data[self.str_off..self.str_off + self.str_len];
        let rest = strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|c| *c == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        (1..self.types.len() as u32).find(|id| {
            self.ty(*id)
                .is_some_and(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())
        })
    }

    /// The id of FUNC `name` (a kfunc to call, an iterator to attach to).
    pub fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        self.find(KIND_FUNC, name)
            .ok_or_else(|| BtfError::NotFound {
                kind: "FUNC",
                name: name.to_owned(),
            })
    }

    /// `id` with typedefs and qualifiers stripped.
    fn resolve(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` in struct/union `t`, looking through
    /// anonymous members.
    fn member_bits(&self, t: &Type, member: &str) -> Option<u32> {
        for (name_off, type_id, bits) in self.members(t) {
            let name = self.name(name_off);
            if name == member.as_bytes() {
                return Some(bits);
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(type_id)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(b) = self.member_bits(&inner, member)
            {
                return Some(bits + b);
            }
        }
        None
    }

    /// Byte offset of `member` in STRUCT `name` (named members of
    /// anonymous structs and unions count as the struct's own).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::NotFound {
            kind: "STRUCT member",
            name: format!("{name}.{member}"),
        };
        let t = self
            .find(KIND_STRUCT, name)
            .and_then(|id| self.ty(id))
            .ok_or_else(not_found)?;
        let bits = self.member_bits(&t, member).ok_or_else(not_found)?;
        // A bitfield is no load target.
        if bits % 8 != 0 {
            return Err(not_found());
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the running kernel's BTF: offsets the C layout of these
    /// structs has had since they exist.
    #[test]
    fn finds_funcs_and_members_in_vmlinux() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: no {VMLINUX}");
            return;
        }
        let btf = Btf::vmlinux().expect("parse vmlinux BTF");
        assert!(btf.func_id("bpf_iter_udp").expect("bpf_iter_udp") > 0);
        assert!(btf.func_id("bpf_iter_tcp").expect("bpf_iter_tcp") > 0);
        // Inside anonymous unions and structs.
        assert_eq!(btf.member_offset("sock_common", "skc_daddr").ok(), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_dport").ok(), Some(12));
        assert_eq!(
            btf.member_offset("sock_common", "skc_family").ok(),
            Some(16)
        );
        // The iterator context's pointer (in an unnamed union) follows
        // `meta`.
        assert_eq!(btf.member_offset("bpf_iter__udp", "udp_sk").ok(), Some(8));
        assert!(matches!(
            btf.member_offset("sock_common", "no_such_member"),
            Err(BtfError::NotFound { .. })
        ));
        assert!(btf.func_id("no_such_function_anywhere").is_err());
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(Vec::new()).is_none());
        assert!(Btf::parse(vec![0u8; 64]).is_none());
        // A valid header whose type section overruns the blob.
        let mut b = vec![0u8; 24];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&24u32.to_le_bytes());
        b[12..16].copy_from_slice(&100u32.to_le_bytes());
        assert!(Btf::parse(b).is_none());
    }
}
