/// Why a vCPU left the guest, as a hypervisor-neutral summary of a VM exit.
public enum ExitReason: Equatable, Sendable, CustomStringConvertible {
    case io(port: UInt16, write: Bool)
    case mmio(address: UInt64, write: Bool)
    case halt
    case interruptWindow
    case doorbell
    case intr
    case shutdown
    case other(code: UInt32)

    public var description: String {
        switch self {
        case .io(let port, let write): return "io 0x\(String(port, radix: 16)) \(write ? "out" : "in")"
        case .mmio(let address, let write): return "mmio 0x\(String(address, radix: 16)) \(write ? "write" : "read")"
        case .halt: return "hlt"
        case .interruptWindow: return "interrupt-window"
        case .doorbell: return "doorbell"
        case .intr: return "kick"
        case .shutdown: return "shutdown"
        case .other(let code): return "other(\(code))"
        }
    }
}

/// A set of interrupt vectors (0...255): the interrupts injected into a vCPU that
/// its guest has not taken yet. Four words, as the BPF context carries it.
public struct InterruptVectors: Equatable, Sendable, ExpressibleByArrayLiteral, CustomStringConvertible {
    /// Bit `v % 64` of word `v / 64` is vector `v`.
    public private(set) var words: (UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0)

    public init() {}
    public init<S: Sequence<UInt8>>(_ vectors: S) { for v in vectors { insert(v) } }
    public init(arrayLiteral vectors: UInt8...) { self.init(vectors) }
    public init(words: (UInt64, UInt64, UInt64, UInt64)) { self.words = words }

    public var isEmpty: Bool { words == (0, 0, 0, 0) }

    public func contains(_ vector: UInt8) -> Bool { word(vector >> 6) & (1 << UInt64(vector & 63)) != 0 }

    public mutating func insert(_ vector: UInt8) {
        let bit: UInt64 = 1 << UInt64(vector & 63)
        switch vector >> 6 {
        case 0: words.0 |= bit
        case 1: words.1 |= bit
        case 2: words.2 |= bit
        default: words.3 |= bit
        }
    }

    public mutating func removeAll() { words = (0, 0, 0, 0) }

    /// The vectors of this set that are not in `other`.
    public func subtracting(_ other: Self) -> Self {
        Self(words: (words.0 & ~other.words.0, words.1 & ~other.words.1, words.2 & ~other.words.2, words.3 & ~other.words.3))
    }

    /// The vectors in ascending order.
    public var vectors: [UInt8] { (0...255).map { UInt8($0) }.filter(contains) }

    public static func == (a: Self, b: Self) -> Bool { a.words == b.words }

    public var description: String { "[" + vectors.map { "0x" + String($0, radix: 16) }.joined(separator: ",") + "]" }

    private func word(_ i: UInt8) -> UInt64 {
        switch i {
        case 0: return words.0
        case 1: return words.1
        case 2: return words.2
        default: return words.3
        }
    }
}

/// A vCPU event the hypervisor component sends to a VM's driver.
public enum VCPUEvent: Equatable, Sendable {
    /// The vCPU thread is about to enter the guest.
    case vmEntry
    /// The vCPU thread came back from the guest.
    case vmExit(ExitReason)
    /// The guest halted the vCPU (idle until an interrupt).
    case halt
    /// A device thread is about to deliver an interrupt to the vCPU (sent before the wake-up).
    case interruptInjection(vector: UInt8)
    /// A watcher saw the guest's line change (VMs whose exits the host does not
    /// see: QEMU under TCG, or any VMM without kernel events). The guest's state is
    /// current at this event, as at an exit the guest caused.
    case guestUpdate
    /// The deadline the guest published for this vCPU is `inNs` away (host clock):
    /// a watcher wakes shortly before it, so a driver can boost ahead of the guest timer.
    case deadline(inNs: UInt64)

    /// The mask bit that subscribes a driver to this event.
    public var kind: EventMask {
        switch self {
        case .vmEntry: return .vmEntry
        case .vmExit: return .vmExit
        case .halt: return .halt
        case .interruptInjection: return .interruptInjection
        case .guestUpdate: return .guestUpdate
        case .deadline: return .deadline
        }
    }
}

/// The set of events a driver subscribes to; it is never called for others.
public struct EventMask: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let vmEntry = EventMask(rawValue: 1 << 0)
    public static let vmExit = EventMask(rawValue: 1 << 1)
    public static let halt = EventMask(rawValue: 1 << 2)
    public static let interruptInjection = EventMask(rawValue: 1 << 3)
    public static let guestUpdate = EventMask(rawValue: 1 << 4)
    public static let deadline = EventMask(rawValue: 1 << 5)
    public static let all: EventMask = [.vmEntry, .vmExit, .halt, .interruptInjection, .guestUpdate, .deadline]

    /// Every event kind with its name: the one place names are spelled (listings,
    /// the control API, metrics, traces).
    public static let named: [(kind: EventMask, name: String)] = [
        (.vmEntry, "vm_entry"), (.vmExit, "vm_exit"), (.halt, "halt"), (.interruptInjection, "interrupt_injection"),
        (.guestUpdate, "guest_update"), (.deadline, "deadline"),
    ]

    /// The names of the kinds in this set, in `named` order.
    public var names: [String] { Self.named.filter { contains($0.kind) }.map(\.name) }
}
