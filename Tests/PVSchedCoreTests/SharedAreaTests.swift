import PVSchedABI
import Synchronization
import Testing
@testable import PVSchedCore
import PVSchedTesting

@Suite struct SharedAreaTests {
    @Test func abiLayoutMatchesHeader() {
        #expect(MemoryLayout<pvsched_region_header>.size == 64)
        #expect(MemoryLayout<pvsched_vcpu_area>.size == 128)
        #expect(MemoryLayout<pvsched_vcpu_guest>.size == 64)
        #expect(MemoryLayout.offset(of: \pvsched_vcpu_area.host) == 64)
        #expect(MemoryLayout.offset(of: \pvsched_vcpu_guest.next_deadline_ns) == Int(PVSCHED_OFF_NEXT_DEADLINE))
    }

    @Test func validAreaIsAcceptedAndRead() throws {
        let buf = SharedAreaBuffer(vcpus: 2)
        let area = try SharedArea(validating: buf.bytes)
        #expect(area.layout.protocolName == "pvsched-latency")
        #expect(area.layout.vcpuCount == 2)
        buf.writer.update(vcpu: 1) {
            $0.flags = PVSCHED_FLAG_RT_TASK_RUNNING | PVSCHED_FLAG_IN_IRQ
            $0.task_policy = PVSCHED_TASK_FIFO
            $0.task_priority = 80
            $0.next_deadline_ns = 5_000
            $0.guest_clock_ns = 4_000
        }
        let s = try area.read(vcpu: 1)
        #expect(s.flags == [.rtTaskRunning, .inIRQ])
        #expect(s.task == .fifo(priority: 80))
        #expect(s.slackNs == 1_000)
        #expect(s.sequence % 2 == 0)
        #expect(try area.read(vcpu: 0) == GuestVCPUState(sequence: 0))
    }

    @Test func hostLineIsPublished() throws {
        let buf = SharedAreaBuffer(vcpus: 1)
        let area = try SharedArea(validating: buf.bytes)
        try area.publish(vcpu: 0, status: .boosted, boostCount: 3, boostedNs: 42, throttleCount: 1)
        let host = buf.writer.vcpu(0).pointee.host
        #expect(host.status == PVSCHED_STATUS_BOOSTED)
        #expect(host.boost_count == 3 && host.boosted_ns == 42 && host.throttle_count == 1)
    }

    /// Runs `corrupt` on a fresh valid area and expects validation to fail on `field`.
    private func expectRejected(field: String, _ corrupt: (SharedAreaWriter) -> Void,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        let buf = SharedAreaBuffer(vcpus: 2)
        corrupt(buf.writer)
        do {
            _ = try SharedArea(validating: buf.bytes)
            Issue.record("area accepted", sourceLocation: sourceLocation)
        } catch {
            #expect(error.field == field, sourceLocation: sourceLocation)
            #expect(error.description.contains("`\(field)`"), sourceLocation: sourceLocation)
        }
    }

    @Test func badHeadersAreRejectedNamingTheField() {
        expectRejected(field: "magic") { $0.header.pointee.magic = 0xdeadbeef }
        expectRejected(field: "abi_version") { $0.header.pointee.abi_version = 7 }
        expectRejected(field: "header_size") { $0.header.pointee.header_size = 32 }
        expectRejected(field: "protocol_name") { w in
            withUnsafeMutableBytes(of: &w.header.pointee.protocol_name) { _ = $0.initializeMemory(as: UInt8.self, repeating: 0x41) }
        }
        expectRejected(field: "protocol_name") { w in
            withUnsafeMutableBytes(of: &w.header.pointee.protocol_name) { $0[0] = 0 }
        }
        expectRejected(field: "vcpu_count") { $0.header.pointee.vcpu_count = 0 }
        expectRejected(field: "vcpu_count") { $0.header.pointee.vcpu_count = 1000 }
        expectRejected(field: "vcpu_stride") { $0.header.pointee.vcpu_stride = 64 }
        expectRejected(field: "vcpu_stride") { $0.header.pointee.vcpu_stride = 130 }
        expectRejected(field: "vcpu_offset") { $0.header.pointee.vcpu_offset = 16 }
        expectRejected(field: "vcpu_offset") { $0.header.pointee.vcpu_offset = 65 }
        // The header claims more vCPUs than fit in the area.
        expectRejected(field: "area_size") { $0.header.pointee.vcpu_count = 3 }
    }

