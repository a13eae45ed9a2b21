import CHostService
import CLinuxSched
import Logging
import PVSchedCore
import Synchronization
import SystemPackage

#if canImport(Glibc)
import Glibc
#endif

/// A guardian for boosts of other processes' threads: a small separate process,
/// started by the daemon, that learns each such thread's original and boosted
/// parameters *before* the boost is applied and, when the daemon dies for any
/// reason (SIGKILL included), puts back every thread still at the boosted
/// parameters. A thread whose parameters changed meanwhile (an administrator's
/// chrt or renice, or a restore that already happened) is left alone.
///
/// The daemon side (`BoostGuardian`) writes fixed-size records into a pipe that
/// is the guardian's standard input; the guardian watches the daemon through a
/// pidfd and the pipe's end of file, whichever comes first.
public final class BoostGuardian: Sendable {
    /// One record on the pipe: the thread, its process, and both parameter sets.
    struct Record {
        static let size = 8 + 2 * MemoryLayout<pvs_sched_attr>.size
        var tid: Int32
        var tgid: Int32
        var original: pvs_sched_attr
        var boosted: pvs_sched_attr

        var bytes: [UInt8] {
            var out = [UInt8]()
            out.reserveCapacity(Self.size)
            withUnsafeBytes(of: tid) { out += $0 }
            withUnsafeBytes(of: tgid) { out += $0 }
            withUnsafeBytes(of: original) { out += $0 }
            withUnsafeBytes(of: boosted) { out += $0 }
            return out
        }

        init(tid: Int32, tgid: Int32, original: pvs_sched_attr, boosted: pvs_sched_attr) {
            self.tid = tid; self.tgid = tgid; self.original = original; self.boosted = boosted
        }

        init(_ b: UnsafeRawBufferPointer) {
            tid = b.loadUnaligned(fromByteOffset: 0, as: Int32.self)
            tgid = b.loadUnaligned(fromByteOffset: 4, as: Int32.self)
            original = b.loadUnaligned(fromByteOffset: 8, as: pvs_sched_attr.self)
            boosted = b.loadUnaligned(fromByteOffset: 8 + MemoryLayout<pvs_sched_attr>.size, as: pvs_sched_attr.self)
        }
    }

    /// The guardian process's id.
    public let pid: Int32
    private let pipe: Mutex<Int32>
    private let logger: Logger

    /// Starts the guardian: `executable` run with `arguments` must end up in
    /// `BoostGuardian.runGuardian(parent:)` (pvsched's hidden `guardian` command).
    public init(executable: String, arguments: [String], logger: Logger = Logger(label: "pvsched.guardian")) throws(Errno) {
        var argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) }
        argv.append(nil)
        defer { for p in argv { free(p) } }
        var child: Int32 = 0
        let fd = pvs_spawn_with_pipe(executable, &argv, &child)
        guard fd >= 0 else { throw Errno(-fd) }
        pid = child
        pipe = Mutex(fd)
        self.logger = logger
    }

    /// Tells the guardian about a boost about to be applied (call before sched_setattr).
    func guard_(thread: ThreadID, process: Int32, original: pvs_sched_attr, boosted: pvs_sched_attr) {
        let bytes = Record(tid: thread.rawValue, tgid: process, original: original, boosted: boosted).bytes
        let r = pipe.withLock { fd in bytes.withUnsafeBytes { pvs_write_all(fd, $0.baseAddress, $0.count) } }
        if r != 0 { logger.error("the boost guardian is gone; boosts of other processes are unguarded", metadata: ["errno": "\(-r)"]) }
    }

    /// Closes the pipe: the guardian restores what is still boosted and exits.
    public func close() {
        pipe.withLock { fd in
            if fd >= 0 { pvs_close(fd); fd = -1 }
        }
        _ = pvs_waitpid(pid, 0)
    }

    /// The guardian process's main loop: reads records from standard input and,
    /// when `parent` dies or closes the pipe, restores every guarded thread that
    /// is still at its boosted parameters. Returns the number restored.
    public static func runGuardian(parent: Int32) -> Int {
        pvs_ignore_stop_signals()
        pvs_set_process_name("pvsched-guard")
        let pidfd = pvs_pidfd_open(parent)
        var guarded: [Int32: Record] = [:]
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
            let rec = buffer.withUnsafeBytes { Record($0) }
            guarded[rec.tid] = rec
            if ready & 2 != 0 { _ = fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK) }
        }
        var restored = 0
        for rec in guarded.values where restoreIfStillBoosted(rec) { restored += 1 }
        return restored
    }

    /// Puts `rec`'s thread back if it still belongs to the same process and still
    /// runs with the boosted parameters (or is caught at the placement step a
    /// fair-class boost passes through, `LinuxScheduling.placeAfresh`).
    static func restoreIfStillBoosted(_ rec: Record) -> Bool {
        guard access("/proc/\(rec.tgid)/task/\(rec.tid)", F_OK) == 0 else { return false }
        var now = pvs_sched_attr()
        guard pvs_sched_getattr(rec.tid, &now) == 0 else { return false }
        let current = LinuxScheduling.parameters(of: now), boosted = LinuxScheduling.parameters(of: rec.boosted)
        let atPlacementStep = boosted?.isFairClass == true && current == LinuxScheduling.placementStep
        guard current == boosted || atPlacementStep else { return false }
        var original = rec.original
        original.size = UInt32(MemoryLayout<pvs_sched_attr>.size)
        return pvs_sched_setattr(rec.tid, &original) == 0
    }
}

extension Errno {
    init(_ raw: Int32) { self.init(rawValue: raw) }
}
