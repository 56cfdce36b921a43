//! `ip graft show [ NAME ]`: one line per endpoint in AF_GRAFT's format, with
//! iproute2-style counter lines under `-s`, details under `-d`, and a JSON
//! array under `-j` (`-p` pretty-prints it).

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::path::Path;

use graft_core::proto::control::{EndpointInfo, Request, Stats};
use graft_core::rules::{PolicyAction, PolicyRule};
use graft_core::{EndpointAddr, EndpointName, NetnsId};
use serde::Serialize;

use crate::args::{usage, GlobalOpts, Usage};
use crate::{client, netns};

/// Parses the words after `show`.
pub fn parse(args: &[String]) -> Result<Option<EndpointName>, Usage> {
    match args {
        [] => Ok(None),
        [name] => EndpointName::new(name)
            .map(Some)
            .map_err(|e| usage!("Error: {e}")),
        [_, extra, ..] => Err(usage!(
            "Error: invalid argument \"{extra}\"; try \"ip graft help\"."
        )),
    }
}

/// Lists our namespace's endpoints (or one of them) and prints them.
pub fn run(
    name: Option<EndpointName>,
    opts: &GlobalOpts,
    control: &Path,
) -> anyhow::Result<String> {
    let me = netns::open_self()
        .map_err(|e| anyhow::anyhow!("cannot open /proc/self/ns/net: {}", netns::desc(&e)))?;
    let answer = client::call(control, &Request::Show {}, &[me.as_fd()])?;
    let mut eps = answer.endpoints;
    if let Some(n) = name {
        eps.retain(|e| e.spec.name == n);
        if eps.is_empty() {
            return Err(
                usage!("Error: endpoint \"{n}\" does not exist in this network namespace").into(),
            );
        }
    }
    sort(&mut eps);
    Ok(render(&eps, opts))
}

/// graftd's table order is its own business; users get a stable listing,
/// alphabetical by name (EndpointName's own order puts shorter names first).
fn sort(eps: &mut [EndpointInfo]) {
    eps.sort_by(|a, b| a.spec.name.as_str().cmp(b.spec.name.as_str()));
}

/// Formats endpoints as text or JSON, per the global options.
pub fn render(eps: &[EndpointInfo], opts: &GlobalOpts) -> String {
    if opts.json {
        let v: Vec<JsonEndpoint<'_>> = eps.iter().map(|e| JsonEndpoint::new(e, opts)).collect();
        // Plain data with string keys: serialization cannot fail.
        let mut s = if opts.pretty {
            serde_json::to_string_pretty(&v).unwrap_or_default()
        } else {
            serde_json::to_string(&v).unwrap_or_default()
        };
        s.push('\n');
        return s;
    }
    let mut out = String::new();
    for e in eps {
        let _ = writeln!(out, "{}", e.spec);
        if opts.details {
            let _ = writeln!(
                out,
                "    target {} dev {}",
                e.target_netns, e.target_netns.dev
            );
        }
        if opts.stats > 0 {
            stats_lines(&mut out, &e.stats, opts.human);
        }
    }
    out
}

/// Two iproute2-style lines: right-aligned column titles, then the values.
/// graft-ebpf's columns appear only when graftd reports them.
fn stats_lines(out: &mut String, s: &Stats, human: bool) {
    let count = |v: u64| v.to_string();
    let bytes = |v: u64| if human { human_bytes(v) } else { v.to_string() };
    let mut cols: Vec<(&str, String)> =
        vec![("sockets", count(s.sockets)), ("refused", count(s.refused))];
    let optional = [
        ("denied", s.policy_denied.map(count)),
        ("active", s.active_established.map(count)),
        ("passive", s.passive_established.map(count)),
        ("tx_bytes", s.bytes_sent.map(bytes)),
        ("rx_bytes", s.bytes_received.map(bytes)),
        ("spliced", s.spliced_bytes.map(bytes)),
        ("live", s.live.map(count)),
        ("limit", s.limit.map(count)),
    ];
    cols.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    let mut head = String::from("   ");
    let mut vals = String::from("   ");
    for (k, v) in &cols {
        let w = k.len().max(v.len());
        let _ = write!(head, " {k:>w$}");
        let _ = write!(vals, " {v:>w$}");
    }
    let _ = writeln!(out, "{head}");
    let _ = writeln!(out, "{vals}");
}

