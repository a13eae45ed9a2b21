import CHostService
import CLinuxSched
import Logging
import PVSchedCore
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A guardian for changes the daemon makes to other processes' threads: a small
/// separate process that learns each such thread's original parameters (and the
/// parameters pvsched may give it) *before* the change is made and, when the
/// daemon dies for any reason (SIGKILL included), puts back every thread still at
/// one of pvsched's parameters. A thread someone else changed meanwhile (an
/// administrator's chrt or renice), or whose id now names another thread, is
/// left alone.
///
/// The guardian is a safety net, so it is never a single point of failure: the
/// daemon writes to it without ever blocking (a full pipe, a stopped or starved
/// guardian, a dead one), a supervisor thread restarts a guardian that died or
/// stalled and hands the new one every live record, and while no guardian takes
/// records, `announce` refuses: the actuator then does not change other
/// processes' threads at all. Restores never need the guardian.
public final class BoostGuardian: Sendable {
    /// Whether the guardian takes records now.
    public enum State: String, Sendable {
        /// Running and up to date.
        case up
        /// Running, but not reading its pipe (stopped or starved): records wait.
        case stalled
        /// Gone; the supervisor restarts it.
        case down
        /// Closed by the daemon.
        case closed
    }

    /// What the daemon reports about its guardian.
    public struct Status: Equatable, Sendable {
        public var state: State
        public var pid: Int32
        /// Guardians started after the first one (each death or stall costs one).
        public var restarts: UInt64
        /// Records (threads, cgroup values) the guardian holds.
        public var records: Int
    }

    /// One record on the pipe, fixed size (no record is ever split: the pipe is
    /// written whole records at a time, below PIPE_BUF).
    struct Record: Equatable {
        static let size = 512
        static let maxChanged = 6
        enum Kind: UInt32 { case thread = 1, forget = 2, cgroup = 3, forgetCgroup = 4 }
        var kind: Kind
        var tid: Int32
        var tgid: Int32
        var startTime: UInt64
        var original: pvs_sched_attr
        /// The parameters pvsched may set on the thread, most recent last.
        var changed: [pvs_sched_attr]

        static func == (a: Record, b: Record) -> Bool {
            a.kind == b.kind && a.tid == b.tid && a.tgid == b.tgid && a.startTime == b.startTime
                && LinuxScheduling.same(a.original, b.original) && a.changed.count == b.changed.count
                && zip(a.changed, b.changed).allSatisfy { LinuxScheduling.same($0, $1) }
        }

        var bytes: [UInt8] {
            var out = [UInt8](repeating: 0, count: Self.size)
            out.withUnsafeMutableBytes { b in
                b.storeBytes(of: kind.rawValue, toByteOffset: 0, as: UInt32.self)
                b.storeBytes(of: tid, toByteOffset: 4, as: Int32.self)
                b.storeBytes(of: tgid, toByteOffset: 8, as: Int32.self)
                b.storeBytes(of: UInt32(changed.count), toByteOffset: 12, as: UInt32.self)
                b.storeBytes(of: startTime, toByteOffset: 16, as: UInt64.self)
                b.storeBytes(of: original, toByteOffset: 24, as: pvs_sched_attr.self)
                for (i, a) in changed.prefix(Self.maxChanged).enumerated() {
                    b.storeBytes(of: a, toByteOffset: 80 + i * MemoryLayout<pvs_sched_attr>.size, as: pvs_sched_attr.self)
                }
            }
            return out
        }

        init(kind: Kind, tid: Int32, tgid: Int32, startTime: UInt64, original: pvs_sched_attr, changed: [pvs_sched_attr]) {
            self.kind = kind; self.tid = tid; self.tgid = tgid; self.startTime = startTime
            self.original = original; self.changed = changed
        }

        /// Decodes a record (from the daemon, which the guardian trusts: it started it).
        init?(_ b: UnsafeRawBufferPointer) {
            guard b.count >= Self.size, let kind = Kind(rawValue: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) else { return nil }
            self.kind = kind
            tid = b.loadUnaligned(fromByteOffset: 4, as: Int32.self)
            tgid = b.loadUnaligned(fromByteOffset: 8, as: Int32.self)
            let count = min(Int(b.loadUnaligned(fromByteOffset: 12, as: UInt32.self)), Self.maxChanged)
            startTime = b.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
            original = b.loadUnaligned(fromByteOffset: 24, as: pvs_sched_attr.self)
            changed = (0..<count).map { b.loadUnaligned(fromByteOffset: 80 + $0 * MemoryLayout<pvs_sched_attr>.size, as: pvs_sched_attr.self) }
        }
    }

