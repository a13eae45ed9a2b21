import CHostService
import Foundation
import Logging
import PVSchedBPF
import PVSchedBuildInfo
import PVSchedControl
import PVSchedCore
import PVSchedGuestImage
import PVSchedHost
import PVSchedKVM
import PVSchedLinux
import Synchronization

/// Carries out control requests on a `PVSchedHost`: the seed's ioctls
/// (get/replace a VM's driver) and sysctl (available drivers) and the rest of
/// the control API. Every parameter is validated before anything changes; a
/// refused request changes nothing. Safe to call from many connection threads.
public final class ControlHandler: Sendable {
    public let host: PVSchedHost
    let operatorBoosts: OperatorBoosts
    let attacher: VMAttacher
    let metricsAddress: String?
    private let logger: Logger

    public init(host: PVSchedHost, metricsAddress: String? = nil, eventsPriority: UInt8? = 90,
                logger: Logger = Logger(label: "pvsched.control")) throws(ThreadError) {
        self.host = host
        self.metricsAddress = metricsAddress
        self.logger = logger
        operatorBoosts = try OperatorBoosts(actuator: host.actuator)
        attacher = VMAttacher(host: host, eventsPriority: eventsPriority, logger: logger)
    }

    /// Records the kernel event source dropped (nil: it was never opened).
    public var kernelEventsDropped: UInt64? { attacher.kernelEventsDropped }

    /// Stops the operator-boost timer and undoes its boosts; detaches the kernel events.
    public func shutdown() {
        operatorBoosts.shutdown()
        attacher.shutdown()
    }

    /// Parses and carries out one request line for `caller`; returns the response line.
    public func respond(to line: some Collection<UInt8>, caller: ControlCaller = .inProcess) -> [UInt8] {
        switch ControlRequest.parse(line) {
        case .failure(let e): return ControlResponse.failure(id: e.id, error: e.error)
        case .success(let request):
            switch handle(request, caller: caller) {
            case .success(let result): return ControlResponse.success(id: request.id, result: result)
            case .failure(let error): return ControlResponse.failure(id: request.id, error: error)
            }
        }
    }

    /// Carries out one parsed request for `caller` (refused when its role does not allow it).
    public func handle(_ request: ControlRequest, caller: ControlCaller = .inProcess) -> Result<JSON, ControlError> {
        var p = request.params
        do throws(ControlError) {
            if caller.role == .reader && !ControlProtocol.readOnlyMethods.contains(request.method)
                && request.method != "thread.boost" && request.method != "thread.restore" {
                throw ControlError(.permissionDenied, field: "method",
                                   "'\(request.method)' changes the daemon: root only (the read group may call \(ControlProtocol.readOnlyMethods.sorted().joined(separator: ", ")), and boost threads of its own)")
            }
            let result = try dispatch(request.method, &p, caller: caller)
            return .success(result)
        } catch {
            return .failure(error)
        }
    }

