// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/* graft's kernel-side companion.
 *
 * graftd attaches these programs to a cgroup of its own. Every socket it hands
 * out was created by graftd, so it belongs to that cgroup wherever the program
 * using it runs, and connections accepted from a grafted listener inherit the
 * listener's cgroup. Sockets graftd has not marked (graft_sk_map) are left
 * alone by every program here.
 *
 *  - cgroup/connect4, connect6, sendmsg4, sendmsg6: the endpoint's egress
 *    policy (same semantics as graft_core::rules::policy_allows).
 *  - sockops: per-endpoint connection and byte counters, and (splicing on)
 *    insertion into graft_socks of established grafted sockets whose peer
 *    is a grafted socket of this host too (graft_listeners tells a client
 *    whether it connected to a grafted listener).
 *  - sk_msg (attached to graft_socks): redirects each send into the peer's
 *    receive queue when the peer is a grafted socket of this host too, and
 *    credits the bytes to both endpoints in steps (graft_splice_owed).
 *  - cgroup/sock_release: counts closed handed-out sockets, so graftd knows
 *    each endpoint's live sockets (its limit) without watching them.
 *  - cgroup/setsockopt: refuses, on grafted sockets, the options graftd
 *    refuses in broker requests (graft_core::sockopt's Class::Refuse list) (they would move the socket off the host
 *    addresses its endpoint grants). The kernel runs this hook by the
 *    socket's cgroup, not the caller's, so it sees the container processes
 *    that hold grafted sockets.
 *  - sk_lookup (attached to graftd's network namespace, not the cgroup):
 *    IPv6 connections for a dual-stack listener's IPv6 endpoint.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "graft.h"

#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#ifndef SOL_IP
#define SOL_IP 0
#endif
#ifndef SOL_IPV6
#define SOL_IPV6 41
#endif
/* asm-generic/socket.h: not reachable from a -target bpf build. */
#define GRAFT_SO_BINDTODEVICE 25
#define GRAFT_SO_MARK 36
#define GRAFT_SO_BINDTOIFINDEX 62
/* The hook sees at most this much of optval (the kernel's PAGE_SIZE; 4096 is
 * the smallest, and a larger page only makes the fallback below kick in for
 * options nobody sets that big). */
#define GRAFT_SOCKOPT_MAX 4096

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
/* include/net/tcp_states.h */
#define GRAFT_TCP_LISTEN 10
#define GRAFT_TCP_FIN_WAIT1 4
#define GRAFT_TCP_FIN_WAIT2 5
#define GRAFT_TCP_CLOSE 7
#define GRAFT_TCP_CLOSE_WAIT 8
#define GRAFT_TCP_LAST_ACK 9
#define GRAFT_TCP_CLOSING 11

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before loading: whether established sockets go into the
 * splice map (the verifier drops the dead branch when off). */
const volatile __u32 splice_enabled = 0;

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct graft_sk);
} graft_sk_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct graft_policy);
} graft_policy_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct graft_counters);
} graft_counters_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct graft_sock_key);
	__type(value, __u32);
} graft_socks SEC(".maps");

/* Endpoint of each socket in graft_socks, so that the sender's sk_msg can
 * credit the bytes it redirects to the receiving endpoint. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct graft_sock_key);
	__type(value, __u32);
} graft_sock_ep SEC(".maps");

/* What a spliced socket's sends owe the counters, credited in one go every
 * GRAFT_SPLICE_FLUSH_MSGS messages or GRAFT_SPLICE_FLUSH_BYTES bytes and
 * when its connection ends: a ping-pong pair's sends on two
 * CPUs would otherwise each pull both endpoints' shared counters across,
 * and look the peer up, once per message. Pinned, so that a graftd restart
 * loses nothing owed. Not BPF_F_CLONE: owed by this socket alone. */
struct graft_splice_owed {
	__u32 peer_ep; /* the receiving socket's endpoint; 0: not known yet */
	__u32 msgs;
	__u64 bytes;
};

#define GRAFT_SPLICE_FLUSH_MSGS 64
#define GRAFT_SPLICE_FLUSH_BYTES (1u << 20)

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct graft_splice_owed);
} graft_splice_owed_map SEC(".maps");

/* Grafted TCP listeners (splicing on), with how many listen there: a socket
 * in graft_socks costs every send and receive a detour through the sockmap
 * code even when nothing is redirected, so a client joins only when it
 * connected to one of these, and an accepted socket only when its client
 * joined. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct graft_listen_key);
	__type(value, __u32);
} graft_listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct graft_global);
} graft_global_map SEC(".maps");

/* Read and written by graftd only (pinned: they carry endpoint ids across
 * graftd restarts). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct graft_ep_key);
	__type(value, struct graft_ep_val);
} graft_ep_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} graft_next_id SEC(".maps");

static __always_inline struct graft_counters *counters(__u32 endpoint)
{
	return bpf_map_lookup_elem(&graft_counters_map, &endpoint);
}

/* Credits what a spliced socket of `endpoint` owes (see
 * graft_splice_owed) to its endpoint and its peer's, and clears it. */
