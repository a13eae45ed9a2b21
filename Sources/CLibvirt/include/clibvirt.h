/* libvirt for the daemon: the system's libvirt.so.0 (from libvirt0), opened at run
 * time as libbpf is, so that pvsched builds without libvirt-dev and runs where
 * libvirt is not installed. A thin C layer: connect, list running domains with
 * their XML, and learn of lifecycle events and a lost connection through an
 * eventfd. What to do with them lives in Swift (PVSchedLibvirt). */
#ifndef CLIBVIRT_H
#define CLIBVIRT_H
#include <stddef.h>

struct pvs_virt;

/* Opens libvirt.so.0 (once per process), starts its event loop on a thread of its
 * own, connects to `uri` and registers for domain lifecycle events. NULL on
 * failure, with the reason in err. */
struct pvs_virt *pvs_virt_open(const char *uri, char *err, size_t errlen);
void pvs_virt_close(struct pvs_virt *h);

/* An eventfd that becomes readable when a domain starts, stops, crashes, is
 * resumed or suspended, or when the connection is lost (read it to reset). */
int pvs_virt_event_fd(const struct pvs_virt *h);
/* 1 while the connection is alive, 0 once lost (reconnect with a new handle). */
int pvs_virt_alive(struct pvs_virt *h);

/* A running domain. */
struct pvs_virt_domain {
    char name[256];
    char uuid[40];
    int id;
    char *xml; /* the live XML (malloc'd; freed by pvs_virt_free_domains) */
};
/* The running domains; returns how many are at *out (free with
 * pvs_virt_free_domains), or -1 with the reason in err. */
int pvs_virt_running_domains(struct pvs_virt *h, struct pvs_virt_domain **out, char *err, size_t errlen);
void pvs_virt_free_domains(struct pvs_virt_domain *d, int n);
#endif
