import ArgumentParser
import Foundation
import PVSchedABI
import PVSchedBPF

/// BPF tools: run a program on a memory blob, verify an object.
struct BPFCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bpf", abstract: "Run and verify BPF programs; load and unload BPF drivers in the daemon.",
                                                    subcommands: [BPFRun.self, BPFVerify.self, BPFDump.self, BPFLoadCommand.self, BPFUnloadCommand.self])
}

/// Loads PROGRAM (an ELF object, or raw instructions as hex) for the tools.
func loadProgram(_ path: String, section: String) throws -> Program {
    let looksLikeHex = path.allSatisfy { $0.isHexDigit || $0.isWhitespace || $0 == "x" }
    if !looksLikeHex && !FileManager.default.fileExists(atPath: path) {
        throw ValidationError("\(path): no such file (give an ELF object, a file of hex instructions, or hex instructions)")
    }
    if FileManager.default.fileExists(atPath: path), let data = FileManager.default.contents(atPath: path) {
        let bytes = [UInt8](data)
        if bytes.starts(with: [0x7F, 0x45, 0x4C, 0x46]) { return try ELFLoader.load(bytes, section: section) }
        return try Program.fromHex(String(decoding: bytes, as: UTF8.self))
    }
    return try Program.fromHex(path)
}

/// Runs a program with r1 pointing at a memory blob and prints r0.
struct BPFRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Run a BPF program (ELF file, or instructions as hex) on a memory blob and print r0.")
    @Argument(help: "An ELF object, a file of hex instructions, or hex instructions.") var program: String
    @Option(help: "The memory r1 points to, as hex bytes (writable); r2 holds its length.") var mem: String = ""
    @Option(help: "ELF section of the program.") var section = "pvsched"
    @Option(help: "Instruction budget.") var budget = 1_000_000
    @Flag(help: "Skip the verifier (the interpreter still checks every memory access).") var noVerify = false
    @Flag(help: "Accept loops the verifier cannot prove bounded (the instruction budget ends them).") var allowLoops = false

    func validate() throws {
        guard (1...100_000_000).contains(budget) else { throw ValidationError("--budget must be 1...100000000, got \(budget)") }
    }

    func run() throws {
        let p = try loadProgram(program, section: section)
        var blob: [UInt8] = []
        var digits = Substring(mem.filter { !$0.isWhitespace })
        if digits.hasPrefix("0x") { digits = digits.dropFirst(2) }
        guard digits.count % 2 == 0 else { throw ValidationError("--mem needs an even number of hex digits") }
        while !digits.isEmpty {
            guard let b = UInt8(digits.prefix(2), radix: 16) else { throw ValidationError("--mem: '\(digits.prefix(2))' is not hex") }
            blob.append(b)
            digits = digits.dropFirst(2)
        }
        if !noVerify {
            try Verifier(program: p, context: ContextDescription(size: blob.count, writable: true, memoryBlob: true),
                         allowUnprovenLoops: allowLoops).verify()
        }
        let interpreter = Interpreter(program: p, instructionBudget: budget, trace: { print("trace: \($0)") },
                                      verified: !noVerify && !allowLoops)
        let r0 = try blob.withUnsafeMutableBytes { try interpreter.run(context: $0, contextWritable: true) }
        print("r0 = \(r0) (0x\(String(r0, radix: 16)))")
        if !blob.isEmpty { print("mem = \(blob.map { String(format: "%02x", $0) }.joined())") }
    }
}

/// Loads and verifies an object as a pvsched driver.
struct BPFVerify: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "verify", abstract: "Load and verify a pvsched BPF driver object.")
    @Argument(help: "The ELF object (clang -target bpf -O2 -c).") var object: String

    func run() throws {
        guard let data = FileManager.default.contents(atPath: object) else { throw ValidationError("cannot read \(object)") }
        let driver = try BPFDriver(elf: [UInt8](data))
        let p = driver.interpreter.program
        print("\(object): driver '\(driver.name)' (\(driver.protocolName) \(driver.protocolVersion)), \(p.instructions.count) instructions, verified".escapedForDisplay)
        for m in p.maps { print("  map \(m.definition.name): \(m.definition.kind), key \(m.definition.keySize) B, value \(m.definition.valueSize) B, \(m.definition.maxEntries) entries".escapedForDisplay) }
    }
}

/// Prints a program's instructions, bpftool style: index, opcode, meaning.
struct BPFDump: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "dump", abstract: "Disassemble a BPF program (an ELF object or hex instructions).")
    @Argument(help: "An ELF object, a file of hex instructions, or hex instructions.") var program: String
    @Option(help: "ELF section of the program.") var section = "pvsched"

    func run() throws {
        let p = try loadProgram(program, section: section)
        if let d = p.driver { print("driver '\(d.name)', protocol \(d.protocolMajor).\(d.protocolMinor), events 0x\(String(d.events, radix: 16))".escapedForDisplay) }
        for (k, m) in p.maps.enumerated() {
            print("map \(k) '\(m.definition.name)': \(m.definition.kind), key \(m.definition.keySize) B, value \(m.definition.valueSize) B, \(m.definition.maxEntries) entries".escapedForDisplay)
        }
        let decoded = DecodedProgram(p)
        let mapNames = p.maps.map(\.definition.name)
        let width = String(max(0, p.instructions.count - 1)).count
        var k = 0
        while k < p.instructions.count {
            let index = String(repeating: " ", count: width - String(k).count) + String(k)
            print("\(index): (\(String(format: "%02x", p.instructions[k].opcode))) \(decoded.text(at: k, mapNames: mapNames))")
            k += decoded.instructions[k].operation.group == .loadImm64 ? 2 : 1
        }
    }
}
