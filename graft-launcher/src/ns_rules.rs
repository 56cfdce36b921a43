//! Rules from graftd: `graft -- CMD` with no `-i`, `-e` or `-x` runs the
//! command with the rules graftd keeps for this network namespace (set with
//! the control protocol's `setrules`, e.g. by graft-cni for a Kubernetes
//! pod), fetched from the namespace's broker with one `Op::Rules` request.
//!
//! Flags win: with any of them given nothing is fetched. Rules already in
//! the environment (a `graft` inside a `graft`) also stop the fetch. When no
//! broker answers in this namespace, or graftd keeps no rules for it (or is
//! too old to keep any), the launcher behaves as it always did without
//! flags (with `-v`, one line says that nothing will be grafted).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};

use graft_core::nsrules::{NsRules, NsRulesError, MAX_BLOB};
use graft_core::proto::broker::{self, Op, Reason, Reply, Request, REPLY_LEN, REQUEST_LEN};
use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::args::Args;

/// How long graftd may take to answer (it answers from memory).
const REPLY_TIMEOUT_SECS: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("asking graftd's broker \"{name}\" for this namespace's rules: {op} failed: {err}")]
    Io {
        name: String,
        op: &'static str,
        err: Errno,
    },
    #[error("graftd's broker \"{0}\" closed the connection without sending the rules")]
    Closed(String),
    #[error("graftd's broker \"{name}\" sent an invalid rules reply: {why}")]
    BadReply { name: String, why: String },
    #[error("graftd's broker \"{name}\" refused to send this namespace's rules: {err}")]
    Refused { name: String, err: Errno },
    #[error("graftd sent invalid rules for this namespace: {0}")]
    BadRules(#[from] NsRulesError),
}

/// Whether the command line or the environment already gives rules.
fn has_rules(args: &Args, env: &dyn Fn(&str) -> Option<String>) -> bool {
    !args.ingress.is_empty()
        || !args.egress.is_empty()
        || !args.exclude.is_empty()
        || [
            graft_core::ENV_INGRESS,
            graft_core::ENV_EGRESS,
            graft_core::ENV_EGRESS_EXCLUDE,
        ]
        .iter()
        .any(|v| env(v).is_some_and(|s| !s.trim().is_empty()))
}

/// Fills `args` with the namespace's rules when it has none of its own.
pub fn fill(
    mut args: Args,
    broker_name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Args, RulesError> {
    if has_rules(&args, env) {
        return Ok(args);
    }
    let rules = match fetch(broker_name)? {
        Fetched::Rules(r) => r,
        Fetched::NoBroker => {
            if args.verbose {
                eprintln!(
                    "graft: no -i/-e/-x given and graftd's broker \"{broker_name}\" does not \
                     answer in this network namespace: nothing will be grafted"
                );
            }
            return Ok(args);
        }
        Fetched::NoRules => {
            if args.verbose {
                eprintln!(
                    "graft: no -i/-e/-x given and graftd keeps no rules for this network \
                     namespace (ip graft rules set ...): nothing will be grafted"
                );
            }
            return Ok(args);
        }
    };
    if args.verbose {
        let (i, e, x) = (
            rules.ingress.join(" "),
            rules.egress.join(" "),
            rules.exclude.join(" "),
        );
        eprintln!("graft: rules from graftd: ingress [{i}] egress [{e}] exclude [{x}]");
    }
    let set = rules.parse()?;
    args.ingress = set.ingress;
    let (egress, exclude) = set.egress.into_iter().partition(|r| r.endpoint.is_some());
    args.egress = egress;
    args.exclude = exclude;
    Ok(args)
}

/// What the broker said.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Rules(NsRules),
    /// No broker in this namespace (no graftd, or no endpoint here).
    NoBroker,
    /// graftd keeps no rules for this namespace, or predates them.
    NoRules,
}

/// The namespace's rules, as far as the broker knows them.
pub fn fetch(name: &str) -> Result<Fetched, RulesError> {
    let io = |op, err| RulesError::Io {
        name: name.to_owned(),
        op,
        err,
    };
    let bad = |why: String| RulesError::BadReply {
        name: name.to_owned(),
        why,
    };
    let Some(addr) = UnixAddr::new_abstract(name.as_bytes())
        .ok()
        .filter(|_| !name.is_empty())
    else {
        // The pre-flight check reports a bad name when rules name endpoints;
        // without rules there is nothing to ask.
        return Ok(Fetched::NoBroker);
    };
    let fd = crate::check::seqpacket().map_err(|e| io("socket", e))?;
    match socket::connect(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        // No graftd serves this namespace: the launcher's behaviour without rules.
        Err(Errno::ECONNREFUSED | Errno::ENOENT) => return Ok(Fetched::NoBroker),
        Err(e) => return Err(io("connect", e)),
    }
    socket::setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::seconds(REPLY_TIMEOUT_SECS),
    )
    .map_err(|e| io("setsockopt(SO_RCVTIMEO)", e))?;
    let mut out = [0u8; REQUEST_LEN];
    Request::rules().encode(&mut out);
    let sent =
        socket::send(fd.as_raw_fd(), &out, MsgFlags::MSG_NOSIGNAL).map_err(|e| io("send", e))?;
    if sent != REQUEST_LEN {
        return Err(io("send", Errno::EMSGSIZE));
    }
    let mut buf = [0u8; REPLY_LEN + 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let (n, truncated, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match socket::recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(io("waiting for the reply", Errno::ETIMEDOUT)),
            Err(e) => return Err(io("recvmsg", e)),
            Ok(m) => {
                let mut fds = Received(Vec::new());
                for c in m.cmsgs().map_err(|e| io("recvmsg", e))? {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        fds.0.extend(v);
                    }
                }
                let trunc = m
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                break (m.bytes, trunc, fds);
            }
        }
    };
    if n == 0 {
        return Err(RulesError::Closed(name.to_owned()));
    }
    if truncated || n != REPLY_LEN {
        return Err(bad(format!("record of {n} bytes, expected {REPLY_LEN}")));
    }
    let reply = Reply::decode(&buf[..n]).map_err(|e| bad(e.to_string()))?;
    // A graftd from before Op::Rules answers "malformed" (with a guessed op).
    if reply.errno == libc::EINVAL && reply.reason == Reason::Malformed {
        return Ok(Fetched::NoRules);
    }
    if reply.op != Op::Rules {
        return Err(bad(broker::DecodeError::Op(reply.op as u16).to_string()));
    }
    if reply.errno != 0 {
        return Err(RulesError::Refused {
            name: name.to_owned(),
            err: Errno::from_raw(reply.errno),
        });
    }
    let [memfd] = fds.0[..] else {
        return Err(bad(format!(
            "{} descriptors attached, expected 1",
            fds.0.len()
        )));
    };
    // graftd rewinds the memfd before passing it; one byte past the largest
    // blob shows an oversized one.
    let mut blob = vec![0u8; MAX_BLOB + 1];
    let mut len = 0;
    while len < blob.len() {
        match nix::unistd::read(memfd, &mut blob[len..]) {
            Ok(0) => break,
            Ok(k) => len += k,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io("reading the rules", e)),
        }
    }
    let rules = NsRules::from_blob(&blob[..len])?;
    Ok(if rules.is_empty() {
        Fetched::NoRules
    } else {
        Fetched::Rules(rules)
    })
}

/// Descriptors received with the reply, closed when done (the launcher
/// forbids unsafe code, so they stay raw).
struct Received(Vec<RawFd>);

impl Drop for Received {
    fn drop(&mut self) {
        for fd in &self.0 {
            let _ = nix::unistd::close(*fd);
        }
    }
}
