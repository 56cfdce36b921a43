//! `graft-tests`: the end-to-end test harness.
//!
//! Every test here runs real programs (graftd, `ip graft`, `graft`, iperf3,
//! nginx, curl, socat, python3 …) inside network namespaces the test creates,
//! and asserts on what crosses the wire. The helpers below give each test its
//! own namespaces and its own graftd (private control socket and broker name),
//! and tear everything down in `Drop`, so a failing test still leaves no
//! namespace, process or socket file behind.
//!
//! The binaries are taken from the cargo target directory (`make test` builds
//! them first) or from `GRAFT_BIN_DIR`. Tests need root; without it they print
//! one `SKIP:` line saying so.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Whether we run as root; if not, prints the one skip line and returns false.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        println!("SKIP: {test}: needs root (network namespaces, graftd)");
        false
    }
}

/// Whether a program is installed; if not, prints the skip line.
pub fn have_or_skip(test: &str, prog: &str) -> bool {
    if which(prog).is_some() {
        true
    } else {
        println!("SKIP: {test}: `{prog}` is not installed (make deps installs it)");
        false
    }
}

/// Finds a program on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The directory holding graft's built binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRAFT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug")
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of one of graft's binaries; panics with the fix when it is missing.
pub fn bin(name: &str) -> PathBuf {
    if name == "graft" {
        return static_launcher();
    }
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (make test does) first",
        p.display()
    );
    p
}

/// Path of the preload library.
pub fn preload_lib() -> PathBuf {
    bin("libgraft_convert.so")
}

/// A PATH with a directory whose `ip` is graft's wrapper (so `ip graft …`
/// works, and `ip netns exec X ip graft …` too) in front of the system's.
pub fn path_with_wrapper() -> String {
    let dir = std::env::temp_dir().join(format!("graft-test-bin-{}", std::process::id()));
    if !dir.exists() {
        // Tests run in parallel: build the directory under a private name and
        // rename it into place, so no test ever sees it half made (a missing
        // `ip-graft` would send the wrapper looking elsewhere).
        let tmp = std::env::temp_dir().join(unique("graft-test-bin-tmp-"));
        std::fs::create_dir_all(&tmp).expect("create wrapper bin dir");
        let link = |src: &Path, name: &str| {
            std::os::unix::fs::symlink(src, tmp.join(name)).expect("symlink into wrapper bin dir");
        };
        link(&workspace_root().join("iproute-graft/ip"), "ip");
        for b in ["ip-graft", "graft", "graftd", "docker-ns-exec"] {
            link(&bin_dir().join(b), b);
        }
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another test won the race; its directory is identical.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    )
}

/// Runs a command to completion, returning its output (never panics on a
/// non-zero exit; callers assert on status and text).
pub fn run<I, S>(prog: impl AsRef<OsStr>, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let prog = prog.as_ref().to_owned();
    Command::new(&prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog:?}: {e}"))
}

