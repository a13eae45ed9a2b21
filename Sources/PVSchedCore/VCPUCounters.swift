/// What a notification led to on the vCPU's thread.
public enum NotifyOutcome: Equatable, Sendable {
    /// No driver, event not subscribed, or the decision changed nothing.
    case unchanged
    case boosted
    case unboosted
    /// The governor refused the boost, or cut a running one.
    case vetoed(GovernorVeto)
    /// The shared area was invalid: pvsched is now disabled for the VM.
    case disabled(SharedAreaError)
    /// The actuator failed; the thread is left at its original parameters.
    case actuatorFailed(ActuatorError)
}

/// Counters of one vCPU's boosts, as the host sees them.
public struct VCPUStats: Equatable, Sendable {
    public var boostCount: UInt64 = 0
    public var boostedNs: UInt64 = 0
    /// Boosts the governor cut or refused (all veto reasons).
    public var throttleCount: UInt64 = 0
    /// Events delivered to the driver.
    public var events: UInt64 = 0
    /// Events delivered, by kind (`EventCounts.kinds` order).
    public var eventsByKind = EventCounts()
    /// Notifications by outcome.
    public var outcomes = OutcomeCounts()
    /// Governor vetoes (refusals and cuts) by reason.
    public var vetoesThrottled: UInt64 = 0
    public var vetoesVMShare: UInt64 = 0
    /// Time from the event to the driver's decision: reading the guest's line, the
    /// governor's check and `decide` itself.
    public var decisionLatency = LatencyBuckets()
    /// Boosts repaid (the thread ran at the least weight afterwards), and the
    /// repayment time they were given in all.
    public var repayments: UInt64 = 0
    public var repaymentNs: UInt64 = 0
    /// Halts the boost was held through, the guest's next deadline near (`VCPULane.hold`).
    public var holds: UInt64 = 0
    /// Whether the vCPU thread is boosted now (a snapshot, not a counter).
    public var boosted: Bool = false
    /// Whether the vCPU thread is repaying a boost now (a snapshot).
    public var repaying: Bool = false
    /// Who manages the vCPU thread's scheduling now (a snapshot).
    public var thread: ThreadOwnership = .pvsched
    /// Why the vCPU's boosts cannot be applied now, nil when they can (a snapshot:
    /// set by the first boost that fails for a cause, cleared by the next that works).
    public var boostBlocked: String?
    /// Boosts the actuator could not apply, by reason.
    public var failedBoosts = BoostFailureCounts()
    public init() {}

    /// Adds `other`'s counters to these (snapshots are or-ed).
    public mutating func add(_ o: VCPUStats) {
        boostCount &+= o.boostCount; boostedNs &+= o.boostedNs; throttleCount &+= o.throttleCount
        events &+= o.events; eventsByKind.add(o.eventsByKind); outcomes.add(o.outcomes)
        vetoesThrottled &+= o.vetoesThrottled; vetoesVMShare &+= o.vetoesVMShare
        decisionLatency.add(o.decisionLatency); boosted = boosted || o.boosted
        repayments &+= o.repayments; repaymentNs &+= o.repaymentNs; repaying = repaying || o.repaying
        holds &+= o.holds
        failedBoosts.add(o.failedBoosts); boostBlocked = boostBlocked ?? o.boostBlocked
    }
}

/// Boosts the actuator could not apply, by `ActuatorError.reason`.
public struct BoostFailureCounts: Equatable, Sendable {
    public var permissionDenied: UInt64 = 0
    public var unguarded: UInt64 = 0
    public var threadGone: UInt64 = 0
    public var operatorOwned: UInt64 = 0
    public var other: UInt64 = 0
    public init() {}
    mutating func count(_ reason: String) {
        switch reason {
        case "permission_denied": permissionDenied &+= 1
        case "unguarded": unguarded &+= 1
        case "thread_gone": threadGone &+= 1
        case "operator_owned", "refused_real_time": operatorOwned &+= 1
        default: other &+= 1
        }
    }
    mutating func add(_ o: BoostFailureCounts) {
        permissionDenied &+= o.permissionDenied; unguarded &+= o.unguarded; threadGone &+= o.threadGone
        operatorOwned &+= o.operatorOwned; other &+= o.other
    }
    /// (reason, count) pairs, for listings and metrics.
    public var byName: [(String, UInt64)] {
        [("permission_denied", permissionDenied), ("unguarded", unguarded), ("thread_gone", threadGone),
         ("operator_owned", operatorOwned), ("other", other)]
    }
}

/// Who manages a vCPU thread's scheduling parameters.
public enum ThreadOwnership: String, Equatable, Sendable {
    /// pvsched boosts it and puts it back.
    case pvsched
    /// Someone else changed it (an administrator's chrt or renice): pvsched leaves
    /// it alone until it is back at the parameters it had when pvsched took it.
    case `operator`
    /// It was already real-time when pvsched was given it: refused (see `BoostSettings.allowRealTimeThreads`).
    case refusedRealTime = "refused_real_time"
    /// It exited: dropped, never acted on again (its id may name another thread),
    /// until the VMM's next listing names the vCPU's new thread.
    case gone
}

