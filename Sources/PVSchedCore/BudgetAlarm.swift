import Atomics
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Where a VM asks its budget enforcer for a look (see `VMEnforcement`): the host's
/// enforcer (one for every VM), or a `BudgetAlarm` of its own.
public protocol EnforcerAlarm: AnyObject, Sendable {
    /// A check of `vm` is due at `checkAtNs`: the enforcer must be awake by then. Call
    /// it after the change that makes the check due is recorded.
    func need(_ vm: any VMEnforcement, checkAtNs: UInt64)
    /// `vm`'s boosts ended: the enforcer may look later than it planned.
    func relax(_ vm: any VMEnforcement)
}

/// When a VM's budget enforcer wakes: exactly when a running boost could spend its
/// budget, and otherwise rarely.
///
/// The enforcer is a real-time thread, so each of its wake-ups preempts whatever runs on
/// its CPU, a boosted vCPU included (and a fair-class boost preempted in the middle may
/// not get the CPU back until the next tick). It therefore sleeps in `sleep(next:)` until
/// the governor's next possible budget exhaustion, or for `idleNs` while no boost runs
/// (counters are republished then). The governor calls `need(_:checkAtNs:)` when a boost
/// begins, changes budget or has its budget trimmed, which wakes the enforcer only when
/// that check is due before its planned wake-up.
// @unchecked Sendable: the condition variable's state is guarded by its mutex; the plan is an atomic.
public final class BudgetAlarm: EnforcerAlarm, @unchecked Sendable {
    /// How long the enforcer sleeps while no boost runs.
    public static let idleNs: UInt64 = 100_000_000
    /// The planned wake-up (host monotonic ns); `.max` while the enforcer is choosing
    /// it (any need wakes it then), 0 while it is awake and working (it looks anyway).
    private let planned = ManagedAtomic<UInt64>(0)
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let cond: UnsafeMutablePointer<pthread_cond_t>
    private var rung = false  // guarded by mutex
    private let wakeUpCount = ManagedAtomic<UInt64>(0)

    public init() {
        mutex = .allocate(capacity: 1)
        cond = .allocate(capacity: 1)
        // Priority inheritance: a vCPU thread that rings the alarm may run at the least
        // weight (repaying a boost) and be preempted holding the mutex; the real-time
        // enforcer waiting for it then lends it its priority instead of waiting for it
        // to be scheduled (without it, the enforcer and every vCPU that rang after it
        // stood still for 20-35 ms in hostile-flip).
        var mutexAttr = pthread_mutexattr_t()
        pthread_mutexattr_init(&mutexAttr)
        pthread_mutexattr_setprotocol(&mutexAttr, Int32(PTHREAD_PRIO_INHERIT))
        pthread_mutex_init(mutex, &mutexAttr)
        pthread_mutexattr_destroy(&mutexAttr)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        cond.deallocate()
        mutex.deallocate()
    }

    /// How many times the enforcer woke up (tests count them).
    public var wakeUps: UInt64 { wakeUpCount.load(ordering: .relaxed) }

    /// A check is due at `checkAtNs`: wakes the enforcer if it planned to sleep longer.
    /// Call it after the governor recorded the change that makes the check due.
    public func need(_ vm: any VMEnforcement, checkAtNs: UInt64) { need(checkAtNs: checkAtNs) }

    /// A check is due at `checkAtNs` (this alarm serves one VM).
    public func need(checkAtNs: UInt64) {
        guard checkAtNs < planned.load(ordering: .sequentiallyConsistent) else { return }
        ring()
    }

    /// Nothing to do: this alarm's enforcer looks at the next planned time anyway.
    public func relax(_ vm: any VMEnforcement) {}

    /// Wakes the enforcer now (a boost to look at, or the VM stopping).
    public func ring() {
        pthread_mutex_lock(mutex)
        rung = true
        pthread_mutex_unlock(mutex)
        // After the unlock: the woken enforcer, real-time, may preempt this thread at
        // once, and must not find the mutex still held.
        pthread_cond_signal(cond)
    }

    /// Sleeps until `next()` (the next budget check, nil while no boost runs: then
    /// `idleNs`), or until rung. `next` is read after the plan is open to rings, so a
    /// boost that begins meanwhile is never missed.
    public func sleep(next: () -> UInt64?) {
        planned.store(.max, ordering: .sequentiallyConsistent)
        let now = MonotonicClock.nowNs()
        let idle = now.addingReportingOverflow(Self.idleNs)
        // At least 20 µs: a check due now was just made.
        let until = max(now &+ 20_000, min(next() ?? .max, idle.overflow ? .max : idle.partialValue))
        planned.store(until, ordering: .sequentiallyConsistent)
        pthread_mutex_lock(mutex)
        while !rung {
            let t = MonotonicClock.nowNs()
            if t >= until { break }
            var ts = timespec(tv_sec: Int(until / 1_000_000_000), tv_nsec: Int(until % 1_000_000_000))
            _ = pthread_cond_timedwait(cond, mutex, &ts)
        }
        rung = false
        planned.store(0, ordering: .sequentiallyConsistent)
        pthread_mutex_unlock(mutex)
        wakeUpCount.wrappingIncrement(ordering: .relaxed)
    }
}
