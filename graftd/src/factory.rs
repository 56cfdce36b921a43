//! The socket factory: makes a socket in an endpoint's target namespace,
//! applies the carried options and binds it to the endpoint's address.
//!
//! A socket belongs to the network namespace of the thread that called
//! `socket()`. Sockets for graftd's own namespace are made directly by the
//! broker thread (which never leaves it); for any other target namespace one
//! [`TargetWorker`] thread joins it once and makes every socket for it,
//! receiving jobs over a channel. The worker lives as long as an endpoint
//! refers to it.

use std::io;
use std::net::{SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use graft_core::proto::broker::OptValue;
use graft_core::NetnsId;
use graft_seccomp::sockopt;
use nix::sched::CloneFlags;
use nix::sys::socket::{self as nsock, SockaddrIn, SockaddrIn6, UnixAddr};

use crate::sys;

/// Longest a broker waits for a worker to make one socket.
const JOB_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the new socket gets bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    V4(SocketAddrV4),
    V6(SocketAddrV6),
    Unix(PathBuf),
    /// Not bound: connected to a unix listener at this path (egress of an
    /// INET program onto a `type unix` endpoint).
    UnixConnect(PathBuf),
}

/// Everything needed to make one socket, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketParams {
    pub family: libc::c_int,
    pub sotype: libc::c_int,
    pub protocol: libc::c_int,
    /// Options to apply before bind, in request order.
    pub opts: Vec<OptValue>,
    pub bind: BindAddr,
    /// Leave the port to `connect()`: bind the address with
    /// IP_BIND_ADDRESS_NO_PORT, or not at all when it is the wildcard of the
    /// socket's own family (connect picks the address too). Only for sockets
    /// the eBPF bind guard covers: otherwise the holder could re-bind them.
    pub port_at_connect: bool,
    /// Read the bound address back (`Made::addr`); a batch's later sockets
    /// skip it, only the first one's goes into the reply.
    pub want_addr: bool,
}

/// A socket made and bound, with its bound address as raw sockaddr bytes.
#[derive(Debug)]
pub struct Made {
    pub fd: OwnedFd,
    pub addr: Vec<u8>,
}

/// What failed while making a socket.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    #[error("socket(): {0}")]
    Socket(io::Error),
    #[error("setsockopt(level {level}, option {name}): {err}")]
    Option {
        level: libc::c_int,
        name: libc::c_int,
        err: io::Error,
    },
    #[error("bind(): {0}")]
    Bind(io::Error),
    #[error("connect() to the endpoint's unix socket: {0}")]
    Connect(io::Error),
    #[error("getsockname(): {0}")]
    Name(io::Error),
    #[error("the worker of network namespace {0} is gone or did not answer")]
    Worker(NetnsId),
}

impl MakeError {
    pub fn errno(&self) -> libc::c_int {
        match self {
            MakeError::Socket(e)
            | MakeError::Option { err: e, .. }
            | MakeError::Bind(e)
            | MakeError::Connect(e)
            | MakeError::Name(e) => e.raw_os_error().unwrap_or(libc::EIO),
            MakeError::Worker(_) => libc::EAGAIN,
        }
    }

    /// The option at fault, if any.
    pub fn option(&self) -> Option<(libc::c_int, libc::c_int)> {
        match self {
            MakeError::Option { level, name, .. } => Some((*level, *name)),
            _ => None,
        }
    }
}

/// Longest graftd waits for a host unix listener to take a connection (a
/// full backlog); the broker thread serves everyone, so this stays short.
const UNIX_CONNECT_TIMEOUT_SECS: i64 = 1;

/// Mode of a unix socket file graftd binds for an endpoint: like a port on
/// the host's loopback, anyone who can reach the file may connect. Who can
/// reach it is decided by the directory the administrator puts it in.
pub const UNIX_SOCKET_MODE: u32 = 0o666;

