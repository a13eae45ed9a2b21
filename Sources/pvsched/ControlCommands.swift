import ArgumentParser
import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedGuestImage

/// Options of every verb that talks to the daemon.
struct ControlOptions: ParsableArguments {
    @Option(help: "The daemon's control socket.") var socket = ControlProtocol.defaultSocketPath
    @Flag(help: "Print the daemon's JSON answer.") var json = false

    func connect() throws -> ControlClient {
        do { return try ControlClient(path: socket) } catch {
            throw DaemonUnavailable(message: error.message)
        }
    }

    /// Calls `method` and prints the JSON result when --json; returns the result.
    func call(_ method: String, _ params: [String: JSON] = [:]) throws -> JSON {
        let client = try connect()
        do {
            let result = try client.call(method, params)
            if json { print(result.pretty) }
            return result
        } catch {
            throw CleanExit.message("pvsched: \(error)", code: 1)
        }
    }
}

/// No daemon (or no access to it): said once, exit status 1.
struct DaemonUnavailable: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// An error message and exit status, printed without a stack of context.
enum CleanExit {
    static func message(_ text: String, code: Int32) -> ExitCode {
        FileHandleOut.stderr(text.escapedForDisplay)
        return ExitCode(code)
    }
}

/// Formats a table with left-aligned columns.
func table(_ header: [String], _ rows: [[String]]) -> String {
    let widths = header.indices.map { i in max(header[i].count, rows.map { i < $0.count ? $0[i].count : 0 }.max() ?? 0) }
    func line(_ r: [String]) -> String {
        r.enumerated().map { i, c in c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
            .trimmingCharacters(in: .whitespaces)
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

extension JSON {
    /// A short text form for table cells.
    var cell: String {
        switch self {
        case .null: return "-"
        case .bool(let b): return b ? "yes" : "no"
        case .int(let i): return "\(i)"
        case .double(let d): return String(format: "%.3g", d)
        case .string(let s): return s.escapedForDisplay
        case .array(let a): return a.isEmpty ? "-" : a.map(\.cell).joined(separator: ",")
        case .object: return "{...}"
        }
    }
}

/// `pvsched vm ...`: the VMs of the running daemon.
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm", abstract: "List, start and stop the daemon's VMs; show or replace a VM's driver.",
        subcommands: [VMList.self, VMStart.self, VMAttach.self, VMStop.self, VMDriver.self, VMGovernor.self, VMTrace.self])
}

struct VMList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the daemon's VMs.")
    @OptionGroup var control: ControlOptions
    func run() throws {
        let vms = try control.call("vm.list")
        guard !control.json else { return }
        let rows = (vms.arrayValue ?? []).map { v -> [String] in
            let vcpus = (v["vcpus"]?.arrayValue ?? []).map { c in
                "\(c["index"]?.cell ?? "?"):\(c["thread"]?.cell ?? "-")\(c["boosted"]?.boolValue == true ? "*" : "")"
            }.joined(separator: " ")
            return [v["id"]?.cell ?? "", v["name"]?.cell ?? "", v["kind"]?.cell ?? "", v["state"]?.cell ?? "",
                    v["driver"]?.cell ?? "-", vcpus, v["negotiation"]?.cell ?? ""]
        }
        print(rows.isEmpty ? "no VMs" : table(["ID", "NAME", "KIND", "STATE", "DRIVER", "VCPU:TID (*boosted)", "NEGOTIATION"], rows))
    }
}

