import Logging
import PVSchedCore
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The host side of the shared-memory transport for every watched VM: one thread
/// that steps each VM's `RegionWatch` when that watch asked to be looked at again,
/// and sleeps until the earliest such time (or until a watch is added). Its cost
/// follows what the guests do, not how many VMs there are: a watch of an idle guest
/// asks to be looked at rarely, and reads only the lines of vCPUs whose threads ran
/// since its last look (`VMStatusView.lineMayHaveChanged`).
///
/// The thread runs real-time when allowed (`priority`), so that its looks are on
/// time under host load: it plays the part of a VMM's device thread for VMs whose
/// exits the host does not see.
public final class RegionPoller: Sendable {
    private struct Entry {
        let watch: RegionWatch
        var nextNs: UInt64
    }
    private struct Table {
        var entries: [UInt64: Entry] = [:]
        var stopping = false
        /// The earliest look any watch asked for.
        var earliest: UInt64 { entries.values.reduce(UInt64.max) { min($0, $1.nextNs) } }
    }
    private let table = Mutex(Table())
    private let timer: WakeTimer
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    private let steps = Atomic<UInt64>(0)
    /// Looks due within this of the earliest are taken in the same wake-up.
    static let slackNs: UInt64 = 50_000

    public init(priority: UInt8?, threads: any ThreadControl) throws(ThreadError) {
        timer = try WakeTimer()
        let t = try PVSchedCore.Thread(name: "pvs-poller") { [weak self] in
            if let priority { try? threads.setCurrentThread(.fifo(priority: priority)) }
            self?.run()
        }
        thread.withLock { $0 = t }
    }

    /// Starts watching VM `id`'s region: its first look is now.
    public func add(_ watch: RegionWatch, id: UInt64) {
        table.withLock { $0.entries[id] = Entry(watch: watch, nextNs: 0) }
        timer.wakeNow()
    }

    /// VM `id`'s guest may write its lines again (a vCPU thread that slept runs):
    /// looks at them within the watch's busy poll period.
    public func lookSoon(id: UInt64) {
        let at: UInt64? = table.withLock { t in
            guard let e = t.entries[id] else { return nil }
            let at = MonotonicClock.nowNs() &+ e.watch.settings.busyPollNs
            if at < e.nextNs { t.entries[id]!.nextNs = at }
            return at
        }
        if let at { timer.wake(by: at) }
    }

    /// A vCPU of VM `id` went to sleep and its line was read then: if every vCPU of
    /// it is so, the look planned for its running vCPUs would read nothing; it rests
    /// instead (until its bell, `lookSoon`, or `RegionWatch.restNs`), and the thread
    /// is not woken for it. Checked under the table's lock, which `lookSoon` takes
    /// too: a vCPU that runs again after the check moves the look back.
    public func rest(id: UInt64) {
        let earliest: UInt64? = table.withLock { t in
            // A watch resting already (every halt of its vCPUs rings) moves no look: no re-arm.
            let now = MonotonicClock.nowNs()
            guard var e = t.entries[id], e.watch.mayRest, e.nextNs < now &+ RegionWatch.restNs / 2 else { return nil }
            e.nextNs = now &+ RegionWatch.restNs
            t.entries[id] = e
            return t.earliest
        }
        if let earliest { timer.postpone(to: earliest) }
    }

    /// Stops watching VM `id`: no step of it runs after this returns.
    public func remove(id: UInt64) -> RegionWatch? {
        let removed = table.withLock { $0.entries.removeValue(forKey: id) }
        // A step in progress holds the watch's own lock: wait for it by taking a look-free step.
        removed?.watch.settle()
        return removed?.watch
    }

    /// The watch of VM `id`, if watched.
    public func watch(id: UInt64) -> RegionWatch? { table.withLock { $0.entries[id]?.watch } }

    /// Steps taken and wake-ups, for the scale benchmark.
    public var counters: (steps: UInt64, wakeUps: UInt64) { (steps.load(ordering: .relaxed), timer.wakeUps) }

    private func run() {
        while true {
            let now = MonotonicClock.nowNs()
            let due: [(UInt64, RegionWatch)]? = table.withLock { t in
                t.stopping ? nil : t.entries.filter { $0.value.nextNs <= now &+ Self.slackNs }.map { ($0.key, $0.value.watch) }
            }
            guard let due else { return }
            for (id, watch) in due {
                let next = watch.step(now: now)
                table.withLock { t in if t.entries[id] != nil { t.entries[id]!.nextNs = next } }
            }
            steps.add(UInt64(due.count), ordering: .relaxed)
            timer.sleep(maxNs: 1_000_000_000) {
                let next = table.withLock { $0.earliest }
                return next == .max ? nil : next
            }
        }
    }

    public func stop() {
        table.withLock { $0.stopping = true }
        timer.wakeNow()
        thread.takeAndJoin()
    }
}
