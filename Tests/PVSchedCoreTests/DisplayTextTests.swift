import PVSchedCore
import Testing

/// Text from outside is shown, not obeyed.
struct DisplayTextTests {
    @Test func controlsAndBidiOverridesAreEscapedAndTheRestLeftAlone() {
        #expect("plain vm-1 µs".escapedForDisplay == "plain vm-1 µs")
        #expect("\u{1B}[31mred".escapedForDisplay == "\\x1b[31mred")
        #expect("a\u{07}b\nc\u{7F}".escapedForDisplay == "a\\x07b\\x0ac\\x7f")
        #expect("\u{9B}2J".escapedForDisplay == "\\x9b2J")
        #expect("abc\u{202E}fed".escapedForDisplay == "abc\\u{202e}fed")
    }
}
