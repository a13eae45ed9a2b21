import Foundation
import PVSchedControl
import PVSchedDaemon
import PVSchedExperiments
import PVSchedCore
import PVSchedLibvirt
import PVSchedLinux
import PVSchedTesting
import Testing

/// libvirt's domains served with no command, against a real libvirtd (started here
/// where no service manager runs it) and the Linux test guest under libvirt's QEMU.
@Suite(.serialized, .enabled(if: Requirement.root.shouldRun && Requirement.qemu.shouldRun && Requirement.libvirt.shouldRun,
                             "needs root, QEMU, the Linux guest's packages and libvirt"))
final class LibvirtTests {
    let service: LibvirtService

    init() throws {
        try Requirement.root.check(); try Requirement.qemu.check(); try Requirement.libvirt.check()
        service = try LibvirtService()
    }

    deinit { service.stop() }

    static func guest(name: String? = nil, metadata: [String: String]? = nil, _ configure: (inout LinuxGuestOptions) -> Void) throws -> LibvirtLinuxGuest {
        var o = LinuxGuestOptions()
        configure(&o)
        return try LibvirtLinuxGuest(image: try LinuxGuestImage.build(), options: o, name: name, metadata: metadata)
    }

    /// Waits until `name` is served with its area accepted; on failure, records the daemon's log.
    static func expectServed(_ d: DaemonProcess, _ name: String, seconds: Double = 60, _ context: String = "",
                             sourceLocation: SourceLocation = #_sourceLocation) {
        let ok = eventually(seconds) { ((try? d.vm(name)) ?? nil)?.negotiation.hasPrefix("accepted") == true }
        if !ok {
            Issue.record("\(name) not served \(context): \(d.vmNames)\n\(d.stopAndReadLog().suffix(3000))", sourceLocation: sourceLocation)
        }
    }

    @Test func aDomainStartedWithVirshIsServedFromStartToDestroyWithItsOwnSettings() throws {
        // Discovery on as well: it finds the same QEMU process, and the VM is served once.
        let d = try DaemonProcess(config: "libvirt = on\ndiscover = yes\n")
        let plain = try Self.guest { $0.run = "idle"; $0.durationS = 60; $0.ivshmem = false }
        let g = try Self.guest(metadata: ["driver": "deadline-boost", "boost": "nice:-20", "governor": "vm-share=0.3"]) {
            $0.run = "rt-burst"; $0.durationS = 60
        }
        Self.expectServed(d, g.name, "console: \(g.console.suffix(600))")
        let vm = try #require(try d.vm(g.name))
        #expect(vm.driver == "deadline-boost")
        #expect(vm.vcpus.count == 2 && vm.vcpus.allSatisfy { ($0.thread ?? 0) > 0 })
        #expect(try d.client().call("vm.governor.get", ["vm": .string(g.name)])["maxVMShare"]?.doubleValue == 0.3)
        // Every verb takes the domain's UUID too.
        let uuid = try LibvirtService.virsh(["domuuid", g.name]).stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(try d.client().call("vm.driver.get", ["vm": .string(uuid)])["driver"]?.stringValue == "deadline-boost")
        #expect(try eventually(60) { try d.boosts(g.name) > 0 }, "no boost of a libvirt domain's vCPU")
        // The domain without the region is left alone; the other is served once.
        #expect(try d.vm(plain.name) == nil)
        usleep(2_500_000)  // a discovery scan
        #expect(try d.client().call(VMList.self).map(\.name) == [g.name])
        // Detached by the operator: left alone while the domain runs.
        #expect(try d.cli(["vm", "stop", uuid]).status == 0)
        usleep(6_000_000)  // a reconcile
        #expect(try d.vm(g.name) == nil, "attached again after the operator detached it")
        // Destroyed: detached, gone from the list, nothing boosted, and the cgroups above the
        // domain's (which outlive it) at their own weights again.
        let threads = vm.vcpus.compactMap(\.thread)
        let hierarchy = CgroupWeights.Hierarchy.detect()
        let machine: String? = hierarchy.flatMap { h in
            threads.first.flatMap { Self.cgroupDirectory(h, process: g.pid, thread: $0) }.map { leaf in
                let domain = String(leaf[..<leaf.lastIndex(of: "/")!])
                return String(domain[..<domain.lastIndex(of: "/")!]) + "/" + (h.version == .v1 ? "cpu.shares" : "cpu.weight")
            }
        }
        g.destroy()
        #expect(try eventually(15) { try d.vm(g.name) == nil }, "\(d.vmNames)")
        #expect(!threads.contains(where: isRealTime))
        if let machine, let h = hierarchy {
            #expect(eventually(5) { CgroupWeights.read(machine) == (h.version == .v1 ? 1024 : 100) }, "\(machine): \(CgroupWeights.read(machine) ?? 0)")
        }
        let log = d.stopAndReadLog()
        #expect(!log.contains("QEMU process found, not attached"), "discovery tried the domain libvirt's follower serves: \(log)")
    }

