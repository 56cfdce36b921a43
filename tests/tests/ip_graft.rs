//! `ip graft` end to end: the AF_GRAFT walkthrough typed through graft's `ip`
//! wrapper inside namespaces made by the test, against a private graftd.
//!
//! Asserts on exactly what a user sees: stdout lines, JSON fields, the one
//! stderr line and the exit status of every mistake, and that anything that is
//! not `ip graft` still reaches iproute2's own `ip`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use graft_tests::{
    graftd_and_netns, path_with_wrapper, root_or_skip, run, text, words, Graftd, Netns,
};

/// `ip ARGS` through the wrapper, inside `ns` when given, as a client of `g`
/// (or, without a daemon, with the control socket at `control`).
fn ip(g: Option<&Graftd>, control: Option<&Path>, ns: Option<&Netns>, args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["netns", "exec", &ns.name, "ip"]);
    }
    cmd.args(args).stdin(Stdio::null());
    match g {
        Some(g) => g.apply(&mut cmd),
        None => {
            cmd.env("PATH", path_with_wrapper());
        }
    }
    if let Some(c) = control {
        cmd.env(graft_core::ENV_CONTROL, c);
    }
    cmd.output().expect("run ip")
}

/// Asserts a clean success and returns stdout.
fn ok(g: &Graftd, ns: Option<&Netns>, args: &[&str]) -> String {
    let out = ip(Some(g), None, ns, args);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "ip {args:?}: {}\nstderr: {}\ngraftd log:\n{}",
        out.status,
        text(&out.stderr),
        g.log_text()
    );
    text(&out.stdout)
}

/// Asserts exit status `code`, nothing on stdout, exactly one stderr line;
/// returns that line.
fn fails(out: &Output, code: i32, what: &str) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}; stderr: {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: stdout should be empty: {}",
        text(&out.stdout)
    );
    assert!(
        err.ends_with('\n') && err.lines().count() == 1,
        "{what}: expected one stderr line, got {err:?}"
    );
    err.trim_end().to_owned()
}

/// `ip ARGS` inside `ns` as a client of `g`, asserting exit 2 with one line
/// (see [`fails`]); returns that line.
fn fails_in(g: &Graftd, ns: &Netns, args: &[&str], what: &str) -> String {
    fails(&ip(Some(g), None, Some(ns), args), 2, what)
}

/// (dev, ino) of a namespace file, as graftd reports `target_netns`.
fn ns_id(p: &str) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {p}: {e}"));
    (m.dev(), m.ino())
}

/// Asks graftd's broker in `ns` for a socket of `family` on endpoint `ep`, the
/// way the preload library does, from a thread dedicated to that namespace.
/// `bind_to_device` adds SO_BINDTODEVICE, an option graftd must refuse.
/// Returns the reply's errno (0: a socket came with it, and was closed).
fn broker_request(g: &Graftd, ns: &Netns, ep: &str, bind_to_device: bool) -> i32 {
    use graft_core::proto::broker::{self, Op, Purpose};
    use nix::sys::socket::{self as s, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    let nspath = ns.path();
    let name = g.broker.clone();
    let ep = graft_core::EndpointName::new(ep).expect("endpoint name");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&nspath).expect("open netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sock = s::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let tv = nix::sys::time::TimeVal::new(10, 0);
        s::setsockopt(&sock, s::sockopt::ReceiveTimeout, &tv).expect("timeout");
        s::connect(
            sock.as_raw_fd(),
            &UnixAddr::new_abstract(name.as_bytes()).expect("addr"),
        )
        .expect("connect to the broker");
        let mut req = broker::Request::new(
            Op::Socket,
            ep,
            libc::AF_INET,
            libc::SOCK_STREAM,
            0,
            Purpose::Egress,
        );
        if bind_to_device {
            assert!(req.push_opt(libc::SOL_SOCKET, libc::SO_BINDTODEVICE, b"lo\0"));
        }
        let mut out = [0u8; broker::REQUEST_LEN];
        req.encode(&mut out);
        s::sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&out)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let mut buf = [0u8; broker::REPLY_LEN + 1];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let m = s::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recv");
        let n = m.bytes;
        let mut fds = Vec::new();
        for c in m.cmsgs().expect("cmsgs") {
            if let s::ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        for fd in &fds {
            nix::unistd::close(*fd).expect("close");
        }
        let reply = broker::Reply::decode(&buf[..n]).expect("broker reply");
        assert_eq!(
            reply.errno == 0,
            fds.len() == 1,
            "a socket comes with success only"
        );
        reply.errno
    })
    .join()
    .expect("broker thread")
}

