//! End-to-end tests of libgraft-convert and `graft` (issue 3): unmodified
//! Debian programs (iperf3, nginx, curl, socat, python3) run under `graft`
//! inside a network namespace that has nothing but loopback, and are reached
//! from / reach the host namespace through graftd's endpoints. Each test has
//! its own namespace and its own graftd; assertions are on what crossed the
//! wire (bytes, peer addresses) and on exact error text.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graft_tests::{
    assert_line, free_port, graft_lines, grafted_nginx, preload_lib, text, unique, wait_tcp,
    wait_until, Env, HostHttp, Proc, HOST_BODY as BODY,
};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(60);

/// Runs a command to completion within `limit`, capturing its output.
fn output(cmd: Command, what: &str, limit: Duration) -> Output {
    graft_tests::output_within(cmd, what, limit, None)
}

/// The test's [`Env`], needing python3 and the programs `needs`.
fn py_env(test: &str, needs: &[&str]) -> Option<Env> {
    let mut all = vec!["python3"];
    all.extend(needs);
    Env::new(test, &all)
}

/// Adds ep-in4 on a free port of the host's loopback; that port.
fn add_in4(env: &Env) -> u16 {
    let port = free_port();
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {port}"));
    port
}

/// Adds ep-out4 and starts a host server for it to reach.
fn add_out4(env: &Env) -> HostHttp {
    env.add("ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    HostHttp::start("127.0.0.1:0")
}

/// The usual ingress world: ep-in4 on a free port of the host's loopback.
fn ingress_world(test: &str) -> Option<(Env, u16)> {
    let env = py_env(test, &[])?;
    let port = add_in4(&env);
    Some((env, port))
}

/// The usual egress world: ep-out4 added, a host server running.
fn egress_world(test: &str, needs: &[&str]) -> Option<(Env, HostHttp)> {
    let env = py_env(test, needs)?;
    let srv = add_out4(&env);
    Some((env, srv))
}

/// `graft RULES -- curl -sS -g --max-time 10 URL`.
fn curl(env: &Env, rules: &[&str], url: &str) -> Command {
    let mut c = env.graft(rules);
    c.args(["--", "curl", "-sS", "-g", "--max-time", "10", url]);
    c
}

/// Writes the python script `name` (`@K@` filled from `vars`) and runs
/// `graft RULES -- python3 SCRIPT` to a successful exit: (stdout, stderr).
fn python_ok(
    env: &Env,
    rules: &[&str],
    name: &str,
    body: &str,
    vars: &[(&str, String)],
) -> (String, String) {
    let py = env.script(name, body, vars);
    let mut cmd = env.graft(rules);
    cmd.args(["--", PY, &py]);
    output_ok(cmd, name)
}

/// Output with a successful exit; returns (stdout, stderr).
fn output_ok(cmd: Command, what: &str) -> (String, String) {
    graft_tests::output_ok_within(cmd, what, LIMIT)
}

/// Forwards every line of a child's output (draining it to the end, so the
/// child never writes into a closed pipe).
fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The first line containing `needle`, within `limit`.
fn wait_for(rx: &std::sync::mpsc::Receiver<String>, needle: &str, limit: Duration) -> String {
    let start = std::time::Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => continue,
            Err(_) => panic!("no line containing {needle:?} within {limit:?}"),
        }
    }
}

// ---------------------------------------------------------------- ingress --

#[test]
fn iperf3_tcp_and_udp_server_reached_from_host() {
    let Some(env) = py_env("iperf3_tcp_and_udp_server_reached_from_host", &["iperf3"]) else {
        return;
    };
    let port = add_in4(&env);
    for udp in [false, true] {
        let mut cmd = env.graft(&[
            "-v",
            "-i",
            "0.0.0.0:0-65535=ep-in4",
            "--",
            "iperf3",
            "-s",
            "-1",
            "--forceflush",
        ]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut srv = Proc::spawn(cmd, "iperf3 -s");
        let so = lines_of(srv.child.stdout.take().expect("stdout"));
        let mut se = srv.child.stderr.take().expect("stderr");
        wait_for(&so, "Server listening", LIMIT);
        let mut args = vec!["-c", "127.0.0.1", "-p"];
        let ps = port.to_string();
        args.push(&ps);
        args.extend(["-t", "1", "-J"]);
        if udp {
            args.push("-u");
        }
        let mut c = Command::new("iperf3");
        c.args(&args);
        let (out, _) = output_ok(c, "iperf3 -c");
        let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
        let bytes = if udp {
            v["end"]["sum"]["bytes"].as_u64()
        } else {
            v["end"]["sum_received"]["bytes"].as_u64()
        };
        assert!(
            bytes.unwrap_or(0) > 0,
            "iperf3 (udp={udp}) moved no bytes: {out}"
        );
        let st = srv.wait_timeout(LIMIT);
        assert!(st.success(), "iperf3 -s exited with {st}");
        let mut err = String::new();
        let _ = se.read_to_string(&mut err);
        // iperf3 binds a dual-stack [::]: the 0.0.0.0 rule takes it.
        let want = format!("bind [::]:5201 -> ep-in4 (host [::ffff:127.0.0.1]:{port})");
        assert!(
            graft_lines(&err).iter().any(|l| l.contains(&want)),
            "no verbose line with {want:?} in:\n{err}"
        );
    }
}

#[test]
fn nginx_master_and_workers_on_ipv4_and_ipv6_endpoints() {
    let test = "nginx_master_and_workers_on_ipv4_and_ipv6_endpoints";
    let Some(env) = py_env(test, &["nginx", "curl"]) else {
        return;
    };
    let p4 = free_port();
    let p6 = free_port();
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {p4}"));
    env.add(&format!("ep-in6 type ipv6 addr ::1 port {p6}"));
    let d = env.dir.display().to_string();
    let _nginx = grafted_nginx(
        &env,
        &["-i", "0.0.0.0:0-65535=ep-in4", "-i", ":::0-65535=ep-in6"],
        "graft-nginx-page\n",
        &format!(" server {{ listen 80; listen [::]:80; root {d}/www; }}\n"),
    );
    let a4: SocketAddr = format!("127.0.0.1:{p4}").parse().expect("addr");
    let a6: SocketAddr = format!("[::1]:{p6}").parse().expect("addr");
    wait_tcp(a4, LIMIT);
    wait_tcp(a6, LIMIT);
    for url in [
        format!("http://127.0.0.1:{p4}/"),
        format!("http://[::1]:{p6}/"),
    ] {
        let mut c = Command::new("curl");
        c.args(["-sS", "-g", "--max-time", "10", &url]);
        let (out, _) = output_ok(c, "curl");
        assert_eq!(out, "graft-nginx-page\n", "page from {url}");
    }
    let log = env.dir.join("access.log");
    wait_until("both requests in nginx's access log", LIMIT, || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        t.lines()
            .any(|l| l.starts_with("127.0.0.1 - ") && l.contains("GET / "))
            && t.lines()
                .any(|l| l.starts_with("::1 - ") && l.contains("GET / "))
    });
    let ps = graft_tests::run("ip", ["netns", "pids", &env.ns.name]);
    assert!(
        text(&ps.stdout).split_whitespace().count() >= 3,
        "nginx should run a master and two workers"
    );
}

