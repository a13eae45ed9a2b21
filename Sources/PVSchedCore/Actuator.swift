/// Host scheduling parameters of a thread, as the actuator applies them.
public enum SchedulingParameters: Hashable, Sendable, CustomStringConvertible {
    case other(nice: Int8)
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

    public var description: String {
        switch self {
        case .other(let n): return "SCHED_OTHER nice \(n)"
        case .batch(let n): return "SCHED_BATCH nice \(n)"
        case .idle: return "SCHED_IDLE"
        case .fifo(let p): return "SCHED_FIFO \(p)"
        case .rr(let p): return "SCHED_RR \(p)"
        }
    }
}

/// Why the actuator could not change a thread.
public struct ActuatorError: Error, Equatable, Sendable, CustomStringConvertible {
    public let thread: ThreadID
    public let operation: String
    public let errno: Int32
    public init(thread: ThreadID, operation: String, errno: Int32) {
        self.thread = thread; self.operation = operation; self.errno = errno
    }
    public var description: String { "\(operation) on \(thread) failed: errno \(errno)" }
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
}

extension Actuator {
    /// No CPU clock by default: the governor then charges wall time.
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? { nil }
}
