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
    /// The handler, for the metrics (made before it).
    private let handlerBox = HandlerBox()
    private final class HandlerBox: Sendable { let handler = Mutex<ControlHandler?>(nil) }
    private let lockFD: Int32
    private let logger: Logger

    /// Sets everything up; the caller must have blocked the stop signals
    /// (`Daemon.blockStopSignals()`) before any thread was created.
    public init(options: DaemonOptions, logger: Logger) throws {
        self.logger = logger
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
        host = try PVSchedHost(actuator: LinuxActuator(guardian: guardian), logger: logger)
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
            handler = try ControlHandler(host: host, metricsAddress: metricsServer?.boundAddress, logger: logger)
            handlerBox.handler.withLock { [handler] in $0 = handler }
        } catch {
            metricsServer?.stop()
            guardian?.close()
            pvs_close(lock)
            throw DaemonError(message: "\(error)")
        }
        do {
            server = try ControlServer(path: options.socketPath, access: ControlAccess(readGroup: readGID),
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
    public func run() throws -> Int32 {
        do { try server.start() } catch {
            shutdown()
            throw DaemonError(message: "\(error)")
        }
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
