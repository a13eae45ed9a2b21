import CKernelBPF
import PVSchedTesting
import Testing
@testable import PVSchedBPF

/// Whether this process may load BPF programs into the host kernel.
let kernelBPFAvailable: Bool = {
    let code = [A.mov(0, 0), A.exit].flatMap(\.encoded)
    let fd = code.withUnsafeBytes { ckbpf_load($0.baseAddress, 2, nil, 0) }
    if fd >= 0 { ckbpf_close(fd) }
    return fd >= 0
}()

/// A small deterministic generator (xorshift) so failures reproduce.
struct Rng {
    var s: UInt64
    mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s }
    mutating func pick<T>(_ a: [T]) -> T { a[Int(next() % UInt64(a.count))] }
}

/// A random loop-free program over r0-r9 and the stack, folding r0 to 32 bits at the end.
func randomProgram(_ rng: inout Rng) -> [Instruction] {
    var code: [Instruction] = []
    for r in UInt8(0)...9 { code += A.lddw(r, rng.next() % 4 == 0 ? rng.next() % 8 : rng.next()) }
    let aluCodes: [UInt8] = [A.add, A.sub, A.mul, A.div, A.or, A.and, A.lsh, A.rsh, A.neg, A.mod, A.xor, A.movc, A.arsh]
    let jmpCodes: [UInt8] = [A.jeq, A.jgt, A.jge, A.jset, A.jne, A.jsgt, A.jsge, A.jlt, A.jle, A.jslt, A.jsle]
    let imms: [Int32] = [0, 1, -1, 2, 7, 31, 32, 63, 64, Int32.min, Int32.max, -7]
    for _ in 0..<24 {
        let d = UInt8(rng.next() % 10), s = UInt8(rng.next() % 10)
        let wide = rng.next() % 2 == 0
        switch rng.next() % 10 {
        case 0..<6:
            let c = rng.pick(aluCodes)
            var off: Int16 = 0
            if (c == A.div || c == A.mod) && rng.next() % 2 == 0 { off = 1 }
            if c == A.movc && rng.next() % 3 == 0 { off = rng.pick(wide ? [8, 16, 32] : [8, 16]) }
            code.append(rng.next() % 2 == 0 || c == A.neg ? A.alu(c, d, imm: c == A.neg ? 0 : rng.pick(imms), wide: wide, off: off)
                                                           : A.alur(c, d, s, wide: wide, off: off))
        case 6:
            let width: Int32 = rng.pick([16, 32, 64])
            code.append(Instruction(opcode: rng.pick([0xD4, 0xDC, 0xD7]), dst: d, imm: width))
        case 7:
            let size = rng.pick([BPF.b, BPF.h, BPF.w, BPF.dw])
            let off = Int16(-8 * Int(1 + rng.next() % 4))
            code.append(A.stx(size, 10, off, s))
            code.append(A.ldx(size, d, 10, off, signed: size != BPF.dw && rng.next() % 2 == 0))
        case 8:
            let off = Int16(-8 * Int(1 + rng.next() % 4))
            code.append(A.stx(BPF.dw, 10, off, d))
            code.append(A.atomic(rng.pick([BPF.w, BPF.dw]), 10, off, s, rng.pick([0x00, 0x01, 0x40, 0x41, 0x50, 0x51, 0xA0, 0xA1, 0xE1])))
            code.append(A.ldx(BPF.dw, d == 10 ? 0 : d, 10, off))
        default:
            let skip = Int16(1 + rng.next() % 2)
            let c = rng.pick(jmpCodes)
            code.append(rng.next() % 2 == 0 ? A.jmp(c, d, imm: rng.pick(imms), skip, wide: wide) : A.jmpr(c, d, s, skip, wide: wide))
            for _ in 0..<skip { code.append(A.alu(A.add, UInt8(rng.next() % 10), imm: Int32(truncatingIfNeeded: rng.next() % 1000))) }
        }
    }
    // Fold the 64-bit r0 into the 32-bit return value the kernel reports.
    code += [A.movr(1, 0), A.alu(A.rsh, 1, imm: 32), A.alur(A.xor, 0, 1), A.exit]
    return code
}

