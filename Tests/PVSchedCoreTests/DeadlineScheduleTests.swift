import PVSchedTesting
import Testing
@testable import PVSchedCore

@Suite struct DeadlineScheduleTests {
    @Test func aDeadlineIsDueItsLeadBeforeItAndAnnouncedOnce() {
        let s = DeadlineSchedule(vcpus: 2, leadNs: 200_000)
        #expect(s.nextDueNs() == nil)
        #expect(s.record(vcpu: 1, guestNs: 5_000_000, hostNs: 9_000_000, now: 1_000_000) == 8_800_000)
        #expect(s.nextDueNs() == 8_800_000)
        // Read again (the same guest value), it is not new.
        #expect(s.record(vcpu: 1, guestNs: 5_000_000, hostNs: 9_000_010, now: 2_000_000) == nil)
        #expect(s.takeDue(now: 8_799_999).isEmpty)
        let due = s.takeDue(now: 8_850_000)
        #expect(due.count == 1 && due[0].vcpu == 1 && due[0].inNs == 150_000)
        #expect(s.takeDue(now: 8_900_000).isEmpty, "once")
        #expect(s.nextDueNs() == nil)
        #expect(s.record(vcpu: 1, guestNs: 5_000_000, hostNs: 9_000_000, now: 8_950_000) == nil, "announced already")
    }

    @Test func theNextDeadlineReplacesTheLastAndNoneClearsIt() {
        let s = DeadlineSchedule(vcpus: 1, leadNs: 100_000)
        #expect(s.record(vcpu: 0, guestNs: 10, hostNs: 5_000_000, now: 0) == 4_900_000)
        #expect(s.record(vcpu: 0, guestNs: 20, hostNs: 3_000_000, now: 0) == 2_900_000, "the guest moved it earlier")
        #expect(s.nextDueNs() == 2_900_000)
        #expect(s.record(vcpu: 0, guestNs: nil, hostNs: nil, now: 0) == nil)
        #expect(s.nextDueNs() == nil)
        #expect(s.record(vcpu: 0, guestNs: 30, hostNs: nil, now: 0) == nil, "the guest's clock not known yet")
        #expect(s.nextDueNs() == nil)
    }

    /// Guest input bounds the enforcer's wake-ups: a deadline already past is not
    /// announced, and one vCPU's announcements are at least `minSpacingNs` apart.
    @Test func aGuestCannotMakeTheEnforcerWakeAtItsPace() {
        let s = DeadlineSchedule(vcpus: 1, leadNs: 0)
        #expect(s.record(vcpu: 0, guestNs: 1, hostNs: 1_000, now: 2_000) == nil, "already past")
        var announced = 0
        var now: UInt64 = 1_000_000
        for k in 0..<400 {
            // At every "exit", 25 µs apart, a new deadline 20 µs ahead.
            _ = s.record(vcpu: 0, guestNs: UInt64(100 + k), hostNs: now + 20_000, now: now)
            now += 25_000
            announced += s.takeDue(now: now).count
        }
        // 10 ms of rewrites: at most one announcement per 100 µs, not one per rewrite.
        #expect(announced <= 10_000_000 / Int(DeadlineSchedule.minSpacingNs) + 1)
        #expect(announced >= 50)
    }

    @Test func theLeadIsClamped() {
        let s = DeadlineSchedule(vcpus: 1)
        #expect(s.leadNs == DeadlineSchedule.defaultLeadNs)
        s.leadNs = .max
        #expect(s.leadNs == DeadlineSchedule.maxLeadNs)
        #expect(s.record(vcpu: 5, guestNs: 1, hostNs: 2, now: 0) == nil, "an unknown vCPU")
    }
}
