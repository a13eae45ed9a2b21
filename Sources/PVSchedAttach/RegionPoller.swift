import Logging
import PVSchedCore
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
    }
    private let table = Mutex(Table())
    private let wake = FutexBell()
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    private let steps = Atomic<UInt64>(0)
    private let wakeUps = Atomic<UInt64>(0)

    public init(priority: UInt8?, threads: any ThreadControl) throws(ThreadError) {
        let t = try PVSchedCore.Thread(name: "pvs-poller") { [weak self] in
            if let priority { try? threads.setCurrentThread(.fifo(priority: priority)) }
            self?.run()
        }
        thread.withLock { $0 = t }
    }

    /// Starts watching VM `id`'s region: its first look is now.
    public func add(_ watch: RegionWatch, id: UInt64) {
        table.withLock { $0.entries[id] = Entry(watch: watch, nextNs: 0) }
        wake.ring()
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
    public var counters: (steps: UInt64, wakeUps: UInt64) { (steps.load(ordering: .relaxed), wakeUps.load(ordering: .relaxed)) }

    private func run() {
        while true {
            let now = MonotonicClock.nowNs()
            let due: [(UInt64, RegionWatch)] = table.withLock { t in
                t.stopping ? [] : t.entries.filter { $0.value.nextNs <= now }.map { ($0.key, $0.value.watch) }
            }
            if table.withLock({ $0.stopping }) { return }
            var stepped = 0
            for (id, watch) in due {
                let next = watch.step(now: now)
                stepped += 1
                table.withLock { t in if t.entries[id] != nil { t.entries[id]!.nextNs = next } }
            }
            steps.add(UInt64(stepped), ordering: .relaxed)
            let seen = wake.value
            let next = table.withLock { t in t.entries.values.map(\.nextNs).min() ?? .max }
            let after = MonotonicClock.nowNs()
            if next > after {
                wake.wait(while: seen, timeoutNs: next == .max ? 1_000_000_000 : Int64(min(next - after, 1_000_000_000)))
                wakeUps.add(1, ordering: .relaxed)
            }
        }
    }

    public func stop() {
        table.withLock { $0.stopping = true }
        wake.ring()
        thread.takeAndJoin()
    }
}

/// A bell: `wait(while:timeoutNs:)` sleeps until the bell rings (its count moves
/// past `seen`) or the time is up; `ring` wakes the sleeper. A pthread mutex and
/// condition variable on the monotonic clock.
// @unchecked Sendable: `count` and the pthread objects are used only under `mutex`.
final class FutexBell: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var count: UInt64 = 0
    init() {
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }
    deinit {
        pthread_cond_destroy(cond); pthread_mutex_destroy(mutex)
        cond.deallocate(); mutex.deallocate()
    }
    var value: UInt64 {
        pthread_mutex_lock(mutex); defer { pthread_mutex_unlock(mutex) }
        return count
    }
    func ring() {
        pthread_mutex_lock(mutex)
        count &+= 1
        pthread_mutex_unlock(mutex)
        pthread_cond_signal(cond)
    }
    func wait(while seen: UInt64, timeoutNs: Int64) {
        let deadline = MonotonicClock.nowNs() &+ UInt64(max(0, timeoutNs))
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        pthread_mutex_lock(mutex)
        while count == seen && MonotonicClock.nowNs() < deadline { _ = pthread_cond_timedwait(cond, mutex, &ts) }
        pthread_mutex_unlock(mutex)
    }
}
