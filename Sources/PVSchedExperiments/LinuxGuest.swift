import Foundation
import PVSchedCore

#if canImport(Glibc)
import Glibc
#endif

/// The Linux test guest (Debian's cloud kernel and an initramfs with busybox,
/// cyclictest and the pvsched_guest module), built by scripts/build-linux-guest.sh.
public struct LinuxGuestImage: Sendable {
    public let kernel: String
    public let initrd: String

    /// Builds the image (quickly, when nothing changed) into `.build/linux-guest`
    /// of the source tree, found from the current directory or the executable.
    public static func build() throws -> LinuxGuestImage {
        guard let root = sourceRoot() else {
            throw LinuxGuestError("cannot find scripts/build-linux-guest.sh: run from the pvsched source tree")
        }
        let out = root + "/.build/linux-guest"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/bash")
        p.arguments = [root + "/scripts/build-linux-guest.sh", out]
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let message = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw LinuxGuestError("building the Linux guest failed: \(String(decoding: message, as: UTF8.self))")
        }
        return LinuxGuestImage(kernel: out + "/vmlinuz", initrd: out + "/initrd.gz")
    }

    static func sourceRoot() -> String? {
        var candidates = [FileManager.default.currentDirectoryPath]
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            var url = URL(fileURLWithPath: exe).deletingLastPathComponent()
            for _ in 0..<5 { candidates.append(url.path); url = url.deletingLastPathComponent() }
        }
        return candidates.first { FileManager.default.fileExists(atPath: $0 + "/scripts/build-linux-guest.sh") }
    }
}

/// Why the Linux guest could not be built or run.
public struct LinuxGuestError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// What the Linux test guest runs (kernel command line of Guest/linux-initramfs/init).
public struct LinuxGuestOptions: Sendable {
    public var vcpus = 2
    public var memoryMB = 256
    /// cyclictest | rt-burst | garbage | idle
    public var run = "idle"
    public var intervalUs = 1000
    public var durationS = 10
    public var priority = 80
    /// pvsched_guest module parameters.
    public var moduleArgs: [String] = []
    public var loadModule = true
    /// Unload the module at the end (before power-off).
    public var unloadModule = false
    /// Attach an ivshmem region for pvsched.
    public var ivshmem = true
    /// Seconds the guest waits for the host's answer before its workload (0: none).
    public var waitForHostS = 20
    /// unload-cycle: how many times the module is unloaded and loaded again.
    public var unloadCycles = 50
    public init() {}

    /// The kernel command line that tells the guest's init all of this.
    public var kernelCommandLine: String {
        var append = ["console=ttyS0", "quiet", "panic=-1", "pvs_run=\(run)", "pvs_interval=\(intervalUs)",
                      "pvs_duration=\(durationS)", "pvs_prio=\(priority)"]
        if !moduleArgs.isEmpty { append.append("pvs_mod=" + moduleArgs.joined(separator: ",")) }
        if !loadModule { append.append("pvs_nomod=1") }
        if unloadModule { append.append("pvs_rmmod=1") }
        append.append("pvs_wait=\(waitForHostS)")
        append.append("pvs_cycles=\(unloadCycles)")
        return append.joined(separator: " ")
    }
}

/// Unmodified QEMU (TCG, one thread per vCPU) running the Linux test guest with
/// an ivshmem region and a QMP socket, its console captured to a file. Used by
/// the QEMU tests and `pvsched demo --vmm qemu`.
public final class QEMULinuxGuest: @unchecked Sendable {
    // @unchecked Sendable: the Process is only started and killed; paths are constants.
    public let shmPath: String
    public let qmpPath: String
    public let consolePath: String
    public let process = Process()
    public static let qemuPath = "/usr/bin/qemu-system-x86_64"

