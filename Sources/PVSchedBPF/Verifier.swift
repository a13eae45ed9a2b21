/// What the verifier knows about the memory r1 points to at entry.
public struct ContextDescription: Sendable {
    public var size: Int
    public var writable: Bool
    /// The context is a raw memory region (`pvsched bpf run`'s blob), not a driver
    /// context: r2 holds its length at entry (as other runtimes' test harnesses
    /// pass it), and accesses to it may be misaligned, as Linux allows for memory
    /// on x86 (no strict alignment). A driver context follows Linux's per-type
    /// context rule instead: only r1, and aligned accesses. The stack is always
    /// aligned, as in Linux.
    public var memoryBlob: Bool
    public init(size: Int, writable: Bool, memoryBlob: Bool = false) {
        self.size = size; self.writable = writable; self.memoryBlob = memoryBlob
    }
}

/// Checks a program before it may run, rejecting it with a message that names the
/// instruction and the reason: malformed instructions, jumps out of range,
/// unreachable code, loops (unbounded until proven otherwise), uninitialised
/// registers and stack, out-of-bounds context/stack/map-value access, writes to
/// the read-only context, unchecked map lookups, unknown helpers.
///
/// Structural checks run on the control-flow graph; then every path is
/// interpreted abstractly, with a cap on the work (`maxStates` instructions).
///
/// Loops (back-edges), as Linux 5.3 and later: a loop is accepted when every path
/// through it is explored to its end within the cap, which proves it bounded (a
/// counter with known values, such as `for (i = 0; i < 16; i++)`). A loop that
/// comes back to an instruction in exactly the state it had before can never end
/// and is rejected at once. With `allowUnprovenLoops` (the runtime's instruction
/// budget is then what guarantees termination), a loop is explored until its
/// state repeats, with known values widened to unknown after a few iterations.
public struct Verifier {
    public let program: Program
    public let context: ContextDescription
    public var maxStates = 200_000
    /// A cap on the loop-head states kept at once (the explored ones, and each pending
    /// path's own history, which a branch inside a loop copies at every iteration):
    /// the verifier's memory, as `maxStates` is its time.
    public var maxKeptStates = 100_000
    /// Accept loops the verifier cannot prove bounded; the interpreter's
    /// instruction budget ends them at run time.
    public var allowUnprovenLoops = false

    /// The program decoded (the same form the interpreter runs).
    let decoded: DecodedProgram

    public init(program: Program, context: ContextDescription, allowUnprovenLoops: Bool = false) {
        self.program = program; self.context = context; self.allowUnprovenLoops = allowUnprovenLoops
        decoded = DecodedProgram(program)
    }

    private var code: [Instruction] { program.instructions }

    func reject(_ pc: Int, _ reason: String) -> BPFError {
        .rejected(pc: pc, instruction: Disassembler.text(decoded, at: pc, mapNames: program.maps.map(\.definition.name)), reason: reason)
    }

    public func verify() throws(BPFError) {
        guard !code.isEmpty else { throw reject(0, "empty program") }
        guard code.count <= 1_000_000 else { throw reject(0, "program too large") }
        let successors = try structure()
        let loopHeads = try checkReachable(successors)
        try explore(loopHeads: loopHeads)
    }

    // MARK: structure

