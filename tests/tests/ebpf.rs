//! End-to-end tests of graft-ebpf inside graftd (issue 6): the in-kernel
//! egress policy (EPERM from connect()/sendto() of a grafted program, other
//! programs untouched), the per-endpoint counters of `ip -s graft show`,
//! splicing (graftd's default; `--no-splice` turns it off) of grafted↔grafted connections, the
//! setsockopt guard (escape options refused on grafted sockets), and graftd
//! without eBPF (`--no-ebpf`).
//!
//! The applications are python3 scripts run under `graft` inside namespaces
//! that have nothing but loopback. Splice tests put the endpoints' sockets in
//! a target namespace of their own, so that the TCP segment counters of that
//! namespace (`nstat`) show whether the bytes went through TCP at all.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use graft_tests::{out_segs, text, Env, Netns, Proc};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(90);

/// The applications. Readers use a socket timeout: CPython then polls and
/// retries a read that fails with EAGAIN, which a spliced socket may return
/// to a blocking read on a wake-up without data (see graft-ebpf's docs).
const SCRIPT: &str = r#"
import hashlib, random, socket, sys, threading, errno

def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET

def pattern(seed, n):
    return random.Random(seed).randbytes(n)

def transfer(s, seed, n, tag):
    s.settimeout(60)
    data = pattern(seed, n)
    def writer():
        off, step = 0, 1
        while off < len(data):
            k = min(step * 4093, len(data) - off)
            s.sendall(data[off:off + k])
            off += k
            step = step % 40 + 1
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=writer)
    t.start()
    h, got = hashlib.sha256(), 0
    while True:
        b = s.recv(65536)
        if not b:
            break
        h.update(b)
        got += len(b)
    t.join()
    print(f"{tag} sent {len(data)} {hashlib.sha256(data).hexdigest()} got {got} {h.hexdigest()}", flush=True)

def pingpong(s, count, tag):
    s.settimeout(60)
    for i in range(count):
        m = pattern(i, 1 + i % 97)
        s.sendall(m)
        back = b""
        while len(back) < len(m):
            b = s.recv(len(m) - len(back))
            if not b:
                raise SystemExit(f"{tag}: EOF in ping-pong")
            back += b
        assert back == m, f"{tag}: echo mismatch at {i}"
    print(f"{tag} pingpong ok {count}", flush=True)

def echo(s):
    s.settimeout(60)
    while True:
        b = s.recv(65536)
        if not b:
            break
        s.sendall(b)

