import CHostService
import Logging
import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedGuestImage
import PVSchedHost
import PVSchedKernelEvents
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

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

    /// Records the kernel event source dropped, if it was opened (never opens it).
    var kernelEventsDropped: UInt64? {
        if case .success(let k)? = source.withLock({ $0 }) { return k.dropped }
        return nil
    }

    /// Carries out `vm.attach`.
    ///
    /// The VMM and its vCPU threads come from one of: `qmp` (QEMU: the socket's peer
    /// is the process, `query-cpus-fast` gives the threads, which are read again every
    /// second), `pid` + `threadNames` (crosvm, cloud-hypervisor, Firecracker, QEMU
    /// with debug-threads), or `pid` + `threads`. The guest's area comes from `shm`
    /// (an ivshmem region the guest's pvsched module writes; a watcher thread
    /// registers it and delivers `guestUpdate`/`deadline` events) or from `memory`
    /// with an offset and size (a VM of `pvsched run --export`).
    /// What an attach reports besides the VM.
    struct AttachInfo {
        /// The area's negotiation as the attach left it (the watcher's phase for an ivshmem region).
        var negotiation: String
        var events: String
        var pid: Int32
        var vcpuThreads: [Int32]
        var mainLoopBoosted: Bool
    }

    func attach(_ p: VMAttach.Params) throws(ControlError) -> (AttachedVMSession, AttachInfo) {
        let name = p.name, qmpPath = p.qmp, pidParam = p.pid, threadList = p.threads, namingParam = p.threadNames
        let memory = p.memory, areaOffset = p.areaOffset, areaSize = p.areaSize, shm = p.shm, driver = p.driver
        let eventsParam = p.events, pollUs = p.pollUs, leadUs = p.deadlineLeadUs
        let boostMainLoop = p.boostMainLoop ?? (qmpPath != nil)
        var boost = BoostSettings(allowRealTimeThreads: p.allowRealTimeThreads)
        if let text = p.boost {
            guard let c = BoostSettings.parseClass(text) else {
                throw ControlError(.invalidParams, field: "params.boost", "must be \(BoostSettings.classSyntax), got '\(text)'")
            }
            boost.boosted = c
        }
        if let v = p.protectHostPriority { boost.protectedHostPriority = v == 0 ? nil : UInt8(v) }
        let governor = p.governor.applied(to: .default)
        if p.libvirtDomain != nil { throw ControlError(.invalidParams, field: "params.libvirtDomain", "this daemon has no libvirt connection") }

        // Which sources of the VMM and its threads: exactly one.
        let sources = [qmpPath != nil, threadList != nil, namingParam != nil].filter { $0 }.count
        guard sources == 1 else {
            throw ControlError(.invalidParams, field: "params.qmp", "give exactly one of qmp, threads (with pid) or threadNames (with pid)")
        }
        guard memory == nil || shm == nil else { throw ControlError(.invalidParams, field: "params.shm", "give memory or shm, not both") }
        let naming: VCPUThreadNaming? = try namingParam.map { (n: String) throws(ControlError) -> VCPUThreadNaming in
            guard let v = VCPUThreadNaming(rawValue: n) else {
                throw ControlError(.invalidParams, field: "params.threadNames",
                                   "must be one of \(VCPUThreadNaming.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return v
        }
        let events: String
        switch eventsParam ?? (shm != nil ? "both" : "kernel") {
        case let e where ["kernel", "watch", "both"].contains(e): events = e
        default: throw ControlError(.invalidParams, field: "params.events", "must be kernel, watch or both")
        }
        guard (events == "kernel") == (shm == nil) else {
            throw ControlError(.invalidParams, field: "params.events", shm == nil
                               ? "watching the guest needs its ivshmem region (shm)"
                               : "with shm a watcher registers the region and reports its changes: events must be watch or both")
        }

        var qmp: QMPClient?
        let pid: Int32
        let found: VCPUThreads
        if let qmpPath {
            do throws(QMPError) {
                let client = try QMPClient(path: qmpPath)
                if let pidParam, pidParam != client.peerPID {
                    throw QMPError("the socket belongs to process \(client.peerPID), not \(pidParam)")
                }
                pid = client.peerPID
                found = try VCPUThreads.fromQMP(client, pid: pid)
                qmp = client
            } catch {
                throw ControlError(.failed, field: "params.qmp", "\(error)")
            }
        } else {
            guard let pidParam else { throw ControlError(.invalidParams, field: "params.pid", "missing (needed with threads or threadNames)") }
            pid = pidParam
            guard access("/proc/\(pid)", F_OK) == 0 else { throw ControlError(.notFound, field: "params.pid", "no process \(pid)") }
            if let threadList {
                for t in threadList where !VCPUThreads.isThread(t, of: pid) {
                    throw ControlError(.notFound, field: "params.threads", "thread \(t) is not a thread of process \(pid)")
                }
                guard Set(threadList).count == threadList.count else { throw ControlError(.invalidParams, field: "params.threads", "a thread is listed twice") }
                found = VCPUThreads(vcpus: threadList)
            } else if let naming {
                guard let f = VCPUThreads.byName(pid: pid, naming: naming) else {
                    throw ControlError(.notFound, field: "params.threadNames", "process \(pid) has no threads named like \(naming.rawValue)'s vCPU threads (numbered from 0)")
                }
                found = f
            } else {
                throw ControlError(.invalidParams, field: "params.threadNames", "missing")
            }
        }

        var region: SharedMemoryFile?
        do throws(SharedMemoryError) {
            if let memory {
                guard let areaOffset, let areaSize else {
                    throw SharedMemoryError(field: "areaOffset", "areaOffset and areaSize are needed with memory")
                }
                region = try SharedMemoryFile(path: memory, offset: Int(areaOffset), length: Int(areaSize), vmm: pid)
            } else if let shm {
                region = try SharedMemoryFile(path: shm, vmm: pid)
            }
        } catch {
            throw ControlError(.invalidParams, field: "params.\(shm != nil && error.field == "memory" ? "shm" : error.field)", error.message)
        }
        if let driver, host.registry.driver(named: driver) == nil {
            throw ControlError(.notFound, field: "params.driver", "no driver named '\(driver)'")
        }
        let vmName = name ?? "pid\(pid)"
        let detachHook = DetachHook()
        let session: AttachedVMSession
        let what = qmp.map { "QEMU \($0.version), process \(pid)" } ?? "process \(pid)"
        do {
            session = try host.attach(name: vmName, vcpus: found.vcpus.count, summary: what, driver: driver,
                                      governor: governor, boost: boost,
                                      onDetach: { detachHook.run() })
        } catch let e as HostError {
            throw ControlError(e.field == "name" ? .conflict : .invalidParams, field: "params.\(e.field)", e.message)
        } catch {
            throw ControlError(.conflict, field: "params.driver", "\(error)")
        }
        let threads = Mutex(found)
        session.binding.map { found.install(in: $0, boostMainLoop: boostMainLoop) }
        if let leadUs, let binding = session.binding { binding.deadlines.leadNs = UInt64(leadUs) * 1000 }

        var negotiation = "no shared area given"
        var watcher: GuestAreaWatcher?
        if let region, memory != nil {
            switch session.link.registrar.register(area: region.bytes, owner: region) {
            case .success(let a): negotiation = "accepted: \(a)"
            case .failure(let r): negotiation = "refused: \(r.message)"
            }
        } else if let region, let binding = session.binding {
            var settings = GuestAreaWatcher.Settings()
            if let pollUs { settings.busyPollNs = UInt64(pollUs) * 1000; settings.idlePollNs = max(settings.idlePollNs, settings.busyPollNs) }
            let w: GuestAreaWatcher
            do {
                w = try GuestAreaWatcher(region: region, link: session.link, binding: binding, settings: settings,
                                     priority: host.canUseRealTime ? 90 : nil, threads: host.threads, logger: logger)
            } catch {
                session.stop()
                throw ControlError(.failed, "\(error)")
            }
            // The guest may already have written its header: give the watcher a moment to say.
            for _ in 0..<50 { if w.phase != .waiting { break }; usleep(2000) }
            negotiation = "\(w.phase)"
            watcher = w
        }
        let slot = UInt32(truncatingIfNeeded: session.handle.id)
        var eventsText = "watcher (guest updates)"
        var kernel: KernelEventSource?
        if events != "watch" {
            switch kernelEvents {
            case .success(let k):
                k.watch(slot: slot, process: pid, threads: found.vcpus.map { Optional(ThreadID($0)) }, sink: session.events)
                kernel = k
                eventsText = events == "both" ? "\(k.summary); \(eventsText)" : k.summary
            case .failure(let e):
                eventsText = events == "both" ? "\(eventsText); kernel events unavailable: \(e)" : "\(e)"
            }
        }
        // Every second, read the vCPU threads again (QMP): a vCPU thread that changed is re-pointed.
        var refresh: (@Sendable () -> Void)?
        if let client = qmp {
            refresh = { [weak session, logger, kernel] in
                guard let session, let now = try? VCPUThreads.fromQMP(client, pid: pid) else { return }
                let old = threads.withLock { t in
                    let old = t
                    if now.vcpus.count == old.vcpus.count { t = now }
                    return old
                }
                guard now.vcpus != old.vcpus else { return }
                guard now.vcpus.count == old.vcpus.count else {
                    logger.warning("the VM's vCPU count changed; pvsched keeps serving the first \(old.vcpus.count)",
                                   metadata: ["vm": "\(session.handle)", "now": "\(now.vcpus.count)"])
                    return
                }
                for (i, (a, b)) in zip(old.vcpus, now.vcpus).enumerated() where a != b {
                    session.events.setThread(ThreadID(b), vcpu: i)
                    logger.info("vCPU thread changed", metadata: ["vm": "\(session.handle)", "vcpu": "\(i)", "thread": "\(b)"])
                }
                // The kernel's event filter follows the threads too.
                if let kernel {
                    kernel.unwatch(slot: slot, process: pid, threads: old.vcpus.map { Optional(ThreadID($0)) })
                    kernel.watch(slot: slot, process: pid, threads: now.vcpus.map { Optional(ThreadID($0)) }, sink: session.events)
                }
            }
        }
        // Every second: a region truncated under us disables the VM (the watcher
        // notices for ivshmem regions; this covers exported memory), then the refresh.
        let memoryRegion = memory != nil ? region : nil
        let tick: @Sendable () -> Void = { [weak session, refresh] in
            session?.binding?.dropExitedThreads()
            if let memoryRegion, memoryRegion.faulted, let b = session?.binding, b.disabledReason == nil {
                b.disable(.regionLost("the memory file \(memoryRegion.path) was truncated under the host"))
            }
            refresh?()
        }
        let processWatch: ProcessWatcher
        do {
            processWatch = try ProcessWatcher(pid: pid, tick: tick) { [weak session] in session?.ended("process \(pid) exited") }
        } catch {
            watcher?.stop()
            session.stop()
            throw ControlError(.failed, "\(error)")
        }
        let keepMapped = region  // the mapping lives until the VM is detached
        detachHook.set { [watcher, kernel] in
            processWatch.stop()
            watcher?.stop()
            if let kernel { kernel.unwatch(slot: slot, process: pid, threads: threads.withLock { $0.vcpus }.map { Optional(ThreadID($0)) }) }
            withExtendedLifetime(keepMapped) {}
        }
        if let watcher { watchers.withLock { $0[session.handle.id] = watcher } }
        logger.info("VM attached", metadata: ["vm": "\(vmName)", "pid": "\(pid)", "negotiation": "\(negotiation)"])
        return (session, AttachInfo(negotiation: negotiation, events: eventsText, pid: pid, vcpuThreads: found.vcpus, mainLoopBoosted: boostMainLoop && found.mainLoop != nil))
    }

    /// The guest-area watchers of attached VMs, by VM id (for `vm.list` and stats).
    private let watchers = Mutex<[UInt64: GuestAreaWatcher]>([:])

    /// The watcher of VM `id`, if it has one.
    func watcher(vm id: UInt64) -> GuestAreaWatcher? { watchers.withLock { $0[id] } }

    /// Forgets the watcher of a detached VM.
    func forget(vm id: UInt64) { _ = watchers.withLock { $0.removeValue(forKey: id) } }
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

/// Watches a process through a pidfd on a dedicated thread and calls `onExit` once
/// when it exits; `tick`, if given, runs about once a second on the same thread.
final class ProcessWatcher: Sendable {
    private let running = Atomic(true)
    private let thread = Mutex<PVSchedCore.Thread?>(nil)

    init(pid: Int32, tick: (@Sendable () -> Void)? = nil, onExit: @escaping @Sendable () -> Void) throws(ThreadError) {
        let fd = pvs_pidfd_open(pid)
        let t: PVSchedCore.Thread
        do throws(ThreadError) {
        t = try PVSchedCore.Thread(name: "pvs-procwatch") { [self] in
            defer { if fd >= 0 { pvs_close(fd) } }
            var polls = 0
            while running.load(ordering: .relaxed) {
                polls += 1
                if let tick, polls % 5 == 0 { tick() }
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
        } catch {
            if fd >= 0 { pvs_close(fd) }
            throw error
        }
        thread.withLock { $0 = t }
    }

    /// Stops watching (safe from the onExit callback itself).
    func stop() {
        running.store(false, ordering: .relaxed)
        thread.takeAndJoin()
    }
}
