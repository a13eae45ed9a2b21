import PVSchedABI
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedHost
import PVSchedLinux
import Synchronization
import PVSchedTesting
import Testing
import Glibc
@testable import PVSchedKVM

let kvmAvailable = KVMSystem.isAvailable
let rtAvailable = LinuxScheduling.canUseRealTime

/// A driver that makes latency-boost's decisions and records every call, per vCPU.
final class RecordingDriver: Driver {
    let name: String
    let protocolName = PVSCHED_PROTOCOL_LATENCY_NAME
    let protocolVersion = ProtocolVersion.latencyProtocol
    let events: EventMask = .all
    private let inner = LatencyBoostDriver()
    let log = Mutex<[[String]]>(Array(repeating: [], count: 16))

    init(name: String) { self.name = name }
    func attach(vcpu: VCPUHandle) { log.withLock { $0[vcpu.index].append("attach") } }
    func detach(vcpu: VCPUHandle) { log.withLock { $0[vcpu.index].append("detach") } }
    func decide(event: VCPUEvent, view: VCPUView) -> Decision {
        let d = inner.decide(event: event, view: view)
        log.withLock { $0[view.vcpu].append(Self.describe(event)) }
        return d
    }
    static func describe(_ e: VCPUEvent) -> String {
        switch e {
        case .vmEntry: return "entry"
        case .vmExit(.doorbell): return "exit:doorbell"
        case .vmExit(.io): return "exit:io"
        case .vmExit(.halt): return "exit:halt"
        case .vmExit(let r): return "exit:\(r)"
        case .halt: return "halt"
        case .interruptInjection(let v): return "inject:\(v)"
        case .guestUpdate: return "guest-update"
        case .deadline: return "deadline"
        }
    }
    func events(vcpu: Int) -> [String] { log.withLock { $0[vcpu] } }
}

/// Wraps the Linux actuator and reads back each thread's real policy after every change.
final class CheckingActuator: Actuator {
    let inner = LinuxActuator()
    let seen = Mutex<[(ThreadID, SchedulingParameters?)]>([])
    func apply(_ p: SchedulingParameters, to t: ThreadID) throws(ActuatorError) {
        try inner.apply(p, to: t)
        let real = try? LinuxScheduling.parameters(of: t)
        seen.withLock { $0.append((t, real)) }
    }
    func restore(_ t: ThreadID) throws(ActuatorError) {
        let wasBoosted = inner.applied(to: t) != nil
        try inner.restore(t)
        if wasBoosted {
            let real = try? LinuxScheduling.parameters(of: t)
            seen.withLock { $0.append((t, real)) }
        }
    }
    func restoreAll() { inner.restoreAll() }
    func applied(to t: ThreadID) -> SchedulingParameters? { inner.applied(to: t) }
}

func bootGuest(vcpus: Int, arg: UInt32 = 0, workload: Workload = .selftest, driver: (any Driver)? = nil,
               actuator: (any Actuator)? = nil, irqchip: Bool = false, durationMs: UInt64 = 200,
               governor: GovernorConfig = .default,
               setUp: (VirtualMachine, DriverRegistry) throws -> Void = { _, _ in })
    throws -> (VirtualMachine, VMOutcome, DriverRegistry) {
    var config = VMConfiguration(image: GuestImage.kernel)
    config.vcpus = vcpus
    config.boot.workload = workload
    config.boot.arg = arg
    config.boot.durationNs = durationMs * 1_000_000
    config.interrupts = irqchip ? .inKernelIRQChip : .userspace
    let host = try PVSchedHost(actuator: actuator ?? RecordingActuator())
    let registry = host.registry
    if let driver { try registry.register(driver); try registry.setDefault(driver.name) }
    let vm = try host.makeVM(config: config, governor: governor)
    try setUp(vm, registry)
    try vm.start()
    let outcome = vm.wait(timeoutNs: 30_000_000_000)
    return (vm, outcome, registry)
}