    @Test func aDaemonRestartAndALibvirtdRestartServeTheRunningDomainAgain() throws {
        let d = try DaemonProcess(config: "libvirt = on\n")
        let g = try Self.guest { $0.run = "rt-burst"; $0.durationS = 120 }
        Self.expectServed(d, g.name)
        try d.restart()
        Self.expectServed(d, g.name, seconds: 30, "after the daemon's restart")
        // The default class is real-time, which libvirt's vCPU cgroups (no real-time
        // runtime on this cgroup v1 host) refuse: boosts fall back to a fair class, said
        // once with the reason, and are applied.
        if CgroupRealTimeProbe.libvirtCgroupsLackRuntime {
            #expect(try eventually(60) { try d.vm(g.name)?.vcpus.contains { $0.boostClassFallback?.contains("cpu.rt_runtime_us 0") == true } == true },
                    "\(String(describing: try? d.vm(g.name)))")
            #expect(try eventually(60) { try d.boosts(g.name) > 0 }, "no boost applied in the fallback class")
            #expect(try d.vm(g.name)?.vcpus.allSatisfy { $0.boostBlocked == nil } == true)
        }
        try service.restartLibvirtd()
        // libvirtd's restart does not touch QEMU: the VM stays served, and a domain started
        // after it is found through the new connection.
        #expect(try d.vm(g.name)?.state == "running")
        let late = try Self.guest { $0.run = "idle"; $0.durationS = 60 }
        Self.expectServed(d, late.name, "after libvirtd's restart")
        late.destroy()
        #expect(try eventually(15) { try d.vm(late.name) == nil })
        let log = d.stopAndReadLog()
        let blockedLines = log.split(separator: "\n").filter { $0.contains("refused by the thread's cgroup") }.count
        #expect(blockedLines <= 4, "one line per vCPU thread, got \(blockedLines)")
    }

    /// The cpu cgroup directory (under the hierarchy's mount) of `thread` of `process`.
    static func cgroupDirectory(_ h: CgroupWeights.Hierarchy, process: Int32, thread: Int32) -> String? {
        h.cgroupPath(thread: thread, process: process).map { h.mount + $0 }
    }

    /// A vCPU thread alone in its cgroup (libvirt's layout), boosted for as long as the
    /// guest's real-time task spins: its cgroup and those above it weigh as a nice -20
    /// thread while it is boosted; SIGKILL of the daemon puts every value back (the guardian).
    @Test(.enabled(if: Requirement.cgroups.shouldRun, "\(Requirement.cgroups.reason)"))
    func aBoostRaisesTheDomainsCgroupWeightsAndTheGuardianPutsThemBackWhenTheDaemonIsKilled() throws {
        let h = try #require(CgroupWeights.Hierarchy.detect())
        let file = h.version == .v1 ? "cpu.shares" : "cpu.weight"
        let g = try Self.guest(metadata: ["driver": "latency-boost", "boost": "slice:100", "governor": "unlimited=yes"]) {
            $0.run = "rt-spin"; $0.durationS = 120
        }
        // The vCPU threads' cgroups and those above them, with their values before any boost.
        let pid = g.pid
        #expect(pid > 0)
        let vcpuThreads = g.threads.vcpus
        #expect(vcpuThreads.count == 2)
        var before: [String: UInt64] = [:]
        for t in vcpuThreads {
            guard var dir = Self.cgroupDirectory(h, process: pid, thread: t) else { continue }
            while dir.count > h.mount.count {
                before[dir] = CgroupWeights.read(dir + "/" + file)
                dir = String(dir[..<dir.lastIndex(of: "/")!])
            }
        }
        #expect(before.count >= 3, "\(before)")  // vcpuN, the domain's, machine's
        let d = try DaemonProcess(config: "libvirt = on\n")
        Self.expectServed(d, g.name, "console: \(g.console.suffix(600))")
        let raised = CgroupWeights.weight(nice: -20, version: h.version)
        // The spinning vCPU is boosted: its cgroup and every one above it weigh as a nice -20 thread.
        var chain: [String] = []
        let seen = eventually(60) {
            for t in vcpuThreads {
                guard var dir = Self.cgroupDirectory(h, process: pid, thread: t), CgroupWeights.read(dir + "/" + file) == raised else { continue }
                chain = []
                while dir.count > h.mount.count { chain.append(dir); dir = String(dir[..<dir.lastIndex(of: "/")!]) }
                if chain.allSatisfy({ CgroupWeights.read($0 + "/" + file) == raised }) { return true }
            }
            return false
        }
        #expect(seen, "no vCPU cgroup chain raised: \(before.keys.map { ($0, CgroupWeights.read($0 + "/" + file) ?? 0) })")
        // The daemon killed outright: the guardian puts back every value and thread.
        _ = d.stop(signal: SIGKILL)
        #expect(eventually(10) { before.allSatisfy { CgroupWeights.read($0.key + "/" + file) == $0.value } },
                "\(before.map { ($0.key, $0.value, CgroupWeights.read($0.key + "/" + file) ?? 0) })")
        #expect(eventually(10) { vcpuThreads.allSatisfy { ((try? LinuxScheduling.parameters(of: ThreadID($0))) ?? nil) == .other(nice: 0) } })
        #expect(g.isRunning)
    }

    @Test func aGuestWritingGarbageGetsPvschedDisabledAndTheDomainRunsOn() throws {
        let d = try DaemonProcess(config: "libvirt = on\n")
        let g = try Self.guest { $0.run = "garbage"; $0.durationS = 30 }
        #expect(try eventually(60) { try d.vm(g.name)?.disabled != nil }, "\(String(describing: try? d.vm(g.name)))")
        let disabled = try d.vm(g.name)?.disabled ?? ""
        #expect(disabled.contains("vcpu") || disabled.contains("field") || disabled.contains("."), "\(disabled)")
        #expect(g.isRunning)
    }
}

