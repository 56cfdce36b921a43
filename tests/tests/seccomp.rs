//! seccomp mode: programs LD_PRELOAD cannot reach — a static Go binary
//! (CGO_ENABLED=0), a static musl program, busybox — run under the static
//! `graft` launcher in a loopback-only namespace, their sockets grafted by
//! graftd through seccomp user notification. Every test checks what crossed
//! the wire on the host side (bytes and real peer addresses), that unmatched
//! sockets stay on the container's stack, and the fail-closed errors.
//!
//! The probe programs are built by the tests (tests/programs/), once per
//! test process, into target/seccomp-probes (Go's cache too, so nothing
//! lands in the user's home and a rerun does not rebuild the standard
//! library).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use graft_tests::*;

const LIMIT: Duration = Duration::from_secs(30);

/// The egress rule most tests use.
const OUT4: &[&str] = &["-e", "0.0.0.0/0=ep-out4"];

fn probes_dir() -> PathBuf {
    let d = workspace_root().join("target/seccomp-probes");
    std::fs::create_dir_all(&d).expect("probe dir");
    d
}

/// Runs the compiler line `c`, which writes `out`; its stderr if it fails.
fn built(c: &mut Command, out: PathBuf) -> Result<PathBuf, String> {
    let o = c.stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(text(&o.stderr));
    }
    Ok(out)
}

/// A probe built once per test process by `build`, which needs `tool`
/// (from Debian's `pkg`); `None` with the skip line when it is missing.
fn probe_once(
    test: &str,
    (tool, pkg): (&str, &str),
    cell: &'static OnceLock<Result<PathBuf, String>>,
    build: impl FnOnce() -> Result<PathBuf, String>,
) -> Option<PathBuf> {
    if which(tool).is_none() {
        println!("SKIP: {test}: `{tool}` is not installed ({pkg})");
        return None;
    }
    let r = cell.get_or_init(build);
    Some(r.clone().unwrap_or_else(|e| panic!("{tool} failed: {e}")))
}

/// The static Go probe, or `None` with the skip line.
fn go_probe(test: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    probe_once(test, ("go", "golang-go"), &BUILT, || {
        let d = probes_dir();
        let out = d.join(unique("go-probe-"));
        let mut o = Command::new("go");
        o.arg("build")
            .arg("-o")
            .arg(&out)
            .arg(workspace_root().join("tests/programs/seccomp_probe.go"))
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", d.join("gocache"))
            .env("GOPATH", d.join("gopath"))
            .env("GOFLAGS", "-mod=mod")
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off");
        built(&mut o, out)
    })
}

/// The static musl probe, or `None` with the skip line.
fn musl_probe(test: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    probe_once(test, ("musl-gcc", "musl-tools"), &BUILT, || {
        let out = probes_dir().join(unique("musl-probe-"));
        let mut o = Command::new("musl-gcc");
        o.args(["-static", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&out)
            .arg(workspace_root().join("tests/programs/seccomp_probe.c"));
        built(&mut o, out)
    })
}

/// The test's [`Env`] (needing `tools`), then its probe program; `None`
/// (after the probe's or the harness's SKIP line) when either is missing.
fn env_and(
    test: &str,
    tools: &[&str],
    probe: fn(&str) -> Option<PathBuf>,
) -> Option<(Env, PathBuf)> {
    let env = Env::new(test, tools)?;
    Some((env, probe(test)?))
}

/// [`env_and`], with the usual [`endpoints`] added: their ports too.
fn probe_env(
    test: &str,
    tools: &[&str],
    probe: fn(&str) -> Option<PathBuf>,
) -> Option<(Env, PathBuf, (u16, u16))> {
    let (env, prog) = env_and(test, tools, probe)?;
    let ports = endpoints(&env);
    Some((env, prog, ports))
}

/// `graft ARGS -- PROG PARGS` in the test's namespace, output piped.
fn graft_cmd(env: &Env, rules: &[&str], prog: &Path, pargs: &[&str]) -> Command {
    let mut a: Vec<&str> = rules.to_vec();
    a.push("--");
    let p = prog.display().to_string();
    let mut c = env.graft(&a);
    c.arg(&p).args(pargs);
    c
}

/// Runs a grafted server until it prints "listening"; returns it.
fn serve(env: &Env, rules: &[&str], prog: &Path, pargs: &[&str]) -> Proc {
    let mut c = graft_cmd(env, rules, prog, pargs);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut p = Proc::spawn(c, "grafted server");
    let so = p.child.stdout.take().expect("piped");
    wait_line(so, "listening", LIMIT);
    p
}

/// Runs a grafted client to completion: (status ok, stdout, stderr).
fn client(env: &Env, rules: &[&str], prog: &Path, pargs: &[&str]) -> (bool, String, String) {
    let o = output_within(
        graft_cmd(env, rules, prog, pargs),
        "grafted client",
        LIMIT,
        None,
    );
    (o.status.success(), text(&o.stdout), text(&o.stderr))
}

/// Connects from the host side to a grafted server and reads its line;
/// returns (what it said, our own address).
fn ask_tcp(addr: SocketAddr) -> (String, SocketAddr) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, LIMIT).expect("connect to endpoint");
    s.set_read_timeout(Some(LIMIT)).expect("timeout");
    let me = s.local_addr().expect("local addr");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    (out, me)
}

/// Connects from the host to a grafted server's endpoint `addr` and
/// checks that the server saw our own address.
fn assert_sees_us(addr: &str) {
    let (said, me) = ask_tcp(addr.parse().unwrap());
    assert_eq!(said, format!("peer={me}\n"), "{addr}");
}

/// A host-side TCP server for one connection: returns what it received and
/// the peer address, after answering `reply`.
fn host_tcp_once(
    l: TcpListener,
    reply: &'static [u8],
) -> std::thread::JoinHandle<(Vec<u8>, SocketAddr)> {
    l.set_nonblocking(false).expect("blocking");
    std::thread::spawn(move || {
        let (mut c, peer) = l.accept().expect("accept");
        c.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        c.write_all(reply).expect("reply");
        (got, peer)
    })
}

