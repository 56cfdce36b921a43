//! Deciding how to make the socket a broker request asks for, before the
//! [`crate::factory`] makes it: the family, type, protocol and every option
//! are checked against the endpoint, and the address to bind is picked,
//! without touching the system. A request that cannot be served becomes a
//! [`Refusal`] (errno, reason and the option at fault).

use std::net::{SocketAddrV4, SocketAddrV6};

use graft_core::proto::broker::{Op, OptValue, Purpose, Reason, Reply, Request};
use graft_core::sockopt::{self, Class, Kind};
use graft_core::EndpointAddr;

use crate::factory::{BindAddr, SocketParams};
use crate::sys;

/// A refused request: errno, reason and (for option refusals) the option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub errno: libc::c_int,
    pub reason: Reason,
    pub opt: Option<(libc::c_int, libc::c_int)>,
}

impl Refusal {
    pub fn new(errno: libc::c_int, reason: Reason) -> Self {
        Refusal {
            errno,
            reason,
            opt: None,
        }
    }
    pub fn opt(errno: libc::c_int, reason: Reason, o: &OptValue) -> Self {
        Refusal {
            errno,
            reason,
            opt: Some((o.level, o.name)),
        }
    }
    pub fn reply(&self, op: Op) -> Reply {
        let mut r = Reply::err(op, self.errno, self.reason);
        if let Some((l, n)) = self.opt {
            r.opt_level = l;
            r.opt_name = n;
        }
        r
    }
}

/// Whether a socket's port is left to `connect()`, as on the host: then
/// TIME_WAIT ports are reused (tcp_tw_reuse) and one port serves many
/// 4-tuples, where a port taken at bind time is unusable until its TIME_WAIT
/// ends, so a client churning connections ran out of ports under graft only.
/// TCP egress sockets of a `dynamic` endpoint, and only while the bind guard
/// is loaded (the holder could re-bind a socket without a port anywhere).
/// Without it (`--no-ebpf`) the port is taken at bind, as before.
pub fn port_at_connect(p: &SocketParams, purpose: Purpose, guarded: bool) -> bool {
    let dynamic = match &p.bind {
        BindAddr::V4(a) => a.port() == 0,
        BindAddr::V6(a) => a.port() == 0,
        BindAddr::Unix(_) | BindAddr::UnixConnect(_) => false,
    };
    guarded && purpose == Purpose::Egress && p.sotype == libc::SOCK_STREAM && dynamic
}

/// The address an endpoint is configured with, as a raw sockaddr (port 0 for
/// `dynamic`).
pub fn configured_sockaddr(addr: &EndpointAddr) -> Vec<u8> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, UnixAddr};
    match addr {
        EndpointAddr::Ipv4 { addr, port } => sys::sockaddr_bytes(&SockaddrIn::from(
            SocketAddrV4::new(*addr, port.unwrap_or(0)),
        )),
        EndpointAddr::Ipv6 { addr, port } => sys::sockaddr_bytes(&SockaddrIn6::from(
            SocketAddrV6::new(*addr, port.unwrap_or(0), 0, 0),
        )),
        EndpointAddr::Unix { path } => UnixAddr::new(path.as_path())
            .map(|a| sys::sockaddr_bytes(&a))
            .unwrap_or_default(),
    }
}

