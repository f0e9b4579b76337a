/* banger-vsock-agent: banger's guest agent.
 *
 * Listens on AF_VSOCK (any CID), port argv[1] (default 1024), and answers
 * each line of a connection: "ping" with "pong", anything else with an error.
 * Connections are served one at a time, each with a 30 s idle timeout.
 *
 * If vsock is unavailable (no transport in this kernel yet) or the port is
 * taken, it says why on stderr and tries again every 5 s rather than exit, so
 * its unit stays active. Under socket activation (LISTEN_FDS=1) it serves the
 * listening socket on fd 3 instead, of any family (the tests use that).
 *
 * Dependency-free, built static and reproducibly by agents/build.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define RETRY_SECONDS 5
#define IDLE_SECONDS 30

static const char *port_text = "1024";

static void say(const char *what, const char *detail) {
    const char *parts[] = {"banger-vsock-agent: ", what, detail ? ": " : "", detail ? detail : "", "\n"};
    char buf[512];
    size_t n = 0;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        size_t len = strlen(parts[i]);
        if (len > sizeof buf - 1 - n) len = sizeof buf - 1 - n;
        memcpy(buf + n, parts[i], len);
        n += len;
    }
    while (write(STDERR_FILENO, buf, n) < 0 && errno == EINTR) {}
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int answer(int conn, char *line) {
    size_t len = strlen(line);
    if (len > 0 && line[len - 1] == '\r') line[len - 1] = '\0';
    const char *reply = strcmp(line, "ping") == 0 ? "pong\n" : "error: unknown command\n";
    return write_all(conn, reply, strlen(reply));
}

/* Answer each line of one connection until EOF, an error or the idle timeout. */
static void serve(int conn) {
    char buf[256];
    size_t len = 0;
    struct timeval idle = {IDLE_SECONDS, 0};
    setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof idle);
    for (;;) {
        ssize_t r = read(conn, buf + len, sizeof buf - 1 - len);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        len += (size_t)r;
        char *start = buf, *nl;
        while ((nl = memchr(start, '\n', len - (size_t)(start - buf))) != NULL) {
            *nl = '\0';
            if (answer(conn, start) < 0) return;
            start = nl + 1;
        }
        len -= (size_t)(start - buf);
        memmove(buf, start, len);
        if (len == sizeof buf - 1) {
            write_all(conn, "error: line too long\n", 21);
            return;
        }
    }
    if (len > 0) { /* a last line without a newline */
        buf[len] = '\0';
        answer(conn, buf);
    }
}

static int listen_vsock(unsigned int port, int *last_err) {
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port};
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(fd, 16) == 0) {
        say("listening on vsock port", port_text);
        *last_err = 0;
        return fd;
    }
    int err = errno;
    if (fd >= 0) close(fd);
    if (err != *last_err) /* say it once, not every retry */
        say(fd < 0 ? "vsock socket (retrying every 5s)" : "vsock bind/listen (retrying every 5s)",
            strerror(err));
    *last_err = err;
    return -1;
}

int main(int argc, char **argv) {
    char *end;
    if (argc > 1) port_text = argv[1];
    errno = 0;
    unsigned long port = strtoul(port_text, &end, 10);
    if (argc > 2 || *port_text < '0' || *port_text > '9' || *end || errno || port == 0 ||
        port > 0xfffffffeUL) {
        say("usage: banger-vsock-agent [PORT]", "PORT is 1 to 4294967294, default 1024");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    const char *fds = getenv("LISTEN_FDS"), *pid = getenv("LISTEN_PID");
    int activated = fds && strcmp(fds, "1") == 0 && (!pid || atol(pid) == (long)getpid());
    int lfd = activated ? 3 : -1, last_err = 0;
    if (activated) say("serving the socket-activated listener on fd 3", NULL);
    for (;;) {
        while (lfd < 0 && (lfd = listen_vsock((unsigned int)port, &last_err)) < 0)
            sleep(RETRY_SECONDS);
        int conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (conn >= 0) {
            serve(conn);
            close(conn);
        } else if (errno != EINTR && errno != ECONNABORTED) {
            say("accept", strerror(errno));
            sleep(1); /* e.g. EMFILE: no busy loop */
        }
    }
}
