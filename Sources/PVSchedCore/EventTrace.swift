import Synchronization

/// One traced notification: what the driver saw, decided, and what happened.
public struct TraceRecord: Sendable, CustomStringConvertible {
    public var timeNs: UInt64
    public var vcpu: Int
    /// The event the driver was told of; nil for the budget enforcer's cut of a boost
    /// that no event came to end.
    public var event: VCPUEvent?
    public var guest: GuestVCPUState?
    public var boosted: Bool
    public var pendingVectors: InterruptVectors
    public var interruptPending: Bool { !pendingVectors.isEmpty }
    /// How far the guest's published deadline was (negative: overdue), as the driver saw it.
    public var deadlineInNs: Int64?
    public var decision: Decision
    public var outcome: NotifyOutcome

    public var description: String {
        let flags = guest.map { "0x" + String($0.flags.rawValue, radix: 16) } ?? "-"
        let task = guest.map { "\($0.task)" } ?? "-"
        return "\(timeNs / 1000) µs vCPU \(vcpu) \(event.map { "\($0)" } ?? "enforcer") flags \(flags) task \(task) boosted \(boosted)"
            + "\(interruptPending ? " irq-pending \(pendingVectors)" : "")"
            + "\(deadlineInNs.map { " deadline \($0 >= 0 ? "+" : "")\($0 / 1000) µs" } ?? "") -> \(decision) (\(outcome))"
    }
}

/// A bounded record of the last notifications of each vCPU of a VM, for
/// debugging policies (`pvsched run --trace N`). Off unless a binding is given one.
public final class EventTrace: Sendable {
    public let capacity: Int
    /// Per vCPU: the records and the index of the oldest once the ring is full.
    private struct Ring { var records: [TraceRecord] = []; var next = 0 }
    private let rings: Mutex<[Ring]>

    public init(vcpus: Int, capacity: Int) {
        self.capacity = max(1, capacity)
        rings = Mutex(Array(repeating: Ring(), count: vcpus))
    }

    func record(_ r: TraceRecord) {
        rings.withLock { rings in
            guard r.vcpu >= 0, r.vcpu < rings.count else { return }
            if rings[r.vcpu].records.count < capacity {
                rings[r.vcpu].records.append(r)
            } else {
                rings[r.vcpu].records[rings[r.vcpu].next] = r
                rings[r.vcpu].next = (rings[r.vcpu].next + 1) % capacity
            }
        }
    }

    /// The kept records of `vcpu`, oldest first (empty for an unknown vCPU).
    public func records(vcpu: Int) -> [TraceRecord] {
        rings.withLock { rings in
            guard vcpu >= 0, vcpu < rings.count else { return [] }
            let ring = rings[vcpu]
            return Array(ring.records[ring.next...] + ring.records[..<ring.next])
        }
    }
}
