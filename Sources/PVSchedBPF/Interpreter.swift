import Atomics
import PVSchedCore
#if canImport(Glibc)
import Glibc
#endif

/// Runs a BPF program: compiled to machine code when it was verified (and this
/// machine allows, see `JITProgram`), interpreted otherwise. The program is
/// decoded once, when the interpreter is made (`DecodedProgram`); a run then
/// costs only its instructions: registers, call frames and the stacks live in the
/// calling thread's run block, and nothing is allocated. Memory accesses are
/// checked at run time against the regions the program may touch (context, its
/// stack, map values), so even an unverified program cannot touch other memory;
/// an interpreted runaway program stops at the instruction budget.
// @unchecked Sendable: `code` and `mapWindows` are written once in init and only read after; they are freed in deinit.
public final class Interpreter: @unchecked Sendable {
    public let program: Program
    public let decoded: DecodedProgram
    public let instructionBudget: Int
    /// Receives bpf_trace_printk output.
    public let trace: (@Sendable (String) -> Void)?
    private let code: UnsafeMutableBufferPointer<DecodedInstruction>
    private let mapWindows: UnsafeMutableBufferPointer<MapWindow>
    private let mapCount: Int
    private let runBlockKey = RunBlock.key
    /// The program as machine code, when it may be and can be compiled; and its
    /// entry point (read per run without touching the object's reference count).
    private let compiled: JITProgram?
    private let compiledEntry: JITProgram.Entry?

    /// Whether runs execute compiled machine code (else they are interpreted).
    public var isCompiled: Bool { compiled != nil }

    /// Whether verified programs are compiled: yes unless the environment sets
    /// PVSCHED_BPF_JIT=0 (to compare with the interpreter, or to rule the compiler out).
    public static let compilerEnabled: Bool = {
        guard let v = getenv("PVSCHED_BPF_JIT") else { return true }
        return !["0", "off", "no", "false"].contains(String(cString: v).lowercased())
    }()

    /// `verified`: the caller verified the program with loops proven bounded, so it
    /// may be compiled to machine code (which has no instruction budget: it needs
    /// none). Unverified programs, and programs whose loops rely on the budget, are
    /// always interpreted.
    public init(program: Program, instructionBudget: Int = 1_000_000, trace: (@Sendable (String) -> Void)? = nil,
                verified: Bool = false) {
        self.program = program
        self.instructionBudget = instructionBudget
        self.trace = trace
        decoded = DecodedProgram(program)
        compiled = verified && Self.compilerEnabled ? JITProgram(decoded, maps: program.maps) : nil
        compiledEntry = compiled?.entry
        code = .allocate(capacity: decoded.instructions.count)
        _ = code.initialize(from: decoded.instructions)
        mapCount = program.maps.count
        mapWindows = .allocate(capacity: max(1, program.maps.count))
        _ = mapWindows.initialize(from: program.maps.map(\.valueWindow))
    }

    deinit {
        code.deallocate()
        mapWindows.deallocate()
    }

    /// Runs the program with r1 = `context`; returns r0. The registers, call frames
    /// and stacks of the run are the calling thread's `RunBlock`, made once per
    /// thread; nothing is allocated per run.
    public func run(context: UnsafeMutableRawBufferPointer, contextWritable: Bool = false) throws(BPFError) -> UInt64 {
        let block = RunBlock.acquire(runBlockKey)
        defer { RunBlock.release(block) }
        if let compiledEntry { return try runCompiled(compiledEntry, context: context, writable: contextWritable, block: block) }
        return try execute(context: context, writable: contextWritable, block: block)
    }