    /// Successors of each instruction (index -1 entries omitted); validates jumps.
    private func structure() throws(BPFError) -> [[Int]] {
        var isSecondSlot = Array(repeating: false, count: code.count)
        for pc in code.indices where code[pc].isLoadImm64 {
            guard pc + 1 < code.count else { throw reject(pc, "ldimm64 is missing its second half") }
            guard code[pc + 1].opcode == 0, code[pc + 1].dst == 0, code[pc + 1].src == 0, code[pc + 1].offset == 0 else {
                throw reject(pc + 1, "invalid second half of ldimm64")
            }
            isSecondSlot[pc + 1] = true
        }
        var succ = Array(repeating: [Int](), count: code.count)
        var pc = 0
        while pc < code.count {
            let i = decoded.instructions[pc]
            if let problem = decoded.problem(at: pc) { throw reject(pc, problem) }
            if let problem = reservedFieldProblem(pc) { throw reject(pc, problem) }
            func target() throws(BPFError) -> Int {
                let t = decoded.writtenDestination(at: pc)
                guard t >= 0 && t < code.count else { throw reject(pc, "jump out of range (to \(t), program has \(code.count) instructions)") }
                guard !isSecondSlot[t] else { throw reject(pc, "jump into the middle of ldimm64 at \(t - 1)") }
                return t
            }
            switch i.operation.group {
            case .loadImm64:
                guard pc + 2 < code.count else { throw reject(pc, "falls through the end of the program") }
                succ[pc] = [pc + 2]
                pc += 2
                continue
            case .jump: succ[pc] = i.operation == .ja ? [try target()] : [pc + 1, try target()]
            case .exit: succ[pc] = []
            case .call: succ[pc] = i.operation == .callLocal ? [try target(), pc + 1] : [pc + 1]
            default: succ[pc] = [pc + 1]
            }
            for s in succ[pc] where s >= code.count { throw reject(pc, "falls through the end of the program") }
            pc += 1
        }
        return succ
    }

    /// Fields an instruction must leave zero, and values it must keep in range,
    /// beyond what decoding needs (the kernel is as strict; the interpreter runs
    /// such instructions leniently when verification is skipped).
    private func reservedFieldProblem(_ pc: Int) -> String? {
        let i = code[pc], op = decoded.instructions[pc].operation
        let isX = i.opcode & BPF.x != 0
        let code4 = i.opcode & 0xF0
        switch op.group {
        case .alu64, .alu32:
            let isDivision = code4 == 0x30 || code4 == 0x90
            if isDivision && !(i.offset == 0 || i.offset == 1) { return "invalid division offset" }
            if code4 == 0xB0 && !(i.offset == 0 || i.offset == 8 || i.offset == 16 || (op.group == .alu64 && i.offset == 32)) {
                return "invalid sign-extension width \(i.offset)"
            }
            if (code4 == 0x60 || code4 == 0x70 || code4 == 0xC0) && !isX {
                let width: Int32 = op.group == .alu64 ? 64 : 32
                guard i.imm >= 0 && i.imm < width else { return "invalid shift \(i.imm) (a constant shift must be 0...\(width - 1))" }
            }
            if code4 == 0x80 {
                guard !isX, i.src == 0, i.offset == 0, i.imm == 0 else { return "neg uses reserved fields" }
            } else if code4 == 0xD0 {
                guard i.src == 0, i.offset == 0, op.group == .alu32 || !isX else { return "byte swap uses reserved fields" }
            } else if isX {
                guard i.imm == 0, i.offset == 0 || (isDivision && i.offset == 1) || code4 == 0xB0 else { return "ALU uses reserved fields" }
            } else {
                guard i.src == 0, i.offset == 0 || (isDivision && i.offset == 1) else { return "ALU uses reserved fields" }
                if isDivision && i.imm == 0 { return "division by zero" }
            }
        case .jump:
            if op == .ja {
                if isX { return "invalid opcode 0x\(String(i.opcode, radix: 16))" }
                // As Linux: `goto` (JMP) takes its target from off, `gotol` (JMP32) from imm; nothing else is used.
                let jmp32 = i.opcode & 0x07 == 0x06
                guard i.src == 0, i.dst == 0, jmp32 ? i.offset == 0 : i.imm == 0 else { return "BPF_JA uses reserved fields" }
                return nil
            }
            guard isX ? i.imm == 0 : i.src == 0 else { return "jump uses reserved fields" }
        case .call:
            if op == .callHelper && i.src != 0 { return "calls to kernel functions are not supported" }
        case .load:
            guard i.imm == 0 else { return "load uses reserved fields" }
        case .store:
            guard i.opcode & 0x07 == BPF.stx ? i.imm == 0 : i.src == 0 else { return "store uses reserved fields" }
        default:
            break
        }
        return nil
    }

