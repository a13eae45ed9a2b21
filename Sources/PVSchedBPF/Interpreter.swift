import Atomics
import PVSchedCore
#if canImport(Glibc)
import Glibc
#endif

/// Runs a verified BPF program. Memory accesses are also checked at run time
/// against the regions the program may touch (context, its stack, map values),
/// so even an unverified program cannot touch other memory; a runaway program
/// stops at the instruction budget.
public final class Interpreter: Sendable {
    public let program: Program
    public let instructionBudget: Int
    /// Receives bpf_trace_printk output.
    public let trace: (@Sendable (String) -> Void)?
    private let code: [Instruction]

    public init(program: Program, instructionBudget: Int = 1_000_000, trace: (@Sendable (String) -> Void)? = nil) {
        self.program = program
        self.instructionBudget = instructionBudget
        self.trace = trace
        self.code = program.instructions
    }

    /// Runs the program with r1 = `context`; returns r0.
    public func run(context: UnsafeMutableRawBufferPointer, contextWritable: Bool = false) throws(BPFError) -> UInt64 {
        try withUnsafeTemporaryAllocation(byteCount: BPF.stackSize * BPF.maxCallDepth, alignment: 16) { stack throws(BPFError) in
            try execute(context: context, writable: contextWritable, stack: stack)
        }
    }

    private struct Frame { var returnPC: Int; var saved: (UInt64, UInt64, UInt64, UInt64); var fp: UInt64 }

