import PVSchedABI
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import PVSchedTesting
import Testing
@testable import PVSchedCore

@Suite struct VMBindingTests {
    // No budget unless a test is about budgets: on a loaded machine 5 ms can pass between two calls.
    private func setup(governor: GovernorConfig = .unlimited, clock: any HostClock = SystemClock(),
                       script: @escaping @Sendable (VCPUEvent, VCPUView) -> Decision)
        throws -> (DriverRegistry, VMBinding, RecordingActuator, ScriptedDriver) {
        let r = DriverRegistry()
        let d = ScriptedDriver("s", script: script)
        try r.register(d)
        try r.setDefault("s")
        let act = RecordingActuator()
        let b = try r.bind(vm: testVM, actuator: act, governor: governor, clock: clock)
        b.setThread(ThreadID(100), vcpu: 0)
        b.setThread(ThreadID(101), vcpu: 1)
        return (r, b, act, d)
    }

    @Test func boostAndUnboostGoThroughTheActuatorAndArePublished() throws {
        let (_, b, act, _) = try setup { e, _ in
            switch e {
            case .interruptInjection: return .boost()
            case .halt: return .unboost
            default: return .none
            }
        }
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        #expect(b.notify(.interruptInjection(vector: 32), vcpu: 1) == .boosted)
        #expect(b.notify(.interruptInjection(vector: 32), vcpu: 1) == .unchanged)
        #expect(buf.writer.vcpu(1).pointee.host.status == PVSCHED_STATUS_BOOSTED)
        #expect(b.notify(.halt, vcpu: 1) == .unboosted)
        #expect(buf.writer.vcpu(1).pointee.host.status == PVSCHED_STATUS_NORMAL)
        #expect(buf.writer.vcpu(1).pointee.host.boost_count == 1)
        #expect(act.calls == [.apply(.fifo(priority: 10), ThreadID(101)), .restore(ThreadID(101))])
        #expect(b.stats(vcpu: 1).boostCount == 1)
    }

    @Test func interruptPendingLastsFromInjectionToDelivery() throws {
        let seen = Mutex<[Bool]>([])
        let (_, b, _, _) = try setup { _, v in seen.withLock { $0.append(v.interruptPending) }; return .none }
        b.notify(.vmExit(.halt), vcpu: 0)
        b.notify(.interruptInjection(vector: 48), vcpu: 0)
        b.notify(.halt, vcpu: 0)
        b.notify(.vmEntry, vcpu: 0, interruptStillQueued: true)   // the guest had interrupts off
        b.notify(.vmExit(.doorbell), vcpu: 0)
        b.notify(.vmEntry, vcpu: 0)                                // delivered now
        b.notify(.vmExit(.io(port: 1, write: true)), vcpu: 0)
        #expect(seen.withLock { $0 } == [false, true, true, true, true, false, false])
    }

