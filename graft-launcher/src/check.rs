//! The pre-flight check: graftd's broker answers in this network namespace
//! and knows every endpoint the rules name. Without it a mistake (graftd not
//! started, endpoint not added, a typo in a name) would only show when the
//! program's first grafted call fails, possibly long after start.
//!
//! The broker is the abstract `SOCK_SEQPACKET` socket graftd creates inside
//! each namespace that has endpoints; abstract sockets are per network
//! namespace, so reaching it proves we talk to the graftd that serves *this*
//! namespace. Each endpoint is asked about with one `Op::Lookup` record.

use std::os::fd::{AsRawFd, OwnedFd};

use graft_core::proto::broker::{DecodeError, Op, Purpose, Reason, Reply, Request};
use graft_core::proto::broker::{REPLY_LEN, REQUEST_LEN};
use graft_core::rules::RuleSet;
use graft_core::sockaddr;
use graft_core::EndpointName;
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::time::{TimeVal, TimeValLike};

/// How long one reply may take; graftd answers lookups from memory.
const REPLY_TIMEOUT_SECS: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "graftd's broker \"{name}\" does not answer in this network namespace ({err}): \
         start graftd, and add the endpoints in this namespace \
         (ip graft add {hint} addr ADDR port PORT|dynamic; for a container: \
         docker-ns-exec CONTAINER ip graft add …), or skip this check with --no-check"
    )]
    Unreachable {
        name: String,
        hint: String,
        err: Errno,
    },
    #[error("broker name \"{0}\" is not a valid abstract socket name: {1}")]
    BadName(String, &'static str),
    #[error(
        "endpoint \"{ep}\" does not exist in this network namespace: add it from inside \
         this namespace with `ip graft add {ep} type {kind} addr ADDR port PORT|dynamic` \
         (`ip graft show` lists the existing ones)"
    )]
    Missing {
        ep: EndpointName,
        kind: &'static str,
    },
    #[error("graftd refused to look up endpoint \"{ep}\": {reason} ({err})")]
    Refused {
        ep: EndpointName,
        reason: &'static str,
        err: Errno,
    },
    #[error("talking to graftd's broker \"{name}\": {op} failed: {err}")]
    Io {
        name: String,
        op: &'static str,
        err: Errno,
    },
    #[error("graftd's broker \"{name}\" closed the connection without replying")]
    Closed { name: String },
    #[error("graftd's broker \"{name}\" sent an invalid reply: {err}")]
    BadReply { name: String, err: DecodeError },
}

/// A connection to the broker of the current network namespace.
pub struct Broker {
    fd: OwnedFd,
    name: String,
}

/// A new socket of the kind graftd's broker accepts.
pub fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// The broker name clients use: `$GRAFT_BROKER`, else graft's default.
pub fn broker_name(env: Option<String>) -> String {
    env.filter(|s| !s.is_empty())
        .unwrap_or_else(|| graft_core::DEFAULT_BROKER_NAME.to_owned())
}

/// Which `type` an endpoint serving these rules would have, for the fix text.
fn kind_of(rules: &RuleSet, ep: EndpointName) -> &'static str {
    let v4 = |a: std::net::IpAddr| if a.is_ipv4() { "ipv4" } else { "ipv6" };
    rules
        .ingress
        .iter()
        .find(|r| r.endpoint == ep)
        .map(|r| v4(r.addr))
        .or_else(|| {
            rules
                .egress
                .iter()
                .find(|r| r.endpoint == Some(ep))
                .map(|r| v4(r.prefix.addr))
        })
        .unwrap_or("ipv4|ipv6")
}

/// The family a socket grafted onto `ep` by these rules would have.
fn family_of(rules: &RuleSet, ep: EndpointName) -> libc::c_int {
    match kind_of(rules, ep) {
        "ipv6" => libc::AF_INET6,
        _ => libc::AF_INET,
    }
}

/// A raw `sockaddr` from a reply, as text (for `-v`).
pub fn describe_addr(raw: &[u8]) -> String {
    if let Some(sa) = sockaddr::parse(raw) {
        return sa.to_string();
    }
    match sockaddr::family(raw) {
        None => "no address".to_owned(),
        Some(libc::AF_UNIX) => {
            let path = &raw[2..];
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            format!("unix {}", String::from_utf8_lossy(&path[..end]))
        }
        Some(f) => format!("address family {f}"),
    }
}

