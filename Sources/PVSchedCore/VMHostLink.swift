import PVSchedABI
#if canImport(Glibc)
import Glibc
#endif

/// Where the hypervisor side of a VM sends its vCPU events: the narrow interface
/// an event source calls out through (cloud-hypervisor's `VmOps` shape): the
/// built-in VMM, the host kernel's KVM events, the region watcher. It knows
/// nothing of registries, drivers, governors, actuators or enforcers; the host
/// component (a `VMBinding`) implements it.
///
/// Calling context: from the vCPU's own thread, a device thread or an event source's
/// thread. Thread-safe.
public protocol VMEventSink: AnyObject, Sendable {
    /// Delivers `event` for `vcpu`. `interruptStillQueued` (for `.vmEntry`) says an
    /// injected interrupt could not be delivered on this entry, so it stays pending.
    /// `cpuTime`: the run time of the vCPU's thread as the event's source read it at
    /// the event (the host kernel does, for free, where the thread is not running);
    /// the binding charges a running boost up to it, and reads the thread's run time
    /// itself where a boost starts, or where `cpuTime` is nil.
    @discardableResult
    func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome
    /// The OS thread that runs `vcpu` now (nil when it stops).
    func setThread(_ thread: ThreadID?, vcpu: Int)
}

extension VMEventSink {
    /// Delivers `event` for `vcpu` (no interrupt left queued, the thread's run time not known).
    @discardableResult
    public func notify(_ event: VCPUEvent, vcpu: Int) -> NotifyOutcome {
        notify(event, vcpu: vcpu, interruptStillQueued: false, cpuTime: nil)
    }

    /// Delivers `event` for `vcpu` (the thread's run time not known).
    @discardableResult
    public func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool) -> NotifyOutcome {
        notify(event, vcpu: vcpu, interruptStillQueued: interruptStillQueued, cpuTime: nil)
    }
}

/// A thread's run time (what its CPU clock or `/proc/TID/schedstat` reads) as an
/// event's source saw it: it stands for the thread's run time now only for that
/// thread (a vCPU whose thread was replaced reads its new one itself).
public struct ThreadCPUTime: Equatable, Sendable {
    public var thread: ThreadID
    public var ns: UInt64
    public init(thread: ThreadID, ns: UInt64) { self.thread = thread; self.ns = ns }
}

/// What code that serves a VM from outside (a region watcher, an attacher) may read
/// of it: a read-only view, never the binding itself.
public protocol VMStatusView: AnyObject, Sendable {
    /// Why pvsched was disabled for the VM, if it was.
    var disabledReason: SharedAreaError? { get }
    /// `vcpu`'s counters as last published (`boosted` among them).
    func publishedStats(vcpu: Int) -> VCPUStats
    /// Whether `vcpu`'s guest may have changed its line since the last look: its thread
    /// ran (or went to sleep) since, as the VM's events say; always true when they say
    /// nothing about its running.
    func lineMayHaveChanged(vcpu: Int) -> Bool
    /// Whether every vCPU's thread sleeps and its line was read after it went to sleep
    /// (as the VM's events say; false when they say nothing): no line can change until
    /// one of them runs again.
    var everyLineReadAsleep: Bool { get }
    /// Stops pvsched for the VM, for a reason outside the guest's lines (its memory went away).
    func disable(_ error: SharedAreaError)
}

/// What the host's enforcer does for a VM, on its own thread: cut boosts past their
/// budget, end repayments that are due, announce deadlines that are near, and say
/// when it must look next (see `BudgetAlarm`). A `VMBinding` implements it.
public protocol VMEnforcement: AnyObject, Sendable {
    /// Cuts boosts that ran past their budget even when no event comes, and ends the
    /// repayments that are due; returns how many boosts it cut.
    @discardableResult
    func enforceBudgets() -> Int
    /// Sends `deadline` for the vCPUs whose published deadline is now near (or will
    /// be within `aheadNs`), whether or not any other event comes; returns how many.
    @discardableResult
    func announceDeadlines(aheadNs: UInt64) -> Int
    /// The earliest time (host monotonic ns) the enforcer has work for this VM: a
    /// running boost that could spend its budget, a repayment to end, or a deadline
    /// to announce; nil when there is none.
    func nextEnforcerWakeNs() -> UInt64?
    /// The real-time priority the enforcer needs to preempt every thread this VM's
    /// boosts raise, and no more.
    var enforcerPriority: UInt8? { get }
}

