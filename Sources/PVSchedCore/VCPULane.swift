/// What a vCPU's lane asks its binding to do to the vCPU's thread, in order.
public enum Actuation: Equatable, Sendable {
    /// Set `parameters` on the thread, for `purpose`.
    case apply(SchedulingParameters, ThreadID, Purpose)
    /// Put the thread back to its own parameters, for `purpose`.
    case restore(ThreadID, Purpose)

    /// Why: what a failure of the step means for the lane (`VCPULane.failed`).
    public enum Purpose: Equatable, Sendable {
        /// A boost begins.
        case boost
        /// A repayment begins after a boost.
        case repayment
        /// A repayment ends (served, cut short by a boost, or going idle).
        case endRepayment
        /// A boost (or repayment) ends with nothing owed, or is undone.
        case unboost
    }

    public var thread: ThreadID {
        switch self {
        case .apply(_, let t, _), .restore(let t, _): return t
        }
    }
}

/// Something a lane's step wants said (the lane itself does no I/O).
public enum LaneNote: Equatable, Sendable {
    /// Someone else changed the thread (`now`: its parameters then): left alone.
    case operatorTookThread(now: SchedulingParameters?)
    /// The thread is back at its original parameters: pvsched manages it again.
    case operatorGaveBack
    /// Boosts cannot be applied, for this cause (said once per cause).
    case boostsBlocked(String)
    /// Boosts apply again.
    case boostsApplyAgain
    /// The thread exited: dropped.
    case threadGone(ThreadID)
    /// The governor cut a running boost.
    case cut(GovernorVeto)
}

/// What one step of a lane produced, for the binding to carry out.
public struct LaneStep: Equatable, Sendable {
    /// In order; the binding reports a failed one to `VCPULane.failed`.
    public var actuations: [Actuation] = []
    /// The budget alarm must ring by then (a boost or repayment that could end sooner
    /// than the enforcer planned to look).
    public var alarmAt: UInt64?
    /// +1: a boost began; -1: one ended (the VM's companion threads follow).
    public var boostsDelta = 0
    /// The parameters of the boost that began (the companions run one priority above).
    public var boostParameters: SchedulingParameters?
    /// The boost is now held through the vCPU's halt for a deadline (host ns), or
    /// no longer (nil inside: released).
    public var held: UInt64??
    public var notes: [LaneNote] = []
    public init() {}

    mutating func merge(_ other: LaneStep) {
        actuations += other.actuations
        if let a = other.alarmAt { alarmAt = min(alarmAt ?? .max, a) }
        boostsDelta += other.boostsDelta
        boostParameters = other.boostParameters ?? boostParameters
        held = other.held ?? held
        notes += other.notes
    }
}

/// What a lane's step needs of the VM around it: the limits, the share, the boost
/// class, the thread's own class and CPU time, and the time. Built by the binding for
/// each step; plain values (and the share's atomics) so that tests can build one.
public struct LaneContext: Sendable {
    public var now: UInt64
    public var config: GovernorConfig
    public var share: VMShare
    public var boost: BoostSettings
    /// The boosted thread's CPU time now (nil without a CPU clock: wall time is charged).
    public var cpuNs: UInt64?
    /// What the thread repays a boost at (the least weight of its own class), nil
    /// when it has no lower weight to go to.
    public var repayment: SchedulingParameters?
    public init(now: UInt64, config: GovernorConfig, share: VMShare, boost: BoostSettings, cpuNs: UInt64? = nil,
                repayment: SchedulingParameters? = .other(nice: 19)) {
        self.now = now; self.config = config; self.share = share; self.boost = boost; self.cpuNs = cpuNs; self.repayment = repayment
    }
}

