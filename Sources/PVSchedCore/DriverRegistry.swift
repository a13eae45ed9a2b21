import Logging
import Synchronization

/// Why a registry operation failed.
public enum RegistryError: Error, Equatable, Sendable, CustomStringConvertible {
    case duplicateName(String)
    case unknownDriver(String)
    case driverInUse(String, vms: [String])
    case unknownVM(UInt64)
    case vmAlreadyBound(UInt64)
    case noDriverForProtocol(name: String, version: ProtocolVersion)
    case assignedDriverIncompatible(driver: String, implements: String, guest: String)
    /// The registry holds as many drivers (or VMs) as it takes.
    case full(what: String, limit: Int)

    public var description: String {
        switch self {
        case .duplicateName(let n): return "a driver named '\(n)' is already registered"
        case .unknownDriver(let n): return "no driver named '\(n)' is registered"
        case .driverInUse(let n, let vms): return "driver '\(n)' is in use by \(vms.joined(separator: ", ")); unregister with force to detach it"
        case .unknownVM(let id): return "no VM with id \(id) is bound"
        case .vmAlreadyBound(let id): return "VM \(id) is already bound"
        case .noDriverForProtocol(let n, let v): return "no registered driver implements protocol '\(n)' compatible with version \(v)"
        case .assignedDriverIncompatible(let d, let impl, let guest):
            return "driver '\(d)' assigned to this VM implements \(impl), the guest speaks \(guest)"
        case .full(let what, let limit): return "at most \(limit) \(what) (unload or stop one first)"
        }
    }
}

/// A summary of a registered driver, for listings.
public struct DriverInfo: Equatable, Sendable {
    public let name: String
    public let protocolName: String
    public let protocolVersion: ProtocolVersion
    public let events: EventMask
    public let vms: [String]
    public let isDefault: Bool
}

/// The host component: drivers registered by name, VMs bound to it, and which
/// driver serves each VM (an explicit assignment, or the default driver).
/// Control-plane operations are serialised; the per-event path runs in
/// `VMBinding` and never takes the registry's locks.
public final class DriverRegistry: Sendable {
    private struct State {
        var drivers: [String: any Driver] = [:]
        var order: [String] = []
        var defaultName: String?
        var bindings: [UInt64: VMBinding] = [:]
        var explicit: [UInt64: String] = [:]
    }
    private let state = Mutex(State())
    /// Serialises assign/replace/unregister so that driver swaps never interleave.
    private let control = Mutex(())
    private let logger: Logger

    /// Registered drivers and bound VMs are bounded: every one costs memory (a BPF
    /// object's maps up to 64 MiB) and metric series, and requests are hostile input.
    public static let maxDrivers = 64
    public static let maxVMs = 1024

    public init(logger: Logger = Logger(label: "pvsched.registry")) { self.logger = logger }

    // MARK: drivers

    /// Registers `driver` under its unique name.
    public func register(_ driver: any Driver) throws(RegistryError) {
        try state.withLock { s throws(RegistryError) in
            guard s.drivers[driver.name] == nil else { throw .duplicateName(driver.name) }
            guard s.drivers.count < Self.maxDrivers else { throw .full(what: "drivers", limit: Self.maxDrivers) }
            s.drivers[driver.name] = driver
            s.order.append(driver.name)
        }
        logger.debug("driver registered", metadata: ["driver": "\(driver.name)", "protocol": "\(driver.protocolName) \(driver.protocolVersion)"])
    }

