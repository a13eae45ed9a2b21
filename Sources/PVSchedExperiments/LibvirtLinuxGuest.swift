import Foundation
import PVSchedCore
import PVSchedTesting

#if canImport(Glibc)
import Glibc
#endif

/// The Linux test guest as a transient libvirt domain (`virsh create`), the way an
/// operator's domain runs: libvirt starts QEMU (TCG here: `type='qemu'`), puts its
/// threads in its cgroups, and makes the pvsched region from the domain's
/// `<shmem name='pvsched-NAME'>`. ACPI is on (without it the guest sees one CPU).
/// `virsh destroy` when this object goes.
public final class LibvirtLinuxGuest: @unchecked Sendable {
    // @unchecked Sendable: driven by one caller.
    public let name: String
    public let consolePath: String
    public let xml: String
    /// The region libvirt makes for the domain (nil: the domain has none).
    public let regionPath: String?

    /// Where the images are copied so that libvirt's QEMU user can read them.
    static let imageDirectory = "/var/lib/libvirt/images/pvsched-lab"

    /// `pin`: vCPU i on host CPU `cpus[i % cpus.count]` (`<vcpupin>`). `cputune`: more
    /// of `<cputune>` (libvirt's own real-time setting). `metadata`: the pvsched
    /// element's attributes. `paused`: started with its vCPUs stopped (`resume()`).
    public init(image: LinuxGuestImage, options: LinuxGuestOptions, name: String? = nil, pin: Bool = true, cpus: [Int] = [0, 1],
                cputune: String = "", metadata: [String: String]? = nil, paused: Bool = false) throws {
        self.name = name ?? "pvs-lab-\(getpid())-\(UInt16.random(in: 0...UInt16.max))"
        try FileManager.default.createDirectory(atPath: Self.imageDirectory, withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o755])
        let kernel = Self.imageDirectory + "/vmlinuz", initrd = Self.imageDirectory + "/initrd.gz"
        for (from, to) in [(image.kernel, kernel), (image.initrd, initrd)] where !Self.same(from, to) {
            unlink(to + ".new")
            try FileManager.default.copyItem(atPath: from, toPath: to + ".new")
            chmod(to + ".new", 0o644)
            rename(to + ".new", to)
        }
        consolePath = Self.imageDirectory + "/\(self.name).console"
        unlink(consolePath)
        regionPath = options.ivshmem ? "/dev/shm/pvsched-\(self.name)" : nil
        var tune = pin && !cpus.isEmpty ? (0..<options.vcpus).map { "<vcpupin vcpu='\($0)' cpuset='\(cpus[$0 % cpus.count])'/>" }.joined() : ""
        tune += cputune
        let meta = metadata.map { m in
            "<metadata><pvsched:pvsched xmlns:pvsched='https://pvsched.dev/xmlns/libvirt/1' "
                + m.sorted { $0.key < $1.key }.map { "\($0.key)='\($0.value)'" }.joined(separator: " ") + "/></metadata>"
        } ?? ""
        xml = """
        <domain type='qemu'>
          <name>\(self.name)</name>
          \(meta)
          <memory unit='MiB'>\(options.memoryMB)</memory>
          <vcpu placement='static'>\(options.vcpus)</vcpu>
          \(tune.isEmpty ? "" : "<cputune>\(tune)</cputune>")
          <os><type arch='x86_64' machine='pc'>hvm</type><kernel>\(kernel)</kernel><initrd>\(initrd)</initrd>
            <cmdline>\(options.kernelCommandLine)</cmdline></os>
          <features><acpi/><apic/></features>
          <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <serial type='file'><source path='\(consolePath)'/><target port='0'/></serial>
            \(options.ivshmem ? "<shmem name='pvsched-\(self.name)'><model type='ivshmem-plain'/><size unit='M'>1</size></shmem>" : "")
            <memballoon model='none'/>
          </devices>
        </domain>
        """
        let file = "/tmp/pvsched-lab-\(self.name).xml"
        try xml.write(toFile: file, atomically: true, encoding: .utf8)
        defer { unlink(file) }
        let r = try LibvirtService.virsh(["create", file] + (paused ? ["--paused"] : []))
        guard r.status == 0 else { throw LinuxGuestError("virsh create: \(r.stderr)") }
    }

    /// Lets the vCPUs of a domain created paused run.
    public func resume() throws {
        let r = try LibvirtService.virsh(["resume", name])
        guard r.status == 0 else { throw LinuxGuestError("virsh resume: \(r.stderr)") }
    }

    /// QEMU's threads: the vCPU threads (named `CPU N/…` by QEMU, in vCPU order) and the rest.
    public var threads: (vcpus: [Int32], others: [Int32]) {
        let pid = self.pid
        var vcpus: [(Int, Int32)] = [], others: [Int32] = []
        for t in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"))?.compactMap(Int32.init) ?? [] {
            let comm = (try? String(contentsOfFile: "/proc/\(pid)/task/\(t)/comm", encoding: .utf8)) ?? ""
            if comm.hasPrefix("CPU "), let n = Int(comm.dropFirst(4).prefix { $0.isNumber }) { vcpus.append((n, t)) } else { others.append(t) }
        }
        return (vcpus.sorted { $0.0 < $1.0 }.map(\.1), others)
    }

    static func same(_ a: String, _ b: String) -> Bool {
        guard let x = try? FileManager.default.attributesOfItem(atPath: a), let y = try? FileManager.default.attributesOfItem(atPath: b) else { return false }
        return x[.size] as? Int == y[.size] as? Int && x[.modificationDate] as? Date ?? .distantPast <= y[.modificationDate] as? Date ?? .distantPast
    }

    /// QEMU's pid (libvirt's pid file), 0 when the domain does not run.
    public var pid: Int32 {
        guard let s = try? String(contentsOfFile: "/run/libvirt/qemu/\(name).pid", encoding: .utf8) else { return 0 }
        return Int32(s.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }

    /// Whether libvirt lists the domain as running.
    public var isRunning: Bool {
        (try? LibvirtService.virsh(["domstate", name]))?.stdout.contains("running") == true
    }

    /// What the guest printed so far.
    public var console: String { GuestConsole(path: consolePath).text }

    /// Waits until the console shows `marker` (true) or `timeout` seconds pass.
    @discardableResult
    public func waitFor(_ marker: String, timeout: Double) -> Bool {
        GuestConsole(path: consolePath).waitFor(marker, timeout: timeout) { true }
    }

    /// The text between "PVS-BEGIN name" and "PVS-END name" on the console.
    public func section(_ name: String) -> String? { GuestConsole(path: consolePath).section(name) }

    /// `virsh destroy` (QEMU is killed; libvirt leaves the region file, which `deinit` removes).
    public func destroy() {
        _ = try? LibvirtService.virsh(["destroy", name])
    }

    deinit {
        destroy()
        unlink(consolePath)
        if let regionPath { unlink(regionPath) }  // libvirt leaves the region file behind
    }
}
