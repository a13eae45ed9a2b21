/// One eBPF instruction (RFC 9669 §3): 8 bytes, little-endian. A 64-bit immediate
/// load (`lddw`) occupies two slots; the second holds the upper 32 bits in `imm`.
public struct Instruction: Equatable, Sendable, CustomStringConvertible {
    public var opcode: UInt8
    public var dst: UInt8
    public var src: UInt8
    public var offset: Int16
    public var imm: Int32

    public init(opcode: UInt8, dst: UInt8 = 0, src: UInt8 = 0, offset: Int16 = 0, imm: Int32 = 0) {
        self.opcode = opcode; self.dst = dst; self.src = src; self.offset = offset; self.imm = imm
    }

    /// Decodes `bytes.count / 8` instructions.
    public static func decode(_ bytes: some Collection<UInt8>) -> [Instruction] {
        let b = Array(bytes)
        return stride(from: 0, to: b.count - b.count % 8, by: 8).map { (i: Int) -> Instruction in
            let off: UInt16 = UInt16(b[i + 2]) | UInt16(b[i + 3]) << 8
            var imm: UInt32 = UInt32(b[i + 4])
            imm |= UInt32(b[i + 5]) << 8
            imm |= UInt32(b[i + 6]) << 16
            imm |= UInt32(b[i + 7]) << 24
            return Instruction(opcode: b[i], dst: b[i + 1] & 0x0F, src: b[i + 1] >> 4,
                               offset: Int16(bitPattern: off), imm: Int32(bitPattern: imm))
        }
    }

    public var encoded: [UInt8] {
        let o = UInt16(bitPattern: offset), m = UInt32(bitPattern: imm)
        return [opcode, dst | src << 4, UInt8(o & 0xFF), UInt8(o >> 8),
                UInt8(m & 0xFF), UInt8(m >> 8 & 0xFF), UInt8(m >> 16 & 0xFF), UInt8(m >> 24)]
    }

    public var instructionClass: UInt8 { opcode & 0x07 }
    public var isLoadImm64: Bool { opcode == BPF.ldImm64 }
    public var description: String { Disassembler.text(self) }
}

/// eBPF opcode fields and constants (RFC 9669).
public enum BPF {
    // classes
    public static let ld: UInt8 = 0x00, ldx: UInt8 = 0x01, st: UInt8 = 0x02, stx: UInt8 = 0x03
    public static let alu: UInt8 = 0x04, jmp: UInt8 = 0x05, jmp32: UInt8 = 0x06, alu64: UInt8 = 0x07
    // source
    public static let k: UInt8 = 0x00, x: UInt8 = 0x08
    // sizes
    public static let w: UInt8 = 0x00, h: UInt8 = 0x08, b: UInt8 = 0x10, dw: UInt8 = 0x18
    // modes
    public static let imm: UInt8 = 0x00, abs: UInt8 = 0x20, ind: UInt8 = 0x40, mem: UInt8 = 0x60
    public static let memsx: UInt8 = 0x80, atomic: UInt8 = 0xC0
    // atomic operations (imm)
    public static let atomicFetch: Int32 = 0x01, atomicXchg: Int32 = 0xE1, atomicCmpxchg: Int32 = 0xF1
    public static let ldImm64: UInt8 = 0x18
    public static let maxRegisters = 11
    public static let stackSize = 512
    public static let maxCallDepth = 8

    /// Bytes accessed by a load/store of `opcode`.
    public static func size(_ opcode: UInt8) -> Int {
        switch opcode & 0x18 {
        case w: return 4
        case h: return 2
        case b: return 1
        default: return 8
        }
    }
}

/// Text for decoded instructions, close to the kernel verifier's log and bpftool's
/// dump (`pvsched bpf dump`, verifier messages, `Instruction.description`).
enum Disassembler {
    /// One instruction on its own (a 16-byte load shows its low half only).
    static func text(_ raw: Instruction) -> String {
        var decoder = Decoder(raw: raw.isLoadImm64 ? [raw, Instruction(opcode: 0)] : [raw], maps: nil)
        let d = decoder.decode(at: 0)
        return text(d, raw: raw, problems: decoder.problems, mapNames: [])
    }

    /// Instruction `pc` of a decoded program.
    static func text(_ program: DecodedProgram, at pc: Int, mapNames: [String] = []) -> String {
        guard pc >= 0, pc < program.raw.count else { return "-" }
        return text(program.instructions[pc], raw: program.raw[pc], problems: program.problems, mapNames: mapNames, pc: pc)
    }

