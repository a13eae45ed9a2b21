import Foundation
import Synchronization
import Testing
@testable import PVSchedBPF

/// The one opcode table (`Decoder`), the text of decoded instructions, the budget
/// charged per straight run, and the per-thread run block.
@Suite struct DecodedProgramTests {
    func decode(_ code: [Instruction], maps: [BPFMap] = []) -> DecodedProgram {
        DecodedProgram(Program(instructions: code, maps: maps))
    }

    @Test func opcodesDecodeToTheirOperations() {
        let cases: [(Instruction, BPFOperation)] = [
            (A.mov(0, 1), .mov64), (A.alu(A.add, 0, imm: 1, wide: false), .add32), (A.alur(A.add, 0, 1), .add64),
            (A.alu(A.div, 0, imm: 2, off: 1), .sdiv64), (A.alu(A.mod, 0, imm: 2, wide: false, off: 1), .smod32),
            (A.alur(A.movc, 0, 1, off: 8), .movsx8To64), (A.alur(A.movc, 0, 1, wide: false, off: 16), .movsx16To32),
            (A.alu(A.neg, 0, imm: 0), .neg64), (A.alu(A.end, 0, imm: 64), .bswap64),
            (.init(opcode: 0xDC, dst: 0, imm: 16), .be16), (.init(opcode: 0xD4, dst: 0, imm: 32), .le32),
            (A.jmp(A.jsle, 1, imm: 0, 0), .jsle), (A.jmpr(A.jset, 1, 2, 0, wide: false), .jset32), (A.ja(0), .ja),
            (A.ldx(BPF.h, 0, 1, 0), .load16), (A.ldx(BPF.w, 0, 1, 0, signed: true), .loadSigned32),
            (A.st(BPF.b, 10, -1, 3), .store8), (A.stx(BPF.dw, 10, -8, 1), .store64),
            (A.atomic(BPF.w, 10, -4, 1, 0x01), .atomic32), (A.call(5), .callHelper), (A.callLocal(0), .callLocal), (A.exit, .exit),
        ]
        for (raw, op) in cases {
            let d = decode([raw, A.exit])
            #expect(d.instructions[0].operation == op, "\(raw.encoded) decoded as \(d.instructions[0].operation)")
        }
        #expect(decode(A.lddw(1, 0x1_0000_0002) + [A.exit]).instructions[0].imm == 0x1_0000_0002)
        // Immediate operands are sign-extended once; register forms read the register.
        let k = decode([A.alu(A.add, 0, imm: -1), A.exit]).instructions[0]
        #expect(k.imm == .max && !k.operandIsRegister && k.src == DecodedInstruction.zeroSlot)
        let x = decode([A.alur(A.add, 0, 3), A.exit]).instructions[0]
        #expect(x.imm == 0 && x.operandIsRegister && x.src == 3)
    }

    @Test func malformedInstructionsBecomeTrapsWithAReason() {
        let cases: [(Instruction, String)] = [
            (.init(opcode: 0xFF), "invalid ALU opcode"), (.init(opcode: 0x8D), "callx"), (.init(opcode: 0x9D), "invalid opcode 0x9d"),
            (.init(opcode: 0xE5), "invalid jump opcode"), (.init(opcode: 0x20), "legacy packet loads"),
            (.init(opcode: 0xD7, imm: 12), "byte swap width 12"), (A.atomic(BPF.b, 10, -1, 1, 0), "32- or 64-bit"),
            (A.atomic(BPF.dw, 10, -8, 1, 0x02), "invalid atomic operation 0x2"), (A.mov(10, 0), "r10 is read-only"),
            (.init(opcode: 0xB7, dst: 12), "bad register r12"),
        ]
        for (raw, reason) in cases {
            let d = decode([raw, A.exit])
            #expect(d.instructions[0].operation == .trap)
            #expect(d.problem(at: 0)?.contains(reason) == true, "\(raw.encoded): \(d.problem(at: 0) ?? "no problem")")
        }
        // The slot after the end, and a 16-byte load's second half, trap too.
        let d = decode(A.lddw(0, 1) + [A.exit])
        #expect(d.instructions.count == 4)
        #expect(d.problem(at: 1)?.contains("second half") == true)
        #expect(d.problem(at: 3) == "jumped outside the program")
        // Jumps outside the program land on that last trap.
        #expect(decode([A.ja(100), A.exit]).instructions[0].target == 2)
    }

