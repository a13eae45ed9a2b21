import CKernelBPF
import Foundation
import PVSchedABI
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedHost
import PVSchedKVM
import Synchronization
import PVSchedTesting
import Testing
@testable import PVSchedBPF

/// clang from the Swift toolchain (or PATH), which builds BPF objects.
let clangPath: String? = {
    var candidates = ["/opt/swift/usr/bin/clang"]
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") { candidates.append("\(dir)/clang") }
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

/// Compiles BPF/latency_boost.bpf.c with clang and returns the object's bytes.
func compileSamplePolicy() throws -> [UInt8] {
    let out = FileManager.default.temporaryDirectory.appendingPathComponent("latency_boost-\(UUID().uuidString).bpf.o")
    let p = Process()
    p.executableURL = URL(fileURLWithPath: clangPath!)
    p.arguments = ["-target", "bpf", "-O2", "-ffreestanding", "-I", packageRoot.appendingPathComponent("Sources/PVSchedABI/include").path,
                   "-c", packageRoot.appendingPathComponent("BPF/latency_boost.bpf.c").path, "-o", out.path]
    try p.run()
    p.waitUntilExit()
    guard p.terminationStatus == 0, let data = FileManager.default.contents(atPath: out.path) else {
        throw BPFError.elf("clang failed with status \(p.terminationStatus)")
    }
    try? FileManager.default.removeItem(at: out)
    return [UInt8](data)
}

@Suite(.enabled(if: clangPath != nil, "needs clang (the Swift toolchain's) to build the BPF sample"))
struct SamplePolicyTests {
    @Test func loadsAndVerifies() throws {
        let d = try BPFDriver(elf: try compileSamplePolicy())
        #expect(d.name == "bpf-latency-boost")
        #expect(d.events == .all)
        #expect(d.protocolVersion == .latencyProtocol)
        #expect(d.maps.map(\.definition.name) == ["decisions"])
    }

    @Test func makesTheSameDecisionsAsTheBuiltInDriver() throws {
        let bpf = try BPFDriver(elf: try compileSamplePolicy())
        let builtin = LatencyBoostDriver()
        let events: [VCPUEvent] = [.vmEntry, .vmExit(.io(port: 0x530, write: true)), .vmExit(.mmio(address: 0xFEE0_0000, write: true)),
                                   .vmExit(.halt), .vmExit(.doorbell), .vmExit(.intr), .vmExit(.interruptWindow),
                                   .vmExit(.other(code: 9)), .halt, .interruptInjection(vector: 48)]
        var compared = 0
        var counts = [UInt64](repeating: 0, count: 3)
        for e in events {
            for flags in 0..<UInt32(128) {
                for boosted in [false, true] {
                    for pending in [false, true] {
                        for age: UInt64 in [0, 500_000, 999_999, 1_000_000, 5_000_000] {
                            for hasGuest in [false, true] where hasGuest || flags == 0 {
                                let guest = hasGuest ? GuestVCPUState(flags: .init(rawValue: flags), task: .fifo(priority: 3),
                                                                      nextDeadlineNs: 77, guestClockNs: 70) : nil
                                let view = VCPUView(vcpu: 1, guest: guest, boosted: boosted,
                                                    boostedSinceNs: boosted ? 10_000_000 - age : nil, nowNs: 10_000_000,
                                                    pendingVectors: pending ? [48] : [])
                                let expected = builtin.decide(event: e, view: view)
                                #expect(bpf.decide(event: e, view: view) == expected, "\(e) flags \(flags) boosted \(boosted) pending \(pending) age \(age)")
                                switch expected { case .none: counts[0] += 1; case .boost: counts[1] += 1; case .unboost: counts[2] += 1 }
                                compared += 1
                            }
                        }
                    }
                }
            }
        }
        #expect(compared > 20_000)
        #expect(bpf.failureCount == 0)
        // The program counted its decisions in its array map.
        #expect((0..<3).map { bpf.maps[0].words(at: UInt32($0))[0] } == counts)
    }

    @Test(.enabled(if: Requirement.kvm.shouldRun, "\(Requirement.kvm.reason)"))
    func drivesAVMAndCanBeReplacedWhileItRuns() throws {
        let bpf = try BPFDriver(elf: try compileSamplePolicy())
        var config = VMConfiguration(image: GuestImage.kernel)
        config.vcpus = 2
        config.boot.workload = .cyclic
        config.boot.durationNs = 1_500_000_000
        config.boot.intervalNs = 2_000_000
        let act = RecordingActuator()
        let host = try PVSchedHost(actuator: act)
        let registry = host.registry
        try registry.register(bpf)
        let vm = try host.makeVM(config: config, driver: bpf.name, governor: .unlimited)
        try vm.start()
        // Wait until the BPF driver has boosted (the guest boots slowly on a loaded machine)...
        let deadline = MonotonicClock.nowNs() + 10_000_000_000
        while bpf.maps[0].words(at: 1)[0] == 0 && MonotonicClock.nowNs() < deadline && vm.outcome == nil { usleep(1000) }
        let boostsBefore = bpf.maps[0].words(at: 1)[0]
        // ...then swap it out and back in, and unload it for good, while the VM runs.
        try registry.assign("latency-boost", to: vm.handle.id)
        try registry.assign(bpf.name, to: vm.handle.id)
        usleep(50_000)
        _ = try registry.unregister(bpf.name, force: true)
        #expect(vm.wait(timeoutNs: 20_000_000_000) == .exited(code: 0))
        #expect(boostsBefore > 0)
        #expect(bpf.failureCount == 0)
        #expect(registry.driver(named: bpf.name) == nil)
        #expect(act.calls.contains(.apply(.fifo(priority: 10), ThreadID(act.calls.compactMap {
            if case .apply(_, let t) = $0 { return t.rawValue } else { return nil } }.first ?? 0))))
    }
}

