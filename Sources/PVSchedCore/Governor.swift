import Synchronization

/// The host's budget for boosting one VM's vCPUs.
public struct GovernorConfig: Equatable, Sendable {
    /// Longest a vCPU may stay boosted without a break; longer boosts are cut.
    public var maxContinuousBoostNs: UInt64
    /// After a boost is cut, how long the vCPU may not be boosted again.
    public var throttleWindowNs: UInt64
    /// The window over which the VM's share of boosted time is measured.
    public var shareWindowNs: UInt64
    /// Largest fraction (0...1) of `shareWindowNs × vCPUs` that the VM may spend boosted.
    public var maxVMShare: Double

    public init(maxContinuousBoostNs: UInt64 = 5_000_000, throttleWindowNs: UInt64 = 10_000_000,
                shareWindowNs: UInt64 = 100_000_000, maxVMShare: Double = 0.5) {
        self.maxContinuousBoostNs = maxContinuousBoostNs
        self.throttleWindowNs = throttleWindowNs
        self.shareWindowNs = shareWindowNs
        self.maxVMShare = maxVMShare
    }

    public static let `default` = GovernorConfig()
    /// No limits at all (for measuring the unprotected mechanism).
    public static let unlimited = GovernorConfig(maxContinuousBoostNs: .max, throttleWindowNs: 0,
                                                 shareWindowNs: .max, maxVMShare: 1.0)
}

/// Why the governor refused or cut a boost.
public enum GovernorVeto: Equatable, Sendable, CustomStringConvertible {
    /// The vCPU's last boost ran into the cap; it may boost again at `untilNs`.
    case throttled(untilNs: UInt64)
    /// The VM has used `usedNs` of boosted time in this window, the limit is `limitNs`.
    case vmShareExhausted(usedNs: UInt64, limitNs: UInt64)

    public var description: String {
        switch self {
        case .throttled(let until): return "vCPU throttled until t=\(until) ns after exceeding its continuous boost cap"
        case .vmShareExhausted(let used, let limit): return "VM used \(used) ns of boosted time in this window (limit \(limit) ns)"
        }
    }
}

/// Enforces a VM's boost budget: a per-vCPU cap on continuous boost with a
/// throttle window after a cut, and a per-VM share of boosted time. It only
/// answers; the binding acts on its answers.
public final class Governor: Sendable {
    /// The limits in force (an operator may change them while the VM runs).
    public var config: GovernorConfig { state.withLock { $0.config } }
    private struct VCPUBudget {
        var boostStart: UInt64?        // when the running boost began
        var boostedSince: UInt64?      // from when the running boost counts in this window
        var throttledUntil: UInt64 = 0
    }
    private struct State {
        var config: GovernorConfig
        var vcpus: [VCPUBudget]
        var windowStart: UInt64 = 0
        var windowUsedNs: UInt64 = 0   // finished boost time inside the current window
    }
    private let state: Mutex<State>
    private let vcpuCount: Int

    public init(config: GovernorConfig, vcpuCount: Int) {
        self.vcpuCount = vcpuCount
        self.state = Mutex(State(config: config, vcpus: Array(repeating: VCPUBudget(), count: vcpuCount)))
    }

    /// Replaces the limits; running boosts are judged by the new ones from the next check.
    public func update(_ config: GovernorConfig) {
        state.withLock { $0.config = config }
    }

    private func shareLimitNs(_ config: GovernorConfig) -> UInt64 {
        if config.maxVMShare >= 1.0 || config.shareWindowNs == .max { return .max }
        let limit = Double(config.shareWindowNs) * Double(vcpuCount) * max(0, config.maxVMShare)
        return limit >= Double(UInt64.max) ? .max : UInt64(limit)
    }

    /// Time from `start` to `now`; 0 when another thread stamped `start` after
    /// this caller read `now`.
    @inline(__always)
    private func elapsed(from start: UInt64, to now: UInt64) -> UInt64 { now > start ? now - start : 0 }

    private func roll(_ s: inout State, now: UInt64) {
        let window = s.config.shareWindowNs
        guard window != .max, window > 0 else { return }
        if now >= s.windowStart, now - s.windowStart >= window {
            s.windowStart = now - (now - s.windowStart) % window
            s.windowUsedNs = 0
            // Ongoing boosts count from the new window's start.
            for i in s.vcpus.indices where s.vcpus[i].boostedSince != nil {
                s.vcpus[i].boostedSince = max(s.vcpus[i].boostedSince!, s.windowStart)
            }
        }
    }

    /// Moves `vcpu`'s running boost into the window's used time and clears it.
    private func finish(_ s: inout State, vcpu: Int, now: UInt64) {
        if let since = s.vcpus[vcpu].boostedSince { s.windowUsedNs &+= elapsed(from: since, to: now) }
        s.vcpus[vcpu].boostedSince = nil
        s.vcpus[vcpu].boostStart = nil
    }

    private func used(_ s: State, now: UInt64) -> UInt64 {
        s.vcpus.reduce(s.windowUsedNs) { acc, b in
            guard let since = b.boostedSince else { return acc }
            return acc &+ elapsed(from: since, to: now)
        }
    }

    /// May `vcpu` start a boost now? Records the start when allowed.
    public func beginBoost(vcpu: Int, now: UInt64) -> GovernorVeto? {
        state.withLock { s in
            roll(&s, now: now)
            if s.vcpus[vcpu].boostedSince != nil { return nil }
            if now < s.vcpus[vcpu].throttledUntil { return .throttled(untilNs: s.vcpus[vcpu].throttledUntil) }
            let limit = shareLimitNs(s.config)
            let u = used(s, now: now)
            if u >= limit { return .vmShareExhausted(usedNs: u, limitNs: limit) }
            s.vcpus[vcpu].boostedSince = now
            s.vcpus[vcpu].boostStart = now
            return nil
        }
    }

    /// Records the end of `vcpu`'s boost.
    public func endBoost(vcpu: Int, now: UInt64) {
        state.withLock { s in
            roll(&s, now: now)
            finish(&s, vcpu: vcpu, now: now)
        }
    }

    /// Must `vcpu`'s running boost be cut now? If so, the boost is ended, the vCPU
    /// is throttled and the reason is returned.
    public func checkOverrun(vcpu: Int, now: UInt64) -> GovernorVeto? {
        state.withLock { s in
            roll(&s, now: now)
            guard let start = s.vcpus[vcpu].boostStart else { return nil }
            if elapsed(from: start, to: now) >= s.config.maxContinuousBoostNs {
                finish(&s, vcpu: vcpu, now: now)
                let (until, overflow) = now.addingReportingOverflow(s.config.throttleWindowNs)
                s.vcpus[vcpu].throttledUntil = overflow ? .max : until
                return .throttled(untilNs: s.vcpus[vcpu].throttledUntil)
            }
            let limit = shareLimitNs(s.config)
            let u = used(s, now: now)
            if u > limit {
                finish(&s, vcpu: vcpu, now: now)
                return .vmShareExhausted(usedNs: u, limitNs: limit)
            }
            return nil
        }
    }
}

extension Governor {
    /// Whether `vcpu` is inside its throttle window at `now`.
    public func isThrottled(vcpu: Int, now: UInt64) -> Bool {
        state.withLock { now < $0.vcpus[vcpu].throttledUntil }
    }
}
