import ArgumentParser
import Foundation
import PVSchedCore
import PVSchedExperiments
import PVSchedHost

/// Options shared by `demo` and `bench` for the latency experiment.
struct ScenarioOptions: ParsableArguments {
    @Option(help: "Guest workload: cyclic, irq-response, mixed (vCPU 0 cyclic, others batch) or rt+batch (vCPU 0 cyclic and batch tasks, others batch).")
    var guest: String = "mixed"
    @Option(help: "Number of vCPUs.") var vcpus = 2
    @Option(help: "Busy host threads on each host CPU used.") var busyThreads = 2
    @Flag(help: "Also run a noisy second VM (batch) on the same CPU.") var noisyVM = false
    @Option(help: "Seconds per mode.") var seconds: Double = 4
    @Option(help: "Wake-up / interrupt interval in microseconds (a guest wake-up costs ~0.5-0.9 ms of emulated execution under PVM: keep it well above that). Default 5000; with --vmm qemu 1000.") var intervalUs: UInt64?
    @Option(help: "Modes to compare, comma-separated (idle, vanilla, static-rt, a driver name, DRIVER@CLASS for a driver boosting with another --boost class, or kernel:DRIVER for that driver fed from the host kernel's KVM events, as for an attached VM).")
    var modes = "idle,vanilla,static-rt,latency-boost,deadline-boost@slice:100"
    @Option(help: "Host CPUs, comma-separated: vCPU i runs on the i-th; each gets busy threads and a probe (default: all, last first).")
    var cpus: String?
    @Option(help: "Boost class of the drivers' boosts: fifo:N, rr:N, nice:N or slice:US (an EEVDF slice of US µs at nice -20).") var boost = "fifo:10"
    @Option(help: "Never preempt host real-time tasks at or above this priority (1: boosts are nice -20); 0: protect none.")
    var protectHostPriority: Int = 50
    @Option(help: "Governor: CPU time a vCPU may run boosted in critical sections (irq, softirq, NMI, preemption off), ms.")
    var criticalBudgetMs: Double = 2
    @Option(help: "Governor: CPU time a vCPU may run boosted otherwise (real-time tasks), ms.") var generalBudgetMs: Double = 5
    @Option(help: "Governor: throttle window after a cut boost, in milliseconds.") var throttleMs: Double = 10
    @Option(help: "Governor: largest share (0-1) of the VM's vCPU time that may be boosted.") var vmShare: Double = 0.5
    @Option(help: "Governor: a boost in which a vCPU ran B is repaid at the least weight for FACTOR × B (the busy threads beside it on its CPU; 0: boosts are not repaid).")
    var repaymentFactor: Double = 2
    @Flag(help: "Print JSON instead of the table.") var json = false
    @Option(help: "Run each mode this many times, interleaved, and report each figure's median and spread (1-20).")
    var runs = 1
    @Option(help: "Run these scenarios one after the other: 'all' (mixed, cyclic, irq-response, rt+batch, mixed with a noisy VM, and the hostile guests hostile-stuck and hostile-flip), or a comma-separated list of --guest values (a '+noisy' suffix adds the noisy VM).")
    var scenarios: String?
    @Option(help: "Where to write the SVG plot.") var plot = "pvsched-demo.svg"
    @Option(help: "Write each pvsched run's driver trace (every vCPU's notifications: event, guest flags, decision, outcome; and the budget enforcer's cuts) to DIR/SCENARIO-MODE-RUN.trace.")
    var traceDir: String?
    @Option(help: "The VMM: builtin (our Swift VMM and guest kernel, on /dev/kvm), qemu (unmodified QEMU under TCG with a stock Linux guest running cyclictest on vCPU 0; needs the packages scripts/test.sh installs) or libvirt (the same guest as a libvirt domain: static-rt is libvirt's <vcpusched>, the pvsched modes are served by a daemon following libvirt).")
    var vmm = "builtin"
    @Option(help: "With --vmm libvirt: more lines for the configuration of the daemon that serves the domain ('key = value', ';' between lines), e.g. 'cgroup-weights = no'.")
    var daemonConfig: String?