    @inline(__always)
    private func runCompiled(_ entry: JITProgram.Entry, context: UnsafeMutableRawBufferPointer, writable: Bool,
                             block: UnsafeMutableRawPointer) throws(BPFError) -> UInt64 {
        let state = block + RunBlock.registersOffset
        let w = state.assumingMemoryBound(to: UInt64.self)
        let stack = UInt64(UInt(bitPattern: block + RunBlock.stackOffset))
        let count = context.count
        w[JITState.stackBase] = stack
        w[JITState.contextBase] = UInt64(UInt(bitPattern: context.baseAddress))
        w[JITState.contextLength] = UInt64(count)
        var size = 1
        for k in 0..<4 {
            let limit = count >= size ? UInt64(count - size + 1) : 0
            w[JITState.contextReadLimit + k] = limit
            w[JITState.contextWriteLimit + k] = writable ? limit : 0
            size <<= 1
        }
        w[JITState.mainFramePointer] = stack + UInt64(BPF.stackSize)
        w[JITState.fault] = JITFault.none.rawValue
        w[JITState.interpreter] = UInt64(UInt(bitPattern: Unmanaged.passUnretained(self).toOpaque()))
        w[JITState.mapWindows] = UInt64(UInt(bitPattern: mapWindows.baseAddress))
        w[JITState.mapCount] = UInt64(mapCount)
        w[JITState.helperError] = 0
        let r0 = entry(context.baseAddress, state)
        guard w[JITState.fault] == JITFault.none.rawValue else { throw compiledFault(w) }
        return r0
    }

    /// The error a compiled run stopped with: the interpreter's own message for the same fault.
    private func compiledFault(_ w: UnsafeMutablePointer<UInt64>) -> BPFError {
        let pc = Int(w[JITState.faultPC])
        switch JITFault(rawValue: w[JITState.fault]) {
        case .read?: return Self.fault("read", w[JITState.faultAddress], Int(w[JITState.faultSize]), pc + 1)
        case .write?: return Self.fault("write", w[JITState.faultAddress], Int(w[JITState.faultSize]), pc + 1)
        case .misalignedAtomic?: return .runtime(pc: pc, reason: "atomic operations need an aligned 32- or 64-bit location")
        case .outsideProgram?: return .runtime(pc: pc, reason: "jumped outside the program")
        default:
            guard let box = UnsafeRawPointer(bitPattern: UInt(w[JITState.helperError])) else {
                return .runtime(pc: pc, reason: "the compiled program stopped")
            }
            return Unmanaged<HelperFailure>.fromOpaque(box).takeRetainedValue().error
        }
    }

