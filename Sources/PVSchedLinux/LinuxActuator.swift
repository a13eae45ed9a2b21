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
/// Threads are held by identity (`ThreadIdentity`: a pidfd, or the start time),
/// taken when a thread is adopted or first changed: a thread that exited is
/// dropped (`.threadGone`) and its id, which the kernel may give to another
/// thread, is never acted on again. Every change is reset on fork
/// (`SCHED_FLAG_RESET_ON_FORK`); where the kernel's reset is not the thread's own
/// parameters (a repayment's nice 19), the children born meanwhile are put right
/// when the thread is restored.
///
/// Originals live in an async-signal-safe table, so the process restores every
/// changed thread on normal exit, on SIGINT/SIGTERM/SIGHUP/SIGQUIT and on fatal
/// signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT) before dying. Threads of
/// other processes are also announced to a `BoostGuardian` (when given) before
/// their first change, so that they are restored even if this process is killed;
/// while that guardian takes no records, they are not changed (`.unguarded`).
///
/// With `cgroupWeights`, a fair-class boost (negative nice) of another process's
/// thread alone in its cgroup also raises that cgroup's weight and its ancestors'
/// for as long as the boost lasts (`CgroupWeights`). A real-time class the thread's cgroup refuses (no
/// real-time runtime) is applied as `realTimeFallback`, said once (`classFallback`).
public final class LinuxActuator: Actuator {
    private let logger: Logger
    /// Restores other processes' threads if this process dies.
    public let guardian: BoostGuardian?
    /// Raises the cgroups of threads boosted in a fair class (nil: threads only).
    public let cgroupWeights: CgroupWeights?
    /// Causes already logged of cgroups that could not be raised (one line per cause).
    private let cgroupRefusals = Mutex(Set<String>())
    private let cpuClock = ThreadCPUClock()
    private let ownProcess = getpid()

    /// What the actuator holds of one thread.
    private struct Held {
        var identity: ThreadIdentity
        /// The parameters when adopted: what restores return to.
        var baseline: pvs_sched_attr?
        /// What pvsched applied (nil: the thread is at its original).
        var applied: SchedulingParameters?
        /// The original recorded for the change in force (the restore table holds it too).
        var original: pvs_sched_attr?
        /// Since when (boot clock ticks) the thread is changed, and what a child born
        /// meanwhile inherited: put right at the restore when that is not the original.
        var changedSince: UInt64 = 0
        var inherited: Set<SchedulingParameters> = []
        /// The cgroups raised for the boost in force.
        var lease: CgroupWeights.Lease?
        /// Until when the thread is known not to be alone in its cgroup (not looked at again before).
        var cgroupSharedUntilNs: UInt64 = 0
        /// The cgroup that refused the thread a real-time class (no real-time runtime):
        /// its boosts are applied in `realTimeFallback` instead.
        var realTimeRefusedBy: String?
        var foreign: Bool { identity.process != getpid() }
    }
    private let threads = Mutex([ThreadID: Held]())
    /// Threads forgotten because they exited, until whoever gave them lets go
    /// (`release`) or names a new thread with the same id: `hasExited` says so.
    private let exited = Mutex(Set<ThreadID>())

    public init(guardian: BoostGuardian? = nil, cgroupWeights: CgroupWeights? = nil, logger: Logger = Logger(label: "pvsched.actuator")) {
        self.logger = logger
        self.guardian = guardian
        self.cgroupWeights = cgroupWeights
        pvs_install_restore_handlers()
    }

    /// The thread's entry, taking hold of it on first sight; throws `.threadGone`
    /// (and forgets it) when the thread it stands for has exited. Under `threads`.
    private func held(_ t: inout [ThreadID: Held], _ thread: ThreadID) throws(ActuatorError) -> Held {
        if let h = t[thread] {
            guard h.identity.isAlive else {
                forgetLocked(&t, thread)
                throw ActuatorError(thread: thread, operation: "check", errno: ESRCH, kind: .threadGone)
            }
            return h
        }
        guard let identity = ThreadIdentity.hold(thread.rawValue) else {
            throw ActuatorError(thread: thread, operation: "pidfd_open", errno: ESRCH, kind: .threadGone)
        }
        return Held(identity: identity)
    }

