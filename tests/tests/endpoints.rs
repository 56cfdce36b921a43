//! End-to-end tests of how endpoints behave for ordinary programs: options
//! that would choose an interface, a route or a source address are refused
//! on grafted sockets (by graftd before the graft, by graft-ebpf's guard
//! after it), and pooled egress sockets never cross a namespace boundary.
//! Real python3 programs in namespaces the tests make, a private graftd
//! each, and assertions on what the host side received.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graft_tests::{output_within, text, Env};

const PY: &str = "/usr/bin/python3";
const LIMIT: Duration = Duration::from_secs(60);

/// Whether graftd runs with its eBPF companion; if not, the skip line.
fn ebpf_or_skip(env: &Env, test: &str) -> bool {
    let start = Instant::now();
    loop {
        let log = env.d.log_text();
        if log.contains("eBPF companion attached") {
            return true;
        }
        if log.contains("eBPF companion unavailable") {
            let why = log.lines().find(|l| l.contains("unavailable"));
            println!("SKIP: {test}: {}", why.unwrap_or(""));
            return false;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "graftd said nothing about eBPF:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An [`Env`] for `test` whose graftd has the eBPF companion attached.
fn ebpf_env(test: &str, needs: &[&str]) -> Option<Env> {
    let env = Env::new(test, needs)?;
    ebpf_or_skip(&env, test).then_some(env)
}

/// An [`Env`] with endpoint `ep-u` on the unix socket `file` in its
/// directory, and that socket's path.
fn unix_env(test: &str, needs: &[&str], file: &str) -> Option<(Env, String)> {
    let env = Env::new(test, needs)?;
    let sock = env.dir.join(file).display().to_string();
    env.add(&format!("ep-u type unix path {sock}"));
    Some((env, sock))
}

/// Compiles `file` (in the env's directory) with javac, into it.
fn javac(env: &Env, file: &str) {
    let mut c = Command::new("javac");
    c.arg("-d").arg(&env.dir).arg(env.dir.join(file));
    let o = output_within(c, "javac", LIMIT, None);
    assert!(o.status.success(), "javac: {}", text(&o.stderr));
}

/// A host echo server on `addr` answering up to `n` connections (each:
/// read to EOF, send it back), for at most [`LIMIT`].
fn host_echo(addr: &str, n: usize) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind(addr).expect("echo bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("echo addr").port();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        let mut served = 0;
        while served < n && start.elapsed() < LIMIT {
            match l.accept() {
                Ok((mut c, _)) => {
                    served += 1;
                    c.set_nonblocking(false).expect("blocking");
                    c.set_read_timeout(Some(LIMIT)).expect("timeout");
                    let mut b = Vec::new();
                    let _ = c.read_to_end(&mut b);
                    let _ = c.write_all(&b);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (port, t)
}

/// A host UDP sink: every datagram with its source, until dropped.
struct UdpSink {
    port: u16,
    got: Arc<Mutex<Vec<(String, SocketAddr)>>>,
}

impl UdpSink {
    fn new(addr: &str) -> UdpSink {
        let s = UdpSocket::bind(addr).expect("udp bind");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let port = s.local_addr().expect("udp addr").port();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut b = [0u8; 256];
            // Ends when the test is over (only the sink holds `g` then).
            while Arc::strong_count(&g) > 1 && start.elapsed() < LIMIT {
                if let Ok((n, from)) = s.recv_from(&mut b) {
                    g.lock().expect("sink").push((text(&b[..n]), from));
                }
            }
        });
        UdpSink { port, got }
    }
}

const OPTS: &str = r#"
import errno, socket, struct, sys

IP_UNICAST_IF, IP_MULTICAST_IF, IP_OPTIONS = 50, 32, 4
IPV6_UNICAST_IF, IPV6_MULTICAST_IF, IPV6_PKTINFO = 76, 17, 50

def attempt(tag, f):
    try:
        f()
        print(tag, "ok", flush=True)
    except OSError as e:
        print(tag, errno.errorcode.get(e.errno, e.errno), flush=True)

tcp4, tcp6, udp4, in4 = (int(a) for a in sys.argv[1:5])

# Before the graft: the option is recorded, graftd refuses the request.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(10)
s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, struct.pack(">i", 1))
attempt("before connect IP_UNICAST_IF", lambda: s.connect(("127.0.0.1", tcp4)))
s.close()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(10)
s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, struct.pack(">i", 1))
attempt("before connect IPV6_UNICAST_IF", lambda: s.connect(("::1", tcp6)))
s.close()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, struct.pack(">i", 1))
attempt("before bind IP_UNICAST_IF", lambda: s.bind(("127.0.0.1", in4)))
s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
attempt("before sendto IP_MULTICAST_IF", lambda: u.sendto(b"x", ("127.0.0.1", udp4)))
u.close()

# After the graft: the host socket's own setsockopt, refused in the kernel.
s = socket.create_connection(("127.0.0.1", tcp4), timeout=10)
attempt("after IP_UNICAST_IF", lambda: s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, struct.pack(">i", 1)))
attempt("after IP_MULTICAST_IF", lambda: s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_IF, socket.inet_aton("127.0.0.1")))
attempt("after IP_OPTIONS", lambda: s.setsockopt(socket.IPPROTO_IP, IP_OPTIONS, b"\x01\x01\x01\x00"))
attempt("after TCP_NODELAY", lambda: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
s.sendall(b"v4 still flowing")
s.shutdown(socket.SHUT_WR)
print("echo", s.recv(64).decode(), flush=True)
s.close()
s = socket.create_connection(("::1", tcp6), timeout=10)
attempt("after IPV6_UNICAST_IF", lambda: s.setsockopt(socket.IPPROTO_IPV6, IPV6_UNICAST_IF, struct.pack(">i", 1)))
attempt("after IPV6_MULTICAST_IF", lambda: s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_IF, struct.pack("i", 1)))
attempt("after IPV6_PKTINFO", lambda: s.setsockopt(socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(16) + struct.pack("i", 1)))
attempt("after IP_UNICAST_IF on v6", lambda: s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF, struct.pack(">i", 1)))
s.sendall(b"v6 still flowing")
s.shutdown(socket.SHUT_WR)
print("echo", s.recv(64).decode(), flush=True)
s.close()

