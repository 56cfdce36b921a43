/* Layouts shared by the eBPF programs and the Rust loader (src/maps.rs mirrors
 * every struct here field for field; change both together). */
#ifndef GRAFT_H
#define GRAFT_H

#include <linux/types.h>

/* Most allow/deny clauses one endpoint's policy may hold (a power of two: the
 * program masks its index with it). The policy check walks them with
 * bpf_loop; the loader refuses longer policies. */
#define GRAFT_MAX_RULES 32

#define GRAFT_FAMILY_V4 4
#define GRAFT_FAMILY_V6 6

#define GRAFT_ALLOW 1
#define GRAFT_DENY 2

/* Per-socket marker, in a BPF_F_CLONE socket-local storage: graftd sets it on
 * every socket it hands out, and the kernel copies it onto every connection
 * accepted from a marked listener. A socket without it is not grafted and is
 * never touched. */
struct graft_sk {
	__u32 endpoint; /* graftd's endpoint id (never 0) */
	__u32 flags;
	/* Socket cookie of the socket graftd handed out (GRAFT_SK_HANDED):
	 * accepted children inherit this record but not the cookie, so only
	 * the handed-out socket itself frees a slot of its endpoint's limit. */
	__u64 cookie;
};

/* graft_sk.flags */
/* This socket's sending direction went through TCP at least once (or may
 * have, e.g. data in the SYN): it must never switch to redirection, or the
 * peer could read later bytes before earlier ones. */
#define GRAFT_SK_NO_SPLICE 1u
/* Counted at establishment: the close accounting applies. */
#define GRAFT_SK_ESTABLISHED 2u
/* Byte accounting: established by connect(). */
#define GRAFT_SK_ACTIVE 4u
/* 8 and 16 were "our FIN went out" and "the peer's FIN came in", now told
 * by the state a connection ends from; sockets marked by an older graftd
 * may still carry them: not reused. */
/* graftd handed this socket out and counts it against its endpoint's limit
 * (graft_ep_val.handed); its release is counted in graft_counters.released. */
#define GRAFT_SK_HANDED 32u
/* Its holder may read it with calls the preload library does not see (a
 * program graftd serves in seccomp mode), so it never joins the splice: a
 * blocking read of a spliced socket can fail with EAGAIN, which only the
 * library repeats. Accepted children inherit it from their listener. */
#define GRAFT_SK_NO_JOIN 64u

/* One clause: destination inside addr/mask (network order words; IPv4 uses
 * word 0 only) with a port in [port_lo, port_hi]. */
struct graft_rule {
	__u8 family;
	__u8 action;
	__u8 prefix_len;
	__u8 pad;
	__u16 port_lo;
	__u16 port_hi;
	__u32 addr[4];
	__u32 mask[4];
};

struct graft_policy {
	__u32 count;
	/* Whether any clause is an allow: then a destination no clause covers is
	 * denied. */
	__u32 has_allow;
	struct graft_rule rules[GRAFT_MAX_RULES];
};

/* Per-endpoint counters, updated with atomic adds. */
struct graft_counters {
	__u64 policy_denied;
	__u64 active_established;
	__u64 passive_established;
	__u64 bytes_sent;
	__u64 bytes_received;
	__u64 spliced_msgs;
	__u64 spliced_bytes;
	__u64 splice_refused; /* sockhash insertion failed (EBUSY: another owner) */
	__u64 released; /* handed-out sockets closed (cgroup/sock_release) */
};

/* graft_ep_ids: graftd's endpoint ids, pinned so that a restarted graftd
 * gives every endpoint the id its open sockets carry. Only user space reads
 * and writes it. */
struct graft_ep_key {
	__u64 netns_dev;
	__u64 netns_ino;
	__u8 name[16]; /* NUL-padded */
};

struct graft_ep_val {
	__u32 id;
	__u32 pad;
	/* Sockets handed out (user space counts); live = handed - released. */
	__u64 handed;
};

/* Key of the splice socket hash: one established TCP socket, seen from its
 * own side. v4-mapped IPv6 connections are stored as IPv4, so a dual-stack
 * socket and a plain IPv4 peer find each other. */
struct graft_sock_key {
	__u64 netns;
	__u32 family;
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
	__u32 pad;
	__u32 local_ip[4];
	__u32 remote_ip[4];
};

/* Key of graft_listeners: a grafted TCP listener's address, so that a
 * grafted client's connection joins the splice only when its peer can join
 * too. v4-mapped addresses are stored as IPv4; an unspecified address is all
 * zero (an IPv6 wildcard listener also takes IPv4 connections, and is looked
 * up for them). */
struct graft_listen_key {
	__u64 netns;
	__u32 family;
	__u32 port; /* host order */
	__u32 ip[4];
};

/* graft_app_opts: what an inet socket of a watched program was made as,
 * and which carried options were set on it since. */
struct graft_app_sock {
	__u64 set;      /* bit i: graft_core::sockopt::SNAPSHOT[i] was set */
	__u64 netns;    /* netns cookie of the namespace it was made in */
	__u32 family;   /* 0: changed since (IPV6_ADDRFORM): ask the socket */
	__u32 type;
	__u32 protocol;
	__u32 pad;
};

/* Global (not per-endpoint) diagnostics, index 0 of an array. */
struct graft_global {
	__u64 last_splice_error; /* negative errno of the last failed insertion */
	__u64 splice_errors;
};

#endif