    /// Drops everything about `thread` (it exited, or pvsched let it go). Under `threads`.
    private func forgetLocked(_ t: inout [ThreadID: Held], _ thread: ThreadID, becauseExited: Bool = true) {
        guard let h = t.removeValue(forKey: thread) else { return }
        if let lease = h.lease { cgroupWeights?.release(lease) }
        if becauseExited { _ = exited.withLock { $0.insert(thread) } }
        pvs_restore_table_forget(thread.rawValue)
        h.identity.close()
        if h.foreign { guardian?.forget(tid: thread.rawValue) }
    }

    public func adopt(_ thread: ThreadID, allowRealTime: Bool) throws(ActuatorError) {
        _ = exited.withLock { $0.remove(thread) }  // a thread named anew
        try threads.withLock { t throws(ActuatorError) in
            var h = try held(&t, thread)
            var now = pvs_sched_attr()
            let r = pvs_sched_getattr(thread.rawValue, &now)
            guard r == 0 else {
                if t[thread] == nil { h.identity.close() }
                throw ActuatorError(thread: thread, operation: "sched_getattr", errno: -r)
            }
            let params = LinuxScheduling.parameters(of: now)
            if let params, params.isRealTime, !allowRealTime {
                if t[thread] == nil { h.identity.close() }
                throw ActuatorError(thread: thread, operation: "adopt", errno: 0, kind: .realTimeAtAttach(current: params))
            }
            // A thread already changed by pvsched keeps the baseline it was adopted with.
            if h.applied == nil { h.baseline = LinuxScheduling.normalized(now) }
            t[thread] = h
        }
    }

    public func release(_ thread: ThreadID) {
        try? restore(thread)
        threads.withLock { forgetLocked(&$0, thread, becauseExited: false) }
        _ = exited.withLock { $0.remove(thread) }
        cpuClock.forget(thread)
    }

    public func owningProcess(of thread: ThreadID) -> Int32? { threads.withLock { $0[thread]?.identity.process } }

    public func hasExited(_ thread: ThreadID) -> Bool {
        if exited.withLock({ $0.contains(thread) }) { return true }
        return threads.withLock { t in
            guard let h = t[thread], !h.identity.isAlive else { return false }
            forgetLocked(&t, thread)
            return true
        }
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

    /// A change decided under `threads` and made after it: see `apply`.
    private struct Change {
        var attr: pvs_sched_attr
        var original: pvs_sched_attr
        /// What pvsched had applied before (nil: the thread was at its original).
        var previous: SchedulingParameters?
        var placeFirst: Bool
        /// For the guardian: the thread's process and start time (nil: our own thread).
        var foreign: (process: Int32, startTime: UInt64)?
    }

    /// The class a real-time boost is applied in where the thread's cgroup has no
    /// real-time runtime (libvirt's vCPU cgroups on a cgroup v1 host with real-time
    /// group scheduling): an EEVDF slice of 100 µs at nice -20, with the cgroup's
    /// weight raised (`cgroupWeights`). Granting such cgroups runtime instead is not
    /// done: the runtime is a per-period allowance that a vCPU boosted often runs out
    /// of, and it is then throttled for the rest of the period (measured under
    /// libvirt: worse maxima than no boost at all).
    public static let realTimeFallback = SchedulingParameters.slice(nice: -20, sliceUs: 100)

    public func classFallback(of thread: ThreadID) -> String? {
        threads.withLock { $0[thread]?.realTimeRefusedBy }.map {
            "its cgroup \($0) has no real-time runtime (cpu.rt_runtime_us 0): real-time boosts are applied as "
                + "\(BoostSettings.classText(Self.realTimeFallback))\(cgroupWeights != nil ? " with the cgroup's weight raised" : "")"
        }
    }

    // Both `apply` and `restore` decide under `threads` and change the thread after
    // releasing it. The change may lower the calling thread's own priority (a vCPU
    // thread giving its boost back, or starting a repayment at nice 19), and Linux
    // preempts it right at the call's return: holding the lock then, it held up every
    // other thread's actuation until it ran again, and priority inheritance does not
    // help a fair-class waiter (another vCPU's thread). Changes of one thread never
    // overlap: the binding makes them all under that vCPU's lock. The guardian is
    // told outside the lock too, and never blocks.
    public func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
        do throws(ActuatorError) {
            try applyAsked(parameters, to: thread)
        } catch {
            // A real-time class the thread's cgroup refuses: said once, and this boost and
            // the next are applied in the fallback class.
            guard error.kind == .system, error.errno == EPERM, parameters.isRealTime,
                  let process = owningProcess(of: thread),
                  let cgroup = CgroupRealTime.cgroupWithoutRuntime(thread, process: process) else { throw error }
            let first = threads.withLock { t -> Bool in
                guard t[thread] != nil, t[thread]?.realTimeRefusedBy == nil else { return false }
                t[thread]?.realTimeRefusedBy = cgroup
                return true
            }
            if first {
                logger.warning("a real-time boost is refused by the thread's cgroup; boosts of this thread use a fair class",
                               metadata: ["thread": "\(thread.rawValue)", "cgroup": "\(cgroup)",
                                          "class": "\(BoostSettings.classText(Self.realTimeFallback))"])
            }
            try applyAsked(Self.realTimeFallback, to: thread)
        }
    }

