import Testing
@testable import PVSchedBPF

@Suite struct VerifierTests {
    let valueMap = try! BPFMap(MapDefinition(name: "values", kind: .hash, keySize: 4, valueSize: 8, maxEntries: 4))

    /// Expects `code` to be rejected at instruction `pc` with `text` in the reason.
    func rejects(_ code: [Instruction], at pc: Int, _ text: String, ctxSize: Int = 80, writable: Bool = false,
                 sourceLocation: SourceLocation = #_sourceLocation) {
        let p = Program(instructions: code, maps: [valueMap])
        do {
            try Verifier(program: p, context: ContextDescription(size: ctxSize, writable: writable)).verify()
            Issue.record("accepted", sourceLocation: sourceLocation)
        } catch {
            guard case .rejected(let at, _, let reason) = error else { Issue.record("\(error)", sourceLocation: sourceLocation); return }
            #expect(at == pc, "\(error)", sourceLocation: sourceLocation)
            #expect(reason.contains(text), "\(error)", sourceLocation: sourceLocation)
            #expect(error.description.contains("instruction \(pc) ("), sourceLocation: sourceLocation)
        }
    }

    @Test func structuralErrors() {
        rejects([A.mov(0, 0), A.exit, A.mov(0, 1), A.exit], at: 2, "unreachable instruction")
        rejects([A.ja(5), A.exit], at: 0, "jump out of range")
        rejects([A.mov(0, 0)], at: 0, "falls through the end")
        rejects([A.mov(0, 0), A.jmp(A.jeq, 0, imm: 0, 1)] + A.lddw(1, 5) + [A.exit], at: 1, "middle of ldimm64")
        rejects([.init(opcode: 0xFF), A.exit], at: 0, "invalid ALU opcode")
        rejects([A.mov(0, 1), A.alu(A.lsh, 0, imm: 64), A.exit], at: 1, "invalid shift 64")
        rejects([A.mov(0, 1), A.alu(A.rsh, 0, imm: 32, wide: false), A.exit], at: 1, "invalid shift 32")
        rejects([A.mov(0, 1), A.alu(A.mod, 0, imm: 0), A.exit], at: 1, "division by zero")
        rejects([A.alu(A.movc, 0, imm: 1, off: 8), A.exit], at: 0, "reserved fields")
    }