fn json(s: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"));
    v.as_array().expect("a JSON array").clone()
}

#[test]
fn walkthrough_shows_af_graft_lines() {
    let Some((g, [c1, c2])) = graftd_and_netns("walkthrough_shows_af_graft_lines", ["c1", "c2"])
    else {
        return;
    };
    // `netns PID`: this test process lives in the host namespace. (AF_GRAFT's
    // docs say `netns 1`; that is tried below where /proc/1/ns/net can be
    // opened, which some sandboxes forbid even to root.)
    let me = std::process::id().to_string();
    let unix_path = g.dir.join("ep-un.sock");
    let unix_path = unix_path.to_str().expect("utf-8 temp path");
    let adds: Vec<Vec<&str>> = vec![
        vec![
            "ep-in4",
            "type",
            "ipv4",
            "addr",
            "127.0.0.1",
            "port",
            "8080",
        ],
        vec![
            "ep-out4", "type", "ipv4", "addr", "0.0.0.0", "port", "dynamic",
        ],
        vec!["ep-in6", "type", "ipv6", "addr", "::1", "port", "8080"],
        vec!["ep-out6", "type", "ipv6", "addr", "::", "port", "dynamic"],
        vec!["ep-un", "type", "unix", "path", unix_path],
        vec![
            "ep-pid",
            "type",
            "ipv4",
            "addr",
            "127.0.0.1",
            "port",
            "9090",
            "netns",
            &me,
        ],
        vec![
            "ep-ns", "type", "ipv6", "addr", "::1", "port", "9091", "netns", &c2.name,
        ],
    ];
    for a in &adds {
        let mut args = vec!["graft", "add"];
        args.extend(a);
        assert_eq!(ok(&g, Some(&c1), &args), "", "add prints nothing");
    }

    let expected = format!(
        "ep-in4 type ipv4 addr 127.0.0.1 port 8080\n\
         ep-in6 type ipv6 addr ::1 port 8080\n\
         ep-ns type ipv6 addr ::1 port 9091 netns {}\n\
         ep-out4 type ipv4 addr 0.0.0.0 port dynamic\n\
         ep-out6 type ipv6 addr :: port dynamic\n\
         ep-pid type ipv4 addr 127.0.0.1 port 9090 netns {me}\n\
         ep-un type unix path {unix_path}\n",
        c2.name
    );
    assert_eq!(ok(&g, Some(&c1), &["graft", "show"]), expected);
    // `ip graft` alone, `list`, `ls` and abbreviations all show.
    for args in [
        &["graft"][..],
        &["graft", "list"],
        &["gr", "ls"],
        &["g", "sh"],
    ] {
        assert_eq!(ok(&g, Some(&c1), args), expected, "ip {args:?}");
    }
    assert_eq!(
        ok(&g, Some(&c1), &["graft", "show", "ep-pid"]),
        format!("ep-pid type ipv4 addr 127.0.0.1 port 9090 netns {me}\n")
    );
    // `-n NETNS` before the object works like `ip netns exec`.
    assert_eq!(ok(&g, None, &["-n", &c1.name, "graft", "show"]), expected);

    // JSON, global options before the object as iproute2 has them.
    let eps = json(&ok(&g, Some(&c1), &["-j", "graft", "show"]));
    assert_eq!(eps.len(), 7);
    let by = |n: &str| {
        eps.iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing from JSON"))
            .clone()
    };
    let host = ns_id("/proc/self/ns/net");
    let id = |e: &serde_json::Value| {
        (
            e["target_netns"]["dev"].as_u64().expect("dev"),
            e["target_netns"]["ino"].as_u64().expect("ino"),
        )
    };
    let in4 = by("ep-in4");
    assert_eq!(in4["type"], "ipv4");
    assert_eq!(in4["addr"], "127.0.0.1");
    assert_eq!(in4["port"], 8080);
    assert_eq!(in4["netns"], serde_json::Value::Null);
    assert_eq!(in4["policy"], serde_json::json!([]));
    assert!(in4.get("stats").is_none(), "stats only with -s");
    assert_eq!(
        id(&in4),
        host,
        "default target is graftd's (the host's) namespace"
    );
    assert_eq!(by("ep-out6")["port"], "dynamic");
    assert_eq!(by("ep-out6")["addr"], "::");
    let un = by("ep-un");
    assert_eq!(un["type"], "unix");
    assert_eq!(un["path"], unix_path);
    assert!(un.get("addr").is_none() && un.get("port").is_none());
    let pid = by("ep-pid");
    assert_eq!(pid["netns"], me.as_str());
    assert_eq!(id(&pid), host);
    let nsn = by("ep-ns");
    assert_eq!(nsn["netns"], c2.name.as_str());
    assert_eq!(id(&nsn), ns_id(&c2.path().display().to_string()));
    assert_ne!(id(&nsn), host);

    // -p pretty-prints the same document; options may also follow `graft`.
    let pretty = ok(&g, Some(&c1), &["-j", "-p", "graft", "show"]);
    assert!(pretty.lines().count() > 7);
    assert_eq!(json(&pretty), eps);
    assert_eq!(json(&ok(&g, Some(&c1), &["graft", "-j", "show"])), eps);

    // -s: two counter lines under every endpoint, nothing handed out yet.
    let s = ok(&g, Some(&c1), &["-s", "graft", "show"]);
    let lines: Vec<&str> = s.lines().collect();
    let want: Vec<&str> = expected.lines().collect();
    assert_eq!(lines.len(), want.len() * 3, "{s}");
    for (i, w) in want.iter().enumerate() {
        assert_eq!(lines[3 * i], *w);
        let head: Vec<&str> = lines[3 * i + 1].split_whitespace().collect();
        let vals: Vec<&str> = lines[3 * i + 2].split_whitespace().collect();
        assert!(lines[3 * i + 1].starts_with("    "), "indented: {s}");
        assert_eq!(&head[..2], &["sockets", "refused"], "{s}");
        assert_eq!(head.len(), vals.len(), "{s}");
        assert_eq!(&vals[..2], &["0", "0"], "{s}");
    }
    let sj = json(&ok(&g, Some(&c1), &["-s", "-j", "graft", "show"]));
    for e in &sj {
        assert_eq!(e["stats"]["sockets"], 0, "{e}");
        assert_eq!(e["stats"]["refused"], 0, "{e}");
    }
    // Counters move: two sockets handed out, one request refused (it carried
    // SO_BINDTODEVICE, which would let a container escape its endpoint).
    assert_eq!(broker_request(&g, &c1, "ep-out4", false), 0);
    assert_eq!(broker_request(&g, &c1, "ep-out4", false), 0);
    assert_ne!(broker_request(&g, &c1, "ep-out4", true), 0);
    let s = ok(&g, Some(&c1), &["-s", "graft", "show", "ep-out4"]);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3, "{s}");
    assert_eq!(lines[0], "ep-out4 type ipv4 addr 0.0.0.0 port dynamic");
    assert_eq!(
        lines[1].split_whitespace().take(2).collect::<Vec<_>>(),
        ["sockets", "refused"]
    );
    assert_eq!(
        lines[2].split_whitespace().take(2).collect::<Vec<_>>(),
        ["2", "1"],
        "{s}"
    );
    let e = json(&ok(
        &g,
        Some(&c1),
        &["-s", "-j", "graft", "show", "ep-out4"],
    ));
    assert_eq!(e[0]["stats"]["sockets"], 2);
    assert_eq!(e[0]["stats"]["refused"], 1);
    assert_eq!(
        json(&ok(&g, Some(&c1), &["-s", "-j", "graft", "show", "ep-in4"]))[0]["stats"]["sockets"],
        0
    );

    // `netns 1`, exactly as AF_GRAFT's walkthrough types it.
    let add1 = words("graft add ep-1 type ipv4 addr 127.0.0.1 port 8080 netns 1");
    if std::fs::File::open("/proc/1/ns/net").is_ok() {
        ok(&g, Some(&c1), &add1);
        assert_eq!(
            ok(&g, Some(&c1), &["graft", "show", "ep-1"]),
            "ep-1 type ipv4 addr 127.0.0.1 port 8080 netns 1\n"
        );
        let e = json(&ok(&g, Some(&c1), &["-j", "graft", "show", "ep-1"]));
        assert_eq!(id(&e[0]), ns_id("/proc/1/ns/net"));
        ok(&g, Some(&c1), &["graft", "del", "ep-1"]);
    } else {
        println!("SKIP: walkthrough: `netns 1`: /proc/1/ns/net cannot be opened here (sandbox)");
        let e = fails_in(&g, &c1, &add1, "netns 1");
        assert!(
            e.starts_with("Error: cannot open netns \"1\": /proc/1/ns/net: "),
            "{e}"
        );
    }

    // The host namespace has no endpoints of its own.
    assert_eq!(ok(&g, None, &["graft", "show"]), "");
    assert_eq!(ok(&g, None, &["-j", "graft", "show"]), "[]\n");
}