    private func dispatch(_ method: String, _ p: inout Params, caller: ControlCaller) throws(ControlError) -> JSON {
        switch method {
        case "daemon.info":
            try p.finish()
            var guardian = JSON.null
            if let g = (host.actuator as? LinuxActuator)?.guardian?.status {
                guardian = ["state": .string(g.state.rawValue), "pid": JSON(g.pid), "restarts": JSON(g.restarts), "records": JSON(g.records)]
            }
            return ["protocol": .int(ControlProtocol.version), "pid": JSON(getpid()),
                    "version": .string(PVSchedVersion.version), "revision": .string(PVSchedVersion.revision),
                    "vms": JSON(host.sessions.count), "metrics": JSON(metricsAddress), "guardian": guardian,
                    "caller": .string(caller.role.rawValue),
                    "methods": .array(ControlProtocol.methods.map { .string($0) })]
        case "drivers.list":
            try p.finish()
            return .array(driverList())
        case "drivers.set_default":
            let name = try p.optionalString("name")
            guard p.has("name") else { throw ControlError(.invalidParams, field: "params.name", "missing (a driver name, or null for none)") }
            try p.finish()
            let previous = host.registry.defaultDriverName
            try registry { () throws(RegistryError) in try host.registry.setDefault(name) }
            return ["previous": JSON(previous), "default": JSON(name)]
        case "bpf.load": return try loadBPF(&p)
        case "bpf.unload":
            let name = try p.string("name")
            let force = try p.bool("force", default: false)
            try p.finish()
            guard let d = host.registry.driver(named: name) else { throw ControlError(.notFound, field: "params.name", "no driver named '\(name)'") }
            guard d is BPFDriver else { throw ControlError(.conflict, field: "params.name", "'\(name)' is a built-in driver, not a BPF driver") }
            let users = vmNames(using: name)
            try registry { () throws(RegistryError) in _ = try host.registry.unregister(name, force: force) }
            logger.info("BPF driver unloaded", metadata: ["driver": "\(name)", "movedVMs": "\(users)"])
            return ["name": .string(name), "moved": .array(users.map { .string($0) })]
        case "vm.list":
            try p.finish()
            return .array(host.sessions.map(vmJSON))
        case "vm.start": return try startVM(&p)
        case "vm.attach":
            let (session, info) = try attacher.attach(&p)
            var vm = vmJSON(session)
            if case .object(var o) = vm, case .object(let extra) = info {
                for (k, v) in extra { o[k] = v }
                vm = .object(o)
            }
            return vm
        case "vm.stop":
            let ref = try p.string("vm")
            try p.finish()
            let s = try hostCall { () throws(HostError) in try host.stopVM(ref) }
            defer { attacher.forget(vm: s.handle.id) }
            return vmJSON(s)
        case "vm.driver.get":
            let s = try session(&p)
            try p.finish()
            return ["vm": .string(s.handle.name), "driver": JSON(s.binding?.driver?.name)]
        case "vm.driver.replace":
            let s = try session(&p)
            let name = try p.string("driver")
            try p.finish()
            guard s.binding != nil else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
            let previous = try registry { () throws(RegistryError) in try host.registry.assign(name, to: s.handle.id) }
            logger.info("driver replaced", metadata: ["vm": "\(s.handle.name)", "previous": "\(previous?.name ?? "none")", "driver": "\(name)"])
            return ["vm": .string(s.handle.name), "previous": JSON(previous?.name), "driver": .string(name)]
        case "vm.driver.unassign":
            let s = try session(&p)
            try p.finish()
            guard s.binding != nil else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
            let previous = try registry { () throws(RegistryError) in try host.registry.unassign(vm: s.handle.id) }
            return ["vm": .string(s.handle.name), "previous": JSON(previous?.name), "driver": JSON(s.binding?.driver?.name)]
        case "vm.stats":
            let ref = try p.optionalString("vm")
            try p.finish()
            let sessions: [any VMSession]
            if let ref { sessions = [try hostCall { () throws(HostError) in try host.session(ref) }] } else { sessions = host.sessions }
            return ["timeNs": JSON(MonotonicClock.nowNs()), "vms": .array(sessions.map(statsJSON))]
        case "vm.governor.get":
            let s = try session(&p)
            try p.finish()
            guard let b = s.binding else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
            return governorJSON(b.governor.config)
        case "vm.governor.set":
            let s = try session(&p)
            guard let b = s.binding else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
            let config = try governor(&p, base: b.governor.config)
            try p.finish()
            b.governor.update(config)
            logger.info("governor changed", metadata: ["vm": "\(s.handle.name)", "governor": "\(config)"])
            return governorJSON(config)
        case "vm.trace":
            let s = try session(&p)
            let last = Int(try p.int("last", in: 1...4096, default: 20))
            try p.finish()
            guard let trace = s.binding?.trace else { return .array([]) }
            var out: [JSON] = []
            for v in 0..<s.handle.vcpuCount {
                for r in trace.records(vcpu: v).suffix(last) { out.append(traceJSON(r)) }
            }
            return .array(out)
        case "thread.boost":
            let reader = caller.role == .reader
            let limits = ControlProtocol.readerBoostLimits
            let tid = Int32(try p.int("tid", in: 1...Int64(Int32.max)))
            let priority = UInt8(try p.int("priority", in: 1...(reader ? limits.maxPriority : 99), default: 10))
            let ms = UInt64(try p.int("durationMs", in: 1...(reader ? limits.maxDurationMs : 3_600_000), default: 10_000))
            try p.finish()
            try checkOperatorThread(tid, caller: caller)
            try operatorBoosts.boost(ThreadID(tid), priority: priority, durationNs: ms * 1_000_000)
            return ["tid": JSON(tid), "boosted": .string("SCHED_FIFO \(priority)"), "durationMs": JSON(ms)]
        case "thread.restore":
            let tid = Int32(try p.int("tid", in: 1...Int64(Int32.max)))
            try p.finish()
            if caller.role == .reader { try checkOwnThread(tid, caller: caller) }
            guard operatorBoosts.restore(ThreadID(tid)) else {
                throw ControlError(.notFound, field: "params.tid", "thread \(tid) has no operator boost")
            }
            return ["tid": JSON(tid), "restored": true]
        default:
            throw ControlError(.unknownMethod, field: "method", "unknown method '\(method.prefix(64))'")
        }
    }

