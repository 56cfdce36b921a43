//! graft-cni driven exactly as a container runtime drives a CNI plugin:
//! `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH` in
//! the environment, the network configuration on stdin, the result or error
//! JSON read from stdout. Alone; chained after Debian's reference plugins
//! (loopback, bridge + host-local) to show prevResult passing through; the
//! portMappings path end to end (a python3 http.server started with
//! `graft -- CMD` and no flags, reached on the host port); DEL twice; CHECK;
//! STATUS with graftd stopped; GC; VERSION; bad configs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use graft_tests::*;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(20);
const REF_PLUGINS: &str = "/usr/lib/cni";

struct Call<'a> {
    cmd: &'a str,
    container: &'a str,
    netns: Option<&'a Path>,
    ifname: &'a str,
}

impl<'a> Call<'a> {
    /// A command for the attachment (`container`, `ifname`) in `netns`.
    fn in_ns(cmd: &'a str, container: &'a str, netns: &'a Path, ifname: &'a str) -> Self {
        Call {
            cmd,
            container,
            netns: Some(netns),
            ifname,
        }
    }
}

/// Runs `plugin` (a path) for one CNI command with `conf` on stdin.
fn cni_run(plugin: &Path, c: &Call, conf: &Value) -> Output {
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", c.cmd)
        .env("CNI_CONTAINERID", c.container)
        .env("CNI_IFNAME", c.ifname)
        .env("CNI_PATH", REF_PLUGINS);
    if let Some(ns) = c.netns {
        cmd.env("CNI_NETNS", ns);
    }
    let input = serde_json::to_vec(conf).expect("config JSON");
    output_within(
        cmd,
        &format!("{} {}", plugin.display(), c.cmd),
        LIMIT,
        Some(Box::new(move |mut stdin| {
            use std::io::Write;
            let _ = stdin.write_all(&input);
        })),
    )
}

fn graft_cni(c: &Call, conf: &Value) -> Output {
    cni_run(&bin("graft-cni"), c, conf)
}

/// Success with JSON output.
fn ok_json(o: &Output, what: &str) -> Value {
    graft_tests::assert_success(o, what);
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {}", text(&o.stdout)))
}

/// Success with nothing on stdout.
fn ok_empty(o: &Output, what: &str) {
    graft_tests::assert_success(o, what);
    assert_eq!(text(&o.stdout).trim(), "", "{what} prints nothing");
}

/// A CNI error: exit 1 and the error JSON; returns (code, msg).
fn cni_err(o: &Output, what: &str) -> (u64, String) {
    assert_eq!(o.status.code(), Some(1), "{what}: {}", text(&o.stdout));
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{what}: error is not JSON ({e}): {}", text(&o.stdout)));
    assert!(v["cniVersion"].is_string(), "{what}: {v}");
    (
        v["code"].as_u64().expect("code"),
        v["msg"].as_str().expect("msg").to_owned(),
    )
}

