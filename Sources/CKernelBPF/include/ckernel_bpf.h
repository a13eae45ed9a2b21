/* The host kernel's BPF, used as an oracle by the differential tests of the
 * pvsched interpreter and verifier: load a socket-filter program and run it with
 * BPF_PROG_TEST_RUN. */
#ifndef CKERNEL_BPF_H
#define CKERNEL_BPF_H
#include <stdint.h>

/* Loads `count` instructions as BPF_PROG_TYPE_SOCKET_FILTER; returns the fd, or
 * -errno (with the verifier log in `log` when rejected). */
int ckbpf_load(const void *insns, uint32_t count, char *log, uint32_t log_size);
/* Runs the program once on `size` bytes of data; returns 0 and *retval, or -errno. */
int ckbpf_test_run(int fd, void *data, uint32_t size, uint32_t *retval);
void ckbpf_close(int fd);
#endif
