import PVSchedABI

/// Loads `clang -target bpf -O2 -c` objects: the program section (by name,
/// "pvsched" by default) with the local functions of .text appended, legacy
/// maps (section "maps", struct bpf_map_def), relocations for map references
/// (R_BPF_64_64 on ldimm64) and calls into .text (R_BPF_64_32), and the driver
/// declaration in section ".pvsched.driver".
///
/// The object is hostile input (the daemon loads objects sent over its control
/// socket): every read goes through `ELFReader`, every index is checked, every
/// computed value is range-checked before it is narrowed, and a bad object gives
/// a `BPFError` that says what is wrong, never a trap.
public enum ELFLoader {
    struct Section {
        var name: String
        var type: UInt32
        var offset: Int
        var size: Int
        var link: Int
        var info: Int
        /// The section's bytes in the file (empty for NOBITS).
        var range: Range<Int>
    }
    struct Symbol { var name: String; var shndx: Int; var value: UInt64 }

    static let mapDefSize = 20

    public static func load(_ bytes: [UInt8], section programSection: String = "pvsched") throws(BPFError) -> Program {
        let r = try ELFReader(bytes)
        guard bytes.count >= ELF.headerSize, bytes[0..<4].elementsEqual(ELF.magic) else { throw .elf("not an ELF file") }
        guard bytes[4] == ELF.class64, bytes[5] == ELF.dataLittle else { throw .elf("not a 64-bit little-endian object") }
        let machine = try r.u16(ELF.eMachine, "e_machine")
        guard machine == ELF.machineBPF else { throw .elf("machine \(machine) is not BPF (\(ELF.machineBPF))") }
        let sections = try readSections(r)

        guard let progIndex = sections.firstIndex(where: { $0.name == programSection }) else {
            throw .elf("no section '\(programSection)' (sections: \(sections.map(\.name).filter { !$0.isEmpty }.joined(separator: ", ")))")
        }
        // .text is appended as the program's local functions, unless it is the program itself.
        let textIndex = sections.firstIndex { $0.name == ".text" && $0.size > 0 }.flatMap { $0 == progIndex ? nil : $0 }
        let mapsIndex = sections.firstIndex { $0.name == "maps" }
        let symbols = try readSymbols(r, sections)
        let maps = try readMaps(r, sections, mapsIndex, symbols)

        // Instructions: the program, then .text.
        func insns(_ s: Section) throws(BPFError) -> [Instruction] {
            guard s.type == ELF.shtProgbits else { throw .elf("section '\(s.name)' holds no code (type \(s.type))") }
            guard s.size % 8 == 0 else { throw .elf("section '\(s.name)' size \(s.size) is not a multiple of 8") }
            return Instruction.decode(bytes[s.range])
        }
        var code = try insns(sections[progIndex])
        let textBase = code.count
        if let textIndex { code += try insns(sections[textIndex]) }
        func base(of section: Int) -> Int? { section == progIndex ? 0 : section == textIndex ? textBase : nil }

        try relocate(&code, r, sections, symbols, mapsIndex: mapsIndex, base: base)
        let driver = try readDriver(r, sections)
        return Program(instructions: code, maps: maps, name: driver?.name ?? programSection, driver: driver)
    }

