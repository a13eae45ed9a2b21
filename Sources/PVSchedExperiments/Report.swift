import Foundation

/// Renders experiment results for people (a table, an SVG plot) and machines (JSON).
public enum Report {
    static func us(_ ns: UInt64) -> String { format(Double(ns) / 1000) }
    static func format(_ v: Double) -> String {
        if v >= 100 { return String(Int(v.rounded())) }
        if v >= 10 { return String(format: "%.1f", v) }
        return String(format: "%.2f", v)
    }

    /// The side-by-side table (latencies in µs).
    public static func table(_ results: [ModeResult], scenario: Scenario) -> String {
        let header = ["mode", "guest avg", "p50", "p99", "p99.9", "max", "host avg", "p99", "max",
                      "host work", "boosts", "boosted ms", "throttled"]
        let vanilla = results.first { $0.mode == "vanilla" }
        var rows: [[String]] = [header]
        for r in results {
            let g = r.guestLatency, h = r.hostLatency
            let work = vanilla.map { $0.hostThroughput > 0 ? String(format: "%.2fx", r.hostThroughput / $0.hostThroughput) : "-" }
                ?? format(r.hostThroughput)
            rows.append([r.mode, format(g.average / 1000), us(g.p50), us(g.p99), us(g.p999), us(g.max),
                         format(h.average / 1000), us(h.p99), us(h.max),
                         r.mode == "idle" ? "-" : work, String(r.boostCount), format(r.boostedMs), String(r.throttleCount)])
        }
        let cpus = scenario.cpus.map(String.init).joined(separator: ",")
        var out = "guest: \(scenario.guestTitle), \(scenario.vcpus) vCPUs on host CPUs \(cpus) with \(scenario.busyThreads) busy host threads per CPU"
        out += scenario.noisyVM ? " and a noisy VM" : ""
        out += ", \(scenario.durationNs / 1_000_000_000) s per mode, interval \(scenario.intervalNs / 1000) µs\n"
        out += "latencies in µs (guest: wake-up lateness / interrupt response; host: cyclictest-like probe at "
        out += scenario.probePriority.map { "SCHED_FIFO \($0)" } ?? "SCHED_OTHER"
        out += "); host work relative to vanilla\n\n"
        out += render(rows)
        out += "\n" + comparison(results)
        return out
    }