/// iproute2's `-h`: powers of 1000 with one decimal.
fn human_bytes(v: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if v < 1000 {
        return v.to_string();
    }
    let mut x = v as f64 / 1000.0;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < UNITS.len() {
        x /= 1000.0;
        u += 1;
    }
    format!("{x:.1}{}", UNITS[u])
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonPort {
    Number(u16),
    Word(&'static str),
}

#[derive(Serialize)]
struct JsonPolicy {
    action: &'static str,
    prefix: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<[u16; 2]>,
}

impl From<&PolicyRule> for JsonPolicy {
    fn from(r: &PolicyRule) -> Self {
        JsonPolicy {
            action: match r.action {
                PolicyAction::Allow => "allow",
                PolicyAction::Deny => "deny",
            },
            prefix: r.prefix.to_string(),
            ports: r.ports.map(|(lo, hi)| [lo, hi]),
        }
    }
}

/// One endpoint in `-j` output. Keys that do not apply to the type are left
/// out; `netns` is `null` when sockets are made in graftd's own namespace.
#[derive(Serialize)]
struct JsonEndpoint<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<JsonPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    netns: Option<&'a str>,
    policy: Vec<JsonPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u32>,
    target_netns: NetnsId,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<&'a Stats>,
}

impl<'a> JsonEndpoint<'a> {
    fn new(e: &'a EndpointInfo, opts: &GlobalOpts) -> Self {
        let (addr, port, path) = match &e.spec.addr {
            EndpointAddr::Ipv4 { .. } | EndpointAddr::Ipv6 { .. } => {
                let (a, p) = e.spec.addr.ip().unzip();
                let port = p.map(|p| p.map_or(JsonPort::Word("dynamic"), JsonPort::Number));
                (a.map(|a| a.to_string()), port, None)
            }
            EndpointAddr::Unix { path } => (None, None, Some(path.display().to_string())),
        };
        JsonEndpoint {
            name: e.spec.name.as_str(),
            kind: e.spec.addr.type_name(),
            addr,
            port,
            path,
            netns: e.spec.netns.as_deref(),
            policy: e.spec.policy.iter().map(JsonPolicy::from).collect(),
            limit: e.spec.limit,
            target_netns: e.target_netns,
            stats: (opts.stats > 0).then_some(&e.stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::EndpointSpec;

    fn ep(line: &str, stats: Stats) -> EndpointInfo {
        // Reuse the add parser so the fixtures read like the commands.
        let v: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        let spec: EndpointSpec = crate::add::parse(&v).unwrap().spec;
        EndpointInfo {
            spec,
            target_netns: NetnsId {
                dev: 4,
                ino: 4026531840,
            },
            stats,
        }
    }

    fn fixtures() -> Vec<EndpointInfo> {
        vec![
            ep(
                "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1",
                Stats {
                    sockets: 3,
                    refused: 1,
                    ..Stats::default()
                },
            ),
            ep(
                "ep-out6 type ipv6 addr :: port dynamic deny 10.0.0.0/8:443",
                Stats::default(),
            ),
            ep("ep-un type unix path /run/x.sock", Stats::default()),
        ]
    }

    #[test]
    fn text_lines() {
        let o = GlobalOpts::default();
        assert_eq!(
            render(&fixtures(), &o),
            "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1\n\
             ep-out6 type ipv6 addr :: port dynamic deny 10.0.0.0/8:443\n\
             ep-un type unix path /run/x.sock\n"
        );
        assert_eq!(render(&[], &o), "");
    }

    #[test]
    fn stats_lines_only_show_reported_counters() {
        let o = GlobalOpts {
            stats: 1,
            ..GlobalOpts::default()
        };
        let eps = &fixtures()[..1];
        assert_eq!(
            render(eps, &o),
            concat!(
                "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1\n",
                "    sockets refused\n",
                "          3       1\n",
            )
        );
        let mut e = fixtures().remove(0);
        e.stats.policy_denied = Some(2);
        e.stats.active_established = Some(10);
        e.stats.passive_established = Some(0);
        e.stats.bytes_sent = Some(1_234_567);
        e.stats.bytes_received = Some(999);
        assert_eq!(
            render(std::slice::from_ref(&e), &o),
            concat!(
                "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1\n",
                "    sockets refused denied active passive tx_bytes rx_bytes\n",
                "          3       1      2     10       0  1234567      999\n",
            )
        );
        let o = GlobalOpts {
            stats: 1,
            human: true,
            ..GlobalOpts::default()
        };
        assert!(render(std::slice::from_ref(&e), &o).ends_with("    1.2M      999\n"));
        e.stats.spliced_bytes = Some(4_000_000);
        assert!(render(std::slice::from_ref(&e), &o).ends_with("    1.2M      999    4.0M\n"));
    }

    #[test]
    fn details_line() {
        let o = GlobalOpts {
            details: true,
            ..GlobalOpts::default()
        };
        assert_eq!(
            render(&fixtures()[2..], &o),
            "ep-un type unix path /run/x.sock\n    target net:[4026531840] dev 4\n"
        );
    }

    #[test]
    fn json_objects() {
        let o = GlobalOpts {
            json: true,
            stats: 1,
            ..GlobalOpts::default()
        };
        let s = render(&fixtures(), &o);
        assert!(s.ends_with("]\n") && !s.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(
            v[0],
            serde_json::json!({
                "name": "ep-in4", "type": "ipv4", "addr": "127.0.0.1", "port": 8080,
                "netns": "1", "policy": [],
                "target_netns": {"dev": 4, "ino": 4026531840u64},
                "stats": {"sockets": 3, "refused": 1}
            })
        );
        assert_eq!(v[1]["port"], "dynamic");
        assert_eq!(v[1]["netns"], serde_json::Value::Null);
        assert_eq!(
            v[1]["policy"],
            serde_json::json!([{"action": "deny", "prefix": "10.0.0.0/8", "ports": [443, 443]}])
        );
        assert_eq!(v[2]["path"], "/run/x.sock");
        assert!(v[2].get("addr").is_none() && v[2].get("port").is_none());

        let o = GlobalOpts {
            json: true,
            pretty: true,
            ..GlobalOpts::default()
        };
        let s = render(&fixtures(), &o);
        assert!(s.lines().count() > 3);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert!(v[0].get("stats").is_none());
        assert_eq!(render(&[], &o), "[]\n");
    }

    #[test]
    fn listing_is_alphabetical() {
        let mut eps = vec![
            ep("b type unix path /b", Stats::default()),
            ep("aa type unix path /a", Stats::default()),
        ];
        sort(&mut eps);
        assert_eq!(eps[0].spec.name.as_str(), "aa");
    }

    #[test]
    fn show_args() {
        assert_eq!(parse(&[]).unwrap(), None);
        assert_eq!(parse(&["ep".into()]).unwrap().unwrap().as_str(), "ep");
        assert_eq!(
            parse(&["a".into(), "b".into()]).unwrap_err().0,
            "Error: invalid argument \"b\"; try \"ip graft help\"."
        );
    }
}
