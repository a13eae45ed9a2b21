import CLinuxSched
import Logging
import PVSchedCore
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// The Linux actuator: changes a thread's scheduling parameters with
/// sched_setattr(2), only when they differ from what is in force, and puts each
/// thread back to the exact parameters it had before (read with sched_getattr(2)).
///
/// Originals live in an async-signal-safe table, so the process restores every
/// boosted thread on normal exit, on SIGINT/SIGTERM/SIGHUP/SIGQUIT and on fatal
/// signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) before dying. Threads of
/// other processes are also announced to a `BoostGuardian` (when given) before
/// their first boost, so that they are restored even if this process is killed.
public final class LinuxActuator: Actuator {
    private let current = Mutex([ThreadID: SchedulingParameters]())
    private let logger: Logger
    /// Restores other processes' threads if this process dies.
    public let guardian: BoostGuardian?
    private struct Guarded { var process: Int32; var sent: (original: pvs_sched_attr, boosted: pvs_sched_attr)? }
    /// Per thread: its process (nil for our own threads) and what the guardian last heard.
    private let guardedThreads = Mutex([ThreadID: Guarded?]())
    private let cpuClock = ThreadCPUClock()
    /// Each adopted thread's parameters when it was adopted: what restores return to.
    private let baselines = Mutex([ThreadID: pvs_sched_attr]())

    public init(guardian: BoostGuardian? = nil, logger: Logger = Logger(label: "pvsched.actuator")) {
        self.logger = logger
        self.guardian = guardian
        pvs_install_restore_handlers()
    }

    /// Announces a boost of another process's thread to the guardian (only when
    /// the original or the boosted parameters differ from what it last heard).
    private func announce(_ thread: ThreadID, original: pvs_sched_attr, boosted: pvs_sched_attr) {
        guard let guardian else { return }
        let send: Int32? = guardedThreads.withLock { g in
            if g[thread] == nil { g[thread] = Self.foreignProcess(of: thread).map { Guarded(process: $0, sent: nil) } }
            guard var entry = g[thread] ?? nil else { return nil }
            if let sent = entry.sent, Self.same(sent.original, original), Self.same(sent.boosted, boosted) { return nil }
            entry.sent = (original, boosted)
            g[thread] = entry
            return entry.process
        }
        if let process = send { guardian.guard_(thread: thread, process: process, original: original, boosted: boosted) }
    }

    private static func same(_ a: pvs_sched_attr, _ b: pvs_sched_attr) -> Bool {
        a.sched_policy == b.sched_policy && a.sched_priority == b.sched_priority && a.sched_nice == b.sched_nice
            && a.sched_flags == b.sched_flags && a.sched_runtime == b.sched_runtime
    }

