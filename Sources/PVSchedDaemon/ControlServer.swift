import CHostService
import Logging
import PVSchedControl
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Who may use the control socket, and for what: root and the daemon's own user
/// for everything; members of an optional read group for the read-only methods
/// and for boosting threads they own (`ControlCaller`). The socket file is 0600
/// (0660 owned by the read group); the peer credentials of every connection
/// (SO_PEERCRED) are checked as well.
public struct ControlAccess: Sendable {
    public let readGroup: UInt32?
    public init(readGroup: UInt32? = nil) { self.readGroup = readGroup }

    /// What a peer with these credentials may do; nil: nothing.
    public func caller(pid: Int32, uid: UInt32, gid: UInt32) -> ControlCaller? {
        if uid == 0 || uid == geteuid() { return ControlCaller(pid: pid, uid: uid, role: .admin) }
        guard let g = readGroup, gid == g || pvs_process_in_group(pid, g) == 1 else { return nil }
        return ControlCaller(pid: pid, uid: uid, role: .reader)
    }
}

/// The peer of one control connection.
public struct ControlCaller: Sendable, Equatable {
    /// What a caller may do.
    public enum Role: String, Sendable {
        /// Everything (root, the daemon's user).
        case admin
        /// The read-only methods, and `thread.boost`/`thread.restore` of threads
        /// the caller's own user runs, below the protected host priorities and for
        /// a bounded time (`ControlProtocol.readerBoostLimits`).
        case reader
    }
    public let pid: Int32
    public let uid: UInt32
    public let role: Role
    public init(pid: Int32, uid: UInt32, role: Role) { self.pid = pid; self.uid = uid; self.role = role }
    /// The daemon itself, tests and the lab calling the handler in process.
    public static let inProcess = ControlCaller(pid: 0, uid: 0, role: .admin)
}

/// Why the control socket could not be set up.
public struct ControlServerError: Error, CustomStringConvertible {
    public let operation: String
    public let errno: Int32
    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}

/// The daemon's control socket: newline-delimited JSON requests on a Unix
/// socket, one dedicated OS thread per connection (at most `maxConnections`),
/// each request answered by the `ControlHandler` in order. A request line over
/// the size limit is answered with `too_large` and the connection closed; a
/// client that disconnects mid-request leaves nothing behind.
public final class ControlServer: Sendable {
    public let path: String
    public static let maxConnections = 64
    private let listenFD: Int32
    private let handler: ControlHandler
    private let access: ControlAccess
    private let logger: Logger
    private let connections = Mutex<Set<Int32>>([])
    private let workers = Mutex<[Int32: PVSchedCore.Thread]>([:])
    private let acceptThread = Mutex<PVSchedCore.Thread?>(nil)
    private let stopping = Atomic(false)
    /// The socket came from the service manager (socket activation): it is not ours to remove.
    private let inherited: Bool