    /// Checks that every instruction is reachable; returns the targets of back-edges (loop heads).
    private func checkReachable(_ succ: [[Int]]) throws(BPFError) -> Set<Int> {
        // 0 unvisited, 1 on the DFS stack, 2 done.
        var color = Array(repeating: UInt8(0), count: code.count)
        var stack: [(Int, Int)] = [(0, 0)]
        var loopHeads = Set<Int>()
        color[0] = 1
        while let (node, next) = stack.last {
            if next < succ[node].count {
                stack[stack.count - 1].1 += 1
                let s = succ[node][next]
                if color[s] == 1 { loopHeads.insert(s) }
                if color[s] == 0 { color[s] = 1; stack.append((s, 0)) }
            } else {
                color[node] = 2
                stack.removeLast()
            }
        }
        var pc = 0
        while pc < code.count {
            if color[pc] == 0 { throw reject(pc, "unreachable instruction") }
            pc += code[pc].isLoadImm64 ? 2 : 1
        }
        return loopHeads
    }

    // MARK: abstract interpretation

    enum Value: Hashable {
        case uninit
        case scalar(UInt64?)                  // known value, if any
        case ctx(Int)
        case stack(frame: Int, offset: Int)   // offset from that frame's r10 (negative)
        case mapPtr(Int)
        case mapValue(map: Int, offset: Int)
        case mapValueOrNull(map: Int, offset: Int, id: Int)

        var isPointer: Bool {
            switch self { case .uninit, .scalar: return false; default: return true }
        }
        var name: String {
            switch self {
            case .uninit: return "uninitialized"
            case .scalar: return "a scalar"
            case .ctx: return "a context pointer"
            case .stack: return "a stack pointer"
            case .mapPtr: return "a map"
            case .mapValue: return "a map value pointer"
            case .mapValueOrNull: return "a map value pointer that may be NULL"
            }
        }
    }

    struct Frame: Hashable {
        var regs: [Value] = Array(repeating: .uninit, count: BPF.maxRegisters)
        var stackInit = [Bool](repeating: false, count: BPF.stackSize)
        var spills: [Int: Value] = [:]        // 8-byte aligned slot offset -> pointer spilled there
        var returnPC = -1
    }

    struct State {
        var pc: Int
        var frames: [Frame]
        var nextID = 1
        /// The states this path reached each loop head in, and how often it did. All
        /// of them, not the last only: a loop whose state cycles with a period above
        /// one (`w2 = -w2` alternates two values) also runs forever.
        var statesAtHead: [Int: Set<[Frame]>] = [:]
        var headVisits: [Int: Int] = [:]
        /// How many states `statesAtHead` holds (loop heads are few).
        var kept: Int { statesAtHead.values.reduce(0) { $0 + $1.count } }
    }

    /// How many times a loop head is explored with known values before, with
    /// `allowUnprovenLoops`, they are widened to unknown so that its state settles.
    static let iterationsBeforeWidening = 8

