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
    /// Every byte written (string IO: `count` elements of `size`); empty for reads.
    public let data: [UInt8]

    public init(port: UInt16, isWrite: Bool, size: Int, data: [UInt8] = []) {
        self.port = port; self.isWrite = isWrite; self.size = size; self.data = data
    }

    init(run: UnsafeMutablePointer<kvm_run>) {
        let io = run.pointee.io
        port = io.port
        isWrite = io.direction == UInt8(KVM_EXIT_IO_OUT)
        size = Int(io.size)
        if isWrite, let bytes = ckvm_io_data(run) {
            // kvm_run's data page holds at most a page of string IO.
            let n = min(Int(io.size) * Int(io.count), 4096)
            data = Array(UnsafeBufferPointer(start: bytes, count: n))
        } else {
            data = []
        }
    }

    /// The value written (first element, little-endian, `size` bytes).
    public var value: UInt32 {
        var v: UInt32 = 0
        for i in 0..<min(size, 4, data.count) { v |= UInt32(data[i]) << (8 * i) }
        return v
    }
}
