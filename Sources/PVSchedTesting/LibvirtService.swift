import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A libvirtd for tests and the lab: the one that runs already (a service manager's),
/// or `virtlogd` and `libvirtd` started here when none answers (the facts of this
/// machine: no systemd as PID 1). `stop()` stops only what it started.
public final class LibvirtService: @unchecked Sendable {
    // @unchecked Sendable: used from one caller.
    public static let uri = "qemu:///system"
    /// The daemons started here (in the foreground, as children of this process).
    private var started: [(name: String, process: Process)] = []

    /// Whether libvirt's daemon and client are installed.
    public static var isInstalled: Bool {
        access("/usr/sbin/libvirtd", X_OK) == 0 && access("/usr/bin/virsh", X_OK) == 0
    }

    /// Whether a libvirtd answers on `uri`.
    public static var answers: Bool {
        (try? PVSchedBinary.run("/usr/bin/virsh", ["-c", uri, "version"], timeout: 10))?.status == 0
    }

    public init() throws {
        guard Self.isInstalled else { throw StandInError("libvirt is not installed (apt-get install libvirt-daemon-system libvirt-clients)") }
        if Self.answers { return }
        for daemon in ["virtlogd", "libvirtd"] where !Self.running(daemon) { try start(daemon) }
        let deadline = Date().addingTimeInterval(20)
        while !Self.answers {
            guard Date() < deadline else { throw StandInError("libvirtd started but does not answer on \(Self.uri)") }
            usleep(100_000)
        }
    }

    /// Stops the daemons this object started (libvirtd first), and waits for them to go.
    public func stop() {
        for (name, process) in started.reversed() where process.isRunning { Self.end(name, process) }
        started = []
    }

    /// Starts `daemon` in the foreground as a child of this process (no `-d`: nothing
    /// to wait for but the process itself).
    private func start(_ daemon: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/\(daemon)")
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        started.append((daemon, p))
    }

    /// Stops libvirtd and starts it again (running domains go on), as an upgrade does.
    public func restartLibvirtd() throws {
        if let i = started.firstIndex(where: { $0.name == "libvirtd" }) {
            Self.end("libvirtd", started[i].process)
            started.remove(at: i)
        } else {
            Self.end("libvirtd", nil)
        }
        try start("libvirtd")
        let deadline = Date().addingTimeInterval(30)
        while !Self.answers {
            guard Date() < deadline else { throw StandInError("libvirtd does not answer after its restart") }
            usleep(100_000)
        }
    }

    deinit { stop() }

    /// SIGTERM, and SIGKILL when it has not ended in 5 s (libvirtd 9.0 here can take
    /// longer than that to stop with domains running, or not stop at all); `process`
    /// when it is ours, else every process of that name.
    static func end(_ daemon: String, _ process: Process?) {
        func signal(_ s: Int32) {
            if let process { kill(process.processIdentifier, s) } else { _ = try? PVSchedBinary.run("/usr/bin/pkill", ["-\(s)", "-x", daemon]) }
        }
        func gone() -> Bool { process.map { !$0.isRunning } ?? !running(daemon) }
        signal(SIGTERM)
        var deadline = Date().addingTimeInterval(5)
        while !gone() && Date() < deadline { usleep(50_000) }
        if !gone() { signal(SIGKILL) }
        deadline = Date().addingTimeInterval(5)
        while !gone() && Date() < deadline { usleep(50_000) }
        process?.waitUntilExit()
    }

    static func running(_ name: String) -> Bool {
        (try? PVSchedBinary.run("/usr/bin/pgrep", ["-x", "-r", "R,S,D,T", name], timeout: 5))?.status == 0
    }

    /// `virsh -c URI ARGS`.
    @discardableResult
    public static func virsh(_ args: [String], timeout: Double = 60) throws -> CommandResult {
        try PVSchedBinary.run("/usr/bin/virsh", ["-c", uri] + args, timeout: timeout)
    }
}