    private func execute(context: UnsafeMutableRawBufferPointer, writable: Bool,
                         stack: UnsafeMutableRawBufferPointer) throws(BPFError) -> UInt64 {
        var r = (UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        return try withUnsafeMutableBytes(of: &r) { raw throws(BPFError) -> UInt64 in
            let reg = raw.baseAddress!.assumingMemoryBound(to: UInt64.self)
            let ctxBase = UInt(bitPattern: context.baseAddress), ctxEnd = ctxBase + UInt(context.count)
            let stackBase = UInt(bitPattern: stack.baseAddress!), stackEnd = stackBase + UInt(stack.count)
            reg[1] = UInt64(ctxBase)
            reg[2] = UInt64(context.count)  // the blob's length, for programs run on memory (`bpf run`)
            reg[10] = UInt64(stackBase) + UInt64(BPF.stackSize)
            var frames: [Frame] = []
            var pc = 0
            var executed = 0
            let code = self.code
            let maps = program.maps

            @inline(__always) func ok(_ a: UInt64, _ size: Int, _ write: Bool) -> Bool {
                let addr = UInt(truncatingIfNeeded: a)
                if addr >= stackBase && addr &+ UInt(size) <= stackEnd && addr &+ UInt(size) >= addr { return true }
                if addr >= ctxBase && addr &+ UInt(size) <= ctxEnd && addr &+ UInt(size) >= addr { return !write || writable }
                for m in maps where m.containsValue(addr, size) { return true }
                return false
            }
            func fault(_ what: String, _ a: UInt64, _ size: Int) -> BPFError {
                .runtime(pc: pc - 1, reason: "\(what) of \(size) bytes at 0x\(String(a, radix: 16)) is outside the context, the stack and map values")
            }

            while true {
                guard pc >= 0 && pc < code.count else { throw .runtime(pc: pc, reason: "jumped outside the program") }
                executed += 1
                if executed > instructionBudget { throw .budgetExceeded(instructionBudget) }
                let i = code[pc]
                let d = Int(i.dst), s = Int(i.src)
                guard d < BPF.maxRegisters, s < BPF.maxRegisters else { throw .runtime(pc: pc, reason: "bad register") }
                pc += 1
                let op = i.opcode
                switch op & 0x07 {
                case BPF.alu64:
                    let src: UInt64 = op & BPF.x != 0 ? reg[s] : UInt64(bitPattern: Int64(i.imm))
                    guard d != 10 else { throw .runtime(pc: pc - 1, reason: "r10 is read-only") }
                    reg[d] = try BPFSemantics.alu64(op & 0xF0, reg[d], src, i, pc - 1)
                case BPF.alu:
                    let src: UInt32 = op & BPF.x != 0 ? UInt32(truncatingIfNeeded: reg[s]) : UInt32(bitPattern: i.imm)
                    guard d != 10 else { throw .runtime(pc: pc - 1, reason: "r10 is read-only") }
                    reg[d] = try BPFSemantics.alu32(op, reg[d], src, i, pc - 1)
                case BPF.jmp, BPF.jmp32:
                    let code4 = op & 0xF0
                    if code4 == 0x00 {  // ja / gotol
                        pc += op & 0x07 == BPF.jmp32 ? Int(i.imm) : Int(i.offset)
                        continue
                    }
                    if code4 == 0x80 {  // call
                        guard op == 0x85 else { throw .runtime(pc: pc - 1, reason: "invalid opcode 0x\(String(op, radix: 16)) (callx is not supported)") }
                        if i.src == 1 {
                            guard frames.count < BPF.maxCallDepth - 1 else { throw .runtime(pc: pc - 1, reason: "call depth exceeds \(BPF.maxCallDepth)") }
                            frames.append(Frame(returnPC: pc, saved: (reg[6], reg[7], reg[8], reg[9]), fp: reg[10]))
                            reg[10] &+= UInt64(BPF.stackSize)  // r10 may hold anything without the verifier
                            pc += Int(i.imm)
                        } else {
                            reg[0] = try helper(Int(i.imm), reg, ok: ok, at: pc - 1)
                        }
                        continue
                    }
                    if code4 == 0x90 {  // exit
                        guard op == 0x95 else { throw .runtime(pc: pc - 1, reason: "invalid opcode 0x\(String(op, radix: 16))") }
                        guard let f = frames.popLast() else { return reg[0] }
                        (reg[6], reg[7], reg[8], reg[9]) = f.saved
                        reg[10] = f.fp
                        pc = f.returnPC
                        continue
                    }
                    let b: UInt64 = op & BPF.x != 0 ? reg[s] : UInt64(bitPattern: Int64(i.imm))
                    guard let taken = BPFSemantics.condition(code4, wide: op & 0x07 == BPF.jmp, reg[d], b) else {
                        throw .runtime(pc: pc - 1, reason: "invalid jump opcode 0x\(String(op, radix: 16))")
                    }
                    if taken { pc += Int(i.offset) }
                case BPF.ldx:
                    let size = BPF.size(op)
                    let a = reg[s] &+ UInt64(bitPattern: Int64(i.offset))
                    guard ok(a, size, false) else { throw fault("read", a, size) }
                    guard d != 10 else { throw .runtime(pc: pc - 1, reason: "r10 is read-only") }
                    let p = UnsafeRawPointer(bitPattern: UInt(truncatingIfNeeded: a))!
                    let signed = op & 0xE0 == BPF.memsx
                    switch size {
                    case 1: reg[d] = signed ? UInt64(bitPattern: Int64(p.load(as: Int8.self))) : UInt64(p.load(as: UInt8.self))
                    case 2: reg[d] = signed ? UInt64(bitPattern: Int64(p.loadUnaligned(as: Int16.self))) : UInt64(p.loadUnaligned(as: UInt16.self))
                    case 4: reg[d] = signed ? UInt64(bitPattern: Int64(p.loadUnaligned(as: Int32.self))) : UInt64(p.loadUnaligned(as: UInt32.self))
                    default: reg[d] = p.loadUnaligned(as: UInt64.self)
                    }
                case BPF.st, BPF.stx:
                    let size = BPF.size(op)
                    let a = reg[d] &+ UInt64(bitPattern: Int64(i.offset))
                    guard ok(a, size, true) else { throw fault("write", a, size) }
                    let p = UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: a))!
                    if op & 0xE0 == BPF.atomic {
                        guard op & 0x07 == BPF.stx, size == 4 || size == 8, a % UInt64(size) == 0 else {
                            throw .runtime(pc: pc - 1, reason: "atomic operations need an aligned 32- or 64-bit location")
                        }
                        try atomic(i, p, size, reg, at: pc - 1)
                        continue
                    }
                    let v: UInt64 = op & 0x07 == BPF.stx ? reg[s] : UInt64(bitPattern: Int64(i.imm))
                    switch size {
                    case 1: p.storeBytes(of: UInt8(truncatingIfNeeded: v), as: UInt8.self)
                    case 2: p.storeBytes(of: UInt16(truncatingIfNeeded: v), as: UInt16.self)
                    case 4: p.storeBytes(of: UInt32(truncatingIfNeeded: v), as: UInt32.self)
                    default: p.storeBytes(of: v, as: UInt64.self)
                    }
                case BPF.ld:
                    guard op == BPF.ldImm64, pc < code.count else {
                        throw .runtime(pc: pc - 1, reason: "unsupported load opcode 0x\(String(op, radix: 16))")
                    }
                    let hi = code[pc]
                    pc += 1
                    switch i.src {
                    case 0: reg[d] = UInt64(UInt32(bitPattern: i.imm)) | UInt64(UInt32(bitPattern: hi.imm)) << 32
                    case 1:
                        guard Int(i.imm) < maps.count, i.imm >= 0 else { throw .runtime(pc: pc - 2, reason: "unknown map \(i.imm)") }
                        reg[d] = MapHandle.encode(Int(i.imm))
                    case 2:
                        guard Int(i.imm) < maps.count, i.imm >= 0, maps[Int(i.imm)].definition.kind == .array else {
                            throw .runtime(pc: pc - 2, reason: "map value reference to an unknown or non-array map")
                        }
                        reg[d] = UInt64(UInt(bitPattern: maps[Int(i.imm)].slab)) &+ UInt64(UInt32(bitPattern: hi.imm))
                    default: throw .runtime(pc: pc - 2, reason: "unsupported lddw source \(i.src)")
                    }
                default:
                    throw .runtime(pc: pc - 1, reason: "invalid opcode 0x\(String(op, radix: 16))")
                }
            }
        }
    }


    private func atomic(_ i: Instruction, _ p: UnsafeMutableRawPointer, _ size: Int,
                        _ reg: UnsafeMutablePointer<UInt64>, at pc: Int) throws(BPFError) {
        let s = Int(i.src)
        if size == 8 {
            let a = UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self))
            try atomicOperation(a, i, value: reg[s], srcRegister: &reg[s], r0: &reg[0], at: pc)
        } else {
            let a = UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UnsafeAtomic<UInt32>.Storage.self))
            var src = UInt32(truncatingIfNeeded: reg[s]), r0 = UInt32(truncatingIfNeeded: reg[0])
            let (srcChanged, r0Changed) = try atomicOperation(a, i, value: src, srcRegister: &src, r0: &r0, at: pc)
            if srcChanged { reg[s] = UInt64(src) }   // 32-bit results are zero-extended
            if r0Changed { reg[0] = UInt64(r0) }
        }
    }

    /// One atomic read-modify-write (RFC 9669 §5.3); writes the fetched value to the
    /// source register (FETCH) or r0 (CMPXCHG). Returns which of the two it wrote.
    @discardableResult
    private func atomicOperation<T: AtomicInteger & FixedWidthInteger>(
        _ a: UnsafeAtomic<T>, _ i: Instruction, value v: T, srcRegister: inout T, r0: inout T, at pc: Int
    ) throws(BPFError) -> (Bool, Bool) where T.AtomicRepresentation.Value == T {
        let fetch = i.imm & BPF.atomicFetch != 0
        let old: T
        switch i.imm & ~BPF.atomicFetch {
        case 0x00: old = a.loadThenWrappingIncrement(by: v, ordering: .sequentiallyConsistent)
        case 0x40: old = a.loadThenBitwiseOr(with: v, ordering: .sequentiallyConsistent)
        case 0x50: old = a.loadThenBitwiseAnd(with: v, ordering: .sequentiallyConsistent)
        case 0xA0: old = a.loadThenBitwiseXor(with: v, ordering: .sequentiallyConsistent)
        case 0xE0 where fetch: old = a.exchange(v, ordering: .sequentiallyConsistent)
        case 0xF0 where fetch:
            r0 = a.compareExchange(expected: r0, desired: v, ordering: .sequentiallyConsistent).original
            return (false, true)
        default: throw .runtime(pc: pc, reason: "invalid atomic operation 0x\(String(i.imm, radix: 16))")
        }
        if fetch { srcRegister = old }
        return (fetch, false)
    }

    /// Helper calls (ids as in Linux).
    private func helper(_ id: Int, _ reg: UnsafeMutablePointer<UInt64>, ok: (UInt64, Int, Bool) -> Bool,
                        at pc: Int) throws(BPFError) -> UInt64 {
        let maps = program.maps
        func map(_ v: UInt64) throws(BPFError) -> BPFMap {
            guard let i = MapHandle.decode(v, count: maps.count) else { throw .runtime(pc: pc, reason: "r1 is not a map") }
            return maps[i]
        }
        func buffer(_ a: UInt64, _ n: Int, _ what: String) throws(BPFError) -> UnsafeRawBufferPointer {
            guard ok(a, n, false) else { throw .runtime(pc: pc, reason: "\(what) of \(n) bytes at 0x\(String(a, radix: 16)) is not readable") }
            return UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(truncatingIfNeeded: a)), count: n)
        }
        switch id {
        case Helper.mapLookup.rawValue:
            let m = try map(reg[1])
            return m.lookup(try buffer(reg[2], m.definition.keySize, "key")).map { UInt64(UInt(bitPattern: $0)) } ?? 0
        case Helper.mapUpdate.rawValue:
            let m = try map(reg[1])
            return UInt64(bitPattern: m.update(try buffer(reg[2], m.definition.keySize, "key"),
                                               try buffer(reg[3], m.definition.valueSize, "value")))
        case Helper.mapDelete.rawValue:
            let m = try map(reg[1])
            return UInt64(bitPattern: m.delete(try buffer(reg[2], m.definition.keySize, "key")))
        case Helper.ktimeGetNs.rawValue:
            return MonotonicClock.nowNs()
        case Helper.tracePrintk.rawValue:
            let n = Int(min(reg[2], 256))
            let fmt = try buffer(reg[1], n, "format")
            let text = TraceFormat.render(Array(fmt.prefix { $0 != 0 }), args: [reg[3], reg[4], reg[5]])
            trace?(text)
            return UInt64(text.utf8.count)
        case Helper.prandomU32.rawValue:
            return UInt64(UInt32.random(in: .min ... .max))
        default:
            throw .runtime(pc: pc, reason: "unknown helper \(id)")
        }
    }
}