@Suite(.serialized, .enabled(if: Requirement.kvm.shouldRun, "\(Requirement.kvm.reason)"))
struct VMBootTests {
    @Test(arguments: [1, 2])
    func selftestBootsRegistersAndIsBoostedThenDeboosted(vcpus: Int) throws {
        let driver = RecordingDriver(name: "recording")
        // No budget: on a loaded test machine a boost may outlive the default cap and be cut
        // (which the governor tests cover); this test is about events and the doorbell.
        let (vm, outcome, _) = try bootGuest(vcpus: vcpus, driver: driver, governor: .unlimited)
        #expect(outcome == .exited(code: 0))
        let console = vm.consoleOutput
        #expect(console.contains("pvsched guest: vCPU 0 of \(vcpus), workload 0"))
        #expect(console.contains("area registered: accepted"))
        for i in 0..<vcpus {
            // The guest saw itself boosted while its RT task ran, and back to normal after the doorbell.
            #expect(console.contains("vCPU \(i) host status with rt task: \(PVSCHED_STATUS_BOOSTED)"))
            #expect(console.contains("vCPU \(i) rang doorbell, host status now: \(PVSCHED_STATUS_NORMAL)"))
            let events = driver.events(vcpu: i)
            #expect(events.first == "attach")
            #expect(events.dropFirst().first == "entry")
            #expect(events.contains("exit:doorbell"))
            #expect(events.last == "detach")
            // Every exit follows an entry; entries and exits alternate.
            let runs = events.filter { $0 == "entry" || $0.hasPrefix("exit:") }
            for (k, e) in runs.enumerated() { #expect((k % 2 == 0) == (e == "entry"), "event \(k): \(e)") }
        }
        #expect(console.hasSuffix("pvsched guest: done\n"))
        #expect(vm.pvschedDevice.doorbellCount == UInt64(vcpus))
    }

    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func boostChangesTheRealThreadPolicyAndRestoresIt() throws {
        let act = CheckingActuator()
        let (_, outcome, _) = try bootGuest(vcpus: 2, actuator: act, governor: .unlimited)
        #expect(outcome == .exited(code: 0))
        let seen = act.seen.withLock { $0 }
        let threads = Set(seen.map(\.0))
        #expect(threads.count == 2)
        for t in threads {
            // Per vCPU thread: really SCHED_FIFO after each boost, really back to the original after each restore.
            let policies = seen.filter { $0.0 == t }.map(\.1)
            #expect(policies.contains(.fifo(priority: 10)))
            #expect(policies.last == .other(nice: 0))
            for (k, p) in policies.enumerated() { #expect((k % 2 == 0) == (p == .fifo(priority: 10))) }
        }
    }

    @Test func interruptsAreInjectedAfterTheDriverIsTold() throws {
        let driver = RecordingDriver(name: "recording")
        let (vm, outcome, _) = try bootGuest(vcpus: 2, arg: PVSCHED_SELFTEST_INTERRUPTS, driver: driver)
        #expect(outcome == .exited(code: 0))
        for i in 0..<2 {
            #expect(vm.consoleOutput.contains("vCPU \(i) timer interrupts: 3"))
            let events = driver.events(vcpu: i)
            // A halted vCPU is woken by an injection the driver heard about first.
            let timer = "inject:\(PVSCHED_VECTOR_TIMER)"
            #expect(events.filter { $0 == timer }.count >= 3)
            if let h = events.firstIndex(of: "halt"), let j = events[h...].firstIndex(of: timer) {
                #expect(events[j...].dropFirst().contains("entry"))
            } else {
                Issue.record("no halt followed by a timer injection on vCPU \(i)")
            }
        }
    }

    @Test func inKernelIRQChipDeliversTimerInterrupts() throws {
        let (vm, outcome, _) = try bootGuest(vcpus: 2, arg: PVSCHED_SELFTEST_INTERRUPTS, irqchip: true)
        #expect(outcome == .exited(code: 0))
        #expect(vm.consoleOutput.contains("vCPU 1 timer interrupts: 3"))
    }

    @Test(arguments: [(PVSCHED_SELFTEST_BAD_MAGIC, PVSCHED_REASON_BAD_HEADER, "magic"),
                      (PVSCHED_SELFTEST_OUT_OF_RAM, PVSCHED_REASON_OUT_OF_RAM, "not inside guest RAM")])
    func malformedAreaIsRefusedWithAReasonAndTheVMKeepsRunning(variant: UInt32, reason: UInt32, text: String) throws {
        let (vm, outcome, _) = try bootGuest(vcpus: 1, arg: variant)
        #expect(outcome == .exited(code: 0))
        #expect(vm.consoleOutput.contains("area registered: refused, reason \(reason)"))
        #expect(vm.pvschedDevice.log.last?.contains(text) == true)
        #expect(vm.consoleOutput.contains("pvsched guest: done"))
    }

    @Test func garbageFlagsDisablePvschedForTheVMOnly() throws {
        let act = RecordingActuator()
        var binding: VMBinding?
        let (vm, outcome, _) = try bootGuest(vcpus: 1, arg: PVSCHED_SELFTEST_BAD_FLAGS, actuator: act) { vm, registry in
            binding = registry.binding(vm: vm.handle.id)
        }
        #expect(outcome == .exited(code: 0))
        #expect(vm.consoleOutput.contains("wrote unknown flag bits"))
        #expect(binding?.disabledReason == .unknownFlags(vcpu: 0, bits: 0x8000_0000))
        #expect(act.calls.allSatisfy { if case .apply = $0 { return false } else { return true } })
    }

    @Test func workloadResultsComeBack() throws {
        let (vm, outcome, _) = try bootGuest(vcpus: 2, workload: .cyclic, durationMs: 300)
        #expect(outcome == .exited(code: 0))
        let results = try #require(try vm.readResults())
        for r in results.vcpus {
            #expect(r.workload == .cyclic)
            #expect(r.samples > 20 && r.samples <= 300)
            #expect(r.rawSamplesNs.count == Int(r.samples))
            #expect(r.latenessMaxNs >= r.latenessMinNs)
            #expect(r.histogram.reduce(0, +) == r.samples)
        }
    }

    @Test func replacingTheDriverWhileTheVMRunsIsSafe() throws {
        let act = RecordingActuator()
        let swaps = Mutex(0)
        let (vm, outcome, registry) = try bootGuest(vcpus: 2, workload: .cyclic, actuator: act, durationMs: 600) { vm, registry in
            let id = vm.handle.id
            _ = try PVSchedCore.Thread {
                for k in 0..<40 {
                    _ = try? registry.assign(k % 2 == 0 ? "nop" : "latency-boost", to: id)
                    swaps.withLock { $0 += 1 }
                    usleep(10_000)
                }
            }
        }
        #expect(outcome == .exited(code: 0))
        #expect(swaps.withLock { $0 } > 10)
        #expect(registry.binding(vm: vm.handle.id) == nil)
        // Every boost was undone: the last call for each thread is a restore.
        var last: [ThreadID: RecordingActuator.Call] = [:]
        for c in act.calls {
            switch c {
            case .apply(_, let t): last[t] = c
            case .restore(let t): last[t] = c
            }
        }
        #expect(last.values.allSatisfy { if case .restore = $0 { return true } else { return false } })
    }
}
