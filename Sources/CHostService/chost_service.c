#define _GNU_SOURCE
#include "chost_service.h"
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <limits.h>
#include <linux/openat2.h>
#include <unistd.h>

extern char **environ;

static int fill_addr(struct sockaddr_un *a, const char *path) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a->sun_path) return -ENAMETOOLONG;
    strcpy(a->sun_path, path);
    return 0;
}

int pvs_unix_listen(const char *path, unsigned mode, int backlog) {
    struct sockaddr_un a;
    int r = fill_addr(&a, path);
    if (r) return r;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    unlink(path);
    /* The socket file is created with the umask applied: make it no wider than mode. */
    mode_t old = umask(0777 & ~mode);
    r = bind(fd, (struct sockaddr *)&a, sizeof a);
    umask(old);
    if (r < 0 || chmod(path, mode) < 0 || listen(fd, backlog) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int pvs_unix_connect(const char *path) {
    struct sockaddr_un a;
    int r = fill_addr(&a, path);
    if (r) return r;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int pvs_accept(int fd) {
    for (;;) {
        int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (c >= 0) return c;
        if (errno != EINTR) return -errno;
    }
}

int pvs_peer_cred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred c;
    socklen_t len = sizeof c;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &len) < 0) return -errno;
    *pid = c.pid; *uid = c.uid; *gid = c.gid;
    return 0;
}

int pvs_set_timeouts(int fd, int recv_ms, int send_ms) {
    struct timeval r = { recv_ms / 1000, (recv_ms % 1000) * 1000 };
    struct timeval s = { send_ms / 1000, (send_ms % 1000) * 1000 };
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, sizeof r) < 0) return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &s, sizeof s) < 0) return -errno;
    return 0;
}

int pvs_send_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        p += n; len -= (size_t)n;
    }
    return 0;
}

long pvs_recv(int fd, void *buf, size_t len) {
    for (;;) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n >= 0) return n;
        if (errno != EINTR) return -errno;
    }
}

void pvs_shutdown(int fd) { shutdown(fd, SHUT_RDWR); }

int pvs_lock_file(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return -errno;
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int pvs_pidfd_open(int32_t pid) {
    long fd = syscall(SYS_pidfd_open, (pid_t)pid, 0);
    return fd < 0 ? -errno : (int)fd;
}

int pvs_poll2(int a, int b, int timeout_ms) {
    struct pollfd p[2] = { { a, POLLIN, 0 }, { b, POLLIN, 0 } };
    for (;;) {
        int r = poll(p, b >= 0 ? 2 : 1, timeout_ms);
        if (r < 0) { if (errno == EINTR) continue; return -errno; }
        int mask = 0;
        if (p[0].revents) mask |= 1;
        if (b >= 0 && p[1].revents) mask |= 2;
        return mask;
    }
}

int pvs_process_in_group(int32_t pid, uint32_t gid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return -errno;
    char line[4096];
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "Groups:", 7) != 0) continue;
        char *p = line + 7;
        for (;;) {
            char *end;
            unsigned long g = strtoul(p, &end, 10);
            if (end == p) break;
            if (g == gid) { found = 1; break; }
            p = end;
        }
        break;
    }
    fclose(f);
    return found;
}

int pvs_group_id(const char *name, uint32_t *gid) {
    struct group *g = getgrnam(name);
    if (!g) return -ENOENT;
    *gid = g->gr_gid;
    return 0;
}

int pvs_chown(const char *path, uint32_t uid, uint32_t gid) { return chown(path, uid, gid) < 0 ? -errno : 0; }

int pvs_mkdir(const char *path, unsigned mode) {
    if (mkdir(path, mode) < 0 && errno != EEXIST) return -errno;
    return 0;
}

static void stop_set(sigset_t *s) {
    sigemptyset(s);
    sigaddset(s, SIGINT); sigaddset(s, SIGTERM); sigaddset(s, SIGHUP); sigaddset(s, SIGQUIT);
}

void pvs_block_stop_signals(int how) {
    sigset_t s;
    stop_set(&s);
    pthread_sigmask(how ? SIG_BLOCK : SIG_UNBLOCK, &s, NULL);
}

int pvs_wait_stop_signal(void) {
    sigset_t s;
    stop_set(&s);
    int sig = 0;
    while (sigwait(&s, &sig) != 0) {}
    return sig;
}

int pvs_spawn_with_pipe(const char *path, char *const argv[], int32_t *pid) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return -errno;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, p[0], 0);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    /* The child starts with no signals blocked, whatever this thread blocks. */
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    pid_t child;
    int r = posix_spawn(&child, path, &fa, &attr, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    close(p[0]);
    if (r != 0) { close(p[1]); return -r; }
    *pid = child;
    return p[1];
}

int pvs_write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        p += n; len -= (size_t)n;
    }
    return 0;
}

