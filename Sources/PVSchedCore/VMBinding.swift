import Atomics
import Logging
import Synchronization

/// How a binding boosts a vCPU thread.
public struct BoostSettings: Equatable, Sendable {
    /// Parameters of a boosted thread when the driver names no priority: the boost
    /// class (SCHED_FIFO or SCHED_RR at a priority, or SCHED_OTHER at a nice level).
    public var boosted: SchedulingParameters
    /// The highest real-time priority a driver may ask for.
    public var maxPriority: UInt8
    /// Host real-time tasks at or above this priority are never preempted by a
    /// boost: real-time boosts stay below it, and when none can (1), a boost is
    /// SCHED_OTHER nice -20 instead. Nil protects nothing.
    public var protectedHostPriority: UInt8?
    /// Accept vCPU threads that are already real-time when pvsched is given them
    /// (refused by default: someone else manages them).
    public var allowRealTimeThreads: Bool
    public init(boosted: SchedulingParameters = .fifo(priority: 10), maxPriority: UInt8 = 50, protectedHostPriority: UInt8? = 50,
                allowRealTimeThreads: Bool = false) {
        self.boosted = boosted; self.maxPriority = maxPriority; self.protectedHostPriority = protectedHostPriority
        self.allowRealTimeThreads = allowRealTimeThreads
    }

    /// The parameters of a boost, for a driver that asks for `priority` (nil: the class's own).
    public func parameters(priority: UInt8?) -> SchedulingParameters {
        var p = boosted
        if let priority {
            let n = min(max(priority, 1), maxPriority)
            if case .rr = boosted { p = .rr(priority: n) } else if boosted.isRealTime { p = .fifo(priority: n) }
        }
        guard let limit = protectedHostPriority else { return p }
        switch p {
        case .fifo(let n) where n >= limit: return limit > 1 ? .fifo(priority: limit - 1) : .other(nice: -20)
        case .rr(let n) where n >= limit: return limit > 1 ? .rr(priority: limit - 1) : .other(nice: -20)
        default: return p
        }
    }

    /// The parameters of the threads that follow a boosted vCPU (its companions): one
    /// real-time priority above the vCPU's, within the protected host priorities.
    public func companionParameters(for vcpu: SchedulingParameters) -> SchedulingParameters {
        let above: SchedulingParameters
        switch vcpu {
        case .fifo(let n): above = .fifo(priority: min(n &+ 1, 99))
        case .rr(let n): above = .rr(priority: min(n &+ 1, 99))
        default: above = vcpu
        }
        return BoostSettings(boosted: above, maxPriority: 99, protectedHostPriority: protectedHostPriority)
            .parameters(priority: nil)
    }

    /// The least real-time priority at which a thread (the budget enforcer) preempts
    /// every thread these settings boost: one above the class's own priority, the
    /// highest a driver may ask for and their companions', at most 99; 1 when boosts
    /// stay in the fair class. An enforcer above that would preempt host real-time
    /// work for nothing.
    public var preemptingPriority: UInt8 {
        let vcpus = [parameters(priority: nil), parameters(priority: maxPriority)]
        let top = (vcpus + vcpus.map(companionParameters)).compactMap(\.realTimePriority).max() ?? 0
        return min(top, 98) + 1
    }

    /// The boost classes `parseClass` accepts, for error messages and help.
    public static let classSyntax = "fifo:1-99, rr:1-99, nice:-20-19 or slice:100-100000 (µs; nice -20, or slice:US:nice:N)"
    /// The range of an EEVDF slice the kernel accepts (it clamps others), in µs.
    public static let sliceRangeUs: ClosedRange<Int> = 100...100_000

    /// `p` written as a boost class: what `parseClass` reads back, for the classes it
    /// accepts (batch and idle are never boost classes).
    public static func classText(_ p: SchedulingParameters) -> String {
        switch p {
        case .fifo(let n): return "fifo:\(n)"
        case .rr(let n): return "rr:\(n)"
        case .other(let n): return "nice:\(n)"
        case .slice(let n, let us): return n == -20 ? "slice:\(us)" : "slice:\(us):nice:\(n)"
        case .batch(let n): return "batch:\(n)"
        case .idle: return "idle"
        }
    }

    /// Parses a boost class: `fifo:N`, `rr:N` (N in 1...99), `nice:N` (N in -20...19),
    /// or `slice:US` (SCHED_OTHER nice -20 with a US µs EEVDF slice; `slice:US:nice:N`
    /// for another nice level).
    public static func parseClass(_ text: String) -> SchedulingParameters? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 || parts.count == 4, let n = Int(parts[1]) else { return nil }
        switch parts[0] {
        case "fifo" where parts.count == 2 && (1...99).contains(n): return .fifo(priority: UInt8(n))
        case "rr" where parts.count == 2 && (1...99).contains(n): return .rr(priority: UInt8(n))
        case "nice" where parts.count == 2 && (-20...19).contains(n): return .other(nice: Int8(n))
        case "slice" where sliceRangeUs.contains(n):
            var nice = -20
            if parts.count == 4 {
                guard parts[2] == "nice", let m = Int(parts[3]), (-20...19).contains(m) else { return nil }
                nice = m
            }
            return .slice(nice: Int8(nice), sliceUs: UInt32(n))
        default: return nil
        }
    }
}

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

