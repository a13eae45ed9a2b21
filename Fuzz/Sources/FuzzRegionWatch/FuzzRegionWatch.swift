import PVSchedABI
import PVSchedAttach
import PVSchedCore
import PVSchedHost
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// libFuzzer target: the host side of the shared-memory transport (`RegionWatch`)
/// over a region a hostile guest rewrites, step by step and while it is read. The
/// input is a program: write bytes anywhere, write a valid header (any vCPU count
/// and generation), write a line through the seqlock or leave it mid-write, make
/// the memory go away (the truncated file), step the watch at a chosen time; the
/// same writes are also replayed by a second thread during the steps. Whatever the
/// bytes, a step must return, never crash, and a lost region must end disabled.
final class FuzzRegion: WatchedRegion, @unchecked Sendable {
    // @unchecked Sendable: the fuzzer's threads write the memory on purpose; the watch reads it through atomics.
    let bytes: UnsafeMutableRawBufferPointer
    let lost = Atomic(false)
    var faulted: Bool { lost.load(ordering: .acquiring) }
    let path = "fuzz-region"
    init(size: Int) { bytes = .allocate(byteCount: size, alignment: 4096); bytes.initializeMemory(as: UInt8.self, repeating: 0) }
    deinit { bytes.deallocate() }
}

/// An actuator that changes nothing (the fuzzer looks at the watch, not at threads).
final class NullActuator: Actuator {
    func apply(_ parameters: SchedulingParameters, to thread: ThreadID) throws(ActuatorError) {}
    func restore(_ thread: ThreadID) throws(ActuatorError) {}
    func restoreAll() {}
    func applied(to thread: ThreadID) -> SchedulingParameters? { nil }
}

let host = try! PVSchedHost(actuator: NullActuator())
let regionSize = 8192

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRegionWatch(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var input = UnsafeBufferPointer(start: data, count: size)[...]
    func byte() -> UInt8 { input.popFirst() ?? 0 }
    func u16() -> Int { Int(byte()) | Int(byte()) << 8 }
    let vcpus = Int(byte() % 4) + 1
    guard let link = try? host.link(name: "fuzz", vcpus: vcpus, driver: "latency-boost") else { return 0 }
    defer { link.release() }
    guard let binding = host.registry.binding(vm: link.handle.id) else { return 0 }
    for v in 0..<vcpus { binding.setThread(ThreadID(Int32(1000 + v)), vcpu: v) }
    let region = FuzzRegion(size: regionSize)
    let settings = RegionWatch.Settings(busyPollNs: 50_000, idlePollNs: 100_000, headerPollNs: 100_000)
    let watch = RegionWatch(region: region, link: link, status: binding, settings: settings, logger: .init(label: "fuzz"))
    // Writes the second thread replays while the watch steps.
    var replay: [(offset: Int, value: UInt8)] = []
    let running = Atomic(true)
    var now: UInt64 = 1_000_000_000
    var generation: UInt32 = 0
    var steps = 0
    while !input.isEmpty && steps < 256 {
        switch byte() % 8 {
        case 0:  // raw bytes anywhere
            let offset = u16() % regionSize, n = Int(byte() % 16)
            for i in 0..<n where offset + i < regionSize {
                let b = byte()
                region.bytes[offset + i] = b
                replay.append((offset + i, b))
            }
        case 1, 2:  // a step, some time later
            now &+= UInt64(u16()) * 1000
            let next = watch.step(now: now)
            precondition(next >= now || next == now, "a step asked to look again in the past")
            steps += 1
        case 3:  // a valid header for some vCPU count
            generation &+= 1
            let count = Int(byte() % 5)
            let w = SharedAreaWriterLite(base: region.bytes.baseAddress!)
            w.writeHeader(vcpus: max(count, 1), generation: generation)
        case 4:  // a line through the seqlock
            let v = Int(byte() % 4)
            let w = SharedAreaWriterLite(base: region.bytes.baseAddress!)
            w.writeLine(vcpu: v, flags: UInt32(byte()) | UInt32(byte()) << 8, policy: UInt32(byte() % 6),
                        priority: Int32(Int8(bitPattern: byte())), nice: Int32(Int8(bitPattern: byte())),
                        deadline: UInt64(u16()) * 1000, clock: now)
        case 5:  // a line left mid-write (odd sequence)
            let v = Int(byte() % 4)
            let seq = Int(PVSCHED_REGION_HEADER_SIZE) + v * Int(PVSCHED_VCPU_AREA_SIZE) + PVSCHED_OFF_SEQ
            if seq + 4 <= regionSize { region.bytes.storeBytes(of: UInt32(byte()) | 1, toByteOffset: seq, as: UInt32.self) }
        case 6:  // the memory goes away (what the SIGBUS guard leaves: zeros)
            region.bytes.initializeMemory(as: UInt8.self, repeating: 0)
            region.lost.store(true, ordering: .releasing)
        default:  // steps while a second thread replays the writes
            let writes = replay
            let r = region
            let scribbler = try? PVSchedCore.Thread {
                var k = 0
                while running.load(ordering: .relaxed) && !writes.isEmpty {
                    let (o, b) = writes[k % writes.count]
                    r.bytes[o] = b &+ UInt8(truncatingIfNeeded: k)
                    k += 1
                }
            }
            for _ in 0..<4 { now &+= 50_000; _ = watch.step(now: now); steps += 1 }
            running.store(false, ordering: .relaxed)
            scribbler?.join()
            running.store(true, ordering: .relaxed)
        }
    }
    _ = watch.step(now: now &+ 1_000_000)
    if region.faulted, case .disabled = watch.phase {} else if region.faulted {
        preconditionFailure("a lost region did not end disabled: \(watch.phase)")
    }
    watch.withdraw()
    return 0
}

