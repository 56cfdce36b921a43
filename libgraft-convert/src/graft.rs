//! Grafting decisions and the graft itself. Safe code: every system call goes
//! through [`crate::sys`], every descriptor state through [`crate::table`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use graft_core::proto::broker::{Op, Purpose, Reason, Request};
use graft_core::rules::EgressDecision;
use graft_core::sockopt::{Class, SNAPSHOT};
use graft_core::EndpointName;
use libc::c_int;

use crate::broker;
use crate::config::{self, Config};
use crate::log::say;
use crate::{addr, sys, table};

/// The intercepted call a decision is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Bind,
    Listen,
    Connect,
    Sendto,
    Sendmsg,
    Sendmmsg,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Bind => "bind",
            Call::Listen => "listen",
            Call::Connect => "connect",
            Call::Sendto => "sendto",
            Call::Sendmsg => "sendmsg",
            Call::Sendmmsg => "sendmmsg",
        }
    }

    /// errno when the endpoint cannot be had at all: a server cannot get its
    /// address, a client cannot reach its destination.
    fn unreachable_errno(self) -> c_int {
        match self {
            Call::Bind | Call::Listen => libc::EADDRNOTAVAIL,
            _ => libc::ENETUNREACH,
        }
    }
}

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
struct Kind {
    family: c_int,
    sotype: c_int,
    protocol: c_int,
}

