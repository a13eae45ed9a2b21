/// Host scheduling parameters of a thread, as the actuator applies them.
public enum SchedulingParameters: Hashable, Sendable, CustomStringConvertible {
    case other(nice: Int8)
    /// SCHED_OTHER with its own EEVDF slice (`sched_attr.sched_runtime`, Linux 6.12+):
    /// a short slice gives the thread an early virtual deadline, so it preempts the
    /// fair tasks it wakes among at once, yet never a real-time task.
    case slice(nice: Int8, sliceUs: UInt32)
    case batch(nice: Int8)
    case idle
    case fifo(priority: UInt8)
    case rr(priority: UInt8)

    public var isRealTime: Bool {
        switch self {
        case .fifo, .rr: return true
        default: return false
        }
    }

    /// Whether Linux runs these parameters in its fair class (EEVDF).
    public var isFairClass: Bool { !isRealTime }

    /// The real-time priority (1-99), nil in the fair classes.
    public var realTimePriority: UInt8? {
        switch self {
        case .fifo(let n), .rr(let n): return n
        default: return nil
        }
    }

    /// The same class at the least weight (nice 19): what a thread with these
    /// parameters repays a boost at (see `RepaymentLedger`). Nil when there is no
    /// lower weight to go to: a real-time thread, SCHED_IDLE, or nice 19 already.
    public var repayment: SchedulingParameters? {
        switch self {
        case .other(let n): return n < 19 ? .other(nice: 19) : nil
        case .slice(let n, let us): return n < 19 ? .slice(nice: 19, sliceUs: us) : nil
        case .batch(let n): return n < 19 ? .batch(nice: 19) : nil
        case .idle, .fifo, .rr: return nil
        }
    }

    public var description: String {
        switch self {
        case .other(let n): return "SCHED_OTHER nice \(n)"
        case .slice(let n, let us): return "SCHED_OTHER nice \(n) slice \(us) µs"
        case .batch(let n): return "SCHED_BATCH nice \(n)"
        case .idle: return "SCHED_IDLE"
        case .fifo(let p): return "SCHED_FIFO \(p)"
        case .rr(let p): return "SCHED_RR \(p)"
        }
    }
}

/// Why the actuator could not change a thread.
public struct ActuatorError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of failure: a system call's, or a thread pvsched leaves alone.
    public enum Kind: Equatable, Sendable {
        case system
        /// Someone else (an administrator's chrt or renice) set the thread to
        /// `current`: their setting wins, pvsched neither boosts nor restores it.
        case ownedByOperator(current: SchedulingParameters?)
        /// The thread was already real-time when pvsched was given it (`current`),
        /// and the VM is not configured to accept that.
        case realTimeAtAttach(current: SchedulingParameters)
        /// The thread pvsched was given has exited (its id may name another thread
        /// by now): it is dropped and never acted on again.
        case threadGone
        /// A thread of another process, and no guardian takes records now: a change
        /// the daemon's death would leave behind is not made.
        case unguarded
    }
    public let thread: ThreadID
    public let operation: String
    public let errno: Int32
    public let kind: Kind
    public init(thread: ThreadID, operation: String, errno: Int32, kind: Kind = .system) {
        self.thread = thread; self.operation = operation; self.errno = errno; self.kind = kind
    }
    /// A stable name of the failure, for counters and metrics.
    public var reason: String {
        switch kind {
        case .system: return errno == 1 ? "permission_denied" : "system_error"
        case .ownedByOperator: return "operator_owned"
        case .realTimeAtAttach: return "refused_real_time"
        case .threadGone: return "thread_gone"
        case .unguarded: return "unguarded"
        }
    }

    /// The failure without the thread it happened to: the same text for every
    /// thread that fails for the same cause.
    public var cause: String {
        switch kind {
        case .system where errno == 1: return "\(operation): permission denied (EPERM)"
        case .system: return "\(operation): errno \(errno)"
        case .unguarded: return "the boost guardian is not running: other processes' threads are not changed"
        default: return description
        }
    }

    public var description: String {
        switch kind {
        case .system: return "\(operation) on \(thread) failed: errno \(errno)"
        case .ownedByOperator(let p): return "\(thread) was changed by someone else (now \(p.map { "\($0)" } ?? "unknown")): left alone"
        case .realTimeAtAttach(let p): return "\(thread) is already real-time (\(p)) at attach: refused"
        case .threadGone: return "\(thread) has exited: dropped"
        case .unguarded: return "\(thread) belongs to another process and the boost guardian is not running: not changed"
        }
    }
}

/// Applies scheduling parameters to threads. Implementations remember each
/// thread's original parameters the first time they change it, apply only real
/// changes, and can put every changed thread back.
public protocol Actuator: AnyObject, Sendable {
    /// Sets `parameters` on `thread` (no system call if they are already in force).
    func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError)
    /// Puts `thread` back to the parameters it had before the first `apply`.
    func restore(_ thread: ThreadID) throws(ActuatorError)
    /// Restores every thread this actuator changed.
    func restoreAll()
    /// Parameters this actuator last applied to `thread` (nil if it is at its original).
    func applied(to thread: ThreadID) -> SchedulingParameters?
    /// CPU time `thread` has run (ns, its thread CPU clock), or nil when it cannot be
    /// read: the governor charges boosts by it.
    func cpuTimeNs(of thread: ThreadID) -> UInt64?
    /// Takes `thread` under management: records its parameters now as the baseline
    /// every restore returns to. Throws `.realTimeAtAttach` for a real-time thread
    /// unless `allowRealTime`. From then on, a thread found at parameters that are
    /// neither the baseline nor pvsched's boost was changed by someone else: it is
    /// left alone (`.ownedByOperator`) until it is back at its baseline.
    func adopt(_ thread: ThreadID, allowRealTime: Bool) throws(ActuatorError)
    /// Forgets `thread`'s baseline (after restoring it, if boosted).
    func release(_ thread: ThreadID)
    /// The parameters `thread` was adopted with (what restores return to), if known:
    /// a boost is repaid at the least weight of that class.
    func baseline(of thread: ThreadID) -> SchedulingParameters?
    /// The process `thread` belonged to when the actuator took hold of it (adopt or
    /// first apply), if it holds it: whoever named the thread as a VMM's checks that
    /// the id did not change hands in between.
    func owningProcess(of thread: ThreadID) -> Int32?
    /// Whether the thread the actuator took hold of as `thread` has exited (its id
    /// may name another thread now); false when it holds no such thread.
    func hasExited(_ thread: ThreadID) -> Bool
    /// Why boosts of `thread` are applied in another class than asked (a real-time
    /// class its cgroup refuses), or nil.
    func classFallback(of thread: ThreadID) -> String?
}

extension Actuator {
    /// No CPU clock by default: the governor then charges wall time.
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? { nil }
    /// No baseline by default: boosts are then not repaid.
    public func baseline(of thread: ThreadID) -> SchedulingParameters? { nil }
    public func adopt(_ thread: ThreadID, allowRealTime: Bool) throws(ActuatorError) {}
    public func release(_ thread: ThreadID) { try? restore(thread) }
    public func owningProcess(of thread: ThreadID) -> Int32? { nil }
    public func hasExited(_ thread: ThreadID) -> Bool { false }
    public func classFallback(of thread: ThreadID) -> String? { nil }
}
