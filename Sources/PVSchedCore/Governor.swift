import Synchronization

/// The host's budget for boosting one VM's vCPUs.
///
/// Budgets are CPU time: what a vCPU thread actually runs while boosted (its
/// thread CPU clock), so a boosted vCPU that halts, or waits for the host, is not
/// charged. Each vCPU has two budgets, one for critical sections (the guest in an
/// interrupt, softirq, NMI or preemption-off section, or an injected interrupt not
/// yet taken) and a longer one for everything else (real-time tasks, boost
/// requests). Both refill 1:1 with the time the vCPU spends unboosted, up to
/// their size. A boost that empties the budget it is charged to is cut, and the
/// vCPU may not boost again for `throttleWindowNs` (while its budgets refill).
/// On top, the VM as a whole may spend at most `maxVMShare` of its vCPUs' time
/// boosted over `shareWindowNs`.
public struct GovernorConfig: Equatable, Sendable {
    /// CPU time a vCPU may run boosted in critical sections before the boost is cut.
    public var criticalBudgetNs: UInt64
    /// CPU time a vCPU may run boosted otherwise (real-time tasks) before the boost is cut.
    public var generalBudgetNs: UInt64
    /// After a cut, how long the vCPU may not be boosted again.
    public var throttleWindowNs: UInt64
    /// The window over which the VM's share of boosted time is measured.
    public var shareWindowNs: UInt64
    /// Largest fraction (0...1) of `shareWindowNs × vCPUs` that the VM may spend boosted.
    public var maxVMShare: Double
    /// How a vCPU repays its boosts: after a boost in which it ran `B`, it runs at the
    /// least weight of its own class for `repaymentFactor × B` (see `RepaymentLedger`;
    /// the factor is the number of busy threads expected beside the vCPU on its CPU).
    /// 0: boosts are not repaid.
    public var repaymentFactor: Double
    /// The longest repayment after one boost (what is owed beyond it is forgiven).
    public var maxRepaymentNs: UInt64

    public init(criticalBudgetNs: UInt64 = 2_000_000, generalBudgetNs: UInt64 = 5_000_000, throttleWindowNs: UInt64 = 10_000_000,
                shareWindowNs: UInt64 = 100_000_000, maxVMShare: Double = 0.5, repaymentFactor: Double = 2,
                maxRepaymentNs: UInt64 = 20_000_000) {
        self.criticalBudgetNs = criticalBudgetNs
        self.generalBudgetNs = generalBudgetNs
        self.throttleWindowNs = throttleWindowNs
        self.shareWindowNs = shareWindowNs
        self.maxVMShare = maxVMShare
        self.repaymentFactor = repaymentFactor
        self.maxRepaymentNs = maxRepaymentNs
    }

    /// The repayment factors and longest repayments (µs) accepted from outside (the
    /// control API, the CLI).
    public static let repaymentFactorRange: ClosedRange<Double> = 0...64
    public static let maxRepaymentUsRange: ClosedRange<Int64> = 0...1_000_000

    public static let `default` = GovernorConfig()
    /// No limits at all (for measuring the unprotected mechanism).
    public static let unlimited = GovernorConfig(criticalBudgetNs: .max, generalBudgetNs: .max, throttleWindowNs: 0,
                                                 shareWindowNs: .max, maxVMShare: 1.0, repaymentFactor: 0)

    func budget(_ kind: BoostBudget) -> UInt64 { kind == .critical ? criticalBudgetNs : generalBudgetNs }
}

/// Which of a vCPU's two budgets a boost is charged to.
public enum BoostBudget: String, Sendable, CustomStringConvertible {
    /// Interrupts, softirqs, NMIs, preemption-off sections, injected interrupts not yet taken.
    case critical
    /// Real-time tasks and everything else.
    case general
    public var description: String { rawValue }
}

/// Why the governor refused or cut a boost.
public enum GovernorVeto: Equatable, Sendable, CustomStringConvertible {
    /// The vCPU's last boost emptied a budget; it may boost again at `untilNs`.
    case throttled(untilNs: UInt64)
    /// The running boost emptied its budget (CPU time); the vCPU is throttled until `untilNs`.
    case budgetExhausted(BoostBudget, untilNs: UInt64)
    /// The VM has used `usedNs` of boosted time in this window, the limit is `limitNs`.
    case vmShareExhausted(usedNs: UInt64, limitNs: UInt64)