mode = sys.argv[1]
if mode == "server":
    host, port, seed, n, conns = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    l = socket.socket(fam(host), socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((host, port))
    l.listen(16)
    print("listening", flush=True)
    for i in range(conns):
        c, _ = l.accept()
        if i % 2 == 0:
            transfer(c, seed, n, "server")
        else:
            echo(c)
        c.close()
elif mode == "client":
    host, port, seed, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    s = socket.create_connection((host, port), timeout=30)
    transfer(s, seed, n, "client")
    s.close()
    if len(sys.argv) > 6 and sys.argv[6] == "once":
        sys.exit(0)
    s = socket.create_connection((host, port), timeout=30)
    pingpong(s, 300, "client")
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
elif mode == "probe":
    # probe tcp|udp HOST PORT: one line, "ok" or the errno name.
    proto, host, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
    try:
        if proto == "tcp":
            s = socket.socket(fam(host), socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect((host, port))
            s.sendall(b"probe")
        else:
            s = socket.socket(fam(host), socket.SOCK_DGRAM)
            s.sendto(b"probe", (host, port))
        print(f"{proto} {port} ok", flush=True)
    except OSError as e:
        print(f"{proto} {port} {errno.errorcode.get(e.errno, e.errno)}", flush=True)
elif mode == "sockopt":
    # sockopt HOST PORT: the escape options on a connected (grafted)
    # socket, one line each, then an ordinary option and an echo.
    host, port = sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=30)
    for name, level, opt, val in [
        ("SO_BINDTODEVICE", socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo"),
        ("SO_MARK", socket.SOL_SOCKET, socket.SO_MARK, 7),
    ]:
        try:
            s.setsockopt(level, opt, val)
            print(f"{name} ok", flush=True)
        except OSError as e:
            print(f"{name} {type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}", flush=True)
    print("mark", s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK), flush=True)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("nodelay", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
    s.sendall(b"still flowing")
    s.shutdown(socket.SHUT_WR)
    back = b"".join(iter(lambda: s.recv(64), b""))
    print("echo", back.decode(), flush=True)
"#;

/// A world for `test` with graftd started with `graftd_args` and app.py in
/// the scratch directory; `None` (after the skip line) when a tool is missing
/// or, unless `--no-ebpf` is asked for, graftd could not load its companion.
fn ebpf_env(test: &str, graftd_args: &[&str]) -> Option<Env> {
    let env = Env::with_graftd(test, &["python3", "nstat"], graftd_args)?;
    env.script("app.py", SCRIPT, &[]);
    if !graftd_args.contains(&"--no-ebpf") && !env.ebpf_or_skip(test) {
        return None;
    }
    Some(env)
}

/// [`ebpf_env`] and one more namespace per name (splice tests keep the
/// endpoints' sockets in a namespace of their own).
fn ebpf_env_netns<const N: usize>(
    test: &str,
    graftd_args: &[&str],
    names: [&str; N],
) -> Option<(Env, [Netns; N])> {
    let env = ebpf_env(test, graftd_args)?;
    Some((env, names.map(Netns::new)))
}

/// Adds endpoint `spec` in `ns`, its sockets made in `target`'s namespace.
fn add_into(env: &Env, ns: &Netns, spec: &str, target: &Netns) {
    env.add_in(ns, &format!("{spec} netns {}", target.name));
}

/// `graft RULES -- python3 app.py ARGS` inside `ns`.
fn app(env: &Env, ns: &Netns, rules: &[&str], args: &[&str]) -> Command {
    let mut c = env.graft_in(ns, rules);
    c.arg("--").arg(PY).arg(env.dir.join("app.py")).args(args);
    c
}

fn run_bounded(cmd: Command, what: &str) -> Output {
    graft_tests::output_within(cmd, what, LIMIT, None)
}

/// Runs to success within [`LIMIT`]; stdout.
fn ok(cmd: Command, what: &str) -> String {
    graft_tests::output_ok_within(cmd, what, LIMIT).0
}

/// A host TCP server counting accepted connections and a UDP receiver, on
/// one port each, in the test's (host) namespace.
struct HostSinks {
    tcp: std::net::TcpListener,
    udp: std::net::UdpSocket,
}

impl HostSinks {
    fn new(ip: &str) -> HostSinks {
        let tcp = std::net::TcpListener::bind((ip, 0)).expect("bind tcp sink");
        let udp = std::net::UdpSocket::bind((ip, 0)).expect("bind udp sink");
        tcp.set_nonblocking(true).expect("nonblocking");
        udp.set_nonblocking(true).expect("nonblocking");
        HostSinks { tcp, udp }
    }
    fn tcp_port(&self) -> u16 {
        self.tcp.local_addr().expect("addr").port()
    }
    fn udp_port(&self) -> u16 {
        self.udp.local_addr().expect("addr").port()
    }
    /// Connections accepted and datagrams received so far.
    fn drain(&self) -> (usize, usize) {
        let mut t = 0;
        while self.tcp.accept().is_ok() {
            t += 1;
        }
        let mut u = 0;
        let mut buf = [0u8; 64];
        while self.udp.recv_from(&mut buf).is_ok() {
            u += 1;
        }
        (t, u)
    }
}

#[test]
fn policy_denies_with_eperm_and_counts() {
    let test = "policy_denies_with_eperm_and_counts";
    let Some(env) = ebpf_env(test, &[]) else {
        return;
    };
    let allowed = HostSinks::new("127.0.0.1");
    let denied = HostSinks::new("127.0.0.2");
    let (ta, ua) = (
        allowed.tcp_port().to_string(),
        allowed.udp_port().to_string(),
    );
    let (td, ud) = (denied.tcp_port().to_string(), denied.udp_port().to_string());
    env.add_in(
        &env.ns,
        "ep-out type ipv4 addr 0.0.0.0 port dynamic allow 127.0.0.1/32 deny 127.0.0.2/32",
    );
    let rules = ["-e", "127.0.0.0/8=ep-out"];
    let probe = |proto: &str, host: &str, port: &str| {
        ok(
            app(&env, &env.ns, &rules, &["probe", proto, host, port]),
            "probe",
        )
        .trim()
        .to_owned()
    };
    assert_eq!(probe("tcp", "127.0.0.1", &ta), format!("tcp {ta} ok"));
    assert_eq!(probe("tcp", "127.0.0.2", &td), format!("tcp {td} EPERM"));
    assert_eq!(probe("udp", "127.0.0.1", &ua), format!("udp {ua} ok"));
    assert_eq!(probe("udp", "127.0.0.2", &ud), format!("udp {ud} EPERM"));
    wait_for_sinks(&allowed, (1, 1));
    assert_eq!(denied.drain(), (0, 0), "a denied destination was reached");
    let s = env.stats_in(&env.ns, "ep-out");
    assert_eq!(s["policy_denied"], 2, "{s}");
    // Each probe is its own process whose one egress graft takes a batch
    // for its socket pool: all of a batch's sockets count as handed out.
    let handed = 4 * graft_core::proto::broker::BATCH_FIRST;
    assert_eq!(s["sockets"], handed, "{s}");
    let cols = stats_columns(&env.d.ip_graft_ok(Some(&env.ns), &["-s", "show"]), "ep-out");
    assert_eq!(
        cols.get("denied").map(String::as_str),
        Some("2"),
        "{cols:?}"
    );
    assert_eq!(
        cols.get("sockets").map(String::as_str),
        Some(handed.to_string().as_str()),
        "{cols:?}"
    );

    // The same destinations from a program graftd did not give a socket: in
    // the host namespace and in another cgroup, it is not touched.
    let mut c = Command::new(PY);
    c.arg(env.dir.join("app.py"))
        .args(["probe", "tcp", "127.0.0.2", &td]);
    assert_eq!(ok(c, "host probe").trim(), format!("tcp {td} ok"));
    let mut c = Command::new(PY);
    c.arg(env.dir.join("app.py"))
        .args(["probe", "udp", "127.0.0.2", &ud]);
    assert_eq!(ok(c, "host probe").trim(), format!("udp {ud} ok"));
    wait_for_sinks(&denied, (1, 1));
    assert_eq!(env.stats_in(&env.ns, "ep-out")["policy_denied"], 2);
}

/// The `-s` block under endpoint `name` of `ip -s graft show`: header word
/// to value.
fn stats_columns(shown: &str, name: &str) -> std::collections::HashMap<String, String> {
    let mut it = shown
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name} ")));
    it.next().unwrap_or_else(|| panic!("no {name} in {shown}"));
    let head = it.next().unwrap_or_default();
    let vals = it.next().unwrap_or_default();
    head.split_whitespace()
        .map(str::to_owned)
        .zip(vals.split_whitespace().map(str::to_owned))
        .collect()
}

fn wait_for_sinks(s: &HostSinks, want: (usize, usize)) {
    let start = Instant::now();
    let mut got = (0, 0);
    while got != want {
        let (t, u) = s.drain();
        got = (got.0 + t, got.1 + u);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sinks saw {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One line of a transfer: (sent len, sent sha, got len, got sha).
fn transfer_line(out: &str, tag: &str) -> (u64, String, u64, String) {
    let l = out
        .lines()
        .find(|l| l.starts_with(&format!("{tag} sent ")))
        .unwrap_or_else(|| panic!("no {tag} transfer line in {out}"));
    let f: Vec<&str> = l.split_whitespace().collect();
    (
        f[2].parse().unwrap(),
        f[3].to_owned(),
        f[5].parse().unwrap(),
        f[6].to_owned(),
    )
}

/// A grafted server in `srv_ns` and a grafted client in `cli_ns`, both on
/// endpoints whose sockets live in the endpoints' target namespace.
struct Pair<'a> {
    srv_ns: &'a Netns,
    cli_ns: &'a Netns,
    ip: &'a str,
    port: u16,
    /// (`-i` rule of the server, `-e` rule of the client)
    rules: (&'a str, &'a str),
    /// Bytes each way.
    n: usize,
    /// A second connection for the ping-pong.
    pingpong: bool,
    /// Launcher options of the server and of the client (e.g. the mode).
    launcher: (&'a [&'a str], &'a [&'a str]),
}

/// Runs a [`Pair`]; returns (server, client) lines.
fn run_pair(env: &Env, pair: Pair) -> (String, String) {
    let Pair {
        srv_ns,
        cli_ns,
        ip,
        port,
        rules,
        n,
        pingpong,
        launcher,
    } = pair;
    let (rule_in, rule_out) = rules;
    let p = port.to_string();
    let ns_ = n.to_string();
    let conns = if pingpong { "2" } else { "1" };
    let mut srv = app(
        env,
        srv_ns,
        &[launcher.0, &["-i", rule_in]].concat(),
        &["server", ip, &p, "7", &ns_, conns],
    );
    srv.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut srv = Proc::spawn(srv, "server");
    let so = srv.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(so).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server start");
    assert_eq!(first, "listening");
    let once = if pingpong { "twice" } else { "once" };
    let cli = ok(
        app(
            env,
            cli_ns,
            &[launcher.1, &["-e", rule_out]].concat(),
            &["client", ip, &p, "9", &ns_, once],
        ),
        "client",
    );
    let st = srv.wait_timeout(LIMIT);
    let mut out = String::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
        out.push_str(&l);
        out.push('\n');
    }
    assert!(st.success(), "server failed: {st}\n{out}");
    (out, cli)
}

