//! Mapping rules: which application sockets are grafted, and onto which
//! endpoint.
//!
//! * Ingress `ADDR:PORT[-PORT]=EP`: a `bind()` to exactly `ADDR` (a wildcard
//!   such as `0.0.0.0`/`::`, or a specific address) with a port in the range is
//!   grafted onto `EP`. IPv6 addresses may be written bare (`:::80=ep`, as in
//!   AF_GRAFT) or bracketed (`[::]:80=ep`).
//! * Egress `PREFIX/LEN=EP`: the first `connect()`/`sendto()` of a socket to a
//!   destination inside the prefix is grafted onto `EP`; longest prefix wins.
//! * Exclusion `PREFIX/LEN`: destinations inside it are never grafted (it takes
//!   part in longest-prefix matching and wins ties).
//!
//! In the environment (`GRAFT_INGRESS_CONVERT`, `GRAFT_EGRESS_CONVERT`,
//! `GRAFT_EGRESS_EXCLUDE`) rules are separated by whitespace or commas.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::name::{EndpointName, NameError};

/// Why a mapping rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("\"{0}\": expected ADDR:PORT[-PORT]=ENDPOINT")]
    IngressShape(String),
    #[error("\"{0}\": expected PREFIX/LEN=ENDPOINT")]
    EgressShape(String),
    #[error("\"{0}\": expected PREFIX/LEN")]
    ExcludeShape(String),
    #[error("\"{rule}\": \"{addr}\" is not an IPv4 or IPv6 address")]
    BadAddr { rule: String, addr: String },
    #[error("\"{rule}\": \"{port}\" is not a port (0-65535)")]
    BadPort { rule: String, port: String },
    #[error("\"{0}\": port range is reversed")]
    ReversedRange(String),
    #[error("\"{rule}\": prefix length \"{len}\" is not valid for this address family")]
    BadPrefixLen { rule: String, len: String },
    #[error("\"{0}\": address has bits set beyond the prefix length")]
    HostBits(String),
    #[error("\"{rule}\": {err}")]
    Name { rule: String, err: NameError },
    #[error("\"{0}\": expected PREFIX/LEN[:PORT[-PORT]]")]
    PolicyShape(String),
}

/// `ADDR:PORT[-PORT]=EP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngressRule {
    pub addr: IpAddr,
    pub ports: (u16, u16),
    pub endpoint: EndpointName,
}

/// An IP prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// `PREFIX/LEN=EP` (`endpoint: Some`) or an exclusion (`endpoint: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressRule {
    pub prefix: Prefix,
    pub endpoint: Option<EndpointName>,
}

/// What egress matching decided for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EgressDecision {
    /// Graft onto this endpoint.
    Graft(EndpointName),
    /// An exclusion matched: leave the socket alone.
    Excluded,
    /// No rule covers the destination: leave the socket alone.
    NoRule,
}

fn parse_name(rule: &str, s: &str) -> Result<EndpointName, RuleError> {
    EndpointName::new(s).map_err(|err| RuleError::Name {
        rule: rule.to_owned(),
        err,
    })
}

/// `LHS=EP`: the left-hand side and the endpoint.
fn split_endpoint(
    rule: &str,
    shape: impl Fn() -> RuleError,
) -> Result<(&str, EndpointName), RuleError> {
    let (lhs, ep) = rule.rsplit_once('=').ok_or_else(shape)?;
    Ok((lhs, parse_name(rule, ep)?))
}

fn parse_port(rule: &str, s: &str) -> Result<u16, RuleError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RuleError::BadPort {
            rule: rule.to_owned(),
            port: s.to_owned(),
        });
    }
    s.parse().map_err(|_| RuleError::BadPort {
        rule: rule.to_owned(),
        port: s.to_owned(),
    })
}

/// `PORT` or `LO-HI` (inclusive, not reversed).
fn parse_port_range(rule: &str, s: &str) -> Result<(u16, u16), RuleError> {
    let range = match s.split_once('-') {
        Some((lo, hi)) => (parse_port(rule, lo)?, parse_port(rule, hi)?),
        None => {
            let p = parse_port(rule, s)?;
            (p, p)
        }
    };
    if range.0 > range.1 {
        return Err(RuleError::ReversedRange(rule.to_owned()));
    }
    Ok(range)
}

