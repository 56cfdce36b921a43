//! A blocking `recv()` on a spliced socket (`graftd --splice`) never fails
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

use std::process::Stdio;
use std::time::{Duration, Instant};

use graft_tests::{out_segs, output_ok_within, Env, Netns, Proc};

const LIMIT: Duration = Duration::from_secs(120);
/// Bytes per run, and runs.
const N: u64 = 30_000_000;
const RUNS: usize = 3;
const PORT: u16 = 15077;

const SCRIPT: &str = r#"
import os, socket, sys, threading, time
mode, port, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
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
        c.sendall(b"ok")
        c.close()
        print(f"server got {got} eagain {eagain}", flush=True)
else:
    for _ in range(runs):
        s = socket.create_connection(("127.0.0.1", port))
        data = os.urandom(1 << 16)
        def writer():
            left = n
            while left > 0:
                k = min(left, len(data))
                s.sendall(data[:k])
                left -= k
            s.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=writer)
        t.start()
        got, eagain = b"", 0
        while True:
            try:
                b = s.recv(16)
            except BlockingIOError:
                eagain += 1
                continue
            if not b:
                break
            got += b
        t.join()
        s.close()
        print(f"client got {got.decode(errors='replace')} eagain {eagain}", flush=True)
"#;

#[test]
fn blocking_recv_on_a_spliced_socket_never_sees_eagain() {
    let test = "blocking_recv_on_a_spliced_socket_never_sees_eagain";
    let Some(env) = Env::with_graftd(test, &["python3", "nstat"], &["--splice"]) else {
        return;
    };
    let start = Instant::now();
    loop {
        let log = env.d.log_text();
        if log.contains("splicing on") {
            break;
        }
        if log.contains("eBPF companion unavailable") || start.elapsed() > Duration::from_secs(10) {
            println!("SKIP: {test}: graftd runs without splicing:\n{log}");
            return;
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
    let args = |mode: &str| {
        vec![
            script.clone(),
            mode.to_owned(),
            PORT.to_string(),
            N.to_string(),
            RUNS.to_string(),
        ]
    };
    let segs = out_segs(&target);
    let mut srv = env.graft(&["-i", &format!("127.0.0.1:{PORT}=ep-in"), "--", "python3"]);
    srv.args(args("server")).stdout(Stdio::piped());
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
    cli.args(["-e", "127.0.0.1/32=ep-out", "--", "python3"])
        .args(args("client"))
        .stdin(Stdio::null());
    env.d.apply(&mut cli);
    let (cout, cerr) = output_ok_within(cli, "spliced client", LIMIT);
    let st = srv.wait_timeout(LIMIT);
    assert!(st.success(), "server: {st}");
    let sout = lines.lock().expect("lines").join("\n");
    let want_c = ["client got ok eagain 0"; RUNS].join("\n");
    assert_eq!(
        cout.trim(),
        want_c,
        "client:\n{cout}\n{cerr}\nserver:\n{sout}"
    );
    let want_s = vec![format!("server got {N} eagain 0"); RUNS].join("\n");
    assert_eq!(
        sout.lines()
            .filter(|l| l.starts_with("server"))
            .collect::<Vec<_>>()
            .join("\n"),
        want_s,
        "{sout}"
    );
    // 90 MB through TCP on loopback takes thousands of segments; spliced,
    // only handshakes, the "ok"s, FINs and ACKs remain.
    let segs = out_segs(&target) - segs;
    assert!(segs < 200, "{segs} TCP segments: not spliced");
}
