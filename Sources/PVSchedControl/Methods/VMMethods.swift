/// The VM a request names (`{"vm": NAME or ID}`).
public struct VMReference: ControlParams, Equatable {
    public var vm: String
    public init(_ vm: String) { self.vm = vm }
    public init(decoding p: inout RequestParams) throws(ControlError) { vm = try p.string("vm", maxBytes: 64) }
    public var encoded: [String: JSON] { ["vm": .string(vm)] }
}

/// `vm.list`: every VM the daemon serves.
public enum VMList: ControlMethod {
    public static let name = "vm.list"
    public static let access = ControlAccessLevel.readOnly
    public typealias Params = NoParams
    public typealias Result = [VMSummary]
}

/// `vm.start`: a VM of the built-in VMM.
public enum VMStart: ControlMethod {
    public static let name = "vm.start"
    public static let access = ControlAccessLevel.admin
    /// The built-in VMM's largest VM.
    public static let maxVCPUs = 16
    public struct Params: ControlParams, Equatable {
        public var name: String?
        public var vcpus: Int = 1
        /// A guest workload (`selftest`, `cyclic`, `irq-response`, `batch`, `idle`, `cyclic+batch`).
        public var workload = "cyclic"
        public var durationMs: UInt64 = 60_000
        public var intervalUs: UInt64 = 1000
        public var driver: String?
        public var irqchip = false
        public var pvsched = true
        public var governor = GovernorChange()
        public init() {}
        public init(decoding p: inout RequestParams) throws(ControlError) {
            name = try p.optionalString("name", maxBytes: 64)
            vcpus = Int(try p.int("vcpus", in: 1...Int64(VMStart.maxVCPUs), default: 1))
            workload = try p.optionalString("workload") ?? "cyclic"
            durationMs = UInt64(try p.int("durationMs", in: 1...86_400_000, default: 60_000))
            intervalUs = UInt64(try p.int("intervalUs", in: 50...1_000_000, default: 1000))
            driver = try p.optionalString("driver")
            irqchip = try p.bool("irqchip", default: false)
            pvsched = try p.bool("pvsched", default: true)
            governor = try GovernorChange(decoding: &p)
            if driver != nil && !pvsched { throw ControlError(.invalidParams, field: "params.driver", "a VM without pvsched has no driver") }
        }
        public var encoded: [String: JSON] {
            var e: [String: JSON] = ["vcpus": JSON(vcpus), "workload": .string(workload), "durationMs": JSON(durationMs),
                                     "intervalUs": JSON(intervalUs), "irqchip": .bool(irqchip), "pvsched": .bool(pvsched)]
            if let name { e["name"] = .string(name) }
            if let driver { e["driver"] = .string(driver) }
            e.merge(governor.encoded) { a, _ in a }
            return e
        }
    }
    public typealias Result = VMSummary
}

