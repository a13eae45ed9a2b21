import ArgumentParser
import Foundation
import PVSchedControl
import PVSchedCore

/// Options of every verb that talks to the daemon.
struct ControlOptions: ParsableArguments {
    @Option(help: "The daemon's control socket.") var socket = ControlProtocol.defaultSocketPath
    @Flag(help: "Print the daemon's JSON answer.") var json = false

    func connect() throws -> ControlClient {
        do { return try ControlClient(path: socket) } catch {
            throw DaemonUnavailable(message: error.message)
        }
    }

    /// Calls method `M`, prints its JSON result when --json, and returns the typed result.
    func call<M: ControlMethod>(_ method: M.Type, _ params: M.Params) throws -> M.Result {
        let client = try connect()
        do {
            let result = try client.call(method, params)
            if json { print(result.json.pretty) }
            return result
        } catch {
            throw CleanExit.message("pvsched: \(error)", code: 1)
        }
    }

    func call<M: ControlMethod>(_ method: M.Type) throws -> M.Result where M.Params == NoParams {
        try call(method, NoParams())
    }
}

/// The governor's options, as `vm start` and `vm governor` take them (a
/// `GovernorChange`: the fields the control API defines, with their ranges).
struct GovernorOptions: ParsableArguments {
    @Option(help: "CPU time a vCPU may run boosted in critical sections (irq, softirq, NMI, preemption off), µs.")
    var criticalBudgetUs: Int64?
    @Option(help: "CPU time a vCPU may run boosted otherwise (real-time tasks), µs.") var generalBudgetUs: Int64?
    @Option(help: "Throttle window after a cut, µs.") var throttleUs: Int64?
    @Option(help: "Window of the VM share, µs.") var shareWindowUs: Int64?
    @Option(help: "Largest share (0-1) of the VM's vCPU time boosted.") var vmShare: Double?
    @Option(help: "A boost in which a vCPU ran B is repaid at the least weight for FACTOR × B (the busy threads expected beside it on its CPU; 0-64, 0: no repayment; default 2).")
    var repaymentFactor: Double?
    @Option(help: "The longest repayment after one boost, µs (0-1000000).") var maxRepaymentUs: Int64?
    @Flag(help: "No limits at all (for static-rt).") var unlimited = false

    var change: GovernorChange {
        var c = GovernorChange()
        c.criticalBudgetUs = criticalBudgetUs; c.generalBudgetUs = generalBudgetUs; c.throttleWindowUs = throttleUs
        c.shareWindowUs = shareWindowUs; c.maxVMShare = vmShare; c.repaymentFactor = repaymentFactor
        c.maxRepaymentUs = maxRepaymentUs; c.unlimited = unlimited
        return c
    }

    /// The options' names for the request's fields.
    static let flags = ["criticalBudgetUs": "--critical-budget-us", "generalBudgetUs": "--general-budget-us",
                        "throttleWindowUs": "--throttle-us", "shareWindowUs": "--share-window-us", "maxVMShare": "--vm-share",
                        "repaymentFactor": "--repayment-factor", "maxRepaymentUs": "--max-repayment-us"]

    func validate() throws {
        do { try change.validate() } catch {
            let field = String(error.field.dropFirst("params.".count))
            throw ValidationError("\(Self.flags[field] ?? field): \(error.message)")
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

/// Formats a table with left-aligned columns; every cell is escaped for display.
func table(_ header: [String], _ rows: [[String]]) -> String {
    let rows = rows.map { $0.map(\.escapedForDisplay) }
    let widths = header.indices.map { i in max(header[i].count, rows.map { i < $0.count ? $0[i].count : 0 }.max() ?? 0) }
    func line(_ r: [String]) -> String {
        r.enumerated().map { i, c in c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
            .trimmingCharacters(in: .whitespaces)
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

/// A value for a table cell or a line: `-` for none, escaped for display.
func cell(_ s: String?) -> String { s.map(\.escapedForDisplay) ?? "-" }
func cell<T: BinaryInteger>(_ n: T?) -> String { n.map { "\($0)" } ?? "-" }
