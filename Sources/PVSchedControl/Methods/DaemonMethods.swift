/// `daemon.info`: who the daemon is and what it serves.
public enum DaemonInfo: ControlMethod {
    public static let name = "daemon.info"
    public static let access = ControlAccessLevel.readOnly
    public typealias Params = NoParams
    public struct Result: ControlResult, Equatable {
        /// The boost guardian now (nil: the daemon runs without one).
        public struct Guardian: Equatable, Sendable {
            public var state: String
            public var pid: Int32
            public var restarts: UInt64
            public var records: Int
            public init(state: String, pid: Int32, restarts: UInt64, records: Int) {
                self.state = state; self.pid = pid; self.restarts = restarts; self.records = records
            }
        }
        public var protocolVersion: Int64
        public var pid: Int32
        public var version: String
        public var revision: String
        public var vms: Int
        public var metrics: String?
        public var guardian: Guardian?
        /// The caller's role (`admin` or `reader`).
        public var caller: String
        public var methods: [String]
        public init(protocolVersion: Int64, pid: Int32, version: String, revision: String, vms: Int, metrics: String?,
                    guardian: Guardian?, caller: String, methods: [String]) {
            self.protocolVersion = protocolVersion; self.pid = pid; self.version = version; self.revision = revision; self.vms = vms
            self.metrics = metrics; self.guardian = guardian; self.caller = caller; self.methods = methods
        }
        public var json: JSON {
            ["protocol": .int(protocolVersion), "pid": JSON(pid), "version": .string(version), "revision": .string(revision),
             "vms": JSON(vms), "metrics": JSON(metrics), "caller": .string(caller), "methods": .array(methods.map { .string($0) }),
             "guardian": guardian.map { g in ["state": .string(g.state), "pid": JSON(g.pid), "restarts": JSON(g.restarts), "records": JSON(g.records)] } ?? .null]
        }
        public init(decoding json: JSON) throws(ControlError) {
            let r = try JSONReader(json, "daemon info")
            protocolVersion = try r.int("protocol"); pid = Int32(clamping: try r.int("pid"))
            version = r.optionalString("version") ?? "unknown"; revision = r.optionalString("revision") ?? "unknown"
            vms = Int(try r.int("vms")); metrics = r.optionalString("metrics"); caller = r.optionalString("caller") ?? "admin"
            methods = try r.strings("methods")
            if let g = json["guardian"], case .object = g {
                let gr = try JSONReader(g, "guardian")
                guardian = Guardian(state: try gr.string("state"), pid: Int32(clamping: try gr.int("pid")),
                                    restarts: UInt64(clamping: try gr.int("restarts")), records: Int(try gr.int("records")))
            }
        }
    }
}

/// `drivers.list`: the seed's `pvsched_available_drivers` sysctl.
public enum DriversList: ControlMethod {
    public static let name = "drivers.list"
    public static let access = ControlAccessLevel.readOnly
    public typealias Params = NoParams
    public typealias Result = [DriverSummary]
}

/// `drivers.set_default`: the driver of VMs with none assigned (null: none).
public enum DriversSetDefault: ControlMethod {
    public static let name = "drivers.set_default"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        public var name: String?
        public init(name: String?) { self.name = name }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            name = try p.optionalString("name")
            guard p.has("name") else { throw ControlError(.invalidParams, field: "params.name", "missing (a driver name, or null for none)") }
        }
        public var encoded: [String: JSON] { ["name": JSON(name)] }
    }
    public struct Result: ControlResult, Equatable {
        public var previous: String?
        public var defaultDriver: String?
        public init(previous: String?, defaultDriver: String?) { self.previous = previous; self.defaultDriver = defaultDriver }
        public var json: JSON { ["previous": JSON(previous), "default": JSON(defaultDriver)] }
        public init(decoding json: JSON) throws(ControlError) {
            previous = json["previous"]?.stringValue; defaultDriver = json["default"]?.stringValue
        }
    }
}

