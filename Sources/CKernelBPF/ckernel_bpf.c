#define _GNU_SOURCE
#include "ckernel_bpf.h"
#include <errno.h>
#include <linux/bpf.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int ckbpf_load(const void *insns, uint32_t count, char *log, uint32_t log_size) {
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.insn_cnt = count;
    a.license = (uint64_t)(uintptr_t)"GPL";
    if (log && log_size) { a.log_buf = (uint64_t)(uintptr_t)log; a.log_size = log_size; a.log_level = 1; log[0] = 0; }
    long fd = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof(a));
    if (fd < 0 && errno == ENOSPC && log) { /* log too small: retry without it */
        a.log_buf = 0; a.log_size = 0; a.log_level = 0;
        fd = syscall(SYS_bpf, BPF_PROG_LOAD, &a, sizeof(a));
    }
    return fd < 0 ? -errno : (int)fd;
}

int ckbpf_test_run(int fd, void *data, uint32_t size, uint32_t *retval) {
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.test.prog_fd = fd;
    a.test.data_in = (uint64_t)(uintptr_t)data;
    a.test.data_size_in = size;
    a.test.repeat = 1;
    if (syscall(SYS_bpf, BPF_PROG_TEST_RUN, &a, sizeof(a)) < 0) return -errno;
    *retval = a.test.retval;
    return 0;
}

void ckbpf_close(int fd) { close(fd); }