static __always_inline void splice_flush(struct graft_splice_owed *o, __u32 endpoint)
{
	struct graft_counters *c;
	__u64 bytes = o->bytes;
	__u32 msgs = o->msgs;

	if (!msgs)
		return;
	o->msgs = 0;
	o->bytes = 0;
	c = counters(endpoint);
	if (c) {
		__sync_fetch_and_add(&c->spliced_msgs, msgs);
		__sync_fetch_and_add(&c->spliced_bytes, bytes);
		__sync_fetch_and_add(&c->bytes_sent, bytes);
	}
	if (o->peer_ep) {
		c = counters(o->peer_ep);
		if (c)
			__sync_fetch_and_add(&c->bytes_received, bytes);
	}
}

/* At a connection's end: what its socket `sk` still owes. */
static __always_inline void splice_settle(struct bpf_sock *sk, __u32 endpoint)
{
	struct graft_splice_owed *o = bpf_sk_storage_get(&graft_splice_owed_map, sk, 0, 0);

	if (o)
		splice_flush(o, endpoint);
}

/* ---------------------------------------------------------------- policy */

struct policy_walk {
	const struct graft_policy *pol;
	__u32 dst[4];
	__u32 family;
	__u32 port;
	int best_len;
	int best_deny;
};

/* One clause per call (bpf_loop): the verifier checks this body once instead
 * of every unrolled iteration, which kept program loading slow. */
static long policy_step(__u32 i, void *arg)
{
	struct policy_walk *w = arg;
	const struct graft_policy *pol = w->pol;
	const struct graft_rule *r;
	__u32 idx = i;

	if (i >= GRAFT_MAX_RULES || i >= pol->count)
		return 1;
	/* i < GRAFT_MAX_RULES (a power of two) already, but clang would use
	 * the unchecked copy; hide the value from it and mask, so the bound is
	 * visible to the verifier. */
	asm volatile("" : "+r"(idx));
	r = &pol->rules[idx & (GRAFT_MAX_RULES - 1)];
	if (r->family != w->family)
		return 0;
	if (w->port < r->port_lo || w->port > r->port_hi)
		return 0;
	if ((w->dst[0] & r->mask[0]) != r->addr[0] ||
	    (w->dst[1] & r->mask[1]) != r->addr[1] ||
	    (w->dst[2] & r->mask[2]) != r->addr[2] ||
	    (w->dst[3] & r->mask[3]) != r->addr[3])
		return 0;
	if ((int)r->prefix_len > w->best_len) {
		w->best_len = r->prefix_len;
		w->best_deny = r->action == GRAFT_DENY;
	} else if ((int)r->prefix_len == w->best_len && r->action == GRAFT_DENY) {
		w->best_deny = 1;
	}
	return 0;
}

/* 1 if the endpoint's policy lets a socket reach dst:port. dst holds network
 * order words (IPv4: word 0). Longest matching prefix decides, deny wins a
 * tie, and with no match the destination is allowed unless some clause is an
 * allow. A socket whose endpoint graftd no longer knows is refused. */
static __always_inline int policy_allows(__u32 endpoint, __u8 family,
					 const __u32 dst[4], __u16 port)
{
	struct graft_policy *pol = bpf_map_lookup_elem(&graft_policy_map, &endpoint);
	struct policy_walk w = {};

	if (!pol)
		return 0;
	/* No clause (the common case): nothing to walk. */
	if (pol->count == 0)
		return !pol->has_allow;
	w.pol = pol;
	w.dst[0] = dst[0];
	w.dst[1] = dst[1];
	w.dst[2] = dst[2];
	w.dst[3] = dst[3];
	w.family = family;
	w.port = port;
	w.best_len = -1;
	bpf_loop(GRAFT_MAX_RULES, policy_step, &w, 0);
	if (w.best_len >= 0)
		return !w.best_deny;
	return !pol->has_allow;
}

static __always_inline int verdict(struct bpf_sock_addr *ctx, __u8 family,
				   const __u32 dst[4])
{
	struct graft_sk *gs = bpf_sk_storage_get(&graft_sk_map, ctx->sk, 0, 0);
	struct graft_counters *c;
	__u16 port;

	if (!gs)
		return 1;
	port = bpf_ntohs((__u16)ctx->user_port);
	if (policy_allows(gs->endpoint, family, dst, port))
		return 1;
	c = counters(gs->endpoint);
	if (c)
		__sync_fetch_and_add(&c->policy_denied, 1);
	return 0;
}