#[test]
fn namespaces_see_only_their_own_endpoints() {
    let Some((g, [a, b])) = graftd_and_netns("namespaces_see_only_their_own_endpoints", ["a", "b"])
    else {
        return;
    };
    ok(
        &g,
        Some(&a),
        &words("graft add ep type ipv4 addr 127.0.0.1 port 8081"),
    );
    ok(
        &g,
        Some(&a),
        &words("graft add only-a type ipv4 addr 0.0.0.0 port dynamic"),
    );
    // The same name in another namespace is another endpoint.
    ok(
        &g,
        Some(&b),
        &words("graft add ep type ipv6 addr ::1 port 8082"),
    );
    assert_eq!(
        ok(&g, Some(&a), &["graft", "show"]),
        "ep type ipv4 addr 127.0.0.1 port 8081\nonly-a type ipv4 addr 0.0.0.0 port dynamic\n"
    );
    assert_eq!(
        ok(&g, Some(&b), &["graft", "show"]),
        "ep type ipv6 addr ::1 port 8082\n"
    );
    // b cannot see, show or delete a's endpoint.
    let e = fails_in(&g, &b, &["graft", "show", "only-a"], "show other's");
    assert_eq!(
        e,
        "Error: endpoint \"only-a\" does not exist in this network namespace"
    );
    let e = fails_in(&g, &b, &["graft", "del", "only-a"], "del other's");
    assert!(
        e.starts_with("Error: graftd: ") && e.contains("only-a"),
        "{e}"
    );
    assert!(ok(&g, Some(&a), &["graft", "show"]).contains("only-a"));
    // Deleting b's `ep` leaves a's alone.
    ok(&g, Some(&b), &["graft", "del", "ep"]);
    assert_eq!(ok(&g, Some(&b), &["graft", "show"]), "");
    assert_eq!(
        ok(&g, Some(&a), &["graft", "show", "ep"]),
        "ep type ipv4 addr 127.0.0.1 port 8081\n"
    );
}

