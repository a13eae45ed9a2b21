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
public final class Governor: Sendable {
    /// The limits in force (an operator may change them while the VM runs).
    public var config: GovernorConfig { state.withLock { $0.config } }
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
    private struct State {
        var config: GovernorConfig
        var vcpus: [VCPUBudget]
        var windowStart: UInt64 = 0
        var windowUsedNs: UInt64 = 0   // boosted CPU time accounted inside the current window
    }
    private let state: Mutex<State>
    private let vcpuCount: Int
    /// Woken when a change moves the next budget check earlier (see `nextCheckNs`).
    private let alarm: BudgetAlarm?

    /// `alarm`, if given, is told whenever a boost begins, changes budget or has its
    /// budget trimmed: the moments the next check can move earlier.
    public init(config: GovernorConfig, vcpuCount: Int, alarm: BudgetAlarm? = nil) {
        self.vcpuCount = vcpuCount
        self.alarm = alarm
        var v = VCPUBudget()
        v.critical = config.criticalBudgetNs
        v.general = config.generalBudgetNs
        self.state = Mutex(State(config: config, vcpus: Array(repeating: v, count: vcpuCount)))
    }

    /// Replaces the limits; budgets larger than the new sizes are trimmed.
    public func update(_ config: GovernorConfig) {
        state.withLock { s in
            s.config = config
            for i in s.vcpus.indices {
                s.vcpus[i].critical = min(s.vcpus[i].critical, config.criticalBudgetNs)
                s.vcpus[i].general = min(s.vcpus[i].general, config.generalBudgetNs)
            }
            announceNextCheck(s)
        }
    }

    /// Tells the alarm when the next check is due (it wakes the enforcer only if that
    /// is sooner than planned). Called with the state locked, after the change.
    private func announceNextCheck(_ s: State) {
        if let alarm, let next = nextCheck(s) { alarm.need(checkAtNs: next) }
    }

    private func shareLimitNs(_ config: GovernorConfig) -> UInt64 {
        if config.maxVMShare >= 1.0 || config.shareWindowNs == .max { return .max }
        let limit = Double(config.shareWindowNs) * Double(vcpuCount) * max(0, config.maxVMShare)
        return limit >= Double(UInt64.max) ? .max : UInt64(limit)
    }

    private func roll(_ s: inout State, now: UInt64) {
        let window = s.config.shareWindowNs
        guard window != .max, window > 0 else { return }
        if now >= s.windowStart, now - s.windowStart >= window {
            s.windowStart = now - (now - s.windowStart) % window
            s.windowUsedNs = 0
        }
    }

