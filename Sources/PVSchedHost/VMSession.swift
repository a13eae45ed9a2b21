import Logging
import PVSchedAttach
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
    public let binding: VMBinding?
    private let stateBox = Mutex(VMSessionState.running)
    private let monitor = Mutex<PVSchedCore.Thread?>(nil)
    private let logger: Logger

    init(vm: VirtualMachine, binding: VMBinding?, logger: Logger) {
        self.vm = vm
        self.binding = binding
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

/// A VM another VMM runs (QEMU, crosvm, ... or code of this process), which the
/// host serves without running it. Its events arrive through `events` (from the
/// host kernel, the watcher of its area, or its caller), its guest's area through
/// `link.registrar`; the host's enforcer cuts its boosts on time whether or not
/// events come. Stopping it detaches: what the attach started stops (in reverse
/// order), then every boost is undone.
public final class AttachedVMSession: VMSession {
    public let link: VMHostLink
    public var handle: VMHandle { link.handle }
    public var kind: VMSessionKind { .attached }
    /// The host component serving the VM (the control plane reads and steers it).
    let vmBinding: VMBinding
    public var binding: VMBinding? { vmBinding }
    /// Where the VM's events go.
    public var events: any VMEventSink { link.events }
    public let summary: String
    private let stateBox = Mutex(VMSessionState.running)
    /// Boxed: a closure kept in a `Mutex` directly is re-wrapped in reabstraction thunks at each `withLock`.
    private final class Action: Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }
    private let detachActions = Mutex<[Action]>([])
    private let watchBox = Mutex<RegionWatch?>(nil)
    private let reportBox = Mutex(AttachReport())

    init(link: VMHostLink, binding: VMBinding, summary: String) {
        self.link = link
        self.vmBinding = binding
        self.summary = summary
    }

    public var state: VMSessionState { stateBox.withLock { $0 } }

    /// The watch of the guest's area, when the attach watches it.
    public internal(set) var watch: RegionWatch? {
        get { watchBox.withLock { $0 } }
        set { watchBox.withLock { $0 = newValue } }
    }

    /// What the attach found and set up.
    public internal(set) var report: AttachReport {
        get { reportBox.withLock { $0 } }
        set { reportBox.withLock { $0 = newValue } }
    }

    /// Runs `action` when the VM is detached (before its boosts are undone).
    func onDetach(_ action: @escaping @Sendable () -> Void) {
        let a = Action(action)
        detachActions.withLock { $0.append(a) }
    }

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
        let actions = detachActions.withLock { a in
            let all = a
            a.removeAll()
            return all
        }
        for action in actions.reversed() { action.run() }
        for i in 0..<handle.vcpuCount { link.events.setThread(nil, vcpu: i) }
        link.release()
    }
}
