#if canImport(Glibc)
import Glibc
#endif

/// Compiles a verified program's decoded form to x86-64 machine code, as Linux's
/// BPF JIT does: BPF r0-r5 live in the registers the C calling convention passes
/// arguments and returns results in (rax, rdi, rsi, rdx, rcx, r8), so a helper is
/// a plain call; r6-r9 and the frame pointer r10 live in callee-saved registers
/// (rbx, r13, r14, r15, rbp); r12 points at the run's `JITState`.
///
/// Only programs the verifier accepted (with provably bounded loops) are compiled.
/// Every load and store is still checked against the run's stack and context in
/// line, and against the maps' values out of line, so that a verifier bug cannot
/// become a stray access: a failed check ends the run with the same runtime error
/// the interpreter gives. Division and modulo call `BPFSemantics`, the one
/// definition of their edge cases.
// @unchecked Sendable: the code is written once in init, then only executed; it is unmapped in deinit.
final class JITProgram: @unchecked Sendable {
    typealias Entry = @convention(c) (UnsafeMutableRawPointer?, UnsafeMutableRawPointer) -> UInt64
    private let memory: UnsafeMutableRawPointer
    private let size: Int
    let entry: Entry

    /// Compiles `program`; nil when this machine cannot run the code (not x86-64,
    /// or no executable memory) or the program uses what the compiler leaves to the
    /// interpreter (a trap: such a program never passes the verifier anyway).
    init?(_ program: DecodedProgram, maps: [BPFMap]) {
        #if arch(x86_64)
        var compiler = JITCompiler(program: program, maps: maps)
        guard let bytes = compiler.compile() else { return nil }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        size = (bytes.count + page - 1) / page * page
        guard let m = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), m != MAP_FAILED else { return nil }
        bytes.withUnsafeBytes { m.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        guard mprotect(m, size, PROT_READ | PROT_EXEC) == 0 else { munmap(m, size); return nil }
        memory = m
        entry = unsafeBitCast(m, to: Entry.self)
        #else
        return nil
        #endif
    }

    deinit { munmap(memory, size) }
}

/// The words a compiled program reads and writes during a run, where the run
/// block keeps the interpreter's registers and frames (a compiled run uses neither).
enum JITState {
    // Words (8 bytes each), at r12 + 8 × word.
    static let stackBase = 0, contextBase = 1, contextLength = 2
    /// For access sizes 1, 2, 4, 8 (index log2): context bytes − size + 1 (0 when the context is smaller).
    static let contextReadLimit = 3, contextWriteLimit = 7
    static let mainFramePointer = 11
    /// 0, or why the run stopped (`JITFault`), and at which instruction.
    static let fault = 12, faultPC = 13, faultAddress = 14, faultSize = 15
    static let helperID = 16
    static let interpreter = 17, mapWindows = 18, mapCount = 19
    static let savedStackPointer = 20
    /// An Unmanaged `BPFError` box a failed helper leaves.
    static let helperError = 21
}

/// Why compiled code stopped a run.
enum JITFault: UInt64 {
    case none = 0, read = 1, write = 2, misalignedAtomic = 3, helper = 4, outsideProgram = 5
}

/// The compiler proper: one pass emitting code and recording each instruction's
/// offset, then the jumps patched.
struct JITCompiler {
    let program: DecodedProgram
    let maps: [BPFMap]
    private var code: [UInt8] = []
    private var offsets: [Int] = []
    private var fixups: [(at: Int, target: Int)] = []
    private var epilogueFixups: [Int] = []

    init(program: DecodedProgram, maps: [BPFMap]) { self.program = program; self.maps = maps }

    // Host registers.
    static let rax: UInt8 = 0, rcx: UInt8 = 1, rdx: UInt8 = 2, rbx: UInt8 = 3, rsp: UInt8 = 4, rbp: UInt8 = 5, rsi: UInt8 = 6, rdi: UInt8 = 7
    static let r8: UInt8 = 8, r9: UInt8 = 9, r10: UInt8 = 10, r11: UInt8 = 11, r12: UInt8 = 12, r13: UInt8 = 13, r14: UInt8 = 14, r15: UInt8 = 15
    /// BPF r0-r10 → host registers.
    static let host: [UInt8] = [rax, rdi, rsi, rdx, rcx, r8, rbx, r13, r14, r15, rbp]
    /// The BPF registers a call may clobber (r0-r5), which live in caller-saved host registers.
    static let callerSaved: [UInt8] = [rax, rdi, rsi, rdx, rcx, r8]

