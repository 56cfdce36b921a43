//! The control-protocol client: one `SOCK_SEQPACKET` connection to graftd per
//! command, one request (with the namespace descriptors as SCM_RIGHTS) and one
//! reply.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use graft_core::nsrules::NsRules;
use graft_core::proto::control::{self, EndpointInfo, Reply, Request, MAX_MESSAGE};
use graft_core::NetnsId;
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;

/// How long we wait for graftd to take a request and to answer it.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Bounds the retries after a signal interrupted a send or receive.
const MAX_EINTR_RETRIES: usize = 100;

/// Why talking to graftd failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "Error: graftd is not running (no control socket at {}); \
         start it with: graftd &  (or: systemctl start graftd)",
        .0.display()
    )]
    NotRunning(PathBuf),
    #[error(
        "Error: graftd is not running (nothing listens on {}); \
         start it with: graftd &  (or: systemctl start graftd)",
        .0.display()
    )]
    Refused(PathBuf),
    #[error("Error: cannot connect to graftd at {}: {}{hint}", path.display(), errno.desc())]
    Connect {
        path: PathBuf,
        errno: Errno,
        hint: &'static str,
    },
    #[error("Error: graftd at {} did not answer within {:?}", .0.display(), .1)]
    Timeout(PathBuf, Duration),
    #[error("Error: graftd closed the connection without answering (ip graft must run as root)")]
    Closed,
    #[error("Error: {op} on graftd's control socket failed: {}", errno.desc())]
    Io { op: &'static str, errno: Errno },
    #[error("Error: graftd sent an invalid reply: {0}")]
    BadReply(String),
    /// graftd refused the request; its own words.
    #[error("Error: graftd: {message}")]
    Graftd { errno: i32, message: String },
}

impl ClientError {
    /// The exit status: graftd's refusals count as bad input (2, as iproute2
    /// does for RTNETLINK errors); an unreachable or broken daemon is 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Graftd { .. } => 2,
            _ => 1,
        }
    }
}

/// The control socket path: `$GRAFT_CONTROL`, else the default.
pub fn control_path() -> PathBuf {
    match std::env::var_os(graft_core::ENV_CONTROL) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(graft_core::DEFAULT_CONTROL_PATH),
    }
}

/// What a successful reply carries.
#[derive(Debug)]
pub struct Answer {
    /// The caller's namespace as graftd identified it.
    pub netns: NetnsId,
    pub endpoints: Vec<EndpointInfo>,
    /// The namespace's rules, in the answer to `GetRules`.
    pub rules: Option<NsRules>,
}

/// Sends `req` with `fds` attached (the caller's namespace first) and returns
/// graftd's answer.
pub fn call(path: &Path, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Answer, ClientError> {
    call_with_timeout(path, req, fds, TIMEOUT)
}

fn call_with_timeout(
    path: &Path,
    req: &Request,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let sock = connect(path, timeout)?;
    send(&sock, req, fds)?;
    let reply = receive(&sock, path, timeout)?;
    match reply {
        Reply::Ok { netns, endpoints } => Ok(Answer {
            netns,
            endpoints,
            rules: None,
        }),
        Reply::Rules { netns, rules } => Ok(Answer {
            netns,
            endpoints: Vec::new(),
            rules: Some(rules),
        }),
        Reply::Error(e) => {
            let message = one_line(&e.message);
            Err(ClientError::Graftd {
                errno: e.errno,
                message: if message.is_empty() {
                    Errno::from_raw(e.errno).desc().to_owned()
                } else {
                    message
                },
            })
        }
    }
}

/// graftd's text is shown on one line whatever it contains.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn connect(path: &Path, timeout: Duration) -> Result<OwnedFd, ClientError> {
    let io = |op| move |errno| ClientError::Io { op, errno };
    let sock = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io("socket()"))?;
    // Bounded by TIMEOUT-sized values: the casts cannot overflow.
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    socket::setsockopt(&sock, socket::sockopt::ReceiveTimeout, &tv)
        .map_err(io("setsockopt(SO_RCVTIMEO)"))?;
    socket::setsockopt(&sock, socket::sockopt::SendTimeout, &tv)
        .map_err(io("setsockopt(SO_SNDTIMEO)"))?;
    let addr = UnixAddr::new(path).map_err(|errno| ClientError::Connect {
        path: path.to_owned(),
        errno,
        hint: "",
    })?;
    match socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => Ok(sock),
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Err(ClientError::NotRunning(path.to_owned())),
        Err(Errno::ECONNREFUSED) => Err(ClientError::Refused(path.to_owned())),
        Err(errno @ (Errno::EACCES | Errno::EPERM)) => Err(ClientError::Connect {
            path: path.to_owned(),
            errno,
            hint: " (ip graft must run as root)",
        }),
        Err(Errno::EAGAIN) => Err(ClientError::Timeout(path.to_owned(), timeout)),
        Err(errno) => Err(ClientError::Connect {
            path: path.to_owned(),
            errno,
            hint: "",
        }),
    }
}

