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
        subcommands: [DemoCommand.self, BenchCommand.self, Run.self, DaemonCommand.self, VMCommand.self, DriversCommand.self, StatsCommand.self,
                      TopCommand.self, BPFCommand.self, ThreadCommand.self, BoostThread.self, ConfigCommand.self, GuardianCommand.self])
}

PVSched.main()
