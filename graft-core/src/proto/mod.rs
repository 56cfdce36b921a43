//! Wire protocols spoken with graftd.
//!
//! * [`control`]: `ip graft` ↔ graftd, JSON records over graftd's root-only
//!   `SOCK_SEQPACKET` control socket, each carrying the caller's network
//!   namespace (and the target namespace) as file descriptors.
//! * [`broker`]: preload library ↔ graftd, fixed-size binary records over the
//!   per-namespace abstract `SOCK_SEQPACKET` socket; a reply to a successful
//!   socket request carries the socket itself (SCM_RIGHTS).
//!
//! Both are message-oriented so every record arrives whole or not at all; a
//! receiver reads with a buffer one byte larger than the largest valid record
//! and `MSG_TRUNC` to reject oversized ones.

pub mod broker;
pub mod control;
