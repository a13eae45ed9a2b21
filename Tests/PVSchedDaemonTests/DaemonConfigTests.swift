import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedDaemon
import Testing

/// The configuration file's parser: every error names the file, line and key;
/// conf.d files come after the main one in name order; every key is documented.
struct DaemonConfigTests {
    func parse(_ text: String) throws(ConfigError) -> DaemonConfig {
        var c = DaemonConfig()
        try c.apply(text: Data(text.utf8), file: "t.conf")
        return c
    }

    func error(_ text: String) -> ConfigError? {
        do { _ = try parse(text); return nil } catch { return error }
    }

    @Test func everyKeyIsReadIntoItsSetting() throws {
        let c = try parse("""
            # comment
            socket = /run/x.sock
            read-group = pvsched   # trailing comment
            metrics = 127.0.0.1:9464
            log-level = debug
            guardian = no
            driver = deadline-boost
            boost = slice:100
            protect-host-priority = 0
            critical-budget-us = 3000
            vm-share = 0.25
            unlimited = no
            bpf-driver = lab:/usr/lib/pvsched/bpf/latency_boost.bpf.o
            discover = yes
            cgroup-weights = no
            hold-through-halts-us = 2000
            state-file = /var/lib/pvsched/state.json
            """)
        #expect(c.socket == "/run/x.sock" && c.readGroup == "pvsched" && c.metrics == "127.0.0.1:9464")
        #expect(c.logLevel == "debug" && !c.guardian && c.driver == "deadline-boost" && c.discover && !c.cgroupWeights)
        #expect(c.boost == BoostSettings.parseClass("slice:100") && c.protectHostPriority == nil)
        #expect(c.governor.criticalBudgetUs == 3000 && c.governor.maxVMShare == 0.25)
        #expect(c.bpfDrivers.map(\.name) == ["lab"] && c.bpfDrivers.map(\.path) == ["/usr/lib/pvsched/bpf/latency_boost.bpf.o"])
        #expect(c.stateFile == "/var/lib/pvsched/state.json" && c.holdThroughHaltsUs == 2000)
        #expect(AttachPolicy(c).holdThroughHaltsNs == 2_000_000)
        // What `config check` prints is a file that means the same.
        #expect(try parse(c.rendered) == c)
    }

    @Test func anErrorNamesTheLineAndTheKeyAndWhatItExpects() {
        let cases: [(String, Int, String?, String)] = [
            ("log-level = info\nvm-share = 2\n", 2, "vm-share", "0-1"),
            ("boost = turbo", 1, "boost", "fifo:1-99"),
            ("\n\nspeed = 11", 3, "speed", "unknown key"),
            ("driver", 1, nil, "key = value"),
            ("driver = ../../x", 1, "driver", "driver name"),
            ("metrics = localhost", 1, "metrics", "HOST:PORT"),
            ("guardian = maybe", 1, "guardian", "yes or no"),
            ("cgroup-weights = always", 1, "cgroup-weights", "yes or no"),
            ("hold-through-halts-us = 20000", 1, "hold-through-halts-us", "0-10000"),
            ("hold-through-halts-us = -1", 1, "hold-through-halts-us", "0-10000"),
            ("protect-host-priority = 100", 1, "protect-host-priority", "0-99"),
            ("bpf-driver = lab:relative.o", 1, "bpf-driver", "absolute"),
            ("socket = relative.sock", 1, "socket", "absolute"),
            ("critical-budget-us = 0", 1, "critical-budget-us", "1-"),
            ("driver = \u{1B}[31mred", 1, "driver", "unprintable"),
        ]
        for (text, line, key, expects) in cases {
            let e = error(text)
            #expect(e?.file == "t.conf" && e?.line == line && e?.key == key, "\(text): \(String(describing: e))")
            #expect(e?.description.contains(expects) == true, "\(text): \(String(describing: e))")
            #expect(e?.description.contains("\u{1B}") == false)
        }
    }

    @Test func confDFilesComeAfterTheMainFileInNameOrder() throws {
        let dir = "/tmp/pvsched-it-conf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir + "/conf.d", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "driver = nop\nbpf-driver = a:/a.o\n".write(toFile: dir + "/pvsched.conf", atomically: true, encoding: .utf8)
        try "driver = static-rt\nbpf-driver = b:/b.o\n".write(toFile: dir + "/conf.d/20-b.conf", atomically: true, encoding: .utf8)
        try "driver = deadline-boost\nbpf-driver = a:/a2.o\n".write(toFile: dir + "/conf.d/10-a.conf", atomically: true, encoding: .utf8)
        try "driver = ignored\n".write(toFile: dir + "/conf.d/README", atomically: true, encoding: .utf8)
        let c = try DaemonConfig.load(path: dir + "/pvsched.conf", mustExist: true)
        #expect(c.driver == "static-rt")
        #expect(c.bpfDrivers.map(\.name) == ["a", "b"] && c.bpfDrivers[0].path == "/a2.o")
        try "vm-share = x\n".write(toFile: dir + "/conf.d/30-bad.conf", atomically: true, encoding: .utf8)
        #expect(throws: ConfigError.self) { try DaemonConfig.load(path: dir + "/pvsched.conf") }
        do { _ = try DaemonConfig.load(path: dir + "/pvsched.conf") } catch {
            #expect(error.file == dir + "/conf.d/30-bad.conf" && error.line == 1 && error.key == "vm-share")
        }
        // A missing main file is the defaults (and conf.d's), unless it was named.
        unlink(dir + "/conf.d/30-bad.conf")
        #expect(try DaemonConfig.load(path: dir + "/none.conf").driver == "static-rt")
        #expect(throws: ConfigError.self) { try DaemonConfig.load(path: dir + "/none.conf", mustExist: true) }
    }

    @Test func everyKeyIsDocumentedAndInThePackagedFile() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        let doc = try String(contentsOfFile: root + "/docs/configuration.md", encoding: .utf8)
        let packaged = try String(contentsOfFile: root + "/packaging/pvsched.conf", encoding: .utf8)
        for key in DaemonConfig.keys.keys {
            #expect(doc.contains("| `\(key)` |"), "docs/configuration.md lacks \(key)")
            #expect(packaged.contains("\(key) ="), "packaging/pvsched.conf lacks \(key)")
        }
        // The packaged file is valid as shipped.
        var c = DaemonConfig()
        try c.apply(text: Data(packaged.utf8), file: "pvsched.conf")
        #expect(c.readGroup == "pvsched")
    }
}
