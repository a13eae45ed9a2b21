import Foundation
import PVSchedControl

/// `pvsched daemon` run as a separate process on a temporary socket and lock, for
/// the tests and the lab's benchmarks that need the real service (SIGTERM, then
/// SIGKILL, when this object goes; and stopping by itself when this process ends,
/// `--exit-with`, however it ends).
public final class DaemonProcess: @unchecked Sendable {
    // @unchecked Sendable: the process and pipe are driven by one caller.
    public let binary: String
    public let socket: String
    public let lock: String
    /// Its own configuration file (never the host's /etc/pvsched) and state file.
    public let configFile: String
    public let stateFile: String
    public let arguments: [String]
    public private(set) var process = Process()
    public private(set) var stderr = Pipe()

    public var pid: Int32 { process.processIdentifier }

    /// Starts a daemon; `config` is the text of its configuration file.
    public init(metrics: Bool = false, logLevel: String = "warning", config: String = "", extraArguments: [String] = []) throws {
        guard let binary = PVSchedBinary.path else { throw StandInError("the pvsched executable is not built (run `swift build`)") }
        self.binary = binary
        Self.removeFilesOfEndedStarters()
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        socket = "/tmp/pvsched-it-\(tag).sock"
        lock = "/tmp/pvsched-it-\(tag).lock"
        configFile = "/tmp/pvsched-it-\(tag).conf"
        stateFile = "/tmp/pvsched-it-\(tag).state.json"
        // libvirt's domains are the libvirt tests' daemons' business alone (a test's own
        // configuration may say `libvirt = on`: a later line wins).
        try ("libvirt = off\n" + config).write(toFile: configFile, atomically: true, encoding: .utf8)
        arguments = ["daemon", "--config", configFile, "--socket", socket, "--lock", lock, "--log-level", logLevel,
                     "--state-file", stateFile, "--exit-with", "\(getpid())"] + (metrics ? ["--metrics", "127.0.0.1:0"] : []) + extraArguments
        try start()
    }

    /// Removes the files of starters that were killed (their `deinit` never ran; their
    /// daemons stopped with them, `--exit-with`): `/tmp/pvsched-it-PID-*` of a process
    /// that no longer exists, untouched for a minute.
    public static func removeFilesOfEndedStarters(directory: String = "/tmp", now: Date = Date()) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return }
        for name in names where name.hasPrefix("pvsched-it-") {
            guard let pid = Int32(name.dropFirst("pvsched-it-".count).prefix { $0 != "-" }), pid > 0, pid != getpid(),
                  kill(pid, 0) != 0, errno == ESRCH else { continue }
            let path = directory + "/" + name
            var st = stat()
            guard lstat(path, &st) == 0, now.timeIntervalSince1970 - Double(st.st_mtim.tv_sec) > 60 else { continue }
            unlink(path)
        }
    }

    /// Starts the daemon (again, once stopped) and waits until it answers.
    public func start(environment: [String: String]? = nil) throws {
        process = Process()
        stderr = Pipe()
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = arguments
        if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if let c = try? ControlClient(path: socket), (try? c.call(DaemonInfo.self)) != nil { return }
            guard process.isRunning else { break }
            usleep(20_000)
        }
        throw StandInError("the daemon did not come up: \(String(decoding: stderr.fileHandleForReading.availableData, as: UTF8.self))")
    }

    /// Stops the daemon with `signal` (SIGKILL too after 10 s) and returns its exit status.
    @discardableResult
    public func stop(signal: Int32 = SIGTERM) -> Int32 {
        guard process.isRunning else { return process.terminationStatus }
        kill(process.processIdentifier, signal)
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// Stops the daemon with `signal` and starts it again with the same arguments
    /// (socket, configuration, state file), as a service manager restarts it.
    public func restart(signal: Int32 = SIGTERM, environment: [String: String]? = nil) throws {
        stop(signal: signal)
        try start(environment: environment)
    }

    /// What the daemon wrote to stderr so far (call once it stopped).
    public func stopAndReadLog() -> String {
        stop()
        return String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    }

    deinit {
        stop()
        for f in [lock, socket, configFile, stateFile] { unlink(f) }  // a daemon killed by SIGKILL leaves the socket
    }

    /// Runs `pvsched ARGS --socket S`.
    public func cli(_ args: [String], socketFlag: Bool = true) throws -> CommandResult {
        try PVSchedBinary.run(binary, args + (socketFlag ? ["--socket", socket] : []))
    }

    public func client() throws -> ControlClient { try ControlClient(path: socket) }

    /// VM `name` as `vm.list` shows it (nil: not served).
    public func vm(_ name: String) throws -> VMSummary? {
        try client().call(VMList.self).first { $0.name == name }
    }

    /// The names of the VMs served (for failure messages; empty when the daemon does not answer).
    public var vmNames: [String] { (try? client().call(VMList.self).map(\.name)) ?? [] }

    /// Boosts applied so far to VM `name`'s vCPUs (`vm.stats`).
    public func boosts(_ name: String) throws -> Int64 {
        let s = try client().call(VMStats.self, VMStats.Params(vm: name))
        return s.vms.first.map { $0.vcpus.reduce(0) { $0 + Int64(clamping: $1.boosts) } } ?? 0
    }

    /// The vCPU threads of `vm` and whether each is boosted.
    public func vcpus(_ vm: String) throws -> [(tid: Int32, boosted: Bool)] {
        let v = try client().call(VMList.self).first { $0.name == vm }
        return (v?.vcpus ?? []).map { ($0.thread ?? 0, $0.boosted) }
    }
}
