import PVSchedABI

/// One vCPU's workload results, copied out of (validated) guest memory.
public struct VCPUResults: Sendable {
    public var vcpu: Int
    public var workload: Workload?
    public var samples: UInt64
    public var latenessSumNs: UInt64
    public var latenessMaxNs: UInt64
    public var latenessMinNs: UInt64
    public var workUnits: UInt64
    /// hist[i]: samples with lateness in [2^i, 2^(i+1)) ns.
    public var histogram: [UInt64]
    /// Raw lateness samples in ns (the first `max_samples`).
    public var rawSamplesNs: [UInt32]

    public var averageNs: Double { samples == 0 ? 0 : Double(latenessSumNs) / Double(samples) }

    public var summary: String {
        let w = workload.map(String.init(describing:)) ?? "?"
        if workload == .batch { return "vCPU \(vcpu) [\(w)]: \(workUnits) work units" }
        return "vCPU \(vcpu) [\(w)]: \(samples) samples, lateness avg \(Int(averageNs / 1000)) µs, max \(latenessMaxNs / 1000) µs"
    }
}

/// The results block the guest left in its memory.
public struct WorkloadResults: Sendable {
    public var vcpus: [VCPUResults]
}

/// Why the guest's results could not be read.
public struct ResultsError: Error, CustomStringConvertible {
    public let field: String
    public let detail: String
    public init(field: String, detail: String) { self.field = field; self.detail = detail }
    public var description: String { "guest results field `\(field)`: \(detail)" }
}

extension VirtualMachine {
    /// Reads the results the guest wrote (nil if it wrote none). Guest memory is
    /// hostile: every offset and count is checked against guest RAM.
    public func readResults() throws(ResultsError) -> WorkloadResults? {
        guard let info = memory.pointer(to: pvsched_boot_info.self, at: UInt64(PVSCHED_GPA_BOOT_INFO)) else { return nil }
        let gpa = info.pointee.results_gpa, size = info.pointee.results_size
        if gpa == 0 { return nil }
        guard size <= UInt64(memory.size), let block = memory.bytes(at: gpa, length: Int(size)) else {
            throw ResultsError(field: "results_gpa", detail: "0x\(String(gpa, radix: 16)) + \(size) is outside guest RAM")
        }
        let headerSize = MemoryLayout<pvsched_results>.size
        guard block.count >= headerSize else { throw ResultsError(field: "results_size", detail: "\(size) is too small") }
        let header = block.loadUnaligned(as: pvsched_results.self)
        guard header.magic == PVSCHED_RESULTS_MAGIC else {
            throw ResultsError(field: "magic", detail: "0x\(String(header.magic, radix: 16))")
        }
        guard header.vcpu_count == UInt32(config.vcpus) else {
            throw ResultsError(field: "vcpu_count", detail: "\(header.vcpu_count), the VM has \(config.vcpus)")
        }
        let n = Int(header.vcpu_count)
        let stride = MemoryLayout<pvsched_vcpu_results>.stride
        guard headerSize + n * stride <= block.count else {
            throw ResultsError(field: "results_size", detail: "\(size) cannot hold \(n) vCPU results")
        }
        let maxSamples = Int(header.max_samples), samplesOffset = Int(header.samples_offset)
        guard maxSamples <= 1 << 20, samplesOffset >= headerSize + n * stride,
              samplesOffset + n * maxSamples * 4 <= block.count else {
            throw ResultsError(field: "samples_offset", detail: "\(samplesOffset) with \(maxSamples) samples per vCPU does not fit")
        }
        var out: [VCPUResults] = []
        for i in 0..<n {
            let r = block.loadUnaligned(fromByteOffset: headerSize + i * stride, as: pvsched_vcpu_results.self)
            let hist = withUnsafeBytes(of: r.hist) { Array($0.bindMemory(to: UInt64.self)) }
            let count = min(Int(r.sample_count), maxSamples)
            var raw = [UInt32](repeating: 0, count: count)
            raw.withUnsafeMutableBytes { dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: block[(samplesOffset + i * maxSamples * 4)...].prefix(count * 4)))
            }
            out.append(VCPUResults(vcpu: i, workload: Workload(rawValue: r.workload), samples: r.samples,
                                   latenessSumNs: r.lateness_sum_ns, latenessMaxNs: r.lateness_max_ns,
                                   latenessMinNs: r.lateness_min_ns, workUnits: r.work_units,
                                   histogram: hist, rawSamplesNs: raw))
        }
        return WorkloadResults(vcpus: out)
    }

    /// `readResults()`, logging and dropping an error.
    public func results() -> WorkloadResults? {
        do { return try readResults() } catch {
            logger.error("cannot read guest results", metadata: ["error": "\(error)"])
            return nil
        }
    }
}
