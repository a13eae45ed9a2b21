import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import PVSchedCore
import PVSchedTesting

@Suite struct RegistryTests {
    @Test func namesAreUnique() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("a"))
        #expect(throws: RegistryError.duplicateName("a")) { try r.register(ScriptedDriver("a")) }
        #expect(r.driver(named: "a") != nil)
        #expect(r.driver(named: "b") == nil)
    }

    @Test func lookupByProtocolPicksACompatibleVersion() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("v1.0", version: .init(major: 1, minor: 0)))
        try r.register(ScriptedDriver("v1.2", version: .init(major: 1, minor: 2)))
        try r.register(ScriptedDriver("v2.0", version: .init(major: 2, minor: 0)))
        try r.register(ScriptedDriver("other", protocol: "other-proto"))
        #expect(r.driver(forProtocol: "pvsched-latency", version: .init(major: 1, minor: 1))?.name == "v1.0")
        #expect(r.driver(forProtocol: "pvsched-latency", version: .init(major: 1, minor: 5))?.name == "v1.2")
        #expect(r.driver(forProtocol: "pvsched-latency", version: .init(major: 2, minor: 3))?.name == "v2.0")
        #expect(r.driver(forProtocol: "pvsched-latency", version: .init(major: 3, minor: 0)) == nil)
        #expect(r.driver(forProtocol: "nope", version: .init(major: 1, minor: 0)) == nil)
    }

    @Test func assignReplaceUnassignAndDefault() throws {
        let r = DriverRegistry()
        let a = ScriptedDriver("a"), b = ScriptedDriver("b")
        try r.register(a); try r.register(b)
        try r.setDefault("a")
        let binding = try r.bind(vm: testVM, actuator: RecordingActuator())
        #expect(binding.driver === a)
        #expect(a.calls == ["attach 0", "attach 1"])
        let previous = try r.assign("b", to: testVM.id)
        #expect(previous === a)
        #expect(binding.driver === b)
        #expect(a.calls.suffix(2) == ["detach 0", "detach 1"])
        #expect(b.calls == ["attach 0", "attach 1"])
        // Changing the default does not move an explicitly assigned VM.
        try r.setDefault(nil)
        #expect(binding.driver === b)
        let back = try r.unassign(vm: testVM.id)
        #expect(back === b)
        #expect(binding.driver == nil)
        #expect(throws: RegistryError.unknownVM(99)) { try r.assign("a", to: 99) }
        #expect(throws: RegistryError.unknownDriver("zz")) { try r.assign("zz", to: testVM.id) }
    }

    @Test func unregisteringADriverInUseNeedsForce() throws {
        let r = DriverRegistry()
        let a = ScriptedDriver("a"), fallback = ScriptedDriver("fallback")
        try r.register(a); try r.register(fallback)
        let binding = try r.bind(vm: testVM, actuator: RecordingActuator())
        try r.assign("a", to: testVM.id)
        #expect(throws: RegistryError.driverInUse("a", vms: ["\(testVM)"])) { try r.unregister("a") }
        #expect(binding.driver === a)
        try r.setDefault("fallback")
        let removed = try r.unregister("a", force: true)
        #expect(removed === a)
        #expect(binding.driver === fallback)
        #expect(r.driver(named: "a") == nil)
        #expect(throws: RegistryError.unknownDriver("a")) { try r.unregister("a") }
    }

    @Test func negotiationHonoursAssignmentAndProtocol() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("lat", version: .init(major: 1, minor: 0)))
        try r.register(ScriptedDriver("oth", protocol: "other"))
        _ = try r.bind(vm: testVM, actuator: RecordingActuator())
        #expect(try r.negotiate(vm: testVM.id, protocolName: "pvsched-latency", version: .init(major: 1, minor: 0)).name == "lat")
        #expect(throws: RegistryError.noDriverForProtocol(name: "zzz", version: .init(major: 1, minor: 0))) {
            try r.negotiate(vm: testVM.id, protocolName: "zzz", version: .init(major: 1, minor: 0))
        }
        try r.assign("oth", to: testVM.id)
        #expect(throws: RegistryError.self) {
            try r.negotiate(vm: testVM.id, protocolName: "pvsched-latency", version: .init(major: 1, minor: 0))
        }
    }

    @Test func concurrentRegistrationIsSafe() async throws {
        let r = DriverRegistry()
        await withTaskGroup(of: Void.self) { g in
            for i in 0..<64 { g.addTask { try? r.register(ScriptedDriver("d\(i % 16)")) } }
        }
        #expect(r.drivers.count == 16)
    }
}

