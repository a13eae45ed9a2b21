/* Thin wrappers over the Linux socket, credential, process and file-lock calls
 * the pvsched daemon needs and Swift cannot call cleanly (variadic, macros,
 * _GNU_SOURCE-only structs). Each returns 0 / a file descriptor, or -errno. */
#ifndef CHOST_SERVICE_H
#define CHOST_SERVICE_H
#include <stdint.h>
#include <sys/types.h>

/* Create a listening SOCK_STREAM Unix socket at path (unlinking a stale one
 * first), with the given mode applied before it becomes reachable; fd or -errno. */
int pvs_unix_listen(const char *path, unsigned mode, int backlog);
/* Connect to the Unix socket at path; fd or -errno. */
int pvs_unix_connect(const char *path);
/* accept4 with SOCK_CLOEXEC; fd or -errno. */
int pvs_accept(int fd);
/* The peer's credentials (SO_PEERCRED); 0 or -errno. */
int pvs_peer_cred(int fd, int32_t *pid, uint32_t *uid, uint32_t *gid);
/* Set SO_RCVTIMEO / SO_SNDTIMEO in milliseconds; 0 or -errno. */
int pvs_set_timeouts(int fd, int recv_ms, int send_ms);
/* send() all of buf with MSG_NOSIGNAL; 0 or -errno. */
int pvs_send_all(int fd, const void *buf, size_t len);
/* recv(); bytes, 0 at end, or -errno (EINTR retried). */
long pvs_recv(int fd, void *buf, size_t len);
/* shutdown(fd, SHUT_RDWR). */
void pvs_shutdown(int fd);
/* Take an exclusive, non-blocking flock on path (created 0644); fd or -errno
 * (-EWOULDBLOCK when another process holds it). */
int pvs_lock_file(const char *path);
/* pidfd_open(pid, 0); fd or -errno. */
int pvs_pidfd_open(int32_t pid);
/* poll() two fds for readability with a timeout in ms (-1 forever); returns a
 * bitmask: 1 = a readable/hung up, 2 = b readable/hung up; 0 on timeout; -errno. */
int pvs_poll2(int a, int b, int timeout_ms);
/* Whether gid is among the supplementary groups of process pid (reads
 * /proc/pid/status); 1, 0, or -errno. */
int pvs_process_in_group(int32_t pid, uint32_t gid);
/* Look up a group by name; 0 and *gid, or -ENOENT. */
int pvs_group_id(const char *name, uint32_t *gid);
/* chown(path, uid, gid); 0 or -errno. */
int pvs_chown(const char *path, uint32_t uid, uint32_t gid);
/* mkdir -p one level with mode (EEXIST is success); 0 or -errno. */
int pvs_mkdir(const char *path, unsigned mode);
/* Block (how=1) or unblock (how=0) SIGINT, SIGTERM, SIGHUP, SIGQUIT in the calling thread
 * (threads created afterwards inherit it). */
void pvs_block_stop_signals(int how);
/* Wait for one of the stop signals blocked above; returns the signal number. */
int pvs_wait_stop_signal(void);
/* Spawn argv[0] (a path) with stdin connected to a new pipe; returns the
 * write end's fd and sets *pid; -errno on failure. The child gets no other fds. */
int pvs_spawn_with_pipe(const char *path, char *const argv[], int32_t *pid);
/* write() all of buf (pipes); 0 or -errno. */
int pvs_write_all(int fd, const void *buf, size_t len);
/* read() exactly len bytes; 1 done, 0 at end of file, -errno. */
int pvs_read_exact(int fd, void *buf, size_t len);
/* waitpid(pid, &status, WNOHANG if nohang); returns pid, 0, or -errno. */
int pvs_waitpid(int32_t pid, int nohang);
/* Ignore SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGPIPE in this process. */
void pvs_ignore_stop_signals(void);
/* O_PATH (a descriptor that only names a file), which Swift's Glibc does not export. */
enum { PVS_O_PATH = 010000000 };
/* Opens path relative to dirfd (AT_FDCWD, or a directory) with no symbolic link
 * anywhere on the way (openat2 RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, and
 * RESOLVE_BENEATH when beneath is set: no "..", no absolute path out of dirfd);
 * on kernels without openat2, component by component with O_NOFOLLOW. fd or -errno
 * (-ELOOP for a symbolic link, -EXDEV for a path out of dirfd). */
int pvs_open_no_symlinks(int dirfd, const char *path, int flags, int beneath);
/* Make fd non-blocking; 0 or -errno. */
int pvs_set_nonblocking(int fd);
/* write() buf whole or not at all on a non-blocking pipe (len <= PIPE_BUF: atomic);
 * 0, -EAGAIN when the pipe is full, -EPIPE when its reader is gone, or -errno. */
int pvs_write_record(int fd, const void *buf, size_t len);
/* Ignore SIGPIPE in this process: a write to a closed pipe or socket then fails
 * with EPIPE instead of killing the process. */
void pvs_ignore_sigpipe(void);
/* The uid owning a process (the real uid, /proc/PID/status); 0 and *uid, or -errno. */
int pvs_process_uid(int32_t pid, uint32_t *uid);

/* close(fd). */
void pvs_close(int fd);
/* Set the calling process's name (prctl PR_SET_NAME). */
void pvs_set_process_name(const char *name);
/* A CLOCK_MONOTONIC timerfd (TFD_CLOEXEC); fd or -errno. */
int pvs_timerfd_create(void);
/* Arm the timerfd to expire once at absolute monotonic time ns (a time already
 * past expires at once); 0 or -errno. */
int pvs_timerfd_arm(int fd, uint64_t ns);
/* Wait for the timerfd to expire (read, EINTR retried); 0 or -errno. */
int pvs_timerfd_wait(int fd);

/* Send `state` (e.g. "READY=1") to the service manager at $NOTIFY_SOCKET (a Unix
 * datagram socket; '@' is the abstract namespace); 1 sent, 0 no NOTIFY_SOCKET, -errno. */
int pvs_sd_notify(const char *state);
/* Whether fd is a listening Unix stream socket; 1, 0, or -errno. */
int pvs_is_unix_listener(int fd);
/* Wait for SIGINT, SIGTERM, SIGHUP or SIGQUIT (blocked by pvs_block_stop_signals)
 * for at most timeout_ms; the signal, or 0 on timeout. */
int pvs_wait_stop_signal_timeout(int timeout_ms);

#endif
