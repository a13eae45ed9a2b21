import Foundation

/// One mode's results over repeated runs of a scenario.
public struct RepeatedResult: Codable, Sendable {
    public var mode: String
    /// Each run's result, in run order.
    public var runs: [ModeResult]
}

extension ExperimentRunner {
    /// Runs every mode `repeats` times, interleaved (mode 1, 2, ..., then again),
    /// so that a slow phase of the shared machine spreads over all modes.
    public func run(repeats: Int) throws -> [RepeatedResult] {
        var out = scenario.modes.map { RepeatedResult(mode: $0.description, runs: []) }
        for r in 0..<repeats {
            for (i, mode) in scenario.modes.enumerated() {
                out[i].runs.append(try run(mode, index: r * scenario.modes.count + i))
            }
        }
        return out
    }
}

extension Report {
    /// Median and spread (min-max) of each figure over repeated runs; host work is
    /// each run's throughput relative to the vanilla run of the same round.
    public static func repeatedTable(_ results: [RepeatedResult], scenario: Scenario) -> String {
        let runs = results.first?.runs.count ?? 0
        func stat(_ v: [Double], _ fmt: (Double) -> String) -> String {
            guard let lo = v.min(), let hi = v.max() else { return "-" }
            return "\(fmt(Sample.median(v))) [\(fmt(lo))-\(fmt(hi))]"
        }
        let header = ["mode", "guest p99", "guest max", "host p99", "host max", "host work", "boosts"]
        var rows: [[String]] = [header]
        for r in results {
            let us = { (v: Double) in format(v / 1000) }
            let work = hostWork(r, results)
            rows.append([r.mode, stat(r.runs.map { Double($0.guestLatency.p99) }, us), stat(r.runs.map { Double($0.guestLatency.max) }, us),
                         stat(r.runs.map { Double($0.hostLatency.p99) }, us), stat(r.runs.map { Double($0.hostLatency.max) }, us),
                         r.mode == "idle" ? "-" : stat(work) { String(format: "%.2fx", $0) },
                         stat(r.runs.map { Double($0.boostCount) }) { String(Int($0)) }])
        }
        var out = "guest: \(scenario.guestTitle)\(scenario.noisyVM ? " with a noisy VM" : ""), \(scenario.vcpus) vCPUs, "
        out += "\(scenario.busyThreads) busy host threads per CPU, \(scenario.durationNs / 1_000_000_000) s per mode, "
        out += "interval \(scenario.intervalNs / 1000) µs; \(runs) runs interleaved\n"
        out += "median [min-max] over the runs; latencies in µs; host work relative to vanilla in the same round\n\n"
        return out + render(rows) + barCheck(results, scenario: scenario)
    }

    /// Each run's host throughput relative to the vanilla run of the same round.
    static func hostWork(_ r: RepeatedResult, _ results: [RepeatedResult]) -> [Double] {
        guard let vanilla = results.first(where: { $0.mode == "vanilla" }) else { return [] }
        return r.runs.enumerated().compactMap { k, run in
            k < vanilla.runs.count && vanilla.runs[k].hostThroughput > 0 ? run.hostThroughput / vanilla.runs[k].hostThroughput : nil
        }
    }

    /// Issue #12's bar for each driver mode, from the medians over the runs: guest p99
    /// ≤ 1.25x static-rt's, host-probe p99 ≤ 1.5x vanilla's, host-probe max ≤ 2x
    /// vanilla's, host work (per round, as in the table) ≥ 0.9x (a hostile guest:
    /// ≥ 1 − the VM's share). With each, what explains the host probe: the share of
    /// the vCPUs' time spent boosted and the mean boost (a host real-time task that a
    /// boost preempts waits about one boost, as often as the boosted share says).
    static func barCheck(_ results: [RepeatedResult], scenario: Scenario) -> String {
        func median(_ mode: String, _ f: (ModeResult) -> Double) -> Double? {
            guard let r = results.first(where: { $0.mode == mode }), !r.runs.isEmpty else { return nil }
            return Sample.median(r.runs.map(f))
        }
        guard let staticP99 = median("static-rt", { Double($0.guestLatency.p99) }),
              let vanillaP99 = median("vanilla", { Double($0.hostLatency.p99) }),
              let vanillaMax = median("vanilla", { Double($0.hostLatency.max) }),
              staticP99 > 0, vanillaP99 > 0, vanillaMax > 0
        else { return "" }
        let workBar = scenario.guest.isHostile ? 1 - scenario.governor.maxVMShare : 0.9
        let seconds = Double(scenario.durationNs) / 1e9 * Double(scenario.vcpus)
        var rows = [["mode", "guest p99 / static-rt", "host p99 / vanilla", "host max / vanilla", "host work", "boosted share", "mean boost",
                     "repaying share"]]
        for r in results where !["idle", "vanilla", "static-rt"].contains(r.mode) {
            func check(_ v: Double, _ ok: Bool) -> String { String(format: "%.2fx ", v) + (ok ? "ok" : "MISSED") }
            let g = (median(r.mode) { Double($0.guestLatency.p99) } ?? 0) / staticP99
            let h = (median(r.mode) { Double($0.hostLatency.p99) } ?? 0) / vanillaP99
            let m = (median(r.mode) { Double($0.hostLatency.max) } ?? 0) / vanillaMax
            let work = hostWork(r, results), w = work.isEmpty ? 0 : Sample.median(work)
            let boostedMs = median(r.mode) { $0.boostedMs } ?? 0, boosts = median(r.mode) { Double($0.boostCount) } ?? 0
            rows.append([r.mode, check(g, g <= 1.25), check(h, h <= 1.5), check(m, m <= 2), check(w, w >= workBar),
                         String(format: "%.0f%%", seconds > 0 ? boostedMs / 10 / seconds : 0),
                         boosts > 0 ? format(boostedMs * 1000 / boosts) + " µs" : "-",
                         String(format: "%.0f%%", seconds > 0 ? (median(r.mode) { $0.repaymentMs } ?? 0) / 10 / seconds : 0)])
        }
        guard rows.count > 1 else { return "" }
        return "\nthe bar (medians; host work ≥ \(String(format: "%.2f", workBar))x):\n" + render(rows)
    }

    /// Machine-readable repeated results.
    public static func json(repeated: [RepeatedResult]) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(repeated), as: UTF8.self)
    }
}
