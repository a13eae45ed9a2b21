import Atomics
import PVSchedABI

/// Why a shared area (or one read of it) was rejected. Every case names the
/// field that failed so that a user can tell what the guest got wrong.
public enum SharedAreaError: Error, Equatable, Sendable, CustomStringConvertible {
    case areaTooSmall(size: Int, needed: Int)
    case misaligned(field: String, value: UInt64, alignment: Int)
    case badMagic(found: UInt32)
    case unsupportedABIVersion(found: UInt16, supported: UInt16)
    case badHeaderSize(found: UInt16, expected: UInt16)
    case protocolNameNotTerminated
    case protocolNameEmpty
    /// A byte outside printable ASCII (0x21-0x7e): the name is an identifier, shown to
    /// operators, and a terminal's control sequences have no place in it.
    case protocolNameNotPrintable
    case vcpuCountOutOfRange(found: UInt16, max: Int)
    case strideTooSmall(found: UInt16, minimum: Int)
    case vcpuOffsetInvalid(found: UInt32, reason: String)
    case vcpuIndexOutOfRange(index: Int, count: Int)
    case unknownFlags(vcpu: Int, bits: UInt32)
    case taskPolicyInvalid(vcpu: Int, found: UInt32)
    case taskPriorityOutOfRange(vcpu: Int, policy: UInt32, found: Int32)
    case taskNiceOutOfRange(vcpu: Int, found: Int32)
    case sequenceNeverSettled(vcpu: Int, attempts: Int)
    /// The memory behind the area went away (its file was truncated under the host).
    case regionLost(String)

    /// Whether this is a bad read of a line (the area in use was found invalid), as
    /// opposed to the memory behind the area going away.
    public var isReadError: Bool { if case .regionLost = self { return false } else { return true } }

    /// The ABI field (as named in pvsched_abi.h) that this error is about.
    public var field: String {
        switch self {
        case .areaTooSmall: return "area_size"
        case .misaligned(let field, _, _): return field
        case .badMagic: return "magic"
        case .unsupportedABIVersion: return "abi_version"
        case .badHeaderSize: return "header_size"
        case .protocolNameNotTerminated, .protocolNameEmpty, .protocolNameNotPrintable: return "protocol_name"
        case .vcpuCountOutOfRange: return "vcpu_count"
        case .strideTooSmall: return "vcpu_stride"
        case .vcpuOffsetInvalid: return "vcpu_offset"
        case .vcpuIndexOutOfRange: return "vcpu index"
        case .unknownFlags: return "flags"
        case .taskPolicyInvalid: return "task_policy"
        case .taskPriorityOutOfRange: return "task_priority"
        case .taskNiceOutOfRange: return "task_nice"
        case .sequenceNeverSettled: return "seq"
        case .regionLost: return "region"
        }
    }