    public var description: String {
        switch self {
        case .throttled(let until): return "vCPU throttled until t=\(until) ns after emptying a boost budget"
        case .budgetExhausted(let b, let until): return "boost cut: its \(b) budget is spent; vCPU throttled until t=\(until) ns"
        case .vmShareExhausted(let used, let limit): return "VM used \(used) ns of boosted time in this window (limit \(limit) ns)"
        }
    }
}

/// Enforces a VM's boost budgets (see `GovernorConfig`). It only answers; the
/// binding acts on its answers and tells it, at every step, the wall time and the
/// boosted thread's CPU time.
///
/// Each vCPU's budgets have a lock of their own and the VM's share is kept in atomics,
/// so that no lock is shared between vCPUs: a vCPU thread preempted while it holds
/// its budgets (one repaying a boost at nice 19 may wait tens of milliseconds for its
/// CPU) holds up no other vCPU. Only the enforcer, a real-time thread, takes them all
/// (`nextCheckNs`), and the locks lend it their holders' priority.
public final class Governor: Sendable {
    /// The limits in force (an operator may change them while the VM runs).
    public var config: GovernorConfig { config(vcpu: 0) }
    private struct VCPUBudget {
        /// Budgets left (ns of CPU time) as of `lastWallNs`.
        var critical: UInt64 = .max
        var general: UInt64 = .max
        subscript(_ b: BoostBudget) -> UInt64 {
            get { b == .critical ? critical : general }
            set { if b == .critical { critical = newValue } else { general = newValue } }
        }
        var boosted = false
        var charging = BoostBudget.general
        /// When the budgets were last brought up to date, and the thread's CPU time then (while boosted).
        var lastWallNs: UInt64?
        var lastCPUNs: UInt64 = 0
        var throttledUntil: UInt64 = 0
    }
    /// One vCPU's budgets, and its copy of the limits (changed for all vCPUs at once).
    private struct VCPUState {
        var config: GovernorConfig
        var budget = VCPUBudget()
    }
    private final class Slot: Sendable {
        let state: Mutex<VCPUState>
        init(_ s: VCPUState) { state = Mutex(s) }
    }
    private let slots: [Slot]
    private let vcpuCount: Int
    /// The VM's share window: where it began, and the boosted CPU time accounted in it.
    private let windowStart = Atomic<UInt64>(0)
    private let windowUsedNs = Atomic<UInt64>(0)
    /// How many vCPUs are boosted now (for the share's next check).
    private let boostedCount = Atomic<Int>(0)
    /// Woken when a change moves the next budget check earlier (see `nextCheckNs`).
    private let alarm: BudgetAlarm?
    /// Serialises `update`s (the control plane's), never taken by a vCPU.
    private let updates = Mutex(())

    /// `alarm`, if given, is told whenever a boost begins, changes budget or has its
    /// budget trimmed: the moments the next check can move earlier.
    public init(config: GovernorConfig, vcpuCount: Int, alarm: BudgetAlarm? = nil) {
        self.vcpuCount = vcpuCount
        self.alarm = alarm
        var s = VCPUState(config: config)
        s.budget.critical = config.criticalBudgetNs
        s.budget.general = config.generalBudgetNs
        slots = (0..<max(1, vcpuCount)).map { _ in Slot(s) }
    }

    /// The limits as `vcpu` sees them (all vCPUs see the same, but each reads its own copy).
    public func config(vcpu: Int) -> GovernorConfig { slots[vcpu].state.withLock { $0.config } }

    /// Replaces the limits; budgets larger than the new sizes are trimmed.
    public func update(_ config: GovernorConfig) {
        updates.withLock { _ in
            for (i, slot) in slots.enumerated() {
                slot.state.withLock { s in
                    s.config = config
                    s.budget.critical = min(s.budget.critical, config.criticalBudgetNs)
                    s.budget.general = min(s.budget.general, config.generalBudgetNs)
                    announceNextCheck(s, vcpu: i)
                }
            }
        }
    }

