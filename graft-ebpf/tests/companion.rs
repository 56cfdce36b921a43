//! The companion without graftd: this test process plays graftd. It starts
//! the companion (which moves the process into a cgroup of its own and
//! attaches the programs there), makes sockets, marks them with an endpoint
//! as graftd does when it hands one out, and checks what the kernel does with
//! them. The tests share one process, so they run one at a time (a lock).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self as sock, AddressFamily, SockFlag, SockType, SockaddrStorage};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use graft_core::rules::{policy_allows, PolicyRule};
use graft_core::{EndpointName, NetnsId};
use graft_ebpf::{Companion, EndpointKey, Options};
use graft_seccomp::sockopt;
use graft_tests::{root_or_skip, Netns};

mod common;

/// One companion at a time: `Companion::start` moves this test process into
/// a cgroup of its own, and a process is in one cgroup at a time.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The companion for `test` (with the lock held as long as the guard lives),
/// or `None` after the skip line.
fn start(test: &str, splice: bool) -> Option<(MutexGuard<'static, ()>, Companion)> {
    let guard = lock();
    if !root_or_skip(test) {
        return None;
    }
    let name = format!("graft-test-{}-{test}", std::process::id());
    match Companion::start(&Options {
        splice,
        cgroup_name: Some(name),
        ..Default::default()
    }) {
        Ok(c) => Some((guard, c)),
        Err(e) => {
            println!("SKIP: {test}: eBPF companion unavailable: {e}");
            None
        }
    }
}

fn key(netns: NetnsId, name: &str) -> EndpointKey {
    EndpointKey {
        netns,
        name: EndpointName::new(name).unwrap(),
    }
}

/// Endpoints named `names` in the current namespace, added without a policy.
fn endpoints_here<const N: usize>(c: &mut Companion, names: [&str; N]) -> [EndpointKey; N] {
    let here = NetnsId::current().unwrap();
    let keys = names.map(|n| key(here, n));
    for k in &keys {
        c.add_endpoint(*k, &[]).unwrap();
    }
    keys
}

fn rules(s: &[&str]) -> Vec<PolicyRule> {
    s.iter().map(|r| r.parse().unwrap()).collect()
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Runs `f` on a thread that entered `ns` (and dies with it).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let file = std::fs::File::open(ns.path()).expect("open netns");
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

#[test]
fn policy_refuses_connect_and_sendto_with_eperm() {
    let Some((_g, mut c)) = start("policy", false) else {
        return;
    };
    let here = NetnsId::current().unwrap();
    let ep = key(here, "ep-pol");
    c.add_endpoint(
        ep,
        &rules(&[
            "allow 127.0.0.0/8",
            "deny 127.0.0.2/32",
            "deny ::1/128:1-1000",
        ]),
    )
    .unwrap();

    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let server2 = TcpListener::bind("127.0.0.2:0").unwrap();
    let port2 = server2.local_addr().unwrap().port();
    let udp_rx = UdpSocket::bind("127.0.0.2:0").unwrap();
    let udp_rx_addr = udp_rx.local_addr().unwrap();
    let udp_ok = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_rx
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    udp_ok
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    // TCP: a marked socket reaches the allowed address, not the denied one.
    let mk = |c: &mut Companion| {
        let s = socket(libc::AF_INET, libc::SOCK_STREAM);
        c.register_socket(s.as_fd(), &ep).unwrap();
        s
    };
    let s = mk(&mut c);
    connect(&s, &SocketAddr::from(([127, 0, 0, 1], port))).expect("allowed connect");
    let s = mk(&mut c);
    let e = connect(&s, &SocketAddr::from(([127, 0, 0, 2], port2))).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "denied connect: {e}");
    // Outside every clause while an allow exists: denied too.
    let s = mk(&mut c);
    let e = connect(&s, &SocketAddr::from(([10, 0, 0, 1], 80))).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "unlisted destination: {e}");

    // UDP sendto: the datagram to the denied address never leaves.
    let u = socket(libc::AF_INET, libc::SOCK_DGRAM);
    c.register_socket(u.as_fd(), &ep).unwrap();
    let u = UdpSocket::from(u);
    let e = u.send_to(b"denied", udp_rx_addr).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "denied sendto: {e}");
    u.send_to(b"allowed", udp_ok.local_addr().unwrap())
        .expect("allowed sendto");
    let mut buf = [0u8; 64];
    let (n, from) = udp_ok.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"allowed");
    assert_eq!(from.port(), u.local_addr().unwrap().port());

    // IPv6 and v4-mapped destinations on a dual-stack socket.
    let l6 = TcpListener::bind("[::1]:0").unwrap();
    let p6 = l6.local_addr().unwrap().port();
    let s6 = socket(libc::AF_INET6, libc::SOCK_STREAM);
    c.register_socket(s6.as_fd(), &ep).unwrap();
    let e = connect(&s6, &"[::1]:999".parse().unwrap()).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "denied v6 port: {e}");
    let s6 = socket(libc::AF_INET6, libc::SOCK_STREAM);
    c.register_socket(s6.as_fd(), &ep).unwrap();
    // ::1 is outside the only allow (an IPv4 prefix): denied.
    let e = connect(&s6, &format!("[::1]:{p6}").parse().unwrap()).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "v6 outside allow: {e}");
    let s6 = socket(libc::AF_INET6, libc::SOCK_STREAM);
    c.register_socket(s6.as_fd(), &ep).unwrap();
    let e = connect(&s6, &format!("[::ffff:127.0.0.2]:{port2}").parse().unwrap()).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "v4-mapped denied: {e}");
    let s6 = socket(libc::AF_INET6, libc::SOCK_STREAM);
    c.register_socket(s6.as_fd(), &ep).unwrap();
    connect(&s6, &format!("[::ffff:127.0.0.1]:{port}").parse().unwrap())
        .expect("v4-mapped allowed");

    let n = c.counters(&ep).unwrap();
    assert_eq!(n.policy_denied, 6, "{n:?}");

    // The same destinations from sockets graftd did not mark: untouched,
    // even though they live in the companion's cgroup.
    let plain = TcpStream::connect(("127.0.0.2", port2)).expect("unmarked connect");
    drop(plain);
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"plain", udp_rx_addr)
        .expect("unmarked sendto");
    let (n, _) = udp_rx.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"plain");

    // And a program in another cgroup (the one we came from).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "read x; exec socat -u OPEN:/dev/null TCP:127.0.0.2:{port2}"
        ))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(
        c.original_cgroup().join("cgroup.procs"),
        child.id().to_string(),
    )
    .unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "socat in the original cgroup failed: {st}");
    assert_eq!(c.counters(&ep).unwrap().policy_denied, 6);
}

