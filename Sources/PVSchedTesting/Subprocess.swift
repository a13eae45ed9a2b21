import Foundation

/// A command run to completion with its output captured (for tests that drive
/// the `pvsched` binary like a user).
public struct CommandResult: Sendable {
    public let status: Int32
    /// Whether it ended by a signal (a crash) rather than an exit.
    public let signaled: Bool
    public let stdout: String
    public let stderr: String
}

/// Helpers to find and run the built `pvsched` executable.
public enum PVSchedBinary {
    /// The `pvsched` executable beside the test bundle (`swift build` puts both in
    /// the same products directory), or nil if it was not built.
    public static var path: String? { path(named: "pvsched") }

    /// The executable `name` beside the test bundle or the running executable (or up
    /// to three directories above either), or nil if it was not built.
    public static func path(named name: String) -> String? {
        var dirs = [URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()]
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            dirs.append(URL(fileURLWithPath: exe).deletingLastPathComponent())
        }
        for start in dirs {
            var dir = start
            for _ in 0..<4 {
                let candidate = dir.appendingPathComponent(name).path
                if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
                dir = dir.deletingLastPathComponent()
            }
        }
        return nil
    }

    /// Runs `executable` with `arguments` and waits (at most `timeout` seconds, then kills it).
    public static func run(_ executable: String, _ arguments: [String], timeout: Double = 60) throws -> CommandResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let outData = CapturedOutput()
        let errData = CapturedOutput()
        let t1 = Thread { outData.set(out.fileHandleForReading.readDataToEndOfFile()) }
        let t2 = Thread { errData.set(err.fileHandleForReading.readDataToEndOfFile()) }
        t1.start(); t2.start()
        let deadline = Date().addingTimeInterval(timeout)
        while p.isRunning && Date() < deadline { usleep(10_000) }
        if p.isRunning { p.terminate(); usleep(200_000); if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        p.waitUntilExit()
        while !outData.done || !errData.done { usleep(1000) }
        return CommandResult(status: p.terminationStatus, signaled: p.terminationReason == .uncaughtSignal,
                             stdout: String(decoding: outData.value, as: UTF8.self),
                             stderr: String(decoding: errData.value, as: UTF8.self))
    }
}

/// Output a reader thread fills in.
// @unchecked Sendable: every access to the fields goes through `lock`.
final class CapturedOutput: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    private var finished = false
    func set(_ d: Data) { lock.lock(); data = d; finished = true; lock.unlock() }
    var done: Bool { lock.lock(); defer { lock.unlock() }; return finished }
    var value: Data { lock.lock(); defer { lock.unlock() }; return data }
}