/// Writes a region the way the guest module does, through the ABI header's own helpers.
struct SharedAreaWriterLite {
    let base: UnsafeMutableRawPointer
    func writeHeader(vcpus: Int, generation: UInt32) {
        let h = base.assumingMemoryBound(to: pvsched_region_header.self)
        h.pointee.magic = 0
        h.pointee.abi_version = UInt16(PVSCHED_ABI_VERSION)
        h.pointee.header_size = UInt16(PVSCHED_REGION_HEADER_SIZE)
        withUnsafeMutableBytes(of: &h.pointee.protocol_name) { name in
            name.initializeMemory(as: UInt8.self, repeating: 0)
            for (i, b) in String(cString: pvsched_protocol_latency_name()).utf8.enumerated() where i < name.count - 1 { name[i] = b }
        }
        h.pointee.protocol_major = UInt16(PVSCHED_PROTOCOL_LATENCY_MAJOR)
        h.pointee.protocol_minor = UInt16(PVSCHED_PROTOCOL_LATENCY_MINOR)
        h.pointee.vcpu_count = UInt16(vcpus)
        h.pointee.vcpu_stride = UInt16(PVSCHED_VCPU_AREA_SIZE)
        h.pointee.vcpu_offset = UInt32(PVSCHED_REGION_HEADER_SIZE)
        h.pointee.guest_generation = generation
        h.pointee.magic = PVSCHED_MAGIC
    }
    func writeLine(vcpu: Int, flags: UInt32, policy: UInt32, priority: Int32, nice: Int32, deadline: UInt64, clock: UInt64) {
        let g = (base + Int(PVSCHED_REGION_HEADER_SIZE) + vcpu * Int(PVSCHED_VCPU_AREA_SIZE)).assumingMemoryBound(to: pvsched_vcpu_guest.self)
        pvsched_guest_write_begin(g)
        g.pointee.flags = flags
        g.pointee.task_policy = policy
        g.pointee.task_priority = priority
        g.pointee.task_nice = nice
        g.pointee.next_deadline_ns = deadline
        g.pointee.guest_clock_ns = clock
        pvsched_guest_write_end(g)
    }
}