// ----------------------------------------------------------------- egress --

#[test]
fn egress_curl_python_socat_reach_host_server() {
    let test = "egress_curl_python_socat_reach_host_server";
    let Some((env, srv)) = egress_world(test, &["curl", "socat"]) else {
        return;
    };
    let url = format!("http://127.0.0.1:{}/", srv.addr.port());

    // Without graft the namespace cannot reach the host server at all.
    let mut c = env.ns.cmd("curl");
    c.args(["-sS", "--max-time", "5", &url]);
    let o = output(c, "plain curl", LIMIT);
    assert!(
        !o.status.success(),
        "the namespace must have no route of its own"
    );
    assert!(srv.peers.lock().expect("peers").is_empty());

    let v_out4 = ["-v", "-e", "0.0.0.0/0=ep-out4"];
    let (out, err) = output_ok(curl(&env, &v_out4, &url), "graft curl");
    assert_eq!(out, BODY);
    let want = format!(
        "connect 127.0.0.1:{} -> ep-out4 (host address and port chosen at connect)",
        srv.addr.port()
    );
    assert!(
        graft_lines(&err).iter().any(|l| l.contains(&want)),
        "verbose line {want:?} missing:\n{err}"
    );

    let (out, _) = python_ok(
        &env,
        &["-e", "0.0.0.0/0=ep-out4"],
        "client.py",
        "import socket\n\
         s = socket.create_connection(('127.0.0.1', @PORT@), timeout=10)\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         data = s.makefile('rb').read()\n\
         print(data.split(b'\\r\\n\\r\\n', 1)[1].decode(), end='')\n",
        &[("PORT", srv.addr.port().to_string())],
    );
    assert_eq!(out, BODY);

    let sh = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | socat -t 5 - TCP:127.0.0.1:{}",
        srv.addr.port()
    );
    let (out, _) = output_ok(
        env.graft(&["-e", "0.0.0.0/0=ep-out4", "--", "sh", "-c", &sh]),
        "socat",
    );
    assert!(out.ends_with(BODY), "socat got {out:?}");

    let peers = srv.peers.lock().expect("peers").clone();
    assert_eq!(peers.len(), 3, "curl, python and socat each connected once");
    assert!(peers.iter().all(|p| p.ip().to_string() == "127.0.0.1"));
}

#[test]
fn egress_udp_sendto_sendmsg_and_v4_mapped() {
    let Some(env) = py_env("egress_udp_sendto_sendmsg_and_v4_mapped", &[]) else {
        return;
    };
    env.add("ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    let u = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    let port = u.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = u.recv_from(&mut buf) {
            s2.lock().expect("seen").push((from, buf[..n].to_vec()));
            let mut r = b"pong:".to_vec();
            r.extend_from_slice(&buf[..n]);
            let _ = u.send_to(&r, from);
        }
    });
    let (out, err) = python_ok(
        &env,
        &["-v", "-e", "0.0.0.0/0=ep-out4"],
        "udp.py",
        "import socket\n\
         A = ('127.0.0.1', @PORT@)\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)\n\
         s.sendto(b'ping', A); print(s.recv(100).decode(), s.getsockname()[1])\n\
         t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); t.settimeout(10)\n\
         t.sendmsg([b'msg'], [], 0, A); print(t.recv(100).decode(), t.getsockname()[1])\n\
         u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(10)\n\
         u.sendto(b'mapped', ('::ffff:127.0.0.1', @PORT@)); print(u.recv(100).decode(), u.getsockname()[1])\n\
         import ctypes\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         class iovec(ctypes.Structure): _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n\
         class msghdr(ctypes.Structure): _fields_ = [('name', ctypes.c_void_p), ('namelen', ctypes.c_uint32),\n\
         \x20   ('iov', ctypes.POINTER(iovec)), ('iovlen', ctypes.c_size_t), ('control', ctypes.c_void_p),\n\
         \x20   ('controllen', ctypes.c_size_t), ('flags', ctypes.c_int)]\n\
         class mmsghdr(ctypes.Structure): _fields_ = [('hdr', msghdr), ('len', ctypes.c_uint)]\n\
         class sin(ctypes.Structure): _fields_ = [('family', ctypes.c_uint16), ('port', ctypes.c_uint16),\n\
         \x20   ('addr', ctypes.c_uint32), ('zero', ctypes.c_uint64)]\n\
         w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); w.settimeout(10)\n\
         sa = sin(socket.AF_INET, socket.htons(@PORT@), int.from_bytes(socket.inet_aton('127.0.0.1'), 'little'), 0)\n\
         data = ctypes.create_string_buffer(b'mmsg', 4); iov = iovec(ctypes.cast(data, ctypes.c_void_p), 4)\n\
         m = mmsghdr(msghdr(ctypes.cast(ctypes.pointer(sa), ctypes.c_void_p), ctypes.sizeof(sa),\n\
         \x20   ctypes.pointer(iov), 1, None, 0, 0), 0)\n\
         assert libc.sendmmsg(w.fileno(), ctypes.byref(m), 1, 0) == 1, ctypes.get_errno()\n\
         print(w.recv(100).decode(), w.getsockname()[1])\n",
        &[("PORT", port.to_string())],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "stdout: {out}\nstderr: {err}");
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 4);
    for (line, (want, (from, data))) in lines
        .iter()
        .zip(["ping", "msg", "mapped", "mmsg"].iter().zip(seen.iter()))
    {
        let (reply, sport) = line.split_once(' ').expect("two fields");
        assert_eq!(reply, format!("pong:{want}"));
        assert_eq!(data, want.as_bytes());
        // The server saw the host-side source: the grafted socket's own port.
        assert_eq!(from.ip().to_string(), "127.0.0.1");
        assert_eq!(from.port().to_string(), sport);
    }
    for call in [
        "sendto 127.0.0.1:",
        "sendmsg 127.0.0.1:",
        "sendto [::ffff:127.0.0.1]:",
        "sendmmsg 127.0.0.1:",
    ] {
        assert!(
            graft_lines(&err)
                .iter()
                .any(|l| l.contains(call) && l.contains("-> ep-out4")),
            "no grafting line for {call:?}:\n{err}"
        );
    }
}