# Datagrams: a source address other than the socket's own is refused.
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"plain", ("127.0.0.1", udp4))
def pktinfo(src):
    return [(socket.IPPROTO_IP, 8, struct.pack("=i4s4s", 0, socket.inet_aton(src), bytes(4)))]
attempt("sendmsg IP_PKTINFO 127.0.0.2", lambda: u.sendmsg([b"foreign"], pktinfo("127.0.0.2"), 0, ("127.0.0.1", udp4)))
attempt("sendmsg IP_PKTINFO 127.0.0.1", lambda: u.sendmsg([b"own"], pktinfo("127.0.0.1"), 0, ("127.0.0.1", udp4)))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", udp4))
attempt("connected sendmsg IP_PKTINFO 127.0.0.2", lambda: c.sendmsg([b"connected-foreign"], pktinfo("127.0.0.2")))
"#;

fn run_opts(env: &Env) -> (String, Vec<(String, SocketAddr)>) {
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    env.add("ep-out6 type ipv6 addr ::1 port dynamic");
    let in4 = graft_tests::free_port();
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {in4}"));
    let (tcp4, e4) = host_echo("127.0.0.1:0", 1);
    let (tcp6, e6) = host_echo("[::1]:0", 1);
    let sink = UdpSink::new("127.0.0.1:0");
    let script = env.script("opts.py", OPTS, &[]);
    let mut c: Command = env.graft(&[
        "-e",
        "127.0.0.0/8=ep-out4",
        "-e",
        "::1/128=ep-out6",
        "-i",
        &format!("127.0.0.1:{in4}=ep-in4"),
        "--",
        PY,
        &script,
    ]);
    c.args([
        tcp4.to_string(),
        tcp6.to_string(),
        sink.port.to_string(),
        in4.to_string(),
    ]);
    let o = output_within(c, "opts.py", LIMIT, None);
    graft_tests::assert_success(&o, "opts.py");
    e4.join().expect("echo v4");
    e6.join().expect("echo v6");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.got.lock().expect("sink").len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = sink.got.lock().expect("sink").clone();
    (text(&o.stdout), got)
}

const BEFORE: &str = "before connect IP_UNICAST_IF EPERM\n\
                      before connect IPV6_UNICAST_IF EPERM\n\
                      before bind IP_UNICAST_IF EPERM\n\
                      before sendto IP_MULTICAST_IF EPERM\n";

/// IP_UNICAST_IF and its kin: EPERM on a grafted python socket before the
/// graft (graftd refuses the request) and after it (graft-ebpf's guard);
/// a datagram naming a foreign source address is refused (on an
/// unconnected and on a connected socket), one naming the
/// socket's own goes out from it.
#[test]
fn interface_and_source_options_refused_before_and_after_graft() {
    let Some(env) = ebpf_env(
        "interface_and_source_options_refused_before_and_after_graft",
        &["python3"],
    ) else {
        return;
    };
    let (out, got) = run_opts(&env);
    assert_eq!(
        out,
        format!(
            "{BEFORE}\
             after IP_UNICAST_IF EPERM\n\
             after IP_MULTICAST_IF EPERM\n\
             after IP_OPTIONS EPERM\n\
             after TCP_NODELAY ok\n\
             echo v4 still flowing\n\
             after IPV6_UNICAST_IF EPERM\n\
             after IPV6_MULTICAST_IF EPERM\n\
             after IPV6_PKTINFO EPERM\n\
             after IP_UNICAST_IF on v6 EPERM\n\
             echo v6 still flowing\n\
             sendmsg IP_PKTINFO 127.0.0.2 EPERM\n\
             sendmsg IP_PKTINFO 127.0.0.1 ok\n\
             connected sendmsg IP_PKTINFO 127.0.0.2 EPERM\n"
        )
    );
    let got: Vec<(String, String)> = got
        .into_iter()
        .map(|(m, from)| (m, from.ip().to_string()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("plain".to_owned(), "127.0.0.1".to_owned()),
            ("own".to_owned(), "127.0.0.1".to_owned())
        ]
    );
}

