//! A blocking `recv()` on a spliced socket (graftd's default) never fails
//! with EAGAIN (issue 10).
//!
//! Spliced sockets take the kernel's sockmap receive path
//! (`tcp_bpf_recvmsg`), which on 6.18 returns EAGAIN to a blocking reader
//! after a wake-up without data: here, a thread of the client streams to a
//! slow server (its sends wait for memory, and every read of the server
//! frees some and wakes the socket's waiters) while the main thread blocks in
//! `recv()` on the same socket, where nothing arrives until the server has
//! read everything. CPython raises BlockingIOError for that EAGAIN; the
//! scripts count those. libgraft-convert repeats such a receive (the socket
//! is blocking, no MSG_DONTWAIT, no SO_RCVTIMEO), so the count must be 0.
//! Without that retry this test saw 1-2 per run. TCP segments in the
//! sockets' namespace show the transfer was spliced.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use graft_tests::{
    out_segs, output_ok_within, text, unique, which, workspace_root, Env, Netns, Proc,
};

const LIMIT: Duration = Duration::from_secs(120);
/// Bytes per run, and runs.
const N: u64 = 30_000_000;
const RUNS: usize = 3;
const PORT: u16 = 15077;

const SCRIPT: &str = r#"
import os, signal, socket, subprocess, sys, threading, time
mode, port, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# "chunked": the server's reply is "ok" and 99,998 more bytes, in ten
# sends 10 ms apart.
chunked = sys.argv[5:] == ["chunked"]
if mode == "server":
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("127.0.0.1", port))
    l.listen(4)
    print("listening", flush=True)
    for _ in range(runs):
        c, _ = l.accept()
        got = eagain = 0
        while True:
            try:
                b = c.recv(1 << 16)
                time.sleep(0.001)
            except BlockingIOError:
                eagain += 1
                continue
            if not b:
                break
            got += len(b)
        if chunked:
            reply = b"ok" + b"x" * 99998
            for i in range(10):
                c.sendall(reply[i * 10000:(i + 1) * 10000])
                time.sleep(0.01)
        else:
            c.sendall(b"ok")
        c.close()
        print(f"server got {got} eagain {eagain}", flush=True)
else:
    def use(s):
        data = os.urandom(1 << 16)
        def writer():
            # Signals are for the reading thread.
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            left = n
            while left > 0:
                k = min(left, len(data))
                s.sendall(data[:k])
                left -= k
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=writer)
        t.start()
        got, eagain = b"", 0
        if mode == "client-waitall":
            b = s.recv(100000, socket.MSG_WAITALL)
            print(f"client waitall got {len(b)}", flush=True)
        if mode == "client-splice":
            r, w = os.pipe()
        while True:
            try:
                if mode == "client-splice":
                    k = os.splice(s.fileno(), w, 16)
                    b = os.read(r, k) if k else b""
                else:
                    b = s.recv(16)
            except BlockingIOError:
                eagain += 1
                continue
            if not b:
                break
            got += b
        t.join()
        s.close()
        if mode == "client-waitall":
            print(f"client got {len(got)} bytes more eagain {eagain}", flush=True)
        else:
            print(f"client got {got.decode(errors='replace')} eagain {eagain}", flush=True)
    if mode == "receiver":
        # A worker handed the connection over a unix socket (SCM_RIGHTS),
        # reading it while a SIGALRM every 2 ms comes (python's handlers
        # have no SA_RESTART).
        pair = socket.socket(fileno=int(os.environ["GRAFT_TEST_PAIR"]))
        _, fds, _, _ = socket.recv_fds(pair, 1, 1)
        signal.signal(signal.SIGALRM, lambda *a: None)
        signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
        use(socket.socket(fileno=fds[0]))
        sys.exit(0)
    for _ in range(runs):
        s = socket.create_connection(("127.0.0.1", port))
        if mode != "client-passed":
            use(s)
            continue
        a, b = socket.socketpair()
        env = dict(os.environ, GRAFT_TEST_PAIR=str(b.fileno()))
        worker = subprocess.Popen([sys.executable, sys.argv[0], "receiver", str(port), str(n), "1"],
                                  pass_fds=[b.fileno()], env=env)
        socket.send_fds(a, [b"c"], [s.fileno()])
        s.close()
        b.close()
        worker.wait()
