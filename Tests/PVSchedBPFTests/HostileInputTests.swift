import Foundation
import PVSchedABI
import Testing
@testable import PVSchedBPF

/// The crash reproducers found by the outside conformance and mutation runs, and
/// a fresh mutation run of our own: every one must end in a `BPFError`, never a trap.
@Suite struct HostileInputTests {
    static let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Crashers")

    static func file(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: dir.appendingPathComponent(name)))
    }

    static func loadAndVerify(_ bytes: [UInt8], section: String = "pvsched") throws(BPFError) {
        let p = try ELFLoader.load(bytes, section: section)
        try Verifier(program: p, context: ContextDescription(size: MemoryLayout<pvsched_bpf_ctx>.size, writable: false)).verify()
    }

    @Test(arguments: [
        ("elf-section-name-past-eof.o", "name offset"),
        ("elf-shoff-overflow.o", "section header table"),
        ("elf-section-offset-size-overflow.o", "lies outside"),
        ("elf-symtab-link-out-of-range.o", "sh_link 99"),
        ("elf-nobits-program-section.o", "holds no code"),
        ("elf-map-symbol-value-int32.o", "only maps"),
        ("elf-call-symbol-value-int32.o", "R_BPF_64_32"),
        ("elf-map-64GiB.o", "16 MiB"),
        ("fuzz-elf-loader-line29.o", "name offset"),
        ("fuzz-elf-loader-line42.o", "lies outside"),
        ("fuzz-elf-loader-line58.o", "sh_link"),
        ("fuzz-elf-loader-line109.o", "only maps"),
        ("fuzz-elf-loader-line115.o", "R_BPF_64_32"),
    ])
    func crashingObjectsAreRefusedWithAReason(name: String, reason: String) throws {
        let bytes = try Self.file(name)
        do {
            try Self.loadAndVerify(bytes)
            Issue.record("\(name) was accepted")
        } catch {
            #expect("\(error)".contains(reason), "\(name): \(error)")
        }
    }

    @Test func theSeedObjectStillLoads() throws {
        try Self.loadAndVerify(try Self.file("seed-latency_boost.o"))
    }

    @Test func pointerOffsetOverflowIsRejected() throws {
        let p = try Program.fromHex(String(decoding: try Self.file("verifier-pointer-offset-overflow.hex"), as: UTF8.self))
        #expect(throws: BPFError.self) { try Verifier(program: p, context: ContextDescription(size: 8, writable: true)).verify() }
    }

    /// FuzzBPFProgram's hang: `w2 = -w2; goto -2` (with garbage in the goto's reserved
    /// fields) on a 64-byte blob: r2 cycles 64, -64, 64... The verifier accepted it and its
    /// compiled code, which has no budget, never returned.
    @Test func aLoopWhoseStateCyclesIsRejected() throws {
        let p = try Program.fromHex(String(decoding: try Self.file("fuzz-bpf-program-two-state-loop.hex"), as: UTF8.self))
        #expect(throws: BPFError.self) {
            try Verifier(program: p, context: ContextDescription(size: 64, writable: true, memoryBlob: true)).verify()
        }
        // The reserved fields alone are refused, and so is the loop with them zero.
        var clean = p.instructions
        clean[1] = Instruction(opcode: 0x05, offset: -2)
        do {
            try Verifier(program: Program(instructions: clean), context: ContextDescription(size: 64, writable: true, memoryBlob: true)).verify()
            Issue.record("the two-state loop was accepted")
        } catch {
            #expect("\(error)".contains("infinite loop"), "\(error)")
        }
    }

    /// FuzzBPFProgram's out-of-memory (2.2 GB): `r0 = -4; loop: if w1 <= w2 goto +0;
    /// r0 += 0xc4fffc; if w0 >= 0x18ff27 goto loop`. The branch (both ways to the next
    /// instruction) forked the path at every iteration, and each pending fork kept its own
    /// copy of the path's loop history: memory grew with the square of the iterations. The
    /// verifier now caps the states it keeps and refuses the program by that cap.
    @Test func aBranchInsideALongLoopIsRefusedWithinTheVerifiersMemoryCap() throws {
        let p = try Program.fromHex(String(decoding: try Self.file("fuzz-bpf-program-branch-in-loop-oom.hex"), as: UTF8.self))
        let context = ContextDescription(size: 64, writable: true, memoryBlob: true)
        do {
            try Verifier(program: p, context: context).verify()
            Issue.record("the loop was accepted without a proof that it ends")
        } catch {
            #expect("\(error)".contains("within 100000 kept states"), "\(error)")
        }
        // With loops left to the runtime budget, its values are widened and its state
        // settles: verified, within the same caps.
        try Verifier(program: p, context: context, allowUnprovenLoops: true).verify()
    }

    @Test func r10OverflowWithoutTheVerifierIsARuntimeError() throws {
        let p = try Program.fromHex(String(decoding: try Self.file("interp-r10-overflow-no-verify.hex"), as: UTF8.self))
        var blob = [UInt8](repeating: 0, count: 8)
        // It must end: a result or a runtime error, whichever, but no trap.
        _ = try? blob.withUnsafeMutableBytes { try Interpreter(program: p).run(context: $0, contextWritable: true) }
    }

    @Test func callxIsRejectedByTheVerifierAndTheInterpreter() throws {
        let p = try Program.fromHex(String(decoding: try Self.file("callx-misdecoded-as-helper.hex"), as: UTF8.self))
        #expect(throws: BPFError.self) { try Verifier(program: p, context: ContextDescription(size: 8, writable: true)).verify() }
        var blob = [UInt8](repeating: 0, count: 8)
        #expect(throws: BPFError.self) { try blob.withUnsafeMutableBytes { try Interpreter(program: p).run(context: $0, contextWritable: true) } }
        // exit with the X bit (0x9d) is not exit either.
        let x = try Program.fromHex("b700000001000000 9d00000000000000")
        #expect(throws: BPFError.self) { try Verifier(program: x, context: ContextDescription(size: 8, writable: true)).verify() }
    }

    @Test func aProgramInTextLoadsOnce() throws {
        let p = try ELFLoader.load(try Self.file("elf-text-section-duplicated.o"), section: ".text")
        try Verifier(program: p, context: ContextDescription(size: 8, writable: true, memoryBlob: true)).verify()
    }

    @Test func r2HoldsTheBlobLength() throws {
        // r0 = r2; exit
        let p = try Program.fromHex("bf20000000000000 9500000000000000")
        try Verifier(program: p, context: ContextDescription(size: 24, writable: true, memoryBlob: true)).verify()
        var blob = [UInt8](repeating: 0, count: 24)
        #expect(try blob.withUnsafeMutableBytes { try Interpreter(program: p).run(context: $0, contextWritable: true) } == 24)
    }

    /// 3000 mutated copies of the sample object (byte flips, runs of 0xFF, truncation,
    /// 64-bit fields set to extreme values): each loads, or fails with a BPFError.
    @Test func mutatedObjectsNeverTrap() throws {
        let seed = try Self.file("seed-latency_boost.o")
        var rng: UInt64 = 0x243F_6A88_85A3_08D3
        func next() -> UInt64 { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng }
        var accepted = 0
        for _ in 0..<3000 {
            var m = seed
            for _ in 0..<(1 + Int(next() % 6)) {
                let at = Int(next() % UInt64(m.count))
                switch next() % 5 {
                case 0: m[at] = UInt8(truncatingIfNeeded: next())
                case 1: for k in at..<min(m.count, at + 8) { m[k] = 0xFF }
                case 2: m = Array(m[..<max(1, at)])
                case 3: for k in at..<min(m.count, at + 8) { m[k] = UInt8(truncatingIfNeeded: next() >> (8 * UInt64(k - at))) }
                default: m[at] ^= 1 << UInt8(next() % 8)
                }
            }
            do {
                let p = try ELFLoader.load(m)
                try Verifier(program: p, context: ContextDescription(size: MemoryLayout<pvsched_bpf_ctx>.size, writable: false)).verify()
                accepted += 1
                // What the verifier accepts runs to a result or a runtime error.
                var ctx = [UInt8](repeating: 0, count: MemoryLayout<pvsched_bpf_ctx>.size)
                _ = try? ctx.withUnsafeMutableBytes { try Interpreter(program: p, instructionBudget: 10_000).run(context: $0) }
            } catch {}
        }
        #expect(accepted < 3000)
    }
}

/// Inputs the libFuzzer targets (Fuzz/) found, kept as regression tests.
@Suite struct FuzzFoundTests {
    @Test func ldimm64AtTheEndIsRejectedNotTrapped() throws {
        // lddw r2, ... as the last instruction: its successor is past the end.
        let p = Program(instructions: Instruction.decode([0x18, 0x02, 0x00, 0xFF, 0xFF, 0x7F, 0x21, 0x00,
                                                          0x00, 0x00, 0x00, 0x00, 0x00, 0x79, 0x00, 0x00]))
        #expect(throws: BPFError.self) { try Verifier(program: p, context: ContextDescription(size: 64, writable: true)).verify() }
    }
}