/// Without the companion (`graftd --no-ebpf`) graftd still refuses the
/// options set before the graft; after it the host socket is the
/// program's and the kernel applies them: what the README says.
#[test]
fn without_ebpf_only_options_set_before_the_graft_are_refused() {
    let test = "without_ebpf_only_options_set_before_the_graft_are_refused";
    let Some(env) = Env::with_graftd(test, &["python3"], &["--no-ebpf"]) else {
        return;
    };
    let (out, got) = run_opts(&env);
    assert!(out.starts_with(BEFORE), "{out}");
    assert!(out.contains("after IP_UNICAST_IF ok\n"), "{out}");
    assert!(out.contains("sendmsg IP_PKTINFO 127.0.0.2 ok\n"), "{out}");
    assert!(
        got.iter()
            .any(|(m, from)| m == "foreign" && from.ip().to_string() == "127.0.0.2"),
        "{got:?}"
    );
}

/// A host server on `addr` accepting `n` connections, recording each
/// peer's address (within [`LIMIT`]).
fn host_peers(addr: &str, n: usize) -> (u16, std::thread::JoinHandle<Vec<SocketAddr>>) {
    let l = TcpListener::bind(addr).expect("peers bind");
    l.set_nonblocking(true).expect("nonblocking");
    let port = l.local_addr().expect("peers addr").port();
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        let mut peers = Vec::new();
        while peers.len() < n && start.elapsed() < LIMIT {
            match l.accept() {
                Ok((_, peer)) => peers.push(peer),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        peers
    });
    (port, t)
}

const SETNS: &str = r#"
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
port, other = int(sys.argv[1]), sys.argv[2]
def conn(tag):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    print(tag, s.getsockname()[0], flush=True)
    s.close()
conn("a1")
conn("a2")
fd = os.open(other, os.O_RDONLY)
if libc.setns(fd, 0x40000000) != 0:
    raise OSError(ctypes.get_errno(), "setns")
conn("b1")
conn("b2")
"#;

/// A process that moves to another namespace with setns() is served by
/// that namespace's broker and endpoint: neither the cached broker
/// connection nor a pooled socket of the old namespace is used. Both
/// namespaces define `ep-out4`, on 127.0.0.1 and 127.0.0.2; the host
/// server sees which one each connection came from.
#[test]
fn setns_process_never_gets_another_namespaces_socket() {
    let test = "setns_process_never_gets_another_namespaces_socket";
    let Some(env) = Env::new(test, &["python3"]) else {
        return;
    };
    let other = graft_tests::Netns::new("ob");
    env.add("ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    env.add_in(&other, "ep-out4 type ipv4 addr 127.0.0.2 port dynamic");
    let script = env.script("setns.py", SETNS, &[]);
    for pool in ["1", "0"] {
        let (port, server) = host_peers("127.0.0.1:0", 4);
        let mut c = env.graft(&["-e", "127.0.0.0/8=ep-out4", "--", PY, &script]);
        c.arg(port.to_string())
            .arg(other.path())
            .env("GRAFT_POOL", pool);
        let o = output_within(c, "setns.py", LIMIT, None);
        assert!(
            o.status.success(),
            "setns.py (GRAFT_POOL={pool}) failed: {}",
            text(&o.stderr)
        );
        assert_eq!(
            text(&o.stdout),
            "a1 127.0.0.1\na2 127.0.0.1\nb1 127.0.0.2\nb2 127.0.0.2\n",
            "GRAFT_POOL={pool}"
        );
        let peers: Vec<String> = server
            .join()
            .expect("host server")
            .iter()
            .map(|p| p.ip().to_string())
            .collect();
        assert_eq!(
            peers,
            ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"],
            "GRAFT_POOL={pool}"
        );
    }
    let log = env.d.log_text();
    assert!(log.contains("(SocketBatch)"), "the pool was used:\n{log}");
}

// ------------------------------------------------------------ unix endpoints

/// `curl --unix-socket PATH URL` from the host, retried until the server
/// answers (it binds, then listens); returns the body.
fn curl_unix(path: &str, url: &str) -> String {
    let mut body = String::new();
    graft_tests::wait_until(&format!("an answer on {path}"), LIMIT, || {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "10", "--unix-socket", path, url]);
        let o = output_within(c, "curl --unix-socket", LIMIT, None);
        body = text(&o.stdout);
        o.status.success()
    });
    body
}

/// Mode and owner of a file.
fn mode_owner(path: &str) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).expect("socket file");
    (md.mode() & 0o7777, md.uid())
}