/// [`host_tcp_once`] on a new listener at `at`, and its address.
fn host_tcp_at(at: impl std::net::ToSocketAddrs, reply: &'static [u8]) -> (SocketAddr, Host) {
    let l = TcpListener::bind(at).expect("host listener");
    (l.local_addr().unwrap(), host_tcp_once(l, reply))
}

/// [`host_udp_once`] on a new socket at `at`, and its address.
fn host_udp_at(at: impl std::net::ToSocketAddrs, reply: &'static [u8]) -> (SocketAddr, Host) {
    let s = UdpSocket::bind(at).expect("host udp");
    (s.local_addr().unwrap(), host_udp_once(s, reply))
}

/// A host-side thread's result: what it received, and from whom.
type Host = std::thread::JoinHandle<(Vec<u8>, SocketAddr)>;

/// A host-side UDP responder for one datagram.
fn host_udp_once(
    s: UdpSocket,
    reply: &'static [u8],
) -> std::thread::JoinHandle<(Vec<u8>, SocketAddr)> {
    std::thread::spawn(move || {
        s.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut b = [0u8; 1500];
        let (n, peer) = s
            .recv_from(&mut b)
            .expect("datagram from the grafted client");
        s.send_to(reply, peer).expect("reply");
        (b[..n].to_vec(), peer)
    })
}

/// Reads an HTTP request head from `c`.
fn http_request(c: &mut std::net::TcpStream) -> Vec<u8> {
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut req = Vec::new();
    let mut b = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "request cut short");
        req.extend_from_slice(&b[..n]);
    }
    req
}

/// Waits for the grafted server `srv` to exit well; one of its graft lines
/// contains `what` and says seccomp.
fn assert_seccomp_line(srv: &mut Proc, what: &str) {
    assert!(srv.wait_timeout(LIMIT).success());
    let (_, err) = take_output(srv);
    assert!(
        graft_lines(&err)
            .iter()
            .any(|l| l.contains(what) && l.ends_with("(seccomp)")),
        "{err}"
    );
}

fn endpoints(env: &Env) -> (u16, u16) {
    let (p4, p6) = (free_port(), free_port());
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {p4}"));
    env.add(&format!("ep-in6 type ipv6 addr ::1 port {p6}"));
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    env.add("ep-out6 type ipv6 addr ::1 port dynamic");
    (p4, p6)
}

#[test]
fn go_static_tcp_ingress_egress_v4_v6() {
    let test = "go_static_tcp_ingress_egress_v4_v6";
    let Some((env, go, (p4, p6))) = probe_env(test, &[], go_probe) else {
        return;
    };

    // Ingress: the Go server binds 8080 in the namespace; the host reaches
    // it on the endpoint, and the server sees our real address.
    let mut servers = Vec::new();
    for (rule, bind, ep) in [
        ("0.0.0.0:8080=ep-in4", ":8080", format!("127.0.0.1:{p4}")),
        (":::8081=ep-in6", "[::]:8081", format!("[::1]:{p6}")),
    ] {
        servers.push(serve(&env, &["-i", rule], &go, &["tcp-serve", bind]));
        assert_sees_us(&ep);
    }

    // Egress: nothing listens on the namespace's loopback, the host does.
    for (host, rule) in [("127.0.0.1", "0.0.0.0/0=ep-out4"), ("::1", "::/0=ep-out6")] {
        let (dst, h) = host_tcp_at((host, 0), b"ack from host");
        let (ok, out, err) = client(
            &env,
            &["-v", "-e", rule],
            &go,
            &["tcp-get", &dst.to_string(), "hello from go"],
        );
        assert!(ok, "go client failed: {out} {err}");
        assert_eq!(out, "got ack from host\n");
        let (got, peer) = h.join().expect("host side");
        assert_eq!(got, b"hello from go");
        assert_eq!(peer.ip(), dst.ip(), "peer is the endpoint's host address");
        let lines = graft_lines(&err);
        // The endpoint's address; with the bind guard its port is chosen
        // at connect (IP_BIND_ADDRESS_NO_PORT) and the line says so, without
        // the eBPF companion graftd bound a port already.
        let at_connect = format!("(host {}, port chosen at connect)", peer.ip());
        let bound = match peer {
            SocketAddr::V4(a) => format!("(host {}:", a.ip()),
            SocketAddr::V6(a) => format!("(host [{}]:", a.ip()),
        };
        assert_line(&lines, |l| {
            l.contains(&format!("connect {dst} -> ep-out"))
                && (l.contains(&at_connect) || l.contains(&bound))
                && l.ends_with("(seccomp)")
        });
        assert_line(&lines, |l| l.contains("seccomp mode (statically linked)"));
    }

    // Unmatched: a server on the namespace's own loopback (no ingress rule)
    // and an excluded client meet on the container's stack.
    let _local = serve(&env, OUT4, &go, &["tcp-serve", "127.0.0.1:9090"]);
    let (ok, out, err) = client(
        &env,
        &["-x", "127.0.0.0/8", "-e", "0.0.0.0/0=ep-out4"],
        &go,
        &["tcp-get", "127.0.0.1:9090", "x"],
    );
    assert!(ok, "{out} {err}");
    assert!(out.starts_with("got peer=127.0.0.1:"), "{out}");
    assert!(
        std::net::TcpStream::connect("127.0.0.1:9090").is_err(),
        "the unmatched server must not be on the host"
    );
}

