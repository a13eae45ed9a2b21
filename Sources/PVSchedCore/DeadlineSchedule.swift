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
/// The binding records the deadline of each line it reads, mapped to the host clock,
/// in the vCPU's lane (`DeadlineSlot`); the enforcer sleeps until the earliest one
/// less the VM's lead (`DeadlineLead`) and the binding sends `deadline` for each one
/// due, once. Guest input bounds the work: a
/// deadline already past when it is read is not announced (its timer interrupt is
/// due at once anyway), and announcements of one vCPU are at least `minSpacingNs`
/// apart, so a guest rewriting its deadline at every exit cannot make the enforcer
/// (a real-time thread) wake at the guest's pace.
public enum DeadlineSchedule {
    /// The least time between two announcements for one vCPU.
    public static let minSpacingNs: UInt64 = 100_000
    /// The lead by default: about one guest timer interrupt's delivery on this host.
    public static let defaultLeadNs: UInt64 = 200_000
    /// The largest lead accepted (a larger one is clamped).
    public static let maxLeadNs: UInt64 = 100_000_000
    /// The longest hold window accepted (`DeadlineLead.holdNs`).
    public static let maxHoldNs: UInt64 = 10_000_000
    /// An interrupt that wakes a vCPU whose boost is held more than this before or
    /// after the guest's deadline is for something else: the hold ends and the
    /// driver decides (the host kernel's events send such wake-ups at once).
    public static let heldEarlyNs: UInt64 = 300_000
}

/// A VM's deadline lead: how long before a published deadline it is announced
/// (clamped to `DeadlineSchedule.maxLeadNs`); a change applies to deadlines
/// recorded from then on. And its hold window (`holdNs`).
public final class DeadlineLead: Sendable {
    private let ns: Atomic<UInt64>
    private let hold = Atomic<UInt64>(0)
    public init(_ leadNs: UInt64 = DeadlineSchedule.defaultLeadNs) { ns = Atomic(min(leadNs, DeadlineSchedule.maxLeadNs)) }
    public var leadNs: UInt64 {
        get { ns.load(ordering: .relaxed) }
        set { ns.store(min(newValue, DeadlineSchedule.maxLeadNs), ordering: .relaxed) }
    }
    /// A boost the vCPU's halt would end is held through the halt when the guest's
    /// next deadline is at most this far off and the driver keeps a boost at that
    /// deadline (see `VCPULane.hold`); 0 (the default): never. It saves two changes
    /// of the thread, a wake-up of the enforcer and, with the host kernel's events,
    /// the daemon's wake-ups per period of a periodic guest; but the vCPU then wakes
    /// boosted for whatever it wakes for near its deadline, and the VMM's main loop
    /// does not follow a held boost (under QEMU's TCG, which delivers the guest's
    /// timers from the main loop, the guest's latency was worse with it).
    /// Clamped to `DeadlineSchedule.maxHoldNs`.
    public var holdNs: UInt64 {
        get { hold.load(ordering: .relaxed) }
        set { hold.store(min(newValue, DeadlineSchedule.maxHoldNs), ordering: .relaxed) }
    }
}

/// One vCPU's published deadline, a value its lane keeps (see `DeadlineSchedule`).
public struct DeadlineSlot: Equatable, Sendable {
    private struct Entry: Equatable {
        /// The deadline as the guest published it (guest clock): what "the same
        /// deadline" means when it is read again.
        var guestNs: UInt64
        /// The deadline on the host clock, and when to announce it.
        var hostNs: UInt64
        var dueNs: UInt64
        var announced: Bool
    }
    private var entry: Entry?
    private var lastAnnouncedNs: UInt64 = 0
    public init() {}

    /// Records what the vCPU's line says now: a deadline (guest clock, and the host
    /// time it maps to, nil while the guest's clock is not known) or none. Returns
    /// when the deadline falls due if it is new and will be announced (the enforcer
    /// must be woken by then), nil otherwise.
    public mutating func record(guestNs: UInt64?, hostNs: UInt64?, now: UInt64, leadNs: UInt64) -> UInt64? {
        guard let guestNs, let hostNs else { entry = nil; return nil }
        if let old = entry, old.guestNs == guestNs { return nil }  // the same deadline, read again
        guard hostNs > now else { entry = nil; return nil }        // already due: the guest's timer is
        let due = max(hostNs > leadNs ? hostNs - leadNs : 0, lastAnnouncedNs &+ DeadlineSchedule.minSpacingNs)
        guard due <= hostNs else { entry = nil; return nil }       // too soon after the last announcement
        entry = Entry(guestNs: guestNs, hostNs: hostNs, dueNs: due, announced: false)
        return due
    }

    /// If the deadline is due at `now`, marks it announced (once) and returns the time
    /// left until it.
    public mutating func takeDue(now: UInt64, aheadNs: UInt64 = 0) -> UInt64? {
        guard let e = entry, !e.announced, e.dueNs <= now &+ aheadNs else { return nil }
        entry!.announced = true
        lastAnnouncedNs = now
        return e.hostNs > now ? e.hostNs - now : 0
    }

    /// The time left until the recorded deadline, announced or not, if it is at most
    /// `withinNs` off (nil otherwise).
    public func ahead(now: UInt64, withinNs: UInt64) -> UInt64? {
        guard let e = entry, e.hostNs > now, e.hostNs - now <= withinNs else { return nil }
        return e.hostNs - now
    }

    /// The recorded deadline on the host clock, announced or not (nil: none).
    public var hostNs: UInt64? { entry?.hostNs }

    /// Marks the recorded deadline announced: what it would start is in place already.
    public mutating func settle(now: UInt64) {
        guard entry != nil, !entry!.announced else { return }
        entry!.announced = true
        lastAnnouncedNs = now
    }

    /// When the recorded deadline falls due; nil when none waits.
    public var nextDueNs: UInt64? { entry.flatMap { $0.announced ? nil : $0.dueNs } }
}