#[test]
fn del_and_duplicate_names() {
    let Some((g, [c])) = graftd_and_netns("del_and_duplicate_names", ["dup"]) else {
        return;
    };
    let add = words("graft add ep-in4 type ipv4 addr 127.0.0.1 port 8080");
    ok(&g, Some(&c), &add);
    // Re-adding the name is refused, even with another address, and the
    // existing endpoint is untouched.
    let e = fails_in(&g, &c, &add, "duplicate add");
    assert!(
        e.starts_with("Error: graftd: ") && e.contains("ep-in4") && e.contains("exists"),
        "{e}"
    );
    let other = words("graft add ep-in4 type ipv6 addr ::1 port 1");
    fails_in(&g, &c, &other, "duplicate add, other addr");
    assert_eq!(
        ok(&g, Some(&c), &["graft", "show"]),
        "ep-in4 type ipv4 addr 127.0.0.1 port 8080\n"
    );
    // del works (abbreviated too), and twice is an error.
    assert_eq!(ok(&g, Some(&c), &["graft", "del", "ep-in4"]), "");
    assert_eq!(ok(&g, Some(&c), &["graft", "show"]), "");
    let e = fails_in(&g, &c, &["graft", "del", "ep-in4"], "del missing");
    assert!(
        e.starts_with("Error: graftd: ") && e.contains("ep-in4"),
        "{e}"
    );
    // The name is free again.
    ok(&g, Some(&c), &add);
    ok(&g, Some(&c), &["graft", "d", "ep-in4"]);
    assert_eq!(ok(&g, Some(&c), &["graft", "show"]), "");
    assert!(g.log_text().len() < 10_000_000);
}