    private func applyAsked(_ asked: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {
        var parameters = asked
        let planned: Change? = try threads.withLock { t throws(ActuatorError) -> Change? in
            var h = try held(&t, thread)
            defer { t[thread] = h }
            if h.realTimeRefusedBy != nil && parameters.isRealTime { parameters = Self.realTimeFallback }
            if h.applied == parameters { return nil }
            // The thread must still be where pvsched left it: at its boost, or at its baseline.
            if let mine = h.applied { try checkUnchanged(thread, expected: mine) }
            else if let baseline = h.baseline { try checkUnchanged(thread, expected: LinuxScheduling.parameters(of: baseline)) }
            if h.original == nil {
                // The baseline taken at adoption, exactly; else the parameters now.
                var original = pvs_sched_attr()
                if let baseline = h.baseline { original = baseline } else {
                    let r = pvs_sched_getattr(thread.rawValue, &original)
                    guard r == 0 else { throw ActuatorError(thread: thread, operation: "sched_getattr", errno: -r) }
                    original = LinuxScheduling.normalized(original)
                }
                if LinuxScheduling.parameters(of: original) == LinuxScheduling.readBack(parameters) { return nil }
                let rr = pvs_restore_table_remember(thread.rawValue, h.identity.pidfd, &original)
                guard rr == 0 else { throw ActuatorError(thread: thread, operation: "remember original", errno: -rr) }
                h.original = original
                h.changedSince = LinuxScheduling.bootTicks()
                h.inherited = []
            }
            let change = Change(attr: LinuxScheduling.attr(for: parameters), original: h.original!, previous: h.applied,
                                // A fair-class boost starts with a clean slate: see `LinuxScheduling.placeAfresh`.
                                placeFirst: h.applied == nil && parameters.isFairClass && LinuxScheduling.isWaiting(thread),
                                foreign: h.foreign ? (h.identity.process, h.identity.startTime) : nil)
            h.applied = parameters
            h.inherited.insert(LinuxScheduling.inheritedByChild(parameters))
            if change.placeFirst { h.inherited.insert(LinuxScheduling.inheritedByChild(LinuxScheduling.placementStep)) }
            return change
        }
        guard var change = planned else { return }
        if let foreign = change.foreign, let guardian {
            var told = true
            if change.placeFirst {
                told = guardian.announce(tid: thread.rawValue, tgid: foreign.process, startTime: foreign.startTime,
                                         original: change.original, changed: LinuxScheduling.attr(for: LinuxScheduling.placementStep))
            }
            if told {
                told = guardian.announce(tid: thread.rawValue, tgid: foreign.process, startTime: foreign.startTime,
                                         original: change.original, changed: change.attr)
            }
            guard told else {
                undoPlan(thread, change)
                throw ActuatorError(thread: thread, operation: "sched_setattr(\(parameters))", errno: 0, kind: .unguarded)
            }
        }
        if change.placeFirst { LinuxScheduling.placeAfresh(thread) }
        let r = pvs_sched_setattr(thread.rawValue, &change.attr)
        guard r == 0 else {
            undoPlan(thread, change)
            if change.previous == nil {
                // Not left half-way (at the placement step): back to the original.
                change.original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
                _ = pvs_sched_setattr(thread.rawValue, &change.original)
            }
            throw ActuatorError(thread: thread, operation: "sched_setattr(\(parameters))", errno: -r)
        }
        if let foreign = change.foreign { weighCgroups(thread, process: foreign.process, parameters) }
    }

    /// Raises the thread's cgroups for a fair-class boost (negative nice); gives them
    /// back for anything else (a repayment, the thread's own parameters).
    private func weighCgroups(_ thread: ThreadID, process: Int32, _ parameters: SchedulingParameters) {
        guard let cgroupWeights else { return }
        let nice: Int8? = switch parameters {
        case .other(let n) where n < 0, .slice(let n, _) where n < 0, .batch(let n) where n < 0: n
        default: nil
        }
        let (held, sharedUntil) = threads.withLock { ($0[thread]?.lease, $0[thread]?.cgroupSharedUntilNs ?? 0) }
        let weight = nice.map { CgroupWeights.weight(nice: $0, version: cgroupWeights.hierarchy.version) }
        if let held {
            if held.weight == weight { return }  // raised so already
            threads.withLock { $0[thread]?.lease = nil }
            cgroupWeights.release(held)
        }
        guard let nice, MonotonicClock.nowNs() >= sharedUntil else { return }
        do throws(CgroupWeights.Refusal) {
            let lease = try cgroupWeights.raise(thread: thread.rawValue, process: process, nice: nice)
            let kept = threads.withLock { t -> Bool in
                guard t[thread]?.applied == parameters else { return false }
                t[thread]?.lease = lease
                return true
            }
            if !kept { cgroupWeights.release(lease) }  // restored meanwhile
        } catch {
            let cause: String
            switch error {
            case .shared:
                // Threads rarely move (libvirt moves each vCPU thread once, at its start).
                threads.withLock { $0[thread]?.cgroupSharedUntilNs = MonotonicClock.nowNs() + 5_000_000_000 }
                return
            case .unguarded: cause = "the boost guardian takes no records"
            case .unusable(let why): cause = why
            }
            guard cgroupRefusals.withLock({ $0.count < 1000 && $0.insert(cause).inserted }) else { return }
            logger.warning("a boosted thread's cgroup weight is not raised: its boosts count only inside its cgroup",
                           metadata: ["thread": "\(thread.rawValue)", "reason": "\(cause)"])
        }
    }

    /// Takes back a planned change that was not made.
    private func undoPlan(_ thread: ThreadID, _ change: Change) {
        threads.withLock { t in
            guard var h = t[thread] else { return }
            h.applied = change.previous
            if change.previous == nil {
                h.original = nil
                pvs_restore_table_forget(thread.rawValue)
            }
            t[thread] = h
        }
    }

    public func restore(_ thread: ThreadID) throws(ActuatorError) {
        struct Undo { var original: pvs_sched_attr; var since: UInt64; var inherited: Set<SchedulingParameters>; var process: Int32 }
        let planned: Undo? = try threads.withLock { t throws(ActuatorError) -> Undo? in
            guard var h = t[thread], let mine = h.applied else { return nil }
            // A thread that exited needs no restoring, and its id may name another thread now.
            guard h.identity.isAlive else { forgetLocked(&t, thread); return nil }
            h.applied = nil
            if let lease = h.lease { cgroupWeights?.release(lease); h.lease = nil }
            let undo = h.original.map { Undo(original: $0, since: h.changedSince, inherited: h.inherited, process: h.identity.process) }
            h.original = nil
            t[thread] = h
            guard undo != nil else { return nil }
            // Changed by someone else while boosted: their setting stays.
            do throws(ActuatorError) {
                try checkUnchanged(thread, expected: mine)
            } catch {
                pvs_restore_table_forget(thread.rawValue)
                if error.kind == .system && error.errno == ESRCH { return nil }
                throw error
            }
            return undo
        }
        guard var undo = planned else { return }
        undo.original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        let r = pvs_sched_setattr(thread.rawValue, &undo.original)
        pvs_restore_table_forget(thread.rawValue)
        // A thread that already exited (ESRCH) needs no restoring.
        guard r == 0 || r == -ESRCH else {
            throw ActuatorError(thread: thread, operation: "sched_setattr(original)", errno: -r)
        }
        LinuxScheduling.fixChildren(of: thread.rawValue, process: undo.process, bornSince: undo.since,
                                    inherited: undo.inherited, original: undo.original)
    }

    public func restoreAll() {
        let changed = threads.withLock { t in t.filter { $0.value.applied != nil }.map(\.key) }
        for t in changed {
            do { try restore(t) } catch { logger.error("restore failed", metadata: ["error": "\(error)"]) }
        }
    }

    public func applied(to thread: ThreadID) -> SchedulingParameters? { threads.withLock { $0[thread]?.applied } }

    /// The thread's CPU time, by the thread CPU clock (ours) or schedstat (other processes').
    public func cpuTimeNs(of thread: ThreadID) -> UInt64? { cpuClock.cpuTimeNs(of: thread) }

    /// The parameters `thread` had when it was adopted.
    public func baseline(of thread: ThreadID) -> SchedulingParameters? {
        threads.withLock { $0[thread]?.baseline }.flatMap(LinuxScheduling.parameters(of:))
    }

    deinit {
        restoreAll()
        threads.withLock { t in for k in Array(t.keys) { forgetLocked(&t, k, becauseExited: false) } }
    }
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
        // Without a thread to learn it on, no slice is told apart from the default.
        guard let t = try? PVSchedCore.Thread(body: {
            let tid = pvs_gettid()
            var a = pvs_sched_attr()
            guard pvs_sched_getattr(tid, &a) == 0 else { return }
            if a.sched_policy == UInt32(PVS_SCHED_OTHER) || a.sched_policy == UInt32(PVS_SCHED_BATCH) {
                a.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
                a.sched_runtime = 0
                guard pvs_sched_setattr(tid, &a) == 0, pvs_sched_getattr(tid, &a) == 0 else { return }
                found.value.store(a.sched_runtime, ordering: .relaxed)
            }
        }) else { return 0 }
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
        case .fifo(let prio): a.sched_policy = UInt32(PVS_SCHED_FIFO); a.sched_priority = UInt32(prio)
        case .rr(let prio): a.sched_policy = UInt32(PVS_SCHED_RR); a.sched_priority = UInt32(prio)
        }
        // Whatever pvsched sets is a loan to this thread, not to the children it forks.
        a.sched_flags = UInt64(PVS_SCHED_FLAG_RESET_ON_FORK)
        return a
    }
}