fn kind(fd: RawFd) -> Option<Kind> {
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

/// The ingress endpoint for a bind to `sa`. A dual-stack `[::]` socket
/// (IPV6_V6ONLY off) also accepts IPv4, so when no IPv6 rule names `::` it
/// takes the `0.0.0.0` rule (iperf3 and others bind `[::]` by default).
fn ingress_match(
    cfg: &Config,
    fd: RawFd,
    k: &Kind,
    sa: &SocketAddr,
) -> Option<(EndpointName, bool)> {
    if let Some(ep) = cfg.rules.match_ingress(sa.ip(), sa.port()) {
        return Some((ep, sa.ip().to_canonical().is_ipv6()));
    }
    if k.family == libc::AF_INET6
        && sa.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        && sys::sys_getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(0)
    {
        return cfg
            .rules
            .match_ingress(IpAddr::V4(Ipv4Addr::UNSPECIFIED), sa.port())
            .map(|ep| (ep, false));
    }
    None
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

/// `bind(fd, sa)`.
pub fn on_bind(fd: RawFd, sa: SocketAddr) -> Next {
    let Some(cfg) = config::get() else {
        return Next::Real;
    };
    if let Some(line) = &cfg.bad {
        report_bad(line);
        return Next::Fail(libc::EINVAL);
    }
    let st = table::state(fd);
    if st != table::CANDIDATE && st != table::UNKNOWN {
        return Next::Real;
    }
    let Some(k) = graftable(fd, &sa) else {
        return Next::Real;
    };
    if st == table::UNKNOWN && bound_or_connected(fd) {
        // Inherited or received already bound: the kernel will refuse the
        // second bind; the socket stays the container's.
        table::set(fd, table::LOCAL);
        return Next::Real;
    }
    if sa.port() != 0 {
        return match ingress_match(cfg, fd, &k, &sa) {
            Some((ep, v6)) => match graft(cfg, fd, Call::Bind, &sa, ep, v6, Purpose::Ingress, k) {
                Ok(()) => Next::Done,
                Err(e) => Next::Fail(e),
            },
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

/// `listen(fd)`.
pub fn on_listen(fd: RawFd) -> Next {
    let Some(cfg) = config::get() else {
        return Next::Real;
    };
    if cfg.bad.is_some() {
        return Next::Real;
    }
    let st = table::state(fd);
    let sa = match st {
        table::PORT0 => {
            let raw = table::addr(fd);
            match addr::parse(&raw) {
                Some(sa) => sa,
                None => return Next::Real,
            }
        }
        table::CANDIDATE | table::UNKNOWN => {
            // listen() on an unbound socket binds the wildcard, port 0.
            let Some(k) = kind(fd) else {
                return Next::Real;
            };
            if k.sotype != libc::SOCK_STREAM || bound_or_connected(fd) {
                if k.family == libc::AF_INET || k.family == libc::AF_INET6 {
                    table::set(fd, table::LOCAL);
                }
                return Next::Real;
            }
            match k.family {
                libc::AF_INET => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                libc::AF_INET6 => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                _ => return Next::Real,
            }
        }
        _ => return Next::Real,
    };
    let Some(k) = graftable(fd, &sa) else {
        return Next::Real;
    };
    match ingress_match(cfg, fd, &k, &sa) {
        Some((ep, v6)) => match graft(cfg, fd, Call::Listen, &sa, ep, v6, Purpose::Ingress, k) {
            Ok(()) => Next::Real,
            Err(e) => Next::Fail(e),
        },
        None => {
            verbose_left_alone(cfg, fd, Call::Listen, &sa, "no rule");
            table::set(fd, table::LOCAL);
            Next::Real
        }
    }
}

/// The first `connect()`/`sendto()`/`sendmsg()`/`sendmmsg()` to `sa`.
pub fn on_connect(call: Call, fd: RawFd, sa: SocketAddr) -> Next {
    let Some(cfg) = config::get() else {
        return Next::Real;
    };
    if let Some(line) = &cfg.bad {
        report_bad(line);
        return Next::Fail(libc::EINVAL);
    }
    let st = table::state(fd);
    if st != table::CANDIDATE && st != table::PORT0 && st != table::UNKNOWN {
        return Next::Real;
    }
    let Some(k) = graftable(fd, &sa) else {
        return Next::Real;
    };
    if st == table::UNKNOWN && bound_or_connected(fd) {
        // Inherited or received already bound/connected: the container's.
        table::set(fd, table::LOCAL);
        return Next::Real;
    }
    match cfg.rules.match_egress(sa.ip()) {
        EgressDecision::Graft(ep) => {
            let v6 = sa.ip().to_canonical().is_ipv6();
            match graft(cfg, fd, call, &sa, ep, v6, Purpose::Egress, k) {
                Ok(()) => Next::Real,
                Err(e) => Next::Fail(e),
            }
        }
        EgressDecision::Excluded => {
            verbose_left_alone(cfg, fd, call, &sa, "excluded");
            table::set(fd, table::LOCAL);
            Next::Real
        }
        EgressDecision::NoRule => {
            verbose_left_alone(cfg, fd, call, &sa, "no rule");
            table::set(fd, table::LOCAL);
            Next::Real
        }
    }
}

/// Reads the options the application set (those that differ from a fresh
/// socket of the same kind) into the request.
fn snapshot(fd: RawFd, k: &Kind, req: &mut Request) -> Result<(), c_int> {
    let probe = sys::sys_socket(k.family, k.sotype | libc::SOCK_CLOEXEC, k.protocol)?;
    for o in SNAPSHOT.iter().filter(|o| o.applies(k.family, k.sotype)) {
        let size = o.kind.size();
        let mut a = [0u8; 20];
        let mut p = [0u8; 20];
        let Some(na) = sys::sys_getsockopt(fd, o.level, o.name, &mut a[..size]) else {
            continue;
        };
        let Some(np) = sys::sys_getsockopt(probe.as_raw_fd(), o.level, o.name, &mut p[..size])
        else {
            continue;
        };
        if a[..na] == p[..np] {
            continue;
        }
        if o.class == Class::CarryHalved && na == 4 {
            let v = c_int::from_ne_bytes([a[0], a[1], a[2], a[3]]) / 2;
            req.push_opt(o.level, o.name, &v.to_ne_bytes());
        } else {
            req.push_opt(o.level, o.name, &a[..na]);
        }
    }
    Ok(())
}

/// Installs `new` over the application's `fd`, keeping O_NONBLOCK and
/// FD_CLOEXEC.
fn install(fd: RawFd, new: OwnedFd) -> Result<(), c_int> {
    let fl = sys::sys_fcntl(fd, libc::F_GETFL, 0)?;
    let fdfl = sys::sys_fcntl(fd, libc::F_GETFD, 0)?;
    if fl & libc::O_NONBLOCK != 0 {
        let nfl = sys::sys_fcntl(new.as_raw_fd(), libc::F_GETFL, 0)?;
        sys::sys_fcntl(
            new.as_raw_fd(),
            libc::F_SETFL,
            libc::c_long::from(nfl | libc::O_NONBLOCK),
        )?;
    }
    let flags = if fdfl & libc::FD_CLOEXEC != 0 {
        libc::O_CLOEXEC
    } else {
        0
    };
    sys::sys_dup3(new.as_raw_fd(), fd, flags)
}

/// `CALL ADDR: endpoint "EP"`, the start of every failure line.
struct Head<'a> {
    call: Call,
    sa: &'a SocketAddr,
    ep: EndpointName,
}

impl std::fmt::Display for Head<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: endpoint \"{}\"",
            self.call.name(),
            self.sa,
            self.ep
        )
    }
}

fn errstr(e: c_int) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// Asks graftd for a host socket on `ep` and puts it in place of `fd`.
/// On failure prints the one line naming the endpoint and the fix, and
/// returns the errno the application's call fails with.
#[allow(clippy::too_many_arguments)]
fn graft(
    cfg: &Config,
    fd: RawFd,
    call: Call,
    sa: &SocketAddr,
    ep: EndpointName,
    ep_v6: bool,
    purpose: Purpose,
    k: Kind,
) -> Result<(), c_int> {
    let mut req = Request::new(Op::Socket, ep, k.family, k.sotype, k.protocol, purpose);
    let head = Head { call, sa, ep };
    if let Err(e) = snapshot(fd, &k, &mut req) {
        // Grafting without the application's options would change its
        // behaviour silently; and the reply's descriptor would not fit either.
        say!(
            "{head}: cannot read the socket's options to carry them over ({})",
            errstr(e)
        );
        return Err(e);
    }
    let fam = if ep_v6 { "ipv6" } else { "ipv4" };
    let answer = match broker::ask(&cfg.broker, &req) {
        Ok(a) => a,
        Err(broker::Error::Unreachable(_)) => {
            say!(
                "{head}: graftd is not reachable in this network namespace (broker \"{}\"): \
                 start graftd and add the endpoint with \"ip graft add {ep} ...\"",
                cfg.broker
            );
            return Err(call.unreachable_errno());
        }
        Err(broker::Error::Timeout) => {
            say!(
                "{head}: graftd did not answer within {} s (broker \"{}\"): check graftd's log",
                broker::TIMEOUT_SECS,
                cfg.broker
            );
            return Err(libc::ETIMEDOUT);
        }
        Err(broker::Error::Io(e)) => {
            say!(
                "{head}: the connection to graftd broke ({}): check graftd's log",
                errstr(e)
            );
            return Err(call.unreachable_errno());
        }
        Err(broker::Error::NoRoom) => {
            say!(
                "{head}: the host socket did not fit in this process (descriptor limit \
                 reached?): raise the limit (ulimit -n) or close descriptors"
            );
            return Err(libc::EMFILE);
        }
        Err(broker::Error::Protocol(what)) => {
            say!(
                "{head}: graftd sent an invalid reply ({what}): run matching versions of \
                 graftd and libgraft-convert"
            );
            return Err(libc::EPROTO);
        }
    };
    let r = answer.reply;
    if r.errno != 0 || r.reason != Reason::None {
        let errno = if r.errno > 0 { r.errno } else { libc::EIO };
        return Err(match r.reason {
            Reason::NoEndpoint => {
                say!(
                    "{} {sa}: endpoint \"{ep}\" does not exist in this network namespace: add it \
                     with \"ip graft add {ep} type {fam} addr ADDR port PORT\"",
                    call.name()
                );
                call.unreachable_errno()
            }
            Reason::OptionRefused => {
                let label = graft_core::sockopt::lookup(r.opt_level, r.opt_name)
                    .map(|o| o.label)
                    .unwrap_or("(unknown)");
                say!(
                    "{head}: option {label} refused by graftd: do not set it on a socket graft \
                     maps, or leave this address out of the graft rules"
                );
                libc::EPERM
            }
            Reason::FamilyMismatch => {
                let sock = if k.family == libc::AF_INET6 {
                    "an AF_INET6"
                } else {
                    "an AF_INET"
                };
                say!(
                    "{head}: the endpoint's address family does not fit {sock} socket: map \
                     this address to an endpoint of the same family"
                );
                libc::EAFNOSUPPORT
            }
            Reason::Policy => {
                say!(
                    "{head}: refused by the endpoint's policy ({}): change the endpoint's \
                     allow/deny clauses",
                    errstr(errno)
                );
                errno
            }
            Reason::Malformed => {
                say!(
                    "{head}: graftd rejected the request as malformed: run matching versions \
                     of graftd and libgraft-convert"
                );
                libc::EPROTO
            }
            Reason::SocketFailed | Reason::None => {
                say!(
                    "{head}: graftd could not make the host socket ({}): check graftd's log",
                    errstr(errno)
                );
                errno
            }
        });
    }
    let Some(new) = answer.fd else {
        say!("{head}: graftd sent no socket: check graftd's log");
        return Err(libc::EPROTO);
    };
    if let Err(e) = install(fd, new) {
        say!(
            "{head}: could not install the host socket on fd {fd} ({})",
            errstr(e)
        );
        return Err(e);
    }
    let st = match purpose {
        Purpose::Ingress => table::INGRESS,
        Purpose::Egress => table::EGRESS,
    };
    let (raw, _) = addr::encode(sa);
    table::set_with_addr(fd, st, &raw);
    if cfg.verbose {
        match addr::parse(r.addr_bytes()) {
            Some(host) => say!(
                "pid {} fd {fd} {} {sa} -> {ep} (host {host})",
                sys::sys_getpid(),
                call.name()
            ),
            None => say!(
                "pid {} fd {fd} {} {sa} -> {ep}",
                sys::sys_getpid(),
                call.name()
            ),
        }
    }
    Ok(())
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