/// Every policy/destination/port combination gives EPERM exactly when
/// graft-core's `policy_allows` says no. Runs in a namespace where every
/// address is local, so `connect()` on a UDP socket succeeds when allowed.
#[test]
fn policy_matches_graft_core() {
    let Some((_g, mut c)) = start("differential", false) else {
        return;
    };
    let ns = Netns::new("ebpf");
    graft_tests::run_ok(
        "ip",
        [
            "-n",
            &ns.name,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
        ],
    );
    graft_tests::run_ok(
        "ip",
        [
            "-n", &ns.name, "-6", "route", "add", "local", "::/0", "dev", "lo",
        ],
    );
    let nsid = in_netns(&ns, || NetnsId::current().unwrap());
    let policies = [
        rules(&[]),
        rules(&["deny 10.0.0.0/8"]),
        rules(&["allow 10.0.0.0/8", "deny 10.1.0.0/16:80-90"]),
        rules(&["allow 10.1.0.0/16", "deny 10.1.0.0/16"]),
        rules(&[
            "allow 0.0.0.0/0:53",
            "deny 10.0.0.0/8:53",
            "allow 10.1.2.3/32",
        ]),
        rules(&["allow ::/0", "deny fd00::/8", "allow fd00:1::/32:443"]),
        rules(&["deny 192.0.2.0/24", "allow 0.0.0.0/0", "deny 2001:db8::/32"]),
    ];
    let dsts: Vec<IpAddr> = [
        "10.0.0.1",
        "10.1.2.3",
        "10.1.200.1",
        "10.2.0.0",
        "192.0.2.7",
        "8.8.8.8",
        "fd00::1",
        "fd00:1::5",
        "2001:db8::1",
        "2001:db9::1",
        "::ffff:10.1.2.3",
        "::ffff:192.0.2.7",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let ports = [1u16, 53, 79, 80, 90, 91, 443, 65535];
    let mut denied_expected = 0;
    let mut checked = 0;
    for (i, p) in policies.iter().enumerate() {
        let ep = key(nsid, &format!("ep{i}"));
        c.add_endpoint(ep, p).unwrap();
        for d in &dsts {
            for port in ports {
                let fam = if d.is_ipv4() {
                    libc::AF_INET
                } else {
                    libc::AF_INET6
                };
                let s = in_netns(&ns, || socket(fam, libc::SOCK_DGRAM));
                c.register_socket(s.as_fd(), &ep).unwrap();
                let r = connect(&s, &SocketAddr::new(*d, port));
                let want = policy_allows(p, *d, port);
                match (&r, want) {
                    (Ok(()), true) => {}
                    (Err(e), false) if errno(e) == libc::EPERM => denied_expected += 1,
                    _ => panic!(
                        "policy {p:?} to {d} port {port}: got {r:?}, graft-core allows={want}"
                    ),
                }
                checked += 1;
            }
        }
        assert_eq!(c.counters(&ep).unwrap().policy_denied as usize, {
            // per endpoint: recount from graft-core
            dsts.iter()
                .flat_map(|d| ports.iter().map(move |p| (*d, *p)))
                .filter(|(d, port)| !policy_allows(p, *d, *port))
                .count()
        });
    }
    assert!(
        denied_expected > 50 && checked - denied_expected > 50,
        "{denied_expected}/{checked}"
    );
}

/// Connection counters and bytes, without splicing (TCP's own byte counts).
/// A batch is registered while the limit allows: the first sockets are
/// marked and counted live, the rest refused with the live count; a close
/// frees room for exactly one more.
#[test]
fn a_batch_registers_up_to_the_limit() {
    let Some((_g, mut c)) = start("batch_limit", false) else {
        return;
    };
    let [ep] = endpoints_here(&mut c, ["ep-batch"]);
    let socks: Vec<OwnedFd> = (0..5)
        .map(|_| socket(libc::AF_INET, libc::SOCK_STREAM))
        .collect();
    let fds: Vec<_> = socks.iter().map(|s| s.as_fd()).collect();
    let (n, why) = c.register_sockets(&fds, &ep, Some(3));
    assert_eq!(n, 3);
    assert!(
        matches!(why, Some(graft_ebpf::Error::LimitReached { live: 3, .. })),
        "{why:?}"
    );
    assert_eq!(c.live(&ep), Some(3));
    for s in &socks[..3] {
        assert!(c.socket_endpoint(s.as_fd()).is_some(), "marked");
    }
    for s in &socks[3..] {
        assert_eq!(c.socket_endpoint(s.as_fd()), None, "refused: unmarked");
    }
    // Without a limit the whole batch goes, counted once.
    let more: Vec<OwnedFd> = (0..4)
        .map(|_| socket(libc::AF_INET6, libc::SOCK_STREAM))
        .collect();
    let fds: Vec<_> = more.iter().map(|s| s.as_fd()).collect();
    let (n, why) = c.register_sockets(&fds, &ep, None);
    assert_eq!((n, why.is_none()), (4, true));
    assert_eq!(c.live(&ep), Some(7));
    drop(more);
    let mut socks = socks;
    socks.truncate(2);
    graft_tests::wait_until("closes counted", Duration::from_secs(10), || {
        c.live(&ep) == Some(2)
    });
    let again: Vec<OwnedFd> = (0..2)
        .map(|_| socket(libc::AF_INET, libc::SOCK_STREAM))
        .collect();
    let fds: Vec<_> = again.iter().map(|s| s.as_fd()).collect();
    let (n, _) = c.register_sockets(&fds, &ep, Some(3));
    assert_eq!(n, 1, "room for one");
    assert_eq!(c.live(&ep), Some(3));
}

/// Sockets made on the thread that armed marking are marked as the kernel
/// makes them: with the endpoint (its policy applies at connect), counted
/// live, held to the limit; nothing made after settling, or on another
/// thread, is marked by it: a batch made elsewhere is marked the ordinary
/// way, one made half here and half elsewhere is refused whole.
#[test]
fn sockets_made_while_armed_are_marked_as_they_are_made() {
    let Some((_g, mut c)) = start("armed", false) else {
        return;
    };
    let deny = rules(&["deny 127.0.0.2/32"]);
    let ep = key(NetnsId::current().unwrap(), "ep-armed");
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = server.local_addr().unwrap();
    let denied = SocketAddr::from(([127, 0, 0, 2], to.port()));

    let armed = c.arm_marks(&ep, &deny, 5, Some(3), false).unwrap();
    assert_eq!(armed.count(), 3, "capped by the limit");
    let made = [
        socket(libc::AF_INET, libc::SOCK_STREAM),
        socket(libc::AF_INET6, libc::SOCK_STREAM),
        socket(libc::AF_INET, libc::SOCK_STREAM),
    ];
    let fds: Vec<_> = made.iter().map(|s| s.as_fd()).collect();
    let (n, why) = c.settle_marks(armed, &fds);
    assert_eq!((n, why.is_none()), (3, true), "{why:?}");
    let id = c.socket_endpoint(made[0].as_fd()).expect("marked as made");
    for s in &made {
        assert_eq!(c.socket_endpoint(s.as_fd()), Some(id));
    }
    assert_eq!(c.live(&ep), Some(3));
    connect(&made[0], &to).expect("allowed connect");
    let e = connect(&made[2], &denied).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "the endpoint's policy applies: {e}");
    let after = socket(libc::AF_INET, libc::SOCK_STREAM);
    assert_eq!(c.socket_endpoint(after.as_fd()), None, "disarmed");
    assert!(matches!(
        c.arm_marks(&ep, &deny, 2, Some(3), false),
        Err(graft_ebpf::Error::LimitReached { live: 3, .. })
    ));

    // Made on another thread: not marked by the kernel, so settling marks
    // them itself.
    let armed = c.arm_marks(&ep, &deny, 2, None, false).unwrap();
    let elsewhere: Vec<OwnedFd> = std::thread::spawn(|| {
        (0..2)
            .map(|_| socket(libc::AF_INET, libc::SOCK_STREAM))
            .collect()
    })
    .join()
    .unwrap();
    let fds: Vec<_> = elsewhere.iter().map(|s| s.as_fd()).collect();
    let (n, why) = c.settle_marks(armed, &fds);
    assert_eq!((n, why.is_none()), (2, true), "{why:?}");
    assert!(elsewhere
        .iter()
        .all(|s| c.socket_endpoint(s.as_fd()) == Some(id)));
    assert_eq!(c.live(&ep), Some(5));

    // Half and half: which ones are marked is unknown, so none goes.
    let armed = c.arm_marks(&ep, &deny, 2, None, false).unwrap();
    let mine = socket(libc::AF_INET, libc::SOCK_STREAM);
    let theirs = std::thread::spawn(|| socket(libc::AF_INET, libc::SOCK_STREAM))
        .join()
        .unwrap();
    let (n, why) = c.settle_marks(armed, &[mine.as_fd(), theirs.as_fd()]);
    assert_eq!(n, 0);
    assert!(
        matches!(why, Some(graft_ebpf::Error::Bpf { .. })),
        "{why:?}"
    );
    // The marked one counts until its release is: refused sockets are
    // closed unused, and the count comes back.
    drop((mine, theirs));
    let back = |c: &Companion, n| {
        graft_tests::wait_until(&format!("{n} live"), Duration::from_secs(10), || {
            c.live(&ep) == Some(n)
        })
    };
    back(&c, 5);

    // One made and closed again (a failed bind ends a batch): the rest go.
    let armed = c.arm_marks(&ep, &deny, 3, None, false).unwrap();
    let kept = [
        socket(libc::AF_INET, libc::SOCK_STREAM),
        socket(libc::AF_INET, libc::SOCK_STREAM),
    ];
    drop(socket(libc::AF_INET, libc::SOCK_STREAM));
    let fds: Vec<_> = kept.iter().map(|s| s.as_fd()).collect();
    assert_eq!(c.settle_marks(armed, &fds).0, 2);
    back(&c, 7);

    // Another thread of graftd registers a socket between arming and
    // settling: the limit is checked again.
    let armed = c.arm_marks(&ep, &deny, 2, Some(9), false).unwrap();
    assert_eq!(armed.count(), 2);
    let other = std::thread::spawn(|| socket(libc::AF_INET, libc::SOCK_STREAM))
        .join()
        .unwrap();
    assert_eq!(c.register_sockets(&[other.as_fd()], &ep, Some(9)).0, 1);
    let two = [
        socket(libc::AF_INET, libc::SOCK_STREAM),
        socket(libc::AF_INET, libc::SOCK_STREAM),
    ];
    let fds: Vec<_> = two.iter().map(|s| s.as_fd()).collect();
    let (n, why) = c.settle_marks(armed, &fds);
    assert_eq!(n, 1, "room for one");
    assert!(
        matches!(why, Some(graft_ebpf::Error::LimitReached { live: 9, .. })),
        "{why:?}"
    );
    let [first, refused] = two;
    drop(refused);
    back(&c, 9);
    drop((first, other, kept, made, elsewhere, after));
    back(&c, 0);
}

