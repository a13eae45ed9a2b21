// swift-tools-version: 6.0
// The BPF interpreter's kernels (Sources/PVSchedExperiments/BPFKernels.swift,
// linked here) as a small executable built against the pvsched tree at
// $PVSCHED_ROOT (default: this repository). scripts/bench-bpf-against.sh builds
// it once from this tree and once from another revision and runs the two
// interleaved, so that both are measured in the same run.
import PackageDescription

let root = Context.environment["PVSCHED_ROOT"] ?? "../.."

let package = Package(
    name: "bpf-compare",
    dependencies: [.package(name: "pvsched", path: root)],
    targets: [
        .executableTarget(name: "BPFCompare", dependencies: [.product(name: "PVSchedBPF", package: "pvsched")]),
    ],
    swiftLanguageModes: [.v6]
)
