import Atomics
import PVSchedABI
import PVSchedBPF
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage
import PVSchedKVM
import PVSchedHost
import PVSchedLinux
#if canImport(Glibc)
import Glibc
import PVSchedTesting
#endif

/// One benchmark: a measured operation against a baseline measured in the same run.
public struct BenchResult: Codable, Sendable {
    public var name: String
    public var baseline: String
    /// Median ns per operation over the repetitions.
    public var nsPerOp: Double
    public var baselineNsPerOp: Double
    public var ratio: Double { baselineNsPerOp > 0 ? nsPerOp / baselineNsPerOp : 0 }
}

extension BenchResult {
    /// A latency distribution against its baseline: one result per percentile
    /// (named "NAME, p50", "NAME, p99", ...).
    static func percentiles<T: BinaryInteger>(_ name: String, _ samples: [T], baseline: String, _ baselineSamples: [T],
                                              at ps: [(String, Double)] = [("p50", 0.5), ("p99", 0.99)]) -> [BenchResult] {
        ps.map { label, p in
            BenchResult(name: "\(name), \(label)", baseline: "\(baseline), \(label)",
                        nsPerOp: Sample.percentile(samples, p), baselineNsPerOp: Sample.percentile(baselineSamples, p))
        }
    }
}

/// Order statistics of measured samples, for every benchmark and report.
enum Sample {
    /// The value at fraction `p` (0...1) of the sorted samples (0 when empty).
    static func percentile<T: BinaryInteger>(_ v: [T], _ p: Double) -> Double { percentile(v.map { Double($0) }, p) }
    static func percentile(_ v: [Double], _ p: Double) -> Double {
        guard !v.isEmpty else { return 0 }
        let s = v.sorted()
        return s[min(s.count - 1, Int(Double(s.count) * p))]
    }
    static func median(_ v: [Double]) -> Double { percentile(v, 0.5) }
}

/// Micro-benchmarks of the pvsched mechanism: the driver decision, the
/// shared-area read, the actuator, and the cost pvsched adds to a VM exit.
public enum MechanismBench {
    /// Median ns/op of `body` (which runs `n` operations) over `reps` repetitions.
    static func measure(reps: Int = 7, n: Int, _ body: () -> Void) -> Double {
        var times: [Double] = []
        for _ in 0..<reps {
            let t0 = MonotonicClock.nowNs()
            body()
            times.append(Double(MonotonicClock.nowNs() - t0) / Double(n))
        }
        return Sample.median(times)
    }

    public static func driverDecision() -> BenchResult {
        let n = 1_000_000
        let lb = LatencyBoostDriver(), nop = NopDriver()
        let views = (0..<64).map { i in
            VCPUView(vcpu: 0, guest: GuestVCPUState(flags: .init(rawValue: UInt32(i) & 0x7F)), boosted: i % 3 == 0,
                     boostedSinceNs: 10, nowNs: UInt64(i) * 1000)
        }
        let events: [VCPUEvent] = [.vmEntry, .vmExit(.halt), .halt, .interruptInjection(vector: 48)]
        var sink = 0
        let t = measure(n: n) {
            for i in 0..<n { if lb.decide(event: events[i & 3], view: views[i & 63]) != .none { sink &+= 1 } }
        }
        let b = measure(n: n) {
            for i in 0..<n { if nop.decide(event: events[i & 3], view: views[i & 63]) != .none { sink &+= 1 } }
        }
        if sink == -1 { print(sink) }
        return BenchResult(name: "latency-boost decision", baseline: "nop decision", nsPerOp: t, baselineNsPerOp: b)
    }