#[test]
fn go_static_udp_ingress_egress_v4_v6() {
    let Some((env, go, (p4, p6))) = probe_env("go_static_udp_ingress_egress_v4_v6", &[], go_probe)
    else {
        return;
    };
    for (rule, bind, dst) in [
        ("0.0.0.0:5353=ep-in4", ":5353", format!("127.0.0.1:{p4}")),
        (":::5354=ep-in6", "[::]:5354", format!("[::1]:{p6}")),
    ] {
        let _srv = serve(&env, &["-i", rule], &go, &["udp-serve", bind]);
        let dst: SocketAddr = dst.parse().unwrap();
        let s = UdpSocket::bind((dst.ip(), 0)).expect("host udp");
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.send_to(b"ping", dst).unwrap();
        let mut b = [0u8; 200];
        let (n, from) = s.recv_from(&mut b).expect("answer from the grafted server");
        assert_eq!(from, dst, "answer comes from the endpoint");
        assert_eq!(
            text(&b[..n]),
            format!("peer={} data=ping", s.local_addr().unwrap())
        );
    }
    for (host, rule) in [("127.0.0.1", "0.0.0.0/0=ep-out4"), ("::1", "::/0=ep-out6")] {
        let (dst, h) = host_udp_at((host, 0), b"pong");
        let (ok, out, err) = client(
            &env,
            &["-e", rule],
            &go,
            &["udp-ask", &dst.to_string(), "hey"],
        );
        assert!(ok, "{out} {err}");
        assert_eq!(out, "got pong\n");
        let (got, peer) = h.join().expect("host side");
        assert_eq!((got.as_slice(), peer.ip()), (&b"hey"[..], dst.ip()));
    }
}

#[test]
fn musl_static_tcp_and_udp_sendto_sendmsg() {
    let test = "musl_static_tcp_and_udp_sendto_sendmsg";
    let Some((env, c, (p4, _))) = probe_env(test, &[], musl_probe) else {
        return;
    };
    let _srv = serve(
        &env,
        &["-i", "0.0.0.0:80=ep-in4"],
        &c,
        &["tcp-serve", "0.0.0.0", "80"],
    );
    assert_sees_us(&format!("127.0.0.1:{p4}"));

    let (dst, h) = host_tcp_at("[::1]:0", b"ack6");
    let port = dst.port().to_string();
    let (ok, out, err) = client(
        &env,
        &["-e", "::/0=ep-out6"],
        &c,
        &["tcp-get", "::1", &port, "hi musl"],
    );
    assert!(ok, "{out} {err}");
    assert_eq!(out, "got ack6\n");
    let (got, peer) = h.join().unwrap();
    assert_eq!((got.as_slice(), peer.ip()), (&b"hi musl"[..], dst.ip()));

    for mode in ["udp-sendto", "udp-sendmsg"] {
        let (dst, h) = host_udp_at("127.0.0.1:0", b"pong");
        let port = dst.port().to_string();
        let (ok, out, err) = client(&env, OUT4, &c, &[mode, "127.0.0.1", &port, mode]);
        assert!(ok, "{mode}: {out} {err}");
        assert_eq!(out, format!("got pong from {dst}\n"));
        let (got, peer) = h.join().unwrap();
        assert_eq!((text(&got), peer.ip()), (mode.to_owned(), dst.ip()));
    }
}

/// The grafted socket keeps its descriptor number, close-on-exec flag and
/// O_NONBLOCK, whichever way the program made it (graftd reads the flag
/// from the program's fdinfo and passes it to SECCOMP_IOCTL_NOTIF_ADDFD).
#[test]
fn descriptor_flags_survive_the_graft() {
    let test = "descriptor_flags_survive_the_graft";
    let Some((env, c, _)) = probe_env(test, &[], musl_probe) else {
        return;
    };
    for flags in ["none", "cloexec", "nonblock", "cloexec,nonblock"] {
        let (dst, h) = host_tcp_at("127.0.0.1:0", b"ack");
        let port = dst.port().to_string();
        let mut cmd = graft_cmd(&env, OUT4, &c, &["tcp-get", "127.0.0.1", &port, flags]);
        cmd.env("PROBE_FLAGS", flags);
        let o = output_within(cmd, "grafted client", LIMIT, None);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "{flags}: {out} {err}");
        assert_eq!(out, "got ack\n", "{flags}");
        let want = format!(
            "probe: fd 3 cloexec={} nonblock={}",
            u8::from(flags.contains("cloexec")),
            u8::from(flags.contains("nonblock"))
        );
        assert!(err.contains(&want), "{flags}: want {want:?} in {err}");
        let (got, peer) = h.join().unwrap();
        assert_eq!((text(&got), peer.ip()), (flags.to_owned(), dst.ip()));
    }
}

/// A host-side listener that takes `n` connections, one after the other,
/// and hands each to `f`; returns its address and `f`'s results.
fn host_tcp_serving<T: Send + 'static>(
    n: usize,
    f: impl Fn(&mut std::net::TcpStream, SocketAddr) -> T + Send + 'static,
) -> (SocketAddr, std::thread::JoinHandle<Vec<T>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (mut c, peer) = l.accept().unwrap();
                f(&mut c, peer)
            })
            .collect()
    });
    (dst, h)
}

/// Reads a grafted client's request to its end, then answers "ok"; returns
/// what `ss` says of the client's socket, which is on this (host) stack.
fn ss_of_peer(c: &mut std::net::TcpStream, peer: SocketAddr) -> String {
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    let ss = run("ss", ["-Htmn", &format!("sport = :{}", peer.port())]);
    c.write_all(b"ok").unwrap();
    text(&ss.stdout)
}

/// A world with busybox and the usual endpoints (their ports), or `None`
/// after the skip line.
fn busybox_env(test: &str) -> Option<(Env, PathBuf, (u16, u16))> {
    let env = Env::new(test, &["busybox"])?;
    let bb = which("busybox").expect("checked");
    let ports = endpoints(&env);
    Some((env, bb, ports))
}

