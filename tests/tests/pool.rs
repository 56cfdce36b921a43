//! End-to-end tests of libgraft-convert's egress socket pool: a python
//! client under `graft` in a namespace with only loopback reaches a host
//! server through an egress endpoint. What is asserted: the bytes and peer
//! ports the host server saw, the endpoint's counters, and how many single
//! (`handed out a ... socket`) and batch (`(SocketBatch)`) requests graftd's
//! debug log shows.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_tests::{bin, have_or_skip, root_or_skip, text, unique, wait_until, Graftd, Netns};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(60);
const BODY: &str = "hello-from-host";
const SINGLE: &str = "handed out a AF_INET stream socket";
const BATCH: &str = "(SocketBatch)";

struct Env {
    ns: Netns,
    d: Graftd,
    dir: PathBuf,
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        if !root_or_skip(test) || !have_or_skip(test, "python3") {
            return None;
        }
        let dir = std::env::temp_dir().join(unique("graft-pool-"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let env = Env {
            ns: Netns::new("pool"),
            d: Graftd::start(),
            dir,
        };
        env.d.ip_graft_ok(
            Some(&env.ns),
            &[
                "add",
                "ep-out4",
                "type",
                "ipv4",
                "addr",
                "127.0.0.1",
                "port",
                "dynamic",
            ],
        );
        Some(env)
    }

    /// `graft -e 0.0.0.0/0=ep-out4 -- python3 SCRIPT` inside the namespace.
    fn python(&self, name: &str, body: &str, port: u16) -> Command {
        let p = self.dir.join(name);
        std::fs::write(&p, body.replace("@HP@", &port.to_string())).expect("write script");
        let mut c = self.ns.cmd(bin("graft"));
        c.args(["-e", "0.0.0.0/0=ep-out4", "--", PY])
            .arg(&p)
            .stdin(Stdio::null());
        self.d.apply(&mut c);
        c
    }

    /// (single requests, batch requests) graftd logged so far.
    fn requests(&self) -> (usize, usize) {
        let log = self.d.log_text();
        (
            log.lines().filter(|l| l.contains(SINGLE)).count(),
            log.lines().filter(|l| l.contains(BATCH)).count(),
        )
    }

    /// `ip -s -j graft show`: sockets handed out by ep-out4.
    fn handed_out(&self) -> u64 {
        let out = self.d.ip_graft_ok(Some(&self.ns), &["-s", "-j", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j graft show JSON");
        v.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == "ep-out4"))
            .and_then(|e| e["stats"]["sockets"].as_u64())
            .unwrap_or_else(|| panic!("no ep-out4 stats in {out}"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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

/// A host server: answers a request with [`BODY`]; a connection that
/// starts with `x` is held until the client closes it, then counted in
/// `closed`. Records every peer.
struct HostTcp {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    closed: Arc<AtomicUsize>,
}

fn host_server() -> HostTcp {
    let l = TcpListener::bind("127.0.0.1:0").expect("host server bind");
    // SAFETY: listen(2) on a socket we own; no pointers.
    unsafe { libc::listen(l.as_raw_fd(), 1024) };
    let addr = l.local_addr().expect("addr");
    let peers = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicUsize::new(0));
    let (p2, c2) = (peers.clone(), closed.clone());
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            if let Ok(peer) = s.peer_addr() {
                p2.lock().expect("peers").push(peer);
            }
            let c3 = c2.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(LIMIT));
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap_or(0);
                if buf[..n].starts_with(b"x") {
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                    c3.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let answer = format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
                    BODY.len()
                );
                let _ = s.write_all(answer.as_bytes());
            });
        }
    });
    HostTcp {
        addr,
        peers,
        closed,
    }
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

#[test]
fn fifty_sequential_connections_take_seven_batches() {
    let Some(env) = Env::new("fifty_sequential_connections_take_seven_batches") else {
        return;
    };
    let srv = host_server();
    let (out, err) = output_ok(
        env.python("seq.py", &sequential(50), srv.addr.port()),
        "seq.py",
    );
    assert_eq!(out, bodies(50), "{err}");
    let mut ports: Vec<u16> = srv
        .peers
        .lock()
        .expect("peers")
        .iter()
        .map(|p| p.port())
        .collect();
    assert_eq!(ports.len(), 50);
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 50, "a pooled socket is never used twice");
    // Batches of 8, 16 and 32 (graft_core's BATCH_FIRST, doubling): the 50
    // used plus 6 still pooled when python exited.
    assert_eq!(env.requests(), (0, 3), "{}", env.d.log_text());
    assert_eq!(env.handed_out(), 56);
}

#[test]
fn pool_off_makes_one_request_per_connection() {
    let Some(env) = Env::new("pool_off_makes_one_request_per_connection") else {
        return;
    };
    let srv = host_server();
    let mut cmd = env.python("seq.py", &sequential(10), srv.addr.port());
    cmd.env("GRAFT_POOL", "0");
    let (out, err) = output_ok(cmd, "seq.py");
    assert_eq!(out, bodies(10), "{err}");
    assert_eq!(env.requests(), (10, 0), "{}", env.d.log_text());
    assert_eq!(env.handed_out(), 10);
}

#[test]
fn a_socket_with_an_option_bypasses_the_pool() {
    let Some(env) = Env::new("a_socket_with_an_option_bypasses_the_pool") else {
        return;
    };
    let srv = host_server();
    let body = format!(
        "{FETCH_PY}\
         s = socket.socket()\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         s.connect(DST)\n\
         print('nodelay', s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), fetch(s))\n\
         p = socket.socket(); p.connect(DST)\n\
         print('plain', p.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), fetch(p))\n"
    );
    let (out, err) = output_ok(env.python("opt.py", &body, srv.addr.port()), "opt.py");
    assert_eq!(out, format!("nodelay 1 {BODY}\nplain 0 {BODY}\n"), "{err}");
    assert_eq!(env.requests(), (1, 1), "{}", env.d.log_text());
}

#[test]
fn forked_child_uses_its_own_sockets_and_never_keeps_the_parents() {
    let Some(env) = Env::new("forked_child_uses_its_own_sockets_and_never_keeps_the_parents")
    else {
        return;
    };
    let srv = host_server();
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
         pid = os.fork()\n\
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
        env.python("fork.py", &body, srv.addr.port()),
        "fork.py",
        Some(Box::new(move |mut stdin| {
            wait_until(
                "the parent's closed connection reaches the server",
                Duration::from_secs(20),
                || closed.load(Ordering::SeqCst) >= 1,
            );
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
    let mut seen: Vec<u16> = srv
        .peers
        .lock()
        .expect("peers")
        .iter()
        .map(|p| p.port())
        .collect();
    assert_eq!(seen.len(), 8, "first + 3 + 4 connections");
    for p in child.iter().chain(&parent) {
        assert!(seen.contains(p), "port {p} reached the server");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "no socket used by both processes");
    // The parent's first graft and the child's first graft each took a
    // batch; everything else came from the process's own pool.
    assert_eq!(env.requests(), (0, 2), "{}", env.d.log_text());
}
