//! The broker protocol: fixed-size little-endian records, encoded and decoded
//! without allocation so the preload library can use them anywhere.
//!
//! Request (`REQUEST_LEN` bytes exactly):
//! ```text
//!  0 u32 magic "GRFT"     4 u16 version       6 u16 op (1 = socket, 2 = lookup,
//!                                                   3 = socket batch, 5 = rules,
//!                                                   6 = attach)
//!  8 [u8;16] endpoint name, NUL-padded
//! 24 i32 family          28 i32 type (no flags) 32 i32 protocol
//! 36 u16 purpose (0 = ingress, 1 = egress)     38 u16 option count
//! 40 options[MAX_OPTS], each: i32 level, i32 name, u32 len, [u8; 20] value
//! ```
//! Reply (`REPLY_LEN` bytes exactly; with the socket as SCM_RIGHTS on success):
//! ```text
//!  0 u32 magic   4 u16 version   6 u16 op
//!  8 i32 errno (0 = success)     12 u32 reason (see `Reason`)
//! 16 i32 option level, 20 i32 option name (of a refused option)
//! 24 u32 address length          28 [u8; 128] sockaddr (bound address)
//! ```
//!
//! `SocketDual` (op 4, ingress only) asks for one dual-stack listener: an
//! AF_INET6 socket bound to the IPv4 endpoint named in the header (as
//! `[::ffff:A4]:P4`, so it takes IPv4 connections) that also answers IPv6
//! connections to a second, IPv6 endpoint, through graft-ebpf's sk_lookup
//! program; graftd makes it listen before handing it out. The IPv6
//! endpoint's name travels as the first option record, with level
//! [`DUAL_LEVEL`] and the NUL-padded name as value; [`Request::options`]
//! leaves that record out. A graftd that cannot steer answers
//! [`Reason::NoDualStack`].
//!
//! `SocketBatch` asks for up to [`BATCH_MAX`] egress sockets made exactly
//! as one `Socket` request would make them (a per-process prefetch pool in
//! the preload library). Its request must have purpose egress and no
//! options (decoding refuses anything else); its reply has the layout
//! above, the address being the first socket's, and carries between 1 and
//! [`BATCH_MAX`] sockets in one SCM_RIGHTS message: the receiver counts
//! them from the control message, and asks each one for its own address.
//!
//! `Rules` asks for the namespace's own mapping rules (see
//! [`crate::nsrules`]). Its request is all zero after the op (no endpoint,
//! family, type, protocol, purpose or option); its success reply carries no
//! address and exactly one descriptor: a sealed memfd holding the rules blob
//! ([`crate::nsrules::NsRules::from_blob`]), with empty lists when the
//! namespace has no rules.
//!
//! `Attach` (seccomp mode, see [`Attach`]) has its own request layout of the
//! same size and the reply above (no socket): the `graft` launcher hands
//! graftd its seccomp listener and the rules to serve it with.

use libc::c_int;

use crate::le::{u16_at, u32_at};
use crate::name::{EndpointName, MAX_NAME_LEN};

pub const MAGIC: u32 = u32::from_le_bytes(*b"GRFT");
pub const VERSION: u16 = 1;
/// Most options one request carries.
pub const MAX_OPTS: usize = 64;
/// Largest option value.
pub const OPT_VALUE_MAX: usize = 20;
const OPT_LEN: usize = 12 + OPT_VALUE_MAX;
const HEADER_LEN: usize = 40;
/// Size of every request.
pub const REQUEST_LEN: usize = HEADER_LEN + MAX_OPTS * OPT_LEN;
/// Size of the address field of a reply.
pub const ADDR_MAX: usize = 128;
/// Size of every reply.
pub const REPLY_LEN: usize = 28 + ADDR_MAX;
/// Most sockets one `SocketBatch` reply carries.
pub const BATCH_MAX: usize = 32;
/// Sockets in graftd's first `SocketBatch` reply on a broker connection;
/// each further batch on the same connection doubles, up to [`BATCH_MAX`].
/// A process that makes one connection gets few spare sockets; one that
/// churns pays a round trip per 32 connections, not per 8.
pub const BATCH_FIRST: usize = 8;
/// Level of the option record carrying a `SocketDual` request's IPv6
/// endpoint name (no socket option has a negative level).
pub const DUAL_LEVEL: c_int = -0x4752;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A socket bound to the endpoint.
    Socket = 1,
    /// Whether the endpoint exists (and its address); no socket.
    Lookup = 2,
    /// Up to [`BATCH_MAX`] egress sockets without options, in one reply.
    SocketBatch = 3,
    /// One dual-stack listener answering on an IPv4 and an IPv6 endpoint.
    SocketDual = 4,
    /// The namespace's mapping rules, as a sealed memfd.
    Rules = 5,
    /// A seccomp listener to serve with these rules ([`Attach`]).
    Attach = 6,
}