struct VMStart: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "start", abstract: "Start a VM of the built-in VMM in the daemon.")
    @OptionGroup var control: ControlOptions
    @Option(help: "VM name (default: vmN).") var name: String?
    @Option(help: "Number of vCPUs (1-16).") var vcpus: Int64 = 1
    @Option(help: "Guest workload: selftest, cyclic, irq-response, batch, idle, cyclic+batch.") var workload = "cyclic"
    @Option(help: "How long the guest workload runs, in milliseconds.") var durationMs: Int64 = 60_000
    @Option(help: "Wake-up / interrupt interval in microseconds.") var intervalUs: Int64 = 1000
    @Option(help: "Driver for the VM (default: the daemon's default driver).") var driver: String?
    @Flag(help: "Use the in-kernel irqchip.") var irqchip = false
    @Flag(help: "Run the VM without pvsched.") var noPvsched = false
    @Option(help: "Governor: CPU time a vCPU may run boosted in critical sections (irq, softirq, NMI, preemption off), µs.")
    var criticalBudgetUs: Int64?
    @Option(help: "Governor: CPU time a vCPU may run boosted otherwise (real-time tasks), µs.") var generalBudgetUs: Int64?
    @Option(help: "Governor: throttle window after a cut, µs.") var throttleUs: Int64?
    @Option(help: "Governor: largest share (0-1) of the VM's vCPU time boosted.") var vmShare: Double?
    @Option(help: "Governor: a boost in which a vCPU ran B is repaid at the least weight for FACTOR × B (the busy threads expected beside it on its CPU; 0-64, 0: no repayment; default 2).")
    var repaymentFactor: Double?
    @Flag(help: "Governor: no limits (for static-rt).") var unlimited = false

    func validate() throws {
        if let repaymentFactor { try validateRepaymentFactor(repaymentFactor) }
    }

    func run() throws {
        var p: [String: JSON] = ["vcpus": .int(vcpus), "workload": .string(workload), "durationMs": .int(durationMs),
                                 "intervalUs": .int(intervalUs), "irqchip": .bool(irqchip), "pvsched": .bool(!noPvsched),
                                 "unlimited": .bool(unlimited)]
        if let name { p["name"] = .string(name) }
        if let driver { p["driver"] = .string(driver) }
        if let criticalBudgetUs { p["criticalBudgetUs"] = .int(criticalBudgetUs) }
        if let generalBudgetUs { p["generalBudgetUs"] = .int(generalBudgetUs) }
        if let throttleUs { p["throttleWindowUs"] = .int(throttleUs) }
        if let vmShare { p["maxVMShare"] = .double(vmShare) }
        if let repaymentFactor { p["repaymentFactor"] = .double(repaymentFactor) }
        let vm = try control.call("vm.start", p)
        if !control.json { print("started \(vm["name"]?.cell ?? "?") (id \(vm["id"]?.cell ?? "?")), driver \(vm["driver"]?.cell ?? "-")") }
    }
}

struct VMAttach: ParsableCommand {
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
    @Option(help: "Boost class: fifo:N, rr:N, nice:N or slice:US (EEVDF slice of US µs at nice -20; default fifo:10).") var boost: String?
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
        var p: [String: JSON] = [:]
        if let export {
            guard let data = FileManager.default.contents(atPath: export), let doc = try? JSON.parse(Array(data)) else {
                throw ValidationError("--export: cannot read \(export) as JSON")
            }
            for key in ["pid", "threads", "memory", "areaOffset", "areaSize"] { if let v = doc[key], v != .null { p[key] = v } }
            if doc["threads"]?.arrayValue?.contains(.int(0)) == true {
                throw ValidationError("--export: the VM's vCPU threads have not all started yet (a thread id is 0); try again")
            }
        } else {
            if let qmp { p["qmp"] = .string(qmp) }
            if let pid { p["pid"] = .int(pid) }
            if let threadNames { p["threadNames"] = .string(threadNames) }
            if let threads {
                let list = threads.split(separator: ",").map { Int64($0.trimmingCharacters(in: .whitespaces)) }
                guard !list.isEmpty, list.allSatisfy({ $0 != nil }) else { throw ValidationError("--threads must be comma-separated thread ids") }
                p["threads"] = .array(list.map { .int($0!) })
            }
            if let memory { p["memory"] = .string(memory) }
            if let areaOffset { p["areaOffset"] = .int(areaOffset) }
            if let areaSize { p["areaSize"] = .int(areaSize) }
        }
        if let shm { p["shm"] = .string(shm) }
        if let events { p["events"] = .string(events) }
        if noBoostMainLoop { p["boostMainLoop"] = .bool(false) }
        if allowRealTimeThreads { p["allowRealTimeThreads"] = .bool(true) }
        if let boost { p["boost"] = .string(boost) }
        if let protectHostPriority { p["protectHostPriority"] = .int(protectHostPriority) }
        if let pollUs { p["pollUs"] = .int(pollUs) }
        if let deadlineLeadUs { p["deadlineLeadUs"] = .int(deadlineLeadUs) }
        if let name { p["name"] = .string(name) }
        if let driver { p["driver"] = .string(driver) }
        let r = try control.call("vm.attach", p)
        if !control.json {
            print("attached \(r["name"]?.cell ?? "?") (id \(r["id"]?.cell ?? "?")), driver \(r["driver"]?.cell ?? "-")")
            print("area: \(r["negotiation"]?.cell ?? "-")")
            print("events: \(r["events"]?.cell ?? "-")")
            if let t = r["vcpuThreads"]?.arrayValue { print("vCPU threads: \(t.map(\.cell).joined(separator: ", "))\(r["mainLoopBoosted"] == .bool(true) ? " (and the main loop, boosted with them)" : "")") }
        }
    }
}

