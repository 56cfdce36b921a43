//! `ip graft add NAME type { ipv4 | ipv6 } addr ADDR port { PORT | dynamic }
//! [ netns NS ] [ allow P ]… [ deny P ]… [ limit N ]` and `ip graft add NAME type unix path
//! PATH [ netns NS ]`.
//!
//! Keywords may come in any order and be abbreviated as iproute2 allows; the
//! whole line is checked before anything is sent, so a mistake never leaves a
//! half-made endpoint behind.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use graft_core::endpoint::{MAX_LIMIT, MAX_POLICY_CLAUSES};
use graft_core::proto::control::Request;
use graft_core::rules::{PolicyAction, PolicyRule};
use graft_core::{EndpointAddr, EndpointName, EndpointSpec};

use crate::args::{matches, usage, Usage};
use crate::{client, netns};

/// Keywords in the order an abbreviation is resolved (`a` is `addr`, `p` is
/// `port`, as with iproute2 the first match wins).
const KEYWORDS: &[(&str, &str)] = &[
    ("type", "type { ipv4 | ipv6 | unix }"),
    ("address", "addr ADDR"),
    ("port", "port { PORT | dynamic }"),
    ("path", "path PATH"),
    ("netns", "netns { PID | NETNSNAME | PATH }"),
    ("allow", "allow PREFIX/LEN[:PORT[-PORT]]"),
    ("deny", "deny PREFIX/LEN[:PORT[-PORT]]"),
    ("limit", "limit N"),
];

/// How a keyword is written in messages (`address` is documented as `addr`).
fn shown(kw: &str) -> &str {
    if kw == "address" {
        "addr"
    } else {
        kw
    }
}

/// A parsed `add` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddCmd {
    pub spec: EndpointSpec,
}

#[derive(Default)]
struct Raw<'a> {
    kind: Option<&'a str>,
    addr: Option<&'a str>,
    port: Option<&'a str>,
    path: Option<&'a str>,
    netns: Option<&'a str>,
    limit: Option<&'a str>,
    policy: Vec<PolicyRule>,
}

/// Parses the words after `add`.
pub fn parse(args: &[String]) -> Result<AddCmd, Usage> {
    let Some((name, mut rest)) = args.split_first() else {
        return Err(usage!(
            "Error: argument \"NAME\" is required: ip graft add NAME type TYPE ..."
        ));
    };
    let name = EndpointName::new(name).map_err(|e| usage!("Error: {e}"))?;
    let mut raw = Raw::default();
    while let Some((word, tail)) = rest.split_first() {
        let Some(&(kw, grammar)) = KEYWORDS.iter().find(|(k, _)| matches(word, k)) else {
            return Err(usage!(
                "Error: invalid argument \"{word}\"; try \"ip graft help\"."
            ));
        };
        let Some((value, tail)) = tail.split_first() else {
            return Err(usage!(
                "Error: \"{}\" needs an argument: {grammar}",
                shown(kw)
            ));
        };
        let slot = match kw {
            "type" => &mut raw.kind,
            "address" => &mut raw.addr,
            "port" => &mut raw.port,
            "path" => &mut raw.path,
            "netns" => &mut raw.netns,
            "limit" => &mut raw.limit,
            _ => {
                let action = if kw == "allow" {
                    PolicyAction::Allow
                } else {
                    PolicyAction::Deny
                };
                let rule = PolicyRule::parse(action, value)
                    .map_err(|e| usage!("Error: invalid \"{kw}\" argument: {e}"))?;
                raw.policy.push(rule);
                rest = tail;
                continue;
            }
        };
        if slot.is_some() {
            return Err(usage!("Error: \"{}\" is given twice", shown(kw)));
        }
        *slot = Some(value.as_str());
        rest = tail;
    }
    build(name, raw)
}

