import Foundation
import PackagePlugin

/// Builds the Embedded Swift guest kernel (Guest/), the sample BPF driver and the
/// kernel BPF event source (BPF/) during `swift build` with the toolchain's own swiftc, clang, ld.lld and
/// llvm-objcopy, and embeds both in the target as a generated Swift source.
@main
struct GuestImagePlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let bin = try context.tool(named: "swiftc").url.deletingLastPathComponent()
        let root = context.package.directoryURL
        let guest = root.appending(path: "Guest")
        let abi = root.appending(path: "Sources/PVSchedABI/include")
        let bpf = root.appending(path: "BPF")
        let events = root.appending(path: "Sources/CKernelEvents/include")
        let work = context.pluginWorkDirectoryURL.appending(path: "guest-build")
        let output = context.pluginWorkDirectoryURL.appending(path: "GeneratedGuestImage.swift")
        var inputs: [URL] = []
        for dir in [guest, abi, bpf, events] {
            let files = FileManager.default.enumerator(at: dir, includingPropertiesForKeys: nil)
            while let f = files?.nextObject() as? URL {
                if !f.hasDirectoryPath { inputs.append(f) }
            }
        }
        return [.buildCommand(
            displayName: "Building the pvsched guest kernel (Embedded Swift)",
            executable: URL(fileURLWithPath: "/bin/bash"),
            arguments: [guest.appending(path: "build.sh").path, bin.path, guest.path, abi.path, work.path, output.path],
            inputFiles: inputs,
            outputFiles: [output])]
    }
}