/// `vm.attach`: a VM another VMM runs (see docs/control-api.md for the fields).
public enum VMAttach: ControlMethod {
    public static let name = "vm.attach"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        public var name: String?
        /// QEMU's QMP socket: gives the process and its vCPU threads.
        public var qmp: String?
        public var pid: Int32?
        public var threads: [Int32]?
        /// crosvm, cloud-hypervisor, firecracker or qemu.
        public var threadNames: String?
        /// A libvirt domain (name or UUID) the daemon's libvirt connection knows.
        public var libvirtDomain: String?
        public var memory: String?
        public var areaOffset: Int64?
        public var areaSize: Int64?
        public var shm: String?
        public var driver: String?
        /// kernel, watch or both.
        public var events: String?
        public var boostMainLoop: Bool?
        public var allowRealTimeThreads = false
        /// A boost class (`BoostClass.syntax`).
        public var boost: String?
        public var protectHostPriority: Int64?
        public var pollUs: Int64?
        public var deadlineLeadUs: Int64?
        public var governor = GovernorChange()
        public init() {}
        public init(decoding p: inout RequestParams) throws(ControlError) {
            name = try p.optionalString("name", maxBytes: 64)
            qmp = try p.optionalString("qmp", maxBytes: 255)
            pid = try p.optionalInt("pid", in: 1...Int64(Int32.max)).map { Int32($0) }
            threads = try p.optionalIntArray("threads", count: 1...256, in: 1...Int64(Int32.max))?.map { Int32($0) }
            threadNames = try p.optionalString("threadNames", maxBytes: 32)
            libvirtDomain = try p.optionalString("libvirtDomain", maxBytes: 255)
            memory = try p.optionalString("memory", maxBytes: 255)
            areaOffset = try p.optionalInt("areaOffset", in: 0...(1 << 40))
            areaSize = try p.optionalInt("areaSize", in: 64...(1 << 24))
            shm = try p.optionalString("shm", maxBytes: 255)
            driver = try p.optionalString("driver")
            events = try p.optionalString("events", maxBytes: 16)
            boostMainLoop = p.has("boostMainLoop") ? try p.bool("boostMainLoop", default: true) : nil
            allowRealTimeThreads = try p.bool("allowRealTimeThreads", default: false)
            boost = try p.optionalString("boost")
            protectHostPriority = try p.optionalInt("protectHostPriority", in: 0...99)
            pollUs = try p.optionalInt("pollUs", in: 50...100_000)
            deadlineLeadUs = try p.optionalInt("deadlineLeadUs", in: 0...100_000)
            governor = try GovernorChange(decoding: &p)
        }
        public var encoded: [String: JSON] {
            var e: [String: JSON] = [:]
            if let name { e["name"] = .string(name) }
            if let qmp { e["qmp"] = .string(qmp) }
            if let pid { e["pid"] = JSON(pid) }
            if let threads { e["threads"] = .array(threads.map { JSON($0) }) }
            if let threadNames { e["threadNames"] = .string(threadNames) }
            if let libvirtDomain { e["libvirtDomain"] = .string(libvirtDomain) }
            if let memory { e["memory"] = .string(memory) }
            if let areaOffset { e["areaOffset"] = .int(areaOffset) }
            if let areaSize { e["areaSize"] = .int(areaSize) }
            if let shm { e["shm"] = .string(shm) }
            if let driver { e["driver"] = .string(driver) }
            if let events { e["events"] = .string(events) }
            if let boostMainLoop { e["boostMainLoop"] = .bool(boostMainLoop) }
            if allowRealTimeThreads { e["allowRealTimeThreads"] = .bool(true) }
            if let boost { e["boost"] = .string(boost) }
            if let protectHostPriority { e["protectHostPriority"] = .int(protectHostPriority) }
            if let pollUs { e["pollUs"] = .int(pollUs) }
            if let deadlineLeadUs { e["deadlineLeadUs"] = .int(deadlineLeadUs) }
            e.merge(governor.encoded) { a, _ in a }
            return e
        }
    }
    public struct Result: ControlResult, Equatable {
        public var vm: VMSummary
        /// Which events the VM gets, and which are missing and why.
        public var events: String
        public var pid: Int32
        public var vcpuThreads: [Int32]
        public var mainLoopBoosted: Bool
        public init(vm: VMSummary, events: String, pid: Int32, vcpuThreads: [Int32], mainLoopBoosted: Bool) {
            self.vm = vm; self.events = events; self.pid = pid; self.vcpuThreads = vcpuThreads; self.mainLoopBoosted = mainLoopBoosted
        }
        public var json: JSON {
            guard case .object(var o) = vm.json else { return vm.json }
            o["events"] = .string(events); o["pid"] = JSON(pid); o["vcpuThreads"] = .array(vcpuThreads.map { JSON($0) })
            o["mainLoopBoosted"] = .bool(mainLoopBoosted)
            return .object(o)
        }
        public init(decoding json: JSON) throws(ControlError) {
            vm = try VMSummary(decoding: json)
            let r = try JSONReader(json, "attach")
            events = try r.string("events"); pid = Int32(clamping: try r.int("pid"))
            vcpuThreads = try r.array("vcpuThreads").compactMap { $0.intValue.map { Int32(clamping: $0) } }
            mainLoopBoosted = (try? r.bool("mainLoopBoosted")) ?? false
        }
    }
}

/// `vm.stop`: stops a VM of the built-in VMM, or detaches from an attached one.
public enum VMStop: ControlMethod {
    public static let name = "vm.stop"
    public static let access = ControlAccessLevel.admin
    public typealias Params = VMReference
    public typealias Result = VMSummary
}

/// A VM's driver, and the driver before a change.
public struct VMDriverResult: ControlResult, Equatable {
    public var vm: String
    public var previous: String?
    public var driver: String?
    public init(vm: String, previous: String?, driver: String?) { self.vm = vm; self.previous = previous; self.driver = driver }
    public var json: JSON { ["vm": .string(vm), "previous": JSON(previous), "driver": JSON(driver)] }
    public init(decoding json: JSON) throws(ControlError) {
        vm = try JSONReader(json, "driver").string("vm"); previous = json["previous"]?.stringValue; driver = json["driver"]?.stringValue
    }
}

