import Synchronization

/// When to tell a VM's driver that a deadline its guest published is near: the host
/// side of "boost ahead of the guest's next real-time deadline", for every VM
/// whatever runs it (the built-in VMM, QEMU watched through its shared memory, a VM
/// fed from the host kernel's events).
///
/// Why the host needs it: a guest has one timer per vCPU. When a round-robin tick is
/// due before its real-time task's deadline, the tick is armed first, and the timer
/// for the deadline only once the guest has taken the tick. A vCPU thread preempted
/// by host work takes nothing, so the deadline passes with no interrupt and no event
/// (seen on rt+batch: 10 ms wake-ups, the vCPU starved the whole time).
///
/// The binding records the deadline of each line it reads, mapped to the host clock;
/// the VM's enforcer thread sleeps until the earliest one less `leadNs` and the
/// binding sends `deadline` for each one due, once. Guest input bounds the work: a
/// deadline already past when it is read is not announced (its timer interrupt is
/// due at once anyway), and announcements of one vCPU are at least `minSpacingNs`
/// apart, so a guest rewriting its deadline at every exit cannot make the enforcer
/// (a real-time thread) wake at the guest's pace.
public final class DeadlineSchedule: Sendable {
    /// The least time between two announcements for one vCPU.
    public static let minSpacingNs: UInt64 = 100_000
    /// The lead by default: about one guest timer interrupt's delivery on this host.
    public static let defaultLeadNs: UInt64 = 200_000
    /// The largest lead accepted (a larger one is clamped).
    public static let maxLeadNs: UInt64 = 100_000_000

    private struct Entry {
        /// The deadline as the guest published it (guest clock): what "the same
        /// deadline" means when it is read again.
        var guestNs: UInt64
        /// The deadline on the host clock, and when to announce it.
        var hostNs: UInt64
        var dueNs: UInt64
        var announced: Bool
    }
    /// One vCPU's deadline. Each vCPU has its own lock: a vCPU thread preempted while
    /// recording its deadline must not hold up another vCPU's (or the enforcer).
    private final class Slot: Sendable {
        let entry = Mutex<Entry?>(nil)
        let lastAnnouncedNs = Atomic<UInt64>(0)
    }
    private let slots: [Slot]
    private let lead: Atomic<UInt64>

    public init(vcpus: Int, leadNs: UInt64 = DeadlineSchedule.defaultLeadNs) {
        slots = (0..<max(0, vcpus)).map { _ in Slot() }
        lead = Atomic(min(leadNs, Self.maxLeadNs))
    }

    /// How long before a deadline it is announced (clamped to `maxLeadNs`); a change
    /// applies to deadlines recorded from then on.
    public var leadNs: UInt64 {
        get { lead.load(ordering: .relaxed) }
        set { lead.store(min(newValue, Self.maxLeadNs), ordering: .relaxed) }
    }

    /// Records what `vcpu`'s line says now: a deadline (guest clock, and the host time
    /// the binding maps it to, nil while the guest's clock is not known) or none.
    /// Returns when the deadline falls due if it is new and will be announced (the
    /// enforcer must be woken by then), nil otherwise.
    func record(vcpu: Int, guestNs: UInt64?, hostNs: UInt64?, now: UInt64) -> UInt64? {
        guard vcpu >= 0, vcpu < slots.count else { return nil }
        let slot = slots[vcpu]
        let leadNs = self.leadNs
        let last = slot.lastAnnouncedNs.load(ordering: .relaxed)
        return slot.entry.withLock { e in
            guard let guestNs, let hostNs else { e = nil; return nil }
            if let old = e, old.guestNs == guestNs { return nil }  // the same deadline, read again
            guard hostNs > now else { e = nil; return nil }       // already due: the guest's timer is
            let due = max(hostNs > leadNs ? hostNs - leadNs : 0, last &+ Self.minSpacingNs)
            guard due <= hostNs else { e = nil; return nil }      // too soon after the last announcement
            e = Entry(guestNs: guestNs, hostNs: hostNs, dueNs: due, announced: false)
            return due
        }
    }

    /// The deadlines due at `now`, each once: marks them announced and returns each
    /// vCPU with the time left until its deadline.
    func takeDue(now: UInt64) -> [(vcpu: Int, inNs: UInt64)] {
        var due: [(vcpu: Int, inNs: UInt64)] = []
        for (v, slot) in slots.enumerated() {
            let left: UInt64? = slot.entry.withLock { e in
                guard let entry = e, !entry.announced, entry.dueNs <= now else { return nil }
                e!.announced = true
                return entry.hostNs > now ? entry.hostNs - now : 0
            }
            if let left {
                slot.lastAnnouncedNs.store(now, ordering: .relaxed)
                due.append((v, left))
            }
        }
        return due
    }

    /// The earliest time a recorded deadline falls due; nil when none waits.
    public func nextDueNs() -> UInt64? {
        slots.compactMap { slot in slot.entry.withLock { e in e.flatMap { $0.announced ? nil : $0.dueNs } } }.min()
    }
}
