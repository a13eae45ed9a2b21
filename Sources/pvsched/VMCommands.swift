import ArgumentParser
import Foundation
import PVSchedControl
import PVSchedCore

/// `pvsched vm ...`: the VMs of the running daemon.
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm", abstract: "List, start and stop the daemon's VMs; show or replace a VM's driver.",
        subcommands: [VMListCommand.self, VMStartCommand.self, VMAttachCommand.self, VMStopCommand.self, VMDriverCommand.self,
                      VMGovernorCommand.self, VMTraceCommand.self])
}

struct VMListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the daemon's VMs.")
    @OptionGroup var control: ControlOptions
    func run() throws {
        let vms = try control.call(VMList.self)
        guard !control.json else { return }
        let rows = vms.map { v -> [String] in
            let vcpus = v.vcpus.map { c in "\(c.index):\(cell(c.thread))\(c.boosted ? "*" : "")" }.joined(separator: " ")
            return ["\(v.id)", v.name, v.kind, v.state, cell(v.driver), vcpus, v.negotiation]
        }
        print(rows.isEmpty ? "no VMs" : table(["ID", "NAME", "KIND", "STATE", "DRIVER", "VCPU:TID (*boosted)", "NEGOTIATION"], rows))
        for v in vms {
            for c in v.vcpus {
                if let why = c.boostBlocked { print("\(cell(v.name)) vCPU \(c.index): boosts cannot be applied: \(cell(why))") }
                if let why = c.boostClassFallback { print("\(cell(v.name)) vCPU \(c.index): \(cell(why))") }
            }
        }
    }
}

struct VMStartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a VM of the built-in VMM in the daemon.")
    @OptionGroup var control: ControlOptions
    @Option(help: "VM name (default: vmN).") var name: String?
    @Option(help: "Number of vCPUs (1-\(VMStart.maxVCPUs)).") var vcpus: Int64 = 1
    @Option(help: "Guest workload: selftest, cyclic, irq-response, batch, idle, cyclic+batch.") var workload = "cyclic"
    @Option(help: "How long the guest workload runs, in milliseconds.") var durationMs: Int64 = 60_000
    @Option(help: "Wake-up / interrupt interval in microseconds.") var intervalUs: Int64 = 1000
    @Option(help: "Driver for the VM (default: the daemon's default driver).") var driver: String?
    @Flag(help: "Use the in-kernel irqchip.") var irqchip = false
    @Flag(help: "Run the VM without pvsched.") var noPvsched = false
    @OptionGroup(title: "Governor") var governor: GovernorOptions

    func run() throws {
        var p = VMStart.Params()
        p.name = name; p.vcpus = Int(clamping: vcpus); p.workload = workload; p.durationMs = UInt64(clamping: durationMs)
        p.intervalUs = UInt64(clamping: intervalUs); p.driver = driver; p.irqchip = irqchip; p.pvsched = !noPvsched
        p.governor = governor.change
        let vm = try control.call(VMStart.self, p)
        if !control.json { print("started \(cell(vm.name)) (id \(vm.id)), driver \(cell(vm.driver))") }
    }
}

