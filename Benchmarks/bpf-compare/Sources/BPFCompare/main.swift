// Prints one line per kernel: "<ns per op>\t<name>". Exits non-zero if one fails.
// Arguments: [REPS] [NAME-PREFIX] (only kernels whose name starts with it).
#if canImport(Glibc)
import Glibc
#endif

let reps = CommandLine.arguments.count > 1 ? Int(CommandLine.arguments[1]) ?? 5 : 5
var failed = false
let only = CommandLine.arguments.count > 2 ? CommandLine.arguments[2] : ""
for kernel in BPFKernel.all where kernel.name.hasPrefix(only) {
    do {
        let ns = try kernel.measure(reps: reps)
        print("\(ns)\t\(kernel.name) (ns per \(kernel.unit))")
    } catch {
        print("error\t\(kernel.name): \(error)")
        failed = true
    }
}
exit(failed ? 1 : 0)