/// The host component's link between one VM and its driver: receives the
/// hypervisor's vCPU events, asks the driver, passes boosts through the governor
/// and the actuator, and publishes the result in the guest's host line.
///
/// Created and driven by a `DriverRegistry`; the VMM calls `notify` from vCPU and
/// device threads. Safe to call from any thread.
public final class VMBinding: VMEventSink {
    public let vm: VMHandle
    public let governor: Governor
    public let actuator: any Actuator
    public let boost: BoostSettings
    /// Records notifications when set (debugging aid; nil costs one check per event).
    public let trace: EventTrace?
    private let logger: Logger

    private struct Slot {
        var driver: (any Driver)?
        var generation: UInt64 = 0
        var area: SharedArea?
        var disabledReason: SharedAreaError?
        var negotiation = NegotiationStatus.none
        var refusals: [String: UInt64] = [:]
        /// A driver that kept failing, to be ejected by the next budget check (off the vCPU lock).
        var ejectRequest: (driver: String, generation: UInt64, reason: String)?
        /// Why the last driver was ejected.
        var ejection: String?
    }
    /// What `notify` needs of the slot, published whole at every change so that a
    /// vCPU thread reads it with no lock shared with the other vCPUs (one preempted in
    /// it, repaying a boost at nice 19, held up its siblings for milliseconds).
    private final class Dispatch: AtomicReference, Sendable {
        let driver: (any Driver)?
        let generation: UInt64
        let area: SharedArea?
        let disabled: Bool
        init(_ s: Slot) {
            driver = s.driver; generation = s.generation; area = s.area; disabled = s.disabledReason != nil
        }
    }
    private let dispatch = ManagedAtomic(Dispatch(Slot()))
    /// Changes the slot and publishes what `notify` reads of it.
    private func changeSlot<T>(_ body: (inout Slot) -> T) -> T {
        slot.withLock { s in
            let result = body(&s)
            dispatch.store(Dispatch(s), ordering: .releasing)
            return result
        }
    }
    private struct VCPUState {
        var thread: ThreadID?
        var boostStart: UInt64?
        /// The last consistent snapshot, used while the guest is mid-update.
        var lastGuest: GuestVCPUState?
        /// The guest's clock on the host's, learned from fresh lines.
        var guestClock = GuestClockMapping()
        /// Consecutive events that found the sequence counter unsettled.
        var unsettledStreak = 0
        /// Consecutive decisions the driver failed to make.
        var failureStreak = 0
        /// The vectors of the injections seen since the last vmEntry that delivered them.
        var pendingVectors: InterruptVectors = []
        /// The boost the thread is repaying, and what it still owes (see `RepaymentLedger`).
        var ledger = RepaymentLedger()
        var stats = VCPUStats()
        /// When the counters were last published for the control plane.
        var publishedAtNs: UInt64 = 0
        var attachedGeneration: UInt64 = 0
    }
    private final class VCPUSlot: Sendable {
        let state = Mutex(VCPUState())
        /// A copy of the counters for the control plane (stats, top, metrics), so
        /// that readers never take `state`: a reader preempted while holding the
        /// vCPU's lock would stall the vCPU thread. Writers never wait for it.
        let published = Mutex(VCPUStats())
        /// When the vCPU's repayment ends (0: none): the enforcer plans by it without
        /// taking `state` (the ledger there is the truth).
        let repaymentEnd = Atomic<UInt64>(0)
    }
    private let slot = Mutex(Slot())
    /// Threads that deliver the VM's interrupts (QEMU's main loop under TCG): they
    /// run boosted, one priority above the vCPUs, while any vCPU is boosted, since a
    /// boosted vCPU waits for them first. Lock order: a vCPU's lock, then this one.
    private struct Companions {
        var threads: [ThreadID] = []
        var boostedVCPUs = 0
        var applied: SchedulingParameters?
    }
    private let companions = Mutex(Companions())
    /// Consecutive unsettled reads of a vCPU's line after which the area is
    /// treated as hostile and pvsched is disabled for the VM.
    public static let unsettledLimit = 1000
    /// Consecutive failed decisions of one vCPU after which its driver is ejected
    /// (the VM goes back to the default driver).
    public static let failureLimit = 100
    /// Carries out an ejection (set by the registry that made the binding).
    let ejector: @Sendable (VMBinding, _ driver: String, _ reason: String) -> Void
    /// Where every timestamp of this binding (boosts, budgets) comes from.
    public let clock: any HostClock
    private let vcpus: [VCPUSlot]

