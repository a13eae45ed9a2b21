import GuestSupport
import PVSchedABI

/// What a task runs.
enum TaskKind: UInt32 {
    case cyclic = 1      // RT: wake every interval, record lateness
    case batch = 2       // normal: CPU-bound work
    case waitForEnd = 3  // normal: sleep until the workload's end (keeps an idle vCPU alive)
    case hostileStuck = 4  // RT: claims RT work and a boost request forever, spinning
    case hostileFlip = 5   // normal: flips its flags at a high rate, ringing the doorbell
}

/// A kernel task with its own stack.
struct Task {
    var rsp: UInt64 = 0
    var state: UInt32 = Task.ready
    /// 1...99 for real-time FIFO tasks, 0 for normal round-robin tasks.
    var rtPriority: Int32 = 0
    var kind: UInt32 = 0
    var wakeTSC: UInt64 = 0
    static let ready: UInt32 = 0, sleeping: UInt32 = 1, done: UInt32 = 2
    static let stackSize = 16 * 1024
}

/// A per-vCPU preemptive scheduler: real-time FIFO tasks (highest priority
/// first) always run before normal tasks, which share the CPU round-robin in
/// `slice` time slices. Tasks sleep until a TSC deadline; the timer interrupt
/// wakes them and preempts on return from the interrupt. The timer is the
/// LAPIC TSC-deadline timer with an in-kernel irqchip, else the VMM's timer device.
/// All state is per vCPU and touched with interrupts off.
struct Scheduler {
    static let maxTasks = 8
    var tasks: UnsafeMutablePointer<UnsafeMutablePointer<Task>?>
    var count = 0
    var alive = 0
    /// Index of the running task, or -1 for the idle (boot) context.
    var current = -1
    var idleRSP: UInt64 = 0
    var needResched = false
    var preemptCount: UInt32 = 0
    var armedTSC: UInt64 = 0
    var sliceEndTSC: UInt64 = 0
    var lastNormal = -1
    var sliceTSC: UInt64 = 0
    /// TSC at the last timer tick (the wake-up time of the tasks it woke).
    var tickTSC: UInt64 = 0

    init(sliceNs: UInt64) {
        tasks = guest_alloc(Scheduler.maxTasks * 8, 64)!.bindMemory(to: UnsafeMutablePointer<Task>?.self, capacity: Scheduler.maxTasks)
        sliceTSC = nsToTSC(sliceNs)
    }
}

nonisolated(unsafe) var schedulers: UnsafeMutablePointer<Scheduler>? = nil

enum Sched {
    static var this: UnsafeMutablePointer<Scheduler> { schedulers! + Int(this_cpu()) }

    static func setUp(vcpus: Int) {
        let raw = guest_alloc(vcpus * MemoryLayout<Scheduler>.stride, 64)!
        schedulers = raw.bindMemory(to: Scheduler.self, capacity: vcpus)
        for i in 0..<vcpus { (schedulers! + i).initialize(to: Scheduler(sliceNs: 5_000_000)) }
    }

    /// Creates a task on this vCPU.
    static func spawn(_ kind: TaskKind, rtPriority: Int32) {
        let s = this
        guard s.pointee.count < Scheduler.maxTasks else { return }
        let t = guest_alloc(MemoryLayout<Task>.stride, 64)!.bindMemory(to: Task.self, capacity: 1)
        let stack = UInt64(UInt(bitPattern: guest_alloc(Task.stackSize, 16)!))
        let top = stack + UInt64(Task.stackSize)
        // The frame context_switch pops: r15 r14 r13 r12(task) rbx rbp, then the return address.
        let frame = UnsafeMutablePointer<UInt64>(bitPattern: UInt(top - 56))!
        for k in 0..<6 { frame[k] = 0 }
        frame[3] = UInt64(UInt(bitPattern: t))
        frame[6] = task_trampoline_address()
        t.initialize(to: Task(rsp: top - 56, state: Task.ready, rtPriority: rtPriority, kind: kind.rawValue))
        s.pointee.tasks[s.pointee.count] = t
        s.pointee.count += 1
        s.pointee.alive += 1
    }

    /// Runs tasks until every task of this vCPU has finished (called on the boot stack, which is the idle context).
    static func runUntilAllDone() {
        let s = this
        cpu_disable_interrupts()
        schedule()
        // The idle context: interrupt returns switch to woken tasks, so after a
        // wake-up there is normally nothing to do but halt again.
        while s.pointee.alive > 0 {
            cpu_enable_and_halt()
            cpu_disable_interrupts()
            if s.pointee.needResched { schedule() }
        }
        cpu_enable_interrupts()
    }