    @Test func traceKeepsTheLastNotificationsPerVCPU() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("s") { e, _ in e == .halt ? .unboost : .boost() })
        try r.setDefault("s")
        let trace = EventTrace(vcpus: 2, capacity: 3)
        let b = try r.bind(vm: testVM, actuator: RecordingActuator(), trace: trace)
        b.setThread(ThreadID(100), vcpu: 0)
        for e in [VCPUEvent.vmEntry, .vmExit(.halt), .halt, .interruptInjection(vector: 48)] { b.notify(e, vcpu: 0) }
        let records = trace.records(vcpu: 0)
        #expect(records.map(\.event) == [.vmExit(.halt), .halt, .interruptInjection(vector: 48)])
        #expect(records.map(\.outcome) == [.unchanged, .unboosted, .boosted])
        #expect(trace.records(vcpu: 1).isEmpty)
    }

    @Test func eventsOutsideTheMaskAreNotDelivered() throws {
        let r = DriverRegistry()
        let d = ScriptedDriver("s", events: [.halt])
        try r.register(d)
        let b = try r.bind(vm: testVM, actuator: RecordingActuator())
        try r.assign("s", to: testVM.id)
        b.notify(.vmEntry, vcpu: 0)
        b.notify(.vmExit(.halt), vcpu: 0)
        b.notify(.halt, vcpu: 0)
        #expect(d.calls == ["attach 0", "attach 1", "halt"])
    }

    @Test func replacingTheDriverUndoesBoosts() throws {
        let (r, b, act, _) = try setup { _, _ in .boost() }
        try r.register(ScriptedDriver("other"))
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        let old = try r.assign("other", to: testVM.id)
        #expect(old?.name == "s")
        #expect(act.applied(to: ThreadID(100)) == nil)
        #expect(act.calls.last == .restore(ThreadID(100)))
        #expect(b.stats(vcpu: 0).boosted == false)
    }

    @Test func unbindUndoesBoosts() throws {
        let (r, b, act, _) = try setup { _, _ in .boost() }
        b.notify(.vmEntry, vcpu: 0); b.notify(.vmEntry, vcpu: 1)
        r.unbind(vm: testVM.id)
        #expect(act.applied(to: ThreadID(100)) == nil && act.applied(to: ThreadID(101)) == nil)
        #expect(r.binding(vm: testVM.id) == nil)
    }

    @Test func governorVetoIsReportedAndCounted() throws {
        let clock = ManualClock()
        let cfg = GovernorConfig(criticalBudgetNs: 5_000_000, generalBudgetNs: 5_000_000, throttleWindowNs: 10_000_000, shareWindowNs: .max, maxVMShare: 1)
        let (_, b, act, d) = try setup(governor: cfg, clock: clock) { _, _ in .boost() }
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        // A budget with less than a check step left counts as spent (the enforcer's looks stay that far apart).
        let capNs = 5_000_000 - VCPUBudget.checkStepNs
        clock.advance(by: capNs)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)   // still inside its 5 ms cap
        clock.advance(by: 1)
        // The next event finds the boost at its cap: cut and throttled; the
        // driver still sees the event and its new boost is refused.
        guard case .vetoed(.throttled) = b.notify(.vmEntry, vcpu: 0) else { Issue.record("not cut"); return }
        guard case .vetoed(.throttled) = b.notify(.vmEntry, vcpu: 0) else { Issue.record("not throttled"); return }
        #expect(act.applied(to: ThreadID(100)) == nil)
        #expect(b.stats(vcpu: 0).throttleCount == 3)  // one cut, two refusals
        #expect(d.calls.filter { $0 == "vmEntry" }.count == 4)
        // The throttle lasts 10 ms after the cut, then a boost is allowed again.
        clock.advance(by: 9_999_999)
        guard case .vetoed(.throttled) = b.notify(.vmEntry, vcpu: 0) else { Issue.record("throttle ended early"); return }
        clock.advance(by: 1)
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        #expect(b.stats(vcpu: 0).boostedNs == capNs + 1)
    }

    /// The enforcer sleeps on the binding's alarm: an event that boosts wakes it (the
    /// boost could spend its budget before the enforcer's idle pause ends), one that
    /// does not boost leaves it asleep.
    @Test func aBoostWakesTheSleepingEnforcerAndOtherEventsDoNot() throws {
        let (_, b, _, _) = try setup(governor: .default) { e, _ in
            if case .interruptInjection = e { return .boost() }
            return .none
        }
        let alarm = try #require(b.budgetAlarm)
        let woke = WokeBox()
        let enforcer = try PVSchedCore.Thread { alarm.sleep { b.nextEnforcerWakeNs() }; woke.mark() }
        usleep(10_000)
        #expect(b.notify(.vmExit(.halt), vcpu: 0) == .unchanged)
        usleep(10_000)
        #expect(woke.at == 0)
        let boosted = MonotonicClock.nowNs()
        #expect(b.notify(.interruptInjection(vector: 32), vcpu: 0) == .boosted)
        enforcer.join()
        #expect(woke.at - boosted < BudgetAlarm.idleNs / 2)
        #expect(alarm.wakeUps == 1)
    }

    /// A binding with a 1 ms critical and a 4 ms general budget (1 ms throttle), a
    /// guest area, and a driver that boosts whenever the guest registered one.
    private func budgeted() throws -> (VMBinding, RecordingActuator, SharedAreaBuffer, ManualClock) {
        let clock = ManualClock()
        let cfg = GovernorConfig(criticalBudgetNs: 1_000_000, generalBudgetNs: 4_000_000, throttleWindowNs: 1_000_000,
                                 shareWindowNs: .max, maxVMShare: 1)
        let (_, b, act, _) = try setup(governor: cfg, clock: clock) { _, v in v.guest == nil ? .none : .boost() }
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        return (b, act, buf, clock)
    }

    @Test func boostsAreChargedTheirThreadsCPUTimeToTheBudgetOfTheGuestsState() throws {
        let (b, act, buf, clock) = try budgeted()
        let thread = ThreadID(100)
        act.setCPUTime(10_000_000, of: thread)
        // The guest is in an interrupt handler: the boost is charged to the 1 ms critical budget.
        buf.writer.setFlags(vcpu: 0, [.inIRQ])
        #expect(b.notify(.vmExit(.halt), vcpu: 0) == .boosted)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 1_000_000)
        // 5 ms pass but the thread runs only 0.6 ms of them (it halted): not cut.
        clock.advance(by: 5_000_000)
        act.setCPUTime(10_600_000, of: thread)
        #expect(b.enforceBudgets() == 0)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 400_000)
        // The next 0.4 ms of CPU time spend it: the enforcer cuts the boost without an event.
        clock.advance(by: 400_000)
        act.setCPUTime(11_000_000, of: thread)
        #expect(b.enforceBudgets() == 1)
        #expect(act.applied(to: thread) == nil)
        // After the throttle, a real-time task is charged to the 4 ms general budget.
        clock.advance(by: 1_000_000)
        buf.writer.setFlags(vcpu: 0, [.rtTaskRunning])
        #expect(b.notify(.vmExit(.halt), vcpu: 0) == .boosted)
        clock.advance(by: 3_000_000)
        act.setCPUTime(14_000_000, of: thread)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)
        clock.advance(by: 1_000_000)
        act.setCPUTime(15_000_000, of: thread)
        guard case .vetoed(.throttled) = b.notify(.vmEntry, vcpu: 0) else { Issue.record("general budget not enforced"); return }
        #expect(b.stats(vcpu: 0).vetoesThrottled >= 2)
    }

    /// An event may bring its thread's run time (the host kernel reads it at the
    /// event): the binding charges a running boost up to that instead of reading it,
    /// for that thread only; a boost starts from a fresh reading (the event's may be
    /// older: the thread ran since, unboosted); an older reading than one already
    /// charged charges nothing twice.
    @Test func anEventsOwnReadingOfItsThreadsCPUTimeIsChargedInPlaceOfTheActuators() throws {
        let (b, act, buf, clock) = try budgeted()
        let thread = ThreadID(100)
        // The event's reading is 1 ms old: started from it, the boost would owe that millisecond.
        act.setCPUTime(10_000_000, of: thread)
        buf.writer.setFlags(vcpu: 0, [.inIRQ])
        #expect(b.notify(.vmExit(.halt), vcpu: 0, interruptStillQueued: false,
                         cpuTime: ThreadCPUTime(thread: thread, ns: 9_000_000)) == .boosted)
        // While it runs, the actuator's reading would spend the whole budget at once: the event's is used.
        clock.advance(by: 5_000_000)
        act.setCPUTime(50_000_000, of: thread)
        #expect(b.notify(.vmEntry, vcpu: 0, interruptStillQueued: false,
                         cpuTime: ThreadCPUTime(thread: thread, ns: 10_600_000)) == .unchanged)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 400_000)
        // Another thread's reading (the vCPU's thread was replaced since) is not this one's: the actuator is read.
        act.setCPUTime(10_700_000, of: thread)
        #expect(b.notify(.vmEntry, vcpu: 0, interruptStillQueued: false,
                         cpuTime: ThreadCPUTime(thread: ThreadID(999), ns: 0)) == .unchanged)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 300_000)
        // A reading older than the last one charged charges nothing, and the next is charged from the newer.
        #expect(b.notify(.vmEntry, vcpu: 0, interruptStillQueued: false,
                         cpuTime: ThreadCPUTime(thread: thread, ns: 10_650_000)) == .unchanged)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 300_000)
        act.setCPUTime(10_800_000, of: thread)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 200_000)
    }

    @Test func anOperatorsChangeWinsUntilTheThreadIsBackAtItsBaseline() throws {
        let (_, b, act, _) = try setup { e, _ in e == .vmEntry ? .boost() : .unboost }
        let thread = ThreadID(100)
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        // An administrator renices the boosted thread: pvsched does not put it back, and reports it.
        act.setByOperator(.other(nice: 5), for: thread)
        guard case .actuatorFailed(let e) = b.notify(.halt, vcpu: 0), case .ownedByOperator = e.kind else {
            Issue.record("the operator's change was not seen"); return
        }
        #expect(b.stats(vcpu: 0).thread == .operator)
        #expect(!act.calls.contains(.restore(thread)))
        // No boost while their setting stands.
        guard case .actuatorFailed = b.notify(.vmEntry, vcpu: 0) else { Issue.record("boosted over the operator's setting"); return }
        // Back at its baseline, pvsched manages it again.
        act.setByOperator(nil, for: thread)
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        #expect(b.stats(vcpu: 0).thread == .pvsched)
    }

    @Test func aThreadAlreadyRealTimeAtAttachIsRefusedUnlessAllowed() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("s") { _, _ in .boost() })
        try r.setDefault("s")
        let act = RecordingActuator()
        act.setInitial(.fifo(priority: 20), for: ThreadID(100))
        let b = try r.bind(vm: testVM, actuator: act, governor: .unlimited)
        b.setThread(ThreadID(100), vcpu: 0)
        b.setThread(ThreadID(101), vcpu: 1)
        #expect(b.stats(vcpu: 0).thread == .refusedRealTime)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)
        #expect(act.applied(to: ThreadID(100)) == nil)
        #expect(b.notify(.vmEntry, vcpu: 1) == .boosted)
        // Configured to accept them, it is managed.
        let r2 = DriverRegistry()
        try r2.register(ScriptedDriver("s") { _, _ in .boost() })
        try r2.setDefault("s")
        let b2 = try r2.bind(vm: VMHandle(id: 2, name: "vm2", vcpuCount: 1), actuator: act, governor: .unlimited,
                             boost: BoostSettings(allowRealTimeThreads: true))
        b2.setThread(ThreadID(100), vcpu: 0)
        #expect(b2.notify(.vmEntry, vcpu: 0) == .boosted)
    }

    @Test func enforcerCutsABoostWithoutEvents() throws {
        let clock = ManualClock()
        let cfg = GovernorConfig(criticalBudgetNs: 2_000_000, generalBudgetNs: 2_000_000, throttleWindowNs: 1_000_000, shareWindowNs: .max, maxVMShare: 1)
        let (_, b, act, _) = try setup(governor: cfg, clock: clock) { _, _ in .boost() }
        #expect(b.notify(.vmEntry, vcpu: 1) == .boosted)
        clock.advance(by: 2_000_000 - VCPUBudget.checkStepNs)
        #expect(b.enforceBudgets() == 0)
        clock.advance(by: 1)
        #expect(b.enforceBudgets() == 1)
        #expect(act.applied(to: ThreadID(101)) == nil)
    }

    @Test func badAreaDisablesPvschedAndLeavesTheHostUnchanged() throws {
        let (_, b, act, d) = try setup { _, v in v.guest == nil ? .none : .boost() }
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        buf.writer.setFlags(vcpu: 0, [.rtTaskRunning])
        #expect(b.notify(.vmExit(.halt), vcpu: 1) == .boosted)
        // The guest now writes garbage: unknown flag bits.
        buf.writer.update(vcpu: 0) { $0.flags = 0xFFFF_0000 }
        let outcome = b.notify(.vmExit(.halt), vcpu: 0)
        #expect(outcome == .disabled(.unknownFlags(vcpu: 0, bits: 0xFFFF_0000)))
        #expect(b.disabledReason?.field == "flags")
        // Every boost of the VM is undone and no later decision is applied.
        #expect(act.applied(to: ThreadID(101)) == nil)
        let callsBefore = d.calls.count
        #expect(b.notify(.vmEntry, vcpu: 1) == .unchanged)
        #expect(d.calls.count == callsBefore)
    }

    @Test func aCounterLeftOddUsesTheLastSnapshotThenDisables() throws {
        let (_, b, act, _) = try setup(governor: .unlimited) { _, v in
            v.guest?.flags.contains(.rtTaskRunning) == true ? .boost() : .unboost
        }
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        buf.writer.setFlags(vcpu: 0, [.rtTaskRunning])
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)
        // The guest is preempted mid-update: seq odd, fields half-written.
        buf.writer.vcpu(0).pointee.guest.seq &+= 1
        buf.writer.vcpu(0).pointee.guest.flags = 0xFFFF
        // Decisions use the last consistent snapshot: still boosted, nothing garbage applied.
        for _ in 0..<VMBinding.unsettledLimit { #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged) }
        #expect(act.applied(to: ThreadID(100)) == .fifo(priority: 10))
        // A counter that never settles is hostile: pvsched is disabled and the boost undone.
        #expect(b.notify(.vmEntry, vcpu: 0) == .disabled(.sequenceNeverSettled(vcpu: 0, attempts: SharedArea.maxReadAttempts)))
        #expect(b.disabledReason?.field == "seq")
        #expect(act.applied(to: ThreadID(100)) == nil)
    }

    @Test func actuatorFailureLeavesThreadUnboosted() throws {
        let (_, b, act, _) = try setup { _, _ in .boost() }
        act.failApplies(for: ThreadID(100))
        guard case .actuatorFailed = b.notify(.vmEntry, vcpu: 0) else { Issue.record("expected failure"); return }
        #expect(b.stats(vcpu: 0).boosted == false)
        #expect(b.notify(.vmEntry, vcpu: 1) == .boosted)
    }
}

