import Foundation
import CHostService
import Logging
import PVSchedBuildInfo
import PVSchedControl
import PVSchedCore
import PVSchedHost
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How `pvsched daemon` is set up.
public struct DaemonOptions: Sendable {
    public var socketPath = ControlProtocol.defaultSocketPath
    /// The lock that makes the daemon one per host.
    public var lockPath = "/run/pvsched/pvsched.lock"
    /// A group whose members may call the read-only methods and boost their own
    /// threads (see `ControlCaller.Role.reader`); everything else is root's.
    public var readGroup: String?
    /// "HOST:PORT" of the Prometheus endpoint (off when nil).
    public var metrics: String?
    /// argv to start the boost guardian with (nil runs without one).
    public var guardianCommand: [String]?
    /// The configuration (policy defaults, BPF drivers, state file) and where it was
    /// read from (SIGHUP reads it again; nil: nothing to reload).
    public var config = DaemonConfig()
    public var configPath: String?
    /// What the command line set, applied over the file at start and at every reload.
    public var overrides: @Sendable (inout DaemonConfig) -> Void = { _ in }
    /// A listening socket the service manager passed (socket activation), used instead of `socketPath`.
    public var inheritedSocket: Int32?
    /// Stop, as on SIGTERM, when this process exits (the lab's and the tests' daemons: one
    /// left serving after them would go on following libvirtd and serve later domains).
    public var exitWithProcess: Int32?
    public init() {}

    /// The socket systemd passed (`LISTEN_PID` is this process, `LISTEN_FDS` ≥ 1: fd 3), if any.
    public static var socketFromServiceManager: Int32? {
        guard let pid = getenv("LISTEN_PID").flatMap({ Int32(String(cString: $0)) }), pid == getpid(),
              let n = getenv("LISTEN_FDS").flatMap({ Int(String(cString: $0)) }), n >= 1 else { return nil }
        return 3
    }
}

/// Why the daemon could not start.
public struct DaemonError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// The pvsched host service: one per host (lock file), holding the host
/// component (registry, drivers, actuator, VM sessions) and serving the control
/// socket and the optional metrics endpoint until SIGTERM or SIGINT, then
/// stopping every VM and undoing every boost.
public final class Daemon {
    public let host: PVSchedHost
    public let server: ControlServer
    public let metrics: MetricsServer?
    public let guardian: BoostGuardian?
    private let handler: ControlHandler
    /// The handler, for the metrics (made before it).
    private let handlerBox = HandlerBox()
    private final class HandlerBox: Sendable { let handler = Mutex<ControlHandler?>(nil) }
    private let lockFD: Int32
    private let logger: Logger
    private let configPath: String?
    private let overrides: @Sendable (inout DaemonConfig) -> Void
    private let loadedConfig: Mutex<DaemonConfig>
    private let discovery = Mutex<QEMUDiscovery?>(nil)
    private let libvirt = Mutex<LibvirtFollower?>(nil)

