import PVSchedCore
import Synchronization

/// A driver whose decisions a test scripts, and that records what it was called with.
public final class ScriptedDriver: Driver {
    public let name: String
    public let protocolName: String
    public let protocolVersion: ProtocolVersion
    public let events: EventMask
    private let script: @Sendable (VCPUEvent, VCPUView) -> Decision
    private let log = Mutex<[String]>([])

    public init(_ name: String, protocol p: String = "pvsched-latency", version: ProtocolVersion = .init(major: 1, minor: 0),
                events: EventMask = .all, script: @escaping @Sendable (VCPUEvent, VCPUView) -> Decision = { _, _ in .none }) {
        self.name = name; protocolName = p; protocolVersion = version; self.events = events; self.script = script
    }
    public func attach(vcpu: VCPUHandle) { log.withLock { $0.append("attach \(vcpu.index)") } }
    public func detach(vcpu: VCPUHandle) { log.withLock { $0.append("detach \(vcpu.index)") } }
    public func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        log.withLock { $0.append("\(event)") }
        return script(event, view)
    }
    /// Every call so far, in order ("attach 0", "vmEntry", ...).
    public var calls: [String] { log.withLock { $0 } }
}
