#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Host monotonic time in nanoseconds (CLOCK_MONOTONIC), the clock all host-side
/// timestamps (boost starts, budgets, latencies) use.
public enum MonotonicClock {
    @inline(__always)
    public static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}

/// Where the host component reads the time: the monotonic clock in production,
/// a manual clock in tests (so that budget tests advance time instead of racing it).
public protocol HostClock: Sendable {
    func nowNs() -> UInt64
}

/// The host's CLOCK_MONOTONIC.
public struct SystemClock: HostClock {
    public init() {}
    @inline(__always)
    public func nowNs() -> UInt64 { MonotonicClock.nowNs() }
}

