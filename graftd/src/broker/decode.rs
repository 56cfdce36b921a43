//! Records to requests: a record is served only when it arrived whole,
//! without descriptors, and decodes strictly; anything else is answered as
//! malformed (with the op it seems to carry) and the connection stays open.

use graft_core::proto::broker::{Op, Reason, Reply, Request};
use graft_core::NetnsId;

use crate::sys::Received;

/// The op of a record that failed to decode, for the reply header.
pub fn guess_op(b: &[u8]) -> Op {
    match b.get(6..8).map(|o| u16::from_le_bytes([o[0], o[1]])) {
        Some(2) => Op::Lookup,
        Some(3) => Op::SocketBatch,
        Some(4) => Op::SocketDual,
        Some(5) => Op::Rules,
        Some(6) => Op::Attach,
        _ => Op::Socket,
    }
}

/// The reply to a record that cannot be a request whatever it holds
/// (truncated, or carrying descriptors or more control data than fits).
pub fn unusable(ns: NetnsId, rx: &Received, rec: &[u8]) -> Option<Reply> {
    if !(rx.truncated || !rx.fds.is_empty() || rx.ctrunc) {
        return None;
    }
    log::debug!(
        "broker for {ns}: malformed record ({} bytes, {} descriptors attached)",
        rx.len,
        rx.fds.len()
    );
    Some(malformed(rec))
}

/// The request a record holds; `None` (logged) when it does not decode.
pub fn request(ns: NetnsId, rec: &[u8]) -> Option<Request> {
    Request::decode(rec)
        .map_err(|e| log::debug!("broker for {ns}: malformed request: {e}"))
        .ok()
}

/// The reply to a record that is not a request.
pub fn malformed(rec: &[u8]) -> Reply {
    Reply::err(guess_op(rec), libc::EINVAL, Reason::Malformed)
}