/// Which side of the application asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A `bind()`/`listen()` was grafted: a server socket.
    Ingress = 0,
    /// A `connect()`/`sendto()` was grafted: a client socket.
    Egress = 1,
}

/// Why a request failed, beyond its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None = 0,
    /// The record is not a valid request.
    Malformed = 1,
    /// No endpoint of that name in the caller's namespace.
    NoEndpoint = 2,
    /// An option in the request is refused (see the option fields).
    OptionRefused = 3,
    /// The socket family does not fit the endpoint's address.
    FamilyMismatch = 4,
    /// Creating, configuring or binding the socket in the target namespace failed.
    SocketFailed = 5,
    /// Policy refused the request.
    Policy = 6,
    /// A `SocketDual` request graftd cannot serve (no eBPF companion or
    /// sk_lookup, endpoints of other types or target namespaces).
    NoDualStack = 7,
    /// The endpoint already has as many live sockets as its limit allows.
    Limit = 8,
}

impl Reason {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Reason::None,
            1 => Reason::Malformed,
            2 => Reason::NoEndpoint,
            3 => Reason::OptionRefused,
            4 => Reason::FamilyMismatch,
            5 => Reason::SocketFailed,
            6 => Reason::Policy,
            7 => Reason::NoDualStack,
            8 => Reason::Limit,
            _ => return None,
        })
    }

    /// A short description for logs and error lines.
    pub fn describe(self) -> &'static str {
        match self {
            Reason::None => "ok",
            Reason::Malformed => "malformed request",
            Reason::NoEndpoint => "no such endpoint in this network namespace",
            Reason::OptionRefused => "socket option refused",
            Reason::FamilyMismatch => "address family does not fit the endpoint",
            Reason::SocketFailed => "creating or binding the host socket failed",
            Reason::Policy => "refused by policy",
            Reason::NoDualStack => "a dual-stack listener is not available",
            Reason::Limit => "the endpoint's live socket limit is reached",
        }
    }
}

/// One socket option value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptValue {
    pub level: c_int,
    pub name: c_int,
    pub len: u32,
    pub value: [u8; OPT_VALUE_MAX],
}

impl OptValue {
    pub const EMPTY: OptValue = OptValue {
        level: 0,
        name: 0,
        len: 0,
        value: [0; OPT_VALUE_MAX],
    };

    /// The meaningful bytes of the value.
    pub fn bytes(&self) -> &[u8] {
        &self.value[..(self.len as usize).min(OPT_VALUE_MAX)]
    }

    /// The value as an int, when it is one.
    pub fn as_int(&self) -> Option<c_int> {
        (self.len as usize == 4).then(|| {
            c_int::from_le_bytes([self.value[0], self.value[1], self.value[2], self.value[3]])
        })
    }
}

/// A decoded broker request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub endpoint: EndpointName,
    pub family: c_int,
    pub sotype: c_int,
    pub protocol: c_int,
    pub purpose: Purpose,
    pub nopts: usize,
    pub opts: [OptValue; MAX_OPTS],
}

