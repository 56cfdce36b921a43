//! Connection churn through an egress endpoint (issue 10): a client that
//! opens and closes one connection after another (client closes first, so
//! each connection leaves a TIME_WAIT behind) must see no failure where the
//! same client on the host sees none.
//!
//! The host here is a namespace the test makes (the endpoint's target
//! `netns /run/netns/NAME`), with a small ephemeral port range, so that a few
//! thousand connections cycle it several times without touching the real
//! host's sysctls; its tcp_tw_reuse is set to the real host's value. The
//! server listens there on every loopback address; clients spread their
//! connections over 16 of them, as a client of several servers does. On the
//! host, `connect()` picks the port and shares it between 4-tuples (or reuses
//! a TIME_WAIT one); a port taken by `bind(port 0)` before connect stays
//! unusable until its TIME_WAIT ends, which made grafted clients fail with
//! EADDRINUSE once the range was full. Asserted: every connection of the
//! grafted loop succeeded, read the server's byte, and its local port came
//! from the small range, more connections than the range has ports; the
//! same loop on the host succeeds too.

use std::process::Stdio;
use std::time::Duration;

use graft_tests::{output_ok_within, run_ok, wait_line, Env, Netns, Proc};

const LIMIT: Duration = Duration::from_secs(180);
/// The target namespace's ephemeral range: 512 ports.
const RANGE: (u32, u32) = (40000, 40511);
/// Connections per loop: four times the range.
const CONNS: u32 = 2048;
/// Loopback addresses the server answers on, used round-robin.
const DESTS: u32 = 16;
const PORT: u16 = 7007;

/// Accepts on 0.0.0.0:PORT, sends one byte on each connection and closes it
/// once the client has closed its side.
const SERVER: &str = r#"
import selectors, socket, sys
sel = selectors.DefaultSelector()
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", @PORT@))
l.listen(1024)
l.setblocking(False)
sel.register(l, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is l:
            try:
                c, _ = l.accept()
            except BlockingIOError:
                continue
            c.setblocking(False)
            try:
                c.send(b"x")
            except OSError:
                c.close()
                continue
            sel.register(c, selectors.EVENT_READ)
        else:
            try:
                d = s.recv(64)
            except OSError:
                d = b""
            if not d:
                sel.unregister(s)
                s.close()
"#;

/// CONNS connections by CONC threads, each: connect, read the byte, note the
/// local port, close. Prints one summary line.
const CLIENT: &str = r#"
import collections, errno, socket, sys, threading
conns, conc, port, dests = (int(a) for a in sys.argv[1:5])
lock = threading.Lock()
ok, bad, ports, errs = 0, 0, set(), collections.Counter()
def run(t):
    global ok, bad
    for i in range(t, conns, conc):
        dst = "127.0.0.%d" % (1 + i % dests)
        s = socket.socket()
        try:
            s.connect((dst, port))
            got = s.recv(1)
            p = s.getsockname()[1]
            with lock:
                if got == b"x":
                    ok += 1
                    ports.add(p)
                else:
                    bad += 1
                    errs["short read"] += 1
        except OSError as e:
            with lock:
                bad += 1
                errs[errno.errorcode.get(e.errno, str(e))] += 1
        finally:
            s.close()
ts = [threading.Thread(target=run, args=(t,)) for t in range(conc)]
for t in ts: t.start()
for t in ts: t.join()
print("ok=%d failed=%d ports=%d lo=%d hi=%d errors=%s" % (ok, bad, len(ports),
      min(ports, default=0), max(ports, default=0), dict(errs)), flush=True)
"#;

struct Churn {
    env: Env,
    target: Netns,
    _server: Proc,
    client: String,
}

impl Churn {
    /// A target namespace with the small range and a running server, and an
    /// egress endpoint `ep-out4` at `addr` (port dynamic) made there.
    fn new(test: &str, addr: &str) -> Option<Churn> {
        let env = Env::new(test, &["python3"])?;
        let target = Netns::new("churn");
        let tw_reuse = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_tw_reuse")
            .expect("read the host's tcp_tw_reuse");
        run_ok(
            "ip",
            [
                "netns",
                "exec",
                &target.name,
                "sysctl",
                "-qw",
                &format!("net.ipv4.ip_local_port_range={} {}", RANGE.0, RANGE.1),
                &format!("net.ipv4.tcp_tw_reuse={}", tw_reuse.trim()),
            ],
        );
        let server = env.script("server.py", SERVER, &[("PORT", PORT.to_string())]);
        let mut cmd = target.cmd("python3");
        cmd.arg(&server)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut server = Proc::spawn(cmd, "churn server");
        let out = server.child.stdout.take().expect("server stdout");
        wait_line(out, "ready", Duration::from_secs(20));
        env.add(&format!(
            "ep-out4 type ipv4 addr {addr} port dynamic netns {}",
            target.path().display()
        ));
        let client = env.script("client.py", CLIENT, &[]);
        Some(Churn {
            env,
            target,
            _server: server,
            client,
        })
    }

    fn args(&self, conc: u32) -> Vec<String> {
        vec![
            self.client.clone(),
            CONNS.to_string(),
            conc.to_string(),
            PORT.to_string(),
            DESTS.to_string(),
        ]
    }

    /// The client on the target namespace's own stack (the "host").
    fn on_host(&self, conc: u32) -> String {
        let mut c = self.target.cmd("python3");
        c.args(self.args(conc)).stdin(Stdio::null());
        output_ok_within(c, "churn client on the host", LIMIT).0
    }

    /// The client in the loopback-only namespace under `graft -e`.
    fn grafted(&self, conc: u32) -> (String, String) {
        let mut c = self
            .env
            .graft(&["-e", "0.0.0.0/0=ep-out4", "--", "python3"]);
        c.args(self.args(conc));
        output_ok_within(c, "grafted churn client", LIMIT)
    }
}

/// Checks one summary line: every connection made it, from ports of the
/// small range, and more connections than the range has ports.
fn assert_clean(what: &str, line: &str, stderr: &str) {
    let field = |k: &str| -> u32 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no {k}= in {line:?}"))
    };
    assert_eq!(
        (field("ok"), field("failed")),
        (CONNS, 0),
        "{what}: {line}\nstderr: {stderr}"
    );
    assert!(
        field("lo") >= RANGE.0 && field("hi") <= RANGE.1,
        "{what}: local ports outside the target's range: {line}"
    );
    let size = RANGE.1 - RANGE.0 + 1;
    assert!(
        field("ports") <= size && CONNS >= 2 * size,
        "{what}: the range was not cycled: {line}"
    );
}

