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