    /// Rows as aligned columns (the first left-aligned, the rest right-aligned), with
    /// a rule under the header row.
    static func render(_ rows: [[String]]) -> String {
        guard let header = rows.first else { return "" }
        let widths = header.indices.map { c in rows.map { $0[c].count }.max()! }
        var out = ""
        for (i, row) in rows.enumerated() {
            out += row.enumerated().map { c, cell in
                c == 0 ? cell.padding(toLength: widths[c], withPad: " ", startingAt: 0)
                       : String(repeating: " ", count: widths[c] - cell.count) + cell
            }.joined(separator: "  ") + "\n"
            if i == 0 { out += widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ") + "\n" }
        }
        return out
    }

    /// Ratios of each pvsched driver against vanilla and static-rt.
    public static func comparison(_ results: [ModeResult]) -> String {
        guard let vanilla = results.first(where: { $0.mode == "vanilla" }) else { return "" }
        let staticRT = results.first { $0.mode == "static-rt" }
        var out = ""
        func ratio(_ a: Double, _ b: Double) -> String { b <= 0 ? "-" : String(format: "%.2fx", a / b) }
        for r in results where !["idle", "vanilla", "static-rt"].contains(r.mode) {
            out += "\(r.mode) vs vanilla: guest p99 \(ratio(Double(r.guestLatency.p99), Double(vanilla.guestLatency.p99))), "
            out += "guest max \(ratio(Double(r.guestLatency.max), Double(vanilla.guestLatency.max))), "
            out += "host p99 \(ratio(Double(r.hostLatency.p99), Double(vanilla.hostLatency.p99))), "
            out += "host max \(ratio(Double(r.hostLatency.max), Double(vanilla.hostLatency.max)))\n"
            if let s = staticRT {
                out += "\(r.mode) vs static-rt: guest p99 \(ratio(Double(r.guestLatency.p99), Double(s.guestLatency.p99))), "
                out += "guest max \(ratio(Double(r.guestLatency.max), Double(s.guestLatency.max))), "
                out += "host p99 \(ratio(Double(r.hostLatency.p99), Double(s.hostLatency.p99))), "
                out += "host max \(ratio(Double(r.hostLatency.max), Double(s.hostLatency.max)))\n"
            }
        }
        return out
    }

    /// Machine-readable results.
    public static func json(_ results: [ModeResult]) throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(results), as: UTF8.self)
    }

    /// Latency by percentile, one line per mode, guest and host side by side
    /// (log scales, in the style of HdrHistogram plots).
    public static func svg(_ results: [ModeResult], title: String) -> String {
        let colors = ["#7f7f7f", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
        let panelW = 460.0, panelH = 320.0, left = 70.0, top = 60.0, gap = 90.0
        let width = left + 2 * panelW + gap + 30, height = top + panelH + 110
        let allValues = results.flatMap { ($0.guestLatency.curve + $0.hostLatency.curve).map { max($0[1], 1000) } }
        let lo = floor(log10(max(1000, allValues.min() ?? 1000) / 1000))
        let hi = max(lo + 1, ceil(log10(max(1000, allValues.max() ?? 1000) / 1000)))
        func x(_ p: Double, _ originX: Double) -> Double {
            let nines = p >= 100 ? 4.5 : min(4.5, -log10(max(1e-5, 1 - p / 100)))
            return originX + nines / 4.5 * panelW
        }
        func y(_ ns: Double) -> Double {
            let v = log10(max(ns, 1000) / 1000)
            return top + panelH - (v - lo) / (hi - lo) * panelH
        }
        var s = """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(Int(width / 2))" y="24" text-anchor="middle" font-size="16" font-weight="bold">\(escape(title))</text>

        """
        for (panel, name) in ["guest latency", "host latency"].enumerated() {
            let ox = left + Double(panel) * (panelW + gap)
            s += "<text x=\"\(Int(ox + panelW / 2))\" y=\"\(Int(top - 12))\" text-anchor=\"middle\" font-size=\"14\">\(name)</text>\n"
            s += "<rect x=\"\(ox)\" y=\"\(top)\" width=\"\(panelW)\" height=\"\(panelH)\" fill=\"none\" stroke=\"#333\"/>\n"
            var d = lo
            while d <= hi {
                let yy = top + panelH - (d - lo) / (hi - lo) * panelH
                let label = d >= 3 ? "\(Int(pow(10, d - 3))) ms" : "\(Int(pow(10, d))) µs"
                s += "<line x1=\"\(ox)\" y1=\"\(yy)\" x2=\"\(ox + panelW)\" y2=\"\(yy)\" stroke=\"#ddd\"/>"
                s += "<text x=\"\(ox - 6)\" y=\"\(yy + 4)\" text-anchor=\"end\">\(label)</text>\n"
                d += 1
            }
            for (p, label) in [(0.0, "0%"), (90, "90%"), (99, "99%"), (99.9, "99.9%"), (99.99, "99.99%"), (100, "max")] {
                let xx = x(p, ox)
                s += "<line x1=\"\(xx)\" y1=\"\(top)\" x2=\"\(xx)\" y2=\"\(top + panelH)\" stroke=\"#eee\"/>"
                s += "<text x=\"\(xx)\" y=\"\(top + panelH + 16)\" text-anchor=\"middle\">\(label)</text>\n"
            }
            s += "<text x=\"\(Int(ox + panelW / 2))\" y=\"\(Int(top + panelH + 34))\" text-anchor=\"middle\">percentile</text>\n"
            for (i, r) in results.enumerated() {
                let curve = panel == 0 ? r.guestLatency.curve : r.hostLatency.curve
                guard !curve.isEmpty else { continue }
                let points = curve.map { "\(format(x($0[0], ox))),\(format(y($0[1])))" }.joined(separator: " ")
                s += "<polyline fill=\"none\" stroke=\"\(colors[i % colors.count])\" stroke-width=\"2.5\" points=\"\(points)\"/>\n"
            }
        }
        for (i, r) in results.enumerated() {
            let lx = left + Double(i) * 160, ly = top + panelH + 70
            s += "<rect x=\"\(lx)\" y=\"\(ly - 10)\" width=\"18\" height=\"4\" fill=\"\(colors[i % colors.count])\"/>"
            s += "<text x=\"\(lx + 24)\" y=\"\(ly - 4)\">\(escape(r.mode))</text>\n"
        }
        s += "</svg>\n"
        return s
    }

    static func escape(_ t: String) -> String {
        t.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
    }
}

#if canImport(Glibc)
import Glibc
#endif

extension Report {
    /// Writes a report (the SVG plot) to `path`: a regular file, or none yet, is
    /// replaced atomically; anything else there (a device such as /dev/null, a FIFO) is
    /// written to in place. An atomic write renames a new file over the path, and
    /// `--plot /dev/null` run as root replaced the device with a regular file.
    public static func write(_ text: String, to path: String) throws {
        var st = stat()
        if stat(path, &st) == 0, st.st_mode & S_IFMT != S_IFREG {
            guard let handle = FileHandle(forWritingAtPath: path) else {
                throw CocoaError(.fileWriteNoPermission, userInfo: [NSFilePathErrorKey: path])
            }
            defer { try? handle.close() }
            try handle.write(contentsOf: Data(text.utf8))
            return
        }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    }
}