fn check_pair(srv: &str, cli: &str, n: u64, pingpong: bool) {
    let s = transfer_line(srv, "server");
    let c = transfer_line(cli, "client");
    assert_eq!((c.0, s.2), (n, n), "client->server length");
    assert_eq!(c.1, s.3, "client->server checksum");
    assert_eq!((s.0, c.2), (n, n), "server->client length");
    assert_eq!(s.1, c.3, "server->client checksum");
    if pingpong {
        assert!(cli.contains("client pingpong ok 300"), "{cli}");
    }
}

/// Runs `srv_ns`'s server and `cli_ns`'s client (`launcher`: options of
/// their `graft`) with the ping-pong, `n` bytes each way, and checks what
/// arrived.
fn pingpong_pair(
    env: &Env,
    (srv_ns, cli_ns): (&Netns, &Netns),
    ip: &str,
    port: u16,
    rules: (&str, &str),
    n: usize,
    launcher: (&[&str], &[&str]),
) {
    let (srv, cli) = run_pair(
        env,
        Pair {
            srv_ns,
            cli_ns,
            ip,
            port,
            rules,
            n,
            pingpong: true,
            launcher,
        },
    );
    check_pair(&srv, &cli, n as u64, true);
}

/// An [`ebpf_env_netns`] whose graftd splices (its default).
fn splice_env_netns<const N: usize>(test: &str, names: [&str; N]) -> Option<(Env, [Netns; N])> {
    ebpf_env_netns(test, &[], names)
}

