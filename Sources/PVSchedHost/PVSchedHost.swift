import Logging
import PVSchedBPF
import PVSchedCore
import PVSchedDrivers
import PVSchedKVM
import PVSchedLinux
import Synchronization

/// Why the host refused an operation on its VMs.
public struct HostError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The field or object the error is about (a request field such as `vm` or `name`).
    public let field: String
    public let message: String
    public init(field: String, _ message: String) { self.field = field; self.message = message }
    public var description: String { "\(field): \(message)" }
}

/// The host component as one object, the composition root of pvsched: the
/// driver registry with the built-in drivers, the actuator, the thread utilities
/// and the VM sessions. It makes VMs (built-in VMM) and the links through which a
/// VMM reaches its binding; `pvsched run`, `demo`, `bench`, the daemon and the
/// tests all build on it.
public final class PVSchedHost: Sendable {
    public let registry: DriverRegistry
    public let actuator: any Actuator
    public let threads: any ThreadControl
    private let logger: Logger
    private let sessionTable = Mutex<[UInt64: any VMSession]>([:])
    /// Whether this process may run threads real-time (enforcers of attached VMs do).
    public let canUseRealTime = LinuxScheduling.canUseRealTime
    private let nextID = Atomic<UInt64>(1)

    /// A host with the built-in drivers registered (`latency-boost` the default)
    /// unless `builtins` is false.
    public init(actuator: (any Actuator)? = nil, threads: any ThreadControl = LinuxThreadControl(),
                builtins: Bool = true, logger: Logger = Logger(label: "pvsched.host")) throws {
        registry = DriverRegistry(logger: logger)
        self.actuator = actuator ?? LinuxActuator()
        self.threads = threads
        self.logger = logger
        if builtins { try BuiltinDrivers.registerAll(in: registry) }
    }

    // MARK: links and VMs

    /// Binds a new VM to the registry and returns the link its VMM calls out
    /// through. `driver` assigns a driver explicitly; otherwise the default serves it.
    public func link(name: String, vcpus: Int, driver: String? = nil, governor: GovernorConfig = .default,
                     boost: BoostSettings = BoostSettings(), trace: EventTrace? = nil) throws -> VMHostLink {
        let handle = VMHandle(id: nextID.add(1, ordering: .relaxed).oldValue, name: name, vcpuCount: vcpus)
        let binding = try registry.bind(vm: handle, actuator: actuator, governor: governor, boost: boost, trace: trace)
        if let driver {
            do { try registry.assign(driver, to: handle.id) } catch {
                registry.unbind(vm: handle.id)
                throw error
            }
        }
        let registry = self.registry
        return VMHostLink(handle: handle, events: binding, registrar: BindingRegistrar(registry: registry, binding: binding),
                          onRelease: { registry.unbind(vm: handle.id) })
    }

    /// Makes a VM with the built-in VMM. With `pvsched` false it runs without a
    /// link (the guest's registration is refused); otherwise it is bound with
    /// `driver` (or the default driver).
    public func makeVM(config: VMConfiguration, pvsched: Bool = true, driver: String? = nil,
                       governor: GovernorConfig = .default, boost: BoostSettings = BoostSettings(),
                       trace: EventTrace? = nil) throws -> VirtualMachine {
        let link = pvsched ? try self.link(name: config.name, vcpus: config.vcpus, driver: driver, governor: governor,
                                           boost: boost, trace: trace) : nil
        do {
            return try VirtualMachine(config: config, host: link, threads: threads)
        } catch {
            link?.release()
            throw error
        }
    }

    // MARK: BPF drivers

    /// Loads, verifies and registers a BPF driver object (under `name` if given).
    @discardableResult
    public func loadBPFDriver(elf: [UInt8], name: String? = nil) throws -> BPFDriver {
        let driver = try BPFDriver(elf: elf, name: name)
        try registry.register(driver)
        logger.info("BPF driver loaded", metadata: ["driver": "\(driver.name)"])
        return driver
    }

    // MARK: sessions

    /// The VMs this host serves as sessions, in id order.
    public var sessions: [any VMSession] {
        sessionTable.withLock { $0.values.sorted { $0.handle.id < $1.handle.id } }
    }

    /// The session named `reference` (a VM name or its numeric id).
    public func session(_ reference: String) throws(HostError) -> any VMSession {
        let all = sessions
        if let s = all.first(where: { $0.handle.name == reference }) { return s }
        if let id = UInt64(reference), let s = all.first(where: { $0.handle.id == id }) { return s }
        throw HostError(field: "vm", "no VM named or numbered '\(reference)'")
    }