struct VMStop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop a VM, or detach from an attached one (its boosts are undone).")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    func run() throws {
        let r = try control.call("vm.stop", ["vm": .string(vm)])
        if !control.json { print("stopped \(r["name"]?.cell ?? vm)") }
    }
}

struct VMDriver: ParsableCommand {
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
            let r = unassign ? try control.call("vm.driver.unassign", ["vm": .string(vm)])
                             : try control.call("vm.driver.replace", ["vm": .string(vm), "driver": .string(driver ?? "")])
            if !control.json { print("previous driver: \(r["previous"]?.cell ?? "-")\ndriver: \(r["driver"]?.cell ?? "-")") }
        } else {
            let r = try control.call("vm.driver.get", ["vm": .string(vm)])
            if !control.json { print(r["driver"]?.cell ?? "-") }
        }
    }
}

struct VMGovernor: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "governor", abstract: "Show or change a VM's boost budget.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    @Option(help: "CPU time a vCPU may run boosted in critical sections (irq, softirq, NMI, preemption off), µs.")
    var criticalBudgetUs: Int64?
    @Option(help: "CPU time a vCPU may run boosted otherwise (real-time tasks), µs.") var generalBudgetUs: Int64?
    @Option(help: "Throttle window after a cut, µs.") var throttleUs: Int64?
    @Option(help: "Window of the VM share, µs.") var shareWindowUs: Int64?
    @Option(help: "Largest share (0-1) of the VM's vCPU time boosted.") var vmShare: Double?
    @Option(help: "A boost in which a vCPU ran B is repaid at the least weight for FACTOR × B (0-64; 0: no repayment).")
    var repaymentFactor: Double?
    @Option(help: "The longest repayment after one boost, µs (0-1000000).") var maxRepaymentUs: Int64?

    func validate() throws {
        if let repaymentFactor { try validateRepaymentFactor(repaymentFactor) }
        let range = GovernorConfig.maxRepaymentUsRange
        if let maxRepaymentUs, !range.contains(maxRepaymentUs) {
            throw ValidationError("--max-repayment-us must be \(range.lowerBound)...\(range.upperBound), got \(maxRepaymentUs)")
        }
    }

    func run() throws {
        var p: [String: JSON] = ["vm": .string(vm)]
        if let repaymentFactor { p["repaymentFactor"] = .double(repaymentFactor) }
        if let maxRepaymentUs { p["maxRepaymentUs"] = .int(maxRepaymentUs) }
        if let criticalBudgetUs { p["criticalBudgetUs"] = .int(criticalBudgetUs) }
        if let generalBudgetUs { p["generalBudgetUs"] = .int(generalBudgetUs) }
        if let throttleUs { p["throttleWindowUs"] = .int(throttleUs) }
        if let shareWindowUs { p["shareWindowUs"] = .int(shareWindowUs) }
        if let vmShare { p["maxVMShare"] = .double(vmShare) }
        let r = try control.call(p.count > 1 ? "vm.governor.set" : "vm.governor.get", p)
        if !control.json {
            for key in ["criticalBudgetUs", "generalBudgetUs", "throttleWindowUs", "shareWindowUs", "maxVMShare", "repaymentFactor", "maxRepaymentUs"] {
                print("\(key): \(r[key].map { $0 == .null ? "unlimited" : $0.cell } ?? "?")")
            }
        }
    }
}

struct VMTrace: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "trace", abstract: "Show a VM's last driver notifications.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id.") var vm: String
    @Option(help: "Notifications per vCPU (1-4096).") var last: Int64 = 20
    func run() throws {
        let r = try control.call("vm.trace", ["vm": .string(vm), "last": .int(last)])
        guard !control.json else { return }
        for t in r.arrayValue ?? [] {
            print("\(t["timeUs"]?.cell ?? "") µs vCPU \(t["vcpu"]?.cell ?? "") \(t["event"]?.cell ?? "") flags \(t["flags"]?.cell ?? "-") "
                  + "boosted \(t["boosted"]?.cell ?? "") -> \(t["decision"]?.cell ?? "") (\(t["outcome"]?.cell ?? ""))")
        }
    }
}

