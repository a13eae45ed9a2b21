import PVSchedAttach
import PVSchedCore
import PVSchedKVM

/// What the host is asked to serve, as one typed value that the CLI, the daemon,
/// the lab and the tests all build (`PVSchedHost.open`): where the VM comes from,
/// where its guest's area is, where its events come from, and its driver, boost
/// class and governor.
public struct VMSpec: Sendable {
    /// Where the VM comes from.
    public enum Source: Sendable {
        /// The built-in VMM runs it, in this process (its exits are its events).
        case builtIn(VMConfiguration)
        /// Another VMM runs it, reached through an endpoint (QMP, a process and its
        /// thread names or ids, libvirt).
        case endpoint(any VMMEndpoint)
        /// Code in this process runs it and feeds its events itself (through the
        /// session's `events`): the lab and the tests.
        case inProcess(vcpus: Int, summary: String)
    }

    /// Where the guest's shared area is.
    public enum Area: Sendable {
        /// Nowhere (yet): the VM runs without an area, or the built-in VMM's guest registers it.
        case none
        /// At `offset` in a shared-memory file the VMM maps as guest RAM (`pvsched run --export`):
        /// registered once, at attach.
        case memoryFile(path: String, offset: Int, size: Int)
        /// An ivshmem file (under /dev/shm) the guest's pvsched module writes its region into:
        /// watched for the guest's header and lines.
        case ivshmem(path: String)
        /// Memory this process already maps (the lab and the tests).
        case region(any WatchedRegion)
    }

    /// Where an attached VM's events come from.
    public struct EventSources: OptionSet, Sendable, CustomStringConvertible {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// KVM events from the host kernel (eBPF on tracepoints), for the VMM's vCPU threads.
        public static let kernel = EventSources(rawValue: 1)
        /// The guest's area, watched (`guestUpdate` and `deadline` events).
        public static let watcher = EventSources(rawValue: 2)

        /// From the control protocol's `events` field: `kernel`, `watch` or `both`.
        public init?(name: String) {
            switch name {
            case "kernel": self = .kernel
            case "watch": self = .watcher
            case "both": self = [.kernel, .watcher]
            default: return nil
            }
        }
        public var description: String {
            switch self {
            case .kernel: return "kernel"
            case .watcher: return "watch"
            case [.kernel, .watcher]: return "both"
            default: return "none"
            }
        }
    }

    /// The VM's name (default: the built-in VM's configured name, or `pidN`).
    public var name: String?
    public var source: Source
    public var area: Area = .none
    /// Where events come from (nil: `watcher` and `kernel` with an ivshmem area,
    /// `kernel` for other endpoints, none for in-process VMs).
    public var events: EventSources?
    /// The driver (nil: the registry's default).
    public var driver: String?
    public var boost = BoostSettings()
    public var governor = GovernorConfig.default
    /// Whether the VMM's thread that delivers its interrupts (QEMU's main loop) is
    /// boosted with the vCPUs (nil: when the endpoint names one).
    public var boostMainLoop: Bool?
    /// How the watcher polls the guest's area.
    public var watch = RegionWatch.Settings()
    /// How long before a published deadline its driver gets a `deadline` event (nil: the default).
    public var deadlineLeadNs: UInt64?
    /// Hold boosts through halts this close to the guest's next deadline (0: never;
    /// `DeadlineLead.holdNs`).
    public var holdThroughHaltsNs: UInt64 = 0
    /// Driver notifications kept per vCPU for `vm trace`.
    public var traceCapacity = 256

    public init(name: String? = nil, source: Source, area: Area = .none, events: EventSources? = nil, driver: String? = nil,
                governor: GovernorConfig = .default, boost: BoostSettings = BoostSettings()) {
        self.name = name; self.source = source; self.area = area; self.events = events
        self.driver = driver; self.governor = governor; self.boost = boost
    }

    /// The event sources in force.
    public var eventSources: EventSources {
        if let events { return events }
        switch (source, area) {
        case (.endpoint, .ivshmem): return [.kernel, .watcher]
        case (.endpoint, _): return .kernel
        case (.inProcess, .ivshmem), (.inProcess, .region): return .watcher
        default: return []
        }
    }

    /// Whether the area is watched (rather than registered once).
    var areaIsWatched: Bool {
        switch area {
        case .ivshmem: return true
        case .region: return eventSources.contains(.watcher)
        default: return false
        }
    }

    /// Checks that the parts fit together; the error names the field at fault.
    public func validate() throws(HostError) {
        let sources = eventSources
        switch source {
        case .builtIn:
            guard case .none = area else { throw HostError(field: "area", "the built-in VMM's guest registers its own area") }
            guard events == nil || events == [] else { throw HostError(field: "events", "the built-in VMM's exits are its events") }
        case .inProcess(let vcpus, _):
            guard vcpus >= 1 && vcpus <= 1024 else { throw HostError(field: "vcpus", "must be 1...1024, got \(vcpus)") }
            guard !sources.contains(.kernel) else { throw HostError(field: "events", "kernel events need a VMM process (an endpoint)") }
        case .endpoint:
            break
        }
        if case .ivshmem = area, !sources.contains(.watcher) {
            throw HostError(field: "events", "with shm a watcher registers the region and reports its changes: events must be watch or both")
        }
        if sources.contains(.watcher), !areaIsWatched {
            throw HostError(field: "events", "watching the guest needs its ivshmem region (shm)")
        }
        if case .memoryFile(_, let offset, let size) = area {
            guard offset >= 0 else { throw HostError(field: "areaOffset", "must not be negative") }
            guard size >= 64 else { throw HostError(field: "areaSize", "must be at least 64 bytes") }
        }
        let s = watch
        for (field, v) in [("pollUs", s.busyPollNs), ("pollUs", s.idlePollNs), ("headerPollUs", s.headerPollNs)]
        where !RegionWatch.Settings.pollRange.contains(v) {
            throw HostError(field: field, "must be \(RegionWatch.Settings.pollRange.lowerBound / 1000)...\(RegionWatch.Settings.pollRange.upperBound / 1000) µs")
        }
        if let lead = deadlineLeadNs, lead > 100_000_000 { throw HostError(field: "deadlineLeadUs", "must be 0...100000") }
        guard traceCapacity >= 1 && traceCapacity <= 65_536 else { throw HostError(field: "traceCapacity", "must be 1...65536") }
    }
}
