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
    /// One VM served.
    private struct Served {
        let id: UInt64
        let vm: any VMEnforcement
        /// Its `enforcerPriority`, fixed for a VM (its boost settings are).
        let priority: UInt8?
        /// When it needs its next look, as of its last pass or `relax`.
        var nextNs: UInt64 = 0
        /// An earlier look it asked for since (`need`), `.max` for none: kept apart
        /// from `nextNs`, so that a pass, which writes `nextNs` after it read the VM,
        /// cannot lose a look asked for meanwhile.
        var hintNs: UInt64 = .max
        var dueNs: UInt64 { min(nextNs, hintNs) }
    }
    /// The VMs served, in an array (a plan reads plain words, not one dictionary
    /// entry and one call per VM: at 64 VMs those were a tenth of the daemon's CPU).
    private struct Table {
        var served: [Served] = []
        var index: [ObjectIdentifier: Int] = [:]
        /// The highest of the VMs' priorities.
        var wantedPriority: UInt8?
        /// Whether the thread runs (it ends when the last VM is removed, and starts with the next).
        var running = false
        /// When the next full pass (every VM, counters republished) is due.
        var fullPassAt: UInt64 = 0

        /// The earliest look any VM needs.
        var earliest: UInt64 { served.reduce(UInt64.max) { min($0, $1.dueNs) } }

        mutating func remove(id: UInt64) {
            guard let i = served.firstIndex(where: { $0.id == id }) else { return }
            index.removeValue(forKey: ObjectIdentifier(served[i].vm))
            served.swapAt(i, served.count - 1)
            served.removeLast()
            if i < served.count { index[ObjectIdentifier(served[i].vm)] = i }
            wantedPriority = served.compactMap(\.priority).max()
        }

        mutating func add(_ vm: any VMEnforcement, id: UInt64) {
            remove(id: id)
            index[ObjectIdentifier(vm)] = served.count
            served.append(Served(id: id, vm: vm, priority: vm.enforcerPriority))
            wantedPriority = served.compactMap(\.priority).max()
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
            t.served[i].hintNs = min(t.served[i].hintNs, checkAtNs)
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
            if let i = t.index[key] { t.served[i].hintNs = .max }
        }
        let next = vm.nextEnforcerWakeNs() ?? .max
        let earliest: UInt64 = table.withLock { t in
            guard let i = t.index[key] else { return 0 }
            t.served[i].nextNs = next
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
                if t.served.isEmpty { t.running = false; return nil }
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
                    for i in t.served.indices where full || t.served[i].dueNs <= now &+ Self.slackNs {
                        t.served[i].hintNs = .max
                        due.append((t.served[i].id, t.served[i].vm))
                    }
                    return due
                }
                for (id, vm) in due {
                    vm.enforceBudgets()
                    vm.announceDeadlines(aheadNs: Self.slackNs)
                    passes.add(1, ordering: .relaxed)
                    let next = vm.nextEnforcerWakeNs() ?? .max
                    table.withLock { t in
                        if let i = t.index[ObjectIdentifier(vm)], t.served[i].id == id { t.served[i].nextNs = next }
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