/// Why a record is not a valid request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {0} bytes, expected {1}")]
    Size(usize, usize),
    #[error("bad magic")]
    Magic,
    #[error("unsupported version {0}")]
    Version(u16),
    #[error("unknown op {0}")]
    Op(u16),
    #[error("bad endpoint name")]
    Name,
    #[error("unknown purpose {0}")]
    Purpose(u16),
    #[error("{0} options (at most {MAX_OPTS})")]
    OptCount(u16),
    #[error("option {0} has length {1} (at most {OPT_VALUE_MAX})")]
    OptLen(usize, u32),
    #[error("a socket batch must be for egress and carry no options")]
    Batch,
    #[error("a dual-stack request must be for ingress and name its IPv6 endpoint first")]
    Dual,
    #[error("a rules request carries nothing after its op")]
    Rules,
    #[error("unused bytes are not zero")]
    Padding,
    #[error("unknown failure reason {0}")]
    Reason(u32),
    #[error("address length {0} (at most {ADDR_MAX})")]
    AddrLen(u32),
    #[error("unknown attach flags {0:#x}")]
    Flags(u32),
    #[error("rule text of {0} bytes does not fit (at most {ATTACH_TEXT_MAX})")]
    TextLen(usize),
    #[error("rule text is not valid")]
    AttachRules,
}

