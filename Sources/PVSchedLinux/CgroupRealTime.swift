import Foundation
import PVSchedCore

/// Real-time group scheduling (cgroup v1's `cpu` controller with
/// `CONFIG_RT_GROUP_SCHED`): a thread in a cgroup whose `cpu.rt_runtime_us` is 0 can
/// never run real-time, and `sched_setattr` says only EPERM. libvirt puts every vCPU
/// thread alone in such a cgroup (`machine/qemu-N-NAME.libvirt-qemu/vcpuN`). This
/// names the cause so that it is reported once, with what to do.
public enum CgroupRealTime {
    /// The cpu cgroup of `thread` when it has no real-time runtime, else nil.
    public static func cgroupWithoutRuntime(_ thread: ThreadID) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/\(thread.rawValue)/cgroup", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3, parts[1].split(separator: ",").contains("cpu") else { continue }
            let path = String(parts[2])
            guard !path.contains(".."), path.hasPrefix("/") else { return nil }
            for mount in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
                guard let v = try? String(contentsOfFile: mount + path + "/cpu.rt_runtime_us", encoding: .utf8) else { continue }
                return v.trimmingCharacters(in: .whitespacesAndNewlines) == "0" ? path : nil
            }
        }
        return nil
    }
}
