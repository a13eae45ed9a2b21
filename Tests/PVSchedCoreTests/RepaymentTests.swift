import PVSchedTesting
import Testing
@testable import PVSchedCore

@Suite struct RepaymentLedgerTests {
    /// A vCPU that shares its CPU with two busy threads (factor 2) and runs 1 ms
    /// boosted took 2/3 ms from them; at (next to) no share it gives that back in 2 ms.
    @Test func aBoostIsRepaidForTheFactorTimesTheCPUTimeItRan() {
        var l = RepaymentLedger()
        l.boostBegan(cpuNs: 5_000_000)
        #expect(l.boostEnded(cpuNs: 6_000_000, now: 10_000_000, factor: 2, maxNs: 20_000_000) == 2_000_000)
        #expect(l.repayingUntilNs == 12_000_000)
        l.repaymentEnded()
        #expect(!l.isRepaying)
    }

    @Test func nothingIsOwedWithoutACPUClockOrAFactorOrForATinyBoost() {
        var l = RepaymentLedger()
        l.boostBegan(cpuNs: nil)
        #expect(l.boostEnded(cpuNs: 1_000_000, now: 0, factor: 2, maxNs: 20_000_000) == nil)
        l.boostBegan(cpuNs: 0)
        #expect(l.boostEnded(cpuNs: 1_000_000, now: 0, factor: 0, maxNs: 20_000_000) == nil)
        l.boostBegan(cpuNs: 0)
        #expect(l.boostEnded(cpuNs: 10_000, now: 0, factor: 2, maxNs: 20_000_000) == nil, "20 µs: not worth two system calls")
        #expect(!l.isRepaying)
    }

    @Test func aCutRepaymentIsOwedAndEverythingIsCapped() {
        var l = RepaymentLedger()
        l.boostBegan(cpuNs: 0)
        #expect(l.boostEnded(cpuNs: 1_000_000, now: 0, factor: 3, maxNs: 20_000_000) == 3_000_000)
        // A boost 1 ms into the 3 ms repayment: 2 ms are owed.
        l.repaymentCut(now: 1_000_000, maxNs: 20_000_000)
        #expect(l.owedNs == 2_000_000 && !l.isRepaying)
        l.boostBegan(cpuNs: 1_000_000)
        #expect(l.boostEnded(cpuNs: 2_000_000, now: 5_000_000, factor: 3, maxNs: 20_000_000) == 2_000_000 + 3_000_000)
        #expect(l.owedNs == 0)
        l.repaymentEnded()
        l.boostBegan(cpuNs: 0)
        #expect(l.boostEnded(cpuNs: 100_000_000, now: 0, factor: 3, maxNs: 20_000_000) == 20_000_000, "capped")
    }

    @Test func theLeastWeightOfEachClass() {
        #expect(SchedulingParameters.other(nice: 0).repayment == .other(nice: 19))
        #expect(SchedulingParameters.other(nice: -5).repayment == .other(nice: 19))
        #expect(SchedulingParameters.slice(nice: 0, sliceUs: 700).repayment == .slice(nice: 19, sliceUs: 700))
        #expect(SchedulingParameters.batch(nice: 3).repayment == .batch(nice: 19))
        #expect(SchedulingParameters.other(nice: 19).repayment == nil)
        #expect(SchedulingParameters.idle.repayment == nil)
        #expect(SchedulingParameters.fifo(priority: 5).repayment == nil)
    }
}

/// Repayments through the binding: the actuator sets them, the enforcer ends them.
@Suite struct BindingRepaymentTests {
    let thread = ThreadID(100)

    private func setup(_ config: GovernorConfig = GovernorConfig(criticalBudgetNs: .max, generalBudgetNs: .max, throttleWindowNs: 0,
                                                                   shareWindowNs: .max, maxVMShare: 1))
        throws -> (VMBinding, RecordingActuator, ManualClock, ScriptedDriver) {
        let clock = ManualClock()
        let r = DriverRegistry()
        let d = ScriptedDriver("s") { e, _ in
            switch e {
            case .interruptInjection: return .boost()
            case .vmExit(.doorbell), .halt: return .unboost
            default: return .none
            }
        }
        try r.register(d)
        try r.register(ScriptedDriver("other"))
        try r.setDefault("s")
        let act = RecordingActuator()
        act.setInitial(.other(nice: 0), for: thread)
        act.setCPUTime(0, of: thread)
        let b = try r.bind(vm: testVM, actuator: act, governor: config, clock: clock)
        b.setThread(thread, vcpu: 0)
        return (b, act, clock, d)
    }

    /// A boost in which the thread runs 1 ms: with the default factor (2) it runs at
    /// nice 19 for 2 ms, then at its own parameters again.
    private func boostAndEnd(_ b: VMBinding, _ act: RecordingActuator, _ clock: ManualClock, cpuAtStartUs: UInt64 = 1000) {
        act.setCPUTime(cpuAtStartUs * 1000, of: thread)
        #expect(b.notify(.interruptInjection(vector: 0x31), vcpu: 0) == .boosted)
        clock.advance(by: 1_000_000)
        act.setCPUTime(cpuAtStartUs * 1000 + 1_000_000, of: thread)
        #expect(b.notify(.vmExit(.doorbell), vcpu: 0) == .unboosted)  // the guest goes on running
    }

