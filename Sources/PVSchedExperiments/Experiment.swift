import Foundation
import Histogram
import Logging
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedHost
import PVSchedKernelEvents
import PVSchedKVM
import PVSchedLinux

/// How the vCPU threads are scheduled in one part of an experiment.
public enum Mode: Hashable, Sendable, CustomStringConvertible {
    /// No host contention, no pvsched: the best the machine can do.
    case idle
    /// Host contention, no pvsched (the guest's registration is not offered).
    case vanilla
    /// Host contention, vCPU threads SCHED_FIFO all the time (RFC v1's static RT).
    case staticRT
    /// Host contention, pvsched with the named driver, boosting with `boost` (nil: the
    /// scenario's class). Written `DRIVER` or `DRIVER@CLASS`, e.g. `deadline-boost@slice:100`.
    case driver(String, boost: SchedulingParameters? = nil)
    /// Host contention, the named driver fed from KVM events the host kernel reports
    /// (BPF), as for a VM another process runs, instead of the VMM's own notifications.
    case kernel(String, boost: SchedulingParameters? = nil)

    public var description: String {
        switch self {
        case .idle: return "idle"
        case .vanilla: return "vanilla"
        case .staticRT: return "static-rt"
        case .driver(let n, let b): return n + Self.classSuffix(b)
        case .kernel(let n, let b): return "kernel:" + n + Self.classSuffix(b)
        }
    }

    private static func classSuffix(_ boost: SchedulingParameters?) -> String {
        boost.map { "@" + BoostSettings.classText($0) } ?? ""
    }

    /// Parses a mode; nil when a `@CLASS` suffix is not a boost class.
    public init?(_ text: String) {
        switch text {
        case "idle": self = .idle
        case "vanilla": self = .vanilla
        case "static-rt": self = .staticRT
        default:
            let kernel = text.hasPrefix("kernel:")
            let rest = kernel ? String(text.dropFirst("kernel:".count)) : text
            let parts = rest.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            guard !parts[0].isEmpty else { return nil }
            var boost: SchedulingParameters?
            if parts.count == 2 {
                guard let b = BoostSettings.parseClass(parts[1]) else { return nil }
                boost = b
            }
            self = kernel ? .kernel(parts[0], boost: boost) : .driver(parts[0], boost: boost)
        }
    }

    /// The driver a mode runs (static-rt's for static-rt), the boosts it makes and the
    /// governor that limits them (none for static-rt); nil without pvsched.
    func pvsched(in scenario: Scenario) -> (driver: String, boost: BoostSettings, governor: GovernorConfig)? {
        var boost = scenario.boost
        switch self {
        case .idle, .vanilla: return nil
        case .staticRT: return ("static-rt", BoostSettings(), .unlimited)
        case .driver(let n, let b), .kernel(let n, let b):
            if let b { boost.boosted = b }
            return (n, boost, scenario.governor)
        }
    }
}

/// The guest side of a scenario.
public enum GuestScenario: String, Sendable, CaseIterable {
    /// cyclictest on every vCPU.
    case cyclic
    /// Host device raises interrupts; every vCPU answers them.
    case irqResponse = "irq-response"
    /// vCPU 0 cyclictest, the other vCPUs CPU-bound batch work.
    case mixed
    /// vCPU 0 runs the cyclictest task and two batch tasks (the guest scheduler
    /// preempts batch for it); the other vCPUs batch. vCPU 0 is always runnable.
    case rtBatch = "rt+batch"
    /// A hostile guest: vCPU 0 claims real-time work and a boost request forever
    /// while it spins; vCPU 1 runs cyclictest.
    case hostileStuck = "hostile-stuck"
    /// A hostile guest: vCPU 0 flips its flags at a high rate, ringing the doorbell
    /// after each flip; vCPU 1 runs cyclictest.
    case hostileFlip = "hostile-flip"

    /// Whether the guest abuses the protocol (the host's protection is what counts).
    public var isHostile: Bool { self == .hostileStuck || self == .hostileFlip }
}

