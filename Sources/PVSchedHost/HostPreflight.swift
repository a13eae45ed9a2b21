import PVSchedKVM
import PVSchedLinux

/// What the built-in VMM needs of this process, checked up front with a message
/// that says what to do (the CLI's `run`, the lab's `demo` and `bench`).
public enum HostPreflight {
    /// Why /dev/kvm cannot be used, nil when it can.
    public static var kvmProblem: String? {
        KVMSystem.isAvailable ? nil : "/dev/kvm is missing or not accessible: pvsched needs KVM (run as root on a host with /dev/kvm)."
    }
    /// Why SCHED_FIFO cannot be used, nil when it can.
    public static var realTimeProblem: String? {
        LinuxScheduling.canUseRealTime ? nil : "this process may not use SCHED_FIFO: run as root (or with CAP_SYS_NICE)."
    }
}
