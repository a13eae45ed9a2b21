import CHostService
import Foundation
import PVSchedBPF
import PVSchedBuildInfo
import PVSchedControl
import PVSchedCore
import PVSchedHost
import PVSchedLinux

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's, the drivers' and the operator-boost methods.
extension ControlHandler {
    func daemonEntries() -> [(String, Entry)] {
        [Self.entry(DaemonInfo.self) { [host, metricsAddress] _, caller in
            let g = (host.actuator as? LinuxActuator)?.guardian?.status
            return DaemonInfo.Result(
                protocolVersion: ControlProtocol.version, pid: getpid(), version: PVSchedVersion.version, revision: PVSchedVersion.revision,
                vms: host.sessions.count, metrics: metricsAddress,
                guardian: g.map { .init(state: $0.state.rawValue, pid: $0.pid, restarts: $0.restarts, records: $0.records) },
                caller: caller.role.rawValue, methods: ControlMethods.names)
        }]
    }

    func driverEntries() -> [(String, Entry)] {
        [Self.entry(DriversList.self) { [self] _, _ in driverList() },
         Self.entry(DriversSetDefault.self) { [self] p, _ throws(ControlError) in
             let previous = host.registry.defaultDriverName
             try registry { () throws(RegistryError) in try host.registry.setDefault(p.name) }
             return .init(previous: previous, defaultDriver: p.name)
         },
         Self.entry(BPFLoad.self) { [self] p, _ throws(ControlError) in try loadBPF(p) },
         Self.entry(BPFUnload.self) { [self] p, _ throws(ControlError) in
             guard let d = host.registry.driver(named: p.name) else { throw ControlError(.notFound, field: "params.name", "no driver named '\(p.name)'") }
             guard d is BPFDriver else { throw ControlError(.conflict, field: "params.name", "'\(p.name)' is a built-in driver, not a BPF driver") }
             let users = host.sessions.filter { $0.binding?.driver?.name == p.name }.map(\.handle.name)
             try registry { () throws(RegistryError) in _ = try host.registry.unregister(p.name, force: p.force) }
             logger.info("BPF driver unloaded", metadata: ["driver": "\(p.name)", "movedVMs": "\(users)"])
             return .init(name: p.name, moved: users)
         }]
    }

    func threadEntries() -> [(String, Entry)] {
        [Self.entry(ThreadBoost.self) { [self] p, caller throws(ControlError) in
            if caller.role == .reader {
                let limits = ThreadBoost.readerLimits
                guard Int64(p.priority) <= limits.maxPriority else {
                    throw ControlError(.invalidParams, field: "params.priority", "\(p.priority) is outside 1...\(limits.maxPriority) (the read group's limit)")
                }
                guard Int64(p.durationMs) <= limits.maxDurationMs else {
                    throw ControlError(.invalidParams, field: "params.durationMs", "\(p.durationMs) is outside 1...\(limits.maxDurationMs) (the read group's limit)")
                }
            }
            try checkOperatorThread(p.tid, caller: caller)
            try operatorBoosts.boost(ThreadID(p.tid), priority: p.priority, durationNs: p.durationMs * 1_000_000)
            return .init(tid: p.tid, boosted: "SCHED_FIFO \(p.priority)", durationMs: p.durationMs)
         },
         Self.entry(ThreadRestore.self) { [self] p, caller throws(ControlError) in
             if caller.role == .reader { try checkOwnThread(p.tid, caller: caller) }
             guard operatorBoosts.restore(ThreadID(p.tid)) else {
                 throw ControlError(.notFound, field: "params.tid", "thread \(p.tid) has no operator boost")
             }
             return .init(tid: p.tid)
         }]
    }

    private func loadBPF(_ p: BPFLoad.Params) throws(ControlError) -> BPFLoad.Result {
        if let name = p.name { try hostCall { () throws(HostError) in try SessionName.validate(name, field: "params.name") } }
        guard let data = Data(base64Encoded: p.object), !data.isEmpty else {
            throw ControlError(.invalidParams, field: "params.object", "must be the object file, base64-encoded")
        }
        let driver: BPFDriver
        do {
            driver = try host.loadBPFDriver(elf: [UInt8](data), name: p.name)
        } catch let e as RegistryError {
            throw ControlError(.conflict, field: "params.name", "\(e)")
        } catch {
            throw ControlError(.invalidParams, field: "params.object", "\(error)")
        }
        return .init(name: driver.name, protocolName: driver.protocolName, version: "\(driver.protocolVersion)", events: driver.events.names)
    }

    func driverList() -> [DriverSummary] {
        let users = Dictionary(grouping: host.sessions.compactMap { s in s.binding?.driver.map { ($0.name, s.handle.name) } },
                               by: \.0).mapValues { $0.map(\.1).sorted() }
        return host.registry.drivers.map { d in
            DriverSummary(name: d.name, protocolName: d.protocolName, version: "\(d.protocolVersion)", events: d.events.names,
                          vms: users[d.name] ?? [], isDefault: d.isDefault,
                          kind: host.registry.driver(named: d.name) is BPFDriver ? "bpf" : "builtin")
        }
    }

    private func checkOperatorThread(_ tid: Int32, caller: ControlCaller) throws(ControlError) {
        guard access("/proc/\(tid)", F_OK) == 0 else { throw ControlError(.notFound, field: "params.tid", "no thread \(tid)") }
        if caller.role == .reader { try checkOwnThread(tid, caller: caller) }
        let vcpuThreads = host.sessions.flatMap { $0.binding?.threads.compactMap { $0 } ?? [] }
        if vcpuThreads.contains(ThreadID(tid)) {
            throw ControlError(.conflict, field: "params.tid", "thread \(tid) is a vCPU thread managed by its VM's driver")
        }
    }

    /// A read-group caller acts only on threads its own user runs.
    private func checkOwnThread(_ tid: Int32, caller: ControlCaller) throws(ControlError) {
        var uid: UInt32 = 0
        guard pvs_process_uid(tid, &uid) == 0, uid == caller.uid else {
            throw ControlError(.permissionDenied, field: "params.tid", "thread \(tid) is not one of uid \(caller.uid)'s")
        }
    }
}
