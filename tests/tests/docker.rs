//! AF_GRAFT's Docker walkthrough, step by step, on the real Docker engine.
//!
//! 1. a namespace holder `net1` with no network (`--net=none`);
//! 2. endpoints added from the host with `docker-ns-exec net1 ip graft add …`,
//!    listed by `ip graft show` in AF_GRAFT's format;
//! 3. iperf3 in a `graft-demo` container sharing net1's namespace, reached by
//!    the host's `iperf3 -c 127.0.0.1 -p PORT`;
//! 4. nginx in the same way, reached over IPv4 and IPv6 by the host's curl;
//! 5. curl in a grafted container reaching servers in the host namespace
//!    through ep-out4 / ep-out6;
//! 6. after removing the containers, graftd forgets the namespace: no
//!    endpoint, process, listener or container of the test remains.
//!
//! The test uses its own graftd (private control socket and broker name; the
//! containers get the broker name with `-e GRAFT_BROKER=…`), its own
//! container names and free ports, and the image `graft-demo:e2e` rebuilt
//! from the freshly built binaries (the base image is made once with
//! debootstrap by docker/demo/build-image.sh and then reused). Containers are
//! removed in `Drop`, so a failing run leaves none behind.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use graft_tests::*;

const BASE_IMAGE: &str = "graft-base:bookworm";
const DEMO_IMAGE: &str = "graft-demo:e2e";
/// Bound on any single docker command (an image build gets its own).
const DOCKER_LIMIT_SECS: u32 = 120;
/// Bound on building the images; the first debootstrap takes minutes.
const BUILD_LIMIT_SECS: u64 = 1800;

/// `docker ARGS` with a time bound; never panics on failure.
fn docker(args: &[&str]) -> Output {
    Command::new("timeout")
        .arg(DOCKER_LIMIT_SECS.to_string())
        .arg("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout docker")
}

/// The test's containers, removed (with `docker rm -f`) on drop. When the
/// test fails, their logs are printed first.
struct Containers {
    /// Still to be removed.
    names: Vec<String>,
    /// Every name ever used, to check at the end that none remains.
    created: Vec<String>,
    broker: String,
}

impl Containers {
    /// A fresh unique container name, registered for removal.
    fn name(&mut self, what: &str) -> String {
        let n = unique(&format!("graft-e2e-{what}-"));
        self.names.push(n.clone());
        self.created.push(n.clone());
        n
    }

    /// `docker run -d --name NAME ARGS`, asserting success; returns the name.
    fn run_detached(&mut self, what: &str, args: &[&str]) -> String {
        let name = self.name(what);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let out = docker(&all);
        assert!(
            out.status.success(),
            "docker {all:?} failed: {}",
            text(&out.stderr)
        );
        let id = text(&out.stdout);
        assert!(
            id.trim().len() == 64 && id.trim().bytes().all(|b| b.is_ascii_hexdigit()),
            "docker run -d printed {id:?}, expected a container id"
        );
        name
    }

    /// A grafted `graft-demo` container in `net`'s namespace running `cmd`.
    fn run_grafted(&mut self, what: &str, net: &str, cmd: &[&str]) -> String {
        let netarg = format!("--net=container:{net}");
        let env = format!("GRAFT_BROKER={}", self.broker);
        let mut args = vec![netarg.as_str(), "-e", env.as_str(), DEMO_IMAGE];
        args.extend_from_slice(cmd);
        self.run_detached(what, &args)
    }

