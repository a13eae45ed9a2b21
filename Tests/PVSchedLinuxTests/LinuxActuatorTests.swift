import CLinuxSched
import PVSchedCore
import Synchronization
import PVSchedTesting
import Testing
import Glibc
@testable import PVSchedLinux

/// A thread that sleeps until told to stop, so a test can change its scheduling.
final class ParkedThread: Sendable {
    private final class Shared: Sendable {
        let tid = Atomic<Int32>(0)
        let stop = Atomic(false)
    }
    private let shared = Shared()
    let thread: PVSchedCore.Thread
    init() throws {
        let shared = self.shared
        thread = try Thread {
            shared.tid.store(pvs_gettid(), ordering: .releasing)
            while !shared.stop.load(ordering: .relaxed) { usleep(1000) }
        }
        while shared.tid.load(ordering: .acquiring) == 0 { usleep(100) }
    }
    var id: ThreadID { ThreadID(shared.tid.load(ordering: .acquiring)) }
    /// Sets the thread's scheduling parameters directly (as an administrator would); true on success.
    func set(_ p: SchedulingParameters) -> Bool {
        var a = LinuxScheduling.attr(for: p)
        return pvs_sched_setattr(id.rawValue, &a) == 0
    }
    func finish() { shared.stop.store(true, ordering: .relaxed); thread.join() }
}

let realTimeAvailable = LinuxScheduling.canUseRealTime

