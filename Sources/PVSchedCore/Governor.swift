import Atomics
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

    /// The size of `budget`.
    public subscript(_ budget: BoostBudget) -> UInt64 { budget == .critical ? criticalBudgetNs : generalBudgetNs }

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

/// A VM's share of boosted time (`GovernorConfig.maxVMShare`): the window, the
/// boosted CPU time accounted in it and how many vCPUs are boosted, in atomics, so
/// that vCPUs account into it without sharing a lock (a vCPU thread preempted while
/// holding a lock shared with its siblings, repaying a boost at nice 19, used to hold
/// them up for milliseconds).
public final class VMShare: Sendable {
    public let vcpuCount: Int
    private let windowStart = Atomic<UInt64>(0)
    private let usedNs = Atomic<UInt64>(0)
    private let boosted = Atomic<Int>(0)

    public init(vcpuCount: Int) { self.vcpuCount = max(1, vcpuCount) }

    /// The boosted CPU time the VM may spend per window; `.max` without a limit.
    public func limitNs(_ config: GovernorConfig) -> UInt64 {
        if config.maxVMShare >= 1.0 || config.shareWindowNs == .max { return .max }
        let limit = Double(config.shareWindowNs) * Double(vcpuCount) * max(0, config.maxVMShare)
        return limit >= Double(UInt64.max) ? .max : UInt64(limit)
    }

    /// Starts a new window when the current one is over (whoever sees it first).
    func roll(_ config: GovernorConfig, now: UInt64) {
        let window = config.shareWindowNs
        guard window != .max, window > 0 else { return }
        let start = windowStart.load(ordering: .acquiring)
        guard now >= start, now - start >= window else { return }
        let fresh = now - (now - start) % window
        if windowStart.compareExchange(expected: start, desired: fresh, ordering: .acquiringAndReleasing).exchanged {
            usedNs.store(0, ordering: .releasing)
        }
    }

    /// The boosted CPU time spent in this window.
    var used: UInt64 { usedNs.load(ordering: .relaxed) }
    /// Whether less than a check step of the window's share is left (see `VCPUBudget.checkStepNs`).
    func isSpent(_ config: GovernorConfig) -> Bool {
        let limit = limitNs(config)
        guard limit != .max else { return false }
        let used = self.used
        return used >= limit || limit - used < VCPUBudget.granularity(of: limit)
    }
    func charge(_ ns: UInt64) { usedNs.wrappingAdd(ns, ordering: .relaxed) }
    func boostBegan() { boosted.wrappingAdd(1, ordering: .relaxed) }
    func boostEnded() { boosted.wrappingSubtract(1, ordering: .relaxed) }

    /// When the boosted vCPUs together could spend the share, accounted up to `since`
    /// at the latest (each spends at most 1 ns per ns); nil without a limit.
    func nextCheckNs(_ config: GovernorConfig, since: UInt64) -> UInt64? {
        let limit = limitNs(config)
        guard limit != .max else { return nil }
        let used = self.used
        let count = UInt64(max(1, boosted.load(ordering: .relaxed)))
        let left = limit > used ? limit - used : 0
        return VCPUBudget.plus(since, max(left / count, VCPUBudget.granularity(of: limit)))
    }
}

/// One vCPU's boost budgets (see `GovernorConfig`): a value its lane keeps under
/// the vCPU's lock. It only answers; the lane acts on its answers and tells it, at
/// every step, the wall time and the boosted thread's CPU time.
public struct VCPUBudget: Equatable, Sendable {
    /// Budgets left (ns of CPU time) as of `lastWallNs`.
    public private(set) var critical: UInt64
    public private(set) var general: UInt64
    subscript(_ b: BoostBudget) -> UInt64 {
        get { b == .critical ? critical : general }
        set { if b == .critical { critical = newValue } else { general = newValue } }
    }
    /// A boost is running (and charging `charging`).
    public private(set) var boosted = false
    public private(set) var charging = BoostBudget.general
    /// When the budgets were last brought up to date, and the thread's CPU time then (while boosted).
    private var lastWallNs: UInt64?
    private var lastCPUNs: UInt64 = 0
    public private(set) var throttledUntil: UInt64 = 0
    /// The running boost is held through the vCPU's halts (`VCPULane.hold`): while
    /// it is, the time its thread does not run refills the budgets, as unboosted
    /// time does, so that only CPU time run in a row spends them.
    public private(set) var spansHalts = false