    @Test func theDisassemblerReadsTheDecodedForm() throws {
        let map = try BPFMap(MapDefinition(name: "counts", kind: .array, keySize: 4, valueSize: 8, maxEntries: 2))
        let code = [A.ldx(BPF.w, 2, 1, 4), A.jmp(A.jne, 2, imm: 8, 2, wide: false)] + A.ldmap(1, 0)
            + [A.alur(A.add, 0, 2, wide: false), A.atomic(BPF.dw, 10, -8, 1, 0x01), A.call(1), A.exit]
        let d = decode(code, maps: [map])
        let text = (0..<code.count).filter { $0 != 3 }.map { d.text(at: $0, mapNames: ["counts"]) }
        #expect(text == ["r2 = *(u32 *)(r1 + 4)", "if w2 != 8 goto pc+2", "r1 = map[0] 'counts' ll", "w0 += w2",
                         "lock fetch_add *(u64 *)(r10 - 8), r1", "call bpf_map_lookup_elem#1", "exit"])
        #expect(Instruction(opcode: 0x8D).description.contains("callx"))
    }

    @Test func theBudgetIsChargedExactlyPerStraightRun() throws {
        // r0 = 0; do r0 += 1 while r0 < 100; exit: 1 + 2 × 100 + 1 = 202 instructions.
        let loop = [A.mov(0, 0), A.alu(A.add, 0, imm: 1), A.jmp(A.jlt, 0, imm: 100, -2), A.exit]
        #expect(try run(loop, verify: false, budget: 202) == 100)
        #expect(throws: BPFError.budgetExceeded(201)) { try run(loop, verify: false, budget: 201) }
        // A straight run longer than the budget is stopped where it leaves, at exit.
        let straight = [A.mov(0, 1)] + Array(repeating: A.alu(A.add, 0, imm: 1), count: 50) + [A.exit]
        #expect(throws: BPFError.budgetExceeded(10)) { try run(straight, verify: false, budget: 10) }
        #expect(try run(straight, verify: false, budget: 52) == 51)
    }

    @Test func aRunNestedInAnotherOnTheSameThreadHasItsOwnMemory() throws {
        // The inner program writes its stack; the outer one must still find its own value.
        let inner = Interpreter(program: Program(instructions: [A.st(BPF.dw, 10, -8, 99), A.ldx(BPF.dw, 0, 10, -8), A.exit]))
        let innerResult = Mutex<UInt64>(0)
        let fmt = Array("x\0".utf8)
        let outerCode = [A.st(BPF.dw, 10, -16, 7),
                         A.st(BPF.b, 10, -2, Int32(fmt[0])), A.st(BPF.b, 10, -1, 0),
                         A.movr(1, 10), A.alu(A.add, 1, imm: -2), A.mov(2, 2), A.mov(3, 0), A.mov(4, 0), A.mov(5, 0),
                         A.call(6), A.ldx(BPF.dw, 0, 10, -16), A.exit]
        let outer = Interpreter(program: Program(instructions: outerCode), trace: { _ in
            var ctx = [UInt8](repeating: 0, count: 8)
            let r = (try? ctx.withUnsafeMutableBytes { try inner.run(context: $0) }) ?? 0
            innerResult.withLock { $0 = r }
        })
        var ctx = [UInt8](repeating: 0, count: 8)
        #expect(try ctx.withUnsafeMutableBytes { try outer.run(context: $0) } == 7)
        #expect(innerResult.withLock { $0 } == 99)
    }

    @Test func threadsRunOneInterpreterAtOnce() throws {
        // r0 = *(u64 *)(r1 + 0) * 3, on every thread's own context, with the stack in between.
        let code = [A.ldx(BPF.dw, 2, 1, 0), A.stx(BPF.dw, 10, -8, 2), A.ldx(BPF.dw, 0, 10, -8), A.alu(A.mul, 0, imm: 3), A.exit]
        let interpreter = Interpreter(program: Program(instructions: code))
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { t in
            var ctx = [UInt8](repeating: 0, count: 8)
            for k in 0..<20_000 {
                let v = UInt64(t * 1_000_000 + k)
                let r = ctx.withUnsafeMutableBytes { buf -> UInt64 in
                    buf.storeBytes(of: v, as: UInt64.self)
                    return (try? interpreter.run(context: buf)) ?? 0
                }
                if r != v * 3 { wrong.add(1, ordering: .relaxed) }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }
}
