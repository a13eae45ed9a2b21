import Testing
@testable import PVSchedCore

/// A lane's steps driven with values alone: no actuator, no clock, no binding.
@Suite struct VCPULaneTests {
    static let t = ThreadID(100)
    static let config = GovernorConfig(criticalBudgetNs: 2_000_000, generalBudgetNs: 5_000_000, throttleWindowNs: 10_000_000,
                                       shareWindowNs: .max, maxVMShare: 1, repaymentFactor: 2, maxRepaymentNs: 20_000_000)

    static func lane() -> VCPULane {
        var l = VCPULane(config: config)
        _ = l.replaceThread(t, ownership: .pvsched, ctx(0))
        return l
    }

    static let share = VMShare(vcpuCount: 1)
    static func ctx(_ now: UInt64, cpu: UInt64? = nil) -> LaneContext {
        LaneContext(now: now, config: config, share: share, boost: BoostSettings(), cpuNs: cpu)
    }

    @Test func aBoostAppliesTheClassAndItsEndRepaysWhatTheThreadRan() {
        var l = Self.lane()
        let (outcome, step) = l.carryOut(.boost(), Self.ctx(1_000, cpu: 0), idle: false)
        #expect(outcome == .boosted)
        #expect(step.actuations == [.apply(.fifo(priority: 10), Self.t, .boost)])
        #expect(step.boostsDelta == 1)
        #expect(step.alarmAt == 1_000 + 5_000_000)  // when the general budget could run out
        // 300 µs of CPU time boosted: 600 µs of repayment at nice 19.
        let (end, endStep) = l.carryOut(.unboost, Self.ctx(2_000_000, cpu: 300_000), idle: false)
        #expect(end == .unboosted)
        #expect(endStep.actuations == [.apply(.other(nice: 19), Self.t, .repayment)])
        #expect(endStep.alarmAt == 2_000_000 + 600_000)
        #expect(l.repaymentEndNs == 2_600_000)
        #expect(l.stats.boostCount == 1 && l.stats.repayments == 1 && l.stats.boostedNs == 1_999_000)
    }

    @Test func aVCPUThatGoesIdleOwesNothingAndABoostEndsARepayment() {
        var l = Self.lane()
        _ = l.carryOut(.boost(), Self.ctx(0, cpu: 0), idle: false)
        let (_, idle) = l.carryOut(.unboost, Self.ctx(1_000_000, cpu: 500_000), idle: true)
        #expect(idle.actuations == [.restore(Self.t, .unboost)])
        #expect(!l.isRepaying)
        // Repaying, then a boost: the repayment ends first, the boost starts from the thread's own.
        _ = l.carryOut(.boost(), Self.ctx(2_000_000, cpu: 500_000), idle: false)
        _ = l.carryOut(.unboost, Self.ctx(3_000_000, cpu: 1_000_000), idle: false)
        #expect(l.isRepaying)
        let (_, again) = l.carryOut(.boost(), Self.ctx(3_100_000, cpu: 1_000_000), idle: false)
        #expect(again.actuations == [.restore(Self.t, .endRepayment), .apply(.fifo(priority: 10), Self.t, .boost)])
    }

    @Test func aBoostPastItsBudgetIsCutAndTheVCPUThrottled() {
        var l = Self.lane()
        _ = l.carryOut(.boost(), Self.ctx(0, cpu: 0), idle: false)
        let (veto, step) = l.enforce(Self.ctx(6_000_000, cpu: 5_000_000))
        #expect(veto == .budgetExhausted(.general, untilNs: 16_000_000))
        #expect(step.boostsDelta == -1)
        #expect(step.actuations == [.apply(.other(nice: 19), Self.t, .repayment)])
        let (outcome, none) = l.carryOut(.boost(), Self.ctx(7_000_000, cpu: 5_000_000), idle: false)
        #expect(outcome == .vetoed(.throttled(untilNs: 16_000_000)))
        #expect(none.actuations.isEmpty)
        #expect(l.stats.throttleCount == 2 && l.stats.vetoesThrottled == 2)
    }

    @Test func aFailedBoostIsTakenBackAndItsCauseSaidOnce() {
        var l = Self.lane()
        let eperm = ActuatorError(thread: Self.t, operation: "sched_setattr", errno: 1)
        for k in 0..<3 {
            let ctx = Self.ctx(UInt64(k) * 1_000_000, cpu: 0)
            let (_, step) = l.carryOut(.boost(), ctx, idle: false)
            let (instead, outcome, amend) = l.failed(step.actuations[0], eperm, ctx)
            #expect(instead == [.restore(Self.t, .unboost)])
            #expect(outcome == .actuatorFailed(eperm))
            #expect(amend.boostsDelta == -1)
            #expect(amend.notes == (k == 0 ? [.boostsBlocked("sched_setattr: permission denied (EPERM)")] : []))
            #expect(!l.isBoosted && l.stats.boostCount == 0)
        }
        #expect(l.stats.failedBoosts.permissionDenied == 3)
        _ = l.carryOut(.boost(), Self.ctx(9_000_000, cpu: 0), idle: false)
        #expect(l.boostApplied() == [.boostsApplyAgain])
    }

    @Test func aThreadThatExitedIsDroppedAndNeverActedOnAgain() {
        var l = Self.lane()
        let ctx = Self.ctx(0, cpu: 0)
        let (_, step) = l.carryOut(.boost(), ctx, idle: false)
        let gone = ActuatorError(thread: Self.t, operation: "check", errno: 3, kind: .threadGone)
        let (instead, _, amend) = l.failed(step.actuations[0], gone, ctx)
        #expect(instead == [])
        #expect(amend.notes.contains(.threadGone(Self.t)))
        #expect(l.thread == nil && l.stats.thread == .gone)
        #expect(l.carryOut(.boost(), Self.ctx(1_000), idle: false).0 == .unchanged)
    }

    @Test func aMidUpdateLineIsBorneForAWhileThenDisablesTheVM() {
        var l = Self.lane()
        let fresh = GuestVCPUState(sequence: 2, flags: [.rtTaskRunning], task: .fifo(priority: 50), guestClockNs: 10)
        #expect(l.observe(.success(fresh), now: 0, leadNs: nil).guest == fresh)
        let unsettled = SharedAreaError.sequenceNeverSettled(vcpu: 0, attempts: 64)
        for _ in 0..<VCPULane.unsettledLimit {
            let seen = l.observe(.failure(unsettled), now: 1, leadNs: nil)
            #expect(seen.guest == fresh && seen.disable == nil)
        }
        #expect(l.observe(.failure(unsettled), now: 2, leadNs: nil).disable == unsettled)
        #expect(l.observe(.failure(.unknownFlags(vcpu: 0, bits: 0x8000)), now: 3, leadNs: nil).disable != nil)
    }

    @Test func aPublishedDeadlineIsRecordedOnTheHostClockOnce() {
        var l = Self.lane()
        // The guest's clock learned from a fresh line: guest 1 000 ns is host 5 000 ns.
        let line = GuestVCPUState(sequence: 2, flags: [.idle], task: .normal(nice: 0), nextDeadlineNs: 1_001_000, guestClockNs: 1_000)
        let due = l.observe(.success(line), now: 5_000, leadNs: 200_000).deadlineDue
        #expect(due == 5_000 + 1_000_000 - 200_000)
        #expect(l.observe(.success(line), now: 6_000, leadNs: 200_000).deadlineDue == nil, "the same deadline")
    }
}
