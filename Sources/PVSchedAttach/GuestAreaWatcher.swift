import Logging
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Delivers an attached VM's events when the host sees none of its exits (QEMU
/// under TCG, or any VMM without kernel events): a dedicated thread (real-time
/// when allowed, so that its wake-ups are on time under host load) that steps the
/// VM's `RegionWatch` and sleeps until it asks to look again.
public final class GuestAreaWatcher: Sendable {
    public typealias Settings = RegionWatch.Settings
    public typealias Phase = RegionWatch.Phase
    public typealias Counters = RegionWatch.Counters

    public let watch: RegionWatch
    private let running = Atomic(true)
    private let thread = Mutex<PVSchedCore.Thread?>(nil)

    public init(region: SharedMemoryFile, link: VMHostLink, binding: VMBinding, settings: Settings = Settings(),
                priority: UInt8?, threads: any ThreadControl, logger: Logger) throws(ThreadError) {
        let watch = RegionWatch(region: region, link: link, binding: binding, settings: settings, logger: logger)
        self.watch = watch
        let t = try PVSchedCore.Thread(name: "pvs-watcher") { [self] in
            if let priority { try? threads.setCurrentThread(.fifo(priority: priority)) }
            while running.load(ordering: .relaxed) {
                let next = watch.step(now: MonotonicClock.nowNs())
                Self.sleep(until: next)
            }
        }
        thread.withLock { $0 = t }
    }

    public var phase: Phase { watch.phase }
    public var stats: Counters { watch.stats }

    /// Stops the thread; the caller detaches the VM (which undoes the boosts).
    public func stop() {
        running.store(false, ordering: .relaxed)
        thread.takeAndJoin()
        watch.withdraw()
    }

    private static func sleep(until ns: UInt64) {
        guard ns > MonotonicClock.nowNs() else { return }
        var ts = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
        while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
    }
}
