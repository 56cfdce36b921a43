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
use crate::pool;
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

/// Family (8 bits), type (8 bits) and protocol (16 bits) in one word for
/// the descriptor table; 0 when they do not fit (never for AF_INET/AF_INET6
/// stream or datagram sockets, whose protocols are below 2^16).
fn pack_kind(k: Kind) -> u32 {
    let fits = (1..256).contains(&k.family)
        && (1..256).contains(&k.sotype)
        && (0..65536).contains(&k.protocol);
    if !fits {
        return 0;
    }
    (k.family as u32) << 24 | (k.sotype as u32) << 16 | k.protocol as u32
}

fn unpack_kind(w: u32) -> Option<Kind> {
    (w != 0).then_some(Kind {
        family: (w >> 24) as c_int,
        sotype: ((w >> 16) & 0xff) as c_int,
        protocol: (w & 0xffff) as c_int,
    })
}

/// What SO_DOMAIN/SO_TYPE/SO_PROTOCOL will say about a socket that
/// `socket(domain, ty, proto)` made, if it is one graft may take over.
fn candidate_kind(domain: c_int, ty: c_int, proto: c_int) -> Option<Kind> {
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
        // Kept so that a graft needs no getsockopt to learn the kind.
        Some(k) => table::created(fd, table::CANDIDATE, pack_kind(k)),
        None => table::created(fd, table::LOCAL, 0),
    }
}

/// The bit of `SNAPSHOT` an option sets, if any. Aliases that set the same
/// socket field under another name count as that option; without them an
/// option set under the alias would not be carried over.
fn opt_bit(level: c_int, name: c_int) -> Option<u32> {
    // asm-generic numbers (x86_64 and aarch64, the targets this library
    // is built for); the libc crate does not export them for glibc.
    const SO_SNDBUFFORCE: c_int = 32;
    const SO_RCVBUFFORCE: c_int = 33;
    const SO_TIMESTAMP_NEW: c_int = 63;
    const SO_TIMESTAMPNS_NEW: c_int = 64;
    const SO_RCVTIMEO_NEW: c_int = 66;
    const SO_SNDTIMEO_NEW: c_int = 67;
    let name = if level == libc::SOL_SOCKET {
        match name {
            SO_SNDBUFFORCE => libc::SO_SNDBUF,
            SO_RCVBUFFORCE => libc::SO_RCVBUF,
            SO_TIMESTAMP_NEW => libc::SO_TIMESTAMP,
            SO_TIMESTAMPNS_NEW => libc::SO_TIMESTAMPNS,
            SO_RCVTIMEO_NEW => libc::SO_RCVTIMEO,
            SO_SNDTIMEO_NEW => libc::SO_SNDTIMEO,
            n => n,
        }
    } else {
        name
    };
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
    cfg.rules.match_bind(sa.ip(), sa.port(), || {
        k.family == libc::AF_INET6
            && sys::sys_getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(0)
    })
}

/// The (IPv4, IPv6) endpoints of a dual-stack bind: an AF_INET6 stream
/// socket bound to `[::]` with IPV6_V6ONLY off, where both a `::` and a
/// `0.0.0.0` rule match the port and name different endpoints.
fn dual_match(
    cfg: &Config,
    fd: RawFd,
    k: &Kind,
    sa: &SocketAddr,
) -> Option<(EndpointName, EndpointName)> {
    if k.family != libc::AF_INET6
        || k.sotype != libc::SOCK_STREAM
        || sa.ip() != IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    {
        return None;
    }
    let ep6 = cfg.rules.match_ingress(sa.ip(), sa.port())?;
    let ep4 = cfg
        .rules
        .match_ingress(IpAddr::V4(Ipv4Addr::UNSPECIFIED), sa.port())?;
    if ep4 == ep6 || sys::sys_getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != Some(0) {
        return None;
    }
    Some((ep4, ep6))
}

/// Grafts an ingress socket onto `ep`; a dual-stack `[::]` bind that also
/// matches an IPv4 rule asks for one listener answering on both endpoints
/// first, and falls back to `ep` alone (with one line saying so) when
/// graftd cannot make one.
#[allow(clippy::too_many_arguments)]
fn graft_ingress(
    cfg: &Config,
    fd: RawFd,
    call: Call,
    sa: &SocketAddr,
    ep: EndpointName,
    ep_v6: bool,
    k: Kind,
) -> Result<(), c_int> {
    if let Some((ep4, ep6)) = dual_match(cfg, fd, &k, sa) {
        match graft(
            cfg,
            fd,
            call,
            sa,
            ep4,
            false,
            Purpose::Ingress,
            k,
            Some(ep6),
        ) {
            Err(DUAL_UNAVAILABLE) => say!(
                "{} {sa}: no dual-stack listener on \"{ep4}\" and \"{ep6}\" (graftd's log says \
                 why; it needs graftd's eBPF companion): answering on \"{ep}\" only",
                call.name()
            ),
            r => return r,
        }
    }
    graft(cfg, fd, call, sa, ep, ep_v6, Purpose::Ingress, k, None)
}

