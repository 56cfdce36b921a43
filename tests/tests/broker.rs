//! graftd end to end, without ip-graft or the preload library: a tiny control
//! client (SOCK_SEQPACKET + SCM_RIGHTS) defines endpoints, and a raw broker
//! client, connected from a thread that entered the test's namespace, asks
//! for sockets and checks what comes back: the bytes of the reply, the
//! descriptor, the namespace the socket lives in, and that graftd keeps
//! serving after every kind of bad input.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graft_core::proto::broker::{self as bp, Op, Purpose, Reason};
use graft_core::proto::control::{self, Reply, Request};
use graft_core::{EndpointAddr, EndpointName, EndpointSpec, NetnsId};
use graft_tests::{bin, graftd_and_netns, root_or_skip, unique, wait_until, Graftd, Netns};
use nix::errno::Errno;
use nix::sys::socket::{
    connect, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;

const LIMIT: Duration = Duration::from_secs(10);
const SO_NETNS_COOKIE: libc::c_int = 71;

// ---------------------------------------------------------------- helpers

/// The network namespace descriptor of `ns`, or of the test itself.
fn ns_fd(ns: Option<&Netns>) -> OwnedFd {
    let p = match ns {
        Some(ns) => ns.path(),
        None => "/proc/self/ns/net".into(),
    };
    std::fs::File::open(&p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
        .into()
}

fn seqpacket() -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(LIMIT.as_secs() as i64, 0),
    )
    .expect("SO_RCVTIMEO");
    fd
}

fn send_with_fds(conn: &OwnedFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> nix::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// Receives one record (with at most one descriptor); `None` when the peer
/// closed the connection. Panics when nothing arrives within LIMIT.
fn recv_record(conn: &OwnedFd, max: usize) -> Option<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; max + 1];
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = match recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    ) {
        Ok(m) => m,
        Err(Errno::ECONNRESET) => return None,
        Err(Errno::EAGAIN) => panic!("no reply within {LIMIT:?}"),
        Err(e) => panic!("recvmsg: {e}"),
    };
    let n = msg.bytes;
    let mut fds = Vec::new();
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(r) = c {
            fds.extend(r);
        }
    }
    assert!(
        fds.len() <= 1,
        "at most one descriptor per reply, got {}",
        fds.len()
    );
    // SAFETY: the kernel just installed this descriptor for us and nothing
    // else refers to it.
    let fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
    if n == 0 {
        return None;
    }
    Some((buf[..n].to_vec(), fd))
}

