/// One VM as `vm.list`, `vm.start`, `vm.attach` and `vm.stop` answer it.
public struct VMSummary: ControlResult, Equatable {
    /// One vCPU of it.
    public struct VCPU: Equatable, Sendable {
        public var index: Int
        public var thread: Int32?
        public var boosted: Bool
        /// Who manages the thread (`pvsched`, `operator`, `refused_real_time`, `gone`).
        public var owner: String
        /// Why its boosts cannot be applied now.
        public var boostBlocked: String?
        /// Why its boosts are applied in another class than the VM's (its cgroup refuses real-time).
        public var boostClassFallback: String?
        public init(index: Int, thread: Int32?, boosted: Bool, owner: String, boostBlocked: String?) {
            self.index = index; self.thread = thread; self.boosted = boosted; self.owner = owner; self.boostBlocked = boostBlocked
        }
    }
    /// What the watcher of an attached VM's region did.
    public struct Watcher: Equatable, Sendable {
        public var phase: String
        public var polls: UInt64
        public var guestUpdates: UInt64
        public var registrations: UInt64
        public init(phase: String, polls: UInt64, guestUpdates: UInt64, registrations: UInt64) {
            self.phase = phase; self.polls = polls; self.guestUpdates = guestUpdates; self.registrations = registrations
        }
    }
    public var id: UInt64
    public var name: String
    /// `owned` (the built-in VMM) or `attached`.
    public var kind: String
    public var state: String
    public var summary: String
    public var pvsched: Bool
    public var driver: String?
    public var negotiation: String
    public var disabled: String?
    public var ejected: String?
    public var vcpus: [VCPU]
    public var watcher: Watcher?
    /// Where the VM came from, for VMs another VMM runs (`qmp`, `process`, `libvirt`, `export`).
    public var endpoint: String?

    public init(id: UInt64, name: String, kind: String, state: String, summary: String, pvsched: Bool, driver: String?,
                negotiation: String, disabled: String?, ejected: String?, vcpus: [VCPU], watcher: Watcher? = nil, endpoint: String? = nil) {
        self.id = id; self.name = name; self.kind = kind; self.state = state; self.summary = summary; self.pvsched = pvsched
        self.driver = driver; self.negotiation = negotiation; self.disabled = disabled; self.ejected = ejected
        self.vcpus = vcpus; self.watcher = watcher; self.endpoint = endpoint
    }

    public var json: JSON {
        var o: [String: JSON] = [
            "id": JSON(id), "name": .string(name), "kind": .string(kind), "state": .string(state), "summary": .string(summary),
            "pvsched": .bool(pvsched), "driver": JSON(driver), "negotiation": .string(negotiation), "disabled": JSON(disabled),
            "ejected": JSON(ejected),
            "vcpus": .array(vcpus.map { c in
                ["index": JSON(c.index), "thread": c.thread.map { JSON($0) } ?? .null, "boosted": .bool(c.boosted),
                 "owner": .string(c.owner), "boostBlocked": JSON(c.boostBlocked), "boostClassFallback": JSON(c.boostClassFallback)]
            })]
        if let w = watcher {
            o["watcher"] = ["phase": .string(w.phase), "polls": JSON(w.polls), "guestUpdates": JSON(w.guestUpdates),
                            "registrations": JSON(w.registrations)]
        }
        if let endpoint { o["endpoint"] = .string(endpoint) }
        return .object(o)
    }

    public init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "VM")
        id = UInt64(try r.int("id")); name = try r.string("name"); kind = try r.string("kind"); state = try r.string("state")
        summary = try r.string("summary"); pvsched = try r.bool("pvsched"); driver = r.optionalString("driver")
        negotiation = try r.string("negotiation"); disabled = r.optionalString("disabled"); ejected = r.optionalString("ejected")
        endpoint = r.optionalString("endpoint")
        var vcpus: [VCPU] = []
        for c in try r.array("vcpus") {
            let v = try JSONReader(c, "vCPU")
            var vcpu = VCPU(index: Int(try v.int("index")), thread: v.optionalInt("thread").map { Int32(clamping: $0) },
                            boosted: try v.bool("boosted"), owner: v.optionalString("owner") ?? "pvsched",
                            boostBlocked: v.optionalString("boostBlocked"))
            vcpu.boostClassFallback = v.optionalString("boostClassFallback")
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        if let w = json["watcher"], case .object = w {
            let wr = try JSONReader(w, "watcher")
            watcher = Watcher(phase: try wr.string("phase"), polls: UInt64(try wr.int("polls")),
                              guestUpdates: UInt64(try wr.int("guestUpdates")), registrations: UInt64(try wr.int("registrations")))
        }
    }
}