    public init(image: LinuxGuestImage, options: LinuxGuestOptions, tag: String? = nil) throws {
        let tag = tag ?? "\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        shmPath = "/dev/shm/pvsched-qemu-\(tag)"
        qmpPath = "/tmp/pvsched-qemu-\(tag).qmp"
        consolePath = "/tmp/pvsched-qemu-\(tag).console"
        unlink(qmpPath)
        let fd = open(shmPath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0, ftruncate(fd, 1 << 20) == 0 else { throw LinuxGuestError("cannot create \(shmPath)") }
        close(fd)
        let append = options.kernelCommandLine
        var args = ["-accel", "tcg,thread=multi", "-smp", "\(options.vcpus)", "-m", "\(options.memoryMB)",
                    "-nographic", "-no-reboot", "-nodefaults", "-serial", "file:\(consolePath)",
                    "-kernel", image.kernel, "-initrd", image.initrd, "-append", append,
                    "-qmp", "unix:\(qmpPath),server=on,wait=off"]
        if options.ivshmem {
            args += ["-object", "memory-backend-file,id=pvsched,size=1M,mem-path=\(shmPath),share=on",
                     "-device", "ivshmem-plain,memdev=pvsched"]
        }
        process.executableURL = URL(fileURLWithPath: Self.qemuPath)
        process.arguments = args
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let deadline = MonotonicClock.nowNs() + 10_000_000_000
        while access(qmpPath, F_OK) != 0 {
            guard process.isRunning, MonotonicClock.nowNs() < deadline else {
                throw LinuxGuestError("QEMU did not open its QMP socket (exit status \(process.isRunning ? -1 : process.terminationStatus))")
            }
            usleep(10_000)
        }
    }

    public var pid: Int32 { process.processIdentifier }

    /// What the guest printed so far (serial line endings made plain newlines).
    public var console: String { GuestConsole(path: consolePath).text }

    /// Waits until the console shows `marker` (true) or `timeout` seconds pass.
    @discardableResult
    public func waitFor(_ marker: String, timeout: Double) -> Bool {
        GuestConsole(path: consolePath).waitFor(marker, timeout: timeout) { [process] in process.isRunning }
    }

    /// Waits for QEMU to exit by itself (true) within `timeout` seconds.
    @discardableResult
    public func waitForExit(timeout: Double) -> Bool {
        let deadline = MonotonicClock.nowNs() + UInt64(timeout * 1e9)
        while process.isRunning && MonotonicClock.nowNs() < deadline { usleep(50_000) }
        return !process.isRunning
    }

    /// The text between "PVS-BEGIN name" and "PVS-END name" on the console.
    public func section(_ name: String) -> String? { GuestConsole(path: consolePath).section(name) }

    public func kill(signal: Int32 = SIGKILL) {
        if process.isRunning { Glibc.kill(process.processIdentifier, signal) }
        process.waitUntilExit()
    }

    deinit {
        kill()
        unlink(shmPath); unlink(qmpPath); unlink(consolePath)
    }
}

/// The Linux test guest's serial console as a file (QEMU's `-serial file:`, libvirt's
/// `<serial type='file'>`), read by both guest harnesses.
struct GuestConsole {
    let path: String

    /// What the guest printed so far (serial line endings made plain newlines).
    var text: String {
        guard let data = FileManager.default.contents(atPath: path) else { return "" }
        return String(decoding: data.filter { $0 != 0x0D }, as: UTF8.self)
    }

    /// Waits until the console shows `marker` (true), `timeout` seconds pass, or the
    /// guest is gone (`running` false: one last look).
    func waitFor(_ marker: String, timeout: Double, running: () -> Bool) -> Bool {
        let deadline = MonotonicClock.nowNs() + UInt64(timeout * 1e9)
        while MonotonicClock.nowNs() < deadline {
            if text.contains(marker) { return true }
            if !running() { return text.contains(marker) }
            usleep(50_000)
        }
        return text.contains(marker)
    }

    /// The text between "PVS-BEGIN name" and "PVS-END name".
    func section(_ name: String) -> String? {
        let c = text
        guard let a = c.range(of: "PVS-BEGIN \(name)\n"), let b = c.range(of: "PVS-END \(name)", range: a.upperBound..<c.endIndex) else { return nil }
        return String(c[a.upperBound..<b.lowerBound])
    }
}
