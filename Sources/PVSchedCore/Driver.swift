/// What a driver wants done with a vCPU's thread after an event.
public enum Decision: Equatable, Sendable {
    /// Leave the thread as it is.
    case none
    /// Run the thread real-time (at the binding's boost priority, or `priority`
    /// if given, capped by the binding's maximum).
    case boost(priority: UInt8? = nil)
    /// Give the thread back its original parameters.
    case unboost
}

/// Everything a driver may look at when it decides: the guest's shared state
/// for the vCPU (if the guest registered an area) and the host's state of it.
public struct VCPUView: Equatable, Sendable {
    public var vcpu: Int
    /// The guest's latest consistent snapshot, or nil if the guest has no area.
    public var guest: GuestVCPUState?
    /// Whether the vCPU thread is boosted now.
    public var boosted: Bool
    /// Host monotonic time when the current boost began (if boosted).
    public var boostedSinceNs: UInt64?
    /// Host monotonic time of the event.
    public var nowNs: UInt64
    /// The vectors injected since the vCPU last entered the guest able to take them
    /// (so the guest has not seen them yet: its shared state is older than they are).
    public var pendingVectors: InterruptVectors
    /// An interrupt was injected and the guest has not taken it yet.
    public var interruptPending: Bool { !pendingVectors.isEmpty }
    /// The guest's clock now, estimated from the host's (nil until the binding has
    /// seen a fresh line): what a published deadline is compared with.
    public var guestNowNs: UInt64?

    public init(vcpu: Int, guest: GuestVCPUState?, boosted: Bool, boostedSinceNs: UInt64? = nil, nowNs: UInt64,
                pendingVectors: InterruptVectors = [], guestNowNs: UInt64? = nil) {
        self.vcpu = vcpu; self.guest = guest; self.boosted = boosted
        self.boostedSinceNs = boostedSinceNs; self.nowNs = nowNs; self.pendingVectors = pendingVectors
        self.guestNowNs = guestNowNs
    }

    /// How far the guest's next published deadline is from the guest's now (negative:
    /// overdue); nil when there is none or the guest's clock is not known yet.
    public var deadlineInNs: Int64? {
        guard let d = guest?.nextDeadlineNs, let now = guestNowNs, d < UInt64(Int64.max), now < UInt64(Int64.max) else { return nil }
        return Int64(d) - Int64(now)
    }

    /// How long the current boost has lasted.
    public var boostedForNs: UInt64 {
        guard let since = boostedSinceNs, nowNs > since else { return 0 }
        return nowNs - since
    }
}

/// A pvsched driver: a named scheduling policy that turns vCPU events and the
/// guest's shared state into decisions. Drivers are registered by name in a
/// `DriverRegistry`, implement one guest protocol at one version, and see only
/// the core library's types, so the same driver runs under the real VMM, a BPF
/// adapter, the kernel event path of an attached VM, or a simulator.
///
/// ## The contract (in the style of sched_ext's `struct sched_ext_ops`)
///
/// **Calling context.** `decide` is called on the thread that produced the event:
/// the vCPU's own thread for `vmEntry`, `vmExit` and `halt`; a device thread (the
/// built-in VMM's timer or interrupt source) or the kernel-event consumer thread
/// (attached VMs) for `interruptInjection`; an attached VM's watcher thread for
/// `guestUpdate` and `deadline`. `attach` and `detach` are called on
/// the control thread that assigns or replaces the driver (a CLI request, VM
/// start or stop), never concurrently with each other for the same VM.
///
/// **Locking.** `decide` runs while the binding holds that vCPU's lock, and a
/// vCPU thread may be waiting on it: it must not block, sleep, take locks that
/// the control plane holds for long, or call back into the binding or the
/// registry (re-entry deadlocks). It should be a pure function of its arguments;
/// counters it keeps must be atomics. Different vCPUs of one VM call it
/// concurrently.
///
/// **Pairing.** For each vCPU, `attach` is called once before the first `decide`
/// and `detach` once after the last, when the driver is replaced, unassigned,
/// ejected or the VM stops. A `decide` that raced a replacement is discarded (a
/// generation counter), so no decision of a detached driver is ever applied; its
/// boosts are undone before the new driver's `attach`.
///
/// **Event order.** Per vCPU: `vmEntry` before the vCPU enters the guest (with the
/// host's notion of an interrupt still pending), then for each exit `vmExit(reason)`
/// after the VMM handled the exit's I/O, followed by `halt` when the exit was a halt
/// that blocks the vCPU. `interruptInjection` arrives from another thread at any
/// point, always before the vCPU is woken or kicked for that interrupt. An attached
/// VM's events come from the host kernel in the same order, but on one consumer
/// thread and later (see `KernelEventSource`). A VM whose exits the host does not
/// see (QEMU under TCG) gets `guestUpdate` and `deadline` from its watcher thread
/// instead, in the order the watcher saw the guest's lines change (see
/// `GuestAreaWatcher`); those two may also arrive alongside kernel events.
///
/// **Failure.** A driver that cannot decide returns `.none` and counts the failure in
/// `failedDecisions`; after `VMBinding.failureLimit` failures in a row on one vCPU
/// the driver is ejected from the VM (back to the default driver), with the reason
/// recorded.
public protocol Driver: AnyObject, Sendable {
    /// The unique registry name.
    var name: String { get }
    /// The guest protocol this driver understands.
    var protocolName: String { get }
    var protocolVersion: ProtocolVersion { get }
    /// The events the driver is called for; it is never called for others.
    var events: EventMask { get }
    /// Called when the driver starts serving a vCPU (assignment or replacement),
    /// on the control thread, before any `decide` for that vCPU.
    func attach(vcpu: VCPUHandle)
    /// Called when the driver stops serving a vCPU, after its last `decide`.
    func detach(vcpu: VCPUHandle)
    /// The policy: a pure function of the event and the view. Runs under the
    /// vCPU's lock: must not block or re-enter the binding.
    func decide(event: VCPUEvent, view: VCPUView) -> Decision
    /// Decisions that failed so far (a BPF program that faulted or ran out of
    /// budget decides nothing). A driver that keeps failing is ejected from a VM.
    var failedDecisions: UInt64 { get }
}

extension Driver {
    public func attach(vcpu: VCPUHandle) {}
    public func detach(vcpu: VCPUHandle) {}
    public var failedDecisions: UInt64 { 0 }
}