/// python's http.server (an AF_INET TCP server) on a `type unix`
/// endpoint: reached from the host with `curl --unix-socket`; it logs a
/// loopback client address; the socket file is 0666, owned by root; a
/// second run after the first was killed replaces the stale file.
#[test]
fn python_http_server_on_a_unix_endpoint() {
    let test = "python_http_server_on_a_unix_endpoint";
    let Some((env, sock)) = unix_env(test, &["python3", "curl"], "web.sock") else {
        return;
    };
    let www = env.dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::write(www.join("index.html"), "graft-unix-page\n").expect("index");
    let port = graft_tests::free_port().to_string();
    let rule = format!("127.0.0.1:{port}=ep-u");
    for round in 0..2 {
        let mut c = env.graft(&["-i", &rule, "--", PY, "-u", "-m", "http.server"]);
        c.args(["--bind", "127.0.0.1", "--directory"])
            .arg(&www)
            .arg(&port)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut srv = graft_tests::Proc::spawn(c, "http.server");
        let body = curl_unix(&sock, "http://localhost/index.html");
        assert_eq!(body, "graft-unix-page\n", "round {round}");
        assert_eq!(mode_owner(&sock), (0o666, 0), "round {round}");
        let _ = srv.child.kill();
        let _ = srv.child.wait();
        let (out, err) = graft_tests::take_output(&mut srv);
        // getsockname answers the address the program bound.
        assert!(
            out.contains(&format!("Serving HTTP on 127.0.0.1 port {port}")),
            "{out}"
        );
        // accept's peer address: a loopback client.
        assert!(
            err.lines().any(|l| l.starts_with("127.0.0.1 - - [")
                && l.contains("\"GET /index.html HTTP/1.1\" 200")),
            "round {round}: {err}"
        );
        // Killed: the file stays behind, the next round's bind replaces it.
        assert!(std::path::Path::new(&sock).exists());
    }
}

/// nginx (master and workers, AF_INET listener) on a `type unix`
/// endpoint, reached with `curl --unix-socket`; its access log shows a
/// loopback client and the request; TCP_NODELAY and keepalive options
/// nginx sets on accepted connections succeed.
#[test]
fn nginx_on_a_unix_endpoint() {
    let test = "nginx_on_a_unix_endpoint";
    let Some((env, sock)) = unix_env(test, &["nginx", "curl"], "nginx.sock") else {
        return;
    };
    let d = env.dir.display().to_string();
    let port = graft_tests::free_port();
    let _nginx = graft_tests::grafted_nginx(
        &env,
        &["-i", &format!("127.0.0.1:{port}=ep-u")],
        "graft-nginx-unix\n",
        &format!(
            " tcp_nodelay on;\n keepalive_timeout 5;\n\
             server {{ listen 127.0.0.1:{port} so_keepalive=30s:5s:3; root {d}/www; }}\n"
        ),
    );
    // Two requests on one keep-alive connection, then a second connection.
    let mut c = Command::new("curl");
    let url = "http://localhost/index.html";
    let body = curl_unix(&sock, url);
    assert_eq!(body, "graft-nginx-unix\n");
    c.args(["-sS", "--max-time", "10", "--unix-socket", &sock, url, url]);
    let o = output_within(c, "curl twice", LIMIT, None);
    assert_eq!(
        text(&o.stdout),
        "graft-nginx-unix\n".repeat(2),
        "{}",
        text(&o.stderr)
    );
    let log = env.dir.join("access.log");
    let mut t = String::new();
    graft_tests::wait_until("three requests in nginx's access log", LIMIT, || {
        t = std::fs::read_to_string(&log).unwrap_or_default();
        t.lines().count() >= 3
    });
    for l in t.lines() {
        assert!(
            l.starts_with("127.0.0.1 - - [") && l.contains("\"GET /index.html HTTP/1.1\" 200 17 "),
            "access log line: {l}\n{t}"
        );
    }
    let errors = std::fs::read_to_string(env.dir.join("error.log")).unwrap_or_default();
    assert!(
        !errors.contains("setsockopt") && !errors.contains("getsockname"),
        "nginx complained:\n{errors}"
    );
}