/// What [`graft`] returns when graftd cannot make a dual-stack listener
/// (never an errno).
const DUAL_UNAVAILABLE: c_int = -1;

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
            Some((ep, v6)) => match graft_ingress(cfg, fd, Call::Bind, &sa, ep, v6, k) {
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
        Some((ep, v6)) => match graft_ingress(cfg, fd, Call::Listen, &sa, ep, v6, k) {
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
            match graft(cfg, fd, call, &sa, ep, v6, Purpose::Egress, k, None) {
                // graftd already connected the unix socket to the endpoint.
                Ok(()) if call == Call::Connect && table::state(fd) == table::UNIX_OUT => {
                    Next::Done
                }
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

/// Reads the options the application set into the request.
fn snapshot(fd: RawFd, k: &Kind, req: &mut Request) -> Result<(), c_int> {
    match table::recorded_opts(fd) {
        Some(mask) => {
            snapshot_recorded(fd, k, mask, req);
            Ok(())
        }
        None => snapshot_compared(fd, k, req),
    }
}

/// Adds one option's current value (`a`) to the request.
fn push_value(o: &graft_core::sockopt::Opt, a: &[u8], req: &mut Request) {
    if o.class == Class::CarryHalved && a.len() == 4 {
        let v = c_int::from_ne_bytes([a[0], a[1], a[2], a[3]]) / 2;
        req.push_opt(o.level, o.name, &v.to_ne_bytes());
    } else {
        req.push_opt(o.level, o.name, a);
    }
}

/// The socket's whole history went through our `setsockopt()`: read only
/// the options it set (most clients set none), no reference socket.
fn snapshot_recorded(fd: RawFd, k: &Kind, mask: u128, req: &mut Request) {
    for (i, o) in SNAPSHOT.iter().enumerate() {
        if mask & (1u128 << i) == 0 || !o.applies(k.family, k.sotype) {
            continue;
        }
        let size = o.kind.size();
        let mut a = [0u8; 20];
        let n = sys::sys_getsockopt(fd, o.level, o.name, &mut a[..size]);
        if o.class == Class::Refuse {
            // An escape option switched off again (0, or no device) is
            // what a fresh socket has, and the comparison below never sent
            // it either. One that is on, or that cannot be read back
            // although it was set, goes to graftd, which refuses it:
            // fail closed.
            let v = match n {
                Some(n) if a[..n].iter().all(|&b| b == 0) => continue,
                Some(n) => &a[..n],
                None => &a[..size],
            };
            // Always fits: the request holds every option of SNAPSHOT.
            req.push_opt(o.level, o.name, v);
            continue;
        }
        if let Some(n) = n {
            push_value(o, &a[..n], req);
        }
    }
}

/// History unknown (inherited across exec, received over SCM_RIGHTS,
/// duplicated, shared by fork): the options that differ from a fresh socket
/// of the same kind are the ones the application set.
fn snapshot_compared(fd: RawFd, k: &Kind, req: &mut Request) -> Result<(), c_int> {
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
        push_value(o, &a[..na], req);
    }
    Ok(())
}

/// Installs `new` over the application's `fd`, keeping O_NONBLOCK and
/// FD_CLOEXEC.
fn install(fd: RawFd, new: OwnedFd) -> Result<(), c_int> {
    // Both flags are read from the kernel, not tracked: the application can
    // change them behind our back (ioctl FIONBIO/FIOCLEX, which Rust's std
    // and Python use, are not interposed).
    let fl = sys::sys_fcntl(fd, libc::F_GETFL, 0)?;
    let fdfl = sys::sys_fcntl(fd, libc::F_GETFD, 0)?;
    if fl & libc::O_NONBLOCK != 0 {
        // No F_GETFL on the new socket first: graftd's fresh socket has no
        // status flag F_SETFL can change (O_APPEND, O_ASYNC, O_DIRECT,
        // O_NOATIME are never set by socket()), so setting O_NONBLOCK
        // alone loses nothing.
        sys::sys_fcntl(
            new.as_raw_fd(),
            libc::F_SETFL,
            libc::c_long::from(libc::O_NONBLOCK),
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
    dual: Option<EndpointName>,
) -> Result<(), c_int> {
    let mut req = match dual {
        Some(ep6) => Request::new_dual(ep, ep6, k.family, k.sotype, k.protocol),
        None => Request::new(Op::Socket, ep, k.family, k.sotype, k.protocol, purpose),
    };
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
    // An egress socket whose whole history we saw and that carries no
    // option is like any other of its kind: it may come from the pool.
    let poolable = purpose == Purpose::Egress
        && cfg.pool
        && req.nopts == 0
        && table::recorded_opts(fd).is_some();
    // Endpoint names are per namespace: the cached broker connection and
    // the pool are only used for the namespace they were made in.
    let ns = sys::sys_netns_id();
    let asked = if poolable {
        pool::ask(&cfg.broker, &req, pack_kind(k), cfg.verbose, ns)
    } else {
        broker::ask(&cfg.broker, &req, ns)
    };
    let answer = match asked {
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
    // An older graftd does not know the dual-stack request at all.
    if dual.is_some() && matches!(r.reason, Reason::NoDualStack | Reason::Malformed) {
        return Err(DUAL_UNAVAILABLE);
    }
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
            Reason::FamilyMismatch if errno == libc::ESOCKTNOSUPPORT => {
                say!(
                    "{head}: a type unix endpoint takes stream (TCP) sockets only: map this \
                     address to a type {fam} endpoint"
                );
                libc::ESOCKTNOSUPPORT
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
            Reason::Limit => {
                say!(
                    "{head}: endpoint \"{ep}\" already has as many live sockets as its limit \
                     allows: close some, or re-add it with a higher \"limit N\""
                );
                libc::ENOBUFS
            }
            Reason::NoDualStack => {
                say!("{head}: graftd refused a dual-stack listener: check graftd's log");
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
    // A `type unix` endpoint answers with a unix socket (its address is
    // AF_UNIX); the application goes on believing it holds a TCP socket.
    let unix = r
        .addr_bytes()
        .get(..2)
        .is_some_and(|f| i32::from(u16::from_ne_bytes([f[0], f[1]])) == libc::AF_UNIX);
    let st = match (purpose, unix) {
        (Purpose::Ingress, false) => table::INGRESS,
        (Purpose::Egress, false) => table::EGRESS,
        (Purpose::Ingress, true) => table::UNIX_LISTEN,
        (Purpose::Egress, true) => table::UNIX_OUT,
    };
    let (raw, _) = addr::encode(sa);
    table::set_with_addr(fd, st, &raw);
    if cfg.verbose {
        match addr::parse(r.addr_bytes()) {
            Some(host) => match dual {
                Some(ep6) => say!(
                    "pid {} fd {fd} {} {sa} -> {ep} + {ep6} (host {host}, dual-stack)",
                    sys::sys_getpid(),
                    call.name()
                ),
                None => say!(
                    "pid {} fd {fd} {} {sa} -> {ep} (host {host})",
                    sys::sys_getpid(),
                    call.name()
                ),
            },
            None => say!(
                "pid {} fd {fd} {} {sa} -> {ep}",
                sys::sys_getpid(),
                call.name()
            ),
        }
    }
    Ok(())
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
    use graft_core::proto::broker::OptValue;

    fn sock(family: c_int, ty: c_int, proto: c_int) -> OwnedFd {
        sys::sys_socket(family, ty | libc::SOCK_CLOEXEC, proto).expect("socket")
    }

    fn set_int(fd: &OwnedFd, level: c_int, name: c_int, v: c_int) {
        sys::sys_setsockopt(fd.as_raw_fd(), level, name, &v.to_ne_bytes()).expect("setsockopt");
    }

    fn bit(level: c_int, name: c_int) -> u128 {
        1u128 << opt_bit(level, name).expect("in SNAPSHOT")
    }

    fn opts(req: &Request) -> Vec<(c_int, c_int, Vec<u8>)> {
        req.options()
            .iter()
            .map(|o: &OptValue| (o.level, o.name, o.bytes().to_vec()))
            .collect()
    }

    fn request(k: &Kind) -> Request {
        Request::new(
            Op::Socket,
            EndpointName::new("ep").unwrap(),
            k.family,
            k.sotype,
            k.protocol,
            Purpose::Egress,
        )
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
        assert_eq!(
            opt_bit(libc::SOL_SOCKET, 33),
            opt_bit(libc::SOL_SOCKET, libc::SO_RCVBUF)
        );
        assert_eq!(
            opt_bit(libc::SOL_SOCKET, 32),
            opt_bit(libc::SOL_SOCKET, libc::SO_SNDBUF)
        );
        assert_eq!(
            opt_bit(libc::SOL_SOCKET, 66),
            opt_bit(libc::SOL_SOCKET, libc::SO_RCVTIMEO)
        );
        assert_eq!(
            opt_bit(libc::SOL_SOCKET, 63),
            opt_bit(libc::SOL_SOCKET, libc::SO_TIMESTAMP)
        );
        assert_eq!(opt_bit(libc::SOL_SOCKET, libc::SO_ATTACH_FILTER), None);
        // Same number at another level is another option.
        assert_eq!(opt_bit(libc::IPPROTO_TCP, 33), None);
    }

    #[test]
    fn recorded_snapshot_reads_only_set_options_and_matches_the_comparison() {
        let k = Kind {
            family: libc::AF_INET,
            sotype: libc::SOCK_STREAM,
            protocol: libc::IPPROTO_TCP,
        };
        let fd = sock(k.family, k.sotype, k.protocol);
        set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 50000);
        set_int(&fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        set_int(&fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 77);
        let mask = bit(libc::SOL_SOCKET, libc::SO_RCVBUF)
            | bit(libc::IPPROTO_TCP, libc::TCP_NODELAY)
            | bit(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)
            // Recorded but scoped to datagram / IPv6 sockets: not sent.
            | bit(libc::SOL_SOCKET, libc::SO_BROADCAST)
            | bit(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY);
        let mut rec = request(&k);
        snapshot_recorded(fd.as_raw_fd(), &k, mask, &mut rec);
        let mut cmp = request(&k);
        snapshot_compared(fd.as_raw_fd(), &k, &mut cmp).unwrap();
        let want = vec![
            (
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                50000i32.to_ne_bytes().to_vec(),
            ),
            (
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                1i32.to_ne_bytes().to_vec(),
            ),
            (
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                77i32.to_ne_bytes().to_vec(),
            ),
        ];
        assert_eq!(opts(&rec), want);
        assert_eq!(opts(&cmp), want);
        assert!(opts(&request(&k)).is_empty());
        let mut none = request(&k);
        snapshot_recorded(fd.as_raw_fd(), &k, 0, &mut none);
        assert!(opts(&none).is_empty());

        // SO_RCVBUF 65536 reads back as 131072, a fresh TCP socket's value
        // (tcp_rmem[1]): the comparison cannot see it was set, the record
        // can (and setting it also turns receive-buffer autotuning off, so
        // carrying it matters).
        let fd = sock(k.family, k.sotype, k.protocol);
        set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 65536);
        let mut rec = request(&k);
        snapshot_recorded(
            fd.as_raw_fd(),
            &k,
            bit(libc::SOL_SOCKET, libc::SO_RCVBUF),
            &mut rec,
        );
        assert_eq!(
            opts(&rec),
            vec![(
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                65536i32.to_ne_bytes().to_vec()
            )]
        );
    }

    #[test]
    fn recorded_escape_options_are_sent_unless_switched_off() {
        let k = Kind {
            family: libc::AF_INET,
            sotype: libc::SOCK_DGRAM,
            protocol: libc::IPPROTO_UDP,
        };
        let fd = sock(k.family, k.sotype, k.protocol);
        let mark = bit(libc::SOL_SOCKET, libc::SO_MARK);
        if sys::sys_setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            &7i32.to_ne_bytes(),
        )
        .is_err()
        {
            eprintln!("SKIP: SO_MARK needs CAP_NET_ADMIN");
            return;
        }
        let mut on = request(&k);
        snapshot_recorded(fd.as_raw_fd(), &k, mark, &mut on);
        assert_eq!(
            opts(&on),
            vec![(libc::SOL_SOCKET, libc::SO_MARK, 7i32.to_ne_bytes().to_vec())]
        );
        set_int(&fd, libc::SOL_SOCKET, libc::SO_MARK, 0);
        let mut off = request(&k);
        snapshot_recorded(fd.as_raw_fd(), &k, mark, &mut off);
        assert!(opts(&off).is_empty(), "SO_MARK 0 is a fresh socket's value");
        // Set (so recorded) but no longer readable: still sent, so graftd
        // refuses rather than the option being dropped.
        let mut unreadable = request(&k);
        snapshot_recorded(-1, &k, mark, &mut unreadable);
        assert_eq!(
            opts(&unreadable),
            vec![(libc::SOL_SOCKET, libc::SO_MARK, vec![0; 4])]
        );
    }
}
