//! What a failed graft costs the application: the errno its call fails with
//! and the one stderr line naming the endpoint and the fix, both chosen
//! here and nowhere else. The socket is never left on the container's
//! stack (fail closed): the caller returns -1 with this errno.
//!
//! | failure                                       | errno                          |
//! |-----------------------------------------------|--------------------------------|
//! | graftd not reachable, connection broke        | bind/listen EADDRNOTAVAIL, connect/sends ENETUNREACH |
//! | endpoint missing in this namespace            | the same                       |
//! | option refused                                | EPERM                          |
//! | refused by the endpoint's policy              | graftd's errno (EPERM unless the policy says otherwise) |
//! | graftd did not answer in time                 | ETIMEDOUT                      |
//! | garbled reply, request rejected as malformed, no socket in the reply | EPROTO |
//! | endpoint at its socket limit                  | ENOBUFS                        |
//! | host socket past the descriptor limit         | EMFILE                         |
//! | a type unix endpoint asked for a datagram socket | ESOCKTNOSUPPORT             |
//! | the endpoint's family does not fit the socket | EAFNOSUPPORT                   |
//! | options unreadable, install failed            | the system call's errno        |
//! | anything else graftd refused                  | graftd's errno (EIO if none)   |

use graft_core::proto::broker::{Reason, Reply};
use libc::c_int;

use crate::broker;
use crate::decide::Call;
use crate::install::Graft;
use crate::log::say;

/// Why a graft failed.
pub enum Failure {
    /// The application's options could not be read (they would be lost).
    Options(c_int),
    /// No exchange with graftd.
    Broker(broker::Error),
    /// graftd answered with a refusal.
    Refused(Refusal),
    /// graftd's success reply carried no descriptor.
    NoSocket,
    /// The host socket could not be put over the application's descriptor.
    Install(c_int),
}

/// What a refusing reply says (the reply without its address).
#[derive(Clone, Copy)]
pub struct Refusal {
    pub reason: Reason,
    errno: c_int,
    opt_level: c_int,
    opt_name: c_int,
}

impl From<&Reply> for Refusal {
    fn from(r: &Reply) -> Self {
        Refusal {
            reason: r.reason,
            errno: r.errno,
            opt_level: r.opt_level,
            opt_name: r.opt_name,
        }
    }
}

/// Prints `f`'s line and returns the errno `g.call` fails with.
pub fn fail(g: &Graft<'_>, f: &Failure) -> c_int {
    say_failure(g, f);
    errno(g.call, f)
}

/// The errno table above.
pub fn errno(call: Call, f: &Failure) -> c_int {
    let unreachable = call.unreachable_errno();
    match f {
        Failure::Options(e) | Failure::Install(e) => *e,
        Failure::Broker(broker::Error::Unreachable(_) | broker::Error::Io(_)) => unreachable,
        Failure::Broker(broker::Error::Timeout) => libc::ETIMEDOUT,
        Failure::Broker(broker::Error::NoRoom) => libc::EMFILE,
        Failure::Broker(broker::Error::Protocol(_)) | Failure::NoSocket => libc::EPROTO,
        Failure::Refused(r) => match r.reason {
            Reason::NoEndpoint => unreachable,
            Reason::OptionRefused => libc::EPERM,
            Reason::FamilyMismatch if graftd_errno(r) == libc::ESOCKTNOSUPPORT => {
                libc::ESOCKTNOSUPPORT
            }
            Reason::FamilyMismatch => libc::EAFNOSUPPORT,
            Reason::Limit => libc::ENOBUFS,
            Reason::Malformed => libc::EPROTO,
            Reason::Policy | Reason::NoDualStack | Reason::SocketFailed | Reason::None => {
                graftd_errno(r)
            }
        },
    }
}

/// The errno graftd chose (EIO when a refusal carries none).
fn graftd_errno(r: &Refusal) -> c_int {
    if r.errno > 0 {
        r.errno
    } else {
        libc::EIO
    }
}

fn errstr(e: c_int) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// `CALL ADDR: endpoint "EP"`, the start of every failure line.
struct Head<'a>(&'a Graft<'a>);

impl std::fmt::Display for Head<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.0;
        write!(f, "{} {}: endpoint \"{}\"", g.call.name(), g.sa, g.ep)
    }
}

/// The one line a failure prints: what failed and the fix.
fn say_failure(g: &Graft<'_>, f: &Failure) {
    let head = Head(g);
    let (ep, broker) = (g.ep, &g.cfg.broker);
    let fam = if g.ep_v6 { "ipv6" } else { "ipv4" };
    match f {
        Failure::Options(e) => say!(
            "{head}: cannot read the socket's options to carry them over ({})",
            errstr(*e)
        ),
        Failure::Broker(broker::Error::Unreachable(_)) => say!(
            "{head}: graftd is not reachable in this network namespace (broker \"{broker}\"): \
             start graftd and add the endpoint with \"ip graft add {ep} ...\""
        ),
        Failure::Broker(broker::Error::Timeout) => say!(
            "{head}: graftd did not answer within {} s (broker \"{broker}\"): check graftd's log",
            broker::TIMEOUT_SECS
        ),
        Failure::Broker(broker::Error::Io(e)) => say!(
            "{head}: the connection to graftd broke ({}): check graftd's log",
            errstr(*e)
        ),
        Failure::Broker(broker::Error::NoRoom) => say!(
            "{head}: the host socket did not fit in this process (descriptor limit \
             reached?): raise the limit (ulimit -n) or close descriptors"
        ),
        Failure::Broker(broker::Error::Protocol(what)) => say!(
            "{head}: graftd sent an invalid reply ({what}): run matching versions of \
             graftd and libgraft-convert"
        ),
        Failure::Refused(r) => say_refused(g, r, fam),
        Failure::NoSocket => say!("{head}: graftd sent no socket: check graftd's log"),
        Failure::Install(e) => say!(
            "{head}: could not install the host socket on fd {} ({})",
            g.fd,
            errstr(*e)
        ),
    }
}