    private func explore(loopHeads: Set<Int>) throws(BPFError) {
        var entry = Frame()
        entry.regs[1] = .ctx(0)
        if context.memoryBlob { entry.regs[2] = .scalar(UInt64(context.size)) }
        entry.regs[10] = .stack(frame: 0, offset: 0)
        var work = [State(pc: 0, frames: [entry])]
        // Per loop head: the states any path reached it in. A path that reaches a
        // head in a state another path already explored from is pruned (what follows
        // was or will be verified); one that reaches it in a state it had itself
        // earlier loops forever.
        var seen: [Int: Set<[Frame]>] = [:]
        var steps = 0
        // States kept: in `seen`, and in the pending paths' own histories.
        var keptSeen = 0, keptPending = 0
        paths: while var st = work.popLast() {
            keptPending -= st.kept
            while true {
                steps += 1
                if steps > maxStates {
                    if let head = loopHeads.min() {
                        throw reject(st.pc, "the loop at instruction \(head) could not be proven bounded within \(maxStates) instructions "
                                     + "(load with loops allowed to rely on the runtime budget)")
                    }
                    throw reject(st.pc, "program too complex to verify (\(maxStates) states)")
                }
                if loopHeads.contains(st.pc) {
                    let visits = st.headVisits[st.pc, default: 0]
                    st.headVisits[st.pc] = visits + 1
                    if allowUnprovenLoops && visits >= Self.iterationsBeforeWidening { widen(&st) }
                    if st.statesAtHead[st.pc]?.contains(st.frames) == true {
                        // The same instruction in a state this path had here before: it runs the same, forever.
                        if allowUnprovenLoops { continue paths }  // verified from this state already
                        throw reject(st.pc, "infinite loop: instruction \(st.pc) is reached again in the same state")
                    }
                    if seen[st.pc, default: []].contains(st.frames) { continue paths }
                    st.statesAtHead[st.pc, default: []].insert(st.frames)
                    seen[st.pc, default: []].insert(st.frames)
                    keptSeen += 1
                    if keptSeen + keptPending + st.kept > maxKeptStates {
                        throw reject(st.pc, "the loop at instruction \(st.pc) could not be proven bounded within \(maxKeptStates) kept states "
                                     + "(load with loops allowed to rely on the runtime budget)")
                    }
                }
                let outcome = try step(&st)
                switch outcome {
                case .next: continue
                case .done: break
                case .branch(let other): work.append(other); keptPending += other.kept; continue
                }
                break
            }
        }
    }

    /// Forgets the known values of scalars in registers (not pointers), so that a
    /// loop's states stop changing from one iteration to the next.
    private func widen(_ st: inout State) {
        for k in st.frames.indices {
            for r in 0..<BPF.maxRegisters {
                if case .scalar(.some) = st.frames[k].regs[r] { st.frames[k].regs[r] = .scalar(nil) }
            }
        }
    }

    enum StepOutcome { case next, done, branch(State) }

    private func read(_ f: Frame, _ r: Int, _ pc: Int) throws(BPFError) -> Value {
        let v = f.regs[r]
        if v == .uninit { throw reject(pc, "r\(r) is read before it is initialized") }
        return v
    }

