import CKernelEvents
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Why kernel events are not available (the message says which and why).
public struct KernelEventsUnavailable: Error, CustomStringConvertible {
    public let reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String {
        "KVM events from the host kernel are unavailable: \(reason). Attached VMs get no interrupt, halt, wake-up or exit events."
    }
}

/// One attach point of the kernel BPF object and whether it works here.
public struct KernelAttachPoint: Sendable, CustomStringConvertible {
    public let section: String
    public let attached: Bool
    public let error: String
    public var description: String { attached ? "\(section): attached" : "\(section): unavailable (\(error))" }
}

/// Counters of the kernel event path for one attached VM.
public struct KernelEventCounts: Sendable, Equatable {
    /// Records by kind (`PVSCHED_KEV_*` raw value → count).
    public var records: [UInt32: UInt64] = [:]
    /// Events delivered to the VM's binding.
    public var notified: UInt64 = 0
    /// Notifications that boosted, and the latency from the kernel's timestamp to
    /// the boost applied (ns), for the ones that did.
    public var boosts: UInt64 = 0
    /// The first `latencySamples` of those latencies.
    public var boostLatenciesNs: [UInt64] = []
    /// How many boost latencies a VM's counters keep (only `pvsched bench` reads them).
    public static let latencySamples = 100_000
    /// Summed delay from the kernel's timestamp to the consumer picking the record up, for boosting records.
    public var consumerLagNs: UInt64 = 0
    /// Wake-ups of the VM's vCPU threads that found their CPU idle and slept again
    /// unpreempted: the kernel sent no record and woke no one for them (a boost
    /// cannot make a thread that runs at once run sooner).
    public var uncontendedWakeups: UInt64 = 0
    public init() {}

    /// Counts a boost a record caused.
    mutating func countBoost(latencyNs: UInt64, lagNs: UInt64) {
        boosts &+= 1
        if boostLatenciesNs.count < Self.latencySamples { boostLatenciesNs.append(latencyNs) }
        consumerLagNs &+= lagNs
    }
}

/// KVM events from the host kernel for VMs another process runs: loads
/// BPF/kvm_events.bpf.c with libbpf, keeps its filter maps to the vCPU threads of
/// attached VMs, and turns ring-buffer records into the same `VCPUEvent`s the
/// built-in VMM sends, on one dedicated consumer thread:
///
/// | kernel record | event |
/// |---|---|
/// | sched_waking of a vCPU thread (vector from kvm_apic_accept_irq on that CPU) | `interruptInjection(vector)` |
/// | signal_generate to a vCPU thread (a userspace irqchip's kick) | `interruptInjection(vector: 0)` |
/// | kvm_apic_accept_irq in the VMM process, for APIC id N | `interruptInjection(vector)` on vCPU N |
/// | sched_switch away from a vCPU thread, sleeping | `halt` |
/// | kvm_vcpu_wakeup in a vCPU thread, or sched_switch to it | `vmEntry` (kvm_entry does not fire under PVM) |
/// | kvm_pio / kvm_mmio / kvm_userspace_exit / kvm_exit | `vmExit(reason)` |
///
/// A wake-up that finds the vCPU thread's CPU idle is not sent (the thread runs at
/// once; a boost would change nothing), unless the thread is preempted before it
/// sleeps again: then its injection comes at the preemption. Its sleep is then not
/// sent either (`KernelEventCounts.uncontendedWakeups` counts these). A sleep of a
/// thread with no boost to end is sent without waking the consumer.
public final class KernelEventSource: Sendable {
    /// The attach points and their state.
    public let attachPoints: [KernelAttachPoint]
    // @unchecked Sendable box: the handle is used by the consumer thread (poll) and
    // control threads (map updates); libbpf's map calls are plain syscalls, and the
    // ring buffer is only polled by the consumer thread.
    private final class Handle: @unchecked Sendable {
        let raw: OpaquePointer
        init(_ raw: OpaquePointer) { self.raw = raw }
    }
    private let handle: Handle
    private struct Watched {
        let sink: any VMEventSink
        let vcpuCount: Int
        let threads: [ThreadID?]
        var counts = KernelEventCounts()
        var vcpus: [VCPUTrack]

