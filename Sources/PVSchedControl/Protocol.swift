/// The pvsched control protocol, version 1 (docs/control-api.md is the schema):
/// newline-delimited JSON over a Unix socket, one request per line, one response
/// line per request, in order.
///
/// Request:  `{"pvsched": 1, "id": 7, "method": "vm.list", "params": {...}}`
/// Response: `{"pvsched": 1, "id": 7, "ok": true, "result": ...}` or
///           `{"pvsched": 1, "id": 7, "ok": false, "error": {"code": ..., "field": ..., "message": ...}}`
public enum ControlProtocol {
    /// The protocol version this build speaks.
    public static let version: Int64 = 1
    /// Largest request line accepted (a BPF object travels base64-encoded inside one).
    public static let maxRequestBytes = 1 << 20
    /// The default socket path.
    public static let defaultSocketPath = "/run/pvsched/control.sock"
    /// Every method, for listings and the schema test (`ControlMethods.all`).
    public static var methods: [String] { ControlMethods.names }
}

/// A control error: a stable code, the request field it is about, and a message.
public struct ControlError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Stable error codes (documented in the schema).
    public enum Code: String, Sendable {
        case parseError = "parse_error"
        case invalidRequest = "invalid_request"
        case unsupportedVersion = "unsupported_version"
        case unknownMethod = "unknown_method"
        case invalidParams = "invalid_params"
        case notFound = "not_found"
        case conflict
        case failed
        case tooLarge = "too_large"
        case permissionDenied = "permission_denied"
        case busy
    }
    public let code: Code
    /// The request field (e.g. `params.vm`), or empty when the request as a whole is at fault.
    public let field: String
    public let message: String

    public init(_ code: Code, field: String = "", _ message: String) {
        self.code = code; self.field = field; self.message = message
    }

    public var description: String { field.isEmpty ? message : "\(field): \(message)" }

    public var json: JSON { ["code": .string(code.rawValue), "field": .string(field), "message": .string(message)] }

    public init?(json: JSON) {
        guard let c = json["code"]?.stringValue, let message = json["message"]?.stringValue else { return nil }
        self.init(Code(rawValue: c) ?? .failed, field: json["field"]?.stringValue ?? "", message)
    }
}

/// A parsed, envelope-checked request. `params` are checked by each method.
public struct ControlRequest: Sendable {
    public let id: JSON
    public let method: String
    public let params: RequestParams

    /// Parses one request line: JSON, an object, `pvsched` == 1, a known method,
    /// `params` an object (or absent), `id` an integer or a short string (or absent).
    public static func parse(_ line: some Collection<UInt8>) -> Result<ControlRequest, ControlErrorWithID> {
        guard line.count <= ControlProtocol.maxRequestBytes else {
            return .failure(.init(id: .null, error: ControlError(.tooLarge, "request is \(line.count) bytes, the limit is \(ControlProtocol.maxRequestBytes)")))
        }
        let doc: JSON
        do { doc = try JSON.parse(line) } catch {
            return .failure(.init(id: .null, error: ControlError(.parseError, "the request is not valid JSON")))
        }
        guard case .object(let o) = doc else {
            return .failure(.init(id: .null, error: ControlError(.invalidRequest, "the request must be a JSON object")))
        }
        var id = JSON.null
        if let raw = o["id"] {
            switch raw {
            case .int, .null: id = raw
            case .string(let s) where s.utf8.count <= 128: id = raw
            default:
                return .failure(.init(id: .null, error: ControlError(.invalidRequest, field: "id", "must be an integer or a string of at most 128 bytes")))
            }
        }
        func fail(_ e: ControlError) -> Result<ControlRequest, ControlErrorWithID> { .failure(.init(id: id, error: e)) }
        for key in o.keys where !["pvsched", "id", "method", "params"].contains(key) {
            return fail(ControlError(.invalidRequest, field: key, "unknown field"))
        }
        guard let v = o["pvsched"] else { return fail(ControlError(.invalidRequest, field: "pvsched", "missing (the protocol version, 1)")) }
        guard v.intValue == ControlProtocol.version else {
            return fail(ControlError(.unsupportedVersion, field: "pvsched", "this daemon speaks protocol version \(ControlProtocol.version)"))
        }
        guard let method = o["method"]?.stringValue else { return fail(ControlError(.invalidRequest, field: "method", "missing or not a string")) }
        guard ControlMethods.access(of: method) != nil else {
            return fail(ControlError(.unknownMethod, field: "method", "unknown method '\(method.prefix(64))'"))
        }
        let params: [String: JSON]
        switch o["params"] {
        case nil, .null?: params = [:]
        case .object(let p)?: params = p
        default: return fail(ControlError(.invalidParams, field: "params", "must be an object"))
        }
        return .success(ControlRequest(id: id, method: method, params: RequestParams(params)))
    }

    public init(id: JSON, method: String, params: RequestParams) { self.id = id; self.method = method; self.params = params }

    /// The request as one line (without the newline).
    public static func encode(id: Int64, method: String, params: [String: JSON]) -> [UInt8] {
        JSON.object(["pvsched": .int(ControlProtocol.version), "id": .int(id), "method": .string(method),
                     "params": .object(params)]).encoded
    }
}

