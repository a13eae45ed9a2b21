/// Maps a guest's clock (`guest_clock_ns` of its lines) onto the host's monotonic
/// clock: host − guest, sampled when a freshly written line is first seen (so never
/// less than the true offset, since the write came first), kept as the minimum over
/// the last one to two seconds so that drift is followed.
public struct GuestClockMapping: Sendable {
    private var current: Int64?
    private var previous: Int64?
    private var windowStart: UInt64 = 0
    public static let windowNs: UInt64 = 1_000_000_000

    public init() {}

    /// A line stamped `guestNs` was first seen at host time `hostNs`.
    public mutating func observe(hostNs: UInt64, guestNs: UInt64) {
        guard guestNs != 0, hostNs < UInt64(Int64.max), guestNs < UInt64(Int64.max) else { return }
        let o = Int64(hostNs) - Int64(guestNs)
        if hostNs &- windowStart >= Self.windowNs {
            previous = current
            current = nil
            windowStart = hostNs
        }
        current = min(current ?? o, o)
    }

    /// host − guest, once a line has been seen.
    public var offsetNs: Int64? {
        switch (current, previous) {
        case let (c?, p?): return min(c, p)
        case let (c?, nil): return c
        case let (nil, p?): return p
        default: return nil
        }
    }

    /// A guest time on the host clock (nil until an offset is known, or out of range).
    public func hostTime(guestNs: UInt64) -> UInt64? {
        guard let e = offsetNs, guestNs < UInt64(Int64.max) else { return nil }
        let (h, overflow) = Int64(guestNs).addingReportingOverflow(e)
        guard !overflow, h > 0 else { return nil }
        return UInt64(h)
    }

    /// The guest's clock now, estimated from the host's.
    public func guestTime(hostNs: UInt64) -> UInt64? {
        guard let e = offsetNs, hostNs < UInt64(Int64.max) else { return nil }
        let (g, overflow) = Int64(hostNs).subtractingReportingOverflow(e)
        guard !overflow, g > 0 else { return nil }
        return UInt64(g)
    }
}