/// The deadline-aware policy in BPF (BPF/deadline_boost.bpf.c, embedded) against
/// the built-in `DeadlineBoostDriver`, on every combination that matters.
struct DeadlinePolicyTests {
    @Test func makesTheSameDecisionsAsTheBuiltInDriver() throws {
        let bpf = try BPFDriver(elf: GuestImage.deadlineBPFDriver)
        #expect(bpf.name == "bpf-deadline-boost")
        #expect(bpf.events == .all)
        let builtin = DeadlineBoostDriver()
        let events: [VCPUEvent] = [.vmEntry, .vmExit(.io(port: 0x530, write: true)), .vmExit(.halt), .vmExit(.doorbell),
                                   .vmExit(.intr), .halt, .interruptInjection(vector: 0x30), .interruptInjection(vector: 0x31),
                                   .interruptInjection(vector: 0xEC), .guestUpdate, .deadline(inNs: 100_000)]
        var compared = 0, boosts = 0, unboosts = 0
        for e in events {
            for flags in [0, 1, 2, 8, 16, 32, 64, 0x41, 0x50] as [UInt32] {
                for boosted in [false, true] {
                    for pending: InterruptVectors in [[], [0x30], [0x31], [0xEC], [0x30, 0xEC], [0x30, 0x31], [0xEC, 0xFF], [0x70]] {
                        for (deadline, now): (UInt64?, UInt64?) in [(nil, 5_000_000), (5_200_000, 5_000_000), (5_600_000, 5_000_000),
                                                                    (4_000_000, 5_000_000), (5_100_000, nil)] {
                            for hasGuest in [false, true] where hasGuest || flags == 0 {
                                let guest = hasGuest ? GuestVCPUState(flags: .init(rawValue: flags), task: .normal(nice: 0),
                                                                      nextDeadlineNs: deadline, guestClockNs: 4_900_000) : nil
                                let view = VCPUView(vcpu: 0, guest: guest, boosted: boosted, boostedSinceNs: boosted ? 1 : nil,
                                                    nowNs: 10_000_000, pendingVectors: pending, guestNowNs: now)
                                let expected = builtin.decide(event: e, view: view)
                                #expect(bpf.decide(event: e, view: view) == expected, "\(e) flags \(flags) boosted \(boosted) pending \(pending) deadline \(String(describing: deadline)) now \(String(describing: now))")
                                if case .boost = expected { boosts += 1 }
                                if expected == .unboost { unboosts += 1 }
                                compared += 1
                            }
                        }
                    }
                }
            }
        }
        #expect(compared > 1000 && boosts > 100 && unboosts > 50)
        #expect(bpf.failureCount == 0)
    }