const UNIX_CLIENT: &str = r#"
import errno, socket, sys
port = int(sys.argv[1])
s = socket.create_connection(("10.9.9.9", port), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
print("peer", s.getpeername(), "local", s.getsockname(), flush=True)
s.sendall(b"hello over unix\n")
s.shutdown(socket.SHUT_WR)
back = b"".join(iter(lambda: s.recv(256), b""))
print("back", repr(back.decode()), flush=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("10.9.9.9", port))
    print("udp ok")
except OSError as e:
    print("udp", errno.errorcode.get(e.errno, e.errno), flush=True)
"#;

/// Egress onto a `type unix` endpoint: a grafted python client and curl,
/// connecting to an IPv4 address, reach a host `socat UNIX-LISTEN`
/// server (graftd connects the unix socket in the host's mount
/// namespace); python sees the address it connected to as its peer; a
/// datagram socket is refused with ESOCKTNOSUPPORT and a clear line.
#[test]
fn inet_clients_reach_a_host_unix_server() {
    let test = "inet_clients_reach_a_host_unix_server";
    let Some(env) = Env::new(test, &["python3", "curl", "socat"]) else {
        return;
    };
    let sock = env.dir.join("srv.sock").display().to_string();
    let got = env.dir.join("got.txt").display().to_string();
    // Each connection: what arrived goes to got.txt, a reply goes back.
    let reply = env.script(
        "reply.sh",
        "#!/bin/sh\nhead -c 16 >>@GOT@\nprintf 'HTTP/1.0 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nunix-says\\n'\n",
        &[("GOT", got.clone())],
    );
    std::fs::set_permissions(&reply, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod reply.sh");
    let mut socat = Command::new("socat");
    socat
        .arg(format!("UNIX-LISTEN:{sock},fork"))
        .arg(format!("EXEC:{reply}"));
    let _srv = graft_tests::Proc::spawn(socat, "socat");
    graft_tests::wait_until("socat's socket", LIMIT, || {
        std::path::Path::new(&sock).exists()
    });
    env.add(&format!("ep-uo type unix path {sock}"));
    let script = env.script("client.py", UNIX_CLIENT, &[]);
    let mut c = env.graft(&["-e", "10.9.9.9/32=ep-uo", "--", PY, &script, "8080"]);
    c.env("GRAFT_VERBOSE", "0");
    let o = output_within(c, "client.py", LIMIT, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        "peer ('10.9.9.9', 8080) local ('127.0.0.1', 0)\n\
         back 'HTTP/1.0 200 OK\\r\\nContent-Length: 10\\r\\n\\r\\nunix-says\\n'\n\
         udp ESOCKTNOSUPPORT\n"
    );
    let lines = graft_tests::graft_lines(&text(&o.stderr));
    assert_eq!(
        lines,
        [
            "graft: sendto 10.9.9.9:8080: endpoint \"ep-uo\": a type unix endpoint takes stream (TCP) sockets only: map this address to a type ipv4 endpoint"]
    );
    let mut c = env.graft(&[
        "-e",
        "10.9.9.9/32=ep-uo",
        "--",
        "curl",
        "-sS",
        "--max-time",
        "10",
    ]);
    c.arg("http://10.9.9.9:8080/");
    let o = output_within(c, "curl", LIMIT, None);
    assert_eq!(text(&o.stdout), "unix-says\n", "{}", text(&o.stderr));
    let seen = std::fs::read_to_string(&got).unwrap_or_default();
    assert!(
        seen.starts_with("hello over unix\nGET / HTTP/1.1\r\n"),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------- dual-stack

const NODE: &str = r#"
const http = require('http');
const s = http.createServer((q, r) => {
  r.end(`${q.socket.remoteAddress} ${q.socket.remoteFamily}\n`);
});
s.listen(+process.argv[2], () => console.log('listening', s.address().family));
"#;

const JAVA: &str = r#"
import java.io.OutputStream;
import java.net.ServerSocket;
import java.net.Socket;

public class Peer {
    public static void main(String[] a) throws Exception {
        ServerSocket ss = new ServerSocket(Integer.parseInt(a[0]));
        System.out.println("listening");
        System.out.flush();
        for (int i = 0; i < Integer.parseInt(a[1]); i++) {
            try (Socket c = ss.accept()) {
                OutputStream o = c.getOutputStream();
                o.write(("peer " + c.getInetAddress().getHostAddress() + "\n").getBytes());
                o.flush();
            }
        }
    }
}
"#;

/// `curl URL` from the host, retried until the server answers.
fn curl_retry(url: &str) -> String {
    let mut body = String::new();
    graft_tests::wait_until(&format!("an answer from {url}"), LIMIT, || {
        let mut c = Command::new("curl");
        c.args(["-sS", "-g", "--max-time", "10", url]);
        let o = output_within(c, "curl", LIMIT, None);
        body = text(&o.stdout);
        o.status.success()
    });
    body
}

/// Two endpoints on different ports, so an answer proves which one it came
/// through; the usual rules for both families.
fn dual_env(env: &Env) -> (u16, u16) {
    let p4 = graft_tests::free_port();
    let p6 = graft_tests::free_port();
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {p4}"));
    env.add(&format!("ep-in6 type ipv6 addr ::1 port {p6}"));
    (p4, p6)
}

const DUAL_RULES: [&str; 4] = ["-i", "0.0.0.0:0-65535=ep-in4", "-i", ":::0-65535=ep-in6"];

/// node's `server.listen(PORT)` binds `[::]` dual-stack: under the usual
/// two rules it answers on both endpoints, an IPv4 client seen as
/// `::ffff:127.0.0.1`, an IPv6 one as `::1`.
#[test]
fn node_dual_stack_answers_on_both_endpoints() {
    let Some(env) = ebpf_env(
        "node_dual_stack_answers_on_both_endpoints",
        &["node", "curl"],
    ) else {
        return;
    };
    let (p4, p6) = dual_env(&env);
    let js = env.script("server.js", NODE, &[]);
    let mut args: Vec<&str> = DUAL_RULES.to_vec();
    args.extend(["--", "node", &js, "3000"]);
    let _node = graft_tests::Proc::spawn(env.graft(&args), "node");
    assert_eq!(
        curl_retry(&format!("http://127.0.0.1:{p4}/")),
        "::ffff:127.0.0.1 IPv6\n"
    );
    assert_eq!(curl_retry(&format!("http://[::1]:{p6}/")), "::1 IPv6\n");
    assert_eq!(
        curl_retry(&format!("http://127.0.0.1:{p4}/")),
        "::ffff:127.0.0.1 IPv6\n"
    );
    let log = env.d.log_text();
    assert!(
        log.contains(&format!(
            "handed out a dual-stack listener, also answering [::1]:{p6} for ep-in6"
        )),
        "{log}"
    );
}

/// Java's `new ServerSocket(PORT)` binds `[::]` dual-stack too: both
/// endpoints, and Java reports each client's address.
#[test]
fn java_dual_stack_answers_on_both_endpoints() {
    let Some(env) = ebpf_env(
        "java_dual_stack_answers_on_both_endpoints",
        &["java", "javac", "curl"],
    ) else {
        return;
    };
    let (p4, p6) = dual_env(&env);
    env.script("Peer.java", JAVA, &[]);
    javac(&env, "Peer.java");
    let cp = env.dir.display().to_string();
    let mut args: Vec<&str> = DUAL_RULES.to_vec();
    args.extend(["--", "java", "-cp", &cp, "Peer", "8080", "2"]);
    let mut java = env.graft(&args);
    java.stdout(std::process::Stdio::piped());
    let mut java = graft_tests::Proc::spawn(java, "java");
    let out = java.child.stdout.take().expect("stdout");
    graft_tests::wait_line(out, "listening", LIMIT);
    let ask = |addr: &str| {
        let a: SocketAddr = addr.parse().expect("addr");
        text(&graft_tests::tcp_exchange(a, b"", Duration::from_secs(10)))
    };
    assert_eq!(ask(&format!("127.0.0.1:{p4}")), "peer 127.0.0.1\n");
    assert_eq!(ask(&format!("[::1]:{p6}")), "peer 0:0:0:0:0:0:0:1\n");
    assert!(java.wait_timeout(LIMIT).success());
}

/// Without the eBPF companion there is no steering: a `[::]` bind answers
/// on its IPv6 endpoint only, as before, and says so in one line; the
/// IPv4 endpoint's port has no listener.
#[test]
fn dual_stack_without_ebpf_answers_on_ipv6_only_and_says_so() {
    let test = "dual_stack_without_ebpf_answers_on_ipv6_only_and_says_so";
    let Some(env) = Env::with_graftd(test, &["node", "curl"], &["--no-ebpf"]) else {
        return;
    };
    let (p4, p6) = dual_env(&env);
    let js = env.script("server.js", NODE, &[]);
    let mut args: Vec<&str> = DUAL_RULES.to_vec();
    args.extend(["--", "node", &js, "3000"]);
    let mut node = env.graft(&args);
    node.stderr(std::process::Stdio::piped());
    let mut node = graft_tests::Proc::spawn(node, "node");
    assert_eq!(curl_retry(&format!("http://[::1]:{p6}/")), "::1 IPv6\n");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p4)).is_err(),
        "nothing listens on ep-in4"
    );
    let _ = node.child.kill();
    let _ = node.child.wait();
    let mut err = String::new();
    let _ = node
        .child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert_eq!(
        graft_tests::graft_lines(&err),
        ["graft: bind [::]:3000: no dual-stack listener on \"ep-in4\" and \"ep-in6\" (graftd's log says why; it needs graftd's eBPF companion): answering on \"ep-in6\" only"]
    );
}

// ------------------------------------------------------------- /sbin/ip graft

/// Whether `docker ARGS` runs and succeeds.
fn docker_says_yes(args: &[&str]) -> bool {
    let o = Command::new("docker").args(args).output();
    o.is_ok_and(|o| o.status.success())
}

/// Removes a container on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// `iproute-graft/divert-ip` (what `make install-ip-divert` runs) in a
/// throwaway Debian container: afterwards the literal `/sbin/ip graft ...`
/// reaches ip-graft while every other `/sbin/ip` command is iproute2's,
/// dpkg records the diversion, installing twice is harmless, and removing
/// restores Debian's /sbin/ip symlink.
#[test]
fn sbin_ip_graft_after_the_debian_divert() {
    let test = "sbin_ip_graft_after_the_debian_divert";
    if !graft_tests::root_or_skip(test) || !graft_tests::have_or_skip(test, "docker") {
        return;
    }
    let image = "graft-base:bookworm";
    if !docker_says_yes(&["image", "inspect", image]) {
        println!("SKIP: {test}: no Docker engine or no {image} image (the docker tests build it)");
        return;
    }
    let root = graft_tests::workspace_root();
    let name = graft_tests::unique("graft-divert-");
    let _c = Container(name.clone());
    let mut c = Command::new("docker");
    c.args(["run", "--rm", "--name", &name, "-v"])
        .arg(format!("{}:/g:ro", root.join("iproute-graft").display()))
        .arg("-v")
        .arg(format!(
            "{}:/usr/local/bin/ip-graft:ro",
            graft_tests::bin("ip-graft").display()
        ))
        .args([image, "sh", "-c"])
        .arg(
            "set -e; /g/divert-ip install /g/ip; /g/divert-ip install /g/ip >/dev/null; \
             /sbin/ip graft help 2>&1 | head -1; /sbin/ip -o link show lo | cut -d' ' -f2; \
             dpkg-divert --list /sbin/ip; /g/divert-ip remove >/dev/null; \
             readlink /sbin/ip; /sbin/ip graft 2>&1 || true",
        );
    let o = output_within(c, "docker run divert-ip", LIMIT, None);
    assert_eq!(
        text(&o.stdout),
        "Adding 'local diversion of /sbin/ip to /sbin/ip.distrib'\n\
         Usage: ip [ OPTIONS ] graft { COMMAND | help }\n\
         lo:\n\
         local diversion of /sbin/ip to /sbin/ip.distrib\n\
         /bin/ip\n\
         Object \"graft\" is unknown, try \"ip help\".\n",
        "{}",
        text(&o.stderr)
    );
}

// ------------------------------------------------- Docker: dual-stack socat

/// Containers removed on drop.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for n in self.0.iter().rev() {
            let _ = Command::new("docker").args(["rm", "-f", n]).output();
        }
    }
}