    func scenario() throws -> Scenario {
        var s = Scenario()
        guard let g = GuestScenario(rawValue: guest) else {
            throw ValidationError("--guest must be one of \(GuestScenario.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard (1...16).contains(vcpus) else { throw ValidationError("--vcpus must be 1...16") }
        if g == .mixed && vcpus < 2 { throw ValidationError("--guest mixed needs at least 2 vCPUs") }
        guard (1...20).contains(runs) else { throw ValidationError("--runs must be 1...20, got \(runs)") }
        guard (0...64).contains(busyThreads) else { throw ValidationError("--busy-threads must be 0...64, got \(busyThreads)") }
        guard seconds > 0 && seconds <= 3600 else { throw ValidationError("--seconds must be in (0, 3600], got \(seconds)") }
        let intervalUs = self.intervalUs ?? (vmm == "builtin" ? 5000 : 1000)
        guard (100...1_000_000).contains(intervalUs) else {
            throw ValidationError("--interval-us must be 100...1000000, got \(intervalUs)")
        }
        for (name, v) in [("--critical-budget-ms", criticalBudgetMs), ("--general-budget-ms", generalBudgetMs), ("--throttle-ms", throttleMs)] {
            guard v.isFinite, v >= 0, v <= 60_000 else { throw ValidationError("\(name) must be in 0...60000, got \(v)") }
        }
        guard ["builtin", "qemu", "libvirt"].contains(vmm) else { throw ValidationError("--vmm must be builtin, qemu or libvirt, got '\(vmm)'") }
        if vmm != "builtin" {
            guard g == .mixed || g == .cyclic, !noisyVM, scenarios == nil else {
                throw ValidationError("--vmm \(vmm) runs cyclictest on vCPU 0 of a Linux guest: --guest, --noisy-vm and --scenarios do not apply")
            }
            if modes.split(separator: ",").contains(where: { $0.hasPrefix("kernel:") }) {
                throw ValidationError("--vmm \(vmm): kernel:DRIVER modes need KVM exits, and QEMU runs under TCG here")
            }
        }
        s.guest = g
        s.traceDirectory = traceDir
        if let daemonConfig {
            guard vmm == "libvirt" else { throw ValidationError("--daemon-config applies to --vmm libvirt only") }
            guard daemonConfig.utf8.count <= 4096 else { throw ValidationError("--daemon-config: at most 4096 bytes") }
            s.daemonConfig = daemonConfig.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: "\n")
        }
        s.vcpus = vcpus
        s.busyThreads = busyThreads
        s.noisyVM = noisyVM
        s.durationNs = UInt64(seconds * 1e9)
        s.intervalNs = intervalUs * 1000
        try validateRepaymentFactor(repaymentFactor)
        guard criticalBudgetMs > 0, generalBudgetMs > 0, (0...1).contains(vmShare) else {
            throw ValidationError("governor limits: --critical-budget-ms > 0, --general-budget-ms > 0, --vm-share in 0...1")
        }
        s.governor = GovernorConfig(criticalBudgetNs: UInt64(criticalBudgetMs * 1e6), generalBudgetNs: UInt64(generalBudgetMs * 1e6),
                                    throttleWindowNs: UInt64(throttleMs * 1e6), shareWindowNs: 100_000_000, maxVMShare: vmShare,
                                    repaymentFactor: repaymentFactor)
        guard let boostClass = BoostSettings.parseClass(boost) else {
            throw ValidationError("--boost must be \(BoostSettings.classSyntax), got '\(boost)'")
        }
        guard (0...99).contains(protectHostPriority) else {
            throw ValidationError("--protect-host-priority must be 0...99, got \(protectHostPriority)")
        }
        s.boost = BoostSettings(boosted: boostClass, protectedHostPriority: protectHostPriority == 0 ? nil : UInt8(protectHostPriority))
        s.modes = try modes.split(separator: ",").map { text in
            guard let m = Mode(String(text)) else {
                throw ValidationError("--modes: '\(text)' is not a mode (a driver's '@CLASS' must be \(BoostSettings.classSyntax))")
            }
            return m
        }
        guard !s.modes.isEmpty else { throw ValidationError("--modes must name at least one mode") }
        if let cpus {
            let list = cpus.split(separator: ",").compactMap { Int($0) }
            guard !list.isEmpty, list.allSatisfy({ (0..<min(64, Scenario.onlineCPUs)).contains($0) }) else {
                throw ValidationError("--cpus must list online CPUs (0...\(Scenario.onlineCPUs - 1))")
            }
            s.cpus = list
        }
        return s
    }

    /// The scenarios to run: `--scenarios`, or the one the other options describe.
    func allScenarios() throws -> [Scenario] {
        let base = try scenario()
        guard let scenarios else { return [base] }
        let names = scenarios == "all" ? ["mixed", "cyclic", "irq-response", "rt+batch", "mixed+noisy", "hostile-stuck", "hostile-flip"]
                                       : scenarios.split(separator: ",").map(String.init)
        guard !names.isEmpty else { throw ValidationError("--scenarios must name at least one scenario") }
        return try names.map { name in
            let noisy = name.hasSuffix("+noisy")
            let guestName = noisy ? String(name.dropLast("+noisy".count)) : name
            guard let g = GuestScenario(rawValue: guestName) else {
                throw ValidationError("--scenarios: '\(name)' is not one of \(GuestScenario.allCases.map(\.rawValue).joined(separator: ", ")) (optionally with +noisy)")
            }
            var s = base
            s.guest = g
            s.noisyVM = noisy || base.noisyVM
            if g == .mixed && s.vcpus < 2 { s.vcpus = 2 }
            return s
        }
    }
}

/// The main job: a real KVM guest under host contention, in each mode, side by side.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure guest and host latency under host contention: vanilla, static real-time and pvsched, side by side.")
    @OptionGroup var options: ScenarioOptions

