import PVSchedCore
import Testing
@testable import PVSchedDrivers
import PVSchedTesting

@Suite struct LatencyBoostDriverTests {
    let d = LatencyBoostDriver(settings: .init(preemptDisabledCapNs: 1_000, deadlineHorizonNs: 500))

    func view(_ flags: GuestVCPUState.Flags, boosted: Bool = false, since: UInt64? = nil, now: UInt64 = 10_000,
              deadline: UInt64? = nil, clock: UInt64 = 0) -> VCPUView {
        VCPUView(vcpu: 0, guest: GuestVCPUState(flags: flags, nextDeadlineNs: deadline, guestClockNs: clock),
                 boosted: boosted, boostedSinceNs: since, nowNs: now)
    }

    @Test func interruptInjectionBoosts() {
        #expect(d.decide(event: .interruptInjection(vector: 40), view: view([])) == .boost())
        #expect(d.decide(event: .interruptInjection(vector: 40), view: view([], boosted: true, since: 1)) == .none)
        // Even for a guest without an area.
        #expect(d.decide(event: .interruptInjection(vector: 40), view: VCPUView(vcpu: 0, guest: nil, boosted: false, nowNs: 0)) == .boost())
    }

    @Test(arguments: [GuestVCPUState.Flags.inIRQ, .inSoftIRQ, .inNMI, .rtTaskRunning, .boostRequest])
    func latencyFlagsBoost(flag: GuestVCPUState.Flags) {
        #expect(d.decide(event: .vmExit(.halt), view: view(flag)) == .boost())
        #expect(d.decide(event: .vmEntry, view: view(flag, boosted: true, since: 1)) == .none)
    }

    @Test func unboostsWhenNothingHoldsAtAGuestCausedExit() {
        for e in [VCPUEvent.vmExit(.io(port: 0x530, write: true)), .vmExit(.doorbell), .vmExit(.halt), .halt,
                  .vmExit(.mmio(address: 0, write: false))] {
            #expect(d.decide(event: e, view: view([], boosted: true, since: 9_000)) == .unboost)
            #expect(d.decide(event: e, view: view([.idle], boosted: true, since: 9_000)) == .unboost)
            #expect(d.decide(event: e, view: view([])) == .none)
        }
    }

    @Test func keepsAnInjectionBoostUntilTheGuestHasRun() {
        // Right after an injection the guest still looks idle: entry and host-caused exits keep the boost.
        for e in [VCPUEvent.vmEntry, .vmExit(.intr), .vmExit(.interruptWindow)] {
            #expect(d.decide(event: e, view: view([.idle], boosted: true, since: 9_000)) == .none)
        }
        // A halt seen after an injection the guest has not taken yet does not end the boost.
        var pending = view([.idle], boosted: true, since: 9_000)
        pending.pendingVectors = [48]
        #expect(d.decide(event: .halt, view: pending) == .none)
        #expect(d.decide(event: .vmExit(.halt), view: pending) == .none)
        // But they may start one the guest asks for.
        #expect(d.decide(event: .vmEntry, view: view([.boostRequest])) == .boost())
    }

    @Test func preemptDisabledKeepsABoostUpToTheCap() {
        let exit = VCPUEvent.vmExit(.io(port: 0x510, write: false))
        #expect(d.decide(event: exit, view: view([.preemptDisabled])) == .none)  // does not start one
        #expect(d.decide(event: exit, view: view([.preemptDisabled], boosted: true, since: 9_500)) == .none)
        #expect(d.decide(event: exit, view: view([.preemptDisabled], boosted: true, since: 8_000)) == .unboost)
    }

    @Test func nearDeadlineBoosts() {
        #expect(d.decide(event: .halt, view: view([], deadline: 1_400, clock: 1_000)) == .boost())
        #expect(d.decide(event: .halt, view: view([], deadline: 5_000, clock: 1_000)) == .none)
    }

    @Test func drivesABindingEndToEnd() throws {
        let r = DriverRegistry()
        try BuiltinDrivers.registerAll(in: r)
        let act = RecordingActuator()
        let b = try r.bind(vm: VMHandle(id: 7, name: "e2e", vcpuCount: 1), actuator: act)
        b.setThread(ThreadID(55), vcpu: 0)
        let buf = SharedAreaBuffer(vcpus: 1)
        b.setArea(try SharedArea(validating: buf.bytes))
        #expect(b.notify(.interruptInjection(vector: 33), vcpu: 0) == .boosted)
        #expect(b.notify(.vmEntry, vcpu: 0) == .unchanged)
        buf.writer.setFlags(vcpu: 0, [.inIRQ])
        #expect(b.notify(.vmExit(.io(port: 0x510, write: true)), vcpu: 0) == .unchanged)
        buf.writer.setFlags(vcpu: 0, [])
        #expect(b.notify(.vmExit(.doorbell), vcpu: 0) == .unboosted)
        #expect(act.calls == [.apply(.fifo(priority: 10), ThreadID(55)), .restore(ThreadID(55))])
    }
}

@Suite struct NopDriverTests {
    @Test func decidesNothingForEveryEvent() {
        let d = NopDriver()
        #expect(d.events == .all)
        for e in [VCPUEvent.vmEntry, .vmExit(.halt), .halt, .interruptInjection(vector: 1)] {
            #expect(d.decide(event: e, view: VCPUView(vcpu: 0, guest: GuestVCPUState(flags: [.rtTaskRunning]), boosted: false, nowNs: 0)) == .none)
        }
    }
}