    // The messages name the field and what it must be, never the value found: the
    // bytes are the guest's (or, through a mistyped path, a file's), and a refusal is
    // no way to read them out.
    public var description: String {
        let detail: String
        switch self {
        case .areaTooSmall(let size, let needed):
            detail = "area is \(size) bytes, needs at least \(needed)"
        case .misaligned(_, _, let alignment):
            detail = "not aligned to \(alignment) bytes"
        case .badMagic:
            detail = "not pvsched's magic 0x\(String(PVSCHED_MAGIC, radix: 16))"
        case .unsupportedABIVersion(_, let supported):
            detail = "not a version this host speaks (\(supported))"
        case .badHeaderSize(_, let expected):
            detail = "must be \(expected)"
        case .protocolNameNotTerminated:
            detail = "not NUL-terminated within \(PVSCHED_PROTOCOL_NAME_LEN) bytes"
        case .protocolNameEmpty:
            detail = "empty"
        case .protocolNameNotPrintable:
            detail = "must be printable ASCII (0x21-0x7e)"
        case .vcpuCountOutOfRange(_, let max):
            detail = "must be 1...\(max)"
        case .strideTooSmall(_, let minimum):
            detail = "must be at least a vCPU area (\(minimum) bytes) and a multiple of \(PVSCHED_CACHE_LINE)"
        case .vcpuOffsetInvalid(_, let reason):
            detail = reason
        case .vcpuIndexOutOfRange(let index, let count):
            detail = "vCPU \(index) is out of range (area has \(count))"
        case .unknownFlags(let vcpu, _):
            detail = "vCPU \(vcpu) sets bits the protocol does not define"
        case .taskPolicyInvalid(let vcpu, _):
            detail = "vCPU \(vcpu) reports a policy that is not a PVSCHED_TASK_* value"
        case .taskPriorityOutOfRange(let vcpu, _, _):
            detail = "vCPU \(vcpu) reports a priority outside its policy's range"
        case .taskNiceOutOfRange(let vcpu, _):
            detail = "vCPU \(vcpu) reports a nice outside \(PVSCHED_NICE_MIN)...\(PVSCHED_NICE_MAX)"
        case .sequenceNeverSettled(let vcpu, let attempts):
            detail = "vCPU \(vcpu)'s sequence counter did not settle after \(attempts) reads"
        case .regionLost(let why):
            return "shared area lost: \(why)"
        }
        return "shared area field `\(field)`: \(detail)"
    }
}

/// A guest's protocol name and version as advertised in its region header.
public struct ProtocolVersion: Hashable, Sendable, CustomStringConvertible, Comparable {
    public var major: UInt16
    public var minor: UInt16
    public init(major: UInt16, minor: UInt16) { self.major = major; self.minor = minor }
    /// A driver implementing `self` can serve a guest advertising `guest` when the
    /// majors match and the guest is at least as new (minor versions only add fields).
    public func canServe(_ guest: ProtocolVersion) -> Bool { major == guest.major && minor <= guest.minor }
    public var description: String { "\(major).\(minor)" }
    public static func < (a: Self, b: Self) -> Bool { (a.major, a.minor) < (b.major, b.minor) }
}

/// The validated, host-owned copy of a region header. After validation the host
/// uses only this copy: a guest that rewrites its header later cannot change the
/// layout the host reads.
public struct SharedAreaLayout: Equatable, Sendable {
    public let protocolName: String
    public let protocolVersion: ProtocolVersion
    public let vcpuCount: Int
    public let vcpuStride: Int
    public let vcpuOffset: Int

    /// Bytes the area must span for this layout.
    public var requiredSize: Int { vcpuOffset + (vcpuCount - 1) * vcpuStride + Int(PVSCHED_VCPU_AREA_SIZE) }

