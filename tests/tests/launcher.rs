//! The `graft` launcher as a user meets it: usage errors, bad mappings, the
//! pre-flight check against a real graftd (broker missing, endpoint missing,
//! all present), the environment and `LD_PRELOAD` the program receives,
//! library discovery, the static-binary warning and exec failures.
//!
//! Grafting itself (what the preload library does with the rules) is tested
//! with the library's own end-to-end tests; here the program run under
//! `graft` only reports what it was given.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use graft_tests::*;

fn out(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run graft")
}

/// `graft ARGS` in the test's namespace, with no GRAFT_* or LD_PRELOAD
/// inherited from whoever runs the tests.
fn graft(args: &[&str]) -> Command {
    let mut c = Command::new(bin("graft"));
    c.args(args);
    scrub(&mut c);
    c
}

fn scrub(c: &mut Command) {
    for v in [
        graft_core::ENV_INGRESS,
        graft_core::ENV_EGRESS,
        graft_core::ENV_EGRESS_EXCLUDE,
        graft_core::ENV_VERBOSE,
        graft_core::ENV_GETSOCKNAME,
        graft_core::ENV_BROKER,
        "GRAFT_LIBRARY",
        "LD_PRELOAD",
    ] {
        c.env_remove(v);
    }
}

const USAGE: &str = "usage: graft [-v] [-n|--no-check] [-i ADDR:PORT[-PORT]=EP]... \
[-e PREFIX/LEN=EP]... [-x PREFIX/LEN]... [-g host|app] [--] COMMAND [ARGS...]\n";

#[test]
fn usage_errors_and_bad_mappings_exit_2() {
    let o = out(graft(&[]));
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(text(&o.stderr), format!("graft: no command given\n{USAGE}"));
    let o = out(graft(&["-q", "true"]));
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        format!("graft: unknown option \"-q\"\n{USAGE}")
    );
    for (rule_flag, rule, why) in [
        ("-i", "0.0.0.0:80", "\"0.0.0.0:80\": expected ADDR:PORT[-PORT]=ENDPOINT"),
        (
            "-i",
            "0.0.0.0:99999=ep",
            "\"0.0.0.0:99999=ep\": \"99999\" is not a port (0-65535)",
        ),
        (
            "-e",
            "10.0.0.1/8=ep",
            "\"10.0.0.1/8=ep\": address has bits set beyond the prefix length",
        ),
        (
            "-i",
            "0.0.0.0:80=sixteen-bytes-xx",
            "\"0.0.0.0:80=sixteen-bytes-xx\": endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes",
        ),
    ] {
        // The command must not run: it would create the marker file.
        let marker = std::env::temp_dir().join(unique("graft-ran-"));
        let o = out(graft(&[rule_flag, rule, "touch", marker.to_str().unwrap()]));
        assert_eq!(o.status.code(), Some(2), "{rule}");
        assert_eq!(text(&o.stderr), format!("graft: {why}\n"), "one line for {rule}");
        assert!(!marker.exists(), "the command ran despite a bad mapping");
    }
    let o = out(graft(&["-g", "both", "true"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("graft: \"both\" is not a getsockname policy"));
    let o = out(graft(&["-h"]));
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), USAGE.to_owned())
    );
}

