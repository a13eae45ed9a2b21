/// What an instruction does, decoded once from its opcode, offset and immediate:
/// one case per operation and width, so that neither the interpreter nor the
/// verifier nor the disassembler reads opcode bits again. This enum and
/// `Decoder` are the project's one opcode table.
public enum BPFOperation: UInt8, CaseIterable, Sendable {
    // 64-bit ALU (BPF_ALU64)
    case add64, sub64, mul64, div64, sdiv64, or64, and64, lsh64, rsh64, neg64, mod64, smod64, xor64
    case mov64, movsx8To64, movsx16To64, movsx32To64, arsh64, bswap16, bswap32, bswap64
    // 32-bit ALU (BPF_ALU): operands are the low halves, results are zero-extended
    case add32, sub32, mul32, div32, sdiv32, or32, and32, lsh32, rsh32, neg32, mod32, smod32, xor32
    case mov32, movsx8To32, movsx16To32, arsh32, le16, le32, le64, be16, be32, be64
    // jumps: `ja` always, conditions on 64-bit (BPF_JMP) or 32-bit (BPF_JMP32) values
    case ja, jeq, jgt, jge, jset, jne, jsgt, jsge, jlt, jle, jslt, jsle
    case jeq32, jgt32, jge32, jset32, jne32, jsgt32, jsge32, jlt32, jle32, jslt32, jsle32
    case callHelper, callLocal, exit
    // memory: loads (zero- or sign-extending), stores of a register or an immediate, atomics
    case load8, load16, load32, load64, loadSigned8, loadSigned16, loadSigned32
    case store8, store16, store32, store64
    case atomic32, atomic64
    // the first slot of a 16-byte load: a constant, a map, or the address of an array map's value
    case loadImm64, loadMap, loadMapValue
    /// An instruction that cannot run (its reason is in `DecodedProgram.problems`):
    /// running it is a runtime error, and the verifier rejects it.
    case trap

    /// The group an operation belongs to.
    public enum Group: Sendable { case alu64, alu32, jump, call, exit, load, store, atomic, loadImm64, trap }

    public var group: Group {
        switch rawValue {
        case ...BPFOperation.bswap64.rawValue: return .alu64
        case ...BPFOperation.be64.rawValue: return .alu32
        case ...BPFOperation.jsle32.rawValue: return .jump
        case BPFOperation.callHelper.rawValue, BPFOperation.callLocal.rawValue: return .call
        case BPFOperation.exit.rawValue: return .exit
        case ...BPFOperation.loadSigned32.rawValue: return .load
        case ...BPFOperation.store64.rawValue: return .store
        case ...BPFOperation.atomic64.rawValue: return .atomic
        case ...BPFOperation.loadMapValue.rawValue: return .loadImm64
        default: return .trap
        }
    }

    /// Whether a jump compares 64-bit values (false for BPF_JMP32 conditions).
    public var isWideCondition: Bool { rawValue <= BPFOperation.jsle.rawValue }

    /// A BPF_JMP32 condition's 64-bit counterpart (jeq32 → jeq); any other operation itself.
    public var wideCondition: BPFOperation {
        isWideCondition || group != .jump ? self : BPFOperation(rawValue: rawValue - BPFOperation.jeq32.rawValue + BPFOperation.jeq.rawValue)!
    }

    /// Bytes a load, store or atomic operation accesses (0 for others).
    public var accessSize: Int {
        switch self {
        case .load8, .loadSigned8, .store8: return 1
        case .load16, .loadSigned16, .store16: return 2
        case .load32, .loadSigned32, .store32, .atomic32: return 4
        case .load64, .store64, .atomic64: return 8
        default: return 0
        }
    }
}

/// One decoded instruction. `dst` and `src` are register numbers; the operand of
/// an ALU operation, a condition or a store is `reg[src] & srcMask | imm`, which
/// is the register for register forms (`srcMask` all ones, `imm` 0) and the
/// sign-extended immediate for immediate forms (`srcMask` 0, and `src` the
/// always-zero slot `zeroSlot`, so that the read depends on no recent write), so
/// the interpreter needs no branch for it.
public struct DecodedInstruction: Equatable, Sendable {
    public var operation: BPFOperation
    public var dst: UInt8
    public var src: UInt8
    /// Memory offset of loads, stores and atomics.
    public var offset: Int16
    /// Jumps and local calls: the destination's index. Helper calls: the helper id.
    /// Atomics: the operation (RFC 9669 §5.3). loadMap/loadMapValue: the map's index.
    /// Traps: the index of the reason in `DecodedProgram.problems`.
    public var target: Int32
    /// The immediate operand, sign-extended (0 for register forms); loadImm64's
    /// value; loadMapValue's offset into the value.
    public var imm: UInt64
    public var srcMask: UInt64

