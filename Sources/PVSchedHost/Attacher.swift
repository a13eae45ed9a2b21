import Logging
import PVSchedAttach
import PVSchedCore
import PVSchedKernelEvents
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// What an attach found and set up, for its caller (`vm.attach`'s answer).
public struct AttachReport: Sendable, Equatable {
    /// The area's negotiation as the attach left it (the watcher's phase for an ivshmem region).
    public var negotiation = "no shared area given"
    /// Which events the VM gets, and which are missing and why.
    public var events = "from its caller"
    /// The VMM process (nil: this process feeds the events).
    public var process: Int32?
    public var vcpuThreads: [Int32] = []
    /// Whether the VMM's interrupt-delivering thread follows the vCPUs' boosts.
    public var mainLoopBoosted = false
}

/// Turns a spec whose VM another VMM runs (or this process feeds) into an attached
/// session, and owns what serves it: the mapped area, the watch in the host's
/// poller, the kernel-event filter, the process watch and the vCPU-thread refresh.
/// Everything it starts, the session's detach undoes, in reverse. The daemon, the
/// lab and the tests attach through here; a new VMM is a new `VMMEndpoint`.
struct Attacher {
    let host: PVSchedHost
    let logger: Logger

    func attach(_ spec: VMSpec) throws(HostError) -> AttachedVMSession {
        try spec.validate()
        let endpoint: (any VMMEndpoint)?
        let summary: String
        var report = AttachReport()
        var found: VCPUThreads?
        switch spec.source {
        case .endpoint(let e):
            endpoint = e
            summary = e.summary
            do throws(EndpointError) { found = try e.vcpuThreads() } catch {
                throw HostError(error.kind == .unreachable ? .failed : error.kind == .invalid ? .invalid : .notFound,
                                field: error.field, error.message)
            }
            report.process = e.process
        case .inProcess(_, let s):
            endpoint = nil
            summary = s
        case .builtIn:
            throw HostError(field: "source", "the built-in VMM's VMs are started, not attached")
        }
        let vcpus: Int
        if case .inProcess(let n, _) = spec.source { vcpus = n } else { vcpus = found?.vcpus.count ?? 0 }
        let region = try mapArea(spec.area, vmm: endpoint?.process)
        if let driver = spec.driver, host.registry.driver(named: driver) == nil {
            throw HostError(.notFound, field: "driver", "no driver named '\(driver)'")
        }
        let name = spec.name ?? endpoint.map { "pid\($0.process)" } ?? "vm"
        let session = try host.makeAttachedSession(name: name, vcpus: vcpus, summary: summary, spec: spec)
        do throws(HostError) {
            try serve(session, spec: spec, endpoint: endpoint, threads: found, region: region, report: &report)
        } catch {
            session.stop()
            throw error
        }
        session.report = report
        logger.info("VM attached", metadata: ["vm": "\(session.handle)", "what": "\(summary)", "negotiation": "\(report.negotiation)"])
        return session
    }

    private func mapArea(_ area: VMSpec.Area, vmm: Int32?) throws(HostError) -> (any WatchedRegion)? {
        do throws(SharedMemoryError) {
            switch area {
            case .none: return nil
            case .memoryFile(let path, let offset, let size):
                return try SharedMemoryFile(path: path, offset: offset, length: size, vmm: vmm)
            case .ivshmem(let path):
                return try SharedMemoryFile(path: path, vmm: vmm)
            case .region(let r): return r
            }
        } catch {
            let field: String
            if case .ivshmem = area, error.field == "memory" { field = "shm" } else { field = error.field }
            throw HostError(field: field, error.message)
        }
    }

