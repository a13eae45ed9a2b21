import Testing
@testable import PVSchedBPF

/// Compiled code (x86-64) against the interpreter: the same results, the same
/// errors, and the runtime checks still in force.
@Suite struct JITTests {
    static let compiles: Bool = {
        #if arch(x86_64)
        return Interpreter.compilerEnabled
        #else
        return false
        #endif
    }()

    /// Runs `code` interpreted and compiled (`verified: true` even when it is not,
    /// to reach the compiled code's own checks); returns both outcomes.
    func both(_ code: [Instruction], maps: [BPFMap] = [], ctx: [UInt8] = [UInt8](repeating: 0, count: 16),
              writable: Bool = true) -> (Result<UInt64, BPFError>, Result<UInt64, BPFError>, Bool) {
        let p = Program(instructions: code, maps: maps)
        func once(_ verified: Bool) -> (Result<UInt64, BPFError>, Bool) {
            var c = ctx
            let interpreter = Interpreter(program: p, verified: verified)
            let r = c.withUnsafeMutableBytes { buf -> Result<UInt64, BPFError> in
                do throws(BPFError) { return .success(try interpreter.run(context: buf, contextWritable: writable)) }
                catch { return .failure(error) }
            }
            return (r, interpreter.isCompiled)
        }
        let (i, _) = once(false)
        let (c, compiled) = once(true)
        return (i, c, compiled)
    }

    @Test(.enabled(if: compiles)) func verifiedDriversRunCompiled() throws {
        let driver = try BPFDriver(elf: try compileSamplePolicy())
        #expect(driver.interpreter.isCompiled)
        #expect(!Interpreter(program: driver.interpreter.program).isCompiled)
    }

    @Test(.enabled(if: compiles)) func generatedProgramsGiveTheSameResults() throws {
        var rng = Rng(s: 0x5EED_1234)
        var compared = 0
        for _ in 0..<3000 {
            var code = randomProgram(&rng)
            code.removeLast()  // exit: fold every register into r0 first
            for r in UInt8(1)...9 { code += [A.alu(A.mul, 0, imm: 31), A.alur(A.xor, 0, r)] }
            code.append(A.exit)
            let p = Program(instructions: code)
            guard (try? Verifier(program: p, context: ContextDescription(size: 16, writable: true)).verify()) != nil else { continue }
            let (i, c, compiled) = both(code)
            #expect(compiled)
            #expect(i == c, "\(code.map(\.description))")
            compared += 1
        }
        #expect(compared > 500)
    }

    @Test(.enabled(if: compiles)) func atomicsOnStackAndMapValues() throws {
        let map = try BPFMap(MapDefinition(name: "v", kind: .array, keySize: 4, valueSize: 16, maxEntries: 2))
        for op: Int32 in [0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xA0, 0xA1, 0xE1, 0xF1] {
            for size in [BPF.w, BPF.dw] {
                for (srcReg, r0) in [(UInt8(2), Int32(5)), (UInt8(0), Int32(0x7F))] {
                    // *(fp-8) = 0x1234_5678_9ABC_DEF0; r0 = r0; r2 = 0x0F0F; atomic op; r0 ^= r2 * 7 ^ *(fp-8) * 13
                    let code = A.lddw(3, 0x1234_5678_9ABC_DEF0) + [A.stx(BPF.dw, 10, -8, 3), A.mov(0, r0), A.mov(2, 0x0F0F),
                        A.atomic(size, 10, -8, srcReg, op), A.alu(A.mul, 2, imm: 7), A.alur(A.xor, 0, 2),
                        A.ldx(BPF.dw, 4, 10, -8), A.alu(A.mul, 4, imm: 13), A.alur(A.xor, 0, 4), A.exit]
                    let (i, c, _) = both(code)
                    #expect(i == c, "op 0x\(String(op, radix: 16)) size \(size) src r\(srcReg)")
                }
            }
        }
        // On a map value through a direct value reference: both see the same map, so run the compiled one second.
        let program = Program(instructions: [Instruction(opcode: BPF.ldImm64, dst: 1, src: 2, imm: 0), Instruction(opcode: 0, imm: 8),
                                             A.mov(2, 3), A.atomic(BPF.dw, 1, 0, 2, 0x01), A.movr(0, 2), A.exit], maps: [map])
        try Verifier(program: program, context: ContextDescription(size: 16, writable: false)).verify()
        var ctx = [UInt8](repeating: 0, count: 16)
        let interpreted = try ctx.withUnsafeMutableBytes { try Interpreter(program: program).run(context: $0) }
        let compiled = Interpreter(program: program, verified: true)
        #expect(compiled.isCompiled)
        let second = try ctx.withUnsafeMutableBytes { try compiled.run(context: $0) }
        #expect(interpreted == 0 && second == 3)
        #expect(map.words(at: 0) == [0, 6])
    }

