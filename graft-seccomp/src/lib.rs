//! The unsafe kernel interfaces of graft's seccomp mode, kept in one small
//! crate so that the `graft` launcher stays `#![forbid(unsafe_code)]` and
//! graftd's unsafe surface stays reviewable.
//!
//! - [`filter`]: the BPF program that sends `bind`, `connect`, `sendto`
//!   (with an address), `sendmsg` and `sendmmsg` to a supervisor, and its
//!   installation with `SECCOMP_FILTER_FLAG_NEW_LISTENER`;
//! - [`notify`]: the listener's ioctls (receive, answer, check, add an fd);
//! - [`pidfd`]: `pidfd_open`, `pidfd_getfd`, and reading the trapped
//!   process's memory with `process_vm_readv`;
//! - [`sockopt`]: socket options by number with opaque values (graftd's
//!   socket factory and graft-ebpf's socket registry use it too).

pub mod filter;
pub mod notify;
pub mod pidfd;
pub mod sockopt;