/// The rule that decides for a destination among the `matching` ones: the
/// longest prefix; on a tie, one for which `wins_tie` holds.
fn longest_prefix<'a, R>(
    matching: impl Iterator<Item = &'a R>,
    prefix: impl Fn(&R) -> &Prefix,
    wins_tie: impl Fn(&R) -> bool,
) -> Option<&'a R> {
    let mut best: Option<&R> = None;
    for r in matching {
        best = match best {
            None => Some(r),
            Some(b) if prefix(r).len > prefix(b).len => Some(r),
            Some(b) if prefix(r).len == prefix(b).len && wins_tie(r) => Some(r),
            keep => keep,
        };
    }
    best
}

fn parse_ip(rule: &str, s: &str) -> Result<IpAddr, RuleError> {
    s.parse().map_err(|_| RuleError::BadAddr {
        rule: rule.to_owned(),
        addr: s.to_owned(),
    })
}

impl std::str::FromStr for IngressRule {
    type Err = RuleError;

    fn from_str(rule: &str) -> Result<Self, RuleError> {
        let shape = || RuleError::IngressShape(rule.to_owned());
        let (lhs, endpoint) = split_endpoint(rule, shape)?;
        let (addr, ports) = if let Some(rest) = lhs.strip_prefix('[') {
            let (a, p) = rest.split_once("]:").ok_or_else(shape)?;
            (a, p)
        } else {
            lhs.rsplit_once(':').ok_or_else(shape)?
        };
        let addr = parse_ip(rule, addr)?;
        let ports = parse_port_range(rule, ports)?;
        Ok(IngressRule {
            addr,
            ports,
            endpoint,
        })
    }
}

impl fmt::Display for IngressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:")?,
            IpAddr::V6(a) => write!(f, "[{a}]:")?,
        }
        if self.ports.0 == self.ports.1 {
            write!(f, "{}={}", self.ports.0, self.endpoint)
        } else {
            write!(f, "{}-{}={}", self.ports.0, self.ports.1, self.endpoint)
        }
    }
}

impl Prefix {
    fn parse(rule: &str, s: &str, shape: impl Fn() -> RuleError) -> Result<Self, RuleError> {
        let (a, l) = s.split_once('/').ok_or_else(shape)?;
        let addr = parse_ip(rule, a)?;
        let bad_len = || RuleError::BadPrefixLen {
            rule: rule.to_owned(),
            len: l.to_owned(),
        };
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_len());
        }
        let len: u8 = l.parse().map_err(|_| bad_len())?;
        let net = IpNet::new(addr, len).map_err(|_| bad_len())?;
        if net.trunc() != net {
            return Err(RuleError::HostBits(rule.to_owned()));
        }
        Ok(Prefix { addr, len })
    }

    /// Whether `a` (same family; callers canonicalize v4-mapped addresses)
    /// lies inside this prefix. A hand-made prefix longer than its family
    /// allows contains nothing.
    pub fn contains(&self, a: IpAddr) -> bool {
        IpNet::new(self.addr, self.len).is_ok_and(|net| net.contains(&a))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for EgressRule {
    type Err = RuleError;

    fn from_str(rule: &str) -> Result<Self, RuleError> {
        let shape = || RuleError::EgressShape(rule.to_owned());
        let (lhs, endpoint) = split_endpoint(rule, shape)?;
        Ok(EgressRule {
            prefix: Prefix::parse(rule, lhs, shape)?,
            endpoint: Some(endpoint),
        })
    }
}

impl EgressRule {
    /// Parses an exclusion, `PREFIX/LEN`.
    pub fn parse_exclude(rule: &str) -> Result<Self, RuleError> {
        let shape = || RuleError::ExcludeShape(rule.to_owned());
        Ok(EgressRule {
            prefix: Prefix::parse(rule, rule, shape)?,
            endpoint: None,
        })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Some(ep) => write!(f, "{}={}", self.prefix, ep),
            None => write!(f, "{}", self.prefix),
        }
    }
}

/// Whether an egress policy clause allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// One `allow PREFIX[:PORT[-PORT]]` / `deny …` clause of `ip graft add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRule {
    pub action: PolicyAction,
    pub prefix: Prefix,
    /// Destination port range; `None` is every port.
    pub ports: Option<(u16, u16)>,
}