    /// Picks the next task: the highest-priority ready RT task, else the next ready normal task round-robin.
    static func pickNext(_ s: UnsafeMutablePointer<Scheduler>, now: UInt64) -> Int {
        var best = -1
        var bestPrio: Int32 = 0
        for k in 0..<s.pointee.count {
            let t = s.pointee.tasks[k]!
            if t.pointee.state == Task.ready && t.pointee.rtPriority > bestPrio { best = k; bestPrio = t.pointee.rtPriority }
        }
        if best >= 0 { return best }
        // Keep the current normal task until its slice ends.
        let cur = s.pointee.current
        if cur >= 0, let t = s.pointee.tasks[cur], t.pointee.state == Task.ready, t.pointee.rtPriority == 0,
           now < s.pointee.sliceEndTSC { return cur }
        let n = s.pointee.count
        guard n > 0 else { return -1 }
        for step in 1...n {
            let k = (s.pointee.lastNormal + step + n) % n
            let t = s.pointee.tasks[k]!
            if t.pointee.state == Task.ready && t.pointee.rtPriority == 0 { return k }
        }
        return -1
    }

    /// Switches to the task that should run (interrupts must be off). `now` is a
    /// recent TSC reading when the caller has one (reading it costs an exit under PVM).
    static func schedule(now known: UInt64 = 0) {
        let s = this
        let now = known != 0 ? known : nowTSC()
        let next = pickNext(s, now: now)
        s.pointee.needResched = false
        let prev = s.pointee.current
        if next >= 0, let t = s.pointee.tasks[next], t.pointee.rtPriority == 0, next != prev || now >= s.pointee.sliceEndTSC {
            s.pointee.lastNormal = next
            s.pointee.sliceEndTSC = now &+ s.pointee.sliceTSC
        }
        if next == prev { armTimer(now: now); return }
        s.pointee.current = next
        // The arm is an exit, where the host re-evaluates the boost, so the order matters:
        // switching to an RT task, publish first (the exit must see it running);
        // switching to normal work or idle, arm first (publishing may give the boost
        // back, and an unboosted vCPU thread can be preempted before the arm takes effect).
        if next >= 0 && s.pointee.tasks[next]!.pointee.rtPriority > 0 {
            publish(next: next, now: now)
            armTimer(now: now)
        } else {
            armTimer(now: now)
            publish(next: next, now: now)
        }
        let save: UnsafeMutablePointer<UInt64> = prev >= 0 ? pointer(to: s.pointee.tasks[prev]!) : idleSlot(s)
        let target = next >= 0 ? s.pointee.tasks[next]!.pointee.rsp : s.pointee.idleRSP
        context_switch(save, target)
    }

    static func pointer(to t: UnsafeMutablePointer<Task>) -> UnsafeMutablePointer<UInt64> {
        UnsafeMutableRawPointer(t).assumingMemoryBound(to: UInt64.self)  // rsp is the first field
    }
    static func idleSlot(_ s: UnsafeMutablePointer<Scheduler>) -> UnsafeMutablePointer<UInt64> {
        UnsafeMutableRawPointer(s).advanced(by: MemoryLayout<Scheduler>.offset(of: \Scheduler.idleRSP)!).assumingMemoryBound(to: UInt64.self)
    }

    /// Keeps the shared area current: what runs now, and the next RT deadline.
    static func publish(next: Int, now: UInt64) {
        guard PVSched.active else { return }
        let s = this
        // The next wake-up of a sleeping RT task: published while normal tasks run
        // too, so the host can tell the timer interrupt that serves it from a tick.
        var earliest: UInt64 = 0
        for k in 0..<s.pointee.count {
            let t = s.pointee.tasks[k]!
            if t.pointee.state == Task.sleeping && t.pointee.rtPriority > 0 && (earliest == 0 || t.pointee.wakeTSC < earliest) {
                earliest = t.pointee.wakeTSC
            }
        }
        let deadline = earliest == 0 ? 0 : tscToNs(earliest)
        if next >= 0, let t = s.pointee.tasks[next] {
            if t.pointee.rtPriority > 0 { PVSched.rtTask(running: true, priority: t.pointee.rtPriority, interruptsOff: true) }
            else {
                PVSched.rtTask(running: false, nextDeadlineNs: deadline, nowNs: tscToNs(now), interruptsOff: true)
                // Back to ordinary work: give a boost back at once rather than at the next exit.
                PVSched.deboostIfDone()
            }
        } else {
            PVSched.sleeping(untilNs: deadline, nowNs: tscToNs(now), interruptsOff: true)
        }
    }

