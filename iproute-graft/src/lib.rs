//! The library half of iproute-graft: what `ip-graft` shares with other
//! clients of graftd's control socket (graft-cni).
//!
//! * [`client`]: one request and its reply over graftd's root-only
//!   `SOCK_SEQPACKET` control socket, namespaces passed as descriptors;
//! * [`netns`]: namespaces named the iproute2 way (pid, name, path);
//! * [`add`]: the `ip graft add` grammar, so every client spells an
//!   endpoint the same way and gets the same messages;
//! * [`args`]: iproute2's prefix matching and the usage error.
#![forbid(unsafe_code)]

pub mod add;
pub mod args;
pub mod client;
pub mod netns;
