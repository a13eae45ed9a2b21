/// Named ELF constants (System V gABI, and the BPF relocation types).
enum ELF {
    static let magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46]
    static let class64: UInt8 = 2          // EI_CLASS = ELFCLASS64
    static let dataLittle: UInt8 = 1       // EI_DATA = ELFDATA2LSB
    static let machineBPF = 247            // EM_BPF
    static let headerSize = 64             // sizeof(Elf64_Ehdr)
    static let sectionHeaderSize = 64      // sizeof(Elf64_Shdr)
    static let symbolSize = 24             // sizeof(Elf64_Sym)
    static let relSize = 16                // sizeof(Elf64_Rel)
    // Elf64_Ehdr fields.
    static let eMachine = 18, eShoff = 0x28, eShentsize = 0x3A, eShnum = 0x3C, eShstrndx = 0x3E
    // Elf64_Shdr fields.
    static let shName = 0, shType = 4, shOffset = 24, shSize = 32, shLink = 40, shInfo = 44, shEntsize = 56
    // Section types.
    static let shtProgbits: UInt32 = 1, shtSymtab: UInt32 = 2, shtStrtab: UInt32 = 3, shtNobits: UInt32 = 8, shtRel: UInt32 = 9
    // Elf64_Sym fields.
    static let stName = 0, stShndx = 6, stValue = 8
    // BPF relocation types.
    static let rBPF64_64: UInt64 = 1       // R_BPF_64_64: ldimm64 of a map
    static let rBPF64_32: UInt64 = 10      // R_BPF_64_32: a call into a local function
    /// Largest object accepted (the daemon takes objects from its control socket).
    static let maxObjectBytes = 16 << 20
    /// Largest number of sections accepted.
    static let maxSections = 4096
}

/// Every read of an untrusted ELF object goes through this reader: each offset
/// and length is checked against the file with overflow-safe arithmetic, and a
/// failure is a `BPFError.elf` naming what was being read.
struct ELFReader {
    let bytes: [UInt8]

    init(_ bytes: [UInt8]) throws(BPFError) {
        guard bytes.count <= ELF.maxObjectBytes else {
            throw .elf("the object is \(bytes.count) bytes; at most \(ELF.maxObjectBytes) are accepted")
        }
        self.bytes = bytes
    }

    /// [offset, offset+length) as a checked range of the file.
    func range(_ offset: Int, _ length: Int, _ what: @autoclosure () -> String) throws(BPFError) -> Range<Int> {
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard offset >= 0, length >= 0, !overflow, end <= bytes.count else {
            throw .elf("\(what()) (offset \(offset), \(length) bytes) lies outside the \(bytes.count)-byte file")
        }
        return offset..<end
    }

    func u8(_ o: Int, _ what: @autoclosure () -> String) throws(BPFError) -> UInt8 {
        bytes[try range(o, 1, what()).lowerBound]
    }

    func u16(_ o: Int, _ what: @autoclosure () -> String) throws(BPFError) -> Int {
        let r = try range(o, 2, what())
        return Int(bytes[r.lowerBound]) | Int(bytes[r.lowerBound + 1]) << 8
    }

    func u32(_ o: Int, _ what: @autoclosure () -> String) throws(BPFError) -> UInt32 {
        let r = try range(o, 4, what())
        var v: UInt32 = 0
        for k in (0..<4).reversed() { v = v << 8 | UInt32(bytes[r.lowerBound + k]) }
        return v
    }

    func u64(_ o: Int, _ what: @autoclosure () -> String) throws(BPFError) -> UInt64 {
        let r = try range(o, 8, what())
        var v: UInt64 = 0
        for k in (0..<8).reversed() { v = v << 8 | UInt64(bytes[r.lowerBound + k]) }
        return v
    }

    /// A 64-bit field that is a file offset or size: it must fit an Int.
    func offset(_ o: Int, _ what: @autoclosure () -> String) throws(BPFError) -> Int {
        let v = try u64(o, what())
        guard v <= UInt64(Int.max) else { throw .elf("\(what()) is 0x\(String(v, radix: 16)), out of range") }
        return Int(v)
    }

    /// The NUL-terminated string at `offset` inside `table` (a string table's range).
    func string(at offset: Int, in table: Range<Int>, _ what: @autoclosure () -> String) throws(BPFError) -> String {
        let (start, overflow) = table.lowerBound.addingReportingOverflow(offset)
        guard offset >= 0, !overflow, start < table.upperBound else {
            throw .elf("\(what()): name offset \(offset) is outside its string table (\(table.count) bytes)")
        }
        var end = start
        while end < table.upperBound && bytes[end] != 0 { end += 1 }
        return String(decoding: bytes[start..<end], as: UTF8.self)
    }
}
