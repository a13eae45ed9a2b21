import ArgumentParser
import PVSchedCore
import PVSchedLinux

#if canImport(Glibc)
import Glibc
#endif

/// Boosts one thread for a while through the Linux actuator, then restores it:
/// a manual check of the actuator, and how the tests show that SIGINT/SIGTERM
/// restore a boosted thread.
struct BoostThread: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boost-thread",
        abstract: "Run a thread SCHED_FIFO for a while, then put back its original parameters.")

    @Argument(help: "Thread id (as in /proc/PID/task).") var tid: Int32
    @Option(help: "SCHED_FIFO priority (1-99).") var priority: UInt8 = 10
    @Option(help: "How long to hold the boost.") var seconds: Double = 10

    func validate() throws {
        guard tid > 0 else { throw ValidationError("TID must be a thread id (> 0), got \(tid)") }
        guard (1...99).contains(priority) else { throw ValidationError("--priority must be 1...99, got \(priority)") }
        guard seconds > 0 && seconds <= 86_400 else { throw ValidationError("--seconds must be in (0, 86400]") }
    }

    func run() throws {
        let actuator = LinuxActuator()
        let thread = ThreadID(tid)
        let before = try LinuxScheduling.parameters(of: thread)
        try actuator.apply(.fifo(priority: priority), to: thread)
        print("boosted \(thread): \(before.map(String.init(describing:)) ?? "?") -> SCHED_FIFO \(priority)")
        fflush(nil)
        usleep(UInt32(seconds * 1_000_000))
        try actuator.restore(thread)
        print("restored \(thread): \(try LinuxScheduling.parameters(of: thread).map(String.init(describing:)) ?? "?")")
    }
}