struct VMAttachCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attach", abstract: "Attach the daemon to a VM another process runs: QEMU (QMP), crosvm, cloud-hypervisor, Firecracker, or `pvsched run --export`.",
        discussion: """
        QEMU: --qmp SOCKET --shm /dev/shm/NAME (the ivshmem region the guest's pvsched_guest module writes; see docs/linux-guests.md).
        Other VMMs: --pid PID --thread-names crosvm|cloud-hypervisor|firecracker|qemu, or --pid PID --threads TID,TID,...
        A VM of `pvsched run --export FILE`: --export FILE.
        """)
    @OptionGroup var control: ControlOptions
    @Option(help: "QEMU's QMP socket (-qmp unix:PATH,server=on,wait=off): gives the process and its vCPU threads.") var qmp: String?
    @Option(help: "The ivshmem file (under /dev/shm) the guest's pvsched area lives in.") var shm: String?
    @Option(help: "Find the vCPU threads by name: crosvm, cloud-hypervisor, firecracker or qemu (with -name debug-threads=on).") var threadNames: String?
    @Option(help: "Where events come from: kernel (KVM events through eBPF), watch (the guest's area), both (default with --shm; --shm needs watch or both).") var events: String?
    @Flag(help: "Accept vCPU threads that are already real-time (refused by default: someone else manages them).")
    var allowRealTimeThreads = false
    @Option(help: "Boost class: \(BoostSettings.classSyntax); default fifo:10.") var boost: String?
    @Option(help: "Never preempt host real-time tasks at or above this priority (default 50; 1: boosts are nice -20; 0: none).")
    var protectHostPriority: Int64?
    @Flag(help: "Do not boost QEMU's main-loop thread with the vCPUs (it delivers the guest's timer interrupts under TCG).") var noBoostMainLoop = false
    @Option(help: "How often the watcher reads the guest's lines while it works, in µs (50-100000; default 200).") var pollUs: Int64?
    @Option(help: "How long before a deadline the guest published its driver gets a `deadline` event, in µs (0-100000; default 200).") var deadlineLeadUs: Int64?
    @Option(help: "The export file of `pvsched run --export`.") var export: String?
    @Option(help: "The VMM process id.") var pid: Int64?
    @Option(help: "vCPU thread ids in vCPU order, comma-separated.") var threads: String?
    @Option(help: "The shared memory file holding the guest's area (under /dev/shm).") var memory: String?
    @Option(help: "Offset of the area in the memory file.") var areaOffset: Int64?
    @Option(help: "Size of the area.") var areaSize: Int64?
    @Option(help: "VM name (default: pidN).") var name: String?
    @Option(help: "Driver for the VM (default: the daemon's default driver).") var driver: String?

    func validate() throws {
        let ways = [export != nil, qmp != nil, threads != nil, threadNames != nil].filter { $0 }.count
        guard ways == 1 else { throw ValidationError("give one of --qmp SOCKET, --export FILE, --pid with --threads, or --pid with --thread-names") }
        if (threads != nil || threadNames != nil) && pid == nil { throw ValidationError("--threads and --thread-names need --pid") }
        if export != nil && pid != nil { throw ValidationError("--export and --pid exclude each other") }
        if shm != nil && memory != nil { throw ValidationError("--shm and --memory exclude each other") }
        if let pollUs, !(50...100_000).contains(pollUs) { throw ValidationError("--poll-us must be 50...100000, got \(pollUs)") }
        if let deadlineLeadUs, !(0...100_000).contains(deadlineLeadUs) { throw ValidationError("--deadline-lead-us must be 0...100000, got \(deadlineLeadUs)") }
        if let events, !["kernel", "watch", "both"].contains(events) { throw ValidationError("--events must be kernel, watch or both") }
    }

    func run() throws {
        var p = VMAttach.Params()
        if let export {
            guard let data = FileManager.default.contents(atPath: export), let doc = try? JSON.parse(Array(data)) else {
                throw ValidationError("--export: cannot read \(export) as JSON")
            }
            let threads = doc["threads"]?.arrayValue?.compactMap { $0.intValue.map { Int32(clamping: $0) } }
            if threads?.contains(0) == true {
                throw ValidationError("--export: the VM's vCPU threads have not all started yet (a thread id is 0); try again")
            }
            p.pid = doc["pid"]?.intValue.map { Int32(clamping: $0) }
            p.threads = threads
            p.memory = doc["memory"]?.stringValue
            p.areaOffset = doc["areaOffset"]?.intValue
            p.areaSize = doc["areaSize"]?.intValue
        } else {
            p.qmp = qmp
            p.pid = pid.map { Int32(clamping: $0) }
            p.threadNames = threadNames
            if let threads {
                let list = threads.split(separator: ",").map { Int32($0.trimmingCharacters(in: .whitespaces)) }
                guard !list.isEmpty, list.allSatisfy({ $0 != nil }) else { throw ValidationError("--threads must be comma-separated thread ids") }
                p.threads = list.map { $0! }
            }
            p.memory = memory; p.areaOffset = areaOffset; p.areaSize = areaSize
        }
        p.shm = shm; p.events = events
        if noBoostMainLoop { p.boostMainLoop = false }
        p.allowRealTimeThreads = allowRealTimeThreads; p.boost = boost; p.protectHostPriority = protectHostPriority
        p.pollUs = pollUs; p.deadlineLeadUs = deadlineLeadUs; p.name = name; p.driver = driver
        let r = try control.call(VMAttach.self, p)
        if !control.json {
            print("attached \(cell(r.vm.name)) (id \(r.vm.id)), driver \(cell(r.vm.driver))")
            print("area: \(cell(r.vm.negotiation))")
            print("events: \(cell(r.events))")
            print("vCPU threads: \(r.vcpuThreads.map(String.init).joined(separator: ", "))\(r.mainLoopBoosted ? " (and the main loop, boosted with them)" : "")")
        }
    }
}

struct VMStopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop a VM, or detach from an attached one (its boosts are undone).")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    func run() throws {
        let r = try control.call(VMStop.self, VMReference(vm))
        if !control.json { print("stopped \(cell(r.name))") }
    }
}

struct VMDriverCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "driver", abstract: "Show a VM's driver, or replace it (prints the previous one).")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    @Argument(help: "The new driver.") var driver: String?
    @Flag(help: "Drop the VM's explicit driver: it goes back to the default.") var unassign = false

    func validate() throws {
        if unassign && driver != nil { throw ValidationError("give a driver or --unassign, not both") }
    }

    func run() throws {
        if unassign || driver != nil {
            let r = unassign ? try control.call(VMDriverUnassign.self, VMReference(vm))
                             : try control.call(VMDriverReplace.self, .init(vm: vm, driver: driver ?? ""))
            if !control.json { print("previous driver: \(cell(r.previous))\ndriver: \(cell(r.driver))") }
        } else {
            let r = try control.call(VMDriverGet.self, VMReference(vm))
            if !control.json { print(cell(r.driver)) }
        }
    }
}

struct VMGovernorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "governor", abstract: "Show or change a VM's boost budget.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    @OptionGroup(title: "Governor") var governor: GovernorOptions

    func run() throws {
        let change = governor.change
        let r = change.isEmpty ? try control.call(VMGovernorGet.self, VMReference(vm))
                               : try control.call(VMGovernorSet.self, .init(vm: vm, change: change))
        if !control.json { for (key, value) in r.lines { print("\(key): \(value)") } }
    }
}

struct VMTraceCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "trace", abstract: "Show a VM's last driver notifications.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    @Option(help: "Notifications per vCPU (1-4096).") var last: Int64 = 20
    func validate() throws {
        guard (1...4096).contains(last) else { throw ValidationError("--last must be 1...4096, got \(last)") }
    }
    func run() throws {
        let r = try control.call(VMTrace.self, .init(vm: vm, last: Int(last)))
        guard !control.json else { return }
        for t in r {
            print("\(t.timeUs) µs vCPU \(t.vcpu) \(cell(t.event)) flags \(cell(t.flags)) boosted \(t.boosted ? "yes" : "no") -> \(cell(t.decision)) (\(cell(t.outcome)))")
        }
    }
}
