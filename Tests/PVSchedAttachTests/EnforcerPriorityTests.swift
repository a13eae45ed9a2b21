import PVSchedCore
import PVSchedHost
import PVSchedLinux
import PVSchedTesting
import Synchronization
import Testing

/// Records the parameters threads ask for themselves, changing nothing.
final class RecordingThreadControl: ThreadControl {
    let requests = Mutex<[SchedulingParameters]>([])
    func currentThread() -> ThreadID { LinuxScheduling.currentThread() }
    func setAffinity(_ thread: ThreadID, mask: UInt64) throws {}
    func setCurrentThread(_ parameters: SchedulingParameters) throws { requests.withLock { $0.append(parameters) } }
}

@Suite struct EnforcerPriorityTests {
    /// An attached VM's budget enforcer runs real-time just above what the VM's boosts
    /// can raise, not above the host's real-time work.
    @Test(.enabled(if: Requirement.realTime.shouldRun, "\(Requirement.realTime.reason)"),
          arguments: [("slice:3000", SchedulingParameters.fifo(priority: 1)), ("nice:-20", .fifo(priority: 1)),
                      ("fifo:10", .fifo(priority: 50)), ("rr:30", .fifo(priority: 50))])
    func theEnforcerRunsJustAboveTheVMsBoosts(boost: String, expected: SchedulingParameters) throws {
        let threads = RecordingThreadControl()
        let host = try PVSchedHost(actuator: RecordingActuator(), threads: threads)
        let boosted = try #require(BoostSettings.parseClass(boost))
        let session = try host.attach(VMSpec(name: "enforced", source: .inProcess(vcpus: 1, summary: "test"), driver: "deadline-boost",
                                             boost: BoostSettings(boosted: boosted)))
        defer { session.stop() }
        #expect(eventually { !threads.requests.withLock { $0.isEmpty } })
        #expect(threads.requests.withLock { $0 } == [expected])
    }
}