static __always_inline int verdict4(struct bpf_sock_addr *ctx)
{
	__u32 dst[4] = { ctx->user_ip4, 0, 0, 0 };

	return verdict(ctx, GRAFT_FAMILY_V4, dst);
}

static __always_inline int verdict6(struct bpf_sock_addr *ctx)
{
	__u32 dst[4];

	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	/* ::ffff:a.b.c.d is a.b.c.d, as Ipv6Addr::to_canonical says. */
	if (dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0xffff)) {
		__u32 v4[4] = { dst[3], 0, 0, 0 };

		return verdict(ctx, GRAFT_FAMILY_V4, v4);
	}
	return verdict(ctx, GRAFT_FAMILY_V6, dst);
}

SEC("cgroup/connect4")
int graft_connect4(struct bpf_sock_addr *ctx)
{
	return verdict4(ctx);
}

SEC("cgroup/connect6")
int graft_connect6(struct bpf_sock_addr *ctx)
{
	return verdict6(ctx);
}

/* A datagram's source address comes from the socket, unless an
 * IP_PKTINFO/IPV6_PKTINFO control message names another one: the kernel
 * accepts any address of the host there. The hook sees that address
 * (msg_src_ip4/6) and refuses one that is neither unset nor the socket's
 * own (a wildcard endpoint grants them all); the interface index of the
 * same message is not shown to it. */
static __always_inline int own_source4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 src = ctx->msg_src_ip4;

	if (src == 0 || !sk)
		return 1;
	/* A wildcard endpoint already grants every address of the host. */
	return sk->src_ip4 == 0 || src == sk->src_ip4;
}

static __always_inline int own_source6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 s0 = ctx->msg_src_ip6[0], s1 = ctx->msg_src_ip6[1];
	__u32 s2 = ctx->msg_src_ip6[2], s3 = ctx->msg_src_ip6[3];

	if ((s0 | s1 | s2 | s3) == 0 || !sk)
		return 1;
	if ((sk->src_ip6[0] | sk->src_ip6[1] | sk->src_ip6[2] | sk->src_ip6[3]) == 0)
		return 1;
	return s0 == sk->src_ip6[0] && s1 == sk->src_ip6[1] &&
	       s2 == sk->src_ip6[2] && s3 == sk->src_ip6[3];
}

static __always_inline int foreign_source_refused(struct bpf_sock_addr *ctx)
{
	struct graft_sk *gs = bpf_sk_storage_get(&graft_sk_map, ctx->sk, 0, 0);
	struct graft_counters *c;

	if (!gs)
		return 0;
	c = counters(gs->endpoint);
	if (c)
		__sync_fetch_and_add(&c->policy_denied, 1);
	return 1;
}

SEC("cgroup/sendmsg4")
int graft_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (!own_source4(ctx) && foreign_source_refused(ctx))
		return 0;
	return verdict4(ctx);
}

SEC("cgroup/sendmsg6")
int graft_sendmsg6(struct bpf_sock_addr *ctx)
{
	if (!own_source6(ctx) && foreign_source_refused(ctx))
		return 0;
	return verdict6(ctx);
}

/* --------------------------------------------------------------- sockops */

static __always_inline int is_v4_mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

static __always_inline void sock_key(struct bpf_sock_ops *skops, struct graft_sock_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->netns = bpf_get_netns_cookie(skops);
	k->local_port = skops->local_port;
	k->remote_port = bpf_ntohl(skops->remote_port);
	if (skops->family == AF_INET) {
		k->family = GRAFT_FAMILY_V4;
		k->local_ip[0] = skops->local_ip4;
		k->remote_ip[0] = skops->remote_ip4;
		return;
	}
	k->local_ip[0] = skops->local_ip6[0];
	k->local_ip[1] = skops->local_ip6[1];
	k->local_ip[2] = skops->local_ip6[2];
	k->local_ip[3] = skops->local_ip6[3];
	k->remote_ip[0] = skops->remote_ip6[0];
	k->remote_ip[1] = skops->remote_ip6[1];
	k->remote_ip[2] = skops->remote_ip6[2];
	k->remote_ip[3] = skops->remote_ip6[3];
	k->family = GRAFT_FAMILY_V6;
	if (is_v4_mapped(k->local_ip) && is_v4_mapped(k->remote_ip)) {
		k->family = GRAFT_FAMILY_V4;
		k->local_ip[0] = k->local_ip[3];
		k->remote_ip[0] = k->remote_ip[3];
		k->local_ip[1] = k->local_ip[2] = k->local_ip[3] = 0;
		k->remote_ip[1] = k->remote_ip[2] = k->remote_ip[3] = 0;
	}
}

