import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import PVSchedTesting
import Testing

struct DaemonTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// Waits until `condition` holds or `seconds` pass; returns whether it held.
func eventually(_ seconds: Double, _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try condition() { return true }
        usleep(10_000)
    }
    return try condition()
}

/// Another process (a sleeping one) whose thread the daemon boosts.
func startSleeper() throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/bin/sleep")
    p.arguments = ["60"]
    try p.run()
    return p
}

func isRealTime(_ tid: Int32) -> Bool {
    (try? LinuxScheduling.parameters(of: ThreadID(tid)))??.isRealTime ?? false
}

@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.kvm.shouldRun, "needs root and /dev/kvm"))
struct DaemonProcessTests {
    @Test func replacingARunningVMsDriverFromTheCLIUndoesItsBoosts() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let start = try d.cli(["vm", "start", "--name", "rt", "--vcpus", "2", "--workload", "cyclic", "--duration-ms", "60000",
                               "--driver", "static-rt", "--unlimited"])
        #expect(start.status == 0, "\(start.stderr)")
        #expect(try eventually(20) { try d.vcpus("rt").count == 2 && d.vcpus("rt").allSatisfy { $0.boosted && isRealTime($0.tid) } })
        let tids = try d.vcpus("rt").map(\.tid)
        let replace = try d.cli(["vm", "driver", "rt", "nop"])
        #expect(replace.status == 0, "\(replace.stderr)")
        #expect(replace.stdout.contains("previous driver: static-rt"))
        #expect(replace.stdout.contains("driver: nop"))
        // Undone at once: the threads are back to their original (non-real-time) parameters.
        for t in tids { #expect(!isRealTime(t), "vCPU thread \(t) is still real-time") }
        #expect(try d.vcpus("rt").allSatisfy { !$0.boosted })
        let get = try d.cli(["vm", "driver", "rt"])
        #expect(get.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "nop")
        let stop = try d.cli(["vm", "stop", "rt"])
        #expect(stop.status == 0)
        #expect(try d.cli(["vm", "list", "--json"]).stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "[\n\n]"
                || (try d.client().call("vm.list")).arrayValue?.isEmpty == true)
    }

    @Test func loadsAndUnloadsABPFDriverInTheRunningDaemon() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        #expect(try d.cli(["vm", "start", "--name", "b", "--workload", "cyclic", "--duration-ms", "60000"]).status == 0)
        let load = try d.cli(["bpf", "load", "sample", "--name", "bpf-lb"])
        #expect(load.status == 0, "\(load.stderr)")
        #expect(load.stdout.contains("loaded BPF driver 'bpf-lb'"))
        let drivers = try d.client().call("drivers.list")
        #expect(drivers.arrayValue?.contains { $0["name"] == "bpf-lb" && $0["kind"] == "bpf" } == true)
        #expect(try d.cli(["vm", "driver", "b", "bpf-lb"]).stdout.contains("previous driver: latency-boost"))
        // The BPF driver decides: its events count up while the guest runs.
        #expect(try eventually(20) {
            let s = try d.client().call("vm.stats", ["vm": "b"])
            return (s["vms"]?.arrayValue?.first?["vcpus"]?.arrayValue?.first?["events"]?.intValue ?? 0) > 100
        })
        let refused = try d.cli(["bpf", "unload", "bpf-lb"])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("in use"))
        let forced = try d.cli(["bpf", "unload", "bpf-lb", "--force"])
        #expect(forced.status == 0, "\(forced.stderr)")
        #expect(forced.stdout.contains("moved to the default driver: b"))
        #expect(try d.client().call("drivers.list").arrayValue?.contains { $0["name"] == "bpf-lb" } == false)
        #expect(try d.cli(["vm", "driver", "b"]).stdout.contains("latency-boost"))
    }

    @Test func metricsTopAndStatsShowTheVM() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess(metrics: true)
        #expect(try d.cli(["vm", "start", "--name", "m", "--workload", "cyclic", "--duration-ms", "60000"]).status == 0)
        #expect(try eventually(20) { try d.vcpus("m").first?.tid ?? 0 > 0 })
        usleep(500_000)
        let address = try #require(try d.client().call("daemon.info")["metrics"]?.stringValue)
        let curl = try PVSchedBinary.run("/usr/bin/curl", ["-sf", "http://\(address)/metrics"])
        #expect(curl.status == 0, "curl: \(curl.stderr)")
        for name in ["pvsched_events_total{", "pvsched_decisions_total{", "pvsched_boosts_total{", "pvsched_boosted_seconds_total{",
                     "pvsched_throttles_total{", "pvsched_vetoes_total{", "pvsched_decision_latency_seconds_bucket{"] {
            #expect(curl.stdout.contains(name), "metrics lack \(name)")
        }
        #expect(curl.stdout.contains(#"vm="m",vcpu="0",driver="latency-boost""#))
        let top = try d.cli(["top", "--count", "2", "--interval", "0.2", "--json"])
        #expect(top.status == 0)
        let lines = top.stdout.split(separator: "\n")
        #expect(lines.count == 2)
        #expect(lines.last.map { (try? JSON.parse(Array($0.utf8)))?.arrayValue?.first?["vm"] == "m" } == true)
        let stats = try d.cli(["stats", "m"])
        #expect(stats.stdout.contains("latency-boost"))
        let trace = try d.client().call("vm.trace", ["vm": "m", "last": 3])
        #expect((trace.arrayValue?.count ?? 0) > 0)
    }

    @Test func anotherUserIsRefused() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let setpriv = "/usr/bin/setpriv"
        let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", d.binary, "vm", "list", "--socket", d.socket]
        let denied = try PVSchedBinary.run(setpriv, nobody)
        #expect(denied.status == 1)
        #expect(denied.stderr.contains("permission denied"), "\(denied.stderr)")
        // Even with the socket file opened to everyone, the daemon checks the peer's credentials.
        chmod(d.socket, 0o666)
        let refused = try PVSchedBinary.run(setpriv, nobody)
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("uid 65534 may not use"), "\(refused.stderr)")
        #expect(try d.client().call("daemon.info")["protocol"] == 1)
    }

    @Test func oneDaemonPerLock() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let second = try PVSchedBinary.run(d.binary, ["daemon", "--socket", d.socket + "2", "--lock", d.lock], timeout: 20)
        #expect(second.status == 1)
        #expect(second.stderr.contains("another pvsched daemon is running"))
    }

    @Test func noDaemonIsSaidClearly() throws {
        guard let binary = PVSchedBinary.path else { throw DaemonTestError("pvsched not built") }
        let r = try PVSchedBinary.run(binary, ["vm", "list", "--socket", "/tmp/pvsched-none-\(getpid()).sock"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("no pvsched daemon is running"))
    }

    /// The guardian: a thread of another process boosted through the daemon is
    /// back to its original parameters within 100 ms of the daemon's SIGKILL.
    @Test func guardianRestoresAnotherProcessesThreadWhenTheDaemonIsKilled() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let victim = try startSleeper()
        defer { kill(victim.processIdentifier, SIGKILL); victim.waitUntilExit() }
        let tid = victim.processIdentifier
        let before = try LinuxScheduling.parameters(of: ThreadID(tid))
        _ = try d.client().call("thread.boost", ["tid": .int(Int64(tid)), "priority": 7, "durationMs": 60_000])
        #expect(try LinuxScheduling.parameters(of: ThreadID(tid)) == .fifo(priority: 7))
        let daemonPID = d.process.processIdentifier
        #expect(kill(daemonPID, SIGKILL) == 0)
        let killedAt = Date()
        let restored = eventually(1) { (try? LinuxScheduling.parameters(of: ThreadID(tid))) == before }
        let elapsed = Date().timeIntervalSince(killedAt)
        let now = try? LinuxScheduling.parameters(of: ThreadID(tid))
        #expect(restored, "victim \(tid) is \(String(describing: now)), was \(String(describing: before)); daemon \(daemonPID)")
        #expect(elapsed < 0.1, "restored after \(Int(elapsed * 1000)) ms")
        d.process.waitUntilExit()
    }

    @Test func sigtermStopsCleanlyWithEveryBoostUndone() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let d = try DaemonProcess()
        let victim = try startSleeper()
        defer { kill(victim.processIdentifier, SIGKILL); victim.waitUntilExit() }
        let tid = victim.processIdentifier
        #expect(try d.cli(["vm", "start", "--name", "t", "--workload", "cyclic", "--duration-ms", "60000"]).status == 0)
        _ = try d.client().call("thread.boost", ["tid": .int(Int64(tid)), "durationMs": 60_000])
        #expect(isRealTime(tid))
        kill(d.process.processIdentifier, SIGTERM)
        d.process.waitUntilExit()
        #expect(d.process.terminationStatus == 0)
        #expect(!isRealTime(tid))
        #expect(access(d.socket, F_OK) != 0, "the socket was left behind")
    }

    /// A daemon started for a process (`--exit-with`, as the lab and the tests start theirs)
    /// stops cleanly, every boost undone, when that process ends, however it ends.
    @Test func aDaemonStartedWithExitWithStopsCleanlyWhenThatProcessEnds() throws {
        try Requirement.root.check(); try Requirement.kvm.check()
        let starter = try startSleeper()
        defer { kill(starter.processIdentifier, SIGKILL); starter.waitUntilExit() }
        let victim = try startSleeper()
        defer { kill(victim.processIdentifier, SIGKILL); victim.waitUntilExit() }
        // A later --exit-with wins over the one DaemonProcess gives (this test process).
        let d = try DaemonProcess(extraArguments: ["--exit-with", "\(starter.processIdentifier)"])
        let tid = victim.processIdentifier
        _ = try d.client().call("thread.boost", ["tid": .int(Int64(tid)), "durationMs": 60_000])
        #expect(isRealTime(tid))
        usleep(300_000)
        #expect(d.process.isRunning, "stopped while its process still runs")
        kill(starter.processIdentifier, SIGKILL)
        #expect(eventually(10) { !d.process.isRunning }, "still serving after its process ended")
        d.process.waitUntilExit()
        #expect(d.process.terminationStatus == 0)
        #expect(!isRealTime(tid))
        #expect(access(d.socket, F_OK) != 0, "the socket was left behind")
        // A process that is not there is refused at the start, naming the option.
        guard let binary = PVSchedBinary.path else { throw DaemonTestError("pvsched not built") }
        defer { unlink(d.socket + "x"); unlink(d.lock + "x") }
        for bad in ["0", "2147483647"] {
            let r = try PVSchedBinary.run(binary, ["daemon", "--socket", d.socket + "x", "--lock", d.lock + "x", "--no-libvirt",
                                                   "--exit-with", bad], timeout: 20)
            #expect(r.status != 0 && r.stderr.contains("--exit-with"), "\(bad): \(r.stderr)")
        }
    }
}