#[test]
fn busybox_httpd_and_wget() {
    let Some((env, bb, (p4, _))) = busybox_env("busybox_httpd_and_wget") else {
        return;
    };
    let www = env.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "served by busybox httpd\n").unwrap();
    let www = www.display().to_string();
    let mut c = graft_cmd(
        &env,
        &["-i", "0.0.0.0:80=ep-in4"],
        &bb,
        &["httpd", "-f", "-p", "0.0.0.0:80", "-h", &www],
    );
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let _httpd = Proc::spawn(c, "busybox httpd");
    let ep: SocketAddr = format!("127.0.0.1:{p4}").parse().unwrap();
    wait_tcp(ep, LIMIT);
    let got = text(&tcp_exchange(
        ep,
        b"GET /index.html HTTP/1.0\r\n\r\n",
        LIMIT,
    ));
    assert!(
        got.starts_with("HTTP/1.") && got.ends_with("served by busybox httpd\n"),
        "{got}"
    );

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut c, peer) = l.accept().unwrap();
        let req = http_request(&mut c);
        c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nhost says hi\r\n")
            .unwrap();
        (text(&req), peer)
    });
    let url = format!("http://{dst}/x");
    let (ok, out, err) = client(&env, OUT4, &bb, &["wget", "-q", "-O", "-", &url]);
    assert!(ok, "{out} {err}");
    assert_eq!(out, "host says hi\r\n");
    let (req, peer) = h.join().unwrap();
    assert!(req.starts_with("GET /x HTTP/1."), "{req}");
    assert_eq!(peer.ip(), dst.ip());
}

/// graftd's threads named `name`.
fn threads_named(pid: i32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .count()
        })
        .unwrap_or(0)
}

/// On a kernel that ends a waiting `recv` once its program exited, each
/// supervisor waits in `recv` with the same-CPU hand-over: every trapped
/// connect still goes through, and the supervisor thread still ends with
/// its program (a supervisor that missed the end would stay, spinning on
/// ENOENT or asleep for good).
#[test]
fn supervisors_end_with_their_programs() {
    let test = "supervisors_end_with_their_programs";
    let Some((env, bb, _)) = busybox_env(test) else {
        return;
    };
    let (dst, h) = host_tcp_serving(3, |c, peer| {
        http_request(c);
        c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nhi\n")
            .unwrap();
        peer
    });
    let url = format!("http://{dst}/");
    for _ in 0..3 {
        let (ok, out, err) = client(&env, OUT4, &bb, &["wget", "-q", "-O", "-", &url]);
        assert!(ok, "{out} {err}");
        assert_eq!(out, "hi\n");
    }
    assert_eq!(h.join().unwrap().len(), 3);
    let pid = env.d.proc.pid();
    wait_until("every seccomp supervisor ended", LIMIT, || {
        threads_named(pid, "seccomp") == 0
    });
    let log = env.d.log_text();
    let release = run_ok("uname", ["-r"]);
    let mut v = release
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) >= (6, 11) {
        assert!(
            log.contains("seccomp supervisors wait in recv"),
            "Linux {release} ends a waiting recv, yet graftd did not use it:\n{log}"
        );
    } else {
        println!("{test}: Linux {release}: supervisors poll (recv-wait needs 6.11)");
    }
}

/// The one line of a call on `ep-nope`, which does not exist.
fn no_ep_nope(call: &str) -> String {
    format!(
        "graft: {call}: endpoint \"ep-nope\" does not exist in this network namespace: add it \
         with \"ip graft add ep-nope type ipv4 addr ADDR port PORT\""
    )
}

#[test]
fn fail_closed_without_graftd_or_endpoint() {
    let test = "fail_closed_without_graftd_or_endpoint";
    let Some((env, c)) = env_and(test, &[], musl_probe) else {
        return;
    };
    // No broker at all (a name nobody serves): the launcher refuses to run
    // the program rather than run it ungrafted.
    let mut cmd = graft_cmd(
        &env,
        &["-n", "-e", "0.0.0.0/0=ep-out4"],
        &c,
        &["tcp-get", "127.0.0.1", "9", "x"],
    );
    cmd.env("GRAFT_BROKER", unique("graft-test/nobody-"));
    let o = output_within(cmd, "graft without graftd", LIMIT, None);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    let lines = graft_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("does not answer in this network namespace (ECONNREFUSED")
            && lines[0].contains("ip graft add ep-out4 type"),
        "{err}"
    );
    assert_eq!(text(&o.stdout), "", "the program did not run");

    // The broker answers but the endpoint is missing (check skipped): the
    // program's own calls fail with the preload library's errno and line.
    env.add("ep-other type ipv4 addr 127.0.0.1 port dynamic");
    let (ok, out, err) = client(
        &env,
        &["-n", "-e", "0.0.0.0/0=ep-nope"],
        &c,
        &["tcp-get", "127.0.0.1", "9", "x"],
    );
    assert!(!ok, "{out}");
    assert_eq!(
        graft_lines(&err),
        [no_ep_nope("connect 127.0.0.1:9")],
        "{err}"
    );
    assert!(err.contains("probe: connect: Network unreachable"), "{err}");
    let (ok, _, err) = client(
        &env,
        &["-n", "-i", "0.0.0.0:80=ep-nope"],
        &c,
        &["tcp-serve", "0.0.0.0", "80"],
    );
    assert!(!ok);
    assert_eq!(graft_lines(&err), [no_ep_nope("bind 0.0.0.0:80")], "{err}");
    assert!(err.contains("probe: bind: Address not available"), "{err}");
}

/// A Go `ListenPacket(":0")` socket is bound (port 0) and registered with
/// epoll before its first `WriteTo`: grafting it then would leave epoll
/// watching the old socket and the program waiting forever, so the send is
/// refused with EPERM and one line saying why and what to do.
#[test]
fn bound_udp_socket_in_epoll_is_refused_clearly() {
    let test = "bound_udp_socket_in_epoll_is_refused_clearly";
    let Some((env, go, _)) = probe_env(test, &[], go_probe) else {
        return;
    };
    let s = UdpSocket::bind("127.0.0.1:0").expect("host udp");
    s.set_nonblocking(true).unwrap();
    let dst = s.local_addr().unwrap();
    let (ok, out, err) = client(&env, OUT4, &go, &["udp-sendto", &dst.to_string(), "x"]);
    assert!(!ok, "{out}");
    assert_eq!(
        graft_lines(&err),
        vec![format!(
            "graft: sendto [::ffff:{}]:{}: endpoint \"ep-out4\": the socket was bound and added to epoll \
             before its first send, and a grafted socket cannot inherit that registration: bind \
             it to an address an ingress rule maps (-i), or send before adding it to epoll (fd 3)",
            dst.ip(),
            dst.port()
        )],
        "{err}"
    );
    assert!(err.contains("sendto: operation not permitted"), "{err}");
    let mut b = [0u8; 16];
    assert!(s.recv_from(&mut b).is_err(), "nothing may leave ungrafted");
}

