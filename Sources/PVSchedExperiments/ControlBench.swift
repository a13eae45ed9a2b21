import CHostService
import Logging
import PVSchedControl
import PVSchedCore
import PVSchedDaemon
import PVSchedHost
import PVSchedLinux
import Synchronization

#if canImport(Glibc)
import Glibc
import PVSchedTesting
#endif

/// Benchmarks of the host service: the control socket's round trip against a
/// bare Unix-socket ping-pong, and the per-event decision path of a VM with and
/// without 4 clients hammering the control socket (measured in the same run).
public enum ControlBench {
    /// A host with one attached 1-vCPU VM (recording actuator) served on a temporary socket.
    final class Setup {
        let host: PVSchedHost
        let handler: ControlHandler
        let server: ControlServer
        let session: AttachedVMSession
        let buffer = SharedAreaBuffer(vcpus: 1)
        let path = "/tmp/pvsched-bench-\(getpid()).sock"

        init() throws {
            var quiet = Logger(label: "pvsched.bench")
            quiet.logLevel = .warning
            host = try PVSchedHost(actuator: RecordingActuator(), logger: quiet)
            handler = try ControlHandler(host: host)
            server = try ControlServer(path: path, access: ControlAccess(), handler: handler)
            try server.start()
            session = try host.attach(VMSpec(name: "bench", source: .inProcess(vcpus: 1, summary: "benchmark"),
                                             driver: "latency-boost", governor: .unlimited))
            session.events.setThread(ThreadID(1_000_000), vcpu: 0)
            _ = session.link.registrar.register(area: buffer.bytes, owner: buffer)
        }

        deinit { session.stop(); server.stop(); handler.shutdown() }
    }

    /// Round-trip latency of `daemon.info` over the socket (p50 and p99) against
    /// a ping-pong of the same bytes on a bare Unix socket pair.
    public static func roundTrip(samples: Int = 3000) throws -> [BenchResult] {
        let setup = try Setup()
        let client = try ControlClient(path: setup.path)
        var control: [Double] = []
        for i in 0..<samples + 200 {
            let t0 = MonotonicClock.nowNs()
            _ = try client.call(DaemonInfo.self)
            if i >= 200 { control.append(Double(MonotonicClock.nowNs() - t0)) }
        }
        let line = ControlRequest.encode(id: 1, method: DaemonInfo.name, params: [:]) + [10]
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds) == 0 else { return [] }
        let echoFD = fds[1]
        guard let echo = try? PVSchedCore.Thread(body: {
            var buf = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = buf.withUnsafeMutableBytes { pvs_recv(echoFD, $0.baseAddress, $0.count) }
                if n <= 0 { return }
                _ = buf.withUnsafeBytes { pvs_send_all(echoFD, $0.baseAddress, n) }
            }
        }) else { return [] }
        var bare: [Double] = []
        var reply = [UInt8](repeating: 0, count: 4096)
        for i in 0..<samples + 200 {
            let t0 = MonotonicClock.nowNs()
            _ = line.withUnsafeBytes { pvs_send_all(fds[0], $0.baseAddress, $0.count) }
            var got = 0
            while got < line.count {
                let n = reply.withUnsafeMutableBytes { pvs_recv(fds[0], $0.baseAddress, $0.count) }
                if n <= 0 { break }
                got += n
            }
            if i >= 200 { bare.append(Double(MonotonicClock.nowNs() - t0)) }
        }
        pvs_shutdown(fds[0]); echo.join(); close(fds[0]); close(fds[1])
        return [
            BenchResult(name: "control round trip p50 (daemon.info)", baseline: "bare Unix-socket ping-pong p50",
                        nsPerOp: Sample.percentile(control, 0.5), baselineNsPerOp: Sample.percentile(bare, 0.5)),
            BenchResult(name: "control round trip p99 (daemon.info)", baseline: "bare Unix-socket ping-pong p99",
                        nsPerOp: Sample.percentile(control, 0.99), baselineNsPerOp: Sample.percentile(bare, 0.99)),
        ]
    }

    /// CPU time of the decision path (`notify` with latency-boost, the guest's area,
    /// the governor and a recording actuator) per event while 4 clients hammer the
    /// control socket with `vm.stats` (which reads the same vCPU's counters), against
    /// the same path with the socket idle; idle and loaded rounds interleave. The
    /// deciding thread runs on the first CPU (SCHED_FIFO when permitted, like a
    /// boosted vCPU thread), the daemon's and the clients' threads on the last one,
    /// so that what is measured is what the control plane does to the decision path
    /// (locks, shared cache lines), not the CPUs being shared.
    /// Two ratios: against the socket idle (everything the clients cost, the
    /// shared CPUs' caches and SMT siblings included), and against 4 clients
    /// calling `daemon.info`, which never touches the VM (what reading the VM's
    /// counters adds: locks and shared cache lines).
    public static func decisionUnderControlLoad(rounds: Int = 9) throws -> [BenchResult] {
        let cpus = Scenario.onlineCPUs
        let control = LinuxThreadControl()
        // Threads created from here on (the server's, the clients') inherit this mask.
        try? control.setAffinity(control.currentThread(), mask: 1 << UInt64(max(0, cpus - 1)))
        defer { try? control.setAffinity(control.currentThread(), mask: cpus >= 64 ? .max : (1 << UInt64(cpus)) - 1) }
        let setup = try Setup()
        let events: [VCPUEvent] = [.interruptInjection(vector: 48), .vmEntry, .vmExit(.halt), .halt]
        let n = 200_000
        let sink = setup.session.events
        func run() throws -> Double {
            let result = Atomic<UInt64>(0)
            let t = try PVSchedCore.Thread {
                try? control.setAffinity(control.currentThread(), mask: 1)
                try? control.setCurrentThread(.fifo(priority: 50))
                let t0 = threadCPUNs()
                for i in 0..<n { sink.notify(events[i & 3], vcpu: 0) }
                result.store(threadCPUNs() - t0, ordering: .relaxed)
            }
            t.join()
            return Double(result.load(ordering: .relaxed)) / Double(n)
        }
        /// One round with 4 clients calling `method` in a loop (nil: no clients).
        func round(_ method: String?) throws -> Double {
            guard let method else { return try run() }
            let stop = Atomic(false)
            let path = setup.path
            let params: [String: JSON] = method == VMStats.name ? ["vm": "bench"] : [:]
            let clients = try (0..<4).map { _ in
                try PVSchedCore.Thread {
                    guard let c = try? ControlClient(path: path) else { return }
                    while !stop.load(ordering: .relaxed) { _ = try? c.call(method, params) }
                }
            }
            usleep(20_000)
            let t = try run()
            stop.store(true, ordering: .relaxed)
            for c in clients { c.join() }
            return t
        }
        var idle: [Double] = [], unrelated: [Double] = [], loaded: [Double] = []
        for _ in 0..<rounds {
            idle.append(try round(nil))
            unrelated.append(try round(DaemonInfo.name))
            loaded.append(try round(VMStats.name))
        }
        return [
            BenchResult(name: "decision path, 4 clients reading its VM", baseline: "decision path, socket idle",
                        nsPerOp: Sample.median(loaded), baselineNsPerOp: Sample.median(idle)),
            BenchResult(name: "decision path, 4 clients reading its VM", baseline: "4 clients on daemon.info",
                        nsPerOp: Sample.median(loaded), baselineNsPerOp: Sample.median(unrelated)),
        ]
    }

    static func threadCPUNs() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}