fn rd_i32(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}
fn wr(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn check_head(b: &[u8], want_len: usize) -> Result<u16, DecodeError> {
    if b.len() != want_len {
        return Err(DecodeError::Size(b.len(), want_len));
    }
    if u32_at(b, 0) != MAGIC {
        return Err(DecodeError::Magic);
    }
    let v = u16_at(b, 4);
    if v != VERSION {
        return Err(DecodeError::Version(v));
    }
    Ok(u16_at(b, 6))
}

fn op_from(v: u16) -> Result<Op, DecodeError> {
    match v {
        1 => Ok(Op::Socket),
        2 => Ok(Op::Lookup),
        3 => Ok(Op::SocketBatch),
        4 => Ok(Op::SocketDual),
        5 => Ok(Op::Rules),
        6 => Ok(Op::Attach),
        _ => Err(DecodeError::Op(v)),
    }
}

impl Request {
    /// A request with no options.
    pub fn new(
        op: Op,
        endpoint: EndpointName,
        family: c_int,
        sotype: c_int,
        protocol: c_int,
        purpose: Purpose,
    ) -> Self {
        Request {
            op,
            endpoint,
            family,
            sotype,
            protocol,
            purpose,
            nopts: 0,
            opts: [OptValue::EMPTY; MAX_OPTS],
        }
    }

    /// A `Rules` request. Its record has no endpoint name; the decoded
    /// request carries the placeholder name `-`, which no lookup uses.
    pub fn rules() -> Self {
        // "-" is one byte of the allowed alphabet: from_bytes cannot fail.
        let placeholder = EndpointName::from_bytes(b"-").expect("valid placeholder name");
        Request::new(Op::Rules, placeholder, 0, 0, 0, Purpose::Ingress)
    }

    /// Adds an option; false when the request is full or the value too long.
    pub fn push_opt(&mut self, level: c_int, name: c_int, value: &[u8]) -> bool {
        if self.nopts >= MAX_OPTS || value.len() > OPT_VALUE_MAX {
            return false;
        }
        let mut v = OptValue {
            level,
            name,
            len: value.len() as u32,
            value: [0; OPT_VALUE_MAX],
        };
        v.value[..value.len()].copy_from_slice(value);
        self.opts[self.nopts] = v;
        self.nopts += 1;
        true
    }

    /// A `SocketDual` request for a listener on `v4` (the socket's
    /// endpoint) that also answers on `v6`.
    pub fn new_dual(
        v4: EndpointName,
        v6: EndpointName,
        family: c_int,
        sotype: c_int,
        protocol: c_int,
    ) -> Self {
        let mut r = Request::new(
            Op::SocketDual,
            v4,
            family,
            sotype,
            protocol,
            Purpose::Ingress,
        );
        // Always fits: the request is empty and a name is at most 15 bytes.
        r.push_opt(DUAL_LEVEL, 0, v6.as_bytes());
        r
    }

    /// The IPv6 endpoint of a `SocketDual` request.
    pub fn dual(&self) -> Option<EndpointName> {
        if self.op != Op::SocketDual || self.nopts == 0 || self.opts[0].level != DUAL_LEVEL {
            return None;
        }
        let o = &self.opts[0];
        if o.name != 0 {
            return None;
        }
        EndpointName::from_bytes(o.bytes()).ok()
    }

    /// The socket options carried (without a `SocketDual` name record).
    pub fn options(&self) -> &[OptValue] {
        let skip = usize::from(self.op == Op::SocketDual).min(self.nopts);
        &self.opts[skip..self.nopts]
    }

    /// Encodes into `out`.
    pub fn encode(&self, out: &mut [u8; REQUEST_LEN]) {
        out.fill(0);
        wr(out, 0, &MAGIC.to_le_bytes());
        wr(out, 4, &VERSION.to_le_bytes());
        wr(out, 6, &(self.op as u16).to_le_bytes());
        if self.op != Op::Rules {
            wr(out, 8, self.endpoint.as_bytes());
        }
        wr(out, 24, &self.family.to_le_bytes());
        wr(out, 28, &self.sotype.to_le_bytes());
        wr(out, 32, &self.protocol.to_le_bytes());
        wr(out, 36, &(self.purpose as u16).to_le_bytes());
        wr(out, 38, &(self.nopts as u16).to_le_bytes());
        // Every record, a `SocketDual` request's name record included.
        for (i, o) in self.opts[..self.nopts].iter().enumerate() {
            let at = HEADER_LEN + i * OPT_LEN;
            wr(out, at, &o.level.to_le_bytes());
            wr(out, at + 4, &o.name.to_le_bytes());
            wr(out, at + 8, &o.len.to_le_bytes());
            wr(out, at + 12, &o.value);
        }
    }

    /// Decodes and validates a request record. Everything is checked: size,
    /// magic, version, op, name, purpose, option count and lengths, and that
    /// every byte not covered by a field is zero.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let op = op_from(check_head(b, REQUEST_LEN)?)?;
        if op == Op::Attach {
            return Err(DecodeError::Op(op as u16));
        }
        if op == Op::Rules {
            return if b[8..].iter().all(|&c| c == 0) {
                Ok(Request::rules())
            } else {
                Err(DecodeError::Rules)
            };
        }
        let raw_name = &b[8..8 + 16];
        let n = raw_name.iter().position(|&c| c == 0).unwrap_or(16);
        if n > MAX_NAME_LEN || raw_name[n..].iter().any(|&c| c != 0) {
            return Err(DecodeError::Name);
        }
        let endpoint = EndpointName::from_bytes(&raw_name[..n]).map_err(|_| DecodeError::Name)?;
        let purpose = match u16_at(b, 36) {
            0 => Purpose::Ingress,
            1 => Purpose::Egress,
            v => return Err(DecodeError::Purpose(v)),
        };
        let nopts = u16_at(b, 38);
        if nopts as usize > MAX_OPTS {
            return Err(DecodeError::OptCount(nopts));
        }
        if op == Op::SocketBatch && (purpose != Purpose::Egress || nopts != 0) {
            return Err(DecodeError::Batch);
        }
        let mut req = Request::new(
            op,
            endpoint,
            rd_i32(b, 24),
            rd_i32(b, 28),
            rd_i32(b, 32),
            purpose,
        );
        for i in 0..MAX_OPTS {
            let at = HEADER_LEN + i * OPT_LEN;
            let rec = &b[at..at + OPT_LEN];
            if i >= nopts as usize {
                if rec.iter().any(|&c| c != 0) {
                    return Err(DecodeError::Padding);
                }
                continue;
            }
            let len = u32_at(b, at + 8);
            if len as usize > OPT_VALUE_MAX {
                return Err(DecodeError::OptLen(i, len));
            }
            if rec[12 + len as usize..].iter().any(|&c| c != 0) {
                return Err(DecodeError::Padding);
            }
            let mut v = OptValue {
                level: rd_i32(b, at),
                name: rd_i32(b, at + 4),
                len,
                value: [0; OPT_VALUE_MAX],
            };
            v.value.copy_from_slice(&rec[12..]);
            req.opts[i] = v;
        }
        req.nopts = nopts as usize;
        if op == Op::SocketDual && (purpose != Purpose::Ingress || req.dual().is_none()) {
            return Err(DecodeError::Dual);
        }
        Ok(req)
    }
}

