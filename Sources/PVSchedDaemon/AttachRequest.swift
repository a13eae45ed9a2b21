import PVSchedAttach
import PVSchedControl
import PVSchedCore
import PVSchedHost

/// `vm.attach`'s parameters as a `VMSpec`: the daemon decodes, the host attaches.
///
/// The VMM and its vCPU threads come from one of `qmp` (QEMU: the socket's peer
/// is the process, `query-cpus-fast` gives the threads), `pid` + `threadNames`
/// (crosvm, cloud-hypervisor, Firecracker, QEMU with debug-threads) or `pid` +
/// `threads`. The guest's area comes from `shm` (an ivshmem region the guest's
/// pvsched module writes, watched) or from `memory` with an offset and size (a VM
/// of `pvsched run --export`, registered once).
/// What a VM gets when its request says nothing: the configuration's boost class,
/// protected host priority and governor (`/etc/pvsched/pvsched.conf`).
public struct AttachPolicy: Equatable, Sendable {
    public var boost: SchedulingParameters?
    public var protectHostPriority: UInt8? = 50
    public var governor = GovernorChange()
    /// See `DaemonConfig.holdThroughHaltsUs` (ns here; 0: off).
    public var holdThroughHaltsNs: UInt64 = 0
    public init() {}
    public init(_ config: DaemonConfig) {
        boost = config.boost; protectHostPriority = config.protectHostPriority; governor = config.governor
        holdThroughHaltsNs = config.holdThroughHaltsUs * 1000
    }
}

extension VMAttach.Params {
    func spec(policy: AttachPolicy = AttachPolicy()) throws(ControlError) -> VMSpec {
        let endpoint = try self.endpoint()
        var spec = VMSpec(name: name, source: .endpoint(endpoint))
        guard memory == nil || shm == nil else { throw ControlError(.invalidParams, field: "params.shm", "give memory or shm, not both") }
        if let memory {
            guard let areaOffset, let areaSize else {
                throw ControlError(.invalidParams, field: "params.areaOffset", "areaOffset and areaSize are needed with memory")
            }
            spec.area = .memoryFile(path: memory, offset: Int(areaOffset), size: Int(areaSize))
        } else if let shm {
            spec.area = .ivshmem(path: shm)
        }
        if let events {
            guard let e = VMSpec.EventSources(name: events) else {
                throw ControlError(.invalidParams, field: "params.events", "must be kernel, watch or both")
            }
            spec.events = e
        }
        spec.driver = driver
        spec.boost = BoostSettings(allowRealTimeThreads: allowRealTimeThreads)
        if let b = policy.boost { spec.boost.boosted = b }
        spec.boost.protectedHostPriority = policy.protectHostPriority
        if let text = boost {
            guard let c = BoostSettings.parseClass(text) else {
                throw ControlError(.invalidParams, field: "params.boost", "must be \(BoostSettings.classSyntax), got '\(text)'")
            }
            spec.boost.boosted = c
        }
        if let v = protectHostPriority { spec.boost.protectedHostPriority = v == 0 ? nil : UInt8(v) }
        spec.governor = governor.applied(to: policy.governor.applied(to: .default))
        spec.boostMainLoop = boostMainLoop
        if let pollUs {
            spec.watch.busyPollNs = UInt64(pollUs) * 1000
            spec.watch.idlePollNs = max(spec.watch.idlePollNs, spec.watch.busyPollNs)
        }
        if let deadlineLeadUs { spec.deadlineLeadNs = UInt64(deadlineLeadUs) * 1000 }
        spec.holdThroughHaltsNs = policy.holdThroughHaltsNs
        return spec
    }

    /// Which VMM: exactly one of `qmp`, `threads` (with `pid`) or `threadNames` (with `pid`).
    private func endpoint() throws(ControlError) -> any VMMEndpoint {
        if libvirtDomain != nil { throw ControlError(.invalidParams, field: "params.libvirtDomain", "this daemon has no libvirt connection") }
        let sources = [qmp != nil, threads != nil, threadNames != nil].filter { $0 }.count
        guard sources == 1 else {
            throw ControlError(.invalidParams, field: "params.qmp", "give exactly one of qmp, threads (with pid) or threadNames (with pid)")
        }
        do throws(EndpointError) {
            if let qmp { return try QMPEndpoint(socket: qmp, expectedProcess: pid) }
            guard let pid else { throw EndpointError(.invalid, field: "pid", "missing (needed with threads or threadNames)") }
            if let threads { return try ProcessEndpoint(process: pid, threads: .ids(threads)) }
            guard let naming = threadNames.flatMap(VCPUThreadNaming.init(rawValue:)) else {
                throw EndpointError(.invalid, field: "threadNames", "must be one of \(VCPUThreadNaming.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return try ProcessEndpoint(process: pid, threads: .names(naming))
        } catch {
            let code: ControlError.Code
            switch error.kind {
            case .invalid: code = .invalidParams
            case .notFound: code = .notFound
            case .unreachable: code = .failed
            }
            throw ControlError(code, field: "params.\(error.field)", error.message)
        }
    }
}