    public init(_ config: GovernorConfig) {
        critical = config.criticalBudgetNs
        general = config.generalBudgetNs
    }

    /// The least budget worth a look: a budget with less than this left counts as
    /// spent (`granularity(of:)` scales it down for tiny budgets), so that each of the
    /// enforcer's looks that does not cut leaves at least this much, and the next look
    /// is at least this far off.
    public static let checkStepNs: UInt64 = 100_000

    /// `checkStepNs` for a budget (or share) of `size`: at most a sixteenth of it.
    static func granularity(of size: UInt64) -> UInt64 { max(1, min(checkStepNs, size / 16)) }

    static func plus(_ a: UInt64, _ b: UInt64) -> UInt64 { let (t, o) = a.addingReportingOverflow(b); return o ? .max : t }

    /// Brings the budgets up to `now`: unboosted, both refill 1:1 with wall time;
    /// boosted, the CPU time the thread ran since the last step is charged to the
    /// budget it is charging (wall time without a CPU clock: it ran at most that long).
    mutating func account(_ config: GovernorConfig, _ share: VMShare, now: UInt64, cpuNs: UInt64?) {
        let since = lastWallNs ?? now
        let wall = now > since ? now - since : 0
        if boosted {
            let cpu = cpuNs.map { $0 > lastCPUNs ? $0 - lastCPUNs : 0 } ?? wall
            // Held through halts: the time not run refills first (the CPU time may have
            // been run in one stretch at the end), then the CPU time is charged.
            if spansHalts, wall > cpu { refill(config, by: wall - cpu) }
            self[charging] = self[charging] > cpu ? self[charging] - cpu : 0
            share.charge(cpu)
            // An event's own reading may be older than the last one (read later by the
            // enforcer): what was charged is not charged again.
            if let cpuNs, cpuNs > lastCPUNs { lastCPUNs = cpuNs }
        } else {
            refill(config, by: wall)
        }
        lastWallNs = now
    }

    private mutating func refill(_ config: GovernorConfig, by ns: UInt64) {
        let (c, oc) = critical.addingReportingOverflow(ns)
        let (g, og) = general.addingReportingOverflow(ns)
        critical = oc ? config.criticalBudgetNs : min(c, config.criticalBudgetNs)
        general = og ? config.generalBudgetNs : min(g, config.generalBudgetNs)
    }

    /// The running boost is held through the vCPU's halts from `now` on (see `spansHalts`).
    public mutating func holdThroughHalts(_ config: GovernorConfig, _ share: VMShare, now: UInt64, cpuNs: UInt64?) {
        guard boosted, !spansHalts else { return }
        account(config, share, now: now, cpuNs: cpuNs)
        spansHalts = true
    }

    /// May a boost charged to `budget` start now? `cpuNs` is the thread's CPU time now
    /// (nil without a CPU clock). Records the start when allowed.
    public mutating func begin(_ config: GovernorConfig, _ share: VMShare, now: UInt64, cpuNs: UInt64?,
                               budget: BoostBudget) -> GovernorVeto? {
        share.roll(config, now: now)
        if boosted { return nil }
        spansHalts = false
        if now < throttledUntil { return .throttled(untilNs: throttledUntil) }
        let limit = share.limitNs(config)
        let used = share.used
        if share.isSpent(config) { return .vmShareExhausted(usedNs: used, limitNs: limit) }
        account(config, share, now: now, cpuNs: nil)
        if self[budget] < Self.granularity(of: config[budget]) { return .throttled(untilNs: now) }
        boosted = true
        charging = budget
        lastCPUNs = cpuNs ?? 0
        share.boostBegan()
        return nil
    }

