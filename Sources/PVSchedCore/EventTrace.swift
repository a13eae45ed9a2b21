import Synchronization

/// One traced notification: what the driver saw, decided, and what happened.
public struct TraceRecord: Sendable, CustomStringConvertible {
    public var timeNs: UInt64
    public var vcpu: Int
    public var event: VCPUEvent
    public var guest: GuestVCPUState?
    public var boosted: Bool
    public var interruptPending: Bool
    public var decision: Decision
    public var outcome: NotifyOutcome

    public var description: String {
        let flags = guest.map { "0x" + String($0.flags.rawValue, radix: 16) } ?? "-"
        let task = guest.map { "\($0.task)" } ?? "-"
        return "\(timeNs / 1000) µs vCPU \(vcpu) \(event) flags \(flags) task \(task) boosted \(boosted)"
            + "\(interruptPending ? " irq-pending" : "") -> \(decision) (\(outcome))"
    }
}

/// A bounded record of the last notifications of each vCPU of a VM, for
/// debugging policies (`pvsched run --trace N`). Off unless a binding is given one.
public final class EventTrace: Sendable {
    public let capacity: Int
    private let rings: Mutex<[[TraceRecord]]>

    public init(vcpus: Int, capacity: Int) {
        self.capacity = max(1, capacity)
        rings = Mutex(Array(repeating: [], count: vcpus))
    }

    func record(_ r: TraceRecord) {
        rings.withLock { rings in
            if rings[r.vcpu].count == capacity { rings[r.vcpu].removeFirst() }
            rings[r.vcpu].append(r)
        }
    }

    /// The kept records of `vcpu`, oldest first.
    public func records(vcpu: Int) -> [TraceRecord] { rings.withLock { $0[vcpu] } }
}