impl Broker {
    /// Connects to the broker named `name` in this network namespace.
    /// `hint` names an endpoint for the error's fix text. While nothing
    /// listens (graftd restarting) it retries every 10 ms for up to `wait`,
    /// as the preload library does.
    pub fn connect_waiting(
        name: &str,
        hint: &str,
        wait: std::time::Duration,
    ) -> Result<Self, CheckError> {
        graft_core::check_broker_name(name)
            .map_err(|why| CheckError::BadName(name.to_owned(), why))?;
        let addr = UnixAddr::new_abstract(name.as_bytes())
            .map_err(|_| CheckError::BadName(name.to_owned(), "not an abstract socket name"))?;
        let io = |op, err| CheckError::Io {
            name: name.to_owned(),
            op,
            err,
        };
        let fd = seqpacket().map_err(|e| io("socket", e))?;
        let start = std::time::Instant::now();
        loop {
            match socket::connect(fd.as_raw_fd(), &addr) {
                Ok(()) => break,
                Err(nix::errno::Errno::ECONNREFUSED) if start.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(err) => {
                    return Err(CheckError::Unreachable {
                        name: name.to_owned(),
                        hint: hint.to_owned(),
                        err,
                    })
                }
            }
        }
        socket::setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(REPLY_TIMEOUT_SECS),
        )
        .map_err(|e| io("setsockopt(SO_RCVTIMEO)", e))?;
        Ok(Broker {
            fd,
            name: name.to_owned(),
        })
    }

    /// Asks whether endpoint `ep` exists; returns the reply on success.
    pub fn lookup(&self, ep: EndpointName, family: libc::c_int) -> Result<Reply, CheckError> {
        let req = Request::new(
            Op::Lookup,
            ep,
            family,
            libc::SOCK_STREAM,
            0,
            Purpose::Ingress,
        );
        let mut out = [0u8; REQUEST_LEN];
        req.encode(&mut out);
        self.exchange(&out, Op::Lookup)
    }

    /// Sends one record and returns the reply, which must be for `op`.
    /// Only plain `send`/`recv` are used: they stay untrapped under the
    /// seccomp filter (see `crate::seccomp`).
    pub fn exchange(&self, out: &[u8; REQUEST_LEN], op: Op) -> Result<Reply, CheckError> {
        let io = |op, err| CheckError::Io {
            name: self.name.clone(),
            op,
            err,
        };
        let sent = socket::send(self.fd.as_raw_fd(), out, MsgFlags::MSG_NOSIGNAL)
            .map_err(|e| io("send", e))?;
        if sent != REQUEST_LEN {
            return Err(io("send", Errno::EMSGSIZE));
        }
        // One spare byte plus MSG_TRUNC: an oversized reply reports its real
        // size and fails decoding instead of being silently cut.
        let mut buf = [0u8; REPLY_LEN + 1];
        let n = loop {
            match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(io("waiting for the reply", Errno::ETIMEDOUT)),
                Err(e) => return Err(io("recv", e)),
                Ok(n) => break n,
            }
        };
        if n == 0 {
            return Err(CheckError::Closed {
                name: self.name.clone(),
            });
        }
        let bad = |err| CheckError::BadReply {
            name: self.name.clone(),
            err,
        };
        let reply = if n > buf.len() {
            Err(DecodeError::Size(n, REPLY_LEN))
        } else {
            Reply::decode(&buf[..n])
        }
        .map_err(bad)?;
        if reply.op != op {
            return Err(bad(DecodeError::Op(reply.op as u16)));
        }
        Ok(reply)
    }
}

/// Checks every endpoint the rules name; with `verbose`, prints one line per
/// endpoint found. The first problem is the error.
/// `GRAFT_WAIT_MS` as the preload library reads it (a bad value is the
/// default here; the library reports it when the program starts).
pub fn wait_from_env() -> std::time::Duration {
    let ms = std::env::var(graft_core::ENV_WAIT)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|ms| *ms <= graft_core::MAX_WAIT_MS)
        .unwrap_or(graft_core::DEFAULT_WAIT_MS);
    std::time::Duration::from_millis(u64::from(ms))
}

