import Foundation
import PVSchedControl
import PVSchedCore

/// Why a configuration file was refused: the file, the line and the key at fault.
public struct ConfigError: Error, Equatable, Sendable, CustomStringConvertible {
    public let file: String
    public let line: Int
    public let key: String?
    public let message: String
    public init(file: String, line: Int, key: String?, _ message: String) {
        self.file = file; self.line = line; self.key = key; self.message = message
    }
    public var description: String {
        let at = line > 0 ? "\(file):\(line)" : file
        return key.map { "\(at): \($0): \(message)" } ?? "\(at): \(message)"
    }
}

/// The daemon's configuration: `/etc/pvsched/pvsched.conf`, then every
/// `/etc/pvsched/conf.d/*.conf` in name order (a later file's key wins; `bpf-driver`
/// adds). One `key = value` per line, `#` starts a comment. Every key is
/// documented in docs/configuration.md and in the shipped file; an unknown key or
/// a bad value is an error that names the file, the line and the key.
public struct DaemonConfig: Equatable, Sendable {
    public var socket = ControlProtocol.defaultSocketPath
    public var readGroup: String?
    public var metrics: String?
    public var logLevel = "info"
    public var guardian = true
    /// The driver of VMs given none (nil: the built-in default, `latency-boost`).
    public var driver: String?
    /// The boost class of attached VMs given none.
    public var boost: SchedulingParameters?
    public var protectHostPriority: UInt8? = 50
    /// The governor of VMs given none, over the built-in defaults.
    public var governor = GovernorChange()
    /// BPF drivers loaded at start (and on reload when new): name and object file.
    public var bpfDrivers: [BPFDriverEntry] = []
    /// Attach, on their own, QEMU processes that map a pvsched region (`/dev/shm/pvsched-*`).
    public var discover = false
    /// Raise the cgroup weight of a vCPU thread alone in its cgroup (libvirt's) while
    /// it is boosted in a fair class (`CgroupWeights`).
    public var cgroupWeights = true
    /// Hold a boost through a halt when the guest's next deadline is at most this far
    /// off (µs; 0: never), see `VCPULane.hold`.
    public var holdThroughHaltsUs: UInt64 = 0
    /// libvirt's URI whose domains are followed (nil: off).
    public var libvirt: String? = "qemu:///system"
    /// Where attached VMs are recorded, to serve them again after a restart.
    public var stateFile = "/run/pvsched/state.json"

    /// A BPF driver the configuration loads.
    public struct BPFDriverEntry: Equatable, Sendable {
        public var name: String
        public var path: String
    }

    public init() {}

    public static let defaultPath = "/etc/pvsched/pvsched.conf"

    /// The keys, with what each takes (for errors and `config check`).
    public static let keys: [String: String] = [
        "socket": "the control socket's path",
        "read-group": "a group name",
        "metrics": "HOST:PORT",
        "log-level": "trace, debug, info, notice, warning, error or critical",
        "guardian": "yes or no",
        "driver": "a driver's name",
        "boost": BoostSettings.classSyntax,
        "protect-host-priority": "0-99",
        "critical-budget-us": "1-\(GovernorChange.maxUs)",
        "general-budget-us": "1-\(GovernorChange.maxUs)",
        "throttle-us": "0-\(GovernorChange.maxUs)",
        "share-window-us": "1-\(GovernorChange.maxUs)",
        "vm-share": "0-1",
        "repayment-factor": "\(Int(GovernorConfig.repaymentFactorRange.lowerBound))-\(Int(GovernorConfig.repaymentFactorRange.upperBound))",
        "max-repayment-us": "\(GovernorConfig.maxRepaymentUsRange.lowerBound)-\(GovernorConfig.maxRepaymentUsRange.upperBound)",
        "unlimited": "yes or no",
        "bpf-driver": "NAME:/path/to/object.o (repeatable)",
        "libvirt": "off, on (qemu:///system) or a connection URI",
        "discover": "yes or no",
        "cgroup-weights": "yes or no",
        "hold-through-halts-us": "0-\(DeadlineSchedule.maxHoldNs / 1000) (0: off)",
        "state-file": "a path",
    ]