    @Test func aTimerTickFarFromTheRTDeadlineDoesNotBoostButOneThatServesItDoes() {
        let d = DeadlineBoostDriver()
        func view(deadlineIn: Int64?, flags: GuestVCPUState.Flags = [], boosted: Bool = false) -> VCPUView {
            let now: UInt64 = 50_000_000
            let g = GuestVCPUState(flags: flags, nextDeadlineNs: deadlineIn.map { UInt64(Int64(now) + $0) }, guestClockNs: now - 1000)
            return VCPUView(vcpu: 0, guest: g, boosted: boosted, boostedSinceNs: boosted ? 1 : nil, nowNs: 9, guestNowNs: now)
        }
        #expect(d.decide(event: .interruptInjection(vector: 0x30), view: view(deadlineIn: 4_000_000)) == .none)
        #expect(d.decide(event: .interruptInjection(vector: 0x30), view: view(deadlineIn: 100_000)) == .boost())
        #expect(d.decide(event: .interruptInjection(vector: 0x30), view: view(deadlineIn: -20_000)) == .boost(), "an overdue deadline")
        #expect(d.decide(event: .interruptInjection(vector: 0x30), view: view(deadlineIn: nil)) == .none, "no RT task sleeps")
        #expect(d.decide(event: .interruptInjection(vector: 0x31), view: view(deadlineIn: nil)) == .boost(), "a device interrupt")
        #expect(d.decide(event: .vmExit(.io(port: 1, write: true)), view: view(deadlineIn: nil, flags: [.inIRQ])) == .none,
                "irq alone does not boost")
        #expect(d.decide(event: .vmExit(.io(port: 0x531, write: false)), view: view(deadlineIn: nil, flags: [.inIRQ], boosted: true)) == .none,
                "the handler of the interrupt a boost is for keeps it when it reads a device register")
        #expect(d.decide(event: .vmExit(.io(port: 0x530, write: true)), view: view(deadlineIn: nil, boosted: true)) == .unboost,
                "the handler is done: the boost ends")
        #expect(d.decide(event: .vmExit(.doorbell), view: view(deadlineIn: 900_000, boosted: true)) == .unboost,
                "RT work done, the next deadline is far: the boost ends")
        #expect(d.decide(event: .vmExit(.doorbell), view: view(deadlineIn: 900_000, flags: [.rtTaskRunning], boosted: true)) == .none)
    }

    /// An interrupt the guest has not taken yet holds a boost only if it would boost
    /// by itself: a round-robin tick queued while the RT task ran did not, and held
    /// the boost through the batch work after it until the governor cut it.
    @Test func aPendingTickDoesNotHoldABoostButAPendingDeviceInterruptOrDeadlineTimerDoes() {
        let d = DeadlineBoostDriver()
        func done(deadlineIn: Int64, pending: InterruptVectors) -> VCPUView {
            let now: UInt64 = 50_000_000
            let g = GuestVCPUState(flags: [], nextDeadlineNs: UInt64(Int64(now) + deadlineIn), guestClockNs: now - 1000)
            return VCPUView(vcpu: 0, guest: g, boosted: true, boostedSinceNs: 1, nowNs: 9, pendingVectors: pending, guestNowNs: now)
        }
        let doorbell = VCPUEvent.vmExit(.doorbell)
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 4_000_000, pending: [0x30])) == .unboost, "a tick")
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 4_000_000, pending: [0xEC])) == .unboost, "Linux's tick")
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 4_000_000, pending: [0x31])) == .none, "a device's interrupt")
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 4_000_000, pending: [0x30, 0x31])) == .none)
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 100_000, pending: [0x30])) == .none, "the timer of the deadline")
        #expect(d.decide(event: doorbell, view: done(deadlineIn: 4_000_000, pending: [])) == .unboost)
    }
}