    @Test func truncatedAreaIsRejected() {
        let buf = SharedAreaBuffer(vcpus: 1)
        let short = UnsafeMutableRawBufferPointer(rebasing: buf.bytes[0..<32])
        #expect(throws: SharedAreaError.areaTooSmall(size: 32, needed: 64)) { try SharedArea(validating: short) }
    }

    @Test func vcpuIndexOutOfRange() throws {
        let buf = SharedAreaBuffer(vcpus: 2)
        let area = try SharedArea(validating: buf.bytes)
        #expect(throws: SharedAreaError.vcpuIndexOutOfRange(index: 2, count: 2)) { try area.read(vcpu: 2) }
        #expect(throws: SharedAreaError.vcpuIndexOutOfRange(index: -1, count: 2)) { try area.read(vcpu: -1) }
    }

    @Test func badGuestLinesAreRejectedNamingTheField() throws {
        let buf = SharedAreaBuffer(vcpus: 1)
        let area = try SharedArea(validating: buf.bytes)
        let cases: [(String, (inout pvsched_vcpu_guest) -> Void)] = [
            ("flags", { $0.flags = 0x80 }),
            ("task_policy", { $0.task_policy = 9 }),
            ("task_priority", { $0.task_policy = PVSCHED_TASK_FIFO; $0.task_priority = 0 }),
            ("task_priority", { $0.task_policy = PVSCHED_TASK_RR; $0.task_priority = 100 }),
            ("task_priority", { $0.task_policy = PVSCHED_TASK_NORMAL; $0.task_priority = 5 }),
            ("task_nice", { $0.task_policy = PVSCHED_TASK_NORMAL; $0.task_nice = 20 }),
            ("task_nice", { $0.task_policy = PVSCHED_TASK_NORMAL; $0.task_nice = -21 }),
        ]
        for (field, corrupt) in cases {
            buf.writer.update(vcpu: 0) { g in
                g.flags = 0; g.task_policy = 0; g.task_priority = 0; g.task_nice = 0
                corrupt(&g)
            }
            do {
                _ = try area.read(vcpu: 0)
                Issue.record("line accepted for \(field)")
            } catch {
                #expect(error.field == field)
            }
        }
    }

    @Test func sequenceThatNeverSettlesIsAnError() throws {
        let buf = SharedAreaBuffer(vcpus: 1)
        let area = try SharedArea(validating: buf.bytes)
        buf.writer.vcpu(0).pointee.guest.seq = 7  // a writer that died mid-update
        #expect(throws: SharedAreaError.sequenceNeverSettled(vcpu: 0, attempts: SharedArea.maxReadAttempts)) {
            try area.read(vcpu: 0)
        }
    }

    @Test func readsAreNeverTornUnderAConcurrentWriter() async throws {
        let buf = SharedAreaBuffer(vcpus: 1)
        let area = try SharedArea(validating: buf.bytes)
        let writer = buf.writer
        // The writer keeps deadline == clock + 1000 and priority == 1 + clock % 99; a torn read breaks that.
        let done = Atomic(false)
        let t = try Thread {
            var i: UInt64 = 1
            while !done.load(ordering: .relaxed) {
                writer.update(vcpu: 0) { g in
                    g.task_policy = PVSCHED_TASK_FIFO
                    g.guest_clock_ns = i
                    g.task_priority = Int32(1 + i % 99)
                    g.next_deadline_ns = i + 1000
                }
                i += 1
            }
        }
        var consistent = 0, settledFailures = 0
        for _ in 0..<200_000 {
            do {
                let s = try area.read(vcpu: 0)
                if s.guestClockNs == 0 { continue }
                #expect(s.nextDeadlineNs == s.guestClockNs + 1000)
                #expect(s.task == .fifo(priority: UInt8(1 + s.guestClockNs % 99)))
                consistent += 1
            } catch {
                settledFailures += 1
            }
        }
        done.store(true, ordering: .relaxed)
        t.join()
        #expect(consistent > 0)
    }
}
