import GuestSupport
import PVSchedABI

/// Workload results in guest memory, read by the host at the end.
enum Results {
    nonisolated(unsafe) static var base: UnsafeMutablePointer<pvsched_results>? = nil

    static func setUp() {
        let n = Int(boot.pointee.vcpu_count)
        let samplesOffset = (MemoryLayout<pvsched_results>.size + n * MemoryLayout<pvsched_vcpu_results>.stride + 63) & ~63
        let size = samplesOffset + n * Int(PVSCHED_MAX_SAMPLES) * 4
        let raw = guest_alloc(size, 4096)!
        base = raw.assumingMemoryBound(to: pvsched_results.self)
        base!.pointee.magic = PVSCHED_RESULTS_MAGIC
        base!.pointee.vcpu_count = UInt32(n)
        base!.pointee.samples_offset = UInt32(samplesOffset)
        base!.pointee.max_samples = UInt32(PVSCHED_MAX_SAMPLES)
        boot.pointee.results_gpa = UInt64(UInt(bitPattern: raw))
        boot.pointee.results_size = UInt64(size)
    }

    static func mine() -> UnsafeMutablePointer<pvsched_vcpu_results> {
        let first = UnsafeMutableRawPointer(base!) + MemoryLayout<pvsched_results>.size
        return first.assumingMemoryBound(to: pvsched_vcpu_results.self) + Int(this_cpu())
    }

    /// Records one lateness sample (ns).
    static func record(_ r: UnsafeMutablePointer<pvsched_vcpu_results>, latenessNs: UInt64) {
        if r.pointee.samples == 0 || latenessNs < r.pointee.lateness_min_ns { r.pointee.lateness_min_ns = latenessNs }
        r.pointee.samples &+= 1
        r.pointee.lateness_sum_ns &+= latenessNs
        if latenessNs > r.pointee.lateness_max_ns { r.pointee.lateness_max_ns = latenessNs }
        var bucket = 0
        var v = latenessNs
        while v > 1 && bucket < Int(PVSCHED_HIST_BUCKETS) - 1 { v >>= 1; bucket += 1 }
        withUnsafeMutableBytes(of: &r.pointee.hist) { h in
            let p = h.baseAddress!.assumingMemoryBound(to: UInt64.self)
            p[bucket] &+= 1
        }
        if r.pointee.sample_count < UInt32(PVSCHED_MAX_SAMPLES) {
            let samples = (UnsafeMutableRawPointer(base!) + Int(base!.pointee.samples_offset))
                .assumingMemoryBound(to: UInt32.self) + Int(this_cpu()) * Int(PVSCHED_MAX_SAMPLES)
            samples[Int(r.pointee.sample_count)] = UInt32(min(latenessNs, UInt64(UInt32.max)))
            r.pointee.sample_count += 1
        }
    }
}

/// The workloads the host chooses at boot.
enum Workloads {
    static func workload(of cpu: UInt32) -> UInt32 {
        var w = boot.pointee.workload
        withUnsafeBytes(of: boot.pointee.vcpu_workload) { per in
            if Int(cpu) < per.count, per[Int(cpu)] != 0xFF { w = UInt32(per[Int(cpu)]) }
        }
        return w <= PVSCHED_WORKLOAD_MAX ? w : PVSCHED_WORKLOAD_IDLE
    }

    static func run(_ workload: UInt32, cpu index: UInt32) {
        let r = Results.mine()
        r.pointee.workload = workload
        r.pointee.vcpu = index
        switch workload {
        case PVSCHED_WORKLOAD_SELFTEST: selftest(index)
        case PVSCHED_WORKLOAD_CYCLIC: cyclic(r)
        case PVSCHED_WORKLOAD_IRQ_RESPONSE: idleUntilEnd(r)
        case PVSCHED_WORKLOAD_BATCH: batch(r)
        default: idleUntilEnd(r)
        }
    }

    /// Arms the VMM timer for `us` µs and sleeps (halts) until it fires.
    /// The timer is armed before the vCPU declares itself idle: arming is an exit,
    /// and a latency-sensitive task should not be deboosted before its timer is set.
    static func sleepFor(us: UInt64, deadlineTSC: UInt64, nowTSC now: UInt64) {
        let c = cpu
        let before = c.pointee.timerFired
        outl(UInt16(PVSCHED_PORT_TIMER_ARM), UInt32(max(1, min(us, 10_000_000))))
        if PVSched.active { PVSched.sleeping(untilNs: deadlineTSC == 0 ? 0 : tscToNs(deadlineTSC), nowNs: tscToNs(now)) }
        cpu_disable_interrupts()
        while c.pointee.timerFired == before { cpu_enable_and_halt(); cpu_disable_interrupts() }
        cpu_enable_interrupts()
        if PVSched.active { PVSched.awake() }
    }

    static var endTSC: UInt64 { startTSC &+ nsToTSC(boot.pointee.duration_ns) }
    nonisolated(unsafe) static var startTSC: UInt64 = 0