    /// `docker logs NAME` (stdout and stderr together).
    fn logs(&self, name: &str) -> String {
        let out = docker(&["logs", name]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    fn running(&self, name: &str) -> bool {
        let out = docker(&["inspect", "-f", "{{.State.Running}}", name]);
        out.status.success() && text(&out.stdout).trim() == "true"
    }

    /// Removes one container now, asserting it went.
    fn remove(&mut self, name: &str) {
        let out = docker(&["rm", "-f", name]);
        assert!(
            out.status.success(),
            "docker rm -f {name}: {}",
            text(&out.stderr)
        );
        self.names.retain(|n| n != name);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.names.is_empty() {
            return;
        }
        if std::thread::panicking() {
            for n in &self.names {
                eprintln!("---- docker logs {n} ----\n{}", self.logs(n));
            }
        }
        let mut args = vec!["rm", "-f"];
        args.extend(self.names.iter().map(String::as_str));
        let out = docker(&args);
        if !out.status.success() {
            eprintln!("cleanup: docker {args:?}: {}", text(&out.stderr));
        }
    }
}

/// A port free on both 127.0.0.1 and ::1 right now.
fn free_port_both() -> u16 {
    for _ in 0..100 {
        let l4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l4.local_addr().expect("local_addr").port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1 after 100 tries");
}

/// Whether a TCP socket listens on exactly `addr` in the test's namespace
/// (where grafted sockets live).
fn listening(addr: &str) -> bool {
    let port = addr.rsplit(':').next().unwrap_or("0");
    let out = run("ss", ["-Hltn", &format!("sport = :{port}")]);
    text(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == addr))
}

/// Waits until a grafted listener shows up on `addr`, failing early (with
/// its logs) if the container stopped.
fn wait_listener(c: &Containers, name: &str, addr: &str) {
    let start = Instant::now();
    while !listening(addr) {
        assert!(
            c.running(name),
            "container {name} stopped before listening on {addr}; its log:\n{}",
            c.logs(name)
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no grafted listener on {addr} after 60 s; log of {name}:\n{}",
            c.logs(name)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `docker logs NAME` contains `needle`.
fn wait_log(c: &Containers, name: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let l = c.logs(name);
        if l.contains(needle) {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "log of {name} never contained {needle:?}:\n{l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A one-shot HTTP server in the test's (host) namespace: answers the first
/// request with `body` and reports the peer address.
fn one_shot_http(bind: &str, body: String) -> (SocketAddr, mpsc::Receiver<SocketAddr>) {
    let l = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    let addr = l.local_addr().expect("local_addr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut s, peer)) = l.accept() else {
            return;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = tx.send(peer);
    });
    (addr, rx)
}

/// `/proc/PID/ns/net` as `net:[INODE]`.
fn netns_of(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/net: {e}"))
        .display()
        .to_string()
}

/// Every process (pid) with a thread in, or a descriptor on, namespace `ns`
/// (`net:[INODE]`).
fn holders_of(ns: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let links = ["task", "fd"].iter().flat_map(|sub| {
            std::fs::read_dir(p.path().join(sub))
                .into_iter()
                .flatten()
                .flatten()
                .map(move |e| {
                    if *sub == "task" {
                        e.path().join("ns/net")
                    } else {
                        e.path()
                    }
                })
        });
        if links
            .filter_map(|l| std::fs::read_link(l).ok())
            .any(|t| t.as_os_str() == ns)
        {
            out.push(pid);
        }
    }
    out
}

/// Makes sure `graft-demo:e2e` holds the binaries just built (a cached
/// rebuild takes seconds; the first one also makes the base image).
fn build_images() {
    let script = workspace_root().join("docker/demo/build-image.sh");
    // Asserts they exist, with the fix in the message.
    bin("graft");
    preload_lib();
    // `timeout` signals the script's whole process group (docker build too).
    let mut cmd = Command::new("timeout");
    cmd.arg(BUILD_LIMIT_SECS.to_string())
        .arg(&script)
        .arg(bin_dir())
        .env("GRAFT_DEMO_IMAGE", DEMO_IMAGE)
        .env("GRAFT_BASE_IMAGE", BASE_IMAGE)
        .stdin(Stdio::null());
    let limit = Duration::from_secs(BUILD_LIMIT_SECS + 60);
    output_ok_within(cmd, &script.display().to_string(), limit);
}

#[test]
fn af_graft_docker_walkthrough() {
    if !root_or_skip("docker") {
        return;
    }
    if !docker(&["info"]).status.success() {
        println!("SKIP: docker: no Docker engine answers");
        return;
    }
    for prog in ["iperf3", "curl", "ss", "timeout"] {
        if !have_or_skip("docker", prog) {
            return;
        }
    }
    build_images();

    let mut graftd = Graftd::start();
    let mut c = Containers {
        names: Vec::new(),
        created: Vec::new(),
        broker: graftd.broker.clone(),
    };
    let port = free_port_both();
    let p = port.to_string();
    // `netns 1` (pid 1's namespace, the host's) as in the walkthrough, when
    // the test runs there; otherwise the test's own namespace
    // (pid 1 may be out of reach, as in some sandboxes.)
    let pid1_ns = std::fs::read_link("/proc/1/ns/net").ok();
    let host_ns = if pid1_ns.is_some_and(|l| l.display().to_string() == netns_of("self")) {
        "1".to_owned()
    } else {
        format!("/proc/{}/ns/net", std::process::id())
    };
    let ns_exec = |args: &[&str]| -> Output {
        let mut cmd = Command::new(bin("docker-ns-exec"));
        cmd.args(args).stdin(Stdio::null());
        graftd.apply(&mut cmd);
        cmd.output().expect("run docker-ns-exec")
    };
    let ns_exec_ok = |args: &[&str]| -> String {
        let out = ns_exec(args);
        assert!(
            out.status.success(),
            "docker-ns-exec {args:?} failed ({}): {}\ngraftd log:\n{}",
            out.status,
            text(&out.stderr),
            graftd.log_text()
        );
        text(&out.stdout)
    };

    // 1. The namespace holder.
    eprintln!("step 1: namespace holder");
    let net1 = c.run_detached("net1", &["--net=none", BASE_IMAGE, "sleep", "infinity"]);
    let pid_out = docker(&["inspect", "-f", "{{.State.Pid}}", &net1]);
    let net1_pid = text(&pid_out.stdout).trim().to_owned();
    let net1_ns = netns_of(&net1_pid);
    assert_ne!(
        net1_ns,
        netns_of("self"),
        "--net=none has its own namespace"
    );

    // 2. Endpoints, defined from the host inside net1's namespace.
    eprintln!("step 2: endpoints (port {p}, target netns {host_ns})");
    for (name, ty, addr, port) in [
        ("ep-in4", "ipv4", "127.0.0.1", p.as_str()),
        ("ep-in6", "ipv6", "::1", p.as_str()),
        ("ep-out4", "ipv4", "0.0.0.0", "dynamic"),
        ("ep-out6", "ipv6", "::", "dynamic"),
    ] {
        ns_exec_ok(&[
            &net1, "ip", "graft", "add", name, "type", ty, "addr", addr, "port", port, "netns",
            &host_ns,
        ]);
    }
    let show = ns_exec_ok(&[&net1, "ip", "graft", "show"]);
    assert_eq!(
        show,
        format!(
            "ep-in4 type ipv4 addr 127.0.0.1 port {p} netns {host_ns}\n\
             ep-in6 type ipv6 addr ::1 port {p} netns {host_ns}\n\
             ep-out4 type ipv4 addr 0.0.0.0 port dynamic netns {host_ns}\n\
             ep-out6 type ipv6 addr :: port dynamic netns {host_ns}\n"
        ),
        "ip graft show in net1"
    );
    let host_show = graftd.ip_graft_ok(None, &["show"]);
    assert_eq!(host_show, "", "the host's own table stays empty");

    // 3. iperf3 server in a grafted container, reached from the host.
    eprintln!("step 3: iperf3");
    let iperf = c.run_grafted("iperf3", &net1, &["iperf3", "-s", "-4"]);
    wait_listener(&c, &iperf, &format!("127.0.0.1:{p}"));
    let out = Command::new("timeout")
        .args(["60", "iperf3", "-c", "127.0.0.1", "-p", &p, "-t", "3", "-J"])
        .stdin(Stdio::null())
        .output()
        .expect("run iperf3 -c");
    assert!(
        out.status.success(),
        "iperf3 -c 127.0.0.1 -p {p} failed: {}{}\nserver log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        c.logs(&iperf)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    let received = j["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let sent = j["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
    eprintln!("  iperf3: {sent} bytes sent, {received} received");
    assert!(
        received > 0 && sent > 0,
        "iperf3 moved no data: {}",
        text(&out.stdout)
    );
    // The server inside the container saw the host client's real address.
    wait_log(&c, &iperf, "Accepted connection from 127.0.0.1");
    c.remove(&iperf);

    // 4. nginx (0.0.0.0:80 and [::]:80 inside) reached on both endpoints.
    eprintln!("step 4: nginx");
    let nginx = c.run_grafted("nginx", &net1, &["nginx", "-g", "daemon off;"]);
    wait_listener(&c, &nginx, &format!("127.0.0.1:{p}"));
    wait_listener(&c, &nginx, &format!("[::1]:{p}"));
    for url in [
        format!("http://127.0.0.1:{p}/"),
        format!("http://[::1]:{p}/"),
    ] {
        let page = run_ok("curl", ["-sS", "-g", "--max-time", "20", url.as_str()]);
        assert!(
            page.contains("<title>Welcome to nginx!</title>"),
            "curl {url} did not return nginx's page: {page}"
        );
    }
    // nginx's access log (the container's stdout) names the real clients.
    let log = wait_log(&c, &nginx, "::1 - - ");
    assert!(
        log.lines().any(|l| l.starts_with("127.0.0.1 - - ")),
        "no access from 127.0.0.1 in nginx's log:\n{log}"
    );
    c.remove(&nginx);

    eprintln!("step 5: egress");
    // 5. Egress: curl in a grafted container reaches servers that exist only
    // in the host namespace (net1 has nothing but loopback, and nothing
    // listens there).
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let token = unique("graft-egress-ok-");
        let (addr, peer) = one_shot_http(bind, token.clone());
        let url = match addr.ip() {
            IpAddr::V4(_) => format!("http://{addr}/"),
            IpAddr::V6(_) => format!("http://[{}]:{}/", addr.ip(), addr.port()),
        };
        let curl = c.run_grafted(
            "curl",
            &net1,
            &["curl", "-sS", "-g", "--max-time", "20", &url],
        );
        let st = docker(&["wait", &curl]);
        let logs = c.logs(&curl);
        assert_eq!(
            text(&st.stdout).trim(),
            "0",
            "grafted curl {url} failed:\n{logs}\ngraftd log:\n{}",
            graftd.log_text()
        );
        assert_eq!(logs, token, "curl {url} printed the host server's reply");
        let peer = peer
            .recv_timeout(Duration::from_secs(10))
            .expect("the host server saw the connection");
        assert_eq!(peer.ip(), addr.ip(), "a grafted client is a host socket");
        c.remove(&curl);
    }

    // 6. Removing the containers leaves nothing of ours behind.
    eprintln!("step 6: cleanup");
    c.remove(&net1);
    assert!(c.names.is_empty());
    for name in &c.created {
        let o = docker(&["inspect", "-f", "{{.Id}}", name]);
        assert!(!o.status.success(), "container {name} still exists");
    }
    let out = ns_exec(&[&net1, "ip", "graft", "show"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!("docker-ns-exec: no such container: {net1}\n")
    );
    assert!(
        !listening(&format!("127.0.0.1:{p}")) && !listening(&format!("[::1]:{p}")),
        "a grafted listener outlived its container"
    );
    let forgot = format!("forgot network namespace {net1_ns}");
    wait_until(
        "graftd to forget net1's namespace",
        Duration::from_secs(60),
        || graftd.log_text().contains(&forgot),
    );
    wait_until(
        "every reference to net1's namespace to go",
        Duration::from_secs(30),
        || holders_of(&net1_ns).is_empty(),
    );
    assert!(graftd.alive(), "graftd survived the walkthrough");
}