    /// Validates a region header read from `bytes` (the whole area as mapped on the host).
    /// Each field is read exactly once, so a guest racing with the host cannot make
    /// the validated value and the used value differ.
    public static func validate(_ bytes: UnsafeRawBufferPointer) throws(SharedAreaError) -> SharedAreaLayout {
        let headerSize = Int(PVSCHED_REGION_HEADER_SIZE)
        guard bytes.count >= headerSize else { throw .areaTooSmall(size: bytes.count, needed: headerSize) }
        guard let base = bytes.baseAddress else { throw .areaTooSmall(size: 0, needed: headerSize) }
        let address = UInt64(UInt(bitPattern: base))
        guard address % UInt64(PVSCHED_CACHE_LINE) == 0 else {
            throw .misaligned(field: "area address", value: address, alignment: Int(PVSCHED_CACHE_LINE))
        }
        func load<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            T(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: T.self))
        }
        let magic = load(PVSCHED_OFF_MAGIC, UInt32.self)
        guard magic == PVSCHED_MAGIC else { throw .badMagic(found: magic) }
        let abi = load(PVSCHED_OFF_ABI_VERSION, UInt16.self)
        guard abi == UInt16(PVSCHED_ABI_VERSION) else {
            throw .unsupportedABIVersion(found: abi, supported: UInt16(PVSCHED_ABI_VERSION))
        }
        let hsize = load(PVSCHED_OFF_HEADER_SIZE, UInt16.self)
        guard Int(hsize) == headerSize else { throw .badHeaderSize(found: hsize, expected: UInt16(headerSize)) }

        var nameBytes: [UInt8] = []
        var terminated = false
        for i in 0..<Int(PVSCHED_PROTOCOL_NAME_LEN) {
            let b = bytes[Int(PVSCHED_OFF_PROTOCOL_NAME) + i]
            if b == 0 { terminated = true; break }
            nameBytes.append(b)
        }
        guard terminated else { throw .protocolNameNotTerminated }
        guard !nameBytes.isEmpty else { throw .protocolNameEmpty }
        guard nameBytes.allSatisfy({ $0 >= 0x21 && $0 <= 0x7E }) else { throw .protocolNameNotPrintable }
        let name = String(decoding: nameBytes, as: UTF8.self)

        let major = load(PVSCHED_OFF_PROTOCOL_MAJOR, UInt16.self)
        let minor = load(PVSCHED_OFF_PROTOCOL_MINOR, UInt16.self)
        let count = load(PVSCHED_OFF_VCPU_COUNT, UInt16.self)
        guard count >= 1, Int(count) <= Int(PVSCHED_MAX_VCPUS) else {
            throw .vcpuCountOutOfRange(found: count, max: Int(PVSCHED_MAX_VCPUS))
        }
        let stride = load(PVSCHED_OFF_VCPU_STRIDE, UInt16.self)
        guard Int(stride) >= Int(PVSCHED_VCPU_AREA_SIZE), Int(stride) % Int(PVSCHED_CACHE_LINE) == 0 else {
            throw .strideTooSmall(found: stride, minimum: Int(PVSCHED_VCPU_AREA_SIZE))
        }
        let offset = load(PVSCHED_OFF_VCPU_OFFSET, UInt32.self)
        guard Int(offset) >= headerSize else {
            throw .vcpuOffsetInvalid(found: offset, reason: "overlaps the region header")
        }
        guard offset % UInt32(PVSCHED_CACHE_LINE) == 0 else {
            throw .vcpuOffsetInvalid(found: offset, reason: "not cache-line aligned")
        }
        let layout = SharedAreaLayout(
            protocolName: name, protocolVersion: ProtocolVersion(major: major, minor: minor),
            vcpuCount: Int(count), vcpuStride: Int(stride), vcpuOffset: Int(offset))
        guard bytes.count >= layout.requiredSize else {
            throw .areaTooSmall(size: bytes.count, needed: layout.requiredSize)
        }
        return layout
    }
}

/// What the guest says one vCPU is running: a validated, consistent snapshot of
/// its guest-written cache line.
public struct GuestVCPUState: Equatable, Sendable {
    /// The guest flags (`PVSCHED_FLAG_*`), validated to contain only known bits.
    public struct Flags: OptionSet, Hashable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let inIRQ = Flags(rawValue: PVSCHED_FLAG_IN_IRQ)
        public static let inSoftIRQ = Flags(rawValue: PVSCHED_FLAG_IN_SOFTIRQ)
        public static let inNMI = Flags(rawValue: PVSCHED_FLAG_IN_NMI)
        public static let preemptDisabled = Flags(rawValue: PVSCHED_FLAG_PREEMPT_DISABLED)
        public static let rtTaskRunning = Flags(rawValue: PVSCHED_FLAG_RT_TASK_RUNNING)
        public static let boostRequest = Flags(rawValue: PVSCHED_FLAG_BOOST_REQUEST)
        public static let idle = Flags(rawValue: PVSCHED_FLAG_IDLE)
        public static let known = Flags(rawValue: PVSCHED_FLAGS_KNOWN)
    }

    /// The scheduling class of the guest task running on the vCPU.
    public enum TaskPolicy: Equatable, Sendable {
        case normal(nice: Int8)
        case fifo(priority: UInt8)
        case rr(priority: UInt8)
        case idle
    }

    public var sequence: UInt32
    public var flags: Flags
    public var task: TaskPolicy
    /// Guest-clock time of the next latency-sensitive deadline, if any.
    public var nextDeadlineNs: UInt64?
    /// Guest-clock time when the guest last wrote this line.
    public var guestClockNs: UInt64

    public init(sequence: UInt32 = 0, flags: Flags = [], task: TaskPolicy = .normal(nice: 0),
                nextDeadlineNs: UInt64? = nil, guestClockNs: UInt64 = 0) {
        self.sequence = sequence; self.flags = flags; self.task = task
        self.nextDeadlineNs = nextDeadlineNs; self.guestClockNs = guestClockNs
    }

    /// Time left until the next deadline, measured on the guest clock at the last update.
    public var slackNs: UInt64? {
        guard let d = nextDeadlineNs else { return nil }
        return d > guestClockNs ? d - guestClockNs : 0
    }
}