/// A decoded broker reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub op: Op,
    /// 0 on success, else the errno the application's call should fail with.
    pub errno: c_int,
    pub reason: Reason,
    /// The refused option, when `reason` is `OptionRefused`.
    pub opt_level: c_int,
    pub opt_name: c_int,
    /// The bound address (a raw `sockaddr`), on success.
    pub addr_len: u32,
    pub addr: [u8; ADDR_MAX],
}

impl Reply {
    /// A success reply carrying the raw bound address.
    pub fn ok(op: Op, addr: &[u8]) -> Self {
        let mut r = Reply::err(op, 0, Reason::None);
        let n = addr.len().min(ADDR_MAX);
        r.addr[..n].copy_from_slice(&addr[..n]);
        r.addr_len = n as u32;
        r
    }

    /// A failure reply.
    pub fn err(op: Op, errno: c_int, reason: Reason) -> Self {
        Reply {
            op,
            errno,
            reason,
            opt_level: 0,
            opt_name: 0,
            addr_len: 0,
            addr: [0; ADDR_MAX],
        }
    }

    /// The raw bound address.
    pub fn addr_bytes(&self) -> &[u8] {
        &self.addr[..(self.addr_len as usize).min(ADDR_MAX)]
    }

    pub fn encode(&self, out: &mut [u8; REPLY_LEN]) {
        out.fill(0);
        wr(out, 0, &MAGIC.to_le_bytes());
        wr(out, 4, &VERSION.to_le_bytes());
        wr(out, 6, &(self.op as u16).to_le_bytes());
        wr(out, 8, &self.errno.to_le_bytes());
        wr(out, 12, &(self.reason as u32).to_le_bytes());
        wr(out, 16, &self.opt_level.to_le_bytes());
        wr(out, 20, &self.opt_name.to_le_bytes());
        wr(out, 24, &self.addr_len.to_le_bytes());
        wr(out, 28, &self.addr);
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let op = op_from(check_head(b, REPLY_LEN)?)?;
        let reason = Reason::from_u32(u32_at(b, 12)).ok_or(DecodeError::Reason(u32_at(b, 12)))?;
        let addr_len = u32_at(b, 24);
        if addr_len as usize > ADDR_MAX {
            return Err(DecodeError::AddrLen(addr_len));
        }
        let mut addr = [0u8; ADDR_MAX];
        addr.copy_from_slice(&b[28..28 + ADDR_MAX]);
        Ok(Reply {
            op,
            errno: rd_i32(b, 8),
            reason,
            opt_level: rd_i32(b, 16),
            opt_name: rd_i32(b, 20),
            addr_len,
            addr,
        })
    }
}

/// Room for the rule text of an [`Attach`] record.
pub const ATTACH_TEXT_MAX: usize = REQUEST_LEN - ATTACH_HEADER_LEN;
const ATTACH_HEADER_LEN: usize = 24;
/// [`Attach::flags`]: graftd reports every graft on the program's stderr.
pub const ATTACH_VERBOSE: u32 = 1;