/// One experiment: a guest workload under host contention, run once per mode.
public struct Scenario: Sendable {
    public var guest: GuestScenario = .mixed
    public var vcpus = 2
    /// Busy host threads on each host CPU in `cpus`.
    public var busyThreads = 2
    /// Also run a second VM (1 vCPU, batch, no pvsched) on the same CPU.
    public var noisyVM = false
    public var durationNs: UInt64 = 4_000_000_000
    public var intervalNs: UInt64 = 5_000_000
    /// The host CPUs of the experiment: vCPU i runs on `cpus[i % cpus.count]`; each
    /// CPU also runs `busyThreads` busy threads and a latency probe.
    public var cpus: [Int] = Array((0..<min(64, Scenario.onlineCPUs)).reversed())
    /// SCHED_FIFO priority of the host latency probe (below the boost priority,
    /// so that boosting has a visible cost on the host); nil runs it SCHED_OTHER.
    public var probePriority: UInt8? = 1
    /// How the drivers' boosts are applied (class and protected host priorities).
    public var boost = BoostSettings()
    public var governor: GovernorConfig = .default
    public var modes: [Mode] = [.idle, .vanilla, .staticRT, .driver("latency-boost")]
    /// Where to write each pvsched run's driver trace (the last `traceCapacity`
    /// notifications of each vCPU and the enforcer's cuts, `SCENARIO-MODE-RUN.trace`); nil: none.
    public var traceDirectory: String?
    public var traceCapacity = 20_000
    /// The Linux guest under unmodified QEMU instead of the built-in VMM (nil):
    /// cyclictest on vCPU 0 (see `runQEMU`).
    public var qemuGuest: LinuxGuestImage?
    /// With `qemuGuest`: QEMU started by libvirtd as a domain (`runLibvirt`), not directly.
    public var libvirt = false
    /// More configuration lines for the daemon that serves the libvirt domain.
    public var daemonConfig = ""

    /// What the guest runs, for report headers.
    public var guestTitle: String {
        qemuGuest == nil ? guest.rawValue
            : libvirt ? "Linux as a libvirt domain (QEMU TCG), cyclictest on vCPU 0" : "Linux under QEMU (TCG), cyclictest on vCPU 0"
    }

    public init() {}

    public static var onlineCPUs: Int {
        Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    }
    func cpuMask(vcpu: Int) -> UInt64 { 1 << UInt64(cpus[vcpu % cpus.count]) }
}

/// Percentiles of a latency distribution, in ns.
public struct LatencySummary: Codable, Sendable {
    public var count: UInt64
    public var average: Double
    public var p50: UInt64
    public var p99: UInt64
    public var p999: UInt64
    public var max: UInt64
    /// (percentile, latency ns) points for plotting.
    public var curve: [[Double]]

    init(_ h: Histogram<UInt64>) {
        count = h.totalCount
        average = h.totalCount == 0 ? 0 : h.mean
        p50 = h.valueAtPercentile(50)
        p99 = h.valueAtPercentile(99)
        p999 = h.valueAtPercentile(99.9)
        max = h.max
        curve = []
        if h.totalCount > 0 {
            for p in [0.0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 100] {
                curve.append([p, Double(p == 100 ? h.max : h.valueAtPercentile(p))])
            }
        }
    }
}

/// What one mode measured.
public struct ModeResult: Codable, Sendable {
    public var mode: String
    public var guestLatency: LatencySummary
    public var hostLatency: LatencySummary
    /// Busy host threads' work units per second.
    public var hostThroughput: Double
    /// Guest batch vCPUs' work units per second.
    public var guestBatchThroughput: Double
    public var boostCount: UInt64
    public var boostedMs: Double
    /// Repayment time the vCPUs were given after their boosts (ms), and how many.
    public var repaymentMs: Double = 0
    public var repayments: UInt64 = 0
    public var throttleCount: UInt64
    public var exits: UInt64
    public var outcome: String
}

/// Runs a scenario in every mode, one after the other, on the same machine.
public struct ExperimentRunner {
    public let scenario: Scenario
    public var progress: (@Sendable (_ mode: Mode, _ index: Int, _ elapsed: Double) -> Void)?
    let logger = Logger(label: "pvsched.experiment")

    public init(scenario: Scenario) { self.scenario = scenario }

    public func run() throws -> [ModeResult] {
        var results: [ModeResult] = []
        for (i, mode) in scenario.modes.enumerated() {
            results.append(try run(mode, index: i))
        }
        return results
    }

    func vmConfig(pvsched: Bool) -> VMConfiguration {
        var c = VMConfiguration(image: GuestImage.kernel)
        c.name = "bench"
        c.vcpus = scenario.vcpus
        c.boot.durationNs = scenario.durationNs
        c.boot.intervalNs = scenario.intervalNs
        c.boot.pvschedEnabled = pvsched
        switch scenario.guest {
        case .cyclic: c.boot.workload = .cyclic
        case .irqResponse: c.boot.workload = .irqResponse
        case .mixed:
            c.boot.workload = .batch
            c.boot.perVCPU = [.cyclic]
        case .rtBatch:
            c.boot.workload = .batch
            c.boot.perVCPU = [.cyclicBatch]
        case .hostileStuck, .hostileFlip:
            c.boot.workload = .cyclic
            c.boot.perVCPU = [scenario.guest == .hostileStuck ? .hostileStuck : .hostileFlip]
        }
        c.vcpuAffinity = (0..<scenario.vcpus).map { scenario.cpuMask(vcpu: $0) }
        return c
    }

