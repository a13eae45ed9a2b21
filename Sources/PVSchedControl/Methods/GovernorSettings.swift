import PVSchedCore

/// A change of a VM's governor as requests carry it (`vm.start`, `vm.governor.set`,
/// the CLI's governor options): every field optional, each in its range, applied
/// over a base configuration. The one place the governor's fields are spelled.
public struct GovernorChange: Equatable, Sendable {
    public var criticalBudgetUs: Int64?
    public var generalBudgetUs: Int64?
    public var throttleWindowUs: Int64?
    public var shareWindowUs: Int64?
    public var maxVMShare: Double?
    public var repaymentFactor: Double?
    public var maxRepaymentUs: Int64?
    /// No limits at all (static real-time): overrides the rest.
    public var unlimited = false
    public init() {}

    /// The longest budget or window accepted, in µs (an hour).
    public static let maxUs: Int64 = 3_600_000_000

    public var isEmpty: Bool { self == GovernorChange() }

    /// Reads the fields a request carries (each optional, range-checked).
    public init(decoding p: inout RequestParams) throws(ControlError) {
        criticalBudgetUs = try p.optionalInt("criticalBudgetUs", in: 1...Self.maxUs)
        generalBudgetUs = try p.optionalInt("generalBudgetUs", in: 1...Self.maxUs)
        throttleWindowUs = try p.optionalInt("throttleWindowUs", in: 0...Self.maxUs)
        shareWindowUs = try p.optionalInt("shareWindowUs", in: 1...Self.maxUs)
        maxVMShare = try p.optionalDouble("maxVMShare", in: 0...1)
        repaymentFactor = try p.optionalDouble("repaymentFactor", in: GovernorConfig.repaymentFactorRange)
        maxRepaymentUs = try p.optionalInt("maxRepaymentUs", in: GovernorConfig.maxRepaymentUsRange)
        unlimited = try p.bool("unlimited", default: false)
    }

    public var encoded: [String: JSON] {
        var p: [String: JSON] = [:]
        if let criticalBudgetUs { p["criticalBudgetUs"] = .int(criticalBudgetUs) }
        if let generalBudgetUs { p["generalBudgetUs"] = .int(generalBudgetUs) }
        if let throttleWindowUs { p["throttleWindowUs"] = .int(throttleWindowUs) }
        if let shareWindowUs { p["shareWindowUs"] = .int(shareWindowUs) }
        if let maxVMShare { p["maxVMShare"] = .double(maxVMShare) }
        if let repaymentFactor { p["repaymentFactor"] = .double(repaymentFactor) }
        if let maxRepaymentUs { p["maxRepaymentUs"] = .int(maxRepaymentUs) }
        if unlimited { p["unlimited"] = .bool(true) }
        return p
    }

    /// `base` with this change applied.
    public func applied(to base: GovernorConfig) -> GovernorConfig {
        if unlimited { return .unlimited }
        var g = base
        if let v = criticalBudgetUs { g.criticalBudgetNs = UInt64(v) * 1000 }
        if let v = generalBudgetUs { g.generalBudgetNs = UInt64(v) * 1000 }
        if let v = throttleWindowUs { g.throttleWindowNs = UInt64(v) * 1000 }
        if let v = shareWindowUs { g.shareWindowNs = UInt64(v) * 1000 }
        if let v = maxVMShare { g.maxVMShare = v }
        if let v = repaymentFactor { g.repaymentFactor = v }
        if let v = maxRepaymentUs { g.maxRepaymentNs = UInt64(v) * 1000 }
        return g
    }

    /// Checks the fields as a request would (the CLI validates before sending); the
    /// error names the request field.
    public func validate() throws(ControlError) {
        var p = RequestParams(encoded)
        _ = try GovernorChange(decoding: &p)
    }
}

/// A VM's governor as answers carry it (µs; null: unlimited).
public struct GovernorSettings: ControlResult, Equatable {
    public var config: GovernorConfig
    public init(_ config: GovernorConfig) { self.config = config }

    public var json: JSON {
        func us(_ ns: UInt64) -> JSON { ns == .max ? .null : JSON(ns / 1000) }
        let g = config
        return ["criticalBudgetUs": us(g.criticalBudgetNs), "generalBudgetUs": us(g.generalBudgetNs),
                "throttleWindowUs": us(g.throttleWindowNs), "shareWindowUs": us(g.shareWindowNs), "maxVMShare": JSON(g.maxVMShare),
                "repaymentFactor": JSON(g.repaymentFactor), "maxRepaymentUs": JSON(g.maxRepaymentNs / 1000)]
    }

    public init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "governor")
        func ns(_ key: String) -> UInt64 { r.optionalInt(key).map { UInt64($0) * 1000 } ?? .max }
        config = GovernorConfig(criticalBudgetNs: ns("criticalBudgetUs"), generalBudgetNs: ns("generalBudgetUs"),
                                throttleWindowNs: ns("throttleWindowUs"), shareWindowNs: ns("shareWindowUs"),
                                maxVMShare: try r.double("maxVMShare"), repaymentFactor: try r.double("repaymentFactor"),
                                maxRepaymentNs: UInt64(try r.int("maxRepaymentUs")) * 1000)
    }

    /// (field, text) pairs in protocol order, for the CLI.
    public var lines: [(String, String)] {
        let j = json
        return ["criticalBudgetUs", "generalBudgetUs", "throttleWindowUs", "shareWindowUs", "maxVMShare", "repaymentFactor",
                "maxRepaymentUs"].map { k in (k, j[k].map { $0 == .null ? "unlimited" : "\($0.intValue.map(String.init) ?? $0.doubleValue.map { "\($0)" } ?? "?")" } ?? "?") }
    }
}