/// `bpf.load`: a BPF driver object into the running daemon.
public enum BPFLoad: ControlMethod {
    public static let name = "bpf.load"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        /// The ELF object, base64-encoded.
        public var object: String
        public var name: String?
        public init(object: String, name: String?) { self.object = object; self.name = name }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            object = try p.string("object", maxBytes: ControlProtocol.maxRequestBytes)
            name = try p.optionalString("name")
        }
        public var encoded: [String: JSON] { ["object": .string(object), "name": JSON(name)] }
    }
    public struct Result: ControlResult, Equatable {
        public var name: String
        public var protocolName: String
        public var version: String
        public var events: [String]
        public init(name: String, protocolName: String, version: String, events: [String]) {
            self.name = name; self.protocolName = protocolName; self.version = version; self.events = events
        }
        public var json: JSON {
            ["name": .string(name), "protocol": .string(protocolName), "version": .string(version), "events": .array(events.map { .string($0) })]
        }
        public init(decoding json: JSON) throws(ControlError) {
            let r = try JSONReader(json, "loaded driver")
            name = try r.string("name"); protocolName = try r.string("protocol"); version = try r.string("version")
            events = (try? r.strings("events")) ?? []
        }
    }
}

/// `bpf.unload`: a BPF driver out of the daemon (VMs using it move to the default with `force`).
public enum BPFUnload: ControlMethod {
    public static let name = "bpf.unload"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        public var name: String
        public var force: Bool
        public init(name: String, force: Bool) { self.name = name; self.force = force }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            name = try p.string("name"); force = try p.bool("force", default: false)
        }
        public var encoded: [String: JSON] { ["name": .string(name), "force": .bool(force)] }
    }
    public struct Result: ControlResult, Equatable {
        public var name: String
        public var moved: [String]
        public init(name: String, moved: [String]) { self.name = name; self.moved = moved }
        public var json: JSON { ["name": .string(name), "moved": .array(moved.map { .string($0) })] }
        public init(decoding json: JSON) throws(ControlError) {
            let r = try JSONReader(json, "unloaded driver")
            name = try r.string("name"); moved = (try? r.strings("moved")) ?? []
        }
    }
}

/// `thread.boost`: an operator's boost of one thread, undone when its time is up.
public enum ThreadBoost: ControlMethod {
    public static let name = "thread.boost"
    public static let access = ControlAccessLevel.ownThreads
    /// What a read-group member may ask (of a thread its own user runs).
    public static let readerLimits = (maxPriority: Int64(49), maxDurationMs: Int64(10_000))
    public struct Params: ControlParams, Equatable {
        public var tid: Int32
        public var priority: UInt8
        public var durationMs: UInt64
        public init(tid: Int32, priority: UInt8 = 10, durationMs: UInt64 = 10_000) {
            self.tid = tid; self.priority = priority; self.durationMs = durationMs
        }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            tid = Int32(try p.int("tid", in: 1...Int64(Int32.max)))
            priority = UInt8(try p.int("priority", in: 1...99, default: 10))
            durationMs = UInt64(try p.int("durationMs", in: 1...3_600_000, default: 10_000))
        }
        public var encoded: [String: JSON] { ["tid": JSON(tid), "priority": JSON(priority), "durationMs": JSON(durationMs)] }
    }
    public struct Result: ControlResult, Equatable {
        public var tid: Int32
        public var boosted: String
        public var durationMs: UInt64
        public init(tid: Int32, boosted: String, durationMs: UInt64) { self.tid = tid; self.boosted = boosted; self.durationMs = durationMs }
        public var json: JSON { ["tid": JSON(tid), "boosted": .string(boosted), "durationMs": JSON(durationMs)] }
        public init(decoding json: JSON) throws(ControlError) {
            let r = try JSONReader(json, "boost")
            tid = Int32(clamping: try r.int("tid")); boosted = try r.string("boosted"); durationMs = UInt64(clamping: try r.int("durationMs"))
        }
    }
}

/// `thread.restore`: ends an operator boost now.
public enum ThreadRestore: ControlMethod {
    public static let name = "thread.restore"
    public static let access = ControlAccessLevel.ownThreads
    public struct Params: ControlParams, Equatable {
        public var tid: Int32
        public init(tid: Int32) { self.tid = tid }
        public init(decoding p: inout RequestParams) throws(ControlError) { tid = Int32(try p.int("tid", in: 1...Int64(Int32.max))) }
        public var encoded: [String: JSON] { ["tid": JSON(tid)] }
    }
    public struct Result: ControlResult, Equatable {
        public var tid: Int32
        public init(tid: Int32) { self.tid = tid }
        public var json: JSON { ["tid": JSON(tid), "restored": true] }
        public init(decoding json: JSON) throws(ControlError) { tid = Int32(clamping: try JSONReader(json, "restore").int("tid")) }
    }
}
