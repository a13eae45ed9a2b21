import ArgumentParser
import PVSchedBuildInfo
import PVSchedControl
import PVSchedCore
import PVSchedDrivers

/// The pvsched command-line tool.
struct PVSched: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pvsched",
        abstract: "Cooperative (paravirtual) vCPU scheduling for KVM.",
        version: PVSchedBuild.description,
        subcommands: [Demo.self, Bench.self, Run.self, DaemonCommand.self, VMCommand.self, Drivers.self, StatsCommand.self,
                      TopCommand.self, BPFCommand.self, ThreadCommand.self, BoostThread.self, GuardianCommand.self])
}

/// Lists the drivers: the running daemon's registry (the seed's
/// `pvsched_available_drivers` sysctl), or the built-ins when no daemon runs.
struct Drivers: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the drivers (the running daemon's, or the built-in ones when no daemon runs).")
    @OptionGroup var control: ControlOptions
    @Option(help: "Make this driver the daemon's default ('none' for no default).") var setDefault: String?

    func run() throws {
        if let setDefault {
            let r = try control.call("drivers.set_default", ["name": setDefault == "none" ? .null : .string(setDefault)])
            if !control.json { print("default driver: \(r["default"]?.cell ?? "none") (was \(r["previous"]?.cell ?? "none"))") }
            return
        }
        let list: JSON
        var fromDaemon = true
        if let client = try? ControlClient(path: control.socket) {
            do { list = try client.call("drivers.list") } catch { throw CleanExit.message("pvsched: \(error)", code: 1) }
        } else {
            fromDaemon = false
            let registry = DriverRegistry()
            try BuiltinDrivers.registerAll(in: registry)
            list = .array(registry.drivers.map { d in
                ["name": .string(d.name), "protocol": .string(d.protocolName), "version": .string("\(d.protocolVersion)"),
                 "vms": [], "default": .bool(d.isDefault), "kind": "builtin"]
            })
        }
        if control.json { print(list.pretty); return }
        if !fromDaemon { print("(no daemon at \(control.socket): built-in drivers)") }
        print(table(["NAME", "PROTOCOL", "KIND", "DEFAULT", "VMS"], (list.arrayValue ?? []).map { d in
            [d["name"]?.cell ?? "", "\(d["protocol"]?.cell ?? "") \(d["version"]?.cell ?? "")", d["kind"]?.cell ?? "",
             d["default"]?.boolValue == true ? "default" : "", d["vms"]?.cell ?? "-"]
        }))
    }
}

PVSched.main()
