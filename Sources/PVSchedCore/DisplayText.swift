/// Text from outside (a guest's protocol name, a request's strings, a VMM's
/// version, a domain's name) made safe to show on an operator's terminal or in a
/// log line: control characters (C0, DEL, C1), which a terminal would obey (colour,
/// title, clipboard, cursor), and the bidirectional overrides that reorder what is
/// shown are written as `\xNN` / `\u{NNNN}` escapes instead.
extension String {
    public var escapedForDisplay: String {
        guard unicodeScalars.contains(where: Self.mustEscape) else { return self }
        var out = ""
        out.reserveCapacity(utf8.count + 8)
        for c in unicodeScalars {
            if Self.mustEscape(c) {
                out += c.value < 0x100 ? "\\x" + Self.hex(c.value, 2) : "\\u{" + Self.hex(c.value, 4) + "}"
            } else {
                out.unicodeScalars.append(c)
            }
        }
        return out
    }

    /// Whether `c` would change what a terminal shows rather than be shown.
    static func mustEscape(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x00...0x1F, 0x7F...0x9F: return true               // C0, DEL, C1 controls
        case 0x202A...0x202E, 0x2066...0x2069, 0x200E, 0x200F: return true  // bidi overrides and marks
        default: return false
        }
    }

    private static func hex(_ v: UInt32, _ width: Int) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: Swift.max(0, width - s.count)) + s
    }
}