        /// Counts record `r`; its event and this VM's sink, if it is sent.
        mutating func take(_ r: pvsched_kvm_event) -> (sink: any VMEventSink, event: VCPUEvent)? {
            guard Int(r.vcpu) < vcpuCount else { return nil }
            counts.records[r.kind, default: 0] &+= 1
            guard let event = KernelEventSource.event(for: r, track: &vcpus[Int(r.vcpu)]) else { return nil }
            counts.notified &+= 1
            return (sink, event)
        }
    }
    /// Per vCPU: what recent records already reported, to send one event per happening.
    struct VCPUTrack {
        /// When KVM last accepted an interrupt for it in the VMM's process (0: none pending).
        var lastAcceptNs: UInt64 = 0
        /// A kvm_pio was reported and its kvm_userspace_exit is still to come.
        var pioPending = false
    }
    private let vms = Mutex<[UInt32: Watched]>([:])
    /// Threads whose boost is held through their halts (see `hold`).
    private let heldThreads = Mutex<Set<UInt32>>([])
    private let running = Atomic(true)
    private let consumer = Mutex<PVSchedCore.Thread?>(nil)
    private let consumerCPU = Atomic<UInt64>(0)
    private let recordCount = Atomic<UInt64>(0)

    /// CPU time the consumer thread has used (ns), and the records it handled.
    public var consumerCPUNs: UInt64 { consumerCPU.load(ordering: .relaxed) }
    public var recordsHandled: UInt64 { recordCount.load(ordering: .relaxed) }

    /// Loads and attaches the BPF object (`object`: the ELF bytes). Needs root,
    /// the kernel's BTF and libbpf.so.1. The consumer thread runs SCHED_FIFO at
    /// `consumerPriority` (through `threads`) when given: it plays the part of the
    /// built-in VMM's device threads, and a boost it applies late under host load
    /// is a boost lost.
    public init(object: [UInt8], consumerPriority: UInt8? = nil, threads: (any ThreadControl)? = nil) throws(KernelEventsUnavailable) {
        guard geteuid() == 0 else { throw KernelEventsUnavailable(reason: "the bpf syscall needs root") }
        guard access("/sys/kernel/btf/vmlinux", R_OK) == 0 else {
            throw KernelEventsUnavailable(reason: "the kernel has no BTF (/sys/kernel/btf/vmlinux), which the tp_btf attach points need")
        }
        var err = [CChar](repeating: 0, count: 256)
        let raw = object.withUnsafeBytes { pvs_kev_open($0.baseAddress, $0.count, &err, err.count) }
        guard let raw else { throw KernelEventsUnavailable(reason: String(cString: err)) }
        handle = Handle(raw)
        attachPoints = (0..<pvs_kev_program_count(raw)).map { i in
            KernelAttachPoint(section: String(cString: pvs_kev_program_section(raw, i)),
                              attached: pvs_kev_program_state(raw, i) == 2, error: String(cString: pvs_kev_program_error(raw, i)))
        }
        do {
            let t = try PVSchedCore.Thread(name: "pvs-kevents") { [self] in
                if let consumerPriority, let threads { try? threads.setCurrentThread(.fifo(priority: consumerPriority)) }
                consume()
            }
            consumer.withLock { $0 = t }
        } catch {
            throw KernelEventsUnavailable(reason: "\(error)")  // deinit closes the object
        }
    }

    /// A one-line summary: which attach points work and which do not.
    public var summary: String { attachPoints.map(\.description).joined(separator: "; ") }

    /// Starts reporting the events of `threads` (vCPU i's thread at index i) and of
    /// the VMM process `process` to `sink`, as VM `slot`.
    public func watch(slot: UInt32, process: Int32, threads: [ThreadID?], sink: any VMEventSink) {
        guard running.load(ordering: .relaxed) else { return }
        vms.withLock { $0[slot] = Watched(sink: sink, vcpuCount: threads.count, threads: threads, vcpus: Array(repeating: VCPUTrack(), count: threads.count)) }
        _ = pvs_kev_watch_process(handle.raw, UInt32(bitPattern: process), slot)
        for (i, t) in threads.enumerated() {
            if let t { _ = pvs_kev_watch_thread(handle.raw, UInt32(bitPattern: t.rawValue), slot, UInt32(i)) }
        }
    }

