import Atomics
import Logging
import Synchronization

/// The host component's link between one VM and its driver: receives the
/// hypervisor's vCPU events, asks the driver, and carries out what the vCPU's lane
/// decides (boost, repayment, restore) through the actuator; publishes the result
/// in the guest's host line.
///
/// Each vCPU is a `VCPULane` under a lock of its own: no lock is shared between
/// vCPUs on the vCPU path (a vCPU thread preempted while holding one, repaying a
/// boost at nice 19, held up its siblings for milliseconds). The binding keeps only
/// the VM-wide parts: the driver and area (published atomically), the governor's
/// limits and share, the deadline lead, the companion threads, the trace.
///
/// Created and driven by a `DriverRegistry`; the VMM calls `notify` from vCPU and
/// device threads. Safe to call from any thread.
public final class VMBinding: VMEventSink, VMStatusView, VMEnforcement {
    public let vm: VMHandle
    public let governor: Governor
    public let actuator: any Actuator
    public let boost: BoostSettings
    /// Records notifications when set (debugging aid; nil costs one check per event).
    public let trace: EventTrace?
    let logger: Logger
    /// Where every timestamp of this binding (boosts, budgets) comes from.
    public let clock: any HostClock
    /// How long before a published deadline the driver is told (see `DeadlineSchedule`).
    public let deadlines = DeadlineLead()
    /// Where the binding asks the enforcer for a look (when a boost could run out,
    /// or a deadline comes, before it planned to look).
    let alarm: any EnforcerAlarm
    /// The binding's own alarm, when no enforcer's was given (tests sleep on it).
    public let budgetAlarm: BudgetAlarm?
    /// Rung with `true` when a vCPU thread that slept runs again (its guest may change
    /// its line: the watcher of the VM's region looks soon), with `false` when a vCPU's
    /// line was read at its halt (the watcher may rest if every vCPU sleeps so).
    private let lineBell = Mutex<Bell?>(nil)
    /// A closure in a box: a closure kept in a `Mutex` directly is re-wrapped in
    /// reabstraction thunks at every `withLock` (its value is generic there), one
    /// layer more each time.
    private final class Bell: Sendable {
        let ring: @Sendable (Bool) -> Void
        init(_ ring: @escaping @Sendable (Bool) -> Void) { self.ring = ring }
    }
    /// Rung when a vCPU's boost is held through a halt, or no longer.
    private let holdBell = Mutex<HoldBell?>(nil)
    private final class HoldBell: Sendable {
        let ring: @Sendable (ThreadID, UInt64?) -> Void
        init(_ ring: @escaping @Sendable (ThreadID, UInt64?) -> Void) { self.ring = ring }
    }
    /// Just above this VM's boosts (`BoostSettings.preemptingPriority`).
    public var enforcerPriority: UInt8? { boost.preemptingPriority }
    /// Consecutive unsettled reads of a vCPU's line after which the area is
    /// treated as hostile and pvsched is disabled for the VM.
    public static let unsettledLimit = VCPULane.unsettledLimit
    /// Consecutive failed decisions of one vCPU after which its driver is ejected
    /// (the VM goes back to the default driver).
    public static let failureLimit = 100
    /// Carries out an ejection (set by the registry that made the binding).
    let ejector: @Sendable (VMBinding, _ driver: String, _ reason: String) -> Void

    /// One vCPU: its lane under its lock, a copy of its counters for the control
    /// plane (readers never take the lane's lock: a reader preempted while holding it
    /// would stall the vCPU thread), and when its repayment ends (the enforcer plans
    /// by it without taking the lock).
    final class Lane: Sendable {
        let state: Mutex<VCPULane>
        let published = Mutex(VCPUStats())
        let repaymentEnd = Atomic<UInt64>(0)
        /// Whether its thread runs, as the VM's events say (`Running`).
        let running = Atomic<UInt8>(Running.unknown)
        init(_ lane: VCPULane) { state = Mutex(lane) }
    }
    /// What the events say of a vCPU thread's running (`shouldLook`).
    enum Running {
        /// No event says: its line may change any time.
        static let unknown: UInt8 = 0
        static let running: UInt8 = 1
        /// Asleep, its line not read since it went to sleep.
        static let asleep: UInt8 = 2
        /// Asleep, and its line read since: it cannot change until the thread runs.
        static let asleepLooked: UInt8 = 3
    }
    let lanes: [Lane]

