/// The build's identity: `PVSchedVersion` is generated into this module by
/// `Plugins/BuildInfoPlugin` (scripts/build-info.sh) before every build.
public enum PVSchedBuild {
    /// "VERSION (REVISION)", as `pvsched --version` prints it.
    public static var description: String { "\(PVSchedVersion.version) (\(PVSchedVersion.revision))" }
}