    /// Stops reporting VM `slot`'s events.
    public func unwatch(slot: UInt32, process: Int32, threads: [ThreadID?]) {
        guard running.load(ordering: .relaxed) else { return }
        for t in threads.compactMap({ $0 }) {
            let tid = UInt32(bitPattern: t.rawValue)
            _ = pvs_kev_unwatch_thread(handle.raw, tid)
            heldThreads.withLock { _ = $0.remove(tid) }
        }
        _ = pvs_kev_unwatch_process(handle.raw, UInt32(bitPattern: process))
        vms.withLock { _ = $0.removeValue(forKey: slot) }
    }

    /// The counters of VM `slot`.
    public func counts(slot: UInt32) -> KernelEventCounts? {
        guard let w = vms.withLock({ $0[slot] }) else { return nil }
        var counts = w.counts
        for t in w.threads.compactMap({ $0 }) { counts.uncontendedWakeups &+= uncontendedWakeups(of: t) ?? 0 }
        return counts
    }

    /// Thread `thread`'s boost is held through its halts for the deadline
    /// `deadlineNs` (CLOCK_MONOTONIC; nil: no longer held). A wake-up of the thread
    /// more than `DeadlineSchedule.heldEarlyNs` away from it is for something else
    /// and is sent at once; the deadline's own wakes no one. The kernel learns the
    /// guest's period from those wake-ups and expects the next one a period later:
    /// while it comes so, the thread's halts wake no one either (the records come
    /// with the next urgent one, or the consumer's next look, 100 ms at the latest).
    public func hold(_ thread: ThreadID, deadlineNs: UInt64?) {
        guard running.load(ordering: .relaxed) else { return }
        let tid = UInt32(bitPattern: thread.rawValue)
        heldThreads.withLock { if deadlineNs != nil { $0.insert(tid) } else { $0.remove(tid) } }
        guard let d = deadlineNs else { _ = pvs_kev_hold(handle.raw, tid, 0, 0); return }
        let early = DeadlineSchedule.heldEarlyNs
        _ = pvs_kev_hold(handle.raw, tid, max(1, d > early ? d - early : 1), d &+ early)
    }

    /// Wake-ups of watched thread `thread` that found their CPU idle and slept again
    /// unpreempted (nil: not watched).
    public func uncontendedWakeups(of thread: ThreadID) -> UInt64? {
        let tid = thread.rawValue
        guard vms.withLock({ $0.values.contains { $0.threads.contains(thread) } }) else { return nil }
        return pvs_kev_settled(handle.raw, UInt32(bitPattern: tid))
    }

    /// Records the BPF side dropped because the ring buffer was full.
    public var dropped: UInt64 { pvs_kev_dropped(handle.raw) }

    /// Stops the consumer and detaches every program.
    public func close() {
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        consumer.takeAndJoin()
        pvs_kev_close(handle.raw)
    }

    deinit { close() }

