/// What a driver wants done with a vCPU's thread after an event.
public enum Decision: Equatable, Sendable {
    /// Leave the thread as it is.
    case none
    /// Run the thread real-time (at the binding's boost priority, or `priority`
    /// if given, capped by the binding's maximum).
    case boost(priority: UInt8? = nil)
    /// Give the thread back its original parameters.
    case unboost
}

/// Everything a driver may look at when it decides: the guest's shared state
/// for the vCPU (if the guest registered an area) and the host's state of it.
public struct VCPUView: Equatable, Sendable {
    public var vcpu: Int
    /// The guest's latest consistent snapshot, or nil if the guest has no area.
    public var guest: GuestVCPUState?
    /// Whether the vCPU thread is boosted now.
    public var boosted: Bool
    /// Host monotonic time when the current boost began (if boosted).
    public var boostedSinceNs: UInt64?
    /// Host monotonic time of the event.
    public var nowNs: UInt64
    /// An interrupt was injected and the vCPU has not entered the guest since
    /// (so the guest has not seen it yet: its shared state is older than the interrupt).
    public var interruptPending: Bool

    public init(vcpu: Int, guest: GuestVCPUState?, boosted: Bool, boostedSinceNs: UInt64? = nil, nowNs: UInt64,
                interruptPending: Bool = false) {
        self.vcpu = vcpu; self.guest = guest; self.boosted = boosted
        self.boostedSinceNs = boostedSinceNs; self.nowNs = nowNs; self.interruptPending = interruptPending
    }

    /// How long the current boost has lasted.
    public var boostedForNs: UInt64 {
        guard let since = boostedSinceNs, nowNs > since else { return 0 }
        return nowNs - since
    }
}

/// A pvsched driver: a named scheduling policy that turns vCPU events and the
/// guest's shared state into decisions. Drivers are registered by name in a
/// `DriverRegistry`, implement one guest protocol at one version, and see only
/// the core library's types, so the same driver runs under the real VMM, a BPF
/// adapter or a simulator.
public protocol Driver: AnyObject, Sendable {
    /// The unique registry name.
    var name: String { get }
    /// The guest protocol this driver understands.
    var protocolName: String { get }
    var protocolVersion: ProtocolVersion { get }
    /// The events the driver is called for.
    var events: EventMask { get }
    /// Called when the driver starts serving a vCPU (assignment or replacement).
    func attach(vcpu: VCPUHandle)
    /// Called when the driver stops serving a vCPU.
    func detach(vcpu: VCPUHandle)
    /// The policy: a pure function of the event and the view.
    func decide(event: VCPUEvent, view: VCPUView) -> Decision
    /// Decisions that failed so far (a BPF program that faulted or ran out of
    /// budget decides nothing). A driver that keeps failing is ejected from a VM.
    var failedDecisions: UInt64 { get }
}

extension Driver {
    public func attach(vcpu: VCPUHandle) {}
    public func detach(vcpu: VCPUHandle) {}
    public var failedDecisions: UInt64 { 0 }
}