/// grafted↔grafted, IPv4 and IPv6, with graftd's default: the bytes arrive
/// exactly (sha256 both ways, ping-pong, half-close, close), TCP in the
/// sockets' namespace carries only control segments, and the counters
/// match. With `--no-splice` the same pairs go through TCP, as exactly.
#[test]
fn splice_grafted_pairs_v4_v6_byte_exact() {
    let test = "splice_grafted_pairs_v4_v6_byte_exact";
    grafted_pairs(test, &[], true);
    grafted_pairs(test, &["--no-splice"], false);
}

/// The transfers of [`splice_grafted_pairs_v4_v6_byte_exact`] under a
/// graftd run with `args`, `spliced` or not.
fn grafted_pairs(test: &str, args: &[&str], spliced: bool) {
    let Some((env, [host, c1, c2])) = ebpf_env_netns(test, args, ["sph", "sp1", "sp2"]) else {
        return;
    };
    const N: usize = 8 << 20;
    for (ty, ip, any) in [("ipv4", "127.0.0.1", "0.0.0.0"), ("ipv6", "::1", "::")] {
        let port = 15000;
        let ps = port.to_string();
        let (ein, eout) = (format!("in-{ty}"), format!("out-{ty}"));
        add_into(
            &env,
            &c1,
            &format!("{ein} type {ty} addr {ip} port {ps}"),
            &host,
        );
        add_into(
            &env,
            &c2,
            &format!("{eout} type {ty} addr {any} port dynamic"),
            &host,
        );
        let rule_in = format!("{ip}:{port}={ein}");
        let rule_out = if ty == "ipv4" {
            format!("{ip}/32={eout}")
        } else {
            format!("{ip}/128={eout}")
        };
        let segs = out_segs(&host);
        pingpong_pair(
            &env,
            (&c1, &c2),
            ip,
            port,
            (&rule_in, &rule_out),
            N,
            (&[], &[]),
        );
        let segs = out_segs(&host) - segs;
        // 2 × 8 MiB through TCP on loopback takes hundreds of segments;
        // spliced, only handshakes, FINs and their ACKs remain.
        if spliced {
            assert!(
                segs < 60,
                "{ty}: {segs} TCP segments: the transfer was not spliced"
            );
        } else {
            assert!(
                segs > 200,
                "{ty}: {segs} TCP segments: spliced under --no-splice"
            );
        }
        assert_eq!(
            env.stats_in(&c2, &eout)
                .get("spliced_bytes")
                .is_some_and(|v| !v.is_null()),
            spliced,
            "{ty}: the spliced count is shown exactly when splicing is on"
        );
        let pp: u64 = (0..300u64).map(|i| 1 + i % 97).sum();
        // Each side's received bytes are credited as the other's socket
        // ends (spliced) or its own does (TCP): both ended once both read
        // in full, and then every count is final.
        stats_when(&env, &c2, &eout, "bytes_received", N as u64 + pp);
        stats_when(&env, &c1, &ein, "bytes_received", N as u64 + pp);
        let si = env.stats_in(&c1, &ein);
        let so = env.stats_in(&c2, &eout);
        assert_eq!(si["passive_established"], 2, "{si}");
        assert_eq!(so["active_established"], 2, "{so}");
        assert_eq!(so["bytes_sent"], N as u64 + pp, "{so}");
        assert_eq!(si["bytes_received"], N as u64 + pp, "{si}");
        assert_eq!(si["bytes_sent"], N as u64 + pp, "{si}");
        assert_eq!(so["bytes_received"], N as u64 + pp, "{so}");
    }
}

