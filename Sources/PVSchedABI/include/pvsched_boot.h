/*
 * pvsched_boot.h — how the pvsched VMM boots its guest kernel: the guest memory
 * map, the boot information block, the VMM's own devices (console, exit,
 * timer, interrupt-response) and the layout of workload results. Like
 * pvsched_abi.h it is the single source of truth, included by the VMM (Swift)
 * and the guest kernel (Embedded Swift).
 */
#ifndef PVSCHED_BOOT_H
#define PVSCHED_BOOT_H
#include <stdint.h>

/* Guest-physical memory map (identity-mapped by host-built page tables). */
#define PVSCHED_GPA_GDT        0x1000u
#define PVSCHED_GPA_PML4       0x2000u
#define PVSCHED_GPA_PDPT       0x3000u
#define PVSCHED_GPA_PD         0x4000u   /* 4 pages: 4 GiB of 2 MiB pages */
#define PVSCHED_GPA_BOOT_INFO  0x8000u
#define PVSCHED_GPA_KERNEL     0x100000u
#define PVSCHED_BOOT_STACK_SIZE 0x10000u /* per vCPU, at the top of RAM */

#define PVSCHED_BOOT_MAGIC     0x49425650u /* "PVBI" */

/* Workloads the host selects at boot (pvsched_boot_info.workload). */
#define PVSCHED_WORKLOAD_SELFTEST     0u  /* register area, set flags, ring doorbell, exit */
#define PVSCHED_WORKLOAD_CYCLIC       1u  /* RT task wakes every interval, records lateness */
#define PVSCHED_WORKLOAD_IRQ_RESPONSE 2u  /* answer host-raised interrupts */
#define PVSCHED_WORKLOAD_BATCH        3u  /* CPU-bound normal tasks */
#define PVSCHED_WORKLOAD_IDLE         4u  /* halt until the duration ends */
#define PVSCHED_WORKLOAD_CYCLIC_BATCH 5u  /* on one vCPU: the RT cyclic task and two batch tasks */
#define PVSCHED_WORKLOAD_HOSTILE_STUCK 6u /* hostile: an RT task that claims RT work and a boost request forever */
#define PVSCHED_WORKLOAD_HOSTILE_FLIP  7u /* hostile: flips RT and boost-request flags at a high rate, ringing the doorbell */
#define PVSCHED_WORKLOAD_MAX          7u

/* Selftest variants (pvsched_boot_info.arg). */
#define PVSCHED_SELFTEST_NORMAL       0u
#define PVSCHED_SELFTEST_BAD_MAGIC    1u  /* registers an area with a bad magic */
#define PVSCHED_SELFTEST_OUT_OF_RAM   2u  /* registers an area outside guest RAM */
#define PVSCHED_SELFTEST_BAD_FLAGS    3u  /* registers, then writes unknown flag bits */
#define PVSCHED_SELFTEST_INTERRUPTS   4u  /* also waits for host-raised interrupts */
#define PVSCHED_SELFTEST_EXIT_LOOP    5u  /* times 2000 port-IO exits: results.samples, lateness_sum_ns */

/* Boot information, at PVSCHED_GPA_BOOT_INFO, written by the host. The guest
 * writes only results_gpa / results_size / guest_status. */
struct pvsched_boot_info {
    uint32_t magic;
    uint32_t vcpu_count;
    uint64_t memory_size;
    uint64_t tsc_khz;           /* guest TSC frequency */
    uint32_t workload;          /* PVSCHED_WORKLOAD_* per vCPU: see workload_of */
    uint32_t arg;               /* workload argument */
    uint64_t interval_ns;       /* cyclic: wake-up period */
    uint64_t duration_ns;       /* how long workloads run */
    uint32_t pvsched_enabled;   /* 1: register the shared area */
    uint32_t irqchip;           /* 1: in-kernel LAPIC (EOI needed) */
    uint8_t  vcpu_workload[16]; /* per-vCPU workload override, 0xFF = use `workload` */
    /* Guest-written. */
    uint64_t results_gpa;       /* struct pvsched_results */
    uint64_t results_size;
    uint32_t guest_status;      /* 0 running, 1 done, 2 failed */
    uint32_t reserved;
};

/* The VMM's devices (port IO, 32-bit registers unless noted). */
#define PVSCHED_PORT_CONSOLE    0xE9u    /* 8-bit: a byte of console output */
#define PVSCHED_PORT_EXIT       0x501u   /* write: guest is done, value = exit code */
#define PVSCHED_PORT_TIMER_ARM  0x530u   /* write: fire PVSCHED_VECTOR_TIMER in value µs (0 cancels) */
#define PVSCHED_PORT_IRQ_ACK    0x534u   /* write: answer to interrupt-response event `value` */
#define PVSCHED_PORT_IRQ_SEQ    0x538u   /* read: sequence number of the latest raised event */

#define PVSCHED_VECTOR_TIMER    0x30u
#define PVSCHED_VECTOR_IRQ      0x31u
#define PVSCHED_VECTOR_SPURIOUS 0xFFu

/* Results, written by the guest into its own memory and read by the host at the
 * end (validated like any guest memory). One per vCPU. */
#define PVSCHED_HIST_BUCKETS    64       /* log2 buckets of lateness in ns */
#define PVSCHED_RESULTS_MAGIC   0x53525650u /* "PVRS" */
#define PVSCHED_MAX_SAMPLES     32768

struct pvsched_vcpu_results {
    uint32_t workload;
    uint32_t vcpu;
    uint64_t samples;           /* wake-ups / interrupts counted */
    uint64_t lateness_sum_ns;
    uint64_t lateness_max_ns;
    uint64_t lateness_min_ns;
    uint64_t work_units;        /* batch: loops done */
    uint64_t hist[PVSCHED_HIST_BUCKETS]; /* hist[i]: lateness in [2^i, 2^(i+1)) ns; hist[0] also 0 */
    uint32_t sample_count;      /* raw samples stored (<= results.max_samples) */
    uint32_t reserved;
};

/* The results block: this header, vcpu_count pvsched_vcpu_results, then at
 * samples_offset (from the block's start) vcpu_count arrays of max_samples
 * uint32_t raw lateness samples in ns (saturated), one array per vCPU. */
struct pvsched_results {
    uint32_t magic;
    uint32_t vcpu_count;
    uint32_t samples_offset;
    uint32_t max_samples;
    struct pvsched_vcpu_results vcpu[];
};

#endif /* PVSCHED_BOOT_H */
