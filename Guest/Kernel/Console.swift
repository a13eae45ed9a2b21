import GuestSupport
import PVSchedABI

/// Console output on port 0xE9 without allocating (the kernel heap never frees).
enum Console {
    static func put(_ s: StaticString) {
        s.withUTF8Buffer { for b in $0 { outb(UInt16(PVSCHED_PORT_CONSOLE), b) } }
    }
    static func put(_ v: UInt64) {
        var digits: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
                     UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8) =
            (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        var n = v, count = 0
        withUnsafeMutableBytes(of: &digits) { d in
            repeat { d[count] = UInt8(48 + n % 10); n /= 10; count += 1 } while n > 0
            while count > 0 { count -= 1; outb(UInt16(PVSCHED_PORT_CONSOLE), d[count]) }
        }
    }
    static func put(_ v: UInt32) { put(UInt64(v)) }
    static func hex(_ v: UInt64) {
        put("0x")
        var started = false
        for i in stride(from: 60, through: 0, by: -4) {
            let nibble = UInt8((v >> UInt64(i)) & 0xF)
            if nibble != 0 || started || i == 0 {
                started = true
                outb(UInt16(PVSCHED_PORT_CONSOLE), nibble < 10 ? 48 + nibble : 87 + nibble)
            }
        }
    }
    static func line(_ s: StaticString) { put(s); put("\n") }
}