/// Makes the socket in the calling thread's network namespace.
pub fn make_here(p: &SocketParams) -> Result<Made, MakeError> {
    let fd = sys::socket(p.family, p.sotype, p.protocol).map_err(MakeError::Socket)?;
    if let BindAddr::UnixConnect(path) = &p.bind {
        connect_unix(fd.as_fd(), path).map_err(MakeError::Connect)?;
    }
    for o in &p.opts {
        sockopt::set(fd.as_fd(), o.level, o.name, o.bytes()).map_err(|err| MakeError::Option {
            level: o.level,
            name: o.name,
            err,
        })?;
    }
    bind(fd.as_fd(), p).map_err(MakeError::Bind)?;
    let addr = if p.want_addr {
        sys::getsockname(fd.as_fd()).map_err(MakeError::Name)?
    } else {
        Vec::new()
    };
    Ok(Made { fd, addr })
}

/// Connects to the unix listener at `path`, waiting at most
/// [`UNIX_CONNECT_TIMEOUT_SECS`] for room in its backlog; the send timeout used
/// for that is cleared again (the carried options are applied after).
fn connect_unix(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    // struct timeval on the 64-bit targets graftd is built for.
    let tv = |secs: i64| [secs.to_ne_bytes(), 0i64.to_ne_bytes()].concat();
    sockopt::set(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        &tv(UNIX_CONNECT_TIMEOUT_SECS),
    )?;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    nsock::connect(fd.as_raw_fd(), &addr).map_err(io::Error::from)?;
    sockopt::set(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv(0))
}

fn bind(fd: BorrowedFd<'_>, p: &SocketParams) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    if p.port_at_connect {
        match &p.bind {
            BindAddr::V4(a) if a.port() == 0 && a.ip().is_unspecified() => return Ok(()),
            BindAddr::V6(a) if a.port() == 0 && a.ip().is_unspecified() => return Ok(()),
            _ => {}
        }
        let one: libc::c_int = 1;
        sockopt::set(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one.to_ne_bytes(),
        )?;
    }
    match &p.bind {
        BindAddr::UnixConnect(_) => Ok(()),
        BindAddr::V4(a) => nsock::bind(raw, &SockaddrIn::from(*a)).map_err(io::Error::from),
        BindAddr::V6(a) => nsock::bind(raw, &SockaddrIn6::from(*a)).map_err(io::Error::from),
        BindAddr::Unix(path) => {
            let addr = UnixAddr::new(path.as_path()).map_err(io::Error::from)?;
            match nsock::bind(raw, &addr) {
                Err(nix::errno::Errno::EADDRINUSE) if is_stale(path, p.sotype) => {
                    log::info!("removing stale unix socket {}", path.display());
                    std::fs::remove_file(path)?;
                    nsock::bind(raw, &addr).map_err(io::Error::from)?;
                }
                r => r.map_err(io::Error::from)?,
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(UNIX_SOCKET_MODE))
        }
    }
}

/// A leftover socket file whose owner is gone: it is a socket and connecting
/// to it is refused. A live listener (even one with a full backlog, which
/// gives EAGAIN on a non-blocking connect) or any other file is left alone.
fn is_stale(path: &std::path::Path, sotype: libc::c_int) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !md.file_type().is_socket() {
        return false;
    }
    let Ok(probe) = sys::socket(libc::AF_UNIX, sotype | libc::SOCK_NONBLOCK, 0) else {
        return false;
    };
    let Ok(addr) = UnixAddr::new(path) else {
        return false;
    };
    matches!(
        nsock::connect(probe.as_raw_fd(), &addr),
        Err(nix::errno::Errno::ECONNREFUSED)
    )
}

type Job = (SocketParams, mpsc::SyncSender<Result<Made, MakeError>>);

/// A thread living in one target network namespace, making sockets there.
/// Dropping the last reference closes the channel and the thread ends.
#[derive(Debug)]
pub struct TargetWorker {
    id: NetnsId,
    /// Keeps the namespace alive and identifiable while endpoints use it.
    _fd: OwnedFd,
    tx: mpsc::Sender<Job>,
}