    init(vm: VMHandle, actuator: any Actuator, governor: GovernorConfig, boost: BoostSettings, trace: EventTrace?,
         logger: Logger, clock: any HostClock = SystemClock(),
         ejector: @escaping @Sendable (VMBinding, String, String) -> Void = { _, _, _ in }) {
        self.ejector = ejector
        self.clock = clock
        self.vm = vm
        self.trace = trace
        self.actuator = actuator
        self.budgetAlarm = BudgetAlarm()
        self.governor = Governor(config: governor, vcpuCount: vm.vcpuCount, alarm: budgetAlarm)
        self.boost = boost
        self.logger = logger
        self.vcpus = (0..<vm.vcpuCount).map { _ in VCPUSlot() }
        self.deadlines = DeadlineSchedule(vcpus: vm.vcpuCount)
    }

    /// The driver serving this VM now.
    public var driver: (any Driver)? { slot.withLock { $0.driver } }
    /// The validated shared area the guest registered, if any.
    public var area: SharedArea? { slot.withLock { $0.area } }
    /// Why pvsched was disabled for this VM (a bad shared area), if it was.
    public var disabledReason: SharedAreaError? { slot.withLock { $0.disabledReason } }
    /// The result of the guest's last registration.
    public var negotiation: NegotiationStatus { slot.withLock { $0.negotiation } }
    /// Why a driver was last ejected from this VM, if one was.
    public var ejection: String? { slot.withLock { $0.ejection } }

    /// Records an ejection (the registry calls this once it has replaced the driver).
    public func recordEjection(_ text: String) { slot.withLock { $0.ejection = text } }

    /// Records the result of a registration (the registrar calls this).
    public func recordNegotiation(_ status: NegotiationStatus) { slot.withLock { $0.negotiation = status } }

    /// Records a refused registration and counts it by reason.
    public func recordRefusal(_ refusal: AreaRefusal) {
        slot.withLock { s in
            s.negotiation = .refused(refusal.message)
            s.refusals[refusal.reason, default: 0] &+= 1
        }
    }

    /// Refused registrations by reason (`AreaRefusal.reason`).
    public var refusalCounts: [String: UInt64] { slot.withLock { $0.refusals } }

    /// The OS thread of each vCPU (nil while it has none).
    public var threads: [ThreadID?] { vcpus.map { v in v.state.withLock { $0.thread } } }

    /// Counters of `vcpu` as last published for the control plane: every boost and
    /// unboost at once, other counts at most ~100 ms old while the VM runs (events and
    /// the enforcer republish), and read without touching
    /// the vCPU's own lock, so that any number of readers cost its thread nothing.
    public func publishedStats(vcpu: Int) -> VCPUStats {
        vcpus[vcpu].published.withLock { $0 }
    }

    /// Publishes `s`'s counters unless a reader holds the copy right now (the next
    /// publish catches up). Call under the vCPU's lock.
    private func publishStats(_ s: inout VCPUState, vcpu: Int, now: UInt64) {
        var snapshot = s.stats
        snapshot.boosted = s.boostStart != nil
        snapshot.repaying = s.ledger.isRepaying
        if vcpus[vcpu].published.withLockIfAvailable({ $0 = snapshot }) != nil { s.publishedAtNs = now }
    }

    /// Exact counters of `vcpu` (takes the vCPU's lock); `boostedNs` includes the
    /// running boost so far.
    public func stats(vcpu: Int) -> VCPUStats {
        let now = clock.nowNs()
        return vcpus[vcpu].state.withLock { s in
            var st = s.stats
            st.boosted = s.boostStart != nil
            st.repaying = s.ledger.isRepaying
            if let start = s.boostStart, now > start { st.boostedNs &+= now - start }
            return st
        }
    }

    /// Totals over all vCPUs.
    public var totals: VCPUStats {
        vcpus.indices.reduce(into: VCPUStats()) { acc, i in acc.add(stats(vcpu: i)) }
    }