/// One control request with the given descriptors; the raw reply.
fn ctl_raw(d: &Graftd, data: &[u8], fds: &[BorrowedFd<'_>]) -> Reply {
    let conn = seqpacket();
    connect(conn.as_raw_fd(), &UnixAddr::new(&d.control).expect("addr"))
        .expect("connect control socket");
    send_with_fds(&conn, data, fds).expect("send control request");
    let (b, fd) = recv_record(&conn, control::MAX_MESSAGE).expect("control reply");
    assert!(fd.is_none(), "control replies carry no descriptor");
    control::decode_reply(&b).expect("control reply decodes")
}

/// A control request as `ip graft` would send it from namespace `ns`.
fn ctl(d: &Graftd, ns: Option<&Netns>, req: &Request, target: Option<&OwnedFd>) -> Reply {
    let me = ns_fd(ns);
    let mut fds = vec![me.as_fd()];
    if let Some(t) = target {
        fds.push(t.as_fd());
    }
    ctl_raw(d, &control::encode(req), &fds)
}

fn spec(name: &str, addr: EndpointAddr) -> EndpointSpec {
    EndpointSpec {
        name: EndpointName::new(name).unwrap(),
        addr,
        netns: None,
        policy: vec![],
        limit: None,
    }
}

fn v4(addr: &str, port: Option<u16>) -> EndpointAddr {
    EndpointAddr::Ipv4 {
        addr: addr.parse().unwrap(),
        port,
    }
}

fn add_ok(d: &Graftd, ns: &Netns, name: &str, addr: EndpointAddr) -> NetnsId {
    match ctl(
        d,
        Some(ns),
        &Request::Add {
            endpoint: spec(name, addr),
            target_fd: false,
        },
        None,
    ) {
        Reply::Ok { netns, .. } => netns,
        r => panic!("add {name}: {r:?}\n{}", d.log_text()),
    }
}

fn expect_err(r: Reply, errno: i32, text: &str) {
    match r {
        Reply::Error(e) => {
            assert_eq!(e.errno, errno, "errno of {e:?}");
            assert!(
                e.message.contains(text),
                "{:?} should contain {text:?}",
                e.message
            );
        }
        r => panic!("expected error {errno} ({text}), got {r:?}"),
    }
}

/// Runs `f` on a thread that joined `ns`; the thread ends with `f`.
fn in_netns<R: Send>(ns: &Netns, f: impl FnOnce() -> R + Send) -> R {
    let fd = ns_fd(Some(ns));
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            drop(fd);
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// Connects to graftd's broker of `ns` (from inside `ns`).
fn broker_connect(d: &Graftd, ns: &Netns) -> nix::Result<OwnedFd> {
    let name = d.broker.clone();
    in_netns(ns, move || {
        let conn = seqpacket();
        connect(conn.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
        Ok(conn)
    })
}

fn encode(req: &bp::Request) -> Vec<u8> {
    let mut b = [0u8; bp::REQUEST_LEN];
    req.encode(&mut b);
    b.to_vec()
}

/// Sends raw bytes to the broker; the decoded reply, or `None` if graftd
/// closed the connection.
fn broker_raw(conn: &OwnedFd, data: &[u8]) -> Option<(bp::Reply, Option<OwnedFd>)> {
    match send_with_fds(conn, data, &[]) {
        Ok(_) => {}
        Err(Errno::EPIPE | Errno::ECONNRESET) => return None,
        Err(e) => panic!("send to broker: {e}"),
    }
    let (b, fd) = recv_record(conn, bp::REPLY_LEN)?;
    assert_eq!(b.len(), bp::REPLY_LEN, "reply size");
    Some((bp::Reply::decode(&b).expect("reply decodes"), fd))
}

fn broker(conn: &OwnedFd, req: &bp::Request) -> (bp::Reply, Option<OwnedFd>) {
    broker_raw(conn, &encode(req)).expect("broker closed the connection")
}

fn sock_req(name: &str, family: i32, sotype: i32) -> bp::Request {
    bp::Request::new(
        Op::Socket,
        EndpointName::new(name).unwrap(),
        family,
        sotype,
        0,
        Purpose::Ingress,
    )
}

fn int(v: i32) -> [u8; 4] {
    v.to_ne_bytes()
}

fn netns_cookie(fd: BorrowedFd<'_>) -> u64 {
    // The kernel writes the cookie as 8 native-endian bytes.
    let mut raw = [0u8; 8];
    let mut len = raw.len() as libc::socklen_t;
    let (level, opt, buf) = (libc::SOL_SOCKET, SO_NETNS_COOKIE, raw.as_mut_ptr());
    // SAFETY: buf points to len writable bytes.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, buf.cast(), &mut len) };
    let err = std::io::Error::last_os_error();
    assert_eq!(rc, 0, "SO_NETNS_COOKIE: {err}");
    u64::from_ne_bytes(raw)
}

fn cookie_of_new_socket() -> u64 {
    // Any socket of this namespace; binding to the wildcard needs no address.
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("a socket here");
    netns_cookie(s.as_fd())
}

/// A raw sockaddr_in/sockaddr_in6 from a reply, as a SocketAddr.
fn inet_addr(b: &[u8]) -> SocketAddr {
    let fam = u16::from_ne_bytes([b[0], b[1]]) as i32;
    let port = u16::from_be_bytes([b[2], b[3]]);
    match fam {
        libc::AF_INET => SocketAddr::from((Ipv4Addr::new(b[4], b[5], b[6], b[7]), port)),
        libc::AF_INET6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            SocketAddr::from((std::net::Ipv6Addr::from(a), port))
        }
        f => panic!("unexpected family {f}"),
    }
}

fn show(d: &Graftd, ns: &Netns) -> Vec<control::EndpointInfo> {
    match ctl(d, Some(ns), &Request::Show {}, None) {
        Reply::Ok { endpoints, .. } => endpoints,
        r => panic!("show: {r:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn socket_from_broker_lives_in_host_namespace() {
    let Some((d, [c1])) = graftd_and_netns("socket_from_broker_lives_in_host_namespace", ["c1"])
    else {
        return;
    };
    add_ok(&d, &c1, "ep-in4", v4("127.0.0.1", None));

    // Inside c1: connect to the broker, get the socket, listen on it.
    let conn = broker_connect(&d, &c1).expect("broker of c1");
    let (fd, bound, c1_cookie) = in_netns(&c1, || {
        let mut req = sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM);
        assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        let (reply, fd) = broker(&conn, &req);
        assert_eq!((reply.errno, reply.reason), (0, Reason::None), "{reply:?}");
        let fd = fd.expect("a socket comes with the reply");
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(8).unwrap()).expect("listen");
        (fd, inet_addr(reply.addr_bytes()), cookie_of_new_socket())
    });
    assert_eq!(bound.ip(), std::net::IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(bound.port(), 0, "graftd binds fully (port chosen at bind)");
    // The reply's address is the socket's own.
    let listener = TcpListener::from(fd);
    assert_eq!(listener.local_addr().unwrap(), bound);

    // The socket is a host socket: same netns cookie as one made here, not c1's.
    let host_cookie = cookie_of_new_socket();
    assert_ne!(host_cookie, c1_cookie);
    assert_eq!(netns_cookie(listener.as_fd()), host_cookie);

    // A client in the host namespace reaches it; bytes flow both ways.
    let mut client = TcpStream::connect_timeout(&bound, LIMIT).expect("connect from the host");
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let (mut server, peer) = listener.accept().expect("accept");
    server.set_read_timeout(Some(LIMIT)).unwrap();
    assert_eq!(peer, client.local_addr().unwrap());
    client.write_all(b"ping from host").unwrap();
    let mut b = [0u8; 14];
    server.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping from host");
    server.write_all(b"pong from c1").unwrap();
    let mut b = [0u8; 12];
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong from c1");

    // Many requests on one connection; counters follow.
    let (r, fd2) = broker(&conn, &sock_req("ep-in4", libc::AF_INET, libc::SOCK_DGRAM));
    assert_eq!(r.errno, 0);
    assert!(fd2.is_some());
    let eps = show(&d, &c1);
    assert_eq!(eps.len(), 1);
    assert_eq!((eps[0].stats.sockets, eps[0].stats.refused), (2, 0));
}

#[test]
fn families_lookup_target_netns_and_unix() {
    let Some((d, [c1, tgt])) =
        graftd_and_netns("families_lookup_target_netns_and_unix", ["fam", "tgt"])
    else {
        return;
    };
    add_ok(&d, &c1, "ep-in4", v4("127.0.0.1", None));
    add_ok(
        &d,
        &c1,
        "ep-in6",
        EndpointAddr::Ipv6 {
            addr: "::1".parse().unwrap(),
            port: None,
        },
    );
    let conn = broker_connect(&d, &c1).unwrap();

    // AF_INET6 socket for an ipv4 endpoint: bound to the v4-mapped address.
    let (r, fd) = broker(
        &conn,
        &sock_req("ep-in4", libc::AF_INET6, libc::SOCK_STREAM),
    );
    assert_eq!(r.errno, 0, "{r:?}");
    assert!(fd.is_some());
    assert_eq!(
        inet_addr(r.addr_bytes()).ip().to_string(),
        "::ffff:127.0.0.1"
    );
    // ... unless the application asked for IPV6_V6ONLY.
    let mut req = sock_req("ep-in4", libc::AF_INET6, libc::SOCK_STREAM);
    assert!(req.push_opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &int(1)));
    let (r, fd) = broker(&conn, &req);
    assert_eq!(
        (r.errno, r.reason, fd.is_none()),
        (libc::EAFNOSUPPORT, Reason::FamilyMismatch, true)
    );
    // AF_INET for an ipv6 endpoint: refused.
    let (r, fd) = broker(&conn, &sock_req("ep-in6", libc::AF_INET, libc::SOCK_STREAM));
    assert_eq!(
        (r.errno, r.reason, fd.is_none()),
        (libc::EAFNOSUPPORT, Reason::FamilyMismatch, true)
    );
    let (r, _) = broker(&conn, &sock_req("ep-in6", libc::AF_INET6, libc::SOCK_DGRAM));
    assert_eq!(inet_addr(r.addr_bytes()).ip().to_string(), "::1");

    // Lookup: the configured address, no descriptor.
    let mut l = sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM);
    l.op = Op::Lookup;
    let (r, fd) = broker(&conn, &l);
    assert_eq!((r.op, r.errno, fd.is_none()), (Op::Lookup, 0, true));
    assert_eq!(inet_addr(r.addr_bytes()), "127.0.0.1:0".parse().unwrap());

    // An endpoint whose target is another namespace: the socket lives there.
    let tfd = ns_fd(Some(&tgt));
    let r = ctl(
        &d,
        Some(&c1),
        &Request::Add {
            endpoint: spec("ep-tgt", v4("127.0.0.1", None)),
            target_fd: true,
        },
        Some(&tfd),
    );
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    let (r, fd) = broker(&conn, &sock_req("ep-tgt", libc::AF_INET, libc::SOCK_STREAM));
    assert_eq!(r.errno, 0, "{r:?}");
    let tgt_cookie = in_netns(&tgt, cookie_of_new_socket);
    assert_eq!(netns_cookie(fd.unwrap().as_fd()), tgt_cookie);
    let eps = show(&d, &c1);
    let t = eps
        .iter()
        .find(|e| e.spec.name.as_str() == "ep-tgt")
        .unwrap();
    assert_eq!(t.target_netns, NetnsId::of_fd(tfd.as_fd()).unwrap());

    // Unix endpoint: bound at the path; a stale socket file is replaced, a
    // live one is not.
    let dir = std::env::temp_dir().join(unique("graft-unix-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ep.sock");
    add_ok(
        &d,
        &c1,
        "ep-unix",
        EndpointAddr::Unix { path: path.clone() },
    );
    let (r, fd) = broker(
        &conn,
        &sock_req("ep-unix", libc::AF_UNIX, libc::SOCK_STREAM),
    );
    assert_eq!(r.errno, 0, "{r:?}");
    let fd = fd.unwrap();
    let a = r.addr_bytes();
    assert_eq!(u16::from_ne_bytes([a[0], a[1]]) as i32, libc::AF_UNIX);
    assert!(a[2..].starts_with(path.to_str().unwrap().as_bytes()));
    nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(4).unwrap()).unwrap();
    let (r, _) = broker(
        &conn,
        &sock_req("ep-unix", libc::AF_UNIX, libc::SOCK_STREAM),
    );
    assert_eq!(
        (r.errno, r.reason),
        (libc::EADDRINUSE, Reason::SocketFailed)
    );
    drop(fd);
    assert!(
        Path::new(&path).exists(),
        "the old socket file is left behind"
    );
    let (r, fd) = broker(
        &conn,
        &sock_req("ep-unix", libc::AF_UNIX, libc::SOCK_STREAM),
    );
    assert_eq!(r.errno, 0, "stale socket replaced: {r:?}");
    drop(fd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_broker_requests_are_answered_and_service_continues() {
    let Some((mut d, [c1])) = graftd_and_netns(
        "malformed_broker_requests_are_answered_and_service_continues",
        ["bad"],
    ) else {
        return;
    };
    add_ok(&d, &c1, "ep-in4", v4("127.0.0.1", None));
    let good = encode(&sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM));

    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let mut bad_name = good.clone();
    bad_name[8] = b' ';
    let mut many_opts = good.clone();
    many_opts[38] = 200;
    let mut padding = good.clone();
    padding[bp::REQUEST_LEN - 3] = 0x5a;
    let mut bad_version = good.clone();
    bad_version[4] = 9;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..10].to_vec()),
        ("oversized", [good.clone(), vec![0u8; 100]].concat()),
        ("bad magic", bad_magic),
        ("bad name", bad_name),
        ("200 options", many_opts),
        ("garbage padding", padding),
        ("bad version", bad_version),
        ("one byte", vec![1]),
    ];
    for (what, bytes) in &cases {
        let conn = broker_connect(&d, &c1).unwrap();
        // graftd answers (it could also close; it chooses to answer and
        // keep the connection).
        let (r, fd) = broker_raw(&conn, bytes).expect("an answer to a malformed record");
        assert_eq!(
            (r.errno, r.reason),
            (libc::EINVAL, Reason::Malformed),
            "{what}"
        );
        assert!(fd.is_none(), "{what}");
        // The same connection goes on serving.
        let (r, fd) = broker_raw(&conn, &good).expect("connection kept");
        assert_eq!(r.errno, 0, "{what}: valid request after it");
        assert!(fd.is_some());
        // And a new connection is served.
        let conn = broker_connect(&d, &c1).unwrap();
        let (r, fd) = broker_raw(&conn, &good).expect("served");
        assert_eq!(r.errno, 0, "{what}: new connection after it");
        assert!(fd.is_some());
    }

    // Random damage to a valid record, and random records: every one gets a
    // well-formed reply (a socket only with success), and nothing breaks.
    let conn = broker_connect(&d, &c1).unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..300 {
        let rec = if i % 3 == 0 {
            let n = 1 + (rnd() as usize) % (bp::REQUEST_LEN + 64);
            (0..n).map(|_| rnd() as u8).collect::<Vec<u8>>()
        } else {
            let mut b = good.clone();
            for _ in 0..1 + rnd() % 4 {
                let at = (rnd() as usize) % b.len();
                b[at] = rnd() as u8;
            }
            b
        };
        let (r, fd) = broker_raw(&conn, &rec).expect("an answer to every record");
        assert_eq!(fd.is_some(), r.errno == 0, "record {i}: {r:?}");
    }
    let (r, fd) = broker_raw(&conn, &good).expect("served");
    assert_eq!((r.errno, fd.is_some()), (0, true));

    // A request carrying a descriptor is malformed too (and the descriptor
    // is not kept).
    let conn = broker_connect(&d, &c1).unwrap();
    let extra = ns_fd(None);
    send_with_fds(&conn, &good, &[extra.as_fd()]).unwrap();
    let (b, fd) = recv_record(&conn, bp::REPLY_LEN).unwrap();
    let r = bp::Reply::decode(&b).unwrap();
    assert_eq!(
        (r.errno, r.reason, fd.is_none()),
        (libc::EINVAL, Reason::Malformed, true)
    );

    // Several clients at once, one of them idle and never reading.
    let idle = broker_connect(&d, &c1).unwrap();
    send_with_fds(&idle, &good, &[]).unwrap();
    let conns: Vec<_> = (0..8).map(|_| broker_connect(&d, &c1).unwrap()).collect();
    for c in &conns {
        assert_eq!(
            broker(c, &sock_req("ep-in4", libc::AF_INET, libc::SOCK_DGRAM))
                .0
                .errno,
            0
        );
    }
    drop(idle);
    assert!(d.alive(), "graftd died:\n{}", d.log_text());
}