    private func step(_ st: inout State) throws(BPFError) -> StepOutcome {
        let pc = st.pc
        let i = decoded.instructions[pc]
        let op = i.operation
        let d = Int(i.dst), s = Int(i.src)
        var f = st.frames[st.frames.count - 1]
        defer { st.frames[st.frames.count - 1] = f }
        func writable(_ r: Int) throws(BPFError) {
            if r == 10 { throw reject(pc, "r10 (the frame pointer) is read-only") }
        }
        func operand() throws(BPFError) -> Value { i.operandIsRegister ? try read(f, s, pc) : .scalar(i.imm) }
        switch op.group {
        case .alu64, .alu32:
            try writable(d)
            let src = try operand()
            if op == .mov64 { f.regs[d] = src; break }
            if op == .mov32 {
                if src.isPointer { throw reject(pc, "32-bit move of \(src.name) would leak a pointer as a scalar") }
                if case .scalar(let v) = src { f.regs[d] = .scalar(v.map { $0 & 0xFFFF_FFFF }) }
                break
            }
            let isMove = op == .movsx8To64 || op == .movsx16To64 || op == .movsx32To64 || op == .movsx8To32 || op == .movsx16To32
            let dv: Value = isMove ? .scalar(nil) : try read(f, d, pc)
            if dv.isPointer || src.isPointer {
                guard op == .add64 || op == .sub64, !src.isPointer || op == .add64 && !dv.isPointer,
                      case .scalar(let k?) = (dv.isPointer ? src : dv) else {
                    throw reject(pc, "arithmetic on \(dv.isPointer ? dv.name : src.name) is not allowed (only adding or subtracting a known constant)")
                }
                let delta = Int(Int64(bitPattern: op == .sub64 ? 0 &- k : k))
                f.regs[d] = try offsetPointer(dv.isPointer ? dv : src, by: delta, pc)
                break
            }
            guard case .scalar(let a) = dv, case .scalar(let b) = src else { throw reject(pc, "internal: scalar expected") }
            f.regs[d] = .scalar(fold(op, a, b))
        case .jump:
            if op == .ja {
                st.pc = Int(i.target)
                return .next
            }
            let a = try read(f, d, pc)
            let b = try operand()
            let isEq = op == .jeq || op == .jeq32, isNe = op == .jne || op == .jne32
            if a.isPointer, !(isEq || isNe), case .mapValueOrNull = a {
                throw reject(pc, "only == and != comparisons of \(a.name) with 0 are allowed")
            }
            var taken = st
            taken.pc = Int(i.target)
            st.pc = pc + 1
            var takenFrame = f
            // A NULL check refines a lookup result on both paths.
            if case .mapValueOrNull(let m, let off, let id) = a, case .scalar(0?) = b, isEq || isNe {
                let isNull: Value = .scalar(0), nonNull: Value = .mapValue(map: m, offset: off)
                for r in 0..<BPF.maxRegisters {
                    if case .mapValueOrNull(_, _, let rid) = f.regs[r], rid == id {
                        takenFrame.regs[r] = isEq ? isNull : nonNull
                        f.regs[r] = isEq ? nonNull : isNull
                    }
                }
            }
            // Branches on known constants follow only the feasible side.
            if case .scalar(let x?) = a, case .scalar(let y?) = b {
                if BPFSemantics.condition(op, x, y) { f = takenFrame; st.pc = taken.pc }
                return .next
            }
            taken.frames[taken.frames.count - 1] = takenFrame
            return .branch(taken)
        case .exit:
            let r0 = try read(f, 0, pc)
            if st.frames.count == 1 {
                if r0.isPointer { throw reject(pc, "r0 is \(r0.name) at exit: a program must return a scalar") }
                return .done
            }
            let callee = st.frames.removeLast()
            f = st.frames[st.frames.count - 1]
            f.regs[0] = r0
            for r in 1...5 { f.regs[r] = .uninit }
            st.pc = callee.returnPC
            return .next
        case .call:
            if op == .callLocal {
                guard st.frames.count < BPF.maxCallDepth else { throw reject(pc, "call depth exceeds \(BPF.maxCallDepth)") }
                var callee = Frame()
                for r in 1...5 { callee.regs[r] = f.regs[r] }
                callee.regs[10] = .stack(frame: st.frames.count, offset: 0)
                callee.returnPC = pc + 1
                st.frames[st.frames.count - 1] = f
                st.frames.append(callee)
                f = callee
                st.pc = Int(i.target)
                return .next
            }
            try helperCall(Int(i.target), &f, &st.nextID, st.frames, pc)
        case .load:
            try writable(d)
            let base = try read(f, s, pc)
            f.regs[d] = try access(base, Int(i.offset), op.accessSize, write: false, &f, st.frames, pc)
        case .store:
            let base = try read(f, d, pc)
            let value = try operand()
            _ = try access(base, Int(i.offset), op.accessSize, write: true, &f, st.frames, pc, stored: value)
        case .atomic:
            let base = try read(f, d, pc)
            let size = op.accessSize
            let v = try read(f, s, pc)
            if v.isPointer { throw reject(pc, "atomic operand r\(s) is \(v.name)") }
            if i.target == BPF.atomicCmpxchg { _ = try read(f, 0, pc) }
            switch base {
            case .stack, .mapValue: break
            default: throw reject(pc, "atomic operation on \(base.name)")
            }
            _ = try access(base, Int(i.offset), size, write: false, &f, st.frames, pc)
            _ = try access(base, Int(i.offset), size, write: true, &f, st.frames, pc, stored: .scalar(nil))
            if i.target & BPF.atomicFetch != 0 {
                if i.target == BPF.atomicCmpxchg { f.regs[0] = .scalar(nil) } else { try writable(s); f.regs[s] = .scalar(nil) }
            }
        case .loadImm64:
            switch op {
            case .loadMap: f.regs[d] = .mapPtr(Int(i.target))
            case .loadMapValue: f.regs[d] = .mapValue(map: Int(i.target), offset: Int(code[pc + 1].imm))
            default: f.regs[d] = .scalar(i.imm)
            }
            st.pc = pc + 2
            return .next
        case .trap:
            throw reject(pc, decoded.problem(at: pc) ?? "invalid instruction")
        }
        st.pc = pc + 1
        return .next
    }