    /// Records the end of the boost (`cpuNs`: the thread's CPU time now).
    public mutating func end(_ config: GovernorConfig, _ share: VMShare, now: UInt64, cpuNs: UInt64?) {
        share.roll(config, now: now)
        guard boosted else { return }
        account(config, share, now: now, cpuNs: cpuNs)
        boosted = false
        spansHalts = false
        share.boostEnded()
    }

    /// Must the running boost be cut now? Charges the CPU time since the last step to
    /// the budget it was charging, then charges `budget` from here on. If a budget is
    /// spent or the VM's share used up, the boost is ended (and, for a spent budget,
    /// the vCPU throttled) and the reason returned.
    public mutating func checkOverrun(_ config: GovernorConfig, _ share: VMShare, now: UInt64, cpuNs: UInt64?,
                                      budget: BoostBudget? = nil) -> GovernorVeto? {
        share.roll(config, now: now)
        guard boosted else { return nil }
        account(config, share, now: now, cpuNs: cpuNs)
        if let budget { charging = budget }
        if self[charging] < Self.granularity(of: config[charging]) {
            boosted = false
            spansHalts = false
            share.boostEnded()
            let (until, overflow) = now.addingReportingOverflow(config.throttleWindowNs)
            throttledUntil = overflow ? .max : until
            return .budgetExhausted(charging, untilNs: throttledUntil)
        }
        if share.isSpent(config) {
            let limit = share.limitNs(config)
            let used = share.used
            boosted = false
            spansHalts = false
            share.boostEnded()
            return .vmShareExhausted(usedNs: used, limitNs: limit)
        }
        return nil
    }

    /// The earliest wall time at which the running boost could spend its budget, or
    /// the running boosts together the VM's share: when the enforcer must look next.
    /// Nil while not boosted.
    public func nextCheckNs(_ config: GovernorConfig, _ share: VMShare) -> UInt64? {
        guard boosted else { return nil }
        let since = lastWallNs ?? 0
        let at = Self.plus(since, max(self[charging], Self.granularity(of: config[charging])))
        return min(at, share.nextCheckNs(config, since: since) ?? .max)
    }

    /// New limits: budgets larger than the new sizes are trimmed.
    public mutating func trim(to config: GovernorConfig) {
        critical = min(critical, config.criticalBudgetNs)
        general = min(general, config.generalBudgetNs)
    }

    /// The budgets left, brought up to `now` when not boosted (for stats and tests).
    public mutating func left(_ config: GovernorConfig, _ share: VMShare, now: UInt64) -> (critical: UInt64, general: UInt64) {
        if !boosted { account(config, share, now: now, cpuNs: nil) }
        return (critical, general)
    }

    public func isThrottled(now: UInt64) -> Bool { now < throttledUntil }
}

/// A VM's governor, the VM-wide part: the limits in force (an operator may change
/// them while the VM runs) and the VM's share.
/// Each vCPU's budgets are a `VCPUBudget` in its lane.
public final class Governor: Sendable {
    private final class Limits: AtomicReference, Sendable {
        let config: GovernorConfig
        init(_ c: GovernorConfig) { config = c }
    }
    private let limits: ManagedAtomic<Limits>
    public let share: VMShare

    public init(config: GovernorConfig, vcpuCount: Int) {
        limits = ManagedAtomic(Limits(config))
        share = VMShare(vcpuCount: vcpuCount)
    }

    /// The limits in force.
    public var config: GovernorConfig { limits.load(ordering: .acquiring).config }

    /// Replaces the limits (the binding then trims each vCPU's budgets).
    func set(_ config: GovernorConfig) { limits.store(Limits(config), ordering: .releasing) }
}
