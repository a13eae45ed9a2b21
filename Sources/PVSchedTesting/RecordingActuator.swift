import PVSchedCore
import Synchronization

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
        var cpuTimes: [ThreadID: UInt64] = [:]
        /// Parameters someone else set (the operator's change), and threads' parameters before adoption.
        var byOperator: [ThreadID: SchedulingParameters] = [:]
        var initial: [ThreadID: SchedulingParameters] = [:]
    }
    private let state = Mutex(State())
    public init() {}

    /// Calls that changed something (calls that changed nothing are not recorded).
    public var calls: [Call] { state.withLock { $0.calls } }
    /// Make `apply` fail for `thread` (to test error paths).
    public func failApplies(for thread: ThreadID) { state.withLock { _ = $0.failing.insert(thread) } }

    /// Simulates an administrator's chrt/renice of `thread` (nil: put back at its baseline).
    public func setByOperator(_ parameters: SchedulingParameters?, for thread: ThreadID) {
        state.withLock { $0.byOperator[thread] = parameters }
    }
    /// The parameters `thread` has before pvsched adopts it.
    public func setInitial(_ parameters: SchedulingParameters, for thread: ThreadID) {
        state.withLock { $0.initial[thread] = parameters }
    }

    public func adopt(_ thread: ThreadID, allowRealTime: Bool) throws(ActuatorError) {
        if let p = state.withLock({ $0.initial[thread] }), p.isRealTime, !allowRealTime {
            throw ActuatorError(thread: thread, operation: "adopt", errno: 0, kind: .realTimeAtAttach(current: p))
        }
    }

    public func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
        if let p = state.withLock({ $0.byOperator[thread] }) {
            throw ActuatorError(thread: thread, operation: "check", errno: 0, kind: .ownedByOperator(current: p))
        }
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
        let changed: SchedulingParameters? = state.withLock { s in
            guard s.current[thread] != nil else { return nil }
            s.current.removeValue(forKey: thread)
            if let p = s.byOperator[thread] { return p }  // their setting stays: nothing to restore
            s.calls.append(.restore(thread))
            return nil
        }
        if let changed { throw ActuatorError(thread: thread, operation: "check", errno: 0, kind: .ownedByOperator(current: changed)) }
    }

    public func restoreAll() {
        state.withLock { s in
            for t in s.current.keys.sorted(by: { $0.rawValue < $1.rawValue }) { s.calls.append(.restore(t)) }
            s.current.removeAll()
        }
    }

    public func applied(to thread: ThreadID) -> SchedulingParameters? { state.withLock { $0.current[thread] } }

    /// Sets the CPU time `thread` has run (a manual thread CPU clock); threads never set have none.
    public func setCPUTime(_ ns: UInt64, of thread: ThreadID) { state.withLock { $0.cpuTimes[thread] = ns } }
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? { state.withLock { $0.cpuTimes[thread] } }

    /// Threads' baselines: the parameters set with `setInitial` (none otherwise, so
    /// boosts are not repaid).
    public func baseline(of thread: ThreadID) -> SchedulingParameters? { state.withLock { $0.initial[thread] } }
}
