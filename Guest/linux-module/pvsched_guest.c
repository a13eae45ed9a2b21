// SPDX-License-Identifier: GPL-2.0
/*
 * pvsched_guest — the pvsched guest component for stock Linux guests.
 *
 * Binds an ivshmem-plain PCI device (1af4:1110), writes the pvsched region header
 * into its shared memory (BAR2) and keeps one line per CPU current from the
 * kernel's own tracepoints: hard and soft interrupts, the running task's policy,
 * priority and nice (sched_switch), idle, and the next expiry of an hrtimer that
 * will wake a real-time task (the deadline the host can boost ahead of). The host
 * (`pvsched vm attach --qmp ... --shm ...`) validates the region as hostile input,
 * negotiates the protocol and writes its answer and each vCPU's status back; both
 * show under /sys/kernel/pvsched_guest/.
 *
 * The layout, the flag bits, the protocol name and version all come from
 * pvsched_abi.h, the one ABI header the host and every guest include.
 */
#include <linux/cpu.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/io.h>
#include <linux/kobject.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/percpu.h>
#include <linux/sched.h>
#include <linux/sched/rt.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/timekeeping.h>
#include <linux/tracepoint.h>
#include <linux/workqueue.h>
#include <asm/processor.h>

#include "pvsched_abi.h"

#define DRV_NAME "pvsched_guest"
#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110
#define IVSHMEM_SHM_BAR 2

static char *protocol = PVSCHED_PROTOCOL_LATENCY;
module_param(protocol, charp, 0444);
MODULE_PARM_DESC(protocol, "protocol name advertised to the host (default " PVSCHED_PROTOCOL_LATENCY ")");
static ushort protocol_major = PVSCHED_PROTOCOL_LATENCY_MAJOR;
module_param(protocol_major, ushort, 0444);
MODULE_PARM_DESC(protocol_major, "protocol major version advertised (default from pvsched_abi.h)");
static ushort protocol_minor = PVSCHED_PROTOCOL_LATENCY_MINOR;
module_param(protocol_minor, ushort, 0444);
MODULE_PARM_DESC(protocol_minor, "protocol minor version advertised (default from pvsched_abi.h)");
static bool deadlines = true;
module_param(deadlines, bool, 0444);
MODULE_PARM_DESC(deadlines, "publish the next expiry of hrtimers started by real-time tasks (default 1)");
static bool force;
module_param(force, bool, 0444);
MODULE_PARM_DESC(force, "take over a region that holds foreign data (default 0: refuse it)");

/* What this CPU is doing, as the tracepoints saw it; published into its line. */
struct pvs_cpu {
	int irq_depth;
	int softirq_depth;
	bool idle;
	u32 policy;
	s32 priority;
	s32 nice;
	const struct hrtimer *deadline_timer; /* the RT sleeper whose expiry is published */
	u64 deadline_ns;                      /* CLOCK_MONOTONIC; 0 = none */
	u64 updates;
};
static DEFINE_PER_CPU(struct pvs_cpu, pvs_cpus);

static struct {
	struct pci_dev *pdev;
	void *mem;
	size_t len;
	struct pvsched_region_header *hdr;
	u32 vcpus;
	bool live;                 /* the probes may publish */
	void *hrtimer_wakeup_fn;   /* the function of a hrtimer_sleeper: RT sleeps */
	u32 generation;
	struct work_struct hook_work; /* hooks the tracepoints after the probe */
	bool hooked;
} pvs;

static struct pvsched_vcpu_area *pvs_area(unsigned int cpu)
{
	return (struct pvsched_vcpu_area *)((char *)pvs.mem + pvs.hdr->vcpu_offset +
					    (size_t)cpu * sizeof(struct pvsched_vcpu_area));
}

static u32 pvs_task_policy(struct task_struct *t, s32 *prio, s32 *nice)
{
	*prio = 0;
	*nice = 0;
	switch (t->policy) {
	case SCHED_FIFO:
	case SCHED_RR:
		*prio = clamp_t(s32, t->rt_priority, 1, PVSCHED_RT_PRIORITY_MAX);
		return t->policy == SCHED_FIFO ? PVSCHED_TASK_FIFO : PVSCHED_TASK_RR;
	case SCHED_IDLE:
		return PVSCHED_TASK_IDLE;
	default:
		/* Deadline tasks count as real-time work too; NORMAL/BATCH carry their nice. */
		if (t->policy == SCHED_DEADLINE) {
			*prio = PVSCHED_RT_PRIORITY_MAX;
			return PVSCHED_TASK_FIFO;
		}
		*nice = clamp_t(s32, task_nice(t), PVSCHED_NICE_MIN, PVSCHED_NICE_MAX);
		return PVSCHED_TASK_NORMAL;
	}
}