/// One vCPU's lane: all of its state, as values under one lock (the binding's, one
/// per vCPU): its thread, what the guest last said, its budgets, its repayment, its
/// published deadline, its counters. Its steps decide everything about the vCPU and
/// return what to do to the thread as `Actuation`s; the binding carries them out and
/// reports failures back. No step does I/O or reads a clock: tests drive a lane with
/// values alone.
public struct VCPULane: Sendable {
    /// The OS thread that runs the vCPU (nil while it has none).
    public internal(set) var thread: ThreadID?
    /// When the running boost began (nil: not boosted).
    public internal(set) var boostStart: UInt64?
    /// The last consistent snapshot, used while the guest is mid-update.
    public internal(set) var lastGuest: GuestVCPUState?
    /// The guest's clock on the host's, learned from fresh lines.
    var guestClock = GuestClockMapping()
    /// Consecutive events that found the sequence counter unsettled.
    var unsettledStreak = 0
    /// Consecutive decisions the driver failed to make.
    var failureStreak = 0
    /// The vectors of the injections seen since the last vmEntry that delivered them.
    public internal(set) var pendingVectors: InterruptVectors = []
    /// The boost the thread is repaying, and what it still owes (see `RepaymentLedger`).
    var ledger = RepaymentLedger()
    /// The vCPU's budgets (see `VCPUBudget`).
    public internal(set) var budget: VCPUBudget
    /// The deadline the guest published (see `DeadlineSchedule`).
    var deadline = DeadlineSlot()
    public internal(set) var stats = VCPUStats()
    /// The deadline (host ns) the running boost is held for (see `hold`).
    var heldForNs: UInt64?
    /// When the counters were last published for the control plane.
    var publishedAtNs: UInt64 = 0
    var attachedGeneration: UInt64 = 0

    /// Consecutive unsettled reads after which the area is treated as hostile.
    public static let unsettledLimit = 1000

    public init(config: GovernorConfig) { budget = VCPUBudget(config) }

    public var isBoosted: Bool { boostStart != nil }
    public var isRepaying: Bool { ledger.isRepaying }
    /// When the repayment in progress ends (nil: none).
    public var repaymentEndNs: UInt64? { ledger.repayingUntilNs }

    // MARK: the guest's line

    /// Takes in one read of the guest's line. Returns the state to decide on (the
    /// fresh one, or the last consistent one while the guest is mid-update), or the
    /// error that disables the VM; records the published deadline when `leadNs` is
    /// given (the driver subscribes to deadlines), returning when it falls due if new.
    public mutating func observe(_ read: Result<GuestVCPUState, SharedAreaError>, now: UInt64, leadNs: UInt64?)
        -> (guest: GuestVCPUState?, disable: SharedAreaError?, deadlineDue: UInt64?) {
        switch read {
        case .success(let g):
            if g.sequence != lastGuest?.sequence { guestClock.observe(hostNs: now, guestNs: g.guestClockNs) }
            lastGuest = g
            unsettledStreak = 0
            var due: UInt64?
            if let leadNs {
                due = deadline.record(guestNs: g.nextDeadlineNs, hostNs: g.nextDeadlineNs.flatMap { guestClock.hostTime(guestNs: $0) },
                                      now: now, leadNs: leadNs)
            }
            return (g, nil, due)
        case .failure(let error):
            // A vCPU preempted (or kicked) in the middle of an update leaves its counter
            // odd for a while: decide on the last consistent snapshot. Only a counter
            // that stays unsettled event after event is hostile.
            if case .sequenceNeverSettled = error, unsettledStreak < Self.unsettledLimit {
                unsettledStreak += 1
                return (lastGuest, nil, nil)
            }
            return (nil, error, nil)
        }
    }

    /// Notes an event's effect on the interrupts waiting to be taken.
    public mutating func note(_ event: VCPUEvent, interruptStillQueued: Bool) {
        switch event {
        case .interruptInjection(let vector): pendingVectors.insert(vector)
        case .vmEntry: if !interruptStillQueued { pendingVectors.removeAll() }
        default: break
        }
    }

    /// What the driver sees of vCPU `vcpu` now.
    public func view(vcpu: Int, guest: GuestVCPUState?, now: UInt64) -> VCPUView {
        var view = VCPUView(vcpu: vcpu, guest: guest, boosted: boostStart != nil, boostedSinceNs: boostStart, nowNs: now,
                            pendingVectors: pendingVectors)
        if guest != nil { view.guestNowNs = guestClock.guestTime(hostNs: now) }
        return view
    }

