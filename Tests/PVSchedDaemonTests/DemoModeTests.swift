import PVSchedCore
import PVSchedExperiments
import Testing

/// `pvsched demo --modes`: a driver may name its own boost class (`DRIVER@CLASS`).
struct DemoModeTests {
    @Test func modesParseWithAndWithoutABoostClass() {
        #expect(Mode("vanilla") == .vanilla)
        #expect(Mode("static-rt") == .staticRT)
        #expect(Mode("deadline-boost") == .driver("deadline-boost"))
        #expect(Mode("deadline-boost@slice:100") == .driver("deadline-boost", boost: .slice(nice: -20, sliceUs: 100)))
        #expect(Mode("kernel:latency-boost@nice:-20") == .kernel("latency-boost", boost: .other(nice: -20)))
        #expect(Mode("latency-boost@fifo:5")?.description == "latency-boost@fifo:5")
        for bad in ["latency-boost@", "latency-boost@fifo:0", "@fifo:3", "kernel:", "x@slice:50"] {
            #expect(Mode(bad) == nil, "\(bad)")
        }
    }
}
