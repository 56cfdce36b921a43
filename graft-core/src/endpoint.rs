//! Graft endpoints: a name in one network namespace standing for an address in
//! another (the target namespace, by default graftd's own: the host).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::EndpointName;

/// Longest unix socket path (`sun_path` less its terminating NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// Most `allow`/`deny` clauses one endpoint may have: graft-ebpf's programs
/// walk them with a bounded loop the verifier must accept.
pub const MAX_POLICY_CLAUSES: usize = 32;
/// Largest `limit` (live sockets of one endpoint) accepted.
pub const MAX_LIMIT: u32 = 1 << 20;

/// The address a grafted socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum EndpointAddr {
    /// `type ipv4 addr A port P|dynamic`; `port: None` is `dynamic`.
    Ipv4 { addr: Ipv4Addr, port: Option<u16> },
    /// `type ipv6 addr A port P|dynamic`.
    Ipv6 { addr: Ipv6Addr, port: Option<u16> },
    /// `type unix path PATH` (a filesystem path in graftd's mount namespace).
    Unix { path: PathBuf },
}

/// Why an endpoint definition is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("unix path is empty")]
    EmptyPath,
    #[error("unix path is longer than {MAX_UNIX_PATH} bytes")]
    PathTooLong,
    #[error("unix path must be absolute")]
    RelativePath,
    #[error("unix path contains a NUL byte")]
    NulInPath,
    #[error("{0} allow/deny clauses (at most {MAX_POLICY_CLAUSES})")]
    TooManyClauses(usize),
    #[error("limit must be 1 to {MAX_LIMIT}")]
    BadLimit,
    #[error("limit applies to ipv4 and ipv6 endpoints only")]
    LimitOnUnix,
}

impl EndpointAddr {
    /// The IP address and port, for inet endpoints.
    pub fn ip(&self) -> Option<(IpAddr, Option<u16>)> {
        match *self {
            EndpointAddr::Ipv4 { addr, port } => Some((IpAddr::V4(addr), port)),
            EndpointAddr::Ipv6 { addr, port } => Some((IpAddr::V6(addr), port)),
            EndpointAddr::Unix { .. } => None,
        }
    }

    /// The socket family a socket for this endpoint has natively.
    pub fn family(&self) -> libc::c_int {
        match self {
            EndpointAddr::Ipv4 { .. } => libc::AF_INET,
            EndpointAddr::Ipv6 { .. } => libc::AF_INET6,
            EndpointAddr::Unix { .. } => libc::AF_UNIX,
        }
    }

    /// The `ip graft` type keyword.
    pub fn type_name(&self) -> &'static str {
        match self {
            EndpointAddr::Ipv4 { .. } => "ipv4",
            EndpointAddr::Ipv6 { .. } => "ipv6",
            EndpointAddr::Unix { .. } => "unix",
        }
    }

    /// Checks what the type system cannot (unix path shape).
    pub fn validate(&self) -> Result<(), EndpointError> {
        if let EndpointAddr::Unix { path } = self {
            use std::os::unix::ffi::OsStrExt;
            let b = path.as_os_str().as_bytes();
            if b.is_empty() {
                return Err(EndpointError::EmptyPath);
            }
            if b.len() > MAX_UNIX_PATH {
                return Err(EndpointError::PathTooLong);
            }
            if b[0] != b'/' {
                return Err(EndpointError::RelativePath);
            }
            if b.contains(&0) {
                return Err(EndpointError::NulInPath);
            }
        }
        Ok(())
    }
}

/// Formats the address part of an `ip graft show` line:
/// `type ipv4 addr 127.0.0.1 port 8080` or `type unix path /run/x.sock`.
impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn port(p: &Option<u16>) -> String {
            p.map_or_else(|| "dynamic".to_owned(), |p| p.to_string())
        }
        match self {
            EndpointAddr::Ipv4 { addr, port: p } => {
                write!(f, "type ipv4 addr {addr} port {}", port(p))
            }
            EndpointAddr::Ipv6 { addr, port: p } => {
                write!(f, "type ipv6 addr {addr} port {}", port(p))
            }
            EndpointAddr::Unix { path } => write!(f, "type unix path {}", path.display()),
        }
    }
}

/// An endpoint as `ip graft add` defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: EndpointName,
    pub addr: EndpointAddr,
    /// The target namespace as the user wrote it (`1`, `c1`, `/proc/1/ns/net`),
    /// kept for display only; `None` means graftd's own namespace.
    pub netns: Option<String>,
    /// Egress policy (`allow`/`deny` clauses), enforced in the kernel by
    /// graft-ebpf when it is loaded. Empty: allow everything (as AF_GRAFT).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<crate::rules::PolicyRule>,
    /// Most live sockets handed out from this endpoint at once (`limit N`);
    /// `None`: graftd's default. Counted in the kernel by graft-ebpf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl EndpointSpec {
    /// Checks everything the type system cannot: the address's shape and the
    /// number of policy clauses.
    pub fn validate(&self) -> Result<(), EndpointError> {
        self.addr.validate()?;
        if self.policy.len() > MAX_POLICY_CLAUSES {
            return Err(EndpointError::TooManyClauses(self.policy.len()));
        }
        match self.limit {
            Some(0) => return Err(EndpointError::BadLimit),
            Some(l) if l > MAX_LIMIT => return Err(EndpointError::BadLimit),
            Some(_) if matches!(self.addr, EndpointAddr::Unix { .. }) => {
                return Err(EndpointError::LimitOnUnix)
            }
            _ => {}
        }
        Ok(())
    }
}

impl fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.addr)?;
        if let Some(ns) = &self.netns {
            write!(f, " netns {ns}")?;
        }
        for p in &self.policy {
            write!(f, " {p}")?;
        }
        if let Some(l) = self.limit {
            write!(f, " limit {l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_format_matches_af_graft() {
        let ep = EndpointSpec {
            name: EndpointName::new("ep-in4").unwrap(),
            addr: EndpointAddr::Ipv4 {
                addr: Ipv4Addr::LOCALHOST,
                port: Some(8080),
            },
            netns: Some("1".into()),
            policy: vec![],
            limit: None,
        };
        assert_eq!(
            ep.to_string(),
            "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1"
        );
        let ep = EndpointSpec {
            name: EndpointName::new("ep-out6").unwrap(),
            addr: EndpointAddr::Ipv6 {
                addr: Ipv6Addr::UNSPECIFIED,
                port: None,
            },
            netns: None,
            policy: vec!["allow 2001:db8::/32:443".parse().unwrap()],
            limit: Some(100),
        };
        assert_eq!(
            ep.to_string(),
            "ep-out6 type ipv6 addr :: port dynamic allow 2001:db8::/32:443 limit 100"
        );
        assert_eq!(ep.validate(), Ok(()));
        let mut bad = ep.clone();
        bad.limit = Some(0);
        assert_eq!(bad.validate(), Err(EndpointError::BadLimit));
        bad.limit = Some(5);
        bad.addr = EndpointAddr::Unix {
            path: "/run/x".into(),
        };
        assert_eq!(bad.validate(), Err(EndpointError::LimitOnUnix));
    }

    #[test]
    fn unix_paths_are_checked() {
        let p = |s: &str| EndpointAddr::Unix { path: s.into() }.validate();
        assert!(p("/run/a.sock").is_ok());
        assert_eq!(p(""), Err(EndpointError::EmptyPath));
        assert_eq!(p("rel"), Err(EndpointError::RelativePath));
        assert_eq!(
            p(&format!("/{}", "a".repeat(107))),
            Err(EndpointError::PathTooLong)
        );
    }
}
