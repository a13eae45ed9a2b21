import PVSchedCore
import PVSchedHost
import Prometheus
import Synchronization

/// What the daemon knows beyond its VMs, for the metrics: read at each scrape.
public struct DaemonFacts: Sendable {
    /// Version and git revision of this build.
    public var version: String = "unknown"
    public var revision: String = "unknown"
    /// The boost guardian now (nil: the daemon runs without one).
    public var guardian: @Sendable () -> (up: Bool, restarts: UInt64)? = { nil }
    /// Records the kernel event source dropped (nil: no kernel events).
    public var kernelEventsDropped: @Sendable () -> UInt64? = { nil }
    public init() {}
}

/// Turns the host's per-vCPU counters into Prometheus metrics (swift-prometheus).
///
/// The per-event path keeps plain counters in each binding; a scrape adds what
/// changed since the previous scrape to the Prometheus counters, so scraping
/// costs the vCPUs nothing. Labels: `vm`, `vcpu`, `driver` (the driver serving
/// the vCPU at scrape time: counts since the previous scrape go to it). A VM's
/// series go away with it. The decision-latency histogram is written from the
/// binding's own buckets and exact sum (swift-prometheus's histogram would have to
/// be fed one observation at a time, and its sum would only bound the real one).
public final class MetricsExporter: Sendable {
    private let host: PVSchedHost
    private let facts: DaemonFacts
    private let registry = PrometheusCollectorRegistry()
    /// What one VM put in the registry, so that its series can be removed with it.
    private struct VMSeries {
        var name: String
        var counters: [String: Counter] = [:]
        var gauges: [String: Gauge] = [:]
        var seen: [Int: VCPUStats] = [:]
        var refusalsSeen: [String: UInt64] = [:]
    }
    private struct State {
        var vms: [UInt64: VMSeries] = [:]
        var guardianRestartsSeen: UInt64 = 0
        var droppedSeen: UInt64 = 0
    }
    private let state = Mutex(State())

    public init(host: PVSchedHost, facts: DaemonFacts = DaemonFacts()) {
        self.host = host
        self.facts = facts
        registry.makeGauge(descriptor: d("pvsched_build_info", "The pvsched build serving these metrics (always 1)"),
                           labels: [("version", facts.version), ("revision", facts.revision)]).set(to: 1)
    }

    /// The metrics in the Prometheus text exposition format.
    public func scrape() -> [UInt8] {
        state.withLock { st in
            update(&st)
            var out = registry.emitToBuffer()
            appendLatencyHistograms(&out)
            return out
        }
    }

    private func update(_ st: inout State) {
        let sessions = host.sessions
        registry.makeGauge(descriptor: d("pvsched_vms", "VMs served by the daemon")).set(to: Double(sessions.count))
        registry.makeGauge(descriptor: d("pvsched_drivers", "Registered drivers")).set(to: Double(host.registry.drivers.count))
        if let g = facts.guardian() {
            registry.makeGauge(descriptor: d("pvsched_guardian_up", "1 while the boost guardian takes records")).set(to: g.up ? 1 : 0)
            let c = registry.makeCounter(descriptor: d("pvsched_guardian_restarts_total", "Boost guardians restarted after dying or stalling"))
            if g.restarts > st.guardianRestartsSeen { c.increment(by: Int64(clamping: g.restarts - st.guardianRestartsSeen)) }
            st.guardianRestartsSeen = g.restarts
        }
        do {  // served from the start (0 while no VM uses kernel events), so that an alert has a series
            let dropped = facts.kernelEventsDropped() ?? 0
            let c = registry.makeCounter(descriptor: d("pvsched_kernel_events_dropped_total",
                                                       "Kernel KVM event records dropped because the ring buffer was full"))
            if dropped > st.droppedSeen { c.increment(by: Int64(clamping: dropped - st.droppedSeen)) }
            st.droppedSeen = dropped
        }
        // The series of VMs that are gone go with them.
        let live = Set(sessions.map(\.handle.id))
        for (id, series) in st.vms where !live.contains(id) {
            for c in series.counters.values { registry.unregisterCounter(c) }
            for g in series.gauges.values { registry.unregisterGauge(g) }
            st.vms[id] = nil
        }
        for s in sessions {
            guard let b = s.binding else { continue }
            var series = st.vms[s.handle.id] ?? VMSeries(name: s.handle.name)
            let vm = s.handle.name
            let driver = b.driver?.name ?? "none"
            gauge(&series, "pvsched_vm_negotiation", "1 for the VM's negotiation state (none, accepted, refused, disabled)",
                  [("vm", vm), ("state", Self.negotiationState(b))], 1, replacingPrefix: "pvsched_vm_negotiation")
            for v in 0..<s.handle.vcpuCount {
                let now = b.publishedStats(vcpu: v)
                let before = series.seen[v] ?? VCPUStats()
                series.seen[v] = now
                let labels = [("vm", vm), ("vcpu", "\(v)"), ("driver", driver)]
                for ((kind, n), (_, m)) in zip(now.eventsByKind.byName, before.eventsByKind.byName) {
                    counter(&series, "pvsched_events_total", "vCPU events delivered to drivers", labels + [("kind", kind)], n, m)
                }
                for ((outcome, n), (_, m)) in zip(now.outcomes.byName, before.outcomes.byName) {
                    counter(&series, "pvsched_decisions_total", "Driver notifications by outcome", labels + [("outcome", outcome)], n, m)
                }
                for ((reason, n), (_, m)) in zip(now.failedBoosts.byName, before.failedBoosts.byName) {
                    counter(&series, "pvsched_boost_failures_total", "Boosts the actuator could not apply, by reason",
                            labels + [("reason", reason)], n, m)
                }
                counter(&series, "pvsched_boosts_total", "Boosts applied", labels, now.boostCount, before.boostCount)
                counter(&series, "pvsched_throttles_total", "Boosts the governor refused or cut", labels, now.throttleCount, before.throttleCount)
                counter(&series, "pvsched_repayments_total", "Boosts repaid at the least weight afterwards", labels, now.repayments, before.repayments)
                counter(&series, "pvsched_vetoes_total", "Governor vetoes by reason", labels + [("reason", "throttled")],
                        now.vetoesThrottled, before.vetoesThrottled)
                counter(&series, "pvsched_vetoes_total", "Governor vetoes by reason", labels + [("reason", "vm_share")],
                        now.vetoesVMShare, before.vetoesVMShare)
                let boosted = counter(&series, "pvsched_boosted_seconds_total", "Time vCPU threads spent boosted", labels, 0, 0)
                if now.boostedNs > before.boostedNs { boosted.increment(by: Double(now.boostedNs - before.boostedNs) / 1e9) }
                let vcpuLabels = [("vm", vm), ("vcpu", "\(v)")]
                gauge(&series, "pvsched_vcpu_boosted", "1 while the vCPU thread is boosted", vcpuLabels, now.boosted ? 1 : 0)
                gauge(&series, "pvsched_vcpu_repaying", "1 while the vCPU thread repays a boost at the least weight", vcpuLabels,
                      now.repaying ? 1 : 0)
                gauge(&series, "pvsched_vcpu_boost_blocked", "1 while the vCPU's boosts cannot be applied (vm list shows why)",
                      vcpuLabels, now.boostBlocked != nil ? 1 : 0)
                let thread = v < b.threads.count ? b.threads[v] : nil
                gauge(&series, "pvsched_vcpu_boost_class_fallback",
                      "1 while the vCPU's boosts are applied in a fair class because its cgroup refuses real-time (vm list shows why)",
                      vcpuLabels, thread.flatMap(b.actuator.classFallback(of:)) != nil ? 1 : 0)
            }
            for (reason, n) in b.refusalCounts {
                let m = series.refusalsSeen[reason] ?? 0
                series.refusalsSeen[reason] = n
                counter(&series, "pvsched_negotiation_failures_total", "Refused shared-area registrations by reason",
                        [("vm", vm), ("reason", reason)], n, m)
            }
            st.vms[s.handle.id] = series
        }
    }