/// The lab's and the tests' daemon starters clean up after starters that were killed.
struct DaemonProcessFileTests {
    /// A killed starter's files go once they are a minute old; a live starter's, and a
    /// fresh file of a dead one (its daemon may still be stopping), stay.
    @Test func filesOfKilledStartersAreRemovedAndNoOneElses() throws {
        let dir = NSTemporaryDirectory() + "pvsched-starters-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let ended = Process()
        ended.executableURL = URL(fileURLWithPath: "/bin/true")
        try ended.run()
        ended.waitUntilExit()
        let dead = ended.processIdentifier
        let old = Date().addingTimeInterval(-120)
        func make(_ name: String, at date: Date) throws {
            try "x".write(toFile: dir + "/" + name, atomically: false, encoding: .utf8)
            try FileManager.default.setAttributes([.modificationDate: date], ofItemAtPath: dir + "/" + name)
        }
        try make("pvsched-it-\(dead)-1.conf", at: old)
        try make("pvsched-it-\(dead)-1.state.json", at: old)
        try make("pvsched-it-\(dead)-2.conf", at: Date())
        try make("pvsched-it-1-3.conf", at: old)  // init: alive
        try make("pvsched-it-\(getpid())-4.conf", at: old)
        try make("other-\(dead).conf", at: old)
        DaemonProcess.removeFilesOfEndedStarters(directory: dir)
        let left = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        #expect(left == ["other-\(dead).conf", "pvsched-it-1-3.conf", "pvsched-it-\(dead)-2.conf", "pvsched-it-\(getpid())-4.conf"].sorted())
    }
}