#[test]
fn counters_count_connections_and_bytes() {
    let Some((_g, mut c)) = start("counters", false) else {
        return;
    };
    let [srv, cli] = endpoints_here(&mut c, ["ep-srv", "ep-cli"]);
    let l = listener(&mut c, &srv, "127.0.0.1:0".parse().unwrap());
    let addr = l.local_addr().unwrap();
    const N: usize = 5;
    let mut sent = 0u64;
    for i in 0..N {
        let s = client(&mut c, &cli, addr);
        let (a, _) = l.accept().unwrap();
        let out = pattern(1000 * (i + 1), i as u8);
        let back = pattern(77 * (i + 1), 100 + i as u8);
        let (got_srv, got_cli) = exchange(a, s, &back, &out);
        assert_eq!(got_srv, out);
        assert_eq!(got_cli, back);
        sent += out.len() as u64;
    }
    let back_total: u64 = (0..N).map(|i| 77 * (i as u64 + 1)).sum();
    // Close accounting runs when each socket reaches CLOSE (after FIN/ACK).
    graft_tests::wait_until("byte counters", Duration::from_secs(10), || {
        let a = c.counters(&cli).unwrap();
        let b = c.counters(&srv).unwrap();
        a.bytes_sent == sent
            && b.bytes_received == sent
            && b.bytes_sent == back_total
            && a.bytes_received == back_total
    });
    let a = c.counters(&cli).unwrap();
    let b = c.counters(&srv).unwrap();
    assert_eq!(
        (a.active_established, a.passive_established),
        (N as u64, 0),
        "{a:?}"
    );
    assert_eq!(
        (b.active_established, b.passive_established),
        (0, N as u64),
        "{b:?}"
    );
    assert_eq!(a.spliced_msgs + b.spliced_msgs, 0);
    // An unmarked client of the grafted listener counts on the listener only.
    let plain = TcpStream::connect(addr).unwrap();
    let (a2, _) = l.accept().unwrap();
    drop((plain, a2));
    let b = c.counters(&srv).unwrap();
    assert_eq!(b.passive_established, N as u64 + 1);
    assert_eq!(c.counters(&cli).unwrap().active_established, N as u64);
}

