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
    /// The VMs served, in arrays (a pass and a plan read plain words, not one
    /// dictionary entry and one call per VM: at 64 VMs those were a tenth of the
    /// daemon's CPU).
    private struct Table {
        var ids: [UInt64] = []
        var vms: [any VMEnforcement] = []
        /// When each VM needs its next look, as of its last pass or `relax`.
        var nextNs: [UInt64] = []
        /// An earlier look each VM asked for since (`need`), `.max` for none: kept
        /// apart from `nextNs`, so that a pass, which writes `nextNs` after it read the
        /// VM, cannot lose a look asked for meanwhile.
        var hintNs: [UInt64] = []
        var index: [ObjectIdentifier: Int] = [:]
        /// Each VM's `enforcerPriority` (fixed for a VM: its boost settings are), and
        /// the highest of them.
        var priorities: [UInt8?] = []
        var wantedPriority: UInt8?
        /// Whether the thread runs (it ends when the last VM is removed, and starts with the next).
        var running = false
        /// When the next full pass (every VM, counters republished) is due.
        var fullPassAt: UInt64 = 0

        /// The earliest look any VM needs.
        var earliest: UInt64 {
            var e = UInt64.max
            for i in nextNs.indices { e = min(e, nextNs[i], hintNs[i]) }
            return e
        }

        mutating func remove(id: UInt64) {
            guard let i = ids.firstIndex(of: id) else { return }
            index.removeValue(forKey: ObjectIdentifier(vms[i]))
            let last = ids.count - 1
            if i != last {
                ids.swapAt(i, last); vms.swapAt(i, last); nextNs.swapAt(i, last); hintNs.swapAt(i, last)
                priorities.swapAt(i, last)
                index[ObjectIdentifier(vms[i])] = i
            }
            ids.removeLast(); vms.removeLast(); nextNs.removeLast(); hintNs.removeLast(); priorities.removeLast()
            wantedPriority = priorities.compactMap { $0 }.max()
        }

        mutating func add(_ vm: any VMEnforcement, id: UInt64) {
            remove(id: id)
            index[ObjectIdentifier(vm)] = ids.count
            ids.append(id); vms.append(vm); nextNs.append(0); hintNs.append(.max)
            priorities.append(vm.enforcerPriority)
            wantedPriority = priorities.compactMap { $0 }.max()
        }
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
            t.add(vm, id: id)
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
                    t.remove(id: id)
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
        table.withLock { $0.remove(id: id) }
        timer.wakeNow()
        passLock.withLock { _ in }
    }

    /// Passes over a VM and wake-ups of the thread (the scale benchmark reads them).
    public var passCount: UInt64 { passes.load(ordering: .relaxed) }
    public var wakeUps: UInt64 { timer.wakeUps }

    // MARK: EnforcerAlarm

    public func need(_ vm: any VMEnforcement, checkAtNs: UInt64) {
        table.withLock { t in
            guard let i = t.index[ObjectIdentifier(vm)] else { return }
            t.hintNs[i] = min(t.hintNs[i], checkAtNs)
        }
        timer.wake(by: checkAtNs)
    }

    public func relax(_ vm: any VMEnforcement) {
        // The looks the VM asked for so far are in its state, read below: dropped, or
        // the look a boost that ended asked for would wake the enforcer for nothing.
        // A look asked for from here on comes from the VM's state after this read,
        // and is kept.
        let key = ObjectIdentifier(vm)
        table.withLock { t in
            if let i = t.index[key] { t.hintNs[i] = .max }
        }
        let next = vm.nextEnforcerWakeNs() ?? .max
        let earliest: UInt64 = table.withLock { t in
            guard let i = t.index[key] else { return 0 }
            t.nextNs[i] = next
            return min(t.earliest, t.fullPassAt)
        }
        if earliest != 0 { timer.postpone(to: earliest) }
    }

    // MARK: the thread

    private func run() {
        var priority: UInt8?
        var lastFullPass: UInt64 = 0
        while true {
            let now = MonotonicClock.nowNs()
            guard let wanted: UInt8? = table.withLock({ t -> UInt8?? in
                if t.vms.isEmpty { t.running = false; return nil }
                return .some(t.wantedPriority)
            }) else { return }
            // The least real-time priority above every VM's boosts.
            if realTime, let want = wanted, want != priority {
                try? threads.setCurrentThread(.fifo(priority: want))
                priority = want
            }
            let full = now &- lastFullPass >= BudgetAlarm.idleNs
            if full {
                lastFullPass = now
                table.withLock { $0.fullPassAt = now &+ BudgetAlarm.idleNs }
            }
            passLock.withLock { _ in
                // Taken under the pass lock: a VM removed meanwhile is not passed over.
                // Looks due within `slackNs` are taken now, in the same wake-up; the
                // hints of the VMs taken are in the state they are read in.
                let due: [(UInt64, any VMEnforcement)] = table.withLock { t in
                    var due: [(UInt64, any VMEnforcement)] = []
                    for i in t.ids.indices where full || min(t.nextNs[i], t.hintNs[i]) <= now &+ Self.slackNs {
                        t.hintNs[i] = .max
                        due.append((t.ids[i], t.vms[i]))
                    }
                    return due
                }
                for (id, vm) in due {
                    vm.enforceBudgets()
                    vm.announceDeadlines(aheadNs: Self.slackNs)
                    passes.add(1, ordering: .relaxed)
                    let next = vm.nextEnforcerWakeNs() ?? .max
                    table.withLock { t in
                        if let i = t.index[ObjectIdentifier(vm)], t.ids[i] == id { t.nextNs[i] = next }
                    }
                }
            }
            // The earliest look any VM needs, read once the timer is open to others: a
            // VM that asks from now on either left its hint here or moves the timer.
            timer.sleep(maxNs: BudgetAlarm.idleNs) {
                let earliest = table.withLock { $0.earliest }
                return earliest == .max ? nil : earliest
            }
        }
    }

    deinit { thread.takeAndJoin() }
}
