/// How a binding boosts a vCPU thread.
public struct BoostSettings: Equatable, Sendable {
    /// Parameters of a boosted thread when the driver names no priority: the boost
    /// class (SCHED_FIFO or SCHED_RR at a priority, or SCHED_OTHER at a nice level).
    public var boosted: SchedulingParameters
    /// The highest real-time priority a driver may ask for.
    public var maxPriority: UInt8
    /// Host real-time tasks at or above this priority are never preempted by a
    /// boost: real-time boosts stay below it, and when none can (1), a boost is
    /// SCHED_OTHER nice -20 instead. Nil protects nothing.
    public var protectedHostPriority: UInt8?
    /// Accept vCPU threads that are already real-time when pvsched is given them
    /// (refused by default: someone else manages them).
    public var allowRealTimeThreads: Bool
    public init(boosted: SchedulingParameters = .fifo(priority: 10), maxPriority: UInt8 = 50, protectedHostPriority: UInt8? = 50,
                allowRealTimeThreads: Bool = false) {
        self.boosted = boosted; self.maxPriority = maxPriority; self.protectedHostPriority = protectedHostPriority
        self.allowRealTimeThreads = allowRealTimeThreads
    }

    /// The parameters of a boost, for a driver that asks for `priority` (nil: the class's own).
    public func parameters(priority: UInt8?) -> SchedulingParameters {
        var p = boosted
        if let priority {
            let n = min(max(priority, 1), maxPriority)
            if case .rr = boosted { p = .rr(priority: n) } else if boosted.isRealTime { p = .fifo(priority: n) }
        }
        guard let limit = protectedHostPriority else { return p }
        switch p {
        case .fifo(let n) where n >= limit: return limit > 1 ? .fifo(priority: limit - 1) : .other(nice: -20)
        case .rr(let n) where n >= limit: return limit > 1 ? .rr(priority: limit - 1) : .other(nice: -20)
        default: return p
        }
    }

    /// The parameters of the threads that follow a boosted vCPU (its companions): one
    /// real-time priority above the vCPU's, within the protected host priorities.
    public func companionParameters(for vcpu: SchedulingParameters) -> SchedulingParameters {
        let above: SchedulingParameters
        switch vcpu {
        case .fifo(let n): above = .fifo(priority: min(n &+ 1, 99))
        case .rr(let n): above = .rr(priority: min(n &+ 1, 99))
        default: above = vcpu
        }
        return BoostSettings(boosted: above, maxPriority: 99, protectedHostPriority: protectedHostPriority)
            .parameters(priority: nil)
    }

    /// The least real-time priority at which a thread (the budget enforcer) preempts
    /// every thread these settings boost: one above the class's own priority, the
    /// highest a driver may ask for and their companions', at most 99; 1 when boosts
    /// stay in the fair class. An enforcer above that would preempt host real-time
    /// work for nothing.
    public var preemptingPriority: UInt8 {
        let vcpus = [parameters(priority: nil), parameters(priority: maxPriority)]
        let top = (vcpus + vcpus.map(companionParameters)).compactMap(\.realTimePriority).max() ?? 0
        return min(top, 98) + 1
    }

    /// The boost classes `BoostClass.init(parsing:)` accepts, for error messages and help.
    public static var classSyntax: String { BoostClass.syntax }
    /// Parses a boost class (see `BoostClass`).
    public static func parseClass(_ text: String) -> SchedulingParameters? { BoostClass(parsing: text)?.parameters }
    /// `p` written as a boost class (see `BoostClass.text`).
    public static func classText(_ p: SchedulingParameters) -> String { BoostClass(p).text }
}

/// What a boost is, as an operator writes it: `fifo:N`, `rr:N` (N in 1...99),
/// `nice:N` (N in -20...19), or `slice:US` (SCHED_OTHER nice -20 with an EEVDF
/// slice of US µs, Linux 6.12+; `slice:US:nice:N` for another nice level). The one
/// place the grammar lives: the control API, the CLI, the demo and the config file
/// all read and write it here.
public struct BoostClass: Hashable, Sendable, CustomStringConvertible {
    /// The scheduling parameters of a boosted thread.
    public let parameters: SchedulingParameters

    public init(_ parameters: SchedulingParameters) { self.parameters = parameters }

    /// The grammar, for error messages and help.
    public static let syntax = "fifo:1-99, rr:1-99, nice:-20-19 or slice:100-100000 (µs; nice -20, or slice:US:nice:N)"
    /// The range of an EEVDF slice the kernel accepts (it clamps others), in µs.
    public static let sliceRangeUs: ClosedRange<Int> = 100...100_000

    /// Parses a boost class; nil for anything outside the grammar.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 2 || parts.count == 4, let n = Int(parts[1]) else { return nil }
        switch parts[0] {
        case "fifo" where parts.count == 2 && (1...99).contains(n): parameters = .fifo(priority: UInt8(n))
        case "rr" where parts.count == 2 && (1...99).contains(n): parameters = .rr(priority: UInt8(n))
        case "nice" where parts.count == 2 && (-20...19).contains(n): parameters = .other(nice: Int8(n))
        case "slice" where Self.sliceRangeUs.contains(n):
            var nice = -20
            if parts.count == 4 {
                guard parts[2] == "nice", let m = Int(parts[3]), (-20...19).contains(m) else { return nil }
                nice = m
            }
            parameters = .slice(nice: Int8(nice), sliceUs: UInt32(n))
        default: return nil
        }
    }

    /// The class written as `init(parsing:)` reads it back (batch and idle, never
    /// boost classes, are written as `batch:N` and `idle`).
    public var text: String {
        switch parameters {
        case .fifo(let n): return "fifo:\(n)"
        case .rr(let n): return "rr:\(n)"
        case .other(let n): return "nice:\(n)"
        case .slice(let n, let us): return n == -20 ? "slice:\(us)" : "slice:\(us):nice:\(n)"
        case .batch(let n): return "batch:\(n)"
        case .idle: return "idle"
        }
    }

    public var description: String { text }
}