    // MARK: methods

    private func loadBPF(_ p: inout Params) throws(ControlError) -> JSON {
        let encoded = try p.string("object", maxBytes: ControlProtocol.maxRequestBytes)
        let name = try p.optionalString("name")
        try p.finish()
        if let name { try hostCall { () throws(HostError) in try SessionName.validate(name, field: "params.name") } }
        guard let data = Data(base64Encoded: encoded), !data.isEmpty else {
            throw ControlError(.invalidParams, field: "params.object", "must be the object file, base64-encoded")
        }
        let driver: BPFDriver
        do {
            driver = try host.loadBPFDriver(elf: [UInt8](data), name: name)
        } catch let e as RegistryError {
            throw ControlError(.conflict, field: "params.name", "\(e)")
        } catch {
            throw ControlError(.invalidParams, field: "params.object", "\(error)")
        }
        return ["name": .string(driver.name), "protocol": .string(driver.protocolName),
                "version": .string("\(driver.protocolVersion)"), "events": eventNames(driver.events)]
    }

    private func startVM(_ p: inout Params) throws(ControlError) -> JSON {
        let name = try p.optionalString("name", maxBytes: 64)
        let vcpus = Int(try p.int("vcpus", in: 1...Int64(VirtualMachine.maxVCPUs), default: 1))
        let workloadName = try p.optionalString("workload") ?? "cyclic"
        guard let workload = Workload.allCases.first(where: { $0.description == workloadName }) else {
            throw ControlError(.invalidParams, field: "params.workload",
                               "unknown workload '\(workloadName.prefix(32))' (one of \(Workload.allCases.map(\.description).joined(separator: ", ")))")
        }
        let durationMs = UInt64(try p.int("durationMs", in: 1...86_400_000, default: 60_000))
        let intervalUs = UInt64(try p.int("intervalUs", in: 50...1_000_000, default: 1000))
        let driver = try p.optionalString("driver")
        let irqchip = try p.bool("irqchip", default: false)
        let pvsched = try p.bool("pvsched", default: true)
        let governor = try governor(&p, base: .default)
        try p.finish()
        if let driver, host.registry.driver(named: driver) == nil {
            throw ControlError(.notFound, field: "params.driver", "no driver named '\(driver)'")
        }
        if driver != nil && !pvsched { throw ControlError(.invalidParams, field: "params.driver", "a VM without pvsched has no driver") }
        var config = VMConfiguration(image: GuestImage.kernel)
        config.name = name ?? nextVMName()
        config.vcpus = vcpus
        config.boot.workload = workload
        config.boot.durationNs = durationMs * 1_000_000
        config.boot.intervalNs = intervalUs * 1000
        config.boot.pvschedEnabled = pvsched
        config.interrupts = irqchip ? .inKernelIRQChip : .userspace
        do {
            let s = try host.startVM(config: config, driver: driver, governor: governor)
            return vmJSON(s)
        } catch let e as HostError {
            throw ControlError(e.field == "name" ? .conflict : .invalidParams, field: "params.\(e.field)", e.message)
        } catch {
            throw ControlError(.failed, "could not start the VM: \(error)")
        }
    }

    private func nextVMName() -> String {
        let taken = Set(host.sessions.map(\.handle.name))
        var i = 1
        while taken.contains("vm\(i)") { i += 1 }
        return "vm\(i)"
    }