/// How a CNI error message must read.
enum Msg<'a> {
    Is(&'a str),
    Starts(&'a str),
    Has(&'a str),
}

/// graft-cni failed with CNI error `code` and a message as `msg` says.
fn fails(o: &Output, what: &str, code: u64, msg: Msg<'_>) {
    let (got, text) = cni_err(o, what);
    assert_eq!(got, code, "{what}: {text}");
    match msg {
        Msg::Is(m) => assert_eq!(text, m, "{what}"),
        Msg::Starts(m) => assert!(text.starts_with(m), "{what}: {text}"),
        Msg::Has(m) => assert!(text.contains(m), "{what}: {text}"),
    }
}

fn base(version: &str, d: &Graftd, data: &Path) -> Value {
    json!({
        "cniVersion": version,
        "name": unique("gnet"),
        "type": "graft-cni",
        "controlSocket": d.control,
        "dataDir": data,
    })
}

fn records(data: &Path, conf: &Value) -> Vec<PathBuf> {
    let dir = data.join(conf["name"].as_str().expect("name"));
    std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default()
}

#[test]
fn port_mapping_end_to_end_alone_with_check_and_del_twice() {
    let Some(env) = Env::new("cni_port_mapping", &["python3"]) else {
        return;
    };
    let port = free_port();
    let mut conf = base("1.0.0", &env.d, &env.dir);
    conf["endpoints"] =
        json!([{"name": "ep-out4", "type": "ipv4", "addr": "127.0.0.1", "port": "dynamic"}]);
    conf["egress"] = json!(["127.0.0.0/8=ep-out4"]);
    conf["runtimeConfig"] = json!({"portMappings": [
        {"hostPort": port, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}
    ]});
    let path = env.ns.path();
    let call = |cmd| Call::in_ns(cmd, "c0ffee01", &path, "eth0");

    let r = ok_json(&graft_cni(&call("ADD"), &conf), "ADD");
    assert_eq!(
        r,
        json!({"cniVersion": "1.0.0", "dns": {}}),
        "alone: minimal result"
    );
    let show = env.ip_graft("show");
    assert!(
        show.contains(&format!("pm-{port} type ipv4 addr 127.0.0.1 port {port}")),
        "{show}"
    );
    assert!(
        show.contains("ep-out4 type ipv4 addr 127.0.0.1 port dynamic"),
        "{show}"
    );
    assert_eq!(records(&env.dir, &conf).len(), 1);
    ok_empty(&graft_cni(&call("CHECK"), &conf), "CHECK");

    // Flags win: with one of them, nothing is fetched.
    let (_, err) = output_ok_within(
        env.graft(&["-v", "-e", "127.0.0.0/8=ep-out4", "--", "true"]),
        "graft with a flag",
        LIMIT,
    );
    assert!(!err.contains("rules from graftd"), "{err}");
    assert!(
        err.contains("GRAFT_EGRESS_CONVERT=127.0.0.0/8=ep-out4"),
        "{err}"
    );
    assert!(!err.contains("GRAFT_INGRESS_CONVERT"), "{err}");

    // The mapped container port is grafted on both families: an IPv6
    // wildcard bind lands on the IPv4 host endpoint as a v4-mapped address.
    let (out, _) = output_ok_within(
        env.graft(&[
            "--",
            "python3",
            "-c",
            "import socket; s = socket.socket(socket.AF_INET6); s.bind(('::', 80)); print(s.getsockname()[:2])",
        ]),
        "IPv6 bind",
        LIMIT,
    );
    assert_eq!(out.trim(), format!("('::ffff:127.0.0.1', {port})"));

    // The pod's command only has the launcher in front: no -i/-e/-x.
    let token = unique("served-by-graft-");
    std::fs::write(env.dir.join("index.txt"), &token).expect("write page");
    let mut server = env.graft(&[
        "-v",
        "--",
        "python3",
        "-m",
        "http.server",
        "80",
        "--bind",
        "0.0.0.0",
    ]);
    let log = env.dir.join("server.log");
    server
        .current_dir(&env.dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("server log"));
    let server = Proc::spawn(server, "graft -- python3 -m http.server");
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("the launcher's rules line", LIMIT, || {
        stderr().contains("rules from graftd")
    });
    assert!(
        stderr().contains(&format!(
            "graft: rules from graftd: ingress [0.0.0.0:80=pm-{port} [::]:80=pm-{port}]"
        )),
        "{}",
        stderr()
    );
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_tcp(addr, LIMIT);
    let reply = text(&tcp_exchange(
        addr,
        b"GET /index.txt HTTP/1.0\r\nHost: x\r\n\r\n",
        LIMIT,
    ));
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
    assert!(reply.ends_with(&token), "{reply}");
    drop(server);

    ok_empty(&graft_cni(&call("DEL"), &conf), "DEL");
    assert_eq!(env.ip_graft("show").trim(), "", "DEL removed the endpoints");
    assert!(
        records(&env.dir, &conf).is_empty(),
        "DEL removed the record"
    );
    ok_empty(&graft_cni(&call("DEL"), &conf), "second DEL");
    let (code, msg) = cni_err(&graft_cni(&call("CHECK"), &conf), "CHECK after DEL");
    assert_eq!(code, 101);
    assert_eq!(msg, "no attachment c0ffee01/eth0: ADD was not run");
}

/// Runs a reference plugin; SKIP when Debian's containernetworking-plugins
/// are not installed.
fn have_ref_plugins(test: &str) -> bool {
    let ok = ["loopback", "bridge", "host-local"]
        .iter()
        .all(|p| Path::new(REF_PLUGINS).join(p).exists());
    if !ok {
        println!("SKIP: {test}: containernetworking-plugins not installed in {REF_PLUGINS}");
    }
    ok
}

/// Deletes the test's bridge even when the test fails.
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        let _ = run("ip", ["link", "del", &self.0]);
    }
}