    struct Slot {
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
    /// vCPU thread reads it with no lock shared with the other vCPUs.
    final class Dispatch: AtomicReference, Sendable {
        let driver: (any Driver)?
        let generation: UInt64
        let area: SharedArea?
        let disabled: Bool
        init(_ s: Slot) { driver = s.driver; generation = s.generation; area = s.area; disabled = s.disabledReason != nil }
    }
    let dispatch = ManagedAtomic(Dispatch(Slot()))
    let slot = Mutex(Slot())

    /// Threads that deliver the VM's interrupts (QEMU's main loop under TCG): they
    /// run boosted, one priority above the vCPUs, while any vCPU is boosted, since a
    /// boosted vCPU waits for them first. Lock order: a vCPU's lock, then this one.
    struct Companions {
        var threads: [ThreadID] = []
        var boostedVCPUs = 0
        var applied: SchedulingParameters?
    }
    let companions = Mutex(Companions())

    init(vm: VMHandle, actuator: any Actuator, governor: GovernorConfig, boost: BoostSettings, trace: EventTrace?,
         logger: Logger, clock: any HostClock = SystemClock(), alarm: (any EnforcerAlarm)? = nil,
         ejector: @escaping @Sendable (VMBinding, String, String) -> Void = { _, _, _ in }) {
        self.ejector = ejector
        self.clock = clock
        self.vm = vm
        self.trace = trace
        self.actuator = actuator
        let own = alarm == nil ? BudgetAlarm() : nil
        self.budgetAlarm = own
        self.alarm = alarm ?? own!
        self.governor = Governor(config: governor, vcpuCount: vm.vcpuCount)
        self.boost = boost
        self.logger = logger
        self.lanes = (0..<vm.vcpuCount).map { _ in Lane(VCPULane(config: governor)) }
    }

    /// The step context of `lane` now (under its lock). `cpuTime`: the lane's
    /// thread's run time as an event's source read it (used only if it is that
    /// thread's; else the actuator reads it).
    func context(_ lane: VCPULane, now: UInt64, cpuTime: ThreadCPUTime? = nil) -> LaneContext {
        let cpuNs: UInt64? = lane.thread.flatMap { t in
            if let cpuTime, cpuTime.thread == t { return cpuTime.ns }
            return actuator.cpuTimeNs(of: t)
        }
        return LaneContext(now: now, config: governor.config, share: governor.share, boost: boost, cpuNs: cpuNs,
                           repayment: lane.thread.flatMap { actuator.baseline(of: $0)?.repayment })
    }

    // MARK: events