/// The launcher hands graftd its seccomp listener (`Op::Attach`).
///
/// The listener is not passed with SCM_RIGHTS: `sendmsg` is one of the
/// calls the filter traps, and nobody would answer it yet. graftd takes it
/// with `pidfd_getfd` from the peer of the connection instead (so a
/// process can only hand over its own descriptors). Layout, `REQUEST_LEN`
/// bytes, little-endian:
/// ```text
///  0 u32 magic   4 u16 version   6 u16 op = 6
///  8 i32 listener descriptor number in the sender
/// 12 u32 flags (ATTACH_VERBOSE)
/// 16 u16 ingress text length  18 u16 egress text length
/// 20 u16 exclude text length  22 u16 zero
/// 24 the three texts, back to back, in the syntax of the GRAFT_* variables;
///    then zeros
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub listener_fd: i32,
    pub flags: u32,
    pub ingress: String,
    pub egress: String,
    pub exclude: String,
}

impl Attach {
    /// Encodes into `out`; `TextLen` when the rules do not fit.
    pub fn encode(&self, out: &mut [u8; REQUEST_LEN]) -> Result<(), DecodeError> {
        let total = self.ingress.len() + self.egress.len() + self.exclude.len();
        if total > ATTACH_TEXT_MAX {
            return Err(DecodeError::TextLen(total));
        }
        out.fill(0);
        wr(out, 0, &MAGIC.to_le_bytes());
        wr(out, 4, &VERSION.to_le_bytes());
        wr(out, 6, &(Op::Attach as u16).to_le_bytes());
        wr(out, 8, &self.listener_fd.to_le_bytes());
        wr(out, 12, &self.flags.to_le_bytes());
        let mut at = ATTACH_HEADER_LEN;
        for (i, t) in [&self.ingress, &self.egress, &self.exclude]
            .iter()
            .enumerate()
        {
            wr(out, 16 + 2 * i, &(t.len() as u16).to_le_bytes());
            wr(out, at, t.as_bytes());
            at += t.len();
        }
        Ok(())
    }

    /// Decodes strictly: size, header, flags, lengths, UTF-8, zero padding,
    /// and rule texts that parse.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let op = op_from(check_head(b, REQUEST_LEN)?)?;
        if op != Op::Attach {
            return Err(DecodeError::Op(op as u16));
        }
        let listener_fd = rd_i32(b, 8);
        if listener_fd < 0 {
            return Err(DecodeError::Padding);
        }
        let flags = u32_at(b, 12);
        if flags & !ATTACH_VERBOSE != 0 {
            return Err(DecodeError::Flags(flags));
        }
        if u16_at(b, 22) != 0 {
            return Err(DecodeError::Padding);
        }
        let lens = [u16_at(b, 16), u16_at(b, 18), u16_at(b, 20)].map(usize::from);
        let total: usize = lens.iter().sum();
        if total > ATTACH_TEXT_MAX {
            return Err(DecodeError::TextLen(total));
        }
        if b[ATTACH_HEADER_LEN + total..].iter().any(|&c| c != 0) {
            return Err(DecodeError::Padding);
        }
        let mut at = ATTACH_HEADER_LEN;
        let mut texts = [String::new(), String::new(), String::new()];
        for (t, n) in texts.iter_mut().zip(lens) {
            let s = std::str::from_utf8(&b[at..at + n]).map_err(|_| DecodeError::AttachRules)?;
            if s.contains('\0') {
                return Err(DecodeError::AttachRules);
            }
            *t = s.to_owned();
            at += n;
        }
        let [ingress, egress, exclude] = texts;
        let a = Attach {
            listener_fd,
            flags,
            ingress,
            egress,
            exclude,
        };
        a.rules()?;
        Ok(a)
    }

    /// The rules the texts hold.
    pub fn rules(&self) -> Result<crate::rules::RuleSet, DecodeError> {
        crate::rules::RuleSet::from_env_values(
            Some(&self.ingress),
            Some(&self.egress),
            Some(&self.exclude),
        )
        .map_err(|_| DecodeError::AttachRules)
    }
}

#[cfg(test)]
mod dual_tests {
    use super::*;