@Suite struct BoostClassTests {
    @Test func classesParseAndBoostsStayBelowTheProtectedHostPriorities() {
        #expect(BoostSettings.parseClass("fifo:10") == .fifo(priority: 10))
        #expect(BoostSettings.parseClass("rr:99") == .rr(priority: 99))
        #expect(BoostSettings.parseClass("nice:-20") == .other(nice: -20))
        #expect(BoostSettings.parseClass("slice:100") == .slice(nice: -20, sliceUs: 100))
        #expect(BoostSettings.parseClass("slice:300:nice:0") == .slice(nice: 0, sliceUs: 300))
        for text in ["fifo:10", "rr:99", "nice:-20", "slice:100", "slice:300:nice:0"] {
            #expect(BoostSettings.parseClass(text).map(BoostSettings.classText) == text)
        }
        for bad in ["fifo:0", "fifo:100", "nice:-21", "nice:20", "deadline:1", "fifo", "", "fifo:x", "slice:99", "slice:100001",
                    "slice:200:nice:-21", "slice:200:nice", "slice:200:fifo:3", "fifo:3:nice:0", "slice:200:nice:1:x", "slice::"] {
            #expect(BoostSettings.parseClass(bad) == nil, "\(bad)")
        }
        let b = BoostSettings(boosted: .fifo(priority: 10), maxPriority: 50, protectedHostPriority: 5)
        #expect(b.parameters(priority: nil) == .fifo(priority: 4))
        #expect(b.parameters(priority: 3) == .fifo(priority: 3))
        #expect(b.parameters(priority: 40) == .fifo(priority: 4))
        // Protecting every real-time priority makes the boost a fair-class one.
        #expect(BoostSettings(boosted: .rr(priority: 10), protectedHostPriority: 1).parameters(priority: 20) == .other(nice: -20))
        // A nice or slice class stays what it is whatever a driver asks.
        #expect(BoostSettings(boosted: .other(nice: -20)).parameters(priority: 30) == .other(nice: -20))
        #expect(BoostSettings(boosted: .slice(nice: -20, sliceUs: 150), protectedHostPriority: 1).parameters(priority: 30)
                == .slice(nice: -20, sliceUs: 150))
        #expect(BoostSettings(boosted: .fifo(priority: 60), protectedHostPriority: nil).parameters(priority: nil) == .fifo(priority: 60))
    }

    /// The enforcer runs just above what a VM's boosts can raise (the vCPU at the
    /// highest priority a driver may ask for, its companions one above), and no higher.
    @Test func theEnforcersPriorityIsJustAboveEveryBoostedThread() {
        #expect(BoostSettings().preemptingPriority == 50)  // fifo:10, drivers up to 49 (50 is protected)
        #expect(BoostSettings(boosted: .slice(nice: -20, sliceUs: 3000)).preemptingPriority == 1)
        #expect(BoostSettings(boosted: .other(nice: -20)).preemptingPriority == 1)
        #expect(BoostSettings(boosted: .fifo(priority: 10), protectedHostPriority: 1).preemptingPriority == 1)
        #expect(BoostSettings(boosted: .rr(priority: 5), maxPriority: 5).preemptingPriority == 7)  // companions at 6
        #expect(BoostSettings(boosted: .fifo(priority: 10), protectedHostPriority: nil).preemptingPriority == 52)
        #expect(BoostSettings(boosted: .fifo(priority: 99), maxPriority: 99, protectedHostPriority: nil).preemptingPriority == 99)
        func rt(_ p: SchedulingParameters) -> Int { Int(p.realTimePriority ?? 0) }
        for boosted in [SchedulingParameters.fifo(priority: 1), .fifo(priority: 10), .rr(priority: 40), .fifo(priority: 99),
                        .other(nice: -20), .slice(nice: -20, sliceUs: 100)] {
            for maxPriority: UInt8 in [1, 10, 50, 99] {
                for protected: UInt8? in [nil, 1, 2, 11, 50, 99] {
                    let b = BoostSettings(boosted: boosted, maxPriority: maxPriority, protectedHostPriority: protected)
                    let enforcer = Int(b.preemptingPriority)
                    for asked: UInt8? in [nil, 1, 5, 49, 98, 99] {
                        let vcpu = b.parameters(priority: asked)
                        let companion = b.companionParameters(for: vcpu)
                        let both = "\(boosted) max \(maxPriority) protected \(String(describing: protected)) asked \(String(describing: asked))"
                        #expect(rt(vcpu) < enforcer || enforcer == 99, "\(both)")
                        #expect(rt(companion) < enforcer || enforcer == 99, "\(both)")
                        if let protected { #expect(rt(companion) < Int(protected), "\(both)") }
                    }
                    // Never above the protected host priorities.
                    if let protected { #expect(enforcer <= Int(protected), "\(boosted) max \(maxPriority) protected \(protected)") }
                }
            }
        }
    }
}

/// A VM's budgets as its lanes keep them: a `VCPUBudget` per vCPU over one `VMShare`.
struct BudgetHarness {
    var config: GovernorConfig
    let share: VMShare
    var budgets: [VCPUBudget]
    init(_ config: GovernorConfig, vcpus: Int) {
        self.config = config; share = VMShare(vcpuCount: vcpus); budgets = Array(repeating: VCPUBudget(config), count: vcpus)
    }
    mutating func begin(_ v: Int, now: UInt64, cpuNs: UInt64? = nil, budget: BoostBudget = .general) -> GovernorVeto? {
        budgets[v].begin(config, share, now: now, cpuNs: cpuNs, budget: budget)
    }
    mutating func end(_ v: Int, now: UInt64, cpuNs: UInt64? = nil) { budgets[v].end(config, share, now: now, cpuNs: cpuNs) }
    mutating func check(_ v: Int, now: UInt64, cpuNs: UInt64? = nil, budget: BoostBudget? = nil) -> GovernorVeto? {
        budgets[v].checkOverrun(config, share, now: now, cpuNs: cpuNs, budget: budget)
    }
    var nextCheckNs: UInt64? { budgets.compactMap { $0.nextCheckNs(config, share) }.min() }
    mutating func left(_ v: Int, now: UInt64) -> (critical: UInt64, general: UInt64) { budgets[v].left(config, share, now: now) }
}

@Suite struct GovernorTests {
    /// The enforcer's next look: the earliest budget or VM-share exhaustion of the
    /// running boosts (here the share: 25% of 2 vCPUs × 10 ms is 5 ms, spent twice as
    /// fast by two boosts).
    @Test func theNextCheckIsTheEarliestBudgetOrShareExhaustion() {
        var g = BudgetHarness(.init(criticalBudgetNs: 4_000_000, generalBudgetNs: 8_000_000, throttleWindowNs: 0,
                                    shareWindowNs: 10_000_000, maxVMShare: 0.25), vcpus: 2)
        #expect(g.nextCheckNs == nil)
        #expect(g.begin(0, now: 1000, budget: .critical) == nil)
        #expect(g.nextCheckNs == 1000 + 4_000_000)
        #expect(g.check(0, now: 1000, budget: .general) == nil)
        #expect(g.nextCheckNs == 1000 + 5_000_000)
        #expect(g.begin(1, now: 1000) == nil)
        #expect(g.nextCheckNs == 1000 + 2_500_000)
    }

    /// Trimming a running boost's budget can make its check due sooner: the binding
    /// tells the alarm, which wakes an enforcer that planned to sleep longer.
    @Test func trimmingARunningBoostsBudgetWakesTheEnforcer() throws {
        let config = GovernorConfig(criticalBudgetNs: 5_000_000, generalBudgetNs: 5_000_000, throttleWindowNs: 0,
                                    shareWindowNs: .max, maxVMShare: 1)
        let r = DriverRegistry()
        try r.register(ScriptedDriver("boost") { _, v in v.boosted ? .none : .boost() })
        let b = try r.bind(vm: testVM, actuator: RecordingActuator(), governor: config)
        try r.assign("boost", to: testVM.id)
        b.setThread(ThreadID(100), vcpu: 0)
        #expect(b.notify(.vmEntry, vcpu: 0) == .boosted)  // no enforcer asleep yet: nothing to wake
        let alarm = try #require(b.budgetAlarm)
        let woke = WokeBox()
        let enforcer = try PVSchedCore.Thread { alarm.sleep { nil }; woke.mark() }
        usleep(10_000)
        #expect(woke.at == 0)
        let trimmed = MonotonicClock.nowNs()
        var smaller = config
        smaller.generalBudgetNs = 1_000_000
        b.updateGovernor(smaller)
        enforcer.join()
        #expect(woke.at - trimmed < BudgetAlarm.idleNs / 2)
    }

    @Test func aSpentBudgetCutsAndThrottlesAndThenAllowsAgain() {
        var g = BudgetHarness(.init(criticalBudgetNs: 40, generalBudgetNs: 100, throttleWindowNs: 50, shareWindowNs: .max, maxVMShare: 1), vcpus: 1)
        #expect(g.begin(0, now: 1000, cpuNs: 0) == nil)
        #expect(g.check(0, now: 1050, cpuNs: 50) == nil)
        #expect(g.check(0, now: 1100, cpuNs: 100) == .budgetExhausted(.general, untilNs: 1150))
        #expect(g.begin(0, now: 1120, cpuNs: 100) == .throttled(untilNs: 1150))
        #expect(g.budgets[0].isThrottled(now: 1120))
        // The budget refilled 1:1 with the 50 ns unboosted.
        #expect(g.left(0, now: 1150).general == 50)
        #expect(g.begin(0, now: 1150, cpuNs: 100) == nil)
    }

    @Test func onlyCPUTimeIsCharged() {
        // A boosted vCPU that halts (its thread does not run) spends nothing.
        var g = BudgetHarness(.init(criticalBudgetNs: 100, generalBudgetNs: 100, throttleWindowNs: 0, shareWindowNs: .max, maxVMShare: 1), vcpus: 1)
        #expect(g.begin(0, now: 0, cpuNs: 5000) == nil)
        #expect(g.check(0, now: 1_000_000, cpuNs: 5030) == nil)  // 1 ms of wall time, 30 ns run
        #expect(g.left(0, now: 1_000_000).general == 70)
        #expect(g.check(0, now: 2_000_000, cpuNs: 5100) == .budgetExhausted(.general, untilNs: 2_000_000))
        // Without a CPU clock, wall time is charged.
        #expect(g.begin(0, now: 3_000_000) == nil)
        #expect(g.check(0, now: 3_000_100) == .budgetExhausted(.general, untilNs: 3_000_100))
    }

    @Test func criticalSectionsHaveTheirOwnShorterBudget() {
        var g = BudgetHarness(.init(criticalBudgetNs: 20, generalBudgetNs: 100, throttleWindowNs: 10, shareWindowNs: .max, maxVMShare: 1), vcpus: 1)
        // An RT task runs 50 ns, then the guest enters an interrupt handler: charged to the critical budget.
        #expect(g.begin(0, now: 0, cpuNs: 0, budget: .general) == nil)
        #expect(g.check(0, now: 50, cpuNs: 50, budget: .critical) == nil)
        #expect(g.check(0, now: 60, cpuNs: 60, budget: .critical) == nil)
        #expect(g.left(0, now: 60) == (critical: 10, general: 50))
        #expect(g.check(0, now: 70, cpuNs: 70, budget: .critical) == .budgetExhausted(.critical, untilNs: 80))
        // Both refill while unboosted, up to their size.
        #expect(g.left(0, now: 1000) == (critical: 20, general: 100))
    }

    @Test func theEnforcerIsToldWhenABudgetCouldRunOut() {
        var g = BudgetHarness(.init(criticalBudgetNs: 300, generalBudgetNs: 1000, throttleWindowNs: 0, shareWindowNs: .max, maxVMShare: 1), vcpus: 2)
        #expect(g.nextCheckNs == nil)
        #expect(g.begin(0, now: 100, cpuNs: 0, budget: .general) == nil)
        #expect(g.nextCheckNs == 1100)
        #expect(g.begin(1, now: 200, cpuNs: 0, budget: .critical) == nil)
        #expect(g.nextCheckNs == 500)
        // Half of the wall time run: the earliest exhaustion moves later.
        #expect(g.check(1, now: 400, cpuNs: 100) == nil)
        #expect(g.nextCheckNs == 600)
        g.end(1, now: 450, cpuNs: 120)
        #expect(g.nextCheckNs == 1100)
    }

    /// The enforcer's looks at boosts whose threads run slower than wall time (they
    /// share their CPU): each look that does not cut leaves at least a check step of
    /// budget (and of the VM's share), so the looks are few and never closer than that
    /// step; they used to close in on the limit without reaching it (a real-time
    /// enforcer then spun until the share's window rolled over, up to 100 ms).
    @Test(arguments: [0.0, 0.01, 0.3, 0.7, 1.0])
    func boostsRunningSlowerThanWallTimeAreLookedAtAFewTimesNotEndlessly(runFraction: Double) {
        let check = VCPUBudget.checkStepNs
        for shareBound in [false, true] {
            // Either the 2 ms critical budget or the VM's share (10% of 2 vCPUs × 100 ms) runs out first.
            var g = BudgetHarness(.init(criticalBudgetNs: shareBound ? 80_000_000 : 2_000_000, generalBudgetNs: 80_000_000,
                                        throttleWindowNs: 1_000_000, shareWindowNs: 100_000_000,
                                        maxVMShare: shareBound ? 0.1 : 1), vcpus: 2)
            var now: UInt64 = 1_000_000_000
            var cpu: [UInt64] = [0, 0]
            #expect(g.begin(0, now: now, cpuNs: 0, budget: .critical) == nil)
            #expect(g.begin(1, now: now, cpuNs: 0, budget: .critical) == nil)
            var looks = 0
            var cut = [false, false]
            let start = now
            while !(cut[0] && cut[1]), looks < 100_000, now - start < 90_000_000, let at = g.nextCheckNs {
                #expect(at >= now, "a look planned in the past")
                let dt = at > now ? at - now : 0
                if looks > 0 { #expect(dt >= check / 2, "looks \(dt) ns apart (\(looks) looks, share: \(shareBound))") }
                now += dt
                looks += 1
                for v in 0..<2 where !cut[v] {
                    cpu[v] += UInt64(Double(dt) * runFraction)
                    if g.check(v, now: now, cpuNs: cpu[v]) != nil { cut[v] = true }
                }
            }
            // A boost whose thread runs is cut within a few looks; one whose thread
            // (almost) never runs is looked at about once per millisecond, or less.
            if runFraction >= 0.3 { #expect(cut == [true, true], "not cut (share: \(shareBound))") }
            #expect(looks <= (runFraction >= 0.3 ? 40 : 90), "\(looks) looks at a boost running \(runFraction) of the time (share: \(shareBound))")
        }
    }

    @Test func vmShareIsEnforced() {
        // Window 1000 ns, 2 vCPUs, 25% share: 500 ns of boosted CPU time per window.
        var g = BudgetHarness(.init(criticalBudgetNs: .max, generalBudgetNs: .max, throttleWindowNs: 0, shareWindowNs: 1000, maxVMShare: 0.25), vcpus: 2)
        #expect(g.begin(0, now: 0, cpuNs: 0) == nil)
        g.end(0, now: 300, cpuNs: 300)
        #expect(g.begin(1, now: 300, cpuNs: 0) == nil)
        #expect(g.check(1, now: 400, cpuNs: 100) == nil)
        #expect(g.check(1, now: 600, cpuNs: 300) == .vmShareExhausted(usedNs: 600, limitNs: 500))
        #expect(g.begin(0, now: 700, cpuNs: 300) == .vmShareExhausted(usedNs: 600, limitNs: 500))
        // A new window starts afresh.
        #expect(g.begin(0, now: 1000, cpuNs: 300) == nil)
    }
}

/// A driver whose every decision fails (as a faulting BPF program's would).
final class FailingDriver: Driver {
    let name = "failing"
    let protocolName = "pvsched-latency"
    let protocolVersion = ProtocolVersion(major: 1, minor: 0)
    let events: EventMask = .all
    private let failed = Mutex<UInt64>(0)
    var failedDecisions: UInt64 { failed.withLock { $0 } }
    func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        failed.withLock { $0 += 1 }
        return .none
    }
}

@Suite struct DriverEjectionTests {
    @Test func aDriverThatKeepsFailingIsEjectedToTheDefault() throws {
        let r = DriverRegistry()
        try r.register(ScriptedDriver("fallback") { _, _ in .none })
        try r.register(FailingDriver())
        try r.setDefault("fallback")
        let b = try r.bind(vm: testVM, actuator: RecordingActuator())
        try r.assign("failing", to: testVM.id)
        for _ in 0..<(VMBinding.failureLimit - 1) { b.notify(.vmEntry, vcpu: 0) }
        b.enforceBudgets()
        #expect(b.driver?.name == "failing")   // not yet: one short of the limit
        b.notify(.vmEntry, vcpu: 0)
        #expect(b.driver?.name == "failing")   // requested, carried out by the next budget check
        b.enforceBudgets()
        #expect(b.driver?.name == "fallback")
        #expect(b.ejection?.contains("driver 'failing' ejected: 100 decisions in a row failed on vCPU 0; now 'fallback'") == true)
    }

    @Test func aFailingDefaultDriverLeavesTheVMWithNone() throws {
        let r = DriverRegistry()
        try r.register(FailingDriver())
        try r.setDefault("failing")
        let b = try r.bind(vm: testVM, actuator: RecordingActuator())
        for _ in 0..<VMBinding.failureLimit { b.notify(.halt, vcpu: 0) }
        b.enforceBudgets()
        #expect(b.driver == nil)
        #expect(b.ejection?.hasSuffix("now no driver") == true)
    }
}