    /// Tells the alarm when `vcpu`'s boost, or the VM's share, could next run out (it
    /// wakes the enforcer only if that is sooner than planned). Under the vCPU's lock,
    /// after the change.
    private func announceNextCheck(_ s: VCPUState, vcpu: Int) {
        guard let alarm, s.budget.boosted else { return }
        let since = s.budget.lastWallNs ?? 0
        var next = Self.plus(since, s.budget[s.budget.charging])
        if let share = shareCheck(s.config, since: since) { next = min(next, share) }
        alarm.need(checkAtNs: next)
    }

    private static func plus(_ a: UInt64, _ b: UInt64) -> UInt64 { let (t, o) = a.addingReportingOverflow(b); return o ? .max : t }

    /// When the boosted vCPUs together could spend the VM's share, accounted up to
    /// `since` at the latest (each spends at most 1 ns per ns); nil without a limit.
    private func shareCheck(_ config: GovernorConfig, since: UInt64) -> UInt64? {
        let limit = shareLimitNs(config)
        guard limit != .max else { return nil }
        let used = windowUsedNs.load(ordering: .relaxed)
        let boosted = UInt64(max(1, boostedCount.load(ordering: .relaxed)))
        return Self.plus(since, (limit > used ? limit - used : 0) / boosted)
    }

    private func shareLimitNs(_ config: GovernorConfig) -> UInt64 {
        if config.maxVMShare >= 1.0 || config.shareWindowNs == .max { return .max }
        let limit = Double(config.shareWindowNs) * Double(vcpuCount) * max(0, config.maxVMShare)
        return limit >= Double(UInt64.max) ? .max : UInt64(limit)
    }

    /// Starts a new share window when the current one is over (whoever sees it first).
    private func roll(_ config: GovernorConfig, now: UInt64) {
        let window = config.shareWindowNs
        guard window != .max, window > 0 else { return }
        let start = windowStart.load(ordering: .acquiring)
        guard now >= start, now - start >= window else { return }
        let fresh = now - (now - start) % window
        if windowStart.compareExchange(expected: start, desired: fresh, ordering: .acquiringAndReleasing).exchanged {
            windowUsedNs.store(0, ordering: .releasing)
        }
    }

    /// Brings a vCPU's budgets up to `now`: an unboosted vCPU refills both 1:1 with
    /// wall time; a boosted one is charged the CPU time its thread ran since the last
    /// step, to the budget it is charging.
    private func account(_ s: inout VCPUState, now: UInt64, cpuNs: UInt64?) {
        var v = s.budget
        defer { s.budget = v }
        let since = v.lastWallNs ?? now
        let wall = now > since ? now - since : 0
        if v.boosted {
            // Without a CPU clock, wall time is charged (the thread ran at most that long).
            let cpu = cpuNs.map { $0 > v.lastCPUNs ? $0 - v.lastCPUNs : 0 } ?? wall
            v[v.charging] = v[v.charging] > cpu ? v[v.charging] - cpu : 0
            windowUsedNs.wrappingAdd(cpu, ordering: .relaxed)
            if let cpuNs { v.lastCPUNs = cpuNs }
        } else {
            let (c, oc) = v.critical.addingReportingOverflow(wall)
            let (g, og) = v.general.addingReportingOverflow(wall)
            v.critical = oc ? s.config.criticalBudgetNs : min(c, s.config.criticalBudgetNs)
            v.general = og ? s.config.generalBudgetNs : min(g, s.config.generalBudgetNs)
        }
        v.lastWallNs = now
    }