/// The helpers the runtime provides (Linux ids).
public enum Helper: Int, CaseIterable, Sendable {
    case mapLookup = 1, mapUpdate = 2, mapDelete = 3, ktimeGetNs = 5, tracePrintk = 6, prandomU32 = 7
}

/// bpf_trace_printk formatting: %d %i %u %x with l/ll modifiers, %%.
enum TraceFormat {
    static func render(_ fmt: [UInt8], args: [UInt64]) -> String {
        var out = "", k = 0, i = 0
        while i < fmt.count {
            let c = fmt[i]
            if c != UInt8(ascii: "%") || i + 1 >= fmt.count { out.unicodeScalars.append(UnicodeScalar(c)); i += 1; continue }
            i += 1
            var long = 0
            while i < fmt.count && fmt[i] == UInt8(ascii: "l") { long += 1; i += 1 }
            guard i < fmt.count else { break }
            let conv = fmt[i]; i += 1
            let v = k < args.count ? args[k] : 0
            switch conv {
            case UInt8(ascii: "d"), UInt8(ascii: "i"):
                out += long > 0 ? String(Int64(bitPattern: v)) : String(Int32(truncatingIfNeeded: v)); k += 1
            case UInt8(ascii: "u"): out += long > 0 ? String(v) : String(UInt32(truncatingIfNeeded: v)); k += 1
            case UInt8(ascii: "x"): out += long > 0 ? String(v, radix: 16) : String(UInt32(truncatingIfNeeded: v), radix: 16); k += 1
            case UInt8(ascii: "%"): out += "%"
            default: out += "%?"
            }
        }
        return out.hasSuffix("\n") ? String(out.dropLast()) : out
    }
}

