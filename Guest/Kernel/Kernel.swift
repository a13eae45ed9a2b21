import GuestSupport
import PVSchedABI

/// Per-vCPU kernel state.
struct CPU {
    var index: UInt32 = 0
    var timerFired: UInt32 = 0
    var irqNesting: UInt32 = 0
    var endTSC: UInt64 = 0
}

nonisolated(unsafe) var bootInfo: UnsafeMutablePointer<pvsched_boot_info>? = nil
nonisolated(unsafe) var cpus: UnsafeMutablePointer<CPU>? = nil
nonisolated(unsafe) var tscPerUs: UInt64 = 1

/// Sync words shared by the vCPUs.
enum Sync {
    static let initDone: UInt32 = 0
    static let finished: UInt32 = 1
    static let failed: UInt32 = 2
    static func word(_ i: UInt32) -> UnsafeMutablePointer<UInt32> {
        UnsafeMutablePointer(mutating: guest_sync_word(i))!
    }
}

var boot: UnsafeMutablePointer<pvsched_boot_info> { bootInfo! }
var cpu: UnsafeMutablePointer<CPU> { cpus! + Int(this_cpu()) }

func nowTSC() -> UInt64 { cpu_rdtsc() }
func tscToNs(_ t: UInt64) -> UInt64 { t &* 1000 / tscPerUs }
func nsToTSC(_ ns: UInt64) -> UInt64 { ns &* tscPerUs / 1000 }

/// Stops the whole VM with `code` (0 = success).
func exitVM(_ code: UInt32) -> Never {
    outl(UInt16(PVSCHED_PORT_EXIT), code)
    while true { cpu_disable_interrupts(); cpu_halt() }
}

@_cdecl("kmain")
func kmain(_ vcpu: UInt64, _ info: UInt64) {
    let index = UInt32(vcpu)
    guest_percpu_init(index)
    if index == 0 {
        let b = UnsafeMutablePointer<pvsched_boot_info>(bitPattern: UInt(info))!
        guard b.pointee.magic == PVSCHED_BOOT_MAGIC, b.pointee.vcpu_count >= 1, b.pointee.vcpu_count <= 16 else {
            Console.line("pvsched guest: bad boot info")
            exitVM(0xBAD)
        }
        bootInfo = b
        tscPerUs = max(1, b.pointee.tsc_khz / 1000)
        let raw = guest_alloc(Int(b.pointee.vcpu_count) * MemoryLayout<CPU>.stride, 64)!
        cpus = raw.bindMemory(to: CPU.self, capacity: Int(b.pointee.vcpu_count))
        guest_idt_init()
        Results.setUp()
        Sched.setUp(vcpus: Int(b.pointee.vcpu_count))
        store_release32(Sync.word(Sync.initDone), 1)
    } else {
        while load_acquire32(Sync.word(Sync.initDone)) == 0 { cpu_pause() }
    }
    guest_idt_load()
    cpu.pointee.index = index
    if boot.pointee.irqchip != 0 { LAPIC.enable() }
    let workload = Workloads.workload(of: index)
    Console.put("pvsched guest: vCPU "); Console.put(index); Console.put(" of "); Console.put(boot.pointee.vcpu_count)
    Console.put(", workload "); Console.put(workload); Console.put("\n")

    if boot.pointee.pvsched_enabled != 0 {
        if index == 0 { PVSched.setUp(variant: workload == PVSCHED_WORKLOAD_SELFTEST ? boot.pointee.arg : 0) }
        else { PVSched.waitForSetUp() }
    }
    Workloads.run(workload, cpu: index)

    // Everyone reports; vCPU 0 ends the VM when all are done.
    _ = fetch_add32(Sync.word(Sync.finished), 1)
    if index == 0 {
        while load_acquire32(Sync.word(Sync.finished)) < boot.pointee.vcpu_count { cpu_pause() }
        boot.pointee.guest_status = 1
        Console.line("pvsched guest: done")
        exitVM(load_acquire32(Sync.word(Sync.failed)))
    }
    while true { cpu_disable_interrupts(); cpu_halt() }
}

/// Every interrupt and exception lands here (from isr_common in entry.S).
@_cdecl("isr_dispatch")
func isrDispatch(_ frame: UnsafeMutablePointer<interrupt_frame>) {
    let vector = frame.pointee.vector
    if vector < 32 {
        Console.put("pvsched guest: exception "); Console.put(vector)
        Console.put(" error "); Console.hex(frame.pointee.error_code)
        Console.put(" at rip "); Console.hex(frame.pointee.rip); Console.put(" on vCPU "); Console.put(this_cpu())
        Console.put("\n")
        exitVM(0x100 + UInt32(vector))
    }
    if vector == UInt64(PVSCHED_VECTOR_SPURIOUS) { return }
    PVSched.irqEnter()
    let c = cpu
    switch UInt32(vector) {
    case PVSCHED_VECTOR_TIMER:
        c.pointee.timerFired &+= 1
        Sched.timerTick()
    case PVSCHED_VECTOR_IRQ:
        IRQResponse.handle()
    default:
        break
    }
    if boot.pointee.irqchip != 0 { LAPIC.eoi() }
    PVSched.irqExit()
    Sched.interruptReturn()
}

/// The in-kernel LAPIC (xAPIC MMIO), used when the host runs an irqchip.
enum LAPIC {
    static let base: UInt64 = 0xFEE0_0000
    static func enable() {
        mmio_write32(base + 0xF0, 0x100 | PVSCHED_VECTOR_SPURIOUS)        // software enable
        mmio_write32(base + 0x320, PVSCHED_VECTOR_TIMER | (2 << 17))      // LVT timer: TSC-deadline mode
    }
    static func eoi() { mmio_write32(base + 0xB0, 0) }
    /// Fires PVSCHED_VECTOR_TIMER when the TSC reaches `tsc` (IA32_TSC_DEADLINE).
    static func armDeadline(_ tsc: UInt64) { cpu_wrmsr(0x6E0, tsc) }
}