    /// The process of `thread` if it is not this process (from /proc/TID/status).
    static func foreignProcess(of thread: ThreadID) -> Int32? {
        if access("/proc/self/task/\(thread.rawValue)", F_OK) == 0 { return nil }
        guard let f = fopen("/proc/\(thread.rawValue)/status", "re") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(cString: line)
            if text.hasPrefix("Tgid:") {
                return Int32(String(text.dropFirst(5).filter { $0.isNumber }))
            }
        }
        return nil
    }

    public func adopt(_ thread: ThreadID, allowRealTime: Bool) throws(ActuatorError) {
        var now = pvs_sched_attr()
        let r = pvs_sched_getattr(thread.rawValue, &now)
        guard r == 0 else { throw ActuatorError(thread: thread, operation: "sched_getattr", errno: -r) }
        let params = LinuxScheduling.parameters(of: now)
        if let params, params.isRealTime, !allowRealTime {
            throw ActuatorError(thread: thread, operation: "adopt", errno: 0, kind: .realTimeAtAttach(current: params))
        }
        baselines.withLock { $0[thread] = LinuxScheduling.normalized(now) }
    }

    public func release(_ thread: ThreadID) {
        try? restore(thread)
        _ = baselines.withLock { $0.removeValue(forKey: thread) }
        cpuClock.forget(thread)
    }

    /// Reads `thread`'s parameters and checks that they are still the setting
    /// `expected` (policy, priority, nice); a difference means someone else changed the thread.
    private func checkUnchanged(_ thread: ThreadID, expected: SchedulingParameters?) throws(ActuatorError) {
        var now = pvs_sched_attr()
        let r = pvs_sched_getattr(thread.rawValue, &now)
        guard r == 0 else { throw ActuatorError(thread: thread, operation: "sched_getattr", errno: -r) }
        let current = LinuxScheduling.parameters(of: now)
        guard current == expected.flatMap(LinuxScheduling.readBack) else {
            throw ActuatorError(thread: thread, operation: "check", errno: 0, kind: .ownedByOperator(current: current))
        }
    }

    /// A change decided under `current` and made after it: see `apply`.
    private struct Change {
        var attr: pvs_sched_attr
        var original: pvs_sched_attr
        /// What pvsched had applied before (nil: the thread was at its original).
        var previous: SchedulingParameters?
        var placeFirst: Bool
    }

    // Both `apply` and `restore` decide under `current` and change the thread after
    // releasing it. The change may lower the calling thread's own priority (a vCPU
    // thread giving its boost back, or starting a repayment at nice 19), and Linux
    // preempts it right at the call's return: holding the lock then, it held up every
    // other thread's actuation until it ran again, and priority inheritance does not
    // help a fair-class waiter (another vCPU's thread). Changes of one thread never
    // overlap: the binding makes them all under that vCPU's lock.
    public func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
        let baseline = baselines.withLock { $0[thread] }
        let planned: Change? = try current.withLock { cur throws(ActuatorError) -> Change? in
            if cur[thread] == parameters { return nil }
            // The thread must still be where pvsched left it: at its boost, or at its baseline.
            if let mine = cur[thread] { try checkUnchanged(thread, expected: mine) }
            else if let baseline { try checkUnchanged(thread, expected: LinuxScheduling.parameters(of: baseline)) }
            var original = pvs_sched_attr()
            if pvs_restore_table_lookup(thread.rawValue, &original) == 0 {
                // The baseline taken at adoption, exactly; else the parameters now.
                if let baseline { original = baseline } else {
                    let r = pvs_sched_getattr(thread.rawValue, &original)
                    guard r == 0 else { throw ActuatorError(thread: thread, operation: "sched_getattr", errno: -r) }
                    original = LinuxScheduling.normalized(original)
                }
                if LinuxScheduling.parameters(of: original) == LinuxScheduling.readBack(parameters) { return nil }
                let rr = pvs_restore_table_remember(thread.rawValue, &original)
                guard rr == 0 else { throw ActuatorError(thread: thread, operation: "remember original", errno: -rr) }
            }
            let attr = LinuxScheduling.attr(for: parameters)
            announce(thread, original: original, boosted: attr)
            // A fair-class boost starts with a clean slate: see `LinuxScheduling.placeAfresh`.
            let change = Change(attr: attr, original: original, previous: cur[thread],
                                placeFirst: cur[thread] == nil && parameters.isFairClass && LinuxScheduling.isWaiting(thread))
            cur[thread] = parameters
            return change
        }
        guard var change = planned else { return }
        if change.placeFirst { LinuxScheduling.placeAfresh(thread) }
        let r = pvs_sched_setattr(thread.rawValue, &change.attr)
        guard r == 0 else {
            current.withLock { cur in cur[thread] = change.previous }
            if change.previous == nil {
                // Not left half-way (at the placement step): back to the original.
                change.original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
                _ = pvs_sched_setattr(thread.rawValue, &change.original)
                pvs_restore_table_forget(thread.rawValue)
            }
            throw ActuatorError(thread: thread, operation: "sched_setattr(\(parameters))", errno: -r)
        }
    }

    public func restore(_ thread: ThreadID) throws(ActuatorError) {
        let planned: pvs_sched_attr? = try current.withLock { cur throws(ActuatorError) -> pvs_sched_attr? in
            guard let mine = cur.removeValue(forKey: thread) else { return nil }
            var original = pvs_sched_attr()
            guard pvs_restore_table_lookup(thread.rawValue, &original) == 1 else { return nil }
            // Changed by someone else while boosted: their setting stays.
            do throws(ActuatorError) {
                try checkUnchanged(thread, expected: mine)
            } catch {
                pvs_restore_table_forget(thread.rawValue)
                if error.kind == .system && error.errno == Errno.noSuchProcess.rawValue { return nil }
                throw error
            }
            return original
        }
        guard var original = planned else { return }
        original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        let r = pvs_sched_setattr(thread.rawValue, &original)
        pvs_restore_table_forget(thread.rawValue)
        // A thread that already exited (ESRCH) needs no restoring.
        guard r == 0 || r == -Errno.noSuchProcess.rawValue else {
            throw ActuatorError(thread: thread, operation: "sched_setattr(original)", errno: -r)
        }
    }

    public func restoreAll() {
        let threads = current.withLock { Array($0.keys) }
        for t in threads {
            do { try restore(t) } catch { logger.error("restore failed", metadata: ["error": "\(error)"]) }
        }
    }

    public func applied(to thread: ThreadID) -> SchedulingParameters? { current.withLock { $0[thread] } }

    /// The thread's CPU time, by the thread CPU clock (ours) or schedstat (other processes').
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? { cpuClock.cpuTimeNs(of: thread) }

    /// The parameters `thread` had when it was adopted.
    public func baseline(of thread: ThreadID) -> SchedulingParameters? {
        baselines.withLock { $0[thread] }.flatMap(LinuxScheduling.parameters(of:))
    }

    deinit { restoreAll() }
}