impl Containers {
    /// A unique container name starting with `prefix`, removed on drop.
    fn name(&mut self, prefix: &str) -> String {
        let n = graft_tests::unique(prefix);
        self.0.push(n.clone());
        n
    }
}

fn docker_ok(args: &[&str]) -> String {
    let o = output_within(
        {
            let mut c = Command::new("docker");
            c.args(args);
            c
        },
        "docker",
        Duration::from_secs(300),
        None,
    );
    assert!(o.status.success(), "docker {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// The README's Docker walkthrough with a dual-stack server: socat in a
/// graft-demo container listening on one `[::]` socket without
/// IPV6_V6ONLY answers host clients on ep-in4 (127.0.0.1) and ep-in6
/// (::1), and logs each client's address. Builds the demo image under a
/// tag of its own (graft-demo:endpoints-e2e) from the debug binaries.
#[test]
fn docker_dual_stack_socat_over_ipv4_and_ipv6() {
    let test = "docker_dual_stack_socat_over_ipv4_and_ipv6";
    if !graft_tests::root_or_skip(test) || !graft_tests::have_or_skip(test, "socat") {
        return;
    }
    if !docker_says_yes(&["info"]) {
        println!("SKIP: {test}: no Docker engine answers");
        return;
    }
    let image = "graft-demo:endpoints-e2e";
    let mut b = Command::new(graft_tests::workspace_root().join("docker/demo/build-image.sh"));
    b.arg(graft_tests::bin_dir()).env("GRAFT_DEMO_IMAGE", image);
    let o = output_within(b, "build-image.sh", Duration::from_secs(900), None);
    assert!(o.status.success(), "build-image.sh: {}", text(&o.stderr));
    let Some(env) = Env::new(test, &[]) else {
        return;
    };
    if !ebpf_or_skip(&env, test) {
        return;
    }
    let mut c = Containers(Vec::new());
    let net1 = c.name("graft-ds-net1-");
    docker_ok(&[
        "run",
        "-d",
        "--net=none",
        "--name",
        &net1,
        "graft-base:bookworm",
        "sleep",
        "infinity",
    ]);
    let host_ns = format!("/proc/{}/ns/net", std::process::id());
    let p = graft_tests::free_port().to_string();
    for (name, ty, addr, port) in [
        ("ep-in4", "ipv4", "127.0.0.1", p.as_str()),
        ("ep-in6", "ipv6", "::1", p.as_str()),
        ("ep-out4", "ipv4", "0.0.0.0", "dynamic"),
        ("ep-out6", "ipv6", "::", "dynamic"),
    ] {
        let mut cmd = Command::new(graft_tests::bin("docker-ns-exec"));
        cmd.args([
            &net1, "ip", "graft", "add", name, "type", ty, "addr", addr, "port", port, "netns",
            &host_ns,
        ]);
        env.d.apply(&mut cmd);
        let o = output_within(cmd, "docker-ns-exec ip graft add", LIMIT, None);
        assert!(
            o.status.success(),
            "ip graft add {name}: {}",
            text(&o.stderr)
        );
    }
    let web = c.name("graft-ds-web-");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &web,
        &format!("--net=container:{net1}"),
        "-e",
        &format!("GRAFT_BROKER={}", env.d.broker),
        image,
        "socat",
        "-d",
        "-d",
        "TCP6-LISTEN:9000,ipv6only=0,fork",
        "SYSTEM:echo hello from one dual-stack socket",
    ]);
    let ask = |addr: &str| {
        let mut out = String::new();
        graft_tests::wait_until(&format!("an answer from {addr}"), LIMIT, || {
            let mut s = Command::new("socat");
            s.args(["-", &format!("TCP:{addr}")])
                .stdin(std::process::Stdio::null());
            let o = output_within(s, "socat client", LIMIT, None);
            out = text(&o.stdout);
            o.status.success() && !out.is_empty()
        });
        out
    };
    assert_eq!(
        ask(&format!("127.0.0.1:{p}")),
        "hello from one dual-stack socket\n"
    );
    assert_eq!(
        ask(&format!("[::1]:{p}")),
        "hello from one dual-stack socket\n"
    );
    let logs = Command::new("docker")
        .args(["logs", &web])
        .output()
        .expect("docker logs");
    let logs = text(&logs.stderr);
    let from: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split("accepting connection from AF=10 [").nth(1))
        .filter_map(|r| r.split(']').next())
        .collect();
    assert_eq!(
        from,
        [
            "0000:0000:0000:0000:0000:ffff:7f00:0001",
            "0000:0000:0000:0000:0000:0000:0000:0001"
        ],
        "{logs}"
    );
}

