import PVSchedControl
import PVSchedCore

/// libFuzzer target: the daemon's control-request parser (JSON, envelope, and
/// typed parameters as the methods read them).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzControlRequest(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    // Whatever parses encodes to JSON that parses back to the same value.
    if let json = try? JSON.parse(bytes) {
        guard let again = try? JSON.parse(json.encoded), again == json else { fatalError("encode/parse round trip differs") }
    }
    guard case .success(let request) = ControlRequest.parse(bytes) else { return 0 }
    var p = request.params
    _ = try? p.optionalString("vm")
    _ = try? p.int("vcpus", in: 1...16, default: 1)
    _ = try? p.optionalDouble("maxVMShare", in: 0...1)
    _ = try? p.bool("force", default: false)
    _ = try? p.intArray("threads", count: 1...256, in: 1...Int64(Int32.max))
    // A boost class (vm.attach's "boost"): whatever parses writes back to the same class.
    if let text = try? p.optionalString("boost"), let parsed = BoostSettings.parseClass(text) {
        guard BoostSettings.parseClass(BoostSettings.classText(parsed)) == parsed else { fatalError("boost class round trip differs") }
    }
    _ = try? p.finish()
    _ = ControlResponse.success(id: request.id, result: .object(["method": .string(request.method)]))
    return 0
}
