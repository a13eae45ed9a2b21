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
    private struct State {
        var entries: [Entry?]
        var lastAnnouncedNs: [UInt64]
        var leadNs: UInt64
    }
    private let state: Mutex<State>

    public init(vcpus: Int, leadNs: UInt64 = DeadlineSchedule.defaultLeadNs) {
        state = Mutex(State(entries: Array(repeating: nil, count: vcpus), lastAnnouncedNs: Array(repeating: 0, count: vcpus),
                            leadNs: min(leadNs, Self.maxLeadNs)))
    }

    /// How long before a deadline it is announced (clamped to `maxLeadNs`); a change
    /// applies to deadlines recorded from then on.
    public var leadNs: UInt64 {
        get { state.withLock { $0.leadNs } }
        set { state.withLock { $0.leadNs = min(newValue, Self.maxLeadNs) } }
    }

    /// Records what `vcpu`'s line says now: a deadline (guest clock, and the host time
    /// the binding maps it to, nil while the guest's clock is not known) or none.
    /// Returns when the deadline falls due if it is new and will be announced (the
    /// enforcer must be woken by then), nil otherwise.
    func record(vcpu: Int, guestNs: UInt64?, hostNs: UInt64?, now: UInt64) -> UInt64? {
        state.withLock { s in
            guard vcpu >= 0, vcpu < s.entries.count else { return nil }
            guard let guestNs, let hostNs else { s.entries[vcpu] = nil; return nil }
            if let e = s.entries[vcpu], e.guestNs == guestNs { return nil }  // the same deadline, read again
            guard hostNs > now else { s.entries[vcpu] = nil; return nil }    // already due: the guest's timer is
            let due = max(hostNs > s.leadNs ? hostNs - s.leadNs : 0, s.lastAnnouncedNs[vcpu] &+ Self.minSpacingNs)
            guard due <= hostNs else { s.entries[vcpu] = nil; return nil }   // too soon after the last announcement
            s.entries[vcpu] = Entry(guestNs: guestNs, hostNs: hostNs, dueNs: due, announced: false)
            return due
        }
    }

    /// The deadlines due at `now`, each once: marks them announced and returns each
    /// vCPU with the time left until its deadline.
    func takeDue(now: UInt64) -> [(vcpu: Int, inNs: UInt64)] {
        state.withLock { s in
            var due: [(vcpu: Int, inNs: UInt64)] = []
            for v in s.entries.indices {
                guard let e = s.entries[v], !e.announced, e.dueNs <= now else { continue }
                s.entries[v]!.announced = true
                s.lastAnnouncedNs[v] = now
                due.append((v, e.hostNs > now ? e.hostNs - now : 0))
            }
            return due
        }
    }

    /// The earliest time a recorded deadline falls due; nil when none waits.
    public func nextDueNs() -> UInt64? {
        state.withLock { s in s.entries.compactMap { e in e.flatMap { $0.announced ? nil : $0.dueNs } }.min() }
    }
}