    /// A helper call from compiled code (r1-r5 in, r0 out). A failure is left in
    /// the run's state, and the compiled code leaves at once.
    func helperFromCompiledCode(id: Int, _ r1: UInt64, _ r2: UInt64, _ r3: UInt64, _ r4: UInt64, _ r5: UInt64,
                                state: UnsafeMutableRawPointer) -> UInt64 {
        let w = state.assumingMemoryBound(to: UInt64.self)
        let memory = MemoryWindows(contextBase: UInt(w[JITState.contextBase]), contextBytes: UInt(w[JITState.contextLength]),
                                   writable: false, stackBase: UInt(w[JITState.stackBase]), stackBytes: UInt(RunBlock.stackBytes),
                                   maps: UnsafeBufferPointer(start: mapWindows.baseAddress, count: mapCount))
        var regs: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, r1, r2, r3, r4, r5)
        return withUnsafeMutableBytes(of: &regs) { raw -> UInt64 in
            do throws(BPFError) {
                return try helper(id, raw.baseAddress!.assumingMemoryBound(to: UInt64.self), memory, at: Int(w[JITState.faultPC]))
            } catch {
                w[JITState.helperError] = UInt64(UInt(bitPattern: Unmanaged.passRetained(HelperFailure(error)).toOpaque()))
                w[JITState.fault] = JITFault.helper.rawValue
                return 0
            }
        }
    }

    private func execute(context: UnsafeMutableRawBufferPointer, writable: Bool,
                         block: UnsafeMutableRawPointer) throws(BPFError) -> UInt64 {
        let reg = (block + RunBlock.registersOffset).assumingMemoryBound(to: UInt64.self)
        let frames = (block + RunBlock.framesOffset).assumingMemoryBound(to: UInt64.self)
        let stack = block + RunBlock.stackOffset
        for k in 0...Int(DecodedInstruction.zeroSlot) { reg[k] = 0 }
        let memory = MemoryWindows(context: context, writable: writable, stack: stack, stackBytes: RunBlock.stackBytes,
                                   maps: UnsafeBufferPointer(start: mapWindows.baseAddress, count: mapCount))
        reg[1] = UInt64(UInt(bitPattern: context.baseAddress))
        reg[2] = UInt64(context.count)  // the blob's length, for programs run on memory (`bpf run`)
        reg[10] = UInt64(UInt(bitPattern: stack)) + UInt64(BPF.stackSize)
        let code = self.code.baseAddress!
        var pc = 0
        var depth = 0
        // The budget is charged when control leaves a straight run of instructions
        // (a taken jump, a call, an exit), for the slots from `runStart` up to and
        // including the transfer: exact, and nothing to count per instruction.
        var budget = Budget(limit: instructionBudget, remaining: instructionBudget, runStart: 0)

        while true {
            let i = code[pc]
            pc &+= 1
            let d = Int(i.dst)
            let operand = reg[Int(i.src)] & i.srcMask | i.imm
            // Each operation is its own case calling BPFSemantics with that constant
            // operation: the compiler folds the semantics' switch away, so an
            // instruction costs one dispatch.
            switch i.operation {
            case .add64: reg[d] = BPFSemantics.alu(.add64, reg[d], operand)
            case .sub64: reg[d] = BPFSemantics.alu(.sub64, reg[d], operand)
            case .mul64: reg[d] = BPFSemantics.alu(.mul64, reg[d], operand)
            case .div64: reg[d] = BPFSemantics.alu(.div64, reg[d], operand)
            case .sdiv64: reg[d] = BPFSemantics.alu(.sdiv64, reg[d], operand)
            case .or64: reg[d] = BPFSemantics.alu(.or64, reg[d], operand)
            case .and64: reg[d] = BPFSemantics.alu(.and64, reg[d], operand)
            case .lsh64: reg[d] = BPFSemantics.alu(.lsh64, reg[d], operand)
            case .rsh64: reg[d] = BPFSemantics.alu(.rsh64, reg[d], operand)
            case .neg64: reg[d] = BPFSemantics.alu(.neg64, reg[d], operand)
            case .mod64: reg[d] = BPFSemantics.alu(.mod64, reg[d], operand)
            case .smod64: reg[d] = BPFSemantics.alu(.smod64, reg[d], operand)
            case .xor64: reg[d] = BPFSemantics.alu(.xor64, reg[d], operand)
            case .mov64: reg[d] = BPFSemantics.alu(.mov64, reg[d], operand)
            case .movsx8To64: reg[d] = BPFSemantics.alu(.movsx8To64, reg[d], operand)
            case .movsx16To64: reg[d] = BPFSemantics.alu(.movsx16To64, reg[d], operand)
            case .movsx32To64: reg[d] = BPFSemantics.alu(.movsx32To64, reg[d], operand)
            case .arsh64: reg[d] = BPFSemantics.alu(.arsh64, reg[d], operand)
            case .bswap16: reg[d] = BPFSemantics.alu(.bswap16, reg[d], operand)
            case .bswap32: reg[d] = BPFSemantics.alu(.bswap32, reg[d], operand)
            case .bswap64: reg[d] = BPFSemantics.alu(.bswap64, reg[d], operand)
            case .add32: reg[d] = BPFSemantics.alu(.add32, reg[d], operand)
            case .sub32: reg[d] = BPFSemantics.alu(.sub32, reg[d], operand)
            case .mul32: reg[d] = BPFSemantics.alu(.mul32, reg[d], operand)
            case .div32: reg[d] = BPFSemantics.alu(.div32, reg[d], operand)
            case .sdiv32: reg[d] = BPFSemantics.alu(.sdiv32, reg[d], operand)
            case .or32: reg[d] = BPFSemantics.alu(.or32, reg[d], operand)
            case .and32: reg[d] = BPFSemantics.alu(.and32, reg[d], operand)
            case .lsh32: reg[d] = BPFSemantics.alu(.lsh32, reg[d], operand)
            case .rsh32: reg[d] = BPFSemantics.alu(.rsh32, reg[d], operand)
            case .neg32: reg[d] = BPFSemantics.alu(.neg32, reg[d], operand)
            case .mod32: reg[d] = BPFSemantics.alu(.mod32, reg[d], operand)
            case .smod32: reg[d] = BPFSemantics.alu(.smod32, reg[d], operand)
            case .xor32: reg[d] = BPFSemantics.alu(.xor32, reg[d], operand)
            case .mov32: reg[d] = BPFSemantics.alu(.mov32, reg[d], operand)
            case .movsx8To32: reg[d] = BPFSemantics.alu(.movsx8To32, reg[d], operand)
            case .movsx16To32: reg[d] = BPFSemantics.alu(.movsx16To32, reg[d], operand)
            case .arsh32: reg[d] = BPFSemantics.alu(.arsh32, reg[d], operand)
            case .le16: reg[d] = BPFSemantics.alu(.le16, reg[d], operand)
            case .le32: reg[d] = BPFSemantics.alu(.le32, reg[d], operand)
            case .le64: reg[d] = BPFSemantics.alu(.le64, reg[d], operand)
            case .be16: reg[d] = BPFSemantics.alu(.be16, reg[d], operand)
            case .be32: reg[d] = BPFSemantics.alu(.be32, reg[d], operand)
            case .be64: reg[d] = BPFSemantics.alu(.be64, reg[d], operand)
            case .ja: try budget.jump(&pc, to: i.target)
            case .jeq: if BPFSemantics.condition(.jeq, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jgt: if BPFSemantics.condition(.jgt, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jge: if BPFSemantics.condition(.jge, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jset: if BPFSemantics.condition(.jset, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jne: if BPFSemantics.condition(.jne, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsgt: if BPFSemantics.condition(.jsgt, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsge: if BPFSemantics.condition(.jsge, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jlt: if BPFSemantics.condition(.jlt, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jle: if BPFSemantics.condition(.jle, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jslt: if BPFSemantics.condition(.jslt, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsle: if BPFSemantics.condition(.jsle, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jeq32: if BPFSemantics.condition(.jeq32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jgt32: if BPFSemantics.condition(.jgt32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jge32: if BPFSemantics.condition(.jge32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jset32: if BPFSemantics.condition(.jset32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jne32: if BPFSemantics.condition(.jne32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsgt32: if BPFSemantics.condition(.jsgt32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsge32: if BPFSemantics.condition(.jsge32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jlt32: if BPFSemantics.condition(.jlt32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jle32: if BPFSemantics.condition(.jle32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jslt32: if BPFSemantics.condition(.jslt32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .jsle32: if BPFSemantics.condition(.jsle32, reg[d], operand) { try budget.jump(&pc, to: i.target) }
            case .load8: reg[d] = UInt64(try Self.load(i, reg, memory, UInt8.self, pc))
            case .load16: reg[d] = UInt64(try Self.load(i, reg, memory, UInt16.self, pc))
            case .load32: reg[d] = UInt64(try Self.load(i, reg, memory, UInt32.self, pc))
            case .load64: reg[d] = try Self.load(i, reg, memory, UInt64.self, pc)
            case .loadSigned8: reg[d] = UInt64(bitPattern: Int64(try Self.load(i, reg, memory, Int8.self, pc)))
            case .loadSigned16: reg[d] = UInt64(bitPattern: Int64(try Self.load(i, reg, memory, Int16.self, pc)))
            case .loadSigned32: reg[d] = UInt64(bitPattern: Int64(try Self.load(i, reg, memory, Int32.self, pc)))
            case .store8: try Self.store(i, reg, memory, UInt8(truncatingIfNeeded: operand), pc)
            case .store16: try Self.store(i, reg, memory, UInt16(truncatingIfNeeded: operand), pc)
            case .store32: try Self.store(i, reg, memory, UInt32(truncatingIfNeeded: operand), pc)
            case .store64: try Self.store(i, reg, memory, operand, pc)
            case .callHelper:
                reg[0] = try helper(Int(i.target), reg, memory, at: pc - 1)
            case .callLocal:
                guard depth < BPF.maxCallDepth - 1 else { throw .runtime(pc: pc - 1, reason: "call depth exceeds \(BPF.maxCallDepth)") }
                let f = frames + depth * RunBlock.frameWords
                f[0] = UInt64(pc); f[1] = reg[6]; f[2] = reg[7]; f[3] = reg[8]; f[4] = reg[9]; f[5] = reg[10]
                depth += 1
                reg[10] &+= UInt64(BPF.stackSize)  // r10 may hold anything without the verifier
                try budget.jump(&pc, to: i.target)
            case .exit:
                let f = frames + (depth - 1) * RunBlock.frameWords
                try budget.charge(pc, depth == 0 ? 0 : Int(f[0]))
                if depth == 0 { return reg[0] }
                depth -= 1
                pc = Int(f[0]); reg[6] = f[1]; reg[7] = f[2]; reg[8] = f[3]; reg[9] = f[4]; reg[10] = f[5]
            case .atomic32, .atomic64:
                let size = i.operation.accessSize
                let a = reg[d] &+ UInt64(bitPattern: Int64(i.offset))
                guard memory.allows(a, size, write: true) else { throw Self.fault("write", a, size, pc) }
                guard a % UInt64(size) == 0 else {
                    throw .runtime(pc: pc - 1, reason: "atomic operations need an aligned 32- or 64-bit location")
                }
                atomic(i, UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: a))!, reg)
            case .loadImm64:
                reg[d] = i.imm
                pc += 1
            case .loadMap:
                reg[d] = MapHandle.encode(Int(i.target))
                pc += 1
            case .loadMapValue:
                reg[d] = UInt64(mapWindows[Int(i.target)].base) &+ i.imm
                pc += 1
            case .trap:
                throw .runtime(pc: pc - 1, reason: decoded.problems[Int(i.target)])
            }
        }
    }

    /// A load of a `T` for the instruction just before `pc`, checked against the regions.
    @inline(__always)
    private static func load<T: FixedWidthInteger>(_ i: DecodedInstruction, _ reg: UnsafeMutablePointer<UInt64>,
                                                   _ memory: MemoryWindows, _ type: T.Type, _ pc: Int) throws(BPFError) -> T {
        let a = reg[Int(i.src)] &+ UInt64(bitPattern: Int64(i.offset))
        guard memory.allows(a, MemoryLayout<T>.size, write: false) else { throw fault("read", a, MemoryLayout<T>.size, pc) }
        return UnsafeRawPointer(bitPattern: UInt(truncatingIfNeeded: a))!.loadUnaligned(as: T.self)
    }

    /// A store of `value` for the instruction just before `pc`, checked against the regions.
    @inline(__always)
    private static func store<T: FixedWidthInteger>(_ i: DecodedInstruction, _ reg: UnsafeMutablePointer<UInt64>,
                                                    _ memory: MemoryWindows, _ value: T, _ pc: Int) throws(BPFError) {
        let a = reg[Int(i.dst)] &+ UInt64(bitPattern: Int64(i.offset))
        guard memory.allows(a, MemoryLayout<T>.size, write: true) else { throw fault("write", a, MemoryLayout<T>.size, pc) }
        UnsafeMutableRawPointer(bitPattern: UInt(truncatingIfNeeded: a))!.storeBytes(of: value, as: T.self)
    }

    private static func fault(_ what: String, _ a: UInt64, _ size: Int, _ pc: Int) -> BPFError {
        .runtime(pc: pc - 1, reason: "\(what) of \(size) bytes at 0x\(String(a, radix: 16)) is outside the context, the stack and map values")
    }

    /// One atomic read-modify-write (RFC 9669 §5.3) at an aligned location; the
    /// fetched value goes to the source register (FETCH) or r0 (CMPXCHG), and
    /// 32-bit results are zero-extended.
    private func atomic(_ i: DecodedInstruction, _ p: UnsafeMutableRawPointer, _ reg: UnsafeMutablePointer<UInt64>) {
        let s = Int(i.src)
        if i.operation == .atomic64 {
            let a = UnsafeAtomic<UInt64>(at: p.assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self))
            atomicOperation(a, i.target, value: reg[s], srcRegister: &reg[s], r0: &reg[0])
        } else {
            let a = UnsafeAtomic<UInt32>(at: p.assumingMemoryBound(to: UnsafeAtomic<UInt32>.Storage.self))
            var src = UInt32(truncatingIfNeeded: reg[s]), r0 = UInt32(truncatingIfNeeded: reg[0])
            let (srcChanged, r0Changed) = atomicOperation(a, i.target, value: src, srcRegister: &src, r0: &r0)
            if srcChanged { reg[s] = UInt64(src) }
            if r0Changed { reg[0] = UInt64(r0) }
        }
    }

    /// Performs atomic operation `code` (decoding made sure it is one RFC 9669 defines);
    /// returns which of the source register and r0 it wrote.
    @discardableResult
    private func atomicOperation<T: AtomicInteger & FixedWidthInteger>(
        _ a: UnsafeAtomic<T>, _ code: Int32, value v: T, srcRegister: inout T, r0: inout T
    ) -> (Bool, Bool) where T.AtomicRepresentation.Value == T {
        let fetch = code & BPF.atomicFetch != 0
        let old: T
        switch code & ~BPF.atomicFetch {
        case 0x00: old = a.loadThenWrappingIncrement(by: v, ordering: .sequentiallyConsistent)
        case 0x40: old = a.loadThenBitwiseOr(with: v, ordering: .sequentiallyConsistent)
        case 0x50: old = a.loadThenBitwiseAnd(with: v, ordering: .sequentiallyConsistent)
        case 0xA0: old = a.loadThenBitwiseXor(with: v, ordering: .sequentiallyConsistent)
        case 0xE0: old = a.exchange(v, ordering: .sequentiallyConsistent)
        default:  // 0xF0: compare-and-exchange against r0
            r0 = a.compareExchange(expected: r0, desired: v, ordering: .sequentiallyConsistent).original
            return (false, true)
        }
        if fetch { srcRegister = old }
        return (fetch, false)
    }

    /// Helper calls (ids as in Linux).
    private func helper(_ id: Int, _ reg: UnsafeMutablePointer<UInt64>, _ memory: MemoryWindows,
                        at pc: Int) throws(BPFError) -> UInt64 {
        let maps = program.maps
        func map(_ v: UInt64) throws(BPFError) -> BPFMap {
            guard let i = MapHandle.decode(v, count: maps.count) else { throw .runtime(pc: pc, reason: "r1 is not a map") }
            return maps[i]
        }
        func buffer(_ a: UInt64, _ n: Int, _ what: String) throws(BPFError) -> UnsafeRawBufferPointer {
            guard memory.allows(a, n, write: false) else { throw .runtime(pc: pc, reason: "\(what) of \(n) bytes at 0x\(String(a, radix: 16)) is not readable") }
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

/// A helper's error, carried out of compiled code.
final class HelperFailure {
    let error: BPFError
    init(_ error: BPFError) { self.error = error }
}

/// What is left of a run's instruction budget.
struct Budget {
    let limit: Int
    var remaining: Int
    /// Where the current straight run of instructions began.
    var runStart: Int

    /// Charges the slots from `runStart` to `pc` (just past a jump, call or exit)
    /// and starts the next run at `next`.
    @inline(__always)
    mutating func charge(_ pc: Int, _ next: Int) throws(BPFError) {
        remaining &-= pc &- runStart
        if remaining < 0 { throw .budgetExceeded(limit) }
        runStart = next
    }

    /// A taken jump or call from just before `pc` to `target`: charged, then taken.
    @inline(__always)
    mutating func jump(_ pc: inout Int, to target: Int32) throws(BPFError) {
        try charge(pc, Int(target))
        pc = Int(target)
    }
}

/// The memory a run may touch: the context, the stack, and the maps' values.
struct MemoryWindows {
    let contextBase: UInt, contextBytes: UInt, writable: Bool
    let stackBase: UInt, stackBytes: UInt
    let maps: UnsafeBufferPointer<MapWindow>

    init(context: UnsafeMutableRawBufferPointer, writable: Bool, stack: UnsafeMutableRawPointer, stackBytes: Int,
         maps: UnsafeBufferPointer<MapWindow>) {
        self.init(contextBase: UInt(bitPattern: context.baseAddress), contextBytes: UInt(context.count), writable: writable,
                  stackBase: UInt(bitPattern: stack), stackBytes: UInt(stackBytes), maps: maps)
    }

    init(contextBase: UInt, contextBytes: UInt, writable: Bool, stackBase: UInt, stackBytes: UInt, maps: UnsafeBufferPointer<MapWindow>) {
        self.contextBase = contextBase; self.contextBytes = contextBytes; self.writable = writable
        self.stackBase = stackBase; self.stackBytes = stackBytes
        self.maps = maps
    }

    /// Whether [a, a + size) lies inside one region (and, for a write, a writable one).
    @inline(__always)
    func allows(_ a: UInt64, _ size: Int, write: Bool) -> Bool {
        let addr = UInt(truncatingIfNeeded: a), n = UInt(size)
        // Offsets from a region's base wrap around below it, so one comparison checks both ends.
        if addr &- stackBase <= stackBytes &- n { return true }
        if contextBytes >= n && addr &- contextBase <= contextBytes &- n { return !write || writable }
        for m in maps where m.contains(addr, n) { return true }
        return false
    }
}

/// The memory one run works in: a header, r0-r10, the saved state of up to
/// `maxCallDepth` frames, and one 512-byte stack per frame. Each thread keeps one
/// block (made on its first run, freed when the thread exits), so a run allocates
/// nothing; a run nested in another on the same thread (a helper's callback
/// running a program) gets a block of its own for that run.
enum RunBlock {
    /// Header words: whether a run is using the block, and whether it is the thread's.
    static let inUse = 0, isThreadBlock = 1
    static let registersOffset = 16
    static let frameWords = 6
    static let framesOffset = registersOffset + 96
    static let stackOffset = framesOffset + frameWords * 8 * BPF.maxCallDepth
    static let stackBytes = BPF.stackSize * BPF.maxCallDepth
    static let size = stackOffset + stackBytes

    /// The key under which each thread keeps its block.
    static let key: pthread_key_t = {
        var key = pthread_key_t()
        let status = pthread_key_create(&key) { block in block?.deallocate() }
        precondition(status == 0, "pthread_key_create failed: \(status)")
        return key
    }()

    private static func make(threadBlock: Bool) -> UnsafeMutableRawPointer {
        let block = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        let header = block.assumingMemoryBound(to: UInt64.self)
        header[inUse] = 1
        header[isThreadBlock] = threadBlock ? 1 : 0
        return block
    }

    /// The calling thread's block, marked in use (or a fresh one if it already is).
    @inline(__always)
    static func acquire(_ key: pthread_key_t) -> UnsafeMutableRawPointer {
        guard let block = pthread_getspecific(key) else {
            let block = make(threadBlock: true)
            pthread_setspecific(key, block)
            return block
        }
        let header = block.assumingMemoryBound(to: UInt64.self)
        if header[inUse] != 0 { return make(threadBlock: false) }
        header[inUse] = 1
        return block
    }

    @inline(__always)
    static func release(_ block: UnsafeMutableRawPointer) {
        let header = block.assumingMemoryBound(to: UInt64.self)
        if header[isThreadBlock] != 0 { header[inUse] = 0 } else { block.deallocate() }
    }
}
