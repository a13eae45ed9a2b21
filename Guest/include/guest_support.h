/* Low-level helpers of the pvsched guest kernel: single instructions as inline
 * asm, the IDT and per-CPU setup, and the interrupt frame. */
#ifndef GUEST_SUPPORT_H
#define GUEST_SUPPORT_H
#include <stdint.h>
#include <stddef.h>

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_halt(void) { __asm__ volatile("hlt" ::: "memory"); }
/* Enable interrupts and halt atomically (an interrupt between the two is not lost). */
static inline void cpu_enable_and_halt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void cpu_enable_interrupts(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cpu_disable_interrupts(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline uint64_t cpu_rdtsc(void) { uint32_t lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
static inline void cpu_wrmsr(uint32_t msr, uint64_t v) { __asm__ volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32))); }
static inline uint32_t this_cpu(void) { uint32_t v; __asm__ volatile("movl %%gs:0, %0" : "=r"(v)); return v; }
/* Disable interrupts, returning whether they were enabled. */
static inline int irq_save(void) { uint64_t f; __asm__ volatile("pushfq; popq %0; cli" : "=r"(f) :: "memory"); return (f >> 9) & 1; }
static inline void irq_restore(int enabled) { if (enabled) __asm__ volatile("sti" ::: "memory"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline uint32_t load_acquire32(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_release32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t fetch_add32(volatile uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }

/* Registers saved by the interrupt stubs, then what the CPU pushed. */
struct interrupt_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code, rip, cs, rflags, rsp, ss;
};

/* Context switch between task stacks (entry.S). */
void context_switch(uint64_t *save_rsp, uint64_t new_rsp);
void task_trampoline(void);
static inline uint64_t task_trampoline_address(void) { return (uint64_t)&task_trampoline; }

/* Loads the kernel's IDT (built once by guest_idt_init) on this CPU. */
void guest_idt_init(void);
void guest_idt_load(void);
/* Points GS at this CPU's block, whose first word is the CPU index. */
void guest_percpu_init(uint32_t cpu);
/* Words shared by all vCPUs for start-up and shutdown. */
volatile uint32_t *guest_sync_word(uint32_t index);
/* The shared, zeroed memory pool (bump allocator) for kernel data. */
void *guest_alloc(size_t size, size_t align);
#endif