/// The host's status of a vCPU, as published in the host-written line.
public enum HostVCPUStatus: UInt32, Sendable {
    case disabled = 0, normal = 1, boosted = 2, throttled = 3
}

/// A host view over a validated shared area in (guest) memory: consistent reads
/// of each vCPU's guest line and atomic writes of its host line.
///
/// The memory belongs to the VM; the view holds the memory's owner (guest
/// memory, a mapped file) strongly, so the mapping outlives every copy of it.
// @unchecked Sendable: `base` points into memory another party (the guest) writes
// concurrently; every access goes through atomics and the sequence counter.
public struct SharedArea: @unchecked Sendable {
    public let layout: SharedAreaLayout
    public let base: UnsafeMutableRawPointer
    /// Keeps the memory behind `base` mapped (nil when the caller guarantees it otherwise).
    public let owner: AnyObject?
    /// How many times a reader retries while the guest writes before giving up.
    public static let maxReadAttempts = 64

    /// Validates the header in `bytes` and returns a view over it.
    public init(validating bytes: UnsafeMutableRawBufferPointer, owner: AnyObject? = nil) throws(SharedAreaError) {
        self.layout = try SharedAreaLayout.validate(UnsafeRawBufferPointer(bytes))
        guard let base = bytes.baseAddress else { throw .areaTooSmall(size: 0, needed: Int(PVSCHED_REGION_HEADER_SIZE)) }
        self.base = base
        self.owner = owner
    }

    private func area(_ vcpu: Int) throws(SharedAreaError) -> UnsafeMutableRawPointer {
        guard vcpu >= 0, vcpu < layout.vcpuCount else {
            throw .vcpuIndexOutOfRange(index: vcpu, count: layout.vcpuCount)
        }
        return base + layout.vcpuOffset + vcpu * layout.vcpuStride
    }