    static func readSections(_ r: ELFReader) throws(BPFError) -> [Section] {
        let shoff = try r.offset(ELF.eShoff, "e_shoff")
        let shentsize = try r.u16(ELF.eShentsize, "e_shentsize")
        let shnum = try r.u16(ELF.eShnum, "e_shnum")
        let shstrndx = try r.u16(ELF.eShstrndx, "e_shstrndx")
        guard shentsize == ELF.sectionHeaderSize else { throw .elf("e_shentsize is \(shentsize), expected \(ELF.sectionHeaderSize)") }
        guard shnum > 0, shnum <= ELF.maxSections else { throw .elf("e_shnum \(shnum) is outside 1...\(ELF.maxSections)") }
        guard shstrndx < shnum else { throw .elf("e_shstrndx \(shstrndx) is not a section (there are \(shnum))") }
        _ = try r.range(shoff, shnum * ELF.sectionHeaderSize, "the section header table")
        var sections: [Section] = []
        var nameOffsets: [Int] = []
        for k in 0..<shnum {
            let h = shoff + k * ELF.sectionHeaderSize
            let type = try r.u32(h + ELF.shType, "section \(k) sh_type")
            let offset = try r.offset(h + ELF.shOffset, "section \(k) sh_offset")
            let size = try r.offset(h + ELF.shSize, "section \(k) sh_size")
            // NOBITS occupies no file bytes; any other section must lie inside the file.
            let range = type == ELF.shtNobits ? 0..<0 : try r.range(offset, size, "section \(k)")
            sections.append(Section(name: "", type: type, offset: offset, size: size,
                                    link: Int(try r.u32(h + ELF.shLink, "section \(k) sh_link")),
                                    info: Int(try r.u32(h + ELF.shInfo, "section \(k) sh_info")), range: range))
            nameOffsets.append(Int(try r.u32(h + ELF.shName, "section \(k) sh_name")))
        }
        let names = sections[shstrndx].range
        for k in sections.indices {
            sections[k].name = try r.string(at: nameOffsets[k], in: names, "section \(k)")
        }
        return sections
    }

    static func readSymbols(_ r: ELFReader, _ sections: [Section]) throws(BPFError) -> [Symbol] {
        guard let symIndex = sections.firstIndex(where: { $0.type == ELF.shtSymtab }) else { return [] }
        let st = sections[symIndex]
        guard st.link < sections.count else { throw .elf("the symbol table's string table (sh_link \(st.link)) is not a section") }
        let names = sections[st.link].range
        var symbols: [Symbol] = []
        for k in 0..<(st.range.count / ELF.symbolSize) {
            let o = st.range.lowerBound + k * ELF.symbolSize
            symbols.append(Symbol(name: try r.string(at: Int(try r.u32(o + ELF.stName, "symbol \(k) st_name")), in: names, "symbol \(k)"),
                                  shndx: try r.u16(o + ELF.stShndx, "symbol \(k) st_shndx"),
                                  value: try r.u64(o + ELF.stValue, "symbol \(k) st_value")))
        }
        return symbols
    }

    static func readMaps(_ r: ELFReader, _ sections: [Section], _ mapsIndex: Int?,
                         _ symbols: [Symbol]) throws(BPFError) -> [BPFMap] {
        guard let mapsIndex else { return [] }
        let ms = sections[mapsIndex]
        guard ms.type == ELF.shtProgbits else { throw .elf("section 'maps' holds no data (type \(ms.type))") }
        guard ms.size % mapDefSize == 0 else {
            throw .elf("section 'maps' is \(ms.size) bytes, not a multiple of struct bpf_map_def (\(mapDefSize))")
        }
        let count = ms.size / mapDefSize
        guard count <= BPFMap.maxMaps else { throw .elf("section 'maps' declares \(count) maps; at most \(BPFMap.maxMaps) are accepted") }
        var maps: [BPFMap] = []
        var totalBytes = 0
        for k in 0..<count {
            let o = ms.range.lowerBound + k * mapDefSize
            let name = symbols.first { $0.shndx == mapsIndex && $0.value == UInt64(k * mapDefSize) && !$0.name.isEmpty }?.name ?? "map\(k)"
            let type = try r.u32(o, "map \(k) type")
            guard let kind = MapDefinition.Kind(rawValue: type) else {
                throw .badMap(name, "type \(type) is not supported (hash = 1, array = 2)")
            }
            let def = MapDefinition(name: name, kind: kind, keySize: Int(try r.u32(o + 4, "map \(k) key_size")),
                                    valueSize: Int(try r.u32(o + 8, "map \(k) value_size")),
                                    maxEntries: Int(try r.u32(o + 12, "map \(k) max_entries")))
            totalBytes += try BPFMap.checkedFootprint(def)
            guard totalBytes <= BPFMap.maxTotalBytes else {
                throw .badMap(name, "the object's maps would take more than \(BPFMap.maxTotalBytes >> 20) MiB")
            }
            maps.append(try BPFMap(def))
        }
        return maps
    }

