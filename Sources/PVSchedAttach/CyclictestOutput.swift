/// cyclictest's histogram output (`-q -h N`, one thread): one "bucket count" line
/// per microsecond bucket, then "# Max Latencies:" and "# Histogram Overflows:"
/// among the "#" lines. It comes from a guest's console, so it is hostile input:
/// every line is checked and what does not parse is an error that names it.
public struct CyclictestOutput: Equatable, Sendable {
    /// (bucket in µs, samples) for every bucket line, in order.
    public var buckets: [(UInt64, UInt64)]
    public var maxUs: UInt64
    /// Samples past the last bucket.
    public var overflows: UInt64

    /// Why the output could not be read.
    public struct ParseError: Error, Equatable, Sendable, CustomStringConvertible {
        public let description: String
    }

    public static let maxBucketUs: UInt64 = 10_000_000
    public static let maxCount: UInt64 = 1 << 40

    public static func parse(_ text: String) throws(ParseError) -> CyclictestOutput {
        var out = CyclictestOutput(buckets: [], maxUs: 0, overflows: 0)
        var sawMax = false
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = raw.drop { $0 == " " || $0 == "\t" || $0 == "\r" }
            if line.isEmpty { continue }
            if line.hasPrefix("#") {
                if let v = try value(line, after: "# Max Latencies:") { out.maxUs = v; sawMax = true }
                if let v = try value(line, after: "# Histogram Overflows:") { out.overflows = v }
                continue
            }
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })
            guard parts.count == 2, let bucket = UInt64(parts[0]), let count = UInt64(parts[1]),
                  bucket <= maxBucketUs, count <= maxCount else {
                throw ParseError(description: "cyclictest output: cannot read the line '\(line.prefix(80))'")
            }
            if let last = out.buckets.last, bucket <= last.0 {
                throw ParseError(description: "cyclictest output: bucket \(bucket) after bucket \(last.0)")
            }
            out.buckets.append((bucket, count))
        }
        guard !out.buckets.isEmpty, sawMax else {
            throw ParseError(description: "cyclictest output: no histogram (bucket lines and '# Max Latencies')")
        }
        return out
    }

    private static func value(_ line: Substring, after prefix: String) throws(ParseError) -> UInt64? {
        guard line.hasPrefix(prefix) else { return nil }
        guard let first = line.dropFirst(prefix.count).split(separator: " ").first, let v = UInt64(first), v <= maxCount else {
            throw ParseError(description: "cyclictest output: '\(line.prefix(80))' has no valid number")
        }
        return v
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.maxUs == b.maxUs && a.overflows == b.overflows && a.buckets.elementsEqual(b.buckets) { $0 == $1 }
    }
}