    @inline(__always)
    private func atomic32(_ p: UnsafeMutableRawPointer, _ off: Int) -> UnsafeAtomic<UInt32> {
        UnsafeAtomic(at: (p + off).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
    }
    @inline(__always)
    private func atomic64(_ p: UnsafeMutableRawPointer, _ off: Int) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic(at: (p + off).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
    }

    /// Reads vCPU `vcpu`'s guest line under its sequence counter and validates it.
    /// Throws if the index is out of range, the counter never settles, or a field is invalid.
    public func read(vcpu: Int) throws(SharedAreaError) -> GuestVCPUState {
        let p = try area(vcpu)
        let seqAtomic = atomic32(p, PVSCHED_OFF_SEQ)
        for _ in 0..<Self.maxReadAttempts {
            let s1 = seqAtomic.load(ordering: .acquiring)
            if s1 & 1 == 1 { continue }
            let flags = atomic32(p, PVSCHED_OFF_FLAGS).load(ordering: .relaxed)
            let policy = atomic32(p, PVSCHED_OFF_TASK_POLICY).load(ordering: .relaxed)
            let prio = Int32(bitPattern: atomic32(p, PVSCHED_OFF_TASK_PRIORITY).load(ordering: .relaxed))
            let nice = Int32(bitPattern: atomic32(p, PVSCHED_OFF_TASK_NICE).load(ordering: .relaxed))
            let deadline = atomic64(p, PVSCHED_OFF_NEXT_DEADLINE).load(ordering: .relaxed)
            let clock = atomic64(p, PVSCHED_OFF_GUEST_CLOCK).load(ordering: .relaxed)
            atomicMemoryFence(ordering: .acquiring)
            let s2 = seqAtomic.load(ordering: .relaxed)
            guard s1 == s2 else { continue }
            return try Self.validated(vcpu: vcpu, seq: s1, flags: flags, policy: policy,
                                      priority: prio, nice: nice, deadline: deadline, clock: clock)
        }
        throw .sequenceNeverSettled(vcpu: vcpu, attempts: Self.maxReadAttempts)
    }

    static func validated(vcpu: Int, seq: UInt32, flags: UInt32, policy: UInt32, priority: Int32,
                          nice: Int32, deadline: UInt64, clock: UInt64) throws(SharedAreaError) -> GuestVCPUState {
        let unknown = flags & ~PVSCHED_FLAGS_KNOWN
        guard unknown == 0 else { throw .unknownFlags(vcpu: vcpu, bits: unknown) }
        let task: GuestVCPUState.TaskPolicy
        switch policy {
        case PVSCHED_TASK_NORMAL:
            guard priority == 0 else { throw .taskPriorityOutOfRange(vcpu: vcpu, policy: policy, found: priority) }
            guard nice >= PVSCHED_NICE_MIN, nice <= PVSCHED_NICE_MAX else { throw .taskNiceOutOfRange(vcpu: vcpu, found: nice) }
            task = .normal(nice: Int8(nice))
        case PVSCHED_TASK_FIFO, PVSCHED_TASK_RR:
            guard priority >= 1, priority <= PVSCHED_RT_PRIORITY_MAX else {
                throw .taskPriorityOutOfRange(vcpu: vcpu, policy: policy, found: priority)
            }
            guard nice == 0 else { throw .taskNiceOutOfRange(vcpu: vcpu, found: nice) }
            task = policy == PVSCHED_TASK_FIFO ? .fifo(priority: UInt8(priority)) : .rr(priority: UInt8(priority))
        case PVSCHED_TASK_IDLE:
            guard priority == 0 else { throw .taskPriorityOutOfRange(vcpu: vcpu, policy: policy, found: priority) }
            guard nice == 0 else { throw .taskNiceOutOfRange(vcpu: vcpu, found: nice) }
            task = .idle
        default:
            throw .taskPolicyInvalid(vcpu: vcpu, found: policy)
        }
        return GuestVCPUState(sequence: seq, flags: .init(rawValue: flags), task: task,
                              nextDeadlineNs: deadline == 0 ? nil : deadline, guestClockNs: clock)
    }

    /// vCPU `vcpu`'s sequence counter as it is now (a watcher's cheap "did it change?").
    public func sequence(vcpu: Int) -> UInt32? {
        guard let p = try? area(vcpu) else { return nil }
        return atomic32(p, PVSCHED_OFF_SEQ).load(ordering: .acquiring)
    }

    /// Publishes the host's view of vCPU `vcpu` in its host line.
    public func publish(vcpu: Int, status: HostVCPUStatus, boostCount: UInt64, boostedNs: UInt64,
                        throttleCount: UInt64) throws(SharedAreaError) {
        let p = try area(vcpu)
        atomic64(p, PVSCHED_OFF_BOOST_COUNT).store(boostCount, ordering: .relaxed)
        atomic64(p, PVSCHED_OFF_BOOSTED_NS).store(boostedNs, ordering: .relaxed)
        atomic64(p, PVSCHED_OFF_THROTTLE_COUNT).store(throttleCount, ordering: .relaxed)
        atomic32(p, PVSCHED_OFF_HOST_STATUS).store(status.rawValue, ordering: .releasing)
    }
}
