/* seccomp_probe.c: a static musl program (musl-gcc -static) the seccomp
 * tests run under `graft`.
 *
 *   tcp-serve IP PORT       accept one connection, write "peer=IP:PORT\n"
 *   tcp-get IP PORT MSG     connect, send MSG, print what comes back
 *                           (PROBE_RCVBUF=N, PROBE_MARK=N: set before connect)
 *   udp-sendto IP PORT MSG  unconnected socket: sendto, print the answer
 *   udp-sendmsg IP PORT MSG unconnected socket: sendmsg with msg_name
 *   raw-connect IP PORT     connect() through syscall(2), print errno text
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>

static int addr_of(const char *ip, const char *port, struct sockaddr_storage *ss, socklen_t *len) {
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	memset(ss, 0, sizeof *ss);
	if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(atoi(port));
		*len = sizeof *a4;
		return AF_INET;
	}
	if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(atoi(port));
		*len = sizeof *a6;
		return AF_INET6;
	}
	fprintf(stderr, "probe: bad address %s\n", ip);
	exit(2);
}

static void die(const char *what) {
	fprintf(stderr, "probe: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void show(const struct sockaddr_storage *ss, char *out, size_t n) {
	char ip[INET6_ADDRSTRLEN];
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const void *)ss;
		inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
		snprintf(out, n, "%s:%d", ip, ntohs(a->sin_port));
	} else {
		const struct sockaddr_in6 *a = (const void *)ss;
		inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
		snprintf(out, n, "[%s]:%d", ip, ntohs(a->sin6_port));
	}
}

int main(int argc, char **argv) {
	if (argc < 4) {
		fprintf(stderr, "usage: probe MODE IP PORT [MSG]\n");
		return 2;
	}
	const char *mode = argv[1], *msg = argc > 4 ? argv[4] : "";
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = addr_of(argv[2], argv[3], &ss, &len);
	struct timeval tv = {.tv_sec = 20};
	char buf[1500], peer[80];

	if (!strcmp(mode, "tcp-serve")) {
		int s = socket(fam, SOCK_STREAM, 0), one = 1;
		if (s < 0) die("socket");
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (bind(s, (void *)&ss, len) < 0) die("bind");
		if (listen(s, 8) < 0) die("listen");
		printf("listening\n");
		fflush(stdout);
		struct sockaddr_storage from;
		socklen_t fl = sizeof from;
		int c = accept(s, (void *)&from, &fl);
		if (c < 0) die("accept");
		show(&from, peer, sizeof peer);
		int n = snprintf(buf, sizeof buf, "peer=%s\n", peer);
		if (write(c, buf, n) != n) die("write");
		/* half-close and drain: unread data at close would reset the peer */
		shutdown(c, SHUT_WR);
		setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		while (read(c, buf, sizeof buf) > 0) {
		}
		close(c);
		return 0;
	}
	if (!strcmp(mode, "tcp-get")) {
		/* PROBE_FLAGS=cloexec,nonblock: made with those flags, and the
		 * descriptor's flags after connect told on stderr. */
		const char *fl = getenv("PROBE_FLAGS");
		int ty = SOCK_STREAM;
		if (fl && strstr(fl, "cloexec")) ty |= SOCK_CLOEXEC;
		if (fl && strstr(fl, "nonblock")) ty |= SOCK_NONBLOCK;
		int s = socket(fam, ty, 0);
		if (s < 0) die("socket");
		/* options set before connect, to be carried onto the host socket */
		if (getenv("PROBE_RCVBUF")) {
			int v = atoi(getenv("PROBE_RCVBUF"));
			if (setsockopt(s, SOL_SOCKET, SO_RCVBUF, &v, sizeof v) < 0) die("SO_RCVBUF");
		}
		if (getenv("PROBE_MARK")) {
			int v = atoi(getenv("PROBE_MARK"));
			if (setsockopt(s, SOL_SOCKET, SO_MARK, &v, sizeof v) < 0) die("SO_MARK");
		}
		setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		if (connect(s, (void *)&ss, len) < 0) {
			if (errno != EINPROGRESS) die("connect");
			struct pollfd p = { .fd = s, .events = POLLOUT };
			if (poll(&p, 1, 5000) != 1) die("poll");
		}
		if (fl) {
			int fd = fcntl(s, F_GETFD), st = fcntl(s, F_GETFL);
			fprintf(stderr, "probe: fd %d cloexec=%d nonblock=%d\n", s,
				!!(fd & FD_CLOEXEC), !!(st & O_NONBLOCK));
			fcntl(s, F_SETFL, st & ~O_NONBLOCK);
		}
		if (write(s, msg, strlen(msg)) < 0) die("write");
		shutdown(s, SHUT_WR);
		ssize_t n, total = 0;
		while ((n = read(s, buf + total, sizeof buf - 1 - total)) > 0) total += n;
		if (n < 0) die("read");
		buf[total] = 0;
		printf("got %s\n", buf);
		return 0;
	}
	if (!strcmp(mode, "udp-sendto") || !strcmp(mode, "udp-sendmsg")) {
		int s = socket(fam, SOCK_DGRAM, 0);
		if (s < 0) die("socket");
		setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
		if (!strcmp(mode, "udp-sendto")) {
			if (sendto(s, msg, strlen(msg), 0, (void *)&ss, len) < 0) die("sendto");
		} else {
			struct iovec iov = {.iov_base = (void *)msg, .iov_len = strlen(msg)};
			struct msghdr mh = {.msg_name = &ss, .msg_namelen = len, .msg_iov = &iov, .msg_iovlen = 1};
			if (sendmsg(s, &mh, 0) < 0) die("sendmsg");
		}
		struct sockaddr_storage from;
		socklen_t fl = sizeof from;
		ssize_t n = recvfrom(s, buf, sizeof buf - 1, 0, (void *)&from, &fl);
		if (n < 0) die("recvfrom");
		buf[n] = 0;
		show(&from, peer, sizeof peer);
		printf("got %s from %s\n", buf, peer);
		return 0;
	}
	if (!strcmp(mode, "raw-connect")) {
		int s = socket(fam, SOCK_STREAM, 0);
		if (s < 0) die("socket");
		long r = syscall(SYS_connect, s, (void *)&ss, len);
		printf("raw connect: %s\n", r == 0 ? "ok" : strerror(errno));
		return 0;
	}
	fprintf(stderr, "probe: unknown mode %s\n", mode);
	return 2;
}
