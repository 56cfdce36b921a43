//! Grafting a TCP socket as it is made.
//!
//! A connect-time graft makes the application's socket in the container's
//! namespace, then throws it away for the host socket: a socket created and
//! destroyed per connection, most of what an egress connection costs beyond
//! the host's own. When the rules send every destination of a family to one
//! endpoint ([`RuleSet::egress_catch_all`](graft_core::rules::RuleSet::egress_catch_all))
//! and the pool already holds a socket of that endpoint for the calling
//! thread's namespace, our `socket()` returns that host socket instead
//! (state [`table::EARLY`], the endpoint's name kept in the entry).
//!
//! Such a socket must not behave differently from a container socket in
//! any way the application can see before it connects. What it can see:
//! - `connect()`/`sendto()` to a destination the rules send to that
//!   endpoint is the graft a container socket would have had: it connects.
//! - A destination the rules decide otherwise, `bind()`, `listen()`, and
//!   any option graftd would not carry over: first [`ungraft`] puts a
//!   container socket with the options set so far in its place, then the
//!   call goes on as for any socket our `socket()` made.
//!
//! The calling thread's namespace is learnt from a socket it made (a socket
//! is made in the namespace of the thread that makes it: its netns cookie
//! says which) and forgotten when the thread calls `setns()` or `unshare()`
//! through libc, so a thread that moved never gets a socket of its old
//! namespace's endpoint. A raw setns system call is not seen: such a thread
//! can get one until it next makes a socket the ordinary way.

use std::cell::Cell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use graft_core::proto::broker::{Op, Purpose, Request};
use graft_core::rules::EgressDecision;
use graft_core::sockopt::{Class, SNAPSHOT};
use graft_core::EndpointName;
use libc::c_int;

use crate::config::{self, Config};
use crate::decide::{candidate_kind, opt_bit, pack_kind, unpack_kind, Call, Kind};
use crate::install::{self, Graft};
use crate::{pool, sys, table};

thread_local! {
    /// The calling thread's network namespace key ([`sys::sys_netns_key`]);
    /// 0: not known.
    static NETNS: Cell<u64> = const { Cell::new(0) };
}

/// The calling thread's namespace may have changed (setns, unshare).
pub fn netns_changed() {
    let _ = NETNS.try_with(|n| n.set(0));
}

/// The catch-all endpoint for sockets of this kind, if they may be grafted
/// as they are made.
fn endpoint_for(cfg: &Config, k: &Kind) -> Option<EndpointName> {
    if k.sotype != libc::SOCK_STREAM || k.protocol != libc::IPPROTO_TCP {
        return None;
    }
    cfg.catch_all[usize::from(k.family == libc::AF_INET6)]
}

/// Our `socket()` made `fd`, a socket of kind `k`, the ordinary way:
/// remember the thread's namespace if a later socket of this kind could be
/// grafted as it is made.
pub fn learn(cfg: &Config, fd: RawFd, k: &Kind) {
    if endpoint_for(cfg, k).is_some() && NETNS.try_with(Cell::get) == Ok(0) {
        if let Some(ns) = sys::sys_netns_key(fd) {
            let _ = NETNS.try_with(|n| n.set(ns));
        }
    }
}

/// `socket(domain, ty, proto)` as a host socket of the catch-all endpoint,
/// when the pool has one ready; `None`: make it the ordinary way.
pub fn socket(domain: c_int, ty: c_int, proto: c_int) -> Option<RawFd> {
    let cfg = config::get()?;
    let k = candidate_kind(domain, ty, proto)?;
    let ep = endpoint_for(cfg, &k)?;
    let ns = NETNS.try_with(Cell::get).ok().filter(|&n| n != 0)?;
    let host = pool::take_ready(&ep, pack_kind(k), ns, || egress_request(ep, &k))?;
    // The lowest free number, as socket() itself would give.
    let dup = if ty & libc::SOCK_CLOEXEC != 0 {
        libc::F_DUPFD_CLOEXEC
    } else {
        libc::F_DUPFD
    };
    let fd = sys::sys_fcntl(host.as_raw_fd(), dup, 0).ok()? as RawFd;
    drop(host);
    if ty & libc::SOCK_NONBLOCK != 0
        && sys::sys_fcntl(fd, libc::F_SETFL, libc::c_long::from(libc::O_NONBLOCK)).is_err()
    {
        sys::sys_close(fd);
        return None;
    }
    table::created(fd, table::EARLY, pack_kind(k));
    let mut name = [0u8; table::ADDR_WORDS * 4];
    let b = ep.as_bytes();
    name[..b.len()].copy_from_slice(b);
    table::set_with_addr(fd, table::EARLY, &name);
    Some(fd)
}