#[test]
fn bad_input_gets_one_line_and_exit_2() {
    let Some((g, [c])) = graftd_and_netns("bad_input_gets_one_line_and_exit_2", ["bad"]) else {
        return;
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &words("add sixteen-bytes-xx type ipv4 addr 1.2.3.4 port 1"),
            "Error: endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes",
        ),
        (
            &["add", "", "type", "ipv4", "addr", "1.2.3.4", "port", "1"],
            "Error: endpoint name is empty",
        ),
        (&["add"], "Error: argument \"NAME\" is required: ip graft add NAME type TYPE ..."),
        (
            &words("add e type ipv5 addr 1.2.3.4 port 1"),
            "Error: argument \"ipv5\" is wrong: type must be ipv4, ipv6 or unix",
        ),
        (
            &words("add e type ipv4 addr 1.2.3.400 port 1"),
            "Error: argument \"1.2.3.400\" is wrong: addr of type ipv4 must be an IPv4 address",
        ),
        (
            &words("add e type ipv4 addr ::1 port 1"),
            "Error: argument \"::1\" is wrong: addr of type ipv4 must be an IPv4 address",
        ),
        (
            &words("add e type ipv6 addr 127.0.0.1 port 1"),
            "Error: argument \"127.0.0.1\" is wrong: addr of type ipv6 must be an IPv6 address",
        ),
        (
            &words("add e type ipv4 addr 1.2.3.4 port 65536"),
            "Error: argument \"65536\" is wrong: port must be 0-65535 or \"dynamic\"",
        ),
        (
            &words("add e type ipv4 addr 1.2.3.4 port http"),
            "Error: argument \"http\" is wrong: port must be 0-65535 or \"dynamic\"",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4"),
            "Error: argument \"port\" is required for type ipv4: port { PORT | dynamic }",
        ),
        (
            &words("add x type ipv4 addr"),
            "Error: \"addr\" needs an argument: addr ADDR",
        ),
        (
            &words("add x addr 1.2.3.4 port 1"),
            "Error: argument \"type\" is required: type { ipv4 | ipv6 | unix }",
        ),
        (
            &words("add x type unix"),
            "Error: argument \"path\" is required for type unix: path PATH",
        ),
        (
            &words("add x type unix path relative.sock"),
            "Error: argument \"relative.sock\" is wrong: unix path must be absolute",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4 port 1 bogus 1"),
            "Error: invalid argument \"bogus\"; try \"ip graft help\".",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4 port 1 port 2"),
            "Error: \"port\" is given twice",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4 port 1 netns gt-no-such-ns"),
            "Error: cannot find netns \"gt-no-such-ns\": /run/netns/gt-no-such-ns: No such file or directory",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4 port 1 netns 999999999"),
            "Error: cannot find netns \"999999999\": /proc/999999999/ns/net: No such file or directory",
        ),
        (
            &words("add x type ipv4 addr 1.2.3.4 port 1 netns /etc/hostname"),
            "Error: netns \"/etc/hostname\" (/etc/hostname) is not a network namespace",
        ),
        (
            &words("add x type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.1/8"),
            "Error: invalid \"allow\" argument: \"10.0.0.1/8\": address has bits set beyond the prefix length",
        ),
        (
            &words("add x type ipv4 addr 0.0.0.0 port dynamic deny 10.0.0.0"),
            "Error: invalid \"deny\" argument: \"10.0.0.0\": expected PREFIX/LEN[:PORT[-PORT]]",
        ),
        (
            &words("add x type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:70000"),
            "Error: invalid \"allow\" argument: \"10.0.0.0/8:70000\": \"70000\" is not a port (0-65535)",
        ),
        (&["del"], "Error: argument \"NAME\" is required: ip graft del NAME"),
        (
            &["del", "sixteen-bytes-xx"],
            "Error: endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes",
        ),
        (&["show", "a", "b"], "Error: invalid argument \"b\"; try \"ip graft help\"."),
        (&["frobnicate"], "Command \"frobnicate\" is unknown, try \"ip graft help\"."),
        (&["-x", "show"], "Option \"-x\" is unknown, try \"ip graft help\"."),
    ];
    for (args, want) in cases {
        let mut full = vec!["graft"];
        full.extend_from_slice(args);
        let got = fails(
            &ip(Some(&g), None, Some(&c), &full),
            2,
            &format!("{args:?}"),
        );
        assert_eq!(got, *want, "ip graft {args:?}");
    }
    // Nothing was added by any of them.
    assert_eq!(ok(&g, Some(&c), &["graft", "show"]), "");
}

