import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import PVSchedTesting
import Testing

/// The attacks of issue #24, each as it was reproduced on 69c5680 (as root, a
/// daemon on a private socket, an unprivileged user `nobody` where the attack
/// needs one), and what must happen instead.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.realTime.shouldRun, "needs root and real-time scheduling"))
struct HostileLocalUserTests {
    static let nobody: UInt32 = 65534

    static func tag() -> String { "\(getpid())-\(UInt32.random(in: 0...UInt32.max))" }

    static func info(_ d: DaemonProcess) throws -> JSON { try d.client().call("daemon.info") }

    static func vm(_ d: DaemonProcess, _ name: String) throws -> JSON? {
        try d.client().call("vm.list").arrayValue?.first { $0["name"]?.stringValue == name }
    }

    /// Runs a command as `nobody`.
    static func asNobody(_ args: [String]) throws -> CommandResult {
        try PVSchedBinary.run("/usr/bin/setpriv", ["--reuid=\(nobody)", "--regid=\(nobody)", "--clear-groups", "--"] + args)
    }

    // 1. The guardian killed, then another process's thread boosted: the daemon died
    // of SIGPIPE and a thread boosted before stayed SCHED_FIFO 7 forever.
    @Test func aKilledGuardianIsRestartedWithEveryLiveBoostAndTheDaemonLivesOn() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let first = try startSleeper(), second = try startSleeper()
        defer { first.terminate(); second.terminate() }
        _ = try d.client().call("thread.boost", ["tid": .int(Int64(first.processIdentifier)), "priority": 7, "durationMs": 60_000])
        #expect(try LinuxScheduling.parameters(of: ThreadID(first.processIdentifier)) == .fifo(priority: 7))
        let guardian = Int32(try Self.info(d)["guardian"]?["pid"]?.intValue ?? 0)
        #expect(guardian > 0)
        kill(guardian, SIGKILL)
        // Whatever the moment, the daemon answers: a boost while no guardian runs is
        // refused (never unguarded), one after the restart goes through.
        _ = try? d.client().call("thread.boost", ["tid": .int(Int64(second.processIdentifier)), "priority": 7, "durationMs": 60_000])
        #expect(d.process.isRunning)
        #expect(try eventually(10) {
            let g = try Self.info(d)["guardian"]
            return g?["state"]?.stringValue == "up" && (g?["restarts"]?.intValue ?? 0) >= 1 && Int32(g?["pid"]?.intValue ?? 0) != guardian
        })
        _ = try d.client().call("thread.boost", ["tid": .int(Int64(second.processIdentifier)), "priority": 7, "durationMs": 60_000])
        #expect(try LinuxScheduling.parameters(of: ThreadID(second.processIdentifier)) == .fifo(priority: 7))
        // The new guardian was handed the boost made before it: both come back when the daemon is killed.
        kill(d.process.processIdentifier, SIGKILL)
        d.process.waitUntilExit()
        #expect(eventually(5) { !isRealTime(first.processIdentifier) && !isRealTime(second.processIdentifier) })
    }

    /// A stopped guardian (SIGSTOP, a debugger) would restore nothing if the daemon
    /// died: boosts of other processes' threads are refused while it is stopped
    /// (never made unguarded), and the supervisor replaces it; the daemon answers
    /// throughout. (A guardian whose pipe fills up: `BoostGuardianTests`.)
    @Test func aStoppedGuardianIsReplacedAndNoBoostIsEverUnguarded() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let vmm = try StandInProcess(vcpus: 3)
        defer { vmm.stop() }
        let c = try d.client()
        _ = try c.call("thread.boost", ["tid": .int(Int64(vmm.threads[0])), "priority": 5, "durationMs": 60_000])
        let guardian = Int32(try Self.info(d)["guardian"]?["pid"]?.intValue ?? 0)
        kill(guardian, SIGSTOP)
        #expect(try eventually(5) { try Self.info(d)["guardian"]?["state"]?.stringValue == "stalled" })
        do {
            _ = try c.call("thread.boost", ["tid": .int(Int64(vmm.threads[1])), "priority": 5, "durationMs": 60_000])
            Issue.record("boosted another process's thread with a stopped guardian")
        } catch {
            #expect(error.message.contains("guardian"), "\(error)")
        }
        #expect(!isRealTime(vmm.threads[1]))
        #expect(try eventually(15) {
            let g = try Self.info(d)["guardian"]
            return g?["state"]?.stringValue == "up" && Int32(g?["pid"]?.intValue ?? 0) != guardian
        })
        kill(guardian, SIGCONT)
        _ = try c.call("thread.boost", ["tid": .int(Int64(vmm.threads[2])), "priority": 5, "durationMs": 60_000])
        kill(d.process.processIdentifier, SIGKILL)
        d.process.waitUntilExit()
        #expect(eventually(5) { vmm.threads.allSatisfy { !isRealTime($0) } }, "left real-time: \(vmm.threads.filter(isRealTime))")
    }

    // 2. A region owned by the VMM's user, truncated by that user under the daemon:
    // the daemon died of SIGBUS, for every VM.
    @Test func aRegionTruncatedByItsOwnerDisablesTheVMAndTheDaemonCarriesOn() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let path = "/dev/shm/pvsched-trunc-\(Self.tag())"
        let vmm = try StandInProcess(vcpus: 2, region: path, arguments: ["--mode", "644"], asUser: Self.nobody)
        defer { vmm.stop(); unlink(path) }
        let attach = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--thread-names", "cloud-hypervisor", "--shm", path,
                                "--name", "t", "--events", "watch", "--driver", "latency-boost"])
        #expect(attach.status == 0, "\(attach.stderr)")
        #expect(try eventually(10) { try Self.vm(d, "t")?["negotiation"]?.stringValue?.hasPrefix("accepted") == true })
        let t = try Self.asNobody(["/usr/bin/truncate", "-s", "0", path])
        #expect(t.status == 0, "\(t.stderr)")
        #expect(try eventually(10) { try Self.vm(d, "t")?["disabled"]?.stringValue?.contains("truncated") == true },
                "\((try? Self.vm(d, "t"))??.pretty ?? "")")
        #expect(d.process.isRunning)
        #expect(try d.cli(["vm", "list"]).status == 0)
        #expect(try d.cli(["vm", "stop", "t"]).status == 0)
    }

    /// A region any user can write (nobody's 0666 file), or owned by someone other
    /// than root and the VMM's user, is refused before it is mapped.
    @Test func aRegionWritableByAnyoneOrOwnedByAStrangerIsRefused() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let open = "/dev/shm/pvsched-open-\(Self.tag())"
        let vmm = try StandInProcess(vcpus: 1, region: open, arguments: ["--mode", "666"], asUser: Self.nobody)
        defer { vmm.stop(); unlink(open) }
        let r = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(vmm.threads[0])", "--shm", open, "--name", "o"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("writable by any user"), "\(r.stderr)")
        // Root's own VMM, nobody's file: neither root's nor the VMM's user's.
        let rootVMM = try StandInProcess(vcpus: 1)
        defer { rootVMM.stop() }
        _ = chmod(open, 0o644)
        let s = try d.cli(["vm", "attach", "--pid", "\(rootVMM.pid)", "--threads", "\(rootVMM.threads[0])", "--shm", open, "--name", "s"])
        #expect(s.status == 1)
        #expect(s.stderr.contains("owned by uid \(Self.nobody)"), "\(s.stderr)")
    }

    // 3. nobody's symlink to / and `--memory /dev/shm/L/etc/shadow`: the file was
    // opened as root and the refusal printed its first bytes.
    @Test func aSymbolicLinkOnThePathIsRefusedAndNothingOfAnyFileIsShown() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let link = "/dev/shm/pvsched-link-\(Self.tag())"
        #expect(try Self.asNobody(["/bin/ln", "-s", "/", link]).status == 0)
        defer { unlink(link) }
        let vmm = try StandInProcess(vcpus: 1)
        defer { vmm.stop() }
        let r = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(vmm.threads[0])", "--memory", "\(link)/etc/shadow",
                           "--area-offset", "0", "--area-size", "64", "--name", "x"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("symbolic link"), "\(r.stderr)")
        #expect(!r.stderr.contains("root") && !r.stderr.contains("0x"), "\(r.stderr)")
        // A link to a file of root's under /dev/shm is refused the same way.
        let target = "/dev/shm/pvsched-target-\(Self.tag())"
        let fileLink = link + "-file"
        _ = FileManager.default.createFile(atPath: target, contents: Data(count: 1 << 16), attributes: [.posixPermissions: 0o600])
        defer { unlink(target); unlink(fileLink) }
        #expect(symlink(target, fileLink) == 0)
        let s = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(vmm.threads[0])", "--shm", fileLink, "--name", "y"])
        #expect(s.status == 1 && s.stderr.contains("symbolic link"), "\(s.stderr)")
        // A file the VMM does not map is not its memory.
        let u = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(vmm.threads[0])", "--shm", target, "--name", "z"])
        #expect(u.status == 1 && u.stderr.contains("not mapped by process"), "\(u.stderr)")
    }

    // 4. A VM attached with --threads TID; the thread exits; another process gets the
    // same id; the guest's flags change: the stranger ran SCHED_FIFO 10.
    @Test func aThreadIDHandedToAnotherProcessIsNeverBoosted() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let path = "/dev/shm/pvsched-recycle-\(Self.tag())"
        let vmm = try StandInProcess(vcpus: 2, region: path)
        defer { vmm.stop() }
        let tids = vmm.threads
        let attach = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(tids[0]),\(tids[1])", "--shm", path,
                                "--name", "r", "--events", "watch", "--driver", "latency-boost"])
        #expect(attach.status == 0, "\(attach.stderr)")
        #expect(try eventually(10) { try Self.vm(d, "r")?["negotiation"]?.stringValue?.hasPrefix("accepted") == true })
        // The mechanism works: vCPU 0's RT task gets its thread boosted.
        try vmm.command("line 0 10 fifo 80")
        #expect(eventually(5) { isRealTime(tids[0]) })
        try vmm.command("line 0 40")
        #expect(eventually(5) { !isRealTime(tids[0]) })
        // vCPU 1's thread exits and its id goes to a new process.
        try vmm.command("exit 1")
        let stranger = try recycle(tids[1])
        defer { stranger.terminate() }
        try vmm.command("line 1 10 fifo 80")
        usleep(500_000)
        #expect(!isRealTime(tids[1]), "the process that got the id was boosted")
        #expect(try eventually(5) {
            try Self.vm(d, "r")?["vcpus"]?.arrayValue?.first { $0["index"]?.intValue == 1 }?["owner"]?.stringValue == "gone"
        }, "\((try? Self.vm(d, "r"))??.pretty ?? "")")
    }

    // 5. A boosted thread that forks: the child kept nice -20 forever.
    @Test func childrenForkedDuringABoostOrARepaymentDoNotKeepIt() throws {
        try Requirement.realTime.check()
        let vmm = try StandInProcess(vcpus: 1)
        defer { vmm.stop() }
        let tid = ThreadID(vmm.threads[0])
        let act = LinuxActuator()
        try act.adopt(tid, allowRealTime: false)
        func child() throws -> Int32 {
            let answer = try vmm.command("fork 0")
            return Int32(answer.split(separator: " ").last ?? "") ?? -1
        }
        var spawned: [Int32] = []
        defer { for p in spawned { kill(p, SIGKILL) } }
        try act.apply(.slice(nice: -20, sliceUs: 3000), to: tid)
        let duringBoost = try child(); spawned.append(duringBoost)
        #expect(try LinuxScheduling.parameters(of: ThreadID(duringBoost)) == .other(nice: 0))
        try act.apply(.other(nice: 19), to: tid)  // a repayment: the kernel's reset on fork keeps a positive nice
        let duringRepayment = try child(); spawned.append(duringRepayment)
        #expect(try LinuxScheduling.parameters(of: ThreadID(duringRepayment)) == .other(nice: 19))
        try act.restore(tid)
        #expect(try LinuxScheduling.parameters(of: tid) == .other(nice: 0))
        #expect(try LinuxScheduling.parameters(of: ThreadID(duringRepayment)) == .other(nice: 0))
        #expect(try LinuxScheduling.parameters(of: ThreadID(duringBoost)) == .other(nice: 0))
        try act.apply(.fifo(priority: 10), to: tid)
        let duringRT = try child(); spawned.append(duringRT)
        #expect(try LinuxScheduling.parameters(of: ThreadID(duringRT)) == .other(nice: 0))
        try act.restore(tid)
    }

    // 6. A guest's protocol name printed raw: `vm list` showed its escape sequences.
    @Test func aProtocolNameWithTerminalControlsIsRefusedAndNeverPrinted() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let path = "/dev/shm/pvsched-esc-\(Self.tag())"
        let vmm = try StandInProcess(vcpus: 1, region: path, arguments: ["--protocol-name", "\u{1B}[31mred\u{1B}]0;title\u{07}"])
        defer { vmm.stop() }
        #expect(try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", "\(vmm.threads[0])", "--shm", path, "--name", "e",
                           "--events", "watch"]).status == 0)
        #expect(try eventually(10) { try Self.vm(d, "e")?["negotiation"]?.stringValue?.contains("protocol_name") == true })
        let list = try d.cli(["vm", "list"])
        #expect(list.status == 0)
        #expect(!list.stdout.utf8.contains(0x1B) && !list.stdout.utf8.contains(0x07), "\(list.stdout)")
        #expect(list.stdout.contains("printable"), "\(list.stdout)")
    }

    /// Exhaustion is an error: a daemon out of threads (its pids cgroup full)
    /// answers the requests it can with an error and never crashes.
    @Test func aDaemonOutOfThreadsAnswersWithAnErrorAndLivesOn() throws {
        try Requirement.root.check()
        let cgroup = "/sys/fs/cgroup/pids/pvsched-exhaust-\(Self.tag())"
        guard mkdir(cgroup, 0o755) == 0 else {
            #expect(Requirement.root.isMet == false || access("/sys/fs/cgroup/pids", F_OK) != 0, "cannot make \(cgroup)")
            return
        }
        defer { rmdir(cgroup) }
        let d = try DaemonProcess()
        let keep = try d.client()  // a connection (and its thread) made before the limit
        let pid = d.process.processIdentifier
        try "\(pid)\n".write(toFile: cgroup + "/cgroup.procs", atomically: false, encoding: .utf8)
        defer { try? "\(pid)\n".write(toFile: "/sys/fs/cgroup/pids/cgroup.procs", atomically: false, encoding: .utf8) }
        let current = Int((try? String(contentsOfFile: cgroup + "/pids.current", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "") ?? 0
        try "\(current)\n".write(toFile: cgroup + "/pids.max", atomically: false, encoding: .utf8)
        // No thread for a new connection: it is told so.
        if let c = try? ControlClient(path: d.socket) {
            do { _ = try c.call("vm.list"); Issue.record("a connection was served with no thread to serve it") } catch {
                #expect(error.code == .busy, "\(error)")
            }
        }
        // No thread for a VM's enforcer: the request fails, the daemon carries on.
        do {
            _ = try keep.call("vm.start", ["vcpus": 1, "workload": "idle", "durationMs": 1000])
            Issue.record("a VM started with no thread to run it")
        } catch {
            #expect(error.message.contains("thread"), "\(error)")
        }
        #expect(d.process.isRunning)
        try "max\n".write(toFile: cgroup + "/pids.max", atomically: false, encoding: .utf8)
        #expect(try keep.call("vm.list").arrayValue?.isEmpty == true)
    }
}

/// Gives `tid`, which must be free, to a new process (`sleep`), through
/// /proc/sys/kernel/ns_last_pid (root): the next id the kernel hands out follows it.
func recycle(_ tid: Int32) throws -> Process {
    for _ in 0..<50 {
        try "\(tid - 1)".write(toFile: "/proc/sys/kernel/ns_last_pid", atomically: false, encoding: .utf8)
        let p = try startSleeper()
        if p.processIdentifier == tid { return p }
        p.terminate()
        p.waitUntilExit()
    }
    throw DaemonTestError("could not give id \(tid) to a new process")
}

/// `--read-group`: members read, and boost threads their own user runs within
/// limits; everything else stays root's (it used to be root-equivalent).
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.realTime.shouldRun, "needs root and real-time scheduling"))
struct ReadGroupTests {
    @Test func aReadGroupMemberReadsAndBoostsOnlyItsOwnThreadsWithinLimits() throws {
        try Requirement.root.check()
        let d = try DaemonProcess(extraArguments: ["--read-group", "nogroup"])
        let own = try StandInProcess(vcpus: 1, asUser: HostileLocalUserTests.nobody)
        let roots = try startSleeper()
        defer { own.stop(); roots.terminate() }
        func asMember(_ args: [String]) throws -> CommandResult {
            try PVSchedBinary.run("/usr/bin/setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "--", d.binary] + args + ["--socket", d.socket])
        }
        #expect(try asMember(["vm", "list"]).status == 0)
        #expect(try asMember(["drivers"]).status == 0)
        let start = try asMember(["vm", "start", "--workload", "idle"])
        #expect(start.status == 1 && start.stderr.contains("root only"), "\(start.stderr)")
        let load = try asMember(["bpf", "load", "sample"])
        #expect(load.status == 1 && load.stderr.contains("root only"), "\(load.stderr)")
        // Its own thread, below the protected priorities, for a bounded time.
        let ok = try asMember(["thread", "boost", "\(own.threads[0])", "--priority", "20", "--duration-ms", "5000"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(isRealTime(own.threads[0]))
        let high = try asMember(["thread", "boost", "\(own.threads[0])", "--priority", "60", "--duration-ms", "5000"])
        #expect(high.status != 0 && high.stderr.contains("priority"), "\(high.stderr)")
        let root = try asMember(["thread", "boost", "\(roots.processIdentifier)", "--priority", "5", "--duration-ms", "5000"])
        #expect(root.status != 0 && root.stderr.contains("not one of uid 65534"), "\(root.stderr)")
        #expect(!isRealTime(roots.processIdentifier))
    }
}