    /// The budget a boost is charged to in the vCPU's present state: the critical one
    /// while the guest is in an interrupt, softirq, NMI or preemption-off section, or
    /// has an injected interrupt not yet taken while it runs no real-time task; the
    /// general one otherwise.
    public var budgetKind: BoostBudget {
        let flags = lastGuest?.flags ?? []
        if !flags.isDisjoint(with: [.inIRQ, .inSoftIRQ, .inNMI, .preemptDisabled]) { return .critical }
        // An interrupt not taken yet is what a boost waits for, unless the guest runs
        // real-time work meanwhile: then the time is that work's.
        if !pendingVectors.isEmpty && !flags.contains(.rtTaskRunning) { return .critical }
        return .general
    }

    // MARK: boosts

    /// The vCPU goes idle and the driver would end its boost, but the guest's next
    /// deadline is near and the driver keeps a boost at it (the binding asked): the
    /// boost is held through the halt instead. The thread sleeps boosted, which costs
    /// the host nothing, and wakes boosted for its deadline, with no change of the
    /// thread either way and no wake-up of the enforcer to announce the deadline.
    /// While held, the budgets refill while the thread does not run
    /// (`VCPUBudget.spansHalts`); the boost ends like any other (an unboost at a
    /// halt with no deadline near, a cut, an undo, or a wake-up away from the
    /// deadline it was held for: see `release`). The VM's companion threads (the
    /// VMM's main loop) follow running boosts only: a hold releases them, so that
    /// a guest that keeps publishing near deadlines does not keep them real-time.
    public mutating func hold(forNs deadlineNs: UInt64, _ ctx: LaneContext) -> LaneStep {
        var step = LaneStep()
        guard boostStart != nil else { return step }
        budget.holdThroughHalts(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs)
        deadline.settle(now: ctx.now)
        stats.holds &+= 1
        step.alarmAt = budget.nextCheckNs(ctx.config, ctx.share)
        if heldForNs == nil { step.boostsDelta = -1 }
        if heldForNs != deadlineNs { step.held = .some(deadlineNs) }
        heldForNs = deadlineNs
        return step
    }

    /// Whether an interrupt injected at `now` ends the hold: the guest's deadline
    /// (as its line says now) is more than `DeadlineSchedule.heldEarlyNs` away, so
    /// this wake-up is for something else, which the driver decides on afresh.
    public func wakesOffDeadline(now: UInt64) -> Bool {
        guard heldForNs != nil, boostStart != nil else { return false }
        guard let at = deadline.hostNs else { return true }
        let early = DeadlineSchedule.heldEarlyNs
        return now &+ early < at || at &+ early < now
    }