    private func consume() {
        while running.load(ordering: .relaxed) {
            var records: UnsafePointer<pvsched_kvm_event>?
            let n = pvs_kev_poll(handle.raw, 100, &records)
            guard n > 0, let records else { continue }
            for i in 0..<Int(n) { deliver(records[i]) }
            recordCount.add(UInt64(n), ordering: .relaxed)
            var ts = timespec()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
            consumerCPU.store(UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec), ordering: .relaxed)
        }
    }

    /// Sends one record's event to its VM's sink. The wake-ups and runs of a thread
    /// whose boost is held, which the kernel found on time (they woke no one), are
    /// counted, not sent: there is nothing to decide at them, and read late, they
    /// would be taken for wake-ups at the wrong time.
    private func deliver(_ r: pvsched_kvm_event) {
        let now = MonotonicClock.nowNs()
        if r.urgent == 0, r.kind == PVSCHED_KEV_WAKING.rawValue || r.kind == PVSCHED_KEV_RUN.rawValue,
           heldThreads.withLock({ $0.contains(r.tid) }) {
            vms.withLock { vms in vms[r.vm]?.counts.records[r.kind, default: 0] &+= 1 }
            return
        }
        // The VM's entry is changed in place (`vms[slot]?.…`): a copy of it taken out and
        // put back would copy its counters' storage at each change, the boost
        // latencies' among them (up to 100,000 of them, at each boost).
        let target = vms.withLock { vms in vms[r.vm]?.take(r) ?? nil }
        guard let target else { return }
        // The kernel read the thread's run time where it was current (0: not read).
        let cpuTime = r.runtime_ns != 0 ? ThreadCPUTime(thread: ThreadID(Int32(bitPattern: r.tid)), ns: r.runtime_ns) : nil
        let outcome = target.sink.notify(target.event, vcpu: Int(r.vcpu), interruptStillQueued: false, cpuTime: cpuTime)
        guard outcome == .boosted else { return }
        let applied = MonotonicClock.nowNs()
        // A wake-up sent at the thread's preemption (it had found its CPU idle) counts from there.
        let since = r.kind == PVSCHED_KEV_WAKING.rawValue && r.arg != 0 ? r.arg : r.time_ns
        vms.withLock { vms in
            vms[r.vm]?.counts.countBoost(latencyNs: applied > since ? applied - since : 0, lagNs: now > since ? now - since : 0)
        }
    }

    /// The event a record stands for (nil: counted, not sent). One happening, one
    /// event: an acceptance in the VMM's process and the wake-up or kick it causes
    /// are one injection (a wake-up within `PVSCHED_KEV_CORRELATE_NS` of an
    /// acceptance for the same vCPU is not sent again), and a port-IO exit that goes
    /// on to the VMM (kvm_pio, then kvm_userspace_exit) is one exit.
    static func event(for r: pvsched_kvm_event, track t: inout VCPUTrack) -> VCPUEvent? {
        switch Int32(r.kind) {
        case Int32(PVSCHED_KEV_ACCEPT_IRQ.rawValue):
            t.lastAcceptNs = r.time_ns
            return .interruptInjection(vector: UInt8(truncatingIfNeeded: r.vector))
        case Int32(PVSCHED_KEV_WAKING.rawValue), Int32(PVSCHED_KEV_KICK.rawValue):
            if t.lastAcceptNs != 0, r.time_ns >= t.lastAcceptNs, r.time_ns - t.lastAcceptNs < PVSCHED_KEV_CORRELATE_NS {
                t.lastAcceptNs = 0
                return nil
            }
            return .interruptInjection(vector: r.kind == PVSCHED_KEV_WAKING.rawValue ? UInt8(truncatingIfNeeded: r.vector) : 0)
        case Int32(PVSCHED_KEV_BLOCK.rawValue): return .halt
        case Int32(PVSCHED_KEV_HALT_WAKEUP.rawValue), Int32(PVSCHED_KEV_RUN.rawValue): return .vmEntry
        case Int32(PVSCHED_KEV_EXIT_PIO.rawValue):
            t.pioPending = true
            return .vmExit(.io(port: UInt16(truncatingIfNeeded: r.arg), write: r.vector != 0))
        case Int32(PVSCHED_KEV_EXIT_MMIO.rawValue): return .vmExit(.mmio(address: r.arg, write: r.vector == 1))
        case Int32(PVSCHED_KEV_EXIT_USERSPACE.rawValue):
            let pio = t.pioPending
            t.pioPending = false
            switch r.arg {
            case 2 where pio: return nil                      // KVM_EXIT_IO, already reported by kvm_pio
            case 5: return .vmExit(.halt)                    // KVM_EXIT_HLT (userspace irqchip)
            case 10: return .vmExit(.intr)                   // KVM_EXIT_INTR: a kick
            default: return .vmExit(.other(code: UInt32(truncatingIfNeeded: r.arg)))
            }
        case Int32(PVSCHED_KEV_EXIT.rawValue): return .vmExit(.other(code: 0))
        default: return nil
        }
    }
}
