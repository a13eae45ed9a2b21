import ArgumentParser
import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedDrivers
import PVSchedGuestImage

#if canImport(Glibc)
import Glibc
#endif

/// Lists the drivers: the running daemon's registry (the seed's
/// `pvsched_available_drivers` sysctl), or the built-ins when no daemon runs.
struct DriversCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "drivers", abstract: "List the drivers (the running daemon's, or the built-in ones when no daemon runs).")
    @OptionGroup var control: ControlOptions
    @Option(help: "Make this driver the daemon's default ('none' for no default).") var setDefault: String?

    func run() throws {
        if let setDefault {
            let r = try control.call(DriversSetDefault.self, .init(name: setDefault == "none" ? nil : setDefault))
            if !control.json { print("default driver: \(r.defaultDriver.map(cell) ?? "none") (was \(r.previous.map(cell) ?? "none"))") }
            return
        }
        let list: [DriverSummary]
        var fromDaemon = true
        if let client = try? ControlClient(path: control.socket) {
            do { list = try client.call(DriversList.self) } catch { throw CleanExit.message("pvsched: \(error)", code: 1) }
        } else {
            fromDaemon = false
            let registry = DriverRegistry()
            try BuiltinDrivers.registerAll(in: registry)
            list = registry.drivers.map { d in
                DriverSummary(name: d.name, protocolName: d.protocolName, version: "\(d.protocolVersion)", events: d.events.names,
                              vms: [], isDefault: d.isDefault, kind: "builtin")
            }
        }
        if control.json { print(list.json.pretty); return }
        if !fromDaemon { print("(no daemon at \(control.socket): built-in drivers)") }
        print(table(["NAME", "PROTOCOL", "KIND", "DEFAULT", "VMS"], list.map { d in
            [d.name, "\(d.protocolName) \(d.version)", d.kind, d.isDefault ? "default" : "", d.vms.isEmpty ? "-" : d.vms.joined(separator: ",")]
        }))
    }
}

/// `pvsched stats [VM]`: per-vCPU counters.
struct StatsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "stats", abstract: "Per-vCPU counters of the daemon's VMs.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "VM name or id (default: all).") var vm: String?
    func run() throws {
        let r = try control.call(VMStats.self, .init(vm: vm))
        guard !control.json else { return }
        var rows: [[String]] = []
        for v in r.vms {
            for c in v.vcpus {
                rows.append([v.name, "\(c.index)", cell(v.driver), cell(c.thread), c.boosted ? "yes" : "no", "\(c.events)", "\(c.boosts)",
                             String(format: "%.1f", Double(c.boostedNs) / 1e6), "\(c.repayments)", "\(c.throttles)",
                             "\(c.vetoesThrottled)/\(c.vetoesVMShare)"])
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
        var previous: [String: (t: UInt64, boosts: UInt64, boostedNs: UInt64)] = [:]
        var n = 0
        let tty = isatty(1) == 1 && !json
        while count.map({ n < $0 }) ?? true {
            if n > 0 { usleep(UInt32(interval * 1e6)) }
            n += 1
            let r: VMStats.Result
            do { r = try client.call(VMStats.self, .init()) } catch { throw CleanExit.message("pvsched top: \(error)", code: 1) }
            var rows: [[String]] = []
            var lines: [JSON] = []
            for v in r.vms {
                for c in v.vcpus {
                    let key = "\(v.name)/\(c.index)"
                    var rate = 0.0, pct = 0.0
                    if let p = previous[key], r.timeNs > p.t {
                        rate = Double(c.boosts &- p.boosts) / (Double(r.timeNs - p.t) / 1e9)
                        pct = min(100, Double(c.boostedNs &- p.boostedNs) / Double(r.timeNs - p.t) * 100)
                    }
                    previous[key] = (r.timeNs, c.boosts, c.boostedNs)
                    rows.append([v.name, "\(c.index)", cell(v.driver), c.boosted ? "BOOSTED" : "-", String(format: "%.1f", rate),
                                 String(format: "%.1f", pct), "\(c.throttles)", "\(c.vetoesThrottled)/\(c.vetoesVMShare)"])
                    lines.append(["vm": .string(v.name), "vcpu": JSON(c.index), "driver": JSON(v.driver), "boosted": .bool(c.boosted),
                                  "boostsPerSecond": .double(rate), "boostedPercent": .double(pct), "throttles": JSON(c.throttles),
                                  "vetoes": ["throttled": JSON(c.vetoesThrottled), "vm_share": JSON(c.vetoesVMShare)]])
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
struct BPFLoadCommand: ParsableCommand {
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
        let r = try control.call(BPFLoad.self, .init(object: Data(bytes).base64EncodedString(), name: name))
        if !control.json { print("loaded BPF driver '\(cell(r.name))' (\(cell(r.protocolName)) \(cell(r.version)))") }
    }
}

/// `pvsched bpf unload NAME`.
struct BPFUnloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "unload", abstract: "Unload a BPF driver from the running daemon.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "The driver's name.") var name: String
    @Flag(help: "Unload even if VMs use it (they go back to the default driver).") var force = false
    func run() throws {
        let r = try control.call(BPFUnload.self, .init(name: name, force: force))
        if !control.json {
            print("unloaded '\(cell(name))'\(r.moved.isEmpty ? "" : "; moved to the default driver: \(r.moved.map(cell).joined(separator: ", "))")")
        }
    }
}

/// `pvsched thread boost|restore`: an operator's boost of one thread through the
/// daemon: undone when its time is up, and by the guardian if the daemon dies.
struct ThreadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "thread", abstract: "Boost one thread through the daemon for a while, or end that boost.",
        subcommands: [ThreadBoostCommand.self, ThreadRestoreCommand.self])
}

struct ThreadBoostCommand: ParsableCommand {
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
        let r = try control.call(ThreadBoost.self, .init(tid: Int32(tid), priority: UInt8(priority), durationMs: UInt64(durationMs)))
        if !control.json { print("boosted \(tid): \(cell(r.boosted)) for \(r.durationMs) ms") }
    }
}

struct ThreadRestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "restore", abstract: "End an operator boost of a thread now.")
    @OptionGroup var control: ControlOptions
    @Argument(help: "Thread id.") var tid: Int64
    func validate() throws {
        guard (1...Int64(Int32.max)).contains(tid) else { throw ValidationError("TID must be a thread id (> 0), got \(tid)") }
    }
    func run() throws {
        _ = try control.call(ThreadRestore.self, .init(tid: Int32(tid)))
        if !control.json { print("restored \(tid)") }
    }
}