#[test]
fn malformed_control_requests_are_answered_and_service_continues() {
    if !root_or_skip("malformed_control_requests_are_answered_and_service_continues") {
        return;
    }
    let mut d = Graftd::start();
    let me = ns_fd(None);
    let ping = control::encode(&Request::Ping {});
    let fine = |d: &Graftd| match ctl_raw(d, &ping, &[me.as_fd()]) {
        Reply::Ok { netns, .. } => assert_eq!(netns, NetnsId::of_fd(me.as_fd()).unwrap()),
        r => panic!("ping: {r:?}"),
    };
    fine(&d);
    expect_err(
        ctl_raw(&d, b"{not json", &[me.as_fd()]),
        libc::EINVAL,
        "invalid message",
    );
    fine(&d);
    expect_err(
        ctl_raw(&d, &ping, &[]),
        libc::EINVAL,
        "no network namespace descriptor",
    );
    fine(&d);
    let big = vec![b' '; 70 * 1024];
    expect_err(
        ctl_raw(&d, &big, &[me.as_fd()]),
        libc::EMSGSIZE,
        "exceeds 65536",
    );
    fine(&d);
    expect_err(
        ctl_raw(&d, br#"{"op":"reboot"}"#, &[me.as_fd()]),
        libc::EINVAL,
        "invalid message",
    );
    fine(&d);
    // A first descriptor that is not a network namespace.
    let devnull: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    expect_err(
        ctl_raw(&d, &ping, &[devnull.as_fd()]),
        libc::EINVAL,
        "not a network namespace",
    );
    let uts: OwnedFd = std::fs::File::open("/proc/self/ns/uts").unwrap().into();
    expect_err(
        ctl_raw(&d, &ping, &[uts.as_fd()]),
        libc::EINVAL,
        "not a network namespace",
    );
    // add with target_fd but no second descriptor, or a bad one.
    let add = control::encode(&Request::Add {
        endpoint: spec("ep-x", v4("127.0.0.1", None)),
        target_fd: true,
    });
    expect_err(
        ctl_raw(&d, &add, &[me.as_fd()]),
        libc::EINVAL,
        "no target namespace descriptor",
    );
    expect_err(
        ctl_raw(&d, &add, &[me.as_fd(), devnull.as_fd()]),
        libc::EINVAL,
        "not a network namespace",
    );
    // A unix endpoint with a relative path.
    let add = control::encode(&Request::Add {
        endpoint: spec("ep-u", EndpointAddr::Unix { path: "rel".into() }),
        target_fd: false,
    });
    expect_err(
        ctl_raw(&d, &add, &[me.as_fd()]),
        libc::EINVAL,
        "must be absolute",
    );
    // Extra descriptors are closed, the request is served.
    let r = ctl_raw(&d, &ping, &[me.as_fd(), devnull.as_fd(), uts.as_fd()]);
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    fine(&d);
    assert!(d.alive());
}

#[test]
fn escaping_options_are_refused() {
    let Some((d, [c1])) = graftd_and_netns("escaping_options_are_refused", ["opt"]) else {
        return;
    };
    add_ok(&d, &c1, "ep-in4", v4("127.0.0.1", None));
    let conn = broker_connect(&d, &c1).unwrap();
    let refused: Vec<(&str, i32, i32, Vec<u8>)> = vec![
        (
            "SO_BINDTODEVICE",
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            b"lo\0".to_vec(),
        ),
        (
            "IP_TRANSPARENT",
            libc::IPPROTO_IP,
            libc::IP_TRANSPARENT,
            int(1).to_vec(),
        ),
        (
            "IP_FREEBIND",
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            int(1).to_vec(),
        ),
        ("SO_MARK", libc::SOL_SOCKET, libc::SO_MARK, int(7).to_vec()),
        ("unknown option", libc::SOL_SOCKET, 4242, int(1).to_vec()),
    ];
    for (what, level, name, value) in &refused {
        let mut req = sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM);
        assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
        assert!(req.push_opt(*level, *name, value));
        let (r, fd) = broker(&conn, &req);
        assert_eq!(
            (r.errno, r.reason, r.opt_level, r.opt_name),
            (libc::EPERM, Reason::OptionRefused, *level, *name),
            "{what}"
        );
        assert!(fd.is_none(), "{what}: no socket");
    }
    // A carried option is applied before bind.
    let mut req = sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM);
    assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &int(1)));
    assert!(req.push_opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, &int(1)));
    let (r, fd) = broker(&conn, &req);
    assert_eq!(r.errno, 0, "{r:?}");
    let fd = fd.unwrap();
    assert!(nix::sys::socket::getsockopt(&fd, sockopt::ReuseAddr).unwrap());
    assert!(nix::sys::socket::getsockopt(&fd, sockopt::TcpNoDelay).unwrap());
    // A value of the wrong size is malformed.
    let mut req = sock_req("ep-in4", libc::AF_INET, libc::SOCK_STREAM);
    assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &[1, 0]));
    let (r, _) = broker(&conn, &req);
    assert_eq!((r.errno, r.reason), (libc::EINVAL, Reason::Malformed));
    let eps = show(&d, &c1);
    assert_eq!((eps[0].stats.sockets, eps[0].stats.refused), (1, 6));
    assert!(
        d.log_text().contains("SO_BINDTODEVICE"),
        "refusals are logged by name"
    );
}

