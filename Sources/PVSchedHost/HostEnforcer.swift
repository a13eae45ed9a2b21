import PVSchedCore
import PVSchedLinux
import Synchronization

/// The host's budget enforcer: one real-time thread for every VM (not one per VM),
/// that cuts boosts past their budget, ends repayments that are due and announces
/// deadlines that are near, whether or not any event comes (see `VMEnforcement`).
///
/// It sleeps on a `WakeTimer` until the earliest look any VM needs (each VM's next
/// look is cached; only the VMs that are due, or that asked for a look since, are
/// taken), and at most `BudgetAlarm.idleNs` (every VM's counters are republished
/// then). A VM asks through the enforcer's `EnforcerAlarm` side: a boost that could
/// spend its budget moves the timer earlier without waking the thread, and a boost
/// that ended moves it back, so that the thread wakes only when a look is due. It
/// runs at the least real-time priority that preempts the boosts of every VM it
/// serves (`VMEnforcement.enforcerPriority`), never higher.
public final class HostEnforcer: EnforcerAlarm, Sendable {
    private struct Served {
        let vm: any VMEnforcement
        var nextNs: UInt64
    }
    private struct Table {
        var vms: [UInt64: Served] = [:]
        var ids: [ObjectIdentifier: UInt64] = [:]
        /// Whether the thread runs (it ends when the last VM is removed, and starts with the next).
        var running = false
        /// When the next full pass (every VM, counters republished) is due.
        var fullPassAt: UInt64 = 0
    }
    private let table = Mutex(Table())
    private let thread = Mutex<PVSchedCore.Thread?>(nil)
    private let timer: WakeTimer
    private let threads: any ThreadControl
    private let realTime: Bool
    private let passes = Atomic<UInt64>(0)
    /// A look due this soon after a wake-up is taken in it (one wake-up serves
    /// several VMs); deadlines are then announced at most this much earlier.
    static let slackNs: UInt64 = 50_000
    /// Held while the enforcer passes over VMs (so that `remove` can wait it out).
    private let passLock = Mutex(())

    /// `realTime`: whether this process may run the enforcer real-time.
    public init(threads: any ThreadControl, realTime: Bool) throws(ThreadError) {
        self.threads = threads
        self.realTime = realTime
        timer = try WakeTimer()
    }

    /// Starts enforcing `vm` (as VM `id`); the thread starts with the first VM.
    public func add(_ vm: any VMEnforcement, id: UInt64) throws(ThreadError) {
        let start = table.withLock { t in
            t.vms[id] = Served(vm: vm, nextNs: 0)
            t.ids[ObjectIdentifier(vm)] = id
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
                    t.ids.removeValue(forKey: ObjectIdentifier(vm))
                    t.running = false
                }
                throw error
            }
        }
        timer.wakeNow()
    }

    /// Stops enforcing VM `id`; no pass over it runs after this returns. The
    /// thread ends with the last VM.
    public func remove(id: UInt64) {
        table.withLock { t in
            if let s = t.vms.removeValue(forKey: id) { t.ids.removeValue(forKey: ObjectIdentifier(s.vm)) }
        }
        timer.wakeNow()
        passLock.withLock { _ in }
    }

    /// Passes over a VM and wake-ups of the thread (the scale benchmark reads them).
    public var passCount: UInt64 { passes.load(ordering: .relaxed) }
    public var wakeUps: UInt64 { timer.wakeUps }

    // MARK: EnforcerAlarm

    public func need(checkAtNs: UInt64) { timer.wake(by: checkAtNs) }

    public func relax(_ vm: any VMEnforcement) {
        // The VM's hints so far are in its state, read below: dropped, or the look
        // the boost that ended asked for would wake the enforcer for nothing. A hint
        // given from here on is the VM's state after this read, and is kept.
        _ = vm.takeWakeHint()
        let next = vm.nextEnforcerWakeNs() ?? .max
        let earliest: UInt64 = table.withLock { t in
            guard let id = t.ids[ObjectIdentifier(vm)] else { return 0 }
            t.vms[id]!.nextNs = next
            return min(foldHints(&t), t.fullPassAt)
        }
        if earliest != 0 { timer.postpone(to: earliest) }
    }

    /// Folds every VM's asked-for look into its cached next look; the earliest of them.
    private func foldHints(_ t: inout Table) -> UInt64 {
        var earliest = UInt64.max
        for id in t.vms.keys {
            let hint = t.vms[id]!.vm.takeWakeHint()
            if hint < t.vms[id]!.nextNs { t.vms[id]!.nextNs = hint }
            earliest = min(earliest, t.vms[id]!.nextNs)
        }
        return earliest
    }

    // MARK: the thread

    private func run() {
        var priority: UInt8?
        var lastFullPass: UInt64 = 0
        while true {
            let now = MonotonicClock.nowNs()
            let served: [UInt64: Served]? = table.withLock { t in
                if t.vms.isEmpty { t.running = false; return nil }
                _ = foldHints(&t)
                return t.vms
            }
            guard let served else { return }
            // The least real-time priority above every VM's boosts.
            if realTime {
                let want = served.values.compactMap { $0.vm.enforcerPriority }.max()
                if want != priority, let want {
                    try? threads.setCurrentThread(.fifo(priority: want))
                    priority = want
                }
            }
            let full = now &- lastFullPass >= BudgetAlarm.idleNs
            if full {
                lastFullPass = now
                table.withLock { $0.fullPassAt = now &+ BudgetAlarm.idleNs }
            }
            var next: [UInt64: UInt64] = [:]
            passLock.withLock { _ in
                // Re-read under the pass lock: a VM removed meanwhile is not passed over.
                let current = table.withLock { $0.vms }
                // Looks due within `slackNs` are taken now, in the same wake-up.
                for (id, s) in current where full || s.nextNs <= now &+ Self.slackNs {
                    s.vm.enforceBudgets()
                    s.vm.announceDeadlines(aheadNs: Self.slackNs)
                    passes.add(1, ordering: .relaxed)
                    next[id] = s.vm.nextEnforcerWakeNs() ?? .max
                }
            }
            table.withLock { t in
                // A look asked for during the pass is a hint still: folded in below.
                for (id, at) in next where t.vms[id] != nil { t.vms[id]!.nextNs = at }
            }
            // The earliest look any VM needs, read once the timer is open to others: a
            // VM that asks from now on either left its hint here or moves the timer.
            timer.sleep(maxNs: BudgetAlarm.idleNs) {
                let earliest = table.withLock { foldHints(&$0) }
                return earliest == .max ? nil : earliest
            }
        }
    }

    deinit { thread.takeAndJoin() }
}
