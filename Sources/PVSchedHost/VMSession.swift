import Logging
import PVSchedCore
import PVSchedKVM
import Synchronization

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

    func start() {
        vm.start()
        let t = PVSchedCore.Thread { [self] in
            let outcome = vm.wait(timeoutNs: .max)
            stateBox.withLock { s in if s == .running { s = .ended("\(outcome)") } }
            logger.info("VM ended", metadata: ["vm": "\(vm.handle)", "outcome": "\(outcome)"])
        }
        monitor.withLock { $0 = t }
    }

    public func stop() {
        stateBox.withLock { s in if s == .running { s = .stopped } }
        vm.stop()
        let t = monitor.withLock { m in
            let t = m
            m = nil
            return t
        }
        t?.join()
    }
}