/// The host side of "boost ahead of the guest's deadline", for any VM: the binding
/// learns the deadline from the line it reads at an event, the enforcer announces it.
@Suite struct DeadlineAnnouncementTests {
    @Test func aDeadlineReadAtAnEventIsAnnouncedItsLeadAheadEvenWithNoOtherEvent() throws {
        let clock = ManualClock(startNs: 10_000_000_000)
        let r = DriverRegistry()
        let d = ScriptedDriver("s") { e, _ in
            if case .deadline = e { return .boost() }
            return .none
        }
        try r.register(d)
        try r.setDefault("s")
        let b = try r.bind(vm: testVM, actuator: RecordingActuator(), governor: .unlimited, clock: clock)
        b.setThread(ThreadID(100), vcpu: 0)
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        b.deadlines.leadNs = 300_000
        // The guest's clock runs 4 s behind the host's; it sleeps until 2 ms from now.
        let guestNow = clock.nowNs() - 4_000_000_000
        buf.writer.update(vcpu: 0) { g in
            g.flags = GuestVCPUState.Flags.idle.rawValue
            g.guest_clock_ns = guestNow
            g.next_deadline_ns = guestNow + 2_000_000
        }
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 1_700_000)
        clock.advance(by: 1_000_000)
        #expect(b.announceDeadlines() == 0)
        clock.advance(by: 700_000)
        #expect(b.announceDeadlines() == 1)
        #expect(b.stats(vcpu: 0).boosted)
        #expect(b.announceDeadlines() == 0, "once")
        #expect(d.calls.filter { $0.hasPrefix("deadline") } == ["\(VCPUEvent.deadline(inNs: 300_000))"])
    }

    /// A driver that does not subscribe to `deadline` leaves the enforcer asleep.
    @Test func aDriverWithoutTheDeadlineEventSchedulesNone() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("s", events: [.halt]) { _, _ in .none })
        try r.setDefault("s")
        let b = try r.bind(vm: testVM, actuator: RecordingActuator(), governor: .unlimited)
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        let now = MonotonicClock.nowNs()
        buf.writer.update(vcpu: 0) { g in g.guest_clock_ns = now; g.next_deadline_ns = now + 50_000_000 }
        b.notify(.halt, vcpu: 0)
        #expect(b.nextEnforcerWakeNs() == nil)
        #expect(b.nextEnforcerWakeNs() == nil)
    }
}

