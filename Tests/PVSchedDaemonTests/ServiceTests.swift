import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedLinux
import PVSchedTesting
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The daemon as a service: restarts that lose nothing (the state file), the
/// configuration file and its reload on SIGHUP, the systemd protocols (readiness,
/// stopping, socket activation), and finding QEMU processes on its own.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.realTime.shouldRun, "needs root and SCHED_FIFO"))
struct ServiceTests {
    static func tag() -> String { "\(getpid())-\(UInt32.random(in: 0...UInt32.max))" }

    static func parameters(_ tid: Int32) -> SchedulingParameters? {
        (try? LinuxScheduling.parameters(of: ThreadID(tid))) ?? nil
    }

    static func governor(_ d: DaemonProcess, _ vm: String) throws -> JSON {
        try d.client().call("vm.governor.get", ["vm": .string(vm)])
    }

    /// A stand-in VMM attached to `d` by pid, its region watched.
    static func attachedStandIn(_ d: DaemonProcess, name: String, driver: String = "latency-boost") throws -> StandInProcess {
        let vmm = try StandInProcess(vcpus: 2, region: "/dev/shm/pvsched-svc-\(tag())")
        let a = try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--thread-names", "cloud-hypervisor", "--shm", vmm.region!,
                           "--name", name, "--events", "watch", "--driver", driver])
        #expect(a.status == 0, "\(a.stderr)")
        #expect(try eventually(10) { try d.vm(name)?.negotiation.hasPrefix("accepted") == true })
        return vmm
    }

    @Test func aRestartAttachesAgainEveryVMWithItsDriverBoostClassAndGovernor() throws {
        try Requirement.root.check(); try Requirement.realTime.check()
        let d = try DaemonProcess(config: "boost = fifo:7\nvm-share = 0.4\n")
        let keep = try Self.attachedStandIn(d, name: "keep")
        let gone = try Self.attachedStandIn(d, name: "gone")
        defer { keep.stop(); gone.stop() }
        // Changed after the attach: the restart must keep what is in force, not what was asked.
        _ = try d.client().call("vm.governor.set", ["vm": "keep", "maxVMShare": .double(0.3)])
        _ = try d.client().call("vm.driver.replace", ["vm": "keep", "driver": "deadline-boost"])
        try keep.command("line 0 10 fifo 80")
        let tid = keep.threads[0]
        #expect(eventually(5) { Self.parameters(tid) == .fifo(priority: 7) }, "\(String(describing: Self.parameters(tid)))")

        // The configuration's boost class changes; the VM keeps the one it was attached with.
        try "boost = fifo:9\n".write(toFile: d.configFile, atomically: true, encoding: .utf8)
        for signal in [SIGTERM, SIGKILL] {
            d.stop(signal: signal)  // SIGKILL: the guardian undoes the boost, the state file stays
            #expect(eventually(5) { !isRealTime(tid) })
            if signal == SIGTERM { gone.stop() }  // its VMM exits while no daemon runs
            try d.start()
            #expect(try eventually(10) { try d.vm("keep")?.negotiation.hasPrefix("accepted") == true },
                    "after \(signal): \(d.vmNames)")
            #expect(try d.vm("gone") == nil, "a VM whose process exited was attached again")
            #expect(try d.vm("keep")?.driver == "deadline-boost")
            #expect(try Self.governor(d, "keep")["maxVMShare"]?.doubleValue == 0.3)
            // Its line still says an RT task runs: boosted again, with the class it had.
            #expect(eventually(5) { Self.parameters(tid) == .fifo(priority: 7) }, "\(String(describing: Self.parameters(tid)))")
        }
        // Detached by the operator: forgotten at the next start.
        #expect(try d.cli(["vm", "stop", "keep"]).status == 0)
        #expect(!isRealTime(tid))
        try d.restart()
        #expect(try d.client().call(VMList.self).isEmpty)
    }

    @Test func aBuiltInVMMsVMIsServedAgainAfterARestart() throws {
        try Requirement.root.check(); try Requirement.kvm.check(); try Requirement.bpf.check()
        let d = try DaemonProcess()
        let vmm = try ExportedVM(binary: d.binary, durationMs: 12_000)
        let export = vmm.export
        #expect(eventually(20) { readExport(export) != nil })
        let a = try d.cli(["vm", "attach", "--export", export, "--name", "own", "--driver", "latency-boost"])
        #expect(a.status == 0, "\(a.stderr)")
        #expect(try eventually(10) { try d.boosts("own") > 0 })
        try d.restart()
        #expect(try eventually(10) { try d.vm("own")?.negotiation.hasPrefix("accepted") == true })
        #expect(try d.vm("own")?.driver == "latency-boost")
        #expect(try eventually(10) { try d.boosts("own") > 0 }, "no boost after the restart")
    }

    @Test func sighupReloadsTheConfigurationWithoutDroppingAVMAndABadFileChangesNothing() throws {
        try Requirement.root.check(); try Requirement.realTime.check()
        let object = "/tmp/pvsched-it-\(Self.tag()).bpf.o"
        try compileBPF("latency_boost", to: object)
        defer { unlink(object) }
        let d = try DaemonProcess(config: "driver = latency-boost\n")
        let vmm = try Self.attachedStandIn(d, name: "stay")
        defer { vmm.stop() }
        func defaultDriver() throws -> String? { try d.client().call(DriversList.self).first { $0.isDefault }?.name }
        #expect(try defaultDriver() == "latency-boost")

        try "driver = lab\nbpf-driver = lab:\(object)\nboost = fifo:6\n".write(toFile: d.configFile, atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        #expect(try eventually(5) { try defaultDriver() == "lab" })
        #expect(try d.client().call(DriversList.self).first { $0.name == "lab" }?.kind == "bpf")
        #expect(try d.vm("stay")?.negotiation.hasPrefix("accepted") == true)
        #expect(d.process.isRunning)
        // VMs attached from now on take the new boost class.
        let next = try Self.attachedStandIn(d, name: "next")
        defer { next.stop() }
        try next.command("line 1 10 fifo 80")
        #expect(eventually(5) { Self.parameters(next.threads[1]) == .fifo(priority: 6) })

        // A file with an error is not applied at all; the daemon goes on.
        try "driver = latency-boost\nboost = turbo\n".write(toFile: d.configFile, atomically: true, encoding: .utf8)
        kill(d.pid, SIGHUP)
        usleep(500_000)
        #expect(try defaultDriver() == "lab")
        #expect(d.process.isRunning)
        let log = d.stopAndReadLog()
        #expect(log.contains("configuration not reloaded") && log.contains("\(d.configFile):2: boost:"), "\(log)")
    }

    @Test func aBadConfigurationStopsTheStartNamingFileLineAndKey() throws {
        let binary = try #require(PVSchedBinary.path)
        let conf = "/tmp/pvsched-it-\(Self.tag()).conf"
        try "# pvsched\nlog-level = info\nvm-share = 2\n".write(toFile: conf, atomically: true, encoding: .utf8)
        defer { unlink(conf) }
        let r = try PVSchedBinary.run(binary, ["daemon", "--config", conf, "--socket", conf + ".sock", "--lock", conf + ".lock"], timeout: 20)
        #expect(r.status == 1)
        #expect(r.stderr.contains("\(conf):3: vm-share:"), "\(r.stderr)")
        let check = try PVSchedBinary.run(binary, ["config", "check", conf])
        #expect(check.status == 1 && check.stderr.contains("\(conf):3: vm-share:"), "\(check.stderr)")
        let missing = try PVSchedBinary.run(binary, ["config", "check", conf + ".none"])
        #expect(missing.status == 1 && missing.stderr.contains("no such file"), "\(missing.stderr)")
    }

    @Test func underSystemdItSaysReadyAndStoppingAndServesAnActivatedSocket() throws {
        try Requirement.root.check(); try Requirement.systemdTools.check()
        let binary = try #require(PVSchedBinary.path)
        let t = Self.tag()
        let notify = "/tmp/pvsched-it-\(t).notify", socket = "/tmp/pvsched-it-\(t).sock", lock = "/tmp/pvsched-it-\(t).lock"
        let conf = "/tmp/pvsched-it-\(t).conf", state = "/tmp/pvsched-it-\(t).state.json"
        try "".write(toFile: conf, atomically: true, encoding: .utf8)
        defer { for f in [notify, socket, lock, conf, state] { unlink(f) } }
        let listener = try NotifyListener(path: notify)
        // systemd-socket-activate makes the listening socket (as pvsched.socket would) and
        // passes it as fd 3 with LISTEN_FDS and LISTEN_PID.
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Requirement.executable("systemd-socket-activate")!)
        p.arguments = ["-l", socket, "-E", "NOTIFY_SOCKET=\(notify)", "-E", "JOURNAL_STREAM=8:12345", binary, "daemon",
                       "--config", conf, "--socket", socket, "--lock", lock, "--state-file", state, "--log-level", "info"]
        let log = Pipe()
        p.standardError = log
        try p.run()
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) }; p.waitUntilExit() }
        // The socket exists before the daemon runs (the manager's); the first client starts it.
        #expect(eventually(5) { access(socket, F_OK) == 0 })
        let info = try ControlClient(path: socket).call(DaemonInfo.self)
        #expect(info.pid == p.processIdentifier, "the activated daemon is the process systemd-socket-activate became")
        let ready = listener.receive(until: { $0.contains("READY=1") }, seconds: 10)
        #expect(ready.contains { $0.contains("READY=1") }, "\(ready)")
        kill(p.processIdentifier, SIGTERM)
        let stopping = listener.receive(until: { $0.contains("STOPPING=1") }, seconds: 10)
        #expect(stopping.contains { $0.contains("STOPPING=1") }, "\(stopping)")
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        // journald's format: each line its priority first, no timestamp of its own.
        let lines = String(decoding: log.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .split(separator: "\n").filter { $0.contains("pvsched.") }
        #expect(lines.count >= 2 && lines.allSatisfy { $0.wholeMatch(of: /<[2-7]>pvsched\.[a-z]+: .*/) != nil }, "\(lines)")
        #expect(lines.contains { $0.hasPrefix("<6>pvsched.daemon: pvsched daemon ready") }, "\(lines)")
        // The manager's socket is left for the manager: not unlinked by the daemon.
        #expect(access(socket, F_OK) == 0)
    }

    @Test func discoveryAttachesAQEMUProcessThatMapsAPvschedRegionAndBoostsIt() throws {
        try Requirement.root.check(); try Requirement.realTime.check()
        let d = try DaemonProcess(config: "discover = yes\n")
        let region = "/dev/shm/pvsched-disc-\(Self.tag())"
        let qemu = try StandInProcess(vcpus: 2, region: region, arguments: ["--qemu-thread-names", "-name", "guest=ns_vm1,debug-threads=on"],
                                      runAs: "qemu-system-x86_64")
        defer { qemu.stop() }
        // Another program with a region of the same kind is none of discovery's business.
        let other = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-disc-\(Self.tag())")
        defer { other.stop() }
        // Nor is a local user's process that calls itself QEMU.
        let stranger = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-disc-\(Self.tag())", asUser: 65534,
                                          runAs: "qemu-system-x86_64")
        defer { stranger.stop() }
        #expect(try eventually(10) { try d.vm("ns_vm1")?.negotiation.hasPrefix("accepted") == true },
                "\(d.vmNames)")
        #expect(try d.client().call(VMList.self).count == 1)
        #expect(try d.vcpus("ns_vm1").map(\.tid) == qemu.threads)
        try qemu.command("line 1 10 fifo 80")
        #expect(eventually(5) { isRealTime(qemu.threads[1]) })
        try qemu.command("line 1 40")
        #expect(eventually(5) { !isRealTime(qemu.threads[1]) })
        qemu.stop()
        #expect(try eventually(10) { try d.vm("ns_vm1")?.state.hasPrefix("ended") == true })
    }

    /// With the libvirt follower on (the default), a QEMU that libvirt runs (its pid file
    /// names it) is the follower's to serve with its domain's settings: discovery, which
    /// may find it first, leaves it alone. A QEMU whose domain's pid file names another
    /// process is discovery's.
    @Test func discoveryLeavesLibvirtsOwnQEMUToTheFollower() throws {
        try Requirement.root.check(); try Requirement.realTime.check()
        let run = "/run/libvirt/qemu"
        let made = access(run, F_OK) != 0
        if made { try FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true) }
        defer { if made { rmdir(run); rmdir("/run/libvirt") } }
        let tag = Self.tag()
        let owned = "pvs,,lv-\(tag)", stray = "pvs-stray-\(tag)"  // `,,`: a comma in QEMU's -name
        let d = try DaemonProcess(config: "discover = yes\nlibvirt = on\n")
        let libvirtQEMU = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-disc-\(tag)",
                                             arguments: ["--qemu-thread-names", "-name", "guest=\(owned),debug-threads=on"], runAs: "qemu-system-x86_64")
        defer { libvirtQEMU.stop() }
        let otherQEMU = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-disc2-\(tag)",
                                           arguments: ["--qemu-thread-names", "-name", "guest=\(stray),debug-threads=on"], runAs: "qemu-system-x86_64")
        defer { otherQEMU.stop() }
        let ownedFile = "\(run)/pvs,lv-\(tag).pid", strayFile = "\(run)/\(stray).pid"
        try "\(libvirtQEMU.pid)\n".write(toFile: ownedFile, atomically: false, encoding: .utf8)
        try "\(libvirtQEMU.pid)\n".write(toFile: strayFile, atomically: false, encoding: .utf8)
        defer { unlink(ownedFile); unlink(strayFile) }
        #expect(try eventually(10) { try d.vm(stray)?.negotiation.hasPrefix("accepted") == true }, "\(d.vmNames)")
        usleep(2_500_000)  // a scan after the one that found both
        #expect(try d.vm("pvs_lv-\(tag)") == nil, "discovery attached libvirt's QEMU: \(d.vmNames)")
        #expect(!d.stopAndReadLog().contains("not attached"))
    }
}

