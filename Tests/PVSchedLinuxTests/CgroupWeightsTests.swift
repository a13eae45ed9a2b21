import Foundation
import Glibc
import PVSchedCore
@testable import PVSchedLinux
import PVSchedTesting
import Testing

/// The cgroup side of a fair-class boost: on a tree of files shaped like a cgroup
/// hierarchy (the rules), and on this host's own cpu hierarchy with a process's
/// thread alone in a cgroup, as libvirt places vCPU threads (the effect, and the
/// restores).
@Suite(.serialized) struct CgroupWeightsTests {
    /// A directory tree shaped like a cgroup v1 cpu hierarchy: `dirs` below the mount,
    /// each with cpu.shares 1024 and a tasks file.
    final class FakeTree {
        let mount: String
        init(_ dirs: [String]) throws {
            mount = NSTemporaryDirectory() + "pvsched-cgroup-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            for d in [""] + dirs {
                try FileManager.default.createDirectory(atPath: mount + d, withIntermediateDirectories: true)
                try "1024\n".write(toFile: mount + d + "/cpu.shares", atomically: false, encoding: .utf8)
                try "".write(toFile: mount + d + "/tasks", atomically: false, encoding: .utf8)
            }
        }
        func shares(_ d: String) -> UInt64? { CgroupWeights.read(mount + d + "/cpu.shares") }
        func set(_ d: String, _ file: String, _ text: String) throws { try text.write(toFile: mount + d + "/" + file, atomically: false, encoding: .utf8) }
        deinit { try? FileManager.default.removeItem(atPath: mount) }
    }

    @Test func weightsAreThoseOfAThreadAtTheBoostsNice() {
        #expect(CgroupWeights.weight(nice: -20, version: .v1) == 88761)
        #expect(CgroupWeights.weight(nice: 0, version: .v1) == 1024)
        #expect(CgroupWeights.weight(nice: -20, version: .v2) == 8668)
        #expect(CgroupWeights.weight(nice: 0, version: .v2) == 100)
        #expect(CgroupWeights.weight(nice: 19, version: .v2) == 1)
        #expect(CgroupWeights.weight(nice: -100, version: .v1) == 88761)  // clamped, never out of the table
    }

    @Test func aThreadAloneIsRaisedWithItsAncestorsAndEachGetsItsOwnBackAfterTheLastBoost() throws {
        let tree = try FakeTree(["/machine", "/machine/vm1", "/machine/vm1/vcpu0", "/machine/vm1/vcpu1"])
        try tree.set("/machine", "cpu.shares", "2048\n")
        try tree.set("/machine/vm1/vcpu0", "tasks", "101\n")
        try tree.set("/machine/vm1/vcpu1", "tasks", "102\n")
        let w = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid())
        let a = try w.raise(path: "/machine/vm1/vcpu0", thread: 101, nice: -20)
        #expect(a.directories == ["/machine/vm1/vcpu0", "/machine/vm1", "/machine"].map { tree.mount + $0 } && a.weight == 88761)
        let b = try w.raise(path: "/machine/vm1/vcpu1", thread: 102, nice: -20)
        for d in ["/machine", "/machine/vm1", "/machine/vm1/vcpu0", "/machine/vm1/vcpu1"] { #expect(tree.shares(d) == 88761, "\(d)") }
        #expect(tree.shares("") == 1024)  // the hierarchy's root is never touched
        w.release(a)
        // vCPU 1 is still boosted: the VM's cgroup and machine stay raised.
        #expect(tree.shares("/machine/vm1/vcpu0") == 1024 && tree.shares("/machine/vm1") == 88761 && tree.shares("/machine") == 88761)
        w.release(b)
        #expect(tree.shares("/machine/vm1/vcpu1") == 1024 && tree.shares("/machine/vm1") == 1024)
        #expect(tree.shares("/machine") == 2048)  // its own value, not the default
        #expect(w.raisedNow.isEmpty)
    }

    /// A chain checked for one thread is trusted for `recheckNs`, and for that thread
    /// only: a second member added to its cgroup is seen at the next check, and another
    /// thread in the same cgroup path is checked afresh.
    @Test func aCheckedChainIsTrustedForItsThreadUntilTheRecheck() throws {
        let tree = try FakeTree(["/m", "/m/v"])
        try tree.set("/m/v", "tasks", "7\n")
        let w = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid(), recheckNs: 100_000_000)
        w.release(try w.raise(path: "/m/v", thread: 7, nice: -20))
        try tree.set("/m/v", "tasks", "7\n8\n")
        usleep(150_000)
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "/m/v", thread: 7, nice: -20) }
        try tree.set("/m/v", "tasks", "7\n")
        w.release(try w.raise(path: "/m/v", thread: 7, nice: -20))
        try tree.set("/m/v", "tasks", "7\n8\n")
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "/m/v", thread: 8, nice: -20) }
        #expect(tree.shares("/m/v") == 1024 && w.raisedNow.isEmpty)
    }

    @Test func aValueChangedByAnAdministratorWhileHeldIsTheirs() throws {
        let tree = try FakeTree(["/m", "/m/vm", "/m/vm/vcpu0", "/m/vm/vcpu1"])
        try tree.set("/m/vm/vcpu0", "tasks", "1\n")
        try tree.set("/m/vm/vcpu1", "tasks", "2\n")
        let w = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid())
        let first = try w.raise(path: "/m/vm/vcpu0", thread: 1, nice: -20)
        try tree.set("/m", "cpu.shares", "4096\n")
        // Released by one boost, still held by another: not written again, and never restored.
        let second = try w.raise(path: "/m/vm/vcpu1", thread: 2, nice: -20)
        w.release(first)
        #expect(tree.shares("/m") == 4096 && tree.shares("/m/vm") == 88761 && tree.shares("/m/vm/vcpu0") == 1024)
        w.release(second)
        #expect(tree.shares("/m") == 4096 && tree.shares("/m/vm") == 1024 && tree.shares("/m/vm/vcpu1") == 1024)
        #expect(w.raisedNow.isEmpty)
    }

    @Test func aSharedCgroupTheRootAndStrangePathsAreNotRaised() throws {
        let tree = try FakeTree(["/user", "/a"])
        try tree.set("/user", "tasks", "101\n102\n")
        let w = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid())
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "/user", thread: 101, nice: -20) }
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "/", thread: 101, nice: -20) }
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "/a/../user", thread: 101, nice: -20) }
        #expect(throws: CgroupWeights.Refusal.shared) { try w.raise(path: "a", thread: 101, nice: -20) }
        #expect(tree.shares("/user") == 1024)
        // A directory not of the trusted owner (a cgroup delegated to a user) is refused, naming it.
        try tree.set("/a", "tasks", "103\n")
        let strict = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid() &+ 1)
        #expect(throws: CgroupWeights.Refusal.unusable("\(tree.mount)/a is not a directory of uid \(getuid() &+ 1)")) {
            try strict.raise(path: "/a", thread: 103, nice: -20)
        }
        #expect(tree.shares("/a") == 1024)
    }

    @Test func anAdministratorsValueWinsAndAHigherWeightIsNeverLowered() throws {
        let tree = try FakeTree(["/m", "/m/v"])
        try tree.set("/m/v", "tasks", "7\n")
        try tree.set("/m", "cpu.shares", "100000\n")
        let w = CgroupWeights(hierarchy: .init(mount: tree.mount, version: .v1), guardian: nil, owner: getuid())
        let lease = try w.raise(path: "/m/v", thread: 7, nice: -20)
        #expect(tree.shares("/m") == 100000)  // above a nice -20 thread's already: left
        try tree.set("/m/v", "cpu.shares", "5000\n")  // an administrator's own change meanwhile
        w.release(lease)
        #expect(tree.shares("/m/v") == 5000 && tree.shares("/m") == 100000)
    }

    @Test func theGuardiansCgroupRecordRoundTripsAndRestoresOnlyWhatStillHoldsTheRaise() throws {
        let tree = try FakeTree(["/x"])
        let file = tree.mount + "/x/cpu.shares"
        let rec = BoostGuardian.CgroupRecord(file: file, original: 1024, written: [88761, 15])
        let decoded = rec.bytes.withUnsafeBytes { BoostGuardian.CgroupRecord($0) }
        #expect(decoded == rec)
        // Its kind tells the guardian's reader it is no thread record.
        #expect(rec.bytes.withUnsafeBytes { BoostGuardian.Record($0) }?.kind == .cgroup)
        try tree.set("/x", "cpu.shares", "88761\n")
        #expect(BoostGuardian.restoreIfStillWritten(rec))
        #expect(tree.shares("/x") == 1024)
        try tree.set("/x", "cpu.shares", "15\n")  // the repayment's value: pvsched's too
        #expect(BoostGuardian.restoreIfStillWritten(rec))
        #expect(tree.shares("/x") == 1024)
        try tree.set("/x", "cpu.shares", "3000\n")  // someone else's value: stays
        #expect(!BoostGuardian.restoreIfStillWritten(rec))
        #expect(tree.shares("/x") == 3000)
    }

    /// On this host's own hierarchy: a child process's thread moved alone into a
    /// cgroup two levels down (as libvirt's vCPU threads are), boosted by the actuator.
    @Test(.enabled(if: Requirement.cgroups.shouldRun, "\(Requirement.cgroups.reason)"))
    func aBoostedThreadAloneInItsCgroupRaisesItAndItsParentUntilRestored() throws {
        try Requirement.cgroups.check()
        let h = try #require(CgroupWeights.Hierarchy.detect())
        let top = "/pvsched-test-\(getpid())", leaf = top + "/vcpu0"
        let child = Process()
        child.executableURL = URL(fileURLWithPath: "/bin/sleep")
        child.arguments = ["30"]
        try child.run()
        defer {
            kill(child.processIdentifier, SIGKILL); child.waitUntilExit()
            rmdir(h.mount + leaf); rmdir(h.mount + top)
        }
        #expect(mkdir(h.mount + top, 0o755) == 0 && mkdir(h.mount + leaf, 0o755) == 0)
        if h.version == .v2 { try "threaded".write(toFile: h.mount + leaf + "/cgroup.type", atomically: false, encoding: .utf8) }
        let file = h.version == .v1 ? "/cpu.shares" : "/cpu.weight"
        let before = (CgroupWeights.read(h.mount + top + file), CgroupWeights.read(h.mount + leaf + file))
        try "\(child.processIdentifier)\n".write(toFile: h.mount + leaf + "/" + (h.version == .v1 ? "tasks" : "cgroup.threads"),
                                                 atomically: false, encoding: .utf8)
        defer { try? "\(child.processIdentifier)\n".write(toFile: h.mount + "/" + (h.version == .v1 ? "tasks" : "cgroup.procs"), atomically: false, encoding: .utf8) }
        let weights = CgroupWeights(hierarchy: h, guardian: nil)
        let actuator = LinuxActuator(cgroupWeights: weights)
        let tid = ThreadID(child.processIdentifier)
        try actuator.adopt(tid, allowRealTime: false)
        let raised = CgroupWeights.weight(nice: -20, version: h.version)
        try actuator.apply(.slice(nice: -20, sliceUs: 100), to: tid)
        #expect(CgroupWeights.read(h.mount + leaf + file) == raised)
        #expect(CgroupWeights.read(h.mount + top + file) == raised)
        // A repayment (nice 19) is no raise: the cgroups get their own back at once.
        try actuator.apply(.other(nice: 19), to: tid)
        #expect(CgroupWeights.read(h.mount + leaf + file) == before.1 && CgroupWeights.read(h.mount + top + file) == before.0)
        try actuator.apply(.other(nice: -20), to: tid)
        #expect(CgroupWeights.read(h.mount + top + file) == raised)
        try actuator.restore(tid)
        #expect(CgroupWeights.read(h.mount + leaf + file) == before.1 && CgroupWeights.read(h.mount + top + file) == before.0)
        #expect(weights.raisedNow.isEmpty)
        // A new v1 cgroup has no real-time runtime: a real-time boost falls back to the
        // fair class, says why, and still raises the cgroups.
        if access(h.mount + leaf + "/cpu.rt_runtime_us", F_OK) == 0 {
            #expect(actuator.classFallback(of: tid) == nil)
            try actuator.apply(.fifo(priority: 10), to: tid)
            #expect(try LinuxScheduling.parameters(of: tid) == LinuxActuator.realTimeFallback)
            #expect(actuator.classFallback(of: tid)?.contains("\(leaf) has no real-time runtime (cpu.rt_runtime_us 0)") == true,
                    "\(String(describing: actuator.classFallback(of: tid)))")
            #expect(CgroupWeights.read(h.mount + top + file) == raised)
            try actuator.apply(.fifo(priority: 10), to: tid)  // the next one: no second attempt, same class
            #expect(try LinuxScheduling.parameters(of: tid) == LinuxActuator.realTimeFallback)
            try actuator.restore(tid)
            #expect(try LinuxScheduling.parameters(of: tid) == .other(nice: 0))
            #expect(CgroupWeights.read(h.mount + top + file) == before.0)
        }
        actuator.release(tid)
    }

    /// The value files are kept open on a cgroup file system: an administrator's value
    /// written by path meanwhile is still seen (and wins), and a cgroup removed and made
    /// again under the same name is served through a new descriptor.
    @Test(.enabled(if: Requirement.cgroups.shouldRun, "\(Requirement.cgroups.reason)"))
    func keptValueFilesSeeOtherWritersAndACgroupMadeAgain() throws {
        try Requirement.cgroups.check()
        let h = try #require(CgroupWeights.Hierarchy.detect())
        let dir = h.mount + "/pvsched-files-\(getpid())", file = dir + (h.version == .v1 ? "/cpu.shares" : "/cpu.weight")
        #expect(mkdir(dir, 0o755) == 0)
        defer { rmdir(dir) }
        let files = CgroupValueFiles(limit: 2)
        let own = try #require(files.read(file))
        #expect(files.count == 1)
        #expect(files.write(file, own * 2) && CgroupWeights.read(file) == own * 2)
        #expect(CgroupWeights.write(file, own * 3) && files.read(file) == own * 3, "a write by path is seen through the kept file")
        #expect(files.count == 1)
        #expect(rmdir(dir) == 0)
        #expect(files.read(file) == nil && files.count == 0, "a removed cgroup's file is dropped")
        #expect(mkdir(dir, 0o755) == 0)
        #expect(files.read(file) == own && files.write(file, own + 1) && CgroupWeights.read(file) == own + 1)
        // Past the limit the cache starts over.
        if h.version == .v1 {
            #expect(files.read(dir + "/cpu.cfs_period_us") != nil && files.count == 2)
            _ = files.read(dir + "/cpu.cfs_quota_us")  // -1: no number, still opened
            #expect(files.count == 1)
            #expect(files.read(file) == own + 1 && files.count == 2)
        }
        // A file of another file system is never kept.
        let other = NSTemporaryDirectory() + "pvsched-files-\(getpid())"
        try "7\n".write(toFile: other, atomically: false, encoding: .utf8)
        defer { unlink(other) }
        let kept = files.count
        #expect(files.read(other) == 7 && files.write(other, 8) && CgroupWeights.read(other) == 8 && files.count == kept)
    }
}
