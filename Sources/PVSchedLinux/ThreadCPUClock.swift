import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The CPU time a thread has run, for the governor's budgets. A thread of this
/// process is read through its thread CPU clock (clock_gettime on the clock id
/// Linux derives from the thread id); a thread of another process (a QEMU vCPU)
/// through `/proc/TID/schedstat`, whose first field is the same sum of run time,
/// with the file kept open and read with pread.
public final class ThreadCPUClock: Sendable {
    /// The open schedstat file of each thread of another process (whose thread
    /// clock id Linux refuses with EINVAL).
    private let files = Mutex([ThreadID: Int32]())

    public init() {}

    deinit {
        files.withLock { for fd in $0.values { close(fd) } }
    }

    /// CPU time of `thread` in ns, or nil if it cannot be read (the thread exited).
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? {
        if let fd = files.withLock({ $0[thread] }) { return schedstat(thread, fd) }
        // MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED): (~tid << 3) | CPUCLOCK_SCHED | CPUCLOCK_PERTHREAD_MASK.
        let id = clockid_t((~thread.rawValue) << 3 | 2 | 4)
        var ts = timespec()
        if clock_gettime(id, &ts) == 0 { return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec) }
        let fd = open("/proc/\(thread.rawValue)/schedstat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        let kept: Int32 = files.withLock { f in
            if let other = f[thread] { close(fd); return other }  // another caller opened it first
            f[thread] = fd
            return fd
        }
        return schedstat(thread, kept)
    }

    private func schedstat(_ thread: ThreadID, _ fd: Int32) -> UInt64? {
        var buffer = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        let n = withUnsafeMutableBytes(of: &buffer) { pread(fd, $0.baseAddress, $0.count - 1, 0) }
        guard n > 0 else {
            files.withLock { f in if f.removeValue(forKey: thread) != nil { close(fd) } }
            return nil
        }
        // "<run ns> <wait ns> <timeslices>\n": the first decimal field.
        return withUnsafeBytes(of: &buffer) { bytes -> UInt64? in
            var value: UInt64 = 0, digits = 0
            for b in bytes.prefix(n) {
                guard b >= 48 && b <= 57 else { break }
                let (m, o1) = value.multipliedReportingOverflow(by: 10)
                let (a, o2) = m.addingReportingOverflow(UInt64(b - 48))
                guard !o1 && !o2 else { return nil }
                value = a; digits += 1
            }
            return digits > 0 ? value : nil
        }
    }

    /// Stops watching `thread` (closes its file).
    public func forget(_ thread: ThreadID) {
        files.withLock { f in if let fd = f.removeValue(forKey: thread) { close(fd) } }
    }
}