#[test]
fn splice_carries_bytes_exactly_v4_v6_dualstack() {
    let Some((_g, mut c)) = start("splice", true) else {
        return;
    };
    let [srv, cli] = endpoints_here(&mut c, ["sp-srv", "sp-cli"]);
    for (bind, connect_to) in [
        ("127.0.0.1:0", None),
        ("[::1]:0", None),
        // Dual-stack listener, IPv4 client: both keyed as IPv4.
        ("[::]:0", Some("127.0.0.1")),
    ] {
        let l = listener(&mut c, &srv, bind.parse().unwrap());
        let mut addr = l.local_addr().unwrap();
        if let Some(ip) = connect_to {
            addr = SocketAddr::new(ip.parse().unwrap(), addr.port());
        }
        let before =
            c.counters(&cli).unwrap().spliced_bytes + c.counters(&srv).unwrap().spliced_bytes;
        // Large both ways at once, then half-close from each side.
        let s = client(&mut c, &cli, addr);
        let (a, _) = l.accept().unwrap();
        let big_out = pattern(24 << 20, 1);
        let big_back = pattern(9 << 20, 2);
        let (got_srv, got_cli) = exchange(a, s, &big_back, &big_out);
        assert_eq!(
            checksum(&got_srv),
            checksum(&big_out),
            "{bind}: client->server"
        );
        assert_eq!(got_srv.len(), big_out.len());
        assert_eq!(
            checksum(&got_cli),
            checksum(&big_back),
            "{bind}: server->client"
        );
        assert_eq!(got_cli.len(), big_back.len());
        // Small messages, ping-pong.
        let s = client(&mut c, &cli, addr);
        let (mut a, _) = l.accept().unwrap();
        let mut s2 = s;
        for i in 0..500usize {
            let m = pattern(1 + i % 97, i as u8);
            s2.write_all(&m).unwrap();
            let mut got = vec![0u8; m.len()];
            a.read_exact(&mut got).unwrap();
            assert_eq!(got, m);
            let k = (1 + i % 5).min(m.len());
            a.write_all(&got[..k]).unwrap();
            let mut back = vec![0u8; k];
            s2.read_exact(&mut back).unwrap();
            assert_eq!(back, m[..k]);
        }
        // Close: the reader sees EOF after the last byte; the closed socket
        // leaves the map (the next connection on a new port works).
        s2.write_all(b"last").unwrap();
        drop(s2);
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last");
        // A spliced socket's sends are credited in steps, and the rest
        // when its connection ends.
        drop(a);
        let spliced =
            || c.counters(&cli).unwrap().spliced_bytes + c.counters(&srv).unwrap().spliced_bytes;
        let total = (24u64 << 20)
            + (9 << 20)
            + (0..500u64)
                .map(|i| 1 + i % 97 + (1 + i % 5).min(1 + i % 97))
                .sum::<u64>()
            + 4;
        graft_tests::wait_until("spliced bytes credited", Duration::from_secs(5), || {
            spliced() - before == total
        });
        let after = spliced();
        assert_eq!(
            after - before,
            total,
            "{bind}: every byte went through the splice"
        );
    }
    assert!(c.splice_problem().is_none());
}

/// Sockets in the splice map, as its side table counts them.
fn splice_members(c: &Companion) -> usize {
    let m = c.ebpf().map("graft_sock_ep").expect("graft_sock_ep");
    let ep: aya::maps::HashMap<_, [u8; 56], u32> = aya::maps::HashMap::try_from(m).unwrap();
    ep.keys().count()
}

/// A connection joins the splice map only when both its ends are grafted:
/// a socket there pays the sockmap detour on every send and receive, so a
/// grafted server's host clients and a grafted client's host servers stay
/// out. A grafted pair still joins, whatever address the listener has.
#[test]
fn splice_takes_only_grafted_pairs() {
    let Some((_g, mut c)) = start("splice-pairs", true) else {
        return;
    };
    let [srv, cli] = endpoints_here(&mut c, ["pr-srv", "pr-cli"]);
    let members = splice_members;
    assert_eq!(members(&c), 0);
    let ping = |mut a: TcpStream, mut s: TcpStream| {
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        a.read_exact(&mut got).unwrap();
        a.write_all(&got).unwrap();
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        (a, s)
    };

    // Grafted client, host listener.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = client(&mut c, &cli, host.local_addr().unwrap());
    let (a, _) = host.accept().unwrap();
    let (a, s) = ping(a, s);
    assert_eq!(members(&c), 0, "grafted client, host listener");
    drop((a, s, host));

    // Host client, grafted listener.
    let l = listener(&mut c, &srv, "127.0.0.1:0".parse().unwrap());
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    let (a, s) = ping(a, s);
    assert_eq!(members(&c), 0, "host client, grafted listener");
    drop((a, s));

    // Grafted pairs: exact address, IPv4 wildcard, IPv6 wildcard with an
    // IPv4 client, IPv6.
    for (bind, to) in [
        ("127.0.0.1:0", "127.0.0.1"),
        ("0.0.0.0:0", "127.0.0.1"),
        ("[::]:0", "127.0.0.1"),
        ("[::1]:0", "::1"),
    ] {
        let l2 = listener(&mut c, &srv, bind.parse().unwrap());
        let to = SocketAddr::new(to.parse().unwrap(), l2.local_addr().unwrap().port());
        let s = client(&mut c, &cli, to);
        let (a, _) = l2.accept().unwrap();
        let (a, s) = ping(a, s);
        assert_eq!(members(&c), 2, "grafted pair, listener on {bind}");
        drop((a, s));
        // The listener's close is seen: a grafted client of a host
        // listener later on the same port stays out.
        let port = l2.local_addr().unwrap().port();
        drop(l2);
        let Ok(host) = TcpListener::bind(SocketAddr::new(to.ip(), port)) else {
            continue;
        };
        let s = client(&mut c, &cli, to);
        let (a, _) = host.accept().unwrap();
        let (a, s) = ping(a, s);
        assert_eq!(
            members(&c),
            0,
            "host listener where a grafted one was ({bind})"
        );
        drop((a, s));
    }
    // The first grafted listener is still open: a pair to it joins.
    let s = client(&mut c, &cli, l.local_addr().unwrap());
    let (a, _) = l.accept().unwrap();
    let (a, s) = ping(a, s);
    assert_eq!(members(&c), 2, "the first grafted listener, again");
    drop((a, s));

    // Kept off splicing (a seccomp-mode program's sockets): a client, then
    // a listener (its connections and their clients).
    let addr = l.local_addr().unwrap();
    let s = marked_tcp(&mut c, &cli, &addr);
    c.keep_off_splice(s.as_fd()).unwrap();
    connect(&s, &addr).unwrap();
    let (a, _) = l.accept().unwrap();
    let (a, s) = ping(a, TcpStream::from(s));
    assert_eq!(members(&c), 0, "client kept off splicing");
    drop((a, s));
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let l3 = marked_tcp(&mut c, &srv, &any);
    c.keep_off_splice(l3.as_fd()).unwrap();
    bind(&l3, &any).unwrap();
    listen(&l3, 16);
    let l3 = TcpListener::from(l3);
    let s = client(&mut c, &cli, l3.local_addr().unwrap());
    let (a, _) = l3.accept().unwrap();
    let _pair = ping(a, s);
    assert_eq!(members(&c), 0, "listener kept off splicing");
}

