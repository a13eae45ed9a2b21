import Testing
@testable import PVSchedBPF

@Suite struct InterpreterTests {
    @Test func divisionAndModuloByZeroFollowRFC9669() throws {
        #expect(try run([A.mov(0, 7), A.mov(1, 0), A.alur(A.div, 0, 1), A.exit]) == 0)
        #expect(try run([A.mov(0, 7), A.mov(1, 0), A.alur(A.mod, 0, 1), A.exit]) == 7)
        // 32-bit modulo by zero keeps the low half and zeroes the upper half.
        #expect(try run(A.lddw(0, .max) + [A.mov(1, 0), A.alur(A.mod, 0, 1, wide: false), A.exit]) == 0xFFFF_FFFF)
        // A constant zero divisor is rejected by the verifier; unverified, it still has the defined result.
        #expect(try run(A.lddw(0, .max) + [A.alu(A.div, 0, imm: 0, wide: false), A.exit], verify: false) == 0)
    }

    @Test func signedDivisionAndOverflow() throws {
        let minus7 = UInt64(bitPattern: -7)
        #expect(try run(A.lddw(0, minus7) + [A.alu(A.div, 0, imm: 2, off: 1), A.exit]) == UInt64(bitPattern: -3))
        #expect(try run(A.lddw(0, minus7) + [A.alu(A.mod, 0, imm: 2, off: 1), A.exit]) == UInt64(bitPattern: -1))
        let min = UInt64(bitPattern: Int64.min)
        #expect(try run(A.lddw(0, min) + [A.alu(A.div, 0, imm: -1, off: 1), A.exit]) == min)
        #expect(try run(A.lddw(0, min) + [A.alu(A.mod, 0, imm: -1, off: 1), A.exit]) == 0)
    }

    @Test func shiftsAreMasked() throws {
        #expect(try run([A.mov(0, 1), A.mov(1, 65), A.alur(A.lsh, 0, 1), A.exit]) == 2)
        #expect(try run([A.mov(0, 1), A.mov(1, 33), A.alur(A.lsh, 0, 1, wide: false), A.exit]) == 2)
        #expect(try run([A.mov(0, -16), A.alu(A.arsh, 0, imm: 2), A.exit]) == UInt64(bitPattern: -4))
        #expect(try run([A.mov(0, -16), A.alu(A.arsh, 0, imm: 2, wide: false), A.exit]) == 0xFFFF_FFFC)
    }

    @Test func signExtendingMovesLoadsAndByteSwaps() throws {
        #expect(try run([A.mov(1, 0xFF), A.alur(A.movc, 0, 1, off: 8), A.exit]) == .max)
        #expect(try run([A.mov(1, 0x8000), A.alur(A.movc, 0, 1, wide: false, off: 16), A.exit]) == 0xFFFF_8000)
        #expect(try run([A.mov(1, -1), A.alur(A.movc, 0, 1, wide: false), A.exit]) == 0xFFFF_FFFF)
        #expect(try run(A.lddw(0, 0x0102_0304_0506_0708) + [A.alu(A.end, 0, imm: 64), A.exit]) == 0x0807_0605_0403_0201)
        #expect(try run([A.mov(0, 0x1234_5678), .init(opcode: 0xDC, dst: 0, imm: 16), A.exit]) == 0x7856)
        #expect(try run(A.lddw(0, 0x1_2345_6789) + [.init(opcode: 0xD4, dst: 0, imm: 32), A.exit]) == 0x2345_6789)
        #expect(try run([A.st(BPF.b, 10, -1, -2), A.ldx(BPF.b, 0, 10, -1, signed: true), A.exit]) == UInt64(bitPattern: -2))
        #expect(try run([A.st(BPF.h, 10, -2, -2), A.ldx(BPF.h, 0, 10, -2), A.exit]) == 0xFFFE)
    }

    @Test func atomics() throws {
        #expect(try run([A.st(BPF.dw, 10, -8, 5), A.mov(1, 3), A.atomic(BPF.dw, 10, -8, 1, 0x01),
                         A.ldx(BPF.dw, 0, 10, -8), A.alur(A.mul, 0, 1), A.exit]) == 40)  // 8 * old 5
        #expect(try run([A.st(BPF.dw, 10, -8, 8), A.mov(0, 8), A.mov(1, 20), A.atomic(BPF.dw, 10, -8, 1, 0xF1),
                         A.ldx(BPF.dw, 2, 10, -8), A.alur(A.add, 0, 2), A.exit]) == 28)
        #expect(try run([A.st(BPF.w, 10, -4, 0xF0), A.mov(1, 0x0F), A.atomic(BPF.w, 10, -4, 1, 0x40),
                         A.mov(1, 0xFF), A.atomic(BPF.w, 10, -4, 1, 0xE1), A.movr(0, 1), A.exit]) == 0xFF)
    }

    @Test func jump32ComparesTheLowHalf() throws {
        #expect(try run(A.lddw(0, 1 << 32) + [A.jmp(A.jeq, 0, imm: 0, 1, wide: false), A.mov(0, 9), A.exit]) == 1 << 32)
        #expect(try run([A.mov(0, -1), A.jmp(A.jsgt, 0, imm: 0, 1), A.mov(0, 3), A.exit]) == 3)
        #expect(try run([A.mov(0, -1), A.jmp(A.jgt, 0, imm: 0, 1), A.mov(0, 3), A.exit]) == .max)
    }

    @Test func localCallsSaveCalleeSavedRegisters() throws {
        let code: [Instruction] = [
            A.mov(6, 100), A.mov(1, 21), A.callLocal(2), A.alur(A.add, 0, 6), A.exit,
            A.mov(6, 7), A.movr(0, 1), A.alu(A.mul, 0, imm: 2), A.exit,
        ]
        #expect(try run(code) == 142)
    }

    @Test func budgetStopsARunawayProgram() {
        #expect(throws: BPFError.budgetExceeded(1000)) { try run([A.mov(0, 0), A.ja(-2)], verify: false, budget: 1000) }
    }

    @Test func unverifiedWildAccessIsStoppedAtRunTime() {
        do {
            // A fixed low address: never inside the context, the stack or a map value.
            _ = try run(A.lddw(1, 0x1000) + [A.ldx(BPF.dw, 0, 1, 0), A.exit], verify: false)
            Issue.record("the wild read ran")
        } catch let error as BPFError {
            guard case .runtime(let pc, let reason) = error else { Issue.record("\(error)"); return }
            #expect(pc == 2)  // names the faulting instruction (after the two-slot lddw)
            #expect(reason.contains("outside the context"))
        } catch { Issue.record("\(error)") }
    }

    @Test func hexProgramsParse() throws {
        let p = try Program.fromHex("b7 00 00 00 2a 00 00 00\n95 00 00 00 00 00 00 00")
        #expect(p.instructions == [A.mov(0, 42), A.exit])
        #expect(throws: BPFError.self) { try Program.fromHex("b700") }
    }
}