/// Sequential connections for the churn splice test: `server IP PORT N`
/// echoes the 1000 bytes of each of N connections and exits; `client IP
/// PORT N [PACE]` opens N connections one after the other, each sending 1000
/// bytes and reading them back (with PACE, a 1.1 s pause after every PACE
/// connections), and prints "ok N".
const CHURN_PY: &str = r#"
import socket, sys, time
mode, ip, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pace = int(sys.argv[5]) if len(sys.argv) > 5 else 0
def exact(s, k):
    b = b''
    while len(b) < k:
        r = s.recv(k - len(b))
        if not r:
            raise SystemExit('short read')
        b += r
    return b
if mode == 'server':
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind((ip, port)); l.listen(64)
    print('listening', flush=True)
    for _ in range(n):
        c, _ = l.accept()
        c.sendall(exact(c, 1000)); c.close()
else:
    for i in range(n):
        s = socket.create_connection((ip, port), timeout=10)
        s.sendall(bytes([i % 251]) * 1000)
        assert exact(s, 1000) == bytes([i % 251]) * 1000
        s.close()
        if pace and (i + 1) % pace == 0:
            time.sleep(1.1)
    print('ok', n)
"#;

/// With splicing on, a client opening connection after connection stops
/// joining the splice once its broker connection has had three quick
/// batches of sockets in a row (8 + 16 + 32, each within a second of the
/// one before): each socket's sockmap entry would cost it more than the few
/// sends it carries. A client with fewer connections, or one that pauses
/// longer than that between batches, is spliced whole. Counted by the
/// client endpoint's spliced bytes.
#[test]
fn splice_leaves_a_churning_client_on_tcp() {
    let test = "splice_leaves_a_churning_client_on_tcp";
    let Some((env, [host, c1, c2])) = splice_env_netns(test, ["sch", "sc1", "sc2"]) else {
        return;
    };
    let py = env.script("churn.py", CHURN_PY, &[]);
    let ip = "127.0.0.1";
    // Sockets made in another namespace (by a graftd worker there) and in
    // graftd's own (marked as the kernel makes them): both ways of marking.
    for (target, port) in [(Some(&host), "15010"), (None, "15011")] {
        let (ein, eout) = (format!("in-{port}"), format!("out-{port}"));
        let specs = [
            (&c1, format!("{ein} type ipv4 addr {ip} port {port}")),
            (&c2, format!("{eout} type ipv4 addr 0.0.0.0 port dynamic")),
        ];
        for (ns, spec) in &specs {
            match target {
                Some(t) => add_into(&env, ns, spec, t),
                None => env.add_in(ns, spec),
            }
        }
        let spliced = || {
            env.stats_in(&c2, &eout)["spliced_bytes"]
                .as_u64()
                .unwrap_or(0)
        };
        // (connections, a pause after every PACE of them: 0 for none)
        for (conns, pace) in [(20u64, 0), (200, 0), (64, 8)] {
            let n = conns.to_string();
            let mut srv = env.graft_in(&c1, &["-i", &format!("{ip}:{port}={ein}"), "--"]);
            srv.args([PY, &py, "server", ip, port, &n]);
            srv.stdout(Stdio::piped());
            let mut srv = Proc::spawn(srv, "server");
            let mut first = String::new();
            let so = srv.child.stdout.as_mut().expect("stdout");
            std::io::BufRead::read_line(&mut std::io::BufReader::new(so), &mut first)
                .expect("server start");
            assert_eq!(first.trim(), "listening");
            let before = spliced();
            let mut cli = env.graft_in(&c2, &["-e", &format!("{ip}/32={eout}"), "--"]);
            cli.args([PY, &py, "client", ip, port, &n, &pace.to_string()]);
            assert_eq!(ok(cli, "client").trim(), format!("ok {conns}"));
            assert!(srv.wait_timeout(LIMIT).success(), "server failed");
            let whole = conns * 1000;
            if conns != 200 {
                stats_when(&env, &c2, &eout, "spliced_bytes", before + whole);
            }
            let sent = spliced() - before;
            if conns != 200 {
                assert_eq!(sent, whole, "{eout}: a short or paced run is spliced whole");
            } else {
                // Only the first three batches' sockets may join.
                assert!(
                    sent > 0 && sent <= 56 * 1000,
                    "{eout}: {sent} bytes spliced by 200 connections: the churning client kept joining"
                );
            }
        }
    }
}