/// CONTINUE lets the kernel re-read the address after graftd checked it (a
/// second thread could rewrite it): the endpoint's in-kernel policy is what
/// holds. A denied destination is refused in seccomp mode too.
#[test]
fn in_kernel_policy_holds_in_seccomp_mode() {
    let test = "in_kernel_policy_holds_in_seccomp_mode";
    let Some((env, go)) = env_and(test, &[], go_probe) else {
        return;
    };
    let start = std::time::Instant::now();
    loop {
        let log = env.d.log_text();
        if log.contains("eBPF companion attached") {
            break;
        }
        if log.contains("eBPF companion unavailable") {
            println!("SKIP: {test}: graftd runs without its eBPF companion");
            return;
        }
        assert!(
            start.elapsed() < LIMIT,
            "graftd said nothing about eBPF:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let (dp, ap) = (denied.local_addr().unwrap(), allowed.local_addr().unwrap());
    env.add(&format!(
        "ep-out4 type ipv4 addr 127.0.0.1 port dynamic deny 127.0.0.1/32:{}",
        dp.port()
    ));
    let h = host_tcp_once(allowed, b"ok");
    let (ok, out, err) = client(&env, OUT4, &go, &["tcp-get", &ap.to_string(), "a"]);
    assert!(ok && out == "got ok\n", "{out} {err}");
    assert_eq!(h.join().unwrap().0, b"a");
    let (ok, out, err) = client(&env, OUT4, &go, &["tcp-get", &dp.to_string(), "d"]);
    assert!(!ok, "{out}");
    assert!(err.contains("connect: operation not permitted"), "{err}");
    denied.set_nonblocking(true).unwrap();
    assert!(
        denied.accept().is_err(),
        "the denied destination was reached"
    );
}

/// A tiny DNS server (python3 stdlib): answers every A query with
/// 127.0.0.1 and every other type with no record, and prints one line per
/// query with the asker's address.
const DNS_SERVER: &str = r#"import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print('ready', flush=True)
while True:
    q, peer = s.recvfrom(1500)
    qid = struct.unpack('>H', q[:2])[0]
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode())
        i += 1 + q[i]
    qtype = struct.unpack('>H', q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    print('query %s type %d from %s' % ('.'.join(labels), qtype, peer[0]), flush=True)
    ans = b''
    if qtype == 1:
        ans = b'\xc0\x0c' + struct.pack('>HHIH', 1, 1, 60, 4) + bytes([127, 0, 0, 1])
    s.sendto(struct.pack('>HHHHHH', qid, 0x8180, 1, 1 if ans else 0, 0, 0) + question + ans, peer)
"#;

/// `/etc/netns/NAME/resolv.conf` (which `ip netns exec` bind-mounts over
/// /etc/resolv.conf), removed on drop.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn new(ns: &Netns, server: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {server}\noptions timeout:2 attempts:2\n"),
        )
        .expect("write resolv.conf");
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// glibc's resolver (getent, python's getaddrinfo, curl) and Go's own
/// resolver, inside a loopback-only namespace, resolve through the egress
/// endpoint: their queries reach a DNS server on the host side from the
/// endpoint's address. glibc opens those sockets through internal calls the
/// preload library never sees; the filter installed in preload mode too
/// catches them, while the library's own calls pass it in the kernel.
#[test]
fn name_lookups_go_through_the_egress_endpoint() {
    let test = "name_lookups_go_through_the_egress_endpoint";
    let Some(env) = Env::new(test, &["python3", "getent", "curl"]) else {
        return;
    };
    let go = go_probe(test);
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    let server = format!(
        "127.53.{}.{}",
        std::process::id() % 250 + 1,
        (std::process::id() / 250) % 250 + 1
    );
    let script = env.script("dns.py", DNS_SERVER, &[]);
    let mut c = Command::new("python3");
    c.args([&script, &server])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut dns = Proc::spawn(c, "dns server");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let so = dns.child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(so).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    assert_eq!(rx.recv_timeout(LIMIT).expect("dns server starts"), "ready");
    let _conf = NetnsResolvConf::new(&env.ns, &server);
    let name = format!("{}.graft.test", unique("svc-"));
    let queries = |rx: &std::sync::mpsc::Receiver<String>| -> Vec<String> {
        std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(300)).ok())
            .filter(|l| l.contains(&name))
            .collect()
    };

    // Without graft nothing answers on the namespace's loopback.
    let mut plain = env.ns.cmd("getent");
    plain.args(["hosts", &name]);
    let o = output_within(plain, "plain getent", LIMIT, None);
    assert!(!o.status.success(), "resolved without graft?");
    assert!(queries(&rx).is_empty());

    let rule = ["-e", "0.0.0.0/0=ep-out4", "--"];
    let mut c = env.graft(&rule);
    c.args(["getent", "hosts", &name]);
    let (out, err) = output_ok_within(c, "getent under graft", LIMIT);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["127.0.0.1", &name],
        "{err}"
    );
    let q = queries(&rx);
    assert!(
        !q.is_empty() && q.iter().all(|l| l.ends_with("from 127.0.0.1")),
        "{q:?}"
    );

    let mut c = env.graft(&rule);
    c.args([
        "python3",
        "-c",
        "import socket,sys; print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)[0][4][0])",
        &name,
    ]);
    let (out, err) = output_ok_within(c, "python getaddrinfo under graft", LIMIT);
    assert_eq!(out, "127.0.0.1\n", "{err}");
    assert!(!queries(&rx).is_empty());

    // curl: resolves NAME through the endpoint, then connects through it
    // to the host's server.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let req = http_request(&mut c);
        c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nfound\n")
            .unwrap();
        text(&req)
    });
    let mut c = env.graft(&rule);
    c.args([
        "curl",
        "-sS",
        "--max-time",
        "20",
        &format!("http://{name}:{port}/"),
    ]);
    let (out, err) = output_ok_within(c, "curl under graft", LIMIT);
    assert_eq!(out, "found\n", "{err}");
    assert!(h.join().unwrap().contains(&format!("Host: {name}:{port}")));

    if let Some(go) = go {
        let (ok, out, err) = client(&env, OUT4, &go, &["resolve", &name]);
        assert!(ok, "{out} {err}");
        assert_eq!(out, "addr 127.0.0.1\n");
        let q = queries(&rx);
        assert!(
            !q.is_empty() && q.iter().all(|l| l.ends_with("from 127.0.0.1")),
            "{q:?}"
        );
    }
}