/// Reading and converting Linux thread scheduling parameters.
public enum LinuxScheduling {
    /// The calling thread's id.
    public static func currentThread() -> ThreadID { ThreadID(pvs_gettid()) }

    /// The parameters `thread` runs with now.
    public static func parameters(of thread: ThreadID) throws(Errno) -> SchedulingParameters? {
        var a = pvs_sched_attr()
        let r = pvs_sched_getattr(thread.rawValue, &a)
        guard r == 0 else { throw Errno(rawValue: -r) }
        return parameters(of: a)
    }

    /// Pins `thread` to the CPUs in `mask` (bit i = CPU i).
    public static func setAffinity(_ thread: ThreadID, mask: UInt64) throws(Errno) {
        let r = pvs_set_affinity(thread.rawValue, mask)
        guard r == 0 else { throw Errno(rawValue: -r) }
    }

    /// Whether this process may use real-time policies (root or CAP_SYS_NICE).
    public static var canUseRealTime: Bool {
        var original = pvs_sched_attr()
        let tid = pvs_gettid()
        guard pvs_sched_getattr(tid, &original) == 0 else { return false }
        var rt = attr(for: .fifo(priority: 1))
        guard pvs_sched_setattr(tid, &rt) == 0 else { return false }
        original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        _ = pvs_sched_setattr(tid, &original)
        return true
    }

    /// The kernel's default EEVDF slice (sysctl base_slice), in ns: what sched_getattr
    /// reports as `sched_runtime` for a SCHED_OTHER thread without a slice of its own.
    /// Learnt once, on a short-lived thread that resets its own slice to the default
    /// (threads inherit their creator's slice, so reading a new thread is not enough).
    public static let defaultSliceNs: UInt64 = {
        let found = SliceCell()
        let t = PVSchedCore.Thread {
            let tid = pvs_gettid()
            var a = pvs_sched_attr()
            guard pvs_sched_getattr(tid, &a) == 0 else { return }
            if a.sched_policy == UInt32(PVS_SCHED_OTHER) || a.sched_policy == UInt32(PVS_SCHED_BATCH) {
                a.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
                a.sched_runtime = 0
                guard pvs_sched_setattr(tid, &a) == 0, pvs_sched_getattr(tid, &a) == 0 else { return }
                found.value.store(a.sched_runtime, ordering: .relaxed)
            }
        }
        t.join()
        return found.value.load(ordering: .relaxed)
    }()
    private final class SliceCell: Sendable { let value = Atomic<UInt64>(0) }