/// The meaning of eBPF's ALU operations and jump conditions (RFC 9669), in one
/// place: the interpreter runs them and the verifier folds known values and
/// decides branches on constants with the very same functions.
enum BPFSemantics {
    @inline(__always)
    static func alu64(_ code: UInt8, _ dst: UInt64, _ src: UInt64, _ i: Instruction, _ pc: Int) throws(BPFError) -> UInt64 {
        switch code {
        case 0x00: return dst &+ src
        case 0x10: return dst &- src
        case 0x20: return dst &* src
        case 0x30:
            if i.offset == 1 {
                let b = Int64(bitPattern: src)
                return b == 0 ? 0 : UInt64(bitPattern: Int64(bitPattern: dst).dividedReportingOverflow(by: b).partialValue)
            }
            return src == 0 ? 0 : dst / src
        case 0x40: return dst | src
        case 0x50: return dst & src
        case 0x60: return dst << (src & 63)
        case 0x70: return dst >> (src & 63)
        case 0x80: return 0 &- dst
        case 0x90:
            if i.offset == 1 {
                let b = Int64(bitPattern: src)
                return b == 0 ? dst : UInt64(bitPattern: Int64(bitPattern: dst).remainderReportingOverflow(dividingBy: b).partialValue)
            }
            return src == 0 ? dst : dst % src
        case 0xA0: return dst ^ src
        case 0xB0:
            switch i.offset {
            case 8: return UInt64(bitPattern: Int64(Int8(truncatingIfNeeded: src)))
            case 16: return UInt64(bitPattern: Int64(Int16(truncatingIfNeeded: src)))
            case 32: return UInt64(bitPattern: Int64(Int32(truncatingIfNeeded: src)))
            default: return src
            }
        case 0xC0: return UInt64(bitPattern: Int64(bitPattern: dst) >> Int64(src & 63))
        case 0xD0:  // bswap (unconditional)
            switch i.imm {
            case 16: return UInt64(UInt16(truncatingIfNeeded: dst).byteSwapped)
            case 32: return UInt64(UInt32(truncatingIfNeeded: dst).byteSwapped)
            case 64: return dst.byteSwapped
            default: throw .runtime(pc: pc, reason: "bswap width \(i.imm)")
            }
        default: throw .runtime(pc: pc, reason: "invalid ALU64 opcode 0x\(String(i.opcode, radix: 16))")
        }
    }

