/* A blocking reader of a (spliced) TCP socket, built with
 * -D_FORTIFY_SOURCE=2 so that read/recv/recvfrom become glibc's __read_chk,
 * __recv_chk and __recvfrom_chk (libc's internal read behind them is not
 * the exported `read`), plus readv and recvmmsg.
 *
 * usage: splice_reader PORT BYTES MODE...
 *        (MODE: read readv recv recvfrom recvmmsg fread restart interrupt
 *         inherited inherited-stdio)
 *
 * One connection per MODE to 127.0.0.1:PORT: a second thread sends BYTES and
 * shuts down its side, while the main thread reads with MODE, on the same
 * blocking socket, until the peer's "ok" and EOF. Mode `fread` reads
 * through stdio, a stream `fdopen`ed on a copy of the socket (an error
 * flag counted by its errno and cleared). Modes `restart` and
 * `interrupt` read with `read` while a SIGALRM every 2 ms reaches the
 * reading thread, its handler installed with SA_RESTART (TCP restarts the
 * read) or without (TCP fails it with EINTR). Mode `inherited` hands the
 * reading to a child that this program execs with the socket as its stdin
 * (as inetd does), which reads it as `restart` does; `inherited-stdio`
 * the same, the child reading through the `stdin` stream. Prints one line per
 * connection: "MODE got ok eagain N eintr M", N counting reads that failed
 * with EAGAIN (which a blocking socket must never return), M with EINTR. */
#define _GNU_SOURCE /* recvmmsg */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

static int sock;
static FILE *stream;
static long long total;
/* Not a constant: glibc then calls the checking functions (with a constant
 * length that fits, it calls the plain ones). */
static volatile size_t want = 16;

static void *writer(void *arg)
{
	static char data[1 << 16];
	long long left = total;

	sigset_t alrm;

	(void)arg;
	/* SIGALRM is for the reading thread. */
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);
	pthread_sigmask(SIG_BLOCK, &alrm, NULL);
	memset(data, 'x', sizeof(data));
	while (left > 0) {
		size_t k = left < (long long)sizeof(data) ? (size_t)left : sizeof(data);
		ssize_t n = send(sock, data, k, 0);

		if (n < 0) {
			perror("send");
			exit(1);
		}
		left -= n;
	}
	shutdown(sock, SHUT_WR);
	return NULL;
}

/* One read with `mode` into a buffer whose size the compiler knows, of a
 * length it does not, so that fortification checks at run time. */
static ssize_t read_with(const char *mode, char (*buf)[16])
{
	if (strcmp(mode, "read") == 0 || strcmp(mode, "restart") == 0 || strcmp(mode, "stdin") == 0 ||
	    strcmp(mode, "interrupt") == 0)
		return read(sock, *buf, want);
	if (strcmp(mode, "recv") == 0)
		return recv(sock, *buf, want, 0);
	if (strcmp(mode, "recvfrom") == 0)
		return recvfrom(sock, *buf, want, 0, NULL, NULL);
	if (strcmp(mode, "fread") == 0 || strcmp(mode, "stdin-stdio") == 0) {
		size_t n = fread(*buf, 1, want, stream);

		if (n == 0 && ferror(stream)) {
			clearerr(stream);
			return -1; /* errno is the failed read's */
		}
		return (ssize_t)n;
	}
	if (strcmp(mode, "readv") == 0) {
		struct iovec iov = { .iov_base = *buf, .iov_len = want };

		return readv(sock, &iov, 1);
	}
	if (strcmp(mode, "recvmmsg") == 0) {
		struct iovec iov = { .iov_base = *buf, .iov_len = want };
		struct mmsghdr m = { .msg_hdr = { .msg_iov = &iov, .msg_iovlen = 1 } };
		int r = recvmmsg(sock, &m, 1, 0, NULL);

		return r < 0 ? r : (ssize_t)m.msg_len;
	}
	fprintf(stderr, "unknown mode %s\n", mode);
	exit(2);
}

static volatile sig_atomic_t alarms;

static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

/* A SIGALRM every 2 ms from now (`on`), its handler with SA_RESTART or
 * not; or none (`!on`). */