/* The listener key of skops' local address (remote: false) or of the
 * address it connected to (remote: true). */
static __always_inline void listen_key(struct bpf_sock_ops *skops, int remote,
				       struct graft_listen_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->netns = bpf_get_netns_cookie(skops);
	if (remote)
		k->port = bpf_ntohl(skops->remote_port);
	else
		k->port = skops->local_port;
	if (skops->family == AF_INET) {
		k->family = GRAFT_FAMILY_V4;
		k->ip[0] = remote ? skops->remote_ip4 : skops->local_ip4;
		return;
	}
	k->family = GRAFT_FAMILY_V6;
	if (remote) {
		k->ip[0] = skops->remote_ip6[0];
		k->ip[1] = skops->remote_ip6[1];
		k->ip[2] = skops->remote_ip6[2];
		k->ip[3] = skops->remote_ip6[3];
	} else {
		k->ip[0] = skops->local_ip6[0];
		k->ip[1] = skops->local_ip6[1];
		k->ip[2] = skops->local_ip6[2];
		k->ip[3] = skops->local_ip6[3];
	}
	if (is_v4_mapped(k->ip)) {
		k->family = GRAFT_FAMILY_V4;
		k->ip[0] = k->ip[3];
		k->ip[1] = k->ip[2] = k->ip[3] = 0;
	}
}

/* listen() on a grafted socket: count it under its address. */
static __always_inline void listener_added(struct bpf_sock_ops *skops)
{
	struct graft_listen_key k;
	__u32 one = 1, *n;

	listen_key(skops, 0, &k);
	n = bpf_map_lookup_elem(&graft_listeners, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&graft_listeners, &k, &one, BPF_NOEXIST);
	/* To see it close (LISTEN -> CLOSE). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void listener_closed(struct bpf_sock_ops *skops)
{
	struct graft_listen_key k;
	__u32 *n;

	listen_key(skops, 0, &k);
	n = bpf_map_lookup_elem(&graft_listeners, &k);
	if (!n)
		return;
	/* A listen() racing this close may see its count dropped with the key:
	 * that listener's clients are then not spliced (they stay on TCP).
	 * Never the other way round. (No fetching atomics: the object is built
	 * for the base BPF ISA.) */
	__sync_fetch_and_add(n, -1);
	if (*n == 0 || *n > 0x7fffffff)
		bpf_map_delete_elem(&graft_listeners, &k);
}

/* Whether this client connected to a grafted listener of this host: the
 * exact address, the family's wildcard, or (IPv4) an IPv6 wildcard, which
 * takes IPv4 connections unless it is v6-only (then the client joins for
 * nothing, and its sends stay on TCP). */
static __always_inline int peer_listener_grafted(struct bpf_sock_ops *skops)
{
	struct graft_listen_key k;
	int v4;

	listen_key(skops, 1, &k);
	if (bpf_map_lookup_elem(&graft_listeners, &k))
		return 1;
	v4 = k.family == GRAFT_FAMILY_V4;
	k.ip[0] = k.ip[1] = k.ip[2] = k.ip[3] = 0;
	if (bpf_map_lookup_elem(&graft_listeners, &k))
		return 1;
	if (!v4)
		return 0;
	k.family = GRAFT_FAMILY_V6;
	return bpf_map_lookup_elem(&graft_listeners, &k) != 0;
}

/* Whether the accepted socket's client joined the splice (it did so at its
 * own establishment, which comes first on this host). */
static __always_inline int peer_spliced(struct bpf_sock_ops *skops)
{
	struct graft_sock_key k;
	__u32 t;
	int i;

	/* Our key with the sides swapped is the peer's own key. */
	sock_key(skops, &k);
	t = k.local_port;
	k.local_port = k.remote_port;
	k.remote_port = t;
#pragma unroll
	for (i = 0; i < 4; i++) {
		t = k.local_ip[i];
		k.local_ip[i] = k.remote_ip[i];
		k.remote_ip[i] = t;
	}
	return bpf_map_lookup_elem(&graft_sock_ep, &k) != 0;
}