extension LinuxScheduling {
    /// Whether two attributes set the same parameters (policy, priority, nice, flags, slice).
    static func same(_ a: pvs_sched_attr, _ b: pvs_sched_attr) -> Bool {
        a.sched_policy == b.sched_policy && a.sched_priority == b.sched_priority && a.sched_nice == b.sched_nice
            && a.sched_flags == b.sched_flags && a.sched_runtime == b.sched_runtime
    }

    /// Now on the clock of a thread's start time (/proc/TID/stat): clock ticks since boot.
    static func bootTicks() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_BOOTTIME, &ts)
        let hz = UInt64(max(sysconf(Int32(_SC_CLK_TCK)), 1))
        return UInt64(ts.tv_sec) * hz + UInt64(ts.tv_nsec) * hz / 1_000_000_000
    }

    /// What a child forked by a thread at `p` (set by pvsched, so with
    /// SCHED_FLAG_RESET_ON_FORK) starts with: the kernel puts a real-time policy back
    /// to SCHED_OTHER nice 0, a negative nice to 0 and a slice to the default, but
    /// keeps a positive nice (a repayment's 19) and SCHED_BATCH/IDLE.
    static func inheritedByChild(_ p: SchedulingParameters) -> SchedulingParameters {
        switch p {
        case .fifo, .rr: return .other(nice: 0)
        case .other(let n), .slice(let n, _): return .other(nice: max(n, 0))
        case .batch(let n): return .batch(nice: max(n, 0))
        case .idle: return .idle
        }
    }

    /// Puts right the children `thread` (of `process`) forked since `bornSince` (boot
    /// clock ticks) while pvsched had changed it: a child (every thread of it, and its
    /// own children, a few generations down) still at one of `inherited` that is not
    /// what it would have inherited from the thread at `original` is given that. Does
    /// nothing (and reads nothing) when the kernel's reset on fork already gave the
    /// children exactly that, the usual case (a boost of a nice 0 thread).
    static func fixChildren(of thread: Int32, process: Int32, bornSince: UInt64,
                            inherited: Set<SchedulingParameters>, original: pvs_sched_attr) {
        var target = original
        var expected = parameters(of: original)
        if original.sched_flags & UInt64(PVS_SCHED_FLAG_RESET_ON_FORK) != 0 {
            expected = expected.map(inheritedByChild)
            if let e = expected { target = attr(for: e); target.sched_flags = 0 }
        }
        let wrong = inherited.filter { $0 != expected }
        guard !wrong.isEmpty else { return }
        target.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        var visited = 0
        func children(of tid: Int32, in pid: Int32) -> [Int32] {
            guard let text = readSmallFile("/proc/\(pid)/task/\(tid)/children") else { return [] }
            return text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int32($0) }
        }
        func fix(_ pid: Int32, depth: Int) {
            visited += 1
            guard depth <= 4, visited <= 4096 else { return }
            var start: UInt64 = 0
            guard pvs_thread_start_time(pid, &start) == 0, start + 1 >= bornSince else { return }
            for tid in threadIDs(of: pid) {
                var now = pvs_sched_attr()
                if pvs_sched_getattr(tid, &now) == 0, let p = parameters(of: now), wrong.contains(p) {
                    _ = pvs_sched_setattr(tid, &target)
                }
                for c in children(of: tid, in: pid) { fix(c, depth: depth + 1) }
            }
        }
        for c in children(of: thread, in: process) { fix(c, depth: 1) }
    }

    /// The thread ids of process `pid` (/proc/PID/task).
    static func threadIDs(of pid: Int32) -> [Int32] {
        guard let dir = opendir("/proc/\(pid)/task") else { return [] }
        defer { closedir(dir) }
        var out: [Int32] = []
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let t = Int32(name) { out.append(t) }
        }
        return out
    }

    /// A small file's text (procfs), nil when it cannot be read.
    static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n >= 0 else { return nil }
        return String(decoding: buffer[..<n], as: UTF8.self)
    }

    /// Sets `thread`'s parameters directly, with nothing to restore (the lab's static
    /// real-time of a VM that is destroyed afterwards).
    public static func setThread(_ thread: Int32, _ parameters: SchedulingParameters) throws(Errno) {
        var a = attr(for: parameters)
        let r = pvs_sched_setattr(thread, &a)
        guard r == 0 else { throw Errno(rawValue: -r) }
    }

    /// Sets the calling thread's parameters directly (for the VMM's own device
    /// threads, which die with the VM: nothing to restore).
    public static func setCurrentThread(_ parameters: SchedulingParameters) throws(Errno) {
        var a = attr(for: parameters)
        let r = pvs_sched_setattr(0, &a)
        guard r == 0 else { throw Errno(rawValue: -r) }
    }
}