    func run(_ mode: Mode, index: Int) throws -> ModeResult {
        if let image = scenario.qemuGuest {
            return scenario.libvirt ? try runLibvirt(mode, index: index, image: image) : try runQEMU(mode, index: index, image: image)
        }
        let contended = mode != .idle
        let managed = mode.pvsched(in: scenario)
        let pvsched = managed != nil
        let host = try PVSchedHost(actuator: LinuxActuator())
        let trace = pvsched && scenario.traceDirectory != nil ? EventTrace(vcpus: scenario.vcpus, capacity: scenario.traceCapacity) : nil
        var kernelDriven: KernelDrivenVM?
        let vm: VirtualMachine
        if case .kernel = mode {
            kernelDriven = try KernelDrivenVM(config: vmConfig(pvsched: true), host: host)
            vm = kernelDriven!.vm
        } else {
            vm = try host.makeVM(config: vmConfig(pvsched: pvsched), pvsched: pvsched, driver: managed?.driver,
                                 governor: managed?.governor ?? scenario.governor,
                                 boost: managed?.boost ?? BoostSettings(), trace: trace)
        }
        defer { kernelDriven?.stop() }

        var noisy: VirtualMachine?
        if contended && scenario.noisyVM {
            var c = VMConfiguration(image: GuestImage.kernel)
            c.name = "noisy"
            c.boot.workload = .batch
            c.boot.durationNs = scenario.durationNs + 2_000_000_000
            c.boot.pvschedEnabled = false
            c.vcpuAffinity = [scenario.cpuMask(vcpu: 0)]
            noisy = try host.makeVM(config: c, pvsched: false)
        }
        let load = contended ? try scenario.cpus.map { try HostContention(threads: scenario.busyThreads, cpuMask: 1 << UInt64($0)) } : []
        let probes = try scenario.cpus.map {
            try HostLatencyProbe(cpuMask: 1 << UInt64($0), intervalNs: scenario.intervalNs, priority: scenario.probePriority)
        }
        try noisy?.start()
        let started = MonotonicClock.nowNs()
        if let kernelDriven, let managed {
            try kernelDriven.start(driver: managed.driver, governor: managed.governor, boost: managed.boost)
        } else { try vm.start() }
        let binding = kernelDriven?.binding ?? host.binding(of: vm)
        let limit = scenario.durationNs + 20_000_000_000
        var outcome: VMOutcome? = nil
        while outcome == nil {
            outcome = vm.outcome
            let elapsed = MonotonicClock.nowNs() - started
            progress?(mode, index, Double(elapsed) / 1e9)
            if outcome != nil || elapsed > limit { break }
            usleep(100_000)
        }
        let final = vm.wait(timeoutNs: 1)
        let totals = binding?.totals ?? VCPUStats()
        var hostHistogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000)
        for p in probes { hostHistogram.add(p.finish()) }
        let throughput = load.map { $0.finish() }.reduce(0, +)
        noisy?.stop()

        var guest = Histogram<UInt64>(highestTrackableValue: 60_000_000_000)
        var batchWork: UInt64 = 0
        if scenario.guest == .irqResponse {
            for v in vm.irqResponseLatencies { _ = guest.record(v) }
        }
        if let r = vm.results() {
            for v in r.vcpus {
                if v.workload == .cyclic || v.workload == .cyclicBatch { for s in v.rawSamplesNs { _ = guest.record(UInt64(s)) } }
                if v.workload == .batch || v.workload == .cyclicBatch { batchWork += v.workUnits }
            }
        }
        if let trace, let dir = scenario.traceDirectory { try write(trace, of: mode, index: index, to: dir) }
        if case .failed(let vcpu, let failure) = final {
            logger.error("VM failed in mode \(mode)", metadata: ["vcpu": "\(vcpu)", "reason": "\(failure)"])
        }
        return ModeResult(
            mode: mode.description,
            guestLatency: LatencySummary(guest),
            hostLatency: LatencySummary(hostHistogram),
            hostThroughput: throughput,
            guestBatchThroughput: Double(batchWork) / (Double(scenario.durationNs) / 1e9),
            boostCount: totals.boostCount,
            boostedMs: Double(totals.boostedNs) / 1e6,
            repaymentMs: Double(totals.repaymentNs) / 1e6,
            repayments: totals.repayments,
            throttleCount: totals.throttleCount,
            exits: vm.exitCounts.reduce(0, +),
            outcome: "\(final)")
    }
}

extension ExperimentRunner {
    /// Writes a run's driver trace, vCPU by vCPU, to `DIR/SCENARIO-MODE-RUN.trace`.
    func write(_ trace: EventTrace, of mode: Mode, index: Int, to dir: String) throws {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let scenarioName = scenario.guest.rawValue + (scenario.noisyVM ? "+noisy" : "")
        let name = "\(scenarioName)-\(mode)".map { $0.isLetter || $0.isNumber || $0 == "-" ? $0 : "_" }
        var text = "# \(scenario.guestTitle), mode \(mode), run \(index); µs on the host's monotonic clock\n"
        for r in trace.allRecords() { text += r.description + "\n" }
        let path = (dir as NSString).appendingPathComponent("\(String(name))-\(index).trace")
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
    }
}

#if canImport(Glibc)
import Glibc
#endif
