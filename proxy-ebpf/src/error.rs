//! Why a packet was not translated: each reason has a counter and decides
//! the verdict (pass untouched or drop).

use proxy_common::stat;

#[derive(Clone, Copy)]
pub enum Error {
    /// Truncated or inconsistent headers: passed untouched.
    Malformed,
    /// IPv4 header with options: passed untouched.
    IpOptions,
    /// A fragment: passed untouched.
    Fragment,
    /// IPv6 extension-header chain past the parser's bound, or with a
    /// header it does not walk: passed untouched.
    Ipv6ExtHdrs,
    /// Frontend without backends: dropped.
    NoBackend,
    /// Frontend whose slot or backend is missing: dropped.
    NoSlot,
    /// A store or checksum helper failed: dropped (half-rewritten).
    Rewrite,
    /// Mid-flow TCP to a frontend without a conntrack entry: dropped.
    CtInvalid,
    /// Client outside the frontend's source ranges: dropped.
    SourceRange,
    /// DSR packet too large for the egress MTU once the option is added:
    /// dropped.
    DsrMtu,
    /// No free SNAT port towards the backend: dropped.
    SnatExhausted,
}

impl Error {
    #[inline(always)]
    pub fn stat(self) -> u32 {
        match self {
            Error::Malformed => stat::PASS_MALFORMED,
            Error::IpOptions => stat::PASS_IP_OPTIONS,
            Error::Fragment => stat::PASS_FRAGMENT,
            Error::Ipv6ExtHdrs => stat::PASS_IPV6_EXT_HDRS,
            Error::NoBackend => stat::DROP_NO_BACKEND,
            Error::NoSlot => stat::DROP_NO_SLOT,
            Error::Rewrite => stat::DROP_REWRITE,
            Error::CtInvalid => stat::DROP_CT_INVALID,
            Error::SourceRange => stat::DROP_SOURCE_RANGE,
            Error::DsrMtu => stat::DROP_DSR_MTU,
            Error::SnatExhausted => stat::DROP_SNAT_EXHAUSTED,
        }
    }

    #[inline(always)]
    pub fn drops(self) -> bool {
        !matches!(
            self,
            Error::Malformed | Error::IpOptions | Error::Fragment | Error::Ipv6ExtHdrs
        )
    }
}
