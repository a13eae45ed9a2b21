#define _GNU_SOURCE
#include "clibvirt.h"
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* The few libvirt declarations used (libvirt's public, stable C API). */
typedef void *virConnectPtr;
typedef void *virDomainPtr;
typedef void (*virFreeCallback)(void *opaque);
typedef void (*virConnectDomainEventGenericCallback)(virConnectPtr, virDomainPtr, void *);
typedef int (*virConnectDomainEventLifecycleCallback)(virConnectPtr, virDomainPtr, int event, int detail, void *opaque);
typedef void (*virConnectCloseFunc)(virConnectPtr, int reason, void *opaque);
typedef void (*virEventTimeoutCallback)(int timer, void *opaque);
typedef void (*virErrorFunc)(void *userData, void *error);
#define VIR_CONNECT_LIST_DOMAINS_ACTIVE 1
#define VIR_DOMAIN_EVENT_ID_LIFECYCLE 0

static struct {
    int (*eventRegisterDefaultImpl)(void);
    int (*eventRunDefaultImpl)(void);
    int (*eventAddTimeout)(int, virEventTimeoutCallback, void *, virFreeCallback);
    virConnectPtr (*connectOpen)(const char *);
    int (*connectClose)(virConnectPtr);
    int (*connectIsAlive)(virConnectPtr);
    int (*connectSetKeepAlive)(virConnectPtr, int, unsigned int);
    int (*connectRegisterCloseCallback)(virConnectPtr, virConnectCloseFunc, void *, virFreeCallback);
    int (*connectUnregisterCloseCallback)(virConnectPtr, virConnectCloseFunc);
    int (*connectDomainEventRegisterAny)(virConnectPtr, virDomainPtr, int, virConnectDomainEventGenericCallback, void *, virFreeCallback);
    int (*connectDomainEventDeregisterAny)(virConnectPtr, int);
    int (*connectListAllDomains)(virConnectPtr, virDomainPtr **, unsigned int);
    const char *(*domainGetName)(virDomainPtr);
    int (*domainGetUUIDString)(virDomainPtr, char *);
    unsigned int (*domainGetID)(virDomainPtr);
    char *(*domainGetXMLDesc)(virDomainPtr, unsigned int);
    int (*domainFree)(virDomainPtr);
    const char *(*getLastErrorMessage)(void);
    void (*setErrorFunc)(void *, virErrorFunc);
} L;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char load_error[256];
static int loaded;

/* libvirt prints every error on stderr unless told otherwise; the daemon logs them itself. */
static void quiet(void *user, void *error) { (void)user; (void)error; }
static void tick(int timer, void *opaque) { (void)timer; (void)opaque; }

static void *event_loop(void *arg) {
    (void)arg;
    for (;;) L.eventRunDefaultImpl();
    return NULL;
}

static void load(void) {
    void *lib = dlopen("libvirt.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(load_error, sizeof load_error, "libvirt.so.0 not found (install libvirt0): %s", dlerror());
        return;
    }
#define SYM(field, name) do { *(void **)&L.field = dlsym(lib, name); \
        if (!L.field) { snprintf(load_error, sizeof load_error, "libvirt.so.0 lacks %s", name); return; } } while (0)
    SYM(eventRegisterDefaultImpl, "virEventRegisterDefaultImpl");
    SYM(eventRunDefaultImpl, "virEventRunDefaultImpl");
    SYM(eventAddTimeout, "virEventAddTimeout");
    SYM(connectOpen, "virConnectOpen");
    SYM(connectClose, "virConnectClose");
    SYM(connectIsAlive, "virConnectIsAlive");
    SYM(connectSetKeepAlive, "virConnectSetKeepAlive");
    SYM(connectRegisterCloseCallback, "virConnectRegisterCloseCallback");
    SYM(connectUnregisterCloseCallback, "virConnectUnregisterCloseCallback");
    SYM(connectDomainEventRegisterAny, "virConnectDomainEventRegisterAny");
    SYM(connectDomainEventDeregisterAny, "virConnectDomainEventDeregisterAny");
    SYM(connectListAllDomains, "virConnectListAllDomains");
    SYM(domainGetName, "virDomainGetName");
    SYM(domainGetUUIDString, "virDomainGetUUIDString");
    SYM(domainGetID, "virDomainGetID");
    SYM(domainGetXMLDesc, "virDomainGetXMLDesc");
    SYM(domainFree, "virDomainFree");
    SYM(getLastErrorMessage, "virGetLastErrorMessage");
    SYM(setErrorFunc, "virSetErrorFunc");
#undef SYM
    L.setErrorFunc(NULL, quiet);
    if (L.eventRegisterDefaultImpl() < 0) {
        snprintf(load_error, sizeof load_error, "virEventRegisterDefaultImpl: %s", L.getLastErrorMessage());
        return;
    }
    /* The loop wakes at least every second (a timer), so that events are never held back. */
    L.eventAddTimeout(1000, tick, NULL, NULL);
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &a, event_loop, NULL) != 0) {
        snprintf(load_error, sizeof load_error, "cannot start libvirt's event loop thread");
        return;
    }
    pthread_setname_np(t, "pvs-libvirt");
    loaded = 1;
}