static void alarm_every_2ms(int on, int restart)
{
	struct itimerval it = { .it_interval = { 0, 2000 }, .it_value = { 0, 2000 } };
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = restart ? SA_RESTART : 0 };

	if (!on) {
		memset(&it, 0, sizeof(it));
		setitimer(ITIMER_REAL, &it, NULL);
		sa.sa_handler = SIG_DFL;
		sigaction(SIGALRM, &sa, NULL);
		return;
	}
	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);
	setitimer(ITIMER_REAL, &it, NULL);
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET };

	if (argc < 4) {
		fprintf(stderr, "usage: splice_reader PORT BYTES MODE...\n");
		return 2;
	}
	/* The child of mode `inherited`: reads its stdin. */
	int child = strcmp(argv[3], "stdin") == 0 || strcmp(argv[3], "stdin-stdio") == 0;

	a.sin_port = htons((unsigned short)atoi(argv[1]));
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	total = atoll(argv[2]);
	for (int i = 3; i < argc; i++) {
		char got[64] = "", buf[16];
		size_t have = 0;
		int eagain = 0, eintr = 0;
		int sig = child || strcmp(argv[i], "restart") == 0 ||
			  strcmp(argv[i], "interrupt") == 0;
		pthread_t t;

		if (child) {
			sock = 0;
			if (strcmp(argv[3], "stdin-stdio") == 0)
				stream = stdin;
			goto read;
		}
		sock = socket(AF_INET, SOCK_STREAM, 0);
		if (sock < 0 || connect(sock, (struct sockaddr *)&a, sizeof(a)) < 0) {
			perror("connect");
			return 1;
		}
		if (strcmp(argv[i], "fread") == 0) {
			int copy = dup(sock);

			stream = fdopen(copy, "r");
			if (!stream || fileno(stream) != copy) {
				fprintf(stderr, "fdopen: %s, fileno %d of %d\n", strerror(errno),
					stream ? fileno(stream) : -1, copy);
				return 1;
			}
			/* As on any socket stream: not seekable. */
			if (fseek(stream, 0, SEEK_SET) != -1 || errno != ESPIPE) {
				fprintf(stderr, "fseek on a socket stream: %s\n", strerror(errno));
				return 1;
			}
		}
		pthread_create(&t, NULL, writer, NULL);
		if (strncmp(argv[i], "inherited", 9) == 0) {
			pid_t pid = fork();
			int st;

			if (pid == 0) {
				dup2(sock, 0);
				execl("/proc/self/exe", argv[0], argv[1], argv[2],
				      argv[i][9] ? "stdin-stdio" : "stdin", (char *)NULL);
				perror("exec");
				_exit(1);
			}
			if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) ||
			    WEXITSTATUS(st) != 0) {
				fprintf(stderr, "inherited: the reading child failed\n");
				return 1;
			}
			pthread_join(t, NULL);
			close(sock);
			continue;
		}
read:
		if (sig)
			alarm_every_2ms(1, child || strcmp(argv[i], "restart") == 0);
		for (;;) {
			ssize_t n = read_with(argv[i], &buf);

			if (n < 0 && errno == EAGAIN) {
				eagain++;
				continue;
			}
			if (n < 0 && errno == EINTR) {
				eintr++;
				continue;
			}
			if (n < 0) {
				perror(argv[i]);
				return 1;
			}
			if (n == 0)
				break;
			if (have + (size_t)n < sizeof(got)) {
				memcpy(got + have, buf, (size_t)n);
				have += (size_t)n;
			}
		}
		if (sig)
			alarm_every_2ms(0, 0);
		if (!child)
			pthread_join(t, NULL);
		if (stream && fclose(stream) != 0) {
			perror("fclose");
			return 1;
		}
		stream = NULL;
		close(sock);
		printf("%s got %s eagain %d eintr %d\n",
		       !child ? argv[i] : strcmp(argv[i], "stdin") == 0 ? "inherited" : "inherited-stdio",
		       got, eagain, eintr);
		fflush(stdout);
	}
	return 0;
}