    /// A cgroup weight pvsched changes (`CgroupWeights`), on the pipe as a `Record`
    /// of its own kind: the file, its own value and the values pvsched may write (a
    /// boost's and a repayment's), so that a cgroup weighed again and again costs one
    /// record, not one per boost.
    struct CgroupRecord: Equatable {
        static let maxWritten = 4
        static let maxPath = Record.size - 16 - 8 * maxWritten
        var forget = false
        var file: String
        var original: UInt64
        /// The values pvsched may write, most recent last.
        var written: [UInt64]

        var bytes: [UInt8] {
            var out = [UInt8](repeating: 0, count: Record.size)
            let path = Array(file.utf8.prefix(Self.maxPath))
            let values = written.suffix(Self.maxWritten)
            out.withUnsafeMutableBytes { b in
                b.storeBytes(of: (forget ? Record.Kind.forgetCgroup : .cgroup).rawValue, toByteOffset: 0, as: UInt32.self)
                b.storeBytes(of: UInt16(path.count), toByteOffset: 4, as: UInt16.self)
                b.storeBytes(of: UInt16(values.count), toByteOffset: 6, as: UInt16.self)
                b.storeBytes(of: original, toByteOffset: 8, as: UInt64.self)
                for (i, v) in values.enumerated() { b.storeBytes(of: v, toByteOffset: 16 + 8 * i, as: UInt64.self) }
                for (i, c) in path.enumerated() { b[16 + 8 * Self.maxWritten + i] = c }
            }
            return out
        }

        init(forget: Bool = false, file: String, original: UInt64, written: [UInt64]) {
            self.forget = forget; self.file = file; self.original = original; self.written = written
        }

