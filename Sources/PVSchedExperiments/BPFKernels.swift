// The BPF interpreter's benchmark programs. This file uses only PVSchedBPF's
// public API (Instruction, Program, Interpreter) so that it also builds against
// an older pvsched: Benchmarks/bpf-compare links it into a small executable built
// once from this tree and once from another revision, and
// scripts/bench-bpf-against.sh runs the two interleaved (`pvsched bench`
// measures the same kernels in process).
import PVSchedBPF
#if canImport(Glibc)
import Glibc
#endif

/// One interpreter benchmark: a program, the context it runs on, and how many
/// instructions one run executes (so results read as ns per instruction).
public struct BPFKernel: Sendable {
    public var name: String
    /// What one "op" is in the result: an instruction, or a whole call.
    public var unit: String
    public var instructions: [Instruction]
    public var contextSize: Int
    /// Instructions one run executes (1 for the per-call kernel: its unit is the call).
    public var opsPerRun: Int
    /// Runs per measurement.
    public var runs: Int

    /// The kernels the interpreter is judged on (issue #13): straight-line ALU
    /// code, an ALU loop, loads and stores, and the cost of one call.
    public static let all: [BPFKernel] = [straightLineALU, aluLoop, loadsAndStores, perCall]

    /// 1000 instructions mixing every ALU64 operation, register and immediate forms.
    public static var straightLineALU: BPFKernel {
        var code = [Instruction(opcode: 0xB7, dst: 0, imm: 1), Instruction(opcode: 0xB7, dst: 1, imm: 3)]
        let ops: [UInt8] = [0x0F, 0x1F, 0x2F, 0x4F, 0x5F, 0xAF, 0x07, 0x17, 0x27, 0x47, 0x57, 0xA7, 0x67, 0x77]
        for k in 0..<997 {
            let op = ops[k % ops.count]
            let isRegister = op & 0x08 != 0
            code.append(Instruction(opcode: op, dst: 0, src: isRegister ? 1 : 0, imm: isRegister ? 0 : Int32(k % 31 + 1)))
        }
        code.append(Instruction(opcode: 0x95))
        return BPFKernel(name: "straight-line ALU", unit: "instruction", instructions: code, contextSize: 8,
                         opsPerRun: code.count, runs: 2000)
    }

    /// A counted loop of 10,000 iterations whose body is six ALU instructions and
    /// a conditional backward jump.
    public static var aluLoop: BPFKernel {
        let iterations: Int32 = 10_000
        let code = [
            Instruction(opcode: 0xB7, dst: 0, imm: 0),            // r0 = 0
            Instruction(opcode: 0xB7, dst: 1, imm: iterations),   // r1 = N
            Instruction(opcode: 0x0F, dst: 0, src: 1),            // loop: r0 += r1
            Instruction(opcode: 0xA7, dst: 0, imm: 0x55),         // r0 ^= 0x55
            Instruction(opcode: 0x67, dst: 0, imm: 3),            // r0 <<= 3
            Instruction(opcode: 0x77, dst: 0, imm: 2),            // r0 >>= 2
            Instruction(opcode: 0x2F, dst: 0, src: 1),            // r0 *= r1
            Instruction(opcode: 0x17, dst: 1, imm: 1),            // r1 -= 1
            Instruction(opcode: 0x55, dst: 1, offset: -7, imm: 0), // if r1 != 0 goto loop
            Instruction(opcode: 0x95),
        ]
        return BPFKernel(name: "ALU loop", unit: "instruction", instructions: code, contextSize: 8,
                         opsPerRun: 3 + 7 * Int(iterations), runs: 20)
    }

    /// 1000 instructions of stack stores and loads of every width, and context loads.
    public static var loadsAndStores: BPFKernel {
        var code = [Instruction(opcode: 0xB7, dst: 2, imm: 7)]
        let pattern: [Instruction] = [
            Instruction(opcode: 0x7B, dst: 10, src: 2, offset: -8),   // *(u64 *)(r10 - 8) = r2
            Instruction(opcode: 0x79, dst: 3, src: 10, offset: -8),   // r3 = *(u64 *)(r10 - 8)
            Instruction(opcode: 0x63, dst: 10, src: 3, offset: -16),  // *(u32 *)(r10 - 16) = r3
            Instruction(opcode: 0x61, dst: 4, src: 10, offset: -16),  // r4 = *(u32 *)(r10 - 16)
            Instruction(opcode: 0x6A, dst: 10, offset: -24, imm: 9),  // *(u16 *)(r10 - 24) = 9
            Instruction(opcode: 0x69, dst: 5, src: 10, offset: -24),  // r5 = *(u16 *)(r10 - 24)
            Instruction(opcode: 0x73, dst: 10, src: 5, offset: -32),  // *(u8 *)(r10 - 32) = r5
            Instruction(opcode: 0x71, dst: 2, src: 10, offset: -32),  // r2 = *(u8 *)(r10 - 32)
            Instruction(opcode: 0x79, dst: 6, src: 1, offset: 0),     // r6 = *(u64 *)(r1 + 0)
            Instruction(opcode: 0x61, dst: 7, src: 1, offset: 8),     // r7 = *(u32 *)(r1 + 8)
        ]
        for k in 0..<998 { code.append(pattern[k % pattern.count]) }
        code.append(Instruction(opcode: 0xBF, dst: 0, src: 2))
        code.append(Instruction(opcode: 0x95))
        return BPFKernel(name: "loads and stores", unit: "instruction", instructions: code, contextSize: 16,
                         opsPerRun: code.count, runs: 2000)
    }

    /// `r0 = 1; exit`: the fixed cost of one call.
    public static var perCall: BPFKernel {
        BPFKernel(name: "one call of a 2-instruction program", unit: "call",
                  instructions: [Instruction(opcode: 0xB7, dst: 0, imm: 1), Instruction(opcode: 0x95)],
                  contextSize: 8, opsPerRun: 1, runs: 200_000)
    }

    /// Median ns per op over `reps` measurements of `runs` runs each; throws if the
    /// program fails (a kernel must run clean). `make` makes the runner (by default
    /// an interpreter).
    public func measure(reps: Int = 7, make: (Program) throws -> Interpreter = {
        Interpreter(program: $0, instructionBudget: 10_000_000)
    }) throws -> Double {
        let interpreter = try make(Program(instructions: instructions))
        var context = [UInt8](repeating: 1, count: contextSize)
        var sink: UInt64 = 0
        var times: [Double] = []
        try context.withUnsafeMutableBytes { ctx in
            sink &+= try interpreter.run(context: ctx)   // warm up, and fail loudly
            for _ in 0..<reps {
                let t0 = Self.nowNs()
                for _ in 0..<runs { sink &+= (try? interpreter.run(context: ctx)) ?? 0 }
                times.append(Double(Self.nowNs() - t0) / Double(runs * opsPerRun))
            }
        }
        if sink == 0x5EED { print("") }
        times.sort()
        return times[times.count / 2]
    }

    static func nowNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