extension VMEnforcement {
    /// Sends `deadline` for the vCPUs whose published deadline is now near.
    @discardableResult
    public func announceDeadlines() -> Int { announceDeadlines(aheadNs: 0) }
}

/// Why a guest's shared-area registration was refused, with the device's reason code.
public struct AreaRefusal: Error, Equatable, Sendable, CustomStringConvertible {
    /// The PVSCHED_REASON_* code the pvsched device reports to the guest.
    public let code: UInt32
    /// The reason code's name, for counters and metrics.
    public var reason: String {
        switch code {
        case PVSCHED_REASON_OUT_OF_RAM: return "out_of_ram"
        case PVSCHED_REASON_TOO_SMALL: return "too_small"
        case PVSCHED_REASON_BAD_HEADER: return "bad_header"
        case PVSCHED_REASON_NO_DRIVER: return "no_driver"
        case PVSCHED_REASON_VCPU_MISMATCH: return "vcpu_mismatch"
        default: return "other"
        }
    }
    /// A message naming the field or the registry's reason.
    public let message: String
    public init(code: UInt32, message: String) { self.code = code; self.message = message }
    public var description: String { message }
}

/// A guest's area accepted: the protocol it speaks, the driver now serving it, and
/// the validated view of the area itself (what a watcher then reads).
public struct AreaAcceptance: Sendable, CustomStringConvertible {
    public let protocolName: String
    public let protocolVersion: ProtocolVersion
    public let driver: String
    public let area: SharedArea
    public init(protocolName: String, protocolVersion: ProtocolVersion, driver: String, area: SharedArea) {
        self.protocolName = protocolName; self.protocolVersion = protocolVersion; self.driver = driver; self.area = area
    }
    public var description: String { "\(protocolName) \(protocolVersion), driver \(driver)" }
}

extension AreaAcceptance: Equatable {
    public static func == (a: AreaAcceptance, b: AreaAcceptance) -> Bool {
        a.protocolName == b.protocolName && a.protocolVersion == b.protocolVersion && a.driver == b.driver && a.area.base == b.area.base
    }
}

/// Validates and negotiates the shared area a guest registers (through a VMM's
/// pvsched device, or an ivshmem region an attached VM's guest writes): the area
/// is hostile input; a refusal names the field or the reason.
public protocol SharedAreaRegistrar: Sendable {
    /// Validates `bytes` (already known to lie inside memory the VM owns, kept
    /// alive by `owner`), negotiates a driver and installs the area.
    func register(area bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?) -> Result<AreaAcceptance, AreaRefusal>
    /// The guest withdrew its area.
    func unregister()
    /// The VMM refused a registration itself (the area is not inside guest RAM).
    func reportRefusal(_ refusal: AreaRefusal)
}

/// Thread utilities the VMM needs from the host OS, behind a protocol so that the
/// hypervisor component does not depend on the Linux actuator module.
public protocol ThreadControl: Sendable {
    /// The calling thread's id.
    func currentThread() -> ThreadID
    /// Pins `thread` to the CPUs in `mask` (bit i = CPU i).
    func setAffinity(_ thread: ThreadID, mask: UInt64) throws
    /// Sets the calling thread's own parameters (for threads that die with their
    /// owner, such as a VMM's device threads: nothing to restore).
    func setCurrentThread(_ parameters: SchedulingParameters) throws
}

