import CHostService
import Logging
import PVSchedControl
import PVSchedCore
import PVSchedGuestImage
import PVSchedHost
import PVSchedKernelEvents
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A read-write shared mapping of part of a file (an attached VM's guest memory
/// or ivshmem region): the owner that keeps a `SharedArea` valid.
final class MappedRegion: @unchecked Sendable {
    // @unchecked Sendable: the mapping is fixed for the object's life; the guest
    // writes it concurrently by design and readers go through the seqlock.
    let base: UnsafeMutableRawPointer
    let length: Int
    /// Where the requested bytes start inside the mapping (offset rounded to pages).
    let skew: Int

    init(path: String, offset: Int, length: Int) throws(ControlError) {
        let fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { throw ControlError(.invalidParams, field: "params.memory", "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else {
            throw ControlError(.invalidParams, field: "params.memory", "\(path) is not a regular file")
        }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= Int(st.st_size) else {
            throw ControlError(.invalidParams, field: "params.areaOffset", "the area (\(offset) + \(length) bytes) does not lie inside \(path) (\(st.st_size) bytes)")
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let aligned = offset / page * page
        skew = offset - aligned
        self.length = skew + length
        guard let p = mmap(nil, self.length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(aligned)), p != MAP_FAILED else {
            throw ControlError(.failed, field: "params.memory", "mmap \(path): \(String(cString: strerror(errno)))")
        }
        base = p
    }

    var area: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: base + skew, count: length - skew) }

    deinit { munmap(base, length) }
}

/// Attaches the daemon to VMs that other processes run: maps their shared area,
/// negotiates the protocol, feeds the binding with KVM events from the host
/// kernel (one `KernelEventSource` for all VMs, opened on first use), and
/// detaches — undoing every boost — when the VMM process exits (pidfd) or on
/// request.
final class VMAttacher: Sendable {
    private let host: PVSchedHost
    private let logger: Logger
    private let source = Mutex<Result<KernelEventSource, KernelEventsUnavailable>?>(nil)

    /// SCHED_FIFO priority of the kernel-event consumer thread (nil: SCHED_OTHER).
    let eventsPriority: UInt8?

    init(host: PVSchedHost, eventsPriority: UInt8?, logger: Logger) {
        self.host = host; self.eventsPriority = eventsPriority; self.logger = logger
    }

    /// The kernel event source, opened once (its failure is remembered and reported).
    var kernelEvents: Result<KernelEventSource, KernelEventsUnavailable> {
        source.withLock { s in
            if let s { return s }
            let r: Result<KernelEventSource, KernelEventsUnavailable>
            do throws(KernelEventsUnavailable) {
                r = .success(try KernelEventSource(object: GuestImage.kvmEventsBPF, consumerPriority: eventsPriority, threads: host.threads))
            } catch {
                r = .failure(error)
            }
            switch r {
            case .success(let k): logger.info("kernel KVM events", metadata: ["attach points": "\(k.summary)"])
            case .failure(let e): logger.warning("\(e)")
            }
            s = r
            return r
        }
    }

    func shutdown() {
        if case .success(let k)? = source.withLock({ $0 }) { k.close() }
    }

    /// Carries out `vm.attach`.
    func attach(_ p: inout Params) throws(ControlError) -> (AttachedVMSession, JSON) {
        let name = try p.optionalString("name", maxBytes: 64)
        let pid = Int32(try p.int("pid", in: 1...Int64(Int32.max)))
        let threads = try p.intArray("threads", count: 1...256, in: 1...Int64(Int32.max)).map { Int32($0) }
        let memory = try p.optionalString("memory", maxBytes: 255)
        let areaOffset = try p.optionalInt("areaOffset", in: 0...(1 << 40))
        let areaSize = try p.optionalInt("areaSize", in: 64...(1 << 24))
        let driver = try p.optionalString("driver")
        try p.finish()
        guard access("/proc/\(pid)", F_OK) == 0 else { throw ControlError(.notFound, field: "params.pid", "no process \(pid)") }
        for t in threads where access("/proc/\(pid)/task/\(t)", F_OK) != 0 {
            throw ControlError(.notFound, field: "params.threads", "thread \(t) is not a thread of process \(pid)")
        }
        guard Set(threads).count == threads.count else { throw ControlError(.invalidParams, field: "params.threads", "a thread is listed twice") }
        var region: MappedRegion?
        if let memory {
            guard memory.hasPrefix("/dev/shm/"), !memory.contains("/../"), !memory.hasSuffix("/..") else {
                throw ControlError(.invalidParams, field: "params.memory", "must be a file under /dev/shm/")
            }
            guard let areaOffset, let areaSize else {
                throw ControlError(.invalidParams, field: "params.areaOffset", "areaOffset and areaSize are needed with memory")
            }
            region = try MappedRegion(path: memory, offset: Int(areaOffset), length: Int(areaSize))
        }
        if let driver, host.registry.driver(named: driver) == nil {
            throw ControlError(.notFound, field: "params.driver", "no driver named '\(driver)'")
        }
        let vmName = name ?? "pid\(pid)"
        let detachHook = DetachHook()
        let session: AttachedVMSession
        do {
            session = try host.attach(name: vmName, vcpus: threads.count, summary: "process \(pid)", driver: driver,
                                      onDetach: { detachHook.run() })
        } catch let e as HostError {
            throw ControlError(e.field == "name" ? .conflict : .invalidParams, field: "params.\(e.field)", e.message)
        } catch {
            throw ControlError(.conflict, field: "params.driver", "\(error)")
        }
        for (i, t) in threads.enumerated() { session.events.setThread(ThreadID(t), vcpu: i) }
        var negotiation = "no shared area given"
        if let region {
            switch session.link.registrar.register(area: region.area, owner: region) {
            case .success(let a): negotiation = "accepted: \(a)"
            case .failure(let r): negotiation = "refused: \(r.message)"
            }
        }
        let slot = UInt32(truncatingIfNeeded: session.handle.id)
        let tids = threads.map { Optional(ThreadID($0)) }
        var events = "kernel"
        switch kernelEvents {
        case .success(let k):
            k.watch(slot: slot, process: pid, threads: tids, sink: session.events)
            events = k.summary
        case .failure(let e):
            events = "\(e)"
        }
        let watcher = ProcessWatcher(pid: pid) { [weak session] in session?.ended("process \(pid) exited") }
        let keepMapped = region  // the mapping lives until the VM is detached
        detachHook.set { [self] in
            watcher.stop()
            if case .success(let k) = kernelEvents { k.unwatch(slot: slot, process: pid, threads: tids) }
            withExtendedLifetime(keepMapped) {}
        }
        logger.info("VM attached", metadata: ["vm": "\(vmName)", "pid": "\(pid)", "negotiation": "\(negotiation)"])
        return (session, ["negotiation": .string(negotiation), "events": .string(events)])
    }
}

/// A detach action set after the session exists (the session is made first).
final class DetachHook: Sendable {
    private let action = Mutex<(@Sendable () -> Void)?>(nil)
    func set(_ a: @escaping @Sendable () -> Void) { action.withLock { $0 = a } }
    func run() {
        let a = action.withLock { a in
            let x = a
            a = nil
            return x
        }
        a?()
    }
}

/// Watches a process through a pidfd on a dedicated thread and calls `onExit` once when it exits.
final class ProcessWatcher: Sendable {
    private let running = Atomic(true)
    private let thread = Mutex<PVSchedCore.Thread?>(nil)

    init(pid: Int32, onExit: @escaping @Sendable () -> Void) {
        let fd = pvs_pidfd_open(pid)
        let t = PVSchedCore.Thread { [self] in
            defer { if fd >= 0 { pvs_close(fd) } }
            while running.load(ordering: .relaxed) {
                let exited: Bool
                if fd >= 0 { exited = pvs_poll2(fd, -1, 200) & 1 != 0 } else {
                    exited = kill(pid, 0) != 0 && errno == ESRCH
                    if !exited { usleep(200_000) }
                }
                if exited {
                    if running.exchange(false, ordering: .relaxed) { onExit() }
                    return
                }
            }
        }
        thread.withLock { $0 = t }
    }

    /// Stops watching (safe from the onExit callback itself).
    func stop() {
        running.store(false, ordering: .relaxed)
        thread.takeAndJoin()
    }
}
