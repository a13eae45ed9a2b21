import Atomics
import Logging
import PVSchedABI
import PVSchedCore
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Memory a guest writes its pvsched region into, as the host maps it: a file
/// under /dev/shm (`SharedMemoryFile`) or, in tests and fuzzing, plain memory.
public protocol WatchedRegion: AnyObject, Sendable {
    var bytes: UnsafeMutableRawBufferPointer { get }
    /// The memory went away under the mapping (the file was truncated): it reads as zeros now.
    var faulted: Bool { get }
    var path: String { get }
}

extension SharedMemoryFile: WatchedRegion {}

/// One attached VM's region, watched: the state machine of the shared-memory
/// transport's host side, stepped by a poller thread (`GuestAreaWatcher`) with no
/// thread of its own, so that it can also be driven step by step (tests, fuzzing).
///
/// Each `step`:
/// - a region whose memory went away (truncated file) disables pvsched for the VM;
/// - with no area: waits for the guest to write a header (magic and generation),
///   then validates and negotiates it through the VM's registrar, and writes the
///   answer into the header (`host_negotiation`, `host_reason`) for the guest;
/// - with an area: notices a withdrawn or rewritten header (module unloaded or
///   reloaded) and a VM that pvsched disabled (a bad line); otherwise reads each
///   vCPU's sequence counter and sends `guestUpdate` when a line changed (the
///   VM's host component, reading the line, learns the guest's deadline and announces it ahead);
/// - returns when to look again: every `busyPollNs` while the guest reports work or
///   a vCPU is boosted, every `idlePollNs` otherwise, `headerPollNs` without a header.
///
/// Only one thread steps a watch at a time; `phase` and `stats` may be read from any.
public final class RegionWatch: Sendable {
    /// How often and how early the watcher looks.
    public struct Settings: Equatable, Sendable {
        /// Poll period while a vCPU reports work (irq, RT task, ...) or is boosted.
        public var busyPollNs: UInt64
        /// Poll period otherwise.
        public var idlePollNs: UInt64
        /// Poll period while no valid header is there.
        public var headerPollNs: UInt64
        public init(busyPollNs: UInt64 = 200_000, idlePollNs: UInt64 = 1_000_000, headerPollNs: UInt64 = 20_000_000) {
            self.busyPollNs = busyPollNs; self.idlePollNs = idlePollNs; self.headerPollNs = headerPollNs
        }
        /// The bounds each setting must lie in (a hostile or mistyped value cannot
        /// make the watcher spin or sleep through deadlines).
        public static let pollRange: ClosedRange<UInt64> = 50_000...100_000_000
    }

    /// Where the watcher's VM stands.
    public enum Phase: Equatable, Sendable, CustomStringConvertible {
        /// No valid header yet (or withdrawn).
        case waiting
        case accepted(AreaAcceptance)
        case refused(AreaRefusal)
        /// Accepted, then a line failed validation: pvsched is off for the VM.
        case disabled(String)
        public var description: String {
            switch self {
            case .waiting: return "waiting for the guest"
            case .accepted(let a): return "accepted: \(a)"
            case .refused(let r): return "refused: \(r.message)"
            case .disabled(let why): return "disabled: \(why)"
            }
        }
    }

    /// Counters of what the watcher did.
    public struct Counters: Equatable, Sendable {
        public var polls: UInt64 = 0
        public var guestUpdates: UInt64 = 0
        public var registrations: UInt64 = 0
    }

    private let region: any WatchedRegion
    private let link: VMHostLink
    /// The VM's events go here; what it says of the VM comes from `status`.
    private let sink: any VMEventSink
    private let vm: any VMStatusView
    public let settings: Settings
    private let phaseBox = Mutex(Phase.waiting)
    private let counters = Mutex(Counters())
    private let logger: Logger

