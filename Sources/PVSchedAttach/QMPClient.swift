import CHostService
import PVSchedControl
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Why talking to a VMM's QMP socket failed; names what went wrong.
public struct QMPError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { "QMP: \(message)" }
}

/// A client of QEMU's machine protocol (QMP) on a Unix socket: the greeting,
/// capability negotiation, then one command at a time. Asynchronous events that
/// arrive between commands are skipped. QEMU's replies are input from another
/// process: lines are capped, parsed by the strict JSON parser, and every field
/// used is checked. Commands from several threads are serialised.
public final class QMPClient: Sendable {
    private let fd: Int32
    /// Bytes received past the last reply; held while a command runs.
    private let buffer = Mutex<[UInt8]>([])
    /// The process at the other end of the socket (SO_PEERCRED): QEMU itself.
    public let peerPID: Int32
    /// QEMU's version as its greeting gives it ("7.2.0").
    public let version: String
    static let maxLine = 1 << 20

    /// Connects to `path` (no symbolic link on the way; the socket owned by root or
    /// by the user of the process that serves it: see `SafeOpen.connectSocket`),
    /// reads the greeting and leaves negotiation mode.
    public init(path: String, timeoutMs: Int32 = 5000) throws(QMPError) {
        let fd: Int32
        do throws(SafeOpenError) { fd = try SafeOpen.connectSocket(path, field: "qmp") } catch { throw QMPError(error.message) }
        self.fd = fd
        _ = pvs_set_timeouts(fd, timeoutMs, timeoutMs)
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        guard pvs_peer_cred(fd, &pid, &uid, &gid) == 0, pid > 0 else {
            pvs_close(fd)
            throw QMPError("\(path): cannot tell which process serves the socket")
        }
        peerPID = pid
        var buffer: [UInt8] = []
        do throws(QMPError) {
            version = try Self.handshake(fd: fd, buffer: &buffer, path: path)
        } catch {
            pvs_close(fd)
            throw error
        }
        self.buffer.withLock { $0 = buffer }
    }

    private static func handshake(fd: Int32, buffer: inout [UInt8], path: String) throws(QMPError) -> String {
        let greeting = try readLine(fd: fd, buffer: &buffer)
        guard let q = greeting["QMP"], let v = q["version"]?["qemu"] else {
            throw QMPError("\(path) did not greet as QMP (no QMP.version.qemu)")
        }
        let part = { (k: String) in v[k]?.intValue.map(String.init) ?? "?" }
        _ = try execute(fd: fd, buffer: &buffer, "qmp_capabilities", arguments: nil)
        return "\(part("major")).\(part("minor")).\(part("micro"))"
    }

    deinit { pvs_close(fd) }

    /// Runs `command` and returns its `return` value; a QMP `error` reply throws
    /// with its class and description.
    public func execute(_ command: String, arguments: JSON? = nil) throws(QMPError) -> JSON {
        try buffer.withLock { b throws(QMPError) in try Self.execute(fd: fd, buffer: &b, command, arguments: arguments) }
    }

    private static func execute(fd: Int32, buffer: inout [UInt8], _ command: String, arguments: JSON?) throws(QMPError) -> JSON {
        var request: [String: JSON] = ["execute": .string(command)]
        if let arguments { request["arguments"] = arguments }
        let bytes = JSON.object(request).encoded + [0x0A]
        let sent = bytes.withUnsafeBytes { pvs_send_all(fd, $0.baseAddress, $0.count) }
        guard sent == 0 else { throw QMPError("\(command): send failed: \(String(cString: strerror(-sent)))") }
        while true {
            let reply = try readLine(fd: fd, buffer: &buffer)
            if reply["event"] != nil { continue }
            if let r = reply["return"] { return r }
            if let e = reply["error"] {
                throw QMPError("\(command): \(e["class"]?.stringValue ?? "error"): \(e["desc"]?.stringValue ?? "no description")")
            }
            throw QMPError("\(command): a reply with neither return nor error")
        }
    }

    private static func readLine(fd: Int32, buffer: inout [UInt8]) throws(QMPError) -> JSON {
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = buffer[..<nl]
                defer { buffer.removeSubrange(...nl) }
                do throws(JSONParseError) {
                    return try JSON.parse(line)
                } catch {
                    throw QMPError("an invalid reply: \(error)")
                }
            }
            guard buffer.count < maxLine else { throw QMPError("a reply longer than \(maxLine) bytes") }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { pvs_recv(fd, $0.baseAddress, $0.count) }
            if n == 0 { throw QMPError("QEMU closed the socket") }
            if n < 0 { throw QMPError("receive failed: \(String(cString: strerror(Int32(-n))))") }
            buffer += chunk[..<Int(n)]
        }
    }
}