#[test]
fn chained_after_loopback_and_bridge_prev_result_passes_through() {
    let Some(env) = Env::new("cni_chained", &[]) else {
        return;
    };
    if !have_ref_plugins("cni_chained") {
        return;
    }
    let name = unique("gchain");
    let bridge = format!("gtbr{}", std::process::id() % 100_000);
    let _guard = LinkGuard(bridge.clone());
    let ipam_dir = env.dir.join("host-local");
    let path = env.ns.path();
    let call = |cmd, ifname| Call::in_ns(cmd, "chained01", &path, ifname);
    let lo_conf = json!({"cniVersion": "1.0.0", "name": name, "type": "loopback"});
    let br_conf = json!({
        "cniVersion": "1.0.0", "name": name, "type": "bridge",
        "bridge": bridge, "isGateway": false, "ipMasq": false,
        "ipam": {"type": "host-local", "dataDir": ipam_dir,
                 "ranges": [[{"subnet": "198.51.100.0/24"}]]}
    });
    let plugin = |t: &str| Path::new(REF_PLUGINS).join(t);
    ok_json(
        &cni_run(&plugin("loopback"), &call("ADD", "lo"), &lo_conf),
        "loopback ADD",
    );
    let prev = ok_json(
        &cni_run(&plugin("bridge"), &call("ADD", "eth0"), &br_conf),
        "bridge ADD",
    );
    assert!(
        prev["ips"][0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("198.51.100.")),
        "{prev}"
    );

    let mut conf = base("1.0.0", &env.d, &env.dir);
    conf["name"] = json!(name);
    conf["endpoints"] =
        json!([{"name": "ep-out4", "type": "ipv4", "addr": "127.0.0.1", "port": "dynamic"}]);
    conf["egress"] = json!(["127.0.0.0/8=ep-out4"]);
    conf["prevResult"] = prev.clone();
    let r = ok_json(&graft_cni(&call("ADD", "eth0"), &conf), "graft-cni ADD");
    assert_eq!(r, prev, "prevResult passes through unchanged");
    ok_empty(&graft_cni(&call("CHECK", "eth0"), &conf), "graft-cni CHECK");
    assert!(env.ip_graft("show").contains("ep-out4"));

    ok_empty(&graft_cni(&call("DEL", "eth0"), &conf), "graft-cni DEL");
    let mut br_del = br_conf.clone();
    br_del["prevResult"] = prev;
    ok_empty(
        &cni_run(&plugin("bridge"), &call("DEL", "eth0"), &br_del),
        "bridge DEL",
    );
    ok_empty(
        &cni_run(&plugin("loopback"), &call("DEL", "lo"), &lo_conf),
        "loopback DEL",
    );
    assert_eq!(env.ip_graft("show").trim(), "");
}