    /// Largest pointer offset tracked (as Linux's BPF_MAX_VAR_OFF): beyond it no
    /// access can be valid, and offset arithmetic stays far from overflowing.
    static let maxPointerOffset = 1 << 29

    private func offsetPointer(_ p: Value, by delta: Int, _ pc: Int) throws(BPFError) -> Value {
        func moved(_ o: Int) throws(BPFError) -> Int {
            let (n, overflow) = o.addingReportingOverflow(delta)
            guard !overflow, n >= -Self.maxPointerOffset, n <= Self.maxPointerOffset else {
                throw reject(pc, "pointer offset \(o) + \(delta) is out of range (at most ±\(Self.maxPointerOffset))")
            }
            return n
        }
        switch p {
        case .ctx(let o): return .ctx(try moved(o))
        case .stack(let fr, let o): return .stack(frame: fr, offset: try moved(o))
        case .mapValue(let m, let o): return .mapValue(map: m, offset: try moved(o))
        default: throw reject(pc, "arithmetic on \(p.name) is not allowed")
        }
    }

    /// Checks a memory access and returns what a load yields.
    private func access(_ base: Value, _ off: Int, _ size: Int, write: Bool, _ f: inout Frame, _ frames: [Frame],
                        _ pc: Int, stored: Value? = nil) throws(BPFError) -> Value {
        if let stored, stored.isPointer, !(size == 8) { throw reject(pc, "partial store of \(stored.name)") }
        switch base {
        case .ctx(let o):
            let at = o + off
            guard at >= 0, at + size <= context.size else {
                throw reject(pc, "context access at offset \(at) size \(size) is outside the \(context.size)-byte context")
            }
            guard at % size == 0 || context.memoryBlob else {
                throw reject(pc, "misaligned context access at offset \(at) size \(size)")
            }
            if write {
                guard context.writable else { throw reject(pc, "write to the read-only context (offset \(at)): guest fields may not be written") }
                if let stored, stored.isPointer { throw reject(pc, "storing \(stored.name) into the context leaks a pointer") }
            }
            return .scalar(nil)
        case .stack(let frame, let o):
            let at = o + off
            guard at >= -BPF.stackSize, at + size <= 0 else {
                throw reject(pc, "stack access at fp\(at) size \(size) is outside the \(BPF.stackSize)-byte stack")
            }
            // As in Linux, stack accesses are always aligned (its spill tracking relies on it).
            guard at % size == 0 else { throw reject(pc, "misaligned stack access at fp\(at) size \(size)") }
            let idx = BPF.stackSize + at
            if frame != frames.count - 1 {
                // Access to a caller's stack through a passed pointer: reads only of initialized bytes.
                guard !write else { throw reject(pc, "writes to a caller's stack are not supported") }
                guard frames[frame].stackInit[idx..<(idx + size)].allSatisfy({ $0 }) else {
                    throw reject(pc, "read of uninitialized stack at fp\(at)")
                }
                return .scalar(nil)
            }
            if write {
                for k in idx..<(idx + size) { f.stackInit[k] = true }
                let slot = at & ~7
                f.spills[slot] = nil
                if size == 8, at % 8 == 0, let stored, stored.isPointer { f.spills[at] = stored }
                return .scalar(nil)
            }
            guard f.stackInit[idx..<(idx + size)].allSatisfy({ $0 }) else {
                throw reject(pc, "read of uninitialized stack at fp\(at) size \(size)")
            }
            if size == 8, at % 8 == 0, let spilled = f.spills[at] { return spilled }
            return .scalar(nil)
        case .mapValue(let m, let o):
            let at = o + off, vs = program.maps[m].definition.valueSize
            guard at >= 0, at + size <= vs else {
                throw reject(pc, "map '\(program.maps[m].definition.name)' value access at offset \(at) size \(size) is outside its \(vs)-byte value")
            }
            if let stored, stored.isPointer { throw reject(pc, "storing \(stored.name) into a map value leaks a pointer") }
            return .scalar(nil)
        case .mapValueOrNull:
            throw reject(pc, "possible NULL dereference: check the result of bpf_map_lookup_elem against 0 first")
        default:
            throw reject(pc, "memory access through \(base.name)")
        }
    }