/* Writes this CPU's line from its state, under the header's seqcount. Interrupts
 * are off for the write so that a nested probe cannot interleave two writers. */
static void pvs_publish(void)
{
	struct pvs_cpu *c;
	volatile struct pvsched_vcpu_guest *g;
	unsigned long irqflags;
	unsigned int cpu;
	u32 flags;

	if (!READ_ONCE(pvs.live))
		return;
	local_irq_save(irqflags);
	cpu = smp_processor_id();
	if (cpu >= pvs.vcpus)
		goto out;
	c = this_cpu_ptr(&pvs_cpus);
	flags = 0;
	if (c->irq_depth > 0)
		flags |= PVSCHED_FLAG_IN_IRQ;
	if (c->softirq_depth > 0)
		flags |= PVSCHED_FLAG_IN_SOFTIRQ;
	if (c->policy == PVSCHED_TASK_FIFO || c->policy == PVSCHED_TASK_RR)
		flags |= PVSCHED_FLAG_RT_TASK_RUNNING;
	if (c->idle)
		flags |= PVSCHED_FLAG_IDLE;
	g = &pvs_area(cpu)->guest;
	pvsched_guest_write_begin(g);
	g->flags = flags;
	g->task_policy = c->policy;
	g->task_priority = c->priority;
	g->task_nice = c->nice;
	g->next_deadline_ns = c->deadline_ns;
	g->guest_clock_ns = ktime_get_mono_fast_ns();
	pvsched_guest_write_end(g);
	c->updates++;
out:
	local_irq_restore(irqflags);
}

/* The running task's policy as it is now. A task that changes its own policy
 * while it runs (chrt, sched_setscheduler: no switch follows) would otherwise show
 * its old one until it is switched out, possibly for the whole of a CPU-bound
 * real-time burst; every interrupt's end catches up with it (the tick at least). */
static void pvs_refresh_current(struct pvs_cpu *c)
{
	if (c->idle)
		return;
	c->policy = pvs_task_policy(current, &c->priority, &c->nice);
}

static void probe_irq_entry(void *data, int irq, struct irqaction *action)
{
	this_cpu_inc(pvs_cpus.irq_depth);
	pvs_publish();
}

static void probe_irq_exit(void *data, int irq, struct irqaction *action, int ret)
{
	if (this_cpu_read(pvs_cpus.irq_depth) > 0)
		this_cpu_dec(pvs_cpus.irq_depth);
	pvs_refresh_current(this_cpu_ptr(&pvs_cpus));
	pvs_publish();
}

static void probe_vector_entry(void *data, int vector)
{
	this_cpu_inc(pvs_cpus.irq_depth);
	pvs_publish();
}

static void probe_vector_exit(void *data, int vector)
{
	if (this_cpu_read(pvs_cpus.irq_depth) > 0)
		this_cpu_dec(pvs_cpus.irq_depth);
	pvs_refresh_current(this_cpu_ptr(&pvs_cpus));
	pvs_publish();
}

static void probe_softirq_entry(void *data, unsigned int vec_nr)
{
	this_cpu_inc(pvs_cpus.softirq_depth);
	pvs_publish();
}

static void probe_softirq_exit(void *data, unsigned int vec_nr)
{
	if (this_cpu_read(pvs_cpus.softirq_depth) > 0)
		this_cpu_dec(pvs_cpus.softirq_depth);
	pvs_refresh_current(this_cpu_ptr(&pvs_cpus));
	pvs_publish();
}

static void probe_sched_switch(void *data, bool preempt, struct task_struct *prev,
			       struct task_struct *next, unsigned int prev_state)
{
	struct pvs_cpu *c = this_cpu_ptr(&pvs_cpus);

