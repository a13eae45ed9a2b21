/// The pvsched guest kernel image (built from Guest/ during `swift build`),
/// a flat binary loaded at PVSCHED_GPA_KERNEL and entered in long mode.
public enum GuestImage {
    /// The kernel image bytes.
    public static let kernel: [UInt8] = decodeBase64(GeneratedGuestImage.base64)
    /// The sample BPF driver (BPF/latency_boost.bpf.c) as an ELF object, built by the same plugin.
    public static let sampleBPFDriver: [UInt8] = decodeBase64(GeneratedGuestImage.sampleBPF)
    /// The deadline-aware policy as a BPF driver (BPF/deadline_boost.bpf.c).
    public static let deadlineBPFDriver: [UInt8] = decodeBase64(GeneratedGuestImage.deadlineBPF)
    /// The kernel BPF event source for attached VMs (BPF/kvm_events.bpf.c), built by the same plugin.
    public static let kvmEventsBPF: [UInt8] = decodeBase64(GeneratedGuestImage.kvmEventsBPF)

    static func decodeBase64(_ text: StaticString) -> [UInt8] {
        var table = [UInt8](repeating: 0xFF, count: 256)
        for (i, c) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8.enumerated() {
            table[Int(c)] = UInt8(i)
        }
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8CodeUnitCount * 3 / 4)
        var acc: UInt32 = 0, bits = 0
        text.withUTF8Buffer { buf in
            for c in buf {
                let v = table[Int(c)]
                if v == 0xFF { continue }  // '=' padding
                acc = acc << 6 | UInt32(v)
                bits += 6
                if bits >= 8 {
                    bits -= 8
                    out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
                }
            }
        }
        return out
    }
}