    /// Delivers `event` for `vcpu` to the driver and carries out its decision.
    /// `interruptStillQueued` (for `.vmEntry`) says an injected interrupt could not be
    /// delivered on this entry (the guest has interrupts off), so it stays pending.
    /// `cpuTime` spares the actuator's read of the thread's run time (see `VMEventSink`),
    /// except where a boost starts.
    @discardableResult
    public func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome {
        switch event {
        case .vmEntry, .interruptInjection:
            // Woken (or about to be): its guest may write its line again.
            let was = lanes[vcpu].running.exchange(Running.running, ordering: .relaxed)
            if was == Running.asleep || was == Running.asleepLooked { lineBell.withLock { $0 }?.ring(true) }
        case .halt: lanes[vcpu].running.store(Running.asleep, ordering: .relaxed)
        default: break
        }
        let d = dispatch.load(ordering: .acquiring)
        guard !d.disabled, let driver = d.driver, driver.events.contains(event.kind) else { return .unchanged }
        let now = clock.nowNs()
        var readError: SharedAreaError?
        var failing = false
        var deadlineDue: UInt64?
        let leadNs = driver.events.contains(.deadline) ? deadlines.leadNs : nil
        let outcome: NotifyOutcome = lanes[vcpu].state.withLock { s in
            guard s.attachedGeneration == d.generation else { return .unchanged }  // raced a replacement
            s.stats.events &+= 1
            var guest: GuestVCPUState?
            if let area = d.area {
                let read: Result<GuestVCPUState, SharedAreaError>
                do throws(SharedAreaError) { read = .success(try area.read(vcpu: vcpu)) } catch { read = .failure(error) }
                let seen = s.observe(read, now: now, leadNs: leadNs)
                if let error = seen.disable { readError = error; return .disabled(error) }
                guest = seen.guest
                deadlineDue = seen.deadlineDue
            }
            let ctx = context(s, now: now, cpuTime: cpuTime)
            // A boost past its budget is cut first; the driver still sees the event.
            var (cutBy, step) = s.cutIfOverrun(ctx)
            if cutBy != nil { _ = carry(&step, &s, vcpu: vcpu, ctx) }
            // A boost held for a deadline ends at an interrupt away from it (the vCPU
            // wakes for something else): the driver decides on that afresh.
            var releasedHold = false
            if case .interruptInjection = event, s.wakesOffDeadline(now: now) {
                var released = s.release(ctx)
                _ = carry(&released, &s, vcpu: vcpu, ctx)
                releasedHold = true
            }
            s.note(event, interruptStillQueued: interruptStillQueued)
            let view = s.view(vcpu: vcpu, guest: guest, now: now)
            let failedBefore = driver.failedDecisions
            var decision = driver.decide(event: event, view: view)
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
            var decided2 = idle ? s.endRepayment(dueBy: nil) : LaneStep()
            // An unboost at a halt shortly before the guest's next deadline: if the
            // driver keeps a boost at that deadline, the boost is held through the halt.
            let holdNs = deadlines.holdNs
            if idle, decision == .unboost, leadNs != nil, holdNs > 0, let left = s.deadline.ahead(now: now, withinNs: holdNs),
               driver.decide(event: .deadline(inNs: left), view: view) == .none {
                decision = .none
                decided2.merge(s.hold(forNs: now &+ left, ctx))
            }
            // A boost starts from the thread's run time read now: an event's own reading
            // may be older (the thread ran since), and the boost would be charged for
            // that run (throttles in the QEMU demo with it). Elsewhere an older reading
            // charges less for now, and the rest later (see `Governor.account`).
            var startCtx = ctx
            if cpuTime != nil, case .boost = decision, !view.boosted { startCtx.cpuNs = s.thread.flatMap { actuator.cpuTimeNs(of: $0) } }
            let (planned, decisionStep) = s.carryOut(decision, startCtx, idle: idle)
            decided2.merge(decisionStep)
            var result = carry(&decided2, &s, vcpu: vcpu, ctx) ?? planned
            if let cutBy, result == .unchanged { result = .vetoed(cutBy) }
            if releasedHold, result == .unchanged { result = .unboosted }
            s.stats.outcomes.count(result)
            if result != .unchanged || now &- s.publishedAtNs >= 100_000 { publishStats(&s, vcpu: vcpu, now: now) }
            trace?.record(TraceRecord(timeNs: now, vcpu: vcpu, event: event, guest: guest, boosted: view.boosted,
                                      pendingVectors: view.pendingVectors, deadlineInNs: view.deadlineInNs, decision: decision,
                                      outcome: result))
            return result
        }
        if let readError { disable(readError) }
        else if outcome != .unchanged, let area = d.area { publish(area, vcpu: vcpu) }
        // The line read at the halt is the last one its guest wrote: no watcher need look again.
        if case .halt = event, d.area != nil, readError == nil,
           lanes[vcpu].running.compareExchange(expected: Running.asleep, desired: Running.asleepLooked, ordering: .relaxed).exchanged {
            lineBell.withLock { $0 }?.ring(false)
        }
        if let deadlineDue { needCheck(at: deadlineDue) }
        if outcome == .unboosted { alarm.relax(self) }
        if failing {
            let reason = "\(Self.failureLimit) decisions in a row failed on vCPU \(vcpu)"
            slot.withLock { s in
                if s.ejectRequest == nil, s.generation == d.generation { s.ejectRequest = (driver.name, d.generation, reason) }
            }
        }
        return outcome
    }

