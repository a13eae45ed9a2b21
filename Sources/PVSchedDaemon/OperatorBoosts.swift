import PVSchedControl
import PVSchedCore
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Boosts an operator asked for by thread id (`thread.boost`): applied through
/// the host's actuator (so the guardian covers threads of other processes) and
/// undone when their time is up, on `thread.restore`, or when the daemon stops.
/// They are loans with a hard limit, never managed by a driver.
final class OperatorBoosts: Sendable {
    private let actuator: any Actuator
    private let deadlines = Mutex<[ThreadID: UInt64]>([:])
    private let running = Atomic(true)
    private let expiry = Mutex<PVSchedCore.Thread?>(nil)
    /// The expiry thread sleeps until the earliest end (no wake-ups while none runs).
    private let timer: WakeTimer

    init(actuator: any Actuator) throws(ThreadError) {
        self.actuator = actuator
        timer = try WakeTimer()
        let t = try PVSchedCore.Thread(name: "pvs-op-boosts") { [self] in
            while running.load(ordering: .relaxed) {
                expire(now: MonotonicClock.nowNs())
                timer.sleep(maxNs: 60_000_000_000) { deadlines.withLock { $0.values.min() } }
            }
        }
        expiry.withLock { $0 = t }
    }

    /// Boosts `thread` to SCHED_FIFO `priority` for `durationNs`.
    func boost(_ thread: ThreadID, priority: UInt8, durationNs: UInt64) throws(ControlError) {
        do { try actuator.apply(.fifo(priority: priority), to: thread) } catch {
            throw ControlError(.failed, field: "params.tid", "\(error)")
        }
        let end = MonotonicClock.nowNs() &+ durationNs
        deadlines.withLock { $0[thread] = end }
        timer.wake(by: end)
    }

    /// Ends `thread`'s operator boost now; false if it had none.
    func restore(_ thread: ThreadID) -> Bool {
        guard deadlines.withLock({ $0.removeValue(forKey: thread) }) != nil else { return false }
        try? actuator.restore(thread)
        return true
    }

    private func expire(now: UInt64) {
        let due: [ThreadID] = deadlines.withLock { d in
            let due = d.filter { $0.value <= now }.map(\.key)
            for t in due { d[t] = nil }
            return due
        }
        for t in due { try? actuator.restore(t) }
    }

    func shutdown() {
        running.store(false, ordering: .relaxed)
        timer.wakeNow()
        expiry.takeAndJoin()
        expire(now: .max)
    }

}