/// A boost that a halt would end shortly before the guest's next deadline is held
/// through the halt: the thread sleeps boosted and wakes boosted, with no change of
/// the thread and no announcement, while its budgets keep bounding what it runs.
@Suite struct HoldThroughHaltTests {
    /// A latency-like driver: boosts for injections, deadlines and RT work, ends the boost at a halt.
    static func driver() -> ScriptedDriver {
        ScriptedDriver("hold") { e, v in
            switch e {
            case .interruptInjection, .deadline: return v.boosted ? .none : .boost()
            case .halt: return v.boosted ? .unboost : .none
            default: return .none
            }
        }
    }

    /// What the hold bell was told: "thread:earliest wake" (host ns), or "thread:released".
    final class Rings: Sendable {
        let rings = Mutex<[(Int32, UInt64?)]>([])
        var all: [String] { rings.withLock { $0.map { "\($0.0):\($0.1.map { "\($0)" } ?? "released")" } } }
        var count: Int { rings.withLock { $0.count } }
    }

    func setup(_ config: GovernorConfig = .unlimited) throws -> (VMBinding, RecordingActuator, SharedAreaBuffer, ManualClock, Rings) {
        let clock = ManualClock(startNs: 10_000_000_000)
        let r = DriverRegistry()
        try r.register(Self.driver())
        try r.setDefault("hold")
        let act = RecordingActuator()
        let b = try r.bind(vm: testVM, actuator: act, governor: config, clock: clock)
        b.setThread(ThreadID(100), vcpu: 0)
        b.deadlines.holdNs = 2_000_000
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        let rings = Rings()
        b.setHoldBell { t, earliest in rings.rings.withLock { $0.append((t.rawValue, earliest)) } }
        return (b, act, buf, clock, rings)
    }

