//! End-to-end tests of libgraft-convert's egress socket pool: a python
//! client under `graft` in a namespace with only loopback reaches a host
//! server through an egress endpoint. What is asserted: the bytes and peer
//! ports the host server saw, the endpoint's counters, and how many single
//! (`handed out a ... socket`) and batch (`(SocketBatch)`) requests graftd's
//! debug log shows.

use std::io::Write;
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::Duration;

use graft_tests::{text, wait_until, Env, HostHttp, HOST_BODY as BODY};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(60);
const SINGLE: &str = "handed out a AF_INET stream socket";
const BATCH: &str = "(SocketBatch)";

/// A world with one egress endpoint, `ep-out4`, for the pool to draw on.
fn pool_env(test: &str) -> Option<Env> {
    let env = Env::new(test, &["python3"])?;
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    Some(env)
}

/// `graft -e 0.0.0.0/0=ep-out4 -- python3 SCRIPT` inside the namespace, the
/// script's `@HP@` being the host server's port.
fn python(env: &Env, name: &str, body: &str, port: u16) -> Command {
    let py = env.script(name, body, &[("HP", port.to_string())]);
    env.graft(&["-e", "0.0.0.0/0=ep-out4", "--", PY, &py])
}

/// (single requests, batch requests) graftd logged so far.
fn requests(env: &Env) -> (usize, usize) {
    let log = env.d.log_text();
    (
        log.lines().filter(|l| l.contains(SINGLE)).count(),
        log.lines().filter(|l| l.contains(BATCH)).count(),
    )
}

/// Sockets ep-out4 handed out (`ip -s -j graft show`).
fn handed_out(env: &Env) -> u64 {
    let s = env.stats("ep-out4");
    s["sockets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no socket count in {s}"))
}

/// The source ports of every connection the host server accepted.
fn peer_ports(srv: &HostHttp) -> Vec<u16> {
    srv.peers
        .lock()
        .expect("peers")
        .iter()
        .map(|p| p.port())
        .collect()
}

/// Runs to completion within [`LIMIT`], asserting success; (stdout, stderr).
fn output_ok(cmd: Command, what: &str) -> (String, String) {
    graft_tests::output_ok_within(cmd, what, LIMIT)
}

/// Runs `cmd`; `on_start` gets its stdin (then dropped) while it runs.
fn output(
    cmd: Command,
    what: &str,
    on_start: Option<Box<dyn FnOnce(std::process::ChildStdin)>>,
) -> Output {
    graft_tests::output_within(cmd, what, LIMIT, on_start)
}

const FETCH_PY: &str = "import socket, os, sys\n\
     DST = ('127.0.0.1', @HP@)\n\
     def fetch(s):\n\
     \x20   s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
     \x20   return s.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode()\n\
     def one():\n\
     \x20   s = socket.socket(); s.connect(DST); b = fetch(s); s.close(); return b\n\
     def held():\n\
     \x20   s = socket.socket(); s.connect(DST); s.sendall(b'x'); return s\n";

/// `n` sequential connections, each with a body.
fn sequential(n: usize) -> String {
    format!("{FETCH_PY}for i in range({n}):\n    print(one())\n")
}

fn bodies(n: usize) -> String {
    format!("{BODY}\n").repeat(n)
}

/// `n` sequential connections from python under `graft` (with `GRAFT_POOL`
/// set to `pool` when given), each answered; the world and the server for the
/// test's own assertions.
fn sequential_run(test: &str, n: usize, pool: Option<&str>) -> Option<(Env, HostHttp)> {
    let env = pool_env(test)?;
    let srv = HostHttp::start("127.0.0.1:0");
    let mut cmd = python(&env, "seq.py", &sequential(n), srv.addr.port());
    if let Some(v) = pool {
        cmd.env("GRAFT_POOL", v);
    }
    let (out, err) = output_ok(cmd, "seq.py");
    assert_eq!(out, bodies(n), "{err}");
    Some((env, srv))
}

