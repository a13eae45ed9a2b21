import PVSchedCore

/// Real-time group scheduling (cgroup v1's `cpu` controller with
/// `CONFIG_RT_GROUP_SCHED`): a thread in a cgroup whose `cpu.rt_runtime_us` is 0 can
/// never run real-time, and `sched_setattr` says only EPERM. libvirt puts every vCPU
/// thread alone in such a cgroup (`machine/qemu-N-NAME.libvirt-qemu/vcpuN`). This
/// names the cause, so that the actuator can fall back to a fair class and say why.
public enum CgroupRealTime {
    /// The cpu cgroup of `thread` (of `process`) when it has no real-time runtime, else nil.
    public static func cgroupWithoutRuntime(_ thread: ThreadID, process: Int32) -> String? {
        guard let h = CgroupWeights.Hierarchy.detect(), h.version == .v1,
              let path = h.cgroupPath(thread: thread.rawValue, process: process),
              path.hasPrefix("/"), !path.split(separator: "/").contains("..") else { return nil }
        return CgroupWeights.read(h.mount + path + "/cpu.rt_runtime_us") == 0 ? path : nil
    }
}
