import PVSchedABI
import PVSchedBPF

/// libFuzzer target: raw instructions through the verifier and, when it accepts
/// them, the interpreter (with a small budget); also the interpreter alone with
/// the verifier off, which must stay memory-safe by its own checks.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBPFProgram(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 8 else { return 0 }
    let insns = Instruction.decode(Array(UnsafeBufferPointer(start: data, count: size - size % 8)))
    let program = Program(instructions: insns)
    var blob = [UInt8](repeating: 0x5A, count: 64)
    let interpreter = Interpreter(program: program, instructionBudget: 2_000)
    if (try? Verifier(program: program, context: ContextDescription(size: blob.count, writable: true, memoryBlob: true)).verify()) != nil {
        _ = try? blob.withUnsafeMutableBytes { try interpreter.run(context: $0, contextWritable: true) }
    }
    _ = try? blob.withUnsafeMutableBytes { try interpreter.run(context: $0, contextWritable: true) }
    return 0
}