    /// Unregisters a driver. A driver serving a VM is refused unless `force`, which
    /// moves those VMs to the default driver (or to none) first.
    @discardableResult
    public func unregister(_ name: String, force: Bool = false) throws(RegistryError) -> any Driver {
        try control.withLock { _ throws(RegistryError) in
            let (driver, users): ((any Driver)?, [VMBinding]) = state.withLock { s in
                (s.drivers[name], s.bindings.values.filter { $0.driver?.name == name })
            }
            guard let driver else { throw .unknownDriver(name) }
            if !users.isEmpty && !force { throw .driverInUse(name, vms: users.map { "\($0.vm)" }.sorted()) }
            let fallback: (any Driver)? = state.withLock { s in
                s.drivers[name] = nil
                s.order.removeAll { $0 == name }
                if s.defaultName == name { s.defaultName = nil }
                for (id, n) in s.explicit where n == name { s.explicit[id] = nil }
                return s.defaultName.flatMap { s.drivers[$0] }
            }
            for b in users { b.install(fallback) }
            logger.debug("driver unregistered", metadata: ["driver": "\(name)", "detachedFrom": "\(users.count)"])
            return driver
        }
    }

    public func driver(named name: String) -> (any Driver)? { state.withLock { $0.drivers[name] } }

    /// The driver best able to serve a guest speaking `name` at `version`: the default
    /// driver if it is compatible, else the compatible driver with the newest version.
    public func driver(forProtocol name: String, version: ProtocolVersion) -> (any Driver)? {
        state.withLock { s in
            if let d = s.defaultName.flatMap({ s.drivers[$0] }), d.protocolName == name, d.protocolVersion.canServe(version) {
                return d
            }
            return s.order.compactMap { s.drivers[$0] }
                .filter { $0.protocolName == name && $0.protocolVersion.canServe(version) }
                .max { $0.protocolVersion < $1.protocolVersion }
        }
    }

    public var drivers: [DriverInfo] {
        state.withLock { s in
            s.order.compactMap { s.drivers[$0] }.map { d in
                DriverInfo(name: d.name, protocolName: d.protocolName, protocolVersion: d.protocolVersion,
                           events: d.events,
                           vms: s.bindings.values.filter { $0.driver?.name == d.name }.map { "\($0.vm)" }.sorted(),
                           isDefault: s.defaultName == d.name)
            }
        }
    }

    /// The driver VMs get when nothing was assigned to them explicitly.
    public var defaultDriverName: String? { state.withLock { $0.defaultName } }

    /// Sets (or clears) the default driver. VMs without an explicit assignment switch to it.
    public func setDefault(_ name: String?) throws(RegistryError) {
        try control.withLock { _ throws(RegistryError) in
            let moves: [VMBinding] = try state.withLock { s throws(RegistryError) in
                if let name, s.drivers[name] == nil { throw .unknownDriver(name) }
                s.defaultName = name
                return s.bindings.filter { s.explicit[$0.key] == nil }.map(\.value)
            }
            let d = name.flatMap { driver(named: $0) }
            for b in moves where b.driver !== d { b.install(d) }
        }
    }

    // MARK: VMs

    /// Binds a VM to the host component. It starts with the default driver (if any).
    /// `clock` is where the binding reads the time (a manual clock in tests).
    public func bind(vm: VMHandle, actuator: any Actuator, governor: GovernorConfig = .default,
                     boost: BoostSettings = BoostSettings(), trace: EventTrace? = nil,
                     clock: any HostClock = SystemClock(), alarm: (any EnforcerAlarm)? = nil) throws(RegistryError) -> VMBinding {
        try control.withLock { _ throws(RegistryError) in
            let binding = VMBinding(vm: vm, actuator: actuator, governor: governor, boost: boost, trace: trace,
                                    logger: Logger(label: "pvsched.vm"), clock: clock, alarm: alarm,
                                    ejector: { [weak self] b, driver, reason in self?.eject(b, driver: driver, reason: reason) })
            let d: (any Driver)? = try state.withLock { s throws(RegistryError) in
                guard s.bindings[vm.id] == nil else { throw .vmAlreadyBound(vm.id) }
                guard s.bindings.count < Self.maxVMs else { throw .full(what: "VMs", limit: Self.maxVMs) }
                s.bindings[vm.id] = binding
                return s.defaultName.flatMap { s.drivers[$0] }
            }
            if let d { binding.install(d) }
            return binding
        }
    }

