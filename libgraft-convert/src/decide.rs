//! The decisions: for each intercepted call, whether the socket is grafted
//! (and onto which endpoint), left to the container, or decided later. Safe
//! code: every system call goes through [`crate::sys`], every descriptor
//! state through [`crate::table`]; the graft itself is [`crate::install`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

pub use graft_core::call::Call;
use graft_core::proto::broker::Purpose;
use graft_core::rules::{BindMatch, EgressDecision};
use graft_core::sockopt::{self, SNAPSHOT};
use libc::c_int;

use crate::config::{self, Config};
use crate::early;
use crate::install::{self, Graft};
use crate::log::say;
use crate::{addr, sys, table};

/// What the interposed function does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call the real function.
    Real,
    /// Call the real function; if it succeeds, record this state (and the
    /// address the application used).
    RealThenSet(u32, Option<SocketAddr>),
    /// The call is complete (graftd already bound the socket): return 0.
    Done,
    /// Return -1 with this errno.
    Fail(c_int),
}

/// Family, type (without flags) and protocol of a socket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kind {
    pub(crate) family: c_int,
    pub(crate) sotype: c_int,
    pub(crate) protocol: c_int,
}

/// Family (8 bits), type (8 bits) and protocol (16 bits) in one word for
/// the descriptor table; 0 when they do not fit (never for AF_INET/AF_INET6
/// stream or datagram sockets, whose protocols are below 2^16).
pub(crate) fn pack_kind(k: Kind) -> u32 {
    let fits = (1..256).contains(&k.family)
        && (1..256).contains(&k.sotype)
        && (0..65536).contains(&k.protocol);
    if !fits {
        return 0;
    }
    (k.family as u32) << 24 | (k.sotype as u32) << 16 | k.protocol as u32
}

pub(crate) fn unpack_kind(w: u32) -> Option<Kind> {
    (w != 0).then_some(Kind {
        family: (w >> 24) as c_int,
        sotype: ((w >> 16) & 0xff) as c_int,
        protocol: (w & 0xffff) as c_int,
    })
}

/// What SO_DOMAIN/SO_TYPE/SO_PROTOCOL will say about a socket that
/// `socket(domain, ty, proto)` made, if it is one graft may take over.
pub(crate) fn candidate_kind(domain: c_int, ty: c_int, proto: c_int) -> Option<Kind> {
    let sotype = ty & 0xf;
    let inet = domain == libc::AF_INET || domain == libc::AF_INET6;
    if !(inet && (sotype == libc::SOCK_STREAM || sotype == libc::SOCK_DGRAM)) {
        return None;
    }
    // The kernel resolves protocol 0 to the type's first protocol, TCP or
    // UDP, and SO_PROTOCOL reports that.
    let protocol = match (proto, sotype) {
        (0, libc::SOCK_STREAM) => libc::IPPROTO_TCP,
        (0, _) => libc::IPPROTO_UDP,
        (p, _) => p,
    };
    Some(Kind {
        family: domain,
        sotype,
        protocol,
    })
}

/// Our `socket(domain, ty, proto)` returned `fd` (the library is active).
pub fn socket_made(fd: RawFd, domain: c_int, ty: c_int, proto: c_int) {
    match candidate_kind(domain, ty, proto) {
        Some(k) => {
            // Kept so that a graft needs no getsockopt to learn the kind.
            table::created(fd, table::CANDIDATE, pack_kind(k));
            if let Some(cfg) = config::get() {
                early::learn(cfg, fd, &k);
            }
        }
        None => table::created(fd, table::LOCAL, 0),
    }
}

/// The bit of `SNAPSHOT` an option sets, if any. Aliases that set the same
/// socket field under another name count as that option; without them an
/// option set under the alias would not be carried over.
pub(crate) fn opt_bit(level: c_int, name: c_int) -> Option<u32> {
    let name = sockopt::canonical(level, name);
    SNAPSHOT
        .iter()
        .position(|o| o.level == level && o.name == name)
        .map(|i| i as u32)
}

