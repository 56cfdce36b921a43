//! The graft itself: asks graftd for a host socket carrying the
//! application's options and installs it over the application's
//! descriptor. Safe code, like [`crate::decide`]; what a failure costs the
//! application (errno, one line) is [`crate::fail`].

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use graft_core::proto::broker::{Op, Purpose, Reason, Reply, Request};
use graft_core::sockaddr::HostShown;
use graft_core::sockopt::{Class, SNAPSHOT};
use graft_core::EndpointName;
use libc::c_int;

use crate::broker::{self, Answer};
use crate::config::Config;
use crate::decide::{pack_kind, Call, Kind};
use crate::fail::{self, Failure};
use crate::log::say;
use crate::pool;
use crate::{addr, sys, table};

/// One graft: everything the decision knew.
#[derive(Clone, Copy)]
pub struct Graft<'a> {
    pub cfg: &'a Config,
    /// The application's descriptor, replaced on success.
    pub fd: RawFd,
    pub call: Call,
    /// The address the application bound or asked for.
    pub sa: &'a SocketAddr,
    pub ep: EndpointName,
    /// Whether `ep` is looked for as an IPv6 endpoint (for the fix a
    /// missing endpoint's line suggests).
    pub ep_v6: bool,
    pub purpose: Purpose,
    pub kind: Kind,
    /// The IPv6 endpoint of a dual-stack listener (then `ep` is the IPv4 one).
    pub dual: Option<EndpointName>,
}

/// Asks graftd for a host socket on `g.ep` and puts it in place of `g.fd`.
/// On failure prints the one line naming the endpoint and the fix, and
/// returns the errno the application's call fails with.
pub fn graft(g: &Graft<'_>) -> Result<(), c_int> {
    attempt(g).map_err(|f| fail::fail(g, &f))
}

/// [`graft`] for a dual-stack listener; `None` (and no line) when graftd
/// cannot make one, so the caller falls back to one endpoint.
pub fn graft_dual(g: &Graft<'_>) -> Option<Result<(), c_int>> {
    match attempt(g) {
        // An older graftd does not know the dual-stack request at all.
        Err(Failure::Refused(r)) if matches!(r.reason, Reason::NoDualStack | Reason::Malformed) => {
            None
        }
        r => Some(r.map_err(|f| fail::fail(g, &f))),
    }
}

fn attempt(g: &Graft<'_>) -> Result<(), Failure> {
    let req = request(g)?;
    let answer = ask(g, &req)?;
    let r = answer.reply;
    if r.errno != 0 || r.reason != Reason::None {
        return Err(Failure::Refused((&r).into()));
    }
    let new = answer.fd.ok_or(Failure::NoSocket)?;
    install(g.fd, new).map_err(Failure::Install)?;
    record(g, &r);
    if g.cfg.verbose {
        say_grafted(g, &r);
    }
    Ok(())
}

/// The broker request, with the options the application set.
fn request(g: &Graft<'_>) -> Result<Request, Failure> {
    let k = g.kind;
    let mut req = match g.dual {
        Some(ep6) => Request::new_dual(g.ep, ep6, k.family, k.sotype, k.protocol),
        None => Request::new(Op::Socket, g.ep, k.family, k.sotype, k.protocol, g.purpose),
    };
    // Grafting without the application's options would change its
    // behaviour silently; and the reply's descriptor would not fit either.
    snapshot(g.fd, &k, &mut req).map_err(Failure::Options)?;
    Ok(req)
}

/// Sends the request, to the pool when it may serve it.
fn ask(g: &Graft<'_>, req: &Request) -> Result<Answer, Failure> {
    // An egress socket whose whole history we saw and that carries no
    // option is like any other of its kind: it may come from the pool.
    let poolable = g.purpose == Purpose::Egress
        && g.cfg.pool
        && req.nopts == 0
        && table::recorded_opts(g.fd).is_some();
    // Endpoint names are per namespace: the cached broker connections and
    // the pool serve a socket only in the namespace they were made in.
    let ns = sys::sys_netns_key(g.fd);
    let asked = if poolable {
        pool::ask(&g.cfg.broker, req, pack_kind(g.kind), g.cfg.verbose, ns)
    } else {
        broker::ask(&g.cfg.broker, req, ns)
    };
    asked.map_err(Failure::Broker)
}

/// `g.fd` already is the host socket (made so by [`crate::early`]) and is
/// about to connect as `g` asks: recorded, and said under `-v`, as a graft.
pub(crate) fn adopted(g: &Graft<'_>) {
    // record() only looks at the reply's family, which is the request's
    // unless the endpoint is a unix one: never for a pooled socket.
    record(g, &Reply::ok(Op::Socket, &[]));
    if g.cfg.verbose {
        let r = match sys::sys_sockname(g.fd, false) {
            Ok((b, n)) => Reply::ok(Op::Socket, &b[..n]),
            Err(_) => Reply::ok(Op::Socket, &[]),
        };
        say_grafted(g, &r);
    }
}

/// The grafted descriptor's new state, with the address the application used.
fn record(g: &Graft<'_>, r: &Reply) {
    // A `type unix` endpoint answers with a unix socket (its address is
    // AF_UNIX); the application goes on believing it holds a TCP socket.
    let unix = r
        .addr_bytes()
        .get(..2)
        .is_some_and(|f| i32::from(u16::from_ne_bytes([f[0], f[1]])) == libc::AF_UNIX);
    let st = match (g.purpose, unix) {
        (Purpose::Ingress, false) => table::INGRESS,
        (Purpose::Egress, false) => table::EGRESS,
        (Purpose::Ingress, true) => table::UNIX_LISTEN,
        (Purpose::Egress, true) => table::UNIX_OUT,
    };
    let (raw, _) = addr::encode(g.sa);
    table::set_with_addr(g.fd, st, &raw);
}

/// The verbose line of a graft that worked.
fn say_grafted(g: &Graft<'_>, r: &Reply) {
    let (fd, sa, ep, call) = (g.fd, g.sa, g.ep, g.call.name());
    let pid = sys::sys_getpid();
    match (addr::parse(r.addr_bytes()).map(HostShown), g.dual) {
        (Some(host), Some(ep6)) => {
            say!("pid {pid} fd {fd} {call} {sa} -> {ep} + {ep6} (host {host}, dual-stack)")
        }
        (Some(host), None) => say!("pid {pid} fd {fd} {call} {sa} -> {ep} (host {host})"),
        (None, _) => say!("pid {pid} fd {fd} {call} {sa} -> {ep}"),
    }
}

/// Reads the options the application set into the request.
pub(crate) fn snapshot(fd: RawFd, k: &Kind, req: &mut Request) -> Result<(), c_int> {
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
pub(crate) fn install(fd: RawFd, new: OwnedFd) -> Result<(), c_int> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::opt_bit;
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

    fn inet(sotype: c_int, protocol: c_int) -> Kind {
        Kind {
            family: libc::AF_INET,
            sotype,
            protocol,
        }
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
    fn recorded_snapshot_reads_only_set_options_and_matches_the_comparison() {
        let k = inet(libc::SOCK_STREAM, libc::IPPROTO_TCP);
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
        let k = inet(libc::SOCK_DGRAM, libc::IPPROTO_UDP);
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