    @inline(__always)
    static func alu32(_ op: UInt8, _ dst64: UInt64, _ src: UInt32, _ i: Instruction, _ pc: Int) throws(BPFError) -> UInt64 {
        let dst = UInt32(truncatingIfNeeded: dst64)
        let r: UInt32
        switch op & 0xF0 {
        case 0x00: r = dst &+ src
        case 0x10: r = dst &- src
        case 0x20: r = dst &* src
        case 0x30:
            if i.offset == 1 {
                let b = Int32(bitPattern: src)
                r = b == 0 ? 0 : UInt32(bitPattern: Int32(bitPattern: dst).dividedReportingOverflow(by: b).partialValue)
            } else { r = src == 0 ? 0 : dst / src }
        case 0x40: r = dst | src
        case 0x50: r = dst & src
        case 0x60: r = dst << (src & 31)
        case 0x70: r = dst >> (src & 31)
        case 0x80: r = 0 &- dst
        case 0x90:
            if i.offset == 1 {
                let b = Int32(bitPattern: src)
                r = b == 0 ? dst : UInt32(bitPattern: Int32(bitPattern: dst).remainderReportingOverflow(dividingBy: b).partialValue)
            } else { r = src == 0 ? dst : dst % src }
        case 0xA0: r = dst ^ src
        case 0xB0:
            switch i.offset {
            case 8: r = UInt32(bitPattern: Int32(Int8(truncatingIfNeeded: src)))
            case 16: r = UInt32(bitPattern: Int32(Int16(truncatingIfNeeded: src)))
            default: r = src
            }
        case 0xC0: r = UInt32(bitPattern: Int32(bitPattern: dst) >> Int32(src & 31))
        case 0xD0:  // to_le / to_be on a little-endian host
            let toBE = op & BPF.x != 0
            switch i.imm {
            case 16: return UInt64(toBE ? UInt16(truncatingIfNeeded: dst64).byteSwapped : UInt16(truncatingIfNeeded: dst64))
            case 32: return UInt64(toBE ? UInt32(truncatingIfNeeded: dst64).byteSwapped : UInt32(truncatingIfNeeded: dst64))
            case 64: return toBE ? dst64.byteSwapped : dst64
            default: throw .runtime(pc: pc, reason: "endianness width \(i.imm)")
            }
        default: throw .runtime(pc: pc, reason: "invalid ALU opcode 0x\(String(op, radix: 16))")
        }
        return UInt64(r)
    }

    /// Whether jump condition `code4` (the opcode's operation bits) holds for `x`
    /// and `y`, compared as 64-bit values (`wide`, BPF_JMP) or 32-bit (BPF_JMP32);
    /// nil for a code that is not a condition.
    @inline(__always)
    static func condition(_ code4: UInt8, wide: Bool, _ x: UInt64, _ y: UInt64) -> Bool? {
        let a = wide ? x : x & 0xFFFF_FFFF, b = wide ? y : y & 0xFFFF_FFFF
        let sa = wide ? Int64(bitPattern: a) : Int64(Int32(truncatingIfNeeded: a))
        let sb = wide ? Int64(bitPattern: b) : Int64(Int32(truncatingIfNeeded: b))
        switch code4 {
        case 0x10: return a == b
        case 0x20: return a > b
        case 0x30: return a >= b
        case 0x40: return a & b != 0
        case 0x50: return a != b
        case 0x60: return sa > sb
        case 0x70: return sa >= sb
        case 0xA0: return a < b
        case 0xB0: return a <= b
        case 0xC0: return sa < sb
        case 0xD0: return sa <= sb
        default: return nil
        }
    }
}
