import PVSchedABI
import PVSchedCore

/// The seed's sample driver: subscribes to every event and decides nothing.
/// Useful to measure the cost of the notification path itself.
public final class NopDriver: Driver {
    public let name: String
    public let protocolName = PVSCHED_PROTOCOL_LATENCY_NAME
    public let protocolVersion = ProtocolVersion.latencyProtocol
    public let events: EventMask = .all

    public init(name: String = "nop") { self.name = name }

    public func decide(event: VCPUEvent, view: VCPUView) -> Decision { .none }
}

extension ProtocolVersion {
    /// The version of the `pvsched-latency` protocol in pvsched_abi.h.
    public static let latencyProtocol = ProtocolVersion(major: UInt16(PVSCHED_PROTOCOL_LATENCY_MAJOR),
                                                        minor: UInt16(PVSCHED_PROTOCOL_LATENCY_MINOR))
}

/// The `pvsched-latency` protocol name from pvsched_abi.h.
public let PVSCHED_PROTOCOL_LATENCY_NAME = String(cString: pvsched_protocol_latency_name())
