import Logging
import PVSchedAttach
import PVSchedBPF
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedKVM
import PVSchedKernelEvents
import PVSchedLinux
import Synchronization

/// Why the host refused an operation on its VMs.
public struct HostError: Error, Equatable, Sendable, CustomStringConvertible {
    /// What kind of refusal (the control protocol maps it to its error code).
    public enum Kind: Sendable, Equatable {
        /// A value that is wrong or parts that do not fit together.
        case invalid
        /// Something named that does not exist (a process, a thread, a driver, a VM).
        case notFound
        /// In the way of something that exists (a name taken).
        case conflict
        /// The host could not do it (a VMM that does not answer, a thread that cannot start).
        case failed
    }
    public let kind: Kind
    /// The field or object the error is about (a request field such as `vm` or `name`).
    public let field: String
    public let message: String
    public init(_ kind: Kind = .invalid, field: String, _ message: String) {
        self.kind = kind; self.field = field; self.message = message
    }
    public var description: String { "\(field): \(message)" }
}

/// The host component as one object, the composition root of pvsched: the
/// driver registry with the built-in drivers, the actuator, the thread utilities,
/// the VM sessions and the services every VM shares — one budget enforcer, one
/// poller of guest areas, one watcher of VMM processes, one kernel event source
/// (each started when first needed). `open` turns a `VMSpec` into a session;
/// `pvsched run`, `demo`, `bench`, the daemon and the tests all build on it.
public final class PVSchedHost: Sendable {
    public let registry: DriverRegistry
    public let actuator: any Actuator
    public let threads: any ThreadControl
    let logger: Logger
    private let sessionTable = Mutex<[UInt64: any VMSession]>([:])
    /// Whether this process may run threads real-time (the enforcer, the poller and
    /// the kernel event consumer do when it may).
    public let canUseRealTime = LinuxScheduling.canUseRealTime
    /// The SCHED_FIFO priority of the threads that stand in for a VMM's device
    /// threads (the poller, the kernel event consumer); nil: not real-time.
    public let serviceThreadPriority: UInt8?
    private let nextID = Atomic<UInt64>(1)
    /// Cuts every VM's boosts on time.
    public let enforcer: HostEnforcer
    private let services = Mutex(Services())
    private struct Services {
        var poller: RegionPoller?
        var processes: ProcessMonitor?
        var kernelEvents: Result<KernelEventSource, KernelEventsUnavailable>?
        var closed = false
    }

    /// A host with the built-in drivers registered (`latency-boost` the default)
    /// unless `builtins` is false.
    public init(actuator: (any Actuator)? = nil, threads: any ThreadControl = LinuxThreadControl(),
                builtins: Bool = true, serviceThreadPriority: UInt8? = 90,
                logger: Logger = Logger(label: "pvsched.host")) throws {
        registry = DriverRegistry(logger: logger)
        self.actuator = actuator ?? LinuxActuator()
        self.threads = threads
        self.logger = logger
        self.serviceThreadPriority = LinuxScheduling.canUseRealTime ? serviceThreadPriority : nil
        enforcer = try HostEnforcer(threads: threads, realTime: LinuxScheduling.canUseRealTime)
        if builtins { try BuiltinDrivers.registerAll(in: registry) }
    }

    // MARK: links and VMs

    /// Binds a new VM to the registry and returns the link its VMM calls out
    /// through. `driver` assigns a driver explicitly; otherwise the default serves it.
    public func link(name: String, vcpus: Int, driver: String? = nil, governor: GovernorConfig = .default,
                     boost: BoostSettings = BoostSettings(), trace: EventTrace? = nil) throws -> VMHostLink {
        try bind(name: name, vcpus: vcpus, driver: driver, governor: governor, boost: boost, trace: trace).link
    }

    /// The binding and its link; the host's enforcer serves the binding until the link is released.
    func bind(name: String, vcpus: Int, driver: String?, governor: GovernorConfig, boost: BoostSettings,
              trace: EventTrace?) throws -> (link: VMHostLink, binding: VMBinding) {
        let handle = VMHandle(id: nextID.add(1, ordering: .relaxed).oldValue, name: name, vcpuCount: vcpus)
        let binding = try registry.bind(vm: handle, actuator: actuator, governor: governor, boost: boost, trace: trace,
                                        alarm: enforcer)
        do {
            if let driver { try registry.assign(driver, to: handle.id) }
            try enforcer.add(binding, id: handle.id)
        } catch {
            registry.unbind(vm: handle.id)
            throw error
        }
        let registry = self.registry, enforcer = self.enforcer
        let link = VMHostLink(handle: handle, events: binding, registrar: BindingRegistrar(registry: registry, binding: binding),
                              onRelease: {
                                  enforcer.remove(id: handle.id)
                                  registry.unbind(vm: handle.id)
                              })
        return (link, binding)
    }

