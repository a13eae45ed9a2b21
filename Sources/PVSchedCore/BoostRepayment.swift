/// A boost is a loan, and the vCPU repays it: one vCPU's ledger.
///
/// While boosted, a vCPU thread that would otherwise wait its turn (a vCPU running
/// batch work beside busy host threads) runs at once, on CPU time the host's threads
/// would have had. Left at that, the host pays for the guest's latency: in the demo's
/// rt+batch, boosts of about a millisecond every 5 ms cost the host's busy threads
/// 10-12% of their work. So after a boost in which the thread ran `B` of CPU time, it
/// runs at its own class at the least weight (nice 19) for `factor × B`, then at its
/// own parameters again.
///
/// The factor is the number of busy threads the vCPU's CPU is shared with: a thread
/// with a share `1/(f+1)` of its CPU took `B − B/(f+1)` more than its share, and gives
/// that back by running next to nothing for `f × B`. A vCPU that goes idle (most
/// latency-sensitive guests, after their work) wanted no more than it had and owes
/// nothing: the binding repays no boost that ends in a halt, and a halt ends a
/// repayment. The thread's own share cannot be measured from its run-queue times
/// between boosts (EEVDF serves a CPU-bound thread in slices as long as those windows,
/// whatever the competition: windows of 4 ms read a share of 1/2 beside 1, 2 or 4 busy
/// threads), so the factor is a setting.
///
/// A boost that comes during a repayment ends it first (latency wins); what is left
/// is added to the next repayment, up to `maxNs`.
struct RepaymentLedger: Sendable {
    /// The thread's CPU time when the running boost began.
    private var boostStartCPUNs: UInt64?
    /// When the repayment in progress ends.
    private(set) var repayingUntilNs: UInt64?
    /// Repayment time left over from repayments a boost cut short.
    private(set) var owedNs: UInt64 = 0

    /// Repayments shorter than this are not worth two system calls.
    static let minRepaymentNs: UInt64 = 50_000

    var isRepaying: Bool { repayingUntilNs != nil }

    /// A boost begins, the thread's CPU clock at `cpuNs` (nil: none, nothing is owed
    /// for it). A repayment in progress must have been ended (`repaymentCut`).
    mutating func boostBegan(cpuNs: UInt64?) { boostStartCPUNs = cpuNs }

    /// A boost came at `now` while the thread was repaying: the rest is owed.
    mutating func repaymentCut(now: UInt64, maxNs: UInt64) {
        if let until = repayingUntilNs, until > now { owedNs = min(maxNs, owedNs &+ (until - now)) }
        repayingUntilNs = nil
    }

    /// The boost ended at `now`, the thread's CPU clock at `cpuNs`: how long it must
    /// repay (nil: nothing worth repaying), which the ledger then records as in
    /// progress. `factor` 0 repays nothing (and forgives what was owed).
    mutating func boostEnded(cpuNs: UInt64?, now: UInt64, factor: Double, maxNs: UInt64) -> UInt64? {
        defer { boostStartCPUNs = nil }
        guard factor > 0, factor.isFinite else { owedNs = 0; return nil }
        var ran: UInt64 = 0
        if let start = boostStartCPUNs, let cpuNs, cpuNs > start { ran = cpuNs - start }
        let ns = UInt64(min(Double(maxNs), Double(owedNs) + factor * Double(ran)))
        guard ns >= Self.minRepaymentNs else { return nil }
        owedNs = 0
        repayingUntilNs = now &+ ns
        return ns
    }

    /// The repayment is over (served, or undone): back at the thread's own parameters.
    mutating func repaymentEnded() { repayingUntilNs = nil }

    /// Forgets the boost and all that is owed: another thread runs the vCPU now (or
    /// none), the vCPU went idle, or the boost was undone.
    mutating func reset() { self = RepaymentLedger() }
}