    /// Whether the operand is the register `src` (not the immediate).
    public var operandIsRegister: Bool { srcMask != 0 }

    /// The register slot after r10, always zero: `src` of immediate forms.
    public static let zeroSlot: UInt8 = 11
}

/// A program decoded once, at load: `instructions[k]` is the raw instruction k
/// decoded (the second slot of a 16-byte load and every malformed instruction
/// decode to `.trap`), followed by one more `.trap` that a program running off
/// its end, or jumping outside it, lands on.
public struct DecodedProgram: Sendable {
    public let instructions: [DecodedInstruction]
    public let raw: [Instruction]
    /// Why each trap cannot run (indexed by the trap's `target`).
    public let problems: [String]

    public init(_ program: Program) {
        var decoder = Decoder(raw: program.instructions, maps: program.maps)
        instructions = decoder.decodeAll()
        raw = program.instructions
        problems = decoder.problems
    }

    /// The reason instruction `pc` cannot run, if it is a trap.
    public func problem(at pc: Int) -> String? {
        guard pc >= 0, pc < instructions.count, instructions[pc].operation == .trap else { return nil }
        return problems[Int(instructions[pc].target)]
    }

    /// Instruction `pc` as text (bpftool-like), naming maps by `mapNames`.
    public func text(at pc: Int, mapNames: [String] = []) -> String { Disassembler.text(self, at: pc, mapNames: mapNames) }

    /// The index a jump at `pc` would go to, as written (it may be outside the program).
    public func writtenDestination(at pc: Int) -> Int {
        let i = raw[pc]
        let relative = i.opcode == 0x06 || (i.opcode == 0x85 && i.src == 1) ? Int(i.imm) : Int(i.offset)
        return pc + 1 + relative
    }
}

/// Decodes raw instructions into `DecodedInstruction`s (the opcode table).
struct Decoder {
    let raw: [Instruction]
    /// The program's maps; nil to decode map references without checking them (disassembly of a lone instruction).
    let maps: [BPFMap]?
    private(set) var problems: [String] = []

    init(raw: [Instruction], maps: [BPFMap]?) { self.raw = raw; self.maps = maps }

    static let aluOps64: [BPFOperation?] = [.add64, .sub64, .mul64, .div64, .or64, .and64, .lsh64, .rsh64, .neg64, .mod64,
                                         .xor64, .mov64, .arsh64, nil, nil, nil]
    static let aluOps32: [BPFOperation?] = [.add32, .sub32, .mul32, .div32, .or32, .and32, .lsh32, .rsh32, .neg32, .mod32,
                                         .xor32, .mov32, .arsh32, nil, nil, nil]
    static let conditions64: [BPFOperation?] = [nil, .jeq, .jgt, .jge, .jset, .jne, .jsgt, .jsge, nil, nil, .jlt, .jle, .jslt, .jsle, nil, nil]
    static let conditions32: [BPFOperation?] = [nil, .jeq32, .jgt32, .jge32, .jset32, .jne32, .jsgt32, .jsge32, nil, nil,
                                             .jlt32, .jle32, .jslt32, .jsle32, nil, nil]
    static let atomicOperations: Set<Int32> = [0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xA0, 0xA1, 0xE1, 0xF1]

    mutating func decodeAll() -> [DecodedInstruction] {
        var out: [DecodedInstruction] = []
        out.reserveCapacity(raw.count + 1)
        var pc = 0
        while pc < raw.count {
            let d = decode(at: pc)
            out.append(d)
            if raw[pc].isLoadImm64 && pc + 1 < raw.count {
                out.append(trap("jumped into the second half of the 16-byte load at \(pc)"))
                pc += 2
            } else {
                pc += 1
            }
        }
        out.append(trap("jumped outside the program"))
        return out
    }