    @Test(.enabled(if: compiles)) func theCompiledCodeChecksMemoryLikeTheInterpreter() throws {
        let map = try BPFMap(MapDefinition(name: "v", kind: .array, keySize: 4, valueSize: 8, maxEntries: 1))
        let valueRef = [Instruction(opcode: BPF.ldImm64, dst: 3, src: 2, imm: 0), Instruction(opcode: 0, imm: 0)]
        let programs: [([Instruction], Bool)] = [
            // Far outside every region: an address no allocation has (a context-relative one, such
            // as r1 + 4096, may land in the stack block allocated next to one run's context copy).
            ([Instruction(opcode: BPF.ldImm64, dst: 2, imm: 0x1000), Instruction(opcode: 0, imm: 0),
              A.ldx(BPF.dw, 0, 2, 0), A.exit], true),
            ([A.ldx(BPF.dw, 0, 1, 12), A.exit], true),                          // straddles the context's end
            ([A.st(BPF.w, 1, 0, 1), A.mov(0, 0), A.exit], false),               // read-only context
            ([A.st(BPF.dw, 10, 8, 1), A.mov(0, 0), A.exit], true),              // above this frame, still inside the block: allowed as in the interpreter
            ([A.movr(2, 10), A.alu(A.add, 2, imm: -5000), A.ldx(BPF.b, 0, 2, 0), A.exit], true),  // below the stacks
            (valueRef + [A.ldx(BPF.dw, 0, 3, 0), A.exit], true),                // a map value: allowed
            (valueRef + [A.ldx(BPF.dw, 0, 3, 4), A.exit], true),                // past its end
            ([A.mov(2, 1), A.atomic(BPF.dw, 10, -12, 2, 0x00), A.mov(0, 0), A.exit], true),  // misaligned atomic
        ]
        for (code, writable) in programs {
            let (i, c, compiled) = both(code, maps: [map], writable: writable)
            #expect(compiled)
            // The two runs use different copies of the context: compare the errors without addresses.
            func text(_ r: Result<UInt64, BPFError>) -> String {
                "\(r)".replacing(/0x[0-9a-f]+/, with: "ADDRESS")
            }
            #expect(text(i) == text(c), "\(code.map(\.description)): \(i) vs \(c)")
        }
    }

    @Test(.enabled(if: compiles)) func helperErrorsAndCallsMatch() throws {
        // A lookup whose key lies outside every region fails in the helper, with the interpreter's message.
        let map = try BPFMap(MapDefinition(name: "h", kind: .hash, keySize: 4, valueSize: 8, maxEntries: 4))
        let code = A.ldmap(1, 0) + [A.mov(2, 16), A.call(1), A.mov(0, 0), A.exit]
        let (i, c, _) = both(code, maps: [map])
        #expect(i == c)
        if case .failure(let e) = c { #expect(e.description.contains("not readable")) } else { Issue.record("no error") }
        // Local calls keep r6-r9 and give each frame its own stack.
        let calls = [A.mov(6, 6), A.mov(7, 7), A.st(BPF.dw, 10, -8, 100), A.callLocal(3), A.ldx(BPF.dw, 1, 10, -8),
                     A.alur(A.add, 0, 1), A.exit,
                     A.mov(6, 60), A.st(BPF.dw, 10, -8, 1), A.ldx(BPF.dw, 0, 10, -8), A.alur(A.add, 0, 6), A.exit]
        let program = Program(instructions: calls)
        try Verifier(program: program, context: ContextDescription(size: 16, writable: true)).verify()
        let (li, lc, _) = both(calls)
        #expect(li == lc && li == .success(161))
    }
}