    static func relocate(_ code: inout [Instruction], _ r: ELFReader, _ sections: [Section], _ symbols: [Symbol],
                         mapsIndex: Int?, base: (Int) -> Int?) throws(BPFError) {
        for rs in sections where rs.type == ELF.shtRel {
            guard let targetBase = base(rs.info) else { continue }
            for k in 0..<(rs.range.count / ELF.relSize) {
                let o = rs.range.lowerBound + k * ELF.relSize
                let offset = try r.u64(o, "relocation \(k) of \(rs.name) r_offset")
                let info = try r.u64(o + 8, "relocation \(k) of \(rs.name) r_info")
                let type = info & 0xFFFF_FFFF, symIndex = Int(info >> 32)
                guard offset % 8 == 0, offset / 8 < UInt64(code.count - targetBase), symIndex < symbols.count else {
                    throw .elf("relocation \(k) in \(rs.name) is out of range")
                }
                let at = targetBase + Int(offset / 8)
                let sym = symbols[symIndex]
                switch type {
                case ELF.rBPF64_64:
                    guard code[at].isLoadImm64 else { throw .elf("R_BPF_64_64 at instruction \(at) is not on ldimm64") }
                    guard sym.shndx == mapsIndex, sym.value % UInt64(mapDefSize) == 0,
                          sym.value / UInt64(mapDefSize) < UInt64(BPFMap.maxMaps) else {
                        throw .elf("instruction \(at) refers to '\(sym.name)' in section \(sym.shndx): only maps in section 'maps' are supported (no global data)")
                    }
                    code[at].src = 1
                    code[at].imm = Int32(sym.value / UInt64(mapDefSize))
                case ELF.rBPF64_32:
                    guard code[at].opcode == 0x85, code[at].src == 1, let calleeBase = base(sym.shndx),
                          sym.value % 8 == 0, sym.value / 8 < UInt64(code.count) else {
                        throw .elf("R_BPF_64_32 at instruction \(at) is not a call into the program or .text")
                    }
                    let target = calleeBase + Int(sym.value / 8) + Int(code[at].imm) + 1
                    guard target >= 0, target < code.count else {
                        throw .elf("the call at instruction \(at) targets instruction \(target), outside the program")
                    }
                    code[at].imm = Int32(target - (at + 1))
                default:
                    throw .elf("unsupported relocation type \(type) at instruction \(at)")
                }
            }
        }
    }

    static func readDriver(_ r: ELFReader, _ sections: [Section]) throws(BPFError) -> DriverDeclaration? {
        guard let d = sections.first(where: { $0.name == ".pvsched.driver" }) else { return nil }
        guard d.type == ELF.shtProgbits, d.size >= MemoryLayout<pvsched_bpf_driver_info>.size else {
            throw .elf(".pvsched.driver is too small or holds no data")
        }
        let nameLen = Int(PVSCHED_PROTOCOL_NAME_LEN)
        let o = d.range.lowerBound
        return DriverDeclaration(name: try r.string(at: 0, in: o..<(o + nameLen), ".pvsched.driver name"),
                                 events: try r.u32(o + nameLen, ".pvsched.driver events"),
                                 protocolMajor: UInt16(try r.u16(o + nameLen + 4, ".pvsched.driver protocol_major")),
                                 protocolMinor: UInt16(try r.u16(o + nameLen + 6, ".pvsched.driver protocol_minor")))
    }
}