#[test]
fn graftd_not_running_is_one_clear_line() {
    if !root_or_skip("graftd_not_running_is_one_clear_line") {
        return;
    }
    let c = Netns::new("down");
    let missing = std::env::temp_dir()
        .join(graft_tests::unique("no-graftd-"))
        .join("graftd.sock");
    for args in [
        &["graft", "show"][..],
        &["graft", "del", "x"],
        &words("graft add x type ipv4 addr 127.0.0.1 port 1"),
    ] {
        let e = fails(&ip(None, Some(&missing), Some(&c), args), 1, "no graftd");
        assert_eq!(
            e,
            format!(
                "Error: graftd is not running (no control socket at {}); \
                 start it with: graftd &  (or: systemctl start graftd)",
                missing.display()
            )
        );
    }
    // A daemon that died without removing its socket: the file is there but
    // nothing listens.
    let g = Graftd::start();
    ok(
        &g,
        Some(&c),
        &words("graft add x type ipv4 addr 127.0.0.1 port 1"),
    );
    // SIGKILL, and leave the zombie for the guard to reap (so its pid cannot be
    // reused before the guard signals it).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(g.proc.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill graftd");
    let stat = format!("/proc/{}/stat", g.proc.pid());
    graft_tests::wait_until("graftd to die", Duration::from_secs(10), || {
        std::fs::read_to_string(&stat)
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    });
    assert!(g.control.exists(), "SIGKILL leaves the socket file behind");
    let e = fails(
        &ip(Some(&g), None, Some(&c), &["graft", "show"]),
        1,
        "dead graftd",
    );
    assert_eq!(
        e,
        format!(
            "Error: graftd is not running (nothing listens on {}); \
             start it with: graftd &  (or: systemctl start graftd)",
            g.control.display()
        )
    );
}

