import Atomics
import CLinuxSched
import PVSchedABI
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A stand-in for a VMM process and its guest, for tests and benchmarks that need
/// another process's vCPU threads and a pvsched region in /dev/shm without a real
/// VM: `pvsched-standin` runs it. One thread per vCPU, named like
/// cloud-hypervisor's (`vcpuN`, so `vm attach --thread-names cloud-hypervisor`
/// finds them); the region is written the way the Linux guest module writes it
/// (header with the magic last, seqlocked lines through the ABI header's helpers).
///
/// A busy vCPU behaves like cyclictest in the guest: every interval its real-time
/// task wakes, publishes itself running (flags, FIFO task, the next deadline), works
/// for a while and goes idle again; the thread notes when its own host scheduling
/// parameters change after each wake-up published (the boost arriving), which is
/// the guest-change-to-boost-applied latency. Other vCPUs stay idle.
///
/// Driven by line commands on standard input (see `StandInGuest.run`).
public final class StandInGuest: @unchecked Sendable {
    // @unchecked Sendable: the region is written through the seqlock by one vCPU
    // thread per line; the command loop writes the header; the rest is atomic or
    // under `lock`.
    public struct Options: Sendable {
        public var vcpus = 2
        public var region: String?
        public var createRegion = true
        public var regionMode: mode_t = 0o600
        public var writeHeader = true
        public var protocolName: String?
        /// vCPUs running the cyclictest-like workload.
        public var busyVCPUs: [Int] = []
        public var intervalUs: UInt64 = 1000
        public var workUs: UInt64 = 50
        /// How often an idle vCPU's thread wakes (a guest's idle vCPU halts and wakes
        /// now and then for its timers).
        public var idleWakeupUs: UInt64 = 1000
        /// How long an idle vCPU's thread runs at each wake-up (its line untouched: a
        /// guest's timer interrupt handled with no change of its state).
        public var idleWorkUs: UInt64 = 0
        /// Name the vCPU threads as QEMU does (`CPU N/KVM`) instead of `vcpuN`.
        public var qemuThreadNames = false
        public init() {}
    }

    private let options: Options
    private let writer: SharedAreaWriter?
    private let mapping: (UnsafeMutableRawPointer, Int)?
    private var threads: [PVSchedCore.Thread?] = []
    private let tids: [ManagedAtomic<Int32>]
    private let stopFlags: [ManagedAtomic<Bool>]
    private let busyFlags: [ManagedAtomic<Bool>]
    private let stopAll = ManagedAtomic(false)
    private let lock = Mutex<[UInt64]>([])
    private final class LineLock: Sendable { let mutex = Mutex(()) }
    private let lineLocks: [LineLock]

    public init(_ options: Options) throws {
        self.options = options
        tids = (0..<options.vcpus).map { _ in ManagedAtomic(0) }
        stopFlags = (0..<options.vcpus).map { _ in ManagedAtomic(false) }
        busyFlags = (0..<options.vcpus).map { ManagedAtomic(options.busyVCPUs.contains($0)) }
        lineLocks = (0..<options.vcpus).map { _ in LineLock() }
        if let path = options.region {
            let size = max(1 << 20, SharedAreaWriter.size(vcpus: options.vcpus))
            let flags = O_RDWR | O_CLOEXEC | (options.createRegion ? O_CREAT : 0)
            let fd = open(path, flags, options.regionMode)
            guard fd >= 0 else { throw StandInError("cannot open \(path): \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            if options.createRegion {
                _ = fchmod(fd, options.regionMode)
                guard ftruncate(fd, off_t(size)) == 0 else { throw StandInError("cannot size \(path)") }
            }
            guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
                throw StandInError("cannot map \(path)")
            }
            mapping = (p, size)
            writer = SharedAreaWriter(base: p, size: SharedAreaWriter.size(vcpus: options.vcpus))
            if options.writeHeader { writeHeader() }
        } else {
            mapping = nil
            writer = nil
        }
        for i in 0..<options.vcpus {
            threads.append(try PVSchedCore.Thread(name: options.qemuThreadNames ? "CPU \(i)/KVM" : "vcpu\(i)") { [self] in vcpuLoop(i) })
        }
        for t in tids { while t.load(ordering: .acquiring) == 0 { usleep(100) } }
    }

    /// The vCPU threads' ids (0 for one that exited).
    public var threadIDs: [Int32] { tids.map { $0.load(ordering: .acquiring) } }