/// One vCPU's counters as `vm.stats` answers them.
public struct VCPUStatistics: Equatable, Sendable {
    public var index: Int
    public var thread: Int32?
    public var boosted: Bool
    public var events: UInt64
    /// Events by kind name (`EventMask.named`).
    public var eventsByKind: [String: UInt64]
    public var outcomes: [String: UInt64]
    public var boosts: UInt64
    public var boostedNs: UInt64
    public var throttles: UInt64
    public var repaying: Bool
    public var repayments: UInt64
    public var repaymentNs: UInt64
    public var vetoesThrottled: UInt64
    public var vetoesVMShare: UInt64
    public var failedBoosts: [String: UInt64]
    public var boostBlocked: String?
    /// Why boosts are applied in another class than the VM's (its cgroup refuses real-time).
    public var boostClassFallback: String?
    /// Wake-ups of the vCPU thread that found its CPU idle and slept again unpreempted:
    /// the host kernel's events skip them (nil: the VM takes no kernel events).
    public var uncontendedWakeups: UInt64?
    /// Halts the vCPU's boost was held through, its guest's next deadline near.
    public var holds: UInt64 = 0
    public var owner: String
    /// Decision latency: bucket upper bounds (ns), counts (the last one unbounded), count and exact sum.
    public var latencyBoundsNs: [UInt64]
    public var latencyCounts: [UInt64]
    public var latencyCount: UInt64
    public var latencySumNs: UInt64

    public init(index: Int, thread: Int32?, boosted: Bool, events: UInt64, eventsByKind: [String: UInt64], outcomes: [String: UInt64],
                boosts: UInt64, boostedNs: UInt64, throttles: UInt64, repaying: Bool, repayments: UInt64, repaymentNs: UInt64,
                vetoesThrottled: UInt64, vetoesVMShare: UInt64, failedBoosts: [String: UInt64], boostBlocked: String?, owner: String,
                latencyBoundsNs: [UInt64], latencyCounts: [UInt64], latencyCount: UInt64, latencySumNs: UInt64) {
        self.index = index; self.thread = thread; self.boosted = boosted; self.events = events; self.eventsByKind = eventsByKind
        self.outcomes = outcomes; self.boosts = boosts; self.boostedNs = boostedNs; self.throttles = throttles
        self.repaying = repaying; self.repayments = repayments; self.repaymentNs = repaymentNs
        self.vetoesThrottled = vetoesThrottled; self.vetoesVMShare = vetoesVMShare; self.failedBoosts = failedBoosts
        self.boostBlocked = boostBlocked; self.owner = owner; self.latencyBoundsNs = latencyBoundsNs
        self.latencyCounts = latencyCounts; self.latencyCount = latencyCount; self.latencySumNs = latencySumNs
    }

    static func counts(_ d: [String: UInt64]) -> JSON { .object(d.mapValues { JSON($0) }) }
    static func counts(_ j: JSON?) -> [String: UInt64] { (j?.objectValue ?? [:]).compactMapValues { $0.intValue.map { UInt64($0) } } }

    var json: JSON {
        ["index": JSON(index), "thread": thread.map { JSON($0) } ?? .null, "boosted": .bool(boosted), "events": JSON(events),
         "eventsByKind": Self.counts(eventsByKind), "outcomes": Self.counts(outcomes), "boosts": JSON(boosts),
         "boostedNs": JSON(boostedNs), "throttles": JSON(throttles), "repaying": .bool(repaying), "repayments": JSON(repayments),
         "repaymentNs": JSON(repaymentNs), "holds": JSON(holds), "vetoes": ["throttled": JSON(vetoesThrottled), "vm_share": JSON(vetoesVMShare)],
         "failedBoosts": Self.counts(failedBoosts), "boostBlocked": JSON(boostBlocked),
         "boostClassFallback": JSON(boostClassFallback), "uncontendedWakeups": uncontendedWakeups.map { JSON($0) } ?? .null,
         "owner": .string(owner),
         "decisionLatency": ["count": JSON(latencyCount), "sumNs": JSON(latencySumNs),
                             "bucketsLeNs": .array(latencyBoundsNs.map { JSON($0) }), "counts": .array(latencyCounts.map { JSON($0) })]]
    }

    init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "vCPU statistics")
        func u(_ k: String) throws(ControlError) -> UInt64 { UInt64(clamping: try r.int(k)) }
        index = Int(try r.int("index")); thread = r.optionalInt("thread").map { Int32(clamping: $0) }; boosted = try r.bool("boosted")
        events = try u("events"); eventsByKind = Self.counts(json["eventsByKind"]); outcomes = Self.counts(json["outcomes"])
        boosts = try u("boosts"); boostedNs = try u("boostedNs"); throttles = try u("throttles"); repaying = try r.bool("repaying")
        repayments = try u("repayments"); repaymentNs = try u("repaymentNs")
        vetoesThrottled = UInt64(clamping: json["vetoes"]?["throttled"]?.intValue ?? 0)
        vetoesVMShare = UInt64(clamping: json["vetoes"]?["vm_share"]?.intValue ?? 0)
        failedBoosts = Self.counts(json["failedBoosts"]); boostBlocked = r.optionalString("boostBlocked")
        boostClassFallback = r.optionalString("boostClassFallback")
        uncontendedWakeups = r.optionalInt("uncontendedWakeups").map { UInt64(clamping: $0) }
        holds = UInt64(clamping: r.optionalInt("holds") ?? 0)
        owner = r.optionalString("owner") ?? "pvsched"
        let l = json["decisionLatency"]
        latencyBoundsNs = (l?["bucketsLeNs"]?.arrayValue ?? []).compactMap { $0.intValue.map { UInt64($0) } }
        latencyCounts = (l?["counts"]?.arrayValue ?? []).compactMap { $0.intValue.map { UInt64($0) } }
        latencyCount = UInt64(clamping: l?["count"]?.intValue ?? 0)
        latencySumNs = UInt64(clamping: l?["sumNs"]?.intValue ?? 0)
    }
}

