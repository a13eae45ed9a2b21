import PVSchedCore
import Synchronization

/// A clock that moves only when told to: for deterministic tests of budgets and
/// throttles (the role swift-nio's EmbeddedEventLoop plays for time).
public final class ManualClock: HostClock {
    private let now: Mutex<UInt64>
    public init(startNs: UInt64 = 1_000_000_000) { now = Mutex(startNs) }
    public func nowNs() -> UInt64 { now.withLock { $0 } }
    /// Moves the clock forward by `ns`.
    public func advance(by ns: UInt64) { now.withLock { $0 &+= ns } }
}
