#define _GNU_SOURCE
#include "ckernel_events.h"
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The libbpf 1.x API used, declared here (libbpf.so.1 is opened at run time). */
struct bpf_object; struct bpf_program; struct bpf_link; struct ring_buffer;
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
typedef int (*libbpf_print_fn_t)(int level, const char *fmt, va_list ap);

static struct {
    void *lib;
    struct bpf_object *(*open_mem)(const void *, size_t, const void *);
    int (*load)(struct bpf_object *);
    void (*close)(struct bpf_object *);
    struct bpf_program *(*next_program)(const struct bpf_object *, struct bpf_program *);
    const char *(*section_name)(const struct bpf_program *);
    int (*set_autoload)(struct bpf_program *, bool);
    struct bpf_link *(*attach)(const struct bpf_program *);
    int (*link_destroy)(struct bpf_link *);
    int (*find_map_fd)(const struct bpf_object *, const char *);
    int (*map_update)(int, const void *, const void *, uint64_t);
    int (*map_delete)(int, const void *);
    int (*map_lookup)(int, const void *, void *);
    struct ring_buffer *(*rb_new)(int, ring_buffer_sample_fn, void *, const void *);
    int (*rb_poll)(struct ring_buffer *, int);
    void (*rb_free)(struct ring_buffer *);
    libbpf_print_fn_t (*set_print)(libbpf_print_fn_t);
} L;

#define MAX_PROGRAMS 16

struct pvs_kev {
    struct bpf_object *obj;
    struct bpf_link *links[MAX_PROGRAMS];
    char sections[MAX_PROGRAMS][64];
    char errors[MAX_PROGRAMS][96];
    int states[MAX_PROGRAMS];
    int count;
    int threads_fd, processes_fd, dropped_fd, held_fd;
    struct ring_buffer *rb;
    struct pvsched_kvm_event *buf;
    int buf_len, buf_cap;
};

static int quiet(int level, const char *fmt, va_list ap) { (void)level; (void)fmt; (void)ap; return 0; }

static int load_libbpf(char *err, size_t errlen) {
    if (L.lib) return 0;
    void *lib = dlopen("libbpf.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) { snprintf(err, errlen, "libbpf.so.1 not found (install libbpf1): %s", dlerror()); return -1; }
#define SYM(field, name) do { *(void **)&L.field = dlsym(lib, name); \
        if (!L.field) { snprintf(err, errlen, "libbpf.so.1 lacks %s", name); dlclose(lib); return -1; } } while (0)
    SYM(open_mem, "bpf_object__open_mem"); SYM(load, "bpf_object__load"); SYM(close, "bpf_object__close");
    SYM(next_program, "bpf_object__next_program"); SYM(section_name, "bpf_program__section_name");
    SYM(set_autoload, "bpf_program__set_autoload"); SYM(attach, "bpf_program__attach");
    SYM(link_destroy, "bpf_link__destroy"); SYM(find_map_fd, "bpf_object__find_map_fd_by_name");
    SYM(map_update, "bpf_map_update_elem"); SYM(map_delete, "bpf_map_delete_elem"); SYM(map_lookup, "bpf_map_lookup_elem");
    SYM(rb_new, "ring_buffer__new"); SYM(rb_poll, "ring_buffer__poll"); SYM(rb_free, "ring_buffer__free");
    SYM(set_print, "libbpf_set_print");
#undef SYM
    L.set_print(quiet);
    L.lib = lib;
    return 0;
}

/* Opens the object with only the programs whose bit is set in `mask` loading. */
static struct bpf_object *open_with(const void *object, size_t length, unsigned mask, int *count) {
    struct bpf_object *obj = L.open_mem(object, length, NULL);
    if (!obj) return NULL;
    int i = 0;
    for (struct bpf_program *p = L.next_program(obj, NULL); p; p = L.next_program(obj, p), i++)
        L.set_autoload(p, i < MAX_PROGRAMS && (mask >> i) & 1);
    *count = i;
    return obj;
}

static int on_sample(void *ctx, void *data, size_t size) {
    struct pvs_kev *h = ctx;
    if (size < sizeof(struct pvsched_kvm_event)) return 0;
    if (h->buf_len == h->buf_cap) {
        int cap = h->buf_cap ? h->buf_cap * 2 : 256;
        void *nb = realloc(h->buf, (size_t)cap * sizeof(struct pvsched_kvm_event));
        if (!nb) return 0;
        h->buf = nb;
        h->buf_cap = cap;
    }
    memcpy(&h->buf[h->buf_len++], data, sizeof(struct pvsched_kvm_event));
    return 0;
}