    /// Sets everything up; the caller must have blocked the stop signals
    /// (`Daemon.blockStopSignals()`) before any thread was created.
    public init(options: DaemonOptions, logger: Logger) throws {
        self.logger = logger
        configPath = options.configPath
        exitWithProcess = options.exitWithProcess
        overrides = options.overrides
        loadedConfig = Mutex(options.config)
        // A write to a closed pipe or socket (a guardian or a client gone) is an
        // error to handle, never the daemon's death.
        pvs_ignore_sigpipe()
        if let slash = options.lockPath.lastIndex(of: "/"), slash != options.lockPath.startIndex {
            _ = pvs_mkdir(String(options.lockPath[..<slash]), 0o755)
        }
        let lock = pvs_lock_file(options.lockPath)
        guard lock >= 0 else {
            if lock == -EWOULDBLOCK {
                throw DaemonError(message: "another pvsched daemon is running (it holds \(options.lockPath))")
            }
            throw DaemonError(message: "cannot lock \(options.lockPath): \(String(cString: strerror(-lock)))")
        }
        lockFD = lock
        var readGID: UInt32?
        if let group = options.readGroup {
            var gid: UInt32 = 0
            guard pvs_group_id(group, &gid) == 0 else {
                pvs_close(lock)
                throw DaemonError(message: "--read-group: no group named '\(group)'")
            }
            readGID = gid
        }
        var guardian: BoostGuardian?
        if let cmd = options.guardianCommand, let exe = cmd.first {
            do {
                guardian = try BoostGuardian(executable: exe, arguments: Array(cmd.dropFirst()) + ["--parent", "\(getpid())"])
            } catch {
                pvs_close(lock)
                throw DaemonError(message: "cannot start the boost guardian (\(exe)): \(error)")
            }
        }
        self.guardian = guardian
        // Cgroup weights only with a guardian: it puts them back if the daemon dies.
        let weights = guardian != nil && options.config.cgroupWeights
            ? CgroupWeights.Hierarchy.detect().map { CgroupWeights(hierarchy: $0, guardian: guardian) } : nil
        host = try PVSchedHost(actuator: LinuxActuator(guardian: guardian, cgroupWeights: weights), logger: logger)
        do { try Self.applyDrivers(options.config, to: host, logger: logger) } catch {
            guardian?.close()
            pvs_close(lock)
            throw error
        }
        var metricsServer: MetricsServer?
        if let m = options.metrics {
            guard let (h, port) = MetricsServer.parseAddress(m) else {
                guardian?.close()
                pvs_close(lock)
                throw DaemonError(message: "--metrics: expected HOST:PORT, got '\(m)'")
            }
            do {
                var facts = DaemonFacts()
                facts.version = PVSchedVersion.version
                facts.revision = PVSchedVersion.revision
                facts.guardian = { [guardian] in guardian.map { g in let st = g.status; return (st.state == .up, st.restarts) } }
                facts.kernelEventsDropped = { [handlerBox] in handlerBox.handler.withLock { $0?.kernelEventsDropped } }
                metricsServer = try MetricsServer(host: h, port: port, exporter: MetricsExporter(host: host, facts: facts))
            } catch {
                guardian?.close()
                pvs_close(lock)
                throw DaemonError(message: "--metrics: cannot listen on \(m): \(error)")
            }
        }
        metrics = metricsServer
        do {
            handler = try ControlHandler(host: host, metricsAddress: metricsServer?.boundAddress, policy: AttachPolicy(options.config),
                                         stateFile: options.config.stateFile, logger: logger)
            handlerBox.handler.withLock { [handler] in $0 = handler }
        } catch {
            metricsServer?.stop()
            guardian?.close()
            pvs_close(lock)
            throw DaemonError(message: "\(error)")
        }
        do {
            if let fd = options.inheritedSocket {
                server = try ControlServer(inheritedFD: fd, path: options.socketPath, access: ControlAccess(readGroup: readGID),
                                           handler: handler, logger: logger)
            } else {
                server = try ControlServer(path: options.socketPath, access: ControlAccess(readGroup: readGID),
                                           handler: handler, logger: logger)
            }
        } catch {
            metricsServer?.stop()
            guardian?.close()
            pvs_close(lock)
            throw DaemonError(message: "\(error)")
        }
    }

    /// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in the calling thread and every
    /// thread created after, so that only `run()` receives them.
    public static func blockStopSignals() { pvs_block_stop_signals(1) }

    /// The process monitor's key for the process of `DaemonOptions.exitWithProcess`
    /// (VMs are numbered from 1 up).
    static let starterWatchID = UInt64.max
    private let exitWithProcess: Int32?

    /// Serves until a stop signal arrives, then shuts down cleanly. Returns the signal.
    /// SIGHUP reads the configuration again (no VM is dropped). Under systemd it says
    /// READY once the socket answers, STOPPING when it stops, and pings the watchdog
    /// while its control handler answers.
    @discardableResult
    public func run() throws -> Int32 {
        do { try server.start() } catch {
            shutdown()
            throw DaemonError(message: "\(error)")
        }
        if let pid = exitWithProcess {
            // Watched by the VMMs' process monitor, as a VMM is: the same pidfd in the same poll.
            do {
                try host.processMonitor().add(id: Self.starterWatchID, process: pid) { _ = kill(getpid(), SIGTERM) }
            } catch {
                shutdown()
                throw DaemonError(message: "--exit-with: \(error)")
            }
        }
        let restored = handler.restoreAttachedVMs()
        if let uri = loadedConfig.withLock({ $0.libvirt }) {
            do {
                let f = try LibvirtFollower(handler: handler, uri: uri, logger: logger)
                libvirt.withLock { $0 = f }
            } catch { logger.error("libvirt follower not started", metadata: ["error": "\(error)"]) }
        }
        if loadedConfig.withLock({ $0.discover }) {
            do {
                // With the libvirt follower running (started first), libvirt's own QEMUs are its
                // to serve, with their domains' settings, whichever of the two finds them first.
                let following = libvirt.withLock { $0 != nil }
                let d = try QEMUDiscovery(handler: handler, allowedUsers: QEMUDiscovery.defaultUsers, logger: logger) { pid, found in
                    following && found.guestName.map { LibvirtFollower.runsDomain(pid: pid, guestName: $0) } == true
                }
                discovery.withLock { $0 = d }
            } catch { logger.error("QEMU discovery not started", metadata: ["error": "\(error)"]) }
        }
        logger.info("pvsched daemon ready", metadata: [
            "socket": "\(server.path)", "metrics": "\(metrics?.boundAddress ?? "off")",
            "guardian": "\(guardian.map { "pid \($0.pid)" } ?? "off")", "pid": "\(getpid())",
            "vms_attached_again": "\(restored)"])
        _ = pvs_sd_notify("READY=1\nSTATUS=serving \(server.path)")
        let watchdogNs = getenv("WATCHDOG_USEC").flatMap { UInt64(String(cString: $0)) }.map { $0 * 1000 }
        var signal: Int32 = 0
        while true {
            // Wake for the watchdog at half its interval (systemd's advice), else only for signals.
            let timeoutMs = watchdogNs.map { Int32(clamping: $0 / 2_000_000) } ?? 3_600_000
            signal = pvs_wait_stop_signal_timeout(max(1, timeoutMs))
            if signal == 0 {
                if watchdogNs != nil, case .success = handler.handle(ControlRequest(id: .null, method: DaemonInfo.name, params: RequestParams([:]))) {
                    _ = pvs_sd_notify("WATCHDOG=1")
                }
                continue
            }
            if signal == SIGHUP {
                reload()
                continue
            }
            break
        }
        logger.info("stopping", metadata: ["signal": "\(signal)"])
        _ = pvs_sd_notify("STOPPING=1")
        shutdown()
        return signal
    }