#[test]
fn status_gc_version_and_errors() {
    if !root_or_skip("cni_status_gc") {
        return;
    }
    let mut d = Graftd::start();
    let data = std::env::temp_dir().join(unique("graft-cni-data-"));
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(data.clone());
    let (ns1, ns2) = (Netns::new("cni1"), Netns::new("cni2"));
    let (p1, p2) = (ns1.path(), ns2.path());
    fn call<'a>(cmd: &'a str, container: &'a str, netns: Option<&'a Path>) -> Call<'a> {
        Call {
            cmd,
            container,
            netns,
            ifname: "eth0",
        }
    }
    let mut conf = base("1.1.0", &d, &data);
    conf["endpoints"] =
        json!([{"name": "ep-out4", "type": "ipv4", "addr": "127.0.0.1", "port": "dynamic"}]);

    let v = ok_json(&graft_cni(&call("VERSION", "x", None), &conf), "VERSION");
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));

    ok_empty(&graft_cni(&call("STATUS", "x", None), &conf), "STATUS");

    // GC: two attachments, one of them valid.
    let run = |cmd, id, netns| graft_cni(&call(cmd, id, netns), &conf);
    ok_json(&run("ADD", "keep1", Some(&p1)), "ADD keep1");
    ok_json(&run("ADD", "gone2", Some(&p2)), "ADD gone2");
    assert!(d.ip_graft_ok(Some(&ns2), &["show"]).contains("ep-out4"));
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep1", "ifname": "eth0"}]);
    ok_empty(&graft_cni(&call("GC", "x", None), &gc), "GC");
    assert_eq!(
        d.ip_graft_ok(Some(&ns2), &["show"]).trim(),
        "",
        "GC removed gone2"
    );
    assert!(
        d.ip_graft_ok(Some(&ns1), &["show"]).contains("ep-out4"),
        "GC kept keep1"
    );
    let left: Vec<String> = records(&data, &conf)
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["keep1-eth0.json"]);

    // Bad input: every error is CNI error JSON with its code.
    let no_name = json!({"cniVersion": "1.0.0"});
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    let mut lim = conf.clone();
    lim["endpoints"][0]["limit"] = json!(10);
    let mut bad_rule = conf.clone();
    bad_rule["ingress"] = json!(["0.0.0.0=ep-out4"]);
    let in1 = Some(p1.as_path());
    let bad: [(&str, &Value, Option<&Path>, u64, Msg); 5] = [
        ("no name", &no_name, in1, 4, Msg::Starts("invalid network configuration: missing field `name`")),
        ("old version", &old, in1, 1, Msg::Is("CNI version \"0.3.1\" is not supported (graft-cni speaks 0.4.0, 1.0.0, 1.1.0)")),
        ("no netns", &conf, None, 7, Msg::Is("CNI_NETNS is required for ADD")),
        ("limit", &lim, in1, 4, Msg::Has("\"limit\" is not supported")),
        ("bad rule", &bad_rule, in1, 4, Msg::Is("invalid rules: ingress rule \"0.0.0.0=ep-out4\": expected ADDR:PORT[-PORT]=ENDPOINT")),
    ];
    for (what, c, netns, code, msg) in bad {
        fails(&graft_cni(&call("ADD", "b", netns), c), what, code, msg);
    }
    // The endpoint exists already: graftd's refusal, nothing left behind.
    let refused = Msg::Starts("adding endpoint ep-out4: graftd: ");
    fails(&run("ADD", "dup1", in1), "duplicate", 100, refused);
    assert_eq!(records(&data, &conf).len(), 1);

    // graftd stopped: STATUS says 50, ADD says try again later, DEL succeeds.
    d.proc.term();
    let _ = d.proc.wait_timeout(LIMIT);
    let stopped = Msg::Starts("graftd does not answer: graftd is not running");
    fails(&run("STATUS", "x", None), "STATUS stopped", 50, stopped);
    let (code, _) = cni_err(&run("ADD", "late", Some(&p2)), "ADD stopped");
    assert_eq!(code, 11);
    ok_empty(&run("DEL", "keep1", in1), "DEL, graftd gone");
    ok_empty(&run("DEL", "keep1", in1), "DEL again");
    assert!(records(&data, &conf).is_empty());
    // And with the namespace gone too.
    drop(ns2);
    ok_empty(
        &graft_cni(&call("DEL", "gone2", Some(&p2)), &conf),
        "DEL, netns gone",
    );
}