fn send(sock: &OwnedFd, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
    let bytes = control::encode(req);
    // The descriptors cross the C boundary here; `fds` keeps them open.
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    for _ in 0..MAX_EINTR_RETRIES {
        let iov = [IoSlice::new(&bytes)];
        match socket::sendmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => {
                return Err(ClientError::Io {
                    op: "sendmsg()",
                    errno: Errno::EMSGSIZE,
                })
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(ClientError::Closed),
            Err(errno) => {
                return Err(ClientError::Io {
                    op: "sendmsg()",
                    errno,
                })
            }
        }
    }
    Err(ClientError::Io {
        op: "sendmsg()",
        errno: Errno::EINTR,
    })
}

fn receive(sock: &OwnedFd, path: &Path, timeout: Duration) -> Result<Reply, ClientError> {
    // One byte more than the largest valid record, so an oversized one shows.
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    for _ in 0..MAX_EINTR_RETRIES {
        let mut iov = [IoSliceMut::new(&mut buf)];
        // No control buffer: any descriptor graftd might attach is discarded by
        // the kernel instead of landing in our table.
        let r = socket::recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::MSG_CMSG_CLOEXEC)
            .map(|m| (m.bytes, m.flags));
        match r {
            Ok((0, _)) => return Err(ClientError::Closed),
            Ok((n, flags)) => {
                if flags.contains(MsgFlags::MSG_TRUNC) || n > MAX_MESSAGE {
                    return Err(ClientError::BadReply(format!(
                        "record longer than {MAX_MESSAGE} bytes"
                    )));
                }
                return control::decode_reply(&buf[..n])
                    .map_err(|e| ClientError::BadReply(e.to_string()));
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(ClientError::Timeout(path.to_owned(), timeout)),
            Err(Errno::ECONNRESET) => return Err(ClientError::Closed),
            Err(errno) => {
                return Err(ClientError::Io {
                    op: "recvmsg()",
                    errno,
                })
            }
        }
    }
    Err(ClientError::Io {
        op: "recvmsg()",
        errno: Errno::EINTR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_is_not_running() {
        let p = Path::new("/nonexistent-graft-dir/graftd.sock");
        let e = call(p, &Request::Show {}, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error: graftd is not running (no control socket at \
             /nonexistent-graft-dir/graftd.sock); start it with: graftd &  \
             (or: systemctl start graftd)"
        );
        assert_eq!(e.exit_code(), 1);
    }

    /// A one-shot fake graftd: accepts one connection, reads one request
    /// (returning its bytes and how many descriptors came with it), answers
    /// with `reply` (or hangs up when it is `None`).
    /// A SEQPACKET socket bound to a fresh path named for `tag`, listening
    /// when `listen`.
    fn bound_socket(tag: &str, listen: bool) -> (PathBuf, OwnedFd) {
        let path =
            std::env::temp_dir().join(format!("ip-graft-test-{}-{tag}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let l = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(l.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        if listen {
            socket::listen(&l, socket::Backlog::new(1).unwrap()).unwrap();
        }
        (path, l)
    }

    fn fake_graftd(
        tag: &str,
        reply: Option<Vec<u8>>,
    ) -> (PathBuf, std::thread::JoinHandle<(Vec<u8>, usize)>) {
        let (path, l) = bound_socket(tag, true);
        let h = std::thread::spawn(move || {
            let c = socket::accept(l.as_raw_fd()).unwrap();
            let mut buf = vec![0u8; MAX_MESSAGE + 1];
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let (n, fds) = {
                let m =
                    socket::recvmsg::<()>(c, &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
                let mut fds = vec![];
                for cm in m.cmsgs().unwrap() {
                    if let socket::ControlMessageOwned::ScmRights(v) = cm {
                        fds.extend(v);
                    }
                }
                (m.bytes, fds)
            };
            // Each received descriptor must be a network namespace.
            for fd in &fds {
                let t = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
                assert!(t.to_string_lossy().starts_with("net:["), "{t:?}");
                nix::unistd::close(*fd).unwrap();
            }
            if let Some(r) = reply {
                socket::send(c, &r, MsgFlags::empty()).unwrap();
            }
            nix::unistd::close(c).unwrap();
            (buf[..n].to_vec(), fds.len())
        });
        (path, h)
    }

    fn own_ns() -> OwnedFd {
        crate::netns::open_self().unwrap()
    }

    #[test]
    fn graftd_refusal_is_its_own_words() {
        let (p, h) = fake_graftd(
            "refuse",
            Some(
                br#"{"status":"error","errno":17,"message":"endpoint \"x\" exists\nin net:[1]"}"#
                    .to_vec(),
            ),
        );
        let ns = own_ns();
        let e = call(&p, &Request::Show {}, &[ns.as_fd()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error: graftd: endpoint \"x\" exists in net:[1]"
        );
        assert_eq!(e.exit_code(), 2);
        let (req, nfds) = h.join().unwrap();
        assert_eq!(req, br#"{"op":"show"}"#);
        assert_eq!(nfds, 1);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn two_namespaces_travel_with_add() {
        let (p, h) = fake_graftd(
            "add",
            Some(br#"{"status":"ok","netns":{"dev":1,"ino":2}}"#.to_vec()),
        );
        let (a, b) = (own_ns(), own_ns());
        let req: Request = control::decode_request(
            br#"{"op":"add","endpoint":{"name":"e","addr":{"type":"unix","path":"/x"},"netns":"1"},"target_fd":true}"#,
        )
        .unwrap();
        let ans = call(&p, &req, &[a.as_fd(), b.as_fd()]).unwrap();
        assert_eq!(ans.netns, NetnsId { dev: 1, ino: 2 });
        assert!(ans.endpoints.is_empty());
        let (got, nfds) = h.join().unwrap();
        assert_eq!(control::decode_request(&got).unwrap(), req);
        assert_eq!(nfds, 2);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn oversized_reply_is_rejected() {
        let (p, h) = fake_graftd("big", Some(vec![b' '; MAX_MESSAGE + 10]));
        let ns = own_ns();
        let e = call(&p, &Request::Show {}, &[ns.as_fd()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Error: graftd sent an invalid reply: record longer than {MAX_MESSAGE} bytes")
        );
        assert_eq!(e.exit_code(), 1);
        h.join().unwrap();
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn garbage_and_hangup() {
        let (p, h) = fake_graftd("junk", Some(b"{\"status\":".to_vec()));
        let ns = own_ns();
        let e = call(&p, &Request::Show {}, &[ns.as_fd()]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Error: graftd sent an invalid reply: invalid message"),
            "{e}"
        );
        h.join().unwrap();
        let _ = std::fs::remove_file(&p);

        let (p, h) = fake_graftd("hangup", None);
        let e = call(&p, &Request::Show {}, &[ns.as_fd()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Error: graftd closed the connection without answering (ip graft must run as root)"
        );
        h.join().unwrap();
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn stale_socket_file_is_not_running() {
        // Bound, then closed: the file stays, nobody listens.
        let (p, l) = bound_socket("stale", false);
        drop(l);
        let e = call(&p, &Request::Show {}, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Error: graftd is not running (nothing listens on {}); start it with: graftd &  (or: systemctl start graftd)",
                p.display()
            )
        );
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn silent_graftd_times_out() {
        // A listener that accepts (the kernel does, from its backlog) but
        // never answers.
        let (p, l) = bound_socket("silent", true);
        let t = Duration::from_millis(200);
        let e = call_with_timeout(&p, &Request::Show {}, &[], t).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Error: graftd at {} did not answer within 200ms",
                p.display()
            )
        );
        assert_eq!(e.exit_code(), 1);
        drop(l);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn control_chars_are_flattened() {
        assert_eq!(one_line("a\nb\r\n"), "a b");
    }
}