/// The application's `setsockopt(fd, level, name)` succeeded on a socket
/// not decided yet. No system call, no allocation: errno stays as it is.
pub fn option_set(fd: RawFd, level: c_int, name: c_int) {
    if (level, name) == (libc::IPPROTO_IPV6, libc::IPV6_ADDRFORM) {
        // The socket became AF_INET: the kind from socket() is stale.
        table::forget_history(fd);
    } else if let Some(bit) = opt_bit(level, name) {
        table::record_opt(fd, bit);
    }
}

fn kind(fd: RawFd) -> Option<Kind> {
    // Made by our socket(): it already told us, and a socket's family,
    // type and protocol never change (IPV6_ADDRFORM drops the record).
    if let Some(k) = unpack_kind(table::kind(fd)) {
        return Some(k);
    }
    Some(Kind {
        family: sys::sys_getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        sotype: sys::sys_getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
        protocol: sys::sys_getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?,
    })
}

/// An AF_INET/AF_INET6 stream or datagram socket whose family fits `sa`.
fn graftable(fd: RawFd, sa: &SocketAddr) -> Option<Kind> {
    let k = kind(fd)?;
    let fits = match sa {
        SocketAddr::V4(_) => k.family == libc::AF_INET,
        SocketAddr::V6(_) => k.family == libc::AF_INET6,
    };
    (fits && (k.sotype == libc::SOCK_STREAM || k.sotype == libc::SOCK_DGRAM)).then_some(k)
}

/// Whether the socket has a local port (bound) or a peer (connected).
/// Records `fd`, a descriptor the library did not see made (inherited
/// across exec, received over SCM_RIGHTS), as a connection when it is a
/// connected TCP socket: what an accepted one is.
pub fn connection_seen(fd: RawFd) {
    if table::state(fd) == table::UNKNOWN
        && kind(fd).is_some_and(|k| {
            k.sotype == libc::SOCK_STREAM && matches!(k.family, libc::AF_INET | libc::AF_INET6)
        })
        && sys::sys_sockname(fd, true).is_ok()
    {
        table::set(fd, table::LOCAL);
    }
}

/// Whether `fd` is a TCP socket the library knows as a connection (grafted
/// for egress, accepted, inherited or received connected): the sockets
/// graftd may splice.
pub fn known_tcp(fd: RawFd) -> bool {
    matches!(table::state(fd), table::EGRESS | table::LOCAL)
        && kind(fd).is_some_and(|k| k.sotype == libc::SOCK_STREAM)
}

fn bound_or_connected(fd: RawFd) -> bool {
    let bound = matches!(sys::sys_sockname(fd, false), Ok((b, n)) if addr::parse(&b[..n]).is_some_and(|a| a.port() != 0));
    bound || sys::sys_sockname(fd, true).is_ok()
}

/// Prints the configuration error once per process.
fn report_bad(line: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        say!("{line}");
    }
}

/// The ingress decision for a bind (or a listen on port 0) of `fd` to
/// `sa` (see [`RuleSet::match_bind`](graft_core::rules::RuleSet::match_bind)).
fn ingress_match(cfg: &Config, fd: RawFd, k: &Kind, sa: &SocketAddr) -> Option<BindMatch> {
    cfg.rules
        .match_bind(sa.ip(), sa.port(), k.sotype == libc::SOCK_STREAM, || {
            k.family == libc::AF_INET6
                && sys::sys_getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(0)
        })
}