	/* A switch never happens inside a hard or soft interrupt: whatever the depth
	 * counters say (an entry seen whose exit was not, around registration), the
	 * CPU is in neither now. */
	c->irq_depth = 0;
	c->softirq_depth = 0;
	c->idle = is_idle_task(next);
	c->policy = c->idle ? PVSCHED_TASK_NORMAL : pvs_task_policy(next, &c->priority, &c->nice);
	if (c->idle) {
		c->priority = 0;
		c->nice = 0;
	}
	pvs_publish();
}

/* An hrtimer started by a real-time task for its own sleep (clock_nanosleep,
 * nanosleep: a hrtimer_sleeper) is the deadline the guest publishes. */
static void probe_hrtimer_start(void *data, struct hrtimer *timer, enum hrtimer_mode mode, bool was_armed)
{
	struct pvs_cpu *c;
	s64 remaining;
	u64 at;

	if (!deadlines || !rt_task(current) || (void *)timer->function != pvs.hrtimer_wakeup_fn)
		return;
	remaining = ktime_to_ns(hrtimer_expires_remaining(timer));
	at = ktime_get_mono_fast_ns() + (remaining > 0 ? remaining : 0);
	c = this_cpu_ptr(&pvs_cpus);
	if (c->deadline_ns == 0 || c->deadline_timer == timer || at < c->deadline_ns) {
		c->deadline_timer = timer;
		c->deadline_ns = at;
		pvs_publish();
	}
}

static void pvs_deadline_done(const struct hrtimer *timer)
{
	struct pvs_cpu *c = this_cpu_ptr(&pvs_cpus);

	if (c->deadline_timer != timer)
		return;
	c->deadline_timer = NULL;
	c->deadline_ns = 0;
	pvs_publish();
}

static void probe_hrtimer_expire_entry(void *data, struct hrtimer *timer, ktime_t *now)
{
	pvs_deadline_done(timer);
}

static void probe_hrtimer_cancel(void *data, struct hrtimer *timer)
{
	pvs_deadline_done(timer);
}

/* The kernel tracepoints this module hooks, found by name (the core kernel does
 * not export every tracepoint symbol to modules). Exits come before entries, so
 * that no entry is counted whose exit is not. */
struct pvs_hook {
	const char *name;
	void *probe;
	struct tracepoint *tp;
	bool required;
};

static struct pvs_hook pvs_hooks[] = {
	{ "sched_switch", probe_sched_switch, NULL, true },
	{ "irq_handler_exit", probe_irq_exit, NULL, true },
	{ "softirq_exit", probe_softirq_exit, NULL, true },
	{ "local_timer_exit", probe_vector_exit, NULL, false },
	{ "reschedule_exit", probe_vector_exit, NULL, false },
	{ "call_function_single_exit", probe_vector_exit, NULL, false },
	{ "irq_handler_entry", probe_irq_entry, NULL, true },
	{ "softirq_entry", probe_softirq_entry, NULL, true },
	{ "local_timer_entry", probe_vector_entry, NULL, false },
	{ "reschedule_entry", probe_vector_entry, NULL, false },
	{ "call_function_single_entry", probe_vector_entry, NULL, false },
	{ "hrtimer_start", probe_hrtimer_start, NULL, false },
	{ "hrtimer_expire_entry", probe_hrtimer_expire_entry, NULL, false },
	{ "hrtimer_cancel", probe_hrtimer_cancel, NULL, false },
};

static void pvs_find_tracepoint(struct tracepoint *tp, void *priv)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(pvs_hooks); i++)
		if (!pvs_hooks[i].tp && strcmp(tp->name, pvs_hooks[i].name) == 0)
			pvs_hooks[i].tp = tp;
}

static void pvs_unhook(void)
{
	size_t i;

	for (i = 0; i < ARRAY_SIZE(pvs_hooks); i++)
		if (pvs_hooks[i].tp)
			tracepoint_probe_unregister(pvs_hooks[i].tp, pvs_hooks[i].probe, NULL);
	tracepoint_synchronize_unregister();
}

static int pvs_unhook_dev(struct device *dev)
{
	pvs_unhook();
	return 0;
}

