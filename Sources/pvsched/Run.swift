import CLinuxSched
import ArgumentParser
import Foundation
import PVSchedBPF
import PVSchedCore
import PVSchedDrivers
import PVSchedHost
import PVSchedGuestImage
import PVSchedKVM
import PVSchedLinux

extension Workload: ExpressibleByArgument {
    public init?(argument: String) {
        guard let w = Workload.allCases.first(where: { $0.description == argument }) else { return nil }
        self = w
    }
}

/// Boots the pvsched guest kernel and prints its console.
struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Boot the pvsched guest on /dev/kvm and print its console.")

    @Option(help: "Number of vCPUs (1-16).") var vcpus = 1
    @Option(help: "Guest workload: \(Workload.allCases.map(\.description).joined(separator: ", ")).")
    var workload: Workload = .selftest
    @Option(help: "Workload argument (selftest variant).") var arg: UInt32 = 0
    @Option(help: "Driver for the VM ('none' runs without pvsched).") var driver = "latency-boost"
    @Option(help: "Workload duration in milliseconds.") var durationMs: UInt64 = 1000
    @Option(help: "Cyclic wake-up interval in microseconds.") var intervalUs: UInt64 = 1000
    @Flag(help: "Use the in-kernel irqchip (LAPIC) instead of userspace injection.") var irqchip = false
    @Option(help: "Give up after this many seconds.") var timeout: Double = 30
    @Option(help: "Load a BPF driver object ('sample' for the bundled BPF/latency_boost.bpf.c) and use it for the VM.") var bpf: String?
    @Option(help: "Print the last N driver notifications of each vCPU (event, guest state, decision, outcome).") var trace: Int?
    @Option(help: "Run no driver here: share guest memory (/dev/shm) and write the pid, vCPU thread ids and the shared area's place to this JSON file, for `pvsched vm attach --export FILE` (the daemon then drives the VM from kernel events).")
    var export: String?

    func validate() throws {
        guard (1...VirtualMachine.maxVCPUs).contains(vcpus) else {
            throw ValidationError("--vcpus must be 1...\(VirtualMachine.maxVCPUs), got \(vcpus)")
        }
        guard (1...86_400_000).contains(durationMs) else { throw ValidationError("--duration-ms must be 1...86400000, got \(durationMs)") }
        guard (50...1_000_000).contains(intervalUs) else { throw ValidationError("--interval-us must be 50...1000000, got \(intervalUs)") }
        guard timeout > 0 && timeout <= 86_400 else { throw ValidationError("--timeout must be in (0, 86400] seconds") }
        if let trace, !(1...100_000).contains(trace) { throw ValidationError("--trace must be 1...100000, got \(trace)") }
        if export != nil && (bpf != nil || driver != "latency-boost") {
            throw ValidationError("--export runs no driver here: it excludes --driver and --bpf")
        }
    }

    func run() throws {
        try Preflight.requireKVM()
        var config = VMConfiguration(image: GuestImage.kernel)
        config.vcpus = vcpus
        config.boot.workload = workload
        config.boot.arg = arg
        config.boot.durationNs = durationMs * 1_000_000
        config.boot.intervalNs = intervalUs * 1000
        config.boot.pvschedEnabled = driver != "none"
        config.interrupts = irqchip ? .inKernelIRQChip : .userspace
        config.consoleLine = { print("guest| \($0)") }
        let host = try PVSchedHost()
        let registry = host.registry
        var driver = self.driver
        var bpfDriver: BPFDriver?
        if let bpf {
            let object: [UInt8]
            if bpf == "sample" { object = GuestImage.sampleBPFDriver }
            else if bpf == "deadline-sample" { object = GuestImage.deadlineBPFDriver } else {
                guard let data = FileManager.default.contents(atPath: bpf) else { throw ValidationError("cannot read \(bpf)") }
                object = [UInt8](data)
            }
            let d = try BPFDriver(elf: object, trace: { print("bpf| \($0)") })
            try registry.register(d)
            driver = d.name
            bpfDriver = d
        }
        let eventTrace = trace.map { EventTrace(vcpus: vcpus, capacity: $0) }
        var exported: ExportedVMLink?
        let vm: VirtualMachine
        if let export {
            config.memoryFile = "/dev/shm/pvsched-vm-\(getpid()).mem"
            // Gone with the VM, whichever way this process ends (but SIGKILL).
            pvs_install_restore_handlers()
            pvs_remove_at_exit(config.memoryFile!)
            config.boot.pvschedEnabled = true
            let link = ExportedVMLink(name: config.name, vcpus: vcpus, memoryFile: config.memoryFile, path: export)
            exported = link
            vm = try VirtualMachine(config: config, host: link.link, threads: host.threads)
            print("exporting to \(export) (guest memory \(config.memoryFile!)); no driver runs here")
        } else {
            vm = try host.makeVM(config: config, pvsched: driver != "none", driver: driver == "none" ? nil : driver,
                                 trace: eventTrace)
        }
        let stats = host.binding(of: vm)
        try vm.start()
        let outcome = vm.wait(timeoutNs: UInt64(timeout * 1e9))
        print("outcome: \(outcome)")
        print("exits per vCPU: \(vm.exitCounts), guest TSC \(vm.tscKHz) kHz")
        print("injections per vCPU: \(vm.injectionCounts)")
        if let exported { print("exported events: injections \(exported.injectionCounts), exits \(exported.exitCounts)") }
        if let stats {
            let t = stats.totals
            if let reason = stats.disabledReason { print("pvsched disabled for this VM: \(reason)") }
            print("driver \(driver): events \(t.events), boosts \(t.boostCount), boosted \(t.boostedNs / 1000) µs, throttled \(t.throttleCount), repaid \(t.repayments) (\(t.repaymentNs / 1000) µs)")
        }
        if let bpfDriver {
            print("bpf driver \(bpfDriver.name): \(bpfDriver.failureCount) failed runs")
            for m in bpfDriver.maps where m.definition.kind == .array && m.definition.valueSize == 8 {
                print("  map \(m.definition.name): \((0..<UInt32(m.definition.maxEntries)).map { m.words(at: $0)[0] })")
            }
        }
        if let eventTrace {
            for r in eventTrace.allRecords() { print("trace| \(r)") }
        }
        if let results = vm.results() {
            for r in results.vcpus where r.samples > 0 || r.workUnits > 0 {
                print(r.summary)
            }
        }
        if case .failed = outcome { throw ExitCode(2) }
    }
}


/// `HostPreflight` as command-line validation errors.
enum Preflight {
    static func requireKVM() throws { if let why = HostPreflight.kvmProblem { throw ValidationError(why) } }
    static func requireRealTime() throws { if let why = HostPreflight.realTimeProblem { throw ValidationError(why) } }
}
