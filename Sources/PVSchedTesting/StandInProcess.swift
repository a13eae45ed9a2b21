import Foundation

/// A `pvsched-standin` process (see `StandInGuest`), started by a test or the lab,
/// optionally as another user, and driven through its standard input.
public final class StandInProcess: @unchecked Sendable {
    // @unchecked Sendable: one caller drives it; the pipes are used from that caller only.
    public let process = Process()
    private let input = Pipe()
    private let output = Pipe()
    private var buffered: [UInt8] = []
    /// The region file, when it made one (removed when this object goes).
    public let region: String?
    /// vCPU i's thread id at index i, as started.
    public private(set) var threads: [Int32] = []

    public var pid: Int32 { process.processIdentifier }
    /// The directory of the link it runs through when it passes for another program.
    private let linkDirectory: String?

    /// Starts `pvsched-standin ARGUMENTS` (found beside the test bundle or the
    /// running executable), as `user` (a uid, through setpriv) when given, and waits
    /// for it to be ready. With `runAs`, it runs through a link of that name (its
    /// process name then is that name: `qemu-system-x86_64` passes for QEMU).
    public init(vcpus: Int = 2, region: String? = nil, arguments: [String] = [], asUser uid: UInt32? = nil,
                runAs name: String? = nil) throws {
        guard var binary = Self.binaryPath else { throw StandInError("pvsched-standin is not built (run `swift build`)") }
        self.region = region
        if let name {
            let dir = "/tmp/pvsched-standin-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            guard mkdir(dir, 0o755) == 0, symlink(binary, "\(dir)/\(name)") == 0 else {
                throw StandInError("cannot make the link \(dir)/\(name)")
            }
            linkDirectory = dir
            binary = "\(dir)/\(name)"
        } else {
            linkDirectory = nil
        }
        var args = ["--vcpus", "\(vcpus)"] + (region.map { ["--region", $0] } ?? []) + arguments
        if let uid {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            args = ["--reuid=\(uid)", "--regid=\(uid)", "--clear-groups", "--", binary] + args
        } else {
            process.executableURL = URL(fileURLWithPath: binary)
        }
        process.arguments = args
        process.standardInput = input
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        let ready = try readLine(timeout: 20)
        guard ready.hasPrefix("ready") else { throw StandInError("pvsched-standin did not start: '\(ready)'") }
        threads = Array(ready.split(separator: " ").drop { $0 != "tids" }.dropFirst().compactMap { Int32($0) })
    }

    /// Sends one command and returns its answer line.
    @discardableResult
    public func command(_ text: String, timeout: Double = 10) throws -> String {
        input.fileHandleForWriting.write(Data((text + "\n").utf8))
        return try readLine(timeout: timeout)
    }

    private func readLine(timeout: Double) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        let fd = output.fileHandleForReading.fileDescriptor
        while Date() < deadline {
            if let nl = buffered.firstIndex(of: 10) {
                let line = String(decoding: buffered[..<nl], as: UTF8.self)
                buffered.removeSubrange(...nl)
                return line
            }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) >= 0 else { continue }
            if p.revents & Int16(POLLIN | POLLHUP) != 0 {
                var chunk = [UInt8](repeating: 0, count: 4096)
                let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { throw StandInError("pvsched-standin ended") }
                buffered += chunk[..<n]
            }
        }
        throw StandInError("pvsched-standin did not answer in \(timeout) s")
    }

    /// Ends the process (politely, then SIGKILL).
    public func stop() {
        guard process.isRunning else { return }
        _ = try? command("quit", timeout: 2)
        let deadline = Date().addingTimeInterval(2)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }

    deinit {
        stop()
        if let region { unlink(region) }
        if let linkDirectory { try? FileManager.default.removeItem(atPath: linkDirectory) }
    }

    /// The binary beside the test bundle (swift build puts every product together)
    /// or beside the running executable.
    public static var binaryPath: String? { PVSchedBinary.path(named: "pvsched-standin") }
}