/// Grafts an ingress socket onto `g.ep`; a dual-stack `[::]` bind that also
/// matches an IPv4 rule asks for one listener answering on both endpoints
/// first, and falls back to `g.ep` alone (with one line saying so) when
/// graftd cannot make one.
fn graft_ingress(g: Graft<'_>, m: BindMatch) -> Result<(), c_int> {
    if let BindMatch::Dual { ep4, ep6 } = m {
        let dual = Graft {
            ep: ep4,
            ep_v6: false,
            dual: Some(ep6),
            ..g
        };
        match install::graft_dual(&dual) {
            None => say!(
                "{} {}: no dual-stack listener on \"{ep4}\" and \"{ep6}\" (graftd's log says \
                 why; it needs graftd's eBPF companion): answering on \"{}\" only",
                g.call.name(),
                g.sa,
                g.ep
            ),
            Some(r) => return r,
        }
    }
    install::graft(&g)
}

/// The ingress graft of `fd` for `call` at `sa` when a rule matches;
/// `None` when none does.
fn ingress(
    cfg: &Config,
    fd: RawFd,
    call: Call,
    sa: &SocketAddr,
    kind: Kind,
) -> Option<Result<(), c_int>> {
    let m = ingress_match(cfg, fd, &kind, sa)?;
    let (ep, ep_v6) = match m {
        BindMatch::One { ep, v6 } => (ep, v6),
        BindMatch::Dual { ep6, .. } => (ep6, true),
    };
    let g = Graft {
        cfg,
        fd,
        call,
        sa,
        ep,
        ep_v6,
        purpose: Purpose::Ingress,
        kind,
        dual: None,
    };
    Some(graft_ingress(g, m))
}

fn verbose_left_alone(cfg: &Config, fd: RawFd, call: Call, sa: &SocketAddr, why: &str) {
    if cfg.verbose {
        say!(
            "pid {} fd {fd} {} {sa} -> not grafted ({why})",
            sys::sys_getpid(),
            call.name()
        );
    }
}

/// No graft for this socket, ever: it stays the container's.
fn left_alone(cfg: &Config, fd: RawFd, call: Call, sa: &SocketAddr, why: &str) -> Next {
    verbose_left_alone(cfg, fd, call, sa, why);
    table::set(fd, table::LOCAL);
    Next::Real
}

/// The start every bind and connect decision shares: the configuration
/// and the kind of a socket still to be decided (`port0`: one bound to
/// port 0 counts too), or what the call does without a decision.
fn undecided(fd: RawFd, sa: &SocketAddr, port0: bool) -> Result<(&'static Config, Kind), Next> {
    let Some(cfg) = config::get() else {
        return Err(Next::Real);
    };
    if let Some(line) = &cfg.bad {
        report_bad(line);
        return Err(Next::Fail(libc::EINVAL));
    }
    let st = table::state(fd);
    if st != table::CANDIDATE && st != table::UNKNOWN && !(port0 && st == table::PORT0) {
        return Err(Next::Real);
    }
    let Some(k) = graftable(fd, sa) else {
        return Err(Next::Real);
    };
    if st == table::UNKNOWN && bound_or_connected(fd) {
        // Inherited or received already bound/connected: the kernel will
        // refuse a second bind; the socket stays the container's.
        table::set(fd, table::LOCAL);
        return Err(Next::Real);
    }
    Ok((cfg, k))
}

/// An [`table::EARLY`] socket about to be bound or to listen: from now on
/// a container socket like any other (`None`), or the errno if it cannot be.
fn ungraft_early(fd: RawFd) -> Option<Next> {
    if table::state(fd) != table::EARLY {
        return None;
    }
    early::ungraft(fd).err().map(Next::Fail)
}