/// `vm.driver.get`: the seed's KVM_GET_PVSCHED_OPS.
public enum VMDriverGet: ControlMethod {
    public static let name = "vm.driver.get"
    public static let access = ControlAccessLevel.readOnly
    public typealias Params = VMReference
    public typealias Result = VMDriverResult
}

/// `vm.driver.replace`: the seed's KVM_REPLACE_PVSCHED_OPS (the old driver's boosts undone first).
public enum VMDriverReplace: ControlMethod {
    public static let name = "vm.driver.replace"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        public var vm: String
        public var driver: String
        public init(vm: String, driver: String) { self.vm = vm; self.driver = driver }
        public init(decoding p: inout RequestParams) throws(ControlError) { vm = try p.string("vm", maxBytes: 64); driver = try p.string("driver") }
        public var encoded: [String: JSON] { ["vm": .string(vm), "driver": .string(driver)] }
    }
    public typealias Result = VMDriverResult
}

/// `vm.driver.unassign`: the VM goes back to the default driver.
public enum VMDriverUnassign: ControlMethod {
    public static let name = "vm.driver.unassign"
    public static let access = ControlAccessLevel.admin
    public typealias Params = VMReference
    public typealias Result = VMDriverResult
}

/// `vm.stats`: per-vCPU counters of one VM or all.
public enum VMStats: ControlMethod {
    public static let name = "vm.stats"
    public static let access = ControlAccessLevel.readOnly
    public struct Params: ControlParams, Equatable {
        public var vm: String?
        public init(vm: String? = nil) { self.vm = vm }
        public init(decoding p: inout RequestParams) throws(ControlError) { vm = try p.optionalString("vm", maxBytes: 64) }
        public var encoded: [String: JSON] { vm.map { ["vm": .string($0)] } ?? [:] }
    }
    public struct Result: ControlResult, Equatable {
        public var timeNs: UInt64
        public var vms: [VMStatistics]
        public init(timeNs: UInt64, vms: [VMStatistics]) { self.timeNs = timeNs; self.vms = vms }
        public var json: JSON { ["timeNs": JSON(timeNs), "vms": .array(vms.map(\.json))] }
        public init(decoding json: JSON) throws(ControlError) {
            let r = try JSONReader(json, "statistics")
            timeNs = UInt64(clamping: try r.int("timeNs"))
            var v: [VMStatistics] = []
            for e in try r.array("vms") { v.append(try VMStatistics(decoding: e)) }
            vms = v
        }
    }
}

/// `vm.governor.get`: a VM's boost budget.
public enum VMGovernorGet: ControlMethod {
    public static let name = "vm.governor.get"
    public static let access = ControlAccessLevel.readOnly
    public typealias Params = VMReference
    public typealias Result = GovernorSettings
}

/// `vm.governor.set`: changes a VM's boost budget (the fields given).
public enum VMGovernorSet: ControlMethod {
    public static let name = "vm.governor.set"
    public static let access = ControlAccessLevel.admin
    public struct Params: ControlParams, Equatable {
        public var vm: String
        public var change: GovernorChange
        public init(vm: String, change: GovernorChange) { self.vm = vm; self.change = change }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            vm = try p.string("vm", maxBytes: 64); change = try GovernorChange(decoding: &p)
        }
        public var encoded: [String: JSON] { change.encoded.merging(["vm": .string(vm)]) { _, b in b } }
    }
    public typealias Result = GovernorSettings
}

/// `vm.trace`: a VM's last driver notifications.
public enum VMTrace: ControlMethod {
    public static let name = "vm.trace"
    public static let access = ControlAccessLevel.readOnly
    public struct Params: ControlParams, Equatable {
        public var vm: String
        public var last: Int
        public init(vm: String, last: Int = 20) { self.vm = vm; self.last = last }
        public init(decoding p: inout RequestParams) throws(ControlError) {
            vm = try p.string("vm", maxBytes: 64); last = Int(try p.int("last", in: 1...4096, default: 20))
        }
        public var encoded: [String: JSON] { ["vm": .string(vm), "last": JSON(last)] }
    }
    public typealias Result = [TraceEntry]
}
