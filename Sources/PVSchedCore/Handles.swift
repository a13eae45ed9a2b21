/// A Linux thread id (what `gettid` returns); the unit the actuator schedules.
public struct ThreadID: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32
    public init(_ rawValue: Int32) { self.rawValue = rawValue }
    public var description: String { "tid \(rawValue)" }
}

/// A hypervisor-neutral handle for a VM known to the host component.
public struct VMHandle: Hashable, Sendable, CustomStringConvertible {
    public let id: UInt64
    public let name: String
    public let vcpuCount: Int
    public init(id: UInt64, name: String, vcpuCount: Int) {
        self.id = id; self.name = name; self.vcpuCount = vcpuCount
    }
    public var description: String { "VM \(name)#\(id)" }
}

/// A hypervisor-neutral handle for one vCPU of a VM.
public struct VCPUHandle: Hashable, Sendable, CustomStringConvertible {
    public let vm: VMHandle
    public let index: Int
    public init(vm: VMHandle, index: Int) { self.vm = vm; self.index = index }
    public var description: String { "\(vm) vCPU \(index)" }
}