#[test]
fn check_fails_closed_and_names_the_fix() {
    if !root_or_skip("launcher check") {
        return;
    }
    let graftd = Graftd::start();
    let ns = Netns::new("launch");
    let run_in_ns = |args: &[&str]| -> Output {
        let mut c = ns.cmd(bin("graft"));
        c.args(args);
        scrub(&mut c);
        graftd.apply(&mut c);
        out(c)
    };
    let marker = std::env::temp_dir().join(unique("graft-ran-"));
    let m = marker.to_str().unwrap();

    // No endpoint in the namespace: graftd has no broker there.
    let o = run_in_ns(&["-i", "0.0.0.0:0-65535=ep-in4", "--", "touch", m]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "graft: graftd's broker \"{}\" does not answer in this network namespace",
            graftd.broker
        )),
        "{err}"
    );
    assert!(
        err.contains("ip graft add ep-in4 type ipv4 addr ADDR port PORT|dynamic"),
        "{err}"
    );
    assert!(err.contains("--no-check"), "{err}");
    assert!(
        !marker.exists(),
        "the command ran although the check failed"
    );

    // --no-check runs it anyway (the library then fails each grafted call).
    let o = run_in_ns(&["-n", "-i", "0.0.0.0:0-65535=ep-in4", "--", "touch", m]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();

    // One endpoint there, one missing: the missing one is named, with its type.
    graftd.ip_graft_ok(
        Some(&ns),
        &words("add ep-in4 type ipv4 addr 127.0.0.1 port dynamic"),
    );
    let both = ["-i", "0.0.0.0:0-65535=ep-in4", "-i", ":::0-65535=ep-in6"];
    let o = run_in_ns(&[&both[..], &["--", "touch", m]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr),
        "graft: endpoint \"ep-in6\" does not exist in this network namespace: add it from \
         inside this namespace with `ip graft add ep-in6 type ipv6 addr ADDR port PORT|dynamic` \
         (`ip graft show` lists the existing ones)\n"
    );
    assert!(!marker.exists());

    // The same endpoint name in the test's own namespace does not count:
    // endpoints are per namespace.
    graftd.ip_graft_ok(None, &words("add ep-in6 type ipv6 addr ::1 port dynamic"));
    let o = run_in_ns(&["-i", ":::80=ep-in6", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("endpoint \"ep-in6\" does not exist"));

    // Everything present: the command runs, -v reports the endpoints.
    graftd.ip_graft_ok(
        Some(&ns),
        &words("add ep-in6 type ipv6 addr ::1 port dynamic"),
    );
    let o = run_in_ns(&[&["-v"], &both[..], &["--", "touch", m]].concat());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("graft: endpoint ep-in4: 127.0.0.1:0\n"),
        "{err}"
    );
    assert!(err.contains("graft: endpoint ep-in6: [::1]:0\n"), "{err}");
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();
}

#[test]
fn environment_and_ld_preload_reach_the_program() {
    let lib = std::fs::canonicalize(preload_lib()).expect("library path");
    let mut c = graft(&[
        "-n",
        "-i",
        "0.0.0.0:0-65535=ep-in4",
        "-i",
        ":::80=ep-in6",
        "-e",
        "0.0.0.0/0=ep-out4",
        "-x",
        "127.0.0.0/8",
        "-g",
        "app",
        "--",
        "sh",
        "-c",
        "printf '%s|' \"$GRAFT_INGRESS_CONVERT\" \"$GRAFT_EGRESS_CONVERT\" \
         \"$GRAFT_EGRESS_EXCLUDE\" \"$GRAFT_GETSOCKNAME\" \"${GRAFT_VERBOSE-unset}\" \"$LD_PRELOAD\"",
    ]);
    // Rules already in the environment are kept, after the command line's;
    // existing preloads are kept, after the library.
    c.env(graft_core::ENV_EGRESS, "::/0=ep-out6")
        .env("LD_PRELOAD", "/nonexistent/a.so /nonexistent/b.so");
    let o = out(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout),
        format!(
            "0.0.0.0:0-65535=ep-in4 [::]:80=ep-in6|0.0.0.0/0=ep-out4 ::/0=ep-out6|127.0.0.0/8|app|unset|{}:/nonexistent/a.so:/nonexistent/b.so|",
            lib.display()
        )
    );
    // An inherited variable is validated like a flag.
    let mut c = graft(&["-n", "true"]);
    c.env(graft_core::ENV_INGRESS, "0.0.0.0:80");
    let o = out(c);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        text(&o.stderr),
        "graft: GRAFT_INGRESS_CONVERT (from the environment): \"0.0.0.0:80\": expected ADDR:PORT[-PORT]=ENDPOINT\n"
    );
    // -v sets GRAFT_VERBOSE=1.
    let o = out(graft(&[
        "-n",
        "-v",
        "sh",
        "-c",
        "printf %s \"$GRAFT_VERBOSE\"",
    ]));
    assert_eq!(text(&o.stdout), "1");
}

