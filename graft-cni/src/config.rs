//! The network configuration graft-cni reads on stdin, and the plan it makes
//! of it: the endpoints to add in the pod's namespace and the rules graftd
//! keeps for it.
//!
//! ```json
//! {"cniVersion":"1.0.0","name":"graftnet","type":"graft-cni",
//!  "endpoints":[{"name":"ep-out4","type":"ipv4","addr":"0.0.0.0","port":"dynamic"}],
//!  "egress":["0.0.0.0/0=ep-out4"],
//!  "capabilities":{"portMappings":true},
//!  "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"}]}}
//! ```
//!
//! Each endpoint is spelled with the fields of `ip graft add` and parsed by
//! the same grammar. Each port mapping becomes an endpoint at
//! `hostIP:hostPort` (`0.0.0.0` when no hostIP is given) named `pm-PORT`
//! (`pm6-PORT` for an IPv6 host address) and ingress rules
//! `0.0.0.0:CONTAINERPORT=pm-PORT` and `[::]:CONTAINERPORT=pm-PORT`.
//! Fields graft-cni does not know (`capabilities`, `args`, …) are ignored, as
//! runtimes add their own.

use std::net::IpAddr;
use std::path::PathBuf;

use graft_core::nsrules::NsRules;
use graft_core::{EndpointAddr, EndpointSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::cni::{code, CniError};

/// Where attachment records live unless the config says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/graft";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<EndpointConf>,
    #[serde(default)]
    pub ingress: Vec<String>,
    #[serde(default)]
    pub egress: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// graftd's control socket (default: `$GRAFT_CONTROL`, else
    /// `/run/graft/graftd.sock`).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Where the attachment records are kept (default `/var/lib/cni/graft`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// One entry of the `portMappings` capability, as the reference portmap
/// plugin receives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

/// An attachment GC is told to keep.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A port, or `"dynamic"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PortConf {
    Number(u64),
    Word(String),
}

/// An endpoint with the fields of `ip graft add`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConf {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub addr: Option<String>,
    #[serde(default)]
    pub port: Option<PortConf>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    /// Not in graftd yet: refused with a clear message rather than ignored.
    #[serde(default)]
    pub limit: Option<Value>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// Parses the config; every mistake is an "invalid configuration" error.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin)
        .map_err(|e| invalid(format!("invalid network configuration: {e}")))?;
    if conf.name.is_empty() {
        return Err(invalid("invalid network configuration: \"name\" is empty"));
    }
    Ok(conf)
}

impl EndpointConf {
    /// The words `ip graft add` would be given, parsed by its grammar.
    pub fn spec(&self) -> Result<EndpointSpec, CniError> {
        let who = format!("endpoint \"{}\"", self.name);
        if self.limit.is_some() {
            return Err(invalid(format!(
                "{who}: \"limit\" is not supported: this graftd has no per-endpoint limit; remove the field"
            )));
        }
        let mut w = vec![self.name.clone(), "type".into(), self.kind.clone()];
        let mut kw = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                w.push(k.into());
                w.push(v.clone());
            }
        };
        kw("addr", &self.addr);
        kw("path", &self.path);
        kw("netns", &self.netns);
        match &self.port {
            None => {}
            Some(PortConf::Number(n)) => {
                w.push("port".into());
                w.push(n.to_string());
            }
            Some(PortConf::Word(s)) => {
                w.push("port".into());
                w.push(s.clone());
            }
        }
        for (k, list) in [("allow", &self.allow), ("deny", &self.deny)] {
            for v in list {
                w.push(k.into());
                w.push(v.clone());
            }
        }
        iproute_graft::add::parse(&w)
            .map(|c| c.spec)
            .map_err(|u| invalid(format!("{who}: {}", strip_error(&u.0))))
    }
}

/// Messages shared with `ip graft` start with iproute2's "Error: ".
pub fn strip_error(s: &str) -> &str {
    s.strip_prefix("Error: ").unwrap_or(s)
}

/// What ADD registers with graftd for one attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub endpoints: Vec<EndpointSpec>,
    pub rules: NsRules,
}