#[test]
fn namespaces_only_see_their_own_endpoints() {
    let Some((d, [a, b, none])) = graftd_and_netns(
        "namespaces_only_see_their_own_endpoints",
        ["a", "b", "none"],
    ) else {
        return;
    };
    add_ok(&d, &a, "ep-a", v4("127.0.0.1", None));
    add_ok(&d, &b, "ep-b", v4("127.0.0.1", None));
    // Same name in both: each namespace has its own.
    add_ok(&d, &a, "ep-same", v4("127.0.0.1", None));
    add_ok(&d, &b, "ep-same", v4("127.0.0.2", None));

    let conn_a = broker_connect(&d, &a).unwrap();
    let (r, fd) = broker(&conn_a, &sock_req("ep-b", libc::AF_INET, libc::SOCK_STREAM));
    assert_eq!(
        (r.errno, r.reason, fd.is_none()),
        (libc::EADDRNOTAVAIL, Reason::NoEndpoint, true)
    );
    let mut l = sock_req("ep-b", libc::AF_INET, libc::SOCK_STREAM);
    l.op = Op::Lookup;
    let (r, _) = broker(&conn_a, &l);
    assert_eq!((r.errno, r.reason), (libc::ENOENT, Reason::NoEndpoint));
    let (r, _) = broker(&conn_a, &sock_req("ep-a", libc::AF_INET, libc::SOCK_STREAM));
    assert_eq!(r.errno, 0);
    let (r, _) = broker(
        &conn_a,
        &sock_req("ep-same", libc::AF_INET, libc::SOCK_DGRAM),
    );
    assert_eq!(inet_addr(r.addr_bytes()).ip().to_string(), "127.0.0.1");
    let conn_b = broker_connect(&d, &b).unwrap();
    let (r, _) = broker(
        &conn_b,
        &sock_req("ep-same", libc::AF_INET, libc::SOCK_DGRAM),
    );
    assert_eq!(inet_addr(r.addr_bytes()).ip().to_string(), "127.0.0.2");

    // show lists each namespace's own endpoints only.
    let names = |ns| {
        show(&d, ns)
            .iter()
            .map(|e| e.spec.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&a), ["ep-a", "ep-same"]);
    assert_eq!(names(&b), ["ep-b", "ep-same"]);
    assert!(names(&none).is_empty());

    // A namespace without endpoints has no broker.
    assert_eq!(broker_connect(&d, &none).unwrap_err(), Errno::ECONNREFUSED);
    // Neither does one whose last endpoint was removed.
    for n in ["ep-b", "ep-same"] {
        let r = ctl(
            &d,
            Some(&b),
            &Request::Del {
                name: EndpointName::new(n).unwrap(),
            },
            None,
        );
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    }
    assert_eq!(broker_connect(&d, &b).unwrap_err(), Errno::ECONNREFUSED);
    assert!(broker_raw(
        &conn_b,
        &encode(&sock_req("ep-same", libc::AF_INET, libc::SOCK_DGRAM))
    )
    .is_none());
    // A still works.
    let (r, _) = broker(&conn_a, &sock_req("ep-a", libc::AF_INET, libc::SOCK_STREAM));
    assert_eq!(r.errno, 0);
}