/// What the daemon reads from a domain's XML.
struct DomainXMLTests {
    @Test func theRegionAndTheMetadataAreFoundWhateverThePrefix() {
        let xml = """
        <domain type='kvm'><name>a</name>
          <metadata><x:pvsched xmlns:x="https://pvsched.dev/xmlns/libvirt/1" driver="deadline-boost" boost='slice:100' governor="vm-share=0.3"/>
          <other:pvsched xmlns:other="https://example.org/" driver="nop"/></metadata>
          <!-- <shmem name='pvsched-commented'/> -->
          <devices><shmem name='other'/><shmem name="pvsched-a1"><model type='ivshmem-plain'/></shmem>
          <shmem name='pvsched-../../etc'/></devices></domain>
        """
        let d = DomainXML(xml)
        #expect(d.pvschedRegions == ["pvsched-a1"])
        #expect(d.pvschedSettings == ["driver": "deadline-boost", "boost": "slice:100", "governor": "vm-share=0.3"])
        #expect(DomainXML("<domain><name>x</name></domain>").pvschedSettings == nil)
        #expect(DomainXML.decodeEntities("a&amp;b&lt;&#x41;&#66;&bogus;") == "a&b<AB&bogus;")
        // Malformed text finds less, never fails.
        for bad in ["<", "<shmem name='pvsched-x", "<<<>>>", "<a b=c>", String(repeating: "<a ", count: 10_000)] {
            _ = DomainXML(bad).pvschedRegions
        }
    }

    static func refusal(_ settings: [String: String]) -> ControlError? {
        var q = VMAttach.Params()
        do throws(ControlError) { try LibvirtSettings.apply(settings, to: &q); return nil } catch { return error }
    }

    @Test func metadataSettingsBecomeAttachParametersOrAnErrorNamingTheAttribute() throws {
        var p = VMAttach.Params()
        try LibvirtSettings.apply(["driver": "nop", "boost": "nice:-5", "governor": "vm-share=0.3,critical-budget-us=3000"], to: &p)
        #expect(p.driver == "nop" && p.boost == "nice:-5" && p.governor.maxVMShare == 0.3 && p.governor.criticalBudgetUs == 3000)
        for (settings, field) in [(["speed": "x"], "metadata.speed"), (["go\u{0658}\u{7}rnor": "x"], "metadata"), (["governor": "socket=/x"], "metadata.governor"),
                                  (["governor": "vm-share=7"], "metadata.governor")] {
            #expect(Self.refusal(settings)?.field == field, "\(settings): \(String(describing: Self.refusal(settings)))")
        }
    }
}

/// Whether libvirt's vCPU cgroups get no real-time runtime on this host (cgroup v1's
/// cpu controller with real-time group scheduling, as measured here).
enum CgroupRealTimeProbe {
    static var libvirtCgroupsLackRuntime: Bool {
        FileManager.default.fileExists(atPath: "/sys/fs/cgroup/cpu/cpu.rt_runtime_us")
    }
}