    /// Records the OS thread that runs `vcpu` (call from that thread when it starts).
    public func setThread(_ thread: ThreadID?, vcpu: Int) {
        var ownership = ThreadOwnership.pvsched
        var thread = thread
        if let t = thread, t != vcpus[vcpu].state.withLock({ $0.thread }) {
            do { try actuator.adopt(t, allowRealTime: boost.allowRealTimeThreads) } catch {
                if case .realTimeAtAttach = error.kind { ownership = .refusedRealTime }
                if case .threadGone = error.kind { ownership = .gone; thread = nil }
                logger.warning("vCPU thread not managed", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "error": "\(error)"])
            }
        }
        let old: ThreadID? = vcpus[vcpu].state.withLock { s in
            let old = s.thread
            if old != thread {
                endBoost(&s, vcpu: vcpu, now: clock.nowNs())
                s.stats.thread = ownership
                s.ledger.reset()  // the old thread's repayment ends with its release below
                vcpus[vcpu].repaymentEnd.store(0, ordering: .relaxed)
            }
            s.thread = thread
            return old
        }
        if let old, old != thread { actuator.release(old) }
    }

    /// Drops the vCPU threads that exited (a boosted one among them: no event need
    /// come for it to go); whoever feeds the VM calls this now and then (attached
    /// VMs: every second). Returns the vCPUs whose thread was dropped.
    @discardableResult
    public func dropExitedThreads() -> [Int] {
        var dropped: [Int] = []
        let now = clock.nowNs()
        for (i, v) in vcpus.enumerated() {
            guard let t = v.state.withLock({ $0.thread }), actuator.hasExited(t) else { continue }
            v.state.withLock { s in
                guard s.thread == t else { return }
                if s.boostStart != nil { endBoost(&s, vcpu: i, now: now) }
                dropGoneThread(&s, vcpu: i)
                publishStats(&s, vcpu: i, now: now)
            }
            dropped.append(i)
        }
        return dropped
    }

    /// Notes what an actuator error says about who manages `thread` (under its vCPU's lock).
    private func noteOwnership(_ error: ActuatorError, _ s: inout VCPUState, vcpu: Int) {
        if case .threadGone = error.kind { dropGoneThread(&s, vcpu: vcpu); return }
        guard case .ownedByOperator(let current) = error.kind, s.stats.thread != .operator else { return }
        s.stats.thread = .operator
        logger.warning("vCPU thread changed by someone else: pvsched leaves it alone until it is back at its original parameters",
                       metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "now": "\(current.map { "\($0)" } ?? "?")"])
    }

    /// A boost the actuator could not apply: counted by reason, and one state with
    /// one log line per cause (not per attempt). Under the vCPU's lock.
    private func noteFailure(_ error: ActuatorError, _ s: inout VCPUState, vcpu: Int) {
        s.stats.failedBoosts.count(error.reason)
        switch error.kind {
        case .ownedByOperator, .realTimeAtAttach, .threadGone: noteOwnership(error, &s, vcpu: vcpu)
        case .system, .unguarded:
            let why = error.cause
            guard s.stats.boostBlocked != why else { return }
            s.stats.boostBlocked = why
            logger.warning("boosts cannot be applied", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "reason": "\(why)"])
        }
    }

    /// The vCPU's thread exited: it is dropped (the actuator already let it go) and
    /// nothing is done to its id again. Under the vCPU's lock.
    private func dropGoneThread(_ s: inout VCPUState, vcpu: Int) {
        guard s.thread != nil else { return }
        logger.warning("vCPU thread exited: dropped", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "thread": "\(s.thread!)"])
        s.thread = nil
        s.stats.thread = .gone
        s.ledger.reset()
        vcpus[vcpu].repaymentEnd.store(0, ordering: .relaxed)
    }

    /// Sets the VM's interrupt-delivery threads (see `Companions`); the old ones are restored.
    public func setCompanionThreads(_ threads: [ThreadID]) {
        let (old, apply): ([ThreadID], SchedulingParameters?) = companions.withLock { c in
            let old = c.threads.filter { !threads.contains($0) }
            c.threads = threads
            return (old, c.applied)
        }
        for t in old { try? actuator.restore(t) }
        if let apply { for t in threads { try? actuator.apply(apply, to: t) } }
    }

    /// The VM's interrupt-delivery threads.
    public var companionThreads: [ThreadID] { companions.withLock { $0.threads } }

    /// One more (or one fewer) vCPU is boosted: boosts the companions on the first,
    /// restores them after the last. Called under the vCPU's lock.
    private func companionsFollow(boostedVCPU delta: Int, vcpuParameters: SchedulingParameters) {
        companions.withLock { c in
            c.boostedVCPUs = max(0, c.boostedVCPUs + delta)
            guard !c.threads.isEmpty else { return }
            if c.boostedVCPUs > 0, c.applied == nil {
                let p = boost.companionParameters(for: vcpuParameters)
                for t in c.threads { try? actuator.apply(p, to: t) }
                c.applied = p
            } else if c.boostedVCPUs == 0, c.applied != nil {
                for t in c.threads { try? actuator.restore(t) }
                c.applied = nil
            }
        }
    }

    /// Installs the guest's validated area (after the VMM checked it lies in guest RAM).
    /// Dropping the area (the guest withdrew it) undoes every boost: there is
    /// nothing left to decide on.
    public func setArea(_ area: SharedArea?) {
        let hadArea: Bool = changeSlot { s in
            let had = s.area != nil
            s.area = area
            if area != nil { s.disabledReason = nil }
            return had
        }
        if let area { publishAll(area) }
        else if hadArea {
            let now = clock.nowNs()
            for i in vcpus.indices { undoBoost(vcpu: i, now: now) }
        }
    }

    /// Replaces the driver: detaches the old one from every vCPU and undoes its
    /// boosts, then attaches the new one. Returns the old driver.
    @discardableResult
    func install(_ driver: (any Driver)?) -> (any Driver)? {
        let (old, generation): ((any Driver)?, UInt64) = changeSlot { s in
            let old = s.driver
            s.driver = driver
            s.generation &+= 1
            return (old, s.generation)
        }
        let now = clock.nowNs()
        for i in vcpus.indices {
            let handle = VCPUHandle(vm: vm, index: i)
            // The new driver is attached before the vCPU accepts its decisions (until
            // the generation below is set, notify refuses both drivers); the old one
            // is detached after its last decision (an in-flight one holds the lock).
            driver?.attach(vcpu: handle)
            undoBoost(vcpu: i, now: now) { s in
                s.attachedGeneration = generation
                s.failureStreak = 0
            }
            old?.detach(vcpu: handle)
        }
        if let area { publishAll(area) }
        return old
    }

    /// Delivers `event` for `vcpu` to the driver and carries out its decision.
    /// `interruptStillQueued` (for `.vmEntry`) says an injected interrupt could not be
    /// delivered on this entry (the guest has interrupts off), so it stays pending.
    @discardableResult
    public func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool) -> NotifyOutcome {
        let d = dispatch.load(ordering: .acquiring)
        let (driver, generation, area, disabled) = (d.driver, d.generation, d.area, d.disabled)
        guard !disabled, let driver, driver.events.contains(event.kind) else { return .unchanged }
        let now = clock.nowNs()
        var readError: SharedAreaError?
        var failing = false
        var deadlineDue: UInt64?
        let announcesDeadlines = driver.events.contains(.deadline)
        let outcome: NotifyOutcome = vcpus[vcpu].state.withLock { s in
            guard s.attachedGeneration == generation else { return .unchanged }  // raced a replacement
            s.stats.events &+= 1
            var guest: GuestVCPUState?
            if let area {
                do throws(SharedAreaError) {
                    let g = try area.read(vcpu: vcpu)
                    if g.sequence != s.lastGuest?.sequence { s.guestClock.observe(hostNs: now, guestNs: g.guestClockNs) }
                    guest = g
                    s.lastGuest = g
                    s.unsettledStreak = 0
                    if announcesDeadlines {
                        deadlineDue = deadlines.record(vcpu: vcpu, guestNs: g.nextDeadlineNs,
                                                       hostNs: g.nextDeadlineNs.flatMap { s.guestClock.hostTime(guestNs: $0) }, now: now)
                    }
                } catch {
                    // A vCPU preempted (or kicked) in the middle of an update leaves its
                    // counter odd for a while: decide on the last consistent snapshot.
                    // Only a counter that stays unsettled event after event is hostile.
                    if case .sequenceNeverSettled = error, s.unsettledStreak < Self.unsettledLimit {
                        s.unsettledStreak += 1
                        guest = s.lastGuest
                    } else {
                        readError = error
                        return .disabled(error)
                    }
                }
            }
            // A boost past its budget is cut first; the driver still sees the event.
            var cutBy: GovernorVeto?
            if s.boostStart != nil,
               let veto = governor.checkOverrun(vcpu: vcpu, now: now, cpuNs: cpuTime(s), budget: Self.budget(for: s)) {
                cut(&s, vcpu: vcpu, veto: veto, now: now)
                cutBy = veto
            }
            switch event {
            case .interruptInjection(let vector): s.pendingVectors.insert(vector)
            case .vmEntry: if !interruptStillQueued { s.pendingVectors.removeAll() }
            default: break
            }
            var view = VCPUView(vcpu: vcpu, guest: guest, boosted: s.boostStart != nil,
                                boostedSinceNs: s.boostStart, nowNs: now,
                                pendingVectors: s.pendingVectors)
            if guest != nil { view.guestNowNs = s.guestClock.guestTime(hostNs: now) }
            let failedBefore = driver.failedDecisions
            let decision = driver.decide(event: event, view: view)
            let decided = clock.nowNs()
            if driver.failedDecisions != failedBefore {
                s.failureStreak += 1
                if s.failureStreak == Self.failureLimit { failing = true }
            } else {
                s.failureStreak = 0
            }
            s.stats.decisionLatency.record(decided > now ? decided - now : 0)
            s.stats.eventsByKind.count(event)
            // A vCPU that goes idle owes nothing: it wanted no more CPU than it had (a
            // repayment of a sleeping vCPU thread only skewed its EEVDF lag for its next
            // boost: cyclic's fair-class guest p99 1.4-1.5x static-rt's with it, 0.9x without).
            let idle = Self.goesIdle(event, guest: guest)
            if idle { endRepayment(&s, vcpu: vcpu, dueBy: nil) }
            var result = carryOut(decision, &s, vcpu: vcpu, now: now, idle: idle)
            if let cutBy, result == .unchanged { result = .vetoed(cutBy) }
            s.stats.outcomes.count(result)
            if result != .unchanged || now &- s.publishedAtNs >= 100_000 { publishStats(&s, vcpu: vcpu, now: now) }
            trace?.record(TraceRecord(timeNs: now, vcpu: vcpu, event: event, guest: guest, boosted: view.boosted,
                                      pendingVectors: view.pendingVectors, deadlineInNs: view.deadlineInNs, decision: decision,
                                      outcome: result))
            return result
        }
        if let readError { disable(readError) }
        else if outcome != .unchanged, let area { publish(area, vcpu: vcpu) }
        if let deadlineDue { budgetAlarm?.need(checkAtNs: deadlineDue) }
        if failing {
            let reason = "\(Self.failureLimit) decisions in a row failed on vCPU \(vcpu)"
            slot.withLock { s in
                if s.ejectRequest == nil, s.generation == generation { s.ejectRequest = (driver.name, generation, reason) }
            }
        }
        return outcome
    }

    /// Cuts every boost that ran past its budget; the VMM calls this periodically so
    /// a vCPU that never exits cannot keep a boost. Returns how many were cut.
    @discardableResult
    public func enforceBudgets() -> Int {
        // A driver that kept failing is ejected here, away from the vCPU locks.
        let eject: (driver: String, generation: UInt64, reason: String)? = slot.withLock { s in
            let e = s.ejectRequest
            s.ejectRequest = nil
            return e.flatMap { $0.generation == s.generation ? $0 : nil }
        }
        if let eject {
            logger.error("driver ejected", metadata: ["vm": "\(vm)", "driver": "\(eject.driver)", "reason": "\(eject.reason)"])
            ejector(self, eject.driver, eject.reason)
        }
        let now = clock.nowNs()
        var cutCount = 0
        for (i, v) in vcpus.enumerated() {
            let wasCut: Bool = v.state.withLock { s in
                defer { if s.publishedAtNs != now { publishStats(&s, vcpu: i, now: now) } }
                endRepayment(&s, vcpu: i, dueBy: now)
                guard s.boostStart != nil,
                      let veto = governor.checkOverrun(vcpu: i, now: now, cpuNs: cpuTime(s), budget: Self.budget(for: s)) else { return false }
                cut(&s, vcpu: i, veto: veto, now: now)
                trace?.record(TraceRecord(timeNs: now, vcpu: i, event: nil, guest: s.lastGuest, boosted: true,
                                          pendingVectors: s.pendingVectors, decision: .none, outcome: .vetoed(veto)))
                return true
            }
            if wasCut { cutCount += 1; if let area { publish(area, vcpu: i) } }
        }
        return cutCount
    }

    /// Sends `deadline` for each vCPU whose published deadline is due (see
    /// `DeadlineSchedule`); the enforcer calls this. Returns how many.
    @discardableResult
    public func announceDeadlines() -> Int {
        let due = deadlines.takeDue(now: clock.nowNs())
        for d in due { notify(.deadline(inNs: d.inNs), vcpu: d.vcpu) }
        return due.count
    }

    /// When the enforcer must next look (see `VMEventSink.nextEnforcerWakeNs`).
    public func nextEnforcerWakeNs() -> UInt64? {
        var next = min(governor.nextCheckNs() ?? .max, deadlines.nextDueNs() ?? .max)
        for v in vcpus {
            let end = v.repaymentEnd.load(ordering: .relaxed)
            if end != 0 { next = min(next, end) }
        }
        return next == .max ? nil : next
    }

    /// The deadlines the guest published, announced ahead as `deadline` events to a
    /// driver that subscribes to them.
    public let deadlines: DeadlineSchedule

    /// The enforcer sleeps on it; the governor rings it when a boost could run out
    /// before the enforcer planned to look.
    public let budgetAlarm: BudgetAlarm?
    /// Just above this VM's boosts (`BoostSettings.preemptingPriority`).
    public var enforcerPriority: UInt8? { boost.preemptingPriority }

    /// Undoes every boost and detaches the driver (VM exit).
    public func shutdown() {
        install(nil)
    }

    /// Whether `event` shows the vCPU going idle: it halts, or its current line says so.
    private static func goesIdle(_ event: VCPUEvent, guest: GuestVCPUState?) -> Bool {
        switch event {
        case .halt, .vmExit(.halt): return true
        case .guestUpdate: return guest?.flags.contains(.idle) ?? false
        default: return false
        }
    }

    /// Carries out `decision`; `idle`: the vCPU is going idle (an unboost then owes nothing).
    private func carryOut(_ decision: Decision, _ s: inout VCPUState, vcpu: Int, now: UInt64, idle: Bool) -> NotifyOutcome {
        switch decision {
        case .none:
            return .unchanged
        case .boost(let priority):
            guard s.boostStart == nil else { return .unchanged }
            guard let thread = s.thread, s.stats.thread != .refusedRealTime else { return .unchanged }
            if let veto = governor.beginBoost(vcpu: vcpu, now: now, cpuNs: cpuTime(s), budget: Self.budget(for: s)) {
                s.stats.throttleCount &+= 1
                Self.countVeto(veto, &s.stats)
                return .vetoed(veto)
            }
            let params = boost.parameters(priority: priority)
            if s.ledger.isRepaying {
                // Latency wins: the repayment ends (what is left of it is owed) and the
                // boost starts from the thread's own parameters.
                s.ledger.repaymentCut(now: now, maxNs: governor.config(vcpu: vcpu).maxRepaymentNs)
                vcpus[vcpu].repaymentEnd.store(0, ordering: .relaxed)
                try? actuator.restore(thread)
            }
            s.ledger.boostBegan(cpuNs: cpuTime(s))
            do {
                try actuator.apply(params, to: thread)
                if s.stats.thread == .operator {
                    s.stats.thread = .pvsched
                    logger.info("vCPU thread back at its original parameters: pvsched manages it again", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)"])
                }
            } catch {
                governor.endBoost(vcpu: vcpu, now: now, cpuNs: cpuTime(s))
                if case .system = error.kind { try? actuator.restore(thread) }
                noteFailure(error, &s, vcpu: vcpu)
                return .actuatorFailed(error)
            }
            if s.stats.boostBlocked != nil {
                s.stats.boostBlocked = nil
                logger.notice("boosts apply again", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)"])
            }
            s.boostStart = now
            s.stats.boostCount &+= 1
            companionsFollow(boostedVCPU: 1, vcpuParameters: params)
            return .boosted
        case .unboost:
            guard s.boostStart != nil else { return .unchanged }
            endBoost(&s, vcpu: vcpu, now: now)
            if let thread = s.thread {
                do { try settle(&s, vcpu: vcpu, thread: thread, now: now, repay: !idle) } catch {
                    noteOwnership(error, &s, vcpu: vcpu)
                    return .actuatorFailed(error)
                }
            }
            return .unboosted
        }
    }

    /// A boost ended: the thread repays it at the least weight of its own class (see
    /// `RepaymentLedger`), or goes back to its own parameters when nothing is owed
    /// (`repay` false: the vCPU goes idle).
    private func settle(_ s: inout VCPUState, vcpu: Int, thread: ThreadID, now: UInt64, repay: Bool = true) throws(ActuatorError) {
        let config = governor.config(vcpu: vcpu)
        // No class to repay at (a real-time, SCHED_IDLE or nice-19 thread): nothing is owed.
        let repayment = repay ? actuator.baseline(of: thread)?.repayment : nil
        if let repayment,
           let ns = s.ledger.boostEnded(cpuNs: cpuTime(s), now: now, factor: config.repaymentFactor, maxNs: config.maxRepaymentNs) {
            do {
                try actuator.apply(repayment, to: thread)
                s.stats.repayments &+= 1
                s.stats.repaymentNs &+= ns
                vcpus[vcpu].repaymentEnd.store(now &+ ns, ordering: .relaxed)
                budgetAlarm?.need(checkAtNs: now &+ ns)
                return
            } catch {
                s.ledger.repaymentEnded()
                if case .ownedByOperator = error.kind { throw error }
            }
        }
        if repayment == nil { s.ledger.reset() }
        try actuator.restore(thread)
    }

    /// Ends `vcpu`'s repayment if it is due by `now` (or at once when `now` is nil):
    /// the thread goes back to its own parameters. Under the vCPU's lock.
    private func endRepayment(_ s: inout VCPUState, vcpu: Int, dueBy now: UInt64?) {
        guard s.boostStart == nil, let until = s.ledger.repayingUntilNs, now.map({ until <= $0 }) ?? true else { return }
        vcpus[vcpu].repaymentEnd.store(0, ordering: .relaxed)
        s.ledger.repaymentEnded()
        guard let thread = s.thread else { return }
        do { try actuator.restore(thread) } catch { noteOwnership(error, &s, vcpu: vcpu) }
    }

    /// The boosted thread's CPU time now, for the governor (nil without a CPU clock).
    private func cpuTime(_ s: VCPUState) -> UInt64? { s.thread.flatMap { actuator.cpuTimeNs(of: $0) } }

    /// The budget a boost is charged to in the vCPU's present state: the critical
    /// one while the guest is in an interrupt, softirq, NMI or preemption-off
    /// section, or has an injected interrupt not yet taken while it runs no real-time
    /// task; the general one otherwise.
    private static func budget(for s: VCPUState) -> BoostBudget {
        let flags = s.lastGuest?.flags ?? []
        if !flags.isDisjoint(with: [.inIRQ, .inSoftIRQ, .inNMI, .preemptDisabled]) { return .critical }
        // An interrupt not taken yet is what a boost waits for, unless the guest runs
        // real-time work meanwhile: then the time is that work's (a tick queued while
        // an RT task ran used to charge the task's run to the short budget).
        if !s.pendingVectors.isEmpty && !flags.contains(.rtTaskRunning) { return .critical }
        return .general
    }

    /// Ends a running boost's accounting (the governor's too); the caller restores the thread.
    private func endBoost(_ s: inout VCPUState, vcpu: Int, now: UInt64) {
        guard s.boostStart != nil else { return }
        governor.endBoost(vcpu: vcpu, now: now, cpuNs: cpuTime(s))
        clearBoost(&s, now: now)
    }

    /// Adds the running boost's time to the counters and marks the vCPU unboosted.
    private func clearBoost(_ s: inout VCPUState, now: UInt64) {
        guard let start = s.boostStart else { return }
        s.stats.boostedNs &+= now > start ? now - start : 0
        s.boostStart = nil
        companionsFollow(boostedVCPU: -1, vcpuParameters: boost.boosted)
    }

    /// Ends `vcpu`'s boost or repayment, if any, and puts its thread back (after `also`
    /// under the same lock): nothing is owed after a driver replacement or a detach.
    private func undoBoost(vcpu: Int, now: UInt64, also: (inout VCPUState) -> Void = { _ in }) {
        let thread: ThreadID? = vcpus[vcpu].state.withLock { s in
            also(&s)
            if s.ledger.isRepaying {
                endRepayment(&s, vcpu: vcpu, dueBy: nil)
                publishStats(&s, vcpu: vcpu, now: now)
            }
            guard s.boostStart != nil else { return nil }
            endBoost(&s, vcpu: vcpu, now: now)
            s.ledger.reset()
            publishStats(&s, vcpu: vcpu, now: now)
            return s.thread
        }
        if let thread { try? actuator.restore(thread) }
    }

    /// A boost the governor ended (it already did its own accounting): count, restore.
    private func cut(_ s: inout VCPUState, vcpu: Int, veto: GovernorVeto, now: UInt64) {
        clearBoost(&s, now: now)
        s.stats.throttleCount &+= 1
        Self.countVeto(veto, &s.stats)
        if let thread = s.thread {
            do { try settle(&s, vcpu: vcpu, thread: thread, now: now) } catch { noteOwnership(error, &s, vcpu: vcpu) }
        }
        logger.debug("boost cut", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "reason": "\(veto)", "guest": "\(s.lastGuest.map { "flags 0x\(String($0.flags.rawValue, radix: 16)) \($0.task) seq \($0.sequence)" } ?? "-")"])
    }

    private static func countVeto(_ veto: GovernorVeto, _ stats: inout VCPUStats) {
        switch veto {
        case .throttled, .budgetExhausted: stats.vetoesThrottled &+= 1
        case .vmShareExhausted: stats.vetoesVMShare &+= 1
        }
    }

    /// Disables pvsched for the VM after a bad read (or when the memory behind its
    /// area went away): drops the area and undoes every boost.
    public func disable(_ error: SharedAreaError) {
        let first: Bool = changeSlot { s in
            guard s.area != nil || (s.disabledReason == nil && !error.isReadError) else { return false }
            s.area = nil
            s.disabledReason = error
            return true
        }
        guard first else { return }
        logger.error("pvsched disabled for VM: invalid shared area", metadata: ["vm": "\(vm)", "error": "\(error)"])
        let now = clock.nowNs()
        for i in vcpus.indices { undoBoost(vcpu: i, now: now) }
    }

    private func publish(_ area: SharedArea, vcpu: Int) {
        let st = stats(vcpu: vcpu)
        let status: HostVCPUStatus = st.boosted ? .boosted : (isThrottled(vcpu) ? .throttled : .normal)
        try? area.publish(vcpu: vcpu, status: status, boostCount: st.boostCount, boostedNs: st.boostedNs,
                          throttleCount: st.throttleCount)
    }

    private func isThrottled(_ vcpu: Int) -> Bool {
        governor.isThrottled(vcpu: vcpu, now: clock.nowNs())
    }

    private func publishAll(_ area: SharedArea) {
        for i in 0..<min(vcpus.count, area.layout.vcpuCount) { publish(area, vcpu: i) }
    }
}