    /// Programs the timer for the next event: the earliest sleeper, or the end of a
    /// round-robin slice when another normal task is waiting. Only changes cost an exit.
    static func armTimer(now: UInt64) {
        let s = this
        var next: UInt64 = 0
        var normalsReady = 0
        for k in 0..<s.pointee.count {
            let t = s.pointee.tasks[k]!
            if t.pointee.state == Task.sleeping && (next == 0 || t.pointee.wakeTSC < next) { next = t.pointee.wakeTSC }
            if t.pointee.state == Task.ready && t.pointee.rtPriority == 0 { normalsReady += 1 }
        }
        if normalsReady > 1 && (next == 0 || s.pointee.sliceEndTSC < next) { next = s.pointee.sliceEndTSC }
        if next == 0 || next == s.pointee.armedTSC { return }
        if s.pointee.armedTSC != 0 && s.pointee.armedTSC < next && s.pointee.armedTSC > now { return }  // an earlier event is armed
        s.pointee.armedTSC = next
        if boot.pointee.irqchip != 0 {
            LAPIC.armDeadline(next)
        } else {
            // The VMM's timer takes a delay: computed from a fresh reading, since `now`
            // may be much older (a vCPU thread preempted on the host in the middle of a
            // timer interrupt armed the next one that much late, seen at 3 ms).
            let fresh = nowTSC()
            let us = next > fresh ? (next - fresh) / tscPerUs : 0
            outl(UInt16(PVSCHED_PORT_TIMER_ARM), UInt32(max(1, min(us, 10_000_000))))
        }
    }

    /// The timer fired: wake due sleepers, and ask for a reschedule when one outranks
    /// the running task or the running normal task's slice is over.
    static func timerTick() {
        let s = this
        let now = nowTSC()
        s.pointee.tickTSC = now
        s.pointee.armedTSC = 0
        let cur = s.pointee.current
        let curPrio: Int32 = cur >= 0 ? s.pointee.tasks[cur]!.pointee.rtPriority : -1
        for k in 0..<s.pointee.count {
            let t = s.pointee.tasks[k]!
            if t.pointee.state == Task.sleeping && t.pointee.wakeTSC <= now {
                t.pointee.state = Task.ready
                if t.pointee.rtPriority > curPrio || cur == -1 { s.pointee.needResched = true }
            }
        }
        if cur >= 0 && curPrio == 0 && now >= s.pointee.sliceEndTSC { s.pointee.needResched = true }
        // A woken RT task must wait for a preemption-off section to end: ask the host
        // lazily (a write, no exit) to keep or give the vCPU a boost meanwhile.
        if s.pointee.needResched && s.pointee.preemptCount > 0 && PVSched.active {
            for k in 0..<s.pointee.count where s.pointee.tasks[k]!.pointee.state == Task.ready && s.pointee.tasks[k]!.pointee.rtPriority > 0 {
                PVSched.updateWithInterruptsOff { $0.flags |= PVSCHED_FLAG_BOOST_REQUEST }
                break
            }
        }
        if !s.pointee.needResched { armTimer(now: now) }
    }

    /// Called at the end of every interrupt: preempt if needed. The host boosts on
    /// every injected interrupt; when the interrupt leaves only normal work running
    /// (e.g. a round-robin tick), the boost is given back at once.
    static func interruptReturn() {
        guard schedulers != nil else { return }
        let s = this
        if s.pointee.needResched && s.pointee.preemptCount == 0 { schedule(now: s.pointee.tickTSC) }
        // Not while a woken task still waits (preemption is off): it may be the RT task.
        let cur = s.pointee.current
        if !s.pointee.needResched, cur >= 0, s.pointee.tasks[cur]!.pointee.rtPriority == 0, PVSched.active {
            PVSched.deboostIfDone()
        }
    }

    /// The running task sleeps until `tsc` (`armTimer` computes the VMM timer's delay
    /// from a fresh TSC reading).
    static func sleep(untilTSC tsc: UInt64) {
        let s = this
        let irq = irq_save()
        let t = s.pointee.tasks[s.pointee.current]!
        t.pointee.wakeTSC = tsc
        t.pointee.state = Task.sleeping
        schedule()
        irq_restore(irq)
    }

    /// The running task ends.
    static func exitTask() -> Never {
        let s = this
        cpu_disable_interrupts()
        s.pointee.tasks[s.pointee.current]!.pointee.state = Task.done
        s.pointee.alive -= 1
        schedule()
        while true { cpu_halt() }
    }

    static func preemptDisable() {
        let s = this
        s.pointee.preemptCount += 1
        if s.pointee.preemptCount == 1 && PVSched.active { PVSched.setFlags(PVSCHED_FLAG_PREEMPT_DISABLED, clear: 0) }
    }

    static func preemptEnable() {
        let s = this
        s.pointee.preemptCount -= 1
        if s.pointee.preemptCount == 0 {
            if PVSched.active { PVSched.setFlags(0, clear: PVSCHED_FLAG_PREEMPT_DISABLED) }
            let irq = irq_save()
            if s.pointee.needResched { schedule() }
            irq_restore(irq)
        }
    }
}

/// The first Swift code of every task.
@_cdecl("task_main")
func taskMain(_ raw: UnsafeMutableRawPointer) {
    let task = raw.assumingMemoryBound(to: Task.self)
    switch TaskKind(rawValue: task.pointee.kind) {
    case .cyclic: Workloads.cyclicTask()
    case .batch: Workloads.batchTask()
    case .waitForEnd: Sched.sleep(untilTSC: Workloads.endTSC)
    case .hostileStuck: Workloads.hostileStuckTask()
    case .hostileFlip: Workloads.hostileFlipTask()
    case .none: break
    }
    Sched.exitTask()
}