/// A container and the image it runs, both removed on drop.
struct DockerThings {
    container: String,
    image: String,
}

impl Drop for DockerThings {
    fn drop(&mut self) {
        let _ = run("docker", ["rm", "-f", &self.container]);
        let _ = run("docker", ["rmi", "-f", &self.image]);
    }
}

/// A scratch image holding the static Go probe as `/app`, for a container
/// of `test`'s; `None` (one skip line) without a Docker engine or Go.
fn go_scratch_image(test: &str, env: &Env) -> Option<DockerThings> {
    if !run("docker", ["info"]).status.success() {
        println!("SKIP: {test}: no Docker engine answers");
        return None;
    }
    let go = go_probe(test)?;
    let ctx = env.dir.join("image");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(&go, ctx.join("app")).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM scratch\nCOPY app /app\n").unwrap();
    let things = DockerThings {
        container: unique("graft-seccomp-"),
        image: format!("{}:e2e", unique("graft-seccomp-scratch-")),
    };
    let b = run(
        "docker",
        ["build", "-q", "-t", &things.image, ctx.to_str().unwrap()],
    );
    assert!(b.status.success(), "docker build: {}", text(&b.stderr));
    Some(things)
}

/// `docker run -d --net=none` of `things`' image with the static launcher
/// mounted from the host as its entrypoint and `graft_args` after it.
fn run_scratch_grafted(env: &Env, things: &DockerThings, graft_args: &[&str]) {
    let mnt = env.dir.join("graft");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::copy(bin("graft"), mnt.join("graft")).unwrap();
    let broker = format!("GRAFT_BROKER={}", env.d.broker);
    let volume = format!("{}:/graft:ro", mnt.display());
    let r = run(
        "docker",
        [
            &[
                "run",
                "-d",
                "--name",
                &things.container,
                "--net=none",
                "-e",
                &broker,
                "-v",
                &volume,
                "--entrypoint",
                "/graft/graft",
                &things.image,
            ][..],
            graft_args,
        ]
        .concat(),
    );
    assert!(r.status.success(), "docker run: {}", text(&r.stderr));
}

/// `ip graft add NAME SPEC` inside `things`' container, with docker-ns-exec.
fn add_in_container(env: &Env, things: &DockerThings, name: &str, spec: &str) {
    let mut add = Command::new(bin("docker-ns-exec"));
    add.args([&things.container, "ip", "graft", "add", name])
        .args(spec.split(' '));
    env.d.apply(&mut add);
    let o = add.output().expect("docker-ns-exec");
    assert!(o.status.success(), "{}", text(&o.stderr));
}

/// A scratch image holding one static Go binary, run with `--net=none` and
/// the static launcher mounted from the host as its entrypoint; the
/// endpoint is added after start with docker-ns-exec (the launcher waits
/// for it); the host reaches the server and the server sees the host's
/// real address.
#[test]
fn docker_scratch_image_with_mounted_static_launcher() {
    let test = "docker_scratch_image_with_mounted_static_launcher";
    let Some(env) = Env::new(test, &["docker"]) else {
        return;
    };
    let Some(things) = go_scratch_image(test, &env) else {
        return;
    };
    let port = free_port();
    run_scratch_grafted(
        &env,
        &things,
        &[
            "--wait",
            "30",
            "-v",
            "-i",
            "0.0.0.0:8080=ep-in4",
            "--",
            "/app",
            "tcp-serve",
            ":8080",
        ],
    );
    add_in_container(
        &env,
        &things,
        "ep-in4",
        &format!("type ipv4 addr 127.0.0.1 port {port}"),
    );
    let ep: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_tcp_quiet(ep);
    let (said, me) = ask_tcp(ep);
    let logs = run("docker", ["logs", &things.container]);
    assert_eq!(said, format!("peer={me}\n"), "{}", text(&logs.stderr));
    assert!(
        text(&logs.stderr).contains("graft: /app: seccomp mode (statically linked)"),
        "{}",
        text(&logs.stderr)
    );
}

