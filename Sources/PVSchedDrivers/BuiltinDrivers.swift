import PVSchedCore

/// The drivers that ship with pvsched.
public enum BuiltinDrivers {
    /// Registers `nop`, `latency-boost`, `deadline-boost` and `static-rt`, and makes
    /// `latency-boost` the default.
    public static func registerAll(in registry: DriverRegistry) throws(RegistryError) {
        try registry.register(NopDriver())
        try registry.register(LatencyBoostDriver())
        try registry.register(DeadlineBoostDriver())
        try registry.register(StaticRTDriver())
        try registry.setDefault("latency-boost")
    }
}
