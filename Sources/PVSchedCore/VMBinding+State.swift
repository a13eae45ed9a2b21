import Logging
import Synchronization

/// The binding's VM-wide state and its control-plane side: the driver and area,
/// the vCPU threads, the governor's limits, the companions, the counters.
extension VMBinding {
    /// The driver serving this VM now.
    public var driver: (any Driver)? { slot.withLock { $0.driver } }
    /// The validated shared area the guest registered, if any.
    public var area: SharedArea? { slot.withLock { $0.area } }
    /// Why pvsched was disabled for this VM (a bad shared area, or its memory gone), if it was.
    public var disabledReason: SharedAreaError? { slot.withLock { $0.disabledReason } }
    /// The result of the guest's last registration.
    public var negotiation: NegotiationStatus { slot.withLock { $0.negotiation } }
    /// Why a driver was last ejected from this VM, if one was.
    public var ejection: String? { slot.withLock { $0.ejection } }
    /// Refused registrations by reason (`AreaRefusal.reason`).
    public var refusalCounts: [String: UInt64] { slot.withLock { $0.refusals } }

    /// Records an ejection (the registry calls this once it has replaced the driver).
    public func recordEjection(_ text: String) { slot.withLock { $0.ejection = text } }
    /// Records the result of a registration (the registrar calls this).
    public func recordNegotiation(_ status: NegotiationStatus) { slot.withLock { $0.negotiation = status } }
    /// Records a refused registration and counts it by reason.
    public func recordRefusal(_ refusal: AreaRefusal) {
        slot.withLock { s in
            s.negotiation = .refused(refusal.message)
            s.refusals[refusal.reason, default: 0] &+= 1
        }
    }

    /// Changes the slot and publishes what `notify` reads of it.
    func changeSlot<T>(_ body: (inout Slot) -> T) -> T {
        slot.withLock { s in
            let result = body(&s)
            dispatch.store(Dispatch(s), ordering: .releasing)
            return result
        }
    }

    /// Undoes `vcpu`'s boost or repayment with nothing owed (after `also`, under the same lock).
    func undo(vcpu: Int, now: UInt64, also: (inout VCPULane) -> Void = { _ in }) {
        lanes[vcpu].state.withLock { s in
            also(&s)
            let ctx = context(s, now: now)
            var step = s.undo(ctx)
            let changed = !step.actuations.isEmpty
            carry(&step, &s, vcpu: vcpu, ctx)
            if changed { publishStats(&s, vcpu: vcpu, now: now) }
        }
    }

    /// Installs the guest's validated area (after the VMM checked it lies in guest RAM).
    /// Dropping the area (the guest withdrew it) undoes every boost: there is
    /// nothing left to decide on.
    public func setArea(_ area: SharedArea?) {
        let hadArea: Bool = changeSlot { s in
            let had = s.area != nil
            s.area = area
            if area != nil { s.disabledReason = nil }
            return had
        }
        if let area { publishAll(area) }
        else if hadArea {
            let now = clock.nowNs()
            for i in lanes.indices { undo(vcpu: i, now: now) }
        }
    }

    /// Replaces the driver: detaches the old one from every vCPU and undoes its
    /// boosts, then attaches the new one. Returns the old driver.
    @discardableResult
    func install(_ driver: (any Driver)?) -> (any Driver)? {
        let (old, generation): ((any Driver)?, UInt64) = changeSlot { s in
            let old = s.driver
            s.driver = driver
            s.generation &+= 1
            return (old, s.generation)
        }
        let now = clock.nowNs()
        for i in lanes.indices {
            let handle = VCPUHandle(vm: vm, index: i)
            // The new driver is attached before the vCPU accepts its decisions (until
            // the generation below is set, notify refuses both drivers); the old one
            // is detached after its last decision (an in-flight one holds the lock).
            driver?.attach(vcpu: handle)
            undo(vcpu: i, now: now) { s in
                s.attachedGeneration = generation
                s.failureStreak = 0
            }
            old?.detach(vcpu: handle)
        }
        if let area { publishAll(area) }
        return old
    }

    /// Disables pvsched for the VM after a bad read (or when the memory behind its
    /// area went away): drops the area and undoes every boost.
    public func disable(_ error: SharedAreaError) {
        let first: Bool = changeSlot { s in
            guard s.area != nil || (s.disabledReason == nil && !error.isReadError) else { return false }
            s.area = nil
            s.disabledReason = error
            return true
        }
        guard first else { return }
        logger.error("pvsched disabled for VM: invalid shared area", metadata: ["vm": "\(vm)", "error": "\(error)"])
        let now = clock.nowNs()
        for i in lanes.indices { undo(vcpu: i, now: now) }
    }

    // MARK: threads

    /// The OS thread of each vCPU (nil while it has none).
    public var threads: [ThreadID?] { lanes.map { l in l.state.withLock { $0.thread } } }

    /// Records the OS thread that runs `vcpu` (call from that thread when it starts).
    public func setThread(_ thread: ThreadID?, vcpu: Int) {
        var ownership = ThreadOwnership.pvsched
        var thread = thread
        if let t = thread, t != lanes[vcpu].state.withLock({ $0.thread }) {
            do { try actuator.adopt(t, allowRealTime: boost.allowRealTimeThreads) } catch {
                if case .realTimeAtAttach = error.kind { ownership = .refusedRealTime }
                if case .threadGone = error.kind { ownership = .gone; thread = nil }
                logger.warning("vCPU thread not managed", metadata: ["vm": "\(vm)", "vcpu": "\(vcpu)", "error": "\(error)"])
            }
        }
        let now = clock.nowNs()
        let old: ThreadID? = lanes[vcpu].state.withLock { s in
            let ctx = context(s, now: now)
            var (old, step) = s.replaceThread(thread, ownership: ownership, ctx)
            carry(&step, &s, vcpu: vcpu, ctx)
            lanes[vcpu].repaymentEnd.store(0, ordering: .relaxed)
            return old
        }
        if let old { actuator.release(old) }
    }

