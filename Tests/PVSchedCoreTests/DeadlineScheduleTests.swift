import PVSchedTesting
import Testing
@testable import PVSchedCore

@Suite struct DeadlineScheduleTests {
    @Test func aDeadlineIsDueItsLeadBeforeItAndAnnouncedOnce() {
        var s = DeadlineSlot()
        let lead: UInt64 = 200_000
        #expect(s.nextDueNs == nil)
        #expect(s.record(guestNs: 5_000_000, hostNs: 9_000_000, now: 1_000_000, leadNs: lead) == 8_800_000)
        #expect(s.nextDueNs == 8_800_000)
        // Read again (the same guest value), it is not new.
        #expect(s.record(guestNs: 5_000_000, hostNs: 9_000_010, now: 2_000_000, leadNs: lead) == nil)
        #expect(s.takeDue(now: 8_799_999) == nil)
        #expect(s.takeDue(now: 8_850_000) == 150_000)
        #expect(s.takeDue(now: 8_900_000) == nil, "once")
        #expect(s.nextDueNs == nil)
        #expect(s.record(guestNs: 5_000_000, hostNs: 9_000_000, now: 8_950_000, leadNs: lead) == nil, "announced already")
    }

    @Test func theNextDeadlineReplacesTheLastAndNoneClearsIt() {
        var s = DeadlineSlot()
        #expect(s.record(guestNs: 10, hostNs: 5_000_000, now: 0, leadNs: 100_000) == 4_900_000)
        #expect(s.record(guestNs: 20, hostNs: 3_000_000, now: 0, leadNs: 100_000) == 2_900_000, "the guest moved it earlier")
        #expect(s.nextDueNs == 2_900_000)
        #expect(s.record(guestNs: nil, hostNs: nil, now: 0, leadNs: 100_000) == nil)
        #expect(s.nextDueNs == nil)
        #expect(s.record(guestNs: 30, hostNs: nil, now: 0, leadNs: 100_000) == nil, "the guest's clock not known yet")
        #expect(s.nextDueNs == nil)
    }

    /// Guest input bounds the enforcer's wake-ups: a deadline already past is not
    /// announced, and one vCPU's announcements are at least `minSpacingNs` apart.
    @Test func aGuestCannotMakeTheEnforcerWakeAtItsPace() {
        var s = DeadlineSlot()
        #expect(s.record(guestNs: 1, hostNs: 1_000, now: 2_000, leadNs: 0) == nil, "already past")
        var announced = 0
        var now: UInt64 = 1_000_000
        for k in 0..<400 {
            // At every "exit", 25 µs apart, a new deadline 20 µs ahead.
            _ = s.record(guestNs: UInt64(100 + k), hostNs: now + 20_000, now: now, leadNs: 0)
            now += 25_000
            if s.takeDue(now: now) != nil { announced += 1 }
        }
        // 10 ms of rewrites: at most one announcement per 100 µs, not one per rewrite.
        #expect(announced <= 10_000_000 / Int(DeadlineSchedule.minSpacingNs) + 1)
        #expect(announced >= 50)
    }

    @Test func theLeadIsClamped() {
        let lead = DeadlineLead()
        #expect(lead.leadNs == DeadlineSchedule.defaultLeadNs)
        lead.leadNs = .max
        #expect(lead.leadNs == DeadlineSchedule.maxLeadNs)
    }
}
