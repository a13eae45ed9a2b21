import PVSchedBPF

/// libFuzzer target: the ELF loader on arbitrary bytes (an object the daemon
/// receives over its control socket). Any trap is a bug; errors are fine.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzELFLoader(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    _ = try? ELFLoader.load(bytes)
    _ = try? ELFLoader.load(bytes, section: ".text")
    return 0
}