    private mutating func trap(_ reason: String) -> DecodedInstruction {
        problems.append(reason)
        return DecodedInstruction(operation: .trap, dst: 0, src: DecodedInstruction.zeroSlot, offset: 0, target: Int32(problems.count - 1),
                                  imm: 0, srcMask: 0)
    }

    /// Decodes instruction `pc` (and, for a 16-byte load, the slot after it).
    mutating func decode(at pc: Int) -> DecodedInstruction {
        let i = raw[pc]
        let op = i.opcode
        guard i.dst < BPF.maxRegisters, i.src < BPF.maxRegisters else {
            return trap("bad register r\(max(i.dst, i.src)) (there are r0-r10)")
        }
        let isX = op & BPF.x != 0
        let immediate = UInt64(bitPattern: Int64(i.imm))
        func make(_ o: BPFOperation, operandFromRegister: Bool? = nil, target: Int32 = 0, imm: UInt64? = nil) -> DecodedInstruction {
            let useRegister = operandFromRegister ?? isX
            return DecodedInstruction(operation: o, dst: i.dst, src: useRegister ? i.src : DecodedInstruction.zeroSlot, offset: i.offset, target: target,
                                      imm: imm ?? (useRegister ? 0 : immediate), srcMask: useRegister ? ~0 : 0)
        }
        /// A jump destination: out-of-range ones go to the trap after the end.
        func destination(_ relative: Int) -> Int32 {
            let t = pc + 1 + relative
            return t >= 0 && t < raw.count ? Int32(t) : Int32(raw.count)
        }
        let code = Int(op >> 4)
        switch op & 0x07 {
        case BPF.alu64, BPF.alu:
            let wide = op & 0x07 == BPF.alu64
            guard i.dst != 10 else { return trap("r10 is read-only") }
            switch code {
            case 0x3 where i.offset == 1, 0x9 where i.offset == 1:  // signed division and modulo
                let o: BPFOperation = code == 0x3 ? (wide ? .sdiv64 : .sdiv32) : (wide ? .smod64 : .smod32)
                return make(o)
            case 0x8:
                return make(wide ? .neg64 : .neg32, operandFromRegister: false, imm: 0)
            case 0xB:
                switch (i.offset, wide) {
                case (8, true): return make(.movsx8To64)
                case (16, true): return make(.movsx16To64)
                case (32, true): return make(.movsx32To64)
                case (8, false): return make(.movsx8To32)
                case (16, false): return make(.movsx16To32)
                default: return make(wide ? .mov64 : .mov32)
                }
            case 0xD:
                let widths: [Int32: (BPFOperation, BPFOperation, BPFOperation)] = [16: (.bswap16, .le16, .be16), 32: (.bswap32, .le32, .be32),
                                                                         64: (.bswap64, .le64, .be64)]
                guard let w = widths[i.imm] else { return trap("byte swap width \(i.imm) (16, 32 or 64)") }
                return make(wide ? w.0 : (isX ? w.2 : w.1), operandFromRegister: false, imm: 0)
            default:
                guard let o = (wide ? Self.aluOps64 : Self.aluOps32)[code] else {
                    return trap("invalid ALU opcode 0x\(String(op, radix: 16))")
                }
                return make(o)
            }
        case BPF.jmp, BPF.jmp32:
            let wide = op & 0x07 == BPF.jmp
            switch code {
            case 0x0:
                return make(.ja, operandFromRegister: false, target: destination(wide ? Int(i.offset) : Int(i.imm)), imm: 0)
            case 0x8:
                guard op == 0x85 else {
                    return trap(op == 0x8D ? "callx (0x8d, an indirect call) is not supported" : "invalid opcode 0x\(String(op, radix: 16))")
                }
                if i.src == 1 { return make(.callLocal, operandFromRegister: false, target: destination(Int(i.imm)), imm: 0) }
                return make(.callHelper, operandFromRegister: false, target: i.imm, imm: 0)
            case 0x9:
                guard op == 0x95 else { return trap("invalid opcode 0x\(String(op, radix: 16))") }
                return make(.exit, operandFromRegister: false, imm: 0)
            default:
                guard let o = (wide ? Self.conditions64 : Self.conditions32)[code] else {
                    return trap("invalid jump opcode 0x\(String(op, radix: 16))")
                }
                return make(o, target: destination(Int(i.offset)))
            }
        case BPF.ldx:
            guard i.dst != 10 else { return trap("r10 is read-only") }
            let size = BPF.size(op)
            switch op & 0xE0 {
            case BPF.mem:
                return make([1: .load8, 2: .load16, 4: .load32, 8: .load64][size]!, operandFromRegister: true, imm: 0)
            case BPF.memsx where size < 8:
                return make([1: .loadSigned8, 2: .loadSigned16, 4: .loadSigned32][size]!, operandFromRegister: true, imm: 0)
            default:
                return trap("unsupported load mode 0x\(String(op, radix: 16))")
            }
        case BPF.st, BPF.stx:
            let size = BPF.size(op)
            let fromRegister = op & 0x07 == BPF.stx
            switch op & 0xE0 {
            case BPF.mem:
                return make([1: .store8, 2: .store16, 4: .store32, 8: .store64][size]!, operandFromRegister: fromRegister)
            case BPF.atomic:
                guard fromRegister, size == 4 || size == 8 else {
                    return trap("atomic operations need a 32- or 64-bit STX")
                }
                guard Self.atomicOperations.contains(i.imm) else {
                    return trap("invalid atomic operation 0x\(String(i.imm, radix: 16))")
                }
                return make(size == 4 ? .atomic32 : .atomic64, operandFromRegister: true, target: i.imm, imm: 0)
            default:
                return trap("unsupported store mode 0x\(String(op, radix: 16))")
            }
        default:  // BPF.ld
            guard i.isLoadImm64 else { return trap("legacy packet loads (LD_ABS/LD_IND) are not supported (opcode 0x\(String(op, radix: 16)))") }
            guard pc + 1 < raw.count else { return trap("ldimm64 is missing its second half") }
            guard i.dst != 10 else { return trap("r10 is read-only") }
            let hi = raw[pc + 1]
            let low = UInt64(UInt32(bitPattern: i.imm)), high = UInt64(UInt32(bitPattern: hi.imm))
            switch i.src {
            case 0:
                return make(.loadImm64, operandFromRegister: false, imm: low | high << 32)
            case 1:
                guard i.imm >= 0, Int(i.imm) < maps?.count ?? Int.max else { return trap("reference to unknown map \(i.imm)") }
                return make(.loadMap, operandFromRegister: false, target: i.imm, imm: 0)
            case 2:
                guard i.imm >= 0, Int(i.imm) < maps?.count ?? Int.max, maps?[Int(i.imm)].definition.kind ?? .array == .array else {
                    return trap("direct value access needs an array map (map \(i.imm))")
                }
                return make(.loadMapValue, operandFromRegister: false, target: i.imm, imm: high)
            default:
                return trap("unsupported ldimm64 source \(i.src)")
            }
        }
    }
}