    static func text(_ d: DecodedInstruction, raw: Instruction, problems: [String], mapNames: [String], pc: Int? = nil) -> String {
        let op = d.operation
        let name = "\(op)"
        let w = op.group == .alu32 ? "w" : "r"
        let operand = d.operandIsRegister ? "\(w)\(d.src)" : "\(Int64(bitPattern: d.imm))"
        func relative(_ target: Int32) -> String {
            guard let pc else { return "\(raw.offset >= 0 ? "+" : "")\(op == .callLocal || raw.opcode == 0x06 ? Int(raw.imm) : Int(raw.offset))" }
            let r = Int(target) - pc - 1
            return r >= 0 ? "+\(r)" : "\(r)"
        }
        func memory(_ signed: Bool = false) -> String {
            "*(\(signed ? "s" : "u")\(op.accessSize * 8) *)(r\(op.group == .load ? d.src : d.dst) \(d.offset >= 0 ? "+ \(d.offset)" : "- \(-Int(d.offset))"))"
        }
        func map(_ index: Int32) -> String { Int(index) < mapNames.count ? "map[\(index)] '\(mapNames[Int(index)])'" : "map[\(index)]" }
        switch op.group {
        case .alu64, .alu32:
            let dst = "\(w)\(d.dst)"
            switch op {
            case .neg64, .neg32: return "\(dst) = -\(dst)"
            case .mov64, .mov32: return "\(dst) = \(operand)"
            case .movsx8To64, .movsx8To32: return "\(dst) = (s8)\(operand)"
            case .movsx16To64, .movsx16To32: return "\(dst) = (s16)\(operand)"
            case .movsx32To64: return "\(dst) = (s32)\(operand)"
            case .bswap16, .bswap32, .bswap64, .le16, .le32, .le64, .be16, .be32, .be64: return "\(dst) = \(name) \(dst)"
            default:
                let symbols: [BPFOperation: String] = [.add64: "+=", .sub64: "-=", .mul64: "*=", .div64: "/=", .sdiv64: "s/=", .or64: "|=",
                    .and64: "&=", .lsh64: "<<=", .rsh64: ">>=", .mod64: "%=", .smod64: "s%=", .xor64: "^=", .arsh64: "s>>=",
                    .add32: "+=", .sub32: "-=", .mul32: "*=", .div32: "/=", .sdiv32: "s/=", .or32: "|=", .and32: "&=", .lsh32: "<<=",
                    .rsh32: ">>=", .mod32: "%=", .smod32: "s%=", .xor32: "^=", .arsh32: "s>>="]
                return "\(dst) \(symbols[op] ?? name) \(operand)"
            }
        case .jump:
            if op == .ja { return "goto pc\(relative(d.target))" }
            let symbols: [BPFOperation: String] = [.jeq: "==", .jgt: ">", .jge: ">=", .jset: "&", .jne: "!=", .jsgt: "s>",
                                                   .jsge: "s>=", .jlt: "<", .jle: "<=", .jslt: "s<", .jsle: "s<="]
            let r = op.isWideCondition ? "r" : "w"
            return "if \(r)\(d.dst) \(symbols[op.wideCondition] ?? name) \(d.operandIsRegister ? "\(r)\(d.src)" : "\(Int64(bitPattern: d.imm))") goto pc\(relative(d.target))"
        case .call:
            if op == .callLocal { return "call pc\(relative(d.target))" }
            let names: [Int32: String] = [1: "bpf_map_lookup_elem", 2: "bpf_map_update_elem", 3: "bpf_map_delete_elem",
                                          5: "bpf_ktime_get_ns", 6: "bpf_trace_printk", 7: "bpf_get_prandom_u32"]
            return "call \(names[d.target] ?? "helper")#\(d.target)"
        case .exit:
            return "exit"
        case .load:
            return "r\(d.dst) = \(memory(op == .loadSigned8 || op == .loadSigned16 || op == .loadSigned32))"
        case .store:
            return "\(memory()) = \(d.operandIsRegister ? "r\(d.src)" : "\(Int64(bitPattern: d.imm))")"
        case .atomic:
            let fetch = d.target & BPF.atomicFetch != 0
            let names: [Int32: String] = [0x00: "add", 0x40: "or", 0x50: "and", 0xA0: "xor", 0xE0: "xchg", 0xF0: "cmpxchg"]
            let verb = names[d.target & ~BPF.atomicFetch] ?? "op"
            return "lock \(fetch && verb != "xchg" && verb != "cmpxchg" ? "fetch_" : "")\(verb) \(memory()), r\(d.src)"
        case .loadImm64:
            switch op {
            case .loadMap: return "r\(d.dst) = \(map(d.target)) ll"
            case .loadMapValue: return "r\(d.dst) = \(map(d.target)) value + \(d.imm) ll"
            default: return "r\(d.dst) = \(pc == nil ? "\(raw.imm)" : "0x\(String(d.imm, radix: 16))") ll"
            }
        case .trap:
            let reason = Int(d.target) < problems.count ? problems[Int(d.target)] : "invalid"
            return "invalid (0x\(String(raw.opcode, radix: 16))): \(reason)"
        }
    }
}