fn build(name: EndpointName, raw: Raw<'_>) -> Result<AddCmd, Usage> {
    let Some(kind) = raw.kind else {
        return Err(usage!(
            "Error: argument \"type\" is required: type {{ ipv4 | ipv6 | unix }}"
        ));
    };
    let addr = match kind {
        "ipv4" | "ipv6" => {
            if raw.path.is_some() {
                return Err(usage!(
                    "Error: \"path\" is not valid for type {kind} (use addr and port)"
                ));
            }
            let a = raw.addr.ok_or_else(|| {
                usage!("Error: argument \"addr\" is required for type {kind}: addr ADDR")
            })?;
            let p = raw.port.ok_or_else(|| {
                usage!(
                    "Error: argument \"port\" is required for type {kind}: port {{ PORT | dynamic }}"
                )
            })?;
            let port = parse_port(p)?;
            let bad_addr = || {
                let fam = if kind == "ipv4" { "IPv4" } else { "IPv6" };
                usage!("Error: argument \"{a}\" is wrong: addr of type {kind} must be an {fam} address")
            };
            if kind == "ipv4" {
                EndpointAddr::Ipv4 {
                    addr: a.parse::<Ipv4Addr>().map_err(|_| bad_addr())?,
                    port,
                }
            } else {
                EndpointAddr::Ipv6 {
                    addr: a.parse::<Ipv6Addr>().map_err(|_| bad_addr())?,
                    port,
                }
            }
        }
        "unix" => {
            for (given, why) in [
                (
                    raw.addr.is_some(),
                    "\"addr\" is not valid for type unix (use path)",
                ),
                (
                    raw.port.is_some(),
                    "\"port\" is not valid for type unix (use path)",
                ),
                (
                    !raw.policy.is_empty(),
                    "\"allow\"/\"deny\" are not valid for type unix",
                ),
                (
                    raw.limit.is_some(),
                    "\"limit\" is not valid for type unix (live sockets are counted for ipv4/ipv6)",
                ),
            ] {
                if given {
                    return Err(usage!("Error: {why}"));
                }
            }
            let p = raw.path.ok_or_else(|| {
                usage!("Error: argument \"path\" is required for type unix: path PATH")
            })?;
            let a = EndpointAddr::Unix {
                path: PathBuf::from(p),
            };
            a.validate()
                .map_err(|e| usage!("Error: argument \"{p}\" is wrong: {e}"))?;
            a
        }
        other => {
            return Err(usage!(
                "Error: argument \"{other}\" is wrong: type must be ipv4, ipv6 or unix"
            ))
        }
    };
    if raw.policy.len() > MAX_POLICY_CLAUSES {
        return Err(usage!(
            "Error: {} allow/deny clauses given; an endpoint may have at most {MAX_POLICY_CLAUSES}",
            raw.policy.len()
        ));
    }
    let limit = match raw.limit {
        None => None,
        Some(l) => Some(
            l.parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n) && l.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    usage!("Error: argument \"{l}\" is wrong: limit must be 1 to {MAX_LIMIT}")
                })?,
        ),
    };
    Ok(AddCmd {
        spec: EndpointSpec {
            name,
            addr,
            netns: raw.netns.map(str::to_owned),
            policy: raw.policy,
            limit,
        },
    })
}

/// `dynamic`, or 0-65535 where 0 means dynamic (as in AF_GRAFT).
fn parse_port(p: &str) -> Result<Option<u16>, Usage> {
    if p == "dynamic" {
        return Ok(None);
    }
    let n: u16 = p
        .parse()
        .ok()
        .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            usage!("Error: argument \"{p}\" is wrong: port must be 0-65535 or \"dynamic\"")
        })?;
    Ok((n != 0).then_some(n))
}

