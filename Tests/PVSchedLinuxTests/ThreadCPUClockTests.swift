import Foundation
import Glibc
import PVSchedCore
import Testing
@testable import PVSchedLinux

/// The CPU clock the governor charges boosts by: ours through the thread CPU
/// clock, another process's threads through /proc/TID/schedstat.
@Suite struct ThreadCPUClockTests {
    @Test func aThreadOfThisProcessIsReadByItsCPUClock() throws {
        let clock = ThreadCPUClock()
        let me = LinuxScheduling.currentThread()
        let before = try #require(clock.cpuTimeNs(of: me))
        // Spin for 20 ms of wall time: the thread's CPU time grows, by no more than that.
        let start = MonotonicClock.nowNs()
        var x: UInt64 = 1
        while MonotonicClock.nowNs() - start < 20_000_000 { x = x &* 6364136223846793005 &+ 1 }
        let after = try #require(clock.cpuTimeNs(of: me))
        #expect(x != 0)
        #expect(after > before)
        #expect(after - before <= MonotonicClock.nowNs() - start + 1_000_000)
    }

    /// Starts `argv` as a child process; returns its pid.
    func spawn(_ argv: [String]) throws -> pid_t {
        var pid: pid_t = 0
        var cArgs = argv.map { strdup($0) } + [nil]
        defer { for p in cArgs { free(p) } }
        let r = posix_spawn(&pid, argv[0], nil, nil, &cArgs, environ)
        guard r == 0 else { throw POSIXError(POSIXErrorCode(rawValue: r) ?? .EINVAL) }
        return pid
    }

    func end(_ pid: pid_t) {
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }

    @Test func aSleepingThreadAccruesNothingAndAnotherProcessIsReadBySchedstat() throws {
        let clock = ThreadCPUClock()
        // A child that sleeps: its CPU time stands still while wall time passes.
        let sleeper = try spawn(["/bin/sleep", "5"])
        defer { end(sleeper) }
        usleep(50_000)
        let a = try #require(clock.cpuTimeNs(of: ThreadID(sleeper)))
        usleep(100_000)
        let b = try #require(clock.cpuTimeNs(of: ThreadID(sleeper)))
        #expect(b - a < 5_000_000)
        // A busy child accrues CPU time.
        let spinner = try spawn(["/bin/sh", "-c", "while :; do :; done"])
        defer { end(spinner) }
        let s0 = try #require(clock.cpuTimeNs(of: ThreadID(spinner)))
        usleep(200_000)
        let s1 = try #require(clock.cpuTimeNs(of: ThreadID(spinner)))
        #expect(s1 > s0 + 10_000_000)
        // A thread that does not exist has no clock.
        #expect(clock.cpuTimeNs(of: ThreadID(Int32.max - 7)) == nil)
    }
}