static int pvs_hook(struct device *dev)
{
	size_t i;
	int err;

	for_each_kernel_tracepoint(pvs_find_tracepoint, NULL);
	for (i = 0; i < ARRAY_SIZE(pvs_hooks); i++) {
		struct pvs_hook *h = &pvs_hooks[i];

		if (!h->tp) {
			if (h->required) {
				dev_err(dev, "tracepoint %s not found\n", h->name);
				err = -ENOENT;
				goto fail;
			}
			dev_info(dev, "tracepoint %s not available: not tracked\n", h->name);
			continue;
		}
		err = tracepoint_probe_register(h->tp, h->probe, NULL);
		if (err) {
			dev_err(dev, "tracepoint %s: register failed (%d)\n", h->name, err);
			h->tp = NULL;
			if (h->required)
				goto fail;
		}
	}
	return 0;
fail:
	pvs_unhook();
	for (i = 0; i < ARRAY_SIZE(pvs_hooks); i++)
		pvs_hooks[i].tp = NULL;
	return err;
}

/* --- kernel text patching under QEMU's TCG ------------------------------------
 *
 * Hooking and unhooking a tracepoint patches kernel text (its static key's jump
 * and static call sites, int3 first: text_poke_bp). QEMU 7.2's multi-threaded TCG
 * can keep running a stale translation of such a site on another vCPU: that CPU
 * then takes the int3 over and over in a section with interrupts off, the
 * patching CPU waits for it forever, and the guest wedges (soft lockups, RCU
 * stalls: "timer wakeup didn't happen"). Measured with this module alone, no host
 * side at all: a wedge within 3-25 unload/load cycles under thread=multi, none in
 * 50 under thread=single, none in 50 with the other CPUs offline while patching.
 * So under TCG (CPUID's hypervisor leaf says "TCGTCGTCGTCG") the module patches
 * with the other CPUs offline and brings them back after; on KVM and real hardware
 * text_poke_bp is sound and nothing changes. Knob: tcg_quiesce (default 1). */
static bool tcg_quiesce = true;
module_param(tcg_quiesce, bool, 0644);
MODULE_PARM_DESC(tcg_quiesce, "under QEMU's TCG, take the other CPUs offline while hooking or unhooking (default 1)");

static bool pvs_under_tcg(void)
{
	unsigned int eax, ebx, ecx, edx;

	if (!boot_cpu_has(X86_FEATURE_HYPERVISOR))
		return false;
	cpuid(0x40000000, &eax, &ebx, &ecx, &edx);
	return ebx == 0x54474354 && ecx == 0x43544743 && edx == 0x47435447;  /* "TCGTCGTCGTCG" */
}

/* Runs fn(dev) with every CPU but the boot CPU offline, on the boot CPU (which
 * x86 cannot take offline), when under TCG; directly otherwise. */
struct pvs_patch_call {
	int (*fn)(struct device *dev);
	struct device *dev;
};

static long pvs_patch_alone(void *arg)
{
	struct pvs_patch_call *call = arg;
	unsigned int cpu, self = raw_smp_processor_id();
	cpumask_var_t offlined;
	long ret;

	int tries;

	if (!zalloc_cpumask_var(&offlined, GFP_KERNEL))
		return call->fn(call->dev);
	/* CPU hotplug can be disabled for a moment (the PCI core probes with it off,
	 * and this runs right after a probe): try again until every other CPU is off. */
	for (tries = 0; tries < 500; tries++) {
		for_each_online_cpu(cpu) {
			if (cpu != self && remove_cpu(cpu) == 0)
				cpumask_set_cpu(cpu, offlined);
		}
		if (num_online_cpus() == 1)
			break;
		msleep(10);
	}
	if (num_online_cpus() > 1)
		pr_warn(DRV_NAME ": could not take the other CPUs offline: patching with them online\n");
	ret = call->fn(call->dev);
	for_each_cpu(cpu, offlined)
		if (add_cpu(cpu))
			pr_warn(DRV_NAME ": CPU %u did not come back online\n", cpu);
	free_cpumask_var(offlined);
	return ret;
}

static int pvs_patch(int (*fn)(struct device *dev), struct device *dev)
{
	struct pvs_patch_call call = { fn, dev };

	if (!tcg_quiesce || !pvs_under_tcg() || num_online_cpus() == 1)
		return fn(dev);
	return (int)work_on_cpu(cpumask_first(cpu_online_mask), pvs_patch_alone, &call);
}

/* Writes the header: the lines first, then every field, then the magic last, so
 * that a host that sees the magic sees a whole header. */