    /// Ends a held boost with nothing owed (its vCPU woke for something other than
    /// the deadline it was held for): back at the thread's own parameters.
    public mutating func release(_ ctx: LaneContext) -> LaneStep {
        guard heldForNs != nil, boostStart != nil else { return LaneStep() }
        budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs)
        var step = clearBoost(ctx.now)
        ledger.reset()
        if let thread { step.actuations.append(.restore(thread, .unboost)) }
        return step
    }

    /// Cuts the running boost if it ran past its budget (or the VM's share).
    public mutating func cutIfOverrun(_ ctx: LaneContext) -> (veto: GovernorVeto?, step: LaneStep) {
        var step = LaneStep()
        guard boostStart != nil else { return (nil, step) }
        let charging = budget.charging
        let kind = budgetKind
        guard let veto = budget.checkOverrun(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs, budget: kind) else {
            if kind != charging { step.alarmAt = budget.nextCheckNs(ctx.config, ctx.share) }
            return (nil, step)
        }
        step.merge(cut(veto, ctx))
        return (veto, step)
    }

    /// A boost the governor ended (it already did its own accounting): count, settle.
    private mutating func cut(_ veto: GovernorVeto, _ ctx: LaneContext) -> LaneStep {
        var step = clearBoost(ctx.now)
        stats.throttleCount &+= 1
        count(veto)
        step.notes.append(.cut(veto))
        step.merge(settle(ctx, repay: true))
        return step
    }

    private mutating func count(_ veto: GovernorVeto) {
        switch veto {
        case .throttled, .budgetExhausted: stats.vetoesThrottled &+= 1
        case .vmShareExhausted: stats.vetoesVMShare &+= 1
        }
    }

    /// Carries out a driver's decision; `idle`: the vCPU is going idle (an unboost
    /// then owes nothing). The outcome assumes every actuation succeeds; the binding
    /// reports one that fails to `failed`, which amends the state (and the outcome).
    public mutating func carryOut(_ decision: Decision, _ ctx: LaneContext, idle: Bool) -> (NotifyOutcome, LaneStep) {
        var step = LaneStep()
        switch decision {
        case .none:
            return (.unchanged, step)
        case .boost(let priority):
            guard boostStart == nil, let thread, stats.thread != .refusedRealTime, stats.thread != .gone else { return (.unchanged, step) }
            if let veto = budget.begin(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs, budget: budgetKind) {
                stats.throttleCount &+= 1
                count(veto)
                return (.vetoed(veto), step)
            }
            step.alarmAt = budget.nextCheckNs(ctx.config, ctx.share)
            if ledger.isRepaying {
                // Latency wins: the repayment ends (what is left of it is owed) and the
                // boost starts from the thread's own parameters.
                ledger.repaymentCut(now: ctx.now, maxNs: ctx.config.maxRepaymentNs)
                step.actuations.append(.restore(thread, .endRepayment))
            }
            ledger.boostBegan(cpuNs: ctx.cpuNs)
            let parameters = ctx.boost.parameters(priority: priority)
            step.actuations.append(.apply(parameters, thread, .boost))
            step.boostParameters = parameters
            boostStart = ctx.now
            stats.boostCount &+= 1
            step.boostsDelta = 1
            if stats.thread == .operator {
                stats.thread = .pvsched
                step.notes.append(.operatorGaveBack)
            }
            return (.boosted, step)
        case .unboost:
            guard boostStart != nil else { return (.unchanged, step) }
            budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs)
            step.merge(clearBoost(ctx.now))
            step.merge(settle(ctx, repay: !idle))
            return (.unboosted, step)
        }
    }

    /// A boost ended: the thread repays it at the least weight of its own class, or
    /// goes back to its own parameters when nothing is owed (`repay` false: the vCPU
    /// goes idle).
    private mutating func settle(_ ctx: LaneContext, repay: Bool) -> LaneStep {
        var step = LaneStep()
        guard let thread else { return step }
        // No class to repay at (a real-time, SCHED_IDLE or nice-19 thread): nothing is owed.
        let repayment = repay ? ctx.repayment : nil
        if let repayment,
           let ns = ledger.boostEnded(cpuNs: ctx.cpuNs, now: ctx.now, factor: ctx.config.repaymentFactor, maxNs: ctx.config.maxRepaymentNs) {
            stats.repayments &+= 1
            stats.repaymentNs &+= ns
            step.actuations.append(.apply(repayment, thread, .repayment))
            step.alarmAt = ctx.now &+ ns
            return step
        }
        if repayment == nil { ledger.reset() }
        step.actuations.append(.restore(thread, .unboost))
        return step
    }

    /// Adds the running boost's time to the counters and marks the vCPU unboosted.
    private mutating func clearBoost(_ now: UInt64) -> LaneStep {
        var step = LaneStep()
        guard let start = boostStart else { return step }
        stats.boostedNs &+= now > start ? now - start : 0
        boostStart = nil
        if heldForNs != nil {
            heldForNs = nil
            step.held = .some(nil)  // the companions were released when the hold began
        } else {
            step.boostsDelta = -1
        }
        return step
    }

    /// Ends the repayment if it is due by `now` (at once with `now` nil).
    public mutating func endRepayment(dueBy now: UInt64?) -> LaneStep {
        var step = LaneStep()
        guard boostStart == nil, let until = ledger.repayingUntilNs, now.map({ until <= $0 }) ?? true else { return step }
        ledger.repaymentEnded()
        if let thread { step.actuations.append(.restore(thread, .endRepayment)) }
        return step
    }

    /// The enforcer's look: ends a due repayment, cuts a boost past its budget.
    public mutating func enforce(_ ctx: LaneContext) -> (veto: GovernorVeto?, step: LaneStep) {
        var step = endRepayment(dueBy: ctx.now)
        let (veto, cut) = cutIfOverrun(ctx)
        step.merge(cut)
        return (veto, step)
    }

    /// Undoes the boost or repayment, if any, with nothing owed (a driver replacement,
    /// a detach, a disabled area).
    public mutating func undo(_ ctx: LaneContext) -> LaneStep {
        var step = LaneStep()
        if ledger.isRepaying { step.merge(endRepayment(dueBy: nil)) }
        guard boostStart != nil else { return step }
        budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs)
        step.merge(clearBoost(ctx.now))
        ledger.reset()
        if let thread { step.actuations.append(.restore(thread, .unboost)) }
        return step
    }

    // MARK: failures and the thread

    /// An actuation of this lane failed with `error`: the lane amends its state and
    /// returns what to do instead of the rest of the step (nil: go on with the rest),
    /// and the outcome the notification then has (nil: unchanged).
    public mutating func failed(_ a: Actuation, _ error: ActuatorError, _ ctx: LaneContext)
        -> (instead: [Actuation]?, outcome: NotifyOutcome?, step: LaneStep) {
        var step = LaneStep()
        stats.failedBoosts.count(error.reason)
        switch a {
        case .restore(_, .endRepayment):
            // Whoever changed the thread has it now; a boost after it finds out for itself.
            step.notes += note(error)
            if case .threadGone = error.kind { drop(&step); return ([], nil, step) }
            return (nil, nil, step)
        case .apply(_, let thread, .boost):
            budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: ctx.cpuNs)
            boostStart = nil
            stats.boostCount &-= 1
            step.boostsDelta = -1
            step.notes += note(error)
            if case .threadGone = error.kind { drop(&step) }
            // A system call that failed half-way is not left so: back to the thread's own.
            if case .system = error.kind { return ([.restore(thread, .unboost)], .actuatorFailed(error), step) }
            return ([], .actuatorFailed(error), step)
        case .apply(_, let thread, _):
            // A repayment that cannot be set: nothing is owed, back to the thread's own.
            ledger.repaymentEnded()
            if case .ownedByOperator = error.kind { step.notes += note(error); return ([], .actuatorFailed(error), step) }
            if case .threadGone = error.kind { drop(&step); return ([], nil, step) }
            return ([.restore(thread, .unboost)], nil, step)
        case .restore:
            step.notes += note(error)
            if case .threadGone = error.kind { drop(&step) }
            return ([], .actuatorFailed(error), step)
        }
    }

    /// What an actuator error says: who manages the thread, or why boosts cannot be
    /// applied (said once per cause).
    private mutating func note(_ error: ActuatorError) -> [LaneNote] {
        switch error.kind {
        case .ownedByOperator(let current):
            guard stats.thread != .operator else { return [] }
            stats.thread = .operator
            return [.operatorTookThread(now: current)]
        case .realTimeAtAttach, .threadGone:
            return []
        case .system, .unguarded:
            let why = error.cause
            guard stats.boostBlocked != why else { return [] }
            stats.boostBlocked = why
            return [.boostsBlocked(why)]
        }
    }

    /// The thread exited: dropped, and its id never acted on again.
    private mutating func drop(_ step: inout LaneStep) {
        guard let t = thread else { return }
        step.notes.append(.threadGone(t))
        if boostStart != nil { step.merge(clearBoost(boostStart!)) }
        thread = nil
        stats.thread = .gone
        ledger.reset()
    }

    /// The thread exited (noticed by whoever holds it): dropped.
    public mutating func threadExited(_ ctx: LaneContext) -> LaneStep {
        var step = LaneStep()
        if boostStart != nil { budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: nil); step.merge(clearBoost(ctx.now)) }
        drop(&step)
        return step
    }

    /// A successful boost clears a cause that blocked boosts.
    public mutating func boostApplied() -> [LaneNote] {
        guard stats.boostBlocked != nil else { return [] }
        stats.boostBlocked = nil
        return [.boostsApplyAgain]
    }

    /// Another thread runs the vCPU now (or none): the old one's boost and repayment
    /// end (the binding releases it, returned), the new one is managed as `ownership` says.
    public mutating func replaceThread(_ new: ThreadID?, ownership: ThreadOwnership, _ ctx: LaneContext) -> (old: ThreadID?, step: LaneStep) {
        var step = LaneStep()
        let old = thread
        guard old != new else { return (nil, step) }
        if boostStart != nil { budget.end(ctx.config, ctx.share, now: ctx.now, cpuNs: nil); step.merge(clearBoost(ctx.now)) }
        stats.thread = ownership
        ledger.reset()
        thread = new
        return (old, step)
    }
}