/// The meaning of eBPF's ALU operations and jump conditions (RFC 9669), in one
/// place: the interpreter runs them and the verifier folds known values and
/// decides branches on constants with the very same functions.
enum BPFSemantics {
    /// `a op b` for an ALU operation (`a` is the destination register's value; `b`
    /// the operand, ignored by neg, the byte swaps and the endianness conversions).
    /// Division by zero gives 0 and modulo by zero leaves `a`, as RFC 9669 says.
    @_transparent  // inlined everywhere, so a call with a constant operation folds to that one case
    static func alu(_ op: BPFOperation, _ a: UInt64, _ b: UInt64) -> UInt64 {
        let a32 = UInt32(truncatingIfNeeded: a), b32 = UInt32(truncatingIfNeeded: b)
        switch op {
        case .add64: return a &+ b
        case .sub64: return a &- b
        case .mul64: return a &* b
        case .div64: return b == 0 ? 0 : a / b
        case .sdiv64:
            return b == 0 ? 0 : UInt64(bitPattern: Int64(bitPattern: a).dividedReportingOverflow(by: Int64(bitPattern: b)).partialValue)
        case .or64: return a | b
        case .and64: return a & b
        case .lsh64: return a << (b & 63)
        case .rsh64: return a >> (b & 63)
        case .neg64: return 0 &- a
        case .mod64: return b == 0 ? a : a % b
        case .smod64:
            return b == 0 ? a
                : UInt64(bitPattern: Int64(bitPattern: a).remainderReportingOverflow(dividingBy: Int64(bitPattern: b)).partialValue)
        case .xor64: return a ^ b
        case .mov64: return b
        case .movsx8To64: return UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: b)))
        case .movsx16To64: return UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: b)))
        case .movsx32To64: return UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: b)))
        case .arsh64: return UInt64(bitPattern: Int64(bitPattern: a) >> Int64(b & 63))
        case .bswap16: return UInt64(UInt16(truncatingIfNeeded: a).byteSwapped)
        case .bswap32: return UInt64(a32.byteSwapped)
        case .bswap64: return a.byteSwapped
        case .add32: return UInt64(a32 &+ b32)
        case .sub32: return UInt64(a32 &- b32)
        case .mul32: return UInt64(a32 &* b32)
        case .div32: return b32 == 0 ? 0 : UInt64(a32 / b32)
        case .sdiv32:
            return b32 == 0 ? 0
                : UInt64(UInt32(bitPattern: Int32(bitPattern: a32).dividedReportingOverflow(by: Int32(bitPattern: b32)).partialValue))
        case .or32: return UInt64(a32 | b32)
        case .and32: return UInt64(a32 & b32)
        case .lsh32: return UInt64(a32 << (b32 & 31))
        case .rsh32: return UInt64(a32 >> (b32 & 31))
        case .neg32: return UInt64(0 &- a32)
        case .mod32: return b32 == 0 ? UInt64(a32) : UInt64(a32 % b32)
        case .smod32:
            return b32 == 0 ? UInt64(a32)
                : UInt64(UInt32(bitPattern: Int32(bitPattern: a32).remainderReportingOverflow(dividingBy: Int32(bitPattern: b32)).partialValue))
        case .xor32: return UInt64(a32 ^ b32)
        case .mov32: return UInt64(b32)
        case .movsx8To32: return UInt64(UInt32(bitPattern: Int32(Int8(truncatingIfNeeded: b))))
        case .movsx16To32: return UInt64(UInt32(bitPattern: Int32(Int16(truncatingIfNeeded: b))))
        case .arsh32: return UInt64(UInt32(bitPattern: Int32(bitPattern: a32) >> Int32(b32 & 31)))
        case .le16: return UInt64(UInt16(truncatingIfNeeded: a))
        case .le32: return UInt64(a32)
        case .le64: return a
        case .be16: return UInt64(UInt16(truncatingIfNeeded: a).byteSwapped)
        case .be32: return UInt64(a32.byteSwapped)
        case .be64: return a.byteSwapped
        default: return a  // not an ALU operation
        }
    }

    /// Whether a conditional jump is taken for `a` (the destination register) and
    /// `b` (the operand); `ja` always is; false for operations that are not jumps.
    /// The BPF_JMP32 conditions are spelled out rather than mapped onto the 64-bit
    /// ones by sign or zero extension: mapped, the interpreter's dispatch no longer
    /// folds them, and a policy decision cost 1.7x.
    @_transparent
    static func condition(_ op: BPFOperation, _ a: UInt64, _ b: UInt64) -> Bool {
        let a32 = UInt32(truncatingIfNeeded: a), b32 = UInt32(truncatingIfNeeded: b)
        switch op {
        case .ja: return true
        case .jeq: return a == b
        case .jgt: return a > b
        case .jge: return a >= b
        case .jset: return a & b != 0
        case .jne: return a != b
        case .jsgt: return Int64(bitPattern: a) > Int64(bitPattern: b)
        case .jsge: return Int64(bitPattern: a) >= Int64(bitPattern: b)
        case .jlt: return a < b
        case .jle: return a <= b
        case .jslt: return Int64(bitPattern: a) < Int64(bitPattern: b)
        case .jsle: return Int64(bitPattern: a) <= Int64(bitPattern: b)
        case .jeq32: return a32 == b32
        case .jgt32: return a32 > b32
        case .jge32: return a32 >= b32
        case .jset32: return a32 & b32 != 0
        case .jne32: return a32 != b32
        case .jsgt32: return Int32(bitPattern: a32) > Int32(bitPattern: b32)
        case .jsge32: return Int32(bitPattern: a32) >= Int32(bitPattern: b32)
        case .jlt32: return a32 < b32
        case .jle32: return a32 <= b32
        case .jslt32: return Int32(bitPattern: a32) < Int32(bitPattern: b32)
        case .jsle32: return Int32(bitPattern: a32) <= Int32(bitPattern: b32)
        default: return false
        }
    }
}
