import Synchronization

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
}

/// An actuator that changes nothing and records every call: for tests and simulators.
public final class RecordingActuator: Actuator {
    /// One thing the actuator was asked to do.
    public enum Call: Equatable, Sendable {
        case apply(SchedulingParameters, ThreadID)
        case restore(ThreadID)
    }
    private struct State {
        var current: [ThreadID: SchedulingParameters] = [:]
        var calls: [Call] = []
        var failing: Set<ThreadID> = []
    }
    private let state = Mutex(State())
    public init() {}

    /// Calls that changed something (calls that changed nothing are not recorded).
    public var calls: [Call] { state.withLock { $0.calls } }
    /// Make `apply` fail for `thread` (to test error paths).
    public func failApplies(for thread: ThreadID) { state.withLock { _ = $0.failing.insert(thread) } }

    public func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
        let failed: Bool = state.withLock { s in
            if s.failing.contains(thread) { return true }
            if s.current[thread] != parameters {
                s.current[thread] = parameters
                s.calls.append(.apply(parameters, thread))
            }
            return false
        }
        if failed { throw ActuatorError(thread: thread, operation: "apply", errno: 1) }
    }

    public func restore(_ thread: ThreadID) throws(ActuatorError) {
        state.withLock { s in
            if s.current.removeValue(forKey: thread) != nil { s.calls.append(.restore(thread)) }
        }
    }

    public func restoreAll() {
        state.withLock { s in
            for t in s.current.keys.sorted(by: { $0.rawValue < $1.rawValue }) { s.calls.append(.restore(t)) }
            s.current.removeAll()
        }
    }

    public func applied(to thread: ThreadID) -> SchedulingParameters? { state.withLock { $0.current[thread] } }
}