    public static func sharedAreaRead() -> BenchResult {
        let n = 1_000_000
        let buf = SharedAreaBuffer(vcpus: 1)
        let area = try! SharedArea(validating: buf.bytes)
        buf.writer.update(vcpu: 0) { $0.flags = PVSCHED_FLAG_RT_TASK_RUNNING; $0.task_policy = PVSCHED_TASK_FIFO; $0.task_priority = 5 }
        var sink: UInt32 = 0
        let t = measure(n: n) { for _ in 0..<n { sink &+= (try? area.read(vcpu: 0))?.flags.rawValue ?? 0 } }
        // Baseline: the same six field loads (relaxed atomics) without the sequence
        // counter protocol and without validation.
        let line = UnsafeMutableRawPointer(buf.writer.vcpu(0))
        func field32(_ off: Int) -> UnsafeAtomic<UInt32> {
            UnsafeAtomic(at: (line + off).assumingMemoryBound(to: UnsafeAtomic<UInt32>.Storage.self))
        }
        func field64(_ off: Int) -> UnsafeAtomic<UInt64> {
            UnsafeAtomic(at: (line + off).assumingMemoryBound(to: UnsafeAtomic<UInt64>.Storage.self))
        }
        let b = measure(n: n) {
            for _ in 0..<n {
                sink &+= field32(Int(PVSCHED_OFF_FLAGS)).load(ordering: .relaxed)
                sink &+= field32(Int(PVSCHED_OFF_TASK_POLICY)).load(ordering: .relaxed)
                sink &+= field32(Int(PVSCHED_OFF_TASK_PRIORITY)).load(ordering: .relaxed)
                sink &+= field32(Int(PVSCHED_OFF_TASK_NICE)).load(ordering: .relaxed)
                sink &+= UInt32(truncatingIfNeeded: field64(Int(PVSCHED_OFF_NEXT_DEADLINE)).load(ordering: .relaxed))
                sink &+= UInt32(truncatingIfNeeded: field64(Int(PVSCHED_OFF_GUEST_CLOCK)).load(ordering: .relaxed))
            }
        }
        if sink == 1 { print(sink) }
        return BenchResult(name: "shared-area read (seqlock + validation)", baseline: "same loads, unchecked",
                           nsPerOp: t, baselineNsPerOp: b)
    }

    /// Boost + restore of a real thread, against the sched_getattr system call alone.
    public static func actuator() -> BenchResult? {
        guard LinuxScheduling.canUseRealTime else { return nil }
        let stop = ManagedAtomic(false)
        let tidBox = ManagedAtomic<Int32>(0)
        guard let t = try? PVSchedCore.Thread(body: {
            tidBox.store(LinuxScheduling.currentThread().rawValue, ordering: .releasing)
            while !stop.load(ordering: .relaxed) { usleep(1000) }
        }) else { return nil }
        while tidBox.load(ordering: .acquiring) == 0 { usleep(100) }
        let tid = ThreadID(tidBox.load(ordering: .acquiring))
        let act = LinuxActuator()
        let n = 2000
        let cycle = measure(n: n) {
            for _ in 0..<n {
                try? act.apply(.fifo(priority: 10), to: tid)
                try? act.restore(tid)
            }
        }
        let getattr = measure(n: n) { for _ in 0..<n { _ = try? LinuxScheduling.parameters(of: tid) } }
        stop.store(true, ordering: .relaxed)
        t.join()
        return BenchResult(name: "actuator boost + restore", baseline: "one sched_getattr", nsPerOp: cycle, baselineNsPerOp: getattr)
    }

    /// ns per port-IO exit measured by the guest, with `driver` (nil: no pvsched).
    static func exitCost(driver: String?) throws -> Double {
        var c = VMConfiguration(image: GuestImage.kernel)
        c.boot.workload = .selftest
        c.boot.arg = PVSCHED_SELFTEST_EXIT_LOOP
        c.boot.pvschedEnabled = driver != nil
        let host = try PVSchedHost(actuator: RecordingActuator())
        let vm = try host.makeVM(config: c, pvsched: driver != nil, driver: driver)
        try vm.start()
        guard vm.wait(timeoutNs: 30_000_000_000) == .exited(code: 0), let r = try vm.readResults()?.vcpus.first,
              r.samples > 0 else {
            throw ResultsError(field: "samples", detail: "the exit loop did not report")
        }
        return Double(r.latenessSumNs) / Double(r.samples)
    }