// -------------------------------------------------------------- unmatched --

#[test]
fn unmatched_sockets_stay_on_the_container_stack() {
    let Some(env) = py_env("unmatched_sockets_stay_on_the_container_stack", &[]) else {
        return;
    };
    add_in4(&env);
    env.add("ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    let py = env.script(
        "local.py",
        "import socket\n\
         l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n\
         c = socket.create_connection(l.getsockname(), timeout=10); a, peer = l.accept()\n\
         c.sendall(b'tcp-local'); print(a.recv(100).decode(), peer[0])\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))\n\
         v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         v.sendto(b'udp-local', u.getsockname()); print(u.recv(100).decode())\n",
        &[],
    );
    for (rules, why) in [
        (
            vec!["-i", "0.0.0.0:0-65535=ep-in4", "-e", "10.0.0.0/8=ep-out4"],
            "no rule",
        ),
        (
            vec![
                "-i",
                "0.0.0.0:0-65535=ep-in4",
                "-e",
                "0.0.0.0/0=ep-out4",
                "-x",
                "127.0.0.0/8",
            ],
            "excluded",
        ),
    ] {
        let mut args = vec!["-v"];
        args.extend(rules);
        args.extend(["--", PY, &py]);
        let (out, err) = output_ok(env.graft(&args), "local talk");
        assert_eq!(out, "tcp-local 127.0.0.1\nudp-local\n", "stderr: {err}");
        let lines = graft_lines(&err);
        assert_line(&lines, |l| {
            l.contains("connect 127.0.0.1:") && l.ends_with(&format!("-> not grafted ({why})"))
        });
        assert_line(&lines, |l| {
            l.contains("listen 127.0.0.1:0 -> not grafted (no rule)")
        });
        assert!(
            !lines.iter().any(|l| l.contains("-> ep-")),
            "nothing may be grafted: {lines:?}"
        );
    }
}

// --------------------------------------------------------------- failures --

/// What every failure script checks: the call fails with an errno, and the
/// container's own stack got nothing.
const FAIL_PY: &str = "import socket\n\
l = socket.socket(); l.bind(('127.0.0.1', @LPORT@)); l.listen(); l.setblocking(False)\n\
c = socket.socket()\n\
try:\n\
\x20   c.connect(('127.0.0.1', @LPORT@)); print('connect ok')\n\
except OSError as e:\n\
\x20   print('connect', e.errno, e.strerror)\n\
try:\n\
\x20   l.accept(); print('local listener got a connection')\n\
except BlockingIOError:\n\
\x20   print('local listener got nothing')\n\
s = socket.socket()\n\
try:\n\
\x20   s.bind(('0.0.0.0', @BPORT@)); print('bind ok')\n\
except OSError as e:\n\
\x20   print('bind', e.errno, e.strerror)\n\
hexport = '%04X' % @BPORT@\n\
n = sum(1 for f in ('/proc/self/net/tcp', '/proc/self/net/tcp6') for line in open(f).readlines()[1:]\n\
\x20       if line.split()[1].endswith(':' + hexport))\n\
print('local sockets on port', n)\n";

fn fail_script(env: &Env) -> (String, u16, u16) {
    let (lport, bport) = (7001u16, 7002u16);
    let py = env.script(
        "fail.py",
        FAIL_PY,
        &[("LPORT", lport.to_string()), ("BPORT", bport.to_string())],
    );
    (py, lport, bport)
}

const FAIL_OUT: &str = "connect 101 Network is unreachable\nlocal listener got nothing\n\
bind 99 Cannot assign requested address\nlocal sockets on port 0\n";

/// One way of breaking the world under a grafted program, and the one line
/// the library must print for a call (`connect`, `bind`) of an address on an
/// endpoint when it is broken that way.
struct FailCase {
    test: &'static str,
    /// Stop graftd after adding the endpoints; otherwise graftd runs but has
    /// only an unrelated endpoint (so the broker is there).
    stop_graftd: bool,
    line: fn(call: &str, addr: &str, ep: &str, broker: &str) -> String,
}

fn unreachable_line(call: &str, addr: &str, ep: &str, broker: &str) -> String {
    format!(
        "graft: {call} {addr}: endpoint \"{ep}\": graftd is not reachable in this network \
         namespace (broker \"{broker}\"): start graftd and add the endpoint with \"ip graft \
         add {ep} ...\""
    )
}

fn missing_line(call: &str, addr: &str, ep: &str, _broker: &str) -> String {
    format!(
        "graft: {call} {addr}: endpoint \"{ep}\" does not exist in this network namespace: \
         add it with \"ip graft add {ep} type ipv4 addr ADDR port PORT\""
    )
}