struct pvs_kev *pvs_kev_open(const void *object, size_t length, char *err, size_t errlen) {
    if (load_libbpf(err, errlen) != 0) return NULL;
    int count = 0;
    struct bpf_object *probe = open_with(object, length, 0, &count);
    if (!probe) { snprintf(err, errlen, "libbpf could not open the BPF object (errno %d)", errno); return NULL; }
    L.close(probe);
    if (count > MAX_PROGRAMS) count = MAX_PROGRAMS;
    /* Keep each program that still lets the object load: a kernel without one
     * tracepoint (or its BTF) still gets the rest. */
    unsigned mask = 0;
    int first_errno = 0;
    for (int i = 0; i < count; i++) {
        int n;
        struct bpf_object *obj = open_with(object, length, mask | 1u << i, &n);
        if (!obj) continue;
        int r = L.load(obj);
        if (r == 0) mask |= 1u << i;
        else if (!first_errno) first_errno = -r;
        L.close(obj);
    }
    if (mask == 0) {
        snprintf(err, errlen, "the kernel refused every program of the BPF object (errno %d: %s)",
                 first_errno, strerror(first_errno));
        return NULL;
    }
    struct pvs_kev *h = calloc(1, sizeof *h);
    if (!h) { snprintf(err, errlen, "out of memory"); return NULL; }
    int n;
    h->obj = open_with(object, length, mask, &n);
    int r = h->obj ? L.load(h->obj) : -errno;
    if (r != 0) {
        snprintf(err, errlen, "loading the BPF object failed (errno %d)", -r);
        if (h->obj) L.close(h->obj);
        free(h);
        return NULL;
    }
    h->count = count;
    int i = 0;
    for (struct bpf_program *p = L.next_program(h->obj, NULL); p && i < count; p = L.next_program(h->obj, p), i++) {
        snprintf(h->sections[i], sizeof h->sections[i], "%s", L.section_name(p));
        if (!((mask >> i) & 1)) {
            h->states[i] = 0;
            snprintf(h->errors[i], sizeof h->errors[i], "the kernel refused to load it");
            continue;
        }
        errno = 0;
        struct bpf_link *link = L.attach(p);
        if (!link) {
            h->states[i] = 1;
            snprintf(h->errors[i], sizeof h->errors[i], "attach failed: %s", strerror(errno ? errno : EINVAL));
        } else {
            h->links[i] = link;
            h->states[i] = 2;
        }
    }
    h->threads_fd = L.find_map_fd(h->obj, "vcpu_threads");
    h->processes_fd = L.find_map_fd(h->obj, "vmm_processes");
    h->dropped_fd = L.find_map_fd(h->obj, "dropped");
    h->held_fd = L.find_map_fd(h->obj, "held_threads");
    int events_fd = L.find_map_fd(h->obj, "events");
    h->rb = events_fd >= 0 ? L.rb_new(events_fd, on_sample, h, NULL) : NULL;
    if (!h->rb || h->threads_fd < 0 || h->processes_fd < 0 || h->held_fd < 0) {
        snprintf(err, errlen, "the BPF object lacks its maps or ring buffer");
        pvs_kev_close(h);
        return NULL;
    }
    return h;
}

void pvs_kev_close(struct pvs_kev *h) {
    if (!h) return;
    for (int i = 0; i < MAX_PROGRAMS; i++) if (h->links[i]) L.link_destroy(h->links[i]);
    if (h->rb) L.rb_free(h->rb);
    if (h->obj) L.close(h->obj);
    free(h->buf);
    free(h);
}

int pvs_kev_program_count(const struct pvs_kev *h) { return h->count; }
const char *pvs_kev_program_section(const struct pvs_kev *h, int i) { return i >= 0 && i < h->count ? h->sections[i] : ""; }
int pvs_kev_program_state(const struct pvs_kev *h, int i) { return i >= 0 && i < h->count ? h->states[i] : 0; }
const char *pvs_kev_program_error(const struct pvs_kev *h, int i) { return i >= 0 && i < h->count ? h->errors[i] : ""; }

int pvs_kev_watch_thread(struct pvs_kev *h, uint32_t tid, uint32_t vm, uint32_t vcpu) {
    struct pvsched_kvm_vcpu v = { .vm = vm, .vcpu = vcpu };
    return L.map_update(h->threads_fd, &tid, &v, 0);
}
int pvs_kev_unwatch_thread(struct pvs_kev *h, uint32_t tid) {
    L.map_delete(h->held_fd, &tid);
    return L.map_delete(h->threads_fd, &tid);
}
int pvs_kev_hold(struct pvs_kev *h, uint32_t tid, uint64_t earliest_ns, uint64_t latest_ns) {
    if (earliest_ns) {
        /* What the BPF side learnt of the period stays (a race with it costs one
         * wake-up sent that need not have been, nothing more). */
        struct pvsched_kvm_held held = {0};
        L.map_lookup(h->held_fd, &tid, &held);
        held.earliest = earliest_ns;
        held.latest = latest_ns;
        return L.map_update(h->held_fd, &tid, &held, 0);
    }
    int r = L.map_delete(h->held_fd, &tid);
    return r == -ENOENT ? 0 : r;
}
int pvs_kev_watch_process(struct pvs_kev *h, uint32_t tgid, uint32_t vm) { return L.map_update(h->processes_fd, &tgid, &vm, 0); }
int pvs_kev_unwatch_process(struct pvs_kev *h, uint32_t tgid) { return L.map_delete(h->processes_fd, &tgid); }

int pvs_kev_poll(struct pvs_kev *h, int timeout_ms, const struct pvsched_kvm_event **records) {
    h->buf_len = 0;
    int r = L.rb_poll(h->rb, timeout_ms);
    *records = h->buf;
    if (r < 0 && r != -EINTR) return r;
    return h->buf_len;
}

uint64_t pvs_kev_settled(struct pvs_kev *h, uint32_t tid) {
    struct pvsched_kvm_vcpu v;
    return L.map_lookup(h->threads_fd, &tid, &v) == 0 ? v.settled : 0;
}

uint64_t pvs_kev_dropped(struct pvs_kev *h) {
    if (h->dropped_fd < 0) return 0;
    /* A per-CPU lookup writes one value per possible CPU: size the buffer for
     * the kernel's maximum so that it can never overflow. */
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    enum { MAX_CPUS = 8192 };
    uint64_t *values = calloc(MAX_CPUS, sizeof *values);
    if (!values || ncpu < 1) { free(values); return 0; }
    if (ncpu > MAX_CPUS) ncpu = MAX_CPUS;
    uint64_t total = 0;
    for (uint32_t k = 0; k < 16; k++) {
        if (L.map_lookup(h->dropped_fd, &k, values) != 0) continue;
        for (long c = 0; c < ncpu; c++) total += values[c];
    }
    free(values);
    return total;
}