static __always_inline void splice_insert(struct bpf_sock_ops *skops, struct graft_sk *gs)
{
	struct graft_sock_key k;
	long err;

	if (gs->flags & GRAFT_SK_NO_JOIN)
		return;
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		if (!peer_listener_grafted(skops))
			return;
	} else if (!peer_spliced(skops)) {
		return;
	}
	/* Bytes already sent through TCP (data in the SYN): this direction
	 * stays on TCP for good. */
	if (skops->data_segs_out > 0)
		gs->flags |= GRAFT_SK_NO_SPLICE;
	sock_key(skops, &k);
	err = bpf_sock_hash_update(skops, &graft_socks, &k, BPF_ANY);
	if (err) {
		__u32 zero = 0;
		struct graft_global *g = bpf_map_lookup_elem(&graft_global_map, &zero);
		struct graft_counters *c = counters(gs->endpoint);

		gs->flags |= GRAFT_SK_NO_SPLICE;
		if (g) {
			g->last_splice_error = (__u64)err;
			__sync_fetch_and_add(&g->splice_errors, 1);
		}
		if (c)
			__sync_fetch_and_add(&c->splice_refused, 1);
		return;
	}
	bpf_map_update_elem(&graft_sock_ep, &k, &gs->endpoint, BPF_ANY);
}

SEC("sockops")
int graft_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct graft_counters *c;
	struct graft_sk *gs;
	__u32 op = skops->op;

	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB &&
	    op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	if (!sk)
		return 1;
	/* Of the state changes only a listener's close and a connection's end
	 * matter (which FINs went each way follows from the state it ends
	 * from): the others return before the storage lookup. */
	if (op == BPF_SOCK_OPS_STATE_CB && skops->args[0] != GRAFT_TCP_LISTEN &&
	    skops->args[1] != GRAFT_TCP_CLOSE)
		return 1;
	gs = bpf_sk_storage_get(&graft_sk_map, sk, 0, 0);
	if (!gs)
		return 1;
	if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		/* Its connections never join (GRAFT_SK_NO_JOIN, inherited):
		 * nor should the clients that connect to it. */
		if (splice_enabled && !(gs->flags & GRAFT_SK_NO_JOIN))
			listener_added(skops);
		return 1;
	}
	c = counters(gs->endpoint);

	if (op == BPF_SOCK_OPS_STATE_CB) {
		__u32 from = skops->args[0];
		int fin_sent = 0, fin_rcvd = 0;

		if (from == GRAFT_TCP_LISTEN) {
			if (splice_enabled)
				listener_closed(skops);
			return 1;
		}
		/* Every connection ends in CLOSE, under its socket's lock as
		 * its sends run: nothing it sent is left owed, also when a
		 * graftd restarted with splicing off. (A socket marked
		 * GRAFT_SK_NO_JOIN before it connected never joined: nothing
		 * owed, no entry to delete.) */
		if (!(gs->flags & GRAFT_SK_NO_JOIN))
			splice_settle(sk, gs->endpoint);
		if (!(gs->flags & GRAFT_SK_ESTABLISHED))
			return 1;
		/* bytes_acked and bytes_received count sequence space: the
		 * active side's SYN and each FIN take one. The state the
		 * connection ends from says which FINs went: ours from
		 * FIN_WAIT1/2, CLOSING and LAST_ACK, the peer's into CLOSE_WAIT
		 * (hence from it and from LAST_ACK) and CLOSING, and into
		 * TIME_WAIT (which the full socket leaves as CLOSE, from
		 * FIN_WAIT1/2 with ours acknowledged). */
		if (from == GRAFT_TCP_FIN_WAIT1 || from == GRAFT_TCP_FIN_WAIT2 ||
		    from == GRAFT_TCP_CLOSING || from == GRAFT_TCP_LAST_ACK)
			fin_sent = 1;
		if (from == GRAFT_TCP_CLOSE_WAIT || from == GRAFT_TCP_LAST_ACK ||
		    from == GRAFT_TCP_CLOSING ||
		    ((from == GRAFT_TCP_FIN_WAIT2 || from == GRAFT_TCP_FIN_WAIT1) &&
		     skops->snd_una == skops->snd_nxt))
			fin_rcvd = 1;
		gs->flags &= ~GRAFT_SK_ESTABLISHED;
		if (c) {
			__u64 sent = skops->bytes_acked, rcvd = skops->bytes_received;
			__u64 ctl = 0;

			if (gs->flags & GRAFT_SK_ACTIVE)
				ctl++;
			if (fin_sent && skops->snd_una == skops->snd_nxt)
				ctl++;
			sent = sent > ctl ? sent - ctl : 0;
			if (fin_rcvd && rcvd > 0)
				rcvd--;
			__sync_fetch_and_add(&c->bytes_sent, sent);
			__sync_fetch_and_add(&c->bytes_received, rcvd);
		}
		if (splice_enabled && !(gs->flags & GRAFT_SK_NO_JOIN)) {
			struct graft_sock_key k;

			sock_key(skops, &k);
			bpf_map_delete_elem(&graft_sock_ep, &k);
		}
		return 1;
	}

	if (c) {
		if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
			__sync_fetch_and_add(&c->active_established, 1);
		else
			__sync_fetch_and_add(&c->passive_established, 1);
	}
	gs->flags |= GRAFT_SK_ESTABLISHED;
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		gs->flags |= GRAFT_SK_ACTIVE;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	if (splice_enabled)
		splice_insert(skops, gs);
	return 1;
}