int pvs_read_exact(int fd, void *buf, size_t len) {
    char *p = buf;
    size_t got = 0;
    while (got < len) {
        ssize_t n = read(fd, p + got, len - got);
        if (n < 0) { if (errno == EINTR) continue; return -errno; }
        if (n == 0) return 0;
        got += (size_t)n;
    }
    return 1;
}

int pvs_waitpid(int32_t pid, int nohang) {
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, nohang ? WNOHANG : 0);
        if (r >= 0) return r;
        if (errno != EINTR) return -errno;
    }
}

void pvs_ignore_stop_signals(void) {
    signal(SIGINT, SIG_IGN); signal(SIGTERM, SIG_IGN); signal(SIGHUP, SIG_IGN);
    signal(SIGQUIT, SIG_IGN); signal(SIGPIPE, SIG_IGN);
}

void pvs_close(int fd) { close(fd); }

/* Fallback walk: each component opened with O_NOFOLLOW (a link fails with ELOOP). */
static int open_walk(int dirfd, const char *path, int flags, int beneath) {
    if (beneath && path[0] == '/') return -EXDEV;
    char buf[PATH_MAX];
    if (strlen(path) >= sizeof buf) return -ENAMETOOLONG;
    strcpy(buf, path);
    int cur = path[0] == '/' ? open("/", O_PATH | O_DIRECTORY | O_CLOEXEC) : fcntl(dirfd == AT_FDCWD ? open(".", O_PATH | O_DIRECTORY | O_CLOEXEC) : dirfd, F_DUPFD_CLOEXEC, 0);
    if (cur < 0) return -errno;
    char *save = NULL;
    char *part = strtok_r(buf, "/", &save);
    while (part) {
        char *next = strtok_r(NULL, "/", &save);
        if (strcmp(part, "..") == 0 && beneath) { close(cur); return -EXDEV; }
        int fd = openat(cur, part, next ? (O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) : (flags | O_NOFOLLOW | O_CLOEXEC));
        int e = errno;
        close(cur);
        if (fd < 0) return -e;
        cur = fd;
        part = next;
    }
    return cur;
}

int pvs_open_no_symlinks(int dirfd, const char *path, int flags, int beneath) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | (beneath ? RESOLVE_BENEATH : 0);
    long fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    if (fd >= 0) return (int)fd;
    if (errno == ENOSYS) return open_walk(dirfd, path, flags, beneath);
    return -errno;
}

int pvs_set_nonblocking(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
    return 0;
}

int pvs_write_record(int fd, const void *buf, size_t len) {
    for (;;) {
        ssize_t n = write(fd, buf, len);
        if (n == (ssize_t)len) return 0;
        if (n >= 0) return -EIO; /* a short write cannot happen for len <= PIPE_BUF */
        if (errno == EINTR) continue;
        return -errno;
    }
}

void pvs_ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

int pvs_process_uid(int32_t pid, uint32_t *uid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return -errno;
    int r = -EINVAL;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "Uid:", 4) == 0) {
            *uid = (uint32_t)strtoul(line + 4, NULL, 10);
            r = 0;
            break;
        }
    }
    fclose(f);
    return r;
}

void pvs_set_process_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

int pvs_timerfd_create(void) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int pvs_timerfd_arm(int fd, uint64_t ns) {
    struct itimerspec spec = {0};
    if (ns == 0) ns = 1;  /* zero would disarm: the earliest time instead */
    spec.it_value.tv_sec = (time_t)(ns / 1000000000ull);
    spec.it_value.tv_nsec = (long)(ns % 1000000000ull);
    return timerfd_settime(fd, TFD_TIMER_ABSTIME, &spec, NULL) == 0 ? 0 : -errno;
}

int pvs_timerfd_wait(int fd) {
    uint64_t expirations;
    for (;;) {
        ssize_t n = read(fd, &expirations, sizeof expirations);
        if (n == (ssize_t)sizeof expirations) return 0;
        if (n < 0 && errno == EINTR) continue;
        return n < 0 ? -errno : -EIO;
    }
}

int pvs_sd_notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !path[0]) return 0;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t len = strlen(path);
    if (len >= sizeof addr.sun_path) return -EINVAL;
    memcpy(addr.sun_path, path, len);
    if (addr.sun_path[0] == '@') addr.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    ssize_t n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&addr,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    int err = n < 0 ? -errno : 1;
    close(fd);
    return err;
}

int pvs_is_unix_listener(int fd) {
    int type = 0, listening = 0;
    socklen_t l = sizeof type;
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0) return -errno;
    l = sizeof listening;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) < 0) return -errno;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) < 0) return -errno;
    return type == SOCK_STREAM && listening && ss.ss_family == AF_UNIX;
}

int pvs_wait_stop_signal_timeout(int timeout_ms) {
    sigset_t s;
    stop_set(&s);
    struct timespec ts = { timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L };
    for (;;) {
        int sig = sigtimedwait(&s, NULL, &ts);
        if (sig > 0) return sig;
        if (errno == EAGAIN) return 0;
        if (errno != EINTR) return 0;
    }
}