/// One VM's counters as `vm.stats` answers them.
public struct VMStatistics: Equatable, Sendable {
    public var id: UInt64
    public var name: String
    public var driver: String?
    public var state: String
    public var vcpus: [VCPUStatistics]
    public init(id: UInt64, name: String, driver: String?, state: String, vcpus: [VCPUStatistics]) {
        self.id = id; self.name = name; self.driver = driver; self.state = state; self.vcpus = vcpus
    }
    var json: JSON {
        ["id": JSON(id), "name": .string(name), "driver": JSON(driver), "state": .string(state), "vcpus": .array(vcpus.map(\.json))]
    }
    init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "VM statistics")
        id = UInt64(try r.int("id")); name = try r.string("name"); driver = r.optionalString("driver"); state = try r.string("state")
        var v: [VCPUStatistics] = []
        for c in try r.array("vcpus") { v.append(try VCPUStatistics(decoding: c)) }
        vcpus = v
    }
}

/// One notification of a VM's trace (`vm.trace`).
public struct TraceEntry: ControlResult, Equatable {
    public var timeUs: UInt64
    public var vcpu: Int
    /// The event, or `enforcer` for a boost the budget enforcer cut with no event.
    public var event: String
    public var flags: String?
    public var task: String?
    public var boosted: Bool
    public var interruptPending: Bool
    public var pendingVectors: [Int]
    public var deadlineInUs: Int64?
    public var decision: String
    public var outcome: String

    public init(timeUs: UInt64, vcpu: Int, event: String, flags: String?, task: String?, boosted: Bool, interruptPending: Bool,
                pendingVectors: [Int], deadlineInUs: Int64?, decision: String, outcome: String) {
        self.timeUs = timeUs; self.vcpu = vcpu; self.event = event; self.flags = flags; self.task = task; self.boosted = boosted
        self.interruptPending = interruptPending; self.pendingVectors = pendingVectors; self.deadlineInUs = deadlineInUs
        self.decision = decision; self.outcome = outcome
    }

    public var json: JSON {
        ["timeUs": JSON(timeUs), "vcpu": JSON(vcpu), "event": .string(event), "flags": JSON(flags), "task": JSON(task),
         "boosted": .bool(boosted), "interruptPending": .bool(interruptPending), "pendingVectors": .array(pendingVectors.map { JSON($0) }),
         "deadlineInUs": deadlineInUs.map { JSON($0) } ?? .null, "decision": .string(decision), "outcome": .string(outcome)]
    }

    public init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "trace entry")
        timeUs = UInt64(clamping: try r.int("timeUs")); vcpu = Int(try r.int("vcpu")); event = try r.string("event")
        flags = r.optionalString("flags"); task = r.optionalString("task"); boosted = try r.bool("boosted")
        interruptPending = (try? r.bool("interruptPending")) ?? false
        pendingVectors = (json["pendingVectors"]?.arrayValue ?? []).compactMap { $0.intValue.map(Int.init) }
        deadlineInUs = r.optionalInt("deadlineInUs"); decision = try r.string("decision"); outcome = try r.string("outcome")
    }
}

/// A registered driver as `drivers.list` answers it.
public struct DriverSummary: ControlResult, Equatable {
    public var name: String
    public var protocolName: String
    public var version: String
    /// The events it subscribes to, by name (`EventMask.named`).
    public var events: [String]
    public var vms: [String]
    public var isDefault: Bool
    /// `builtin` or `bpf`.
    public var kind: String
    public init(name: String, protocolName: String, version: String, events: [String], vms: [String], isDefault: Bool, kind: String) {
        self.name = name; self.protocolName = protocolName; self.version = version; self.events = events; self.vms = vms
        self.isDefault = isDefault; self.kind = kind
    }
    public var json: JSON {
        ["name": .string(name), "protocol": .string(protocolName), "version": .string(version), "events": .array(events.map { .string($0) }),
         "vms": .array(vms.map { .string($0) }), "default": .bool(isDefault), "kind": .string(kind)]
    }
    public init(decoding json: JSON) throws(ControlError) {
        let r = try JSONReader(json, "driver")
        name = try r.string("name"); protocolName = try r.string("protocol"); version = try r.string("version")
        events = (try? r.strings("events")) ?? []; vms = (try? r.strings("vms")) ?? []
        isDefault = try r.bool("default"); kind = try r.string("kind")
    }
}