    /// Makes a VM with the built-in VMM. With `pvsched` false it runs without a
    /// link (the guest's registration is refused); otherwise it is bound with
    /// `driver` (or the default driver).
    public func makeVM(config: VMConfiguration, pvsched: Bool = true, driver: String? = nil,
                       governor: GovernorConfig = .default, boost: BoostSettings = BoostSettings(),
                       trace: EventTrace? = nil) throws -> VirtualMachine {
        try makeBoundVM(config: config, pvsched: pvsched, driver: driver, governor: governor, boost: boost, trace: trace).vm
    }

    private func makeBoundVM(config: VMConfiguration, pvsched: Bool, driver: String?, governor: GovernorConfig,
                             boost: BoostSettings, trace: EventTrace?) throws -> (vm: VirtualMachine, binding: VMBinding?) {
        let bound = pvsched ? try bind(name: config.name, vcpus: config.vcpus, driver: driver, governor: governor,
                                       boost: boost, trace: trace) : nil
        do {
            return (try VirtualMachine(config: config, host: bound?.link, threads: threads), bound?.binding)
        } catch {
            bound?.link.release()
            throw error
        }
    }

    /// The binding serving a VM this host made (nil when it runs without pvsched or was released).
    public func binding(of vm: VirtualMachine) -> VMBinding? { registry.binding(vm: vm.handle.id) }

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
        throw HostError(.notFound, field: "vm", "no VM named or numbered '\(reference)'")
    }

    /// Serves the VM `spec` describes: starts it (built-in VMM) or attaches to it.
    public func open(_ spec: VMSpec) throws -> any VMSession {
        if case .builtIn = spec.source { return try startVM(spec) }
        return try attach(spec)
    }

    /// Starts a VM of the built-in VMM (`spec.source` is `.builtIn`) as a session of this host.
    @discardableResult
    public func startVM(_ spec: VMSpec) throws -> OwnedVMSession {
        guard case .builtIn(var config) = spec.source else { throw HostError(field: "source", "not a VM of the built-in VMM") }
        try spec.validate()
        if let name = spec.name { config.name = name }
        try reserveName(config.name)
        defer { releaseName(config.name) }
        if let driver = spec.driver, registry.driver(named: driver) == nil {
            throw HostError(.notFound, field: "driver", "no driver named '\(driver)'")
        }
        let pvsched = config.boot.pvschedEnabled
        let made = try makeBoundVM(config: config, pvsched: pvsched, driver: spec.driver, governor: spec.governor,
                                   boost: spec.boost, trace: EventTrace(vcpus: config.vcpus, capacity: spec.traceCapacity))
        if let lead = spec.deadlineLeadNs { made.binding?.deadlines.leadNs = lead }
        made.binding?.deadlines.holdNs = spec.holdThroughHaltsNs
        let session = OwnedVMSession(vm: made.vm, binding: made.binding, logger: logger)
        try session.start()
        sessionTable.withLock { $0[made.vm.handle.id] = session }
        logger.info("VM started", metadata: ["vm": "\(made.vm.handle)", "vcpus": "\(config.vcpus)"])
        return session
    }

    /// Starts a VM of the built-in VMM as a session of this host.
    @discardableResult
    public func startVM(config: VMConfiguration, driver: String? = nil, governor: GovernorConfig = .default,
                        boost: BoostSettings = BoostSettings(), traceCapacity: Int = 256) throws -> OwnedVMSession {
        var spec = VMSpec(source: .builtIn(config))
        spec.driver = driver; spec.governor = governor; spec.boost = boost; spec.traceCapacity = traceCapacity
        return try startVM(spec)
    }

    /// Attaches a VM another VMM runs, or one this process feeds (`spec.source` is
    /// `.endpoint` or `.inProcess`), as a session of this host (see `Attacher`).
    @discardableResult
    public func attach(_ spec: VMSpec) throws(HostError) -> AttachedVMSession {
        let name: String
        switch spec.source {
        case .endpoint(let e): name = spec.name ?? "pid\(e.process)"
        default: name = spec.name ?? "vm\(nextID.load(ordering: .relaxed))"
        }
        var named = spec
        named.name = name
        try reserveName(name)
        defer { releaseName(name) }
        let session = try Attacher(host: self, logger: logger).attach(named)
        sessionTable.withLock { $0[session.handle.id] = session }
        return session
    }

    /// A session for an attached VM, bound and enforced, not yet served by anything.
    func makeAttachedSession(name: String, vcpus: Int, summary: String, spec: VMSpec) throws(HostError) -> AttachedVMSession {
        guard vcpus >= 1 && vcpus <= 1024 else { throw HostError(field: "vcpus", "must be 1...1024, got \(vcpus)") }
        do {
            let (link, binding) = try bind(name: name, vcpus: vcpus, driver: spec.driver, governor: spec.governor, boost: spec.boost,
                                           trace: EventTrace(vcpus: vcpus, capacity: spec.traceCapacity))
            return AttachedVMSession(link: link, binding: binding, summary: summary)
        } catch let e as HostError {
            throw e
        } catch let e as RegistryError {
            throw HostError(.conflict, field: "driver", "\(e)")
        } catch {
            throw HostError(.failed, field: "vm", "\(error)")
        }
    }

    /// Stops a session's VM (undoing its boosts) and forgets it.
    public func stopVM(_ reference: String) throws(HostError) -> any VMSession {
        let s = try session(reference)
        s.stop()
        sessionTable.withLock { _ = $0.removeValue(forKey: s.handle.id) }
        logger.info("VM stopped", metadata: ["vm": "\(s.handle)"])
        return s
    }

    /// Stops every session, the shared services, and puts every thread the actuator changed back.
    public func shutdown() {
        stopSessionsAndServices()
        actuator.restoreAll()
    }

    /// A host let go without `shutdown` still detaches its sessions and stops its threads.
    deinit { stopSessionsAndServices() }

    private func stopSessionsAndServices() {
        let all = sessionTable.withLock { t in
            let all = Array(t.values)
            t.removeAll()
            return all
        }
        for s in all { s.stop() }
        let s = services.withLock { s in
            let old = s
            s = Services(closed: true)
            return old
        }
        s.processes?.stop()
        s.poller?.stop()
        if case .success(let k)? = s.kernelEvents { k.close() }
    }

    // MARK: shared services

    /// The poller of watched guest areas (started on first use).
    public func regionPoller() throws(HostError) -> RegionPoller {
        try services.withLock { s throws(HostError) in
            if let p = s.poller { return p }
            guard !s.closed else { throw HostError(.failed, field: "vm", "the host is shutting down") }
            do throws(ThreadError) {
                let p = try RegionPoller(priority: serviceThreadPriority, threads: threads)
                s.poller = p
                return p
            } catch { throw HostError(.failed, field: "vm", "\(error)") }
        }
    }

    /// The watcher of VMM processes (started on first use).
    public func processMonitor() throws(HostError) -> ProcessMonitor {
        try services.withLock { s throws(HostError) in
            if let p = s.processes { return p }
            guard !s.closed else { throw HostError(.failed, field: "vm", "the host is shutting down") }
            do throws(ThreadError) {
                let p = try ProcessMonitor()
                s.processes = p
                return p
            } catch { throw HostError(.failed, field: "vm", "\(error)") }
        }
    }

    /// The host kernel's KVM events, opened once (its failure is remembered and reported).
    public var kernelEvents: Result<KernelEventSource, KernelEventsUnavailable> {
        services.withLock { s in
            if let k = s.kernelEvents { return k }
            let r: Result<KernelEventSource, KernelEventsUnavailable>
            do throws(KernelEventsUnavailable) {
                guard !s.closed else { throw KernelEventsUnavailable(reason: "the host is shutting down") }
                r = .success(try KernelEventSource(object: GuestImage.kvmEventsBPF, consumerPriority: serviceThreadPriority,
                                                   threads: threads))
            } catch {
                r = .failure(error)
            }
            switch r {
            case .success(let k): logger.info("kernel KVM events", metadata: ["attach points": "\(k.summary)"])
            case .failure(let e): logger.warning("\(e)")
            }
            s.kernelEvents = r
            return r
        }
    }

    /// Records the kernel event source dropped, if it was opened (never opens it).
    public var kernelEventsDropped: UInt64? {
        if case .success(let k)? = services.withLock({ $0.kernelEvents }) { return k.dropped }
        return nil
    }

    /// Wake-ups of `thread` the kernel event source spared the daemon (its CPU was
    /// idle: see `KernelEventCounts.uncontendedWakeups`), if the source was opened
    /// and watches the thread (never opens it).
    public func uncontendedWakeups(of thread: ThreadID) -> UInt64? {
        if case .success(let k)? = services.withLock({ $0.kernelEvents }) { return k.uncontendedWakeups(of: thread) }
        return nil
    }

    /// The shared services' own counters (the scale benchmark reads them).
    public var serviceCounters: (enforcerPasses: UInt64, enforcerWakeUps: UInt64, pollerSteps: UInt64, pollerWakeUps: UInt64) {
        let poller = services.withLock { $0.poller }
        let c = poller?.counters ?? (steps: 0, wakeUps: 0)
        return (enforcer.passCount, enforcer.wakeUps, c.steps, c.wakeUps)
    }

    /// Names being created, so that two concurrent starts cannot take the same name.
    private let pendingNames = Mutex<Set<String>>([])

    private func reserveName(_ name: String) throws(HostError) {
        try SessionName.validate(name)
        let taken = sessionTable.withLock { $0.values.contains { $0.handle.name == name } }
        let reserved = pendingNames.withLock { $0.insert(name).inserted }
        guard !taken, reserved else {
            if reserved { releaseName(name) }
            throw HostError(.conflict, field: "name", "a VM named '\(name)' already exists")
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


