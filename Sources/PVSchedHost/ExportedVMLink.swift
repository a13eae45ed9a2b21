import Foundation
import PVSchedABI
import PVSchedControl
import PVSchedCore
import PVSchedKVM
import Atomics
import Synchronization

/// The host link of a VM whose pvsched policy runs in another process (the
/// daemon attaches to it, and learns its events from the host kernel): the VMM
/// here accepts the guest's area after checking its header, runs no driver, and
/// publishes what an attacher needs — its pid, vCPU thread ids, the shared
/// memory file and the area's place in it — in a small JSON file. It also counts
/// the events it would have sent, so they can be compared with what the kernel
/// reports.
public final class ExportedVMLink: VMEventSink, SharedAreaRegistrar {
    /// What the export file says (also the parameters of the control method `vm.attach`).
    public struct Export: Equatable, Sendable {
        public var pid: Int32
        public var threads: [Int32]
        public var memory: String?
        public var areaOffset: Int?
        public var areaSize: Int?
        /// The VMM's own counts so far (refreshed a few times a second), per vCPU.
        public var injections: [UInt64] = []
        public var exits: [UInt64] = []

        public var json: JSON {
            ["pid": JSON(pid), "threads": .array(threads.map { JSON($0) }), "memory": JSON(memory),
             "areaOffset": areaOffset.map { JSON($0) } ?? .null, "areaSize": areaSize.map { JSON($0) } ?? .null,
             "injections": .array(injections.map { JSON($0) }), "exits": .array(exits.map { JSON($0) })]
        }
    }

    public let handle: VMHandle
    public let path: String?
    private let state: Mutex<Export>
    private let injections: [ManagedAtomic<UInt64>]
    private let exits: [ManagedAtomic<UInt64>]

    /// `path`: where to write the export file (nil: keep it in memory only).
    public init(name: String, vcpus: Int, memoryFile: String?, path: String?) {
        handle = VMHandle(id: UInt64(getpid()), name: name, vcpuCount: vcpus)
        self.path = path
        state = Mutex(Export(pid: getpid(), threads: Array(repeating: 0, count: vcpus), memory: memoryFile))
        injections = (0..<vcpus).map { _ in ManagedAtomic(0) }
        exits = (0..<vcpus).map { _ in ManagedAtomic(0) }
    }

    /// The link to give the VMM.
    public var link: VMHostLink {
        VMHostLink(handle: handle, events: self, registrar: self, onRelease: { [self] in
            refreshing.store(false, ordering: .relaxed)
            refresher.takeAndJoin()
            if let path { unlink(path) }
        })
    }

    /// Rewrites the counts in the file every 100 ms, on a thread of its own: never
    /// on a vCPU thread, whose sleeping on file I/O the host kernel would report as
    /// halts and wake-ups it did not make.
    private let refresher = Mutex<PVSchedCore.Thread?>(nil)
    private let refreshing = ManagedAtomic(false)

    private func startRefresher() {
        guard path != nil, refreshing.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        let t = try? PVSchedCore.Thread(name: "pvs-export") { [weak self] in
            while let self, self.refreshing.load(ordering: .relaxed) {
                usleep(100_000)
                let inj = self.injectionCounts, ex = self.exitCounts
                self.update { $0.injections = inj; $0.exits = ex }
            }
        }
        refresher.withLock { $0 = t }
    }

    public var export: Export { state.withLock { $0 } }
    /// Interrupt injections and exits the VMM reported, per vCPU.
    public var injectionCounts: [UInt64] { injections.map { $0.load(ordering: .relaxed) } }
    public var exitCounts: [UInt64] { exits.map { $0.load(ordering: .relaxed) } }

    public func notify(_ event: VCPUEvent, vcpu: Int, interruptStillQueued: Bool, cpuTime: ThreadCPUTime?) -> NotifyOutcome {
        guard vcpu >= 0 && vcpu < injections.count else { return .unchanged }
        switch event {
        case .interruptInjection: injections[vcpu].wrappingIncrement(ordering: .relaxed)
        case .vmExit: exits[vcpu].wrappingIncrement(ordering: .relaxed)
        default: break
        }
        return .unchanged
    }

    public func setThread(_ thread: ThreadID?, vcpu: Int) {
        guard vcpu >= 0 && vcpu < handle.vcpuCount else { return }
        if thread != nil { startRefresher() }
        update { $0.threads[vcpu] = thread?.rawValue ?? 0 }
    }

    public func register(area bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?) -> Result<AreaAcceptance, AreaRefusal> {
        let area: SharedArea
        switch SharedArea.validated(bytes, owner: owner, vcpuCount: handle.vcpuCount) {
        case .success(let a): area = a
        case .failure(let refusal): return .failure(refusal)
        }
        if let memory = owner as? GuestMemory, let p = bytes.baseAddress {
            update { $0.areaOffset = p - memory.base; $0.areaSize = bytes.count }
        }
        return .success(AreaAcceptance(protocolName: area.layout.protocolName, protocolVersion: area.layout.protocolVersion,
                                       driver: "(exported: the attaching daemon's)", area: area))
    }

    public func unregister() { update { $0.areaOffset = nil; $0.areaSize = nil } }
    public func reportRefusal(_ refusal: AreaRefusal) {}

    private func update(_ change: (inout Export) -> Void) {
        let snapshot = state.withLock { s in
            change(&s)
            return s
        }
        guard let path else { return }
        let tmp = path + ".tmp"
        let bytes = snapshot.json.encoded + [10]
        guard FileManager.default.createFile(atPath: tmp, contents: Data(bytes), attributes: [.posixPermissions: 0o600]) else { return }
        rename(tmp, path)
    }
}