/// curl, then the failure script, under `graft -n` in a world broken as
/// `case` says: every call fails with its errno and exactly one line, nothing
/// reaches the host server, nothing lands on the container's own stack.
fn fails_closed(case: &FailCase) {
    let Some(mut env) = py_env(case.test, &["curl"]) else {
        return;
    };
    if case.stop_graftd {
        add_in4(&env);
        env.add("ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    } else {
        env.add("ep-other type ipv4 addr 127.0.0.1 port dynamic");
    }
    let srv = HostHttp::start("127.0.0.1:0");
    if case.stop_graftd {
        env.d.proc.term();
        wait_until("graftd to exit", LIMIT, || !env.d.alive());
    }
    let broker = env.d.broker.clone();
    let line = |call: &str, addr: String, ep: &str| (case.line)(call, &addr, ep, &broker);

    let url = format!("http://127.0.0.1:{}/", srv.addr.port());
    let o = output(
        curl(&env, &["-n", "-e", "0.0.0.0/0=ep-out4"], &url),
        "curl",
        LIMIT,
    );
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert_eq!(
        graft_lines(&err),
        vec![line(
            "connect",
            format!("127.0.0.1:{}", srv.addr.port()),
            "ep-out4"
        )],
        "stderr: {err}"
    );
    assert!(
        err.contains("Couldn't connect to server"),
        "curl says: {err}"
    );

    let (py, lport, bport) = fail_script(&env);
    let rules = [
        "-n",
        "-i",
        "0.0.0.0:0-65535=ep-in4",
        "-e",
        "0.0.0.0/0=ep-out4",
    ];
    let mut c = env.graft(&rules);
    c.args(["--", PY, &py]);
    let o = output(c, "fail.py", LIMIT);
    let err = text(&o.stderr);
    assert_eq!(text(&o.stdout), FAIL_OUT, "stderr: {err}");
    assert_eq!(
        graft_lines(&err),
        vec![
            line("connect", format!("127.0.0.1:{lport}"), "ep-out4"),
            line("bind", format!("0.0.0.0:{bport}"), "ep-in4"),
        ]
    );
    assert!(srv.peers.lock().expect("peers").is_empty());
}

#[test]
fn graftd_stopped_fails_closed_with_one_line() {
    fails_closed(&FailCase {
        test: "graftd_stopped_fails_closed_with_one_line",
        stop_graftd: true,
        line: unreachable_line,
    });
}

#[test]
fn missing_endpoint_fails_closed_with_one_line() {
    fails_closed(&FailCase {
        test: "missing_endpoint_fails_closed_with_one_line",
        stop_graftd: false,
        line: missing_line,
    });
}

#[test]
fn bad_mapping_is_refused_by_graft_and_by_the_library() {
    let Some(env) = py_env("bad_mapping_is_refused_by_graft_and_by_the_library", &[]) else {
        return;
    };
    // The launcher refuses before exec.
    let o = output(
        env.graft(&["-i", "0.0.0.0:99999=ep-in4", "--", PY, "-c", "print('ran')"]),
        "graft bad",
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "the command must not run");
    let lines = graft_lines(&text(&o.stderr));
    assert!(
        lines.len() == 1 && lines[0].contains("\"99999\" is not a port (0-65535)"),
        "{lines:?}"
    );

    // A bad environment reaching the library directly fails closed: every
    // IPv4/IPv6 bind and connect fails with EINVAL, one line per process.
    let py = env.script(
        "bad.py",
        "import socket\n\
         for i in range(2):\n\
         \x20   try:\n\
         \x20       socket.socket().bind(('0.0.0.0', 7000)); print('bound')\n\
         \x20   except OSError as e:\n\
         \x20       print('bind', e.errno)\n\
         try:\n\
         \x20   socket.socket().connect(('127.0.0.1', 7000))\n\
         except OSError as e:\n\
         \x20   print('connect', e.errno)\n\
         a, b = socket.socketpair(); a.send(b'unix ok'); print(b.recv(10).decode())\n",
        &[],
    );
    let mut c = env.ns.cmd(PY);
    c.arg(&py)
        .env("LD_PRELOAD", preload_lib())
        .env("GRAFT_INGRESS_CONVERT", "0.0.0.0:99999=ep-in4")
        .stdin(Stdio::null());
    env.d.apply(&mut c);
    let o = output(c, "bad env", LIMIT);
    assert_eq!(
        text(&o.stdout),
        "bind 22\nbind 22\nconnect 22\nunix ok\n",
        "stderr: {}",
        text(&o.stderr)
    );
    assert_eq!(
        graft_lines(&text(&o.stderr)),
        vec![
            "graft: bad mapping in GRAFT_INGRESS_CONVERT: \"0.0.0.0:99999=ep-in4\": \"99999\" \
             is not a port (0-65535): fix the rule (graft -i ADDR:PORT[-PORT]=EP, -e \
             PREFIX/LEN=EP, -x PREFIX/LEN); every IPv4/IPv6 bind and connect fails with EINVAL \
             until then"
                .to_owned()
        ]
    );
}

#[test]
fn refused_option_fails_the_bind() {
    let Some(env) = py_env("refused_option_fails_the_bind", &[]) else {
        return;
    };
    add_in4(&env);
    let py = env.script(
        "mark.py",
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)\n\
         try:\n\
         \x20   s.bind(('0.0.0.0', 7000)); print('bound')\n\
         except OSError as e:\n\
         \x20   print('bind', e.errno, e.strerror)\n",
        &[],
    );
    let o = output(
        env.graft(&["-i", "0.0.0.0:0-65535=ep-in4", "--", PY, &py]),
        "SO_MARK",
        LIMIT,
    );
    assert_eq!(text(&o.stdout), "bind 1 Operation not permitted\n");
    assert_eq!(
        graft_lines(&text(&o.stderr)),
        vec![
            "graft: bind 0.0.0.0:7000: endpoint \"ep-in4\": option SO_MARK refused by graftd: \
              do not set it on a socket graft maps, or leave this address out of the graft rules"
                .to_owned()
        ]
    );
}

// -------------------------------------------------------------- processes --

#[test]
fn fork_after_grafting_child_accepts_and_grafts_anew() {
    let Some((env, port)) = ingress_world("fork_after_grafting_child_accepts_and_grafts_anew")
    else {
        return;
    };
    let srv = add_out4(&env);
    let py = env.script(
        "fork.py",
        "import socket, os\n\
         A = ('127.0.0.1', @HP@)\n\
         def get():\n\
         \x20   e = socket.create_connection(A, timeout=10); e.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         \x20   d = b''\n\
         \x20   while True:\n\
         \x20       b = e.recv(1000)\n\
         \x20       if not b: return d\n\
         \x20       d += b\n\
         assert b'@BODY@' in get()  # the parent's broker connection is now cached\n\
         s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen(8)\n\
         print('listening', flush=True)\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   c, peer = s.accept(); c.sendall(b'child'); c.close()\n\
         \x20   os._exit(0 if b'@BODY@' in get() else 3)\n\
         s.close()\n\
         _, st = os.waitpid(pid, 0)\n\
         print('child exit', os.waitstatus_to_exitcode(st), flush=True)\n",
        &[("HP", srv.addr.port().to_string()), ("BODY", BODY.to_owned())],
    );
    let mut cmd = env.graft(&[
        "-i",
        "0.0.0.0:0-65535=ep-in4",
        "-e",
        "0.0.0.0/0=ep-out4",
        "--",
        PY,
        &py,
    ]);
    cmd.stdout(Stdio::piped());
    let mut p = Proc::spawn(cmd, "fork.py");
    let so = p.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut all = String::new();
        let mut so = so;
        let _ = so.read_to_string(&mut all);
        let _ = tx.send(all);
    });
    wait_tcp_no_consume(port);
    let got = graft_tests::tcp_exchange(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        b"",
        Duration::from_secs(10),
    );
    assert_eq!(got, b"child");
    let st = p.wait_timeout(LIMIT);
    assert!(st.success());
    let out = rx.recv_timeout(LIMIT).expect("output");
    assert_eq!(out, "listening\nchild exit 0\n");
    assert_eq!(srv.accepted(), 2, "parent and child reached the host");
}