pub fn check(broker: &str, rules: &RuleSet, verbose: bool) -> Result<(), CheckError> {
    let endpoints = rules.endpoints();
    let Some(first) = endpoints.first() else {
        return Ok(());
    };
    let hint = format!("{first} type {}", kind_of(rules, *first));
    let b = Broker::connect_waiting(broker, &hint, wait_from_env())?;
    for ep in endpoints {
        let reply = b.lookup(ep, family_of(rules, ep))?;
        match (reply.errno, reply.reason) {
            (0, _) => {
                if verbose {
                    eprintln!(
                        "graft: endpoint {ep}: {}",
                        describe_addr(reply.addr_bytes())
                    );
                }
            }
            (_, Reason::NoEndpoint) => {
                return Err(CheckError::Missing {
                    ep,
                    kind: kind_of(rules, ep),
                })
            }
            // It exists; whether each socket's family fits is decided per
            // socket when the program runs.
            (_, Reason::FamilyMismatch) => {}
            (errno, reason) => {
                return Err(CheckError::Refused {
                    ep,
                    reason: reason.describe(),
                    err: Errno::from_raw(errno),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_from_replies() {
        let (v4, n) = sockaddr::encode(&"127.0.0.1:8080".parse().unwrap());
        assert_eq!(describe_addr(&v4[..n]), "127.0.0.1:8080");
        let (v6, n) = sockaddr::encode(&"[::1]:80".parse().unwrap());
        assert_eq!(describe_addr(&v6[..n]), "[::1]:80");
        assert_eq!(describe_addr(&v6[..10]), "address family 10");
        assert_eq!(describe_addr(&[]), "no address");
    }

    #[test]
    fn endpoint_kind_from_rules() {
        let rules = RuleSet::from_env_values(
            Some("0.0.0.0:80=a :::80=b"),
            Some("::/0=c 10.0.0.0/8=d"),
            None,
        )
        .unwrap();
        let ep = |s| EndpointName::new(s).unwrap();
        assert_eq!(kind_of(&rules, ep("a")), "ipv4");
        assert_eq!(kind_of(&rules, ep("b")), "ipv6");
        assert_eq!(kind_of(&rules, ep("c")), "ipv6");
        assert_eq!(family_of(&rules, ep("d")), libc::AF_INET);
    }

    #[test]
    fn no_broker_is_a_clear_error() {
        let name = format!("graft-test/none-{}", std::process::id());
        let e = Broker::connect_waiting(&name, "ep-in4 type ipv4", std::time::Duration::ZERO)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("does not answer in this network namespace"),
            "{e}"
        );
        assert!(e.contains("ip graft add ep-in4 type"), "{e}");
        assert!(e.contains("--no-check"), "{e}");
    }

    #[test]
    fn lookup_against_a_fake_broker() {
        use std::os::fd::AsFd;
        let name = format!("graft-test/fake-{}", std::process::id());
        let srv = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(
            srv.as_raw_fd(),
            &UnixAddr::new_abstract(name.as_bytes()).unwrap(),
        )
        .unwrap();
        socket::listen(&srv.as_fd(), socket::Backlog::new(4).unwrap()).unwrap();
        let server = std::thread::spawn(move || {
            let c = socket::accept(srv.as_raw_fd()).unwrap();
            let mut buf = [0u8; REQUEST_LEN + 1];
            for _ in 0..2 {
                let n = socket::recv(c, &mut buf, MsgFlags::empty()).unwrap();
                let req = Request::decode(&buf[..n]).unwrap();
                assert_eq!(req.op, Op::Lookup);
                let reply = if req.endpoint.as_str() == "ep-in4" {
                    assert_eq!(req.family, libc::AF_INET);
                    let mut a = [0u8; 16];
                    a[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                    a[2..4].copy_from_slice(&8080u16.to_be_bytes());
                    a[4..8].copy_from_slice(&[127, 0, 0, 1]);
                    Reply::ok(Op::Lookup, &a)
                } else {
                    Reply::err(Op::Lookup, libc::ENOENT, Reason::NoEndpoint)
                };
                let mut out = [0u8; REPLY_LEN];
                reply.encode(&mut out);
                socket::send(c, &out, MsgFlags::empty()).unwrap();
            }
            nix::unistd::close(c).unwrap();
        });
        let rules =
            RuleSet::from_env_values(Some("0.0.0.0:0-65535=ep-in4 :::0-65535=ep-in6"), None, None)
                .unwrap();
        let e = check(&name, &rules, false).unwrap_err().to_string();
        assert_eq!(
            e,
            "endpoint \"ep-in6\" does not exist in this network namespace: add it from inside \
             this namespace with `ip graft add ep-in6 type ipv6 addr ADDR port PORT|dynamic` \
             (`ip graft show` lists the existing ones)"
        );
        server.join().unwrap();
    }
}