static void pvs_write_header(void)
{
	struct pvsched_region_header *h = pvs.hdr;
	u32 cpu;

	WRITE_ONCE(h->magic, 0);
	wmb();
	memset((char *)pvs.mem + sizeof(*h), 0,
	       pvs.vcpus * sizeof(struct pvsched_vcpu_area));
	for (cpu = 0; cpu < pvs.vcpus; cpu++)
		pvs_area(cpu)->guest.guest_clock_ns = ktime_get_mono_fast_ns();
	h->abi_version = PVSCHED_ABI_VERSION;
	h->header_size = sizeof(*h);
	memset(h->protocol_name, 0, sizeof(h->protocol_name));
	strscpy(h->protocol_name, protocol, sizeof(h->protocol_name));
	h->protocol_major = protocol_major;
	h->protocol_minor = protocol_minor;
	h->vcpu_count = pvs.vcpus;
	h->vcpu_stride = sizeof(struct pvsched_vcpu_area);
	h->vcpu_offset = sizeof(*h);
	WRITE_ONCE(h->host_negotiation, PVSCHED_DEV_IDLE);
	WRITE_ONCE(h->host_reason, PVSCHED_REASON_NONE);
	pvs.generation = READ_ONCE(h->guest_generation) + 1;
	WRITE_ONCE(h->guest_generation, pvs.generation);
	wmb();
	WRITE_ONCE(h->magic, PVSCHED_MAGIC);
}

/* Withdraws the registration: magic first (the host stops reading), then lines. */
static void pvs_withdraw(void)
{
	u32 cpu;

	WRITE_ONCE(pvs.hdr->magic, 0);
	wmb();
	for (cpu = 0; cpu < pvs.vcpus; cpu++) {
		volatile struct pvsched_vcpu_guest *g = &pvs_area(cpu)->guest;

		pvsched_guest_write_begin(g);
		g->flags = 0;
		g->next_deadline_ns = 0;
		pvsched_guest_write_end(g);
	}
	WRITE_ONCE(pvs.hdr->host_negotiation, PVSCHED_DEV_IDLE);
}

/* --- sysfs: /sys/kernel/pvsched_guest/ ------------------------------------- */

static const char *pvs_reason_name(u32 r)
{
	switch (r) {
	case PVSCHED_REASON_NONE: return "none";
	case PVSCHED_REASON_OUT_OF_RAM: return "out_of_ram";
	case PVSCHED_REASON_TOO_SMALL: return "too_small";
	case PVSCHED_REASON_BAD_HEADER: return "bad_header";
	case PVSCHED_REASON_NO_DRIVER: return "no_driver";
	case PVSCHED_REASON_VCPU_MISMATCH: return "vcpu_mismatch";
	case PVSCHED_REASON_BAD_LINE: return "bad_line";
	default: return "unknown";
	}
}

static ssize_t negotiation_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	u32 n, r;

	if (!pvs.hdr)
		return sysfs_emit(buf, "no device\n");
	n = READ_ONCE(pvs.hdr->host_negotiation);
	r = READ_ONCE(pvs.hdr->host_reason);
	switch (n) {
	case PVSCHED_DEV_ACCEPTED: return sysfs_emit(buf, "accepted\n");
	case PVSCHED_DEV_REFUSED: return sysfs_emit(buf, "refused: %s\n", pvs_reason_name(r));
	case PVSCHED_DEV_IDLE: return sysfs_emit(buf, "waiting for the host\n");
	default: return sysfs_emit(buf, "unknown host answer %u\n", n);
	}
}

static ssize_t protocol_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%s %u.%u\n", protocol, protocol_major, protocol_minor);
}

static const char *pvs_status_name(u32 s)
{
	switch (s) {
	case PVSCHED_STATUS_DISABLED: return "disabled";
	case PVSCHED_STATUS_NORMAL: return "normal";
	case PVSCHED_STATUS_BOOSTED: return "boosted";
	case PVSCHED_STATUS_THROTTLED: return "throttled";
	default: return "unknown";
	}
}

