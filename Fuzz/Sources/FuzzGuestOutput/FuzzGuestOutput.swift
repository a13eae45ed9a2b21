import PVSchedAttach
import PVSchedControl

/// libFuzzer target: what pvsched reads from a Linux guest and its VMM besides the
/// shared area: cyclictest's histogram from the guest console, and QEMU's
/// `query-cpus-fast` reply.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzGuestOutput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = UnsafeBufferPointer(start: data, count: size)
    if let out = try? CyclictestOutput.parse(String(decoding: bytes, as: UTF8.self)) {
        // What parses is in range and ordered.
        guard out.buckets.allSatisfy({ $0.0 <= CyclictestOutput.maxBucketUs && $0.1 <= CyclictestOutput.maxCount }),
              zip(out.buckets, out.buckets.dropFirst()).allSatisfy({ $0.0 < $1.0 }) else { fatalError("parsed out of range") }
    }
    if let json = try? JSON.parse(Array(bytes)), let t = try? VCPUThreads.decode(queryCpusFast: json, pid: 1, isThread: { _ in true }) {
        guard !t.vcpus.isEmpty, t.vcpus.count <= 1024, t.vcpus.allSatisfy({ $0 > 0 }) else { fatalError("decoded out of range") }
    }
    return 0
}
