/// One method of the control protocol: its name, who may call it, its parameters
/// and its result as types that the daemon decodes and encodes and the CLI builds
/// and reads, so that neither side spells a method or a field by hand. Every
/// method is listed in `ControlMethods.all`, from which `daemon.info`'s method
/// list, the read-only set and the schema check (docs/control-api.md) come.
public protocol ControlMethod {
    associatedtype Params: ControlParams
    associatedtype Result: ControlResult
    /// The method's name on the wire (`vm.list`).
    static var name: String { get }
    /// Who may call it (`ControlAccessLevel`).
    static var access: ControlAccessLevel { get }
}

/// Who may call a method: everyone served (read-only), or only an administrator
/// (root, the daemon's user); `ownThreads`: a read-group member too, for a thread
/// its own user runs and within limits.
public enum ControlAccessLevel: Sendable {
    case readOnly
    case admin
    case ownThreads
}

/// A method's parameters: read from a request (validated field by field, errors
/// naming `params.FIELD`) and written by a client.
public protocol ControlParams: Sendable {
    /// Reads and validates the parameters; `finish()` is called after.
    init(decoding p: inout RequestParams) throws(ControlError)
    /// The parameters as a request carries them.
    var encoded: [String: JSON] { get }
}

/// A method's result: written by the daemon, read by a client.
public protocol ControlResult: Sendable {
    init(decoding json: JSON) throws(ControlError)
    var json: JSON { get }
}

/// A method without parameters.
public struct NoParams: ControlParams, Equatable {
    public init() {}
    public init(decoding p: inout RequestParams) throws(ControlError) {}
    public var encoded: [String: JSON] { [:] }
}

/// The methods of protocol version 1.
public enum ControlMethods {
    public static let all: [any ControlMethod.Type] = [
        DaemonInfo.self, DriversList.self, DriversSetDefault.self, BPFLoad.self, BPFUnload.self,
        VMList.self, VMStart.self, VMAttach.self, VMStop.self, VMDriverGet.self, VMDriverReplace.self, VMDriverUnassign.self,
        VMStats.self, VMGovernorGet.self, VMGovernorSet.self, VMTrace.self, ThreadBoost.self, ThreadRestore.self,
    ]
    /// Every method name, in protocol order.
    public static let names: [String] = all.map { $0.name }
    /// The methods that change nothing: what a read-group member may call.
    public static let readOnly: Set<String> = Set(all.filter { $0.access == .readOnly }.map { $0.name })
    /// The access level of `name`, nil for an unknown method.
    public static func access(of name: String) -> ControlAccessLevel? { all.first { $0.name == name }?.access }
}

extension ControlClient {
    /// Calls method `M` with typed parameters and returns its typed result.
    public func call<M: ControlMethod>(_ method: M.Type, _ params: M.Params) throws(ControlError) -> M.Result {
        try M.Result(decoding: call(M.name, params.encoded))
    }
}

extension ControlClient {
    /// Calls a method without parameters.
    public func call<M: ControlMethod>(_ method: M.Type) throws(ControlError) -> M.Result where M.Params == NoParams {
        try call(method, NoParams())
    }
}

/// Reads a daemon's answer field by field: the CLI's side of `ControlResult`
/// (the daemon is trusted; a missing or mistyped field is still an error, not a crash).
public struct JSONReader {
    public let json: JSON
    private let what: String
    public init(_ json: JSON, _ what: String) throws(ControlError) {
        guard case .object = json else { throw ControlError(.failed, "the daemon's \(what) is not an object") }
        self.json = json; self.what = what
    }
    private func missing(_ key: String, _ type: String) -> ControlError {
        ControlError(.failed, "the daemon's \(what) lacks \(type) `\(key)`")
    }
    public func string(_ key: String) throws(ControlError) -> String {
        guard let v = json[key]?.stringValue else { throw missing(key, "a string") }
        return v
    }
    public func optionalString(_ key: String) -> String? { json[key]?.stringValue }
    public func int(_ key: String) throws(ControlError) -> Int64 {
        guard let v = json[key]?.intValue else { throw missing(key, "an integer") }
        return v
    }
    public func optionalInt(_ key: String) -> Int64? { json[key]?.intValue }
    public func double(_ key: String) throws(ControlError) -> Double {
        guard let v = json[key]?.doubleValue else { throw missing(key, "a number") }
        return v
    }
    public func bool(_ key: String) throws(ControlError) -> Bool {
        guard let v = json[key]?.boolValue else { throw missing(key, "a boolean") }
        return v
    }
    public func array(_ key: String) throws(ControlError) -> [JSON] {
        guard let v = json[key]?.arrayValue else { throw missing(key, "an array") }
        return v
    }
    public func strings(_ key: String) throws(ControlError) -> [String] { try array(key).compactMap(\.stringValue) }
    public func object(_ key: String) throws(ControlError) -> JSON {
        guard let v = json[key], case .object = v else { throw missing(key, "an object") }
        return v
    }
}

extension Array: ControlResult where Element: ControlResult {
    public init(decoding json: JSON) throws(ControlError) {
        guard let a = json.arrayValue else { throw ControlError(.failed, "the daemon's answer is not a list") }
        var out: [Element] = []
        for e in a { out.append(try Element(decoding: e)) }
        self = out
    }
    public var json: JSON { .array(map(\.json)) }
}