    /// Reads the optional governor fields over `base`.
    private func governor(_ p: inout Params, base: GovernorConfig) throws(ControlError) -> GovernorConfig {
        var g = base
        let maxUs: Int64 = 3_600_000_000
        if let v = try p.optionalInt("criticalBudgetUs", in: 1...maxUs) { g.criticalBudgetNs = UInt64(v) * 1000 }
        if let v = try p.optionalInt("generalBudgetUs", in: 1...maxUs) { g.generalBudgetNs = UInt64(v) * 1000 }
        if let v = try p.optionalInt("throttleWindowUs", in: 0...maxUs) { g.throttleWindowNs = UInt64(v) * 1000 }
        if let v = try p.optionalInt("shareWindowUs", in: 1...maxUs) { g.shareWindowNs = UInt64(v) * 1000 }
        if let v = try p.optionalDouble("maxVMShare", in: 0...1) { g.maxVMShare = v }
        if let v = try p.optionalDouble("repaymentFactor", in: GovernorConfig.repaymentFactorRange) { g.repaymentFactor = v }
        if let v = try p.optionalInt("maxRepaymentUs", in: GovernorConfig.maxRepaymentUsRange) { g.maxRepaymentNs = UInt64(v) * 1000 }
        if try p.bool("unlimited", default: false) { g = .unlimited }
        return g
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

    private func session(_ p: inout Params) throws(ControlError) -> any VMSession {
        let ref = try p.string("vm", maxBytes: 64)
        return try hostCall { () throws(HostError) in try host.session(ref) }
    }

    // MARK: JSON views

    func driverList() -> [JSON] {
        let users = Dictionary(grouping: host.sessions.compactMap { s in s.binding?.driver.map { ($0.name, s.handle.name) } },
                               by: \.0).mapValues { $0.map(\.1).sorted() }
        return host.registry.drivers.map { d in
            let kind = host.registry.driver(named: d.name) is BPFDriver ? "bpf" : "builtin"
            return ["name": .string(d.name), "protocol": .string(d.protocolName), "version": .string("\(d.protocolVersion)"),
                    "events": eventNames(d.events), "vms": .array((users[d.name] ?? []).map { .string($0) }),
                    "default": .bool(d.isDefault), "kind": .string(kind)]
        }
    }

    private func vmNames(using driver: String) -> [String] {
        host.sessions.filter { $0.binding?.driver?.name == driver }.map(\.handle.name)
    }

    func vmJSON(_ s: any VMSession) -> JSON {
        let b = s.binding
        let threads = b?.threads ?? Array(repeating: nil, count: s.handle.vcpuCount)
        let vcpus: [JSON] = threads.enumerated().map { i, t in
            let st = b?.publishedStats(vcpu: i)
            return ["index": JSON(i), "thread": t.map { JSON($0.rawValue) } ?? .null,
                    "boosted": .bool(st?.boosted ?? false), "owner": .string((st?.thread ?? .pvsched).rawValue),
                    "boostBlocked": JSON(st?.boostBlocked)]
        }
        var vm: [String: JSON] = [
            "id": JSON(s.handle.id), "name": .string(s.handle.name), "kind": .string(s.kind.rawValue),
            "state": .string("\(s.state)"), "summary": .string(s.summary), "pvsched": .bool(b != nil),
            "driver": JSON(b?.driver?.name), "negotiation": .string(b.map { "\($0.negotiation)" } ?? "pvsched off"),
            "disabled": JSON(b?.disabledReason.map { "\($0)" }), "ejected": JSON(b?.ejection), "vcpus": .array(vcpus)]
        if let w = attacher.watcher(vm: s.handle.id) {
            let c = w.stats
            vm["watcher"] = ["phase": .string("\(w.phase)"), "polls": JSON(c.polls), "guestUpdates": JSON(c.guestUpdates),
                             "registrations": JSON(c.registrations)]
        }
        return .object(vm)
    }

    func statsJSON(_ s: any VMSession) -> JSON {
        let b = s.binding
        let threads = b?.threads ?? []
        let vcpus: [JSON] = (0..<s.handle.vcpuCount).map { i in
            let st = b?.publishedStats(vcpu: i) ?? VCPUStats()
            return ["index": JSON(i), "thread": i < threads.count ? threads[i].map { JSON($0.rawValue) } ?? .null : .null,
                    "boosted": .bool(st.boosted), "owner": .string(st.thread.rawValue), "events": JSON(st.events),
                    "eventsByKind": .object(Dictionary(uniqueKeysWithValues: st.eventsByKind.byName.map { ($0.0, JSON($0.1)) })),
                    "outcomes": .object(Dictionary(uniqueKeysWithValues: st.outcomes.byName.map { ($0.0, JSON($0.1)) })),
                    "boosts": JSON(st.boostCount), "boostedNs": JSON(st.boostedNs), "throttles": JSON(st.throttleCount),
                    "repaying": .bool(st.repaying), "repayments": JSON(st.repayments), "repaymentNs": JSON(st.repaymentNs),
                    "vetoes": ["throttled": JSON(st.vetoesThrottled), "vm_share": JSON(st.vetoesVMShare)],
                    "failedBoosts": .object(Dictionary(uniqueKeysWithValues: st.failedBoosts.byName.map { ($0.0, JSON($0.1)) })),
                    "boostBlocked": JSON(st.boostBlocked), "owner": .string(st.thread.rawValue),
                    "decisionLatency": ["count": JSON(st.decisionLatency.total), "sumNs": JSON(st.decisionLatency.sumNs),
                                        "bucketsLeNs": .array(LatencyBuckets.upperBoundsNs.map { JSON($0) }),
                                        "counts": .array(st.decisionLatency.counts.map { JSON($0) })]]
        }
        return ["id": JSON(s.handle.id), "name": .string(s.handle.name), "driver": JSON(b?.driver?.name),
                "state": .string("\(s.state)"), "vcpus": .array(vcpus)]
    }

    func governorJSON(_ g: GovernorConfig) -> JSON {
        func us(_ ns: UInt64) -> JSON { ns == .max ? .null : JSON(ns / 1000) }
        return ["criticalBudgetUs": us(g.criticalBudgetNs), "generalBudgetUs": us(g.generalBudgetNs), "throttleWindowUs": us(g.throttleWindowNs),
                "shareWindowUs": us(g.shareWindowNs), "maxVMShare": JSON(g.maxVMShare), "repaymentFactor": JSON(g.repaymentFactor),
                "maxRepaymentUs": JSON(g.maxRepaymentNs / 1000)]
    }

    func traceJSON(_ r: TraceRecord) -> JSON {
        ["timeUs": JSON(r.timeNs / 1000), "vcpu": JSON(r.vcpu), "event": .string(r.event.map { "\($0)" } ?? "enforcer"),
         "flags": JSON(r.guest.map { "0x" + String($0.flags.rawValue, radix: 16) }),
         "task": JSON(r.guest.map { "\($0.task)" }), "boosted": .bool(r.boosted),
         "interruptPending": .bool(r.interruptPending), "pendingVectors": .array(r.pendingVectors.vectors.map { JSON(Int($0)) }),
         "deadlineInUs": r.deadlineInNs.map { JSON($0 / 1000) } ?? .null,
         "decision": .string("\(r.decision)"), "outcome": .string("\(r.outcome)")]
    }

    private func eventNames(_ m: EventMask) -> JSON {
        var names: [JSON] = []
        if m.contains(.vmEntry) { names.append("vm_entry") }
        if m.contains(.vmExit) { names.append("vm_exit") }
        if m.contains(.halt) { names.append("halt") }
        if m.contains(.interruptInjection) { names.append("interrupt_injection") }
        return .array(names)
    }

    // MARK: error mapping

    private func registry<T>(_ body: () throws(RegistryError) -> T) throws(ControlError) -> T {
        do { return try body() } catch {
            switch error {
            case .unknownDriver: throw ControlError(.notFound, field: "params.driver", "\(error)")
            case .unknownVM: throw ControlError(.notFound, field: "params.vm", "\(error)")
            case .driverInUse: throw ControlError(.conflict, field: "params.name", "\(error)")
            case .duplicateName: throw ControlError(.conflict, field: "params.name", "\(error)")
            default: throw ControlError(.conflict, "\(error)")
            }
        }
    }

    private func hostCall<T>(_ body: () throws(HostError) -> T) throws(ControlError) -> T {
        do { return try body() } catch {
            let field = error.field.hasPrefix("params.") ? error.field : "params.\(error.field)"
            throw ControlError(error.field == "vm" ? .notFound : .invalidParams, field: field, error.message)
        }
    }
}
