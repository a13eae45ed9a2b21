import PVSchedExperiments
import PVSchedTesting
import Testing

/// `pvsched bench --only scale` end to end, small: a real daemon, two stand-in VMs
/// attached through the control API, one of them busy. The numbers are the
/// benchmark's to report; this checks that every part of a row is measured.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.realTime.shouldRun, "needs root and SCHED_FIFO"))
struct ScaleBenchTests {
    @Test func aRowMeasuresTheDaemonAndTheBusyGuestsBoosts() throws {
        var settings = ScaleBench.Settings()
        settings.vmCounts = [2]
        settings.windowSeconds = 1
        settings.holdThroughHaltsUs = 2000
        let rows = try ScaleBench.run(settings)
        let r = try #require(rows.first)
        #expect(r.vms == 2 && r.busyVMs == 1 && r.vcpus == 4)
        // A wake-up every 1 ms for 1 s on the busy VM, almost all of them boosted.
        #expect(r.wakeups > 500, "\(r)")
        #expect(Double(r.wakeupsWithoutBoost) < 0.05 * Double(r.wakeups), "\(r)")
        #expect(r.daemonCpuPerVMPercent > 0 && r.daemonRssMiB > 1, "\(r)")
        // The busy guest goes idle 950 µs before its next deadline: its boost is held through those halts.
        #expect(r.heldHalts > 100, "\(r)")
        #expect(r.threads.keys.contains("pvs-enforcer"), "\(r.threads)")
        #expect(ScaleBench.table(rows, settings: settings).contains("change→boost"))
    }
}
