import Synchronization

/// How a map was declared (the legacy `struct bpf_map_def`).
public struct MapDefinition: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case hash = 1, array = 2 }
    public var name: String
    public var kind: Kind
    public var keySize: Int
    public var valueSize: Int
    public var maxEntries: Int
    public init(name: String, kind: Kind, keySize: Int, valueSize: Int, maxEntries: Int) {
        self.name = name; self.kind = kind; self.keySize = keySize; self.valueSize = valueSize; self.maxEntries = maxEntries
    }
}

/// A BPF map. Values live in one preallocated slab that is never freed while the
/// map exists, so a value pointer a program holds stays valid memory (a deleted
/// hash slot may be reused, as with the kernel's preallocated hash maps).
// @unchecked Sendable: the slab is fixed; programs update values with atomics or plain stores as kernel BPF does, the key index is locked.
public final class BPFMap: @unchecked Sendable {
    public let definition: MapDefinition
    let slab: UnsafeMutableRawPointer
    let slotSize: Int
    private struct HashState { var slots: [[UInt8]: Int] = [:]; var free: [Int] }
    private let hash: Mutex<HashState>

    /// Most maps one program may declare.
    public static let maxMaps = 64
    /// Most memory one map may take, and all of a program's maps together.
    public static let maxMapBytes = 16 << 20
    public static let maxTotalBytes = 64 << 20

    /// The memory a map with this definition takes; throws if a field is out of
    /// range or it would take more than `maxMapBytes`.
    public static func checkedFootprint(_ d: MapDefinition) throws(BPFError) -> Int {
        guard d.keySize > 0, d.keySize <= 512 else { throw .badMap(d.name, "key_size \(d.keySize) is outside 1...512") }
        guard d.valueSize > 0, d.valueSize <= 1 << 16 else { throw .badMap(d.name, "value_size \(d.valueSize) is outside 1...65536") }
        guard d.maxEntries > 0, d.maxEntries <= 1 << 20 else {
            throw .badMap(d.name, "max_entries \(d.maxEntries) is outside 1...\(1 << 20)")
        }
        let slot = (d.valueSize + 7) & ~7
        let perEntry = slot + (d.kind == .hash ? d.keySize + 64 : 0)
        let (bytes, overflow) = perEntry.multipliedReportingOverflow(by: d.maxEntries)
        guard !overflow, bytes <= maxMapBytes else {
            throw .badMap(d.name, "value_size \(d.valueSize) x max_entries \(d.maxEntries) needs more than the \(maxMapBytes >> 20) MiB a map may take")
        }
        return bytes
    }

    public init(_ d: MapDefinition) throws(BPFError) {
        _ = try Self.checkedFootprint(d)
        if d.kind == .array && d.keySize != 4 { throw .badMap(d.name, "an array map needs key_size 4") }
        definition = d
        slotSize = (d.valueSize + 7) & ~7
        slab = UnsafeMutableRawPointer.allocate(byteCount: slotSize * d.maxEntries, alignment: 8)
        slab.initializeMemory(as: UInt8.self, repeating: 0, count: slotSize * d.maxEntries)
        hash = Mutex(HashState(free: Array((0..<d.maxEntries).reversed())))
    }
    deinit { slab.deallocate() }

    /// Where this map's values lie, for the interpreter's memory checks.
    var valueWindow: MapWindow {
        MapWindow(base: UInt(bitPattern: slab), bytes: UInt(slotSize * definition.maxEntries), slotSize: UInt(slotSize),
                  valueSize: UInt(definition.valueSize))
    }

    private func slot(_ i: Int) -> UnsafeMutableRawPointer { slab + i * slotSize }

    /// The value stored under `key`, or nil.
    public func lookup(_ key: UnsafeRawBufferPointer) -> UnsafeMutableRawPointer? {
        switch definition.kind {
        case .array:
            let i = Int(key.loadUnaligned(as: UInt32.self))
            return i < definition.maxEntries ? slot(i) : nil
        case .hash:
            let k = Array(key)
            return hash.withLock { $0.slots[k] }.map(slot)
        }
    }

    /// Stores `value` under `key`; 0 or a negative errno (-E2BIG when full, -EINVAL).
    public func update(_ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer) -> Int64 {
        switch definition.kind {
        case .array:
            let i = Int(key.loadUnaligned(as: UInt32.self))
            guard i < definition.maxEntries else { return -7 }
            slot(i).copyMemory(from: value.baseAddress!, byteCount: definition.valueSize)
            return 0
        case .hash:
            let k = Array(key)
            let index: Int? = hash.withLock { h in
                if let i = h.slots[k] { return i }
                guard let i = h.free.popLast() else { return nil }
                h.slots[k] = i
                return i
            }
            guard let index else { return -7 }
            slot(index).copyMemory(from: value.baseAddress!, byteCount: definition.valueSize)
            return 0
        }
    }

    /// Deletes `key`; 0, -ENOENT, or -EINVAL for arrays.
    public func delete(_ key: UnsafeRawBufferPointer) -> Int64 {
        guard definition.kind == .hash else { return -22 }
        let k = Array(key)
        return hash.withLock { h in
            guard let i = h.slots.removeValue(forKey: k) else { return -2 }
            h.free.append(i)
            return 0
        }
    }

    /// Reads entry `key` (array index) as UInt64 words (for tests and the CLI).
    public func words(at index: UInt32) -> [UInt64] {
        var k = index
        guard let p = withUnsafeBytes(of: &k, { lookup($0) }) else { return [] }
        return (0..<definition.valueSize / 8).map { p.load(fromByteOffset: $0 * 8, as: UInt64.self) }
    }
}

/// The values of one map as the interpreter sees them: `bytes` from `base`, one
/// value of `valueSize` bytes at the start of every `slotSize` bytes.
struct MapWindow {
    let base: UInt, bytes: UInt, slotSize: UInt, valueSize: UInt

    /// Whether [address, address + size) lies inside one value.
    @inline(__always)
    func contains(_ address: UInt, _ size: UInt) -> Bool {
        let offset = address &- base  // wraps around below base
        return offset < bytes && size <= valueSize && offset % slotSize <= valueSize - size
    }
}