/* ---------------------------------------------------------------- sk_msg */

SEC("sk_msg")
int graft_sk_msg(struct sk_msg_md *msg)
{
	struct graft_sock_key peer;
	struct graft_splice_owed *o;
	struct graft_sk *gs;
	__u32 *peer_ep;
	__u32 size = msg->size;

	if (!msg->sk)
		return SK_PASS;
	gs = bpf_sk_storage_get(&graft_sk_map, msg->sk, 0, 0);
	if (!gs || (gs->flags & GRAFT_SK_NO_SPLICE))
		return SK_PASS;

	/* The peer's own key: our remote side is its local side. */
	__builtin_memset(&peer, 0, sizeof(peer));
	peer.netns = bpf_get_netns_cookie(msg);
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	if (msg->family == AF_INET) {
		peer.family = GRAFT_FAMILY_V4;
		peer.local_ip[0] = msg->remote_ip4;
		peer.remote_ip[0] = msg->local_ip4;
	} else {
		peer.family = GRAFT_FAMILY_V6;
		peer.local_ip[0] = msg->remote_ip6[0];
		peer.local_ip[1] = msg->remote_ip6[1];
		peer.local_ip[2] = msg->remote_ip6[2];
		peer.local_ip[3] = msg->remote_ip6[3];
		peer.remote_ip[0] = msg->local_ip6[0];
		peer.remote_ip[1] = msg->local_ip6[1];
		peer.remote_ip[2] = msg->local_ip6[2];
		peer.remote_ip[3] = msg->local_ip6[3];
		if (is_v4_mapped(peer.local_ip) && is_v4_mapped(peer.remote_ip)) {
			peer.family = GRAFT_FAMILY_V4;
			peer.local_ip[0] = peer.local_ip[3];
			peer.remote_ip[0] = peer.remote_ip[3];
			peer.local_ip[1] = peer.local_ip[2] = peer.local_ip[3] = 0;
			peer.remote_ip[1] = peer.remote_ip[2] = peer.remote_ip[3] = 0;
		}
	}

	/* A failed lookup leaves no redirect target, and SK_PASS then sends
	 * through TCP; from then on this direction stays on TCP. */
	if (bpf_msg_redirect_hash(msg, &graft_socks, &peer, BPF_F_INGRESS) != SK_PASS) {
		gs->flags |= GRAFT_SK_NO_SPLICE;
		return SK_PASS;
	}
	o = bpf_sk_storage_get(&graft_splice_owed_map, msg->sk, 0,
			       BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		/* No memory for the record: credit this message at once. */
		struct graft_splice_owed now = { .msgs = 1, .bytes = size };

		peer_ep = bpf_map_lookup_elem(&graft_sock_ep, &peer);
		if (peer_ep)
			now.peer_ep = *peer_ep;
		splice_flush(&now, gs->endpoint);
		return SK_PASS;
	}
	/* The peer of a connection never changes: looked up once. */
	if (!o->peer_ep) {
		peer_ep = bpf_map_lookup_elem(&graft_sock_ep, &peer);
		if (peer_ep)
			o->peer_ep = *peer_ep;
	}
	/* The socket's lock serialises its sends and its connection's end
	 * (sockops, splice_settle): plain additions. */
	o->msgs++;
	o->bytes += size;
	if (o->msgs >= GRAFT_SPLICE_FLUSH_MSGS || o->bytes >= GRAFT_SPLICE_FLUSH_BYTES)
		splice_flush(o, gs->endpoint);
	return SK_PASS;
}

/* ------------------------------------------------------------ setsockopt */

/* graft_core::sockopt's Class::Refuse options: each lets the holder of a
 * host socket pick an interface, a routing mark, or addresses the host does
 * not own, i.e. step outside what its endpoint grants. */
