//! docker-ns-exec's command line: bad input is exit 2 with one stderr line,
//! `--` may precede the container, options after the container belong to the
//! command.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_docker-ns-exec"))
        .args(args)
        .output()
        .expect("run docker-ns-exec")
}

/// Exit status and the single stderr line; panics if there is not exactly one.
fn one_line(o: &Output) -> (Option<i32>, String) {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(err.lines().count(), 1, "one stderr line expected: {err:?}");
    (o.status.code(), err.trim_end().to_owned())
}

#[test]
fn bad_input_is_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "docker-ns-exec: the following required arguments were not provided: <CONTAINER> <COMMAND>... (--help shows the usage)"),
        (&["net1"], "docker-ns-exec: the following required arguments were not provided: <COMMAND>... (--help shows the usage)"),
        (&["-x", "net1", "ip"], "docker-ns-exec: unexpected argument '-x' found (--help shows the usage)"),
        (&["--bogus"], "docker-ns-exec: unexpected argument '--bogus' found (--help shows the usage)"),
        (&["--"], "docker-ns-exec: the following required arguments were not provided: <CONTAINER> <COMMAND>... (--help shows the usage)"),
    ];
    for (args, want) in cases {
        assert_eq!(
            one_line(&run(args)),
            (Some(2), (*want).to_owned()),
            "{args:?}"
        );
    }
}

#[test]
fn help_and_version_go_to_stdout() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Usage: docker-ns-exec <CONTAINER> <COMMAND>..."),
        "{out}"
    );
    let o = run(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("docker-ns-exec "));
}

/// Past the command line, a container that does not exist is exit 1 with one
/// line (whether Docker says so or is not there at all): `--` before the
/// container and options after it are accepted, not usage errors.
#[test]
fn separator_and_command_options_reach_the_container_lookup() {
    let name = format!("graft-no-such-container-{}", std::process::id());
    for args in [
        vec!["--", name.as_str(), "true"],
        vec![name.as_str(), "ip", "-n", "x", "--help"],
    ] {
        let (code, line) = one_line(&run(&args));
        assert_eq!(code, Some(1), "{args:?}: {line}");
        assert!(line.starts_with("docker-ns-exec: "), "{line}");
        assert!(!line.contains("--help shows the usage"), "{line}");
    }
}