fn say_refused(g: &Graft<'_>, r: &Refusal, fam: &str) {
    let head = Head(g);
    let ep = g.ep;
    let errno = graftd_errno(r);
    match r.reason {
        Reason::NoEndpoint => say!(
            "{head} does not exist in this network namespace: add it with \
             \"ip graft add {ep} type {fam} addr ADDR port PORT\""
        ),
        Reason::OptionRefused => {
            let label = graft_core::sockopt::lookup(r.opt_level, r.opt_name)
                .map(|o| o.label)
                .unwrap_or("(unknown)");
            say!(
                "{head}: option {label} refused by graftd: do not set it on a socket graft \
                 maps, or leave this address out of the graft rules"
            )
        }
        Reason::FamilyMismatch if errno == libc::ESOCKTNOSUPPORT => say!(
            "{head}: a type unix endpoint takes stream (TCP) sockets only: map this \
             address to a type {fam} endpoint"
        ),
        Reason::FamilyMismatch => {
            let sock = if g.kind.family == libc::AF_INET6 {
                "an AF_INET6"
            } else {
                "an AF_INET"
            };
            say!(
                "{head}: the endpoint's address family does not fit {sock} socket: map \
                 this address to an endpoint of the same family"
            )
        }
        Reason::Policy => say!(
            "{head}: refused by the endpoint's policy ({}): change the endpoint's \
             allow/deny clauses",
            errstr(errno)
        ),
        Reason::Limit => say!(
            "{head}: endpoint \"{ep}\" already has as many live sockets as its limit \
             allows: close some, or re-add it with a higher \"limit N\""
        ),
        Reason::NoDualStack => {
            say!("{head}: graftd refused a dual-stack listener: check graftd's log")
        }
        Reason::Malformed => say!(
            "{head}: graftd rejected the request as malformed: run matching versions \
             of graftd and libgraft-convert"
        ),
        Reason::SocketFailed | Reason::None => say!(
            "{head}: graftd could not make the host socket ({}): check graftd's log",
            errstr(errno)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(reason: Reason, errno: c_int) -> Failure {
        Failure::Refused(Refusal {
            reason,
            errno,
            opt_level: 0,
            opt_name: 0,
        })
    }

    #[test]
    fn errno_table() {
        use broker::Error;
        // The endpoint cannot be had: each call's own errno.
        for (call, want) in [
            (Call::Bind, libc::EADDRNOTAVAIL),
            (Call::Listen, libc::EADDRNOTAVAIL),
            (Call::Connect, libc::ENETUNREACH),
            (Call::Sendto, libc::ENETUNREACH),
            (Call::Sendmsg, libc::ENETUNREACH),
            (Call::Sendmmsg, libc::ENETUNREACH),
        ] {
            let failures = [
                Failure::Broker(Error::Unreachable(libc::ECONNREFUSED)),
                Failure::Broker(Error::Unreachable(libc::ENOENT)),
                Failure::Broker(Error::Io(libc::EPIPE)),
                refused(Reason::NoEndpoint, libc::ENOENT),
            ];
            for (i, f) in failures.iter().enumerate() {
                assert_eq!(errno(call, f), want, "{} failure {i}", call.name());
            }
        }
        let (bind, connect) = (Call::Bind, Call::Connect);
        let rows = [
            (
                connect,
                refused(Reason::OptionRefused, libc::EINVAL),
                libc::EPERM,
            ),
            (connect, refused(Reason::Policy, libc::EPERM), libc::EPERM),
            (connect, refused(Reason::Policy, libc::EACCES), libc::EACCES),
            (connect, Failure::Broker(Error::Timeout), libc::ETIMEDOUT),
            (
                connect,
                Failure::Broker(Error::Protocol("short")),
                libc::EPROTO,
            ),
            (
                connect,
                refused(Reason::Malformed, libc::EINVAL),
                libc::EPROTO,
            ),
            (connect, Failure::NoSocket, libc::EPROTO),
            (connect, refused(Reason::Limit, libc::EAGAIN), libc::ENOBUFS),
            (connect, Failure::Broker(Error::NoRoom), libc::EMFILE),
            (
                bind,
                refused(Reason::FamilyMismatch, libc::ESOCKTNOSUPPORT),
                libc::ESOCKTNOSUPPORT,
            ),
            (
                bind,
                refused(Reason::FamilyMismatch, libc::EINVAL),
                libc::EAFNOSUPPORT,
            ),
            (
                bind,
                refused(Reason::SocketFailed, libc::EADDRINUSE),
                libc::EADDRINUSE,
            ),
            (bind, refused(Reason::SocketFailed, 0), libc::EIO),
            (bind, Failure::Options(libc::EMFILE), libc::EMFILE),
            (bind, Failure::Install(libc::EBADF), libc::EBADF),
        ];
        for (i, (call, f, want)) in rows.iter().enumerate() {
            assert_eq!(errno(*call, f), *want, "row {i}");
        }
    }
}