    private struct VCPUWatch {
        var sequence: UInt32?
        var state: GuestVCPUState?
    }
    /// What `step` carries from one look to the next (only the stepping thread touches it).
    private struct Cursor {
        var generation: UInt32?
        var area: SharedArea?
        var watches: [VCPUWatch] = []
    }
    private let cursor = Mutex(Cursor())

    public init(region: any WatchedRegion, link: VMHostLink, status: any VMStatusView, settings: Settings = Settings(), logger: Logger) {
        self.region = region; self.link = link; self.sink = link.events; self.vm = status
        self.settings = settings; self.logger = logger
    }

    public var phase: Phase { phaseBox.withLock { $0 } }
    public var stats: Counters { counters.withLock { $0 } }

    /// One look at the region; returns when (host monotonic ns) to look again.
    public func step(now: UInt64) -> UInt64 {
        cursor.withLock { c in step(&c, now: now) }
    }

    private func step(_ c: inout Cursor, now: UInt64) -> UInt64 {
        let magic = header32(PVSCHED_OFF_MAGIC)
        let gen = header32(PVSCHED_OFF_GUEST_GENERATION)
        if region.faulted {
            // The file was truncated under us: what is mapped now is zeros.
            if case .disabled = phase {} else {
                let why = "the region file \(region.path) was truncated under the host"
                vm.disable(.regionLost(why))
                c.area = nil
                phaseBox.withLock { $0 = .disabled(why) }
                logger.error("pvsched disabled for VM: its region went away", metadata: ["vm": "\(link.handle)", "path": "\(region.path)"])
            }
            return now + settings.headerPollNs
        }
        if let current = c.area {
            if magic != PVSCHED_MAGIC || gen != c.generation {
                link.registrar.unregister()
                publishAll(current, status: .disabled)
                c.area = nil
                phaseBox.withLock { $0 = .waiting }
                logger.info("guest withdrew its pvsched region", metadata: ["vm": "\(link.handle)"])
                return now
            }
            if let bad = vm.disabledReason {
                c.area = nil
                publishAll(current, status: .disabled)
                writeHeader(negotiation: PVSCHED_DEV_REFUSED, reason: PVSCHED_REASON_BAD_LINE)
                phaseBox.withLock { $0 = .disabled("\(bad)") }
                return now
            }
            return poll(current, &c.watches, now: now)
        }
        // No area: wait for a (new) header, then register it.
        if magic == PVSCHED_MAGIC, gen != c.generation {
            c.generation = gen
            counters.withLock { $0.registrations &+= 1 }
            switch link.registrar.register(area: region.bytes, owner: region) {
            case .success(let accepted):
                writeHeader(negotiation: PVSCHED_DEV_ACCEPTED, reason: PVSCHED_REASON_NONE)
                c.area = accepted.area
                c.watches = Array(repeating: VCPUWatch(), count: accepted.area.layout.vcpuCount)
                phaseBox.withLock { $0 = .accepted(accepted) }
                logger.info("pvsched region accepted", metadata: ["vm": "\(link.handle)", "protocol": "\(accepted)"])
                return now
            case .failure(let refusal):
                writeHeader(negotiation: PVSCHED_DEV_REFUSED, reason: refusal.code)
                phaseBox.withLock { $0 = .refused(refusal) }
                logger.warning("pvsched region refused", metadata: ["vm": "\(link.handle)", "reason": "\(refusal)"])
            }
        } else if magic != PVSCHED_MAGIC, c.generation != nil, case .waiting = phase {
            c.generation = nil  // withdrawn: the next header is new whatever its generation
        }
        return now + settings.headerPollNs
    }

