import ArgumentParser

/// `pvsched-lab`: the experiments behind `pvsched demo` and `pvsched bench`, in
/// an executable of their own so that the daemon's binary does not carry them
/// (nor the test doubles they use). `pvsched demo` and `pvsched bench` run it.
struct PVSchedLab: ParsableCommand {
    static let configuration = CommandConfiguration(
        // Run by `pvsched demo` (as "pvsched"), its help speaks of `pvsched demo`.
        commandName: CommandLine.arguments.first.map { $0.hasSuffix("pvsched") ? "pvsched" : "pvsched-lab" } ?? "pvsched-lab",
        abstract: "pvsched's experiments: the demo and the benchmarks (run through `pvsched demo` and `pvsched bench`).",
        subcommands: [Demo.self, Bench.self])
}

PVSchedLab.main()