    /// Carries out a lane's step (under the vCPU's lock): its actuations in order, a
    /// failed one reported back to the lane; then its notes, the alarm and the
    /// companions. Returns the outcome a failure gave the notification, if any.
    @discardableResult
    func carry(_ step: inout LaneStep, _ s: inout VCPULane, vcpu: Int, _ ctx: LaneContext) -> NotifyOutcome? {
        var outcome: NotifyOutcome?
        var queue = step.actuations[...]
        while let a = queue.popFirst() {
            do throws(ActuatorError) {
                switch a {
                case .apply(let p, let t, let purpose):
                    try actuator.apply(p, to: t)
                    if purpose == .boost { step.notes += s.boostApplied() }
                case .restore(let t, _): try actuator.restore(t)
                }
            } catch {
                let (instead, failedOutcome, amend) = s.failed(a, error, ctx)
                step.merge(amend)
                if let failedOutcome { outcome = failedOutcome }
                if let instead { queue = instead[...] }
            }
        }
        lanes[vcpu].repaymentEnd.store(s.repaymentEndNs ?? 0, ordering: .relaxed)
        if let at = step.alarmAt { needCheck(at: at) }
        if step.boostsDelta != 0 { companionsFollow(boostedVCPUs: step.boostsDelta, parameters: step.boostParameters ?? boost.boosted) }
        if let held = step.held, let thread = s.thread { holdBell.withLock { $0 }?.ring(thread, held) }
        for n in step.notes { say(n, vcpu: vcpu) }
        step = LaneStep()
        return outcome
    }

    /// Logs what a lane noted.
    private func say(_ note: LaneNote, vcpu: Int) {
        let meta: Logger.Metadata = ["vm": "\(vm)", "vcpu": "\(vcpu)"]
        switch note {
        case .operatorTookThread(let now):
            logger.warning("vCPU thread changed by someone else: pvsched leaves it alone until it is back at its original parameters",
                           metadata: meta.merging(["now": "\(now.map { "\($0)" } ?? "?")"]) { $1 })
        case .operatorGaveBack: logger.info("vCPU thread back at its original parameters: pvsched manages it again", metadata: meta)
        case .boostsBlocked(let why): logger.warning("boosts cannot be applied", metadata: meta.merging(["reason": "\(why)"]) { $1 })
        case .boostsApplyAgain: logger.notice("boosts apply again", metadata: meta)
        case .threadGone(let t): logger.warning("vCPU thread exited: dropped", metadata: meta.merging(["thread": "\(t)"]) { $1 })
        case .cut(let veto): logger.debug("boost cut", metadata: meta.merging(["reason": "\(veto)"]) { $1 })
        }
    }

    /// Whether `event` shows the vCPU going idle: it halts, or its current line says so.
    private static func goesIdle(_ event: VCPUEvent, guest: GuestVCPUState?) -> Bool {
        switch event {
        case .halt, .vmExit(.halt): return true
        case .guestUpdate: return guest?.flags.contains(.idle) ?? false
        default: return false
        }
    }

    // MARK: the enforcer

