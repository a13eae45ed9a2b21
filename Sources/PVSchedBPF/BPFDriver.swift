import Atomics
import PVSchedABI
import PVSchedCore

/// Makes a verified pvsched BPF program a `Driver` like any other: each event
/// becomes a read-only `struct pvsched_bpf_ctx`, the program's r0 becomes the
/// decision. A program that fails at run time (budget, fault) decides nothing
/// for that event, and the failure is counted.
public final class BPFDriver: Driver {
    public let name: String
    public let protocolName: String
    public let protocolVersion: ProtocolVersion
    public let events: EventMask
    public let interpreter: Interpreter
    private let failures = ManagedAtomic<UInt64>(0)

    /// Loads an ELF object, verifies it against the pvsched context, and wraps it.
    /// `name` registers the driver under another name than the one it declares.
    public convenience init(elf: [UInt8], name: String? = nil, budget: Int = 100_000,
                            trace: (@Sendable (String) -> Void)? = nil) throws(BPFError) {
        try self.init(program: try ELFLoader.load(elf), name: name, budget: budget, trace: trace)
    }

    /// `compile: false` keeps the program interpreted (it is compiled to machine code
    /// otherwise, where this machine allows).
    public init(program: Program, name: String? = nil, budget: Int = 100_000,
                trace: (@Sendable (String) -> Void)? = nil, compile: Bool = true) throws(BPFError) {
        guard let d = program.driver else { throw .elf("the object declares no driver (section .pvsched.driver)") }
        guard !d.name.isEmpty else { throw .elf("the driver declaration has an empty name") }
        try Verifier(program: program, context: ContextDescription(size: MemoryLayout<pvsched_bpf_ctx>.size, writable: false)).verify()
        self.name = name ?? d.name
        protocolName = String(cString: pvsched_protocol_latency_name())
        protocolVersion = ProtocolVersion(major: d.protocolMajor, minor: d.protocolMinor)
        var mask: EventMask = []
        if d.events & PVSCHED_EVENT_VM_ENTRY != 0 { mask.insert(.vmEntry) }
        if d.events & PVSCHED_EVENT_VM_EXIT != 0 { mask.insert(.vmExit) }
        if d.events & PVSCHED_EVENT_HALT != 0 { mask.insert(.halt) }
        if d.events & PVSCHED_EVENT_INJECTION != 0 { mask.insert(.interruptInjection) }
        if d.events & PVSCHED_EVENT_GUEST_UPDATE != 0 { mask.insert(.guestUpdate) }
        if d.events & PVSCHED_EVENT_DEADLINE != 0 { mask.insert(.deadline) }
        events = mask
        interpreter = Interpreter(program: program, instructionBudget: budget, trace: trace, verified: compile)
    }

    /// Runs that failed (and decided nothing).
    public var failureCount: UInt64 { failures.load(ordering: .relaxed) }
    public var failedDecisions: UInt64 { failureCount }
    public var maps: [BPFMap] { interpreter.program.maps }

    public func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        var ctx = Self.context(event: event, view: view)
        let r0: UInt64
        do throws(BPFError) {
            r0 = try withUnsafeMutableBytes(of: &ctx) { buf throws(BPFError) in try interpreter.run(context: buf) }
        } catch {
            failures.wrappingIncrement(ordering: .relaxed)
            return .none
        }
        switch UInt32(truncatingIfNeeded: r0) & 0xFF {
        case PVSCHED_BPF_BOOST:
            let p = UInt8(truncatingIfNeeded: r0 >> 8)
            return .boost(priority: p == 0 ? nil : p)
        case PVSCHED_BPF_UNBOOST: return .unboost
        default: return .none
        }
    }

    /// The context a program sees for an event.
    public static func context(event: VCPUEvent, view: VCPUView) -> pvsched_bpf_ctx {
        var c = pvsched_bpf_ctx()
        switch event {
        case .vmEntry: c.event = PVSCHED_EVENT_VM_ENTRY
        case .vmExit(let r):
            c.event = PVSCHED_EVENT_VM_EXIT
            switch r {
            case .io: c.exit_reason = PVSCHED_EXIT_IO
            case .mmio: c.exit_reason = PVSCHED_EXIT_MMIO
            case .halt: c.exit_reason = PVSCHED_EXIT_HALT
            case .interruptWindow: c.exit_reason = PVSCHED_EXIT_IRQ_WINDOW
            case .doorbell: c.exit_reason = PVSCHED_EXIT_DOORBELL
            case .intr: c.exit_reason = PVSCHED_EXIT_INTR
            case .shutdown: c.exit_reason = PVSCHED_EXIT_SHUTDOWN
            case .other: c.exit_reason = PVSCHED_EXIT_OTHER
            }
        case .halt: c.event = PVSCHED_EVENT_HALT
        case .interruptInjection(let v): c.event = PVSCHED_EVENT_INJECTION; c.vector = UInt32(v)
        case .guestUpdate: c.event = PVSCHED_EVENT_GUEST_UPDATE
        case .deadline: c.event = PVSCHED_EVENT_DEADLINE
        }
        c.vcpu = UInt32(view.vcpu)
        c.boosted = view.boosted ? 1 : 0
        c.interrupt_pending = view.interruptPending ? 1 : 0
        let w = view.pendingVectors.words
        c.pending_vectors = (w.0, w.1, w.2, w.3)
        c.now_ns = view.nowNs
        c.boosted_for_ns = view.boostedForNs
        if let g = view.guest {
            c.has_guest = 1
            c.flags = g.flags.rawValue
            switch g.task {
            case .normal(let n): c.task_policy = PVSCHED_TASK_NORMAL; c.task_nice = Int32(n)
            case .fifo(let p): c.task_policy = PVSCHED_TASK_FIFO; c.task_priority = Int32(p)
            case .rr(let p): c.task_policy = PVSCHED_TASK_RR; c.task_priority = Int32(p)
            case .idle: c.task_policy = PVSCHED_TASK_IDLE
            }
            c.next_deadline_ns = g.nextDeadlineNs ?? 0
            c.guest_clock_ns = g.guestClockNs
            c.guest_now_ns = view.guestNowNs ?? 0
        }
        return c
    }
}
