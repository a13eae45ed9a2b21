import PVSchedCore

/// The baseline the RFC compares against: run the vCPU real-time all the time,
/// whatever the guest does (boost at the first entry, never unboost). Use it with
/// an unlimited governor to reproduce "static real-time vCPUs".
public final class StaticRTDriver: Driver {
    public let name: String
    public let protocolName = PVSCHED_PROTOCOL_LATENCY_NAME
    public let protocolVersion = ProtocolVersion.latencyProtocol
    /// Any event will do; a watched VM (no exits seen) has only guest updates and deadlines.
    public let events: EventMask = [.vmEntry, .interruptInjection, .guestUpdate, .deadline]

    public init(name: String = "static-rt") { self.name = name }

    public func decide(event: VCPUEvent, view: VCPUView) -> Decision { view.boosted ? .none : .boost() }
}
