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

    /// Starts the vCPU's workload as tasks and runs them to completion.
    static func run(_ workload: UInt32, cpu index: UInt32) {
        let r = Results.mine()
        r.pointee.workload = workload
        r.pointee.vcpu = index
        cpu.pointee.endTSC = nowTSC() &+ nsToTSC(boot.pointee.duration_ns)
        switch workload {
        case PVSCHED_WORKLOAD_SELFTEST:
            selftest(index)
            return
        case PVSCHED_WORKLOAD_CYCLIC:
            Sched.spawn(.cyclic, rtPriority: 50)
        case PVSCHED_WORKLOAD_BATCH:
            Sched.spawn(.batch, rtPriority: 0)
        case PVSCHED_WORKLOAD_CYCLIC_BATCH:
            Sched.spawn(.cyclic, rtPriority: 50)
            Sched.spawn(.batch, rtPriority: 0)
            Sched.spawn(.batch, rtPriority: 0)
        case PVSCHED_WORKLOAD_HOSTILE_STUCK:
            Sched.spawn(.hostileStuck, rtPriority: 99)
        case PVSCHED_WORKLOAD_HOSTILE_FLIP:
            Sched.spawn(.hostileFlip, rtPriority: 0)
        default:  // irq-response and idle: interrupt handlers do the work while the vCPU idles
            Sched.spawn(.waitForEnd, rtPriority: 0)
        }
        Sched.runUntilAllDone()
        if PVSched.active {
            PVSched.rtTask(running: false)
            PVSched.deboostIfDone()  // what follows is not latency-sensitive
        }
    }

    static var endTSC: UInt64 { cpu.pointee.endTSC }

    /// cyclictest in the guest: a real-time task sleeps until each period's start
    /// and records how late it woke against the time it asked for.
    static func cyclicTask() {
        let r = Results.mine()
        let interval = nsToTSC(boot.pointee.interval_ns)
        let end = endTSC
        var woke = nowTSC()
        var next = woke &+ interval
        while next < end {
            Sched.sleep(untilTSC: next)
            woke = nowTSC()
            Results.record(r, latenessNs: woke > next ? tscToNs(woke - next) : 0)
            next &+= interval
            if next <= woke { next = woke &+ interval }  // fell a whole period behind: start afresh
        }
    }

    /// A CPU-bound normal task: counts work units until the end, with a short
    /// preemption-off section now and then (as a kernel holding a spinlock would).
    static func batchTask() {
        let r = Results.mine()
        let end = endTSC
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        var round: UInt64 = 0
        while nowTSC() < end {
            round &+= 1
            if round % 16 == 0 {
                Sched.preemptDisable()
                for _ in 0..<200 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
                Sched.preemptEnable()
            }
            for _ in 0..<1_000 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            r.pointee.work_units &+= 1
        }
        if x == 42 { Console.line("") }  // keep the loop
    }

    /// A hostile guest: a real-time task that spins until the end and keeps its
    /// line saying "RT work running, boost requested", whatever the host does; it
    /// rings the doorbell now and then so that the host looks.
    static func hostileStuckTask() {
        let r = Results.mine()
        let end = endTSC
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        while nowTSC() < end {
            if PVSched.active {
                PVSched.setFlags(PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_BOOST_REQUEST, clear: PVSCHED_FLAG_IDLE)
                if r.pointee.work_units % 8 == 0 { outl(UInt16(PVSCHED_DEV_DOORBELL), this_cpu()) }
            }
            for _ in 0..<1_000 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            r.pointee.work_units &+= 1
        }
        if x == 42 { Console.line("") }
    }

    /// A hostile guest: flips "RT work running, boost requested" on and off as fast
    /// as it can, ringing the doorbell after each flip so that the host sees them all.
    static func hostileFlipTask() {
        let r = Results.mine()
        let end = endTSC
        let claim = PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_BOOST_REQUEST
        var x: UInt64 = 0x9E37_79B9_7F4A_7C15
        while nowTSC() < end {
            if PVSched.active {
                PVSched.setFlags(claim, clear: 0)
                outl(UInt16(PVSCHED_DEV_DOORBELL), this_cpu())
                PVSched.setFlags(0, clear: claim)
                outl(UInt16(PVSCHED_DEV_DOORBELL), this_cpu())
            }
            for _ in 0..<100 { x = x &* 6364136223846793005 &+ 1442695040888963407 }
            r.pointee.work_units &+= 1
        }
        if x == 42 { Console.line("") }
    }

    /// Self test only (no scheduler): arms the VMM timer for `us` µs and halts until it fires.
    /// The timer is armed before the vCPU declares itself idle: arming is an exit, and a
    /// latency-sensitive task should not be deboosted before its timer is set.
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