/// The request a connect-time egress graft of a `k` socket onto `ep` makes.
fn egress_request(ep: EndpointName, k: &Kind) -> Request {
    Request::new(
        Op::Socket,
        ep,
        k.family,
        k.sotype,
        k.protocol,
        Purpose::Egress,
    )
}

/// The endpoint an [`table::EARLY`] socket belongs to.
fn endpoint_of(fd: RawFd) -> Option<EndpointName> {
    let raw = table::addr(fd);
    let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    EndpointName::new(std::str::from_utf8(&raw[..n]).ok()?).ok()
}

/// `connect()`/`sendto()` of an [`table::EARLY`] socket to `sa`: true when
/// it stays the host socket (the rules send `sa` to its endpoint) and the
/// call goes ahead; false once [`ungraft`] made it an ordinary socket, to
/// be decided as one.
pub fn connect(cfg: &Config, call: Call, fd: RawFd, sa: &SocketAddr) -> Result<bool, c_int> {
    let (Some(ep), Some(kind)) = (endpoint_of(fd), unpack_kind(table::kind(fd))) else {
        ungraft(fd)?;
        return Ok(false);
    };
    let fits = match sa {
        SocketAddr::V4(_) => kind.family == libc::AF_INET,
        SocketAddr::V6(_) => kind.family == libc::AF_INET6,
    };
    let same = matches!(cfg.rules.match_egress(sa.ip()), EgressDecision::Graft(e) if e == ep);
    if !(fits && same) {
        ungraft(fd)?;
        return Ok(false);
    }
    install::adopted(&Graft {
        cfg,
        fd,
        call,
        sa,
        ep,
        ep_v6: sa.ip().to_canonical().is_ipv6(),
        purpose: Purpose::Egress,
        kind,
        dual: None,
    });
    Ok(true)
}

/// Whether `setsockopt(level, name)` on an [`table::EARLY`] socket may go
/// to the host socket as it is: an option graftd would carry over from a
/// container socket anyway. Anything else (refused, unknown, or one that
/// changes the socket's family) is set on a container socket instead.
pub fn keeps_option(level: c_int, name: c_int) -> bool {
    (level, name) != (libc::IPPROTO_IPV6, libc::IPV6_ADDRFORM)
        && opt_bit(level, name).is_some_and(|i| SNAPSHOT[i as usize].class != Class::Refuse)
}

/// Puts a container socket (made in the calling thread's namespace, with
/// the options set on the host socket so far, O_NONBLOCK and FD_CLOEXEC) in
/// place of the [`table::EARLY`] socket `fd`, which becomes an ordinary
/// socket our `socket()` made. The host socket, never connected, is closed.
pub fn ungraft(fd: RawFd) -> Result<(), c_int> {
    let k = unpack_kind(table::kind(fd)).ok_or(libc::EBADF)?;
    let ep = endpoint_of(fd).ok_or(libc::EBADF)?;
    let new: OwnedFd = sys::sys_socket(k.family, k.sotype | libc::SOCK_CLOEXEC, k.protocol)?;
    let mut req = egress_request(ep, &k);
    install::snapshot(fd, &k, &mut req)?;
    for o in req.options() {
        sys::sys_setsockopt(new.as_raw_fd(), o.level, o.name, o.bytes())?;
    }
    install::install(fd, new)?;
    table::set(fd, table::CANDIDATE);
    Ok(())
}