/// Two namespaces, the same 4-tuple in each, at the same time: the netns
/// cookie in the key keeps them apart.
#[test]
fn splice_keeps_namespaces_apart() {
    let Some((_g, mut c)) = start("splice-ns", true) else {
        return;
    };
    let ns1 = Netns::new("sp1");
    let ns2 = Netns::new("sp2");
    let mut pairs = Vec::new();
    for ns in [&ns1, &ns2] {
        let id = in_netns(ns, || NetnsId::current().unwrap());
        let (srv, cli) = (key(id, "srv"), key(id, "cli"));
        c.add_endpoint(srv, &[]).unwrap();
        c.add_endpoint(cli, &[]).unwrap();
        let (l, s) = in_netns(ns, || {
            let l = socket(libc::AF_INET, libc::SOCK_STREAM);
            let s = socket(libc::AF_INET, libc::SOCK_STREAM);
            (l, s)
        });
        c.register_socket(l.as_fd(), &srv).unwrap();
        c.register_socket(s.as_fd(), &cli).unwrap();
        reuse(&l);
        reuse(&s);
        bind(&l, &"127.0.0.1:7000".parse().unwrap()).unwrap();
        bind(&s, &"127.0.0.1:7001".parse().unwrap()).unwrap();
        listen(&l, 8);
        connect(&s, &"127.0.0.1:7000".parse().unwrap()).unwrap();
        let l = TcpListener::from(l);
        let (a, peer) = l.accept().unwrap();
        assert_eq!(peer, "127.0.0.1:7001".parse().unwrap());
        pairs.push((a, TcpStream::from(s), srv, cli));
    }
    // Both at once, different bytes in each namespace.
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = pairs
            .iter()
            .enumerate()
            .map(|(i, (a, s, _, _))| {
                let a = a.try_clone().unwrap();
                let s = s.try_clone().unwrap();
                sc.spawn(move || {
                    let out = pattern(4 << 20, 10 + i as u8);
                    let back = pattern(1 << 20, 20 + i as u8);
                    let (g1, g2) = exchange(a, s, &back, &out);
                    (g1 == out, g2 == back)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results, vec![(true, true), (true, true)]);
    // Credited in full once the connections end.
    let ends: Vec<_> = pairs
        .into_iter()
        .map(|(_, _, srv, cli)| (srv, cli))
        .collect();
    for (srv, cli) in &ends {
        let both = || {
            (
                c.counters(cli).unwrap().spliced_bytes,
                c.counters(srv).unwrap().spliced_bytes,
            )
        };
        graft_tests::wait_until("spliced bytes credited", Duration::from_secs(5), || {
            both() == (4 << 20, 1 << 20)
        });
    }
}

/// A spliced socket's sends are credited while its connection lives, in
/// steps (every 64 sends or 1 MiB), and in full when it ends.
#[test]
fn splice_credits_a_live_connection_in_steps() {
    let Some((_g, mut c)) = start("splice-steps", true) else {
        return;
    };
    let [srv, cli] = endpoints_here(&mut c, ["st-srv", "st-cli"]);
    let l = listener(&mut c, &srv, "127.0.0.1:0".parse().unwrap());
    let mut s = client(&mut c, &cli, l.local_addr().unwrap());
    let (mut a, _) = l.accept().unwrap();
    const N: usize = 4 << 20;
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; N];
        a.read_exact(&mut got).map(|()| (a, checksum(&got)))
    });
    let chunk = pattern(4096, 7);
    for _ in 0..N / chunk.len() {
        s.write_all(&chunk).unwrap();
    }
    let (mut a, sum) = reader.join().unwrap().unwrap();
    assert_eq!(sum, checksum(&chunk.repeat(N / chunk.len())));
    let live = c.counters(&cli).unwrap().spliced_bytes;
    assert!(
        (3 << 20..=N as u64).contains(&live),
        "{live} of {N} bytes credited while the connection lives"
    );
    // A few sends more, below a step: credited when the connection ends.
    for _ in 0..10 {
        s.write_all(&chunk[..100]).unwrap();
    }
    let mut rest = [0u8; 1000];
    a.read_exact(&mut rest).unwrap();
    drop((s, a));
    graft_tests::wait_until(
        "the rest credited at the end",
        Duration::from_secs(5),
        || c.counters(&cli).unwrap().spliced_bytes == N as u64 + 1000,
    );
}