    /// One look at every vCPU whose line may have changed; returns when to look again.
    /// A vCPU whose thread slept since the last look (the VM's events say so) is
    /// skipped; when every vCPU is such, the watch rests until the VM's bell
    /// (`RegionPoller.lookSoon`) or `restNs`.
    private func poll(_ area: SharedArea, _ watches: inout [VCPUWatch], now: UInt64) -> UInt64 {
        var busy = false, anyAwake = false
        var updates: UInt64 = 0
        for v in watches.indices {
            if v < link.handle.vcpuCount {
                guard vm.lineMayHaveChanged(vcpu: v) else { continue }
            }
            anyAwake = true
            if let seq = area.sequence(vcpu: v) {
                if seq != watches[v].sequence, seq & 1 == 0 {
                    watches[v].sequence = seq
                    if let st = try? area.read(vcpu: v) { watches[v].state = st }
                    sink.notify(.guestUpdate, vcpu: v)
                    updates += 1
                } else if seq & 1 == 1 {
                    busy = true  // mid-write: look again soon
                }
            }
            guard let st = watches[v].state else { continue }
            if !st.flags.subtracting(.idle).isEmpty { busy = true }
            if v < link.handle.vcpuCount, vm.publishedStats(vcpu: v).boosted { busy = true }
        }
        counters.withLock { c in c.polls &+= 1; c.guestUpdates &+= updates }
        guard anyAwake else { return now + Self.restNs }
        return now + (busy ? settings.busyPollNs : settings.idlePollNs)
    }

    /// How long a watch rests while every vCPU thread sleeps (its bell wakes it sooner).
    public static let restNs: UInt64 = 1_000_000_000

    /// Whether a look now would read nothing and rest: the area is accepted and every
    /// vCPU's line was read as its thread went to sleep.
    public var mayRest: Bool {
        guard case .accepted = phase else { return false }
        return vm.everyLineReadAsleep
    }

    /// Waits for a step in progress (on the poller's thread) to finish.
    public func settle() { cursor.withLock { _ in } }

    /// The watch ends (the VM is detached): an accepted guest sees the host gone idle.
    public func withdraw() {
        if case .accepted = phase { withdrawStatus(negotiation: PVSCHED_DEV_IDLE, reason: PVSCHED_REASON_NONE) }
    }

    // MARK: the region header's host-written words

    /// The 32-bit header word at `offset` (the guest writes some, the host others).
    private func word(_ offset: Int) -> UnsafeAtomic<UInt32> {
        UnsafeAtomic(at: (region.bytes.baseAddress! + offset).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }

    private func header32(_ offset: Int) -> UInt32 { word(offset).load(ordering: .acquiring) }

    private func writeHeader(negotiation: UInt32, reason: UInt32) {
        word(PVSCHED_OFF_HOST_REASON).store(reason, ordering: .relaxed)
        word(PVSCHED_OFF_HOST_NEGOTIATION).store(negotiation, ordering: .releasing)
    }

    private func withdrawStatus(negotiation: UInt32, reason: UInt32) {
        if let a = try? SharedArea(validating: region.bytes, owner: region) { publishAll(a, status: .disabled) }
        writeHeader(negotiation: negotiation, reason: reason)
    }

    private func publishAll(_ area: SharedArea, status: HostVCPUStatus) {
        for v in 0..<area.layout.vcpuCount {
            let st = vm.publishedStats(vcpu: min(v, link.handle.vcpuCount - 1))
            try? area.publish(vcpu: v, status: status, boostCount: st.boostCount, boostedNs: st.boostedNs,
                              throttleCount: st.throttleCount)
        }
    }
}

/// Memory this process already maps, as a guest's region (the lab's in-process
/// VMs, the tests): kept alive by `owner`; it never goes away under the host.
// @unchecked Sendable: the pointer and owner are set once; the memory is shared with the guest by design.
public final class MappedRegion: WatchedRegion, @unchecked Sendable {
    public let bytes: UnsafeMutableRawBufferPointer
    public let path: String
    private let owner: AnyObject?
    public init(bytes: UnsafeMutableRawBufferPointer, owner: AnyObject?, path: String = "(in-process memory)") {
        self.bytes = bytes; self.owner = owner; self.path = path
    }
    public var faulted: Bool { false }
}