@Suite(.enabled(if: kernelBPFAvailable || Requirement.bpf.isRequired, "needs the bpf syscall (root) to use the kernel as an oracle"))
struct DifferentialTests {
    @Test func interpreterAndVerifierAgreeWithTheKernelOnGeneratedPrograms() throws {
        var rng = Rng(s: 0x9E37_79B9_7F4A_7C15)
        var agreed = 0, bothRejected = 0
        for n in 0..<400 {
            let code = randomProgram(&rng)
            let listing = code.enumerated().map { "\($0): \($1)" }.joined(separator: "\n")
            let bytes = code.flatMap(\.encoded)
            var log = [CChar](repeating: 0, count: 1 << 16)
            let fd = bytes.withUnsafeBytes { b in log.withUnsafeMutableBufferPointer { ckbpf_load(b.baseAddress, UInt32(code.count), $0.baseAddress, UInt32($0.count)) } }
            defer { if fd >= 0 { ckbpf_close(fd) } }
            let kernelLog = String(decoding: log.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                .split(separator: "\n").suffix(3).joined(separator: " | ")
            var ours: UInt64?
            var ourError: BPFError?
            do { ours = try run(code, ctx: [UInt8](repeating: 0, count: 64)) } catch let e as BPFError { ourError = e }
            // The verifiers agree on what is acceptable.
            #expect((fd >= 0) == (ourError == nil), "program \(n): kernel \(fd >= 0 ? "accepts" : "rejects: \(kernelLog)"), ours \(ourError.map { "rejects: \($0)" } ?? "accepts")\n\(listing)")
            guard fd >= 0, let ours else { if fd < 0 && ourError != nil { bothRejected += 1 }; continue }
            var data = [UInt8](repeating: 0, count: 64)
            var retval: UInt32 = 0
            #expect(data.withUnsafeMutableBytes { ckbpf_test_run(fd, $0.baseAddress, 64, &retval) } == 0)
            #expect(UInt32(truncatingIfNeeded: ours) == retval, "program \(n): ours 0x\(String(ours, radix: 16)), kernel 0x\(String(retval, radix: 16))\n\(listing)")
            agreed += 1
        }
        #expect(agreed >= 100)
        #expect(bothRejected >= 20)
    }

    @Test func theKernelAlsoRejectsWhatOurVerifierRejects() {
        let bad: [[Instruction]] = [
            [A.movr(0, 2), A.exit],                                   // uninitialized register
            [A.mov(0, 1), A.alu(A.div, 0, imm: 0), A.exit],            // division by constant zero
            [A.alu(A.movc, 0, imm: 1, off: 8), A.exit],               // reserved fields
            [A.mov(0, 0), A.alu(A.add, 0, imm: 1), A.jmp(A.jlt, 0, imm: 1 << 20, -2), A.exit],  // (too long) loop
            [A.ja(5), A.exit],                                        // jump out of range
            [A.call(99_999), A.exit],                                 // unknown helper
            [A.st(BPF.dw, 10, 8, 1), A.mov(0, 0), A.exit],            // stack out of bounds
        ]
        for code in bad {
            let bytes = code.flatMap(\.encoded)
            let fd = bytes.withUnsafeBytes { ckbpf_load($0.baseAddress, UInt32(code.count), nil, 0) }
            if fd >= 0 { ckbpf_close(fd) }
            #expect(fd < 0, "kernel accepted \(code.map(\.description))")
            if fd >= 0 { Issue.record("accepted: \(code.map(\.description))") }
            #expect(throws: BPFError.self) { try run(code, ctx: [UInt8](repeating: 0, count: 64)) }
        }
    }
}
