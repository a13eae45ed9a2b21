import PVSchedABI
import PVSchedCore

/// libFuzzer target: a guest's shared area (hostile guest memory) through header
/// validation and every vCPU's line read.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSharedArea(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(size, 1), alignment: 64)
    defer { buffer.deallocate() }
    buffer.copyMemory(from: UnsafeRawBufferPointer(start: data, count: size))
    let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size])
    guard let area = try? SharedArea(validating: bytes) else { return 0 }
    for v in -1...(area.layout.vcpuCount) { _ = try? area.read(vcpu: v) }
    return 0
}