    private func serve(_ session: AttachedVMSession, spec: VMSpec, endpoint: (any VMMEndpoint)?, threads found: VCPUThreads?,
                       region: (any WatchedRegion)?, report: inout AttachReport) throws(HostError) {
        let binding = session.vmBinding
        let id = session.handle.id
        let current = Current(found ?? VCPUThreads(vcpus: []))
        if let found {
            for (i, t) in found.vcpus.enumerated() { session.events.setThread(ThreadID(t), vcpu: i) }
            let boostMainLoop = spec.boostMainLoop ?? (found.mainLoop != nil)
            if boostMainLoop, let mainLoop = found.mainLoop { binding.setCompanionThreads([ThreadID(mainLoop)]) }
            report.vcpuThreads = found.vcpus
            report.mainLoopBoosted = boostMainLoop && found.mainLoop != nil
        }
        if let lead = spec.deadlineLeadNs { binding.deadlines.leadNs = lead }
        binding.deadlines.holdNs = spec.holdThroughHaltsNs

        // The guest's area: watched (ivshmem), or registered once (exported memory).
        if let region {
            if spec.areaIsWatched {
                let watch = RegionWatch(region: region, link: session.link, status: binding, settings: spec.watch, logger: logger)
                let poller = try host.regionPoller()
                poller.add(watch, id: id)
                binding.setLineBell { [weak poller] running in
                    if running { poller?.lookSoon(id: id) } else { poller?.rest(id: id) }
                }
                session.watch = watch
                session.onDetach {
                    binding.setLineBell(nil)
                    _ = poller.remove(id: id)?.withdraw()
                }
                // The guest may already have written its header: give the poller a moment to say.
                for _ in 0..<50 where watch.phase == .waiting { usleep(2000) }
                report.negotiation = "\(watch.phase)"
            } else {
                switch session.link.registrar.register(area: region.bytes, owner: region) {
                case .success(let a): report.negotiation = "accepted: \(a)"
                case .failure(let r): report.negotiation = "refused: \(r.message)"
                }
            }
        }

        // Events: the host kernel's, the watcher's, or the caller's.
        let sources = spec.eventSources
        var said: [String] = []
        var kernelSource: KernelEventSource?
        if sources.contains(.kernel), let endpoint, let found {
            switch host.kernelEvents {
            case .success(let k):
                k.watch(slot: UInt32(truncatingIfNeeded: id), process: endpoint.process, threads: found.vcpus.map { Optional(ThreadID($0)) }, sink: session.events)
                kernelSource = k
                said.append(k.summary)
                binding.setHoldBell { thread, deadline in k.hold(thread, deadlineNs: deadline) }
                session.onDetach {
                    binding.setHoldBell(nil)
                    k.unwatch(slot: UInt32(truncatingIfNeeded: id), process: endpoint.process,
                              threads: current.threads.withLock { $0.vcpus }.map { Optional(ThreadID($0)) })
                }
            case .failure(let e): said.append(sources == .kernel ? "\(e)" : "kernel events unavailable: \(e)")
            }
        }
        let kernel = kernelSource
        if sources.contains(.watcher) { said.append("watcher (guest updates)") }
        if !said.isEmpty { report.events = said.joined(separator: "; ") }

        // The VMM process: its exit detaches the VM; each second, the threads are
        // read again and a region that went away disables pvsched.
        guard let endpoint else { return }
        let memoryRegion: (any WatchedRegion)? = spec.areaIsWatched ? nil : region
        let refresh = endpoint.refreshIntervalNs != nil
        let tick: @Sendable () -> Void = { [weak session, logger, kernel] in
            guard let session else { return }
            let b = session.vmBinding
            b.dropExitedThreads()
            if let memoryRegion, memoryRegion.faulted, b.disabledReason == nil {
                b.disable(.regionLost("the memory file \(memoryRegion.path) was truncated under the host"))
            }
            guard refresh, let now = try? endpoint.vcpuThreads() else { return }
            Self.follow(now, current: current, session: session, kernel: kernel, process: endpoint.process, logger: logger)
        }
        let processes = try host.processMonitor()
        do throws(EndpointError) {
            try processes.add(id: id, process: endpoint.process, tick: tick) { [weak session] in
                session?.ended("process \(endpoint.process) exited")
            }
        } catch {
            throw HostError(.notFound, field: error.field, error.message)
        }
        session.onDetach { processes.remove(id: id) }
    }

    /// The vCPU threads as last read, shared by the refresh and the detach.
    final class Current: Sendable {
        let threads: Mutex<VCPUThreads>
        init(_ t: VCPUThreads) { threads = Mutex(t) }
    }

    /// Re-points the vCPUs whose threads changed (and the kernel's event filter with them).
    private static func follow(_ now: VCPUThreads, current: Current, session: AttachedVMSession,
                               kernel: KernelEventSource?, process: Int32, logger: Logger) {
        let old = current.threads.withLock { t in
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
        if let kernel {
            let slot = UInt32(truncatingIfNeeded: session.handle.id)
            kernel.unwatch(slot: slot, process: process, threads: old.vcpus.map { Optional(ThreadID($0)) })
            kernel.watch(slot: slot, process: process, threads: now.vcpus.map { Optional(ThreadID($0)) }, sink: session.events)
        }
    }
}
