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

/// Text for instructions in messages (close to the kernel's verifier log).
enum Disassembler {
    static let aluNames = ["+=", "-=", "*=", "/=", "|=", "&=", "<<=", ">>=", "neg", "%=", "^=", "=", "s>>=", "end"]
    static let jmpNames = ["goto", "==", ">", ">=", "&", "!=", "s>", "s>=", "call", "exit", "<", "<=", "s<", "s<="]

    static func text(_ i: Instruction) -> String {
        let cls = i.instructionClass
        let srcText = i.opcode & BPF.x != 0 ? "r\(i.src)" : "\(i.imm)"
        switch cls {
        case BPF.alu, BPF.alu64:
            let op = Int(i.opcode >> 4)
            let r = cls == BPF.alu64 ? "r" : "w"
            guard op < aluNames.count else { return "invalid op 0x\(String(i.opcode, radix: 16))" }
            if op == 8 { return "\(r)\(i.dst) = -\(r)\(i.dst)" }
            if op == 13 { return "\(r)\(i.dst) = bswap\(i.imm) \(r)\(i.dst)" }
            return "\(r)\(i.dst) \(aluNames[op]) \(i.opcode & BPF.x != 0 ? "\(r)\(i.src)" : "\(i.imm)")"
        case BPF.jmp, BPF.jmp32:
            let op = Int(i.opcode >> 4)
            guard op < jmpNames.count else { return "invalid op 0x\(String(i.opcode, radix: 16))" }
            switch op {
            case 0: return "goto \(cls == BPF.jmp32 ? Int(i.imm) : Int(i.offset))"
            case 8: return i.src == 1 ? "call pc\(i.imm >= 0 ? "+" : "")\(i.imm)" : "call helper \(i.imm)"
            case 9: return "exit"
            default:
                let r = cls == BPF.jmp ? "r" : "w"
                return "if \(r)\(i.dst) \(jmpNames[op]) \(srcText) goto \(i.offset)"
            }
        case BPF.ldx:
            return "r\(i.dst) = *(\(sizeName(i.opcode))\(i.opcode & 0xE0 == BPF.memsx ? " sx" : "") *)(r\(i.src) \(sign(i.offset)))"
        case BPF.st:
            return "*(\(sizeName(i.opcode)) *)(r\(i.dst) \(sign(i.offset))) = \(i.imm)"
        case BPF.stx:
            if i.opcode & 0xE0 == BPF.atomic { return "atomic 0x\(String(i.imm, radix: 16)) (\(sizeName(i.opcode)) *)(r\(i.dst) \(sign(i.offset))), r\(i.src)" }
            return "*(\(sizeName(i.opcode)) *)(r\(i.dst) \(sign(i.offset))) = r\(i.src)"
        case BPF.ld:
            return i.isLoadImm64 ? "r\(i.dst) = \(i.imm) ll (src \(i.src))" : "legacy packet load 0x\(String(i.opcode, radix: 16))"
        default:
            return "invalid opcode 0x\(String(i.opcode, radix: 16))"
        }
    }

    static func sizeName(_ op: UInt8) -> String {
        switch op & 0x18 { case BPF.w: return "u32"; case BPF.h: return "u16"; case BPF.b: return "u8"; default: return "u64" }
    }
    static func sign(_ o: Int16) -> String { o >= 0 ? "+ \(o)" : "- \(-Int(o))" }
}
