import PVSchedControl
import PVSchedCore
import PVSchedGuestImage
import PVSchedHost
import PVSchedKVM

/// The `vm.*` methods.
extension ControlHandler {
    func vmEntries() -> [(String, Entry)] {
        [Self.entry(VMList.self) { [self] _, _ in host.sessions.map(summary) },
         Self.entry(VMStart.self) { [self] p, _ throws(ControlError) in try startVM(p) },
         Self.entry(VMAttach.self) { [self] p, _ throws(ControlError) in
             let spec = try p.spec(policy: policy.withLock { $0 })
             let session = try hostCall { () throws(HostError) in try host.attach(spec) }
             let info = session.report
             if let process = info.process {
                 // Recorded as it took effect: a restart under a changed configuration keeps the VM's class.
                 var recorded = p
                 recorded.boost = BoostSettings.classText(spec.boost.boosted)
                 recorded.protectHostPriority = Int64(spec.boost.protectedHostPriority ?? 0)
                 recorded.governor = GovernorChange(full: spec.governor)
                 state?.attached(session.handle.name, params: recorded, process: process)
             }
             var vm = summary(session)
             vm.negotiation = info.negotiation
             return .init(vm: vm, events: info.events, pid: info.process ?? 0, vcpuThreads: info.vcpuThreads,
                          mainLoopBoosted: info.mainLoopBoosted)
         },
         Self.entry(VMStop.self) { [self] p, _ throws(ControlError) in
             let s = try hostCall { [name = resolve(p.vm)] () throws(HostError) in try host.stopVM(name) }
             state?.removed(s.handle.name)
             return summary(s)
         },
         Self.entry(VMDriverGet.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             return .init(vm: s.handle.name, previous: nil, driver: s.binding?.driver?.name)
         },
         Self.entry(VMDriverReplace.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             guard s.binding != nil else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
             let previous = try registry { () throws(RegistryError) in try host.registry.assign(p.driver, to: s.handle.id) }
             logger.info("driver replaced", metadata: ["vm": "\(s.handle.name)", "previous": "\(previous?.name ?? "none")", "driver": "\(p.driver)"])
             state?.changed(s.handle.name, driver: .some(p.driver))
             return .init(vm: s.handle.name, previous: previous?.name, driver: p.driver)
         },
         Self.entry(VMDriverUnassign.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             guard s.binding != nil else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
             let previous = try registry { () throws(RegistryError) in try host.registry.unassign(vm: s.handle.id) }
             state?.changed(s.handle.name, driver: .some(nil))
             return .init(vm: s.handle.name, previous: previous?.name, driver: s.binding?.driver?.name)
         },
         Self.entry(VMStats.self) { [self] p, _ throws(ControlError) in
             let sessions = try p.vm.map { (ref: String) throws(ControlError) -> [any VMSession] in [try session(ref)] } ?? host.sessions
             return .init(timeNs: MonotonicClock.nowNs(), vms: sessions.map(statistics))
         },
         Self.entry(VMGovernorGet.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             guard let b = s.binding else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
             return GovernorSettings(b.governor.config)
         },
         Self.entry(VMGovernorSet.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             guard let b = s.binding else { throw ControlError(.conflict, field: "params.vm", "VM '\(s.handle.name)' runs without pvsched") }
             let config = p.change.applied(to: b.governor.config)
             b.updateGovernor(config)
             state?.changed(s.handle.name, governor: config)
             logger.info("governor changed", metadata: ["vm": "\(s.handle.name)", "governor": "\(config)"])
             return GovernorSettings(config)
         },
         Self.entry(VMTrace.self) { [self] p, _ throws(ControlError) in
             let s = try session(p.vm)
             guard let trace = s.binding?.trace else { return [] }
             return (0..<s.handle.vcpuCount).flatMap { v in trace.records(vcpu: v).suffix(p.last).map(Self.traceEntry) }
         }]
    }