/// deploy/kubernetes/*.yaml as JSON values (python3-yaml parses them).
fn manifests(test: &str) -> Option<Vec<(String, Vec<Value>)>> {
    if !have_or_skip(test, "python3") {
        return None;
    }
    let probe = run("python3", ["-c", "import yaml"]);
    if !probe.status.success() {
        println!("SKIP: {test}: python3-yaml is not installed (make deps installs it)");
        return None;
    }
    let dir = workspace_root().join("deploy/kubernetes");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let o = run(
                "python3",
                [
                    "-c".as_ref(),
                    "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"
                        .as_ref(),
                    p.as_os_str(),
                ],
            );
            assert!(
                o.status.success(),
                "{} does not parse: {}",
                p.display(),
                text(&o.stderr)
            );
            let docs: Vec<Value> = serde_json::from_slice(&o.stdout).expect("JSON");
            out.push((
                p.file_name().expect("name").to_string_lossy().into_owned(),
                docs,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Some(out)
}

fn host_paths(spec: &Value) -> Vec<String> {
    spec["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn kubernetes_manifests_parse_and_hold_the_key_fields() {
    let Some(all) = manifests("cni_manifests") else {
        return;
    };
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["example-pod.yaml", "graftd-daemonset.yaml"]);

    let ds = &all[1].1[0];
    assert_eq!(ds["kind"], "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["hostNetwork"], true);
    let paths = host_paths(spec);
    for want in [
        "/run/graft",
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/graft/bin",
    ] {
        assert!(
            paths.iter().any(|p| p == want),
            "{want} not mounted: {paths:?}"
        );
    }
    assert_eq!(
        spec["initContainers"][0]["command"],
        json!(["/usr/local/bin/install.sh"])
    );
    let graftd = &spec["containers"][0];
    assert_eq!(graftd["command"][0], "graftd");
    let caps = graftd["securityContext"]["capabilities"]["add"].to_string();
    for c in ["SYS_ADMIN", "NET_ADMIN", "BPF"] {
        assert!(caps.contains(c), "{c} missing: {caps}");
    }
    for m in ["/run/graft", "/sys/fs/bpf", "/sys/fs/cgroup"] {
        assert!(
            graftd["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .any(|v| v["mountPath"] == m),
            "graftd does not mount {m}"
        );
    }

    let pod = &all[0].1[0];
    assert_eq!(pod["kind"], "Pod");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["command"][0], "/graft/graft");
    assert_eq!(c["command"][1], "--");
    assert!(c["ports"][0]["hostPort"].is_u64());
    assert_eq!(c["volumeMounts"][0]["mountPath"], "/graft");
    assert_eq!(host_paths(&pod["spec"]), ["/var/lib/graft/bin"]);
}

#[test]
fn conflist_mode_chains_graft_cni_after_the_cluster_plugin() {
    let dir = std::env::temp_dir().join(unique("graft-netd-"));
    std::fs::create_dir_all(&dir).expect("dir");
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());
    let writer = || {
        let mut c = Command::new(bin("graft-cni"));
        c.env_remove("CNI_COMMAND")
            .arg("conflist")
            .arg(&dir)
            .arg("00-graft.conflist");
        c
    };
    let o = output_within(writer(), "graft-cni conflist (empty dir)", LIMIT, None);
    assert_eq!(
        o.status.code(),
        Some(3),
        "no cluster config yet: {}",
        text(&o.stderr)
    );
    assert_eq!(
        text(&o.stderr).trim(),
        format!("graft-cni: no CNI configuration in {} yet", dir.display())
    );
    std::fs::write(
        dir.join("10-cluster.conflist"),
        json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
            {"type": "bridge", "bridge": "cni0"},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]})
        .to_string(),
    )
    .expect("write");
    let mut bad = writer();
    bad.env("GRAFT_CNI_EGRESS", r#"["0.0.0.0/0"]"#);
    let o = output_within(bad, "graft-cni conflist (bad rule)", LIMIT, None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o.stderr).trim(),
        "graft-cni: graft-cni's settings: invalid rules: egress rule \"0.0.0.0/0\": expected PREFIX/LEN=ENDPOINT"
    );
    assert!(
        !dir.join("00-graft.conflist").exists(),
        "nothing written on error"
    );
    let mut cmd = writer();
    cmd.env(
        "GRAFT_CNI_ENDPOINTS",
        r#"[{"name":"ep-out4","type":"ipv4","addr":"0.0.0.0","port":"dynamic"}]"#,
    )
    .env("GRAFT_CNI_EGRESS", r#"["0.0.0.0/0=ep-out4"]"#);
    let (out, _) = output_ok_within(cmd, "graft-cni conflist", LIMIT);
    assert_eq!(
        out.trim(),
        "graft-cni: 00-graft.conflist chains graft-cni after 10-cluster.conflist"
    );
    let conf: Value =
        serde_json::from_slice(&std::fs::read(dir.join("00-graft.conflist")).expect("read"))
            .expect("JSON");
    assert_eq!(conf["name"], "k8s-pod-network");
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["bridge", "graft-cni"]);
    let g = &conf["plugins"][1];
    assert_eq!(g["capabilities"]["portMappings"], true);
    assert_eq!(g["egress"], json!(["0.0.0.0/0=ep-out4"]));
    assert_eq!(g["endpoints"][0]["name"], "ep-out4");
}