    /// Whether `thread` is blocked (sleeping or waiting, not runnable), by its state in
    /// /proc/TID/stat; false when that cannot be read.
    static func isWaiting(_ thread: ThreadID) -> Bool {
        let fd = open("/proc/\(thread.rawValue)/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return false }
        // "TID (comm) S ...": the state follows the last ')' (a comm may contain one).
        guard let paren = buffer[..<n].lastIndex(of: UInt8(ascii: ")")), paren + 2 < n else { return false }
        let state = buffer[paren + 2]
        return state == UInt8(ascii: "S") || state == UInt8(ascii: "D")
    }

    /// The parameters of `placeAfresh`'s step.
    static let placementStep = SchedulingParameters.fifo(priority: 1)

    /// The step through the real-time class that makes a fair-class (EEVDF) boost
    /// work: `thread` is set to SCHED_FIFO 1, the lowest real-time priority, for the
    /// moment before its boost is set.
    ///
    /// EEVDF keeps a thread's lag (service received minus service owed) across sleeps and
    /// weight changes: a vCPU thread that ran more than its share, boosted or not, is
    /// *ineligible* when its next boost begins, and the host thread EEVDF picks instead
    /// keeps the CPU until the next scheduling event (the 4 ms tick at HZ=250). Entering
    /// the fair class from another class places the thread afresh, with no lag.
    /// Measured with a vCPU-like thread boosted and woken every 5 ms beside two busy threads
    /// on one CPU (`scripts/eevdf-lag.sh`): wake-ups that waited over 500 µs fell from 12.7%
    /// to none for a vCPU that sleeps between boosts, and from 71% to 0.1% for one that
    /// stays runnable.
    ///
    /// The actuator places afresh only a thread that waits (a halted vCPU): its debt is
    /// forgiven once per wake-up. A runnable one (a vCPU running batch work) keeps its lag,
    /// or every boost would forgive it the CPU it ran beyond its share, at the host's
    /// expense (the demo's rt+batch, 3 runs: host work 0.71x with the step at every boost,
    /// 0.91x without). At FIFO 1 the step preempts no real-time task (equal priorities do
    /// not preempt), and a failure (no RLIMIT_RTPRIO) only skips it.
    static func placeAfresh(_ thread: ThreadID) {
        var step = attr(for: placementStep)
        _ = pvs_sched_setattr(thread.rawValue, &step)
    }

    /// `p` as a thread set to it reads back: a slice equal to the default, or any
    /// slice on a kernel without per-task slices (before 6.12), is no slice of its own.
    static func readBack(_ p: SchedulingParameters) -> SchedulingParameters? { parameters(of: attr(for: p)) }

    /// `a` as a baseline to restore: a SCHED_OTHER/BATCH thread at the default slice
    /// gets `sched_runtime` 0, so that restoring it leaves it without a slice of its own
    /// (setting the default value would pin it, and hide later changes of the sysctl).
    static func normalized(_ a: pvs_sched_attr) -> pvs_sched_attr {
        var a = a
        if a.sched_policy == UInt32(PVS_SCHED_OTHER) || a.sched_policy == UInt32(PVS_SCHED_BATCH),
           a.sched_runtime == defaultSliceNs {
            a.sched_runtime = 0
        }
        return a
    }

    static func parameters(of a: pvs_sched_attr) -> SchedulingParameters? {
        switch Int32(a.sched_policy) {
        case Int32(PVS_SCHED_OTHER):
            // A slice of its own (sched_getattr reports the slice in force, default or not).
            if a.sched_runtime != 0, a.sched_runtime != defaultSliceNs, defaultSliceNs != 0 {
                return .slice(nice: Int8(a.sched_nice), sliceUs: UInt32(clamping: a.sched_runtime / 1000))
            }
            return .other(nice: Int8(a.sched_nice))
        case Int32(PVS_SCHED_BATCH): return .batch(nice: Int8(a.sched_nice))
        case Int32(PVS_SCHED_IDLE): return .idle
        case Int32(PVS_SCHED_FIFO): return .fifo(priority: UInt8(a.sched_priority))
        case Int32(PVS_SCHED_RR): return .rr(priority: UInt8(a.sched_priority))
        default: return nil
        }
    }

    static func attr(for p: SchedulingParameters) -> pvs_sched_attr {
        var a = pvs_sched_attr()
        a.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        switch p {
        case .other(let n): a.sched_policy = UInt32(PVS_SCHED_OTHER); a.sched_nice = Int32(n)
        case .slice(let n, let us):
            a.sched_policy = UInt32(PVS_SCHED_OTHER); a.sched_nice = Int32(n); a.sched_runtime = UInt64(us) * 1000
        case .batch(let n): a.sched_policy = UInt32(PVS_SCHED_BATCH); a.sched_nice = Int32(n)
        case .idle: a.sched_policy = UInt32(PVS_SCHED_IDLE)
        case .fifo(let prio):
            a.sched_policy = UInt32(PVS_SCHED_FIFO); a.sched_priority = UInt32(prio)
            a.sched_flags = UInt64(PVS_SCHED_FLAG_RESET_ON_FORK)
        case .rr(let prio):
            a.sched_policy = UInt32(PVS_SCHED_RR); a.sched_priority = UInt32(prio)
            a.sched_flags = UInt64(PVS_SCHED_FLAG_RESET_ON_FORK)
        }
        return a
    }
}

extension LinuxScheduling {
    /// Sets the calling thread's parameters directly (for the VMM's own device
    /// threads, which die with the VM: nothing to restore).
    public static func setCurrentThread(_ parameters: SchedulingParameters) throws(Errno) {
        var a = attr(for: parameters)
        let r = pvs_sched_setattr(0, &a)
        guard r == 0 else { throw Errno(rawValue: -r) }
    }
}