fn churn(test: &str, addr: &str, conc: u32) {
    let Some(c) = Churn::new(test, addr) else {
        return;
    };
    let host = c.on_host(conc);
    assert_clean("host", host.trim(), "");
    let (out, err) = c.grafted(conc);
    assert_clean("grafted", out.trim(), &err);
    // Both ran in the same namespace's port range: the host's TIME_WAITs
    // were still there while the grafted loop ran, as on a busy host.
    println!("host: {}\ngrafted: {}", host.trim(), out.trim());
}

#[test]
fn sequential_churn_cycles_the_port_range_without_failures() {
    churn("sequential_churn", "127.0.0.1", 1);
}

/// 32 connections at a time, through a wildcard endpoint (no bind at all:
/// connect picks address and port).
#[test]
fn concurrent_churn_cycles_the_port_range_without_failures() {
    churn("concurrent_churn", "0.0.0.0", 32);
}

/// A grafted egress socket whose connect failed holds no port any more (the
/// kernel gives back the one connect picked, and equally one graftd's
/// `bind(port 0)` picked): without the bind guard the program could now bind
/// it to any host address (it can, with `--no-ebpf`, then and before this
/// change). With the companion, bind() on a grafted socket is EPERM.
const REBIND: &str = r#"
import errno, socket, sys
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[1])))
    print("connected?!")
except ConnectionRefusedError:
    pass
print("before", s.getsockname(), flush=True)
for addr in (("127.0.0.2", 0), ("127.0.0.1", 0)):
    try:
        s.bind(addr)
        print("bind", addr[0], "ok", s.getsockname())
    except OSError as e:
        print("bind", addr[0], errno.errorcode.get(e.errno, e.errno))
"#;

fn rebind(test: &str, graftd_args: &[&str]) -> Option<String> {
    let env = Env::with_graftd(test, &["python3"], graftd_args)?;
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    let script = env.script("rebind.py", REBIND, &[]);
    // Nobody listens there: connect is refused.
    let closed = graft_tests::free_port();
    let mut c = env.graft(&["-e", "0.0.0.0/0=ep-out4", "--", "python3"]);
    c.arg(&script).arg(closed.to_string());
    let (out, err) = output_ok_within(c, "rebind client", LIMIT);
    assert!(out.contains("before ('127.0.0.1', "), "{out}\n{err}");
    Some(out)
}

#[test]
fn the_program_cannot_bind_a_grafted_egress_socket() {
    let Some(out) = rebind("rebind_guarded", &[]) else {
        return;
    };
    assert!(
        out.contains("bind 127.0.0.2 EPERM") && out.contains("bind 127.0.0.1 EPERM"),
        "{out}"
    );
}