/* One line per vCPU: the host's status and counters, and this guest's updates. */
static ssize_t vcpus_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	ssize_t n = 0;
	u32 cpu;

	if (!pvs.hdr)
		return sysfs_emit(buf, "no device\n");
	for (cpu = 0; cpu < pvs.vcpus; cpu++) {
		volatile struct pvsched_vcpu_host *h = &pvs_area(cpu)->host;

		n += sysfs_emit_at(buf, n, "cpu%u status=%s boosts=%llu boosted_ns=%llu throttles=%llu updates=%llu\n",
				   cpu, pvs_status_name(h->status), (unsigned long long)h->boost_count,
				   (unsigned long long)h->boosted_ns, (unsigned long long)h->throttle_count,
				   (unsigned long long)per_cpu(pvs_cpus, cpu).updates);
	}
	return n;
}

static ssize_t hooks_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	ssize_t n = 0;
	size_t i;

	for (i = 0; i < ARRAY_SIZE(pvs_hooks); i++)
		n += sysfs_emit_at(buf, n, "%s %s\n", pvs_hooks[i].name, pvs_hooks[i].tp ? "on" : "off");
	return n;
}

/* Fault injection, for testing the host's validation: writing a CPU number makes
 * that CPU's line carry flag bits the protocol does not define (a hostile guest).
 * The host must disable pvsched for the VM and name the field. Root only. */
static ssize_t inject_garbage_store(struct kobject *k, struct kobj_attribute *a, const char *buf, size_t len)
{
	volatile struct pvsched_vcpu_guest *g;
	unsigned long irqflags;
	unsigned int cpu;
	int err = kstrtouint(buf, 0, &cpu);

	if (err)
		return err;
	if (!pvs.hdr || cpu >= pvs.vcpus)
		return -EINVAL;
	local_irq_save(irqflags);
	g = &pvs_area(cpu)->guest;
	pvsched_guest_write_begin(g);
	g->flags = ~(u32)PVSCHED_FLAGS_KNOWN;
	pvsched_guest_write_end(g);
	local_irq_restore(irqflags);
	return len;
}

static struct kobj_attribute negotiation_attr = __ATTR_RO(negotiation);
static struct kobj_attribute inject_garbage_attr = __ATTR_WO(inject_garbage);
static struct kobj_attribute protocol_attr = __ATTR_RO(protocol);
static struct kobj_attribute vcpus_attr = __ATTR_RO(vcpus);
static struct kobj_attribute hooks_attr = __ATTR_RO(hooks);
static struct attribute *pvs_attrs[] = {
	&negotiation_attr.attr, &protocol_attr.attr, &vcpus_attr.attr, &hooks_attr.attr,
	&inject_garbage_attr.attr, NULL,
};
static const struct attribute_group pvs_group = { .attrs = pvs_attrs };
static struct kobject *pvs_kobj;

/* --- the PCI driver ----------------------------------------------------------- */

/* Hooks the tracepoints after the probe; a failure withdraws the region. */
static void pvs_hook_work(struct work_struct *work)
{
	struct device *dev = &pvs.pdev->dev;

	if (pvs_patch(pvs_hook, dev)) {
		WRITE_ONCE(pvs.live, false);
		pvs_withdraw();
		dev_err(dev, "pvsched withdrawn: its tracepoints could not be hooked\n");
		return;
	}
	pvs.hooked = true;
}