    /// May `vcpu` start a boost charged to `budget` now? `cpuNs` is its thread's CPU
    /// time now (nil without a CPU clock). Records the start when allowed.
    public func beginBoost(vcpu: Int, now: UInt64, cpuNs: UInt64? = nil, budget: BoostBudget = .general) -> GovernorVeto? {
        slots[vcpu].state.withLock { s in
            roll(s.config, now: now)
            if s.budget.boosted { return nil }
            if now < s.budget.throttledUntil { return .throttled(untilNs: s.budget.throttledUntil) }
            let limit = shareLimitNs(s.config)
            let used = windowUsedNs.load(ordering: .relaxed)
            if used >= limit { return .vmShareExhausted(usedNs: used, limitNs: limit) }
            account(&s, now: now, cpuNs: nil)
            if s.budget[budget] == 0 { return .throttled(untilNs: now) }
            s.budget.boosted = true
            s.budget.charging = budget
            s.budget.lastCPUNs = cpuNs ?? 0
            boostedCount.wrappingAdd(1, ordering: .relaxed)
            announceNextCheck(s, vcpu: vcpu)
            return nil
        }
    }

    /// Records the end of `vcpu`'s boost (`cpuNs`: its thread's CPU time now).
    public func endBoost(vcpu: Int, now: UInt64, cpuNs: UInt64? = nil) {
        slots[vcpu].state.withLock { s in
            roll(s.config, now: now)
            guard s.budget.boosted else { return }
            account(&s, now: now, cpuNs: cpuNs)
            s.budget.boosted = false
            boostedCount.wrappingSubtract(1, ordering: .relaxed)
        }
    }

    /// Must `vcpu`'s running boost be cut now? Charges the CPU time since the last
    /// step to the budget it was charging, then charges `budget` from here on. If a
    /// budget is spent or the VM's share is used up, the boost is ended (and, for a
    /// spent budget, the vCPU throttled) and the reason returned.
    public func checkOverrun(vcpu: Int, now: UInt64, cpuNs: UInt64? = nil, budget: BoostBudget? = nil) -> GovernorVeto? {
        slots[vcpu].state.withLock { s in
            roll(s.config, now: now)
            guard s.budget.boosted else { return nil }
            account(&s, now: now, cpuNs: cpuNs)
            let switched = budget.map { $0 != s.budget.charging } ?? false
            if let budget { s.budget.charging = budget }
            let charging = s.budget.charging
            if s.budget[charging] == 0 {
                s.budget.boosted = false
                boostedCount.wrappingSubtract(1, ordering: .relaxed)
                let (until, overflow) = now.addingReportingOverflow(s.config.throttleWindowNs)
                s.budget.throttledUntil = overflow ? .max : until
                return .budgetExhausted(charging, untilNs: s.budget.throttledUntil)
            }
            let limit = shareLimitNs(s.config)
            let used = windowUsedNs.load(ordering: .relaxed)
            if used > limit {
                s.budget.boosted = false
                boostedCount.wrappingSubtract(1, ordering: .relaxed)
                return .vmShareExhausted(usedNs: used, limitNs: limit)
            }
            if switched { announceNextCheck(s, vcpu: vcpu) }
            return nil
        }
    }

    /// The earliest wall time at which a running boost could spend its budget, or the
    /// boosts together the VM's share (a thread runs at most as fast as the wall clock):
    /// when the enforcer must look next. Nil while no vCPU is boosted.
    public func nextCheckNs() -> UInt64? {
        var next: UInt64?
        var since: UInt64?
        var config: GovernorConfig?
        for slot in slots {
            slot.state.withLock { s in
                config = config ?? s.config
                guard s.budget.boosted else { return }
                let wall = s.budget.lastWallNs ?? 0
                since = min(since ?? wall, wall)
                let at = Self.plus(wall, s.budget[s.budget.charging])
                next = min(next ?? at, at)
            }
        }
        guard var next, let since, let config else { return nil }
        if let share = shareCheck(config, since: since) { next = min(next, share) }
        return next
    }

    /// `vcpu`'s budgets left, brought up to `now` for an unboosted vCPU (for stats).
    public func budgetsLeft(vcpu: Int, now: UInt64) -> (critical: UInt64, general: UInt64) {
        slots[vcpu].state.withLock { s in
            if !s.budget.boosted { account(&s, now: now, cpuNs: nil) }
            return (s.budget.critical, s.budget.general)
        }
    }

    /// Whether `vcpu` is inside its throttle window at `now`.
    public func isThrottled(vcpu: Int, now: UInt64) -> Bool {
        slots[vcpu].state.withLock { now < $0.budget.throttledUntil }
    }
}
