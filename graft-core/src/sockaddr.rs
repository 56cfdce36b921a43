//! Raw `sockaddr` bytes ↔ `SocketAddr`, without allocation: the preload
//! library reads and writes the application's addresses with it, graftd's
//! supervisor reads the trapped call's, the launcher the broker's replies.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Bytes of a `sockaddr_in6`, the largest address we deal with.
pub const MAX: usize = 28;

/// The address family the bytes start with.
pub fn family(b: &[u8]) -> Option<i32> {
    (b.len() >= 2).then(|| i32::from(u16::from_ne_bytes([b[0], b[1]])))
}

/// Parses an AF_INET (16 bytes) or AF_INET6 (24 or 28 bytes) address;
/// anything else (AF_UNIX, AF_UNSPEC, short) is `None`.
pub fn parse(b: &[u8]) -> Option<SocketAddr> {
    match family(b)? {
        libc::AF_INET if b.len() >= 16 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        // The kernel accepts the 24-byte RFC 2133 form without scope id.
        libc::AF_INET6 if b.len() >= 24 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[8..24]);
            let scope = if b.len() >= 28 {
                u32::from_ne_bytes([b[24], b[25], b[26], b[27]])
            } else {
                0
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// The raw form of `sa` and its length.
pub fn encode(sa: &SocketAddr) -> ([u8; MAX], usize) {
    let mut b = [0u8; MAX];
    match sa {
        SocketAddr::V4(a) => {
            b[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
            (b, 16)
        }
        SocketAddr::V6(a) => {
            b[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            (b, 28)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        for s in [
            "0.0.0.0:5201",
            "127.0.0.1:80",
            "[::]:80",
            "[::ffff:1.2.3.4]:9",
        ] {
            let sa: SocketAddr = s.parse().unwrap();
            let (b, n) = encode(&sa);
            assert_eq!(parse(&b[..n]), Some(sa));
        }
        let (b, _) = encode(&"10.1.2.3:53".parse().unwrap());
        assert_eq!(parse(&b[..15]), None, "short IPv4");
        let (b, _) = encode(&"[::1]:80".parse().unwrap());
        assert_eq!(parse(&b[..24]), Some("[::1]:80".parse().unwrap()));
        assert_eq!(parse(&b[..20]), None, "short IPv6");
        assert_eq!(parse(&[1, 0, b'/', b't']), None, "AF_UNIX");
        assert_eq!(parse(&[0, 0]), None, "AF_UNSPEC");
        assert_eq!(parse(&[]), None);
    }
}

/// A handed-out host socket's address as the `-v` lines show it: an egress
/// socket whose port (or address and port) the kernel picks at `connect()`
/// says so instead of showing `0.0.0.0:0`.
pub struct HostShown(pub SocketAddr);

impl std::fmt::Display for HostShown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.0;
        match (a.ip().is_unspecified(), a.port()) {
            (true, 0) => write!(f, "address and port chosen at connect"),
            (false, 0) => write!(f, "{}, port chosen at connect", a.ip()),
            _ => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod shown_tests {
    use super::*;

    #[test]
    fn host_shown_says_what_connect_will_choose() {
        let s = |a: &str| HostShown(a.parse().unwrap()).to_string();
        assert_eq!(s("0.0.0.0:0"), "address and port chosen at connect");
        assert_eq!(s("[::]:0"), "address and port chosen at connect");
        assert_eq!(s("127.0.0.1:0"), "127.0.0.1, port chosen at connect");
        assert_eq!(s("[::1]:0"), "::1, port chosen at connect");
        assert_eq!(s("127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(s("[::ffff:127.0.0.1]:80"), "[::ffff:127.0.0.1]:80");
    }
}
