import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Why a thread could not be started (the process or the system is out of threads
/// or memory): an error to answer, never a crash.
public struct ThreadError: Error, Equatable, Sendable, CustomStringConvertible {
    /// pthread_create's error number (EAGAIN: a thread limit; ENOMEM).
    public let errno: Int32
    public init(errno: Int32) { self.errno = errno }
    public var description: String { "cannot start a thread: \(String(cString: strerror(errno)))" }
}

/// A dedicated OS thread (pthread) for work that blocks in the kernel or must not
/// share the Swift concurrency pool: vCPU loops, device threads, probes.
// @unchecked Sendable: `handle` is set once in init; pthread_join/kill are thread-safe.
public final class Thread: @unchecked Sendable {
    private var handle: pthread_t
    private let box: Box
    private final class Box { let body: () -> Void; init(_ b: @escaping () -> Void) { body = b } }

    /// Starts `body` on a new thread, named `name` (at most 15 bytes are kept; shown
    /// by top -H, ps and scheduler traces) when given.
    public convenience init(name: String? = nil, body: @escaping @Sendable () -> Void) throws(ThreadError) {
        try self.init(name: name, body)
    }

    /// Starts `body` on a new thread (see `init(name:body:)`).
    public init(name: String? = nil, _ body: @escaping @Sendable () -> Void) throws(ThreadError) {
        box = Box(name.map { name in { Thread.nameCurrent(name); body() } } ?? body)
        handle = pthread_t()
        let arg = Unmanaged.passRetained(box).toOpaque()
        let r = pthread_create(&handle, nil, { arg in
            let box = Unmanaged<Thread.Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, arg)
        guard r == 0 else {
            Unmanaged<Box>.fromOpaque(arg).release()
            throw ThreadError(errno: r)
        }
    }

    /// Names the calling thread (through /proc/thread-self/comm: glibc's
    /// pthread_setname_np is not visible to Swift). Best effort.
    static func nameCurrent(_ name: String) {
        let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return }
        let bytes = Array(name.utf8.prefix(15))
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }

    /// Waits for the thread to finish.
    public func join() { pthread_join(handle, nil) }

    /// Whether the caller is this thread (a thread cannot join itself).
    public var isCurrent: Bool { pthread_equal(handle, pthread_self()) != 0 }

    /// Sends `signal` to the thread (used to kick a vCPU out of KVM_RUN).
    public func signal(_ signal: Int32) { pthread_kill(handle, signal) }
}

extension Mutex where Value == Thread? {
    /// Takes the thread out (so that only one caller joins it) and joins it,
    /// unless the caller is that thread itself (it is then left to finish).
    public func takeAndJoin() {
        let t = withLock { slot in
            let t = slot
            slot = nil
            return t
        }
        if let t, !t.isCurrent { t.join() }
    }
}