    /// Reads the configuration again and applies what can change while VMs run: the
    /// default driver, BPF drivers not yet loaded, the defaults of VMs attached from
    /// now on, the log level. The socket, the metrics address, the read group and the
    /// state file take effect at the next start (said in the log). A configuration
    /// with an error is not applied at all.
    public func reload() {
        guard let configPath else { logger.info("SIGHUP: no configuration file to read again"); return }
        _ = pvs_sd_notify("RELOADING=1")
        defer { _ = pvs_sd_notify("READY=1") }
        var config: DaemonConfig
        do { config = try DaemonConfig.load(path: configPath) } catch {
            logger.error("configuration not reloaded", metadata: ["error": "\(error)"])
            return
        }
        overrides(&config)
        let old = loadedConfig.withLock { $0 }
        do { try Self.applyDrivers(config, to: host, logger: logger) } catch {
            logger.error("configuration reloaded in part", metadata: ["error": "\(error)"])
        }
        handler.setPolicy(AttachPolicy(config))
        if let level = Logger.Level(rawValue: config.logLevel) { DaemonLogHandler.setLevel(level) }
        for (key, changed) in [("socket", old.socket != config.socket), ("metrics", old.metrics != config.metrics),
                               ("read-group", old.readGroup != config.readGroup), ("state-file", old.stateFile != config.stateFile),
                               ("guardian", old.guardian != config.guardian), ("libvirt", old.libvirt != config.libvirt),
                               ("discover", old.discover != config.discover),
                               ("cgroup-weights", old.cgroupWeights != config.cgroupWeights)] where changed {
            logger.warning("configuration key changed; it takes effect at the next start", metadata: ["key": "\(key)"])
        }
        loadedConfig.withLock { $0 = config }
        logger.info("configuration reloaded", metadata: ["file": "\(configPath)"])
    }

    /// Loads the configuration's BPF drivers that are not registered yet, then sets
    /// its default driver.
    static func applyDrivers(_ config: DaemonConfig, to host: PVSchedHost, logger: Logger) throws {
        for entry in config.bpfDrivers where host.registry.driver(named: entry.name) == nil {
            guard let data = FileManager.default.contents(atPath: entry.path) else {
                throw DaemonError(message: "bpf-driver \(entry.name): cannot read \(entry.path)")
            }
            do { try host.loadBPFDriver(elf: Array(data), name: entry.name) } catch {
                throw DaemonError(message: "bpf-driver \(entry.name) (\(entry.path)): \(error)")
            }
        }
        if let d = config.driver, host.registry.defaultDriverName != d {
            do { try host.registry.setDefault(d) } catch {
                throw DaemonError(message: "driver: \(error)")
            }
            logger.info("default driver", metadata: ["driver": "\(d)"])
        }
    }

    /// Stops serving, stops every VM, undoes every boost, releases the lock.
    public func shutdown() {
        discovery.withLock { $0 }?.stop()
        libvirt.withLock { $0 }?.stop()
        server.stop()
        metrics?.stop()
        host.shutdown()       // stops owned VMs, detaches attached ones (their kernel events first)
        handler.shutdown()    // then the operator boosts and the kernel event source
        guardian?.close()
        pvs_close(lockFD)
        logger.info("pvsched daemon stopped; every boost undone")
    }
}
