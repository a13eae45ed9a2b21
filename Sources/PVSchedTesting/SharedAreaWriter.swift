import Atomics
import PVSchedABI
import PVSchedCore

/// Writes a shared area the way a guest does (header, then seqlocked guest lines),
/// through the ABI header's own C structs and helpers. For simulators, tests and
/// benchmarks that stand in for a guest; the real guest kernel uses the same header.
// @unchecked Sendable: it writes memory a host reader reads concurrently, by design, through the seqlock.
public struct SharedAreaWriter: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Bytes needed for `vcpus` areas with the default layout.
    public static func size(vcpus: Int) -> Int {
        Int(PVSCHED_REGION_HEADER_SIZE) + vcpus * Int(PVSCHED_VCPU_AREA_SIZE)
    }

    public init(base: UnsafeMutableRawPointer, size: Int) {
        self.base = base
        self.size = size
    }

    /// Writes a valid header for `vcpus` vCPUs speaking `protocolName` at `version`,
    /// the magic last (as a guest must: a host polling the region, like the ivshmem
    /// watcher, sees either no header or a whole one).
    public func writeHeader(vcpus: Int, protocolName: String = String(cString: pvsched_protocol_latency_name()),
                            version: ProtocolVersion = ProtocolVersion(major: UInt16(PVSCHED_PROTOCOL_LATENCY_MAJOR),
                                                                       minor: UInt16(PVSCHED_PROTOCOL_LATENCY_MINOR)),
                            generation: UInt32 = 0) {
        let h = base.assumingMemoryBound(to: pvsched_region_header.self)
        UnsafeAtomic<UInt32>(at: UnsafeMutableRawPointer(h).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .store(0, ordering: .releasing)
        (base + 4).initializeMemory(as: UInt8.self, repeating: 0, count: size - 4)
        h.pointee.abi_version = UInt16(PVSCHED_ABI_VERSION)
        h.pointee.header_size = UInt16(PVSCHED_REGION_HEADER_SIZE)
        withUnsafeMutableBytes(of: &h.pointee.protocol_name) { name in
            for (i, b) in protocolName.utf8.prefix(name.count - 1).enumerated() { name[i] = b }
        }
        h.pointee.protocol_major = version.major
        h.pointee.protocol_minor = version.minor
        h.pointee.vcpu_count = UInt16(vcpus)
        h.pointee.vcpu_stride = UInt16(PVSCHED_VCPU_AREA_SIZE)
        h.pointee.vcpu_offset = UInt32(PVSCHED_REGION_HEADER_SIZE)
        h.pointee.guest_generation = generation
        UnsafeAtomic<UInt32>(at: UnsafeMutableRawPointer(h).assumingMemoryBound(to: UInt32.AtomicRepresentation.self))
            .store(PVSCHED_MAGIC, ordering: .releasing)
    }

    /// The region header, to corrupt on purpose in tests.
    public var header: UnsafeMutablePointer<pvsched_region_header> {
        base.assumingMemoryBound(to: pvsched_region_header.self)
    }

    /// vCPU `i`'s area under the default layout.
    public func vcpu(_ i: Int) -> UnsafeMutablePointer<pvsched_vcpu_area> {
        (base + Int(PVSCHED_REGION_HEADER_SIZE) + i * Int(PVSCHED_VCPU_AREA_SIZE))
            .assumingMemoryBound(to: pvsched_vcpu_area.self)
    }

    /// Updates vCPU `i`'s guest line under its sequence counter.
    public func update(vcpu i: Int, _ body: (inout pvsched_vcpu_guest) -> Void) {
        let g = UnsafeMutableRawPointer(vcpu(i)).assumingMemoryBound(to: pvsched_vcpu_guest.self)
        pvsched_guest_write_begin(g)
        body(&g.pointee)
        pvsched_guest_write_end(g)
    }

    /// Sets vCPU `i`'s flags (and nothing else).
    public func setFlags(vcpu i: Int, _ flags: GuestVCPUState.Flags) {
        update(vcpu: i) { $0.flags = flags.rawValue }
    }
}

/// Page-aligned memory for a shared area owned by the caller (tests, simulators).
// @unchecked Sendable: the allocation is fixed for the object's life; access goes through `writer` or a SharedArea.
public final class SharedAreaBuffer: @unchecked Sendable {
    public let bytes: UnsafeMutableRawBufferPointer
    public let writer: SharedAreaWriter

    public init(vcpus: Int) {
        let size = SharedAreaWriter.size(vcpus: vcpus)
        bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        writer = SharedAreaWriter(base: bytes.baseAddress!, size: size)
        writer.writeHeader(vcpus: vcpus)
    }

    deinit { bytes.deallocate() }
}