    #[test]
    fn dual_request_round_trips_and_hides_its_name_record() {
        let v4 = EndpointName::new("ep-in4").unwrap();
        let v6 = EndpointName::new("ep-in6").unwrap();
        let mut r = Request::new_dual(v4, v6, libc::AF_INET6, libc::SOCK_STREAM, 6);
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_ne_bytes()));
        let mut b = [0u8; REQUEST_LEN];
        r.encode(&mut b);
        let d = Request::decode(&b).unwrap();
        assert_eq!((d.op, d.endpoint, d.dual()), (Op::SocketDual, v4, Some(v6)));
        assert_eq!(d.options().len(), 1);
        assert_eq!(d.options()[0].name, libc::SO_REUSEADDR);
        // Egress, or no name record: refused.
        let mut e = r.clone();
        e.purpose = Purpose::Egress;
        e.encode(&mut b);
        assert_eq!(Request::decode(&b).unwrap_err(), DecodeError::Dual);
        let n = Request::new(
            Op::SocketDual,
            v4,
            libc::AF_INET6,
            libc::SOCK_STREAM,
            6,
            Purpose::Ingress,
        );
        n.encode(&mut b);
        assert_eq!(Request::decode(&b).unwrap_err(), DecodeError::Dual);
        // A plain request never has a dual endpoint.
        assert_eq!(
            Request::new(Op::Socket, v4, 10, 1, 6, Purpose::Ingress).dual(),
            None
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_round_trips_and_is_strict() {
        let a = Attach {
            listener_fd: 5,
            flags: ATTACH_VERBOSE,
            ingress: "0.0.0.0:80=ep-in4".into(),
            egress: "0.0.0.0/0=ep-out4 ::/0=ep-out6".into(),
            exclude: "10.0.0.0/8".into(),
        };
        let mut buf = [0u8; REQUEST_LEN];
        a.encode(&mut buf).unwrap();
        assert_eq!(Attach::decode(&buf).unwrap(), a);
        assert_eq!(a.rules().unwrap().egress.len(), 3);
        assert_eq!(Request::decode(&buf), Err(DecodeError::Op(6)));
        let mut b = buf;
        b[12] = 2;
        assert_eq!(Attach::decode(&b), Err(DecodeError::Flags(2)));
        let mut b = buf;
        b[REQUEST_LEN - 1] = 1;
        assert_eq!(Attach::decode(&b), Err(DecodeError::Padding));
        let mut b = buf;
        b[24] = b'x';
        assert_eq!(Attach::decode(&b), Err(DecodeError::AttachRules));
        let mut b = buf;
        b[16] = 0xff;
        b[17] = 0xff;
        assert!(matches!(Attach::decode(&b), Err(DecodeError::TextLen(_))));
        let mut b = buf;
        b[11] = 0x80;
        assert_eq!(Attach::decode(&b), Err(DecodeError::Padding), "negative fd");
        let mut req = [0u8; REQUEST_LEN];
        sample().encode(&mut req);
        assert_eq!(Attach::decode(&req), Err(DecodeError::Op(1)));
        let long = Attach {
            egress: "0.0.0.0/0=ep ".repeat(200),
            ..a
        };
        assert!(matches!(
            long.encode(&mut buf),
            Err(DecodeError::TextLen(_))
        ));
    }

    fn sample() -> Request {
        let mut r = Request::new(
            Op::Socket,
            EndpointName::new("ep-in4").unwrap(),
            libc::AF_INET,
            libc::SOCK_STREAM,
            0,
            Purpose::Ingress,
        );
        assert!(r.push_opt(libc::SOL_SOCKET, libc::SO_REUSEADDR, &1i32.to_le_bytes()));
        r
    }

    #[test]
    fn request_round_trips() {
        let r = sample();
        let mut buf = [0u8; REQUEST_LEN];
        r.encode(&mut buf);
        assert_eq!(Request::decode(&buf).unwrap(), r);
    }

    #[test]
    fn request_rejects_bad_records() {
        let mut buf = [0u8; REQUEST_LEN];
        sample().encode(&mut buf);
        assert_eq!(
            Request::decode(&buf[..10]),
            Err(DecodeError::Size(10, REQUEST_LEN))
        );
        let mut big = buf.to_vec();
        big.push(0);
        assert!(matches!(Request::decode(&big), Err(DecodeError::Size(..))));
        let mut b = buf;
        b[0] ^= 1;
        assert_eq!(Request::decode(&b), Err(DecodeError::Magic));
        let mut b = buf;
        b[6] = 9;
        assert_eq!(Request::decode(&b), Err(DecodeError::Op(9)));
        let mut b = buf;
        b[8] = b' ';
        assert_eq!(Request::decode(&b), Err(DecodeError::Name));
        let mut b = buf;
        b[38] = 200;
        assert_eq!(Request::decode(&b), Err(DecodeError::OptCount(200)));
        let mut b = buf;
        b[HEADER_LEN + 8] = 99;
        assert_eq!(Request::decode(&b), Err(DecodeError::OptLen(0, 99)));
        let mut b = buf;
        b[REQUEST_LEN - 1] = 1;
        assert_eq!(Request::decode(&b), Err(DecodeError::Padding));
        let mut b = buf;
        b[8..24].fill(0);
        assert_eq!(Request::decode(&b), Err(DecodeError::Name));
    }

    #[test]
    fn socket_batch_is_egress_without_options() {
        let mut r = Request::new(
            Op::SocketBatch,
            EndpointName::new("ep-out").unwrap(),
            libc::AF_INET6,
            libc::SOCK_STREAM,
            libc::IPPROTO_TCP,
            Purpose::Egress,
        );
        let mut buf = [0u8; REQUEST_LEN];
        r.encode(&mut buf);
        assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), 3);
        assert_eq!(Request::decode(&buf).unwrap(), r);
        let mut b = buf;
        b[36] = 0;
        assert_eq!(Request::decode(&b), Err(DecodeError::Batch), "ingress");
        let mut b = buf;
        b[36] = 7;
        assert_eq!(Request::decode(&b), Err(DecodeError::Purpose(7)));
        assert!(r.push_opt(libc::IPPROTO_TCP, libc::TCP_NODELAY, &1i32.to_le_bytes()));
        r.encode(&mut buf);
        assert_eq!(Request::decode(&buf), Err(DecodeError::Batch), "options");
        let mut b = buf;
        b[6] = 9;
        assert_eq!(Request::decode(&b), Err(DecodeError::Op(9)));

        let rep = Reply::ok(Op::SocketBatch, &[2, 0, 0x1f, 0x90, 127, 0, 0, 1]);
        let mut out = [0u8; REPLY_LEN];
        rep.encode(&mut out);
        assert_eq!(Reply::decode(&out).unwrap(), rep);
    }

    #[test]
    fn rules_request_is_bare() {
        let r = Request::rules();
        let mut buf = [0u8; REQUEST_LEN];
        r.encode(&mut buf);
        assert_eq!(u16::from_le_bytes([buf[6], buf[7]]), 5);
        assert!(buf[8..].iter().all(|&c| c == 0));
        assert_eq!(Request::decode(&buf).unwrap(), r);
        for at in [8, 24, 36, 38, REQUEST_LEN - 1] {
            let mut b = buf;
            b[at] = 1;
            assert_eq!(Request::decode(&b), Err(DecodeError::Rules), "byte {at}");
        }
        let rep = Reply::ok(Op::Rules, &[]);
        let mut out = [0u8; REPLY_LEN];
        rep.encode(&mut out);
        assert_eq!(Reply::decode(&out).unwrap(), rep);
    }

    #[test]
    fn reply_round_trips() {
        let r = Reply::ok(Op::Socket, &[2, 0, 0x1f, 0x90, 127, 0, 0, 1]);
        let mut buf = [0u8; REPLY_LEN];
        r.encode(&mut buf);
        let d = Reply::decode(&buf).unwrap();
        assert_eq!(d, r);
        assert_eq!(d.addr_bytes(), &[2, 0, 0x1f, 0x90, 127, 0, 0, 1]);
        let mut b = buf;
        b[24] = 200;
        assert_eq!(Reply::decode(&b), Err(DecodeError::AddrLen(200)));
    }
}
