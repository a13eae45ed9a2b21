/// Why a BPF program could not be loaded, verified or run. Verifier errors name
/// the instruction and the reason.
public enum BPFError: Error, Equatable, Sendable, CustomStringConvertible {
    case elf(String)
    case badMap(String, String)
    case rejected(pc: Int, instruction: String, reason: String)
    case runtime(pc: Int, reason: String)
    case budgetExceeded(Int)
    case hex(String)

    public var description: String {
        switch self {
        case .elf(let m): return "ELF: \(m)"
        case .badMap(let n, let m): return "map '\(n)': \(m)"
        case .rejected(let pc, let insn, let reason): return "verifier: instruction \(pc) (\(insn)): \(reason)"
        case .runtime(let pc, let reason): return "runtime error at instruction \(pc): \(reason)"
        case .budgetExceeded(let n): return "instruction budget of \(n) exhausted"
        case .hex(let m): return "hex program: \(m)"
        }
    }
}

/// A loaded BPF program: instructions (the entry function first, local functions
/// after), its maps, and, for pvsched drivers, the declared driver.
public struct Program: Sendable {
    public var instructions: [Instruction]
    public var maps: [BPFMap]
    public var name: String
    /// The driver the object declares (section .pvsched.driver), if any.
    public var driver: DriverDeclaration?

    public init(instructions: [Instruction], maps: [BPFMap] = [], name: String = "program", driver: DriverDeclaration? = nil) {
        self.instructions = instructions; self.maps = maps; self.name = name; self.driver = driver
    }

    /// Parses raw instructions written as hex (whitespace and 0x prefixes ignored).
    public static func fromHex(_ text: String) throws(BPFError) -> Program {
        var digits = Substring(text.split(separator: "0x", omittingEmptySubsequences: false).joined())
            .filter { !$0.isWhitespace && $0 != "," }
        guard digits.count % 16 == 0, !digits.isEmpty else { throw .hex("needs a multiple of 16 hex digits (8 bytes per instruction)") }
        var bytes: [UInt8] = []
        while !digits.isEmpty {
            guard let b = UInt8(digits.prefix(2), radix: 16) else { throw .hex("'\(digits.prefix(2))' is not hex") }
            bytes.append(b)
            digits.removeFirst(2)
        }
        return Program(instructions: Instruction.decode(bytes), name: "hex")
    }
}

/// What a pvsched BPF object says about the driver it implements.
public struct DriverDeclaration: Equatable, Sendable {
    public var name: String
    public var events: UInt32
    public var protocolMajor: UInt16
    public var protocolMinor: UInt16
}

/// A map handle as a register value: a tag no real pointer has, plus the index.
enum MapHandle {
    static let tag: UInt64 = 0xFFFF_B9F0_0000_0000
    static func encode(_ index: Int) -> UInt64 { tag | UInt64(index) }
    static func decode(_ v: UInt64, count: Int) -> Int? {
        guard v & 0xFFFF_FFFF_0000_0000 == tag, Int(v & 0xFFFF_FFFF) < count else { return nil }
        return Int(v & 0xFFFF_FFFF)
    }
}
