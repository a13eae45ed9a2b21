import Atomics
import Histogram
import PVSchedCore
import PVSchedLinux
#if canImport(Glibc)
import Glibc
#endif

/// Busy host threads (SCHED_OTHER, pinned) that compete with the vCPU threads,
/// counting the work they get done so a run can report host batch throughput.
// @unchecked Sendable: `threads` is set in init and joined once in finish(); counters are atomics.
final class HostContention: @unchecked Sendable {
    private let stop = ManagedAtomic(false)
    private let work: [ManagedAtomic<UInt64>]
    private var threads: [PVSchedCore.Thread] = []
    private var startedAt: UInt64 = 0

    init(threads count: Int, cpuMask: UInt64) throws {
        work = (0..<count).map { _ in ManagedAtomic(0) }
        startedAt = MonotonicClock.nowNs()
        for counter in work {
            let stop = self.stop
            threads.append(try PVSchedCore.Thread(name: "host-busy") {
                try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: cpuMask)
                var x: UInt64 = 1
                while !stop.load(ordering: .relaxed) {
                    for _ in 0..<20_000 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
                    counter.wrappingIncrement(ordering: .relaxed)
                }
                if x == 0 { print("") }
            })
        }
    }

    /// Stops the threads; returns work units per second over the run.
    func finish() -> Double {
        stop.store(true, ordering: .relaxed)
        threads.forEach { $0.join() }
        let seconds = Double(MonotonicClock.nowNs() - startedAt) / 1e9
        let total = work.reduce(0) { $0 + $1.load(ordering: .relaxed) }
        return seconds > 0 ? Double(total) / seconds : 0
    }
}

/// A cyclictest-like host thread: sleeps to absolute deadlines every interval
/// on the contended CPU and records how late it woke.
// @unchecked Sendable: the histogram is written only by the probe thread and read after finish() joined it.
final class HostLatencyProbe: @unchecked Sendable {
    private let stop = ManagedAtomic(false)
    private var thread: PVSchedCore.Thread?
    private let result = ManagedAtomic<Int>(0)
    // nonisolated(unsafe): written by the probe thread only, read after finish() joined it.
    nonisolated(unsafe) private var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000)

    init(cpuMask: UInt64, intervalNs: UInt64, priority: UInt8?) throws {
        thread = try PVSchedCore.Thread(name: "host-probe") { [self] in
            try? LinuxScheduling.setAffinity(LinuxScheduling.currentThread(), mask: cpuMask)
            if let priority { try? LinuxScheduling.setCurrentThread(.fifo(priority: priority)) }
            var next = timespec()
            clock_gettime(CLOCK_MONOTONIC, &next)
            while !stop.load(ordering: .relaxed) {
                var ns = Int(next.tv_nsec) + Int(intervalNs)
                next.tv_sec += ns / 1_000_000_000
                ns %= 1_000_000_000
                next.tv_nsec = ns
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, nil)
                var now = timespec()
                clock_gettime(CLOCK_MONOTONIC, &now)
                let late = (Int64(now.tv_sec) - Int64(next.tv_sec)) * 1_000_000_000 + Int64(now.tv_nsec) - Int64(next.tv_nsec)
                _ = histogram.record(UInt64(max(0, late)))
                if late > Int64(intervalNs) { next = now }  // fell behind: restart from now
            }
        }
    }

    /// Stops the probe and returns its lateness histogram (ns).
    func finish() -> Histogram<UInt64> {
        stop.store(true, ordering: .relaxed)
        thread?.join()
        thread = nil
        return histogram
    }
}