    /// The VM's negotiation in one word.
    static func negotiationState(_ b: VMBinding) -> String {
        if b.disabledReason != nil { return "disabled" }
        switch b.negotiation {
        case .none: return "none"
        case .accepted: return "accepted"
        case .refused: return "refused"
        }
    }

    /// Appends `pvsched_decision_latency_seconds`, one histogram per vCPU, from the
    /// bindings' cumulative buckets.
    private func appendLatencyHistograms(_ out: inout [UInt8]) {
        var text = "# HELP pvsched_decision_latency_seconds Time from a vCPU event to the driver's decision\n"
        text += "# TYPE pvsched_decision_latency_seconds histogram\n"
        for s in host.sessions {
            guard let b = s.binding else { continue }
            for v in 0..<s.handle.vcpuCount {
                let lat = b.publishedStats(vcpu: v).decisionLatency
                let labels = "vm=\"\(Self.escapeLabel(s.handle.name))\",vcpu=\"\(v)\""
                var cumulative: UInt64 = 0
                for (i, bound) in LatencyBuckets.upperBoundsNs.enumerated() {
                    cumulative &+= lat.counts[i]
                    text += "pvsched_decision_latency_seconds_bucket{\(labels),le=\"\(Double(bound) / 1e9)\"} \(cumulative)\n"
                }
                text += "pvsched_decision_latency_seconds_bucket{\(labels),le=\"+Inf\"} \(lat.total)\n"
                text += "pvsched_decision_latency_seconds_sum{\(labels)} \(Double(lat.sumNs) / 1e9)\n"
                text += "pvsched_decision_latency_seconds_count{\(labels)} \(lat.total)\n"
            }
        }
        out += Array(text.utf8)
    }

    /// A label value in the text format: backslash, quote and newline escaped.
    static func escapeLabel(_ s: String) -> String {
        var out = ""
        for c in s.unicodeScalars {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    private func d(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    private static func key(_ name: String, _ labels: [(String, String)]) -> String {
        name + "{" + labels.map { "\($0.0)=\($0.1)" }.joined(separator: ",") + "}"
    }

    @discardableResult
    private func counter(_ series: inout VMSeries, _ name: String, _ help: String, _ labels: [(String, String)],
                         _ now: UInt64, _ before: UInt64) -> Counter {
        let k = Self.key(name, labels)
        let c = series.counters[k] ?? registry.makeCounter(descriptor: d(name, help), labels: labels)
        series.counters[k] = c
        if now > before { c.increment(by: Int64(clamping: now - before)) }
        return c
    }

    /// Sets a gauge of the VM; with `replacingPrefix`, the VM's other gauges of that
    /// name (an earlier state label) are removed.
    private func gauge(_ series: inout VMSeries, _ name: String, _ help: String, _ labels: [(String, String)], _ value: Double,
                       replacingPrefix: String? = nil) {
        let k = Self.key(name, labels)
        if let prefix = replacingPrefix {
            for (other, g) in series.gauges where other != k && other.hasPrefix(prefix + "{") {
                registry.unregisterGauge(g)
                series.gauges[other] = nil
            }
        }
        let g = series.gauges[k] ?? registry.makeGauge(descriptor: d(name, help), labels: labels)
        series.gauges[k] = g
        g.set(to: value)
    }
}