#[test]
fn spec_0_4_0_alone_add_check_del() {
    let Some(env) = Env::new("cni_0_4_0", &[]) else {
        return;
    };
    let mut conf = base("0.4.0", &env.d, &env.dir);
    conf["endpoints"] =
        json!([{"name": "ep-in6", "type": "ipv6", "addr": "::1", "port": free_port()}]);
    conf["ingress"] = json!([":::8080=ep-in6"]);
    let path = env.ns.path();
    let call = |cmd| Call::in_ns(cmd, "old-runtime", &path, "eth1");
    let r = ok_json(&graft_cni(&call("ADD"), &conf), "ADD 0.4.0");
    assert_eq!(r, json!({"cniVersion": "0.4.0", "dns": {}}));
    assert_eq!(env.ip_graft("rules"), "ingress [::]:8080=ep-in6\n");
    ok_empty(&graft_cni(&call("CHECK"), &conf), "CHECK 0.4.0");
    // CHECK notices a change behind its back.
    env.ip_graft("rules flush");
    let (code, msg) = cni_err(&graft_cni(&call("CHECK"), &conf), "CHECK after flush");
    assert_eq!(code, 101);
    assert!(msg.starts_with("the namespace's rules are"), "{msg}");
    let (code, msg) = cni_err(&graft_cni(&call("STATUS"), &conf), "STATUS 0.4.0");
    assert_eq!(code, 1);
    assert_eq!(
        msg,
        "STATUS needs cniVersion 1.1.0 (the config says \"0.4.0\")"
    );
    ok_empty(&graft_cni(&call("DEL"), &conf), "DEL 0.4.0");
    assert_eq!(env.ip_graft("show").trim(), "");
}

#[test]
fn del_leaves_a_namespace_that_reuses_the_path_alone() {
    let Some(env) = Env::new("cni_path_reuse", &[]) else {
        return;
    };
    let ep = json!({"name": "ep-out4", "type": "ipv4", "addr": "127.0.0.1", "port": "dynamic"});
    let mut conf = base("1.0.0", &env.d, &env.dir);
    conf["endpoints"] = json!([ep]);
    let first = Netns::new("reuse");
    let (name, path) = (first.name.clone(), first.path());
    let call = |cmd| Call::in_ns(cmd, "reused", &path, "eth0");
    ok_json(&graft_cni(&call("ADD"), &conf), "ADD");
    drop(first);
    run_ok("ip", ["netns", "add", &name]);
    let second = Netns { name };
    env.add_in(&second, "ep-out4 type ipv4 addr 127.0.0.1 port dynamic");
    ok_empty(&graft_cni(&call("DEL"), &conf), "DEL");
    assert!(
        env.d
            .ip_graft_ok(Some(&second), &["show"])
            .contains("ep-out4"),
        "another namespace at the same path keeps its endpoint"
    );
    assert!(records(&env.dir, &conf).is_empty());
}