/// A directory holding a copy of `graft` and, optionally, the library laid
/// out as `make install` does (`bin/graft`, `lib/graft/libgraft-convert.so`).
fn install_tree(with_lib: bool) -> PathBuf {
    let d = std::env::temp_dir().join(unique("graft-install-"));
    std::fs::create_dir_all(d.join("bin")).unwrap();
    std::fs::copy(bin("graft"), d.join("bin/graft")).unwrap();
    if with_lib {
        std::fs::create_dir_all(d.join("lib/graft")).unwrap();
        std::fs::copy(preload_lib(), d.join("lib/graft/libgraft-convert.so")).unwrap();
    }
    d
}

#[test]
fn library_is_found_where_it_is_installed() {
    let bare = install_tree(false);
    let mut c = Command::new(bare.join("bin/graft"));
    c.args(["-n", "true"]);
    scrub(&mut c);
    let o = out(c);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("graft: cannot find the preload library: looked for ")
            && err.contains("lib/graft/libgraft-convert.so")
            && err.ends_with("(set GRAFT_LIBRARY to its path)\n"),
        "{err}"
    );
    // GRAFT_LIBRARY points elsewhere: used as given.
    let mut c = Command::new(bare.join("bin/graft"));
    c.args(["-n", "sh", "-c", "printf %s \"$LD_PRELOAD\""]);
    scrub(&mut c);
    c.env("GRAFT_LIBRARY", preload_lib());
    let o = out(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        Path::new(&text(&o.stdout)),
        std::fs::canonicalize(preload_lib()).unwrap()
    );
    std::fs::remove_dir_all(&bare).unwrap();

    let tree = install_tree(true);
    let mut c = Command::new(tree.join("bin/graft"));
    c.args(["-n", "sh", "-c", "printf %s \"$LD_PRELOAD\""]);
    scrub(&mut c);
    let o = out(c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        Path::new(&text(&o.stdout)),
        std::fs::canonicalize(&tree)
            .unwrap()
            .join("lib/graft/libgraft-convert.so")
    );
    std::fs::remove_dir_all(&tree).unwrap();
}

#[test]
fn static_programs_are_warned_about_and_exec_failures_reported() {
    // Debian's ldconfig is a static-pie binary.
    let ldconfig = ["/usr/sbin/ldconfig", "/sbin/ldconfig"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    if let Some(ldconfig) = ldconfig {
        let o = out(graft(&["-n", ldconfig.to_str().unwrap(), "--version"]));
        assert!(o.status.success(), "still runs it: {}", text(&o.stderr));
        assert!(!o.stdout.is_empty());
        assert_eq!(
            text(&o.stderr),
            format!(
                "graft: warning: {} is statically linked: LD_PRELOAD cannot work there, \
                 its sockets will not be grafted\n",
                ldconfig.display()
            )
        );
    } else {
        println!("SKIP: static warning: no ldconfig binary to try it on");
    }
    // A dynamic program gets no warning.
    let o = out(graft(&["-n", "true"]));
    assert!(o.status.success());
    assert_eq!(text(&o.stderr), "");

    let o = out(graft(&["-n", "/nonexistent/prog", "x"]));
    assert_eq!(o.status.code(), Some(127));
    assert_eq!(
        text(&o.stderr),
        "graft: cannot run /nonexistent/prog: No such file or directory\n"
    );
    let o = out(graft(&["-n", "no-such-program-here"]));
    assert_eq!(o.status.code(), Some(127));
    let plain = std::env::temp_dir().join(unique("graft-noexec-"));
    std::fs::write(&plain, b"not a program").unwrap();
    let o = out(graft(&["-n", plain.to_str().unwrap()]));
    std::fs::remove_file(&plain).unwrap();
    assert_eq!(o.status.code(), Some(126));
    assert!(text(&o.stderr).ends_with(": Permission denied\n"));
}
