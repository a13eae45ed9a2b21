import Foundation
import PVSchedAttach
import PVSchedCore
import PVSchedHost
import PVSchedLinux
import PVSchedTesting
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The shared-memory transport's cost: from a guest flag change (a line written
/// into a /dev/shm region, as the Linux module writes its ivshmem region) to the
/// boost applied on the host (sched_setattr returned), through the watcher —
/// against the same decision and actuation called at once (what a VMM that sees
/// the guest's exits does), in the same run.
public enum WatcherBench {
    /// Forwards to the real actuator and timestamps every boost it applies.
    final class StampingActuator: Actuator {
        let inner = LinuxActuator()
        let applied = Atomic<UInt64>(0)
        let appliedAt = Atomic<UInt64>(0)
        let restored = Atomic<UInt64>(0)
        func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
            try inner.apply(parameters, to: thread)
            appliedAt.store(MonotonicClock.nowNs(), ordering: .relaxed)
            applied.add(1, ordering: .releasing)
        }
        func restore(_ thread: ThreadID) throws(ActuatorError) {
            try inner.restore(thread)
            restored.add(1, ordering: .releasing)
        }
        func restoreAll() { inner.restoreAll() }
        func applied(to thread: ThreadID) -> SchedulingParameters? { inner.applied(to: thread) }
    }

    /// p50 and p99 of flag change → boost applied: the watcher starting from an idle
    /// guest (polled every `idlePollNs`) and from a guest that reports work (polled
    /// every `busyPollNs`), against the direct call.
    public static func flagToBoost(samples: Int = 400) throws -> [BenchResult] {
        let path = "/dev/shm/pvsched-bench-\(getpid())"
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0, ftruncate(fd, 1 << 16) == 0 else { throw LinuxGuestError("cannot create \(path)") }
        close(fd)
        defer { unlink(path) }
        let region = try SharedMemoryFile(path: path)
        let writer = SharedAreaWriter(base: region.bytes.baseAddress!, size: SharedAreaWriter.size(vcpus: 1))
        let actuator = StampingActuator()
        let host = try PVSchedHost(actuator: actuator)
        defer { host.shutdown() }
        // The "vCPU": a thread of ours that sleeps.
        let tid = Atomic<Int32>(0), stop = Atomic(false)
        let vcpu = try PVSchedCore.Thread {
            tid.store(LinuxScheduling.currentThread().rawValue, ordering: .releasing)
            while !stop.load(ordering: .relaxed) { usleep(1000) }
        }
        defer { stop.store(true, ordering: .relaxed); vcpu.join() }
        while tid.load(ordering: .acquiring) == 0 { usleep(100) }
        let session = try host.attach(VMSpec(name: "bench-watch", source: .inProcess(vcpus: 1, summary: "bench"),
                                             driver: "latency-boost", governor: .unlimited))
        defer { session.stop() }
        session.events.setThread(ThreadID(tid.load(ordering: .relaxed)), vcpu: 0)
        writer.writeHeader(vcpus: 1, generation: 1)

        var rng = SystemRandomNumberGenerator()
        func run(before: GuestVCPUState.Flags, direct: Bool) -> [UInt64] {
            var out: [UInt64] = []
            for _ in 0..<samples {
                writer.setFlags(vcpu: 0, before)
                if direct { session.events.notify(.guestUpdate, vcpu: 0) }
                usleep(UInt32.random(in: 500...2500, using: &rng))
                let applied = actuator.applied.load(ordering: .acquiring)
                let t0 = MonotonicClock.nowNs()
                writer.setFlags(vcpu: 0, [.rtTaskRunning])
                if direct { session.events.notify(.guestUpdate, vcpu: 0) }
                let limit = t0 + 100_000_000
                while actuator.applied.load(ordering: .acquiring) == applied && MonotonicClock.nowNs() < limit { usleep(10) }
                out.append(actuator.appliedAt.load(ordering: .relaxed) &- t0)
                let restored = actuator.restored.load(ordering: .acquiring)
                writer.setFlags(vcpu: 0, [.idle])
                if direct { session.events.notify(.guestUpdate, vcpu: 0) }
                let limit2 = MonotonicClock.nowNs() + 100_000_000
                while actuator.restored.load(ordering: .acquiring) == restored && MonotonicClock.nowNs() < limit2 { usleep(10) }
            }
            return out
        }

        // Direct first (no watcher), then the watcher on the same region.
        guard case .success = session.link.registrar.register(area: region.bytes, owner: region) else {
            throw LinuxGuestError("the bench region was refused")
        }
        let direct = run(before: [.idle], direct: true)
        session.link.registrar.unregister()
        session.stop()
        let settings = RegionWatch.Settings()
        let watched = try host.attach(VMSpec(name: "bench-watched", source: .inProcess(vcpus: 1, summary: "bench"), area: .region(region),
                                             driver: "latency-boost", governor: .unlimited))
        defer { watched.stop() }
        watched.events.setThread(ThreadID(tid.load(ordering: .relaxed)), vcpu: 0)
        let watcher = watched.watch!
        let ready = MonotonicClock.nowNs() + 2_000_000_000
        while watcher.phase == .waiting && MonotonicClock.nowNs() < ready { usleep(1000) }
        let fromIdle = run(before: [.idle], direct: false)
        let fromBusy = run(before: [.preemptDisabled], direct: false)
        let idle = "\(settings.idlePollNs / 1000) µs poll", busy = "\(settings.busyPollNs / 1000) µs poll"
        return BenchResult.percentiles("flag → boost, watcher, idle guest (\(idle))", fromIdle, baseline: "direct notify → boost", direct)
            + BenchResult.percentiles("flag → boost, watcher, busy guest (\(busy))", fromBusy, baseline: "direct notify → boost", direct)
    }
}