/// Runs a command, asserting success, returning stdout as text.
pub fn run_ok<I, S>(prog: impl AsRef<OsStr>, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let prog = prog.as_ref().to_owned();
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = run(&prog, &args);
    assert!(
        out.status.success(),
        "{prog:?} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test, with only `lo` (up). Dropping it
/// kills every process still inside and deletes it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(&format!("gt-{prefix}-"));
        run_ok("ip", ["netns", "add", &name]);
        let ns = Netns { name };
        run_ok("ip", ["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside this namespace.
    pub fn cmd(&self, prog: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Kills every process inside the namespace.
    pub fn kill_all(&self) {
        let out = run("ip", ["netns", "pids", &self.name]);
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_all();
        let _ = run("ip", ["netns", "del", &self.name]);
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc {
            child,
            what: what.to_owned(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for exit up to `limit`; kills it past that (and panics).
    pub fn wait_timeout(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} did not finish within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn term(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private graftd: its own control socket in a temp directory, its own
/// broker name, its log in a file printed if the test fails.
pub struct Graftd {
    pub proc: Proc,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub broker: String,
    pub log: PathBuf,
    /// Every argument graftd was started with (a restart reuses them).
    pub args: Vec<String>,
}

impl Graftd {
    /// Starts graftd and waits until its control socket answers.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique("graftd-"));
        std::fs::create_dir_all(&dir).expect("graftd temp dir");
        let control = dir.join("graftd.sock");
        let broker = unique("graft-test/");
        let log = dir.join("graftd.log");
        let logf = std::fs::File::create(&log).expect("graftd log file");
        let mut cmd = Command::new(bin("graftd"));
        // Its own state directory, bpffs pins and cgroup: private graftds
        // never share saved tables or eBPF state (Drop removes them).
        let tag = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut args: Vec<String> = vec![
            "--control".into(),
            control.display().to_string(),
            "--broker-name".into(),
            broker.clone(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--pin-dir".into(),
            format!("/sys/fs/bpf/graft-test-{tag}"),
            "--cgroup".into(),
            format!("graft-test-{tag}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        cmd.args(&args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        let proc = Proc::spawn(cmd, "graftd");
        let d = Graftd {
            proc,
            dir,
            control,
            broker,
            log,
            args,
        };
        let start = Instant::now();
        while !d.control.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "graftd did not create its control socket; log:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// The environment a client of this daemon needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                graft_core::ENV_CONTROL.to_owned(),
                self.control.display().to_string(),
            ),
            (graft_core::ENV_BROKER.to_owned(), self.broker.clone()),
            ("PATH".to_owned(), path_with_wrapper()),
        ]
    }

    /// Applies [`Graftd::env`] to a command.
    pub fn apply(&self, cmd: &mut Command) {
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
    }

    /// `ip graft ARGS` run inside `ns` (or the test's own namespace), through
    /// the `ip` wrapper, as a user would type it.
    pub fn ip_graft(&self, ns: Option<&Netns>, args: &[&str]) -> Output {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "ip", "graft"]);
                c
            }
            None => {
                let mut c = Command::new("ip");
                c.arg("graft");
                c
            }
        };
        cmd.args(args).stdin(Stdio::null());
        self.apply(&mut cmd);
        cmd.output().expect("run ip graft")
    }

    /// Like [`Graftd::ip_graft`], asserting success; returns stdout.
    pub fn ip_graft_ok(&self, ns: Option<&Netns>, args: &[&str]) -> String {
        let out = self.ip_graft(ns, args);
        assert!(
            out.status.success(),
            "ip graft {args:?} failed ({}): {}\ngraftd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether graftd is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.child.try_wait(), Ok(None))
    }
}

impl Drop for Graftd {
    fn drop(&mut self) {
        self.proc.term();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("---- graftd log ----\n{}", self.log_text());
        }
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        // Its pinned eBPF companion and cgroup go with it.
        let _ = Command::new(bin("graftd"))
            .args(&self.args)
            .arg("--remove")
            .stdin(Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until a TCP connect to `addr` succeeds from this namespace.
pub fn wait_tcp(addr: SocketAddr, limit: Duration) {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "nothing listens on {addr} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Waits until `f` returns true, panicking with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Connects, sends `req`, reads until EOF or `limit`; returns what came back.
pub fn tcp_exchange(addr: SocketAddr, req: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, limit).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    s.write_all(req).expect("write");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Reads a child's stdout line by line until one contains `needle`.
pub fn wait_line(r: impl Read + Send + 'static, needle: &str, limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let want = needle.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if line.contains(&want) {
                let _ = tx.send(line);
                return;
            }
        }
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no line containing {needle:?} within {limit:?}"))
}

/// Bytes as text (lossy), for assertions and failure messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` to completion within `limit` (killing it past that), capturing
/// stdout and stderr; `on_start`, if given, gets the child's stdin while it
/// runs (then it is closed).
pub fn output_within(
    mut cmd: Command,
    what: &str,
    limit: Duration,
    on_start: Option<Box<dyn FnOnce(std::process::ChildStdin)>>,
) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if on_start.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut p = Proc::spawn(cmd, what);
    let mut so = p.child.stdout.take().expect("stdout is piped");
    let mut se = p.child.stderr.take().expect("stderr is piped");
    // Both pipes are drained concurrently so a chatty child never blocks.
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    if let Some(f) = on_start {
        f(p.child.stdin.take().expect("stdin is piped"));
    }
    let status = p.wait_timeout(limit);
    Output {
        status,
        stdout: t1.join().expect("stdout reader"),
        stderr: t2.join().expect("stderr reader"),
    }
}

/// [`output_within`], asserting success; returns (stdout, stderr).
pub fn output_ok_within(cmd: Command, what: &str, limit: Duration) -> (String, String) {
    let o = output_within(cmd, what, limit, None);
    assert_success(&o, what);
    (text(&o.stdout), text(&o.stderr))
}

/// One test's world: a namespace with only loopback, a private graftd and a
/// scratch directory, all removed on drop. Most end-to-end tests start here.
pub struct Env {
    pub ns: Netns,
    pub d: Graftd,
    pub dir: PathBuf,
}

impl Env {
    /// A new world for `test`, or `None` (with the one skip line) when not
    /// root or when one of `needs` is not installed.
    pub fn new(test: &str, needs: &[&str]) -> Option<Env> {
        Self::with_graftd(test, needs, &[])
    }

    /// Like [`Env::new`], with extra graftd arguments.
    pub fn with_graftd(test: &str, needs: &[&str], graftd_args: &[&str]) -> Option<Env> {
        if !root_or_skip(test) || !needs.iter().all(|p| have_or_skip(test, p)) {
            return None;
        }
        let dir = std::env::temp_dir().join(unique("graft-env-"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Some(Env {
            ns: Netns::new("env"),
            d: Graftd::start_with(graftd_args),
            dir,
        })
    }

    /// `ip graft add SPEC` inside the namespace, SPEC written as a user types
    /// it: `env.add("ep-in4 type ipv4 addr 127.0.0.1 port 8080")`.
    pub fn add(&self, spec: &str) {
        self.add_in(&self.ns, spec);
    }

    /// `ip graft add SPEC` inside another namespace.
    pub fn add_in(&self, ns: &Netns, spec: &str) {
        let mut a = vec!["add"];
        a.extend(spec.split_whitespace());
        self.d.ip_graft_ok(Some(ns), &a);
    }

    /// `ip graft ARGS` inside the namespace, as text (`"-j show"`), asserting
    /// success; returns stdout.
    pub fn ip_graft(&self, args: &str) -> String {
        let a: Vec<&str> = args.split_whitespace().collect();
        self.d.ip_graft_ok(Some(&self.ns), &a)
    }

    /// `graft ARGS` inside the namespace, as a user runs it.
    pub fn graft(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(bin("graft"));
        c.args(args).stdin(Stdio::null());
        self.d.apply(&mut c);
        c
    }

    /// Writes a file into the scratch directory with `@NAME@` placeholders
    /// filled in; returns its path.
    pub fn script(&self, name: &str, body: &str, vars: &[(&str, String)]) -> String {
        let mut text = body.to_owned();
        for (k, v) in vars {
            text = text.replace(&format!("@{k}@"), v);
        }
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write script");
        p.display().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP and UDP port free on the host's loopback right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind probe");
    let p = l.local_addr().expect("addr").port();
    let u = std::net::UdpSocket::bind(("127.0.0.1", p)).ok();
    drop(u);
    p
}

/// The lines a preload library, launcher or graftd client printed.
pub fn graft_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("graft: "))
        .map(str::to_owned)
        .collect()
}

/// The `graft` launcher as it ships: linked statically (`-C
/// target-feature=+crt-static`, which cargo cannot set for one binary of a
/// workspace), so it runs in any image. Built once per test process with
/// `cargo rustc` into `target/static` (fresh builds are a no-op) and copied
/// next to the other binaries as `graft-static`, where it finds the preload
/// library. With `GRAFT_BIN_DIR` (installed binaries) that dir's `graft`.
pub fn static_launcher() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            if std::env::var_os("GRAFT_BIN_DIR").is_some() {
                return bin_dir().join("graft");
            }
            let root = workspace_root();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            let static_dir = target.join("static");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let out = Command::new(cargo)
                .current_dir(&root)
                .args(["rustc", "-q", "-p", "graft-launcher", "--bin", "graft"])
                .arg("--target-dir")
                .arg(&static_dir)
                .args(["--", "-C", "target-feature=+crt-static"])
                .stdin(Stdio::null())
                .output()
                .expect("run cargo rustc for the static launcher");
            assert_success(&out, "building the static launcher");
            let dst = bin_dir().join("graft-static");
            let tmp = bin_dir().join(unique(".graft-static-"));
            std::fs::copy(static_dir.join("debug/graft"), &tmp).expect("copy static launcher");
            std::fs::rename(&tmp, &dst).expect("rename static launcher");
            dst
        })
        .clone()
}

/// Restarting a private graftd, as a crash or an upgrade would.
impl Graftd {
    /// Kills graftd with SIGKILL (no clean-up at all) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Starts graftd again with the same arguments (after [`Graftd::kill9`]
    /// or a stop) and waits until its control socket accepts connections.
    pub fn restart(&mut self) {
        self.restart_bin(&bin("graftd"));
    }

    /// Like [`Graftd::restart`] with another graftd binary (an upgrade).
    pub fn restart_bin(&mut self, graftd: &Path) {
        self.start_bin(graftd);
        self.wait_ready(Duration::from_secs(10));
    }

    /// Spawns graftd (with the same arguments) without waiting for it.
    pub fn start_bin(&mut self, graftd: &Path) {
        if self.alive() {
            self.kill9();
        }
        let logf = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("graftd log file");
        let mut cmd = Command::new(graftd);
        cmd.args(&self.args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        self.proc = Proc::spawn(cmd, "graftd");
    }

    /// Waits until the control socket accepts a connection (a stale socket
    /// file left by a killed graftd refuses them).
    pub fn wait_ready(&mut self, limit: Duration) {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let start = Instant::now();
        loop {
            let s = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .expect("socket");
            let addr = UnixAddr::new(&self.control).expect("control path");
            if connect(s.as_raw_fd(), &addr).is_ok() {
                return;
            }
            assert!(
                self.alive(),
                "graftd exited during restart; log:\n{}",
                self.log_text()
            );
            assert!(
                start.elapsed() < limit,
                "graftd did not accept control connections within {limit:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What [`HostHttp`] answers.
pub const HOST_BODY: &str = "hello-from-host";

/// A host-namespace HTTP-ish server on its own thread: answers every
/// connection with one fixed response ([`HOST_BODY`]) in one segment and
/// records the peer it saw. A connection whose first byte is `x` is held
/// until the client closes it, then counted in `closed` (for tests that keep
/// many connections open).
pub struct HostHttp {
    pub addr: SocketAddr,
    pub peers: std::sync::Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    /// Connections accepted.
    pub count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Held (`x`) connections the client has closed.
    pub closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl HostHttp {
    pub fn start(bind: &str) -> HostHttp {
        use std::sync::atomic::AtomicUsize;
        use std::sync::{Arc, Mutex};
        let l = std::net::TcpListener::bind(bind).expect("host server bind");
        // A deeper accept queue for the many-connections tests.
        // (nix's Backlog stops at the libc crate's SOMAXCONN, below this.)
        // SAFETY: listen(2) on a socket we own; no pointers.
        let r = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
        assert_eq!(r, 0, "listen 4096: {}", std::io::Error::last_os_error());
        let addr = l.local_addr().expect("addr");
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (count, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (p2, n2, c2) = (peers.clone(), count.clone(), closed.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                if let Ok(peer) = s.peer_addr() {
                    p2.lock().expect("peers").push(peer);
                }
                n2.fetch_add(1, Ordering::SeqCst);
                let c3 = c2.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).unwrap_or(0);
                    if buf[..n].starts_with(b"x") {
                        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                        c3.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let answer = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HOST_BODY}",
                        HOST_BODY.len()
                    );
                    let _ = s.write_all(answer.as_bytes());
                });
            }
        });
        HostHttp {
            addr,
            peers,
            count,
            closed,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A command line as typed, split on blanks: `words("add ep type ipv4")`.
pub fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

impl Env {
    /// `graft ARGS` inside another namespace, as a client of this graftd.
    pub fn graft_in(&self, ns: &Netns, args: &[&str]) -> Command {
        let mut c = ns.cmd(bin("graft"));
        c.args(args).stdin(Stdio::null());
        self.d.apply(&mut c);
        c
    }

    /// `ip -s -j graft show` in `ns`: the `stats` object of endpoint `name`.
    pub fn stats_in(&self, ns: &Netns, name: &str) -> serde_json::Value {
        let out = self.d.ip_graft_ok(Some(ns), &["-s", "-j", "show"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j graft show JSON");
        v.as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name))
            .unwrap_or_else(|| panic!("no endpoint {name} in {out}"))["stats"]
            .clone()
    }

    /// [`Env::stats_in`] the test's own namespace.
    pub fn stats(&self, name: &str) -> serde_json::Value {
        self.stats_in(&self.ns, name)
    }

    /// Whether this graftd loaded its eBPF companion; if it could not, the
    /// skip line (with graftd's reason) and false.
    pub fn ebpf_or_skip(&self, test: &str) -> bool {
        let start = Instant::now();
        loop {
            let log = self.d.log_text();
            if log.contains("eBPF companion attached") {
                return true;
            }
            if let Some(why) = log
                .lines()
                .find(|l| l.contains("eBPF companion unavailable"))
            {
                println!("SKIP: {test}: {why}");
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "graftd said nothing about eBPF:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The opening of a test that drives graftd directly: root (else the skip
/// line and `None`), a private graftd, then one new namespace per name.
pub fn graftd_and_netns<const N: usize>(
    test: &str,
    names: [&str; N],
) -> Option<(Graftd, [Netns; N])> {
    if !root_or_skip(test) {
        return None;
    }
    let d = Graftd::start();
    Some((d, names.map(Netns::new)))
}

/// TCP segments sent in namespace `ns` (nstat, absolute counter).
pub fn out_segs(ns: &Netns) -> u64 {
    let o = run_ok(
        "ip",
        ["netns", "exec", &ns.name, "nstat", "-a", "-z", "TcpOutSegs"],
    );
    o.lines()
        .find_map(|l| l.strip_prefix("TcpOutSegs"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no TcpOutSegs in {o}"))
}

/// nginx (a master and two workers, in the foreground) under `graft
/// RULES --`, serving `page` as /index.html from `env.dir/www`, its logs
/// and pid in `env.dir`; `http` ends its http block (the server lines).
pub fn grafted_nginx(env: &Env, rules: &[&str], page: &str, http: &str) -> Proc {
    let d = env.dir.display().to_string();
    std::fs::create_dir_all(env.dir.join("www")).expect("www");
    std::fs::write(env.dir.join("www/index.html"), page).expect("index");
    std::fs::write(
        env.dir.join("nginx.conf"),
        format!(
            "user root;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n{http}}}\n"
        ),
    )
    .expect("nginx.conf");
    let (conf, log) = (format!("{d}/nginx.conf"), format!("{d}/error.log"));
    let mut args = rules.to_vec();
    args.extend(["--", "nginx", "-p", &d, "-c", &conf, "-e", &log]);
    args.extend(["-g", "daemon off;"]);
    Proc::spawn(env.graft(&args), "nginx")
}

/// Where this mount namespace shows the cgroup v2 hierarchy, if it does.
pub fn cgroup2_mount() -> Option<String> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split_whitespace().nth(4).map(str::to_owned))
            .flatten()
    })
}

/// Asserts that a finished command succeeded, showing its output if not.
pub fn assert_success(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// What a process piped to its stdout and stderr (read to the end: stop
/// it first), as (stdout, stderr); an unpiped stream reads as "".
pub fn take_output(p: &mut Proc) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = p.child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = p.child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    (out, err)
}

/// Asserts that one of `lines` (see [`graft_lines`]) passes `has`; the
/// failure shows them all.
#[track_caller]
pub fn assert_line(lines: &[String], has: impl Fn(&str) -> bool) {
    assert!(lines.iter().any(|l| has(l)), "{lines:?}");
}