/// A static Go client in a `--net=none` container connects to a host
/// server 40 times, 50 ms apart, while graftd is killed -9 and restarted:
/// the restarted graftd takes the container program's listener again
/// (found by the pid graftd saw, in its own pid namespace), and no
/// connection fails.
#[test]
fn docker_static_client_goes_on_across_a_graftd_restart() {
    let test = "docker_static_client_goes_on_across_a_graftd_restart";
    let Some(mut env) = Env::new(test, &["docker"]) else {
        return;
    };
    let Some(things) = go_scratch_image(test, &env) else {
        return;
    };
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = c.write_all(b"hi");
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut c, &mut std::io::sink());
        }
    });
    let target = addr.to_string();
    run_scratch_grafted(
        &env,
        &things,
        &[
            "--wait",
            "30",
            "-e",
            "0.0.0.0/0=ep-out4",
            "--",
            "/app",
            "tcp-get-n",
            &target,
            "40",
        ],
    );
    add_in_container(
        &env,
        &things,
        "ep-out4",
        "type ipv4 addr 0.0.0.0 port dynamic",
    );
    let count = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    wait_until("10 connections before the restart", LIMIT, || count() >= 10);
    env.d.kill9();
    env.d.restart();
    wait_until("40 connections", LIMIT, || count() >= 40);
    let state = || {
        let st = run(
            "docker",
            [
                "inspect",
                "-f",
                "{{.State.Status}} {{.State.ExitCode}}",
                &things.container,
            ],
        );
        text(&st.stdout).trim().to_owned()
    };
    wait_until("the container to exit", LIMIT, || {
        state().starts_with("exited")
    });
    let logs = run("docker", ["logs", &things.container]);
    let out = text(&logs.stdout);
    assert_eq!(state(), "exited 0", "{out}{}", text(&logs.stderr));
    assert_eq!(out.lines().filter(|l| *l == "got hi").count(), 40, "{out}");
    assert_eq!(out.lines().last(), Some("failures 0"), "{out}");
    assert_eq!(count(), 40);
    let log = env.d.log_text();
    assert!(log.contains("served again"), "{log}");
}

/// Waits until something accepts on `addr` without connecting (a probe
/// connection would be the one-shot server's only client).
fn wait_tcp_quiet(addr: SocketAddr) {
    wait_until("the grafted server to listen", LIMIT, || {
        let out = run("ss", ["-Htln", &format!("sport = :{}", addr.port())]);
        !text(&out.stdout).trim().is_empty()
    });
}

/// Builds the C probe with `cc` and `args` (one build per test process and
/// compiler line), or `None` with the skip line.
fn c_probe(test: &str, cc: &str, args: &[&str]) -> Option<PathBuf> {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    if which(cc).is_none() {
        println!("SKIP: {test}: `{cc}` is not installed");
        return None;
    }
    let key = format!("{cc} {args:?}");
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(k, _)| *k == key) {
        return Some(p.clone());
    }
    let out = probes_dir().join(unique("c-probe-"));
    let o = Command::new(cc)
        .args(args)
        .args(["-O1", "-Wall", "-Werror", "-o"])
        .arg(&out)
        .arg(workspace_root().join("tests/programs/seccomp_probe.c"))
        .stdin(Stdio::null())
        .output()
        .expect("run the C compiler");
    assert!(o.status.success(), "{cc}: {}", text(&o.stderr));
    built.push((key, out.clone()));
    Some(out)
}

/// `--mode auto` sends a dynamically linked musl program (Alpine-like) to
/// the seccomp path; and a raw `syscall(SYS_connect)` is grafted in both
/// modes: from the musl program (seccomp) and from a glibc program, where
/// the preload library cannot see it and the filter installed alongside it
/// catches it.
#[test]
fn musl_dynamic_and_raw_syscalls_are_grafted() {
    let test = "musl_dynamic_and_raw_syscalls_are_grafted";
    let Some(env) = Env::new(test, &[]) else {
        return;
    };
    if !std::path::Path::new("/lib/ld-musl-x86_64.so.1").exists() {
        println!("SKIP: {test}: no musl dynamic loader (/lib/ld-musl-x86_64.so.1)");
        return;
    }
    let Some(musl) = c_probe(test, "musl-gcc", &[]) else {
        return;
    };
    let Some(glibc) = c_probe(test, "cc", &[]) else {
        return;
    };
    endpoints(&env);
    for (prog, mode_line) in [
        (&musl, "seccomp mode (not linked with glibc)"),
        (&glibc, ""),
    ] {
        let (dst, h) = host_tcp_at("127.0.0.1:0", b"");
        let port = dst.port().to_string();
        let (ok, out, err) = client(
            &env,
            &["-v", "-e", "0.0.0.0/0=ep-out4"],
            prog,
            &["raw-connect", "127.0.0.1", &port],
        );
        assert!(ok, "{out} {err}");
        assert_eq!(out, "raw connect: ok\n", "{err}");
        let (_, peer) = h.join().unwrap();
        assert_eq!(peer.ip(), dst.ip());
        let lines = graft_lines(&err);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("connect {dst} -> ep-out4"))
                    && l.ends_with("(seccomp)")),
            "{lines:?}"
        );
        if !mode_line.is_empty() {
            assert!(lines.iter().any(|l| l.ends_with(mode_line)), "{lines:?}");
        } else {
            assert!(
                lines.iter().any(|l| l.starts_with("graft: LD_PRELOAD=")),
                "{lines:?}"
            );
        }
    }
}

/// Options the program set before the graft travel to the host socket
/// (SO_RCVBUF, seen with `ss` on the host side), and an escape option
/// (SO_MARK) makes the call fail closed with EPERM and the library's line.
#[test]
fn options_are_carried_or_refused_in_seccomp_mode() {
    let test = "options_are_carried_or_refused_in_seccomp_mode";
    let Some((env, c, _)) = probe_env(test, &["ss"], musl_probe) else {
        return;
    };
    let (dst, h) = host_tcp_serving(1, ss_of_peer);
    let port = dst.port().to_string();
    // The probe's connect, with one option set first.
    let probe_with = |var: &str, val: &str, what: &str| {
        let mut cmd = graft_cmd(&env, OUT4, &c, &["tcp-get", "127.0.0.1", &port, "x"]);
        cmd.env(var, val);
        output_within(cmd, what, LIMIT, None)
    };
    let o = probe_with("PROBE_RCVBUF", "300000", "probe with SO_RCVBUF");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let ss = h.join().unwrap().remove(0);
    // The kernel doubles SO_RCVBUF; the default here is far smaller.
    assert!(ss.contains("rb600000,"), "{ss}");

    let o = probe_with("PROBE_MARK", "7", "probe with SO_MARK");
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert_eq!(
        graft_lines(&err),
        vec![format!(
            "graft: connect 127.0.0.1:{port}: endpoint \"ep-out4\": option SO_MARK refused by \
             graftd: do not set it on a socket graft maps, or leave this address out of the graft \
             rules"
        )],
        "{err}"
    );
    assert!(
        err.contains("probe: connect: Operation not permitted"),
        "{err}"
    );
}

