import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import PVSchedTesting
import Testing

/// Everything at once, while VMs are boosted: the guardian killed and then
/// stopped, a region truncated by its owner, a vCPU thread's id handed to another
/// process. The daemon answers throughout; each affected VM is disabled with the
/// reason; no thread is left boosted or changed, even after the daemon is killed.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.realTime.shouldRun, "needs root and real-time scheduling"))
struct FaultTests {
    @Test func guardianDeathAndStallATruncatedRegionAndARecycledThreadAtOnce() throws {
        try Requirement.root.check()
        let d = try DaemonProcess()
        let tag = "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let steady = try StandInProcess(vcpus: 2, region: "/dev/shm/pvsched-fault-a-\(tag)")
        let truncated = try StandInProcess(vcpus: 2, region: "/dev/shm/pvsched-fault-b-\(tag)", arguments: ["--mode", "644"],
                                           asUser: HostileLocalUserTests.nobody)
        let recycled = try StandInProcess(vcpus: 2, region: "/dev/shm/pvsched-fault-c-\(tag)")
        defer { steady.stop(); truncated.stop(); recycled.stop() }
        for (name, vmm) in [("a", steady), ("b", truncated), ("c", recycled)] {
            let r = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--threads", vmm.threads.map(String.init).joined(separator: ","),
                               "--shm", vmm.region!, "--name", name, "--events", "watch", "--driver", "static-rt"])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let all = steady.threads + truncated.threads + recycled.threads
        #expect(eventually(10) { all.allSatisfy(isRealTime) }, "not boosted: \(all.filter { !isRealTime($0) })")

        // The guardian killed, then its successor stopped.
        let first = Int32(try d.client().call("daemon.info")["guardian"]?["pid"]?.intValue ?? 0)
        kill(first, SIGKILL)
        #expect(try eventually(10) {
            let g = try d.client().call("daemon.info")["guardian"]
            return g?["state"]?.stringValue == "up" && Int32(g?["pid"]?.intValue ?? 0) != first
        })
        let second = Int32(try d.client().call("daemon.info")["guardian"]?["pid"]?.intValue ?? 0)
        kill(second, SIGSTOP)
        // The region truncated by its owner.
        #expect(try HostileLocalUserTests.asNobody(["/usr/bin/truncate", "-s", "0", truncated.region!]).status == 0)
        // A vCPU thread exits and its id goes to another process, which the guest then "boosts".
        try recycled.command("exit 1")
        let stranger = try recycle(recycled.threads[1])
        defer { stranger.terminate() }
        try recycled.command("line 1 10 fifo 80")

        #expect(try eventually(10) { try HostileLocalUserTests.vm(d, "b")?["disabled"]?.stringValue?.contains("truncated") == true })
        #expect(eventually(10) { truncated.threads.allSatisfy { !isRealTime($0) } })
        #expect(try eventually(10) {
            try HostileLocalUserTests.vm(d, "c")?["vcpus"]?.arrayValue?.first { $0["index"]?.intValue == 1 }?["owner"]?.stringValue == "gone"
        }, "\((try? HostileLocalUserTests.vm(d, "c"))??.pretty ?? "")")
        #expect(!isRealTime(stranger.processIdentifier))
        #expect(try d.client().call("vm.list").arrayValue?.count == 3)
        // The stalled guardian is replaced, and the new one knows every live boost.
        #expect(try eventually(15) {
            let g = try d.client().call("daemon.info")["guardian"]
            return g?["state"]?.stringValue == "up" && Int32(g?["pid"]?.intValue ?? 0) != second
        })
        kill(second, SIGCONT)
        kill(d.process.processIdentifier, SIGKILL)
        d.process.waitUntilExit()
        let left = (steady.threads + truncated.threads + [recycled.threads[0], stranger.processIdentifier]).filter(isRealTime)
        #expect(eventually(5) { (steady.threads + [recycled.threads[0]]).allSatisfy { !isRealTime($0) } }, "left boosted: \(left)")
        #expect(!isRealTime(stranger.processIdentifier))
    }
}