static int pvs_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	size_t needed;
	u32 magic;
	int err;

	if (pvs.pdev) {
		dev_info(&pdev->dev, "another ivshmem device already carries pvsched: not binding this one\n");
		return -EBUSY;
	}
	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(IVSHMEM_SHM_BAR), DRV_NAME);
	if (err) {
		dev_err(&pdev->dev, "BAR%d: cannot claim the shared memory (%d)\n", IVSHMEM_SHM_BAR, err);
		return err;
	}
	pvs.vcpus = nr_cpu_ids;
	pvs.len = pci_resource_len(pdev, IVSHMEM_SHM_BAR);
	needed = sizeof(struct pvsched_region_header) + (size_t)pvs.vcpus * sizeof(struct pvsched_vcpu_area);
	if (pvs.vcpus > PVSCHED_MAX_VCPUS) {
		dev_err(&pdev->dev, "refused: %u CPUs, the protocol allows %u\n", pvs.vcpus, PVSCHED_MAX_VCPUS);
		return -EINVAL;
	}
	if (pvs.len < needed) {
		dev_err(&pdev->dev, "refused: region too small (%zu bytes, %u CPUs need %zu)\n",
			pvs.len, pvs.vcpus, needed);
		return -ENOSPC;
	}
	/* Shared RAM on the host side: map it write-back, like the host does. */
	pvs.mem = devm_memremap(&pdev->dev, pci_resource_start(pdev, IVSHMEM_SHM_BAR), needed, MEMREMAP_WB);
	if (IS_ERR(pvs.mem)) {
		err = PTR_ERR(pvs.mem);
		pvs.mem = NULL;
		dev_err(&pdev->dev, "cannot map BAR%d (%d)\n", IVSHMEM_SHM_BAR, err);
		return err;
	}
	pvs.hdr = pvs.mem;
	magic = READ_ONCE(pvs.hdr->magic);
	if (magic != 0 && magic != PVSCHED_MAGIC && !force) {
		dev_err(&pdev->dev, "refused: the region holds foreign data (first word 0x%08x, not pvsched's 0x%08x); load with force=1 to take it over\n",
			magic, PVSCHED_MAGIC);
		pvs.hdr = NULL;
		return -EEXIST;
	}
	pvs.pdev = pdev;
	pvs_write_header();
	WRITE_ONCE(pvs.live, true);
	/* The tracepoints are hooked from a work item, not here: the PCI core probes
	 * with CPU hotplug disabled (pci_call_probe), and under TCG the hooking needs
	 * the other CPUs offline (pvs_patch). */
	pvs.hooked = false;
	INIT_WORK(&pvs.hook_work, pvs_hook_work);
	schedule_work(&pvs.hook_work);
	dev_info(&pdev->dev, "pvsched region at BAR%d (%zu bytes): protocol %s %u.%u, %u vCPUs\n",
		 IVSHMEM_SHM_BAR, pvs.len, protocol, protocol_major, protocol_minor, pvs.vcpus);
	return 0;
}

static void pvs_remove(struct pci_dev *pdev)
{
	if (pvs.pdev != pdev)
		return;
	WRITE_ONCE(pvs.live, false);
	flush_work(&pvs.hook_work);
	if (pvs.hooked)
		pvs_patch(pvs_unhook_dev, &pdev->dev);
	pvs.hooked = false;
	pvs_withdraw();
	dev_info(&pdev->dev, "pvsched withdrawn: the host sees the status disabled\n");
	pvs.hdr = NULL;
	pvs.pdev = NULL;
}

static const struct pci_device_id pvs_ids[] = {
	{ PCI_DEVICE(IVSHMEM_VENDOR, IVSHMEM_DEVICE) },
	{ 0 },
};
MODULE_DEVICE_TABLE(pci, pvs_ids);

static struct pci_driver pvs_driver = {
	.name = DRV_NAME,
	.id_table = pvs_ids,
	.probe = pvs_probe,
	.remove = pvs_remove,
};

static int __init pvs_init(void)
{
	struct hrtimer_sleeper probe_sleeper;
	int err;

	if (protocol == NULL || protocol[0] == '\0' || strlen(protocol) >= PVSCHED_PROTOCOL_NAME_LEN) {
		pr_err(DRV_NAME ": protocol: must be 1..%d characters\n", PVSCHED_PROTOCOL_NAME_LEN - 1);
		return -EINVAL;
	}
	/* Learn the function every hrtimer_sleeper uses (hrtimer_wakeup is not exported). */
	hrtimer_init_sleeper_on_stack(&probe_sleeper, CLOCK_MONOTONIC, HRTIMER_MODE_REL);
	pvs.hrtimer_wakeup_fn = (void *)probe_sleeper.timer.function;
	destroy_hrtimer_on_stack(&probe_sleeper.timer);

	pvs_kobj = kobject_create_and_add(DRV_NAME, kernel_kobj);
	if (!pvs_kobj)
		return -ENOMEM;
	err = sysfs_create_group(pvs_kobj, &pvs_group);
	if (err)
		goto put;
	err = pci_register_driver(&pvs_driver);
	if (err)
		goto put;
	return 0;
put:
	kobject_put(pvs_kobj);
	return err;
}

static void __exit pvs_exit(void)
{
	pci_unregister_driver(&pvs_driver);
	kobject_put(pvs_kobj);
}

module_init(pvs_init);
module_exit(pvs_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("pvsched");
MODULE_DESCRIPTION("pvsched guest component: shares what each vCPU runs with the host through ivshmem");