/// Waits until something listens on 127.0.0.1:port, without connecting (a
/// probe connection would be accepted by one-shot servers).
fn wait_tcp_no_consume(port: u16) {
    let hex = format!(":{port:04X} ");
    wait_until(&format!("a listener on port {port}"), LIMIT, || {
        ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&hex) && cols[3] == "0A"
                })
        })
    });
}

#[test]
fn exec_and_child_processes_are_grafted() {
    let Some((env, port)) = ingress_world("exec_and_child_processes_are_grafted") else {
        return;
    };
    let srv = add_out4(&env);
    let child = env.script(
        "child.py",
        "import socket\n\
         e = socket.create_connection(('127.0.0.1', @HP@), timeout=10)\n\
         e.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); d = b''\n\
         while True:\n\
         \x20   b = e.recv(1000)\n\
         \x20   if not b: break\n\
         \x20   d += b\n\
         print(d.split(b'\\r\\n\\r\\n', 1)[1].decode(), end='')\n",
        &[("HP", srv.addr.port().to_string())],
    );
    let server = env.script(
        "server.py",
        "import socket, subprocess, sys\n\
         s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen()\n\
         c, _ = s.accept()\n\
         out = subprocess.run([sys.executable, '@CHILD@'], capture_output=True, timeout=30)\n\
         c.sendall(out.stdout + out.stderr); c.close()\n",
        &[("CHILD", child)],
    );
    let sh = format!("exec {PY} {server}");
    let cmd = env.graft(&[
        "-i",
        "0.0.0.0:0-65535=ep-in4",
        "-e",
        "0.0.0.0/0=ep-out4",
        "--",
        "sh",
        "-c",
        &sh,
    ]);
    let mut p = Proc::spawn(cmd, "sh -c exec python3");
    wait_tcp_no_consume(port);
    let got = graft_tests::tcp_exchange(
        format!("127.0.0.1:{port}").parse().expect("addr"),
        b"",
        LIMIT,
    );
    assert_eq!(text(&got), BODY);
    assert!(p.wait_timeout(LIMIT).success());
    assert_eq!(srv.accepted(), 1);
}