static __always_inline int escape_option(__s32 level, __s32 optname)
{
	switch (level) {
	case SOL_SOCKET:
		return optname == GRAFT_SO_BINDTODEVICE ||
		       optname == GRAFT_SO_BINDTOIFINDEX ||
		       optname == GRAFT_SO_MARK;
	case SOL_IP:
		return optname == IP_TRANSPARENT || optname == IP_FREEBIND ||
		       optname == IP_UNICAST_IF || optname == IP_MULTICAST_IF ||
		       optname == IP_OPTIONS;
	case SOL_IPV6:
		return optname == IPV6_TRANSPARENT || optname == IPV6_FREEBIND ||
		       optname == IPV6_UNICAST_IF || optname == IPV6_MULTICAST_IF ||
		       optname == IPV6_PKTINFO || optname == IPV6_RTHDR;
	}
	return 0;
}

SEC("cgroup/setsockopt")
int graft_setsockopt(struct bpf_sockopt *ctx)
{
	struct graft_counters *c;
	struct graft_sk *gs;

	if (escape_option(ctx->level, ctx->optname)) {
		gs = bpf_sk_storage_get(&graft_sk_map, ctx->sk, 0, 0);
		if (gs) {
			c = counters(gs->endpoint);
			if (c)
				__sync_fetch_and_add(&c->policy_denied, 1);
			return 0; /* EPERM */
		}
	}
	/* Untouched: the kernel applies the caller's own buffer. The program
	 * is shown only the first page of a larger optval; optlen 0 says
	 * "use the original", where leaving it would fail the call (EFAULT)
	 * on kernels before 6.5. */
	if (ctx->optlen > GRAFT_SOCKOPT_MAX)
		ctx->optlen = 0;
	return 1;
}

/* ------------------------------------------- a seccomp program's options */

/* Attached (per seccomp listener, not pinned) to the cgroup of a program
 * graftd serves in seccomp mode, so that a trapped connect need not read
 * every carried option of the program's socket to find the few it set:
 * each inet socket made there gets a record, and each setsockopt on it sets
 * the bit of its option (graft_core::sockopt::SNAPSHOT order, filled in by
 * the loader). The record also says what the socket was made as and in
 * which namespace, which graftd would otherwise ask the socket (four
 * getsockopt calls per trapped call). A socket without a record was made
 * elsewhere or earlier: graftd reads all of that from the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct graft_app_sock);
} graft_app_opts SEC(".maps");

/* (level << 16 | optname) -> bit. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 128);
	__type(key, __u32);
	__type(value, __u32);
} graft_opt_bits SEC(".maps");

SEC("cgroup/sock_create")
int graft_app_sock_create(struct bpf_sock *sk)
{
	struct graft_app_sock *r;

	r = bpf_sk_storage_get(&graft_app_opts, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (r) {
		r->netns = bpf_get_netns_cookie(sk);
		r->family = sk->family;
		r->type = sk->type;
		r->protocol = sk->protocol;
	}
	return 1;
}

SEC("cgroup/setsockopt")
int graft_app_setsockopt(struct bpf_sockopt *ctx)
{
	__u32 key = ((__u32)ctx->level << 16) | ((__u32)ctx->optname & 0xffff);
	__u32 *bit = bpf_map_lookup_elem(&graft_opt_bits, &key);
	int addrform = ctx->level == SOL_IPV6 && ctx->optname == IPV6_ADDRFORM;
	struct graft_app_sock *r;

	if (ctx->sk && (bit || addrform)) {
		r = bpf_sk_storage_get(&graft_app_opts, ctx->sk, 0, 0);
		/* IPV6_ADDRFORM may turn it into an AF_INET socket: the
		 * family recorded no longer holds (also when the call fails,
		 * which only costs graftd the getsockopt calls). */
		if (r && addrform)
			r->family = 0;
		if (r && bit)
			__sync_fetch_and_or(&r->set, 1ULL << (*bit & 63));
	}
	/* As graft_setsockopt: the kernel applies the caller's own buffer. */
	if (ctx->optlen > GRAFT_SOCKOPT_MAX)
		ctx->optlen = 0;
	return 1;
}

/* ---------------------------------------------------------- sock_release */

SEC("cgroup/sock_release")
int graft_sock_release(struct bpf_sock *sk)
{
	struct graft_counters *c;
	struct graft_sk *gs;

	gs = bpf_sk_storage_get(&graft_sk_map, sk, 0, 0);
	if (!gs || !(gs->flags & GRAFT_SK_HANDED))
		return 1;
	/* An accepted child carries a copy of its listener's record. */
	if (bpf_get_socket_cookie(sk) != gs->cookie)
		return 1;
	c = counters(gs->endpoint);
	if (c)
		__sync_fetch_and_add(&c->released, 1);
	return 1;
}

/* ------------------------------------------------------ marking at creation */

