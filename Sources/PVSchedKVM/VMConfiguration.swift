import PVSchedABI
import PVSchedCore

/// A guest workload the host selects at boot (`PVSCHED_WORKLOAD_*`).
public enum Workload: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case selftest = 0, cyclic = 1, irqResponse = 2, batch = 3, idle = 4, cyclicBatch = 5
    /// Hostile guests: RT work and a boost request claimed forever; flags flipped at a high rate.
    case hostileStuck = 6, hostileFlip = 7
    public var description: String {
        switch self {
        case .hostileStuck: return "hostile-stuck"
        case .hostileFlip: return "hostile-flip"
        case .cyclicBatch: return "cyclic+batch"
        case .selftest: return "selftest"
        case .cyclic: return "cyclic"
        case .irqResponse: return "irq-response"
        case .batch: return "batch"
        case .idle: return "idle"
        }
    }
}

/// What the guest kernel is told at boot (written into `pvsched_boot_info`).
public struct BootParameters: Sendable {
    public var workload: Workload = .selftest
    /// Per-vCPU workloads (nil entries use `workload`).
    public var perVCPU: [Workload?] = []
    public var arg: UInt32 = 0
    public var intervalNs: UInt64 = 1_000_000
    public var durationNs: UInt64 = 1_000_000_000
    /// Register the pvsched shared area.
    public var pvschedEnabled = true
    public init() {}
}

/// How interrupts reach the guest.
public enum InterruptMode: Sendable {
    /// The VMM injects with KVM_INTERRUPT; HLT exits to the VMM.
    case userspace
    /// In-kernel PIC/IOAPIC/LAPIC; the VMM sends MSIs; HLT stays in the kernel.
    case inKernelIRQChip
}

/// Everything needed to create a VM.
public struct VMConfiguration: Sendable {
    public var name = "guest"
    public var vcpus = 1
    public var memorySize = 64 << 20
    /// Back guest RAM with this shared file (for a daemon that attaches from outside); nil: anonymous.
    public var memoryFile: String?
    /// The flat kernel image, loaded at `PVSCHED_GPA_KERNEL` and entered in long mode.
    public var image: [UInt8]
    public var interrupts: InterruptMode = .userspace
    public var boot = BootParameters()
    /// CPU mask per vCPU thread (bit i = host CPU i); nil leaves threads unpinned.
    public var vcpuAffinity: [UInt64]?
    /// Called with each line the guest prints on its console.
    public var consoleLine: (@Sendable (String) -> Void)?
    /// Device threads (timer, interrupt source) run SCHED_FIFO at this priority when
    /// possible, like the host's hardware-timer interrupt context that KVM's timers use.
    public var deviceThreadPriority: UInt8? = 90

    public init(image: [UInt8]) { self.image = image }
}