/// An error with the id of the request it answers (null when the id was unreadable).
public struct ControlErrorWithID: Error, Sendable {
    public let id: JSON
    public let error: ControlError
}

/// The encoding of responses.
public enum ControlResponse {
    public static func success(id: JSON, result: JSON) -> [UInt8] {
        JSON.object(["pvsched": .int(ControlProtocol.version), "id": id, "ok": true, "result": result]).encoded
    }
    public static func failure(id: JSON, error: ControlError) -> [UInt8] {
        JSON.object(["pvsched": .int(ControlProtocol.version), "id": id, "ok": false, "error": error.json]).encoded
    }
}

/// A method's parameters with typed, range-checked accessors whose errors name
/// the field (`params.NAME`). `finish()` rejects fields the method did not read.
public struct RequestParams: Sendable {
    private let values: [String: JSON]
    private var read: Set<String> = []

    public init(_ values: [String: JSON]) { self.values = values }

    private func field(_ name: String) -> String { "params.\(name)" }

    public mutating func string(_ name: String, maxBytes: Int = 256) throws(ControlError) -> String {
        guard let s = try optionalString(name, maxBytes: maxBytes) else { throw ControlError(.invalidParams, field: field(name), "missing") }
        return s
    }

    public mutating func optionalString(_ name: String, maxBytes: Int = 256) throws(ControlError) -> String? {
        read.insert(name)
        switch values[name] {
        case nil, .null?: return nil
        case .string(let s)?:
            guard s.utf8.count <= maxBytes else { throw ControlError(.invalidParams, field: field(name), "longer than \(maxBytes) bytes") }
            return s
        default: throw ControlError(.invalidParams, field: field(name), "must be a string")
        }
    }

    public mutating func int(_ name: String, in range: ClosedRange<Int64>, default def: Int64? = nil) throws(ControlError) -> Int64 {
        read.insert(name)
        switch values[name] {
        case nil, .null?:
            guard let def else { throw ControlError(.invalidParams, field: field(name), "missing") }
            return def
        case .int(let i)?:
            guard range.contains(i) else { throw ControlError(.invalidParams, field: field(name), "\(i) is outside \(range.lowerBound)...\(range.upperBound)") }
            return i
        default: throw ControlError(.invalidParams, field: field(name), "must be an integer in \(range.lowerBound)...\(range.upperBound)")
        }
    }

    public mutating func optionalInt(_ name: String, in range: ClosedRange<Int64>) throws(ControlError) -> Int64? {
        if values[name] == nil || values[name] == .null { read.insert(name); return nil }
        return try int(name, in: range)
    }

    public mutating func optionalDouble(_ name: String, in range: ClosedRange<Double>) throws(ControlError) -> Double? {
        read.insert(name)
        switch values[name] {
        case nil, .null?: return nil
        case let v?:
            guard let d = v.doubleValue, d.isFinite else { throw ControlError(.invalidParams, field: field(name), "must be a number") }
            guard range.contains(d) else { throw ControlError(.invalidParams, field: field(name), "\(d) is outside \(range.lowerBound)...\(range.upperBound)") }
            return d
        }
    }

    public mutating func bool(_ name: String, default def: Bool) throws(ControlError) -> Bool {
        read.insert(name)
        switch values[name] {
        case nil, .null?: return def
        case .bool(let b)?: return b
        default: throw ControlError(.invalidParams, field: field(name), "must be true or false")
        }
    }

    public mutating func intArray(_ name: String, count: ClosedRange<Int>, in range: ClosedRange<Int64>) throws(ControlError) -> [Int64] {
        read.insert(name)
        guard case .array(let a)? = values[name] else {
            throw ControlError(.invalidParams, field: field(name), values[name] == nil ? "missing" : "must be an array of integers")
        }
        guard count.contains(a.count) else {
            throw ControlError(.invalidParams, field: field(name), "needs \(count.lowerBound)...\(count.upperBound) entries, got \(a.count)")
        }
        var out: [Int64] = []
        for (i, v) in a.enumerated() {
            guard case .int(let x) = v, range.contains(x) else {
                throw ControlError(.invalidParams, field: "\(field(name))[\(i)]", "must be an integer in \(range.lowerBound)...\(range.upperBound)")
            }
            out.append(x)
        }
        return out
    }

    /// Like `intArray`, nil when the request does not carry `name` (or carries null).
    public mutating func optionalIntArray(_ name: String, count: ClosedRange<Int>, in range: ClosedRange<Int64>) throws(ControlError) -> [Int64]? {
        if values[name] == nil || values[name] == .null { read.insert(name); return nil }
        return try intArray(name, count: count, in: range)
    }

    /// Whether the request carried `name` (even as null).
    public func has(_ name: String) -> Bool { values[name] != nil }

    /// Rejects any parameter the method does not know.
    public func finish() throws(ControlError) {
        for key in values.keys.sorted() where !read.contains(key) {
            throw ControlError(.invalidParams, field: field(String(key.prefix(64))), "unknown parameter")
        }
    }
}