    func run() throws {
        var scenarios = try options.allScenarios()
        var libvirtd: LibvirtForDemo?
        defer { libvirtd?.stop() }
        if options.vmm != "builtin" {
            try Preflight.requireRealTime()
            if options.vmm == "libvirt" { libvirtd = try LibvirtForDemo() }
            FileHandle.standardError.write("building the Linux guest (scripts/build-linux-guest.sh)...\n".data(using: .utf8)!)
            let image = try LinuxGuestImage.build()
            for i in scenarios.indices { scenarios[i].qemuGuest = image; scenarios[i].libvirt = libvirtd != nil }
        } else {
            try Preflight.requireKVM()
            try Preflight.requireRealTime()
        }
        for (k, scenario) in scenarios.enumerated() {
            if k > 0 && !options.json { print("") }
            try run(scenario, plot: scenarios.count == 1 ? options.plot
                                                       : options.plot.replacingOccurrences(of: ".svg", with: "-\(scenario.guest.rawValue)\(scenario.noisyVM ? "-noisy" : "").svg"))
        }
    }

    private func run(_ scenario: Scenario, plot: String) throws {
        var runner = ExperimentRunner(scenario: scenario)
        let total = scenario.modes.count * options.runs
        let seconds = Double(scenario.durationNs) / 1e9
        runner.progress = { mode, index, elapsed in
            let done = min(1, elapsed / seconds)
            let bar = String(repeating: "#", count: Int(done * 20)) + String(repeating: ".", count: 20 - Int(done * 20))
            FileHandle.standardError.write("\r[\(index + 1)/\(total)] \(mode.description.padding(toLength: 14, withPad: " ", startingAt: 0)) [\(bar)] \(String(format: "%4.1f", elapsed)) s ".data(using: .utf8)!)
        }
        if options.runs > 1 {
            let repeated = try runner.run(repeats: options.runs)
            FileHandle.standardError.write("\r\(String(repeating: " ", count: 60))\r".data(using: .utf8)!)
            print(options.json ? try Report.json(repeated: repeated) : Report.repeatedTable(repeated, scenario: scenario))
            return
        }
        let results = try runner.run()
        FileHandle.standardError.write("\r\(String(repeating: " ", count: 60))\r".data(using: .utf8)!)
        if options.json {
            print(try Report.json(results))
        } else {
            print(Report.table(results, scenario: scenario))
        }
        let svg = Report.svg(results, title: "pvsched: \(scenario.guest.rawValue) guest, \(scenario.vcpus) vCPUs, \(scenario.busyThreads) busy host threads")
        try Report.write(svg, to: plot)
        if !options.json { print("plot: \(plot)") }
    }
}