    /// Writes (again) the region header: a new generation, the magic last.
    public func writeHeader() {
        guard let writer else { return }
        let generation = writer.header.pointee.guest_generation &+ 1
        if let name = options.protocolName {
            writer.writeHeader(vcpus: options.vcpus, protocolName: name, generation: generation)
        } else {
            writer.writeHeader(vcpus: options.vcpus, generation: generation)
        }
        for v in 0..<options.vcpus { setLine(v, flags: [.idle], fifo: nil, deadlineNs: 0) }
    }

    /// Writes vCPU `v`'s line: flags, the task (FIFO at a priority, or normal) and deadline.
    public func setLine(_ v: Int, flags: GuestVCPUState.Flags, fifo: UInt8?, deadlineNs: UInt64) {
        guard let writer, v >= 0, v < options.vcpus else { return }
        lineLocks[v].mutex.withLock { _ in
            writer.update(vcpu: v) { g in
                g.flags = flags.rawValue
                g.task_policy = fifo == nil ? PVSCHED_TASK_NORMAL : PVSCHED_TASK_FIFO
                g.task_priority = Int32(fifo ?? 0)
                g.task_nice = 0
                g.next_deadline_ns = deadlineNs
                g.guest_clock_ns = MonotonicClock.nowNs()
            }
        }
    }

    /// Ends vCPU `v`'s thread (a VMM whose vCPU thread exits).
    public func exitThread(_ v: Int) {
        guard v >= 0, v < options.vcpus else { return }
        stopFlags[v].store(true, ordering: .relaxed)
        threads[v]?.join()
        threads[v] = nil
        tids[v].store(0, ordering: .releasing)
    }

    /// Has vCPU `v`'s thread fork a child that sleeps for `seconds`; the child's pid.
    public func fork(from v: Int, seconds: UInt32 = 60) -> Int32 {
        guard v >= 0, v < options.vcpus else { return -1 }
        forkRequest.store(Int32(v) + 1, ordering: .releasing)
        while forkRequest.load(ordering: .acquiring) != 0 { usleep(100) }
        return forkResult.load(ordering: .acquiring)
    }
    private let forkRequest = ManagedAtomic<Int32>(0)
    private let forkResult = ManagedAtomic<Int32>(0)

    /// The busy vCPUs' wake-up-to-boost latencies so far (ns), and wake-ups that saw
    /// no boost before their work was done.
    public var boostLatencies: [UInt64] { lock.withLock { $0 } }
    private let unboosted = ManagedAtomic<UInt64>(0)
    public var wakeupsWithoutBoost: UInt64 { unboosted.load(ordering: .relaxed) }

    /// The latencies and wake-ups without a boost since the last call, which forgets them.
    public func takeSamples() -> (latencies: [UInt64], missed: UInt64) {
        let l = lock.withLock { l in
            let all = l
            l.removeAll()
            return all
        }
        return (l, unboosted.exchange(0, ordering: .relaxed))
    }

    public func stop() {
        stopAll.store(true, ordering: .relaxed)
        for i in threads.indices { threads[i]?.join(); threads[i] = nil }
    }

    deinit {
        stop()
        if let (p, size) = mapping { munmap(p, size) }
    }

    /// Starts or stops vCPU `v`'s cyclictest-like workload.
    public func setBusy(_ v: Int, _ busy: Bool) {
        guard v >= 0, v < options.vcpus else { return }
        busyFlags[v].store(busy, ordering: .relaxed)
    }