/// `pvsched stats [VM]`: per-vCPU counters.
struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stats", abstract: "Per-vCPU counters of the daemon's VMs.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id (default: all).") var vm: String?
    func run() throws {
        var p: [String: JSON] = [:]
        if let vm { p["vm"] = .string(vm) }
        let r = try control.call("vm.stats", p)
        guard !control.json else { return }
        var rows: [[String]] = []
        for v in r["vms"]?.arrayValue ?? [] {
            for c in v["vcpus"]?.arrayValue ?? [] {
                let boostedMs = Double(c["boostedNs"]?.intValue ?? 0) / 1e6
                rows.append([v["name"]?.cell ?? "", c["index"]?.cell ?? "", v["driver"]?.cell ?? "-", c["thread"]?.cell ?? "-",
                             c["boosted"]?.cell ?? "", c["events"]?.cell ?? "", c["boosts"]?.cell ?? "",
                             String(format: "%.1f", boostedMs), c["repayments"]?.cell ?? "0", c["throttles"]?.cell ?? "",
                             "\(c["vetoes"]?["throttled"]?.cell ?? "0")/\(c["vetoes"]?["vm_share"]?.cell ?? "0")"])
            }
        }
        print(rows.isEmpty ? "no VMs" : table(["VM", "VCPU", "DRIVER", "TID", "BOOSTED", "EVENTS", "BOOSTS", "BOOSTED MS",
                                               "REPAID", "THROTTLES", "VETOES THR/SHARE"], rows))
    }
}

/// `pvsched top`: a live per-vCPU view, refreshed every second.
struct TopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "top", abstract: "A live per-vCPU view of the daemon's VMs.")
    @Option(help: "The daemon's control socket.") var socket = ControlProtocol.defaultSocketPath
    @Option(help: "Seconds between refreshes (0.1-60).") var interval: Double = 1
    @Option(help: "Stop after this many refreshes (default: until interrupted).") var count: Int?
    @Flag(help: "Print one JSON line per refresh instead of a screen.") var json = false

    func validate() throws {
        guard interval >= 0.1 && interval <= 60 else { throw ValidationError("--interval must be 0.1...60 seconds") }
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
    }

    func run() throws {
        let client: ControlClient
        do { client = try ControlClient(path: socket) } catch { throw DaemonUnavailable(message: error.message) }
        var previous: [String: (t: Int64, boosts: Int64, boostedNs: Int64)] = [:]
        var n = 0
        let tty = isatty(1) == 1 && !json
        while count.map({ n < $0 }) ?? true {
            if n > 0 { usleep(UInt32(interval * 1e6)) }
            n += 1
            let r: JSON
            do { r = try client.call("vm.stats") } catch { throw CleanExit.message("pvsched top: \(error)", code: 1) }
            let t = r["timeNs"]?.intValue ?? 0
            var rows: [[String]] = []
            var lines: [JSON] = []
            for v in r["vms"]?.arrayValue ?? [] {
                for c in v["vcpus"]?.arrayValue ?? [] {
                    let key = "\(v["name"]?.cell ?? "")/\(c["index"]?.cell ?? "")"
                    let boosts = c["boosts"]?.intValue ?? 0, boostedNs = c["boostedNs"]?.intValue ?? 0
                    var rate = 0.0, pct = 0.0
                    if let p = previous[key], t > p.t {
                        let dt = Double(t - p.t) / 1e9
                        rate = Double(boosts - p.boosts) / dt
                        pct = min(100, Double(boostedNs - p.boostedNs) / Double(t - p.t) * 100)
                    }
                    previous[key] = (t, boosts, boostedNs)
                    let vetoes = "\(c["vetoes"]?["throttled"]?.cell ?? "0")/\(c["vetoes"]?["vm_share"]?.cell ?? "0")"
                    rows.append([v["name"]?.cell ?? "", c["index"]?.cell ?? "", v["driver"]?.cell ?? "-",
                                 c["boosted"]?.boolValue == true ? "BOOSTED" : "-", String(format: "%.1f", rate),
                                 String(format: "%.1f", pct), c["throttles"]?.cell ?? "0", vetoes])
                    lines.append(["vm": v["name"] ?? .null, "vcpu": c["index"] ?? .null, "driver": v["driver"] ?? .null,
                                  "boosted": c["boosted"] ?? .null, "boostsPerSecond": .double(rate), "boostedPercent": .double(pct),
                                  "throttles": c["throttles"] ?? .null, "vetoes": c["vetoes"] ?? .null])
                }
            }
            if json {
                print(String(decoding: JSON.array(lines).encoded, as: UTF8.self))
            } else {
                if tty { print("\u{1B}[H\u{1B}[2J", terminator: "") }
                print("pvsched top — \(rows.count) vCPUs, every \(interval) s (Ctrl-C to quit)")
                print(rows.isEmpty ? "no VMs" : table(["VM", "VCPU", "DRIVER", "NOW", "BOOSTS/S", "BOOSTED %", "THROTTLES",
                                                       "VETOES THR/SHARE"], rows))
            }
            fflush(nil)
        }
    }
}

