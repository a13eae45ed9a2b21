import CHostService
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Watches the VMM processes of every attached VM from one thread (not one per VM):
/// each process through a pidfd (held from the attach on, so a recycled pid is never
/// mistaken for the VMM), all of them in one `poll`. When a process exits its
/// `onExit` runs once; each VM's `tick` runs about once a second (re-reading vCPU
/// threads, dropping threads that exited, noticing a region that went away).
///
/// Callbacks run on the monitor's thread and may call `remove` (even for their own
/// VM). A tick that blocks delays the others: ticks must bound their waits (QMP
/// requests time out).
public final class ProcessMonitor: Sendable {
    private struct Watched {
        let fd: Int32
        let process: Int32
        let tick: (@Sendable () -> Void)?
        let onExit: @Sendable () -> Void
    }
    private struct Table {
        var watched: [UInt64: Watched] = [:]
        var stopping = false
    }
    private let table = Mutex(Table())
    /// Wakes the thread when the table changes (a pipe's read end in the poll set).
    private let wakeFD: Int32
    private let wakeWriteFD: Int32
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    /// Held while callbacks run, so that `remove` can wait one out.
    private let callbackLock = Mutex(())
    public static let tickIntervalNs: UInt64 = 1_000_000_000

    public init() throws(ThreadError) {
        var fds: [Int32] = [-1, -1]
        if pipe(&fds) != 0 { fds = [-1, -1] }
        for fd in fds where fd >= 0 {
            _ = pvs_set_nonblocking(fd)
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        }
        wakeFD = fds[0]
        wakeWriteFD = fds[1]
        let t = try PVSchedCore.Thread(name: "pvs-procwatch") { [weak self] in self?.run() }
        thread.withLock { $0 = t }
    }

    deinit {
        if wakeFD >= 0 { close(wakeFD) }
        if wakeWriteFD >= 0 { close(wakeWriteFD) }
    }

    /// Watches `process` for VM `id`. Fails (field `pid`) when the process is gone
    /// or cannot be opened.
    public func add(id: UInt64, process: Int32, tick: (@Sendable () -> Void)? = nil,
                    onExit: @escaping @Sendable () -> Void) throws(EndpointError) {
        let fd = pvs_pidfd_open(process)
        guard fd >= 0 else { throw EndpointError(field: "pid", "cannot watch process \(process): \(String(cString: strerror(errno)))") }
        let old = table.withLock { t in
            let old = t.watched[id]
            t.watched[id] = Watched(fd: fd, process: process, tick: tick, onExit: onExit)
            return old
        }
        if let old { pvs_close(old.fd) }
        wake()
    }

    /// Stops watching VM `id`'s process; no callback of it starts after this returns
    /// (one running on another thread is waited for).
    public func remove(id: UInt64) {
        guard let w = table.withLock({ $0.watched.removeValue(forKey: id) }) else { return }
        pvs_close(w.fd)
        wake()
        if !(thread.withLock { $0?.isCurrent ?? false }) { callbackLock.withLock { _ in } }
    }

    /// How many processes are watched.
    public var count: Int { table.withLock { $0.watched.count } }

    public func stop() {
        let all = table.withLock { t in
            t.stopping = true
            let all = t.watched
            t.watched.removeAll()
            return all
        }
        wake()
        thread.takeAndJoin()
        for w in all.values { pvs_close(w.fd) }
    }

    private func wake() {
        var one: UInt8 = 1
        _ = write(wakeWriteFD, &one, 1)
    }

    private func run() {
        var lastTick = MonotonicClock.nowNs()
        while true {
            let (watched, stopping) = table.withLock { ($0.watched, $0.stopping) }
            if stopping { return }
            let ids = Array(watched.keys)
            var fds = [pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)]
            fds += ids.map { pollfd(fd: watched[$0]!.fd, events: Int16(POLLIN), revents: 0) }
            let now = MonotonicClock.nowNs()
            let untilTick = lastTick &+ Self.tickIntervalNs &- min(now, lastTick &+ Self.tickIntervalNs)
            _ = poll(&fds, nfds_t(fds.count), Int32(untilTick / 1_000_000) + 1)
            if fds[0].revents != 0 {
                var drain = [UInt8](repeating: 0, count: 64)
                while read(wakeFD, &drain, drain.count) > 0 {}
            }
            var exited: [UInt64] = []
            for (i, id) in ids.enumerated() where fds[i + 1].revents != 0 { exited.append(id) }
            let tickDue = MonotonicClock.nowNs() &- lastTick >= Self.tickIntervalNs
            if tickDue { lastTick = MonotonicClock.nowNs() }
            callbackLock.withLock { _ in
                for id in exited {
                    // Still watched (not removed meanwhile): this exit is its one call.
                    guard let w = table.withLock({ $0.watched.removeValue(forKey: id) }) else { continue }
                    pvs_close(w.fd)
                    w.onExit()
                }
                guard tickDue else { return }
                for id in ids where !exited.contains(id) {
                    guard let w = table.withLock({ $0.watched[id] }) else { continue }
                    w.tick?()
                }
            }
        }
    }
}
