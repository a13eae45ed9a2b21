import CHostService
import PVSchedCore
import Synchronization

/// When a service thread (the enforcer, the region poller) next wakes, which other
/// threads can move earlier without waking it: a timerfd, re-armed by whoever needs
/// the thread sooner. A thread that woke for nothing costs a context switch (a real-
/// time one preempts whatever runs); a condition variable would cost one per change
/// of plan, this costs one per wake-up that was needed.
///
/// The sleeper calls `sleep(next:)`, which reads its plan through `next` after it
/// opened the timer to others' `wake(by:)`: a need recorded before that is in the
/// plan, one after it re-arms the timer. While the sleeper is awake, `wake(by:)`
/// does nothing (it will read its plan before it sleeps again).
public final class WakeTimer: Sendable {
    private let fd: Int32
    /// The armed time; `.max` while the sleeper is making its plan, 0 while it is awake.
    private let armed = Mutex<UInt64>(0)
    private let wakeUpCount = Atomic<UInt64>(0)

    public init() throws(ThreadError) {
        let fd = pvs_timerfd_create()
        guard fd >= 0 else { throw ThreadError(errno: -fd) }
        self.fd = fd
    }

    deinit { pvs_close(fd) }

    /// How many times the sleeper woke up.
    public var wakeUps: UInt64 { wakeUpCount.load(ordering: .relaxed) }

    /// The sleeper must be awake by `at` (host monotonic ns).
    public func wake(by at: UInt64) {
        armed.withLock { a in
            guard at < a else { return }
            a = at
            _ = pvs_timerfd_arm(fd, at)
        }
    }

    /// Wakes the sleeper now.
    public func wakeNow() { wake(by: 1) }

    /// A plan made earlier that turned out too early (a boost that ended): re-arms
    /// the sleeping thread's timer later, to `at`, if nothing asked for sooner. `at`
    /// must be the earliest time anything needs the sleeper now.
    public func postpone(to at: UInt64) {
        armed.withLock { a in
            guard a != 0, a != .max, at > a else { return }
            a = at
            _ = pvs_timerfd_arm(fd, at)
        }
    }

    /// Sleeps until the time `next()` returns (at most `maxNs` from now), or until
    /// an earlier `wake(by:)`.
    public func sleep(maxNs: UInt64, next: () -> UInt64?) {
        armed.withLock { $0 = .max }
        let now = MonotonicClock.nowNs()
        let planned = min(next() ?? .max, now &+ maxNs)
        armed.withLock { a in
            a = min(a, planned)
            _ = pvs_timerfd_arm(fd, a)
        }
        _ = pvs_timerfd_wait(fd)
        armed.withLock { $0 = 0 }
        wakeUpCount.add(1, ordering: .relaxed)
    }
}
