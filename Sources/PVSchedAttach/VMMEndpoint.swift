import PVSchedCore

#if canImport(Glibc)
import Glibc
#endif

/// Why a VMM endpoint could not say what pvsched needs; `field` names the request
/// field (or spec part) at fault.
public struct EndpointError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public enum Kind: Sendable, Equatable {
        /// A value that is wrong in itself.
        case invalid
        /// A process or thread that does not exist (or is not the VMM's).
        case notFound
        /// The VMM did not answer as it should.
        case unreachable
    }
    public let kind: Kind
    public let field: String
    public let message: String
    public init(_ kind: Kind = .notFound, field: String, _ message: String) {
        self.kind = kind; self.field = field; self.message = message
    }
    public var description: String { "\(field): \(message)" }
}

/// A VMM another process runs, as pvsched reaches it: which process, which threads
/// run its vCPUs (and deliver its interrupts), how often to ask again. One type per
/// way of asking (QEMU's QMP, thread names or ids of any process, libvirt's view of
/// its domains): adding a VMM is adding one endpoint type (libvirt's `ch` driver
/// beside its QEMU driver is the model).
public protocol VMMEndpoint: Sendable {
    /// What kind of endpoint, for listings (`qmp`, `process`, `libvirt`).
    var kind: String { get }
    /// The VMM process (watched through a pidfd: its exit detaches the VM).
    var process: Int32 { get }
    /// A one-line summary ("QEMU 7.2.0, process 123").
    var summary: String { get }
    /// The vCPU threads now (vCPU i's at index i), and the threads that deliver the
    /// VM's interrupts. Every thread is checked to belong to `process`.
    func vcpuThreads() throws(EndpointError) -> VCPUThreads
    /// How often to ask again (vCPU threads change, or are hot-plugged), nil: never.
    var refreshIntervalNs: UInt64? { get }
}

/// QEMU through its QMP socket: the socket's peer is the process, `query-cpus-fast`
/// gives the threads (read again every second).
public struct QMPEndpoint: VMMEndpoint {
    public let client: QMPClient
    public let process: Int32
    public var kind: String { "qmp" }
    public var summary: String { "QEMU \(client.version), process \(process)" }
    public var refreshIntervalNs: UInt64? { 1_000_000_000 }

    /// Connects to `socket`; `expectedProcess`, when given, must be the socket's peer.
    public init(socket: String, expectedProcess: Int32? = nil) throws(EndpointError) {
        do throws(QMPError) {
            let c = try QMPClient(path: socket)
            if let expectedProcess, expectedProcess != c.peerPID {
                throw QMPError("the socket belongs to process \(c.peerPID), not \(expectedProcess)")
            }
            client = c
            process = c.peerPID
        } catch {
            throw EndpointError(.unreachable, field: "qmp", error.message)
        }
    }

    public func vcpuThreads() throws(EndpointError) -> VCPUThreads {
        do throws(QMPError) { return try VCPUThreads.fromQMP(client, pid: process) } catch {
            throw EndpointError(.unreachable, field: "qmp", error.message)
        }
    }
}

/// Any VMM process, its vCPU threads named by id or found by their names (crosvm,
/// cloud-hypervisor, Firecracker, QEMU with debug-threads).
public struct ProcessEndpoint: VMMEndpoint {
    /// How the vCPU threads are found.
    public enum Threads: Sendable, Equatable {
        case ids([Int32])
        case names(VCPUThreadNaming)
    }
    public let process: Int32
    public let threads: Threads
    public var kind: String { "process" }
    public var summary: String { "process \(process)" }
    public var refreshIntervalNs: UInt64? {
        if case .names = threads { return 1_000_000_000 }
        return nil
    }

    public init(process: Int32, threads: Threads) throws(EndpointError) {
        guard process > 0, access("/proc/\(process)", F_OK) == 0 else {
            throw EndpointError(field: "pid", "no process \(process)")
        }
        if case .ids(let ids) = threads {
            guard !ids.isEmpty, ids.count <= 1024 else { throw EndpointError(.invalid, field: "threads", "1-1024 vCPU threads") }
            guard Set(ids).count == ids.count else { throw EndpointError(.invalid, field: "threads", "a thread is listed twice") }
        }
        self.process = process
        self.threads = threads
        _ = try vcpuThreads()
    }

    public func vcpuThreads() throws(EndpointError) -> VCPUThreads {
        switch threads {
        case .ids(let ids):
            for t in ids where !VCPUThreads.isThread(t, of: process) {
                throw EndpointError(field: "threads", "thread \(t) is not a thread of process \(process)")
            }
            return VCPUThreads(vcpus: ids)
        case .names(let naming):
            guard let found = VCPUThreads.byName(pid: process, naming: naming) else {
                throw EndpointError(field: "threadNames",
                                    "process \(process) has no threads named like \(naming.rawValue)'s vCPU threads (numbered from 0)")
            }
            return found
        }
    }
}
