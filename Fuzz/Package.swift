// swift-tools-version: 6.0
// libFuzzer targets for pvsched's parsers of hostile input. Built apart from the
// main package so that the normal build is not instrumented:
//   cd Fuzz && swift build -c release --sanitize=fuzzer
//   .build/release/FuzzELFLoader Corpus/elf-loader -runs=1000000
// `bash Fuzz/run.sh SECONDS` builds and runs every target for a bounded time (CI does).
import PackageDescription

let fuzzFlags: [SwiftSetting] = [.unsafeFlags(["-parse-as-library"])]

let package = Package(
    name: "pvsched-fuzz",
    dependencies: [.package(name: "pvsched", path: "..")],
    targets: [
        .executableTarget(name: "FuzzELFLoader", dependencies: [.product(name: "PVSchedBPF", package: "pvsched")],
                          swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzBPFProgram", dependencies: [
            .product(name: "PVSchedBPF", package: "pvsched"), .product(name: "PVSchedABI", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzSharedArea", dependencies: [
            .product(name: "PVSchedCore", package: "pvsched"), .product(name: "PVSchedABI", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzGuestOutput", dependencies: [
            .product(name: "PVSchedAttach", package: "pvsched"), .product(name: "PVSchedControl", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzRegionWatch", dependencies: [
            .product(name: "PVSchedAttach", package: "pvsched"), .product(name: "PVSchedHost", package: "pvsched"),
            .product(name: "PVSchedCore", package: "pvsched"), .product(name: "PVSchedABI", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzDaemonConfig", dependencies: [.product(name: "PVSchedDaemon", package: "pvsched")],
                          swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzDomainXML", dependencies: [
            .product(name: "PVSchedDaemon", package: "pvsched"), .product(name: "PVSchedLibvirt", package: "pvsched"),
            .product(name: "PVSchedControl", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
        .executableTarget(name: "FuzzControlRequest", dependencies: [
            .product(name: "PVSchedControl", package: "pvsched"), .product(name: "PVSchedCore", package: "pvsched"),
        ], swiftSettings: fuzzFlags),
    ],
    swiftLanguageModes: [.v6]
)
