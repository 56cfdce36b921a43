//! Rust mirrors of the layouts in `src/bpf/graft.h`, and the translation of
//! an endpoint's `allow`/`deny` clauses into the kernel's rule table.

use std::net::IpAddr;

use graft_core::rules::{PolicyAction, PolicyRule};

/// `GRAFT_MAX_RULES`.
pub const MAX_RULES: usize = graft_core::endpoint::MAX_POLICY_CLAUSES;
const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
const ALLOW: u8 = 1;
const DENY: u8 = 2;

/// `struct graft_sk`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftSk {
    pub endpoint: u32,
    pub flags: u32,
    pub cookie: u64,
}

/// `GRAFT_SK_HANDED`.
pub const SK_HANDED: u32 = 32;

/// `GRAFT_SK_NO_JOIN`.
pub const SK_NO_JOIN: u32 = 64;

/// `struct graft_rule`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftRule {
    pub family: u8,
    pub action: u8,
    pub prefix_len: u8,
    pub pad: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    /// Network order words, as the kernel reads them from memory.
    pub addr: [u32; 4],
    pub mask: [u32; 4],
}

/// `struct graft_policy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraftPolicy {
    pub count: u32,
    pub has_allow: u32,
    pub rules: [GraftRule; MAX_RULES],
}

/// `struct graft_counters`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftCounters {
    pub policy_denied: u64,
    pub active_established: u64,
    pub passive_established: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub spliced_msgs: u64,
    pub spliced_bytes: u64,
    pub splice_refused: u64,
    pub released: u64,
}

/// `struct graft_ep_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftEpKey {
    pub netns_dev: u64,
    pub netns_ino: u64,
    pub name: [u8; 16],
}

/// `struct graft_ep_val`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftEpVal {
    pub id: u32,
    pub pad: u32,
    pub handed: u64,
}

impl GraftEpKey {
    pub fn new(k: &crate::EndpointKey) -> Self {
        let mut name = [0u8; 16];
        let b = k.name.as_str().as_bytes();
        let n = b.len().min(15);
        name[..n].copy_from_slice(&b[..n]);
        GraftEpKey {
            netns_dev: k.netns.dev,
            netns_ino: k.netns.ino,
            name,
        }
    }

    /// The endpoint this key names (`None` for a key no graftd wrote).
    pub fn endpoint_key(&self) -> Option<crate::EndpointKey> {
        let len = self.name.iter().position(|&c| c == 0).unwrap_or(16);
        let name = std::str::from_utf8(&self.name[..len]).ok()?;
        Some(crate::EndpointKey {
            netns: graft_core::NetnsId {
                dev: self.netns_dev,
                ino: self.netns_ino,
            },
            name: graft_core::EndpointName::new(name).ok()?,
        })
    }
}

/// `struct graft_mark`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftMark {
    pub endpoint: u32,
    pub flags: u32,
    pub left: u32,
    pub pad: u32,
}

/// `struct graft_app_sock`: what an inet socket of a watched program was
/// made as, and which carried options were set on it since.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftAppSock {
    /// Bit i: `graft_core::sockopt::SNAPSHOT[i]` was set.
    pub set: u64,
    /// Netns cookie of the namespace the socket was made in.
    pub netns: u64,
    /// 0: changed since it was made (`IPV6_ADDRFORM`).
    pub family: u32,
    pub sotype: u32,
    pub protocol: u32,
    pub pad: u32,
}

/// `struct graft_global`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraftGlobal {
    pub last_splice_error: u64,
    pub splice_errors: u64,
}

