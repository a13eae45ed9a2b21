import Synchronization
import Testing
@testable import PVSchedCore
#if canImport(Glibc)
import Glibc
#endif

/// The enforcer's alarm: it sleeps until the next budget check, and a need for an
/// earlier check (a boost beginning) wakes it, a later one does not.
@Suite struct BudgetAlarmTests {
    @Test func itSleepsUntilTheNextCheckAndALaterNeedDoesNotWakeIt() throws {
        let alarm = BudgetAlarm()
        let start = MonotonicClock.nowNs()
        let woke = WokeBox()
        let t = try PVSchedCore.Thread { alarm.sleep { start + 40_000_000 }; woke.mark() }
        usleep(5_000)
        alarm.need(checkAtNs: start + 10_000_000_000)
        t.join()
        #expect(woke.at >= start + 40_000_000)
        #expect(alarm.wakeUps == 1)
    }

    @Test func anEarlierNeedWakesItWellBeforeItsIdlePause() throws {
        let alarm = BudgetAlarm()
        let woke = WokeBox()
        let t = try PVSchedCore.Thread { alarm.sleep { nil }; woke.mark() }
        usleep(10_000)
        let needed = MonotonicClock.nowNs()
        alarm.need(checkAtNs: needed + 1_000_000)
        t.join()
        #expect(woke.at - needed < BudgetAlarm.idleNs / 2)
    }

    @Test func aRingBeforeTheSleepIsNotLost() {
        let alarm = BudgetAlarm()
        alarm.ring()
        let start = MonotonicClock.nowNs()
        alarm.sleep { nil }
        #expect(MonotonicClock.nowNs() - start < BudgetAlarm.idleNs / 2)
    }
}

/// When a sleeper returned.
final class WokeBox: Sendable {
    private let value = Atomic<UInt64>(0)
    var at: UInt64 { value.load(ordering: .acquiring) }
    func mark() { value.store(MonotonicClock.nowNs(), ordering: .releasing) }
}
