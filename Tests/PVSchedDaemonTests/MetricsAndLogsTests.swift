import Foundation
import Logging
import PVSchedControl
import PVSchedCore
@testable import PVSchedDaemon
import PVSchedTesting
import Testing

/// What an operator reads: log lines journald understands, metrics that stay
/// bounded and go with their VM, an endpoint a stranger cannot exhaust.
struct DaemonLogTests {
    @Test func underSystemdEachLineCarriesItsPriorityAndNoTimestamp() {
        let h = DaemonLogHandler(label: "pvsched.vm", level: .info, journal: true)
        let line = h.format(level: .warning, message: "boosts cannot be applied",
                            metadata: ["vm": "web 1", "reason": "a \"quoted\" cause", "vcpu": "0"])
        #expect(line == "<4>pvsched.vm: boosts cannot be applied reason=\"a \\\"quoted\\\" cause\" vcpu=0 vm=\"web 1\"\n")
        #expect(h.format(level: .error, message: "x", metadata: [:]) == "<3>pvsched.vm: x\n")
        #expect(h.format(level: .debug, message: "x", metadata: [:]) == "<7>pvsched.vm: x\n")
    }

    @Test func elsewhereATimestampLeadsAndGuestTextIsEscaped() {
        let h = DaemonLogHandler(label: "pvsched.vm", level: .info, journal: false)
        let line = h.format(level: .info, message: "accepted \u{1B}[31m", metadata: ["protocol": "\u{1B}]0;x\u{07}"], now: "T")
        #expect(line == "T info pvsched.vm: accepted \\x1b[31m protocol=\"\\\\x1b]0;x\\\\x07\"\n")
        #expect(!line.utf8.contains(0x1B))
    }
}

@Suite(.serialized, .enabled(if: Requirement.root.shouldRun, "needs root"))
struct MetricsEndpointTests {
    static func scrape(_ address: String) throws -> CommandResult {
        try PVSchedBinary.run("/usr/bin/curl", ["-sf", "--max-time", "5", "http://\(address)/metrics"])
    }

    @Test func aVMsSeriesGoWithItAndTheGuardianAndBuildAreReported() throws {
        try Requirement.root.check()
        let d = try DaemonProcess(metrics: true)
        let address = try #require(try d.client().call("daemon.info")["metrics"]?.stringValue)
        let vmm = try StandInProcess(vcpus: 2)
        defer { vmm.stop() }
        #expect(try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--thread-names", "cloud-hypervisor", "--name", "gone-soon"]).status == 0)
        var m = try Self.scrape(address)
        #expect(m.status == 0)
        #expect(m.stdout.contains(#"vm="gone-soon""#))
        #expect(m.stdout.contains("pvsched_guardian_up 1"), "\(m.stdout.prefix(2000))")
        #expect(m.stdout.contains("pvsched_build_info{"))
        #expect(m.stdout.contains(#"pvsched_vm_negotiation{vm="gone-soon",state="none"} 1"#))
        #expect(m.stdout.contains(#"pvsched_decision_latency_seconds_sum{vm="gone-soon",vcpu="0"}"#))
        #expect(try d.cli(["vm", "stop", "gone-soon"]).status == 0)
        m = try Self.scrape(address)
        #expect(!m.stdout.contains("gone-soon"), "a stopped VM's series stayed")
    }

    @Test func idleConnectionsAreCappedAndClosedAndTheDaemonAnswersThroughout() throws {
        try Requirement.root.check()
        let d = try DaemonProcess(metrics: true)
        let address = try #require(try d.client().call("daemon.info")["metrics"]?.stringValue)
        let port = UInt16(address.split(separator: ":").last!)!
        var fds: [Int32] = []
        defer { fds.forEach { close($0) } }
        for _ in 0..<(MetricsServer.maxConnections + 8) {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            a.sin_addr.s_addr = inet_addr("127.0.0.1")
            let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            #expect(r == 0)
            fds.append(fd)
        }
        // The control socket answers while the endpoint is full.
        #expect(try d.client().call("daemon.info")["protocol"] == 1)
        // Connections over the cap were closed at once: reading them ends.
        usleep(300_000)
        var closed = 0
        for fd in fds.suffix(8) {
            var b: UInt8 = 0
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 1000) > 0, read(fd, &b, 1) == 0 { closed += 1 }
        }
        #expect(closed == 8)
        // Silent ones go after the idle timeout; then the endpoint serves again.
        usleep(UInt32(MetricsServer.idleTimeout.nanoseconds / 1000) + 1_500_000)
        #expect(try Self.scrape(address).status == 0)
        #expect(d.process.isRunning)
    }
}