/// What a spliced socket owes outlives a graftd restart: its record is
/// pinned with the counters, and the next graftd's programs credit it when
/// the connection ends.
#[test]
fn what_a_spliced_socket_owes_survives_a_restart() {
    let test = "what_a_spliced_socket_owes_survives_a_restart";
    let guard = lock();
    if !root_or_skip(test) {
        return;
    }
    let tag = format!("graft-test-owed-{}", std::process::id());
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(&tag);
    let opts = Options {
        splice: true,
        cgroup_name: Some(tag.clone()),
        pin_dir: Some(pin.clone()),
    };
    let mut c = match Companion::start(&opts) {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP: {test}: eBPF companion unavailable: {e}");
            return;
        }
    };
    let _cleanup = common::Cleanup {
        pin,
        cgroup: tag,
        original: Some(c.original_cgroup()),
    };
    let [srv, cli] = endpoints_here(&mut c, ["ow-srv", "ow-cli"]);
    let l = listener(&mut c, &srv, "127.0.0.1:0".parse().unwrap());
    let mut s = client(&mut c, &cli, l.local_addr().unwrap());
    let (mut a, _) = l.accept().unwrap();
    // Fewer sends than a step: all of it owed.
    for i in 0..10u8 {
        s.write_all(&[i; 100]).unwrap();
        let mut got = [0u8; 100];
        a.read_exact(&mut got).unwrap();
        assert_eq!(got, [i; 100]);
    }
    assert_eq!(
        c.counters(&cli).unwrap().spliced_bytes,
        0,
        "owed, not credited"
    );
    drop(c);
    let c = Companion::start(&opts).expect("second start");
    drop((s, a));
    graft_tests::wait_until(
        "the owed bytes credited by the next graftd",
        Duration::from_secs(5),
        || c.counters(&cli).unwrap().spliced_bytes == 1000,
    );
    let srv_in = c.counters(&srv).unwrap().bytes_received;
    assert_eq!(srv_in, 1000, "the peer's received bytes too");
    drop(c);
    drop(guard);
}

// ---------------------------------------------------------------- helpers

fn socket(family: i32, ty: i32) -> OwnedFd {
    let family = AddressFamily::from_i32(family).expect("address family");
    let ty = SockType::try_from(ty).expect("socket type");
    sock::socket(family, ty, SockFlag::SOCK_CLOEXEC, None).expect("socket")
}

fn connect(s: &OwnedFd, a: &SocketAddr) -> std::io::Result<()> {
    Ok(sock::connect(s.as_raw_fd(), &SockaddrStorage::from(*a))?)
}

fn bind(s: &OwnedFd, a: &SocketAddr) -> std::io::Result<()> {
    Ok(sock::bind(s.as_raw_fd(), &SockaddrStorage::from(*a))?)
}

fn listen(s: &OwnedFd, backlog: i32) {
    sock::listen(s, sock::Backlog::new(backlog).expect("backlog")).expect("listen");
}

fn reuse(s: &OwnedFd) {
    sock::setsockopt(s, sock::sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
}

/// A TCP socket of `addr`'s family, registered on `ep` (marked) as graftd
/// does before handing it out.
fn marked_tcp(c: &mut Companion, ep: &EndpointKey, addr: &SocketAddr) -> OwnedFd {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let s = socket(fam, libc::SOCK_STREAM);
    c.register_socket(s.as_fd(), ep).unwrap();
    s
}

/// A marked listener (as graftd hands out: marked before listen()).
fn listener(c: &mut Companion, ep: &EndpointKey, addr: SocketAddr) -> TcpListener {
    let s = marked_tcp(c, ep, &addr);
    reuse(&s);
    bind(&s, &addr).unwrap();
    listen(&s, 16);
    TcpListener::from(s)
}

fn client(c: &mut Companion, ep: &EndpointKey, to: SocketAddr) -> TcpStream {
    let s = marked_tcp(c, ep, &to);
    connect(&s, &to).unwrap();
    TcpStream::from(s)
}

/// Deterministic bytes that differ by position and seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 11) as u8
        })
        .collect()
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Both directions at once in odd-sized writes; each side half-closes after
/// its last byte and reads to EOF. Returns (what the server read, what the
/// client read).
fn exchange(srv: TcpStream, cli: TcpStream, srv_out: &[u8], cli_out: &[u8]) -> (Vec<u8>, Vec<u8>) {
    for s in [&srv, &cli] {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    std::thread::scope(|sc| {
        let w = |mut s: TcpStream, data: &[u8]| {
            let mut off = 0;
            let mut step = 1;
            while off < data.len() {
                let n = (step * 4093).min(data.len() - off);
                s.write_all(&data[off..off + n]).unwrap();
                off += n;
                step = step % 40 + 1;
            }
            s.shutdown(Shutdown::Write).unwrap();
        };
        // A blocking read on a spliced socket can fail with EAGAIN when a
        // wake-up that brought no data (the writer thread's write space)
        // ends the kernel's single wait (tcp_bpf_recvmsg). Event-driven
        // programs poll again; this reader does the same, within a bound.
        let r = |mut s: TcpStream| {
            let mut v = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            let start = std::time::Instant::now();
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return v,
                    Ok(n) => v.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        assert!(
                            start.elapsed() < Duration::from_secs(60),
                            "no EOF within 60 s after {} bytes",
                            v.len()
                        );
                        let mut fds = [nix::poll::PollFd::new(
                            s.as_fd(),
                            nix::poll::PollFlags::POLLIN,
                        )];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
        };
        let (sw, cw) = (srv.try_clone().unwrap(), cli.try_clone().unwrap());
        let h1 = sc.spawn(move || w(sw, srv_out));
        let h2 = sc.spawn(move || w(cw, cli_out));
        let h3 = sc.spawn(move || r(srv));
        let h4 = sc.spawn(move || r(cli));
        h1.join().unwrap();
        h2.join().unwrap();
        (h3.join().unwrap(), h4.join().unwrap())
    })
}

/// A socket that another sk_msg program already owns cannot join our splice
/// map (EBUSY): the companion says so once, and the bytes still arrive.
/// The other owner here is a second instance of the same programs, attached
/// to the cgroup before ours, so its sockops runs first.
#[test]
fn foreign_sk_msg_owner_is_reported_and_bytes_still_arrive() {
    let _g = lock();
    if !root_or_skip("ebusy") {
        return;
    }
    let name = format!("graft-test-{}-ebusy", std::process::id());
    // Where Companion::start will put us: a child of our current cgroup.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let Some(mnt) = mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
    }) else {
        println!("SKIP: ebusy: no cgroup2 mount");
        return;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let dir = std::path::Path::new(&mnt)
        .join(own.trim_start_matches('/'))
        .join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    // Declared before the companions: dropped after them (they move this
    // process back out), also when an assertion fails.
    let _gone = RemoveDirOnDrop(dir.clone());
    let cg = std::fs::File::open(&dir).unwrap();

    let on = 1u32;
    let mut foreign = match aya::EbpfLoader::new()
        .override_global("splice_enabled", &on, true)
        .load(graft_ebpf::object())
    {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            println!("SKIP: ebusy: cannot load eBPF: {e}");
            return;
        }
    };
    let socks: aya::maps::SockHash<aya::maps::MapData, [u8; 56]> =
        aya::maps::SockHash::try_from(foreign.take_map("graft_socks").unwrap()).unwrap();
    {
        let msg: &mut aya::programs::SkMsg = program(&mut foreign, "graft_sk_msg");
        msg.load().unwrap();
        msg.attach(socks.fd()).unwrap();
        let so: &mut aya::programs::SockOps = program(&mut foreign, "graft_sockops");
        so.load().unwrap();
        so.attach(&cg, aya::programs::CgroupAttachMode::Single)
            .unwrap();
    }
    let mut fmark: aya::maps::SkStorage<aya::maps::MapData, graft_ebpf::GraftSk> =
        aya::maps::SkStorage::try_from(foreign.take_map("graft_sk_map").unwrap()).unwrap();
    let mut fcounters: aya::maps::HashMap<aya::maps::MapData, u32, graft_ebpf::GraftCounters> =
        aya::maps::HashMap::try_from(foreign.take_map("graft_counters_map").unwrap()).unwrap();
    fcounters
        .insert(1, graft_ebpf::GraftCounters::default(), 0)
        .unwrap();

    let mut c = Companion::start(&Options {
        splice: true,
        cgroup_name: Some(name),
        ..Default::default()
    })
    .expect("companion");
    let [srv, cli] = endpoints_here(&mut c, ["eb-srv", "eb-cli"]);
    let mark = graft_ebpf::GraftSk {
        endpoint: 1,
        flags: 0,
        cookie: 0,
    };
    // Both marks before listen(): each instance learns the listener there,
    // and a client joins a splice map only toward a listener it knows.
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let l = marked_tcp(&mut c, &srv, &addr);
    fmark.insert(&l.as_raw_fd(), mark, 0).unwrap();
    bind(&l, &addr).unwrap();
    listen(&l, 16);
    let l = TcpListener::from(l);
    let s = socket(libc::AF_INET, libc::SOCK_STREAM);
    c.register_socket(s.as_fd(), &cli).unwrap();
    fmark.insert(&s.as_raw_fd(), mark, 0).unwrap();
    connect(&s, &l.local_addr().unwrap()).unwrap();
    let (a, _) = l.accept().unwrap();
    let out = pattern(1 << 20, 3);
    let back = pattern(1 << 16, 4);
    let (got_srv, got_cli) = exchange(a, TcpStream::from(s), &back, &out);
    assert!(got_srv == out && got_cli == back, "bytes differ");
    // The client's insertion fails; the accepted socket does not try, as
    // its client did not join.
    let line = c.splice_problem().expect("the EBUSY is reported");
    assert!(
        line.contains("1 connection(s)") && line.contains("EBUSY"),
        "{line}"
    );
    assert_eq!(c.splice_problem(), None, "reported once");
    let k = c.counters(&cli).unwrap();
    assert_eq!((k.splice_refused, k.spliced_bytes), (1, 0), "{k:?}");
    drop(c);
    drop(foreign);
    let _ = std::fs::remove_dir(&dir);
}