/// Decides, without touching the system, how to make the socket a request
/// asks for: checks family, type, protocol and every option against the
/// endpoint, and picks the address to bind.
pub fn plan(addr: &EndpointAddr, req: &Request) -> Result<SocketParams, Refusal> {
    const TYPE_MASK: libc::c_int = 0xf;
    if req.sotype & !TYPE_MASK != 0 {
        return Err(Refusal::new(libc::EINVAL, Reason::Malformed));
    }
    let mismatch = || Refusal::new(libc::EAFNOSUPPORT, Reason::FamilyMismatch);
    if let (EndpointAddr::Unix { path }, libc::AF_INET | libc::AF_INET6) = (addr, req.family) {
        return plan_inet_on_unix(path, req);
    }
    let mapped = matches!(addr, EndpointAddr::Ipv4 { .. }) && req.family == libc::AF_INET6;
    let bind = match (addr, req.family) {
        (EndpointAddr::Ipv4 { addr, port }, libc::AF_INET) => {
            BindAddr::V4(SocketAddrV4::new(*addr, port.unwrap_or(0)))
        }
        (EndpointAddr::Ipv4 { addr, port }, libc::AF_INET6) => BindAddr::V6(SocketAddrV6::new(
            addr.to_ipv6_mapped(),
            port.unwrap_or(0),
            0,
            0,
        )),
        (EndpointAddr::Ipv6 { addr, port }, libc::AF_INET6) => {
            BindAddr::V6(SocketAddrV6::new(*addr, port.unwrap_or(0), 0, 0))
        }
        (EndpointAddr::Unix { path }, libc::AF_UNIX) => BindAddr::Unix(path.clone()),
        _ => return Err(mismatch()),
    };
    let unix = req.family == libc::AF_UNIX;
    let proto_ok = match req.sotype {
        libc::SOCK_STREAM => req.protocol == 0 || (!unix && req.protocol == libc::IPPROTO_TCP),
        libc::SOCK_DGRAM => req.protocol == 0 || (!unix && req.protocol == libc::IPPROTO_UDP),
        libc::SOCK_SEQPACKET if unix => req.protocol == 0,
        _ => return Err(Refusal::new(libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch)),
    };
    if !proto_ok {
        return Err(Refusal::new(libc::EPROTONOSUPPORT, Reason::FamilyMismatch));
    }
    let mut opts = Vec::with_capacity(req.nopts);
    for o in req.options() {
        let Some(known) = sockopt::lookup(o.level, o.name) else {
            return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o));
        };
        if known.class == Class::Refuse {
            return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o));
        }
        let len = o.len as usize;
        let size_ok = match known.kind {
            Kind::Name16 => (1..=Kind::Name16.size()).contains(&len),
            k => len == k.size(),
        };
        if !size_ok {
            return Err(Refusal::opt(libc::EINVAL, Reason::Malformed, o));
        }
        if (o.level, o.name) == (libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT) {
            // Binding without a port leaves the socket re-bindable unless the
            // bind guard is loaded: graftd decides (port_at_connect), never
            // the request.
            continue;
        }
        if mapped
            && (o.level, o.name) == (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
            && o.as_int() != Some(0)
        {
            return Err(Refusal::opt(libc::EAFNOSUPPORT, Reason::FamilyMismatch, o));
        }
        opts.push(*o);
    }
    Ok(SocketParams {
        family: req.family,
        sotype: req.sotype,
        protocol: req.protocol,
        opts,
        bind,
        port_at_connect: false,
        want_addr: true,
    })
}

/// Socket-level options that mean the same on a unix stream socket; every
/// other option an INET program sets (TCP_NODELAY, keepalive timers, TOS
/// ...) has no meaning there and is dropped.
const UNIX_KEEPS: [libc::c_int; 8] = [
    libc::SO_REUSEADDR,
    libc::SO_KEEPALIVE,
    libc::SO_LINGER,
    libc::SO_RCVBUF,
    libc::SO_SNDBUF,
    libc::SO_RCVLOWAT,
    libc::SO_RCVTIMEO,
    libc::SO_SNDTIMEO,
];

