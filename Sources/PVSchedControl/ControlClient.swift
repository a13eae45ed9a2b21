import CHostService

#if canImport(Glibc)
import Glibc
#endif

/// A client of the daemon's control socket: one connection, requests answered
/// in order. Used by the CLI verbs, `pvsched top` and the tests.
public final class ControlClient {
    private let fd: Int32
    private var nextID: Int64 = 1
    private var pending: [UInt8] = []
    private var chunk = [UInt8](repeating: 0, count: 64 * 1024)

    /// Connects to the daemon at `path`; the error says when no daemon runs there.
    public init(path: String = ControlProtocol.defaultSocketPath, timeoutMs: Int32 = 30_000) throws(ControlError) {
        let fd = pvs_unix_connect(path)
        guard fd >= 0 else {
            let reason: String
            switch -fd {
            case ENOENT, ECONNREFUSED: reason = "no pvsched daemon is running (no socket at \(path)); start one with `pvsched daemon`"
            case EACCES, EPERM: reason = "permission denied on \(path): the control socket is for root (or the daemon's admin group)"
            default: reason = "cannot connect to \(path): \(String(cString: strerror(-fd)))"
            }
            throw ControlError(.failed, reason)
        }
        _ = pvs_set_timeouts(fd, timeoutMs, timeoutMs)
        self.fd = fd
    }

    deinit { pvs_close(fd) }

    /// Sends one request and waits for its response; returns the result or throws the daemon's error.
    public func call(_ method: String, _ params: [String: JSON] = [:]) throws(ControlError) -> JSON {
        let id = nextID
        nextID += 1
        let response = try exchange(ControlRequest.encode(id: id, method: method, params: params))
        // A refusal of the connection itself (permission, busy) carries no id.
        if response["id"] == .null, response["ok"] == false, let e = response["error"].flatMap(ControlError.init(json:)) { throw e }
        guard response["id"]?.intValue == id else { throw ControlError(.failed, "the daemon answered another request") }
        if response["ok"]?.boolValue == true { return response["result"] ?? .null }
        throw response["error"].flatMap(ControlError.init(json:)) ?? ControlError(.failed, "malformed error response")
    }

    /// Sends raw bytes as one request line and returns the parsed response (for tests).
    public func exchange(_ line: [UInt8]) throws(ControlError) -> JSON {
        var out = line
        out.append(UInt8(ascii: "\n"))
        let r = out.withUnsafeBytes { pvs_send_all(fd, $0.baseAddress, $0.count) }
        guard r == 0 else {
            // The daemon may have refused the connection (and closed it) before our
            // request went out: its refusal is still waiting to be read.
            if let refusal = try? readResponse() { return refusal }
            throw ControlError(.failed, "lost the connection to the daemon: \(String(cString: strerror(-r)))")
        }
        return try readResponse()
    }

    private func readResponse() throws(ControlError) -> JSON {
        while true {
            if let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(pending[..<nl])
                pending.removeSubrange(...nl)
                do { return try JSON.parse(line) } catch { throw ControlError(.failed, "the daemon sent invalid JSON") }
            }
            let n = chunk.withUnsafeMutableBytes { pvs_recv(fd, $0.baseAddress, $0.count) }
            guard n > 0 else {
                throw ControlError(.failed, n == 0 ? "the daemon closed the connection" : "reading from the daemon: \(String(cString: strerror(Int32(-n))))")
            }
            pending += chunk[0..<n]
        }
    }
}
