import GuestSupport
import PVSchedABI

/// The pvsched guest framework: registers the shared area with the pvsched
/// device, advertises the protocol, and keeps each vCPU's guest line current
/// (interrupt entry/exit, the running task, deadlines). Boost requests are lazy
/// writes; the doorbell is rung only when the host shows the vCPU boosted and
/// nothing latency-sensitive is left.
enum PVSched {
    nonisolated(unsafe) static var area: UnsafeMutableRawPointer? = nil
    static let setUpWord: UInt32 = 3

    static let latencyFlags: UInt32 = PVSCHED_FLAG_IN_IRQ | PVSCHED_FLAG_IN_SOFTIRQ | PVSCHED_FLAG_IN_NMI
        | PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_BOOST_REQUEST

    static var active: Bool { area != nil }

    /// Builds the area and registers it (vCPU 0). `variant` injects a fault for tests.
    static func setUp(variant: UInt32) {
        let n = Int(boot.pointee.vcpu_count)
        let size = Int(PVSCHED_REGION_HEADER_SIZE) + n * Int(PVSCHED_VCPU_AREA_SIZE)
        let base = guest_alloc(size, 4096)!
        let h = base.assumingMemoryBound(to: pvsched_region_header.self)
        h.pointee.magic = variant == PVSCHED_SELFTEST_BAD_MAGIC ? 0xBAD0_BAD0 : PVSCHED_MAGIC
        h.pointee.abi_version = UInt16(PVSCHED_ABI_VERSION)
        h.pointee.header_size = UInt16(PVSCHED_REGION_HEADER_SIZE)
        withUnsafeMutableBytes(of: &h.pointee.protocol_name) { dst in
            var p = pvsched_protocol_latency_name()!
            var i = 0
            while p.pointee != 0 && i < dst.count - 1 { dst[i] = UInt8(bitPattern: p.pointee); p += 1; i += 1 }
        }
        h.pointee.protocol_major = UInt16(PVSCHED_PROTOCOL_LATENCY_MAJOR)
        h.pointee.protocol_minor = UInt16(PVSCHED_PROTOCOL_LATENCY_MINOR)
        h.pointee.vcpu_count = UInt16(n)
        h.pointee.vcpu_stride = UInt16(PVSCHED_VCPU_AREA_SIZE)
        h.pointee.vcpu_offset = UInt32(PVSCHED_REGION_HEADER_SIZE)

        var gpa = UInt64(UInt(bitPattern: base))
        if variant == PVSCHED_SELFTEST_OUT_OF_RAM { gpa = boot.pointee.memory_size + 4096 }
        outl(UInt16(PVSCHED_DEV_AREA_LO), UInt32(truncatingIfNeeded: gpa))
        outl(UInt16(PVSCHED_DEV_AREA_HI), UInt32(truncatingIfNeeded: gpa >> 32))
        outl(UInt16(PVSCHED_DEV_AREA_SIZE), UInt32(size))
        outl(UInt16(PVSCHED_DEV_COMMAND), PVSCHED_CMD_REGISTER)
        let status = inl(UInt16(PVSCHED_DEV_STATUS))
        if status == PVSCHED_DEV_ACCEPTED {
            area = base
            Console.line("pvsched guest: area registered: accepted")
        } else {
            Console.put("pvsched guest: area registered: refused, reason ")
            Console.put(inl(UInt16(PVSCHED_DEV_REASON)))
            Console.put("\n")
        }
        store_release32(Sync.word(setUpWord), 1)
    }

    static func waitForSetUp() {
        while load_acquire32(Sync.word(setUpWord)) == 0 { cpu_pause() }
    }

    static func line(_ cpu: UInt32) -> UnsafeMutablePointer<pvsched_vcpu_guest>? {
        guard let area else { return nil }
        return (area + Int(PVSCHED_REGION_HEADER_SIZE) + Int(cpu) * Int(PVSCHED_VCPU_AREA_SIZE))
            .assumingMemoryBound(to: pvsched_vcpu_guest.self)
    }

    /// Updates this vCPU's line under the sequence counter, with interrupts off
    /// so an interrupt handler cannot nest inside the update. `clockNs` stamps
    /// guest_clock_ns when the caller already knows the time (reading the TSC
    /// costs an exit under PVM, so updates do not read it themselves).
    static func update(clockNs: UInt64 = 0, _ body: (inout pvsched_vcpu_guest) -> Void) {
        let irq = irq_save()
        updateWithInterruptsOff(clockNs: clockNs, body)
        irq_restore(irq)
    }