    mutating func compile() -> [UInt8]? {
        prologue()
        var pc = 0
        let count = program.raw.count
        offsets = Array(repeating: 0, count: count + 1)
        while pc < count {
            offsets[pc] = code.count
            let i = program.instructions[pc]
            guard emit(i, at: pc) else { return nil }
            if i.operation.group == .loadImm64 { offsets[pc + 1] = code.count; pc += 2 } else { pc += 1 }
        }
        // Running off the end, or jumping outside the program: the verifier rules both out.
        offsets[count] = code.count
        faultExit(.outsideProgram, pc: count, address: nil, size: 0)
        let epilogueAt = code.count
        epilogue()
        for f in fixups { patch32(f.at, offsets[f.target] - (f.at + 4)) }
        for at in epilogueFixups { patch32(at, epilogueAt - (at + 4)) }
        return code
    }

    // MARK: encoding

    private mutating func byte(_ b: UInt8) { code.append(b) }
    private mutating func bytes(_ bs: UInt8...) { code.append(contentsOf: bs) }
    private mutating func imm32(_ v: Int32) { withUnsafeBytes(of: v.littleEndian) { code.append(contentsOf: $0) } }
    private mutating func imm64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { code.append(contentsOf: $0) } }
    private mutating func patch32(_ at: Int, _ v: Int) {
        let x = Int32(truncatingIfNeeded: v)
        for k in 0..<4 { code[at + k] = UInt8(truncatingIfNeeded: x >> (8 * Int32(k))) }
    }

    /// REX prefix: `w` 64-bit operand; `reg` the ModRM reg field's register; `rm` the r/m (or base) register.
    private mutating func rex(w: Bool, reg: UInt8 = 0, rm: UInt8 = 0, force: Bool = false) {
        let r: UInt8 = 0x40 | (w ? 8 : 0) | (reg & 8 != 0 ? 4 : 0) | (rm & 8 != 0 ? 1 : 0)
        if r != 0x40 || force { byte(r) }
    }
    private mutating func modrmRegister(_ reg: UInt8, _ rm: UInt8) { byte(0xC0 | (reg & 7) << 3 | (rm & 7)) }
    /// ModRM for [r11], the checked address (with REX.B from `rex(rm: r11)`).
    private mutating func atR11(_ reg: UInt8) { byte((reg & 7) << 3 | 3) }
    /// ModRM (and SIB) for [base + disp32].
    private mutating func modrmMemory(_ reg: UInt8, base: UInt8, disp: Int32) {
        byte(0x80 | (reg & 7) << 3 | (base & 7))
        if base & 7 == 4 { byte(0x24) }
        imm32(disp)
    }

    /// `op r/m, reg` (or `op reg, r/m` for opcodes of that direction) between registers.
    private mutating func rr(_ opcode: UInt8, w: Bool, reg: UInt8, rm: UInt8) {
        rex(w: w, reg: reg, rm: rm); byte(opcode); modrmRegister(reg, rm)
    }
    /// Two-byte opcode 0F xx between registers.
    private mutating func rr0F(_ opcode: UInt8, w: Bool, reg: UInt8, rm: UInt8, forceREX: Bool = false) {
        rex(w: w, reg: reg, rm: rm, force: forceREX); bytes(0x0F, opcode); modrmRegister(reg, rm)
    }
    /// `op r/m, imm32` (81 /ext) or imm8 (83 /ext) when it fits.
    private mutating func ri(_ ext: UInt8, w: Bool, rm: UInt8, _ v: Int32) {
        rex(w: w, rm: rm)
        if v >= -128 && v <= 127 { byte(0x83); modrmRegister(ext, rm); byte(UInt8(bitPattern: Int8(v))) }
        else { byte(0x81); modrmRegister(ext, rm); imm32(v) }
    }
    private mutating func movRR(_ dst: UInt8, _ src: UInt8, w: Bool = true) { rr(0x89, w: w, reg: src, rm: dst) }
    private mutating func movImm64(_ dst: UInt8, _ v: UInt64) { rex(w: true, rm: dst); byte(0xB8 | dst & 7); imm64(v) }
    /// `mov reg, [r12 + 8 × word]`.
    private mutating func loadState(_ reg: UInt8, _ word: Int) {
        rex(w: true, reg: reg, rm: Self.r12); byte(0x8B); modrmMemory(reg, base: Self.r12, disp: Int32(word * 8))
    }
    /// `mov [r12 + 8 × word], reg`.
    private mutating func storeState(_ word: Int, _ reg: UInt8) {
        rex(w: true, reg: reg, rm: Self.r12); byte(0x89); modrmMemory(reg, base: Self.r12, disp: Int32(word * 8))
    }
    /// `mov qword [r12 + 8 × word], imm32` (sign-extended).
    private mutating func storeStateImm(_ word: Int, _ v: Int32) {
        rex(w: true, rm: Self.r12); byte(0xC7); modrmMemory(0, base: Self.r12, disp: Int32(word * 8)); imm32(v)
    }
    private mutating func push(_ r: UInt8) { rex(w: false, rm: r); byte(0x50 | r & 7) }
    private mutating func pop(_ r: UInt8) { rex(w: false, rm: r); byte(0x58 | r & 7) }
    /// `call r10` to an absolute address.
    private mutating func callAbsolute(_ address: UInt64) {
        movImm64(Self.r10, address)
        bytes(0x41, 0xFF, 0xD2)
    }
    /// A jcc/jmp rel32 to BPF instruction `target`.
    private mutating func jump(to target: Int, condition: UInt8? = nil) {
        if let c = condition { bytes(0x0F, c) } else { byte(0xE9) }
        fixups.append((code.count, target)); imm32(0)
    }
    private mutating func jumpToEpilogue(condition: UInt8? = nil) {
        if let c = condition { bytes(0x0F, c) } else { byte(0xE9) }
        epilogueFixups.append(code.count); imm32(0)
    }
    /// A forward jcc rel32 (`condition` is the second opcode byte) whose displacement `land` patches.
    private mutating func jumpForward(_ condition: UInt8) -> Int { bytes(0x0F, condition); imm32(0); return code.count - 4 }
    private mutating func land(_ at: Int) { patch32(at, code.count - (at + 4)) }

    // MARK: frame

    private mutating func prologue() {
        for r in [Self.rbp, Self.rbx, Self.r12, Self.r13, Self.r14, Self.r15] { push(r) }
        ri(5, w: true, rm: Self.rsp, 8)                  // sub rsp, 8: 16-byte alignment at calls
        movRR(Self.r12, Self.rsi)                         // r12 = state
        storeState(JITState.savedStackPointer, Self.rsp)  // the epilogue leaves from any depth
        loadState(Self.rbp, JITState.mainFramePointer)    // BPF r10
        loadState(Self.rsi, JITState.contextLength)       // BPF r2 (rdi = BPF r1 = the context already)
        for r in [Self.rax, Self.rdx, Self.rcx, Self.r8, Self.rbx, Self.r13, Self.r14, Self.r15] { rr(0x31, w: false, reg: r, rm: r) }
    }

    private mutating func epilogue() {
        loadState(Self.rsp, JITState.savedStackPointer)
        ri(0, w: true, rm: Self.rsp, 8)                   // add rsp, 8
        for r in [Self.r15, Self.r14, Self.r13, Self.r12, Self.rbx, Self.rbp] { pop(r) }
        byte(0xC3)
    }

    /// Records why and where the run stopped and leaves (r0 = 0).
    private mutating func faultExit(_ fault: JITFault, pc: Int, address: UInt8?, size: Int) {
        storeStateImm(JITState.fault, Int32(fault.rawValue))
        storeStateImm(JITState.faultPC, Int32(pc))
        storeStateImm(JITState.faultSize, Int32(size))
        if let address { storeState(JITState.faultAddress, address) }
        rr(0x31, w: false, reg: Self.rax, rm: Self.rax)
        jumpToEpilogue()
    }

    /// Calls a C function with the BPF caller-saved registers (and r11) preserved;
    /// arguments are set by `arguments` after the saves; the result is left in r10.
    private mutating func preservingCall(_ address: UInt64, arguments: (inout JITCompiler) -> Void) {
        let saved = Self.callerSaved + [Self.r11, Self.r9]  // 8 pushes keep the stack 16-byte aligned
        for r in saved { push(r) }
        arguments(&self)
        callAbsolute(address)
        movRR(Self.r10, Self.rax)
        for r in saved.reversed() { pop(r) }
    }

    // MARK: instructions

    /// Emits instruction `pc`; false if the compiler leaves the program to the interpreter.
    private mutating func emit(_ i: DecodedInstruction, at pc: Int) -> Bool {
        let op = i.operation
        let dst = i.dst < 11 ? Self.host[Int(i.dst)] : 0
        let src = i.operandIsRegister || op.group == .load || op.group == .atomic ? Self.host[Int(i.src)] : 0
        let k = Int32(truncatingIfNeeded: Int64(bitPattern: i.imm))
        let isReg = i.operandIsRegister
        switch op {
        case .add64, .sub64, .or64, .and64, .xor64, .add32, .sub32, .or32, .and32, .xor32:
            let w = op.group == .alu64
            let (opcode, ext): (UInt8, UInt8) = switch op {
            case .add64, .add32: (0x01, 0)
            case .sub64, .sub32: (0x29, 5)
            case .or64, .or32: (0x09, 1)
            case .and64, .and32: (0x21, 4)
            default: (0x31, 6)
            }
            if isReg { rr(opcode, w: w, reg: src, rm: dst) } else { ri(ext, w: w, rm: dst, k) }
        case .mov64:
            if isReg { movRR(dst, src) } else { rex(w: true, rm: dst); byte(0xC7); modrmRegister(0, dst); imm32(k) }
        case .mov32:
            if isReg { movRR(dst, src, w: false) } else { rex(w: false, rm: dst); byte(0xB8 | dst & 7); imm32(k) }
        case .mul64, .mul32:
            let w = op == .mul64
            if isReg { rr0F(0xAF, w: w, reg: dst, rm: src) }
            else { rex(w: w, reg: dst, rm: dst); byte(0x69); modrmRegister(dst, dst); imm32(k) }
        case .neg64, .neg32:
            rex(w: op == .neg64, rm: dst); byte(0xF7); modrmRegister(3, dst)
        case .lsh64, .rsh64, .arsh64, .lsh32, .rsh32, .arsh32:
            let w = op.group == .alu64
            let ext: UInt8 = op == .lsh64 || op == .lsh32 ? 4 : op == .rsh64 || op == .rsh32 ? 5 : 7
            if !isReg {
                rex(w: w, rm: dst); byte(0xC1); modrmRegister(ext, dst); byte(UInt8(truncatingIfNeeded: k) & (w ? 63 : 31))
            } else {
                // The count must be in cl, which holds BPF r4.
                movRR(Self.r11, Self.rcx)
                if src != Self.rcx { movRR(Self.rcx, src) }
                let target = dst == Self.rcx ? Self.r11 : dst
                rex(w: w, rm: target); byte(0xD3); modrmRegister(ext, target)
                movRR(Self.rcx, Self.r11)
            }
        case .div64, .sdiv64, .mod64, .smod64, .div32, .sdiv32, .mod32, .smod32:
            // Through BPFSemantics: zero divisors and INT_MIN / -1 as RFC 9669 defines them.
            preservingCall(UInt64(UInt(bitPattern: unsafeBitCast(jitALU, to: UnsafeRawPointer.self)))) { c in
                c.movImm64(Self.rdi, UInt64(op.rawValue))
                // dst and src may be any of the argument registers: read them from the saved copies.
                c.loadSaved(Self.rsi, of: dst)
                if isReg { c.loadSaved(Self.rdx, of: src) } else { c.movImm64(Self.rdx, i.imm) }
            }
            movRR(dst, Self.r10)
        case .movsx8To64: rr0F(0xBE, w: true, reg: dst, rm: src, forceREX: true)
        case .movsx16To64: rr0F(0xBF, w: true, reg: dst, rm: src)
        case .movsx32To64: rr(0x63, w: true, reg: dst, rm: src)
        case .movsx8To32: rr0F(0xBE, w: false, reg: dst, rm: src, forceREX: true)
        case .movsx16To32: rr0F(0xBF, w: false, reg: dst, rm: src)
        case .bswap16, .be16:
            byte(0x66); rex(w: false, rm: dst); bytes(0xC1); modrmRegister(0, dst); byte(8)  // rol dst16, 8
            rr0F(0xB7, w: false, reg: dst, rm: dst)                                         // movzx dst32, dst16
        case .bswap32, .be32:
            rex(w: false, rm: dst); bytes(0x0F, 0xC8 | dst & 7)
        case .bswap64, .be64:
            rex(w: true, rm: dst); bytes(0x0F, 0xC8 | dst & 7)
        case .le16: rr0F(0xB7, w: false, reg: dst, rm: dst)
        case .le32: movRR(dst, dst, w: false)
        case .le64: break
        case .ja:
            jump(to: Int(i.target))
        case .jeq, .jgt, .jge, .jset, .jne, .jsgt, .jsge, .jlt, .jle, .jslt, .jsle,
             .jeq32, .jgt32, .jge32, .jset32, .jne32, .jsgt32, .jsge32, .jlt32, .jle32, .jslt32, .jsle32:
            let w = op.isWideCondition
            let base = op.wideCondition
            if base == .jset {
                if isReg { rr(0x85, w: w, reg: src, rm: dst) }
                else { rex(w: w, rm: dst); byte(0xF7); modrmRegister(0, dst); imm32(k) }
            } else if isReg {
                rr(0x39, w: w, reg: src, rm: dst)   // cmp dst, src
            } else {
                ri(7, w: w, rm: dst, k)             // cmp dst, imm
            }
            let cc: UInt8 = switch base {
            case .jeq: 0x84
            case .jne, .jset: 0x85
            case .jgt: 0x87
            case .jge: 0x83
            case .jlt: 0x82
            case .jle: 0x86
            case .jsgt: 0x8F
            case .jsge: 0x8D
            case .jslt: 0x8C
            default: 0x8E  // jsle
            }
            jump(to: Int(i.target), condition: cc)
        case .load8, .load16, .load32, .load64, .loadSigned8, .loadSigned16, .loadSigned32:
            let size = op.accessSize
            checkedAddress(base: src, offset: i.offset, size: size, write: false, pc: pc)
            // movzx r32, byte/word; mov r32; mov r64; movsx r64, byte/word; movsxd r64
            let (wide, opcode): (Bool, [UInt8]) = switch op {
            case .load8: (false, [0x0F, 0xB6])
            case .load16: (false, [0x0F, 0xB7])
            case .load32: (false, [0x8B])
            case .load64: (true, [0x8B])
            case .loadSigned8: (true, [0x0F, 0xBE])
            case .loadSigned16: (true, [0x0F, 0xBF])
            default: (true, [0x63])
            }
            rex(w: wide, reg: dst, rm: Self.r11); code.append(contentsOf: opcode); atR11(dst)
        case .store8, .store16, .store32, .store64:
            let size = op.accessSize
            checkedAddress(base: dst, offset: i.offset, size: size, write: true, pc: pc)
            if isReg {
                if size == 2 { byte(0x66) }
                rex(w: size == 8, reg: src, rm: Self.r11, force: size == 1)
                byte(size == 1 ? 0x88 : 0x89); atR11(src)
            } else {
                if size == 2 { byte(0x66) }
                rex(w: size == 8, rm: Self.r11)
                byte(size == 1 ? 0xC6 : 0xC7); atR11(0)
                switch size {
                case 1: byte(UInt8(truncatingIfNeeded: k))
                case 2: withUnsafeBytes(of: UInt16(truncatingIfNeeded: k).littleEndian) { code.append(contentsOf: $0) }
                default: imm32(k)
                }
            }
        case .atomic32, .atomic64:
            emitAtomic(i, src: src, dst: dst, pc: pc)
        case .callHelper:
            guard Helper(rawValue: Int(i.target)) != nil else { return false }
            var done: [Int] = []
            if i.target == Int32(Helper.mapLookup.rawValue) { done = inlineArrayLookups(pc: pc) }
            storeStateImm(JITState.helperID, i.target)
            storeStateImm(JITState.faultPC, Int32(pc))
            movRR(Self.r9, Self.r12)
            callAbsolute(UInt64(UInt(bitPattern: unsafeBitCast(jitHelper, to: UnsafeRawPointer.self))))
            // A helper that failed recorded why; leave with its error.
            rex(w: true, rm: Self.r12); byte(0x83); modrmMemory(7, base: Self.r12, disp: Int32(JITState.fault * 8)); byte(0)
            jumpToEpilogue(condition: 0x85)
            for at in done { land(at) }
        case .callLocal:
            for r in [Self.rbx, Self.r13, Self.r14, Self.r15, Self.rbp] { push(r) }
            ri(0, w: true, rm: Self.rbp, Int32(BPF.stackSize))
            byte(0xE8); fixups.append((code.count, Int(i.target))); imm32(0)
            for r in [Self.rbp, Self.r15, Self.r14, Self.r13, Self.rbx] { pop(r) }
        case .exit:
            // The main function's frame pointer is the run's first; any other returns to its caller.
            rex(w: true, reg: Self.rbp, rm: Self.r12); byte(0x3B); modrmMemory(Self.rbp, base: Self.r12, disp: Int32(JITState.mainFramePointer * 8))
            jumpToEpilogue(condition: 0x84)
            byte(0xC3)
        case .loadImm64:
            movImm64(dst, i.imm)
        case .loadMap:
            movImm64(dst, MapHandle.encode(Int(i.target)))
        case .loadMapValue:
            movImm64(dst, UInt64(maps[Int(i.target)].valueWindow.base) &+ i.imm)
        case .trap:
            return false
        }
        return true
    }

    /// bpf_map_lookup_elem on an array map, in line (as Linux's JIT does): when r1
    /// is one of the program's array maps, r0 = the value's address, or NULL for an
    /// index out of range. Returns the jumps to patch to after the helper call.
    private mutating func inlineArrayLookups(pc: Int) -> [Int] {
        var done: [Int] = []
        for (index, map) in maps.enumerated() where map.definition.kind == .array {
            let window = map.valueWindow
            movImm64(Self.r10, MapHandle.encode(index))
            rr(0x39, w: true, reg: Self.r10, rm: Self.rdi)            // cmp rdi, r10
            let other = jumpForward(0x85)                               // jne: another map
            checkedAddress(base: Self.rsi, offset: 0, size: 4, write: false, pc: pc)  // the key
            rex(w: false, reg: Self.rax, rm: Self.r11); byte(0x8B); atR11(Self.rax)    // mov eax, [r11]
            ri(7, w: true, rm: Self.rax, Int32(map.definition.maxEntries))            // cmp rax, max_entries
            let inRange = jumpForward(0x82)                                           // jb
            rr(0x31, w: false, reg: Self.rax, rm: Self.rax)                           // NULL
            byte(0xE9); done.append(code.count); imm32(0)
            land(inRange)
            rex(w: true, reg: Self.rax, rm: Self.rax); byte(0x69); modrmRegister(Self.rax, Self.rax); imm32(Int32(window.slotSize))
            movImm64(Self.r10, UInt64(window.base))
            rr(0x01, w: true, reg: Self.r10, rm: Self.rax)                            // add rax, r10
            byte(0xE9); done.append(code.count); imm32(0)
            land(other)
        }
        return done
    }

    /// Loads the value BPF register host `reg` had when `preservingCall` saved it.
    private mutating func loadSaved(_ target: UInt8, of reg: UInt8) {
        let saved = Self.callerSaved + [Self.r11, Self.r9]
        guard let index = saved.firstIndex(of: reg) else { movRR(target, reg); return }
        // The pushes are below rsp in reverse order: the last pushed is at [rsp].
        let disp = Int32((saved.count - 1 - index) * 8)
        rex(w: true, reg: target, rm: Self.rsp); byte(0x8B); modrmMemory(target, base: Self.rsp, disp: disp)
    }

    /// r11 = base + offset, checked to lie with `size` bytes inside the stack or the
    /// context (in line), or a map value (out of line); a failed check leaves the run.
    private mutating func checkedAddress(base: UInt8, offset: Int16, size: Int, write: Bool, pc: Int) {
        // lea r11, [base + offset]
        rex(w: true, reg: Self.r11, rm: base); byte(0x8D); modrmMemory(Self.r11, base: base, disp: Int32(offset))
        let log2 = size.trailingZeroBitCount
        // Stack: r10 = r11 - stackBase; ok when r10 <= stackBytes - size.
        movRR(Self.r10, Self.r11)
        rex(w: true, reg: Self.r10, rm: Self.r12); byte(0x2B); modrmMemory(Self.r10, base: Self.r12, disp: Int32(JITState.stackBase * 8))
        rex(w: true, rm: Self.r10); byte(0x81); modrmRegister(7, Self.r10); imm32(Int32(RunBlock.stackBytes - size))
        let stackOK = jumpForward(0x86)  // jbe
        // Context: r10 = r11 - contextBase; ok when r10 < limit (bytes - size + 1, 0 if too small or read-only for writes).
        movRR(Self.r10, Self.r11)
        rex(w: true, reg: Self.r10, rm: Self.r12); byte(0x2B); modrmMemory(Self.r10, base: Self.r12, disp: Int32(JITState.contextBase * 8))
        let limit = (write ? JITState.contextWriteLimit : JITState.contextReadLimit) + log2
        rex(w: true, reg: Self.r10, rm: Self.r12); byte(0x3B); modrmMemory(Self.r10, base: Self.r12, disp: Int32(limit * 8))
        let contextOK = jumpForward(0x82)  // jb
        // Map values whose slots are a power of two apart, in line: r10 = r11 - base.
        var inMap: [Int] = []
        var outOfLine = false
        for map in maps {
            let window = map.valueWindow
            guard window.slotSize.nonzeroBitCount == 1, window.valueSize >= UInt(size) else { outOfLine = true; continue }
            movImm64(Self.r10, 0 &- UInt64(window.base))
            rr(0x01, w: true, reg: Self.r11, rm: Self.r10)                  // add r10, r11
            ri(7, w: true, rm: Self.r10, Int32(window.bytes))               // cmp r10, bytes
            let outside = jumpForward(0x83)                                 // jae: another map
            ri(4, w: true, rm: Self.r10, Int32(window.slotSize - 1))        // and r10, slot - 1
            ri(7, w: true, rm: Self.r10, Int32(window.valueSize - UInt(size)))  // cmp r10, value - size
            inMap.append(jumpForward(0x86))                                 // jbe: inside one value
            land(outside)
        }
        // Map values with other slot sizes, out of line.
        var mapOK: Int?
        if outOfLine {
            preservingCall(UInt64(UInt(bitPattern: unsafeBitCast(jitCheckMapValue, to: UnsafeRawPointer.self)))) { c in
                c.movRR(Self.rdi, Self.r11)
                c.movImm64(Self.rsi, UInt64(size))
                c.movRR(Self.rdx, Self.r12)
            }
            rr(0x85, w: true, reg: Self.r10, rm: Self.r10)  // test r10, r10
            mapOK = jumpForward(0x85)  // jnz
        }
        faultExit(write ? .write : .read, pc: pc, address: Self.r11, size: size)
        land(stackOK); land(contextOK)
        for at in inMap + (mapOK.map { [$0] } ?? []) { land(at) }
    }

    private mutating func emitAtomic(_ i: DecodedInstruction, src: UInt8, dst: UInt8, pc: Int) {
        let w = i.operation == .atomic64
        let size = i.operation.accessSize
        checkedAddress(base: dst, offset: i.offset, size: size, write: true, pc: pc)
        // Aligned locations only, as the interpreter.
        rex(w: true, rm: Self.r11); byte(0xF7); modrmRegister(0, Self.r11); imm32(Int32(size - 1))  // test r11, size-1
        let aligned = jumpForward(0x84)
        faultExit(.misalignedAtomic, pc: pc, address: Self.r11, size: size)
        land(aligned)
        let fetch = i.target & BPF.atomicFetch != 0
        let operation = i.target & ~BPF.atomicFetch
        func lockRM(_ c: inout JITCompiler, _ opcode: [UInt8], reg: UInt8) {
            c.byte(0xF0); c.rex(w: w, reg: reg, rm: Self.r11); c.code.append(contentsOf: opcode); c.atR11(reg)
        }
        switch (operation, fetch) {
        case (0x00, false): lockRM(&self, [0x01], reg: src)
        case (0x40, false): lockRM(&self, [0x09], reg: src)
        case (0x50, false): lockRM(&self, [0x21], reg: src)
        case (0xA0, false): lockRM(&self, [0x31], reg: src)
        case (0x00, true): lockRM(&self, [0x0F, 0xC1], reg: src)  // lock xadd: src = old
        case (0xE0, _): rex(w: w, reg: src, rm: Self.r11); byte(0x87); atR11(src)  // xchg: src = old
        case (0xF0, _):
            lockRM(&self, [0x0F, 0xB1], reg: src)  // lock cmpxchg: compares with rax (r0), r0 = old
            if !w { movRR(Self.rax, Self.rax, w: false) }
        default:
            // fetch_or / fetch_and / fetch_xor: a compare-exchange loop; rax (r0) is kept in r10.
            movRR(Self.r10, Self.rax)
            let operand = src == Self.rax ? Self.r10 : src
            rex(w: w, reg: Self.rax, rm: Self.r11); byte(0x8B); atR11(Self.rax)  // mov rax, [r11]
            let retry = code.count
            movRR(Self.r9, Self.rax, w: w)
            let opcode: UInt8 = operation == 0x40 ? 0x09 : operation == 0x50 ? 0x21 : 0x31
            rr(opcode, w: w, reg: operand, rm: Self.r9)
            lockRM(&self, [0x0F, 0xB1], reg: Self.r9)
            bytes(0x75, UInt8(bitPattern: Int8(retry - (code.count + 2))))  // jne retry
            if src == Self.rax {
                if !w { movRR(Self.rax, Self.rax, w: false) }  // r0 is the source: it receives the old value
            } else {
                movRR(src, Self.rax, w: w)
                movRR(Self.rax, Self.r10)
            }
        }
    }
}