const JAVA_HTTP: &str = r#"
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;

public class Web {
    public static void main(String[] a) throws Exception {
        HttpServer s = HttpServer.create(new InetSocketAddress(Integer.parseInt(a[0])), 0);
        s.createContext("/", x -> {
            byte[] b = ("peer " + x.getRemoteAddress() + " local " + x.getLocalAddress() + "\n").getBytes();
            x.sendResponseHeaders(200, b.length);
            x.getResponseBody().write(b);
            x.close();
        });
        s.start();
        System.out.println("up " + s.getAddress());
    }
}
"#;

/// Java's HttpServer (a dual-stack `[::]` NIO listener, with both rules on
/// one `type unix` endpoint) served on a host unix socket: keep-alive
/// requests through `curl --unix-socket`, and the addresses Java reports
/// are INET ones (peer `::1` port 0, local the bound `[::]:8000`).
#[test]
fn java_http_server_on_a_unix_endpoint() {
    let test = "java_http_server_on_a_unix_endpoint";
    let Some((env, sock)) = unix_env(test, &["java", "javac", "curl"], "java.sock") else {
        return;
    };
    env.script("Web.java", JAVA_HTTP, &[]);
    javac(&env, "Web.java");
    let cp = env.dir.display().to_string();
    let java = env.graft(&[
        "-i",
        "0.0.0.0:0-65535=ep-u",
        "-i",
        ":::0-65535=ep-u",
        "--",
        "java",
        "-cp",
        &cp,
        "Web",
        "8000",
    ]);
    let _java = graft_tests::Proc::spawn(java, "java");
    let want = "peer /[0:0:0:0:0:0:0:1]:0 local /[0:0:0:0:0:0:0:0]:8000\n";
    assert_eq!(curl_unix(&sock, "http://localhost/"), want);
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10", "--unix-socket", &sock])
        .args(["http://localhost/a", "http://localhost/b"]);
    let o = output_within(c, "curl keep-alive", LIMIT, None);
    assert_eq!(text(&o.stdout), want.repeat(2), "{}", text(&o.stderr));
}