#[test]
fn duplicate_add_and_del() {
    let Some((d, [c1])) = graftd_and_netns("duplicate_add_and_del", ["dup"]) else {
        return;
    };
    add_ok(&d, &c1, "ep-in4", v4("127.0.0.1", Some(8080)));
    let add = Request::Add {
        endpoint: spec("ep-in4", v4("127.0.0.1", Some(9090))),
        target_fd: false,
    };
    expect_err(
        ctl(&d, Some(&c1), &add, None),
        libc::EEXIST,
        "endpoint ep-in4 already exists",
    );
    let del = Request::Del {
        name: EndpointName::new("ep-in4").unwrap(),
    };
    assert!(matches!(ctl(&d, Some(&c1), &del, None), Reply::Ok { .. }));
    expect_err(
        ctl(&d, Some(&c1), &del, None),
        libc::ENOENT,
        "endpoint ep-in4 does not exist",
    );
    assert!(matches!(ctl(&d, Some(&c1), &add, None), Reply::Ok { .. }));
    let eps = show(&d, &c1);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].spec.addr, v4("127.0.0.1", Some(9090)));

    // Removing the last endpoint closes the broker; adding one right after
    // opens it again under the same name, every time.
    for i in 0..20 {
        assert!(
            matches!(ctl(&d, Some(&c1), &del, None), Reply::Ok { .. }),
            "del {i}"
        );
        let r = ctl(&d, Some(&c1), &add, None);
        assert!(matches!(r, Reply::Ok { .. }), "re-add {i}: {r:?}");
    }
    let conn = broker_connect(&d, &c1).expect("broker after re-adding");
    let (r, _) = broker(&conn, &sock_req("ep-in4", libc::AF_INET, libc::SOCK_DGRAM));
    assert_eq!(inet_addr(r.addr_bytes()), "127.0.0.1:9090".parse().unwrap());
}