/// What the hypervisor side of one VM holds of the host component: the VM's
/// identity, where its events go, who checks its guest's area, and how to let go
/// when the VM stops. Made by the host; the VMM never builds one itself.
public struct VMHostLink: Sendable {
    public let handle: VMHandle
    public let events: any VMEventSink
    public let registrar: any SharedAreaRegistrar
    private let onRelease: @Sendable () -> Void

    public init(handle: VMHandle, events: any VMEventSink, registrar: any SharedAreaRegistrar,
                onRelease: @escaping @Sendable () -> Void) {
        self.handle = handle; self.events = events; self.registrar = registrar; self.onRelease = onRelease
    }

    /// The VM stopped: undo its boosts and forget it (idempotent on the host side).
    public func release() { onRelease() }
}

extension SharedArea {
    /// Validates an area a guest registered for a VM of `vcpuCount` vCPUs: the
    /// header (every field), then the vCPU count. A refusal carries the pvsched
    /// device's reason code and names the field. Every registrar starts here.
    public static func validated(_ bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?,
                                 vcpuCount: Int) -> Result<SharedArea, AreaRefusal> {
        guard bytes.count >= Int(PVSCHED_REGION_HEADER_SIZE) else {
            return .failure(AreaRefusal(code: PVSCHED_REASON_TOO_SMALL,
                                        message: "area_size \(bytes.count) is smaller than the region header"))
        }
        let area: SharedArea
        do throws(SharedAreaError) {
            area = try SharedArea(validating: bytes, owner: owner)
        } catch {
            let code = error.field == "area_size" ? PVSCHED_REASON_TOO_SMALL : PVSCHED_REASON_BAD_HEADER
            return .failure(AreaRefusal(code: code, message: "\(error)"))
        }
        guard area.layout.vcpuCount == vcpuCount else {
            return .failure(AreaRefusal(code: PVSCHED_REASON_VCPU_MISMATCH,
                                        message: "shared area field `vcpu_count`: \(area.layout.vcpuCount), the VM has \(vcpuCount) vCPUs"))
        }
        return .success(area)
    }
}

/// The registrar of a VM bound in a `DriverRegistry`: validates the header, checks
/// the vCPU count, negotiates the protocol and installs the area in the binding.
public struct BindingRegistrar: SharedAreaRegistrar {
    let registry: DriverRegistry
    let binding: VMBinding

    public init(registry: DriverRegistry, binding: VMBinding) { self.registry = registry; self.binding = binding }

    public func register(area bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?) -> Result<AreaAcceptance, AreaRefusal> {
        let result = negotiate(bytes, owner: owner)
        switch result {
        case .success(let accepted): binding.recordNegotiation(.accepted("\(accepted.protocolName) \(accepted.protocolVersion)"))
        case .failure(let refusal): binding.recordRefusal(refusal)
        }
        return result
    }

    public func reportRefusal(_ refusal: AreaRefusal) { binding.recordRefusal(refusal) }

    private func negotiate(_ bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?) -> Result<AreaAcceptance, AreaRefusal> {
        let area: SharedArea
        switch SharedArea.validated(bytes, owner: owner, vcpuCount: binding.vm.vcpuCount) {
        case .success(let a): area = a
        case .failure(let refusal): return .failure(refusal)
        }
        let driver: any Driver
        do throws(RegistryError) {
            driver = try registry.negotiate(vm: binding.vm.id, protocolName: area.layout.protocolName,
                                            version: area.layout.protocolVersion)
        } catch {
            return .failure(AreaRefusal(code: PVSCHED_REASON_NO_DRIVER, message: "\(error)"))
        }
        binding.setArea(area)
        return .success(AreaAcceptance(protocolName: area.layout.protocolName,
                                       protocolVersion: area.layout.protocolVersion, driver: driver.name, area: area))
    }

    public func unregister() {
        binding.setArea(nil)
        binding.recordNegotiation(.none)
    }
}