    /// Checks that r`r` points to `size` readable, initialized bytes.
    private func checkBuffer(_ r: Int, _ size: Int, _ what: String, _ f: inout Frame, _ frames: [Frame], _ pc: Int) throws(BPFError) {
        let v = try read(f, r, pc)
        switch v {
        case .stack, .mapValue, .ctx:
            // Byte by byte: bounds everywhere, initialization on the stack.
            for k in 0..<max(size, 1) { _ = try access(v, k, 1, write: false, &f, frames, pc) }
        default:
            throw reject(pc, "r\(r) (\(what)) is \(v.name), expected a pointer to \(size) readable bytes")
        }
    }

    private func helperCall(_ id: Int, _ f: inout Frame, _ nextID: inout Int, _ frames: [Frame], _ pc: Int) throws(BPFError) {
        guard let h = Helper(rawValue: id) else { throw reject(pc, "call to unknown helper \(id)") }
        func map() throws(BPFError) -> Int {
            guard case .mapPtr(let m) = try read(f, 1, pc) else { throw reject(pc, "r1 must be a map for helper \(id)") }
            return m
        }
        var result: Value = .scalar(nil)
        switch h {
        case .mapLookup:
            let m = try map()
            try checkBuffer(2, program.maps[m].definition.keySize, "key", &f, frames, pc)
            result = .mapValueOrNull(map: m, offset: 0, id: nextID)
            nextID += 1
        case .mapUpdate:
            let m = try map()
            try checkBuffer(2, program.maps[m].definition.keySize, "key", &f, frames, pc)
            try checkBuffer(3, program.maps[m].definition.valueSize, "value", &f, frames, pc)
            if try read(f, 4, pc).isPointer { throw reject(pc, "r4 (flags) must be a scalar") }
        case .mapDelete:
            let m = try map()
            try checkBuffer(2, program.maps[m].definition.keySize, "key", &f, frames, pc)
        case .tracePrintk:
            guard case .scalar(let n?) = try read(f, 2, pc), n > 0, n <= 256 else {
                throw reject(pc, "r2 (format size) must be a known constant in 1...256")
            }
            try checkBuffer(1, Int(n), "format", &f, frames, pc)
            for r in 3...5 where f.regs[r].isPointer { throw reject(pc, "r\(r) passes \(f.regs[r].name) to bpf_trace_printk") }
        case .ktimeGetNs, .prandomU32:
            break
        }
        for r in 1...5 { f.regs[r] = .uninit }
        f.regs[0] = result
    }

    /// The value of an ALU operation on known operands, computed as the interpreter
    /// would (nil when an operand is unknown).
    private func fold(_ op: BPFOperation, _ a: UInt64?, _ b: UInt64?) -> UInt64? {
        guard let a, let b else { return nil }
        return BPFSemantics.alu(op, a, b)
    }
}
