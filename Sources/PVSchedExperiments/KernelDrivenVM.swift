import PVSchedCore
import PVSchedHost
import PVSchedKVM
import PVSchedKernelEvents

#if canImport(Glibc)
import Glibc
#endif

/// A built-in-VMM VM that runs no driver itself and is driven, as an attached VM,
/// from KVM events the host kernel reports (the same path the daemon takes for
/// QEMU), all in this process: for comparing the kernel event path with the
/// in-process one side by side (`pvsched demo` mode `kernel:DRIVER`, `pvsched bench`).
final class KernelDrivenVM {
    let vm: VirtualMachine
    let exported: ExportedVMLink
    let host: PVSchedHost
    let source: KernelEventSource
    private(set) var session: AttachedVMSession?
    private let slot: UInt32

    init(config: VMConfiguration, host: PVSchedHost, source: KernelEventSource) throws {
        var config = config
        config.boot.pvschedEnabled = true
        exported = ExportedVMLink(name: config.name, vcpus: config.vcpus, memoryFile: nil, path: nil)
        vm = try VirtualMachine(config: config, host: exported.link, threads: host.threads)
        self.host = host
        self.source = source
        slot = UInt32(truncatingIfNeeded: UInt64(getpid()) &* 31 &+ UInt64(UInt32.random(in: 0...UInt32.max)))
    }

    /// Starts the VM, then attaches it once its vCPU threads run and its guest has
    /// registered the area (events before that — the boot — are not seen).
    func start(driver: String, governor: GovernorConfig, boost: BoostSettings = BoostSettings(), timeoutNs: UInt64 = 10_000_000_000) throws {
        try vm.start()
        let deadline = MonotonicClock.nowNs() + timeoutNs
        while MonotonicClock.nowNs() < deadline {
            let e = exported.export
            if !e.threads.contains(0), e.areaOffset != nil { break }
            if vm.outcome != nil { break }
            usleep(1000)
        }
        let e = exported.export
        guard !e.threads.contains(0), let offset = e.areaOffset, let size = e.areaSize,
              let bytes = vm.memory.bytes(at: UInt64(offset), length: size) else {
            throw ResultsError(field: "area", detail: "the guest did not register its area in time")
        }
        let s = try host.attach(name: "\(vm.config.name)-kernel", vcpus: vm.config.vcpus, summary: "kernel events",
                                driver: driver, governor: governor, boost: boost, traceCapacity: 1)
        let threads = e.threads.map { Optional(ThreadID($0)) }
        for (i, t) in threads.enumerated() { s.events.setThread(t, vcpu: i) }
        _ = s.link.registrar.register(area: bytes, owner: vm.memory)
        source.watch(slot: slot, process: getpid(), threads: threads, sink: s.events)
        session = s
    }

    /// Detaches (undoing boosts) and stops the VM.
    func stop() {
        if let s = session {
            source.unwatch(slot: slot, process: getpid(), threads: exported.export.threads.map { Optional(ThreadID($0)) })
            _ = try? host.stopVM(s.handle.name)
        }
        vm.stop()
    }

    var binding: VMBinding? { session?.binding }
    var counts: KernelEventCounts? { source.counts(slot: slot) }
}
