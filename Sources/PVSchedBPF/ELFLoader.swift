import PVSchedABI

/// Loads `clang -target bpf -O2 -c` objects: the program section (by name,
/// "pvsched" by default) with the local functions of .text appended, legacy
/// maps (section "maps", struct bpf_map_def), relocations for map references
/// (R_BPF_64_64 on ldimm64) and calls into .text (R_BPF_64_32), and the driver
/// declaration in section ".pvsched.driver".
public enum ELFLoader {
    struct Section { var name: String; var type: UInt32; var offset: Int; var size: Int; var link: Int; var info: Int; var entsize: Int }
    struct Symbol { var name: String; var shndx: Int; var value: Int }

    static let mapDefSize = 20

    public static func load(_ bytes: [UInt8], section programSection: String = "pvsched") throws(BPFError) -> Program {
        func u16(_ o: Int) throws(BPFError) -> Int {
            guard o >= 0, o + 2 <= bytes.count else { throw .elf("truncated at offset \(o)") }
            return Int(bytes[o]) | Int(bytes[o + 1]) << 8
        }
        func u32(_ o: Int) throws(BPFError) -> Int { let lo = try u16(o); let hi = try u16(o + 2); return lo | hi << 16 }
        func u64(_ o: Int) throws(BPFError) -> Int {
            let lo = try u32(o), hi = try u32(o + 4)
            let v = UInt64(lo) | UInt64(hi) << 32
            guard v < UInt64(Int.max) else { throw .elf("value out of range at offset \(o)") }
            return Int(v)
        }
        func cString(_ o: Int, limit: Int) -> String {
            var end = o
            while end < min(limit, bytes.count) && bytes[end] != 0 { end += 1 }
            return String(decoding: bytes[min(o, end)..<end], as: UTF8.self)
        }
        guard bytes.count >= 64, bytes[0..<4].elementsEqual([0x7F, 0x45, 0x4C, 0x46]) else { throw .elf("not an ELF file") }
        guard bytes[4] == 2, bytes[5] == 1 else { throw .elf("not a 64-bit little-endian object") }
        guard try u16(18) == 247 else { throw .elf("machine \(try u16(18)) is not BPF (247)") }
        let shoff = try u64(0x28), shentsize = try u16(0x3A), shnum = try u16(0x3C), shstrndx = try u16(0x3E)
        guard shentsize == 64, shnum > 0, shstrndx < shnum, shoff + shnum * 64 <= bytes.count else { throw .elf("bad section header table") }
        var sections: [Section] = []
        for k in 0..<shnum {
            let h = shoff + k * 64
            sections.append(Section(name: "", type: UInt32(try u32(h + 4)), offset: try u64(h + 24), size: try u64(h + 32),
                                    link: try u32(h + 40), info: try u32(h + 44), entsize: try u64(h + 56)))
            let s = sections[k]
            if s.type != 8 /* NOBITS */ && (s.offset + s.size > bytes.count) { throw .elf("section \(k) extends past the file") }
        }
        let strtab = sections[shstrndx]
        for k in sections.indices {
            sections[k].name = cString(strtab.offset + (try u32(shoff + k * 64)), limit: strtab.offset + strtab.size)
        }
        guard let progIndex = sections.firstIndex(where: { $0.name == programSection }) else {
            throw .elf("no section '\(programSection)' (sections: \(sections.map(\.name).filter { !$0.isEmpty }.joined(separator: ", ")))")
        }
        let textIndex = sections.firstIndex { $0.name == ".text" && $0.size > 0 }
        let mapsIndex = sections.firstIndex { $0.name == "maps" }

        // Symbols.
        var symbols: [Symbol] = []
        if let symIndex = sections.firstIndex(where: { $0.type == 2 }) {
            let st = sections[symIndex]
            let names = sections[st.link]
            for k in 0..<(st.size / 24) {
                let o = st.offset + k * 24
                symbols.append(Symbol(name: cString(names.offset + (try u32(o)), limit: names.offset + names.size),
                                      shndx: try u16(o + 6), value: try u64(o + 8)))
            }
        }

        // Maps, in section order.
        var maps: [BPFMap] = []
        if let mapsIndex {
            let ms = sections[mapsIndex]
            guard ms.size % mapDefSize == 0 else { throw .elf("section 'maps' is \(ms.size) bytes, not a multiple of struct bpf_map_def (\(mapDefSize))") }
            for k in 0..<(ms.size / mapDefSize) {
                let o = ms.offset + k * mapDefSize
                let name = symbols.first { $0.shndx == mapsIndex && $0.value == k * mapDefSize && !$0.name.isEmpty }?.name ?? "map\(k)"
                guard let kind = MapDefinition.Kind(rawValue: UInt32(try u32(o))) else {
                    throw .badMap(name, "type \(try u32(o)) is not supported (hash = 1, array = 2)")
                }
                maps.append(try BPFMap(MapDefinition(name: name, kind: kind, keySize: try u32(o + 4), valueSize: try u32(o + 8),
                                                     maxEntries: try u32(o + 12))))
            }
        }

        // Instructions: the program, then .text.
        func insns(_ s: Section) throws(BPFError) -> [Instruction] {
            guard s.size % 8 == 0 else { throw .elf("section '\(s.name)' size \(s.size) is not a multiple of 8") }
            return Instruction.decode(bytes[s.offset..<(s.offset + s.size)])
        }
        var code = try insns(sections[progIndex])
        let textBase = code.count
        if let textIndex { code += try insns(sections[textIndex]) }
        func base(of section: Int) -> Int? { section == progIndex ? 0 : section == textIndex ? textBase : nil }

        // Relocations.
        for rs in sections where rs.type == 9 /* REL */ {
            guard let targetBase = base(of: rs.info) else { continue }
            for k in 0..<(rs.size / 16) {
                let o = rs.offset + k * 16
                let at = targetBase + (try u64(o)) / 8
                let info = UInt64(try u64(o + 8))
                let type = info & 0xFFFF_FFFF, symIndex = Int(info >> 32)
                guard at < code.count, symIndex < symbols.count else { throw .elf("relocation \(k) in \(rs.name) is out of range") }
                let sym = symbols[symIndex]
                switch type {
                case 1:  // R_BPF_64_64
                    guard code[at].isLoadImm64 else { throw .elf("R_BPF_64_64 at instruction \(at) is not on ldimm64") }
                    guard sym.shndx == mapsIndex, sym.value % mapDefSize == 0 else {
                        throw .elf("instruction \(at) refers to '\(sym.name)' in section \(sym.shndx): only maps in section 'maps' are supported (no global data)")
                    }
                    code[at].src = 1
                    code[at].imm = Int32(sym.value / mapDefSize)
                case 10:  // R_BPF_64_32
                    guard code[at].opcode == 0x85, code[at].src == 1, let calleeBase = base(of: sym.shndx) else {
                        throw .elf("R_BPF_64_32 at instruction \(at) is not a call into the program or .text")
                    }
                    let target = calleeBase + sym.value / 8 + Int(code[at].imm) + 1
                    code[at].imm = Int32(target - (at + 1))
                default:
                    throw .elf("unsupported relocation type \(type) at instruction \(at)")
                }
            }
        }

        // Driver declaration.
        var driver: DriverDeclaration?
        if let d = sections.first(where: { $0.name == ".pvsched.driver" }) {
            guard d.size >= MemoryLayout<pvsched_bpf_driver_info>.size else { throw .elf(".pvsched.driver is too small") }
            let nameLen = Int(PVSCHED_PROTOCOL_NAME_LEN)
            driver = DriverDeclaration(name: cString(d.offset, limit: d.offset + nameLen), events: UInt32(try u32(d.offset + nameLen)),
                                       protocolMajor: UInt16(try u16(d.offset + nameLen + 4)),
                                       protocolMinor: UInt16(try u16(d.offset + nameLen + 6)))
        }
        return Program(instructions: code, maps: maps, name: driver?.name ?? programSection, driver: driver)
    }
}
