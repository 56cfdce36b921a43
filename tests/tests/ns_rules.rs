//! A namespace's own rules kept by graftd: `ip graft rules set|show|flush`,
//! and `graft -- CMD` without `-i/-e/-x` running with them (fetched from the
//! broker). The observable: where a python3 socket bound to 0.0.0.0:5000
//! really is (getsockname reports the host address of a grafted socket).

use std::time::Duration;

use graft_tests::*;

const LIMIT: Duration = Duration::from_secs(20);
const PROBE: &str =
    "import socket; s = socket.socket(); s.bind(('0.0.0.0', 5000)); print(s.getsockname())";

fn ip_graft_fails(env: &Env, args: &[&str]) -> (i32, String) {
    let o = env.d.ip_graft(Some(&env.ns), args);
    (o.status.code().unwrap_or(-1), text(&o.stderr))
}

/// Without flags and with nothing to graft, the probe binds in the
/// namespace and graft stays silent; under -v its first line is `why`.
fn nothing_grafted(env: &Env, what: &str, why: &str) {
    let (out, err) = output_ok_within(env.graft(&["--", "python3", "-c", PROBE]), what, LIMIT);
    assert_eq!(out.trim(), "('0.0.0.0', 5000)", "{what}");
    assert_eq!(graft_lines(&err), Vec::<String>::new(), "{what}");
    let (_, err) = output_ok_within(env.graft(&["-v", "--", "true"]), what, LIMIT);
    assert_eq!(graft_lines(&err)[0], why, "{what}");
}

#[test]
fn rules_set_show_flush_and_the_launcher_takes_them() {
    let Some(env) = Env::new("ns_rules", &["python3"]) else {
        return;
    };
    let port = free_port();
    // No endpoint, so no broker here yet: as before rules existed, with a
    // line under -v.
    nothing_grafted(
        &env,
        "no broker",
        &format!(
            "graft: no -i/-e/-x given and graftd's broker \"{}\" does not answer in this network namespace: nothing will be grafted",
            env.d.broker
        ),
    );
    let (code, err) = ip_graft_fails(&env, &["rules", "set", "ingress", "0.0.0.0:5000=ep-in4"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "Error: graftd: this network namespace has no endpoints: add them before its rules"
    );

    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {port}"));
    assert_eq!(env.ip_graft("rules"), "");
    env.ip_graft("rules set in :::5000=ep-in4 ingress 0.0.0.0:5000-5001=ep-in4 exclude 10.0.0.0/8");
    assert_eq!(
        env.ip_graft("rules show"),
        "ingress [::]:5000=ep-in4\ningress 0.0.0.0:5000-5001=ep-in4\nexclude 10.0.0.0/8\n"
    );
    assert_eq!(
        env.ip_graft("-j rules"),
        "{\"ingress\":[\"[::]:5000=ep-in4\",\"0.0.0.0:5000-5001=ep-in4\"],\"egress\":[],\"exclude\":[\"10.0.0.0/8\"]}\n"
    );
    let (code, err) = ip_graft_fails(&env, &["rules", "set", "egress", "10.0.0.0/8"]);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        "Error: egress rule \"10.0.0.0/8\": expected PREFIX/LEN=ENDPOINT"
    );

    // No flags: the namespace's rules; the socket is the host's.
    let (out, _) = output_ok_within(env.graft(&["--", "python3", "-c", PROBE]), "probe", LIMIT);
    assert_eq!(out.trim(), format!("('127.0.0.1', {port})"));
    // A flag wins: this one maps another port, so 5000 stays in the namespace.
    let (out, _) = output_ok_within(
        env.graft(&["-i", "0.0.0.0:6000=ep-in4", "--", "python3", "-c", PROBE]),
        "probe with a flag",
        LIMIT,
    );
    assert_eq!(out.trim(), "('0.0.0.0', 5000)");

    env.ip_graft("rules flush");
    assert_eq!(env.ip_graft("rules"), "");
    nothing_grafted(
        &env,
        "no rules",
        "graft: no -i/-e/-x given and graftd keeps no rules for this network namespace \
         (ip graft rules set ...): nothing will be grafted",
    );

    // The rules go with the namespace's last endpoint.
    env.ip_graft("rules set ingress 0.0.0.0:5000=ep-in4");
    env.ip_graft("del ep-in4");
    env.add(&format!("ep-in4 type ipv4 addr 127.0.0.1 port {port}"));
    assert_eq!(env.ip_graft("rules"), "");
}