const SO_BINDTOIFINDEX: i32 = 62;

fn setopt(fd: &impl AsFd, level: i32, name: i32, val: &[u8]) -> std::io::Result<()> {
    sockopt::set(fd.as_fd(), level, name, val)
}

fn getopt_int(fd: &impl AsFd, level: i32, name: i32) -> i32 {
    sockopt::get_int(fd.as_fd(), level, name).expect("getsockopt")
}

fn one() -> [u8; 4] {
    1i32.to_ne_bytes()
}

/// The options graftd refuses in broker requests that a socket of `family`
/// accepts:
/// (label, level, name, value).
fn escapes(family: i32) -> Vec<(&'static str, i32, i32, Vec<u8>)> {
    let mut v = vec![
        (
            "SO_BINDTODEVICE",
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            b"lo\0".to_vec(),
        ),
        (
            "SO_BINDTOIFINDEX",
            libc::SOL_SOCKET,
            SO_BINDTOIFINDEX,
            one().to_vec(),
        ),
        (
            "SO_MARK",
            libc::SOL_SOCKET,
            libc::SO_MARK,
            7i32.to_ne_bytes().to_vec(),
        ),
    ];
    // The IPv4 level applies to IPv6 sockets too (the kernel hands SOL_IP
    // down to ip_setsockopt), so both families get these.
    let mut flags = vec![
        ("IP_TRANSPARENT", libc::SOL_IP, libc::IP_TRANSPARENT),
        ("IP_FREEBIND", libc::SOL_IP, libc::IP_FREEBIND),
    ];
    if family == libc::AF_INET6 {
        flags.push(("IPV6_TRANSPARENT", libc::SOL_IPV6, libc::IPV6_TRANSPARENT));
        flags.push(("IPV6_FREEBIND", libc::SOL_IPV6, libc::IPV6_FREEBIND));
    }
    v.extend(flags.into_iter().map(|(n, l, o)| (n, l, o, one().to_vec())));
    v
}