/// Benchmarks of the mechanism (each against a baseline from the same run).
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark the mechanism: driver decision, shared-area read, actuator, per-exit overhead, control socket (ratios to baselines).")
    @Flag(help: "Print JSON.") var json = false
    @Option(help: "Repetitions of the per-exit measurement.") var exitRuns = 5
    @Option(help: "Only these parts (comma-separated): \(BenchPart.allCases.map(\.rawValue).joined(separator: ", ")); scale runs only when named.")
    var only: String?
    @Option(help: "scale: the VM counts (comma-separated, each 1-128).") var scaleVms = "1,4,16,64"
    @Option(help: "scale: seconds of each measured window (1-60).") var scaleSeconds = 5.0
    @Option(help: "scale: how often an idle stand-in vCPU wakes, µs (100-1000000).") var scaleIdleWakeupUs: UInt64 = 50_000
    @Option(help: "scale: the daemon's event sources for the VMs: both or watch.") var scaleEvents = "both"
    @Option(help: "scale: the daemon's hold-through-halts-us (0-10000; 0, the default, is off).") var scaleHoldUs: UInt64 = 0

    /// The parts of the benchmark, in the order they run.
    enum BenchPart: String, CaseIterable { case decision, area, bpf, actuator, control, watcher, kernel, exits, scale }

    func scaleSettings() throws -> ScaleBench.Settings {
        var s = ScaleBench.Settings()
        let counts = scaleVms.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !counts.isEmpty, counts.allSatisfy({ $0.map { (1...128).contains($0) } ?? false }) else {
            throw ValidationError("--scale-vms must be comma-separated counts of 1-128, got '\(scaleVms)'")
        }
        guard (1...60).contains(scaleSeconds) else { throw ValidationError("--scale-seconds must be 1...60, got \(scaleSeconds)") }
        guard (100...1_000_000).contains(scaleIdleWakeupUs) else { throw ValidationError("--scale-idle-wakeup-us must be 100...1000000") }
        guard ["both", "watch"].contains(scaleEvents) else { throw ValidationError("--scale-events must be both or watch") }
        guard scaleHoldUs <= DeadlineSchedule.maxHoldNs / 1000 else { throw ValidationError("--scale-hold-us must be 0...10000, got \(scaleHoldUs)") }
        s.vmCounts = counts.map { $0! }
        s.windowSeconds = scaleSeconds
        s.idleWakeupUs = scaleIdleWakeupUs
        s.events = scaleEvents
        s.holdThroughHaltsUs = scaleHoldUs
        return s
    }

    func parts() throws -> Set<BenchPart> {
        guard let only else { return Set(BenchPart.allCases).subtracting([.scale]) }
        var parts = Set<BenchPart>()
        for name in only.split(separator: ",", omittingEmptySubsequences: false) {
            guard let p = BenchPart(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                throw ValidationError("--only: unknown part '\(name)' (parts: \(BenchPart.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            parts.insert(p)
        }
        return parts
    }

    func validate() throws {
        guard (1...100).contains(exitRuns) else { throw ValidationError("--exit-runs must be 1...100, got \(exitRuns)") }
        _ = try parts()
        _ = try scaleSettings()
    }

    func run() throws {
        let parts = try parts()
        var results: [BenchResult] = []
        if parts.contains(.decision) { results.append(MechanismBench.driverDecision()) }
        if parts.contains(.area) { results.append(MechanismBench.sharedAreaRead()) }
        if parts.contains(.bpf) { results += try MechanismBench.bpf() }
        if parts.contains(.actuator) {
            if let a = MechanismBench.actuator() { results.append(a) } else {
                FileHandle.standardError.write("actuator benchmark skipped: SCHED_FIFO not permitted (run as root)\n".data(using: .utf8)!)
            }
        }
        if parts.contains(.control) {
            results += try ControlBench.roundTrip()
            results += try ControlBench.decisionUnderControlLoad()
        }
        if parts.contains(.watcher) {
            do { results += try WatcherBench.flagToBoost() } catch {
                FileHandle.standardError.write("watcher benchmark skipped: \(error)\n".data(using: .utf8)!)
            }
        }
        if parts.contains(.kernel) || parts.contains(.exits) {
            if (try? Preflight.requireKVM()) != nil {
                if parts.contains(.kernel) {
                    do { results += try KernelEventBench.compare() } catch {
                        FileHandle.standardError.write("kernel-event benchmark skipped: \(error)\n".data(using: .utf8)!)
                    }
                }
                if parts.contains(.exits) { results += try MechanismBench.exitOverhead(reps: exitRuns) }
            } else {
                FileHandle.standardError.write("kernel-event and per-exit benchmarks skipped: /dev/kvm not accessible\n".data(using: .utf8)!)
            }
        }
        var rows: [ScaleBench.Row]?
        if parts.contains(.scale) {
            try Preflight.requireRealTime()
            let settings = try scaleSettings()
            rows = try ScaleBench.run(settings) { what in
                if !json { FileHandle.standardError.write("scale: \(what)\n".data(using: .utf8)!) }
            }
            if !json { print(ScaleBench.table(rows!, settings: settings)) }
        }
        if json {
            let e = JSONEncoder()
            e.outputFormatting = [.prettyPrinted, .sortedKeys]
            struct Both: Encodable { let results: [BenchResult]; let rows: [ScaleBench.Row] }
            struct Rows: Encodable { let rows: [ScaleBench.Row] }
            let data: Data
            if let rows { data = parts == [.scale] ? try e.encode(Rows(rows: rows)) : try e.encode(Both(results: results, rows: rows)) }
            else { data = try e.encode(results) }
            print(String(decoding: data, as: UTF8.self))
        } else if !results.isEmpty {
            print(MechanismBench.table(results))
            if let alu = results.first(where: { $0.name.hasPrefix("BPF compiled, straight-line ALU") }) {
                print(String(format: "BPF: %.0f million instructions per second on straight-line ALU code compiled, %.0f interpreted",
                             1000 / alu.nsPerOp, 1000 / alu.baselineNsPerOp))
            }
        }
    }
}

/// `HostPreflight` as command-line validation errors.
enum Preflight {
    static func requireKVM() throws { if let why = HostPreflight.kvmProblem { throw ValidationError(why) } }
    static func requireRealTime() throws { if let why = HostPreflight.realTimeProblem { throw ValidationError(why) } }
}

/// `--repayment-factor` as the governor accepts it (`GovernorConfig.repaymentFactorRange`).
func validateRepaymentFactor(_ factor: Double) throws {
    let range = GovernorConfig.repaymentFactorRange
    guard factor.isFinite, range.contains(factor) else {
        throw ValidationError("--repayment-factor must be \(Int(range.lowerBound))...\(Int(range.upperBound)), got \(factor)")
    }
}
