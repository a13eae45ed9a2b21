import PVSchedCore
import PVSchedHost
import Prometheus
import Synchronization

/// Turns the host's per-vCPU counters into Prometheus metrics (swift-prometheus).
///
/// The per-event path keeps plain counters in each binding; a scrape adds what
/// changed since the previous scrape to the Prometheus counters, so scraping
/// costs the vCPUs nothing. Labels: `vm`, `vcpu`, `driver` (the driver serving
/// the vCPU at scrape time: counts since the previous scrape go to it).
/// The decision-latency histogram's bucket counts are exact; its `_sum` is an
/// upper bound (each observation counts at its power-of-two bucket's bound).
public final class MetricsExporter: Sendable {
    private let host: PVSchedHost
    private let registry = PrometheusCollectorRegistry()
    private struct Seen { var stats: VCPUStats; var refusals: [String: UInt64] }
    private let seen = Mutex<[String: Seen]>([:])
    private let refusalsSeen = Mutex<[String: UInt64]>([:])
    private let scrapeLock = Mutex(())

    public init(host: PVSchedHost) { self.host = host }

    /// The metrics in the Prometheus text exposition format.
    public func scrape() -> [UInt8] {
        scrapeLock.withLock { _ in
            update()
            return registry.emitToBuffer()
        }
    }

    private func update() {
        let sessions = host.sessions
        registry.makeGauge(descriptor: d("pvsched_vms", "VMs served by the daemon")).set(to: Double(sessions.count))
        registry.makeGauge(descriptor: d("pvsched_drivers", "Registered drivers")).set(to: Double(host.registry.drivers.count))
        for s in sessions {
            guard let b = s.binding else { continue }
            let vm = s.handle.name
            let driver = b.driver?.name ?? "none"
            for v in 0..<s.handle.vcpuCount {
                let now = b.publishedStats(vcpu: v)
                let key = "\(s.handle.id)/\(v)"
                let before = seen.withLock { $0[key]?.stats } ?? VCPUStats()
                seen.withLock { $0[key] = Seen(stats: now, refusals: [:]) }
                let labels = [("vm", vm), ("vcpu", "\(v)"), ("driver", driver)]
                for ((kind, n), (_, m)) in zip(now.eventsByKind.byName, before.eventsByKind.byName) {
                    counter("pvsched_events_total", "vCPU events delivered to drivers", labels + [("kind", kind)], n, m)
                }
                for ((outcome, n), (_, m)) in zip(now.outcomes.byName, before.outcomes.byName) {
                    counter("pvsched_decisions_total", "Driver notifications by outcome", labels + [("outcome", outcome)], n, m)
                }
                counter("pvsched_boosts_total", "Boosts applied", labels, now.boostCount, before.boostCount)
                counter("pvsched_throttles_total", "Boosts the governor refused or cut", labels, now.throttleCount, before.throttleCount)
                counter("pvsched_repayments_total", "Boosts repaid at the least weight afterwards", labels, now.repayments, before.repayments)
                counter("pvsched_vetoes_total", "Governor vetoes by reason", labels + [("reason", "throttled")],
                        now.vetoesThrottled, before.vetoesThrottled)
                counter("pvsched_vetoes_total", "Governor vetoes by reason", labels + [("reason", "vm_share")],
                        now.vetoesVMShare, before.vetoesVMShare)
                if now.boostedNs > before.boostedNs {
                    registry.makeCounter(descriptor: d("pvsched_boosted_seconds_total", "Time vCPU threads spent boosted"), labels: labels)
                        .increment(by: Double(now.boostedNs - before.boostedNs) / 1e9)
                } else {
                    _ = registry.makeCounter(descriptor: d("pvsched_boosted_seconds_total", "Time vCPU threads spent boosted"), labels: labels)
                }
                registry.makeGauge(descriptor: d("pvsched_vcpu_boosted", "1 while the vCPU thread is boosted"), labels: labels)
                    .set(to: now.boosted ? 1.0 : 0.0)
                registry.makeGauge(descriptor: d("pvsched_vcpu_repaying", "1 while the vCPU thread repays a boost at the least weight"), labels: labels)
                    .set(to: now.repaying ? 1.0 : 0.0)
                let histogram = registry.makeDurationHistogram(
                    descriptor: d("pvsched_decision_latency_seconds", "Time a driver took to decide (bucket counts exact, sum an upper bound)"),
                    labels: labels, buckets: LatencyBuckets.upperBoundsNs.map { Duration.nanoseconds(Int64($0)) })
                for i in now.decisionLatency.counts.indices {
                    let delta = now.decisionLatency.counts[i] &- before.decisionLatency.counts[i]
                    guard delta > 0, delta < 1 << 40 else { continue }
                    let bound = i < LatencyBuckets.upperBoundsNs.count ? LatencyBuckets.upperBoundsNs[i]
                                                                       : LatencyBuckets.upperBoundsNs.last! * 2
                    for _ in 0..<delta { histogram.recordNanoseconds(Int64(bound)) }
                }
            }
            let refusals = b.refusalCounts
            for (reason, n) in refusals {
                let key = "\(s.handle.id)/\(reason)"
                let m = refusalsSeen.withLock { $0[key] } ?? 0
                refusalsSeen.withLock { $0[key] = n }
                counter("pvsched_negotiation_failures_total", "Refused shared-area registrations by reason",
                        [("vm", vm), ("reason", reason)], n, m)
            }
        }
    }

    private func d(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    private func counter(_ name: String, _ help: String, _ labels: [(String, String)], _ now: UInt64, _ before: UInt64) {
        let c = registry.makeCounter(descriptor: d(name, help), labels: labels)
        if now > before { c.increment(by: Int64(clamping: now - before)) }
    }
}