#[test]
fn unused_namespace_is_forgotten() {
    let Some((d, [g, keep])) = graftd_and_netns("unused_namespace_is_forgotten", ["gc", "keep"])
    else {
        return;
    };
    add_ok(&d, &g, "ep-gone", v4("127.0.0.1", None));
    let keep_id = add_ok(&d, &keep, "ep-kept", v4("127.0.0.1", None));
    // Endpoints whose sockets are made in g itself and in another namespace:
    // graftd then has factory threads in both, which must not keep g alive
    // and must go away with g's endpoints.
    let tgt = Netns::new("gct");
    for (name, t) in [("ep-self", &g), ("ep-tgt", &tgt)] {
        let tfd = ns_fd(Some(t));
        let r = ctl(
            &d,
            Some(&g),
            &Request::Add {
                endpoint: spec(name, v4("127.0.0.1", None)),
                target_fd: true,
            },
            Some(&tfd),
        );
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    }
    let conn = broker_connect(&d, &g).unwrap();
    for name in ["ep-gone", "ep-self", "ep-tgt"] {
        let (r, _) = broker(&conn, &sock_req(name, libc::AF_INET, libc::SOCK_STREAM));
        assert_eq!(r.errno, 0, "{name}");
    }
    let id = NetnsId::of_fd(ns_fd(Some(&g)).as_fd()).unwrap();
    let tgt_id = NetnsId::of_fd(ns_fd(Some(&tgt)).as_fd()).unwrap();
    let graftd_threads_in = |ns: NetnsId| -> usize {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir(format!("/proc/{}/task", d.proc.pid()))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|t| std::fs::metadata(t.path().join("ns/net")).ok())
                    .filter(|m| m.dev() == ns.dev && m.ino() == ns.ino)
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(graftd_threads_in(id), 1, "one factory thread in g");
    assert_eq!(
        graftd_threads_in(tgt_id),
        1,
        "one factory thread in the target"
    );

    graft_tests::run_ok("ip", ["netns", "del", &g.name]);
    let line = format!("forgot network namespace {id}");
    wait_until("graftd to forget the deleted namespace", LIMIT, || {
        d.log_text().contains(&line)
    });
    // Its broker is gone: the open connection is closed.
    assert!(
        broker_raw(
            &conn,
            &encode(&sock_req("ep-gone", libc::AF_INET, libc::SOCK_STREAM))
        )
        .is_none(),
        "broker of a forgotten namespace still answers"
    );
    assert_eq!(
        d.log_text().matches(&line).count(),
        1,
        "one line per forgotten namespace"
    );
    // Its factory threads end with its endpoints.
    wait_until("graftd's factory threads to end", LIMIT, || {
        graftd_threads_in(id) == 0 && graftd_threads_in(tgt_id) == 0
    });
    // The namespace that still exists is kept.
    assert!(!d
        .log_text()
        .contains(&format!("forgot network namespace {keep_id}")));
    let (r, _) = broker(
        &broker_connect(&d, &keep).unwrap(),
        &sock_req("ep-kept", libc::AF_INET, libc::SOCK_STREAM),
    );
    assert_eq!(r.errno, 0);
}

