import PVSchedAttach
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
    private(set) var session: AttachedVMSession?

    init(config: VMConfiguration, host: PVSchedHost) throws {
        var config = config
        config.boot.pvschedEnabled = true
        exported = ExportedVMLink(name: config.name, vcpus: config.vcpus, memoryFile: nil, path: nil)
        vm = try VirtualMachine(config: config, host: exported.link, threads: host.threads)
        self.host = host
    }

    /// Starts the VM, then attaches it once its vCPU threads run and its guest has
    /// registered the area (events before that — the boot — are not seen): this
    /// process is the VMM, found by its thread ids, its area mapped here already.
    func start(driver: String, governor: GovernorConfig, boost: BoostSettings = BoostSettings(), timeoutNs: UInt64 = 10_000_000_000) throws {
        _ = try host.kernelEvents.get()  // this mode needs them: say why they are missing
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
        var spec = VMSpec(name: "\(vm.config.name)-kernel", source: .endpoint(try ProcessEndpoint(process: getpid(), threads: .ids(e.threads))),
                          area: .region(MappedRegion(bytes: bytes, owner: vm.memory)), events: .kernel,
                          driver: driver, governor: governor, boost: boost)
        spec.traceCapacity = 1
        session = try host.attach(spec)
    }

    /// Detaches (undoing boosts) and stops the VM.
    func stop() {
        if let s = session { _ = try? host.stopVM(s.handle.name) }
        vm.stop()
    }

    var binding: VMBinding? { session?.binding }
    var counts: KernelEventCounts? {
        guard let s = session, case .success(let k) = host.kernelEvents else { return nil }
        return k.counts(slot: UInt32(truncatingIfNeeded: s.handle.id))
    }
}