impl PolicyRule {
    /// Parses the argument of an `allow`/`deny` keyword: `PREFIX/LEN[:PORT[-PORT]]`.
    pub fn parse(action: PolicyAction, arg: &str) -> Result<Self, RuleError> {
        let shape = || RuleError::PolicyShape(arg.to_owned());
        let (addr, rest) = arg.split_once('/').ok_or_else(shape)?;
        let (len, ports) = match rest.split_once(':') {
            Some((l, p)) => (l, Some(p)),
            None => (rest, None),
        };
        let prefix = Prefix::parse(arg, &format!("{addr}/{len}"), shape)?;
        let ports = ports.map(|p| parse_port_range(arg, p)).transpose()?;
        Ok(PolicyRule {
            action,
            prefix,
            ports,
        })
    }

    fn matches(&self, dst: IpAddr, port: u16) -> bool {
        self.prefix.contains(dst.to_canonical())
            && self.ports.is_none_or(|(lo, hi)| lo <= port && port <= hi)
    }
}

impl std::str::FromStr for PolicyRule {
    type Err = RuleError;
    /// Parses `allow ARG` or `deny ARG`.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        match s.split_once(' ') {
            Some(("allow", a)) => PolicyRule::parse(PolicyAction::Allow, a),
            Some(("deny", a)) => PolicyRule::parse(PolicyAction::Deny, a),
            _ => Err(RuleError::PolicyShape(s.to_owned())),
        }
    }
}

impl fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kw = match self.action {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        };
        write!(f, "{kw} {}", self.prefix)?;
        match self.ports {
            Some((lo, hi)) if lo == hi => write!(f, ":{lo}"),
            Some((lo, hi)) => write!(f, ":{lo}-{hi}"),
            None => Ok(()),
        }
    }
}

impl serde::Serialize for PolicyRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PolicyRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether an endpoint's egress policy lets a socket reach `dst:port`: the
/// longest matching prefix decides (deny wins a tie); with no match, the
/// destination is allowed unless the policy has at least one `allow` clause.
pub fn policy_allows(policy: &[PolicyRule], dst: IpAddr, port: u16) -> bool {
    let best = longest_prefix(
        policy.iter().filter(|r| r.matches(dst, port)),
        |r| &r.prefix,
        |r| r.action == PolicyAction::Deny,
    );
    match best {
        Some(r) => r.action == PolicyAction::Allow,
        None => !policy.iter().any(|r| r.action == PolicyAction::Allow),
    }
}

/// Splits an environment value into rule strings.
pub fn split_env(v: &str) -> impl Iterator<Item = &str> {
    v.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
}

/// Every rule a process runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub ingress: Vec<IngressRule>,
    pub egress: Vec<EgressRule>,
}

/// What an ingress bind is grafted onto (see [`RuleSet::match_bind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMatch {
    /// One endpoint; `v6` when the rule's address is IPv6.
    One { ep: EndpointName, v6: bool },
    /// A dual-stack `[::]` listener answering on an IPv4 and an IPv6
    /// endpoint (graftd's `SocketDual`); the IPv6 one alone if graftd
    /// cannot make it.
    Dual {
        ep4: EndpointName,
        ep6: EndpointName,
    },
}

impl RuleSet {
    /// Parses the three environment values (each may be absent).
    pub fn from_env_values(
        ingress: Option<&str>,
        egress: Option<&str>,
        exclude: Option<&str>,
    ) -> Result<Self, RuleError> {
        let mut set = RuleSet::default();
        for r in ingress.into_iter().flat_map(split_env) {
            set.ingress.push(r.parse()?);
        }
        for r in egress.into_iter().flat_map(split_env) {
            set.egress.push(r.parse()?);
        }
        for r in exclude.into_iter().flat_map(split_env) {
            set.egress.push(EgressRule::parse_exclude(r)?);
        }
        Ok(set)
    }

    /// Whether any rule exists at all.
    pub fn is_empty(&self) -> bool {
        self.ingress.is_empty() && self.egress.is_empty()
    }

