import CHostService
import CLinuxSched
import PVSchedCore

#if canImport(Glibc)
import Glibc
#endif

/// A thread held by identity, not by its number: Linux hands a thread id to a new
/// thread once the old one is gone (here after at most 32768 others), and a boost
/// meant for a vCPU thread that exited must never reach the stranger that got its
/// id. Held through a pidfd (`PIDFD_THREAD`, Linux 6.9+) when the kernel gives one,
/// else by the thread's start time, which a recycled id does not share.
///
/// Not Sendable on purpose: the actuator keeps these under its lock and closes the
/// pidfd when it lets the thread go.
struct ThreadIdentity {
    let tid: Int32
    /// -1 without a pidfd.
    let pidfd: Int32
    /// Clock ticks since boot (/proc/TID/stat field 22).
    let startTime: UInt64
    /// The thread's process (thread group).
    let process: Int32

    /// Takes hold of `tid` as it is now; nil when there is no such thread.
    static func hold(_ tid: Int32) -> ThreadIdentity? {
        let fd = pvs_thread_pidfd(tid)
        var start: UInt64 = 0
        let tgid = pvs_thread_tgid(tid)
        guard pvs_thread_start_time(tid, &start) == 0, tgid > 0 else {
            if fd >= 0 { pvs_close(fd) }
            return nil
        }
        let held = ThreadIdentity(tid: tid, pidfd: fd >= 0 ? fd : -1, startTime: start, process: tgid)
        // The id may have changed hands between the pidfd and the reads: a thread still
        // alive behind the pidfd is the one they describe.
        guard held.isAlive else { held.close(); return nil }
        return held
    }

    /// Whether the thread this identity was taken of still runs (its id has not
    /// been handed on).
    var isAlive: Bool {
        if pidfd >= 0 { return pvs_pidfd_exited(pidfd) == 0 }
        var now: UInt64 = 0
        return pvs_thread_start_time(tid, &now) == 0 && now == startTime
    }

    func close() { if pidfd >= 0 { pvs_close(pidfd) } }
}

/// A process's identity across a restart of the daemon: its pid and its start time
/// (clock ticks since boot), which a recycled pid does not share.
public enum ProcessIdentity {
    /// The start time of process (or thread) `pid`; nil when there is none.
    public static func startTime(of pid: Int32) -> UInt64? {
        var start: UInt64 = 0
        return pvs_thread_start_time(pid, &start) == 0 ? start : nil
    }
}