    /// Drops the vCPU threads that exited (a boosted one among them: no event need
    /// come for it to go); whoever feeds the VM calls this now and then (attached
    /// VMs: every second). Returns the vCPUs whose thread was dropped.
    @discardableResult
    public func dropExitedThreads() -> [Int] {
        var dropped: [Int] = []
        let now = clock.nowNs()
        for (i, lane) in lanes.enumerated() {
            guard let t = lane.state.withLock({ $0.thread }), actuator.hasExited(t) else { continue }
            lane.state.withLock { s in
                guard s.thread == t else { return }
                let ctx = context(s, now: now)
                var step = s.threadExited(ctx)
                carry(&step, &s, vcpu: i, ctx)
                publishStats(&s, vcpu: i, now: now)
            }
            dropped.append(i)
        }
        return dropped
    }

    // MARK: companions

    /// Sets the VM's interrupt-delivery threads (see `Companions`); the old ones are restored.
    public func setCompanionThreads(_ threads: [ThreadID]) {
        let (old, apply): ([ThreadID], SchedulingParameters?) = companions.withLock { c in
            let old = c.threads.filter { !threads.contains($0) }
            c.threads = threads
            return (old, c.applied)
        }
        for t in old { try? actuator.restore(t) }
        if let apply { for t in threads { try? actuator.apply(apply, to: t) } }
    }

    /// The VM's interrupt-delivery threads.
    public var companionThreads: [ThreadID] { companions.withLock { $0.threads } }

    /// `delta` more (or fewer) vCPUs are boosted: boosts the companions on the first,
    /// restores them after the last. Called under a vCPU's lock.
    func companionsFollow(boostedVCPUs delta: Int, parameters: SchedulingParameters) {
        companions.withLock { c in
            c.boostedVCPUs = max(0, c.boostedVCPUs + delta)
            guard !c.threads.isEmpty else { return }
            if c.boostedVCPUs > 0, c.applied == nil {
                let p = boost.companionParameters(for: parameters)
                for t in c.threads { try? actuator.apply(p, to: t) }
                c.applied = p
            } else if c.boostedVCPUs == 0, c.applied != nil {
                for t in c.threads { try? actuator.restore(t) }
                c.applied = nil
            }
        }
    }

    // MARK: the governor

    /// Replaces the VM's limits; budgets larger than the new sizes are trimmed, and a
    /// running boost that could now run out sooner wakes the enforcer.
    public func updateGovernor(_ config: GovernorConfig) {
        governor.set(config)
        for lane in lanes {
            lane.state.withLock { s in
                s.budget.trim(to: config)
                if let at = s.budget.nextCheckNs(config, governor.share) { needCheck(at: at) }
            }
        }
    }

    // MARK: counters

    /// Counters of `vcpu` as last published for the control plane: every boost and
    /// unboost at once, other counts at most ~100 ms old while the VM runs (events and
    /// the enforcer republish), and read without touching the vCPU's own lock, so that
    /// any number of readers cost its thread nothing.
    public func publishedStats(vcpu: Int) -> VCPUStats { lanes[vcpu].published.withLock { $0 } }

    /// Publishes the lane's counters unless a reader holds the copy right now (the
    /// next publish catches up). Call under the vCPU's lock.
    func publishStats(_ s: inout VCPULane, vcpu: Int, now: UInt64) {
        var snapshot = s.stats
        snapshot.boosted = s.isBoosted
        snapshot.repaying = s.isRepaying
        if lanes[vcpu].published.withLockIfAvailable({ $0 = snapshot }) != nil { s.publishedAtNs = now }
    }

    /// Exact counters of `vcpu` (takes the vCPU's lock); `boostedNs` includes the
    /// running boost so far.
    public func stats(vcpu: Int) -> VCPUStats {
        let now = clock.nowNs()
        return lanes[vcpu].state.withLock { s in
            var st = s.stats
            st.boosted = s.isBoosted
            st.repaying = s.isRepaying
            if let start = s.boostStart, now > start { st.boostedNs &+= now - start }
            return st
        }
    }

    /// Totals over all vCPUs.
    public var totals: VCPUStats { lanes.indices.reduce(into: VCPUStats()) { acc, i in acc.add(stats(vcpu: i)) } }

    /// `vcpu`'s budgets left (critical, general), brought up to now when not boosted.
    public func budgetsLeft(vcpu: Int) -> (critical: UInt64, general: UInt64) {
        let now = clock.nowNs()
        return lanes[vcpu].state.withLock { $0.budget.left(governor.config, governor.share, now: now) }
    }

    // MARK: the host line

    func publish(_ area: SharedArea, vcpu: Int) {
        let st = stats(vcpu: vcpu)
        let now = clock.nowNs()
        let throttled = lanes[vcpu].state.withLock { $0.budget.isThrottled(now: now) }
        let status: HostVCPUStatus = st.boosted ? .boosted : (throttled ? .throttled : .normal)
        try? area.publish(vcpu: vcpu, status: status, boostCount: st.boostCount, boostedNs: st.boostedNs,
                          throttleCount: st.throttleCount)
    }

    func publishAll(_ area: SharedArea) {
        for i in 0..<min(lanes.count, area.layout.vcpuCount) { publish(area, vcpu: i) }
    }
}