/// A program graftd serves in seccomp mode may read its sockets with calls
/// the preload library never sees, which cannot repeat the EAGAIN a
/// blocking read of a spliced socket can return: its sockets never join the
/// splice, as a client (a grafted preload server) or as a server (a
/// grafted preload client). The bytes arrive through TCP.
#[test]
fn splice_leaves_seccomp_mode_programs_on_tcp() {
    let names = ["sxh", "sx1", "sx2"];
    let test = "splice_leaves_seccomp_mode_programs_on_tcp";
    let Some((env, [host, c1, c2])) = splice_env_netns(test, names) else {
        return;
    };
    const N: usize = 4 << 20;
    let seccomp: &[&str] = &["--mode", "seccomp"];
    add_into(&env, &c1, "in type ipv4 addr 127.0.0.1 port 15100", &host);
    add_into(&env, &c2, "out type ipv4 addr 0.0.0.0 port dynamic", &host);
    let rules = ("127.0.0.1:15100=in", "127.0.0.1/32=out");
    let mut spliced = 0;
    for (side, launcher) in [
        ("client", (&[][..], seccomp)),
        ("server", (seccomp, &[][..])),
    ] {
        let segs = out_segs(&host);
        pingpong_pair(&env, (&c1, &c2), "127.0.0.1", 15100, rules, N, launcher);
        let segs = out_segs(&host) - segs;
        // 2 × 4 MiB through TCP on loopback: well over a hundred segments
        // (spliced: under 60, see splice_grafted_pairs_v4_v6_byte_exact).
        assert!(
            segs > 100,
            "seccomp-mode {side}: {segs} TCP segments: spliced"
        );
        let si = env.stats_in(&c1, "in");
        let so = env.stats_in(&c2, "out");
        spliced += si["spliced_bytes"].as_u64().expect("spliced_bytes")
            + so["spliced_bytes"].as_u64().expect("spliced_bytes");
        assert_eq!(spliced, 0, "seccomp-mode {side}: {si}\n{so}");
    }
    // The same pair, both preloaded: spliced.
    let segs = out_segs(&host);
    pingpong_pair(&env, (&c1, &c2), "127.0.0.1", 15100, rules, N, (&[], &[]));
    let segs = out_segs(&host) - segs;
    assert!(
        segs < 60,
        "both preloaded: {segs} TCP segments: not spliced"
    );
    let pp: u64 = (0..300u64).map(|i| 1 + i % 97).sum();
    let so = stats_when(&env, &c2, "out", "spliced_bytes", N as u64 + pp);
    assert_eq!(so["spliced_bytes"], N as u64 + pp, "{so}");
}