"#;

/// What one spliced run left: the client's stdout, the server's lines, and
/// the TCP segments of the sockets' namespace during it.
struct Run {
    client: String,
    server: String,
    segs: u64,
}

/// Starts graftd (splicing, its default) and the python server (`runs`
/// connections of `N` bytes) grafted in its own namespace, then runs the
/// client `client(program args)` under `graft -e` in another; `None` when
/// the test is skipped (one line said why).
fn spliced(test: &str, needs: &[&str], runs: usize, client: &[&str]) -> Option<Run> {
    spliced_with(test, needs, runs, client, "ok")
}

/// [`spliced`] with the server's `reply`: "ok", or "chunked" (see the
/// script).
fn spliced_with(
    test: &str,
    needs: &[&str],
    runs: usize,
    client: &[&str],
    reply: &str,
) -> Option<Run> {
    let env = Env::with_graftd(test, &[&["python3", "nstat"], needs].concat(), &[])?;
    let start = Instant::now();
    loop {
        let log = env.d.log_text();
        if log.contains("splicing on") {
            break;
        }
        if log.contains("eBPF companion unavailable") || start.elapsed() > Duration::from_secs(10) {
            println!("SKIP: {test}: graftd runs without splicing:\n{log}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = Netns::new("splb-t");
    let client_ns = Netns::new("splb-c");
    let t = target.path().display().to_string();
    env.add(&format!(
        "ep-in type ipv4 addr 127.0.0.1 port {PORT} netns {t}"
    ));
    env.add_in(
        &client_ns,
        &format!("ep-out type ipv4 addr 0.0.0.0 port dynamic netns {t}"),
    );
    let script = env.script("splice.py", SCRIPT, &[]);
    let segs = out_segs(&target);
    let mut srv = env.graft(&["-i", &format!("127.0.0.1:{PORT}=ep-in"), "--", "python3"]);
    srv.args([
        script.clone(),
        "server".to_owned(),
        PORT.to_string(),
        N.to_string(),
        runs.to_string(),
        reply.to_owned(),
    ])
    .stdout(Stdio::piped());
    let mut srv = Proc::spawn(srv, "spliced server");
    let out = srv.child.stdout.take().expect("server stdout");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (l2, (tx, rx)) = (lines.clone(), std::sync::mpsc::channel());
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if l.contains("listening") {
                let _ = tx.send(());
            }
            l2.lock().expect("lines").push(l);
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("server listening");
    let mut cli = client_ns.cmd(graft_tests::bin("graft"));
    cli.args(["-e", "127.0.0.1/32=ep-out", "--"])
        .args(client.iter().map(|a| a.replace("{script}", &script)))
        .stdin(Stdio::null());
    env.d.apply(&mut cli);
    let (cout, cerr) = output_ok_within(cli, "spliced client", LIMIT);
    let st = srv.wait_timeout(LIMIT);
    assert!(st.success(), "server: {st}");
    let server = lines.lock().expect("lines").join("\n");
    assert_eq!(
        server
            .lines()
            .filter(|l| l.starts_with("server"))
            .collect::<Vec<_>>()
            .join("\n"),
        vec![format!("server got {N} eagain 0"); runs].join("\n"),
        "client:\n{cout}\n{cerr}\nserver:\n{server}"
    );
    Some(Run {
        client: cout,
        server,
        segs: out_segs(&target) - segs,
    })
}

#[test]
fn blocking_recv_on_a_spliced_socket_never_sees_eagain() {
    python_client(
        "blocking_recv_on_a_spliced_socket_never_sees_eagain",
        "client",
        "ok",
        "client got ok eagain 0",
    );
}

/// The same from a C program built with `_FORTIFY_SOURCE`, whose `read`,
/// `recv` and `recvfrom` are glibc's `__read_chk`, `__recv_chk` and
/// `__recvfrom_chk` (they reach libc's internal read, never the exported
/// one), with `readv` and `recvmmsg`, and with stdio (`fread` on a stream
/// `fdopen` made, which reads through libc's internal read): each mode
/// twice.
#[test]
fn fortified_vector_and_mmsg_reads_on_a_spliced_socket_never_see_eagain() {
    let test = "fortified_vector_and_mmsg_reads_on_a_spliced_socket_never_see_eagain";
    let modes = ["read", "readv", "recv", "recvfrom", "recvmmsg", "fread"];
    let Some(run) = reader_twice(test, &modes) else {
        return;
    };
    let want: Vec<String> = modes
        .iter()
        .chain(&modes)
        .map(|m| format!("{m} got ok eagain 0 eintr 0"))
        .collect();
    assert_eq!(
        run.client.trim(),
        want.join("\n"),
        "server:\n{}",
        run.server
    );
    assert!(run.segs < 400, "{} TCP segments: not spliced", run.segs);
}

/// Signals reaching a thread blocked in `read` on a spliced socket: every
/// one wakes it without data, and the kernel's sockmap path then fails the
/// read with EAGAIN whatever the handler's flags. On TCP a handler with
/// `SA_RESTART` restarts the read and one without fails it with EINTR; the
/// library gives the same answers, also in a program that inherited the
/// socket across exec as its stdin (inetd-style: its library did not see
/// the socket made), reading it with `read` or through the `stdin` stream.
/// A SIGALRM every 2 ms, the reader's only signal; each mode twice.
#[test]
fn signals_restart_or_interrupt_a_blocking_read_on_a_spliced_socket_as_on_tcp() {
    let test = "signals_restart_or_interrupt_a_blocking_read_on_a_spliced_socket_as_on_tcp";
    let modes = ["restart", "interrupt", "inherited", "inherited-stdio"];
    let Some(run) = reader_twice(test, &modes) else {
        return;
    };
    let lines: Vec<&str> = run.client.lines().collect();
    assert_eq!(lines.len(), 2 * modes.len(), "client:\n{}", run.client);
    for l in &lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        let (mode, eintr) = (w[0], w[6].parse::<u64>().expect("eintr count"));
        assert_eq!(&w[..5], [mode, "got", "ok", "eagain", "0"], "{l}");
        match mode {
            "restart" | "inherited" | "inherited-stdio" => {
                assert_eq!(eintr, 0, "SA_RESTART: TCP restarts the read: {l}")
            }
            _ => assert!(
                eintr > 0,
                "no SA_RESTART: TCP fails the read with EINTR: {l}"
            ),
        }
    }
    assert!(run.segs < 400, "{} TCP segments: not spliced", run.segs);
}

/// `splice_reader` (see [`splice_reader`]) run as the spliced client with
/// each of `modes` twice; `None` when the test is skipped.
fn reader_twice(test: &str, modes: &[&str]) -> Option<Run> {
    let exe = splice_reader(test)?;
    let (n, port) = (N.to_string(), PORT.to_string());
    let mut client = vec![exe.as_str(), &port, &n];
    client.extend(modes.iter().chain(modes));
    spliced(test, &["cc", "nm"], 2 * modes.len(), &client)
}

/// `tests/programs/splice_reader.c` built with `_FORTIFY_SOURCE` (checked:
/// it really imports the fortified reads), its path; `None` when the test
/// is skipped (one line said why).
fn splice_reader(test: &str) -> Option<String> {
    if which("cc").is_none() {
        println!("SKIP: {test}: `cc` is not installed");
        return None;
    }
    // A build product, kept with the others in target/.
    let dir = workspace_root().join("target/test-programs");
    std::fs::create_dir_all(&dir).expect("target/test-programs");
    let exe = dir.join(unique("splice_reader-"));
    let o = Command::new("cc")
        .args([
            "-O2",
            "-D_FORTIFY_SOURCE=2",
            "-Wall",
            "-Werror",
            "-pthread",
            "-o",
        ])
        .arg(&exe)
        .arg(workspace_root().join("tests/programs/splice_reader.c"))
        .output()
        .expect("run cc");
    assert!(o.status.success(), "cc: {}", text(&o.stderr));
    // The program really calls the fortified functions (and readv).
    let syms = Command::new("nm").arg("-D").arg(&exe).output().expect("nm");
    let syms = text(&syms.stdout);
    for f in [
        "__read_chk",
        "__recv_chk",
        "__recvfrom_chk",
        "readv",
        "recvmmsg",
        "fdopen",
    ] {
        assert!(
            syms.lines()
                .any(|l| l.ends_with(&format!(" {f}")) || l.contains(&format!(" {f}@"))),
            "{f} not imported:\n{syms}"
        );
    }
    Some(exe.display().to_string())
}

/// `splice(2)` from a spliced socket into a pipe (what proxies such as
/// HAProxy do to move bytes without copying them): the kernel's TCP splice
/// reads only what TCP queued, never what the peer handed over, so without
/// the library a blocking splice returns 0 at the peer's FIN with the reply
/// still queued. python's `os.splice`, the same client as above otherwise.
#[test]
fn splice_from_a_spliced_socket_gets_every_byte() {
    python_client(
        "splice_from_a_spliced_socket_gets_every_byte",
        "client-splice",
        "ok",
        "client got ok eagain 0",
    );
}

/// `recv(n, MSG_WAITALL)` on a spliced socket: TCP waits for all `n` bytes
/// (less only at EOF, an error or a signal); the kernel's sockmap receive
/// returns what is queued, here the first of ten sends (10,000 of 100,000
/// bytes without the library). python's `recv` with the flag; the server's
/// reply comes in ten sends 10 ms apart.
#[test]
fn msg_waitall_on_a_spliced_socket_waits_for_all() {
    python_client(
        "msg_waitall_on_a_spliced_socket_waits_for_all",
        "client-waitall",
        "chunked",
        "client waitall got 100000\nclient got 0 bytes more eagain 0",
    );
}

/// The python script's client in `mode` against its server answering
/// `reply`, [`RUNS`] connections: each must print `each`, and TCP must
/// have carried almost nothing (90 MB through TCP on loopback takes
/// thousands of segments; spliced, only handshakes, the replies, FINs and
/// ACKs remain).
fn python_client(test: &str, mode: &str, reply: &str, each: &str) {
    let (n, runs, port) = (N.to_string(), RUNS.to_string(), PORT.to_string());
    let client = ["python3", "{script}", mode, &port, &n, &runs];
    let Some(run) = spliced_with(test, &[], RUNS, &client, reply) else {
        return;
    };
    let want = [each; RUNS].join("\n");
    assert_eq!(run.client.trim(), want, "server:\n{}", run.server);
    assert!(run.segs < 200, "{} TCP segments: not spliced", run.segs);
}

/// A connection handed to another process over a unix socket (SCM_RIGHTS,
/// as servers with worker processes do) is known to that process's library
/// as a connection: signals into its blocking receive on a spliced socket
/// (python: EAGAIN raised as BlockingIOError without the library) are
/// EINTR that python retries, as on TCP.
#[test]
fn a_connection_received_over_scm_rights_reads_as_on_tcp() {
    python_client(
        "a_connection_received_over_scm_rights_reads_as_on_tcp",
        "client-passed",
        "ok",
        "client got ok eagain 0",
    );
}