    /// Per-exit cost with the nop and latency-boost drivers against no pvsched, interleaved runs.
    public static func exitOverhead(reps: Int = 5) throws -> [BenchResult] {
        var base: [Double] = [], nop: [Double] = [], lb: [Double] = []
        for _ in 0..<reps {
            base.append(try exitCost(driver: nil))
            nop.append(try exitCost(driver: "nop"))
            lb.append(try exitCost(driver: "latency-boost"))
        }
        return [
            BenchResult(name: "VM exit with nop driver", baseline: "VM exit without pvsched",
                        nsPerOp: Sample.median(nop), baselineNsPerOp: Sample.median(base)),
            BenchResult(name: "VM exit with latency-boost", baseline: "VM exit without pvsched",
                        nsPerOp: Sample.median(lb), baselineNsPerOp: Sample.median(base)),
        ]
    }

    /// The sample BPF policy's decision against the built-in driver's, and the
    /// interpreter's kernels (`BPFKernel`: ns per instruction, and per call).
    public static func bpf() throws -> [BenchResult] {
        let driver = try BPFDriver(elf: GuestImage.sampleBPFDriver)
        let interpretedDriver = try BPFDriver(program: driver.interpreter.program, compile: false)
        let builtin = LatencyBoostDriver()
        let views = (0..<64).map { i in
            VCPUView(vcpu: 0, guest: GuestVCPUState(flags: .init(rawValue: UInt32(i) & 0x7F)), boosted: i % 3 == 0,
                     boostedSinceNs: 10, nowNs: UInt64(i) * 1000)
        }
        let events: [VCPUEvent] = [.vmEntry, .vmExit(.halt), .halt, .interruptInjection(vector: 48)]
        let n = 200_000
        var sink = 0
        let b = measure(n: n) { for i in 0..<n { if driver.decide(event: events[i & 3], view: views[i & 63]) != .none { sink &+= 1 } } }
        let s = measure(n: n) { for i in 0..<n { if builtin.decide(event: events[i & 3], view: views[i & 63]) != .none { sink &+= 1 } } }
        if sink == -1 { print(sink) }

        // The interpreter's kernels (scripts/bench-bpf-against.sh compares them with another revision).
        let bi = measure(n: n) { for i in 0..<n { if interpretedDriver.decide(event: events[i & 3], view: views[i & 63]) != .none { sink &+= 1 } } }
        if sink == -1 { print(sink) }
        var results = [BenchResult(name: "latency-boost decision in BPF", baseline: "the same policy built in", nsPerOp: b, baselineNsPerOp: s),
                       BenchResult(name: "latency-boost decision in BPF, interpreted", baseline: "the same policy built in",
                                   nsPerOp: bi, baselineNsPerOp: s)]
        for kernel in BPFKernel.all {
            let interpreted = try kernel.measure()
            // Compiled to machine code, after verification (as every driver is).
            let compiled = try kernel.measure { program in
                try Verifier(program: program, context: ContextDescription(size: kernel.contextSize, writable: false)).verify()
                return Interpreter(program: program, verified: true)
            }
            results.append(BenchResult(name: "BPF compiled, \(kernel.name), ns per \(kernel.unit)",
                                       baseline: "the same interpreted", nsPerOp: compiled, baselineNsPerOp: interpreted))
        }
        return results
    }

    public static func table(_ results: [BenchResult]) -> String {
        var rows = [["benchmark", "ns/op", "baseline", "ns/op", "ratio"]]
        for r in results {
            rows.append([r.name, Report.format(r.nsPerOp), r.baseline, Report.format(r.baselineNsPerOp), String(format: "%.2fx", r.ratio)])
        }
        return Report.render(rows)
    }
}
