import PVSchedABI
import PVSchedBPF

/// libFuzzer target: raw instructions through the verifier and, when it accepts
/// them, the interpreter (with a small budget) and the compiled code, which must
/// agree on the result and the memory; also the interpreter alone with the
/// verifier off, which must stay memory-safe by its own checks.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzBPFProgram(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 8 else { return 0 }
    let insns = Instruction.decode(Array(UnsafeBufferPointer(start: data, count: size - size % 8)))
    let program = Program(instructions: insns)
    var blob = [UInt8](repeating: 0x5A, count: 64)
    let interpreter = Interpreter(program: program, instructionBudget: 2_000)
    if (try? Verifier(program: program, context: ContextDescription(size: blob.count, writable: true, memoryBlob: true)).verify()) != nil {
        let interpreted = blob.withUnsafeMutableBytes { buf in Result { () throws(BPFError) in try interpreter.run(context: buf, contextWritable: true) } }
        var compiledBlob = [UInt8](repeating: 0x5A, count: 64)
        let compiler = Interpreter(program: program, instructionBudget: 2_000, verified: true)
        let compiled = compiledBlob.withUnsafeMutableBytes { buf in Result { () throws(BPFError) in try compiler.run(context: buf, contextWritable: true) } }
        // A program the budget stops has no compiled counterpart (the compiled code has no budget);
        // errors name addresses of different blobs, so only their kind is compared.
        // The clock and random-number helpers differ from run to run.
        let deterministic = !insns.contains { $0.opcode == 0x85 && $0.src == 0 && ($0.imm == 5 || $0.imm == 7) }
        if case .failure(.budgetExceeded) = interpreted {} else if deterministic {
            switch (interpreted, compiled) {
            case (.success(let a), .success(let b)):
                precondition(a == b && blob == compiledBlob, "compiled code and the interpreter disagree")
            case (.failure, .failure): break
            default: preconditionFailure("compiled code and the interpreter disagree: \(interpreted) vs \(compiled)")
            }
        }
        blob = [UInt8](repeating: 0x5A, count: 64)
    }
    _ = try? blob.withUnsafeMutableBytes { try interpreter.run(context: $0, contextWritable: true) }
    return 0
}