struct pvs_virt {
    virConnectPtr conn;
    int efd;
    int callback;
    volatile int lost;
};

static void signal_event(struct pvs_virt *h) {
    uint64_t one = 1;
    ssize_t n = write(h->efd, &one, sizeof one);
    (void)n;
}

static int lifecycle(virConnectPtr c, virDomainPtr d, int event, int detail, void *opaque) {
    (void)c; (void)d; (void)event; (void)detail;
    signal_event(opaque);
    return 0;
}

static void closed(virConnectPtr c, int reason, void *opaque) {
    (void)c; (void)reason;
    struct pvs_virt *h = opaque;
    h->lost = 1;
    signal_event(h);
}

struct pvs_virt *pvs_virt_open(const char *uri, char *err, size_t errlen) {
    pthread_once(&once, load);
    if (!loaded) {
        snprintf(err, errlen, "%s", load_error[0] ? load_error : "libvirt could not be loaded");
        return NULL;
    }
    struct pvs_virt *h = calloc(1, sizeof *h);
    if (!h) { snprintf(err, errlen, "out of memory"); return NULL; }
    h->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    h->callback = -1;
    if (h->efd < 0) { snprintf(err, errlen, "eventfd: %s", strerror(errno)); free(h); return NULL; }
    h->conn = L.connectOpen(uri);
    if (!h->conn) {
        snprintf(err, errlen, "cannot connect to %s: %s", uri, L.getLastErrorMessage());
        close(h->efd); free(h);
        return NULL;
    }
    /* libvirtd gone (a restart): noticed within 5 × 3 s at worst, at once when the socket closes. */
    L.connectSetKeepAlive(h->conn, 5, 3);
    L.connectRegisterCloseCallback(h->conn, closed, h, NULL);
    h->callback = L.connectDomainEventRegisterAny(h->conn, NULL, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                  (virConnectDomainEventGenericCallback)lifecycle, h, NULL);
    if (h->callback < 0) {
        snprintf(err, errlen, "cannot register for domain events: %s", L.getLastErrorMessage());
        L.connectUnregisterCloseCallback(h->conn, closed);
        L.connectClose(h->conn); close(h->efd); free(h);
        return NULL;
    }
    return h;
}

void pvs_virt_close(struct pvs_virt *h) {
    if (!h) return;
    if (h->callback >= 0) L.connectDomainEventDeregisterAny(h->conn, h->callback);
    L.connectUnregisterCloseCallback(h->conn, closed);
    L.connectClose(h->conn);
    close(h->efd);
    free(h);
}

int pvs_virt_event_fd(const struct pvs_virt *h) { return h->efd; }

int pvs_virt_alive(struct pvs_virt *h) { return !h->lost && L.connectIsAlive(h->conn) == 1; }

int pvs_virt_running_domains(struct pvs_virt *h, struct pvs_virt_domain **out, char *err, size_t errlen) {
    virDomainPtr *doms = NULL;
    int n = L.connectListAllDomains(h->conn, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
    if (n < 0) { snprintf(err, errlen, "cannot list domains: %s", L.getLastErrorMessage()); return -1; }
    struct pvs_virt_domain *d = calloc(n > 0 ? (size_t)n : 1, sizeof *d);
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (d) {
            const char *name = L.domainGetName(doms[i]);
            char *xml = L.domainGetXMLDesc(doms[i], 0);
            if (name && xml && L.domainGetUUIDString(doms[i], d[k].uuid) == 0) {
                snprintf(d[k].name, sizeof d[k].name, "%s", name);
                d[k].id = (int)L.domainGetID(doms[i]);
                d[k].xml = xml;
                k++;
            } else {
                free(xml);  /* a domain that went away while listed */
            }
        }
        L.domainFree(doms[i]);
    }
    free(doms);
    if (!d) { snprintf(err, errlen, "out of memory"); return -1; }
    *out = d;
    return k;
}

void pvs_virt_free_domains(struct pvs_virt_domain *d, int n) {
    if (!d) return;
    for (int i = 0; i < n; i++) free(d[i].xml);
    free(d);
}