    /// cyclictest in the guest: a real-time task wakes every interval and records
    /// how late it woke against the time it asked for.
    static func cyclic(_ r: UnsafeMutablePointer<pvsched_vcpu_results>) {
        let interval = nsToTSC(boot.pointee.interval_ns)
        let start = nowTSC()
        let end = start &+ nsToTSC(boot.pointee.duration_ns)
        var next = start &+ interval
        while true {
            let now = nowTSC()
            if now >= end { break }
            if next <= now { next = now &+ interval }  // fell behind: start a new period
            sleepFor(us: (next - now) / tscPerUs, deadlineTSC: next, nowTSC: now)
            let woke = nowTSC()
            if PVSched.active { PVSched.rtTask(running: true) }
            Results.record(r, latenessNs: woke > next ? tscToNs(woke - next) : 0)
            next &+= interval
            // The RT task stays marked running until sleepFor arms the next wake-up.
        }
        if PVSched.active {
            PVSched.rtTask(running: false)
            PVSched.deboostIfDone()  // what follows is not latency-sensitive
        }
    }

    /// A CPU-bound normal task: counts work units until the duration ends.
    static func batch(_ r: UnsafeMutablePointer<pvsched_vcpu_results>) {
        let end = nowTSC() &+ nsToTSC(boot.pointee.duration_ns)
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        cpu_enable_interrupts()
        while nowTSC() < end {
            for _ in 0..<10_000 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            r.pointee.work_units &+= 1
        }
        if x == 42 { Console.line("") }  // keep the loop
    }

    /// Halts with interrupts on until the duration ends (interrupt handlers do the work).
    static func idleUntilEnd(_ r: UnsafeMutablePointer<pvsched_vcpu_results>) {
        let end = nowTSC() &+ nsToTSC(boot.pointee.duration_ns)
        var now = nowTSC()
        while now < end {
            sleepFor(us: min(100_000, (end - now) / tscPerUs + 1), deadlineTSC: 0, nowTSC: now)
            now = nowTSC()
        }
    }

    /// The kvm-component self test: flags, host status, doorbell, interrupts.
    static func selftest(_ index: UInt32) {
        let variant = boot.pointee.arg
        if variant == PVSCHED_SELFTEST_EXIT_LOOP {
            let r = Results.mine()
            let n: UInt64 = 2000
            let t0 = nowTSC()
            for _ in 0..<n { _ = inl(UInt16(PVSCHED_DEV_VCPU_ID)) }
            r.pointee.lateness_sum_ns = tscToNs(nowTSC() - t0)
            r.pointee.samples = n
            return
        }
        cpu_enable_interrupts()
        if variant == PVSCHED_SELFTEST_BAD_FLAGS && index == 0 {
            PVSched.writeRawFlags(0x8000_0000)
            _ = inl(UInt16(PVSCHED_DEV_VCPU_ID))  // an exit, so the host reads the line
            Console.line("pvsched guest: wrote unknown flag bits")
        }
        if PVSched.active {
            PVSched.rtTask(running: true)
            let id = inl(UInt16(PVSCHED_DEV_VCPU_ID))  // an exit while the RT task runs
            Console.put("pvsched guest: vCPU "); Console.put(id); Console.put(" host status with rt task: ")
            Console.put(PVSched.hostStatus()); Console.put("\n")
            PVSched.rtTask(running: false)
            let rang = PVSched.deboostIfDone()
            Console.put("pvsched guest: vCPU "); Console.put(index); Console.put(rang ? " rang doorbell" : " no doorbell")
            Console.put(", host status now: "); Console.put(PVSched.hostStatus()); Console.put("\n")
        }
        if variant == PVSCHED_SELFTEST_INTERRUPTS {
            var t0 = nowTSC()
            for _ in 0..<100 { _ = inl(UInt16(PVSCHED_DEV_VCPU_ID)) }
            Console.put("pvsched guest: vCPU "); Console.put(index); Console.put(" port exit round trip ns: ")
            Console.put(tscToNs(nowTSC() - t0) / 100); Console.put("\n")
            t0 = nowTSC()
            for _ in 0..<100 { _ = nowTSC() }
            Console.put("pvsched guest: rdtsc ns: "); Console.put(tscToNs(nowTSC() - t0) / 100); Console.put("\n")
            for _ in 0..<3 {
                t0 = nowTSC()
                sleepFor(us: 1000, deadlineTSC: t0 &+ nsToTSC(1_000_000), nowTSC: t0)
                Console.put("pvsched guest: 1000 us sleep took ns: "); Console.put(tscToNs(nowTSC() - t0)); Console.put("\n")
            }
            Console.put("pvsched guest: vCPU "); Console.put(index); Console.put(" timer interrupts: ")
            Console.put(cpu.pointee.timerFired); Console.put("\n")
        }
    }
}

/// The guest side of the interrupt-response device: answer each event at once.
enum IRQResponse {
    static func handle() {
        let seq = inl(UInt16(PVSCHED_PORT_IRQ_SEQ))
        outl(UInt16(PVSCHED_PORT_IRQ_ACK), seq)
        let r = Results.mine()
        r.pointee.samples &+= 1
    }
}