/// Sends the endpoint to graftd, with our namespace and the target namespace.
pub fn run(cmd: AddCmd, control: &Path) -> anyhow::Result<()> {
    let me = netns::open_self()
        .map_err(|e| anyhow::anyhow!("cannot open /proc/self/ns/net: {}", netns::desc(&e)))?;
    let target = match &cmd.spec.netns {
        Some(spec) => Some(netns::open(spec)?),
        None => None,
    };
    let mut fds = vec![me.as_fd()];
    fds.extend(target.as_ref().map(|t| t.as_fd()));
    let req = Request::Add {
        target_fd: target.is_some(),
        endpoint: cmd.spec,
    };
    client::call(control, &req, &fds)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<AddCmd, String> {
        crate::args::parse_typed(parse, s)
    }

    fn line(s: &str) -> String {
        p(s).unwrap().spec.to_string()
    }

    #[test]
    fn af_graft_walkthrough() {
        assert_eq!(
            line("ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1"),
            "ep-in4 type ipv4 addr 127.0.0.1 port 8080 netns 1"
        );
        assert_eq!(
            line("ep-out4 type ipv4 addr 0.0.0.0 port dynamic"),
            "ep-out4 type ipv4 addr 0.0.0.0 port dynamic"
        );
        assert_eq!(
            line("ep-in6 type ipv6 addr ::1 port 8080"),
            "ep-in6 type ipv6 addr ::1 port 8080"
        );
        assert_eq!(
            line("ep-out6 type ipv6 addr :: port dynamic netns c1"),
            "ep-out6 type ipv6 addr :: port dynamic netns c1"
        );
        assert_eq!(
            line("ep-un type unix path /run/x.sock netns /proc/1/ns/net"),
            "ep-un type unix path /run/x.sock netns /proc/1/ns/net"
        );
    }

    #[test]
    fn abbreviations_and_any_order() {
        assert_eq!(
            line("e port 80 a 10.0.0.1 t ipv4 n 1"),
            "e type ipv4 addr 10.0.0.1 port 80 netns 1"
        );
        assert_eq!(line("e ty unix pa /x"), "e type unix path /x");
        assert_eq!(
            line("e type ipv4 address 1.2.3.4 port 0"),
            "e type ipv4 addr 1.2.3.4 port dynamic"
        );
    }

    #[test]
    fn limit() {
        let c = p("e type ipv4 addr 127.0.0.1 port dynamic limit 3").unwrap();
        assert_eq!(c.spec.limit, Some(3));
        assert_eq!(
            line("e type ipv4 addr 127.0.0.1 port 80 limit 10 deny 10.0.0.0/8"),
            "e type ipv4 addr 127.0.0.1 port 80 deny 10.0.0.0/8 limit 10"
        );
        for bad in ["0", "-1", "x", "+3", "1048577"] {
            assert_eq!(
                p(&format!("e type ipv4 addr 127.0.0.1 port 80 limit {bad}")).unwrap_err(),
                format!("Error: argument \"{bad}\" is wrong: limit must be 1 to 1048576")
            );
        }
        assert_eq!(
            p("e type unix path /run/x limit 3").unwrap_err(),
            "Error: \"limit\" is not valid for type unix (live sockets are counted for ipv4/ipv6)"
        );
        assert_eq!(
            p("e type ipv4 addr 127.0.0.1 port 80 limit").unwrap_err(),
            "Error: \"limit\" needs an argument: limit N"
        );
    }

    #[test]
    fn too_many_policy_clauses() {
        let mut line = String::from("x type ipv4 addr 0.0.0.0 port dynamic");
        for i in 0..=MAX_POLICY_CLAUSES {
            line.push_str(&format!(" deny 10.0.{i}.0/24"));
        }
        let e = p(&line).unwrap_err();
        assert_eq!(
            e,
            "Error: 33 allow/deny clauses given; an endpoint may have at most 32"
        );
    }

    #[test]
    fn policy_clauses() {
        let c = p("e type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:443 deny 10.1.0.0/16 al 192.168.0.0/16:1000-2000").unwrap();
        assert_eq!(
            c.spec.to_string(),
            "e type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:443 deny 10.1.0.0/16 allow 192.168.0.0/16:1000-2000"
        );
        for (input, want) in [
            ("e type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.1/8",
             "Error: invalid \"allow\" argument: \"10.0.0.1/8\": address has bits set beyond the prefix length"),
            ("e type ipv4 addr 0.0.0.0 port dynamic deny 10.0.0.0",
             "Error: invalid \"deny\" argument: \"10.0.0.0\": expected PREFIX/LEN[:PORT[-PORT]]"),
            ("e type ipv4 addr 0.0.0.0 port dynamic deny 10.0.0.0/33",
             "Error: invalid \"deny\" argument: \"10.0.0.0/33\": prefix length \"33\" is not valid for this address family"),
            ("e type ipv4 addr 0.0.0.0 port dynamic allow 10.0.0.0/8:99999",
             "Error: invalid \"allow\" argument: \"10.0.0.0/8:99999\": \"99999\" is not a port (0-65535)"),
            ("e type unix path /x allow 10.0.0.0/8",
             "Error: \"allow\"/\"deny\" are not valid for type unix"),
        ] {
            assert_eq!(p(input).unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn every_bad_input_has_its_message() {
        let cases = [
            (
                "",
                "Error: argument \"NAME\" is required: ip graft add NAME type TYPE ...",
            ),
            (
                "sixteen-bytes-xx type ipv4 addr 1.2.3.4 port 1",
                "Error: endpoint name \"sixteen-bytes-xx\" is longer than 15 bytes",
            ),
            (
                "a/b type ipv4 addr 1.2.3.4 port 1",
                "Error: endpoint name \"a/b\" may only contain letters, digits, '-', '_' and '.'",
            ),
            (
                "e type ipv5 addr 1.2.3.4 port 1",
                "Error: argument \"ipv5\" is wrong: type must be ipv4, ipv6 or unix",
            ),
            (
                "e type ipv4 addr 1.2.3 port 1",
                "Error: argument \"1.2.3\" is wrong: addr of type ipv4 must be an IPv4 address",
            ),
            (
                "e type ipv4 addr ::1 port 1",
                "Error: argument \"::1\" is wrong: addr of type ipv4 must be an IPv4 address",
            ),
            (
                "e type ipv6 addr 127.0.0.1 port 1",
                "Error: argument \"127.0.0.1\" is wrong: addr of type ipv6 must be an IPv6 address",
            ),
            (
                "e type ipv4 addr 1.2.3.4 port 65536",
                "Error: argument \"65536\" is wrong: port must be 0-65535 or \"dynamic\"",
            ),
            (
                "e type ipv4 addr 1.2.3.4 port http",
                "Error: argument \"http\" is wrong: port must be 0-65535 or \"dynamic\"",
            ),
            (
                "e type ipv4 addr 1.2.3.4 port +80",
                "Error: argument \"+80\" is wrong: port must be 0-65535 or \"dynamic\"",
            ),
            (
                "e type ipv4 addr 1.2.3.4 port -1",
                "Error: argument \"-1\" is wrong: port must be 0-65535 or \"dynamic\"",
            ),
            (
                "x type ipv4 addr 1.2.3.4",
                "Error: argument \"port\" is required for type ipv4: port { PORT | dynamic }",
            ),
            (
                "x type ipv6 port 1",
                "Error: argument \"addr\" is required for type ipv6: addr ADDR",
            ),
            (
                "x addr 1.2.3.4 port 1",
                "Error: argument \"type\" is required: type { ipv4 | ipv6 | unix }",
            ),
            (
                "x type unix",
                "Error: argument \"path\" is required for type unix: path PATH",
            ),
            (
                "x type ipv4 addr",
                "Error: \"addr\" needs an argument: addr ADDR",
            ),
            (
                "x type ipv4 addr 1.2.3.4 port 1 netns",
                "Error: \"netns\" needs an argument: netns { PID | NETNSNAME | PATH }",
            ),
            (
                "x type",
                "Error: \"type\" needs an argument: type { ipv4 | ipv6 | unix }",
            ),
            (
                "x type ipv4 addr 1.2.3.4 port 1 foo bar",
                "Error: invalid argument \"foo\"; try \"ip graft help\".",
            ),
            (
                "x type ipv4 addr 1.2.3.4 port 1 port 2",
                "Error: \"port\" is given twice",
            ),
            (
                "x type ipv4 addr 1.2.3.4 port 1 path /x",
                "Error: \"path\" is not valid for type ipv4 (use addr and port)",
            ),
            (
                "x type unix path /x addr 1.2.3.4",
                "Error: \"addr\" is not valid for type unix (use path)",
            ),
            (
                "x type unix path rel.sock",
                "Error: argument \"rel.sock\" is wrong: unix path must be absolute",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(p(input).unwrap_err(), want, "input: {input:?}");
        }
        // An empty name can only come from an explicit empty argument.
        let v = vec![
            String::new(),
            "type".into(),
            "ipv4".into(),
            "addr".into(),
            "1.2.3.4".into(),
            "port".into(),
            "1".into(),
        ];
        assert_eq!(parse(&v).unwrap_err().0, "Error: endpoint name is empty");
        let long = format!("x type unix path /{}", "a".repeat(107));
        assert_eq!(
            p(&long).unwrap_err(),
            format!(
                "Error: argument \"/{}\" is wrong: unix path is longer than 107 bytes",
                "a".repeat(107)
            )
        );
    }
}