/// A Go server listening on port 0 (`net.Listen("tcp", ":0")`: bind to
/// port 0, then listen) is a server after all: grafted at `listen()` when
/// an ingress rule covers port 0, as in preload mode.
#[test]
fn go_listen_on_port_zero_is_grafted_at_listen() {
    let test = "go_listen_on_port_zero_is_grafted_at_listen";
    let Some((env, go, (p4, _))) = probe_env(test, &[], go_probe) else {
        return;
    };
    let mut c = graft_cmd(
        &env,
        &["-v", "-i", "0.0.0.0:0-65535=ep-in4"],
        &go,
        &["tcp-serve", ":0"],
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut srv = Proc::spawn(c, "go server on port 0");
    let so = srv.child.stdout.take().expect("piped");
    let line = wait_line(so, "listening", LIMIT);
    assert_eq!(
        line,
        format!("listening 127.0.0.1:{p4}"),
        "the listener is the endpoint"
    );
    assert_sees_us(&format!("127.0.0.1:{p4}"));
    assert_seccomp_line(&mut srv, "listen [::]:0 -> ep-in4");
}

/// Go's `net.Listen("tcp", ":PORT")` binds `[::]` dual-stack, like node and
/// Java: under an IPv4 and an IPv6 rule it answers on both endpoints in
/// seccomp mode too, each client seen with its own address.
#[test]
fn go_dual_stack_listener_answers_on_both_endpoints() {
    let test = "go_dual_stack_listener_answers_on_both_endpoints";
    let Some(env) = Env::new(test, &[]) else {
        return;
    };
    if !env.ebpf_or_skip(test) {
        return;
    }
    let Some(go) = go_probe(test) else {
        return;
    };
    let (p4, p6) = endpoints(&env);
    let mut srv = serve(
        &env,
        &[
            "-v",
            "-i",
            "0.0.0.0:0-65535=ep-in4",
            "-i",
            ":::0-65535=ep-in6",
        ],
        &go,
        &["tcp-serve-n", ":8080", "2"],
    );
    let (said, me) = ask_tcp(format!("127.0.0.1:{p4}").parse().unwrap());
    assert_eq!(said, format!("peer={me}\n"), "IPv4 client on ep-in4");
    let (said, me) = ask_tcp(format!("[::1]:{p6}").parse().unwrap());
    assert_eq!(said, format!("peer={me}\n"), "IPv6 client on ep-in6");
    assert_seccomp_line(&mut srv, "bind [::]:8080 -> ep-in4");
    assert!(
        env.d.log_text().contains(&format!(
            "handed out a dual-stack listener, also answering [::1]:{p6} for ep-in6"
        )),
        "{}",
        env.d.log_text()
    );
}

/// A cgroup v2 of the test's own, as a container or a systemd unit has one;
/// removed on drop (once the processes in it are gone).
struct OwnCgroup(PathBuf);

impl OwnCgroup {
    fn new() -> Option<Self> {
        let dir = PathBuf::from(cgroup2_mount()?).join(unique("graft-test-app-"));
        std::fs::create_dir(&dir).ok()?;
        Some(OwnCgroup(dir))
    }

    /// `cmd` run from inside this cgroup.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.0)
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("cgroup {} left behind", self.0.display());
    }
}

/// A program in a cgroup of its own (a container's): the eBPF companion
/// records what each of its sockets was made as, in which namespace, and
/// which options it sets on it, so a trapped connect asks the socket for
/// none of the first ("as recorded") and reads only those options (one or
/// two here) instead of all 47 an AF_INET stream socket can carry; what was
/// set still travels (SO_RCVBUF, seen with `ss` on the host side), and the
/// recording ends with the program.
#[test]
fn options_of_a_program_in_its_own_cgroup_are_recorded_not_searched() {
    let test = "options_of_a_program_in_its_own_cgroup_are_recorded_not_searched";
    let Some((env, c, _)) = probe_env(test, &["ss", "bpftool"], musl_probe) else {
        return;
    };
    if !env.ebpf_or_skip(test) {
        return;
    }
    let Some(cg) = OwnCgroup::new() else {
        println!("SKIP: {test}: cannot make a cgroup v2 of its own");
        return;
    };
    let (dst, h) = host_tcp_serving(2, ss_of_peer);
    let port = dst.port().to_string();
    for rcvbuf in [None, Some("300000")] {
        let mut cmd = graft_cmd(&env, OUT4, &c, &["tcp-get", "127.0.0.1", &port, "x"]);
        if let Some(v) = rcvbuf {
            cmd.env("PROBE_RCVBUF", v);
        }
        let o = output_within(cg.wrap(&cmd), "probe in its own cgroup", LIMIT, None);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout), "got ok\n");
    }
    let seen = h.join().unwrap();
    assert!(!seen[0].contains("rb600000,"), "{}", seen[0]);
    // The kernel doubles SO_RCVBUF; the default here is far smaller.
    assert!(seen[1].contains("rb600000,"), "{}", seen[1]);
    let log = env.d.log_text();
    let reads: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("fd 3: ").map(|(_, r)| r))
        .collect();
    assert_eq!(
        reads,
        // SO_RCVTIMEO (the probe always sets it), then SO_RCVBUF too.
        [
            "read 1 option(s), as recorded",
            "read 2 option(s), as recorded"
        ],
        "{log}"
    );
    // Both supervisors ended with their programs: nothing stays attached.
    wait_until("the recording detached", LIMIT, || {
        run("bpftool", ["cgroup", "show", &cg.0.display().to_string()])
            .stdout
            .is_empty()
    });
}
