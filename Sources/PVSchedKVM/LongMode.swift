import CKVM
import PVSchedABI

/// Puts a vCPU straight into 64-bit long mode: identity page tables for the
/// first 4 GiB (2 MiB pages), a GDT in guest memory (iretq reloads CS/SS from
/// it), and CR0/CR4/EFER set through KVM_SET_SREGS.
enum LongMode {
    static let codeSelector: UInt16 = 0x8
    static let dataSelector: UInt16 = 0x10

    /// Writes the page tables and GDT into guest memory (once per VM).
    static func writeTables(into memory: GuestMemory) throws(KVMError) {
        guard let gdt = memory.pointer(to: (UInt64, UInt64, UInt64).self, at: UInt64(PVSCHED_GPA_GDT)),
              let pml4 = memory.bytes(at: UInt64(PVSCHED_GPA_PML4), length: 4096),
              let pdpt = memory.bytes(at: UInt64(PVSCHED_GPA_PDPT), length: 4096),
              let pd = memory.bytes(at: UInt64(PVSCHED_GPA_PD), length: 4 * 4096) else {
            throw KVMError("write page tables", detail: "guest memory too small")
        }
        gdt.pointee = (0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff)
        let present: UInt64 = 1, writable: UInt64 = 2, huge: UInt64 = 0x80
        pml4.storeBytes(of: UInt64(PVSCHED_GPA_PDPT) | present | writable, toByteOffset: 0, as: UInt64.self)
        for i in 0..<4 {
            pdpt.storeBytes(of: (UInt64(PVSCHED_GPA_PD) + UInt64(i) * 4096) | present | writable,
                            toByteOffset: i * 8, as: UInt64.self)
        }
        for i in 0..<(4 * 512) {
            pd.storeBytes(of: (UInt64(i) << 21) | present | writable | huge, toByteOffset: i * 8, as: UInt64.self)
        }
    }

    static func configure(_ sregs: inout kvm_sregs) {
        var code = kvm_segment()
        code.base = 0; code.limit = 0xffff_ffff; code.selector = codeSelector
        code.type = 11; code.present = 1; code.dpl = 0; code.db = 0; code.s = 1; code.l = 1; code.g = 1
        var data = code
        data.selector = dataSelector; data.type = 3; data.l = 0; data.db = 1
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.gdt.base = UInt64(PVSCHED_GPA_GDT)
        sregs.gdt.limit = 23
        sregs.cr3 = UInt64(PVSCHED_GPA_PML4)
        sregs.cr4 = 0x20 | 0x200 | 0x400 | 0x40000  // PAE, OSFXSR, OSXMMEXCPT, OSXSAVE
        sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x10000 | 0x8000_0000  // PE MP ET NE WP PG
        sregs.efer = 0x100 | 0x400              // LME, LMA
    }
}
