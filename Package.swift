// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "pvsched",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "pvsched", targets: ["pvsched"]),
        .executable(name: "pvsched-lab", targets: ["pvsched-lab"]),
        .library(name: "PVSchedCore", targets: ["PVSchedCore"]),
        .library(name: "PVSchedDrivers", targets: ["PVSchedDrivers"]),
        .library(name: "PVSchedLinux", targets: ["PVSchedLinux"]),
        .library(name: "PVSchedKVM", targets: ["PVSchedKVM"]),
        .library(name: "PVSchedBPF", targets: ["PVSchedBPF"]),
        .library(name: "PVSchedControl", targets: ["PVSchedControl"]),
        .library(name: "PVSchedABI", targets: ["PVSchedABI"]),
        .library(name: "PVSchedAttach", targets: ["PVSchedAttach"]),
        .library(name: "PVSchedHost", targets: ["PVSchedHost"]),
        .library(name: "PVSchedDaemon", targets: ["PVSchedDaemon"]),
        .library(name: "PVSchedLibvirt", targets: ["PVSchedLibvirt"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.2.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.60.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        // The guest/host protocol ABI: one C header, the single source of truth.
        .target(name: "PVSchedABI"),
        // The host component: shared-area view, drivers, registry, governor, actuator protocol.
        .target(name: "PVSchedCore", dependencies: [
            "PVSchedABI",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // Built-in drivers.
        .target(name: "PVSchedDrivers", dependencies: ["PVSchedCore"]),
        // Linux actuator: sched_setattr on vCPU threads, restore on exit and signals.
        .target(name: "CLinuxSched"),
        // Socket, credential, pidfd, lock-file and spawn wrappers for the host service and the guardian.
        .target(name: "CHostService"),
        .target(name: "PVSchedLinux", dependencies: [
            "PVSchedCore", "CLinuxSched", "CHostService",
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The kvm component: a VMM on /dev/kvm that notifies pvsched drivers.
        .target(name: "CKVM"),
        .target(name: "PVSchedKVM", dependencies: [
            "PVSchedCore", "PVSchedABI", "CKVM",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The build's version and git revision, generated before every build.
        .plugin(name: "BuildInfoPlugin", capability: .buildTool()),
        .target(name: "PVSchedBuildInfo", plugins: ["BuildInfoPlugin"]),
        // The guest component: the Embedded Swift kernel in Guest/, built and embedded by a plugin.
        .plugin(name: "GuestImagePlugin", capability: .buildTool()),
        .target(name: "PVSchedGuestImage", plugins: ["GuestImagePlugin"]),
        // BPF drivers: ELF loader, verifier, interpreter, maps and the driver adapter.
        .target(name: "PVSchedBPF", dependencies: [
            "PVSchedCore", "PVSchedABI",
            .product(name: "Atomics", package: "swift-atomics"),
        ]),
        // The host kernel's BPF (bpf syscall), an oracle for differential tests.
        .target(name: "CKernelBPF"),
        // The composition root: registry + built-in drivers + actuator + VM sessions.
        .target(name: "PVSchedHost", dependencies: [
            "PVSchedCore", "PVSchedDrivers", "PVSchedLinux", "PVSchedKVM", "PVSchedBPF", "PVSchedControl", "PVSchedABI",
            "PVSchedAttach", "PVSchedKernelEvents", "PVSchedGuestImage",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Atomics", package: "swift-atomics"),
        ]),
        // KVM events from the host kernel (BPF/kvm_events.bpf.c through libbpf) for attached VMs.
        .target(name: "CKernelEvents", linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "PVSchedKernelEvents", dependencies: ["PVSchedCore", "CKernelEvents"]),
        // libvirt's domains (libvirt.so.0 opened at run time): running domains, their XML
        // (the pvsched region and metadata), lifecycle events.
        .target(name: "CLibvirt", linkerSettings: [.linkedLibrary("dl"), .linkedLibrary("pthread")]),
        .target(name: "PVSchedLibvirt", dependencies: ["CLibvirt", "PVSchedAttach"]),
        // Attaching to VMs another VMM runs: QMP, vCPU threads by name, the ivshmem
        // transport and the watcher that delivers events when no exits are seen.
        .target(name: "PVSchedAttach", dependencies: [
            "PVSchedCore", "PVSchedABI", "PVSchedControl", "PVSchedLinux", "CHostService", "CLinuxSched",
            .product(name: "Atomics", package: "swift-atomics"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The control protocol (newline-delimited JSON) and its client.
        .target(name: "PVSchedControl", dependencies: ["CHostService", "PVSchedCore"]),
        // The host service: control socket, request handling, metrics endpoint.
        .target(name: "PVSchedDaemon", dependencies: [
            "PVSchedCore", "PVSchedHost", "PVSchedControl", "PVSchedKVM", "PVSchedBPF", "PVSchedGuestImage", "CHostService",
            "PVSchedLinux", "PVSchedKernelEvents", "PVSchedAttach", "PVSchedBuildInfo", "PVSchedLibvirt",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        // The experiment harness behind `pvsched demo` and `pvsched bench`.
        .target(name: "PVSchedExperiments", dependencies: [
            "PVSchedCore", "PVSchedDrivers", "PVSchedLinux", "PVSchedKVM", "PVSchedGuestImage", "PVSchedBPF", "PVSchedHost",
            "PVSchedControl", "PVSchedDaemon", "CHostService", "PVSchedKernelEvents", "PVSchedTesting", "PVSchedAttach",
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The command-line tool and the daemon (one binary). `demo` and `bench` run the lab,
        // which it does not link.
        .executableTarget(name: "pvsched", dependencies: [
            "PVSchedCore", "PVSchedDrivers", "PVSchedLinux", "PVSchedKVM", "PVSchedGuestImage", "CLinuxSched",
            "PVSchedBPF", "PVSchedHost", "PVSchedControl", "PVSchedDaemon", "PVSchedBuildInfo",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The lab: `pvsched demo` and `pvsched bench` over the libraries, in its own executable.
        .executableTarget(name: "pvsched-lab", dependencies: [
            "PVSchedCore", "PVSchedExperiments", "PVSchedHost",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        // Test support: requirement checks (PVSCHED_REQUIRE_*), running the built binary,
        // the stand-in guest; `pvsched-standin` runs a stand-in VMM process for tests and the lab.
        .target(name: "PVSchedTesting", dependencies: ["PVSchedCore", "PVSchedABI", "CLinuxSched", "PVSchedControl", .product(name: "Atomics", package: "swift-atomics")]),
        .executableTarget(name: "pvsched-standin", dependencies: [
            "PVSchedTesting", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "PVSchedDaemonTests", dependencies: [
            "PVSchedDaemon", "PVSchedControl", "PVSchedHost", "PVSchedCore", "PVSchedLinux", "PVSchedTesting",
            "PVSchedExperiments", "PVSchedAttach", "PVSchedABI", "PVSchedLibvirt", "PVSchedKernelEvents", "PVSchedGuestImage",
        ]),
        .testTarget(name: "PVSchedAttachTests", dependencies: [
            "PVSchedAttach", "PVSchedCore", "PVSchedHost", "PVSchedTesting", "PVSchedABI", "PVSchedLinux",
        ]),
        .testTarget(name: "PVSchedCoreTests", dependencies: ["PVSchedCore", "PVSchedABI", "PVSchedTesting"]),
        .testTarget(name: "PVSchedDriversTests", dependencies: ["PVSchedDrivers", "PVSchedCore", "PVSchedTesting"]),
        .testTarget(name: "PVSchedLinuxTests", dependencies: ["PVSchedLinux", "PVSchedCore", "CLinuxSched", "PVSchedTesting"]),
        .testTarget(name: "PVSchedBPFTests", dependencies: [
            "PVSchedBPF", "PVSchedCore", "PVSchedDrivers", "PVSchedABI", "CKernelBPF", "PVSchedKVM", "PVSchedGuestImage", "PVSchedHost", "PVSchedTesting",
        ]),
        .testTarget(name: "PVSchedKVMTests", dependencies: [
            "PVSchedKVM", "PVSchedCore", "PVSchedDrivers", "PVSchedLinux", "PVSchedGuestImage", "PVSchedABI", "PVSchedHost",
            "PVSchedTesting",
        ]),
    ],
    swiftLanguageModes: [.v6]
)