/// An AF_INET/AF_INET6 stream socket grafted onto a `type unix` endpoint:
/// graftd makes a unix stream socket, bound at the path for ingress (a
/// listener) or connected to it for egress (the path lives in graftd's
/// mount namespace, not the container's). Datagram sockets are refused:
/// a unix datagram socket would not answer the INET addresses the program
/// sends to and receives from.
fn plan_inet_on_unix(path: &std::path::Path, req: &Request) -> Result<SocketParams, Refusal> {
    match (req.sotype, req.protocol) {
        (libc::SOCK_STREAM, 0 | libc::IPPROTO_TCP) => {}
        (libc::SOCK_DGRAM, _) => {
            return Err(Refusal::new(libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch))
        }
        _ => return Err(Refusal::new(libc::EPROTONOSUPPORT, Reason::FamilyMismatch)),
    }
    let mut opts = Vec::new();
    for o in req.options() {
        match sockopt::lookup(o.level, o.name) {
            Some(k) if k.class != Class::Refuse => {}
            _ => return Err(Refusal::opt(libc::EPERM, Reason::OptionRefused, o)),
        }
        if o.level == libc::SOL_SOCKET && UNIX_KEEPS.contains(&o.name) {
            opts.push(*o);
        }
    }
    let bind = match req.purpose {
        Purpose::Ingress => BindAddr::Unix(path.to_path_buf()),
        Purpose::Egress => BindAddr::UnixConnect(path.to_path_buf()),
    };
    Ok(SocketParams {
        family: libc::AF_UNIX,
        sotype: libc::SOCK_STREAM,
        protocol: 0,
        opts,
        bind,
        port_at_connect: false,
        want_addr: true,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use graft_core::proto::broker::Purpose;
    use graft_core::EndpointName;

    fn v4() -> EndpointAddr {
        EndpointAddr::Ipv4 {
            addr: "127.0.0.1".parse().unwrap(),
            port: Some(8080),
        }
    }

    /// A first-request `Socket` for endpoint `ep`, ingress.
    pub fn req(family: libc::c_int, sotype: libc::c_int, protocol: libc::c_int) -> Request {
        Request::new(
            Op::Socket,
            EndpointName::new("ep").unwrap(),
            family,
            sotype,
            protocol,
            Purpose::Ingress,
        )
    }

    pub fn int(v: i32) -> [u8; 4] {
        v.to_le_bytes()
    }

    #[test]
    fn escaping_options_are_refused() {
        for (l, n, v) in [
            (libc::SOL_SOCKET, libc::SO_BINDTODEVICE, b"lo\0".to_vec()),
            (libc::SOL_SOCKET, libc::SO_MARK, int(1).to_vec()),
            (libc::IPPROTO_IP, libc::IP_TRANSPARENT, int(1).to_vec()),
            (libc::IPPROTO_IP, libc::IP_FREEBIND, int(1).to_vec()),
            (libc::SOL_SOCKET, 9999, int(1).to_vec()),
        ] {
            let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(r.push_opt(l, n, &v));
            let e = plan(&v4(), &r).unwrap_err();
            assert_eq!(
                (e.errno, e.reason, e.opt),
                (libc::EPERM, Reason::OptionRefused, Some((l, n)))
            );
        }
    }

    #[test]
    fn option_sizes_are_exact() {
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &[1, 0]));
        assert_eq!(plan(&v4(), &r).unwrap_err().reason, Reason::Malformed);
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_TCP, libc::TCP_CONGESTION, b"cubic"));
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        let p = plan(&v4(), &r).unwrap();
        assert_eq!(p.opts.len(), 2);
    }

    #[test]
    fn bind_address_no_port_is_never_applied() {
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, &int(1)));
        assert!(plan(&v4(), &r).unwrap().opts.is_empty());
    }

    #[test]
    fn port_left_to_connect_only_for_guarded_tcp_egress_of_dynamic_endpoints() {
        let tcp = plan(&v4(), &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap();
        let udp = plan(&v4(), &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap();
        let dynamic = EndpointAddr::Ipv4 {
            addr: std::net::Ipv4Addr::LOCALHOST,
            port: None,
        };
        let dyn_tcp = plan(&dynamic, &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap();
        assert!(port_at_connect(&dyn_tcp, Purpose::Egress, true));
        assert!(
            !port_at_connect(&dyn_tcp, Purpose::Egress, false),
            "no guard"
        );
        assert!(!port_at_connect(&dyn_tcp, Purpose::Ingress, true));
        assert!(!port_at_connect(&tcp, Purpose::Egress, true), "fixed port");
        let dyn_udp = plan(&dynamic, &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap();
        assert!(!port_at_connect(&dyn_udp, Purpose::Egress, true));
        assert!(!port_at_connect(&udp, Purpose::Egress, true));
    }

    #[test]
    fn families_map_to_the_endpoint() {
        let p = plan(&v4(), &req(libc::AF_INET6, libc::SOCK_STREAM, 0)).unwrap();
        assert_eq!(
            p.bind,
            BindAddr::V6("[::ffff:127.0.0.1]:8080".parse().unwrap())
        );
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &int(1)));
        assert_eq!(plan(&v4(), &r).unwrap_err().reason, Reason::FamilyMismatch);
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, 0);
        assert!(r.push_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &int(0)));
        assert!(plan(&v4(), &r).is_ok());
        let v6 = EndpointAddr::Ipv6 {
            addr: "::1".parse().unwrap(),
            port: None,
        };
        let e = plan(&v6, &req(libc::AF_INET, libc::SOCK_STREAM, 0)).unwrap_err();
        assert_eq!(
            (e.errno, e.reason),
            (libc::EAFNOSUPPORT, Reason::FamilyMismatch)
        );
        let unix = EndpointAddr::Unix {
            path: "/run/x".into(),
        };
        // An INET stream socket on a unix endpoint: a unix listener at the
        // path, TCP options dropped, escape options still refused.
        let mut r = req(libc::AF_INET6, libc::SOCK_STREAM, libc::IPPROTO_TCP);
        assert!(r.push_opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, &int(1)));
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        let p = plan(&unix, &r).unwrap();
        assert_eq!(
            (p.family, p.sotype, p.protocol, &p.bind),
            (
                libc::AF_UNIX,
                libc::SOCK_STREAM,
                0,
                &BindAddr::Unix("/run/x".into())
            )
        );
        assert_eq!(p.opts.len(), 1);
        assert_eq!(p.opts[0].name, libc::SO_REUSEADDR);
        let mut r = req(libc::AF_INET, libc::SOCK_STREAM, 0);
        r.purpose = Purpose::Egress;
        assert_eq!(
            plan(&unix, &r).unwrap().bind,
            BindAddr::UnixConnect("/run/x".into())
        );
        assert!(r.push_opt(libc::IPPROTO_IP, libc::IP_UNICAST_IF, &int(1)));
        assert_eq!(plan(&unix, &r).unwrap_err().reason, Reason::OptionRefused);
        let e = plan(&unix, &req(libc::AF_INET, libc::SOCK_DGRAM, 0)).unwrap_err();
        assert_eq!(
            (e.errno, e.reason),
            (libc::ESOCKTNOSUPPORT, Reason::FamilyMismatch)
        );
        assert!(plan(&unix, &req(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0)).is_ok());
        for (family, sotype) in [
            (libc::AF_UNIX, libc::SOCK_STREAM),
            (libc::AF_PACKET, libc::SOCK_RAW),
        ] {
            assert_eq!(refused(&v4(), family, sotype, 0), libc::EAFNOSUPPORT);
        }
    }

    /// The errno `plan` refuses such a socket with; 0 when it plans one.
    fn refused(addr: &EndpointAddr, family: i32, sotype: i32, protocol: i32) -> i32 {
        plan(addr, &req(family, sotype, protocol))
            .err()
            .map_or(0, |e| e.errno)
    }

    #[test]
    fn types_and_protocols_are_checked() {
        for (sotype, protocol, errno) in [
            (libc::SOCK_DGRAM, libc::IPPROTO_UDP, 0),
            (libc::SOCK_STREAM, libc::IPPROTO_TCP, 0),
            (libc::SOCK_STREAM, libc::IPPROTO_UDP, libc::EPROTONOSUPPORT),
            (libc::SOCK_RAW, 0, libc::ESOCKTNOSUPPORT),
            (libc::SOCK_SEQPACKET, 0, libc::ESOCKTNOSUPPORT),
        ] {
            assert_eq!(
                refused(&v4(), libc::AF_INET, sotype, protocol),
                errno,
                "type {sotype} protocol {protocol}"
            );
        }
        let e = plan(
            &v4(),
            &req(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0),
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::Malformed);
    }

    #[test]
    fn lookup_address_is_the_configured_one() {
        let b = configured_sockaddr(&v4());
        assert_eq!(&b[2..8], &[0x1f, 0x90, 127, 0, 0, 1]);
    }
}
