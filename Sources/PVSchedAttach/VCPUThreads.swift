import PVSchedControl
import PVSchedCore

#if canImport(Glibc)
import Glibc
#endif

/// How the vCPU threads of a VMM process are found.
public enum VCPUThreadSource: Sendable, Equatable {
    /// QMP `query-cpus-fast`: each vCPU's `thread-id`, in `cpu-index` order (QEMU).
    case qmp
    /// By thread name, for VMMs without QMP.
    case names(VCPUThreadNaming)
}

/// The thread names VMMs give their vCPU threads: the number in the name is the vCPU index.
public enum VCPUThreadNaming: String, Sendable, CaseIterable {
    /// crosvm: `crosvm_vcpuN`
    case crosvm
    /// cloud-hypervisor: `vcpuN`
    case cloudHypervisor = "cloud-hypervisor"
    /// Firecracker: `fc_vcpu N`
    case firecracker
    /// QEMU with `-name debug-threads=on`: `CPU N/KVM` or `CPU N/TCG`
    case qemu

    /// The vCPU index a thread name stands for, if it is one of this VMM's vCPU threads.
    public func vcpuIndex(threadName name: String) -> Int? {
        func number(after prefix: String, until suffix: String? = nil) -> Int? {
            guard name.hasPrefix(prefix) else { return nil }
            var rest = Substring(name.dropFirst(prefix.count))
            if let suffix {
                guard let r = rest.firstIndex(of: Character(suffix)) else { return nil }
                let tail = rest[r...]
                guard tail == "/KVM" || tail == "/TCG" else { return nil }
                rest = rest[..<r]
            }
            guard !rest.isEmpty, rest.count <= 4, rest.allSatisfy({ $0.isASCII && $0.isNumber }) else { return nil }
            return Int(rest)
        }
        switch self {
        case .crosvm: return number(after: "crosvm_vcpu")
        case .cloudHypervisor: return number(after: "vcpu")
        case .firecracker: return number(after: "fc_vcpu ")
        case .qemu: return number(after: "CPU ", until: "/")
        }
    }
}

/// The threads of a VMM process that run its vCPUs, and those that deliver its
/// interrupts (QEMU's main loop: under TCG the guest's timers fire there).
public struct VCPUThreads: Equatable, Sendable {
    /// vCPU i's thread id at index i.
    public var vcpus: [Int32]
    /// The VMM's main thread (its pid), which delivers timer interrupts under TCG.
    public var mainLoop: Int32?

    public init(vcpus: [Int32], mainLoop: Int32? = nil) { self.vcpus = vcpus; self.mainLoop = mainLoop }

    /// From QMP `query-cpus-fast`. Checks every thread id belongs to `pid`.
    public static func fromQMP(_ qmp: QMPClient, pid: Int32) throws(QMPError) -> VCPUThreads {
        try decode(queryCpusFast: try qmp.execute("query-cpus-fast"), pid: pid) { isThread($0, of: pid) }
    }

    /// Decodes a `query-cpus-fast` reply (QEMU's, so checked field by field):
    /// 1-1024 vCPUs, `cpu-index` exactly 0..<n, every `thread-id` one of `pid`'s threads.
    public static func decode(queryCpusFast reply: JSON, pid: Int32, isThread: (Int32) -> Bool) throws(QMPError) -> VCPUThreads {
        guard let cpus = reply.arrayValue, !cpus.isEmpty, cpus.count <= 1024 else {
            throw QMPError("query-cpus-fast: expected a list of 1-1024 vCPUs")
        }
        var byIndex: [Int: Int32] = [:]
        for c in cpus {
            guard let index = c["cpu-index"]?.intValue, index >= 0, index < 1024 else {
                throw QMPError("query-cpus-fast: a vCPU without a valid cpu-index")
            }
            guard let tid = c["thread-id"]?.intValue, tid > 0, tid <= Int64(Int32.max) else {
                throw QMPError("query-cpus-fast: vCPU \(index) has no valid thread-id")
            }
            guard byIndex[Int(index)] == nil else { throw QMPError("query-cpus-fast: cpu-index \(index) listed twice") }
            byIndex[Int(index)] = Int32(tid)
        }
        guard byIndex.keys.sorted() == Array(0..<byIndex.count) else {
            throw QMPError("query-cpus-fast: cpu-index values are not 0...\(byIndex.count - 1)")
        }
        let tids = (0..<byIndex.count).map { byIndex[$0]! }
        for t in tids where !isThread(t) {
            throw QMPError("query-cpus-fast: thread \(t) is not a thread of process \(pid)")
        }
        return VCPUThreads(vcpus: tids, mainLoop: pid)
    }

    /// By thread name (/proc/PID/task/TID/comm).
    public static func byName(pid: Int32, naming: VCPUThreadNaming) -> VCPUThreads? {
        guard let dir = opendir("/proc/\(pid)/task") else { return nil }
        defer { closedir(dir) }
        var byIndex: [Int: Int32] = [:]
        while let e = readdir(dir) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let tid = Int32(name), let comm = threadName(pid: pid, tid: tid),
                  let index = naming.vcpuIndex(threadName: comm) else { continue }
            byIndex[index] = tid
        }
        guard !byIndex.isEmpty, byIndex.keys.sorted() == Array(0..<byIndex.count) else { return nil }
        return VCPUThreads(vcpus: (0..<byIndex.count).map { byIndex[$0]! }, mainLoop: nil)
    }

    /// Whether `tid` is a thread of process `pid`.
    public static func isThread(_ tid: Int32, of pid: Int32) -> Bool { access("/proc/\(pid)/task/\(tid)", F_OK) == 0 }

    static func threadName(pid: Int32, tid: Int32) -> String? {
        guard let f = fopen("/proc/\(pid)/task/\(tid)/comm", "re") else { return nil }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 64)
        guard fgets(&buf, 64, f) != nil else { return nil }
        let s = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return s.hasSuffix("\n") ? String(s.dropLast()) : s
    }
}