/// Runs python3 moved into `cgroup` first (it waits for a line on stdin),
/// with `fd` inherited as descriptor `fd` (the caller made it inheritable).
/// Returns its stdout.
fn python_in_cgroup(cgroup: &std::path::Path, script: &str, arg: &str) -> String {
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("import sys\nsys.stdin.readline()\n{script}"))
        .arg(arg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python3");
    std::fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 failed: {}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn setsockopt_guard_refuses_escape_options_on_grafted_sockets() {
    let Some((_g, mut c)) = start("sockopt", false) else {
        return;
    };
    let [ep] = endpoints_here(&mut c, ["ep-sockopt"]);
    let mut refused = 0u64;

    for (family, ty) in [
        (libc::AF_INET, libc::SOCK_STREAM),
        (libc::AF_INET6, libc::SOCK_STREAM),
        (libc::AF_INET, libc::SOCK_DGRAM),
        (libc::AF_INET6, libc::SOCK_DGRAM),
    ] {
        // Marked: every escape option is refused, and nothing was applied.
        let s = socket(family, ty);
        c.register_socket(s.as_fd(), &ep).unwrap();
        for (what, level, name, val) in escapes(family) {
            let e = setopt(&s, level, name, &val).unwrap_err();
            assert_eq!(
                errno(&e),
                libc::EPERM,
                "{what} on marked {family}/{ty}: {e}"
            );
            refused += 1;
        }
        assert_eq!(getopt_int(&s, libc::SOL_SOCKET, libc::SO_MARK), 0);
        assert_eq!(getopt_int(&s, libc::SOL_SOCKET, SO_BINDTOIFINDEX), 0);
        // Ordinary options still reach the kernel.
        setopt(
            &s,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &65536i32.to_ne_bytes(),
        )
        .expect("SO_RCVBUF on a marked socket");
        assert!(getopt_int(&s, libc::SOL_SOCKET, libc::SO_RCVBUF) >= 65536);
        if ty == libc::SOCK_STREAM {
            setopt(&s, libc::IPPROTO_TCP, libc::TCP_NODELAY, &one())
                .expect("TCP_NODELAY on a marked socket");
            assert_eq!(getopt_int(&s, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        }

        // Unmarked, same cgroup: the kernel decides (root may set them all).
        let u = socket(family, ty);
        for (what, level, name, val) in escapes(family) {
            setopt(&u, level, name, &val)
                .unwrap_or_else(|e| panic!("{what} on unmarked {family}/{ty}: {e}"));
        }
        assert_eq!(getopt_int(&u, libc::SOL_SOCKET, libc::SO_MARK), 7);
    }

    // An option value larger than a page passes through whole: the program
    // sees only the first page and hands the original back (optlen 0).
    // Kernels since 6.5 fall back to the original on their own, so there
    // this only shows the guard does not break long values; before 6.5 it
    // would fail with EFAULT without that. TCP_CONGESTION reads a name up to
    // its first NUL, so a long zero-padded buffer is a valid value.
    let s = socket(libc::AF_INET, libc::SOCK_STREAM);
    c.register_socket(s.as_fd(), &ep).unwrap();
    let mut big = vec![0u8; 3 * 4096];
    big[..5].copy_from_slice(b"reno\0");
    setopt(&s, libc::IPPROTO_TCP, libc::TCP_CONGESTION, &big)
        .expect("TCP_CONGESTION with a 12 KiB buffer on a marked socket");
    let e = setopt(&s, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, &big).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "long SO_BINDTODEVICE: {e}");
    refused += 1;
    // Accepted connections inherit the mark (BPF_F_CLONE) and the guard.
    let l = socket(libc::AF_INET, libc::SOCK_STREAM);
    c.register_socket(l.as_fd(), &ep).unwrap();
    bind(&l, &"127.0.0.1:0".parse().unwrap()).unwrap();
    listen(&l, 8);
    let l = TcpListener::from(l);
    let cli = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (acc, _) = l.accept().unwrap();
    let e = setopt(&acc, libc::SOL_SOCKET, libc::SO_MARK, &one()).unwrap_err();
    assert_eq!(errno(&e), libc::EPERM, "SO_MARK on an accepted socket: {e}");
    refused += 1;
    drop((cli, acc));

    // The hook runs by the socket's cgroup, not the caller's: a process in
    // another cgroup (the one we came from) is refused on a marked socket
    // created here...
    let s = socket(libc::AF_INET, libc::SOCK_STREAM);
    c.register_socket(s.as_fd(), &ep).unwrap();
    // SAFETY: plain dup(2) (no CLOEXEC, so the child inherits it); checked.
    let inherit = unsafe { libc::dup(s.as_raw_fd()) };
    assert!(inherit >= 0);
    // SAFETY: inherit was just returned by dup(2) and is owned by nobody else.
    let inherit = unsafe { OwnedFd::from_raw_fd(inherit) };
    let out = python_in_cgroup(
        &c.original_cgroup(),
        "import socket\n\
         s = socket.socket(fileno=int(sys.argv[1]))\n\
         for n in (socket.SO_MARK, socket.SO_BINDTODEVICE):\n\
         \x20   try:\n\
         \x20       s.setsockopt(socket.SOL_SOCKET, n, 7 if n == socket.SO_MARK else b'lo')\n\
         \x20       print('applied')\n\
         \x20   except OSError as e:\n\
         \x20       print('errno', e.errno)\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         print('nodelay', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))\n\
         s.detach()\n",
        &inherit.as_raw_fd().to_string(),
    );
    drop(inherit);
    assert_eq!(
        out,
        format!("errno {0}\nerrno {0}\nnodelay 1\n", libc::EPERM),
        "marked socket used from another cgroup"
    );
    refused += 2;
    assert_eq!(getopt_int(&s, libc::SOL_SOCKET, libc::SO_MARK), 0);

    // ...while a socket created in that other cgroup is not seen, even
    // when marked and used from here. The child makes it after moving, and
    // we take a copy with pidfd_getfd.
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket, sys\n\
             sys.stdin.readline()\n\
             s = socket.socket()\n\
             print(s.fileno(), flush=True)\n\
             sys.stdin.readline()\n",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python3");
    std::fs::write(
        c.original_cgroup().join("cgroup.procs"),
        child.id().to_string(),
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let remote: i32 = line.trim().parse().expect("child's fd number");
    // SAFETY: pidfd_open(2) on our own live child; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id(), 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd is a descriptor we own from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd(2) with a valid pidfd; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), remote, 0) } as i32;
    assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor pidfd_getfd just installed for us.
    let foreign = unsafe { OwnedFd::from_raw_fd(fd) };
    c.register_socket(foreign.as_fd(), &ep).unwrap();
    assert!(c.socket_endpoint(foreign.as_fd()).is_some());
    setopt(
        &foreign,
        libc::SOL_SOCKET,
        libc::SO_MARK,
        &7i32.to_ne_bytes(),
    )
    .expect("SO_MARK on a marked socket of another cgroup");
    assert_eq!(getopt_int(&foreign, libc::SOL_SOCKET, libc::SO_MARK), 7);
    drop(stdin);
    assert!(child.wait().unwrap().success());

    assert_eq!(c.counters(&ep).unwrap().policy_denied, refused);
}

/// The program `name` of `ebpf`, as its type `P`.
fn program<'a, P>(ebpf: &'a mut aya::Ebpf, name: &str) -> &'a mut P
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    <&'a mut P as TryFrom<&'a mut aya::programs::Program>>::Error: std::fmt::Debug,
{
    ebpf.program_mut(name).unwrap().try_into().unwrap()
}

/// Removes an (empty) directory when dropped: a test's own cgroup.
struct RemoveDirOnDrop(std::path::PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