@Suite(.serialized) struct LinuxActuatorTests {
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func boostsARealThreadAndRestoresItsOriginalParameters() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let act = LinuxActuator()
        // Give the thread a non-default original so restoring is not a coincidence.
        #expect(t.set(.other(nice: 3)))
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 3))

        try act.apply(.fifo(priority: 12), to: t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .fifo(priority: 12))
        #expect(pvs_restore_table_count() >= 1)
        try act.apply(.rr(priority: 20), to: t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .rr(priority: 20))
        try act.restore(t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 3))
        #expect(act.applied(to: t.id) == nil)
    }

    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func anAdministratorsChangeWinsAndTheBaselineFromAttachIsRestored() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let act = LinuxActuator()
        #expect(t.set(.other(nice: 2)))
        try act.adopt(t.id, allowRealTime: false)
        try act.apply(.fifo(priority: 11), to: t.id)
        try act.restore(t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 2))
        // Boosted, then reniced by an administrator: restore leaves their setting.
        try act.apply(.fifo(priority: 11), to: t.id)
        #expect(t.set(.other(nice: 7)))
        #expect(throws: ActuatorError.self) { try act.restore(t.id) }
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 7))
        // While it stands, no boost.
        do { try act.apply(.fifo(priority: 11), to: t.id); Issue.record("boosted over the administrator's setting") } catch {
            guard case .ownedByOperator(let now) = error.kind else { Issue.record("\(error)"); return }
            #expect(now == .other(nice: 7))
        }
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 7))
        // Put back at the baseline, the thread is boosted and restored again.
        #expect(t.set(.other(nice: 2)))
        try act.apply(.fifo(priority: 11), to: t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .fifo(priority: 11))
        try act.restore(t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 2))
        act.release(t.id)
    }

    /// The EEVDF slice class: nice -20 with a short slice of its own, read back as such,
    /// and restored to no slice of its own (the default one, following the sysctl).
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func aSliceBoostSetsTheThreadsOwnSliceAndRestoreLeavesItWithTheDefault() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let base = LinuxScheduling.defaultSliceNs
        try #require(base > 0, "the kernel reports no default slice (before Linux 6.12)")
        let act = LinuxActuator()
        try act.adopt(t.id, allowRealTime: false)
        try act.apply(.slice(nice: -20, sliceUs: 150), to: t.id)
        var now = pvs_sched_attr()
        #expect(pvs_sched_getattr(t.id.rawValue, &now) == 0)
        #expect(now.sched_policy == UInt32(PVS_SCHED_OTHER) && now.sched_nice == -20 && now.sched_runtime == 150_000)
        #expect(try LinuxScheduling.parameters(of: t.id) == .slice(nice: -20, sliceUs: 150))
        try act.restore(t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 0))
        #expect(pvs_sched_getattr(t.id.rawValue, &now) == 0)
        #expect(now.sched_runtime == base)
        // A slice an administrator gave the thread while boosted is theirs: not restored.
        try act.apply(.slice(nice: -20, sliceUs: 150), to: t.id)
        #expect(t.set(.slice(nice: -5, sliceUs: 2000)))
        #expect(throws: ActuatorError.self) { try act.restore(t.id) }
        #expect(try LinuxScheduling.parameters(of: t.id) == .slice(nice: -5, sliceUs: 2000))
        #expect(t.set(.other(nice: 0)))
        act.release(t.id)
    }

    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func aRealTimeThreadIsRefusedAtAttachUnlessAllowed() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        #expect(t.set(.fifo(priority: 3)))
        let act = LinuxActuator()
        do { try act.adopt(t.id, allowRealTime: false); Issue.record("adopted a real-time thread") } catch {
            #expect(error.kind == .realTimeAtAttach(current: .fifo(priority: 3)))
        }
        try act.adopt(t.id, allowRealTime: true)
        try act.apply(.fifo(priority: 9), to: t.id)
        try act.restore(t.id)
        #expect(try LinuxScheduling.parameters(of: t.id) == .fifo(priority: 3))
        #expect(t.set(.other(nice: 0)))
    }

    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func restoreAllPutsEveryThreadBack() throws {
        let a = try ParkedThread(), b = try ParkedThread()
        defer { a.finish(); b.finish() }
        let act = LinuxActuator()
        try act.apply(.fifo(priority: 5), to: a.id)
        try act.apply(.fifo(priority: 6), to: b.id)
        act.restoreAll()
        #expect(try LinuxScheduling.parameters(of: a.id) == .other(nice: 0))
        #expect(try LinuxScheduling.parameters(of: b.id) == .other(nice: 0))
    }

    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func bindingBoostsTheVCPUThreadThroughLatencyBoostDecisions() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let r = DriverRegistry()
        try r.register(BoostOnInjection())
        try r.setDefault("boost-on-injection")
        let b = try r.bind(vm: VMHandle(id: 3, name: "linux", vcpuCount: 1), actuator: LinuxActuator())
        b.setThread(t.id, vcpu: 0)
        #expect(b.notify(.interruptInjection(vector: 32), vcpu: 0) == .boosted)
        #expect(try LinuxScheduling.parameters(of: t.id) == .fifo(priority: 10))
        r.unbind(vm: 3)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 0))
    }

    /// A fair-class boost passes through SCHED_FIFO 1 (`LinuxScheduling.placeAfresh`)
    /// but ends exactly at its parameters, and its restore leaves no trace of the step.
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func aFairBoostEndsAtItsParametersAfterThePlacementStep() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let act = LinuxActuator()
        #expect(t.set(.other(nice: 4)))
        try act.adopt(t.id, allowRealTime: false)
        for boost in [SchedulingParameters.other(nice: -20), .batch(nice: -10)] {
            try act.apply(boost, to: t.id)
            #expect(try LinuxScheduling.parameters(of: t.id) == boost)
            try act.restore(t.id)
            #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 4))
        }
        var entry = pvs_sched_attr()
        #expect(pvs_restore_table_lookup(t.id.rawValue, &entry) == 0)
    }

    /// Only a waiting thread is placed afresh: the state comes from /proc/TID/stat.
    @Test func aSleepingThreadIsWaitingAndASpinningOneIsNot() throws {
        let parked = try ParkedThread()
        defer { parked.finish() }
        // The parked thread wakes every millisecond: it is found waiting at least once.
        #expect((0..<100).contains { _ in LinuxScheduling.isWaiting(parked.id) })
        let stop = Atomic(false), tid = Atomic<Int32>(0)
        let spinner = try PVSchedCore.Thread {
            tid.store(pvs_gettid(), ordering: .releasing)
            while !stop.load(ordering: .relaxed) {}
        }
        while tid.load(ordering: .acquiring) == 0 { usleep(100) }
        #expect(!LinuxScheduling.isWaiting(ThreadID(tid.load(ordering: .acquiring))))
        stop.store(true, ordering: .relaxed)
        spinner.join()
        #expect(!LinuxScheduling.isWaiting(ThreadID(Int32.max)))  // no such thread
    }

    /// If the daemon dies between the placement step and the boost, the guardian
    /// finds the thread at SCHED_FIFO 1 and puts it back; a real-time boost's thread
    /// found at FIFO 1 is an administrator's, and stays.
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"))
    func theGuardianRestoresAThreadCaughtAtThePlacementStep() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        let original = LinuxScheduling.attr(for: .other(nice: 3))
        for (boost, restored) in [(SchedulingParameters.slice(nice: -20, sliceUs: 100), true), (.fifo(priority: 10), false)] {
            #expect(t.set(LinuxScheduling.placementStep))
            var start: UInt64 = 0
            #expect(pvs_thread_start_time(t.id.rawValue, &start) == 0)
            let record = BoostGuardian.Record(kind: .thread, tid: t.id.rawValue, tgid: getpid(), startTime: start, original: original,
                                              changed: [LinuxScheduling.attr(for: boost)])
            #expect(BoostGuardian.restoreIfStillChanged(record, since: 0) == restored)
            #expect(try LinuxScheduling.parameters(of: t.id) == (restored ? .other(nice: 3) : LinuxScheduling.placementStep))
        }
        #expect(t.set(.other(nice: 3)))
    }

    @Test func errorsAreTypedAndNameTheThread() {
        let act = LinuxActuator()
        #expect(throws: ActuatorError.self) { try act.apply(.fifo(priority: 1), to: ThreadID(0x7fff_fff0)) }
    }
}

