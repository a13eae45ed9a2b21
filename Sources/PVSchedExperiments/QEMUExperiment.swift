import Histogram
import PVSchedAttach
import PVSchedCore
import PVSchedHost
import PVSchedLinux

#if canImport(Glibc)
import Glibc
#endif

extension CyclictestOutput {
    /// The latencies as a histogram in ns; samples past the last bucket count at the max.
    var histogram: Histogram<UInt64> {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000)
        for (us, count) in buckets where count > 0 { _ = h.record(us * 1000, count: count) }
        if overflows > 0 { _ = h.record(maxUs * 1000, count: overflows) }
        return h
    }
}

extension ExperimentRunner {
    /// One mode with the Linux guest under unmodified QEMU (TCG): cyclictest on
    /// vCPU 0 in the guest, the same host contention and probes as the built-in
    /// demo, and pvsched attached as the daemon would (QMP threads, the ivshmem
    /// region, the watcher, QEMU's main loop boosted with the vCPUs).
    func runQEMU(_ mode: Mode, index: Int, image: LinuxGuestImage) throws -> ModeResult {
        if case .kernel = mode { throw LinuxGuestError("kernel:DRIVER modes need KVM exits; QEMU runs under TCG here") }
        let managed = mode.pvsched(in: scenario)
        let contended = mode != .idle
        let (options, seconds) = cyclictestGuest(served: managed != nil)
        let guest = try QEMULinuxGuest(image: image, options: options)
        let host = try PVSchedHost(actuator: LinuxActuator())
        let endpoint = try QMPEndpoint(socket: guest.qmpPath)
        let threads = try endpoint.vcpuThreads()
        for (i, t) in threads.vcpus.enumerated() { try? host.threads.setAffinity(ThreadID(t), mask: scenario.cpuMask(vcpu: i)) }

        // Attached as the daemon attaches it: QMP threads, the ivshmem region watched,
        // QEMU's main loop boosted with the vCPUs (TCG: it delivers the guest's timers).
        var session: AttachedVMSession?
        if let managed {
            session = try host.attach(VMSpec(name: "qemu", source: .endpoint(endpoint), area: .ivshmem(path: guest.shmPath), events: .watcher,
                                             driver: managed.driver, governor: managed.governor, boost: managed.boost))
        }
        defer {
            session?.stop()
            host.shutdown()
        }
        let started = MonotonicClock.nowNs()
        let bootLimit = started + 90_000_000_000
        while !guest.console.contains("PVS-READY") {
            guard guest.process.isRunning, MonotonicClock.nowNs() < bootLimit else {
                throw LinuxGuestError("the Linux guest did not get ready (mode \(mode)): \(guest.console.suffix(400))")
            }
            progress?(mode, index, 0)
            usleep(100_000)
        }
        let (load, probes) = try hostLoadAndProbes(contended: contended)
        let runStart = MonotonicClock.nowNs()
        let limit = runStart + UInt64(seconds + 120) * 1_000_000_000
        while !guest.console.contains("PVS-END cyclictest") && guest.process.isRunning && MonotonicClock.nowNs() < limit {
            progress?(mode, index, Double(MonotonicClock.nowNs() - runStart) / 1e9)
            usleep(100_000)
        }
        let measured = finish(load, probes)
        let t = session?.binding?.totals ?? VCPUStats()
        guard let out = guest.section("cyclictest") else {
            throw LinuxGuestError("no cyclictest result from the guest (mode \(mode)): \(guest.console.suffix(400))")
        }
        guest.waitForExit(timeout: 10)
        return try ModeResult(linuxGuest: mode, cyclictest: out, host: measured,
                              totals: ServedTotals(boosts: t.boostCount, boostedNs: t.boostedNs, repayments: t.repayments,
                                                   repaymentNs: t.repaymentNs, throttles: t.throttleCount),
                              outcome: session?.watch.map { "\($0.phase)" } ?? "QEMU, no pvsched")
    }

    /// The Linux guest's options for the scenario: cyclictest on vCPU 0 at the
    /// scenario's interval for its duration (whole seconds), waiting for the host's
    /// answer when pvsched serves it.
    func cyclictestGuest(served: Bool) -> (options: LinuxGuestOptions, seconds: Int) {
        let seconds = max(1, Int((Double(scenario.durationNs) / 1e9).rounded()))
        var options = LinuxGuestOptions()
        options.vcpus = scenario.vcpus
        options.run = "cyclictest"
        options.intervalUs = Int(scenario.intervalNs / 1000)
        options.durationS = seconds
        options.waitForHostS = served ? 20 : 0
        return (options, seconds)
    }

    /// The busy host threads (when `contended`) and a latency probe on every CPU of the scenario.
    func hostLoadAndProbes(contended: Bool) throws -> (load: [HostContention], probes: [HostLatencyProbe]) {
        let load = contended ? try scenario.cpus.map { try HostContention(threads: scenario.busyThreads, cpuMask: 1 << UInt64($0)) } : []
        let probes = try scenario.cpus.map {
            try HostLatencyProbe(cpuMask: 1 << UInt64($0), intervalNs: scenario.intervalNs, priority: scenario.probePriority)
        }
        return (load, probes)
    }

    /// Stops the host threads and probes: the probes' latencies and the work done.
    func finish(_ load: [HostContention], _ probes: [HostLatencyProbe]) -> (latency: Histogram<UInt64>, throughput: Double) {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000)
        for p in probes { h.add(p.finish()) }
        return (h, load.map { $0.finish() }.reduce(0, +))
    }
}

/// What pvsched did for a VM in one run (all zero without pvsched).
struct ServedTotals {
    var boosts: UInt64 = 0, boostedNs: UInt64 = 0, repayments: UInt64 = 0, repaymentNs: UInt64 = 0, throttles: UInt64 = 0
}

extension ModeResult {
    /// A run of the Linux guest: cyclictest's histogram (its console section), the host
    /// probes' latencies and work, and what pvsched did.
    init(linuxGuest mode: Mode, cyclictest out: String, host: (latency: Histogram<UInt64>, throughput: Double),
         totals: ServedTotals, outcome: String) throws {
        let guest: Histogram<UInt64>
        do { guest = try CyclictestOutput.parse(out).histogram } catch { throw LinuxGuestError("\(error)") }
        self.init(mode: mode.description, guestLatency: LatencySummary(guest), hostLatency: LatencySummary(host.latency),
                  hostThroughput: host.throughput, guestBatchThroughput: 0, boostCount: totals.boosts,
                  boostedMs: Double(totals.boostedNs) / 1e6, repaymentMs: Double(totals.repaymentNs) / 1e6,
                  repayments: totals.repayments, throttleCount: totals.throttles, exits: 0, outcome: outcome)
    }
}
