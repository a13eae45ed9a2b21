import PVSchedABI
import PVSchedCore

/// The deadline-aware latency policy: boost for the guest's real-time work and the
/// interrupts that serve it, not for every interrupt.
///
/// - A timer interrupt boosts only when the guest's published next real-time
///   deadline is near (`horizonNs`, on the guest clock the binding maps) or due:
///   that timer will wake the RT task. A timer tick for round-robin normal tasks
///   does not boost.
/// - Any other interrupt (a device's) boosts: its handler may be what the guest's
///   latency-sensitive work waits for.
/// - A watched VM's `deadline` event boosts (the watcher sends it just ahead of the
///   published deadline).
/// - A running RT task or a boost request starts or keeps a boost. An interrupt
///   handler (irq, softirq, NMI) keeps a running boost, so the handler the boost was
///   for finishes boosted even when it exits to the host midway (a device register
///   read), but does not start one: a round-robin tick's handler is not boosted.
/// - The boost ends at the first event where the guest's state is current (an exit
///   it caused, a line change) and it reports no RT work, no boost request and no
///   near deadline, unless an interrupt the guest has not taken yet is one that
///   would boost by itself (a device's, or the timer near the deadline). A pending
///   round-robin tick does not hold a boost: held for one, a vCPU running batch
///   work kept the boost until the governor cut it, and was then throttled through
///   its RT task's next wake-ups.
public final class DeadlineBoostDriver: Driver {
    /// Tunables of the policy.
    public struct Settings: Equatable, Sendable {
        /// How close the next RT deadline must be for a timer interrupt to boost.
        public var horizonNs: Int64
        /// The vectors of timer interrupts: the built-in VMM's, and Linux's local APIC
        /// timer.
        public var timerVectors: Set<UInt8>
        public init(horizonNs: Int64 = 500_000,
                    timerVectors: Set<UInt8> = [UInt8(PVSCHED_VECTOR_TIMER), UInt8(PVSCHED_VECTOR_LINUX_TIMER)]) {
            self.horizonNs = horizonNs; self.timerVectors = timerVectors
        }
    }

    public let name: String
    public let protocolName = PVSCHED_PROTOCOL_LATENCY_NAME
    public let protocolVersion = ProtocolVersion.latencyProtocol
    public let events: EventMask = .all
    public let settings: Settings

    /// `settings.timerVectors` as a set of vectors, to mask pending ones with.
    private let timerVectors: InterruptVectors

    public init(name: String = "deadline-boost", settings: Settings = Settings()) {
        self.name = name
        self.settings = settings
        self.timerVectors = InterruptVectors(settings.timerVectors)
    }

    /// Guest flags that are real-time work by themselves.
    public static let rtFlags: GuestVCPUState.Flags = [.rtTaskRunning, .boostRequest]
    /// Guest flags of an interrupt handler running: they keep a boost, never start one.
    public static let handlerFlags: GuestVCPUState.Flags = [.inIRQ, .inSoftIRQ, .inNMI]

    public func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        if wantsBoost(event, view) { return view.boosted ? .none : .boost() }
        guard view.boosted, !pendingInterruptWantsBoost(view), LatencyBoostDriver.guestCaused(event) else { return .none }
        return .unboost
    }

    /// Whether an interrupt injected and not yet taken would boost by itself, so the
    /// boost must last until the guest takes it.
    private func pendingInterruptWantsBoost(_ view: VCPUView) -> Bool {
        guard view.interruptPending else { return false }
        guard view.guest != nil else { return true }
        return !view.pendingVectors.subtracting(timerVectors).isEmpty || deadlineNear(view)
    }

    private func wantsBoost(_ event: VCPUEvent, _ view: VCPUView) -> Bool {
        switch event {
        case .deadline: return true
        case .interruptInjection(let vector):
            guard settings.timerVectors.contains(vector) else { return true }
            // Without a shared area there is nothing to tell ticks from deadlines by.
            guard view.guest != nil else { return true }
            return deadlineNear(view)
        default:
            guard let g = view.guest else { return false }
            if !g.flags.isDisjoint(with: Self.rtFlags) { return true }
            // A boosted vCPU whose RT task is about to run, or that is still in the
            // handler of the interrupt it was boosted for, keeps its boost.
            return view.boosted && (!g.flags.isDisjoint(with: Self.handlerFlags) || deadlineNear(view))
        }
    }

    private func deadlineNear(_ view: VCPUView) -> Bool {
        guard let inNs = view.deadlineInNs else { return false }
        return inNs <= settings.horizonNs
    }
}
