import CHostService
import Logging
import PVSchedControl
import PVSchedCore
import PVSchedHost
import PVSchedLinux

#if canImport(Glibc)
import Glibc
#endif

/// How `pvsched daemon` is set up.
public struct DaemonOptions: Sendable {
    public var socketPath = ControlProtocol.defaultSocketPath
    /// The lock that makes the daemon one per host.
    public var lockPath = "/run/pvsched/pvsched.lock"
    /// A group whose members may use the control socket (besides root).
    public var adminGroup: String?
    /// "HOST:PORT" of the Prometheus endpoint (off when nil).
    public var metrics: String?
    /// argv to start the boost guardian with (nil runs without one).
    public var guardianCommand: [String]?
    public init() {}
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
    private let lockFD: Int32
    private let logger: Logger

    /// Sets everything up; the caller must have blocked the stop signals
    /// (`Daemon.blockStopSignals()`) before any thread was created.
    public init(options: DaemonOptions, logger: Logger) throws {
        self.logger = logger
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
        var adminGID: UInt32?
        if let group = options.adminGroup {
            var gid: UInt32 = 0
            guard pvs_group_id(group, &gid) == 0 else {
                pvs_close(lock)
                throw DaemonError(message: "--admin-group: no group named '\(group)'")
            }
            adminGID = gid
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
        host = try PVSchedHost(actuator: LinuxActuator(guardian: guardian), logger: logger)
        var metricsServer: MetricsServer?
        if let m = options.metrics {
            guard let (h, port) = MetricsServer.parseAddress(m) else {
                guardian?.close()
                pvs_close(lock)
                throw DaemonError(message: "--metrics: expected HOST:PORT, got '\(m)'")
            }
            do {
                metricsServer = try MetricsServer(host: h, port: port, exporter: MetricsExporter(host: host))
            } catch {
                guardian?.close()
                pvs_close(lock)
                throw DaemonError(message: "--metrics: cannot listen on \(m): \(error)")
            }
        }
        metrics = metricsServer
        handler = ControlHandler(host: host, metricsAddress: metricsServer?.boundAddress, logger: logger)
        do {
            server = try ControlServer(path: options.socketPath, access: ControlAccess(adminGroup: adminGID),
                                       handler: handler, logger: logger)
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

    /// Serves until a stop signal arrives, then shuts down cleanly. Returns the signal.
    @discardableResult
    public func run() -> Int32 {
        server.start()
        logger.info("pvsched daemon ready", metadata: [
            "socket": "\(server.path)", "metrics": "\(metrics?.boundAddress ?? "off")",
            "guardian": "\(guardian.map { "pid \($0.pid)" } ?? "off")", "pid": "\(getpid())"])
        let signal = pvs_wait_stop_signal()
        logger.info("stopping", metadata: ["signal": "\(signal)"])
        shutdown()
        return signal
    }

    /// Stops serving, stops every VM, undoes every boost, releases the lock.
    public func shutdown() {
        server.stop()
        metrics?.stop()
        host.shutdown()       // stops owned VMs, detaches attached ones (their kernel events first)
        handler.shutdown()    // then the operator boosts and the kernel event source
        guardian?.close()
        pvs_close(lockFD)
        logger.info("pvsched daemon stopped; every boost undone")
    }
}
