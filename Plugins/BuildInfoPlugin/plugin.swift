import Foundation
import PackagePlugin

/// Writes the build's version (the VERSION file) and git revision into the
/// `PVSchedBuildInfo` module before every build (a prebuild command: the revision
/// changes without any input file changing). The file is rewritten only when its
/// text changes, so an unchanged tree does not recompile.
@main
struct BuildInfoPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let root = context.package.directoryURL
        let out = context.pluginWorkDirectoryURL.appending(path: "generated")
        return [.prebuildCommand(
            displayName: "Recording pvsched's version and git revision",
            executable: URL(fileURLWithPath: "/bin/sh"),
            arguments: [root.appending(path: "scripts/build-info.sh").path, root.path, out.appending(path: "GeneratedVersion.swift").path],
            outputFilesDirectory: out)]
    }
}