    /// Ejects `driver` from the VM of binding `b` because it kept failing: the VM
    /// loses its explicit assignment and goes back to the default driver (or to
    /// none, if the failing driver is the default), and the reason is recorded.
    func eject(_ b: VMBinding, driver name: String, reason: String) {
        control.withLock { _ in
            let fallback: (any Driver)? = state.withLock { s in
                guard s.bindings[b.vm.id] === b, b.driver?.name == name else { return nil }
                s.explicit[b.vm.id] = nil
                return s.defaultName.flatMap { $0 == name ? nil : s.drivers[$0] }
            }
            guard b.driver?.name == name else { return }
            b.install(fallback)
            b.recordEjection("driver '\(name)' ejected: \(reason); now \(fallback.map { "'\($0.name)'" } ?? "no driver")")
        }
    }

    /// Unbinds a VM (it stopped): undoes its boosts and detaches its driver.
    public func unbind(vm id: UInt64) {
        control.withLock { _ in
            let b = state.withLock { s in
                s.explicit[id] = nil
                return s.bindings.removeValue(forKey: id)
            }
            b?.shutdown()
        }
    }

    public func binding(vm id: UInt64) -> VMBinding? { state.withLock { $0.bindings[id] } }

    /// Assigns driver `name` to a VM, replacing the one serving it. Returns the previous driver.
    @discardableResult
    public func assign(_ name: String, to vm: UInt64) throws(RegistryError) -> (any Driver)? {
        try control.withLock { _ throws(RegistryError) in
            let (b, d) = try state.withLock { s throws(RegistryError) -> (VMBinding, any Driver) in
                guard let b = s.bindings[vm] else { throw .unknownVM(vm) }
                guard let d = s.drivers[name] else { throw .unknownDriver(name) }
                s.explicit[vm] = name
                return (b, d)
            }
            if b.driver === d { return d }
            return b.install(d)
        }
    }

    /// Removes a VM's explicit assignment; it goes back to the default driver (or none).
    @discardableResult
    public func unassign(vm: UInt64) throws(RegistryError) -> (any Driver)? {
        try control.withLock { _ throws(RegistryError) in
            let (b, d) = try state.withLock { s throws(RegistryError) -> (VMBinding, (any Driver)?) in
                guard let b = s.bindings[vm] else { throw .unknownVM(vm) }
                s.explicit[vm] = nil
                return (b, s.defaultName.flatMap { s.drivers[$0] })
            }
            return b.install(d)
        }
    }

    /// Chooses the driver for a guest that advertised protocol `name` at `version`:
    /// an explicitly assigned driver must be compatible; otherwise the best
    /// compatible driver is installed. Returns the driver now serving the VM.
    public func negotiate(vm: UInt64, protocolName name: String, version: ProtocolVersion) throws(RegistryError) -> any Driver {
        try control.withLock { _ throws(RegistryError) in
            let (b, explicit) = try state.withLock { s throws(RegistryError) in
                guard let b = s.bindings[vm] else { throw .unknownVM(vm) }
                return (b, s.explicit[vm].flatMap { s.drivers[$0] })
            }
            if let explicit {
                guard explicit.protocolName == name, explicit.protocolVersion.canServe(version) else {
                    throw .assignedDriverIncompatible(driver: explicit.name,
                                                      implements: "\(explicit.protocolName) \(explicit.protocolVersion)",
                                                      guest: "\(name) \(version)")
                }
                return explicit
            }
            if let current = b.driver, current.protocolName == name, current.protocolVersion.canServe(version) {
                return current
            }
            guard let d = driver(forProtocol: name, version: version) else {
                throw .noDriverForProtocol(name: name, version: version)
            }
            b.install(d)
            return d
        }
    }
}
