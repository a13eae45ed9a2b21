import ArgumentParser
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// `pvsched demo` and `pvsched bench` run the lab (`pvsched-lab`), which the daemon's
/// binary does not link: found beside this executable. In a source tree's build
/// directory (`swift run -c release pvsched demo` on a fresh clone) a missing lab is
/// built first, with the same configuration.
enum Lab {
    /// This executable's directory.
    static var directory: URL? {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")).map { URL(fileURLWithPath: $0).deletingLastPathComponent() }
    }

    /// The source tree this binary was built from, if it is still there (its own sources are).
    static var sourceRoot: URL? {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return FileManager.default.fileExists(atPath: root.appendingPathComponent("Package.swift").path) ? root : nil
    }

    /// The lab's path, building it first when this binary lives in the build directory of its source tree.
    static func executable() throws -> String {
        guard let dir = directory else { throw CleanExit.message("pvsched: cannot tell where this executable is", code: 1) }
        let lab = dir.appendingPathComponent("pvsched-lab").path
        if FileManager.default.isExecutableFile(atPath: lab) { return lab }
        guard let root = sourceRoot, dir.path.hasPrefix(root.appendingPathComponent(".build").path) else {
            throw CleanExit.message("pvsched: the lab (pvsched-lab: demo, bench) is not part of this installation; from the source tree run `swift run -c release pvsched demo`", code: 1)
        }
        let configuration = dir.lastPathComponent == "release" ? "release" : "debug"
        FileHandleOut.stderr("building the lab (swift build -c \(configuration) --product pvsched-lab)...")
        let swift = Process()
        swift.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        swift.arguments = ["swift", "build", "-c", configuration, "--product", "pvsched-lab", "--package-path", root.path]
        swift.standardOutput = FileHandle.standardError
        try swift.run()
        swift.waitUntilExit()
        guard swift.terminationStatus == 0, FileManager.default.isExecutableFile(atPath: lab) else {
            throw CleanExit.message("pvsched: building the lab failed (swift build --product pvsched-lab)", code: 1)
        }
        return lab
    }

    /// Replaces this process with `pvsched-lab COMMAND ARGUMENTS`.
    static func exec(_ command: String, _ arguments: [String]) throws -> Never {
        let path = try executable()
        var argv: [UnsafeMutablePointer<CChar>?] = (["pvsched", command] + arguments).map { strdup($0) }
        argv.append(nil)
        execv(path, &argv)
        throw CleanExit.message("pvsched \(command): cannot run \(path): \(String(cString: strerror(errno)))", code: 1)
    }
}

/// The main job (in the lab): a real guest under host contention, in each mode, side by side.
struct DemoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "demo",
        abstract: "Measure guest and host latency under host contention: vanilla, static real-time and pvsched, side by side (`pvsched demo --help`).")
    @Argument(parsing: .captureForPassthrough, help: "The lab's demo options (see `pvsched demo --help`).") var arguments: [String] = []
    func run() throws { try Lab.exec("demo", arguments) }
}

/// The benchmarks of the mechanism (in the lab).
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Benchmark the mechanism against baselines from the same run (`pvsched bench --help`).")
    @Argument(parsing: .captureForPassthrough, help: "The lab's bench options (see `pvsched bench --help`).") var arguments: [String] = []
    func run() throws { try Lab.exec("bench", arguments) }
}