    private func vcpuLoop(_ v: Int) {
        tids[v].store(pvs_gettid(), ordering: .releasing)
        let intervalNs = options.intervalUs * 1000
        var next = MonotonicClock.nowNs() + intervalNs
        var baseline = pvs_sched_attr()
        _ = pvs_sched_getattr(0, &baseline)
        while !stopAll.load(ordering: .relaxed) && !stopFlags[v].load(ordering: .relaxed) {
            let req = forkRequest.load(ordering: .acquiring)
            if req == Int32(v) + 1 {
                let child = Glibc.fork()
                if child == 0 { sleep(60); _exit(0) }
                forkResult.store(child, ordering: .releasing)
                forkRequest.store(0, ordering: .releasing)
            }
            guard busyFlags[v].load(ordering: .relaxed) else {
                usleep(UInt32(clamping: options.idleWakeupUs))
                if options.idleWorkUs > 0 {
                    let end = MonotonicClock.nowNs() + options.idleWorkUs * 1000
                    while MonotonicClock.nowNs() < end {}
                }
                next = MonotonicClock.nowNs() + intervalNs
                continue
            }
            // Sleep to the deadline, then publish: the RT task runs, the next deadline ahead.
            var ts = timespec(tv_sec: Int(next / 1_000_000_000), tv_nsec: Int(next % 1_000_000_000))
            while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nil) == EINTR {}
            let woke = MonotonicClock.nowNs()
            setLine(v, flags: [.rtTaskRunning], fifo: 80, deadlineNs: next + intervalNs)
            // Work, watching for the boost (any change of this thread's parameters).
            let end = woke + options.workUs * 1000
            var boostedAt: UInt64?
            repeat {
                var now = pvs_sched_attr()
                if boostedAt == nil, pvs_sched_getattr(0, &now) == 0,
                   now.sched_policy != baseline.sched_policy || now.sched_nice != baseline.sched_nice
                    || now.sched_priority != baseline.sched_priority {
                    boostedAt = MonotonicClock.nowNs()
                }
            } while MonotonicClock.nowNs() < end || (boostedAt == nil && MonotonicClock.nowNs() < woke + intervalNs / 2)
            if let boostedAt { lock.withLock { $0.append(boostedAt - woke) } } else { unboosted.wrappingIncrement(ordering: .relaxed) }
            next += intervalNs
            let now = MonotonicClock.nowNs()
            if next < now { next = now + intervalNs }
            setLine(v, flags: [.idle], fifo: nil, deadlineNs: next)
        }
    }

    // MARK: the command loop

    /// Reads commands from standard input until `quit` or its end, answering each
    /// with one line on standard output:
    /// - `tids` → `tids T0 T1 ...`
    /// - `header` → writes the header again (a new generation)
    /// - `line V FLAGS_HEX [fifo P]` → sets vCPU V's flags (and task)
    /// - `exit V` → vCPU V's thread exits
    /// - `fork V` → vCPU V's thread forks a sleeping child → `child PID`
    /// - `busy V on|off` → starts or stops vCPU V's cyclictest-like workload
    /// - `latencies` → `latencies N P50 P99 MAX MISSED` (ns)
    /// - `samples` → `samples MISSED L1 L2 ...` (ns), every latency since the last `samples`, then forgets them
    /// - `quit`
    public func run() {
        answer("ready pid \(getpid()) tids \(threadIDs.map(String.init).joined(separator: " "))")
        var pending: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            guard let nl = pending.firstIndex(of: 10) else {
                let n = chunk.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return }
                pending += chunk[..<n]
                continue
            }
            let words = String(decoding: pending[..<nl], as: UTF8.self).split(separator: " ").map(String.init)
            pending.removeSubrange(...nl)
            guard let cmd = words.first else { continue }
            switch cmd {
            case "tids": answer("tids " + threadIDs.map(String.init).joined(separator: " "))
            case "header": writeHeader(); answer("ok")
            case "line" where words.count >= 3:
                let v = Int(words[1]) ?? -1
                let flags = GuestVCPUState.Flags(rawValue: UInt32(words[2], radix: 16) ?? 0)
                let fifo = words.count >= 5 && words[3] == "fifo" ? UInt8(words[4]) : nil
                setLine(v, flags: flags, fifo: fifo, deadlineNs: 0)
                answer("ok")
            case "exit" where words.count == 2: exitThread(Int(words[1]) ?? -1); answer("ok")
            case "fork" where words.count == 2: answer("child \(fork(from: Int(words[1]) ?? -1))")
            case "busy" where words.count == 3 && ["on", "off"].contains(words[2]):
                setBusy(Int(words[1]) ?? -1, words[2] == "on")
                answer("ok")
            case "latencies":
                let l = boostLatencies.sorted()
                func q(_ f: Double) -> UInt64 { l.isEmpty ? 0 : l[min(l.count - 1, Int(Double(l.count) * f))] }
                answer("latencies \(l.count) \(q(0.5)) \(q(0.99)) \(l.last ?? 0) \(wakeupsWithoutBoost)")
            case "samples":
                let (l, missed) = takeSamples()
                answer("samples \(missed) " + l.map(String.init).joined(separator: " "))
            case "quit": answer("bye"); return
            default: answer("error unknown command '\(cmd)'")
            }
        }
    }

    private func answer(_ s: String) {
        let text = s + "\n"
        _ = text.utf8CString.withUnsafeBufferPointer { write(1, $0.baseAddress, $0.count - 1) }
    }
}

/// Why the stand-in could not start.
public struct StandInError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}