    /// `update` for callers that already run with interrupts off (the scheduler):
    /// under PVM every cli/sti/pushf is a trap, so they are not repeated.
    static func updateWithInterruptsOff(clockNs: UInt64 = 0, _ body: (inout pvsched_vcpu_guest) -> Void) {
        guard let g = line(this_cpu()) else { return }
        pvsched_guest_write_begin(g)
        body(&g.pointee)
        if clockNs != 0 { g.pointee.guest_clock_ns = clockNs }
        pvsched_guest_write_end(g)
    }

    static func setFlags(_ set: UInt32, clear: UInt32) {
        update { $0.flags = ($0.flags & ~clear) | set }
    }

    /// Interrupt entry: the first level marks in_irq.
    static func irqEnter() {
        let c = cpu
        c.pointee.irqNesting &+= 1
        if c.pointee.irqNesting == 1, let g = line(c.pointee.index) {
            pvsched_guest_write_begin(g)
            g.pointee.flags |= PVSCHED_FLAG_IN_IRQ
            pvsched_guest_write_end(g)
        }
    }

    static func irqExit() {
        let c = cpu
        c.pointee.irqNesting &-= 1
        if c.pointee.irqNesting == 0, let g = line(c.pointee.index) {
            pvsched_guest_write_begin(g)
            g.pointee.flags &= ~PVSCHED_FLAG_IN_IRQ
            pvsched_guest_write_end(g)
        }
    }

    /// Records that a real-time task (FIFO `priority`) runs now, or that none does
    /// (then `nextDeadlineNs` is the next RT wake-up, stamped at `nowNs`).
    static func rtTask(running: Bool, priority: Int32 = 50, nextDeadlineNs: UInt64 = 0, nowNs: UInt64 = 0,
                       interruptsOff: Bool = false) {
        let body: (inout pvsched_vcpu_guest) -> Void = { g in
            if running {
                // The RT task runs: its boost request (if any) is answered.
                g.flags = (g.flags | PVSCHED_FLAG_RT_TASK_RUNNING) & ~(PVSCHED_FLAG_IDLE | PVSCHED_FLAG_BOOST_REQUEST)
                g.task_policy = PVSCHED_TASK_FIFO; g.task_priority = priority; g.task_nice = 0
            } else {
                g.flags &= ~PVSCHED_FLAG_RT_TASK_RUNNING
                g.task_policy = PVSCHED_TASK_NORMAL; g.task_priority = 0; g.task_nice = 0
            }
            g.flags &= ~PVSCHED_FLAG_IDLE
            g.next_deadline_ns = running ? 0 : nextDeadlineNs
        }
        if interruptsOff { updateWithInterruptsOff(clockNs: nowNs, body) } else { update(clockNs: nowNs, body) }
    }

    /// Publishes the next latency-sensitive deadline (guest ns; 0 = none) and idleness.
    static func sleeping(untilNs deadline: UInt64, nowNs: UInt64, interruptsOff: Bool = false) {
        let body: (inout pvsched_vcpu_guest) -> Void = { g in
            g.next_deadline_ns = deadline
            g.flags = (g.flags | PVSCHED_FLAG_IDLE) & ~PVSCHED_FLAG_RT_TASK_RUNNING
            g.task_policy = PVSCHED_TASK_IDLE; g.task_priority = 0; g.task_nice = 0
        }
        if interruptsOff { updateWithInterruptsOff(clockNs: nowNs, body) } else { update(clockNs: nowNs, body) }
    }

    static func awake() {
        update { g in g.flags &= ~PVSCHED_FLAG_IDLE; g.next_deadline_ns = 0 }
    }

    /// The host's status of this vCPU (PVSCHED_STATUS_*).
    static func hostStatus() -> UInt32 {
        guard let g = line(this_cpu()) else { return PVSCHED_STATUS_DISABLED }
        let host = UnsafeMutableRawPointer(g) + Int(PVSCHED_OFF_HOST_STATUS)
        return load_acquire32(host.assumingMemoryBound(to: UInt32.self))
    }

    /// Rings the deboost doorbell if the host shows this vCPU boosted and nothing
    /// latency-sensitive remains. Returns whether it rang.
    @discardableResult
    static func deboostIfDone() -> Bool {
        guard let g = line(this_cpu()) else { return false }
        let flags = load_acquire32((UnsafeMutableRawPointer(g) + Int(PVSCHED_OFF_FLAGS)).assumingMemoryBound(to: UInt32.self))
        guard flags & latencyFlags == 0, hostStatus() == PVSCHED_STATUS_BOOSTED else { return false }
        outl(UInt16(PVSCHED_DEV_DOORBELL), this_cpu())
        return true
    }

    /// A test hook: writes a raw flags value, valid or not.
    static func writeRawFlags(_ flags: UInt32) { update { $0.flags = flags } }
}
