import CLinuxSched
import Glibc
import PVSchedCore
@testable import PVSchedLinux
import PVSchedTesting
import Testing

/// The daemon's side of the guardian, with a stand-in that never reads its pipe
/// (`/bin/sleep`): records wait, then are refused once the pipe is full, and a
/// guardian stuck that long is replaced and handed every record again. Nothing blocks.
@Suite(.serialized) struct BoostGuardianTests {
    static func record(_ i: Int32) -> (Int32, pvs_sched_attr, pvs_sched_attr) {
        (100_000 + i, LinuxScheduling.attr(for: .other(nice: 0)), LinuxScheduling.attr(for: .fifo(priority: 5)))
    }

    @Test func aGuardianThatReadsNothingFillsItsPipeThenIsReplaced() throws {
        let g = try BoostGuardian(executable: "/bin/sleep", arguments: ["60"])
        defer { g.close() }
        #expect(g.status.state == .up)
        var accepted = 0, refused = 0
        let start = MonotonicClock.nowNs()
        for i in Int32(0)..<200 {
            let (tid, original, boosted) = Self.record(i)
            if g.announce(tid: tid, tgid: 1, startTime: 1, original: original, changed: boosted) { accepted += 1 } else { refused += 1 }
        }
        // A pipe holds 64 KiB: 128 records of 512 bytes; the rest wait, refused. No call blocked.
        #expect(accepted == 128 && refused == 72, "accepted \(accepted), refused \(refused)")
        #expect(MonotonicClock.nowNs() - start < 1_000_000_000)
        #expect(g.status.state == .stalled)
        #expect(g.status.records == 200)
        // Stuck for longer than the limit: replaced (and the new one, reading nothing either, fills up again).
        let first = g.status.pid
        #expect(eventually(10) { g.status.pid != first && g.status.restarts >= 1 })
        // Announcing the same record again changes nothing and costs no write.
        let (tid, original, boosted) = Self.record(0)
        _ = g.announce(tid: tid, tgid: 1, startTime: 1, original: original, changed: boosted)
        #expect(g.status.records == 200)
    }

    @Test func aGuardianDoesNotRestoreAThreadWhoseIDWasHandedOn() throws {
        let t = try ParkedThread()
        defer { t.finish() }
        #expect(t.set(.other(nice: 5)))
        var start: UInt64 = 0
        #expect(pvs_thread_start_time(t.id.rawValue, &start) == 0)
        let rec = BoostGuardian.Record(kind: .thread, tid: t.id.rawValue, tgid: getpid(), startTime: start + 1,
                                       original: LinuxScheduling.attr(for: .other(nice: 0)),
                                       changed: [LinuxScheduling.attr(for: .other(nice: 5))])
        #expect(!BoostGuardian.restoreIfStillChanged(rec, since: 0))
        #expect(try LinuxScheduling.parameters(of: t.id) == .other(nice: 5))
        #expect(t.set(.other(nice: 0)))
    }
}

func eventually(_ seconds: Double, _ condition: () -> Bool) -> Bool {
    let deadline = MonotonicClock.nowNs() + UInt64(seconds * 1e9)
    while MonotonicClock.nowNs() < deadline {
        if condition() { return true }
        usleep(10_000)
    }
    return condition()
}