#[test]
fn fifty_sequential_connections_take_four_batches_two_fetched_ahead() {
    let test = "fifty_sequential_connections_take_four_batches_two_fetched_ahead";
    let Some((env, srv)) = sequential_run(test, 50, None) else {
        return;
    };
    // Every one of the 50 connections reached the server: a pooled socket
    // handed out twice would have failed its second connect (EISCONN).
    // Distinct source ports are not required: the server closes first, so
    // a port leaves no TIME_WAIT behind and the kernel may give it again.
    assert_eq!(peer_ports(&srv).len(), 50);
    // Batches of 8 and 16 (graft_core's BATCH_FIRST, doubling), each asked
    // when the pool was empty; from then on the next batch of 32 is asked
    // ahead whenever 8 are left: after connection 16 (8 + 16 - 8) and after
    // connection 48 (56 - 8). Waiting for one request at a time would
    // have taken three batches (8 + 16 + 32 >= 50). The last one may reach
    // graftd just as python exits.
    graft_tests::wait_until("the fourth batch", LIMIT, || requests(&env) == (0, 4));
    assert_eq!(handed_out(&env), 8 + 16 + 32 + 32);
}

#[test]
fn pool_off_makes_one_request_per_connection() {
    let test = "pool_off_makes_one_request_per_connection";
    let Some((env, _srv)) = sequential_run(test, 10, Some("0")) else {
        return;
    };
    assert_eq!(requests(&env), (10, 0), "{}", env.d.log_text());
    assert_eq!(handed_out(&env), 10);
}

#[test]
fn a_socket_with_an_option_bypasses_the_pool() {
    let Some(env) = pool_env("a_socket_with_an_option_bypasses_the_pool") else {
        return;
    };
    let srv = HostHttp::start("127.0.0.1:0");
    let body = format!(
        "{FETCH_PY}\
         s = socket.socket()\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         s.connect(DST)\n\
         print('nodelay', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), fetch(s))\n\
         p = socket.socket(); p.connect(DST)\n\
         print('plain', p.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), fetch(p))\n"
    );
    let (out, err) = output_ok(python(&env, "opt.py", &body, srv.addr.port()), "opt.py");
    assert_eq!(out, format!("nodelay 1 {BODY}\nplain 0 {BODY}\n"), "{err}");
    assert_eq!(requests(&env), (1, 1), "{}", env.d.log_text());
}

#[test]
fn forked_child_uses_its_own_sockets_and_never_keeps_the_parents() {
    forked_child_case(
        "forked_child_uses_its_own_sockets_and_never_keeps_the_parents",
        "os.fork",
        true,
    );
}

/// The same with a child made by the raw fork system call: no fork
/// handler runs in it, so only the pid it finds (not its parent's) tells
/// the library, at the child's first graft, that the pooled sockets are
/// the parent's. (Until then the child holds its copies: the parent's
/// closed connection is not awaited before the child grafts.)
#[test]
fn a_child_of_a_raw_fork_never_uses_the_parents_sockets() {
    forked_child_case(
        "a_child_of_a_raw_fork_never_uses_the_parents_sockets",
        // x86_64's fork system call.
        "lambda: ctypes.CDLL(None, use_errno=True).syscall(57)",
        false,
    );
}

/// `fork` is a python expression for a function that forks; with
/// `handlers`, it runs the fork handlers, so the child drops its copies of
/// the pooled sockets at once.
fn forked_child_case(test: &str, fork: &str, handlers: bool) {
    let Some(env) = pool_env(test) else {
        return;
    };
    let srv = HostHttp::start("127.0.0.1:0");
    // The parent fills its pool and forks. Before the child grafts
    // anything, the parent takes a pooled socket, connects and closes it:
    // that close must reach the server while the child runs (a child still
    // holding its inherited copy would keep the connection open). Then the
    // child opens three connections and holds them, and the parent three
    // more from its pool.
    let body = format!(
        "{FETCH_PY}\
         print('first', one(), flush=True)\n\
         go_r, go_w = os.pipe(); done_r, done_w = os.pipe(); end_r, end_w = os.pipe()\n\
         import ctypes\n\
         pid = ({fork})()\n\
         if pid == 0:\n\
         \x20   os.read(go_r, 1)\n\
         \x20   mine = [held() for _ in range(3)]\n\
         \x20   print('child', *[s.getsockname()[1] for s in mine], flush=True)\n\
         \x20   os.write(done_w, b'.')\n\
         \x20   os.read(end_r, 1)\n\
         \x20   os._exit(0)\n\
         gone = held(); port = gone.getsockname()[1]; gone.close()\n\
         sys.stdin.readline()\n\
         os.write(go_w, b'.'); os.read(done_r, 1)\n\
         mine = [held() for _ in range(3)]\n\
         print('parent', *[s.getsockname()[1] for s in mine], port, flush=True)\n\
         os.write(end_w, b'.'); os.waitpid(pid, 0)\n"
    );
    let closed = srv.closed.clone();
    let o = output(
        python(&env, "fork.py", &body, srv.addr.port()),
        "fork.py",
        Some(Box::new(move |mut stdin| {
            if handlers {
                wait_until(
                    "the parent's closed connection reaches the server",
                    Duration::from_secs(20),
                    || closed.load(Ordering::SeqCst) >= 1,
                );
            }
            let _ = stdin.write_all(b"\n");
        })),
    );
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "{}\n{out}\n{err}", o.status);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}\n{err}");
    assert_eq!(lines[0], format!("first {BODY}"));
    let ports = |tag: &str| -> Vec<u16> {
        let l = lines
            .iter()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag} line in {out}"));
        l.split(' ')
            .skip(1)
            .map(|p| p.parse().expect("port"))
            .collect()
    };
    let (child, parent) = (ports("child "), ports("parent "));
    assert_eq!((child.len(), parent.len()), (3, 4));
    let mut seen = peer_ports(&srv);
    assert_eq!(seen.len(), 8, "first + 3 + 4 connections");
    for p in child.iter().chain(&parent) {
        assert!(seen.contains(p), "port {p} reached the server");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "no socket used by both processes");
    // The parent's first graft and the child's first graft each took a
    // batch; everything else came from the process's own pool.
    assert_eq!(requests(&env), (0, 2), "{}", env.d.log_text());
}

