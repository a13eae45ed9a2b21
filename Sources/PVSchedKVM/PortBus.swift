import Logging
import PVSchedABI
import PVSchedCore

/// What a port write asks of the vCPU loop beyond the device's own state.
public enum PortEffect: Equatable, Sendable {
    case none
    /// The guest ended the VM (the exit port).
    case finish(VMOutcome)
}

/// A device on the port bus. It sees a port, a value and the vCPU that accessed
/// it, never the VM: whatever else it needs (guest memory, the host link) it was
/// given when it was made.
public protocol PortDevice: Sendable {
    /// The ports it answers (inclusive).
    var ports: ClosedRange<UInt16> { get }
    /// A guest write (`io.data` holds the bytes).
    func write(_ io: PortIO, vcpu: Int) -> PortEffect
    /// A guest read of `port`: the value returned (first element).
    func read(port: UInt16, vcpu: Int) -> UInt32
}

/// Routes port IO to the device that claims the port (Firecracker's bus). Ports
/// nobody claims read as all ones and ignore writes, like an empty ISA bus.
public struct PortBus: Sendable {
    private let devices: [any PortDevice]

    /// Devices whose port ranges overlap are a programming error, caught here.
    public init(_ devices: [any PortDevice]) {
        for (i, a) in devices.enumerated() {
            for b in devices[(i + 1)...] {
                precondition(!a.ports.overlaps(b.ports), "port devices overlap: \(a.ports) and \(b.ports)")
            }
        }
        self.devices = devices
    }

    private func device(for port: UInt16) -> (any PortDevice)? { devices.first { $0.ports.contains(port) } }

    public func write(_ io: PortIO, vcpu: Int) -> PortEffect { device(for: io.port)?.write(io, vcpu: vcpu) ?? .none }
    public func read(port: UInt16, vcpu: Int) -> UInt32 { device(for: port)?.read(port: port, vcpu: vcpu) ?? 0xFFFF_FFFF }
}

/// The exit port: the guest writes its exit code, the VM ends.
struct ExitPort: PortDevice {
    var ports: ClosedRange<UInt16> { UInt16(PVSCHED_PORT_EXIT)...UInt16(PVSCHED_PORT_EXIT) }
    func write(_ io: PortIO, vcpu: Int) -> PortEffect { .finish(.exited(code: io.value)) }
    func read(port: UInt16, vcpu: Int) -> UInt32 { 0xFFFF_FFFF }
}

/// What the vCPU loop does after an exit.
public enum ExitAction: Equatable, Sendable {
    /// Enter the guest again.
    case resume
    /// The vCPU halted: sleep until an interrupt is queued (userspace irqchip).
    case waitForInterrupt
    /// The VM ends with this outcome.
    case finish(VMOutcome)
}

/// Turns one VM exit into the devices' work, the driver events it causes and
/// what the vCPU loop does next (Firecracker's `run_emulation` shape), so the
/// exit path is testable with synthetic exits and no /dev/kvm. Device work comes
/// first, so a decision to unboost (a reschedule of this thread) never delays it.
public struct ExitHandler: Sendable {
    public let bus: PortBus
    public let events: (any VMEventSink)?

    public init(bus: PortBus, events: (any VMEventSink)?) { self.bus = bus; self.events = events }

    /// Handles `exit` of vCPU `vcpu`. `reply` is the value a port read returns (to be
    /// put back into kvm_run before the next entry); `registers` is read only for
    /// failures that report them.
    public func handle(_ exit: VMExit, vcpu: Int, registers: () -> RegisterDump?) -> (action: ExitAction, reply: UInt32?) {
        switch exit {
        case .io(let io):
            var reply: UInt32?
            var action = ExitAction.resume
            if io.isWrite {
                if case .finish(let outcome) = bus.write(io, vcpu: vcpu) { action = .finish(outcome) }
            } else {
                reply = bus.read(port: io.port, vcpu: vcpu)
            }
            let reason: ExitReason = io.port == UInt16(PVSCHED_DEV_DOORBELL) && io.isWrite ? .doorbell : exit.reason
            events?.notify(.vmExit(reason), vcpu: vcpu)
            return (action, reply)
        case .halt:
            events?.notify(.vmExit(.halt), vcpu: vcpu)
            events?.notify(.halt, vcpu: vcpu)
            return (.waitForInterrupt, nil)
        case .interrupted:
            events?.notify(.vmExit(.intr), vcpu: vcpu)
            return (.resume, nil)
        case .interruptWindowOpen:
            events?.notify(.vmExit(.interruptWindow), vcpu: vcpu)
            return (.resume, nil)
        case .mmio(let address, let write, _):
            events?.notify(.vmExit(exit.reason), vcpu: vcpu)
            return (.finish(.failed(vcpu: vcpu, failure: .mmioOutsideRAM(address: address, write: write))), nil)
        case .shutdown:
            return (.finish(.failed(vcpu: vcpu, failure: .shutdown(registers: registers()))), nil)
        case .internalError(let sub):
            return (.finish(.failed(vcpu: vcpu, failure: .internalError(suberror: sub, registers: registers()))), nil)
        case .failEntry(let r):
            return (.finish(.failed(vcpu: vcpu, failure: .failEntry(reason: r))), nil)
        case .unknown(let r):
            return (.finish(.failed(vcpu: vcpu, failure: .unhandled(reason: r))), nil)
        }
    }
}