/// `pvsched bpf load FILE`: load a BPF driver object into the running daemon.
struct BPFLoad: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "load", abstract: "Load a BPF driver object into the running daemon.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "The ELF object (clang -target bpf -O2 -c), or 'sample' / 'deadline-sample' for the bundled latency-boost / deadline-boost policies.") var object: String
    @Option(help: "Register it under this name instead of the one it declares.") var name: String?

    func run() throws {
        let bytes: [UInt8]
        if object == "sample" { bytes = GuestImage.sampleBPFDriver }
        else if object == "deadline-sample" { bytes = GuestImage.deadlineBPFDriver } else {
            guard let data = FileManager.default.contents(atPath: object) else {
                throw ValidationError("cannot read \(object): no such file or not readable")
            }
            bytes = [UInt8](data)
        }
        guard bytes.count <= ControlProtocol.maxRequestBytes / 2 else {
            throw ValidationError("\(object) is \(bytes.count) bytes; the limit is \(ControlProtocol.maxRequestBytes / 2)")
        }
        var p: [String: JSON] = ["object": .string(Data(bytes).base64EncodedString())]
        if let name { p["name"] = .string(name) }
        let r = try control.call("bpf.load", p)
        if !control.json { print("loaded BPF driver '\(r["name"]?.cell ?? "?")' (\(r["protocol"]?.cell ?? "") \(r["version"]?.cell ?? ""))") }
    }
}

/// `pvsched bpf unload NAME`.
struct BPFUnload: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "unload", abstract: "Unload a BPF driver from the running daemon.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "The driver's name.") var name: String
    @Flag(help: "Unload even if VMs use it (they go back to the default driver).") var force = false
    func run() throws {
        let r = try control.call("bpf.unload", ["name": .string(name), "force": .bool(force)])
        if !control.json {
            let moved = r["moved"]?.arrayValue ?? []
            print("unloaded '\(name)'\(moved.isEmpty ? "" : "; moved to the default driver: \(moved.map(\.cell).joined(separator: ", "))")")
        }
    }
}

/// `--repayment-factor` as the governor accepts it (`GovernorConfig.repaymentFactorRange`).
func validateRepaymentFactor(_ factor: Double) throws {
    let range = GovernorConfig.repaymentFactorRange
    guard factor.isFinite, range.contains(factor) else {
        throw ValidationError("--repayment-factor must be \(Int(range.lowerBound))...\(Int(range.upperBound)), got \(factor)")
    }
}

/// `pvsched thread boost|restore`: an operator's boost of one thread through the
/// daemon (`thread.boost`, `thread.restore`): undone when its time is up, and by
/// the guardian if the daemon dies.
struct ThreadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "thread", abstract: "Boost one thread through the daemon for a while, or end that boost.",
        subcommands: [ThreadBoost.self, ThreadRestore.self])
}

struct ThreadBoost: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boost",
        abstract: "Run a thread SCHED_FIFO for a while (root; a read-group member only its own threads, FIFO 1-49, at most 10 s).")
    @OptionGroup var control: ControlOptions
    @Argument(help: "Thread id (as in /proc/PID/task).") var tid: Int64
    @Option(help: "SCHED_FIFO priority (1-99).") var priority: Int64 = 10
    @Option(help: "How long, in milliseconds (1-3600000).") var durationMs: Int64 = 10_000
    func validate() throws {
        guard (1...Int64(Int32.max)).contains(tid) else { throw ValidationError("TID must be a thread id (> 0), got \(tid)") }
        guard (1...99).contains(priority) else { throw ValidationError("--priority must be 1...99, got \(priority)") }
        guard (1...3_600_000).contains(durationMs) else { throw ValidationError("--duration-ms must be 1...3600000, got \(durationMs)") }
    }
    func run() throws {
        let r = try control.call("thread.boost", ["tid": .int(tid), "priority": .int(priority), "durationMs": .int(durationMs)])
        if !control.json { print("boosted \(tid): \(r["boosted"]?.cell ?? "?") for \(durationMs) ms") }
    }
}

struct ThreadRestore: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "restore", abstract: "End an operator boost of a thread now.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "Thread id.") var tid: Int64
    func validate() throws {
        guard (1...Int64(Int32.max)).contains(tid) else { throw ValidationError("TID must be a thread id (> 0), got \(tid)") }
    }
    func run() throws {
        _ = try control.call("thread.restore", ["tid": .int(tid)])
        if !control.json { print("restored \(tid)") }
    }
}
