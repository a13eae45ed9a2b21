import ArgumentParser
import PVSchedTesting

/// `pvsched-standin`: a stand-in VMM process with vCPU threads and a pvsched
/// region, for tests and `pvsched bench --only scale` (see `StandInGuest`).
/// Not installed: a test and lab tool.
struct StandIn: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvsched-standin",
        abstract: "A stand-in VMM process: vCPU threads named vcpuN and a pvsched region written like the Linux guest module.",
        discussion: "Commands on standard input: tids, header, line V FLAGS_HEX [fifo P], exit V, fork V, busy V on|off, latencies, quit.")
    @Option(help: "Number of vCPU threads (1-64).") var vcpus = 2
    @Option(help: "The region file (under /dev/shm) to create and write.") var region: String?
    @Flag(help: "Open an existing region file instead of creating it.") var existing = false
    @Option(help: "Mode of a created region file (octal).") var mode = "600"
    @Flag(help: "Do not write the region header at start.") var noHeader = false
    @Option(help: "Protocol name written in the header.") var protocolName: String?
    @Option(help: "vCPUs running a cyclictest-like real-time wake-up (comma-separated).") var busy = ""
    @Option(help: "The busy vCPUs' wake-up interval, µs.") var intervalUs: UInt64 = 1000
    @Option(help: "The busy vCPUs' work per wake-up, µs.") var workUs: UInt64 = 50
    @Option(help: "How often an idle vCPU's thread wakes, µs.") var idleWakeupUs: UInt64 = 1000
    @Option(help: "How long an idle vCPU's thread runs at each wake-up, µs (its line untouched).") var idleWorkUs: UInt64 = 0
    @Flag(help: "Name the vCPU threads as QEMU does (CPU N/KVM); run it as a file named qemu-* to pass for QEMU.")
    var qemuThreadNames = false
    @Option(name: .customLong("name", withSingleDash: true), help: "QEMU's -name (guest=NAME), read by the daemon's discovery.")
    var qemuName: String?

    func validate() throws {
        guard (1...64).contains(vcpus) else { throw ValidationError("--vcpus must be 1-64") }
        guard UInt32(mode, radix: 8).map({ $0 <= 0o777 }) == true else { throw ValidationError("--mode must be octal, at most 777") }
        guard (100...1_000_000).contains(intervalUs), workUs < intervalUs else { throw ValidationError("--interval-us 100-1000000, --work-us below it") }
        guard (100...1_000_000).contains(idleWakeupUs) else { throw ValidationError("--idle-wakeup-us must be 100-1000000") }
        guard idleWorkUs < idleWakeupUs else { throw ValidationError("--idle-work-us must be below --idle-wakeup-us") }
    }

    func run() throws {
        var o = StandInGuest.Options()
        o.vcpus = vcpus
        o.region = region
        o.createRegion = !existing
        o.regionMode = UInt32(mode, radix: 8)!
        o.writeHeader = !noHeader
        o.protocolName = protocolName
        o.busyVCPUs = busy.split(separator: ",").compactMap { Int($0) }.filter { $0 >= 0 && $0 < vcpus }
        o.intervalUs = intervalUs
        o.workUs = workUs
        o.idleWakeupUs = idleWakeupUs
        o.idleWorkUs = idleWorkUs
        o.qemuThreadNames = qemuThreadNames
        let guest = try StandInGuest(o)
        guest.run()
        guest.stop()
    }
}

StandIn.main()