const SINK6: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
s.settimeout(20)
for _ in range(2):
    m, a = s.recvfrom(64)
    print(m.decode(), a[0], flush=True)
"#;

const SEND6: &str = r#"
import errno, socket, struct, sys
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.sendto(b"plain", ("fd00::53", port))
def attempt(tag, src):
    info = [(socket.IPPROTO_IPV6, 50, socket.inet_pton(socket.AF_INET6, src) + struct.pack("i", 0))]
    try:
        u.sendmsg([tag.encode()], info, 0, ("fd00::53", port))
        print(tag, "ok", flush=True)
    except OSError as e:
        print(tag, errno.errorcode.get(e.errno, e.errno), flush=True)
attempt("foreign", "fd00::2")
attempt("own", "fd00::1")
"#;

/// The IPv6 half of the source check: in a target namespace of the
/// test's own with two local addresses, a grafted UDP socket bound to
/// fd00::1 cannot send from fd00::2 with an IPV6_PKTINFO control message
/// (graft-ebpf's sendmsg6), while naming its own address works; the sink
/// sees only fd00::1.
#[test]
fn ipv6_pktinfo_foreign_source_refused() {
    let Some(env) = ebpf_env("ipv6_pktinfo_foreign_source_refused", &["python3"]) else {
        return;
    };
    let target = graft_tests::Netns::new("t6");
    for a in ["fd00::1/128", "fd00::2/128", "fd00::53/128"] {
        graft_tests::run_ok(
            "ip",
            ["-n", &target.name, "addr", "add", a, "dev", "lo", "nodad"],
        );
    }
    env.add(&format!(
        "ep-out6 type ipv6 addr fd00::1 port dynamic netns {}",
        target.path().display()
    ));
    let port = graft_tests::free_port().to_string();
    let sink = env.script("sink6.py", SINK6, &[]);
    let mut s = target.cmd(PY);
    s.arg(&sink).arg(&port).stdout(std::process::Stdio::piped());
    let mut sink = graft_tests::Proc::spawn(s, "sink6.py");
    let out = sink.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    assert_eq!(rx.recv_timeout(LIMIT).expect("sink ready"), "ready");
    let send = env.script("send6.py", SEND6, &[]);
    let c = env.graft(&["-e", "fd00::/64=ep-out6", "--", PY, &send, &port]);
    let o = output_within(c, "send6.py", LIMIT, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "foreign EPERM\nown ok\n");
    let got: Vec<String> = (0..2)
        .map(|_| rx.recv_timeout(LIMIT).expect("sink line"))
        .collect();
    assert_eq!(got, ["plain fd00::1", "own fd00::1"]);
    assert!(sink.wait_timeout(LIMIT).success());
}