    @Test func aBoostIsRepaidAtNice19AndTheEnforcerEndsTheRepaymentOnTime() throws {
        let (b, act, clock, _) = try setup()
        boostAndEnd(b, act, clock)
        #expect(act.calls == [.apply(.fifo(priority: 10), thread), .apply(.other(nice: 19), thread)])
        #expect(b.stats(vcpu: 0).repaying)
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 2_000_000)
        clock.advance(by: 1_999_000)
        b.enforceBudgets()
        #expect(act.calls.count == 2)
        clock.advance(by: 1000)
        b.enforceBudgets()
        #expect(act.calls.last == .restore(thread))
        let st = b.stats(vcpu: 0)
        #expect(!st.repaying && st.repayments == 1 && st.repaymentNs == 2_000_000)
        #expect(b.nextEnforcerWakeNs() == nil)
    }

    @Test func aBoostDuringARepaymentEndsItFirstAndTheRestIsOwed() throws {
        let (b, act, clock, _) = try setup()
        boostAndEnd(b, act, clock)
        clock.advance(by: 500_000)
        act.setCPUTime(2_000_000, of: thread)
        #expect(b.notify(.interruptInjection(vector: 0x31), vcpu: 0) == .boosted)
        #expect(act.calls.suffix(2) == [.restore(thread), .apply(.fifo(priority: 10), thread)])
        clock.advance(by: 1_000_000)
        act.setCPUTime(3_000_000, of: thread)
        #expect(b.notify(.vmExit(.doorbell), vcpu: 0) == .unboosted)
        // 1.5 ms owed from the cut repayment, 2 ms for this boost.
        #expect(b.nextEnforcerWakeNs() == clock.nowNs() + 3_500_000)
    }

    @Test func aReplacedDriverOrAStoppedVMOwesNothing() throws {
        let (b, act, clock, _) = try setup()
        boostAndEnd(b, act, clock)
        b.install(ScriptedDriver("other"))
        #expect(act.calls.last == .restore(thread))
        #expect(!b.stats(vcpu: 0).repaying)
        #expect(b.nextEnforcerWakeNs() == nil)
    }

    @Test func anOperatorsChangeDuringARepaymentWins() throws {
        let (b, act, clock, _) = try setup()
        boostAndEnd(b, act, clock)
        act.setByOperator(.other(nice: 5), for: thread)
        clock.advance(by: 2_000_000)
        b.enforceBudgets()
        #expect(b.stats(vcpu: 0).thread == .operator)
        #expect(!act.calls.contains(.restore(thread)))
    }

    @Test func repaymentsCanBeTurnedOff() throws {
        var config = GovernorConfig(criticalBudgetNs: .max, generalBudgetNs: .max, throttleWindowNs: 0, shareWindowNs: .max, maxVMShare: 1)
        config.repaymentFactor = 0
        let (b, act, clock, _) = try setup(config)
        boostAndEnd(b, act, clock)
        #expect(act.calls == [.apply(.fifo(priority: 10), thread), .restore(thread)])
        #expect(b.stats(vcpu: 0).repayments == 0)
    }

    /// A vCPU that goes idle owes nothing: a boost that ends at a halt is not repaid,
    /// and a halt ends a repayment in progress (what was owed is forgiven).
    @Test func aVCPUThatHaltsOwesNothing() throws {
        let (b, act, clock, _) = try setup()
        act.setCPUTime(1_000_000, of: thread)
        #expect(b.notify(.interruptInjection(vector: 0x31), vcpu: 0) == .boosted)
        clock.advance(by: 1_000_000)
        act.setCPUTime(2_000_000, of: thread)
        #expect(b.notify(.halt, vcpu: 0) == .unboosted)
        #expect(act.calls == [.apply(.fifo(priority: 10), thread), .restore(thread)])
        boostAndEnd(b, act, clock, cpuAtStartUs: 3000)
        #expect(b.stats(vcpu: 0).repaying)
        b.notify(.vmExit(.halt), vcpu: 0)
        #expect(act.calls.last == .restore(thread))
        #expect(!b.stats(vcpu: 0).repaying)
        #expect(b.nextEnforcerWakeNs() == nil)
    }

    /// A thread with no lower weight to go to owes nothing.
    @Test func aThreadAlreadyAtTheLeastWeightIsNotRepaid() throws {
        let (b, act, clock, _) = try setup()
        act.setInitial(.other(nice: 19), for: thread)
        boostAndEnd(b, act, clock)
        #expect(act.calls == [.apply(.fifo(priority: 10), thread), .restore(thread)])
    }

    /// A boost the governor cuts is repaid too (a hostile guest's most of all).
    @Test func aCutBoostIsRepaid() throws {
        let config = GovernorConfig(criticalBudgetNs: 500_000, generalBudgetNs: 500_000, throttleWindowNs: 1_000_000,
                                    shareWindowNs: .max, maxVMShare: 1)
        let (b, act, clock, _) = try setup(config)
        act.setCPUTime(1_000_000, of: thread)
        #expect(b.notify(.interruptInjection(vector: 0x31), vcpu: 0) == .boosted)
        clock.advance(by: 600_000)
        act.setCPUTime(1_600_000, of: thread)
        #expect(b.enforceBudgets() == 1)
        #expect(act.calls.last == .apply(.other(nice: 19), thread))
        #expect(b.nextEnforcerWakeNs().map { $0 >= clock.nowNs() + 1_200_000 } == true)
    }
}
