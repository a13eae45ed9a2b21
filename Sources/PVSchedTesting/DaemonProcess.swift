import Foundation
import PVSchedControl

/// `pvsched daemon` run as a separate process on a temporary socket and lock, for
/// the tests and the lab's benchmarks that need the real service (SIGTERM, then
/// SIGKILL, when this object goes).
public final class DaemonProcess: @unchecked Sendable {
    // @unchecked Sendable: the process and pipe are driven by one caller.
    public let binary: String
    public let socket: String
    public let lock: String
    public let process = Process()
    public let stderr = Pipe()

    public var pid: Int32 { process.processIdentifier }

    public init(metrics: Bool = false, logLevel: String = "warning", extraArguments: [String] = []) throws {
        guard let binary = PVSchedBinary.path else { throw StandInError("the pvsched executable is not built (run `swift build`)") }
        self.binary = binary
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        socket = "/tmp/pvsched-it-\(tag).sock"
        lock = "/tmp/pvsched-it-\(tag).lock"
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["daemon", "--socket", socket, "--lock", lock, "--log-level", logLevel]
            + (metrics ? ["--metrics", "127.0.0.1:0"] : []) + extraArguments
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if let c = try? ControlClient(path: socket), (try? c.call("daemon.info")) != nil { return }
            guard process.isRunning else { break }
            usleep(20_000)
        }
        throw StandInError("the daemon did not come up: \(String(decoding: stderr.fileHandleForReading.availableData, as: UTF8.self))")
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            let deadline = Date().addingTimeInterval(10)
            while process.isRunning && Date() < deadline { usleep(10_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
            process.waitUntilExit()
        }
        unlink(lock)
        unlink(socket)  // a daemon killed by SIGKILL leaves it
    }

    /// Runs `pvsched ARGS --socket S`.
    public func cli(_ args: [String], socketFlag: Bool = true) throws -> CommandResult {
        try PVSchedBinary.run(binary, args + (socketFlag ? ["--socket", socket] : []))
    }

    public func client() throws -> ControlClient { try ControlClient(path: socket) }

    /// The vCPU threads of `vm` and whether each is boosted.
    public func vcpus(_ vm: String) throws -> [(tid: Int32, boosted: Bool)] {
        let list = try client().call("vm.list")
        let v = list.arrayValue?.first { $0["name"]?.stringValue == vm }
        return (v?["vcpus"]?.arrayValue ?? []).map { (Int32($0["thread"]?.intValue ?? 0), $0["boosted"] == true) }
    }
}
