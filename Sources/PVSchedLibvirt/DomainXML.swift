/// What pvsched reads from a libvirt domain's XML: the pvsched region among its
/// devices (`<shmem name='pvsched-…'>`, which libvirt backs with `/dev/shm/NAME`)
/// and the domain's own pvsched settings in its metadata:
///
/// ```xml
/// <metadata>
///   <pvsched:pvsched xmlns:pvsched="https://pvsched.dev/xmlns/libvirt/1"
///                    driver="deadline-boost" boost="slice:100" governor="vm-share=0.3,critical-budget-us=3000"/>
/// </metadata>
/// ```
///
/// The XML comes from libvirtd, but whoever may define domains writes it: every
/// value is checked where it is used, and the scan is bounded and never fails on
/// malformed text (it finds less).
public struct DomainXML: Sendable {
    /// The namespace of pvsched's metadata element.
    public static let namespace = "https://pvsched.dev/xmlns/libvirt/1"
    /// Longest XML looked at.
    public static let maxBytes = 4 << 20

    /// One start tag: its name and attributes (entities decoded).
    public struct Element: Sendable, Equatable {
        public var name: String
        public var attributes: [String: String]
    }

    public let elements: [Element]

    public init(_ xml: String) {
        elements = Self.scan(Array(xml.utf8.prefix(Self.maxBytes)))
    }

    /// The pvsched regions' names (`<shmem name='pvsched-…'>`), in document order.
    public var pvschedRegions: [String] {
        elements.filter { $0.name == "shmem" }.compactMap { $0.attributes["name"] }.filter { Self.isRegionName($0) }
    }

    /// A region name libvirt turns into `/dev/shm/NAME`: `pvsched-` and then letters,
    /// digits, '.', '_' and '-' (at most 200 bytes).
    public static func isRegionName(_ name: String) -> Bool {
        name.hasPrefix("pvsched-") && name.utf8.count <= 200
            && name.utf8.allSatisfy { ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) || $0 == 0x2E || $0 == 0x5F || $0 == 0x2D }
    }

    /// The attributes of the pvsched metadata element (nil: none), found by its
    /// namespace whatever prefix the XML gives it.
    public var pvschedSettings: [String: String]? {
        var prefixes: Set<String> = []
        for e in elements {
            for (k, v) in e.attributes where k.hasPrefix("xmlns:") && v == Self.namespace { prefixes.insert(String(k.dropFirst(6))) }
        }
        for e in elements {
            guard let colon = e.name.firstIndex(of: ":"), e.name[e.name.index(after: colon)...] == "pvsched",
                  prefixes.contains(String(e.name[..<colon])) else { continue }
            return e.attributes.filter { !$0.key.hasPrefix("xmlns") }
        }
        return nil
    }

    /// The start tags of `bytes`, skipping comments, CDATA, declarations and end tags.
    static func scan(_ b: [UInt8]) -> [Element] {
        var out: [Element] = []
        var i = 0
        let n = b.count
        func isSpace(_ c: UInt8) -> Bool { c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D }
        func isNameByte(_ c: UInt8) -> Bool { !isSpace(c) && c != 0x3E && c != 0x2F && c != 0x3D && c != 0x3C }
        func skip(past marker: [UInt8], from start: Int) -> Int {
            var j = start
            while j + marker.count <= n {
                if b[j..<(j + marker.count)].elementsEqual(marker) { return j + marker.count }
                j += 1
            }
            return n
        }
        while i < n && out.count < 100_000 {
            guard b[i] == 0x3C else { i += 1; continue }  // '<'
            if i + 3 < n, b[i + 1] == 0x21, b[i + 2] == 0x2D, b[i + 3] == 0x2D { i = skip(past: Array("-->".utf8), from: i + 4); continue }
            if i + 8 < n, b[(i + 1)..<(i + 9)].elementsEqual("![CDATA[".utf8) { i = skip(past: Array("]]>".utf8), from: i + 9); continue }
            if i + 1 < n, b[i + 1] == 0x3F || b[i + 1] == 0x21 || b[i + 1] == 0x2F { i = skip(past: [0x3E], from: i + 1); continue }
            var j = i + 1
            while j < n && isNameByte(b[j]) { j += 1 }
            guard j > i + 1 else { i += 1; continue }
            let name = String(decoding: b[(i + 1)..<j], as: UTF8.self)
            var attributes: [String: String] = [:]
            while j < n {
                while j < n && isSpace(b[j]) { j += 1 }
                guard j < n, b[j] != 0x3E, b[j] != 0x2F else { break }
                let k0 = j
                while j < n && isNameByte(b[j]) { j += 1 }
                let key = String(decoding: b[k0..<j], as: UTF8.self)
                while j < n && isSpace(b[j]) { j += 1 }
                guard j < n, b[j] == 0x3D, !key.isEmpty else { break }  // '='
                j += 1
                while j < n && isSpace(b[j]) { j += 1 }
                guard j < n, b[j] == 0x22 || b[j] == 0x27 else { break }
                let quote = b[j]
                let v0 = j + 1
                j = v0
                while j < n && b[j] != quote { j += 1 }
                if attributes.count < 64 { attributes[key] = decodeEntities(String(decoding: b[v0..<min(j, n)], as: UTF8.self)) }
                j += 1
            }
            out.append(Element(name: name, attributes: attributes))
            i = skip(past: [0x3E], from: j)
        }
        return out
    }

    /// XML's five named entities and numeric references (others are left as they are).
    public static func decodeEntities(_ s: String) -> String {
        guard s.contains("&") else { return s }
        var out = ""
        var rest = Substring(s)
        while let amp = rest.firstIndex(of: "&") {
            out += rest[..<amp]
            guard let semi = rest[amp...].prefix(12).firstIndex(of: ";") else { out += rest[amp...]; return out }
            let entity = rest[rest.index(after: amp)..<semi]
            switch entity {
            case "amp": out += "&"
            case "lt": out += "<"
            case "gt": out += ">"
            case "quot": out += "\""
            case "apos": out += "'"
            default:
                if entity.hasPrefix("#x"), let v = UInt32(entity.dropFirst(2), radix: 16), let u = Unicode.Scalar(v) { out.unicodeScalars.append(u) }
                else if entity.hasPrefix("#"), let v = UInt32(entity.dropFirst()), let u = Unicode.Scalar(v) { out.unicodeScalars.append(u) }
                else { out += rest[amp...semi] }
            }
            rest = rest[rest.index(after: semi)...]
        }
        return out + rest
    }
}
