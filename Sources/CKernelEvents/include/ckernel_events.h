/* The kernel-BPF event source: loads BPF/kvm_events.bpf.c with the system's
 * libbpf (libbpf.so.1, opened at run time so that pvsched builds and runs
 * without it), attaches what this kernel supports, and hands out ring-buffer
 * records. A thin C layer: policy and bookkeeping live in Swift. */
#ifndef CKERNEL_EVENTS_H
#define CKERNEL_EVENTS_H
#include <stddef.h>
#include <stdint.h>
#include "pvsched_kvm_events.h"

struct pvs_kev;

/* Opens libbpf, then loads as many of the object's programs as this kernel
 * accepts (in the object's order of importance) and attaches them. NULL on
 * failure, with the reason in err. */
struct pvs_kev *pvs_kev_open(const void *object, size_t length, char *err, size_t errlen);
void pvs_kev_close(struct pvs_kev *h);

/* The programs: count, section name, and state (0 not loaded, 1 loaded but not
 * attached, 2 attached), with the reason when not attached. */
int pvs_kev_program_count(const struct pvs_kev *h);
const char *pvs_kev_program_section(const struct pvs_kev *h, int i);
int pvs_kev_program_state(const struct pvs_kev *h, int i);
const char *pvs_kev_program_error(const struct pvs_kev *h, int i);

/* The filter maps; 0 or -errno. */
int pvs_kev_watch_thread(struct pvs_kev *h, uint32_t tid, uint32_t vm, uint32_t vcpu);
int pvs_kev_unwatch_thread(struct pvs_kev *h, uint32_t tid);
/* Thread `tid`'s boost is held through its halts for a deadline whose wake-up comes
 * between `earliest_ns` and `latest_ns` (CLOCK_MONOTONIC), or no longer
 * (`earliest_ns` 0): see struct pvsched_kvm_held. */
int pvs_kev_hold(struct pvs_kev *h, uint32_t tid, uint64_t earliest_ns, uint64_t latest_ns);
int pvs_kev_watch_process(struct pvs_kev *h, uint32_t tgid, uint32_t vm);
int pvs_kev_unwatch_process(struct pvs_kev *h, uint32_t tgid);

/* Waits up to timeout_ms for records; returns how many are at *records (valid
 * until the next call), or -errno. */
int pvs_kev_poll(struct pvs_kev *h, int timeout_ms, const struct pvsched_kvm_event **records);
/* Records the BPF side dropped because the ring buffer was full. */
uint64_t pvs_kev_dropped(struct pvs_kev *h);
/* Wake-ups of watched thread `tid` that ran and slept again without waiting for
 * their CPU (no record was sent for them); 0 for a thread not watched. */
uint64_t pvs_kev_settled(struct pvs_kev *h, uint32_t tid);
#endif