/// Grafting at socket(): a python client that keeps connecting under a
/// catch-all rule gets host sockets straight from socket() (their netns
/// cookie is the host namespace's before any connect), at the lowest free
/// descriptor with the flags it asked for, and every connection arrives.
/// Whatever would tell such a socket from a container socket first makes
/// it one: a bind() and listen() happen on the container's stack, an
/// option graftd refuses (SO_MARK) ends in connect()'s EPERM and line as on
/// a container socket, and an option graftd carries (TCP_NODELAY) stays on
/// the host socket.
const EARLY_PY: &str = r#"
import fcntl, os, socket, sys
DST = ("127.0.0.1", @HP@)
host = int(sys.argv[1])
def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
def where(s):
    return "host" if cookie(s) == host else "container"
def fetch(s):
    s.connect(DST)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    body = s.makefile("rb").read().split(b"\r\n\r\n", 1)[1].decode()
    s.close()
    return body
# Warm-up: the first sockets are the container's, grafted at connect.
seen = []
for i in range(40):
    s = socket.socket()
    seen.append(where(s))
    assert fetch(s) == "hello-from-host", i
print("warm-up", seen[0], seen[-1], seen.count("host") >= 30)
low = socket.socket()
n = low.fileno()
low.close()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
fl = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
fd = fcntl.fcntl(s.fileno(), fcntl.F_GETFD)
print("made", where(s), "lowest", s.fileno() == n, "nonblock", bool(fl & os.O_NONBLOCK), "cloexec", bool(fd & fcntl.FD_CLOEXEC))
s.close()
s = socket.socket()
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("nodelay", where(s), s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, fetch(s) == "hello-from-host")
srv = socket.socket()
print("server before bind", where(srv))
srv.bind(("127.0.0.1", 0))
srv.listen()
print("server", where(srv), srv.getsockname()[0], srv.getsockname()[1] > 0)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)
print("marked", where(s), s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK))
try:
    s.connect(DST)
    print("marked connect ok")
except OSError as e:
    print("marked connect", e.errno == 1)
"#;

/// The netns cookie of the test's own namespace, where graftd's endpoints
/// make their sockets.
fn host_netns_cookie() -> u64 {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut b = [0u8; 8];
    let mut len = 8u32;
    // SAFETY: getsockopt with a buffer and length of our own.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&probe),
            libc::SOL_SOCKET,
            graft_core::sockopt::SO_NETNS_COOKIE,
            b.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_NETNS_COOKIE: {}", std::io::Error::last_os_error());
    u64::from_ne_bytes(b)
}