/// Endpoint `ep`'s stats in `ns` once `key` reads `want`, or as they are
/// after 5 s: a connection's bytes are credited when its socket ends (CLOSE,
/// once the peer's FIN is in), which can follow the programs' exit by a
/// moment. The caller asserts.
fn stats_when(env: &Env, ns: &Netns, ep: &str, key: &str, want: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = env.stats_in(ns, ep);
        if s[key].as_u64() == Some(want) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Without splicing, the counters come from TCP when each connection closes:
/// payload bytes exactly (no SYN/FIN), and connections by direction.
#[test]
fn counters_without_splice_count_payload_bytes() {
    let Some((env, [host, c1, c2])) = ebpf_env_netns(
        "counters_without_splice_count_payload_bytes",
        &["--no-splice"],
        ["cth", "ct1", "ct2"],
    ) else {
        return;
    };
    const N: usize = 3 << 20;
    add_into(&env, &c1, "in type ipv4 addr 127.0.0.1 port 15100", &host);
    add_into(&env, &c2, "out type ipv4 addr 0.0.0.0 port dynamic", &host);
    let segs = out_segs(&host);
    let rules = ("127.0.0.1:15100=in", "127.0.0.1/32=out");
    pingpong_pair(&env, (&c1, &c2), "127.0.0.1", 15100, rules, N, (&[], &[]));
    assert!(out_segs(&host) - segs > 300, "TCP carried the bytes");
    let pp: u64 = (0..300u64).map(|i| 1 + i % 97).sum();
    let want = N as u64 + pp;
    // Close accounting runs when each socket reaches CLOSE.
    let start = Instant::now();
    loop {
        let si = env.stats_in(&c1, "in");
        let so = env.stats_in(&c2, "out");
        let got = (
            &si["bytes_received"],
            &si["bytes_sent"],
            &so["bytes_sent"],
            &so["bytes_received"],
        );
        if *got.0 == want && *got.1 == want && *got.2 == want && *got.3 == want {
            assert_eq!(
                (&si["passive_established"], &si["active_established"]),
                (&2.into(), &0.into()),
                "{si}"
            );
            assert_eq!(
                (&so["active_established"], &so["passive_established"]),
                (&2.into(), &0.into()),
                "{so}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "want {want} everywhere: in {si} out {so}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The same 4-tuple in two namespaces at once: each pair gets its own bytes.
#[test]
fn splice_same_four_tuple_in_two_namespaces() {
    let test = "splice_same_four_tuple_in_two_namespaces";
    let Some((env, [h1, h2, c])) = splice_env_netns(test, ["st1", "st2", "stc"]) else {
        return;
    };
    for h in [&h1, &h2] {
        let tag = &h.name[h.name.len() - 3..];
        add_into(
            &env,
            &c,
            &format!("i{tag} type ipv4 addr 127.0.0.1 port 15500"),
            h,
        );
        // A fixed client port: both connections are 127.0.0.1:15501 -> 127.0.0.1:15500.
        add_into(
            &env,
            &c,
            &format!("o{tag} type ipv4 addr 127.0.0.1 port 15501"),
            h,
        );
    }
    const N: usize = 4 << 20;
    let tags: Vec<String> = [&h1, &h2]
        .iter()
        .map(|h| h.name[h.name.len() - 3..].to_owned())
        .collect();
    let outs: Vec<(String, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = tags
            .iter()
            .map(|tag| {
                let env = &env;
                let c = &c;
                s.spawn(move || {
                    run_pair(
                        env,
                        Pair {
                            srv_ns: c,
                            cli_ns: c,
                            ip: "127.0.0.1",
                            port: 15500,
                            rules: (
                                &format!("127.0.0.1:15500=i{tag}"),
                                &format!("127.0.0.1/32=o{tag}"),
                            ),
                            n: N,
                            pingpong: false,
                            launcher: (&[], &[]),
                        },
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("pair")).collect()
    });
    for (srv, cli) in &outs {
        check_pair(srv, cli, N as u64, false);
    }
    for tag in &tags {
        let so = env.stats_in(&c, &format!("o{tag}"));
        assert_eq!(so["bytes_sent"], N as u64, "{so}");
        assert_eq!(so["active_established"], 1, "{so}");
    }
}

/// Without eBPF: one line says so, endpoints without a policy work, and
/// one with a policy refuses its sockets (the policy cannot be enforced).
#[test]
fn no_ebpf_says_so_once_and_works() {
    let test = "no_ebpf_says_so_once_and_works";
    let Some(env) = ebpf_env(test, &["--no-ebpf"]) else {
        return;
    };
    let sink = HostSinks::new("127.0.0.1");
    let tp = sink.tcp_port().to_string();
    env.add_in(&env.ns, "ep-out type ipv4 addr 0.0.0.0 port dynamic");
    env.add_in(
        &env.ns,
        "ep-pol type ipv4 addr 0.0.0.0 port dynamic allow 127.0.0.1/32",
    );
    let probe = |ep: &str| {
        let rule = format!("127.0.0.1/32={ep}");
        app(
            &env,
            &env.ns,
            &["-e", &rule],
            &["probe", "tcp", "127.0.0.1", &tp],
        )
    };
    let out = ok(probe("ep-out"), "probe");
    assert_eq!(out.trim(), format!("tcp {tp} ok"));
    wait_for_sinks(&sink, (1, 0));
    let o = run_bounded(probe("ep-pol"), "probe");
    assert!(
        !text(&o.stdout).contains(" ok"),
        "a policy endpoint worked without eBPF: {}",
        text(&o.stdout)
    );
    let shown = env.d.ip_graft_ok(Some(&env.ns), &["-s", "show"]);
    assert!(
        shown.contains("ep-out type ipv4 addr 0.0.0.0 port dynamic"),
        "{shown}"
    );
    let s = env.stats_in(&env.ns, "ep-out");
    // One egress graft: one batch for the process's socket pool.
    assert_eq!(s["sockets"], graft_core::proto::broker::BATCH_FIRST, "{s}");
    assert!(
        s.get("policy_denied").is_none(),
        "kernel counters without eBPF: {s}"
    );
    let log = env.d.log_text();
    assert_eq!(
        log.matches("eBPF companion disabled (--no-ebpf)").count(),
        1,
        "{log}"
    );
}

/// A host TCP server that echoes one connection, on 127.0.0.1.
fn host_echo_once() -> (u16, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = l.local_addr().expect("addr").port();
    let t = std::thread::spawn(move || {
        use std::io::{Read, Write};
        l.set_nonblocking(true).expect("nonblocking");
        let start = Instant::now();
        let (mut c, _) = loop {
            match l.accept() {
                Ok(c) => break c,
                Err(_) if start.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("echo server: no connection: {e}"),
            }
        };
        c.set_nonblocking(false).expect("blocking");
        c.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).expect("echo read");
        c.write_all(&buf).expect("echo write");
    });
    (port, t)
}

fn sockopt_probe(env: &Env) -> String {
    let ns = &env.ns;
    env.add_in(ns, "ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    let (port, server) = host_echo_once();
    let out = ok(
        app(
            env,
            ns,
            &["-e", "0.0.0.0/0=ep-out4"],
            &["sockopt", "127.0.0.1", &port.to_string()],
        ),
        "sockopt app",
    );
    server.join().expect("echo server");
    out
}

/// A grafted program cannot set the options graftd refuses in broker
/// requests directly on its host socket: the companion's cgroup/setsockopt
/// refuses them with EPERM, while ordinary options and the data still work.
#[test]
fn setsockopt_escape_options_refused_on_grafted_socket() {
    let test = "setsockopt_escape_options_refused_on_grafted_socket";
    let Some(env) = ebpf_env(test, &[]) else {
        return;
    };
    let out = sockopt_probe(&env);
    assert_eq!(
        out,
        "SO_BINDTODEVICE PermissionError EPERM\n\
         SO_MARK PermissionError EPERM\n\
         mark 0\n\
         nodelay 1\n\
         echo still flowing\n"
    );
    assert_eq!(env.stats_in(&env.ns, "ep-out4")["policy_denied"], 2);
}

/// The same program with `graftd --no-ebpf`: the kernel applies both
/// options (root holds CAP_NET_RAW and CAP_NET_ADMIN for the host socket),
/// which shows that the refusal above comes from the eBPF guard.
#[test]
fn setsockopt_escape_options_not_refused_without_ebpf() {
    let test = "setsockopt_escape_options_not_refused_without_ebpf";
    let Some(env) = ebpf_env(test, &["--no-ebpf"]) else {
        return;
    };
    let out = sockopt_probe(&env);
    assert_eq!(
        out,
        "SO_BINDTODEVICE ok\n\
         SO_MARK ok\n\
         mark 7\n\
         nodelay 1\n\
         echo still flowing\n"
    );
}
