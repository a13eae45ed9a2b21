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
/// Each vCPU's ring has a lock of its own: recording happens on the vCPU path, where
/// no lock is shared between vCPUs.
public final class EventTrace: Sendable {
    public let capacity: Int
    /// One vCPU's records and the index of the oldest once the ring is full.
    private struct Ring { var records: [TraceRecord] = []; var next = 0 }
    private final class Slot: Sendable { let ring = Mutex(Ring()) }
    private let rings: [Slot]

    public init(vcpus: Int, capacity: Int) {
        self.capacity = max(1, capacity)
        rings = (0..<max(0, vcpus)).map { _ in Slot() }
    }

    func record(_ r: TraceRecord) {
        guard r.vcpu >= 0, r.vcpu < rings.count else { return }
        rings[r.vcpu].ring.withLock { ring in
            if ring.records.count < capacity {
                ring.records.append(r)
            } else {
                ring.records[ring.next] = r
                ring.next = (ring.next + 1) % capacity
            }
        }
    }

    /// The kept records of `vcpu`, oldest first (empty for an unknown vCPU).
    public func records(vcpu: Int) -> [TraceRecord] {
        guard vcpu >= 0, vcpu < rings.count else { return [] }
        return rings[vcpu].ring.withLock { ring in Array(ring.records[ring.next...] + ring.records[..<ring.next]) }
    }

    /// Every vCPU's kept records, vCPU by vCPU, each oldest first.
    public func allRecords() -> [TraceRecord] { rings.indices.flatMap { records(vcpu: $0) } }
}
