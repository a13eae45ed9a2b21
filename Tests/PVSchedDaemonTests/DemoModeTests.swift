import Foundation
import PVSchedCore
import PVSchedExperiments
import Testing
#if canImport(Glibc)
import Glibc
#endif

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

/// The demo's plot goes to any path: a regular file is replaced atomically, a device is
/// written in place (an atomic write renamed a file over `/dev/null`). Checked through a
/// symbolic link to /dev/null, so that a regression replaces the link, not the device.
struct ReportFileTests {
    @Test func aReportToADeviceWritesToItAndToAFileReplacesIt() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pvsched-report-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let link = dir.appendingPathComponent("plot.svg").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: "/dev/null")
        try Report.write("<svg/>", to: link)
        var st = stat()
        #expect(lstat(link, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "the link to the device is still a link")
        #expect(stat("/dev/null", &st) == 0 && st.st_mode & S_IFMT == S_IFCHR)
        let file = dir.appendingPathComponent("plot2.svg").path
        try Report.write("one", to: file)
        try Report.write("two", to: file)
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "two")
    }
}