/// Events delivered to a driver, by kind.
public struct EventCounts: Equatable, Sendable {
    public var vmEntry: UInt64 = 0
    public var vmExit: UInt64 = 0
    public var halt: UInt64 = 0
    public var interruptInjection: UInt64 = 0
    public var guestUpdate: UInt64 = 0
    public var deadline: UInt64 = 0
    public init() {}
    mutating func count(_ e: VCPUEvent) {
        switch e {
        case .vmEntry: vmEntry &+= 1
        case .vmExit: vmExit &+= 1
        case .halt: halt &+= 1
        case .interruptInjection: interruptInjection &+= 1
        case .guestUpdate: guestUpdate &+= 1
        case .deadline: deadline &+= 1
        }
    }
    mutating func add(_ o: EventCounts) {
        vmEntry &+= o.vmEntry; vmExit &+= o.vmExit; halt &+= o.halt; interruptInjection &+= o.interruptInjection
        guestUpdate &+= o.guestUpdate; deadline &+= o.deadline
    }
    /// (kind name, count) pairs, for listings and metrics.
    public var byName: [(String, UInt64)] {
        let counts = [vmEntry, vmExit, halt, interruptInjection, guestUpdate, deadline]
        return zip(EventMask.named, counts).map { ($0.0.name, $0.1) }
    }
}

/// Notifications by outcome.
public struct OutcomeCounts: Equatable, Sendable {
    public var unchanged: UInt64 = 0
    public var boosted: UInt64 = 0
    public var unboosted: UInt64 = 0
    public var vetoed: UInt64 = 0
    public var disabled: UInt64 = 0
    public var actuatorFailed: UInt64 = 0
    public init() {}
    mutating func count(_ o: NotifyOutcome) {
        switch o {
        case .unchanged: unchanged &+= 1
        case .boosted: boosted &+= 1
        case .unboosted: unboosted &+= 1
        case .vetoed: vetoed &+= 1
        case .disabled: disabled &+= 1
        case .actuatorFailed: actuatorFailed &+= 1
        }
    }
    mutating func add(_ o: OutcomeCounts) {
        unchanged &+= o.unchanged; boosted &+= o.boosted; unboosted &+= o.unboosted
        vetoed &+= o.vetoed; disabled &+= o.disabled; actuatorFailed &+= o.actuatorFailed
    }
    /// (outcome name, count) pairs, for listings and metrics.
    public var byName: [(String, UInt64)] {
        [("unchanged", unchanged), ("boosted", boosted), ("unboosted", unboosted), ("vetoed", vetoed),
         ("disabled", disabled), ("actuator_failed", actuatorFailed)]
    }
}

/// A fixed histogram of durations in power-of-two buckets (64 ns ... 2^21 ns and
/// above): cheap enough to update on every event, exact in its bucket counts.
/// Inline storage: a snapshot taken by a reader never makes the vCPU thread's
/// next update copy (and allocate) the buckets.
public struct LatencyBuckets: Equatable, Sendable {
    /// Upper bounds (inclusive) of the buckets in ns; the last bucket is unbounded.
    public static let upperBoundsNs: [UInt64] = (6...21).map { UInt64(1) << UInt64($0) }
    static let bucketCount = 17
    private var storage = InlineArray<17, UInt64>(repeating: 0)
    public var sumNs: UInt64 = 0
    public var total: UInt64 = 0
    public init() {}

    /// The count of each bucket (the last is the overflow bucket).
    public var counts: [UInt64] { (0..<Self.bucketCount).map { storage[$0] } }

    mutating func record(_ ns: UInt64) {
        // Bucket i holds (2^(i+5), 2^(i+6)]; 64 ns and below fall in bucket 0.
        let bits = ns <= 64 ? 6 : 64 - (ns - 1).leadingZeroBitCount
        let i = min(bits - 6, Self.bucketCount - 1)
        storage[i] &+= 1
        sumNs &+= ns
        total &+= 1
    }
    mutating func add(_ o: LatencyBuckets) {
        for i in 0..<Self.bucketCount { storage[i] &+= o.storage[i] }
        sumNs &+= o.sumNs; total &+= o.total
    }
    public static func == (a: LatencyBuckets, b: LatencyBuckets) -> Bool {
        a.sumNs == b.sumNs && a.total == b.total && (0..<bucketCount).allSatisfy { a.storage[$0] == b.storage[$0] }
    }
}

/// Whether the guest's area was accepted, and why not.
public enum NegotiationStatus: Equatable, Sendable, CustomStringConvertible {
    /// The guest registered no area (or withdrew it).
    case none
    case accepted(String)
    case refused(String)
    public var description: String {
        switch self {
        case .none: return "no area registered"
        case .accepted(let s): return "accepted: \(s)"
        case .refused(let s): return "refused: \(s)"
        }
    }
}