impl TargetWorker {
    /// Starts a worker in the namespace `fd` (identity `id`), returning once it
    /// has joined it.
    pub fn spawn(fd: OwnedFd, id: NetnsId) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let enter = fd.try_clone()?;
        std::thread::Builder::new()
            .name(format!("factory {id}"))
            .spawn(move || {
                let r =
                    nix::sched::setns(&enter, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                drop(enter);
                let ok = r.is_ok();
                let _ = ready_tx.send(r);
                if !ok {
                    return;
                }
                // This thread now belongs to the target namespace for life.
                while let Ok((params, reply)) = rx.recv() {
                    let _ = reply.send(make_here(&params));
                }
                log::debug!("factory worker for {id} ends");
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(TargetWorker { id, _fd: fd, tx }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other(
                "factory worker died before joining its namespace",
            )),
        }
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    /// Makes a socket in this worker's namespace.
    pub fn make(&self, params: SocketParams) -> Result<Made, MakeError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.tx
            .send((params, rtx))
            .map_err(|_| MakeError::Worker(self.id))?;
        rrx.recv_timeout(JOB_TIMEOUT)
            .map_err(|_| MakeError::Worker(self.id))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn params(bind: BindAddr, family: libc::c_int) -> SocketParams {
        SocketParams {
            family,
            sotype: libc::SOCK_STREAM,
            protocol: 0,
            opts: vec![],
            bind,
            port_at_connect: false,
            want_addr: true,
        }
    }

    #[test]
    fn binds_loopback_dynamic_port() {
        let m = make_here(&params(
            BindAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            libc::AF_INET,
        ))
        .unwrap();
        assert_eq!(&m.addr[4..8], &[127, 0, 0, 1]);
        assert_ne!(
            u16::from_be_bytes([m.addr[2], m.addr[3]]),
            0,
            "port allocated at bind"
        );
    }

    #[test]
    fn port_at_connect_binds_the_address_only_and_skips_the_wildcard() {
        let mut p = params(
            BindAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            libc::AF_INET,
        );
        p.port_at_connect = true;
        let m = make_here(&p).unwrap();
        assert_eq!(&m.addr[2..8], &[0, 0, 127, 0, 0, 1], "address, no port");
        p.bind = BindAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        let m = make_here(&p).unwrap();
        assert_eq!(&m.addr[2..8], &[0; 6], "not bound");
        // A v4 wildcard on an AF_INET6 socket is still bound: unbound, the
        // socket could reach IPv6 destinations.
        p.family = libc::AF_INET6;
        p.bind = BindAddr::V6("[::ffff:0.0.0.0]:0".parse().unwrap());
        let m = make_here(&p).unwrap();
        assert_eq!(
            &m.addr[8..24],
            &Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets()
        );
    }

    /// A fresh directory for this test process and the (absent) socket
    /// path in it.
    fn sock_dir(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    #[test]
    fn unix_stale_socket_is_replaced_but_live_one_is_not() {
        let (dir, path) = sock_dir("graftd-factory");
        let p = params(BindAddr::Unix(path.clone()), libc::AF_UNIX);
        let live = make_here(&p).unwrap();
        nsock::listen(&live.fd, nsock::Backlog::new(4).unwrap()).unwrap();
        let e = make_here(&p).unwrap_err();
        assert_eq!(e.errno(), libc::EADDRINUSE);
        drop(live);
        // The file stays behind, nobody listens: stale.
        assert!(path.exists());
        let again = make_here(&p).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unix_listener_is_world_connectable_and_egress_is_connected() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, path) = sock_dir("graftd-factory-u");
        let l = make_here(&params(BindAddr::Unix(path.clone()), libc::AF_UNIX)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, UNIX_SOCKET_MODE);
        // Not listening yet: the egress connect is refused, and says so.
        let e = make_here(&params(BindAddr::UnixConnect(path.clone()), libc::AF_UNIX)).unwrap_err();
        assert!(matches!(e, MakeError::Connect(_)), "{e}");
        assert_eq!(e.errno(), libc::ECONNREFUSED);
        nsock::listen(&l.fd, nsock::Backlog::new(4).unwrap()).unwrap();
        let c = make_here(&params(BindAddr::UnixConnect(path.clone()), libc::AF_UNIX)).unwrap();
        assert_eq!(c.addr.len(), 2, "an unnamed unix socket: family only");
        let peer = nsock::accept(l.fd.as_raw_fd()).unwrap();
        nix::unistd::close(peer).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn worker_makes_sockets_in_its_namespace() {
        let (fd, id) = crate::netns::open_own().unwrap();
        let w = TargetWorker::spawn(fd, id).unwrap();
        let m = w
            .make(params(
                BindAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
                libc::AF_INET,
            ))
            .unwrap();
        assert_eq!(&m.addr[4..8], &[127, 0, 0, 1]);
    }
}