    @Test func boundedLoopsAreAcceptedUnboundedOnesAreNot() throws {
        // r0 = 0; do r0 += 1 while r0 < 10; exit — bounded: its counter is known.
        let counted = [A.mov(0, 0), A.alu(A.add, 0, imm: 1), A.jmp(A.jlt, 0, imm: 10, -2), A.exit]
        try Verifier(program: Program(instructions: counted), context: ContextDescription(size: 8, writable: false)).verify()
        var ctx = [UInt8](repeating: 0, count: 8)
        #expect(try ctx.withUnsafeMutableBytes { try Interpreter(program: Program(instructions: counted)).run(context: $0) } == 10)
        // r0 = 0; while r0 != 1 {}: the same state forever.
        rejects([A.mov(0, 0), A.jmp(A.jeq, 0, imm: 1, 1), A.ja(-2), A.exit], at: 1, "infinite loop")
        // w2 = 64; do w2 = -w2 while w2 != 1: the state cycles through two values, forever
        // (found by FuzzBPFProgram: accepted, its compiled code never returned).
        rejects([A.alu(A.movc, 2, imm: 64, wide: false), A.alu(A.neg, 2, imm: 0, wide: false), A.jmp(A.jeq, 2, imm: 1, 1, wide: false),
                 A.ja(-3), A.mov(0, 0), A.exit], at: 1, "infinite loop")
        // goto with reserved fields set (the fuzzer's variant had src 5, dst 6 and an imm).
        rejects([Instruction(opcode: 0x05, dst: 6, src: 5, offset: 0, imm: 0x5672_E0FF), A.mov(0, 0), A.exit], at: 0, "reserved fields")
        // A loop on a value the verifier does not know (read from the context): not provably bounded...
        let unknown = [A.ldx(BPF.dw, 2, 1, 0), A.mov(0, 0), A.alu(A.add, 0, imm: 1), A.jmpr(A.jlt, 0, 2, -2), A.exit]
        rejects(unknown, at: 2, "could not be proven bounded")
        // ...unless loaded with the runtime budget as the guarantee.
        let p = Program(instructions: unknown)
        try Verifier(program: p, context: ContextDescription(size: 80, writable: false), allowUnprovenLoops: true).verify()
        var big = [UInt8](repeating: 0xFF, count: 80)
        #expect(throws: BPFError.budgetExceeded(1000)) {
            try big.withUnsafeMutableBytes { try Interpreter(program: p, instructionBudget: 1000).run(context: $0) }
        }
    }

    @Test func registersAndStack() {
        rejects([A.movr(0, 2), A.exit], at: 0, "r2 is read before it is initialized")
        rejects([A.exit], at: 0, "r0 is read before it is initialized")
        rejects([A.ldx(BPF.dw, 0, 10, -8), A.exit], at: 0, "read of uninitialized stack")
        rejects([A.st(BPF.w, 10, -4, 1), A.ldx(BPF.dw, 0, 10, -8), A.exit], at: 1, "read of uninitialized stack")
        rejects([A.st(BPF.dw, 10, 8, 1), A.mov(0, 0), A.exit], at: 0, "outside the 512-byte stack")
        rejects([A.st(BPF.dw, 10, -520, 1), A.mov(0, 0), A.exit], at: 0, "outside the 512-byte stack")
        rejects([A.mov(10, 0), A.mov(0, 0), A.exit], at: 0, "read-only")
        rejects([A.movr(0, 1), A.exit], at: 1, "must return a scalar")
    }

    @Test func contextAccess() {
        rejects([A.ldx(BPF.w, 0, 1, 80), A.exit], at: 0, "outside the 80-byte context")
        rejects([A.ldx(BPF.w, 0, 1, -4), A.exit], at: 0, "outside the 80-byte context")
        rejects([A.st(BPF.w, 1, 0, 1), A.mov(0, 0), A.exit], at: 0, "read-only context")
        rejects([A.ldx(BPF.w, 0, 1, 2), A.exit], at: 0, "misaligned")
        rejects([A.alu(A.mul, 1, imm: 2), A.mov(0, 0), A.exit], at: 0, "arithmetic on a context pointer")
    }

    @Test func mapsAndHelpers() {
        let lookup = [A.st(BPF.w, 10, -4, 0), A.movr(2, 10), A.alu(A.add, 2, imm: -4)] + A.ldmap(1, 0) + [A.call(1)]
        rejects(lookup + [A.ldx(BPF.dw, 0, 0, 0), A.exit], at: 6, "possible NULL dereference")
        rejects(lookup + [A.jmp(A.jeq, 0, imm: 0, 2), A.ldx(BPF.dw, 0, 0, 8), A.exit, A.exit], at: 7, "outside its 8-byte value")
        rejects([A.call(999), A.exit], at: 0, "unknown helper 999")
        rejects(A.ldmap(1, 0) + [A.movr(2, 10), A.alu(A.add, 2, imm: -4), A.call(1), A.mov(0, 0), A.exit],
                at: 4, "read of uninitialized stack")
        rejects(A.ldmap(1, 3) + [A.mov(0, 0), A.exit], at: 0, "unknown map 3")
    }

    @Test func acceptsCheckedLookupsAndForwardBranchesThatShareATail() throws {
        let code = [A.st(BPF.w, 10, -4, 0), A.movr(2, 10), A.alu(A.add, 2, imm: -4)] + A.ldmap(1, 0) + [A.call(1),
            A.mov(6, 0), A.jmp(A.jeq, 0, imm: 0, 1), A.ldx(BPF.dw, 6, 0, 0), A.movr(0, 6), A.exit]
        let p = Program(instructions: code, maps: [valueMap])
        try Verifier(program: p, context: ContextDescription(size: 80, writable: false)).verify()
        // A backward jump that is not a loop (as clang emits for shared tails) is fine.
        let tail: [Instruction] = [A.mov(0, 1), A.ja(2), A.mov(0, 2), A.exit, A.jmp(A.jeq, 0, imm: 1, -3), A.exit]
        try Verifier(program: Program(instructions: tail), context: ContextDescription(size: 8, writable: false)).verify()
    }
}
