import PVSchedCore
import PVSchedGuestImage
import PVSchedHost
import PVSchedKVM
import PVSchedKernelEvents
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The kernel event path against the built-in VMM's in-process path, in the same
/// run, on the same guest (1 vCPU, cyclic every 2 ms, latency-boost, Linux
/// actuator): how long from the event to the boost applied, and the CPU each
/// event costs the host side.
public enum KernelEventBench {
    /// Times the in-process path: each injection's `notify`, from its start (the
    /// moment the device raises the interrupt) to its return with the boost applied.
    final class TimingSink: VMEventSink {
        let inner: any VMEventSink
        let latencies = Mutex<[UInt64]>([])
        let cpuNs = Atomic<UInt64>(0)
        let events = Atomic<UInt64>(0)
        init(_ inner: any VMEventSink) { self.inner = inner }
        func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome {
            let c0 = ControlBench.threadCPUNs()
            let t0 = MonotonicClock.nowNs()
            let outcome = inner.notify(event, vcpu: vcpu, interruptStillQueued: interruptStillQueued, cpuTime: cpuTime)
            let t1 = MonotonicClock.nowNs()
            cpuNs.add(ControlBench.threadCPUNs() &- c0, ordering: .relaxed)
            events.add(1, ordering: .relaxed)
            if outcome == .boosted { latencies.withLock { $0.append(t1 - t0) } }
            return outcome
        }
        func setThread(_ thread: ThreadID?, vcpu: Int) { inner.setThread(thread, vcpu: vcpu) }
    }

    static func config() -> VMConfiguration {
        var c = VMConfiguration(image: GuestImage.kernel)
        c.name = "bench-events"
        c.boot.workload = .cyclic
        c.boot.durationNs = 3_000_000_000
        c.boot.intervalNs = 2_000_000
        return c
    }

    /// Event → boost latency (p50, p99, max) and CPU per event, kernel path against
    /// in-process path. Nil when kernel events are unavailable (the reason is thrown).
    public static func compare() throws -> [BenchResult] {
        // In-process: the VMM notifies the binding itself.
        let host = try PVSchedHost(actuator: LinuxActuator())
        let c = config()
        let link = try host.link(name: c.name, vcpus: c.vcpus, driver: "latency-boost")
        let timing = TimingSink(link.events)
        let vm = try VirtualMachine(config: c, host: VMHostLink(handle: link.handle, events: timing, registrar: link.registrar,
                                                                 onRelease: { link.release() }), threads: host.threads)
        try vm.start()
        _ = vm.wait(timeoutNs: 30_000_000_000)
        let inProcess = timing.latencies.withLock { $0 }
        let inProcessCPU = Double(timing.cpuNs.load(ordering: .relaxed)) / Double(max(1, timing.events.load(ordering: .relaxed)))

        // Kernel path: the same guest, attached, its events from BPF.
        let source = try host.kernelEvents.get()
        let kvm = try KernelDrivenVM(config: c, host: host)
        try kvm.start(driver: "latency-boost", governor: .default)
        let cpu0 = source.consumerCPUNs, rec0 = source.recordsHandled
        _ = kvm.vm.wait(timeoutNs: 30_000_000_000)
        let counts = kvm.counts ?? KernelEventCounts()
        let kernelCPU = Double(source.consumerCPUNs &- cpu0) / Double(max(1, source.recordsHandled &- rec0))
        kvm.stop()
        let k = counts.boostLatenciesNs
        return BenchResult.percentiles("kernel event → boost applied", k, baseline: "in-process injection → boost", inProcess) + [
            BenchResult(name: "kernel event → boost applied, max", baseline: "in-process injection → boost, max",
                        nsPerOp: Double(k.max() ?? 0), baselineNsPerOp: Double(inProcess.max() ?? 0)),
            BenchResult(name: "kernel path CPU per event (consumer)", baseline: "in-process CPU per notify",
                        nsPerOp: kernelCPU, baselineNsPerOp: inProcessCPU),
        ]
    }
}
