import PVSchedCore

/// A driver that runs a vCPU real-time exactly while the guest does
/// latency-sensitive work: from interrupt injection, while the guest reports an
/// interrupt handler (irq/softirq/nmi), a real-time task or a boost request, and
/// from shortly before a deadline it published (the `deadline` event of a
/// watched VM, or, with `deadlineHorizonNs`, a deadline seen at any event). A preempt-disabled section keeps a
/// running boost for at most `preemptDisabledCapNs`. When nothing holds, it
/// unboosts, at the next exit the guest caused (IO, MMIO, HLT, doorbell) or the
/// next change of its line a watcher saw.
public final class LatencyBoostDriver: Driver {
    /// Tunables of the policy.
    public struct Settings: Equatable, Sendable {
        /// How long a preempt-disabled section alone may keep a boost.
        public var preemptDisabledCapNs: UInt64
        /// A pending deadline closer than this (on the guest clock) keeps or starts a boost.
        public var deadlineHorizonNs: UInt64
        public init(preemptDisabledCapNs: UInt64 = 1_000_000, deadlineHorizonNs: UInt64 = 0) {
            self.preemptDisabledCapNs = preemptDisabledCapNs
            self.deadlineHorizonNs = deadlineHorizonNs
        }
    }

    public let name: String
    public let protocolName = PVSCHED_PROTOCOL_LATENCY_NAME
    public let protocolVersion = ProtocolVersion.latencyProtocol
    public let events: EventMask = .all
    public let settings: Settings

    public init(name: String = "latency-boost", settings: Settings = Settings()) {
        self.name = name
        self.settings = settings
    }

    /// Guest flags that by themselves call for a boost.
    public static let boostingFlags: GuestVCPUState.Flags = [.inIRQ, .inSoftIRQ, .inNMI, .rtTaskRunning, .boostRequest]

    public func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        if event.kind == .interruptInjection || event.kind == .deadline || guestWantsBoost(view) {
            return view.boosted ? .none : .boost()
        }
        // End a boost only where the guest's state is current: at an exit the guest
        // itself caused, with no injected interrupt still waiting for it. At entry,
        // after a kick, or with an interrupt pending, the guest still looks idle.
        guard view.boosted, !view.interruptPending, Self.guestCaused(event) else { return .none }
        if let g = view.guest, g.flags.contains(.preemptDisabled), view.boostedForNs < settings.preemptDisabledCapNs {
            return .none
        }
        return .unboost
    }

    /// Events at which the guest's shared state reflects what it runs now.
    static func guestCaused(_ event: VCPUEvent) -> Bool {
        switch event {
        case .halt, .guestUpdate: return true
        case .vmExit(let reason):
            switch reason {
            case .io, .mmio, .halt, .doorbell: return true
            case .interruptWindow, .intr, .shutdown, .other: return false
            }
        case .vmEntry, .interruptInjection, .deadline: return false
        }
    }

    private func guestWantsBoost(_ view: VCPUView) -> Bool {
        guard let g = view.guest else { return false }
        if !g.flags.isDisjoint(with: Self.boostingFlags) { return true }
        if settings.deadlineHorizonNs > 0, let slack = g.slackNs, slack <= settings.deadlineHorizonNs { return true }
        return false
    }
}
