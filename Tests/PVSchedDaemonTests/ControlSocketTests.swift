import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedDaemon
import PVSchedHost
import Synchronization
import Testing

/// A control server on a temporary socket in this process, with a recording actuator.
final class LocalDaemon {
    let path: String
    let handler: ControlHandler
    let server: ControlServer

    init() throws {
        path = "/tmp/pvsched-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        handler = try makeHandler()
        server = try ControlServer(path: path, access: ControlAccess(), handler: handler)
        try server.start()
    }

    deinit { server.stop(); handler.shutdown() }

    /// What a request may change: drivers, default, VMs and their drivers and governors.
    func state() throws -> String {
        let c = try ControlClient(path: path)
        let drivers = try c.call("drivers.list")
        let vms = try c.call("vm.list")
        var governors: [JSON] = []
        for v in vms.arrayValue ?? [] { governors.append(try c.call("vm.governor.get", ["vm": v["name"] ?? .null])) }
        return String(decoding: JSON.array([drivers, .array((vms.arrayValue ?? []).map { v in
            ["name": v["name"] ?? .null, "driver": v["driver"] ?? .null] }), .array(governors)]).encoded, as: UTF8.self)
    }
}

/// A small deterministic generator (xorshift) so failures reproduce.
struct Rng {
    var s: UInt64
    mutating func next() -> UInt64 { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
}

@Suite(.serialized) struct ControlSocketTests {
    @Test func socketIsPrivateAndAnswersInOrder() throws {
        let d = try LocalDaemon()
        var st = stat()
        #expect(stat(d.path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        let c = try ControlClient(path: d.path)
        for i in 0..<50 {
            let r = try c.call(i % 2 == 0 ? "drivers.list" : "daemon.info")
            #expect(r != .null)
        }
    }

    @Test func noDaemonGivesAClearMessage() throws {
        #expect(throws: ControlError.self) { try ControlClient(path: "/tmp/pvsched-no-such-\(getpid()).sock") }
        do { _ = try ControlClient(path: "/tmp/pvsched-no-such-\(getpid()).sock") } catch {
            #expect(error.message.contains("no pvsched daemon is running"))
        }
    }

    /// 10,000 random and mutated requests: the daemon answers every one, and no
    /// request that got an error changed anything.
    @Test func hostileRequestsNeitherCrashNorChangeState() throws {
        let d = try LocalDaemon()
        let c = try ControlClient(path: d.path)
        let templates: [[UInt8]] = [
            request("drivers.set_default", ["name": "nop"]),
            request("vm.driver.replace", ["vm": "vm1", "driver": "nop"]),
            request("bpf.unload", ["name": "latency-boost", "force": true]),
            request("vm.governor.set", ["vm": "vm1", "maxVMShare": .double(0.2)]),
            request("vm.stop", ["vm": "vm1"]),
            request("thread.boost", ["tid": 1, "priority": 99]),
            request("vm.start", ["vcpus": 200, "workload": "cyclic"]),
            request("bpf.load", ["object": .string(Data([0x7F, 0x45, 0x4C, 0x46, 2, 1, 1]).base64EncodedString())]),
            request("vm.trace", ["vm": "vm1", "last": 5]),
        ]
        let syntax = Array("{}[]\",:0-e\\".utf8)
        var rng = Rng(s: 0x9E37_79B9_7F4A_7C15)
        var before = try d.state()
        var errors = 0, successes = 0
        for i in 0..<10_000 {
            var line: [UInt8]
            if i % 4 == 0 {
                line = (0..<rng.below(200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                line = templates[rng.below(templates.count)]
                for _ in 0...rng.below(4) {
                    guard !line.isEmpty else { break }
                    let at = rng.below(line.count)
                    switch rng.below(4) {
                    case 0: line[at] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: line.remove(at: at)
                    case 2: line.insert(syntax[rng.below(syntax.count)], at: at)
                    default: line = Array(line[..<at])
                    }
                }
            }
            line.removeAll { $0 == UInt8(ascii: "\n") }
            if line.allSatisfy({ $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\r") || $0 == UInt8(ascii: "\t") }) { continue }
            let r = try c.exchange(line)
            #expect(r["pvsched"] == 1)
            if r["ok"] == true {
                successes += 1
                before = try d.state()
            } else {
                errors += 1
                #expect(r["error"]?["code"]?.stringValue != nil)
                if i % 50 == 0 { #expect(try d.state() == before, "request \(String(decoding: line, as: UTF8.self)) changed state") }
            }
        }
        #expect(try d.state() == before)
        #expect(errors > 9_000)
        #expect(try c.call("daemon.info")["protocol"] == 1)
    }

    @Test func manyConcurrentClientsAndHalfSentRequests() throws {
        let d = try LocalDaemon()
        let failures = Atomic(0)
        var threads: [PVSchedCore.Thread] = []
        let path = d.path
        for k in 0..<16 {
            threads.append(try PVSchedCore.Thread {
                do {
                    let c = try ControlClient(path: path)
                    for _ in 0..<100 {
                        let r = try c.call(k % 2 == 0 ? "drivers.list" : "vm.list")
                        if r.arrayValue == nil { failures.add(1, ordering: .relaxed) }
                    }
                } catch { failures.add(1, ordering: .relaxed) }
            })
        }
        // Clients that disconnect in the middle of a request, or send an oversized line.
        for i in 0..<20 {
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_un()
            addr.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &addr.sun_path) { p in
                for (j, b) in d.path.utf8.enumerated() { p[j] = b }
            }
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            #expect(ok == 0)
            let partial = Array(#"{"pvsched":1,"method":"vm.st"#.utf8)
            if i % 5 == 4 {
                let big = [UInt8](repeating: 0x41, count: ControlProtocol.maxRequestBytes + 10)
                _ = big.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            } else {
                _ = partial.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
            }
            close(fd)
        }
        for t in threads { t.join() }
        #expect(failures.load(ordering: .relaxed) == 0)
        #expect(try ControlClient(path: d.path).call("daemon.info")["protocol"] == 1)
    }
}
