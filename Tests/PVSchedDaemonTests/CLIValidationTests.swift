import Foundation
import PVSchedTesting
import Testing

/// Every subcommand, given out-of-range or malformed values as a new user would,
/// ends with a clean error (exit status 64 for usage, 1 for failures), never a signal.
@Suite struct CLIValidationTests {
    static let none = "/tmp/pvsched-no-daemon-here.sock"
    static let cases: [[String]] = [
        ["run", "--vcpus", "0"], ["run", "--vcpus", "300"], ["run", "--vcpus", "abc"], ["run", "--duration-ms", "0"],
        ["run", "--interval-us", "0"], ["run", "--trace", "0"], ["run", "--timeout", "-1"], ["run", "--workload", "nope"],
        ["run", "--export", "/tmp/x.json", "--driver", "nop"],
        ["demo", "--busy-threads", "100000"], ["demo", "--interval-us", "0"], ["demo", "--vcpus", "0"], ["demo", "--guest", "nope"],
        ["demo", "--cpus", "99"], ["demo", "--seconds", "-1"], ["demo", "--vm-share", "2"], ["demo", "--modes", ""],
        ["demo", "--critical-budget-ms", "0"], ["demo", "--boost", "fifo:0"], ["demo", "--protect-host-priority", "100"], ["demo", "--general-budget-ms", "-1"], ["demo", "--runs", "0"], ["demo", "--runs", "21"], ["demo", "--scenarios", "nope"],
        ["bench", "--exit-runs", "-1"],
        ["bpf", "run", "/nonexistent.o"], ["bpf", "run", "zz"], ["bpf", "run", "9500000000000000", "--mem", "zz"],
        ["bpf", "verify", "/nonexistent.o"], ["bpf", "dump", "/nonexistent.o"], ["bpf", "dump", "zz"], ["bpf", "load", "/nonexistent.o", "--socket", none],
        ["bpf", "unload", "x", "--socket", none],
        ["vm", "list", "--socket", none], ["vm", "start", "--socket", none], ["vm", "attach"], ["vm", "stop"],
        ["vm", "driver", "--socket", none, "vm1"], ["vm", "governor", "--socket", none, "vm1", "--vm-share", "x"],
        ["stats", "--socket", none], ["top", "--interval", "0"], ["top", "--count", "0"],
        ["boost-thread", "0"], ["boost-thread", "-5"], ["boost-thread", "abc"], ["boost-thread", "1", "--priority", "100"],
        ["daemon", "--metrics", "nonsense"], ["daemon", "--log-level", "loud"], ["daemon", "--socket", ""],
        ["guardian", "--parent", "0"], ["no-such-command"],
    ]

    @Test(arguments: cases)
    func badInputGetsACleanError(args: [String]) throws {
        guard let binary = PVSchedBinary.path else { Issue.record("the pvsched executable is not built"); return }
        let r = try PVSchedBinary.run(binary, args, timeout: 30)
        #expect(!r.signaled, "\(args) died of a signal: \(r.stderr)")
        #expect(r.status == 64 || r.status == 1, "\(args) exited \(r.status): \(r.stderr)")
        #expect(!r.stderr.isEmpty, "\(args) said nothing")
    }
}

@Suite struct BPFDumpTests {
    @Test func dumpDisassemblesAnObject() throws {
        guard let binary = PVSchedBinary.path else { Issue.record("the pvsched executable is not built"); return }
        let seed = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("PVSchedBPFTests/Crashers/seed-latency_boost.o").path
        let r = try PVSchedBinary.run(binary, ["bpf", "dump", seed])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("driver 'bpf-latency-boost'"))
        #expect(r.stdout.contains("map 0 'decisions': array"))
        #expect(r.stdout.contains(" 0: (61) r2 = *(u32 *)(r1 + 0)"))
    }
}