/// Compiles BPF/NAME.bpf.c (the toolchain's clang) into `object`.
func compileBPF(_ name: String, to object: String) throws {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    guard let clang = ["/opt/swift/usr/bin/clang"].first(where: { access($0, X_OK) == 0 }) ?? Requirement.executable("clang") else {
        throw DaemonTestError("no clang to build BPF/\(name).bpf.c")
    }
    let r = try PVSchedBinary.run(clang, ["-target", "bpf", "-O2", "-ffreestanding", "-I", root.path + "/Sources/PVSchedABI/include",
                                          "-c", root.path + "/BPF/\(name).bpf.c", "-o", object])
    guard r.status == 0 else { throw DaemonTestError("clang: \(r.stderr)") }
}

/// A `NOTIFY_SOCKET` as systemd makes it: a datagram socket the service's sd_notify messages arrive at.
final class NotifyListener {
    let fd: Int32
    let path: String
    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { buf in
            for (i, b) in path.utf8.prefix(buf.count - 1).enumerated() { buf[i] = b }
        }
        unlink(path)
        let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        guard fd >= 0, ok == 0 else { throw DaemonTestError("cannot bind \(path)") }
    }
    deinit { close(fd); unlink(path) }

    /// The messages received until one satisfies `done` or `seconds` pass.
    func receive(until done: (String) -> Bool, seconds: Double) -> [String] {
        var out: [String] = []
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 100) > 0 else { continue }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { continue }
            let m = String(decoding: buf[..<n], as: UTF8.self)
            out.append(m)
            if done(m) { break }
        }
        return out
    }
}