    /// Creates the socket at `path` (mode 0600, or 0660 owned by the read group).
    public init(path: String, access: ControlAccess, handler: ControlHandler,
                logger: Logger = Logger(label: "pvsched.control")) throws(ControlServerError) {
        self.path = path
        self.handler = handler
        self.access = access
        self.logger = logger
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            let dir = String(path[..<slash])
            let r = pvs_mkdir(dir, 0o755)
            guard r == 0 else { throw ControlServerError(operation: "create \(dir)", errno: -r) }
        }
        let fd = pvs_unix_listen(path, access.readGroup == nil ? 0o600 : 0o660, 64)
        guard fd >= 0 else { throw ControlServerError(operation: "listen on \(path)", errno: -fd) }
        if let g = access.readGroup {
            let r = pvs_chown(path, geteuid(), g)
            guard r == 0 else { pvs_close(fd); throw ControlServerError(operation: "chown \(path)", errno: -r) }
        }
        listenFD = fd
        inherited = false
    }

    /// Serves a listening socket the service manager made and passed on (socket
    /// activation, `LISTEN_FDS`): its mode and owner are the unit's (`SocketMode=`,
    /// `SocketGroup=`); peer credentials are checked as for a socket of our own.
    public init(inheritedFD fd: Int32, path: String, access: ControlAccess, handler: ControlHandler,
                logger: Logger = Logger(label: "pvsched.control")) throws(ControlServerError) {
        let r = pvs_is_unix_listener(fd)
        guard r == 1 else { throw ControlServerError(operation: "use the socket passed by the service manager (fd \(fd))", errno: r < 0 ? -r : EINVAL) }
        self.path = path
        self.handler = handler
        self.access = access
        self.logger = logger
        listenFD = fd
        inherited = true
    }

    /// Starts accepting connections on a dedicated thread.
    public func start() throws(ThreadError) {
        let t = try PVSchedCore.Thread(name: "pvs-accept") { [self] in acceptLoop() }
        acceptThread.withLock { $0 = t }
    }

    /// Stops accepting, closes every connection, waits for the threads, removes the socket.
    public func stop() {
        guard !stopping.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if !inherited { pvs_shutdown(listenFD) }
        acceptThread.takeAndJoin()
        pvs_close(listenFD)
        for fd in connections.withLock({ Array($0) }) { pvs_shutdown(fd) }
        let all = workers.withLock { w in
            let all = Array(w.values)
            w.removeAll()
            return all
        }
        for w in all { w.join() }
        if !inherited { unlink(path) }
    }

    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            // An inherited socket is not shut down at stop (the service manager keeps
            // it for the next start): the loop looks at `stopping` every 200 ms instead.
            if inherited, pvs_poll2(listenFD, -1, 200) & 1 == 0 { continue }
            let fd = pvs_accept(listenFD)
            if fd < 0 {
                if stopping.load(ordering: .relaxed) { return }
                if fd == -EMFILE || fd == -ENFILE || fd == -ENOMEM { usleep(10_000); continue }
                if fd == -ECONNABORTED { continue }
                logger.error("accept failed", metadata: ["errno": "\(-fd)"])
                usleep(10_000)
                continue
            }
            reapFinished()
            let admitted: Bool = connections.withLock { c in
                guard c.count < Self.maxConnections else { return false }
                c.insert(fd)
                return true
            }
            guard admitted else {
                send(fd, ControlResponse.failure(id: .null, error: ControlError(.busy, "too many connections (limit \(Self.maxConnections))")))
                pvs_close(fd)
                continue
            }
            do {
                let t = try PVSchedCore.Thread(name: "pvs-control") { [self] in serve(fd) }
                workers.withLock { $0[fd] = t }
            } catch {
                // Out of threads: this client is told so, the daemon carries on.
                connections.withLock { _ = $0.remove(fd) }
                send(fd, ControlResponse.failure(id: .null, error: ControlError(.busy, "\(error)")))
                pvs_close(fd)
            }
        }
    }

    /// Joins workers whose connection has closed.
    private func reapFinished() {
        let open = connections.withLock { $0 }
        let done: [PVSchedCore.Thread] = workers.withLock { w in
            let finished = w.keys.filter { !open.contains($0) }
            return finished.compactMap { w.removeValue(forKey: $0) }
        }
        for t in done { t.join() }
    }

    private func serve(_ fd: Int32) {
        defer {
            connections.withLock { _ = $0.remove(fd) }
            pvs_close(fd)
        }
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        guard pvs_peer_cred(fd, &pid, &uid, &gid) == 0, let caller = access.caller(pid: pid, uid: uid, gid: gid) else {
            logger.warning("control connection refused", metadata: ["uid": "\(uid)", "pid": "\(pid)"])
            send(fd, ControlResponse.failure(id: .null, error: ControlError(
                .permissionDenied, "uid \(uid) may not use the pvsched control socket (root, the daemon's user or its read group only)")))
            return
        }
        _ = pvs_set_timeouts(fd, 600_000, 10_000)
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while !stopping.load(ordering: .relaxed) {
            let n = chunk.withUnsafeMutableBytes { pvs_recv(fd, $0.baseAddress, $0.count) }
            if n <= 0 { return }
            pending += chunk[0..<n]
            while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                var line = pending[..<nl]
                if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
                let response = line.isEmpty ? nil : handler.respond(to: line, caller: caller)
                pending.removeSubrange(...nl)
                if let response, !send(fd, response) { return }
            }
            if pending.count > ControlProtocol.maxRequestBytes {
                send(fd, ControlResponse.failure(id: .null, error: ControlError(
                    .tooLarge, "request line exceeds \(ControlProtocol.maxRequestBytes) bytes")))
                return
            }
        }
    }

    @discardableResult
    private func send(_ fd: Int32, _ line: [UInt8]) -> Bool {
        var out = line
        out.append(UInt8(ascii: "\n"))
        return out.withUnsafeBytes { pvs_send_all(fd, $0.baseAddress, $0.count) } == 0
    }
}