#[test]
fn help_and_passthrough_to_system_ip() {
    if !root_or_skip("help_and_passthrough_to_system_ip") {
        return;
    }
    let c = Netns::new("pass");
    let nowhere = Path::new("/nonexistent-graft/graftd.sock");
    // help needs no daemon.
    let out = ip(None, Some(nowhere), Some(&c), &["graft", "help"]);
    assert!(out.status.success() && out.stderr.is_empty());
    let h = text(&out.stdout);
    assert!(
        h.contains("ip graft add NAME type { ipv4 | ipv6 } addr ADDR port { PORT | dynamic }"),
        "{h}"
    );
    assert!(h.contains("ip graft add NAME type unix path PATH"), "{h}");
    assert!(h.contains("Exit status"), "{h}");

    // Anything else is iproute2's: same output as the system ip gives.
    let sys_ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("iproute2 installed");
    let out = ip(None, Some(nowhere), None, &["-V"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), text(&run(sys_ip, ["-V"]).stdout));
    assert!(text(&out.stdout).contains("iproute2"));
    // Inside a namespace, through `ip netns exec NS ip …`, options first.
    let out = ip(
        None,
        Some(nowhere),
        Some(&c),
        &["-br", "link", "show", "lo"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("lo "),
        "{}",
        text(&out.stdout)
    );
    let out = ip(None, Some(nowhere), Some(&c), &["link", "show"]);
    let links = text(&out.stdout);
    assert!(out.status.success() && links.contains("lo:"), "{links}");
    assert_eq!(
        links.lines().filter(|l| !l.starts_with(' ')).count(),
        1,
        "only lo: {links}"
    );
    // The system ip's own errors and exit status come through untouched.
    let out = ip(
        None,
        Some(nowhere),
        Some(&c),
        &["link", "show", "dev", "gt-nonexistent0"],
    );
    let sys = run(
        "ip",
        [
            "netns",
            "exec",
            &c.name,
            sys_ip,
            "link",
            "show",
            "dev",
            "gt-nonexistent0",
        ],
    );
    assert_eq!(out.status.code(), sys.status.code());
    assert_eq!(text(&out.stderr), text(&sys.stderr));
    // `-n NETNS` takes an argument: the word after it is not the object.
    let out = ip(
        None,
        Some(nowhere),
        None,
        &["-n", &c.name, "-br", "link", "show", "lo"],
    );
    assert!(
        out.status.success() && text(&out.stdout).starts_with("lo "),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn policy_clauses_and_details() {
    let Some((g, [c])) = graftd_and_netns("policy_clauses_and_details", ["pol"]) else {
        return;
    };
    ok(
        &g,
        Some(&c),
        &words("graft add ep-pol type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:443 deny 10.1.0.0/16 allow 192.168.0.0/16:1000-2000"),
    );
    assert_eq!(
        ok(&g, Some(&c), &["graft", "show"]),
        "ep-pol type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:443 deny 10.1.0.0/16 \
         allow 192.168.0.0/16:1000-2000\n"
    );
    let e = json(&ok(&g, Some(&c), &["-j", "graft", "show"]));
    assert_eq!(
        e[0]["policy"],
        serde_json::json!([
            {"action": "allow", "prefix": "10.0.0.0/8", "ports": [443, 443]},
            {"action": "deny", "prefix": "10.1.0.0/16"},
            {"action": "allow", "prefix": "192.168.0.0/16", "ports": [1000, 2000]},
        ])
    );
    // -d names the namespace sockets are made in (here graftd's, the host's).
    let (dev, ino) = ns_id("/proc/self/ns/net");
    assert_eq!(
        ok(&g, Some(&c), &["-d", "graft", "show"]),
        format!(
            "ep-pol type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:443 deny 10.1.0.0/16 \
             allow 192.168.0.0/16:1000-2000\n    target net:[{ino}] dev {dev}\n"
        )
    );
}

#[test]
fn non_root_is_told_to_run_as_root() {
    if !root_or_skip("non_root_is_told_to_run_as_root")
        || !graft_tests::have_or_skip("non_root_is_told_to_run_as_root", "setpriv")
    {
        return;
    }
    let g = Graftd::start();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "ip",
        "graft",
        "show",
    ])
    .stdin(Stdio::null());
    g.apply(&mut cmd);
    let out = cmd.output().expect("run setpriv");
    let e = fails(&out, 1, "non-root");
    assert_eq!(
        e,
        format!(
            "Error: cannot connect to graftd at {}: Permission denied (ip graft must run as root)",
            g.control.display()
        )
    );
}