impl NetConf {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
    }

    pub fn control(&self) -> PathBuf {
        match &self.control_socket {
            Some(p) => p.clone(),
            None => iproute_graft::client::control_path(),
        }
    }

    /// The endpoints and rules this config asks for, all checked.
    pub fn plan(&self) -> Result<Plan, CniError> {
        let mut endpoints = Vec::new();
        for e in &self.endpoints {
            endpoints.push(e.spec()?);
        }
        let mut ingress = self.ingress.clone();
        let mut mapped: Vec<u16> = Vec::new();
        for (i, m) in self.runtime_config.port_mappings.iter().enumerate() {
            let who = format!("portMappings[{i}]");
            if m.host_port == 0 || m.container_port == 0 {
                return Err(invalid(format!(
                    "{who}: hostPort and containerPort must be 1-65535"
                )));
            }
            if !matches!(m.protocol.to_ascii_lowercase().as_str(), "" | "tcp" | "udp") {
                return Err(invalid(format!(
                    "{who}: protocol \"{}\" is not supported (tcp or udp)",
                    m.protocol
                )));
            }
            let host: IpAddr = if m.host_ip.is_empty() {
                IpAddr::from([0, 0, 0, 0])
            } else {
                m.host_ip.parse().map_err(|_| {
                    invalid(format!(
                        "{who}: hostIP \"{}\" is not an IP address",
                        m.host_ip
                    ))
                })?
            };
            let (addr, fam) = match host {
                IpAddr::V4(a) => (
                    EndpointAddr::Ipv4 {
                        addr: a,
                        port: Some(m.host_port),
                    },
                    "",
                ),
                IpAddr::V6(a) => (
                    EndpointAddr::Ipv6 {
                        addr: a,
                        port: Some(m.host_port),
                    },
                    "6",
                ),
            };
            // tcp and udp mappings of one host address share an endpoint:
            // an endpoint is an address, the socket type comes per request.
            let name = match endpoints.iter().find(|e| e.addr == addr) {
                Some(e) => e.name,
                None => {
                    let base = format!("pm{fam}-{}", m.host_port);
                    let mut name = base.clone();
                    let mut k = 1;
                    while endpoints.iter().any(|e| e.name.as_str() == name) {
                        k += 1;
                        name = format!("{base}-{k}");
                    }
                    let name = graft_core::EndpointName::new(&name)
                        .map_err(|e| invalid(format!("{who}: {e}")))?;
                    endpoints.push(EndpointSpec {
                        name,
                        addr,
                        netns: None,
                        policy: vec![],
                        limit: None,
                    });
                    name
                }
            };
            if !mapped.contains(&m.container_port) {
                mapped.push(m.container_port);
                ingress.push(format!("0.0.0.0:{}={name}", m.container_port));
                ingress.push(format!("[::]:{}={name}", m.container_port));
            }
        }
        let rules = NsRules {
            ingress,
            egress: self.egress.clone(),
            exclude: self.exclude.clone(),
        };
        let rules = rules
            .canonical()
            .map_err(|e| invalid(format!("invalid rules: {e}")))?;
        if !rules.is_empty() && endpoints.is_empty() {
            return Err(invalid(
                "rules given without any endpoint: add \"endpoints\" or port mappings",
            ));
        }
        Ok(Plan { endpoints, rules })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(s: &str) -> Result<Plan, CniError> {
        parse(s.as_bytes())?.plan()
    }

    #[test]
    fn issue_example() {
        let p = conf(
            r#"{"cniVersion":"1.0.0","name":"graftnet","type":"graft-cni",
            "endpoints":[{"name":"ep-out4","type":"ipv4","addr":"0.0.0.0","port":"dynamic"}],
            "egress":["0.0.0.0/0=ep-out4"],
            "runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"127.0.0.1"},
                                             {"hostPort":8080,"containerPort":80,"protocol":"udp","hostIP":"127.0.0.1"}]}}"#,
        )
        .unwrap();
        let lines: Vec<String> = p.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            [
                "ep-out4 type ipv4 addr 0.0.0.0 port dynamic",
                "pm-8080 type ipv4 addr 127.0.0.1 port 8080"
            ]
        );
        assert_eq!(p.rules.ingress, ["0.0.0.0:80=pm-8080", "[::]:80=pm-8080"]);
        assert_eq!(p.rules.egress, ["0.0.0.0/0=ep-out4"]);
    }

    #[test]
    fn endpoint_fields_use_the_ip_graft_grammar() {
        let p = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni",
            "endpoints":[{"name":"e6","type":"ipv6","addr":"::1","port":9000,"allow":["::/0:443"],"deny":["::1/128"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            p.endpoints[0].to_string(),
            "e6 type ipv6 addr ::1 port 9000 allow ::/0:443 deny ::1/128"
        );
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","endpoints":[{"name":"e","type":"ipv4","addr":"::1","port":1}]}"#).unwrap_err();
        assert_eq!(e.code, 4);
        assert_eq!(
            e.msg,
            "endpoint \"e\": argument \"::1\" is wrong: addr of type ipv4 must be an IPv4 address"
        );
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","endpoints":[{"name":"e","type":"ipv4","addr":"1.2.3.4","port":1,"limit":100}]}"#).unwrap_err();
        assert_eq!(
            e.msg,
            "endpoint \"e\": \"limit\" is not supported: this graftd has no per-endpoint limit; remove the field"
        );
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","endpoints":[{"name":"e","type":"ipv4","adr":"1.2.3.4"}]}"#).unwrap_err();
        assert!(
            e.msg
                .starts_with("invalid network configuration: unknown field `adr`"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn bad_rules_and_mappings() {
        let e =
            conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","egress":["0.0.0.0/0"]}"#)
                .unwrap_err();
        assert_eq!(
            e.msg,
            "invalid rules: egress rule \"0.0.0.0/0\": expected PREFIX/LEN=ENDPOINT"
        );
        let e = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","egress":["0.0.0.0/0=x"]}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.msg,
            "rules given without any endpoint: add \"endpoints\" or port mappings"
        );
        let e = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]}}"#).unwrap_err();
        assert_eq!(
            e.msg,
            "portMappings[0]: protocol \"sctp\" is not supported (tcp or udp)"
        );
        let p = conf(r#"{"cniVersion":"1.1.0","name":"n","type":"graft-cni","runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":8080,"hostIP":"::1"},{"hostPort":80,"containerPort":81,"hostIP":"127.0.0.1"}]}}"#).unwrap();
        let names: Vec<&str> = p.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["pm6-80", "pm-80"]);
    }
}