    private func startVM(_ p: VMStart.Params) throws(ControlError) -> VMSummary {
        guard let workload = Workload.allCases.first(where: { $0.description == p.workload }) else {
            throw ControlError(.invalidParams, field: "params.workload",
                               "unknown workload '\(p.workload.prefix(32))' (one of \(Workload.allCases.map(\.description).joined(separator: ", ")))")
        }
        var config = VMConfiguration(image: GuestImage.kernel)
        config.name = p.name ?? nextVMName()
        config.vcpus = p.vcpus
        config.boot.workload = workload
        config.boot.durationNs = p.durationMs * 1_000_000
        config.boot.intervalNs = p.intervalUs * 1000
        config.boot.pvschedEnabled = p.pvsched
        config.interrupts = p.irqchip ? .inKernelIRQChip : .userspace
        var spec = VMSpec(source: .builtIn(config))
        spec.driver = p.driver
        let policy = policy.withLock { $0 }
        if let b = policy.boost { spec.boost.boosted = b }
        spec.boost.protectedHostPriority = policy.protectHostPriority
        spec.governor = p.governor.applied(to: policy.governor.applied(to: .default))
        do {
            return summary(try host.startVM(spec))
        } catch let e as HostError {
            throw Self.controlError(e)
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

    // MARK: views

    func summary(_ s: any VMSession) -> VMSummary {
        let b = s.binding
        let threads = b?.threads ?? Array(repeating: nil, count: s.handle.vcpuCount)
        let vcpus = threads.enumerated().map { i, t in
            let st = b?.publishedStats(vcpu: i)
            var vcpu = VMSummary.VCPU(index: i, thread: t?.rawValue, boosted: st?.boosted ?? false,
                                      owner: (st?.thread ?? .pvsched).rawValue, boostBlocked: st?.boostBlocked)
            vcpu.boostClassFallback = t.flatMap(host.actuator.classFallback(of:))
            return vcpu
        }
        let watcher = (s as? AttachedVMSession)?.watch.map { w in
            let c = w.stats
            return VMSummary.Watcher(phase: "\(w.phase)", polls: c.polls, guestUpdates: c.guestUpdates, registrations: c.registrations)
        }
        return VMSummary(id: s.handle.id, name: s.handle.name, kind: s.kind.rawValue, state: "\(s.state)", summary: s.summary,
                         pvsched: b != nil, driver: b?.driver?.name, negotiation: b.map { "\($0.negotiation)" } ?? "pvsched off",
                         disabled: b?.disabledReason.map { "\($0)" }, ejected: b?.ejection, vcpus: vcpus, watcher: watcher)
    }

    func statistics(_ s: any VMSession) -> VMStatistics {
        let b = s.binding
        let threads = b?.threads ?? []
        let vcpus = (0..<s.handle.vcpuCount).map { i in
            let st = b?.publishedStats(vcpu: i) ?? VCPUStats()
            func dict(_ pairs: [(String, UInt64)]) -> [String: UInt64] { Dictionary(uniqueKeysWithValues: pairs) }
            var out = VCPUStatistics(
                index: i, thread: i < threads.count ? threads[i]?.rawValue : nil, boosted: st.boosted, events: st.events,
                eventsByKind: dict(st.eventsByKind.byName), outcomes: dict(st.outcomes.byName), boosts: st.boostCount,
                boostedNs: st.boostedNs, throttles: st.throttleCount, repaying: st.repaying, repayments: st.repayments,
                repaymentNs: st.repaymentNs, vetoesThrottled: st.vetoesThrottled, vetoesVMShare: st.vetoesVMShare,
                failedBoosts: dict(st.failedBoosts.byName), boostBlocked: st.boostBlocked, owner: st.thread.rawValue,
                latencyBoundsNs: LatencyBuckets.upperBoundsNs, latencyCounts: st.decisionLatency.counts,
                latencyCount: st.decisionLatency.total, latencySumNs: st.decisionLatency.sumNs)
            out.boostClassFallback = (i < threads.count ? threads[i] : nil).flatMap(host.actuator.classFallback(of:))
            out.uncontendedWakeups = (i < threads.count ? threads[i] : nil).flatMap(host.uncontendedWakeups(of:))
            out.holds = st.holds
            return out
        }
        return VMStatistics(id: s.handle.id, name: s.handle.name, driver: b?.driver?.name, state: "\(s.state)", vcpus: vcpus)
    }

    static func traceEntry(_ r: TraceRecord) -> TraceEntry {
        TraceEntry(timeUs: r.timeNs / 1000, vcpu: r.vcpu, event: r.event.map { "\($0)" } ?? "enforcer",
                   flags: r.guest.map { "0x" + String($0.flags.rawValue, radix: 16) }, task: r.guest.map { "\($0.task)" },
                   boosted: r.boosted, interruptPending: r.interruptPending, pendingVectors: r.pendingVectors.vectors.map(Int.init),
                   deadlineInUs: r.deadlineInNs.map { Int64($0) / 1000 }, decision: "\(r.decision)", outcome: "\(r.outcome)")
    }
}