    /// The governor keys and the request fields they stand for.
    static let governorFields = ["critical-budget-us": "criticalBudgetUs", "general-budget-us": "generalBudgetUs",
                                 "throttle-us": "throttleWindowUs", "share-window-us": "shareWindowUs", "vm-share": "maxVMShare",
                                 "repayment-factor": "repaymentFactor", "max-repayment-us": "maxRepaymentUs", "unlimited": "unlimited"]

    /// Reads `path` and, when it is the main file, `conf.d/*.conf` beside it. A
    /// missing main file is the defaults (when `mustExist` is false).
    public static func load(path: String = defaultPath, mustExist: Bool = false) throws(ConfigError) -> DaemonConfig {
        var config = DaemonConfig()
        var files: [String] = []
        if FileManager.default.fileExists(atPath: path) { files.append(path) }
        else if mustExist { throw ConfigError(file: path, line: 0, key: nil, "no such file") }
        let dir = (path as NSString).deletingLastPathComponent + "/conf.d"
        if let names = try? FileManager.default.contentsOfDirectory(atPath: dir) {
            files += names.filter { $0.hasSuffix(".conf") && !$0.hasPrefix(".") }.sorted().map { "\(dir)/\($0)" }
        }
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else {
                throw ConfigError(file: file, line: 0, key: nil, "cannot be read")
            }
            guard data.count <= 1 << 20 else { throw ConfigError(file: file, line: 0, key: nil, "larger than 1 MiB") }
            try config.apply(text: data, file: file)
        }
        return config
    }

    /// Applies the lines of one file over this configuration.
    public mutating func apply(text data: Data, file: String) throws(ConfigError) {
        guard let text = String(data: data, encoding: .utf8) else {
            throw ConfigError(file: file, line: 0, key: nil, "not UTF-8 text")
        }
        var governorParams: [String: JSON] = governor.encoded
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let lineNo = n + 1
            var line = Substring(raw)
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty { continue }
            guard let eq = trimmed.firstIndex(of: "=") else {
                throw ConfigError(file: file, line: lineNo, key: nil, "expected `key = value`, got '\(String(trimmed.prefix(64)).escapedForDisplay)'")
            }
            let key = trimmed[..<eq].trimmingCharacters(in: .whitespaces)
            let value = trimmed[trimmed.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            func fail(_ message: String) -> ConfigError {
                ConfigError(file: file, line: lineNo, key: key.escapedForDisplay, message)
            }
            guard let expects = Self.keys[key] else {
                throw ConfigError(file: file, line: lineNo, key: String(key.prefix(64)).escapedForDisplay,
                                  "unknown key (keys: \(Self.keys.keys.sorted().joined(separator: ", ")))")
            }
            guard !value.isEmpty, value.utf8.count <= 4096, value.unicodeScalars.allSatisfy({ $0.value >= 0x20 && $0.value != 0x7F }) else {
                throw fail("expects \(expects), got an empty or unprintable value")
            }
            func yesNo() throws(ConfigError) -> Bool {
                switch value.lowercased() {
                case "yes", "true", "on", "1": return true
                case "no", "false", "off", "0": return false
                default: throw fail("expects yes or no, got '\(String(value.prefix(64)).escapedForDisplay)'")
                }
            }
            switch key {
            case "socket":
                guard value.hasPrefix("/"), value.utf8.count < 108 else { throw fail("expects an absolute path of at most 107 bytes") }
                socket = value
            case "read-group": readGroup = value
            case "metrics":
                guard MetricsServer.parseAddress(value) != nil else { throw fail("expects HOST:PORT with a port in 0...65535") }
                metrics = value
            case "log-level":
                guard ["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(value) else { throw fail("expects \(expects)") }
                logLevel = value
            case "guardian": guardian = try yesNo()
            case "driver":
                guard (try? DriverName.validate(value)) != nil else { throw fail("expects a driver name (letters, digits, '.', '_', '-')") }
                driver = value
            case "boost":
                guard let c = BoostSettings.parseClass(value) else { throw fail("expects \(expects)") }
                boost = c
            case "protect-host-priority":
                guard let v = UInt8(value), v <= 99 else { throw fail("expects 0-99") }
                protectHostPriority = v == 0 ? nil : v
            case let k where Self.governorFields[k] != nil:
                let field = Self.governorFields[k]!
                if k == "unlimited" { governorParams[field] = .bool(try yesNo()) }
                else if let i = Int64(value) { governorParams[field] = .int(i) }
                else if let d = Double(value), d.isFinite { governorParams[field] = .double(d) }
                else { throw fail("expects a number, \(expects)") }
                var p = RequestParams(governorParams)
                do throws(ControlError) { governor = try GovernorChange(decoding: &p) } catch {
                    throw fail("expects \(expects): \(error.message)")
                }
            case "bpf-driver":
                guard let colon = value.firstIndex(of: ":") else { throw fail("expects NAME:/path/to/object.o") }
                let name = String(value[..<colon]), path = String(value[value.index(after: colon)...])
                guard (try? DriverName.validate(name)) != nil else { throw fail("the driver name may contain only letters, digits, '.', '_' and '-'") }
                guard path.hasPrefix("/") else { throw fail("the object file must be an absolute path") }
                bpfDrivers.removeAll { $0.name == name }
                bpfDrivers.append(BPFDriverEntry(name: name, path: path))
            case "libvirt":
                switch value.lowercased() {
                case "off", "no": libvirt = nil
                case "on", "yes": libvirt = "qemu:///system"
                default:
                    guard value.contains(":///") || value.contains("://"), value.utf8.count <= 256 else {
                        throw fail("expects off, on or a connection URI such as qemu:///system")
                    }
                    libvirt = value
                }
            case "discover": discover = try yesNo()
            case "cgroup-weights": cgroupWeights = try yesNo()
            case "hold-through-halts-us":
                guard let v = UInt64(value), v <= DeadlineSchedule.maxHoldNs / 1000 else { throw fail("expects \(expects)") }
                holdThroughHaltsUs = v
            case "state-file":
                guard value.hasPrefix("/") else { throw fail("expects an absolute path") }
                stateFile = value
            default: throw fail("unknown key")
            }
        }
    }

    /// The lines of a file that sets every key to its value here (`config check` prints it).
    public var rendered: String {
        var out: [String] = ["socket = \(socket)"]
        if let readGroup { out.append("read-group = \(readGroup)") }
        if let metrics { out.append("metrics = \(metrics)") }
        out.append("log-level = \(logLevel)")
        out.append("guardian = \(guardian ? "yes" : "no")")
        out.append("driver = \(driver ?? "latency-boost")")
        if let boost { out.append("boost = \(BoostSettings.classText(boost))") }
        out.append("protect-host-priority = \(protectHostPriority.map { "\($0)" } ?? "0")")
        for (key, field) in Self.governorFields.sorted(by: { $0.key < $1.key }) {
            if let v = governor.encoded[field] { out.append("\(key) = \(String(decoding: v.encoded, as: UTF8.self))") }
        }
        for b in bpfDrivers { out.append("bpf-driver = \(b.name):\(b.path)") }
        out.append("libvirt = \(libvirt ?? "off")")
        out.append("discover = \(discover ? "yes" : "no")")
        out.append("cgroup-weights = \(cgroupWeights ? "yes" : "no")")
        out.append("hold-through-halts-us = \(holdThroughHaltsUs)")
        out.append("state-file = \(stateFile)")
        return out.joined(separator: "\n")
    }
}

/// Names of drivers as operators give them (the same rule as VM names).
enum DriverName {
    static func validate(_ name: String) throws {
        guard !name.isEmpty, name.utf8.count <= 64,
              name.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D })
        else { throw ConfigError(file: "", line: 0, key: nil, "bad name") }
    }
}
