import Synchronization
@testable import PVSchedCore

/// A driver whose decisions a test scripts, and that records what it was called with.
final class ScriptedDriver: Driver {
    let name: String
    let protocolName: String
    let protocolVersion: ProtocolVersion
    let events: EventMask
    private let script: @Sendable (VCPUEvent, VCPUView) -> Decision
    let log = Mutex<[String]>([])

    init(_ name: String, protocol p: String = "pvsched-latency", version: ProtocolVersion = .init(major: 1, minor: 0),
         events: EventMask = .all, script: @escaping @Sendable (VCPUEvent, VCPUView) -> Decision = { _, _ in .none }) {
        self.name = name; protocolName = p; protocolVersion = version; self.events = events; self.script = script
    }
    func attach(vcpu: VCPUHandle) { log.withLock { $0.append("attach \(vcpu.index)") } }
    func detach(vcpu: VCPUHandle) { log.withLock { $0.append("detach \(vcpu.index)") } }
    func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        log.withLock { $0.append("\(event)") }
        return script(event, view)
    }
    var calls: [String] { log.withLock { $0 } }
}

let testVM = VMHandle(id: 1, name: "test", vcpuCount: 2)