/// Division and modulo for compiled code, by the one definition in BPFSemantics.
private let jitALU: @convention(c) (UInt64, UInt64, UInt64) -> UInt64 = { op, a, b in
    BPFSemantics.alu(BPFOperation(rawValue: UInt8(truncatingIfNeeded: op)) ?? .mov64, a, b)
}

/// Whether [address, address + size) lies in one map value; 1 or 0.
private let jitCheckMapValue: @convention(c) (UInt64, UInt64, UnsafeMutableRawPointer) -> UInt64 = { address, size, state in
    let words = state.assumingMemoryBound(to: UInt64.self)
    guard let base = UnsafePointer<MapWindow>(bitPattern: UInt(words[JITState.mapWindows])) else { return 0 }
    let windows = UnsafeBufferPointer(start: base, count: Int(words[JITState.mapCount]))
    for w in windows where w.contains(UInt(truncatingIfNeeded: address), UInt(size)) { return 1 }
    return 0
}

/// A helper call from compiled code: r1-r5 in, r0 out; a failure is recorded in the state.
private let jitHelper: @convention(c) (UInt64, UInt64, UInt64, UInt64, UInt64, UnsafeMutableRawPointer) -> UInt64 = { r1, r2, r3, r4, r5, state in
    let words = state.assumingMemoryBound(to: UInt64.self)
    let interpreter = Unmanaged<Interpreter>.fromOpaque(UnsafeRawPointer(bitPattern: UInt(words[JITState.interpreter]))!).takeUnretainedValue()
    return interpreter.helperFromCompiledCode(id: Int(words[JITState.helperID]), r1, r2, r3, r4, r5, state: state)
}