#[test]
fn thousand_concurrent_grafted_connections() {
    let Some((env, srv)) = egress_world("thousand_concurrent_grafted_connections", &[]) else {
        return;
    };
    let py = env.script(
        "many.py",
        "import socket, threading, selectors, resource, time, sys\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))\n\
         A = ('127.0.0.1', @HP@); N = 1000; T = 10\n\
         socks = []; errs = []; lock = threading.Lock()\n\
         def work():\n\
         \x20   mine = []\n\
         \x20   for i in range(N // T):\n\
         \x20       s = socket.socket(); s.setblocking(False)\n\
         \x20       r = s.connect_ex(A)\n\
         \x20       if r not in (0, 115): errs.append(r)\n\
         \x20       mine.append(s)\n\
         \x20   with lock: socks.extend(mine)\n\
         ts = [threading.Thread(target=work) for _ in range(T)]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         sel = selectors.DefaultSelector()\n\
         for s in socks: sel.register(s, selectors.EVENT_WRITE)\n\
         pending = len(socks); ok = 0; deadline = time.time() + 60\n\
         while pending and time.time() < deadline:\n\
         \x20   for key, _ in sel.select(timeout=1):\n\
         \x20       s = key.fileobj; sel.unregister(s); pending -= 1\n\
         \x20       e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)\n\
         \x20       if e: errs.append(e)\n\
         \x20       else: s.send(b'x'); ok += 1\n\
         print('open', ok, 'errors', errs[:5], flush=True)\n\
         sys.stdin.read()\n",
        &[("HP", srv.addr.port().to_string())],
    );
    let mut cmd = env.graft(&["-e", "0.0.0.0/0=ep-out4", "--", PY, &py]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut p = Proc::spawn(cmd, "many.py");
    let so = lines_of(p.child.stdout.take().expect("stdout"));
    let line = wait_for(&so, "open ", Duration::from_secs(120));
    assert_eq!(line, "open 1000 errors []");
    wait_until("1000 connections at the host server", LIMIT, || {
        srv.accepted() >= 1000
    });
    assert_eq!(srv.accepted(), 1000);
    drop(p.child.stdin.take());
    assert!(p.wait_timeout(LIMIT).success());
}

#[test]
fn so_reuseport_two_listeners_on_one_endpoint() {
    let Some((env, port)) = ingress_world("so_reuseport_two_listeners_on_one_endpoint") else {
        return;
    };
    let py = env.script(
        "reuseport.py",
        "import socket, selectors, time\n\
         ls = []\n\
         for i in range(2):\n\
         \x20   s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         \x20   s.bind(('0.0.0.0', 7000)); s.listen(64); ls.append(s)\n\
         print('listening', [s.getsockname() for s in ls], flush=True)\n\
         sel = selectors.DefaultSelector()\n\
         for i, s in enumerate(ls): sel.register(s, selectors.EVENT_READ, i)\n\
         counts = [0, 0]; deadline = time.time() + 60\n\
         while sum(counts) < 40 and time.time() < deadline:\n\
         \x20   for key, _ in sel.select(timeout=30):\n\
         \x20       c, _ = key.fileobj.accept(); c.sendall(b'L%d' % key.data); c.close()\n\
         \x20       counts[key.data] += 1\n\
         print('counts', counts, flush=True)\n",
        &[],
    );
    let mut cmd = env.graft(&["-i", "0.0.0.0:0-65535=ep-in4", "--", PY, &py]);
    cmd.stdout(Stdio::piped());
    let mut p = Proc::spawn(cmd, "reuseport.py");
    let mut so = p.child.stdout.take().expect("stdout");
    let mut first = Vec::new();
    let mut b = [0u8; 1];
    while !first.ends_with(b"\n") && first.len() < 1000 {
        if so.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        first.push(b[0]);
    }
    assert_eq!(
        text(&first),
        format!("listening [('127.0.0.1', {port}), ('127.0.0.1', {port})]\n")
    );
    let mut seen = [0usize; 2];
    for _ in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = Vec::new();
        s.read_to_end(&mut r).expect("read");
        match r.as_slice() {
            b"L0" => seen[0] += 1,
            b"L1" => seen[1] += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let mut rest = String::new();
    let _ = so.read_to_string(&mut rest);
    assert!(p.wait_timeout(LIMIT).success());
    assert_eq!(rest, format!("counts [{}, {}]\n", seen[0], seen[1]));
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "the kernel spreads 40 connections over both listeners: {seen:?}"
    );
}

// ----------------------------------------------------- socket semantics --

#[test]
fn getsockname_policy_host_and_app() {
    let Some((env, port)) = ingress_world("getsockname_policy_host_and_app") else {
        return;
    };
    env.add("ep-dyn type ipv4 addr 127.0.0.1 port dynamic");
    let py = env.script(
        "names.py",
        "import socket\n\
         s = socket.socket(); s.bind(('0.0.0.0', 7000)); s.listen(); print(*s.getsockname())\n\
         t = socket.socket(); t.bind(('0.0.0.0', 0)); t.listen(); print(*t.getsockname())\n\
         r = socket.socket(); r.connect(('127.0.0.1', @PORT@)); print(*r.getsockname())\n",
        &[("PORT", port.to_string())],
    );
    let rules = [
        "-v",
        "-i",
        "0.0.0.0:7000=ep-in4",
        "-i",
        "0.0.0.0:0=ep-dyn",
        "-e",
        "0.0.0.0/0=ep-dyn",
    ];
    let run = |policy: Option<&str>| {
        let mut args: Vec<&str> = rules.to_vec();
        if let Some(p) = policy {
            args.extend(["-g", p]);
        }
        args.extend(["--", PY, &py]);
        output_ok(env.graft(&args), "names.py")
    };
    let (host, err) = run(None);
    let l: Vec<&str> = host.lines().collect();
    assert_eq!(l.len(), 3, "{host}\n{err}");
    assert_eq!(l[0], format!("127.0.0.1 {port}"));
    let dyn_port: u16 = l[1]
        .strip_prefix("127.0.0.1 ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("listen-time graft onto ep-dyn: {host}\n{err}"));
    assert_ne!(dyn_port, 0);
    assert!(
        graft_lines(&err).iter().any(|x| x.ends_with(&format!(
            "listen 0.0.0.0:0 -> ep-dyn (host 127.0.0.1:{dyn_port})"
        ))),
        "{err}"
    );
    assert!(
        l[2].starts_with("127.0.0.1 "),
        "egress reports the host address"
    );

    let (app, err) = run(Some("app"));
    let l: Vec<&str> = app.lines().collect();
    assert_eq!(l.len(), 3, "{app}\n{err}");
    assert_eq!(l[0], "0.0.0.0 7000");
    let p: u16 = l[1]
        .strip_prefix("0.0.0.0 ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("app policy, port 0: {app}"));
    assert_ne!(p, 0, "the real port replaces the 0 the app asked for");
    assert!(
        l[2].starts_with("127.0.0.1 "),
        "egress always reports the host address"
    );
}

#[test]
fn options_carry_over_to_the_host_socket() {
    let Some((env, port)) = ingress_world("options_carry_over_to_the_host_socket") else {
        return;
    };
    let (out, err) = python_ok(
        &env,
        &["-i", "0.0.0.0:0-65535=ep-in4"],
        "opts.py",
        "import socket\n\
         S, T = socket.SOL_SOCKET, socket.IPPROTO_TCP\n\
         s = socket.socket()\n\
         s.setsockopt(S, socket.SO_RCVBUF, 65536); s.setsockopt(T, socket.TCP_NODELAY, 1)\n\
         s.setsockopt(S, socket.SO_REUSEADDR, 1); s.setsockopt(S, socket.SO_KEEPALIVE, 1)\n\
         s.setsockopt(T, socket.TCP_KEEPIDLE, 77)\n\
         s.bind(('0.0.0.0', 7000))\n\
         print(*s.getsockname(), s.getsockopt(S, socket.SO_RCVBUF), s.getsockopt(T, socket.TCP_NODELAY),\n\
         \x20     s.getsockopt(S, socket.SO_REUSEADDR), s.getsockopt(S, socket.SO_KEEPALIVE),\n\
         \x20     s.getsockopt(T, socket.TCP_KEEPIDLE))\n",
        &[],
    );
    // The kernel reports twice the SO_RCVBUF that was set.
    assert_eq!(out, format!("127.0.0.1 {port} 131072 1 1 1 77\n"), "{err}");
}

/// Python helper for the egress option tests: `fetch(s)` sends a request
/// on a connected socket and returns the body the host server answered.
const FETCH_PY: &str = "import socket, os\n\
     S, T = socket.SOL_SOCKET, socket.IPPROTO_TCP\n\
     DST = ('127.0.0.1', @HP@)\n\
     def fetch(s):\n\
     \x20   s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
     \x20   return s.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode()\n";

#[test]
fn egress_options_set_before_connect_carry_over() {
    let Some((env, srv)) = egress_world("egress_options_set_before_connect_carry_over", &[]) else {
        return;
    };
    // Three ways an option reaches the socket before the graft: set on the
    // descriptor itself, set through a duplicate (recorded on the other
    // descriptor), set by a forked child on the shared socket. The values
    // differ from a fresh socket's (SO_RCVBUF 50000 reads back as 100000,
    // a fresh TCP socket has 131072), so a lost option shows.
    let body = format!(
        "{FETCH_PY}\
         s = socket.socket()\n\
         s.setsockopt(S, socket.SO_RCVBUF, 50000); s.setsockopt(T, socket.TCP_NODELAY, 1)\n\
         s.setsockopt(S, socket.SO_KEEPALIVE, 1); s.setsockopt(T, socket.TCP_KEEPIDLE, 77)\n\
         s.connect(DST)\n\
         print('own', s.getsockopt(S, socket.SO_RCVBUF), s.getsockopt(T, socket.TCP_NODELAY),\n\
         \x20     s.getsockopt(S, socket.SO_KEEPALIVE), s.getsockopt(T, socket.TCP_KEEPIDLE), fetch(s))\n\
         d = socket.socket(); e = d.dup(); e.setsockopt(T, socket.TCP_NODELAY, 1); e.close()\n\
         d.connect(DST)\n\
         print('dup', d.getsockopt(T, socket.TCP_NODELAY), fetch(d))\n\
         f = socket.socket()\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   f.setsockopt(S, socket.SO_KEEPALIVE, 1); os._exit(0)\n\
         os.waitpid(pid, 0)\n\
         f.connect(DST)\n\
         print('fork', f.getsockopt(S, socket.SO_KEEPALIVE), fetch(f))\n"
    );
    let (out, err) = python_ok(
        &env,
        &["-v", "-e", "0.0.0.0/0=ep-out4"],
        "opts_egress.py",
        &body,
        &[("HP", srv.addr.port().to_string())],
    );
    assert_eq!(
        out,
        format!("own 100000 1 1 77 {BODY}\ndup 1 {BODY}\nfork 1 {BODY}\n"),
        "{err}"
    );
    // Only grafted sockets reach the host server from this namespace.
    assert_eq!(srv.accepted(), 3);
    let want = format!("connect 127.0.0.1:{} -> ep-out4", srv.addr.port());
    assert_eq!(
        graft_lines(&err)
            .iter()
            .filter(|l| l.contains(&want))
            .count(),
        3,
        "{err}"
    );
}

#[test]
fn egress_refused_option_fails_the_connect() {
    let Some((env, srv)) = egress_world("egress_refused_option_fails_the_connect", &[]) else {
        return;
    };
    // SO_MARK set and then switched off again is what a fresh socket has:
    // grafted. Left on: refused by graftd, the connect fails.
    let body = [
        FETCH_PY,
        "z = socket.socket(); z.setsockopt(S, socket.SO_MARK, 7); z.setsockopt(S, socket.SO_MARK, 0)\n\
         z.connect(DST); print('off', fetch(z))\n\
         m = socket.socket(); m.setsockopt(S, socket.SO_MARK, 7)\n\
         try:\n\
         \x20   m.connect(DST); print('connected')\n\
         except OSError as e:\n\
         \x20   print('connect', e.errno, e.strerror)\n",
    ]
    .concat();
    let py = env.script(
        "mark_egress.py",
        &body,
        &[("HP", srv.addr.port().to_string())],
    );
    let o = output(
        env.graft(&["-e", "0.0.0.0/0=ep-out4", "--", PY, &py]),
        "SO_MARK egress",
        LIMIT,
    );
    assert_eq!(
        text(&o.stdout),
        format!("off {BODY}\nconnect 1 Operation not permitted\n"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(
        graft_lines(&text(&o.stderr)),
        vec![format!(
            "graft: connect 127.0.0.1:{}: endpoint \"ep-out4\": option SO_MARK refused by \
             graftd: do not set it on a socket graft maps, or leave this address out of the \
             graft rules",
            srv.addr.port()
        )]
    );
    assert_eq!(srv.accepted(), 1, "the refused socket never left");
}

#[test]
fn nonblocking_connect_keeps_einprogress_and_fd_flags() {
    let test = "nonblocking_connect_keeps_einprogress_and_fd_flags";
    let Some((env, srv)) = egress_world(test, &[]) else {
        return;
    };
    let (out, err) = python_ok(
        &env,
        &["-e", "0.0.0.0/0=ep-out4"],
        "nb.py",
        "import socket, select, fcntl, os\n\
         A = ('127.0.0.1', @HP@)\n\
         s = socket.socket(); s.setblocking(False); os.set_inheritable(s.fileno(), True)\n\
         print('connect_ex', s.connect_ex(A))\n\
         select.select([], [s], [], 10)\n\
         print('so_error', s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))\n\
         print('nonblock', bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK),\n\
         \x20     'inheritable', os.get_inheritable(s.fileno()))\n\
         t = socket.create_connection(A, timeout=None)\n\
         print('blocking', t.getblocking(), 'inheritable', os.get_inheritable(t.fileno()))\n\
         d = t.dup(); print('dup', d.getpeername() == t.getpeername())\n",
        &[("HP", srv.addr.port().to_string())],
    );
    assert_eq!(
        out,
        "connect_ex 115\nso_error 0\nnonblock True inheritable True\n\
         blocking True inheritable False\ndup True\n",
        "{err}"
    );
    wait_until("two connections at the host", LIMIT, || srv.accepted() == 2);
}

#[test]
fn egress_ipv6_and_client_bind_port_zero() {
    let Some((env, srv4)) = egress_world("egress_ipv6_and_client_bind_port_zero", &["curl"]) else {
        return;
    };
    add_in4(&env);
    env.add("ep-out6 type ipv6 addr :: port dynamic");
    let srv6 = HostHttp::start("[::1]:0");
    let url = format!("http://[::1]:{}/", srv6.addr.port());
    let (out, err) = output_ok(curl(&env, &["-v", "-e", "::/0=ep-out6"], &url), "curl -6");
    assert_eq!(out, BODY, "{err}");
    assert_eq!(srv6.peers.lock().expect("peers")[0].ip().to_string(), "::1");

    // A client that binds port 0 before connecting is a client, even with an
    // ingress rule covering port 0: it is grafted on egress, not ingress.
    let (out, err) = python_ok(
        &env,
        &[
            "-v",
            "-i",
            "0.0.0.0:0-65535=ep-in4",
            "-e",
            "0.0.0.0/0=ep-out4",
        ],
        "client_bind0.py",
        "import socket\n\
         c = socket.socket(); c.bind(('0.0.0.0', 0)); c.connect(('127.0.0.1', @HP@))\n\
         c.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); c.shutdown(socket.SHUT_WR)\n\
         print(c.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode())\n",
        &[("HP", srv4.addr.port().to_string())],
    );
    assert_eq!(out, format!("{BODY}\n"), "{err}");
    let lines = graft_lines(&err);
    assert!(
        lines.iter().any(|l| l.contains(&format!(
            "connect 127.0.0.1:{} -> ep-out4",
            srv4.addr.port()
        ))),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("-> ep-in4")), "{lines:?}");
    assert_eq!(srv4.accepted(), 1);
}

#[test]
fn socket_inherited_across_exec_is_classified_and_grafted() {
    let test = "socket_inherited_across_exec_is_classified_and_grafted";
    let Some((env, srv)) = egress_world(test, &[]) else {
        return;
    };
    // The first image makes the socket; the exec'd one has never seen it and
    // must classify it (unbound, unconnected AF_INET stream) on connect.
    // The options set by the first image were never seen by the second
    // one's library: they are found by comparing with a fresh socket.
    let second = env.script(
        "second.py",
        "import socket, sys\n\
         S, T = socket.SOL_SOCKET, socket.IPPROTO_TCP\n\
         s = socket.socket(fileno=int(sys.argv[1]))\n\
         s.connect(('127.0.0.1', @HP@)); s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         print(s.getsockopt(S, socket.SO_RCVBUF), s.getsockopt(T, socket.TCP_NODELAY),\n\
         \x20     s.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode())\n",
        &[("HP", srv.addr.port().to_string())],
    );
    let first = env.script(
        "first.py",
        "import socket, os, sys\n\
         s = socket.socket(); os.set_inheritable(s.fileno(), True)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 50000)\n\
         s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n\
         os.execv(sys.executable, [sys.executable, '@SECOND@', str(s.fileno())])\n",
        &[("SECOND", second)],
    );
    let (out, err) = output_ok(
        env.graft(&["-v", "-e", "0.0.0.0/0=ep-out4", "--", PY, &first]),
        "exec inherit",
    );
    assert_eq!(out, format!("100000 1 {BODY}\n"), "{err}");
    assert_eq!(srv.accepted(), 1);
    assert!(
        graft_lines(&err)
            .iter()
            .any(|l| l.contains(&format!("connect 127.0.0.1:{} -> ep-out4", srv.addr.port()))),
        "{err}"
    );
}

/// A C program (built with the `cc` that cargo links with): errno is kept on
/// success, F_DUPFD copies the decision, and a signal handler that grafts
/// while the main thread is grafting (so the broker connection is busy)
/// neither deadlocks nor fails.
const SIGNALS_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

static struct sockaddr_in dst;
static volatile sig_atomic_t handler_ok, handler_fail;

static void on_alarm(int sig) {
    (void)sig;
    int saved = errno;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&dst, sizeof dst) == 0)
        handler_ok++;
    else
        handler_fail++;
    close(s);
    errno = saved;
}

int main(int argc, char **argv) {
    dst.sin_family = AF_INET;
    dst.sin_port = htons(atoi(argv[1]));
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    int s = socket(AF_INET, SOCK_STREAM, 0);
    errno = 4242;
    int r = connect(s, (struct sockaddr *)&dst, sizeof dst);
    printf("connect %d errno %d\n", r, errno);
    errno = 4343;
    int d = fcntl(s, F_DUPFD_CLOEXEC, 100);
    struct sockaddr_in a, b;
    socklen_t la = sizeof a, lb = sizeof b;
    getpeername(s, (struct sockaddr *)&a, &la);
    getpeername(d, (struct sockaddr *)&b, &lb);
    printf("dup %d same peer %d errno %d\n", d >= 100, memcmp(&a, &b, sizeof a) == 0, errno);
    close(d);
    close(s);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval it = {{0, 1000}, {0, 1000}};
    setitimer(ITIMER_REAL, &it, NULL);
    int ok = 0, fail = 0;
    for (int i = 0; i < 300; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&dst, sizeof dst) == 0)
            ok++;
        else {
            fail++;
            perror("connect");
        }
        close(c);
    }
    struct itimerval off;
    memset(&off, 0, sizeof off);
    setitimer(ITIMER_REAL, &off, NULL);
    printf("main ok %d fail %d; handler grafted %s, failed %d\n", ok, fail,
           handler_ok > 0 ? "yes" : "no", (int)handler_fail);
    return 0;
}
"#;

