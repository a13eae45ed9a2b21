import ArgumentParser
import PVSchedCore
import PVSchedDrivers

/// The pvsched command-line tool.
struct PVSched: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvsched",
        abstract: "Cooperative (paravirtual) vCPU scheduling for KVM.",
        subcommands: [Demo.self, Bench.self, Run.self, Drivers.self, BPFCommand.self, BoostThread.self])
}

/// Lists the built-in drivers.
struct Drivers: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the built-in drivers.")
    func run() throws {
        let registry = DriverRegistry()
        try BuiltinDrivers.registerAll(in: registry)
        for d in registry.drivers {
            print("\(d.name)\t\(d.protocolName) \(d.protocolVersion)\(d.isDefault ? "\t(default)" : "")")
        }
    }
}

PVSched.main()
