//! The control protocol: one JSON object per `SOCK_SEQPACKET` record.
//!
//! Every request carries, as SCM_RIGHTS, the caller's network namespace
//! (`/proc/self/ns/net`) as its first descriptor: the endpoint table a request
//! reads or changes is the one of that namespace. An `add` whose endpoint names
//! a target namespace carries it as the second descriptor. graftd accepts
//! requests from uid 0 only (SO_PEERCRED) and answers each with one [`Reply`].

use serde::{Deserialize, Serialize};

use crate::nsrules::NsRules;
use crate::{EndpointName, EndpointSpec, NetnsId};

/// Largest record either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most endpoints one namespace may hold (keeps `show` replies bounded).
pub const MAX_ENDPOINTS_PER_NETNS: usize = 256;

/// A request to graftd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Liveness check.
    Ping {},
    /// Define an endpoint in the caller's namespace. `target_fd` says whether a
    /// second descriptor (the target namespace) is attached.
    Add {
        endpoint: EndpointSpec,
        target_fd: bool,
    },
    /// Remove an endpoint from the caller's namespace.
    Del { name: EndpointName },
    /// List the caller's namespace's endpoints (with counters).
    Show {},
    /// Replace the caller's namespace's mapping rules (all lists empty:
    /// clear them). The namespace must have an endpoint; its rules are
    /// forgotten with its last endpoint.
    SetRules { rules: NsRules },
    /// The caller's namespace's mapping rules (answered with
    /// [`Reply::Rules`]).
    GetRules {},
}

/// Per-endpoint counters. The first two are graftd's own; the rest come from
/// graft-ebpf and are absent (`None`) when it is not loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Sockets handed out.
    pub sockets: u64,
    /// Requests refused (bad options, family mismatch, bind failure).
    pub refused: u64,
    /// connect()/sendmsg() calls refused by the egress policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_denied: Option<u64>,
    /// TCP connections established by grafted sockets actively (connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_established: Option<u64>,
    /// TCP connections established passively (accepted on grafted listeners).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_established: Option<u64>,
    /// Bytes sent / received over grafted TCP connections (when counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// Of `bytes_sent`, those handed straight to a grafted peer's receive
    /// queue (graftd's default; absent with `graftd --no-splice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spliced_bytes: Option<u64>,
    /// Sockets handed out and not yet closed (counted by graft-ebpf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<u64>,
    /// The endpoint's limit on `live` (its own, or graftd's default; absent:
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// One endpoint as `show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    #[serde(flatten)]
    pub spec: EndpointSpec,
    /// The namespace sockets are made in.
    pub target_netns: NetnsId,
    pub stats: Stats,
}

/// An error graftd reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// errno-style code (e.g. `EEXIST` for a name already in use).
    pub errno: i32,
    pub message: String,
}

/// graftd's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Reply {
    Ok {
        /// The caller's namespace, as graftd identified it.
        netns: NetnsId,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        endpoints: Vec<EndpointInfo>,
    },
    Error(ErrorReply),
    /// The answer to [`Request::GetRules`]: the rules in canonical form
    /// (empty lists when none are set).
    Rules {
        netns: NetnsId,
        rules: NsRules,
    },
}

/// Why a record is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLarge(usize),
    #[error("invalid message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses a request record strictly (unknown fields and trailing bytes refused).
pub fn decode_request(b: &[u8]) -> Result<Request, DecodeError> {
    if b.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLarge(b.len()));
    }
    Ok(serde_json::from_slice(b)?)
}

/// Parses a reply record.
pub fn decode_reply(b: &[u8]) -> Result<Reply, DecodeError> {
    if b.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLarge(b.len()));
    }
    Ok(serde_json::from_slice(b)?)
}

/// Serializes a message.
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    // Serializing these plain data types into a Vec cannot fail: every map key
    // is a string and no Serialize impl here returns an error.
    serde_json::to_vec(m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EndpointAddr;

    #[test]
    fn requests_round_trip() {
        let r = Request::Add {
            endpoint: EndpointSpec {
                name: EndpointName::new("ep-in4").unwrap(),
                addr: EndpointAddr::Ipv4 {
                    addr: "127.0.0.1".parse().unwrap(),
                    port: Some(8080),
                },
                netns: Some("1".into()),
                policy: vec![],
                limit: None,
            },
            target_fd: true,
        };
        assert_eq!(decode_request(&encode(&r)).unwrap(), r);
        assert_eq!(
            decode_request(br#"{"op":"show"}"#).unwrap(),
            Request::Show {}
        );
    }

    #[test]
    fn strict_parsing() {
        assert!(decode_request(br#"{"op":"show","x":1}"#).is_err());
        assert!(decode_request(br#"{"op":"del","name":"way-too-long-name-here"}"#).is_err());
        assert!(decode_request(br#"{"op":"nope"}"#).is_err());
        assert!(decode_request(b"{").is_err());
        assert!(decode_request(&vec![b' '; MAX_MESSAGE + 1]).is_err());
        assert!(decode_request(br#"{"op":"setrules","rules":{"ingres":[]}}"#).is_err());
        assert!(decode_request(br#"{"op":"getrules","rules":{}}"#).is_err());
    }

    #[test]
    fn rules_requests() {
        let r = decode_request(
            br#"{"op":"setrules","rules":{"ingress":["0.0.0.0:80=ep"],"exclude":["10.0.0.0/8"]}}"#,
        )
        .unwrap();
        let Request::SetRules { rules } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(rules.ingress, vec!["0.0.0.0:80=ep"]);
        assert!(rules.egress.is_empty());
        assert_eq!(decode_request(&encode(&r)).unwrap(), r);
        let rep = Reply::Rules {
            netns: NetnsId { dev: 1, ino: 2 },
            rules: rules.clone(),
        };
        assert_eq!(decode_reply(&encode(&rep)).unwrap(), rep);
    }
}