#[test]
fn sockets_are_grafted_as_they_are_made_and_ungrafted_when_they_must() {
    let test = "sockets_are_grafted_as_they_are_made_and_ungrafted_when_they_must";
    let Some(env) = pool_env(test) else {
        return;
    };
    let srv = HostHttp::start("127.0.0.1:0");
    let host = host_netns_cookie();
    let mut cmd = python(&env, "early.py", EARLY_PY, srv.addr.port());
    cmd.arg(host.to_string());
    let o = output(cmd, "early.py", None);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "early.py failed: {err}");
    assert_eq!(
        out,
        "warm-up container host True\n\
         made host lowest True nonblock True cloexec True\n\
         nodelay host True True\n\
         server before bind host\n\
         server container 127.0.0.1 True\n\
         marked container 7\n\
         marked connect True\n",
        "{err}"
    );
    // The refused connect says why, as for any socket with that option.
    assert!(err.contains("SO_MARK"), "{err}");
    assert_eq!(srv.accepted(), 41);
    let (single, batches) = requests(&env);
    assert_eq!(single, 0, "every socket came from a batch");
    assert!(batches >= 3, "{batches} batches");
    // The marked socket asked graftd on its own, as a container socket
    // with an option does, and was refused.
    let log = env.d.log_text();
    assert!(
        log.contains("refused a AF_INET stream socket") && log.contains("SO_MARK"),
        "{log}"
    );
}

/// More of grafting at socket(), on IPv6 (`-e ::/0=ep-out6`): a TCP Fast
/// Open `sendto()` on a socket grafted as it was made connects and carries
/// its data; a descriptor dup'd from one connects like the original; a
/// `listen()` without `bind()` listens on the container's stack; an IPv6
/// socket asking for a v4-mapped destination (the IPv4 rules' business)
/// becomes a container socket, grafted onto ep-out4 at connect.
const EARLY6_PY: &str = r#"
import os, socket, sys
DST6 = ("::1", @HP6@)
DST4 = ("::ffff:127.0.0.1", @HP@)
host = int(sys.argv[1])
REQ = b"GET / HTTP/1.0\r\n\r\n"
def cookie(s):
    return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")
def where(s):
    return "host" if cookie(s) == host else "container"
def body(s):
    b = s.makefile("rb").read().split(b"\r\n\r\n", 1)[1].decode()
    s.close()
    return b
for i in range(40):
    s = socket.socket(socket.AF_INET6)
    s.connect(DST6)
    s.sendall(REQ)
    assert body(s) == "hello-from-host", i
s = socket.socket(socket.AF_INET6)
w = where(s)
s.sendto(REQ, socket.MSG_FASTOPEN, DST6)
print("fastopen", w, body(s))
s = socket.socket(socket.AF_INET6)
d = socket.socket(fileno=os.dup(s.fileno()))
s.close()
w = where(d)
d.connect(DST6)
d.sendall(REQ)
print("dup", w, body(d))
l = socket.socket(socket.AF_INET6)
w = where(l)
l.listen()
print("listen", w, where(l), l.getsockname()[1] > 0)
s = socket.socket(socket.AF_INET6)
w = where(s)
s.connect(DST4)
s.sendall(REQ)
print("mapped", w, where(s), body(s))
"#;

#[test]
fn ipv6_sockets_grafted_as_made_fast_open_dup_listen_and_mapped() {
    let test = "ipv6_sockets_grafted_as_made_fast_open_dup_listen_and_mapped";
    let Some(env) = pool_env(test) else {
        return;
    };
    env.add("ep-out6 type ipv6 addr ::1 port dynamic");
    let srv4 = HostHttp::start("127.0.0.1:0");
    let srv6 = HostHttp::start("[::1]:0");
    let host = host_netns_cookie();
    let py = env.script(
        "early6.py",
        EARLY6_PY,
        &[
            ("HP", srv4.addr.port().to_string()),
            ("HP6", srv6.addr.port().to_string()),
        ],
    );
    let mut cmd = env.graft(&[
        "-e",
        "0.0.0.0/0=ep-out4",
        "-e",
        "::/0=ep-out6",
        "--",
        PY,
        &py,
    ]);
    cmd.arg(host.to_string());
    let (out, err) = output_ok(cmd, "early6.py");
    assert_eq!(
        out,
        format!(
            "fastopen host {BODY}\ndup host {BODY}\nlisten host container True\n\
             mapped host host {BODY}\n"
        ),
        "{err}"
    );
    assert_eq!(srv6.accepted(), 42);
    assert_eq!(srv4.accepted(), 1);
    // The mapped destination's socket was made anew in the container and
    // grafted onto the IPv4 rules' endpoint.
    let log = env.d.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("endpoint ep-out4: handed out") && l.contains("AF_INET6 stream")),
        "{log}"
    );
}
