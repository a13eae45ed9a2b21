import ArgumentParser
import Foundation
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
        discussion: """
        Settings come from the configuration file (--config; /etc/pvsched/pvsched.conf and conf.d/*.conf \
        when present); an option given here wins over the file. SIGHUP reads the file again (no VM is \
        dropped). Stop it with SIGTERM or Ctrl-C: every VM is detached and every boost undone; the VMs it \
        attached are attached again when it starts next (the state file under /run/pvsched).
        Under systemd: Type=notify, the watchdog, and socket activation (pvsched.socket) are understood.
        """)

    @Option(help: "The configuration file (default: \(DaemonConfig.defaultPath), if it exists).") var config: String?
    @Option(help: "Control socket path (default: the file's `socket`, else \(ControlProtocol.defaultSocketPath)).") var socket: String?
    @Option(help: "Lock file that keeps the daemon one per host.") var lock = "/run/pvsched/pvsched.lock"
    @Option(help: "A group whose members may call the read-only verbs (list, stats, top, trace, drivers) and boost threads they own, below FIFO 50 for at most 10 s; everything else stays root's (default: root only).")
    var readGroup: String?
    @Option(help: .hidden) var adminGroup: String?
    @Option(help: "Serve Prometheus metrics at HOST:PORT (e.g. 127.0.0.1:9464).") var metrics: String?
    @Flag(help: "Run without the boost guardian process (boosts of other processes' threads are then not undone if the daemon is killed).")
    var noGuardian = false
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.") var logLevel: String?
    @Option(help: "Where attached VMs are recorded for the next start (default: the file's `state-file`).") var stateFile: String?
    @Option(help: "Follow this libvirt's domains (default: the file's `libvirt`, else qemu:///system).") var libvirt: String?
    @Flag(help: "Do not follow libvirt's domains.") var noLibvirt = false
    @Option(help: ArgumentHelp("Stop, as on SIGTERM, when process PID exits (the lab's and the tests' daemons).",
                               visibility: .hidden)) var exitWith: Int32?

    func validate() throws {
        if let logLevel, Logger.Level(rawValue: logLevel) == nil {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
        if let metrics, MetricsServer.parseAddress(metrics) == nil {
            throw ValidationError("--metrics must be HOST:PORT with a port in 0...65535, got '\(metrics)'")
        }
        if let socket { guard !socket.isEmpty, socket.utf8.count < 108 else { throw ValidationError("--socket must be a path of 1-107 bytes") } }
        if let libvirt { guard libvirt.contains("://"), libvirt.utf8.count <= 256, !noLibvirt else {
            throw ValidationError("--libvirt must be a connection URI such as qemu:///system (and not with --no-libvirt)") } }
        if let exitWith, exitWith <= 0 { throw ValidationError("--exit-with must be a process id, got \(exitWith)") }
    }

    func run() throws {
        Daemon.blockStopSignals()
        let path = config ?? DaemonConfig.defaultPath
        var file: DaemonConfig
        do { file = try DaemonConfig.load(path: path, mustExist: config != nil) } catch {
            FileHandleOut.stderr("pvsched daemon: configuration: \(error)")
            throw ExitCode(1)
        }
        let (socket, readGroup, metrics, logLevel, noGuardian, stateFile) = (socket, readGroup ?? adminGroup, metrics, logLevel, noGuardian, stateFile)
        let (libvirt, noLibvirt) = (libvirt, noLibvirt)
        let overrides: @Sendable (inout DaemonConfig) -> Void = { file in
            if let socket { file.socket = socket }
            if let readGroup { file.readGroup = readGroup }
            if let metrics { file.metrics = metrics }
            if let logLevel { file.logLevel = logLevel }
            if noGuardian { file.guardian = false }
            if let stateFile { file.stateFile = stateFile }
            if let libvirt { file.libvirt = libvirt }
            if noLibvirt { file.libvirt = nil }
        }
        overrides(&file)
        let level = Logger.Level(rawValue: file.logLevel) ?? .info
        DaemonLogHandler.setLevel(level)
        LoggingSystem.bootstrap { label in DaemonLogHandler(label: label, level: level) }
        var options = DaemonOptions()
        options.socketPath = file.socket
        options.lockPath = lock
        if adminGroup != nil { FileHandleOut.stderr("pvsched daemon: --admin-group is now --read-group (read-only verbs and boosts of the caller's own threads)") }
        options.readGroup = file.readGroup
        options.metrics = file.metrics
        options.guardianCommand = file.guardian ? ["/proc/self/exe", "guardian"] : nil
        options.config = file
        options.overrides = overrides
        options.configPath = FileManager.default.fileExists(atPath: path) ? path : nil
        options.inheritedSocket = DaemonOptions.socketFromServiceManager
        options.exitWithProcess = exitWith
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

/// `pvsched config`: the daemon's configuration file.
struct ConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config", abstract: "Check the daemon's configuration file.", subcommands: [ConfigCheckCommand.self])
}

/// `pvsched config check [FILE]`: reads a configuration as the daemon would.
struct ConfigCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a configuration file (and the conf.d/*.conf beside it) as the daemon reads it; print the settings in force.")
    @Argument(help: "The file (default: \(DaemonConfig.defaultPath)).") var file: String?
    @Flag(help: "Print nothing when the file is valid.") var quiet = false

    func run() throws {
        let path = file ?? DaemonConfig.defaultPath
        do {
            let c = try DaemonConfig.load(path: path, mustExist: true)
            if !quiet { print("# \(path): valid\n\(c.rendered)") }
        } catch {
            FileHandleOut.stderr("pvsched config: \(error)")
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
