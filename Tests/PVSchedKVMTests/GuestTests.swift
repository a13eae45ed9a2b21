import PVSchedABI
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedHost
import Synchronization
import PVSchedTesting
import Testing
import Glibc
@testable import PVSchedKVM

/// Boots the guest with `perVCPU` workloads and samples every vCPU's shared area from a host thread while it runs.
func runGuest(_ perVCPU: [Workload], durationMs: UInt64 = 400, intervalUs: UInt64 = 2000, irqchip: Bool = false)
    throws -> (VirtualMachine, VMOutcome, [[GuestVCPUState]]) {
    var config = VMConfiguration(image: GuestImage.kernel)
    config.vcpus = perVCPU.count
    config.boot.perVCPU = perVCPU
    config.boot.durationNs = durationMs * 1_000_000
    config.boot.intervalNs = intervalUs * 1000
    config.interrupts = irqchip ? .inKernelIRQChip : .userspace
    let host = try PVSchedHost(actuator: RecordingActuator())
    let vm = try host.makeVM(config: config, governor: .unlimited)
    let samples = Mutex<[[GuestVCPUState]]>(Array(repeating: [], count: perVCPU.count))
    let stop = Atomic(false)
    let binding = host.binding(of: vm)!
    try vm.start()
    let sampler = try PVSchedCore.Thread {
        while !stop.load(ordering: .relaxed) {
            if let area = binding.area {
                for i in 0..<perVCPU.count {
                    if let s = try? area.read(vcpu: i) { samples.withLock { $0[i].append(s) } }
                }
            }
            usleep(200)
        }
    }
    let outcome = vm.wait(timeoutNs: 30_000_000_000)
    stop.store(true, ordering: .relaxed)
    sampler.join()
    return (vm, outcome, samples.withLock { $0 })
}

@Suite(.serialized, .enabled(if: Requirement.kvm.shouldRun, "\(Requirement.kvm.reason)"))
struct GuestWorkloadTests {
    @Test(arguments: [1, 2])
    func cyclicWakesEveryIntervalAndReportsItsRTTask(vcpus: Int) throws {
        let (vm, outcome, seen) = try runGuest(Array(repeating: .cyclic, count: vcpus))
        #expect(outcome == .exited(code: 0))
        let results = try #require(try vm.readResults())
        for r in results.vcpus {
            #expect(r.workload == .cyclic)
            // 400 ms at 2 ms: never more wake-ups than periods (under PVM, a wake-up costs ~1 ms of
            // emulated guest time, and CI runs suites in parallel: the lower bound is loose).
            #expect(r.samples <= 200 && r.samples >= 20, "\(r.samples) samples")
            #expect(r.latenessMaxNs < 400_000_000)
            #expect(r.latenessMinNs <= r.latenessMaxNs)
            #expect(r.rawSamplesNs.count == Int(r.samples))
            // The host saw the RT task running at FIFO 50, and the vCPU idle with the task's next deadline.
            let states = seen[r.vcpu]
            #expect(states.contains { $0.flags.contains(.rtTaskRunning) && $0.task == .fifo(priority: 50) })
            #expect(states.contains { $0.flags.contains(.idle) && $0.nextDeadlineNs != nil && $0.task == .idle })
        }
    }

    @Test(arguments: [1, 2])
    func batchDoesWork(vcpus: Int) throws {
        let (vm, outcome, seen) = try runGuest(Array(repeating: .batch, count: vcpus), durationMs: 300)
        #expect(outcome == .exited(code: 0))
        for r in try #require(try vm.readResults()).vcpus {
            #expect(r.workload == .batch)
            #expect(r.workUnits > 0)
            #expect(r.samples == 0)
            #expect(seen[r.vcpu].contains { $0.task == .normal(nice: 0) && !$0.flags.contains(.rtTaskRunning) })
        }
    }

    @Test func anRTTaskPreemptsBatchTasksOnTheSameVCPU() throws {
        let (vm, outcome, seen) = try runGuest([.cyclicBatch, .batch], durationMs: 500)
        #expect(outcome == .exited(code: 0))
        let results = try #require(try vm.readResults())
        let mixed = results.vcpus[0]
        #expect(mixed.workload == .cyclicBatch)
        #expect(mixed.samples >= 20 && mixed.samples <= 250, "\(mixed.samples) samples")  // the RT task kept running...
        #expect(mixed.workUnits > 0)                                                       // ...and so did the batch tasks
        #expect(results.vcpus[1].workUnits > 0)
        #expect(seen[0].contains { $0.flags.contains(.rtTaskRunning) })
        #expect(seen[0].contains { $0.task == .normal(nice: 0) })
        #expect(seen[1].contains { $0.flags.contains(.preemptDisabled) })
    }

    @Test(arguments: [Workload.hostileStuck, .hostileFlip])
    func aHostileGuestGetsNoMoreThanItsBudget(_ hostile: Workload) throws {
        // vCPU 0 abuses the protocol (claims RT work and a boost request forever, or
        // flips them as fast as it can) under latency-boost and the default governor.
        var config = VMConfiguration(image: GuestImage.kernel)
        config.vcpus = 1
        config.boot.workload = hostile
        config.boot.durationNs = 600_000_000
        let act = RecordingActuator()
        let host = try PVSchedHost(actuator: act)
        let vm = try host.makeVM(config: config, driver: "latency-boost", governor: .default)
        let binding = try #require(host.binding(of: vm))
        try vm.start()
        let started = MonotonicClock.nowNs()
        #expect(vm.wait(timeoutNs: 30_000_000_000) == .exited(code: 0))
        let ran = MonotonicClock.nowNs() - started
        let stats = binding.stats(vcpu: 0)
        #expect(stats.boostCount > 0)
        // The budget refills 1:1 while unboosted: at most half the time, plus one budget, is boosted.
        let cfg = GovernorConfig.default
        #expect(stats.boostedNs <= ran / 2 + cfg.generalBudgetNs + 20_000_000, "boosted \(stats.boostedNs) ns of \(ran)")
        if hostile == .hostileStuck { #expect(stats.vetoesThrottled > 0) }
        #expect(try vm.readResults()?.vcpus[0].workUnits ?? 0 > 0)
        #expect(act.applied(to: binding.threads[0] ?? ThreadID(0)) == nil)
    }

    @Test func irqResponseAnswersEveryInterrupt() throws {
        let (vm, outcome, _) = try runGuest([.irqResponse, .irqResponse], durationMs: 400)
        #expect(outcome == .exited(code: 0))
        let latencies = vm.irqResponseLatencies
        #expect(latencies.count > 25)
        let handled = try #require(try vm.readResults()).vcpus.reduce(0) { $0 + $1.samples }
        #expect(handled >= UInt64(latencies.count))
        #expect(handled <= UInt64(latencies.count) + vm.irqResponseUnanswered + 2)
    }

    @Test func lapicTSCDeadlineTimerDrivesTheScheduler() throws {
        let (vm, outcome, _) = try runGuest([.cyclic, .cyclicBatch], durationMs: 300, irqchip: true)
        #expect(outcome == .exited(code: 0))
        for r in try #require(try vm.readResults()).vcpus {
            #expect(r.samples >= 15 && r.samples <= 150, "\(r.samples) samples")
        }
    }
}
