import PVSchedCore

/// `ThreadControl` on Linux: gettid, sched_setaffinity and sched_setattr on the
/// calling thread.
public struct LinuxThreadControl: ThreadControl {
    public init() {}
    public func currentThread() -> ThreadID { LinuxScheduling.currentThread() }
    public func setAffinity(_ thread: ThreadID, mask: UInt64) throws { try LinuxScheduling.setAffinity(thread, mask: mask) }
    public func setCurrentThread(_ parameters: SchedulingParameters) throws {
        try LinuxScheduling.setCurrentThread(parameters)
    }
}