    /// The endpoint a `bind()` to `addr:port` is grafted onto: the first ingress
    /// rule whose address equals `addr` (canonicalized: `::ffff:a.b.c.d` is
    /// `a.b.c.d`) and whose range holds `port`.
    pub fn match_ingress(&self, addr: IpAddr, port: u16) -> Option<EndpointName> {
        let addr = addr.to_canonical();
        self.ingress
            .iter()
            .find(|r| r.addr.to_canonical() == addr && r.ports.0 <= port && port <= r.ports.1)
            .map(|r| r.endpoint)
    }

    /// The ingress decision for a `bind()` (or a `listen()` on port 0) to
    /// `addr:port`; the preload library and graftd's seccomp supervisor both
    /// decide with this. A dual-stack `[::]` socket (IPV6_V6ONLY off) also
    /// accepts IPv4: when no rule names `::` it takes the `0.0.0.0` rule
    /// (iperf3, Go and others bind `[::]` by default), and when a `::` and a
    /// `0.0.0.0` rule name different endpoints, a `stream` socket gets one
    /// listener answering on both ([`BindMatch::Dual`]). `v6only_off` is
    /// asked at most once, and only for a `[::]` bind where it matters.
    pub fn match_bind(
        &self,
        addr: IpAddr,
        port: u16,
        stream: bool,
        v6only_off: impl FnOnce() -> bool,
    ) -> Option<BindMatch> {
        let direct = self.match_ingress(addr, port);
        if addr == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
            let any4 = self.match_ingress(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port);
            let found = match (direct, any4) {
                (Some(ep6), Some(ep4)) if ep4 != ep6 && stream => {
                    Some(BindMatch::Dual { ep4, ep6 })
                }
                (None, Some(ep)) => Some(BindMatch::One { ep, v6: false }),
                _ => None,
            };
            if let Some(m) = found.filter(|_| v6only_off()) {
                return Some(m);
            }
        }
        direct.map(|ep| BindMatch::One {
            ep,
            v6: addr.to_canonical().is_ipv6(),
        })
    }

    /// Whether some ingress rule names `addr` with a range that holds port 0,
    /// i.e. a `listen()` on a socket bound to `addr:0` is a server to graft.
    pub fn ingress_covers_port_zero(&self, addr: IpAddr) -> Option<EndpointName> {
        self.match_ingress(addr, 0)
    }

    /// Longest-prefix egress decision for destination `dst`.
    pub fn match_egress(&self, dst: IpAddr) -> EgressDecision {
        let dst = dst.to_canonical();
        let best = longest_prefix(
            self.egress.iter().filter(|r| r.prefix.contains(dst)),
            |r| &r.prefix,
            |r| r.endpoint.is_none(),
        );
        match best {
            None => EgressDecision::NoRule,
            Some(EgressRule {
                endpoint: Some(ep), ..
            }) => EgressDecision::Graft(*ep),
            Some(_) => EgressDecision::Excluded,
        }
    }

    /// The endpoint every destination of one family goes to, when the
    /// egress rules of that family are a single catch-all (`0.0.0.0/0=EP`,
    /// or `::/0=EP` with `v6`) and nothing else: then a new socket of that
    /// family can only ever be grafted onto it, whatever it connects to
    /// (an IPv6 socket's v4-mapped destinations follow the IPv4 rules and
    /// are not covered).
    pub fn egress_catch_all(&self, v6: bool) -> Option<EndpointName> {
        let mut of_family = self.egress.iter().filter(|r| r.prefix.addr.is_ipv6() == v6);
        match (of_family.next(), of_family.next()) {
            (Some(r), None) if r.prefix.len == 0 => r.endpoint,
            _ => None,
        }
    }

    /// Renders the rules back into the three environment values.
    pub fn to_env_values(&self) -> (String, String, String) {
        fn join<'a, R: fmt::Display + 'a>(rules: impl Iterator<Item = &'a R>) -> String {
            rules.map(R::to_string).collect::<Vec<_>>().join(" ")
        }
        let (grafts, excludes): (Vec<&EgressRule>, Vec<&EgressRule>) =
            self.egress.iter().partition(|r| r.endpoint.is_some());
        (
            join(self.ingress.iter()),
            join(grafts.into_iter()),
            join(excludes.into_iter()),
        )
    }

    /// Every endpoint name the rules refer to, without repeats.
    pub fn endpoints(&self) -> Vec<EndpointName> {
        let mut v: Vec<EndpointName> = self
            .ingress
            .iter()
            .map(|r| r.endpoint)
            .chain(self.egress.iter().filter_map(|r| r.endpoint))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_bind_takes_the_ipv4_wildcard_rule() {
        let rules =
            RuleSet::from_env_values(Some("0.0.0.0:80-90=ep-in4 ::1:80=ep6"), None, None).unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let got = |a: IpAddr, p, dual: bool| rules.match_bind(a, p, true, || dual);
        let one = |e: &str, v6| Some(BindMatch::One { ep: ep(e), v6 });
        assert_eq!(got(any6, 85, true), one("ep-in4", false));
        assert_eq!(got(any6, 85, false), None, "v6only");
        assert_eq!(got(any6, 95, true), None);
        assert_eq!(got("::1".parse().unwrap(), 80, false), one("ep6", true));
        let mut asked = false;
        rules.match_bind("0.0.0.0".parse().unwrap(), 80, true, || {
            asked = true;
            true
        });
        assert!(!asked, "the socket is only asked for a [::] bind");
    }

    #[test]
    fn dual_stack_pairs_both_wildcard_rules() {
        let rules = RuleSet::from_env_values(
            Some("0.0.0.0:0-8999=ep-in4 :::0-8999=ep-in6 0.0.0.0:9000=ep-both :::9000=ep-both"),
            None,
            None,
        )
        .unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        let dual = Some(BindMatch::Dual {
            ep4: ep("ep-in4"),
            ep6: ep("ep-in6"),
        });
        let in6 = Some(BindMatch::One {
            ep: ep("ep-in6"),
            v6: true,
        });
        assert_eq!(rules.match_bind(any6, 3000, true, || true), dual);
        assert_eq!(rules.match_bind(any6, 3000, true, || false), in6, "v6only");
        assert_eq!(
            rules.match_bind(any6, 3000, false, || true),
            in6,
            "datagram"
        );
        assert_eq!(
            rules.match_bind(any6, 9000, true, || true),
            Some(BindMatch::One {
                ep: ep("ep-both"),
                v6: true
            }),
            "both rules name one endpoint"
        );
        assert_eq!(
            rules.match_bind("::1".parse().unwrap(), 3000, true, || true),
            None
        );
    }

    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ep(s: &str) -> EndpointName {
        EndpointName::new(s).unwrap()
    }

    #[test]
    fn ingress_forms() {
        let r: IngressRule = "0.0.0.0:0-65535=ep-in4".parse().unwrap();
        assert_eq!(r.addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(r.ports, (0, 65535));
        let r: IngressRule = ":::0-65535=ep-in6".parse().unwrap();
        assert_eq!(r.addr, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let r: IngressRule = "[::1]:80=ep-in6".parse().unwrap();
        assert_eq!((r.addr, r.ports), ("::1".parse().unwrap(), (80, 80)));
        assert_eq!(r.to_string(), "[::1]:80=ep-in6");
        assert_eq!(
            r.to_string().parse::<IngressRule>().unwrap(),
            r,
            "display round-trips"
        );
    }

    #[test]
    fn ingress_errors_are_precise() {
        let e = |s: &str| s.parse::<IngressRule>().unwrap_err().to_string();
        assert_eq!(
            e("0.0.0.0:80"),
            "\"0.0.0.0:80\": expected ADDR:PORT[-PORT]=ENDPOINT"
        );
        assert_eq!(
            e("0.0.0.0:70000=ep"),
            "\"0.0.0.0:70000=ep\": \"70000\" is not a port (0-65535)"
        );
        assert_eq!(
            e("1.2.3:80=ep"),
            "\"1.2.3:80=ep\": \"1.2.3\" is not an IPv4 or IPv6 address"
        );
        assert_eq!(
            e("0.0.0.0:90-80=ep"),
            "\"0.0.0.0:90-80=ep\": port range is reversed"
        );
        assert!(e("0.0.0.0:80=waytoolongendpointname").contains("longer than 15 bytes"));
        assert!(e("0.0.0.0:+80=ep").contains("is not a port"));
    }

    #[test]
    fn egress_longest_prefix_wins_and_exclusions() {
        let set = RuleSet::from_env_values(
            None,
            Some("0.0.0.0/0=ep-out4, 10.0.0.0/8=ep-ten ::/0=ep-out6"),
            Some("127.0.0.0/8 10.1.0.0/16"),
        )
        .unwrap();
        let d = |s: &str| set.match_egress(s.parse().unwrap());
        assert_eq!(d("192.0.2.1"), EgressDecision::Graft(ep("ep-out4")));
        assert_eq!(d("10.2.3.4"), EgressDecision::Graft(ep("ep-ten")));
        assert_eq!(d("10.1.3.4"), EgressDecision::Excluded);
        assert_eq!(d("127.0.0.1"), EgressDecision::Excluded);
        assert_eq!(d("::ffff:127.0.0.1"), EgressDecision::Excluded);
        assert_eq!(d("::ffff:192.0.2.1"), EgressDecision::Graft(ep("ep-out4")));
        assert_eq!(d("2001:db8::1"), EgressDecision::Graft(ep("ep-out6")));
        let none = RuleSet::from_env_values(None, Some("10.0.0.0/8=x"), None).unwrap();
        assert_eq!(
            none.match_egress("1.1.1.1".parse().unwrap()),
            EgressDecision::NoRule
        );
    }

    #[test]
    fn a_catch_all_is_the_only_rule_of_its_family() {
        let set = |e: &str, x: Option<&str>| RuleSet::from_env_values(None, Some(e), x).unwrap();
        let s = set("0.0.0.0/0=ep-out4 ::/0=ep-out6", None);
        assert_eq!(s.egress_catch_all(false), Some(ep("ep-out4")));
        assert_eq!(s.egress_catch_all(true), Some(ep("ep-out6")));
        let s = set("0.0.0.0/0=ep-out4", Some("10.0.0.0/8"));
        assert_eq!(s.egress_catch_all(false), None, "an exclusion");
        assert_eq!(s.egress_catch_all(true), None, "no IPv6 rule");
        let s = set("0.0.0.0/0=ep-out4 10.0.0.0/8=ep-ten", None);
        assert_eq!(s.egress_catch_all(false), None, "a second endpoint");
        let s = set("127.0.0.0/8=ep-out4", None);
        assert_eq!(s.egress_catch_all(false), None, "not every destination");
        let s = set("0.0.0.0/0=ep-out4", Some("::1/128"));
        assert_eq!(s.egress_catch_all(false), Some(ep("ep-out4")));
        assert_eq!(s.egress_catch_all(true), None);
    }

    #[test]
    fn egress_errors() {
        let e = |s: &str| s.parse::<EgressRule>().unwrap_err().to_string();
        assert_eq!(
            e("10.0.0.1/8=x"),
            "\"10.0.0.1/8=x\": address has bits set beyond the prefix length"
        );
        assert_eq!(
            e("10.0.0.0/33=x"),
            "\"10.0.0.0/33=x\": prefix length \"33\" is not valid for this address family"
        );
        assert_eq!(
            e("10.0.0.0=x"),
            "\"10.0.0.0=x\": expected PREFIX/LEN=ENDPOINT"
        );
    }

    #[test]
    fn policy_longest_prefix_and_default() {
        let p = |s: &str| s.parse::<PolicyRule>().unwrap();
        let pol = vec![
            p("allow 10.0.0.0/8:80-443"),
            p("deny 10.1.0.0/16"),
            p("allow ::/0"),
        ];
        let ok = |a: &str, port| policy_allows(&pol, a.parse().unwrap(), port);
        assert!(ok("10.2.0.1", 80));
        assert!(
            !ok("10.2.0.1", 22),
            "outside the allowed ports, and allow clauses exist"
        );
        assert!(!ok("10.1.0.1", 80));
        assert!(ok("2001:db8::1", 9));
        assert!(!ok("192.0.2.1", 80));
        assert!(policy_allows(&[], "192.0.2.1".parse().unwrap(), 1));
        let deny_only = vec![p("deny 127.0.0.0/8:22")];
        assert!(policy_allows(&deny_only, "127.0.0.1".parse().unwrap(), 80));
        assert!(!policy_allows(
            &deny_only,
            "::ffff:127.0.0.1".parse().unwrap(),
            22
        ));
        assert_eq!(
            p("allow 2001:db8::/32:443").to_string(),
            "allow 2001:db8::/32:443"
        );
        assert!("allow 10.0.0.0/8:99999".parse::<PolicyRule>().is_err());
        assert!("permit 10.0.0.0/8".parse::<PolicyRule>().is_err());
    }

    #[test]
    fn one_port_range_grammar_for_ingress_and_policy() {
        let i = |s: &str| s.parse::<IngressRule>().map(|r| r.ports);
        let p = |s: &str| s.parse::<PolicyRule>().map(|r| r.ports);
        assert_eq!(i("0.0.0.0:80=e"), Ok((80, 80)));
        assert_eq!(p("allow 0.0.0.0/0:80"), Ok(Some((80, 80))));
        assert_eq!(i("0.0.0.0:80-90=e"), Ok((80, 90)));
        assert_eq!(p("allow 0.0.0.0/0:80-90"), Ok(Some((80, 90))));
        assert_eq!(p("deny 0.0.0.0/0"), Ok(None));
        for bad in ["90-80", "-80", "80-", "+80", "1-65536", ""] {
            assert!(i(&format!("0.0.0.0:{bad}=e")).is_err(), "ingress {bad}");
            assert!(
                p(&format!("allow 0.0.0.0/0:{bad}")).is_err(),
                "policy {bad}"
            );
        }
        assert_eq!(
            p("allow 10.0.0.0/8:90-80").unwrap_err().to_string(),
            "\"10.0.0.0/8:90-80\": port range is reversed"
        );
    }

    #[test]
    fn prefixes_contain_by_family_and_length() {
        let pre = |s: &str| s.parse::<EgressRule>().unwrap().prefix;
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(pre("0.0.0.0/0=e").contains(a("203.0.113.9")));
        assert!(!pre("0.0.0.0/0=e").contains(a("::1")), "families never mix");
        assert!(!pre("::/0=e").contains(a("127.0.0.1")));
        assert!(pre("10.1.0.0/16=e").contains(a("10.1.255.255")));
        assert!(!pre("10.1.0.0/16=e").contains(a("10.2.0.0")));
        assert!(pre("2001:db8::/127=e").contains(a("2001:db8::1")));
        assert!(!pre("2001:db8::/128=e").contains(a("2001:db8::1")));
        let hand_made = Prefix {
            addr: a("10.0.0.0"),
            len: 40,
        };
        assert!(!hand_made.contains(a("10.0.0.1")));
        for bad in ["10.0.0.0/=e", "10.0.0.0/+8=e", "::/129=e", "10.0.0.0/08x=e"] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn exclusion_wins_a_tie_and_deny_wins_a_tie() {
        let set = RuleSet::from_env_values(None, Some("10.0.0.0/8=a"), Some("10.0.0.0/8")).unwrap();
        assert_eq!(
            set.match_egress("10.0.0.1".parse().unwrap()),
            EgressDecision::Excluded
        );
        let pol: Vec<PolicyRule> = ["allow 10.0.0.0/8", "deny 10.0.0.0/8", "allow 10.0.0.0/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(!policy_allows(&pol, "10.0.0.1".parse().unwrap(), 1));
    }

    #[test]
    fn ingress_matches_exact_address_and_range() {
        let set = RuleSet::from_env_values(
            Some("0.0.0.0:0-65535=ep-in4 :::80-90=ep-in6 127.0.0.1:9000=lo"),
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            set.match_ingress("0.0.0.0".parse().unwrap(), 5201),
            Some(ep("ep-in4"))
        );
        assert_eq!(
            set.match_ingress("::".parse().unwrap(), 85),
            Some(ep("ep-in6"))
        );
        assert_eq!(set.match_ingress("::".parse().unwrap(), 91), None);
        assert_eq!(set.match_ingress("127.0.0.1".parse().unwrap(), 9001), None);
        assert_eq!(
            set.match_ingress("::ffff:127.0.0.1".parse().unwrap(), 9000),
            Some(ep("lo"))
        );
        let (i, e, x) = set.to_env_values();
        assert_eq!(
            RuleSet::from_env_values(Some(&i), Some(&e), Some(&x)).unwrap(),
            set
        );
    }
}