    /// Cuts every boost that ran past its budget and ends the repayments that are due;
    /// the enforcer calls this so that a vCPU that never exits cannot keep a boost.
    /// Returns how many boosts were cut.
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
        let area = dispatch.load(ordering: .acquiring).area
        for (i, lane) in lanes.enumerated() {
            let wasCut: Bool = lane.state.withLock { s in
                // A lane with no boost and no repayment has nothing to enforce: no
                // context (its thread's CPU time is a read of /proc for another process's thread).
                guard s.isBoosted || s.isRepaying else {
                    if s.publishedAtNs != now { publishStats(&s, vcpu: i, now: now) }
                    return false
                }
                let ctx = context(s, now: now)
                var (veto, step) = s.enforce(ctx)
                carry(&step, &s, vcpu: i, ctx)
                if s.publishedAtNs != now { publishStats(&s, vcpu: i, now: now) }
                guard let veto else { return false }
                trace?.record(TraceRecord(timeNs: now, vcpu: i, event: nil, guest: s.lastGuest, boosted: true,
                                          pendingVectors: s.pendingVectors, decision: .none, outcome: .vetoed(veto)))
                return true
            }
            if wasCut { cutCount += 1; if let area { publish(area, vcpu: i) } }
        }
        return cutCount
    }

    /// Sends `deadline` for each vCPU whose published deadline is due, or due within
    /// `aheadNs` (see `DeadlineSchedule`); the enforcer calls this. Returns how many.
    @discardableResult
    public func announceDeadlines(aheadNs: UInt64) -> Int {
        let now = clock.nowNs()
        var count = 0
        for (i, lane) in lanes.enumerated() {
            guard let left = lane.state.withLock({ $0.deadline.takeDue(now: now, aheadNs: aheadNs) }) else { continue }
            notify(.deadline(inNs: left), vcpu: i)
            count += 1
        }
        return count
    }

    /// When the enforcer must next look (see `VMEventSink.nextEnforcerWakeNs`).
    public func nextEnforcerWakeNs() -> UInt64? {
        let config = governor.config
        var next = UInt64.max
        for lane in lanes {
            lane.state.withLock { s in
                if let at = s.budget.nextCheckNs(config, governor.share) { next = min(next, at) }
                if let at = s.deadline.nextDueNs { next = min(next, at) }
            }
            let end = lane.repaymentEnd.load(ordering: .relaxed)
            if end != 0 { next = min(next, end) }
        }
        return next == .max ? nil : next
    }

    /// The enforcer must look at this VM by `at`: the alarm notes it, and rings if
    /// that is sooner than it planned.
    func needCheck(at: UInt64) { alarm.need(self, checkAtNs: at) }

    /// Calls `bell` with a vCPU's thread whenever its boost is held through a halt
    /// for a new deadline (see `VCPULane.hold`; host ns), and with nil when it no
    /// longer is: the host kernel's event source then wakes no one for that
    /// deadline's wake-up.
    public func setHoldBell(_ bell: (@Sendable (ThreadID, UInt64?) -> Void)?) {
        let box = bell.map(HoldBell.init)
        holdBell.withLock { $0 = box }
    }

    /// Rings `bell` with `true` whenever a vCPU thread that slept runs again (see
    /// `lineMayHaveChanged`), and with `false` whenever a vCPU's line was read at its
    /// halt (see `everyLineReadAsleep`).
    public func setLineBell(_ bell: (@Sendable (_ running: Bool) -> Void)?) {
        let box = bell.map(Bell.init)
        lineBell.withLock { $0 = box }
    }

    public var everyLineReadAsleep: Bool {
        lanes.allSatisfy { $0.running.load(ordering: .relaxed) == Running.asleepLooked }
    }

    /// Whether to read `vcpu`'s line now: not while its thread has been asleep since
    /// the last look (a guest changes its line only while its vCPU runs), as far as
    /// the VM's events tell (the host kernel's scheduler events; without them, always).
    public func lineMayHaveChanged(vcpu: Int) -> Bool {
        let lane = lanes[vcpu]
        switch lane.running.load(ordering: .relaxed) {
        case Running.asleepLooked: return false
        case Running.asleep:
            // Read once after it went to sleep (its last write came just before).
            _ = lane.running.compareExchange(expected: Running.asleep, desired: Running.asleepLooked, ordering: .relaxed)
            return true
        default: return true
        }
    }

    /// Undoes every boost and detaches the driver (VM exit).
    public func shutdown() {
        install(nil)
    }
}
