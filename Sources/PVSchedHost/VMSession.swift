import Atomics
import Logging
import PVSchedCore
import PVSchedKVM
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How the host serves a VM: one it runs itself (built-in VMM) or one another
/// VMM runs and pvsched attaches to (QEMU and others plug in here).
public enum VMSessionKind: String, Sendable {
    case owned
    case attached
}

/// Where a session's VM is in its life.
public enum VMSessionState: Equatable, Sendable, CustomStringConvertible {
    case running
    /// The VM ended on its own (the guest exited or failed).
    case ended(String)
    /// The host stopped it.
    case stopped

    public var description: String {
        switch self {
        case .running: return "running"
        case .ended(let outcome): return "ended (\(outcome))"
        case .stopped: return "stopped"
        }
    }
}

/// One VM served by the host: its identity, its binding (driver, counters,
/// trace, governor), its vCPU threads, and how to stop it.
public protocol VMSession: AnyObject, Sendable {
    var handle: VMHandle { get }
    var kind: VMSessionKind { get }
    /// The binding (nil when the VM runs without pvsched).
    var binding: VMBinding? { get }
    var state: VMSessionState { get }
    /// A short description of what runs in the VM (workload, VMM).
    var summary: String { get }
    /// Stops (owned) or detaches from (attached) the VM and undoes its boosts.
    func stop()
}

/// A VM of the built-in VMM run by the host. A monitor thread waits for the
/// guest to end and then releases the VM (which undoes its boosts).
public final class OwnedVMSession: VMSession {
    public let vm: VirtualMachine
    public var handle: VMHandle { vm.handle }
    public var kind: VMSessionKind { .owned }
    public var binding: VMBinding? { vm.binding }
    private let stateBox = Mutex(VMSessionState.running)
    private let monitor = Mutex<PVSchedCore.Thread?>(nil)
    private let logger: Logger

    init(vm: VirtualMachine, logger: Logger) {
        self.vm = vm
        self.logger = logger
    }

    public var state: VMSessionState { stateBox.withLock { $0 } }

    public var summary: String {
        let c = vm.config
        return "built-in VMM, workload \(c.boot.workload), \(c.vcpus) vCPU\(c.vcpus == 1 ? "" : "s")"
    }

    func start() throws(ThreadError) {
        try vm.start()
        let t: PVSchedCore.Thread
        do throws(ThreadError) {
            t = try PVSchedCore.Thread(name: "pvs-vm-monitor") { [self] in
            let outcome = vm.wait(timeoutNs: .max)
            stateBox.withLock { s in if s == .running { s = .ended("\(outcome)") } }
                logger.info("VM ended", metadata: ["vm": "\(vm.handle)", "outcome": "\(outcome)"])
            }
        } catch {
            vm.stop()
            throw error
        }
        monitor.withLock { $0 = t }
    }

    public func stop() {
        stateBox.withLock { s in if s == .running { s = .stopped } }
        vm.stop()
        monitor.takeAndJoin()
    }
}

/// A VM another VMM runs (QEMU, crosvm, ... or another process of ours), which
/// the host serves without running it: whoever attached it feeds its events
/// into `events` and its guest's area into `registrar`, and tells it the vCPU
/// threads. Stopping it detaches: every boost is undone and `onDetach` runs.
/// An enforcer thread cuts boosts that outlive their budget even when no event
/// comes (the built-in VMM runs the same enforcer for its own VMs).
public final class AttachedVMSession: VMSession {
    public let link: VMHostLink
    public var handle: VMHandle { link.handle }
    public var kind: VMSessionKind { .attached }
    public var binding: VMBinding? { link.events as? VMBinding }
    /// Where the attacher sends vCPU events.
    public var events: any VMEventSink { link.events }
    public let summary: String
    private let stateBox = Mutex(VMSessionState.running)
    private let onDetach: @Sendable () -> Void
    private let enforcing = ManagedAtomic(true)
    private let enforcer = Mutex<PVSchedCore.Thread?>(nil)

    init(link: VMHostLink, summary: String, threads: any ThreadControl, enforcerPriority: UInt8?,
         onDetach: @escaping @Sendable () -> Void) throws(ThreadError) {
        self.link = link
        self.summary = summary
        self.onDetach = onDetach
        let t = try PVSchedCore.Thread(name: "pvs-enforcer") { [enforcing, events = link.events] in
            if let enforcerPriority { try? threads.setCurrentThread(.fifo(priority: enforcerPriority)) }
            events.runEnforcer { enforcing.load(ordering: .relaxed) }
        }
        enforcer.withLock { $0 = t }
    }

    public var state: VMSessionState { stateBox.withLock { $0 } }

    /// The VM went away by itself (its VMM exited): detach and record why.
    public func ended(_ reason: String) {
        let first = stateBox.withLock { s -> Bool in
            guard s == .running else { return false }
            s = .ended(reason)
            return true
        }
        if first { detach() }
    }

    public func stop() {
        let first = stateBox.withLock { s -> Bool in
            guard s == .running else { return false }
            s = .stopped
            return true
        }
        if first { detach() }
    }

    private func detach() {
        enforcing.store(false, ordering: .relaxed)
        link.events.budgetAlarm?.ring()
        enforcer.takeAndJoin()
        onDetach()
        for i in 0..<handle.vcpuCount { link.events.setThread(nil, vcpu: i) }
        link.release()
    }
}
