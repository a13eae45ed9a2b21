import CKVM
import PVSchedCore

/// One VM exit, decoded from `kvm_run`: the single enum the run loop switches on.
public enum VMExit: Equatable, Sendable {
    /// Port IO (copied out of kvm_run; a read is answered through `VCPUFD.completeRead`).
    case io(PortIO)
    case mmio(address: UInt64, write: Bool, length: Int)
    case halt
    case interruptWindowOpen
    case shutdown
    case internalError(suberror: UInt32)
    case failEntry(reason: UInt64)
    /// KVM_RUN returned EINTR (a kick) or KVM_EXIT_INTR.
    case interrupted
    case unknown(reason: UInt32)

    init(_ run: UnsafeMutablePointer<kvm_run>) {
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            self = .io(PortIO(run: run))
        case KVM_EXIT_MMIO:
            let m = run.pointee.mmio
            self = .mmio(address: m.phys_addr, write: m.is_write != 0, length: Int(m.len))
        case KVM_EXIT_HLT: self = .halt
        case KVM_EXIT_IRQ_WINDOW_OPEN: self = .interruptWindowOpen
        case KVM_EXIT_SHUTDOWN: self = .shutdown
        case KVM_EXIT_INTERNAL_ERROR: self = .internalError(suberror: run.pointee.internal.suberror)
        case KVM_EXIT_FAIL_ENTRY: self = .failEntry(reason: run.pointee.fail_entry.hardware_entry_failure_reason)
        case KVM_EXIT_INTR: self = .interrupted
        default: self = .unknown(reason: run.pointee.exit_reason)
        }
    }

    /// The hypervisor-neutral reason drivers see.
    public var reason: ExitReason {
        switch self {
        case .io(let a): return .io(port: a.port, write: a.isWrite)
        case .mmio(let addr, let w, _): return .mmio(address: addr, write: w)
        case .halt: return .halt
        case .interruptWindowOpen: return .interruptWindow
        case .shutdown: return .shutdown
        case .interrupted: return .intr
        case .internalError(let s): return .other(code: 0x1_0000 | s)
        case .failEntry: return .other(code: UInt32(KVM_EXIT_FAIL_ENTRY))
        case .unknown(let r): return .other(code: r)
        }
    }
}

/// A port-IO exit, copied out of `kvm_run` when the exit is decoded: the port,
/// the direction, the access size and, for writes, the bytes. It holds no pointer
/// into `kvm_run`, so it cannot outlive its loop iteration in any harmful way; a
/// read's answer goes back through `VCPUFD.completeRead` before the next entry.
public struct PortIO: Equatable, Sendable {
    public let port: UInt16
    public let isWrite: Bool
    /// Bytes per element (1, 2 or 4).
    public let size: Int
    /// The value written (first element, little-endian, `size` bytes); 0 for reads.
    public let value: UInt32
    /// The bytes of string IO beyond one element (empty otherwise, so that the
    /// common single-element exit allocates nothing).
    private let string: [UInt8]

    /// A port access carrying `data` (what the guest wrote; empty for reads).
    public init(port: UInt16, isWrite: Bool, size: Int, data: [UInt8] = []) {
        self.port = port; self.isWrite = isWrite; self.size = size
        value = Self.littleEndian(data.prefix(min(size, 4)))
        string = data.count > size ? data : []
    }

    init(run: UnsafeMutablePointer<kvm_run>) {
        let io = run.pointee.io
        port = io.port
        isWrite = io.direction == UInt8(KVM_EXIT_IO_OUT)
        size = Int(io.size)
        guard isWrite, let bytes = ckvm_io_data(run) else { value = 0; string = []; return }
        // kvm_run's data page holds at most a page of string IO.
        let all = UnsafeBufferPointer(start: bytes, count: min(Int(io.size) * Int(io.count), 4096))
        value = Self.littleEndian(all.prefix(min(size, 4)))
        string = io.count > 1 ? Array(all) : []
    }

    /// Every byte written: `count` elements of `size` for string IO, else the value's `size` bytes.
    public var data: [UInt8] {
        guard isWrite else { return [] }
        return string.isEmpty ? (0..<min(size, 4)).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } : string
    }

    private static func littleEndian(_ bytes: some Collection<UInt8>) -> UInt32 {
        var v: UInt32 = 0
        for (i, b) in bytes.enumerated() { v |= UInt32(b) << (8 * i) }
        return v
    }
}
