/* C runtime support for the Embedded Swift guest kernel: memory functions,
 * a bump allocator, console putchar, the IDT and per-CPU blocks. */
#include "guest_support.h"
#include <pvsched_boot.h>

void *memset(void *d, int c, size_t n) { uint8_t *p = d; while (n--) *p++ = (uint8_t)c; return d; }
void *memcpy(void *d, const void *s, size_t n) { uint8_t *a = d; const uint8_t *b = s; while (n--) *a++ = *b++; return d; }
void *memmove(void *d, const void *s, size_t n) {
    uint8_t *a = d; const uint8_t *b = s;
    if (a < b) { while (n--) *a++ = *b++; } else { a += n; b += n; while (n--) *--a = *--b; }
    return d;
}
int memcmp(const void *x, const void *y, size_t n) {
    const uint8_t *a = x, *b = y;
    for (; n; n--, a++, b++) if (*a != *b) return *a - *b;
    return 0;
}
int putchar(int c) { outb(PVSCHED_PORT_CONSOLE, (uint8_t)c); return c; }

/* Kernel heap: [8 MiB, 24 MiB). The host gives at least 32 MiB of RAM. */
static uint64_t heap_next = 8u << 20;
static const uint64_t heap_end = 24u << 20;

void *guest_alloc(size_t size, size_t align) {
    if (align < 16) align = 16;
    for (;;) {
        uint64_t cur = __atomic_load_n(&heap_next, __ATOMIC_ACQUIRE);
        uint64_t start = (cur + align - 1) & ~(uint64_t)(align - 1);
        uint64_t end = start + size;
        if (end > heap_end) return 0;
        if (__atomic_compare_exchange_n(&heap_next, &cur, end, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            memset((void *)start, 0, size);
            return (void *)start;
        }
    }
}

int posix_memalign(void **out, size_t align, size_t size) {
    void *p = guest_alloc(size, align);
    if (!p) return 12;
    *out = p;
    return 0;
}
void free(void *p) { (void)p; /* the kernel never frees: a bump allocator */ }

struct idt_entry { uint16_t off0, sel; uint8_t ist, type; uint16_t off1; uint32_t off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern const uint64_t isr_stub_table[];

void guest_idt_init(void) {
    for (const uint64_t *e = isr_stub_table; e[0] != 0xFFFF; e += 2) {
        uint64_t v = e[0], addr = e[1];
        idt[v].off0 = (uint16_t)addr;
        idt[v].sel = 0x8;
        idt[v].ist = 0;
        idt[v].type = 0x8E; /* present, DPL 0, 64-bit interrupt gate */
        idt[v].off1 = (uint16_t)(addr >> 16);
        idt[v].off2 = (uint32_t)(addr >> 32);
        idt[v].zero = 0;
    }
}

void guest_idt_load(void) {
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } d = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(d));
}

static uint64_t percpu[16][8] __attribute__((aligned(64)));

void guest_percpu_init(uint32_t cpu) {
    percpu[cpu][0] = cpu;
    cpu_wrmsr(0xC0000101u, (uint64_t)&percpu[cpu][0]); /* IA32_GS_BASE */
}

static volatile uint32_t sync_words[16];
volatile uint32_t *guest_sync_word(uint32_t index) { return &sync_words[index & 15]; }