/// `bind(fd, sa)`.
pub fn on_bind(fd: RawFd, sa: SocketAddr) -> Next {
    if let Some(failed) = ungraft_early(fd) {
        return failed;
    }
    let (cfg, k) = match undecided(fd, &sa, false) {
        Ok(d) => d,
        Err(next) => return next,
    };
    if sa.port() != 0 {
        return match ingress(cfg, fd, Call::Bind, &sa, k) {
            Some(Ok(())) => Next::Done,
            Some(Err(e)) => Next::Fail(e),
            None => {
                verbose_left_alone(cfg, fd, Call::Bind, &sa, "no rule");
                Next::RealThenSet(table::LOCAL, None)
            }
        };
    }
    // A bind to port 0 is what clients do before connecting; it becomes a
    // server only at listen(). Decide then (or at connect/sendto).
    if ingress_match(cfg, fd, &k, &sa).is_some() || !cfg.rules.egress.is_empty() {
        Next::RealThenSet(table::PORT0, Some(sa))
    } else {
        verbose_left_alone(cfg, fd, Call::Bind, &sa, "no rule");
        Next::RealThenSet(table::LOCAL, None)
    }
}

/// The address a `listen()` in state `st` binds: the one a bind to port 0
/// recorded, or (listen() on an unbound socket) the wildcard, port 0.
/// `None`: not a listener graft may take.
fn listen_addr(fd: RawFd, st: u32) -> Option<SocketAddr> {
    match st {
        table::PORT0 => addr::parse(&table::addr(fd)),
        table::CANDIDATE | table::UNKNOWN => {
            let k = kind(fd)?;
            if k.sotype != libc::SOCK_STREAM || bound_or_connected(fd) {
                if k.family == libc::AF_INET || k.family == libc::AF_INET6 {
                    table::set(fd, table::LOCAL);
                }
                return None;
            }
            match k.family {
                libc::AF_INET => Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
                libc::AF_INET6 => Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `listen(fd)`.
pub fn on_listen(fd: RawFd) -> Next {
    let Some(cfg) = config::get() else {
        return Next::Real;
    };
    if cfg.bad.is_some() {
        return Next::Real;
    }
    if let Some(failed) = ungraft_early(fd) {
        return failed;
    }
    let Some(sa) = listen_addr(fd, table::state(fd)) else {
        return Next::Real;
    };
    let Some(k) = graftable(fd, &sa) else {
        return Next::Real;
    };
    match ingress(cfg, fd, Call::Listen, &sa, k) {
        Some(Ok(())) => Next::Real,
        Some(Err(e)) => Next::Fail(e),
        None => left_alone(cfg, fd, Call::Listen, &sa, "no rule"),
    }
}

/// The first `connect()`/`sendto()`/`sendmsg()`/`sendmmsg()` to `sa`.
pub fn on_connect(call: Call, fd: RawFd, sa: SocketAddr) -> Next {
    if table::state(fd) == table::EARLY {
        if let Some(cfg) = config::get() {
            match early::connect(cfg, call, fd, &sa) {
                Ok(true) => return Next::Real,
                Ok(false) => {}
                Err(e) => return Next::Fail(e),
            }
        }
    }
    let (cfg, kind) = match undecided(fd, &sa, true) {
        Ok(d) => d,
        Err(next) => return next,
    };
    let ep = match cfg.rules.match_egress(sa.ip()) {
        EgressDecision::Graft(ep) => ep,
        EgressDecision::Excluded => return left_alone(cfg, fd, call, &sa, "excluded"),
        EgressDecision::NoRule => return left_alone(cfg, fd, call, &sa, "no rule"),
    };
    let g = Graft {
        cfg,
        fd,
        call,
        sa: &sa,
        ep,
        ep_v6: sa.ip().to_canonical().is_ipv6(),
        purpose: Purpose::Egress,
        kind,
        dual: None,
    };
    match install::graft(&g) {
        // graftd already connected the unix socket to the endpoint.
        Ok(()) if call == Call::Connect && table::state(fd) == table::UNIX_OUT => Next::Done,
        Ok(()) => Next::Real,
        Err(e) => Next::Fail(e),
    }
}

/// The loopback address of `like`'s family, port 0: the peer a
/// unix-backed connection reports (its real peer is a local process).
fn loopback_of(like: &SocketAddr) -> SocketAddr {
    match like {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
    }
}

/// The INET address a unix-backed socket (`st`, see [`table::is_unix`])
/// answers for its local end (`peer` false) or its peer: the application
/// bound or asked for a TCP address and gets one back. `None`: leave the
/// kernel's answer.
pub fn unix_name(fd: RawFd, st: u32, peer: bool) -> Option<([u8; addr::MAX], usize)> {
    let mine = addr::parse(&table::addr(fd))?;
    let sa = match (st, peer) {
        (table::UNIX_LISTEN | table::UNIX_PEER, false) => mine,
        (table::UNIX_PEER, true) => loopback_of(&mine),
        (table::UNIX_OUT, false) => loopback_of(&mine),
        (table::UNIX_OUT, true) => mine,
        _ => return None,
    };
    Some(addr::encode(&sa))
}

/// `getsockname()` under `GRAFT_GETSOCKNAME=app`: the address the application
/// bound (with the real port when it asked for port 0) instead of the host
/// address. `real` is what the kernel returned. `None`: leave it.
pub fn app_sockname(fd: RawFd, real: &[u8]) -> Option<([u8; addr::MAX], usize)> {
    if !config::getsockname_app() || table::state(fd) != table::INGRESS {
        return None;
    }
    let mut app = addr::parse(&table::addr(fd))?;
    if app.port() == 0 {
        app.set_port(addr::parse(real)?.port());
    }
    Some(addr::encode(&app))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};

    fn sock(family: c_int, ty: c_int, proto: c_int) -> OwnedFd {
        sys::sys_socket(family, ty | libc::SOCK_CLOEXEC, proto).expect("socket")
    }

    #[test]
    fn kind_from_socket_call_is_what_the_kernel_reports() {
        for family in [libc::AF_INET, libc::AF_INET6] {
            for (ty, proto) in [
                (libc::SOCK_STREAM, 0),
                (libc::SOCK_STREAM | libc::SOCK_NONBLOCK, libc::IPPROTO_TCP),
                (libc::SOCK_DGRAM, 0),
                (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
            ] {
                let fd = sock(family, ty, proto);
                let mine =
                    unpack_kind(pack_kind(candidate_kind(family, ty, proto).unwrap())).unwrap();
                let theirs = (
                    sys::sys_getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN),
                    sys::sys_getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE),
                    sys::sys_getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PROTOCOL),
                );
                assert_eq!(
                    (Some(mine.family), Some(mine.sotype), Some(mine.protocol)),
                    theirs,
                    "socket({family}, {ty:#x}, {proto})"
                );
            }
        }
        assert!(candidate_kind(libc::AF_UNIX, libc::SOCK_STREAM, 0).is_none());
        assert!(candidate_kind(libc::AF_INET, libc::SOCK_RAW, 1).is_none());
        assert_eq!(
            pack_kind(Kind {
                family: 2,
                sotype: 1,
                protocol: 70000
            }),
            0
        );
        assert!(unpack_kind(0).is_none());
    }

    #[test]
    fn option_bits_and_aliases() {
        for (i, o) in SNAPSHOT.iter().enumerate() {
            assert_eq!(opt_bit(o.level, o.name), Some(i as u32), "{}", o.label);
        }
        // SO_RCVBUFFORCE, SO_SNDBUFFORCE, SO_RCVTIMEO_NEW, SO_TIMESTAMP_NEW.
        for (alias, name) in [
            (33, libc::SO_RCVBUF),
            (32, libc::SO_SNDBUF),
            (66, libc::SO_RCVTIMEO),
            (63, libc::SO_TIMESTAMP),
        ] {
            assert_eq!(
                opt_bit(libc::SOL_SOCKET, alias),
                opt_bit(libc::SOL_SOCKET, name),
                "{alias}"
            );
        }
        assert_eq!(opt_bit(libc::SOL_SOCKET, libc::SO_ATTACH_FILTER), None);
        // Same number at another level is another option.
        assert_eq!(opt_bit(libc::IPPROTO_TCP, 33), None);
    }
}