// SAFETY (all nine): plain #[repr(C)] integer structs without padding holes
// the kernel could leak through (each layout is a multiple of its alignment
// and its fields are laid out back to back), valid for any bit pattern.
unsafe impl aya::Pod for GraftSk {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftRule {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftPolicy {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftCounters {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftGlobal {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftEpKey {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftEpVal {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftMark {}
// SAFETY: see above.
unsafe impl aya::Pod for GraftAppSock {}

/// An address as the four network-order words the kernel compares, and its
/// family (IPv4 in word 0).
fn words(a: IpAddr) -> (u8, [u32; 4]) {
    match a {
        IpAddr::V4(v) => (FAMILY_V4, [u32::from_ne_bytes(v.octets()), 0, 0, 0]),
        IpAddr::V6(v) => {
            let o = v.octets();
            let mut w = [0u32; 4];
            for (i, c) in o.chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            (FAMILY_V6, w)
        }
    }
}

/// The mask of a prefix length, in the same representation as [`words`].
fn mask_words(v4: bool, len: u8) -> [u32; 4] {
    let bits = if v4 { 32 } else { 128 };
    let len = u32::from(len).min(bits);
    let m: u128 = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    let be = m.to_be_bytes();
    let mut w = [0u32; 4];
    for (i, c) in be.chunks_exact(4).enumerate() {
        w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    w
}

/// The kernel's rule table for an endpoint's policy; `None` when it has more
/// clauses than the program checks.
pub fn compile_policy(policy: &[PolicyRule]) -> Option<GraftPolicy> {
    if policy.len() > MAX_RULES {
        return None;
    }
    let mut out = GraftPolicy {
        count: policy.len() as u32,
        has_allow: 0,
        rules: [GraftRule::default(); MAX_RULES],
    };
    for (slot, r) in out.rules.iter_mut().zip(policy) {
        let (family, addr) = words(r.prefix.addr);
        let (port_lo, port_hi) = r.ports.unwrap_or((0, u16::MAX));
        *slot = GraftRule {
            family,
            action: match r.action {
                PolicyAction::Allow => ALLOW,
                PolicyAction::Deny => DENY,
            },
            prefix_len: r.prefix.len,
            pad: 0,
            port_lo,
            port_hi,
            addr,
            mask: mask_words(family == FAMILY_V4, r.prefix.len),
        };
        if r.action == PolicyAction::Allow {
            out.has_allow = 1;
        }
    }
    Some(out)
}

/// What the kernel program decides, evaluated in Rust over the same table
/// (used by the tests to check the table against graft-core's semantics).
pub fn table_allows(p: &GraftPolicy, dst: IpAddr, port: u16) -> bool {
    let (family, d) = words(dst.to_canonical());
    let mut best: Option<(u8, bool)> = None;
    for r in p.rules.iter().take(p.count as usize) {
        if r.family != family || port < r.port_lo || port > r.port_hi {
            continue;
        }
        if (0..4).any(|i| d[i] & r.mask[i] != r.addr[i]) {
            continue;
        }
        let deny = r.action == DENY;
        best = match best {
            None => Some((r.prefix_len, deny)),
            Some((l, _)) if r.prefix_len > l => Some((r.prefix_len, deny)),
            Some((l, d0)) if r.prefix_len == l => Some((l, d0 || deny)),
            keep => keep,
        };
    }
    match best {
        Some((_, deny)) => !deny,
        None => p.has_allow == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::rules::policy_allows;

    fn pol(s: &[&str]) -> Vec<PolicyRule> {
        s.iter().map(|r| r.parse().unwrap()).collect()
    }

    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(std::mem::size_of::<GraftSk>(), 16);
        assert_eq!(std::mem::size_of::<GraftEpKey>(), 32);
        assert_eq!(std::mem::size_of::<GraftEpVal>(), 16);
        assert_eq!(std::mem::size_of::<GraftRule>(), 40);
        assert_eq!(std::mem::size_of::<GraftPolicy>(), 8 + 40 * MAX_RULES);
        assert_eq!(std::mem::size_of::<GraftCounters>(), 72);
        assert_eq!(std::mem::size_of::<GraftAppSock>(), 32);
    }

    #[test]
    fn table_agrees_with_graft_core() {
        let policies = [
            pol(&[]),
            pol(&["deny 10.0.0.0/8"]),
            pol(&["allow 10.0.0.0/8", "deny 10.1.0.0/16:80-90"]),
            pol(&["allow 10.1.0.0/16", "deny 10.1.0.0/16"]),
            pol(&["allow 0.0.0.0/0:53", "deny 10.0.0.0/8:53"]),
            pol(&["allow ::/0", "deny fd00::/8", "allow fd00:1::/32:443"]),
            pol(&["deny 127.0.0.1/32", "allow 0.0.0.0/0"]),
            pol(&["allow 2001:db8::1/128:1-1000"]),
        ];
        let dsts: Vec<IpAddr> = [
            "10.0.0.1",
            "10.1.2.3",
            "10.2.0.0",
            "127.0.0.1",
            "8.8.8.8",
            "::ffff:10.1.2.3",
            "::ffff:127.0.0.1",
            "fd00::1",
            "fd00:1::5",
            "2001:db8::1",
            "2001:db8::2",
            "::1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let ports = [0u16, 1, 53, 79, 80, 85, 90, 91, 443, 1000, 1001, 65535];
        for p in &policies {
            let t = compile_policy(p).unwrap();
            for d in &dsts {
                for port in ports {
                    assert_eq!(
                        table_allows(&t, *d, port),
                        policy_allows(p, *d, port),
                        "policy {p:?} dst {d} port {port}"
                    );
                }
            }
        }
    }

    #[test]
    fn too_many_clauses_refused() {
        let many: Vec<PolicyRule> = (0..=MAX_RULES)
            .map(|i| format!("deny 10.0.{i}.0/24").parse().unwrap())
            .collect();
        assert!(compile_policy(&many).is_none());
        assert!(compile_policy(&many[..MAX_RULES]).is_some());
    }
}