#[test]
fn daemon_lifecycle() {
    if !root_or_skip("daemon_lifecycle") {
        return;
    }
    let mut d = Graftd::start();
    // The control socket is root-only.
    let md = std::fs::metadata(&d.control).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    // A second daemon on the same path refuses to start, in one line.
    let out = Command::new(bin("graftd"))
        .arg("--control")
        .arg(&d.control)
        .arg("--broker-name")
        .arg(unique("graft-test/"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by a running graftd"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(d.alive());
    // Bad usage: exit status 2.
    let out = Command::new(bin("graftd")).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // SIGTERM: clean exit, socket removed.
    d.proc.term();
    let start = Instant::now();
    let st = loop {
        if let Some(st) = d.proc.child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < LIMIT, "graftd ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(st.success(), "{st}");
    assert!(!d.control.exists(), "control socket removed at exit");
    // A stale socket file is replaced at the next start.
    let stale = std::os::unix::net::UnixListener::bind(&d.control).unwrap();
    drop(stale);
    assert!(d.control.exists());
    let mut again = Command::new(bin("graftd"));
    again
        .arg("--control")
        .arg(&d.control)
        .arg("--broker-name")
        .arg(unique("graft-test/"))
        .arg("--state-dir")
        .arg(d.dir.join("state-again"))
        .arg("--no-ebpf")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut p = graft_tests::Proc::spawn(again, "graftd on a stale path");
    let me = ns_fd(None);
    wait_until("graftd on a stale socket path to answer", LIMIT, || {
        let conn = seqpacket();
        connect(conn.as_raw_fd(), &UnixAddr::new(&d.control).unwrap()).is_ok()
            && send_with_fds(&conn, &control::encode(&Request::Ping {}), &[me.as_fd()]).is_ok()
            && recv_record(&conn, control::MAX_MESSAGE).is_some()
    });
    p.term();
    assert!(p.wait_timeout(LIMIT).success());
}

#[test]
fn non_root_callers_are_refused() {
    if !root_or_skip("non_root_callers_are_refused") {
        return;
    }
    let python = Path::new("/usr/bin/python3");
    if !python.exists() || graft_tests::which("setpriv").is_none() {
        println!("SKIP: non_root_callers_are_refused: needs /usr/bin/python3 and setpriv");
        return;
    }
    let d = Graftd::start();
    // Open the socket's mode so only SO_PEERCRED stands in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.control, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
s.connect(sys.argv[1])
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
socket.send_fds(s, [b'{"op":"ping"}'], [fd])
sys.stdout.write(s.recv(70000).decode())
"#;
    let out = graft_tests::run(
        "setpriv",
        [
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
            d.control.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = control::decode_reply(&out.stdout).expect("reply");
    expect_err(reply, libc::EPERM, "root only (caller uid 65534)");
    // Root still gets served.
    let me = ns_fd(None);
    let r = ctl_raw(&d, &control::encode(&Request::Ping {}), &[me.as_fd()]);
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
}
