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
        let vanilla = results.first { $0.mode == "vanilla" }
        func stat(_ v: [Double], _ fmt: (Double) -> String) -> String {
            guard let lo = v.min(), let hi = v.max() else { return "-" }
            return "\(fmt(Sample.median(v))) [\(fmt(lo))-\(fmt(hi))]"
        }
        let header = ["mode", "guest p99", "guest max", "host p99", "host max", "host work", "boosts"]
        var rows: [[String]] = [header]
        for r in results {
            let us = { (v: Double) in format(v / 1000) }
            var work: [Double] = []
            if let vanilla {
                for (k, run) in r.runs.enumerated() where k < vanilla.runs.count && vanilla.runs[k].hostThroughput > 0 {
                    work.append(run.hostThroughput / vanilla.runs[k].hostThroughput)
                }
            }
            rows.append([r.mode, stat(r.runs.map { Double($0.guestLatency.p99) }, us), stat(r.runs.map { Double($0.guestLatency.max) }, us),
                         stat(r.runs.map { Double($0.hostLatency.p99) }, us), stat(r.runs.map { Double($0.hostLatency.max) }, us),
                         r.mode == "idle" ? "-" : stat(work) { String(format: "%.2fx", $0) },
                         stat(r.runs.map { Double($0.boostCount) }) { String(Int($0)) }])
        }
        var out = "guest: \(scenario.guestTitle)\(scenario.noisyVM ? " with a noisy VM" : ""), \(scenario.vcpus) vCPUs, "
        out += "\(scenario.busyThreads) busy host threads per CPU, \(scenario.durationNs / 1_000_000_000) s per mode, "
        out += "interval \(scenario.intervalNs / 1000) µs; \(runs) runs interleaved\n"
        out += "median [min-max] over the runs; latencies in µs; host work relative to vanilla in the same round\n\n"
        return out + render(rows)
    }

    /// Machine-readable repeated results.
    public static func json(repeated: [RepeatedResult]) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(repeated), as: UTF8.self)
    }
}