#[test]
fn c_program_errno_dup_and_signal_handlers() {
    let Some((env, srv)) = egress_world("c_program_errno_dup_and_signal_handlers", &["cc"]) else {
        return;
    };
    let src = env.dir.join("signals.c");
    let exe = env.dir.join("signals");
    std::fs::write(&src, SIGNALS_C).expect("write C");
    let mut cc = Command::new("cc");
    cc.arg("-O2").arg("-o").arg(&exe).arg(&src);
    output_ok(cc, "cc");
    let exe = exe.display().to_string();
    let (out, err) = output_ok(
        env.graft(&[
            "-e",
            "0.0.0.0/0=ep-out4",
            "--",
            &exe,
            &srv.addr.port().to_string(),
        ]),
        "signals",
    );
    assert_eq!(
        out,
        "connect 0 errno 4242\ndup 1 same peer 1 errno 4343\n\
         main ok 300 fail 0; handler grafted yes, failed 0\n",
        "{err}"
    );
    // The program's connections carry no data: connect() returns at the
    // handshake, before the server thread has counted every accept.
    graft_tests::wait_until("the server accepts all 301", LIMIT, || {
        srv.accepted() >= 301
    });
}

#[test]
fn stuck_or_garbled_broker_fails_closed() {
    let Some(env) = py_env("stuck_or_garbled_broker_fails_closed", &[]) else {
        return;
    };
    // A stand-in broker inside the namespace that never answers, or answers
    // garbage: the library must give up in bounded time, never hang, never
    // fall back to the container's stack.
    let fake = env.script(
        "fake_broker.py",
        "import socket, sys\n\
         l = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); l.bind('\\0' + sys.argv[1]); l.listen()\n\
         print('ready', flush=True)\n\
         held = []\n\
         while True:\n\
         \x20   c, _ = l.accept(); held.append(c); c.recv(8192)\n\
         \x20   if sys.argv[2] == 'garbage': c.send(b'GRFT' + b'\\xff' * 12)\n",
        &[],
    );
    let client = env.script(
        "bind.py",
        "import socket\n\
         try:\n\
         \x20   socket.socket().bind(('0.0.0.0', 7000)); print('bound')\n\
         except OSError as e:\n\
         \x20   print('bind', e.errno, e.strerror)\n",
        &[],
    );
    for (mode, want_out, want_line) in [
        (
            "silent",
            "bind 110 Connection timed out\n",
            "graftd did not answer within 5 s (broker \"NAME\"): check graftd's log",
        ),
        (
            "garbage",
            "bind 71 Protocol error\n",
            "graftd sent an invalid reply (wrong size): run matching versions of graftd and \
             libgraft-convert",
        ),
    ] {
        let name = unique("graft-test-fake/");
        let mut f = env.ns.cmd(PY);
        f.args([&fake, &name, mode])
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        let mut fp = Proc::spawn(f, "fake broker");
        let lines = lines_of(fp.child.stdout.take().expect("stdout"));
        wait_for(&lines, "ready", LIMIT);
        let mut cmd = env.graft(&["-n", "-i", "0.0.0.0:0-65535=ep-in4", "--", PY, &client]);
        cmd.env("GRAFT_BROKER", &name);
        let o = output(cmd, "bind.py", LIMIT);
        assert_eq!(text(&o.stdout), want_out, "{}", text(&o.stderr));
        assert_eq!(
            graft_lines(&text(&o.stderr)),
            vec![format!(
                "graft: bind 0.0.0.0:7000: endpoint \"ep-in4\": {}",
                want_line.replace("NAME", &name)
            )]
        );
        drop(fp);
    }
}