/* A graftd thread about to make sockets for one endpoint (a batch of egress
 * sockets) arms this map under its own pid_tgid: the next `left` inet sockets
 * that thread makes are marked as they are made, saving graftd a
 * map_update_elem and a getsockopt(SO_COOKIE) per socket. graftd disarms
 * it after the batch and checks from `left` that every socket it made was
 * marked; if none was it marks them the ordinary way, if only some were it
 * refuses them all (never hands out an unmarked socket). Not pinned: only
 * the running graftd arms it. */
struct graft_mark {
	__u32 endpoint;
	__u32 flags;
	__u32 left;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct graft_mark);
} graft_mark_next SEC(".maps");

SEC("cgroup/sock_create")
int graft_sock_create(struct bpf_sock *sk)
{
	__u64 tid = bpf_get_current_pid_tgid();
	struct graft_mark *m = bpf_map_lookup_elem(&graft_mark_next, &tid);
	struct graft_sk *gs;

	if (!m || m->left == 0)
		return 1;
	if (sk->family != AF_INET && sk->family != AF_INET6)
		return 1;
	gs = bpf_sk_storage_get(&graft_sk_map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	/* Unmarked, it would pass every hook: the socket is not made
	 * (socket() fails with EPERM) and `left` shows it was not marked. */
	if (!gs)
		return 0;
	gs->endpoint = m->endpoint;
	gs->flags = m->flags;
	gs->cookie = bpf_get_socket_cookie(sk);
	m->left--;
	return 1;
}

/* ------------------------------------------------------------------ bind */

/* The process that loaded these programs (graftd; a test playing graftd),
 * by its tgid as the kernel sees it. Its binds are never refused: graftd binds
 * each socket before marking it anyway, and nothing else it does binds a
 * marked socket; the exemption lets a loader bind after marking. */
const volatile __u32 binder_tgid = 0;

/* A bind that reaches a marked socket comes from the program holding it.
 * Refusing it is what lets graftd bind egress sockets with
 * IP_BIND_ADDRESS_NO_PORT (or not at all for a wildcard endpoint) and leave
 * the port to connect(), as the host does: without this, such a socket could
 * be re-bound to any host address. Like setsockopt, the kernel runs this hook
 * by the socket's cgroup, whoever calls bind(). connect()'s own port choice
 * does not pass through here. */
static __always_inline int bind_guard(struct bpf_sock_addr *ctx)
{
	struct graft_sk *gs = bpf_sk_storage_get(&graft_sk_map, ctx->sk, 0, 0);
	struct graft_counters *c;

	if (!gs || (bpf_get_current_pid_tgid() >> 32) == binder_tgid)
		return 1;
	c = counters(gs->endpoint);
	if (c)
		__sync_fetch_and_add(&c->policy_denied, 1);
	return 0; /* EPERM */
}

SEC("cgroup/bind4")
int graft_bind4(struct bpf_sock_addr *ctx)
{
	return bind_guard(ctx);
}

SEC("cgroup/bind6")
int graft_bind6(struct bpf_sock_addr *ctx)
{
	return bind_guard(ctx);
}

/* ------------------------------------------------------------- sk_lookup */

/* A dual-stack listener: graftd binds an AF_INET6 socket to an IPv4
 * endpoint's address as [::ffff:A4]:P4 (not v6-only), which takes IPv4
 * connections natively, and puts it here under the IPv6 endpoint's address
 * and port. Attached to the target namespace (sk_lookup cannot cross
 * namespaces), the program hands IPv6 connections for [A6]:P6 to it, so one
 * listener answers on both endpoints with each client's real address. (The
 * other way round does not work: a socket bound to a specific IPv6 address
 * is v6-only, and assigning it to an IPv4 lookup fails.) */
struct graft_steer_key {
	__u32 ip6[4]; /* network order; all zero: any local address */
	__u32 port;   /* host order */
	__u32 protocol;
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 4096);
	__type(key, struct graft_steer_key);
	__type(value, __u32);
} graft_steer SEC(".maps");

SEC("sk_lookup")
int graft_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct graft_steer_key k = {};
	struct bpf_sock *sk;

	if (ctx->family != AF_INET6)
		return SK_PASS;
	k.ip6[0] = ctx->local_ip6[0];
	k.ip6[1] = ctx->local_ip6[1];
	k.ip6[2] = ctx->local_ip6[2];
	k.ip6[3] = ctx->local_ip6[3];
	k.port = ctx->local_port;
	k.protocol = ctx->protocol;
	sk = bpf_map_lookup_elem(&graft_steer, &k);
	if (!sk) {
		k.ip6[0] = k.ip6[1] = k.ip6[2] = k.ip6[3] = 0;
		sk = bpf_map_lookup_elem(&graft_steer, &k);
		if (!sk)
			return SK_PASS;
	}
	/* A failure (the listener is closing) leaves the ordinary lookup. */
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}
