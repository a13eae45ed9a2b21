import Testing
@testable import PVSchedBPF

/// A tiny assembler for test programs.
enum A {
    static func mov(_ d: UInt8, _ imm: Int32) -> Instruction { .init(opcode: 0xB7, dst: d, imm: imm) }
    static func movr(_ d: UInt8, _ s: UInt8) -> Instruction { .init(opcode: 0xBF, dst: d, src: s) }
    static func alu(_ code: UInt8, _ d: UInt8, imm: Int32, wide: Bool = true, off: Int16 = 0) -> Instruction {
        .init(opcode: code | (wide ? BPF.alu64 : BPF.alu), dst: d, offset: off, imm: imm)
    }
    static func alur(_ code: UInt8, _ d: UInt8, _ s: UInt8, wide: Bool = true, off: Int16 = 0) -> Instruction {
        .init(opcode: code | BPF.x | (wide ? BPF.alu64 : BPF.alu), dst: d, src: s, offset: off)
    }
    static func lddw(_ d: UInt8, _ v: UInt64) -> [Instruction] {
        [.init(opcode: BPF.ldImm64, dst: d, imm: Int32(bitPattern: UInt32(truncatingIfNeeded: v))),
         .init(opcode: 0, imm: Int32(bitPattern: UInt32(truncatingIfNeeded: v >> 32)))]
    }
    static func ldmap(_ d: UInt8, _ index: Int32) -> [Instruction] {
        [.init(opcode: BPF.ldImm64, dst: d, src: 1, imm: index), .init(opcode: 0)]
    }
    static func ldx(_ size: UInt8, _ d: UInt8, _ s: UInt8, _ off: Int16, signed: Bool = false) -> Instruction {
        .init(opcode: BPF.ldx | (signed ? BPF.memsx : BPF.mem) | size, dst: d, src: s, offset: off)
    }
    static func stx(_ size: UInt8, _ d: UInt8, _ off: Int16, _ s: UInt8) -> Instruction {
        .init(opcode: BPF.stx | BPF.mem | size, dst: d, src: s, offset: off)
    }
    static func st(_ size: UInt8, _ d: UInt8, _ off: Int16, _ imm: Int32) -> Instruction {
        .init(opcode: BPF.st | BPF.mem | size, dst: d, offset: off, imm: imm)
    }
    static func atomic(_ size: UInt8, _ d: UInt8, _ off: Int16, _ s: UInt8, _ op: Int32) -> Instruction {
        .init(opcode: BPF.stx | BPF.atomic | size, dst: d, src: s, offset: off, imm: op)
    }
    static func jmp(_ code: UInt8, _ d: UInt8, imm: Int32, _ off: Int16, wide: Bool = true) -> Instruction {
        .init(opcode: code | (wide ? BPF.jmp : BPF.jmp32), dst: d, offset: off, imm: imm)
    }
    static func jmpr(_ code: UInt8, _ d: UInt8, _ s: UInt8, _ off: Int16, wide: Bool = true) -> Instruction {
        .init(opcode: code | BPF.x | (wide ? BPF.jmp : BPF.jmp32), dst: d, src: s, offset: off)
    }
    static func ja(_ off: Int16) -> Instruction { .init(opcode: 0x05, offset: off) }
    static func call(_ helper: Int32) -> Instruction { .init(opcode: 0x85, imm: helper) }
    static func callLocal(_ rel: Int32) -> Instruction { .init(opcode: 0x85, src: 1, imm: rel) }
    static let exit = Instruction(opcode: 0x95)

    // ALU codes
    static let add: UInt8 = 0x00, sub: UInt8 = 0x10, mul: UInt8 = 0x20, div: UInt8 = 0x30, or: UInt8 = 0x40, and: UInt8 = 0x50
    static let lsh: UInt8 = 0x60, rsh: UInt8 = 0x70, neg: UInt8 = 0x80, mod: UInt8 = 0x90, xor: UInt8 = 0xA0, movc: UInt8 = 0xB0
    static let arsh: UInt8 = 0xC0, end: UInt8 = 0xD0
    // JMP codes
    static let jeq: UInt8 = 0x10, jgt: UInt8 = 0x20, jge: UInt8 = 0x30, jset: UInt8 = 0x40, jne: UInt8 = 0x50
    static let jsgt: UInt8 = 0x60, jsge: UInt8 = 0x70, jlt: UInt8 = 0xA0, jle: UInt8 = 0xB0, jslt: UInt8 = 0xC0, jsle: UInt8 = 0xD0
}

/// Runs `code` (verified against a `ctxSize`-byte writable context unless `verify` is false).
/// A verified program without maps also runs compiled to machine code, which must
/// give the same result or the same error as the interpreter.
func run(_ code: [Instruction], maps: [BPFMap] = [], ctx: [UInt8] = [UInt8](repeating: 0, count: 16),
         verify: Bool = true, budget: Int = 100_000) throws -> UInt64 {
    let p = Program(instructions: code, maps: maps)
    if verify { try Verifier(program: p, context: ContextDescription(size: ctx.count, writable: true)).verify() }
    func once(_ verified: Bool) -> Result<UInt64, BPFError> {
        var c = ctx
        let interpreter = Interpreter(program: p, instructionBudget: budget, verified: verified)
        return c.withUnsafeMutableBytes { buf in
            do throws(BPFError) { return .success(try interpreter.run(context: buf, contextWritable: true)) } catch { return .failure(error) }
        }
    }
    let interpreted = once(false)
    if verify && maps.isEmpty {
        #expect(once(true) == interpreted, "compiled code and the interpreter disagree on \(code.map(\.description))")
    }
    return try interpreted.get()
}
