import CHostService
import Logging
import PVSchedControl
import PVSchedCore
import PVSchedHost
import Synchronization

/// Carries out control requests on a `PVSchedHost`: the seed's ioctls (get/replace
/// a VM's driver) and sysctl (available drivers) and the rest of the control API.
///
/// A request is parsed into its method's typed parameters first (every field
/// validated; a refused request changes nothing), then carried out by that
/// method's entry in a table, keyed by the names of `ControlMethods.all`. Safe to
/// call from many connection threads.
public final class ControlHandler: Sendable {
    public let host: PVSchedHost
    let operatorBoosts: OperatorBoosts
    let metricsAddress: String?
    let logger: Logger
    /// What VMs get when their request says nothing (from the configuration; a reload changes it).
    let policy: Mutex<AttachPolicy>
    /// Where attached VMs are recorded for a restart (nil: nowhere).
    let state: AttachState?
    /// Other names of VMs, such as a libvirt domain's UUID: alias → VM name.
    let aliases = Mutex<[String: String]>([:])

    /// A method's handler: its decoded parameters and the caller in, its result out.
    typealias Entry = @Sendable (inout RequestParams, ControlCaller) throws(ControlError) -> JSON
    private let table = Mutex<[String: Entry]>([:])

    public init(host: PVSchedHost, metricsAddress: String? = nil, policy: AttachPolicy = AttachPolicy(), stateFile: String? = nil,
                logger: Logger = Logger(label: "pvsched.control")) throws(ThreadError) {
        self.host = host
        self.metricsAddress = metricsAddress
        self.logger = logger
        self.policy = Mutex(policy)
        state = stateFile.map { AttachState(path: $0, logger: logger) }
        operatorBoosts = try OperatorBoosts(actuator: host.actuator)
        var t: [String: Entry] = [:]
        for (name, entry) in daemonEntries() + driverEntries() + vmEntries() + threadEntries() { t[name] = entry }
        precondition(Set(t.keys) == Set(ControlMethods.names), "every control method has exactly one handler")
        table.withLock { $0 = t }
    }

    /// The table entry of method `M`: decode its parameters, refuse unknown ones, run `body`.
    static func entry<M: ControlMethod>(_ method: M.Type,
                                        _ body: @escaping @Sendable (M.Params, ControlCaller) throws(ControlError) -> M.Result) -> (String, Entry) {
        (M.name, { p, caller throws(ControlError) in
            let params = try M.Params(decoding: &p)
            try p.finish()
            return try body(params, caller).json
        })
    }

    /// Records the kernel event source dropped (nil: it was never opened).
    public var kernelEventsDropped: UInt64? { host.kernelEventsDropped }

    /// Replaces the defaults of VMs attached from now on (a configuration reload).
    public func setPolicy(_ p: AttachPolicy) { policy.withLock { $0 = p } }

    /// Attaches again the VMs the state file records (a restart); returns how many.
    @discardableResult
    public func restoreAttachedVMs() -> Int {
        guard let state else { return 0 }
        var restored = 0
        for r in state.load() {
            let name = r.params.name ?? "pid\(r.process)"
            switch handle(ControlRequest(id: .null, method: VMAttach.name, params: RequestParams(r.params.encoded))) {
            case .success:
                restored += 1
                logger.info("VM attached again after a restart", metadata: ["vm": "\(name.escapedForDisplay)", "pid": "\(r.process)"])
            case .failure(let e):
                logger.warning("a VM of the state file could not be attached again",
                               metadata: ["vm": "\(name.escapedForDisplay)", "error": "\(e)"])
            }
        }
        return restored
    }

    /// Stops the operator-boost timer and undoes its boosts.
    public func shutdown() {
        operatorBoosts.shutdown()
    }

    /// Parses and carries out one request line for `caller`; returns the response line.
    public func respond(to line: some Collection<UInt8>, caller: ControlCaller = .inProcess) -> [UInt8] {
        switch ControlRequest.parse(line) {
        case .failure(let e): return ControlResponse.failure(id: e.id, error: e.error)
        case .success(let request):
            switch handle(request, caller: caller) {
            case .success(let result): return ControlResponse.success(id: request.id, result: result)
            case .failure(let error): return ControlResponse.failure(id: request.id, error: error)
            }
        }
    }

    /// Carries out one parsed request for `caller` (refused when its role does not allow it).
    public func handle(_ request: ControlRequest, caller: ControlCaller = .inProcess) -> Result<JSON, ControlError> {
        var p = request.params
        do throws(ControlError) {
            guard let entry = table.withLock({ $0[request.method] }), let access = ControlMethods.access(of: request.method) else {
                throw ControlError(.unknownMethod, field: "method", "unknown method '\(request.method.prefix(64))'")
            }
            if caller.role == .reader && access == .admin {
                throw ControlError(.permissionDenied, field: "method",
                                   "'\(request.method)' changes the daemon: root only (the read group may call \(ControlMethods.readOnly.sorted().joined(separator: ", ")), and boost threads of its own)")
            }
            return .success(try entry(&p, caller))
        } catch {
            return .failure(error)
        }
    }

    // MARK: error mapping

    func registry<T>(_ body: () throws(RegistryError) -> T) throws(ControlError) -> T {
        do { return try body() } catch {
            switch error {
            case .unknownDriver: throw ControlError(.notFound, field: "params.driver", "\(error)")
            case .unknownVM: throw ControlError(.notFound, field: "params.vm", "\(error)")
            case .driverInUse, .duplicateName, .full: throw ControlError(.conflict, field: "params.name", "\(error)")
            default: throw ControlError(.conflict, "\(error)")
            }
        }
    }

    func hostCall<T>(_ body: () throws(HostError) -> T) throws(ControlError) -> T {
        do { return try body() } catch { throw Self.controlError(error) }
    }

    static func controlError(_ error: HostError) -> ControlError {
        let field = error.field.hasPrefix("params.") ? error.field : "params.\(error.field)"
        switch error.kind {
        case .invalid: return ControlError(.invalidParams, field: field, error.message)
        case .notFound: return ControlError(.notFound, field: field, error.message)
        case .conflict: return ControlError(.conflict, field: field, error.message)
        case .failed: return ControlError(.failed, field: field, error.message)
        }
    }

    func session(_ reference: String) throws(ControlError) -> any VMSession {
        let name = resolve(reference)
        return try hostCall { () throws(HostError) in try host.session(name) }
    }

    /// A VM reference as given (a name, a number, or an alias such as a libvirt domain's UUID) made a name or number.
    func resolve(_ reference: String) -> String {
        aliases.withLock { $0[reference] } ?? reference
    }
}