final class BoostOnInjection: Driver {
    let name = "boost-on-injection"
    let protocolName = "pvsched-latency"
    let protocolVersion = ProtocolVersion(major: 1, minor: 0)
    let events: EventMask = [.interruptInjection]
    func decide(event: VCPUEvent, view: VCPUView) -> Decision { .boost() }
}

/// The `pvsched` binary built beside the test bundle, if it was built.
let pvschedBinary: String? = {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    guard n > 0 else { return nil }
    var dir = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    while let slash = dir.lastIndex(of: "/"), !dir.hasSuffix(".build") {
        dir = String(dir[..<slash])
        let candidate = dir + "/pvsched"
        if access(candidate, X_OK) == 0 { return candidate }
        if dir.isEmpty { break }
    }
    return nil
}()

@Suite(.serialized) struct SignalRestoreTests {
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"),
          .enabled(if: pvschedBinary != nil, "the pvsched binary is not built (run `swift build` first)"),
          arguments: [SIGTERM, SIGINT])
    func aSignalledProcessRestoresTheThreadsItBoosted(signal: Int32) throws {
        let t = try ParkedThread()
        defer { t.finish() }
        var pid: pid_t = 0
        let args = [pvschedBinary!, "boost-thread", "\(t.id.rawValue)", "--priority", "7", "--seconds", "30"]
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // Start the child with default dispositions and nothing blocked, whatever the test runner uses.
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t(), defaults = sigset_t()
        sigemptyset(&none)
        sigemptyset(&defaults); sigaddset(&defaults, SIGTERM); sigaddset(&defaults, SIGINT)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        #expect(posix_spawn(&pid, args[0], nil, &attr, &argv, environ) == 0)
        // Wait until the child has boosted our thread.
        var boosted = false
        for _ in 0..<500 {
            if (try? LinuxScheduling.parameters(of: t.id)) == .fifo(priority: 7) { boosted = true; break }
            usleep(10_000)
        }
        #expect(boosted)
        kill(pid, signal)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        // Killed by the signal (re-raised after restoring), not exited normally.
        #expect(status & 0x7f == signal)
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 0))
    }
}