    /// The guest publishes its next deadline `inNs` from now (its clock is the host's here).
    func publish(_ buf: SharedAreaBuffer, _ clock: ManualClock, deadlineInNs: UInt64?, idle: Bool) {
        buf.writer.update(vcpu: 0) { g in
            g.flags = idle ? GuestVCPUState.Flags.idle.rawValue : GuestVCPUState.Flags.rtTaskRunning.rawValue
            g.guest_clock_ns = clock.nowNs()
            g.next_deadline_ns = deadlineInNs.map { clock.nowNs() + $0 } ?? 0
        }
    }

    @Test func aHaltShortlyBeforeTheNextDeadlineKeepsTheBoostAndOneFarOffEndsIt() throws {
        let (b, act, buf, clock, rings) = try setup()
        let thread = ThreadID(100)
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        let changes = act.calls.count
        // Idle until its next deadline, 1 ms off: the boost is held, the thread untouched.
        clock.advance(by: 50_000)
        publish(buf, clock, deadlineInNs: 950_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(act.applied(to: thread) != nil)
        #expect(act.calls.count == changes)
        #expect(b.stats(vcpu: 0).holds == 1)
        // Told the deadline it is held for.
        #expect(rings.all == ["100:\(clock.nowNs() + 950_000)"])
        // Nothing to announce: what the deadline would start is in place.
        clock.advance(by: 900_000)
        #expect(b.announceDeadlines() == 0)
        // It wakes boosted for the deadline (its line still names it), runs, and halts
        // again before the next: held again.
        clock.advance(by: 100_000)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .unchanged)
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        clock.advance(by: 50_000)
        publish(buf, clock, deadlineInNs: 950_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(b.stats(vcpu: 0).holds == 2)
        #expect(act.calls.count == changes)
        // The same halt seen again (records the daemon reads late): still held.
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(b.stats(vcpu: 0).holds == 3)
        // A halt with the next deadline 10 ms off ends the boost: back to its own parameters.
        clock.advance(by: 950_000)
        publish(buf, clock, deadlineInNs: 10_000_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
        #expect(act.applied(to: thread) == nil)
        #expect(rings.count == 3 && rings.all.last == "100:released", "\(rings.all)")
        // And a halt with no deadline at all does not hold.
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        publish(buf, clock, deadlineInNs: nil, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
    }

    /// The VMM's main loop follows running boosts only: a hold releases it, and the
    /// end of the held boost does not release it twice.
    @Test func aHoldReleasesTheCompanionThreads() throws {
        let (b, act, buf, clock, _) = try setup()
        let mainLoop = ThreadID(300)
        b.setCompanionThreads([mainLoop])
        b.setThread(ThreadID(101), vcpu: 1)
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        #expect(act.applied(to: mainLoop) != nil)
        publish(buf, clock, deadlineInNs: 900_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(act.applied(to: mainLoop) == nil)
        // vCPU 1 boosts and unboosts meanwhile: the main loop follows it alone.
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 1) == .boosted)
        #expect(act.applied(to: mainLoop) != nil)
        publish(buf, clock, deadlineInNs: 10_000_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
        #expect(act.applied(to: mainLoop) != nil, "vCPU 1 still boosted")
        #expect(b.notify(.halt, vcpu: 1) == .unboosted)
        #expect(act.applied(to: mainLoop) == nil)
    }

    /// An interrupt well before the deadline the boost was held for wakes the vCPU for
    /// something else: the hold ends (the thread back at its own parameters) and the
    /// driver decides on it afresh; one near the deadline is the deadline's.
    @Test func anInterruptWellBeforeTheDeadlineEndsTheHold() throws {
        let clock = ManualClock(startNs: 10_000_000_000)
        let r = DriverRegistry()
        // Boosts only at deadlines (and keeps a boost there), ends it at halts.
        try r.register(ScriptedDriver("s") { e, v in
            switch e {
            case .deadline: return v.boosted ? .none : .boost()
            case .halt: return v.boosted ? .unboost : .none
            default: return .none
            }
        })
        try r.setDefault("s")
        let act = RecordingActuator()
        let b = try r.bind(vm: testVM, actuator: act, governor: .unlimited, clock: clock)
        let thread = ThreadID(100)
        b.setThread(thread, vcpu: 0)
        b.deadlines.holdNs = 2_000_000
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        publish(buf, clock, deadlineInNs: 400_000, idle: false)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)
        clock.advance(by: 300_000)
        #expect(b.announceDeadlines(aheadNs: 0) == 1)
        #expect(act.applied(to: thread) != nil)
        // Its work done, idle until the next deadline 1.5 ms off: held.
        clock.advance(by: 200_000)
        publish(buf, clock, deadlineInNs: 1_500_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unchanged)
        #expect(b.stats(vcpu: 0).holds == 1)
        // A device interrupt 1 ms before that deadline: the hold ends, and this driver does not boost it.
        clock.advance(by: 500_000)
        #expect(b.notify(.interruptInjection(vector: 40), vcpu: 0) == .unboosted)
        #expect(act.applied(to: thread) == nil)
        #expect(!b.stats(vcpu: 0).boosted)
    }

    /// A driver that would not keep a boost at the deadline gets its unboost.
    @Test func aDriverThatWouldNotBoostAtTheDeadlineIsNotOverruled() throws {
        let clock = ManualClock(startNs: 10_000_000_000)
        let r = DriverRegistry()
        try r.register(ScriptedDriver("s") { e, v in
            switch e {
            case .interruptInjection: return v.boosted ? .none : .boost()
            case .halt, .deadline: return v.boosted ? .unboost : .none
            default: return .none
            }
        })
        try r.setDefault("s")
        let act = RecordingActuator()
        let b = try r.bind(vm: testVM, actuator: act, governor: .unlimited, clock: clock)
        b.setThread(ThreadID(100), vcpu: 0)
        b.deadlines.holdNs = 2_000_000
        let buf = SharedAreaBuffer(vcpus: 2)
        b.setArea(try SharedArea(validating: buf.bytes))
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        publish(buf, clock, deadlineInNs: 900_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
        #expect(b.stats(vcpu: 0).holds == 0)
    }

    /// Holds are off unless the VM's hold window is set.
    @Test func noHoldByDefault() throws {
        let (b, act, buf, clock, rings) = try setup()
        b.deadlines.holdNs = 0
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        publish(buf, clock, deadlineInNs: 900_000, idle: true)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
        #expect(act.applied(to: ThreadID(100)) == nil)
        #expect(b.stats(vcpu: 0).holds == 0 && rings.count == 0)
    }

    /// While held, only CPU time run in a row spends the budget: a thread that sleeps
    /// between short runs keeps its boost for as long as it goes on so, and one that
    /// runs on is cut at its budget like any boost (and the hold ends with it).
    @Test func aHeldBoostIsBudgetedByTheCPUItRunsInARow() throws {
        let config = GovernorConfig(criticalBudgetNs: 2_000_000, generalBudgetNs: 2_000_000, throttleWindowNs: 10_000_000,
                                    shareWindowNs: .max, maxVMShare: 1)
        let (b, act, buf, clock, rings) = try setup(config)
        let thread = ThreadID(100)
        var cpu: UInt64 = 1_000_000_000
        act.setCPUTime(cpu, of: thread)
        publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .boosted)
        // 100 periods of 1 ms, 200 µs of work each: 20 ms of CPU in all, 10x the budget, never cut.
        for _ in 0..<100 {
            clock.advance(by: 200_000); cpu += 200_000; act.setCPUTime(cpu, of: thread)
            publish(buf, clock, deadlineInNs: 800_000, idle: true)
            #expect(b.notify(.halt, vcpu: 0) == .unchanged)
            clock.advance(by: 800_000)
            #expect(b.enforceBudgets() == 0)
            #expect(b.notify(.interruptInjection(vector: 236), vcpu: 0) == .unchanged)
            publish(buf, clock, deadlineInNs: 1_000_000, idle: false)
        }
        #expect(b.stats(vcpu: 0).holds == 100)
        // Now it runs on: the enforcer's look finds 2 ms run in a row, and cuts.
        let next = try #require(b.nextEnforcerWakeNs())
        #expect(next <= clock.nowNs() + 2_000_000)
        clock.advance(by: 2_000_000); cpu += 2_000_000; act.setCPUTime(cpu, of: thread)
        #expect(b.enforceBudgets() == 1)
        #expect(act.applied(to: thread) == nil)
        #expect(rings.all.last == "100:released")
    }
}
