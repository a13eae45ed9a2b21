import PVSchedCore
import Synchronization

/// The host's budget enforcer: one real-time thread for every VM (not one per VM),
/// that cuts boosts past their budget, ends repayments that are due and announces
/// deadlines that are near, whether or not any event comes (see `VMEnforcement`).
///
/// It sleeps on one `BudgetAlarm` that every VM of the host rings when it needs a
/// look sooner than planned, until the earliest look any VM needs (each VM's next
/// look is cached; only the VMs that are due, or that rang, are taken), and at most
/// `BudgetAlarm.idleNs` (every VM's counters are republished then). It runs at the
/// least real-time priority that preempts the boosts of every VM it serves
/// (`VMEnforcement.enforcerPriority`), never higher.
public final class HostEnforcer: Sendable {
    /// The alarm every VM's binding rings.
    public let alarm = BudgetAlarm()
    private struct Served {
        let vm: any VMEnforcement
        var nextNs: UInt64
    }
    private struct Table {
        var vms: [UInt64: Served] = [:]
        /// Whether the thread runs (it ends when the last VM is removed, and starts with the next).
        var running = false
    }
    private let table = Mutex(Table())
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    private let threads: any ThreadControl
    private let realTime: Bool
    private let passes = Atomic<UInt64>(0)

    /// `realTime`: whether this process may run the enforcer real-time.
    public init(threads: any ThreadControl, realTime: Bool) {
        self.threads = threads
        self.realTime = realTime
    }

    /// Starts enforcing `vm` (as VM `id`); the thread starts with the first VM.
    public func add(_ vm: any VMEnforcement, id: UInt64) throws(ThreadError) {
        let start = table.withLock { t in
            t.vms[id] = Served(vm: vm, nextNs: 0)
            guard !t.running else { return false }
            t.running = true
            return true
        }
        if start {
            do {
                try thread.withLock { t throws(ThreadError) in
                    t?.join()  // the previous thread, which ended with its last VM
                    t = try PVSchedCore.Thread(name: "pvs-enforcer") { [weak self] in self?.run() }
                }
            } catch {
                table.withLock { t in
                    t.vms.removeValue(forKey: id)
                    t.running = false
                }
                throw error
            }
        }
        alarm.ring()
    }

    /// Stops enforcing VM `id`; no pass over it runs after this returns. The
    /// thread ends with the last VM.
    public func remove(id: UInt64) {
        table.withLock { _ = $0.vms.removeValue(forKey: id) }
        alarm.ring()
        passLock.withLock { _ in }
    }

    /// Passes over a VM (for the scale benchmark and the tests).
    public var passCount: UInt64 { passes.load(ordering: .relaxed) }
    /// Held while the enforcer passes over VMs (so that `remove` can wait it out).
    private let passLock = Mutex(())

    private func run() {
        var priority: UInt8?
        var lastFullPass: UInt64 = 0
        while true {
            let now = MonotonicClock.nowNs()
            let (served, done) = table.withLock { t in
                let done = t.vms.isEmpty
                if done { t.running = false }
                return (t.vms, done)
            }
            if done { return }
            // (Removed VMs are skipped below: the pass re-reads the table under `passLock`.)
            // The least real-time priority above every VM's boosts.
            if realTime {
                let want = served.values.compactMap { $0.vm.enforcerPriority }.max()
                if want != priority, let want {
                    try? threads.setCurrentThread(.fifo(priority: want))
                    priority = want
                }
            }
            let full = now &- lastFullPass >= BudgetAlarm.idleNs
            if full { lastFullPass = now }
            var next: [UInt64: UInt64] = [:]
            passLock.withLock { _ in
                let current = table.withLock { $0.vms }
                for (id, s) in current {
                    let hint = s.vm.takeWakeHint()
                    guard full || min(s.nextNs, hint) <= now else {
                        if hint != .max { next[id] = min(s.nextNs, hint) }
                        continue
                    }
                    s.vm.enforceBudgets()
                    s.vm.announceDeadlines()
                    passes.add(1, ordering: .relaxed)
                    next[id] = s.vm.nextEnforcerWakeNs() ?? .max
                }
            }
            table.withLock { t in
                for (id, at) in next where t.vms[id] != nil { t.vms[id]!.nextNs = at }
            }
            // The earliest look any VM needs, read once the alarm is open to rings: a
            // VM that asks from now on either left its hint here or rings the alarm.
            alarm.sleep {
                table.withLock { t in
                    for id in t.vms.keys {
                        let hint = t.vms[id]!.vm.takeWakeHint()
                        if hint < t.vms[id]!.nextNs { t.vms[id]!.nextNs = hint }
                    }
                    let earliest = t.vms.values.map(\.nextNs).min() ?? .max
                    return earliest == .max ? nil : earliest
                }
            }
        }
    }

    deinit { thread.takeAndJoin() }
}