    /// Starts a VM of the built-in VMM as a session of this host.
    @discardableResult
    public func startVM(config: VMConfiguration, driver: String? = nil, governor: GovernorConfig = .default,
                        boost: BoostSettings = BoostSettings(), traceCapacity: Int = 256) throws -> OwnedVMSession {
        try reserveName(config.name)
        let vm: VirtualMachine
        do {
            vm = try makeVM(config: config, pvsched: config.boot.pvschedEnabled, driver: driver, governor: governor,
                            boost: boost, trace: EventTrace(vcpus: config.vcpus, capacity: traceCapacity))
        } catch {
            releaseName(config.name)
            throw error
        }
        let session = OwnedVMSession(vm: vm, logger: logger)
        do { try session.start() } catch {
            releaseName(config.name)
            throw error
        }
        sessionTable.withLock { $0[vm.handle.id] = session }
        releaseName(config.name)
        logger.info("VM started", metadata: ["vm": "\(vm.handle)", "vcpus": "\(config.vcpus)"])
        return session
    }

    /// Attaches a VM that another VMM runs as a session of this host: the caller
    /// feeds its events through the session (`events`, `link.registrar`) and
    /// `onDetach` runs when it is stopped or ends.
    @discardableResult
    public func attach(name: String, vcpus: Int, summary: String, driver: String? = nil,
                       governor: GovernorConfig = .default, boost: BoostSettings = BoostSettings(), traceCapacity: Int = 256,
                       onDetach: @escaping @Sendable () -> Void = {}) throws -> AttachedVMSession {
        guard vcpus >= 1 && vcpus <= 1024 else { throw HostError(field: "vcpus", "must be 1...1024, got \(vcpus)") }
        try reserveName(name)
        defer { releaseName(name) }
        let link = try self.link(name: name, vcpus: vcpus, driver: driver, governor: governor, boost: boost,
                                 trace: EventTrace(vcpus: vcpus, capacity: traceCapacity))
        let session: AttachedVMSession
        do {
            session = try AttachedVMSession(link: link, summary: summary, threads: threads,
                                            enforcerPriority: canUseRealTime ? link.events.enforcerPriority ?? 90 : nil, onDetach: onDetach)
        } catch {
            link.release()
            throw error
        }
        sessionTable.withLock { $0[link.handle.id] = session }
        logger.info("VM attached", metadata: ["vm": "\(link.handle)", "vcpus": "\(vcpus)", "what": "\(summary)"])
        return session
    }

    /// Stops a session's VM (undoing its boosts) and forgets it.
    public func stopVM(_ reference: String) throws(HostError) -> any VMSession {
        let s = try session(reference)
        s.stop()
        sessionTable.withLock { _ = $0.removeValue(forKey: s.handle.id) }
        logger.info("VM stopped", metadata: ["vm": "\(s.handle)"])
        return s
    }

    /// Stops every session and puts every thread the actuator changed back.
    public func shutdown() {
        let all = sessionTable.withLock { t in
            let all = Array(t.values)
            t.removeAll()
            return all
        }
        for s in all { s.stop() }
        actuator.restoreAll()
    }

    /// Names being created, so that two concurrent starts cannot take the same name.
    private let pendingNames = Mutex<Set<String>>([])

    private func reserveName(_ name: String) throws(HostError) {
        try SessionName.validate(name)
        let taken = sessionTable.withLock { $0.values.contains { $0.handle.name == name } }
        let reserved = pendingNames.withLock { $0.insert(name).inserted }
        guard !taken, reserved else {
            if reserved { releaseName(name) }
            throw HostError(field: "name", "a VM named '\(name)' already exists")
        }
    }

    private func releaseName(_ name: String) { pendingNames.withLock { _ = $0.remove(name) } }
}

/// The rules for VM and driver names given by operators: 1-64 characters of
/// letters, digits, '.', '_' and '-', not all digits (those are ids).
public enum SessionName {
    public static func validate(_ name: String, field: String = "name") throws(HostError) {
        guard !name.isEmpty, name.utf8.count <= 64 else { throw HostError(field: field, "must be 1-64 characters") }
        let allowed = name.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x2E || c == 0x5F || c == 0x2D
        }
        guard allowed else { throw HostError(field: field, "may contain only letters, digits, '.', '_' and '-'") }
        guard UInt64(name) == nil else { throw HostError(field: field, "must not be a number (numbers are VM ids)") }
    }
}

extension VirtualMachine {
    /// The binding serving this VM (nil when it runs without pvsched).
    public var binding: VMBinding? { host?.events as? VMBinding }
}
