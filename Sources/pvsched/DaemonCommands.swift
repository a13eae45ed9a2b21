import ArgumentParser
import Logging
import PVSchedControl
import PVSchedDaemon
import PVSchedLinux

#if canImport(Glibc)
import Glibc
#endif

/// `pvsched daemon`: the host service.
struct DaemonCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "daemon",
        abstract: "Run the pvsched host service (foreground; logs to stderr; one per host).",
        discussion: "Stop it with SIGTERM or Ctrl-C: every VM is stopped and every boost undone.")

    @Option(help: "Control socket path.") var socket = ControlProtocol.defaultSocketPath
    @Option(help: "Lock file that keeps the daemon one per host.") var lock = "/run/pvsched/pvsched.lock"
    @Option(help: "A group whose members may call the read-only verbs (list, stats, top, trace, drivers) and boost threads they own, below FIFO 50 for at most 10 s; everything else stays root's (default: root only).")
    var readGroup: String?
    @Option(help: .hidden) var adminGroup: String?
    @Option(help: "Serve Prometheus metrics at HOST:PORT (e.g. 127.0.0.1:9464).") var metrics: String?
    @Flag(help: "Run without the boost guardian process (boosts of other processes' threads are then not undone if the daemon is killed).")
    var noGuardian = false
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        if let metrics, MetricsServer.parseAddress(metrics) == nil {
            throw ValidationError("--metrics must be HOST:PORT with a port in 0...65535, got '\(metrics)'")
        }
        guard !socket.isEmpty, socket.utf8.count < 108 else { throw ValidationError("--socket must be a path of 1-107 bytes") }
    }

    func run() throws {
        Daemon.blockStopSignals()
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in DaemonLogHandler(label: label, level: level) }
        var options = DaemonOptions()
        options.socketPath = socket
        options.lockPath = lock
        if adminGroup != nil { FileHandleOut.stderr("pvsched daemon: --admin-group is now --read-group (read-only verbs and boosts of the caller's own threads)") }
        options.readGroup = readGroup ?? adminGroup
        options.metrics = metrics
        options.guardianCommand = noGuardian ? nil : ["/proc/self/exe", "guardian"]
        let daemon: Daemon
        do { daemon = try Daemon(options: options, logger: Logger(label: "pvsched.daemon")) } catch {
            FileHandleOut.stderr("pvsched daemon: \(error)")
            throw ExitCode(1)
        }
        do { try daemon.run() } catch {
            FileHandleOut.stderr("pvsched daemon: \(error)")
            throw ExitCode(1)
        }
    }
}

/// The boost guardian process (started by the daemon; not for direct use).
struct GuardianCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guardian", abstract: "Restore boosted threads when the daemon dies (started by the daemon).",
        shouldDisplay: false)
    @Option(help: "The daemon's pid.") var parent: Int32

    func run() throws {
        guard parent > 0 else { throw ValidationError("--parent must be a process id") }
        _ = BoostGuardian.runGuardian(parent: parent)
    }
}

/// Writes a line to standard error.
enum FileHandleOut {
    static func stderr(_ text: String) {
        var line = text
        line.append("\n")
        _ = line.utf8CString.withUnsafeBufferPointer { write(2, $0.baseAddress, $0.count - 1) }
    }
}
