import Atomics
import CKVM

/// A 32-bit word that threads wait on with futex(2) and bump to wake them.
// @unchecked Sendable: the word is only touched through atomics and futex(2).
final class FutexWord: @unchecked Sendable {
    private let storage: UnsafeMutablePointer<UnsafeAtomic<UInt32>.Storage>
    init() {
        storage = .allocate(capacity: 1)
        storage.initialize(to: .init(0))
    }
    deinit { storage.deallocate() }
    private var atomic: UnsafeAtomic<UInt32> { UnsafeAtomic(at: storage) }
    var value: UInt32 { atomic.load(ordering: .acquiring) }
    private var address: UnsafeMutablePointer<UInt32> { UnsafeMutableRawPointer(storage).assumingMemoryBound(to: UInt32.self) }
    /// Bumps the word and wakes up to `count` waiters.
    func bumpAndWake(_ count: Int32 = Int32.max) {
        atomic.wrappingIncrement(ordering: .releasing)
        _ = ckvm_futex_wake(address, count)
    }
    /// Sleeps while the word equals `seen`, at most `timeoutNs` (forever if negative).
    func wait(while seen: UInt32, timeoutNs: Int64) { _ = ckvm_futex_wait(address, seen, timeoutNs) }
}