    /// Brings `vcpu`'s budgets up to `now`: an unboosted vCPU refills both 1:1 with
    /// wall time; a boosted one is charged the CPU time its thread ran since the last
    /// step, to the budget it is charging.
    private func account(_ s: inout State, vcpu: Int, now: UInt64, cpuNs: UInt64?) {
        var v = s.vcpus[vcpu]
        defer { s.vcpus[vcpu] = v }
        let since = v.lastWallNs ?? now
        let wall = now > since ? now - since : 0
        if v.boosted {
            // Without a CPU clock, wall time is charged (the thread ran at most that long).
            let cpu = cpuNs.map { $0 > v.lastCPUNs ? $0 - v.lastCPUNs : 0 } ?? wall
            v[v.charging] = v[v.charging] > cpu ? v[v.charging] - cpu : 0
            s.windowUsedNs &+= cpu
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
        state.withLock { s in
            roll(&s, now: now)
            if s.vcpus[vcpu].boosted { return nil }
            if now < s.vcpus[vcpu].throttledUntil { return .throttled(untilNs: s.vcpus[vcpu].throttledUntil) }
            let limit = shareLimitNs(s.config)
            if s.windowUsedNs >= limit { return .vmShareExhausted(usedNs: s.windowUsedNs, limitNs: limit) }
            account(&s, vcpu: vcpu, now: now, cpuNs: nil)
            if s.vcpus[vcpu][budget] == 0 { return .throttled(untilNs: now) }
            s.vcpus[vcpu].boosted = true
            s.vcpus[vcpu].charging = budget
            s.vcpus[vcpu].lastCPUNs = cpuNs ?? 0
            announceNextCheck(s)
            return nil
        }
    }

    /// Records the end of `vcpu`'s boost (`cpuNs`: its thread's CPU time now).
    public func endBoost(vcpu: Int, now: UInt64, cpuNs: UInt64? = nil) {
        state.withLock { s in
            roll(&s, now: now)
            guard s.vcpus[vcpu].boosted else { return }
            account(&s, vcpu: vcpu, now: now, cpuNs: cpuNs)
            s.vcpus[vcpu].boosted = false
        }
    }

    /// Must `vcpu`'s running boost be cut now? Charges the CPU time since the last
    /// step to the budget it was charging, then charges `budget` from here on. If a
    /// budget is spent or the VM's share is used up, the boost is ended (and, for a
    /// spent budget, the vCPU throttled) and the reason returned.
    public func checkOverrun(vcpu: Int, now: UInt64, cpuNs: UInt64? = nil, budget: BoostBudget? = nil) -> GovernorVeto? {
        state.withLock { s in
            roll(&s, now: now)
            guard s.vcpus[vcpu].boosted else { return nil }
            account(&s, vcpu: vcpu, now: now, cpuNs: cpuNs)
            let switched = budget.map { $0 != s.vcpus[vcpu].charging } ?? false
            if let budget { s.vcpus[vcpu].charging = budget }
            let charging = s.vcpus[vcpu].charging
            if s.vcpus[vcpu][charging] == 0 {
                s.vcpus[vcpu].boosted = false
                let (until, overflow) = now.addingReportingOverflow(s.config.throttleWindowNs)
                s.vcpus[vcpu].throttledUntil = overflow ? .max : until
                return .budgetExhausted(charging, untilNs: s.vcpus[vcpu].throttledUntil)
            }
            let limit = shareLimitNs(s.config)
            if s.windowUsedNs > limit {
                s.vcpus[vcpu].boosted = false
                return .vmShareExhausted(usedNs: s.windowUsedNs, limitNs: limit)
            }
            if switched { announceNextCheck(s) }
            return nil
        }
    }

    /// The earliest wall time at which a running boost could spend its budget, or the
    /// boosts together the VM's share (a thread runs at most as fast as the wall clock):
    /// when the enforcer must look next. Nil while no vCPU is boosted.
    public func nextCheckNs() -> UInt64? {
        state.withLock { nextCheck($0) }
    }

    private func nextCheck(_ s: State) -> UInt64? {
        func plus(_ a: UInt64, _ b: UInt64) -> UInt64 { let (t, o) = a.addingReportingOverflow(b); return o ? .max : t }
        let boosted = s.vcpus.filter(\.boosted)
        guard let since = boosted.map({ $0.lastWallNs ?? 0 }).min() else { return nil }
        var next = boosted.map { plus($0.lastWallNs ?? 0, $0[$0.charging]) }.min()!
        // The share: the boosted vCPUs, accounted up to `since` at the latest, together
        // spend at most their count in ns per ns.
        let limit = shareLimitNs(s.config)
        if limit != .max {
            next = min(next, plus(since, (limit > s.windowUsedNs ? limit - s.windowUsedNs : 0) / UInt64(boosted.count)))
        }
        return next
    }

    /// `vcpu`'s budgets left, brought up to `now` for an unboosted vCPU (for stats).
    public func budgetsLeft(vcpu: Int, now: UInt64) -> (critical: UInt64, general: UInt64) {
        state.withLock { s in
            if !s.vcpus[vcpu].boosted { account(&s, vcpu: vcpu, now: now, cpuNs: nil) }
            return (s.vcpus[vcpu].critical, s.vcpus[vcpu].general)
        }
    }
}

extension Governor {
    /// Whether `vcpu` is inside its throttle window at `now`.
    public func isThrottled(vcpu: Int, now: UInt64) -> Bool {
        state.withLock { now < $0.vcpus[vcpu].throttledUntil }
    }
}