        init?(_ b: UnsafeRawBufferPointer) {
            guard b.count >= Record.size, let kind = Record.Kind(rawValue: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self)),
                  kind == .cgroup || kind == .forgetCgroup else { return nil }
            forget = kind == .forgetCgroup
            let n = min(Int(b.loadUnaligned(fromByteOffset: 4, as: UInt16.self)), Self.maxPath)
            let count = min(Int(b.loadUnaligned(fromByteOffset: 6, as: UInt16.self)), Self.maxWritten)
            original = b.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
            written = (0..<count).map { b.loadUnaligned(fromByteOffset: 16 + 8 * $0, as: UInt64.self) }
            let start = 16 + 8 * Self.maxWritten
            file = String(decoding: UnsafeRawBufferPointer(rebasing: b[start..<(start + n)]), as: UTF8.self)
        }
    }

    private struct Process {
        var pid: Int32
        var pipe: Int32
        var pidfd: Int32
    }
    private struct Table {
        var process: Process?
        var state = State.down
        var restarts: UInt64 = 0
        /// Every live record, by thread: what a new guardian is handed.
        var records: [Int32: Record] = [:]
        /// Records not yet written (the pipe was full, or no guardian ran).
        var unsent: Set<Int32> = []
        /// Every cgroup weight pvsched changed, by file, and the records not yet written.
        var cgroups: [String: CgroupRecord] = [:]
        var unsentCgroups: Set<String> = []
        /// Since when records have been waiting (0: none wait).
        var waitingSinceNs: UInt64 = 0
        /// The guardian process was last seen stopped.
        var stopped = false
        var closed = false
    }

    private let table = Mutex(Table())
    private let executable: String
    private let arguments: [String]
    private let logger: Logger
    private let supervisor = Mutex<PVSchedCore.Thread?>(nil)
    /// A guardian that has not read its pipe for this long is stuck: it is replaced.
    static let stallLimitNs: UInt64 = 2_000_000_000

    /// Starts the guardian: `executable` run with `arguments` must end up in
    /// `BoostGuardian.runGuardian(parent:)` (pvsched's hidden `guardian` command),
    /// and a supervisor thread that restarts it when it dies or stalls.
    public init(executable: String, arguments: [String], logger: Logger = Logger(label: "pvsched.guardian")) throws {
        self.executable = executable
        self.arguments = arguments
        self.logger = logger
        let first = try Self.spawn(executable, arguments)
        table.withLock { t in t.process = first; t.state = .up }
        let sup = try PVSchedCore.Thread(name: "pvs-guard-sup") { [self] in supervise() }
        supervisor.withLock { $0 = sup }
    }

    private static func spawn(_ executable: String, _ arguments: [String]) throws(Errno) -> Process {
        var argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) }
        argv.append(nil)
        defer { for p in argv { free(p) } }
        var child: Int32 = 0
        let fd = pvs_spawn_with_pipe(executable, &argv, &child)
        guard fd >= 0 else { throw Errno(rawValue: -fd) }
        _ = pvs_set_nonblocking(fd)
        return Process(pid: child, pipe: fd, pidfd: pvs_pidfd_open(child))
    }

    /// The guardian now.
    public var status: Status {
        table.withLock { t in Status(state: t.state, pid: t.process?.pid ?? 0, restarts: t.restarts, records: t.records.count + t.cgroups.count) }
    }

    /// The guardian process's id (0 while none runs).
    public var pid: Int32 { status.pid }

    /// Tells the guardian, before the change is made, that pvsched is about to set
    /// `changed` on `tid` of process `tgid`. Returns false when no guardian took the
    /// record: the change must then not be made. Never blocks.
    func announce(tid: Int32, tgid: Int32, startTime: UInt64, original: pvs_sched_attr, changed: pvs_sched_attr) -> Bool {
        table.withLock { t in
            guard !t.closed else { return false }
            var rec = t.records[tid] ?? Record(kind: .thread, tid: tid, tgid: tgid, startTime: startTime, original: original, changed: [])
            if rec.startTime != startTime || rec.tgid != tgid || !LinuxScheduling.same(rec.original, original) {
                rec = Record(kind: .thread, tid: tid, tgid: tgid, startTime: startTime, original: original, changed: [])
            }
            if !rec.changed.contains(where: { LinuxScheduling.same($0, changed) }) {
                rec.changed.append(changed)
                if rec.changed.count > Record.maxChanged { rec.changed.removeFirst() }
            }
            if t.records[tid] != rec {
                t.records[tid] = rec
                t.unsent.insert(tid)
            }
            flush(&t)
            return t.state == .up && !t.unsent.contains(tid)
        }
    }

    /// Forgets `tid` (pvsched let it go): a new guardian is not handed it.
    func forget(tid: Int32) {
        table.withLock { t in
            guard t.records.removeValue(forKey: tid) != nil else { return }
            t.unsent.remove(tid)
            guard let p = t.process, t.state == .up else { return }
            let bytes = Record(kind: .forget, tid: tid, tgid: 0, startTime: 0, original: pvs_sched_attr(), changed: []).bytes
            _ = bytes.withUnsafeBytes { pvs_write_record(p.pipe, $0.baseAddress, $0.count) }
        }
    }

    /// Tells the guardian, before the value is written, that pvsched sets cgroup
    /// weight `file` (its own value `original`) to `written`. Returns false when no
    /// guardian took the record (the value must then not be written). Never blocks;
    /// writes nothing when the guardian knows that value of that file already.
    func announceCgroup(file: String, original: UInt64, written: UInt64) -> Bool {
        guard file.utf8.count <= CgroupRecord.maxPath else { return false }
        return table.withLock { t in
            guard !t.closed else { return false }
            var rec = t.cgroups[file].flatMap { $0.original == original ? $0 : nil }
                ?? CgroupRecord(file: file, original: original, written: [])
            if !rec.written.contains(written) {
                rec.written.append(written)
                if rec.written.count > CgroupRecord.maxWritten { rec.written.removeFirst() }
            }
            if t.cgroups[file] != rec {
                t.cgroups[file] = rec
                t.unsentCgroups.insert(file)
            }
            flush(&t)
            return t.state == .up && !t.unsentCgroups.contains(file)
        }
    }

    /// Forgets cgroup weight `file` (its own value is back).
    func forgetCgroup(file: String) {
        table.withLock { t in
            guard t.cgroups.removeValue(forKey: file) != nil else { return }
            t.unsentCgroups.remove(file)
            guard let p = t.process, t.state == .up else { return }
            let bytes = CgroupRecord(forget: true, file: file, original: 0, written: []).bytes
            _ = bytes.withUnsafeBytes { pvs_write_record(p.pipe, $0.baseAddress, $0.count) }
        }
    }

    /// Writes what waits, threads in thread order then cgroups, until the pipe is
    /// full. Under the table lock.
    private func flush(_ t: inout Table) {
        guard let p = t.process, t.state != .down, !t.unsent.isEmpty || !t.unsentCgroups.isEmpty else {
            if t.unsent.isEmpty, t.unsentCgroups.isEmpty, !t.stopped { t.waitingSinceNs = 0; if t.state == .stalled { t.state = .up } }
            return
        }
        let waiting = t.unsent.sorted().map { (tid: Optional($0), file: String?.none) }
            + t.unsentCgroups.sorted().map { (tid: Int32?.none, file: Optional($0)) }
        for item in waiting {
            let bytes: [UInt8]
            if let tid = item.tid {
                guard let rec = t.records[tid] else { t.unsent.remove(tid); continue }
                bytes = rec.bytes
            } else {
                guard let file = item.file, let rec = t.cgroups[file] else { t.unsentCgroups.remove(item.file!); continue }
                bytes = rec.bytes
            }
            let r = bytes.withUnsafeBytes { pvs_write_record(p.pipe, $0.baseAddress, $0.count) }
            if r == 0 {
                if let tid = item.tid { t.unsent.remove(tid) } else { t.unsentCgroups.remove(item.file!) }
                continue
            }
            if r == -EAGAIN {
                if t.state == .up { logger.warning("the boost guardian is not reading its pipe: other processes' threads are not boosted until it does") }
                t.state = .stalled
                if t.waitingSinceNs == 0 { t.waitingSinceNs = MonotonicClock.nowNs() }
            } else {
                if t.state != .down { logger.error("the boost guardian is gone: other processes' threads are not boosted until it runs again", metadata: ["errno": "\(-r)"]) }
                t.state = .down
            }
            return
        }
        if !t.stopped {
            t.waitingSinceNs = 0
            t.state = .up
        }
    }

    /// The supervisor: restarts a guardian that died or stalled and hands it every record.
    private func supervise() {
        var backoffNs: UInt64 = 50_000_000
        while true {
            let (process, closed) = table.withLock { ($0.process, $0.closed) }
            if closed { return }
            if let p = process, p.pidfd >= 0, pvs_poll2(p.pidfd, -1, 100) & 1 == 0 {
                // Alive: retry waiting records; replace a guardian stuck for too long,
                // whether its pipe filled up or it was stopped (SIGSTOP, a debugger):
                // a stopped guardian restores nothing when the daemon dies.
                let stopped = Self.isStopped(p.pid)
                let stuck: Bool = table.withLock { t in
                    if t.stopped && !stopped { t.stopped = false; t.waitingSinceNs = 0 }
                    t.stopped = stopped
                    flush(&t)
                    if stopped {
                        if t.state == .up { logger.warning("the boost guardian is stopped", metadata: ["pid": "\(p.pid)"]) }
                        t.state = .stalled
                        if t.waitingSinceNs == 0 { t.waitingSinceNs = MonotonicClock.nowNs() }
                    }
                    return t.waitingSinceNs != 0 && MonotonicClock.nowNs() &- t.waitingSinceNs > Self.stallLimitNs
                }
                if stuck {
                    logger.error("the boost guardian is stuck: replacing it", metadata: ["pid": "\(p.pid)"])
                    kill(p.pid, SIGKILL)
                }
                backoffNs = 50_000_000
                continue
            }
            if process == nil || process!.pidfd < 0 { usleep(100_000) }
            // Gone (or never started): reap it, start another, hand it every record.
            table.withLock { t in
                if let p = t.process {
                    pvs_close(p.pipe)
                    if p.pidfd >= 0 { pvs_close(p.pidfd) }
                    _ = pvs_waitpid(p.pid, 0)
                    if t.state != .down { logger.error("the boost guardian died: restarting it", metadata: ["pid": "\(p.pid)"]) }
                }
                t.process = nil
                t.state = .down
            }
            if table.withLock({ $0.closed }) { return }
            usleep(UInt32(backoffNs / 1000))
            backoffNs = min(backoffNs * 2, 5_000_000_000)
            do {
                let p = try Self.spawn(executable, arguments)
                table.withLock { t in
                    t.process = p
                    t.restarts &+= 1
                    t.stopped = false
                    t.waitingSinceNs = 0
                    t.state = .stalled
                    t.unsent = Set(t.records.keys)
                    t.unsentCgroups = Set(t.cgroups.keys)
                    flush(&t)
                    if t.unsent.isEmpty && t.unsentCgroups.isEmpty { t.state = .up }
                }
                logger.notice("boost guardian restarted", metadata: ["pid": "\(p.pid)", "records": "\(status.records)"])
            } catch {
                logger.error("cannot restart the boost guardian", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Whether process `pid` is stopped or traced (state T or t in /proc/PID/stat).
    static func isStopped(_ pid: Int32) -> Bool {
        guard let text = LinuxScheduling.readSmallFile("/proc/\(pid)/stat"), let paren = text.lastIndex(of: ")") else { return false }
        let rest = text[text.index(after: paren)...].drop { $0 == " " }
        return rest.first == "T" || rest.first == "t"
    }

    /// Stops supervising and closes the pipe: the guardian restores what is still
    /// changed and exits.
    public func close() {
        let p: Process? = table.withLock { t in
            t.closed = true
            t.state = .closed
            let p = t.process
            t.process = nil
            return p
        }
        supervisor.takeAndJoin()
        if let p {
            pvs_close(p.pipe)
            // It restores and exits at the end of its pipe; one that does not (stopped,
            // stuck) is not waited for forever.
            if p.pidfd >= 0 {
                if pvs_poll2(p.pidfd, -1, 5000) & 1 == 0 { kill(p.pid, SIGKILL) }
                pvs_close(p.pidfd)
            }
            _ = pvs_waitpid(p.pid, 0)
        }
    }

    // MARK: the guardian process

    /// The guardian process's main loop: reads records from standard input and,
    /// when `parent` dies or closes the pipe, restores every guarded thread that
    /// is still at one of the parameters pvsched gave it. Returns the number restored.
    public static func runGuardian(parent: Int32) -> Int {
        pvs_ignore_stop_signals()
        pvs_set_process_name("pvsched-guard")
        // Above every boost (drivers' and operators' up to 99): when the daemon is
        // gone, nothing boosted can keep the guardian from its restores. It sleeps
        // in poll the rest of the time.
        var rt = LinuxScheduling.attr(for: .fifo(priority: 99))
        _ = pvs_sched_setattr(0, &rt)
        let pidfd = pvs_pidfd_open(parent)
        var guarded: [Int32: (record: Record, since: UInt64)] = [:]
        var cgroups: [String: CgroupRecord] = [:]
        var buffer = [UInt8](repeating: 0, count: Record.size)
        while true {
            // stdin readable: a record or end of file (the daemon closed it or died).
            // pidfd readable: the daemon died; records it wrote before dying may still
            // be in the pipe, so drain them (without blocking) before restoring.
            let ready = pvs_poll2(0, pidfd >= 0 ? pidfd : -1, -1)
            if ready < 0 { break }
            if ready & 1 == 0 && ready & 2 != 0 {
                _ = fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK)
            }
            let r = buffer.withUnsafeMutableBytes { pvs_read_exact(0, $0.baseAddress, $0.count) }
            if r != 1 {
                if ready & 2 == 0 && r == -EAGAIN { continue }
                break
            }
            if let rec = buffer.withUnsafeBytes({ CgroupRecord($0) }) {
                cgroups[rec.file] = rec.forget ? nil : rec
            } else if let rec = buffer.withUnsafeBytes({ Record($0) }) {
                switch rec.kind {
                case .thread: guarded[rec.tid] = (rec, guarded[rec.tid]?.since ?? LinuxScheduling.bootTicks())
                case .forget: guarded[rec.tid] = nil
                case .cgroup, .forgetCgroup: break
                }
            }
            if ready & 2 != 0 { _ = fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK) }
        }
        var restored = 0
        for (rec, since) in guarded.values where restoreIfStillChanged(rec, since: since) { restored += 1 }
        for rec in cgroups.values where restoreIfStillWritten(rec) { restored += 1 }
        return restored
    }

    /// Puts a cgroup weight back to its own value if it still holds a value pvsched
    /// writes (a value someone else set since stays).
    static func restoreIfStillWritten(_ rec: CgroupRecord) -> Bool {
        guard let now = CgroupWeights.read(rec.file), now != rec.original, rec.written.contains(now) else { return false }
        return CgroupWeights.write(rec.file, rec.original)
    }

    /// Puts `rec`'s thread back if it is still the same thread (its start time) of
    /// the same process and still runs with parameters pvsched gave it (or is
    /// caught at the placement step a fair-class boost passes through,
    /// `LinuxScheduling.placeAfresh`); fixes the children it had meanwhile.
    static func restoreIfStillChanged(_ rec: Record, since: UInt64) -> Bool {
        var start: UInt64 = 0
        guard access("/proc/\(rec.tgid)/task/\(rec.tid)", F_OK) == 0,
              pvs_thread_start_time(rec.tid, &start) == 0, start == rec.startTime else { return false }
        var now = pvs_sched_attr()
        guard pvs_sched_getattr(rec.tid, &now) == 0 else { return false }
        let current = LinuxScheduling.parameters(of: now)
        let changed = rec.changed.compactMap(LinuxScheduling.parameters(of:))
        let atPlacementStep = changed.contains { $0.isFairClass } && current == LinuxScheduling.placementStep
        guard let current, changed.contains(current) || atPlacementStep else { return false }
        var original = rec.original
        original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        guard pvs_sched_setattr(rec.tid, &original) == 0 else { return false }
        LinuxScheduling.fixChildren(of: rec.tid, process: rec.tgid, bornSince: since,
                                    inherited: Set(changed.map(LinuxScheduling.inheritedByChild)), original: rec.original)
        return true
    }
}
