import CKVM
import PVSchedCore

/// One VM exit, decoded from `kvm_run`: the single enum the run loop switches on.
public enum VMExit: Sendable {
    /// Port IO. For writes `data` holds the bytes; for reads the handler fills `reply`.
    case io(IOAccess)
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
            self = .io(IOAccess(run: run))
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

/// A port-IO exit: port, direction, access size and the data bytes in `kvm_run`.
public struct IOAccess: @unchecked Sendable {
    public let port: UInt16
    public let isWrite: Bool
    public let size: Int
    public let count: Int
    let data: UnsafeMutablePointer<UInt8>

    init(run: UnsafeMutablePointer<kvm_run>) {
        let io = run.pointee.io
        port = io.port
        isWrite = io.direction == UInt8(KVM_EXIT_IO_OUT)
        size = Int(io.size)
        count = Int(io.count)
        data = ckvm_io_data(run)
    }

    /// The value written (first element, little-endian, `size` bytes).
    public var value: UInt32 {
        var v: UInt32 = 0
        for i in 0..<min(size, 4) { v |= UInt32(data[i]) << (8 * i) }
        return v
    }

    /// All bytes written (for string IO, `count` elements of `size`).
    public var bytes: UnsafeBufferPointer<UInt8> { UnsafeBufferPointer(start: data, count: size * count) }

    /// Answers a read with `value` (first element).
    public func reply(_ value: UInt32) {
        for i in 0..<min(size, 4) { data[i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
}
