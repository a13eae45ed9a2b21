import Foundation
import PVSchedControl
import PVSchedCore
import PVSchedDaemon
import PVSchedHost
import Testing
import PVSchedTesting

/// A host with the built-ins and a recording actuator, served by a handler.
func makeHandler() throws -> ControlHandler {
    try ControlHandler(host: try PVSchedHost(actuator: RecordingActuator()))
}

func request(_ method: String, _ params: [String: JSON] = [:], id: Int64 = 1) -> [UInt8] {
    ControlRequest.encode(id: id, method: method, params: params)
}

func parse(_ bytes: [UInt8]) throws -> JSON { try JSON.parse(bytes) }

@Suite struct ControlProtocolTests {
    @Test func listsDriversLikeTheSysctl() throws {
        let h = try makeHandler()
        let r = try parse(h.respond(to: request("drivers.list")))
        #expect(r["ok"] == true)
        let names = r["result"]?.arrayValue?.compactMap { $0["name"]?.stringValue }
        #expect(names == ["nop", "latency-boost", "deadline-boost", "static-rt"])
        #expect(r["result"]?.arrayValue?.first { $0["default"] == true }?["name"] == "latency-boost")
    }

    @Test(arguments: [
        ("not json", "parse_error", ""),
        ("[1,2]", "invalid_request", ""),
        (#"{"method":"vm.list"}"#, "invalid_request", "pvsched"),
        (#"{"pvsched":2,"method":"vm.list"}"#, "unsupported_version", "pvsched"),
        (#"{"pvsched":1}"#, "invalid_request", "method"),
        (#"{"pvsched":1,"method":"vm.explode"}"#, "unknown_method", "method"),
        (#"{"pvsched":1,"method":"vm.list","extra":1}"#, "invalid_request", "extra"),
        (#"{"pvsched":1,"method":"vm.list","params":[1]}"#, "invalid_params", "params"),
        (#"{"pvsched":1,"method":"vm.list","params":{"bogus":1}}"#, "invalid_params", "params.bogus"),
        (#"{"pvsched":1,"method":"vm.start","params":{"vcpus":0}}"#, "invalid_params", "params.vcpus"),
        (#"{"pvsched":1,"method":"vm.start","params":{"vcpus":"2"}}"#, "invalid_params", "params.vcpus"),
        (#"{"pvsched":1,"method":"vm.start","params":{"workload":"mine"}}"#, "invalid_params", "params.workload"),
        (#"{"pvsched":1,"method":"vm.start","params":{"maxVMShare":1.5}}"#, "invalid_params", "params.maxVMShare"),
        (#"{"pvsched":1,"method":"vm.driver.replace","params":{"vm":"nope","driver":"nop"}}"#, "not_found", "params.vm"),
        (#"{"pvsched":1,"method":"bpf.load","params":{"object":"%%%"}}"#, "invalid_params", "params.object"),
        (#"{"pvsched":1,"method":"bpf.load","params":{"object":"AAAA"}}"#, "invalid_params", "params.object"),
        (#"{"pvsched":1,"method":"bpf.unload","params":{"name":"nop"}}"#, "conflict", "params.name"),
        (#"{"pvsched":1,"method":"drivers.set_default","params":{}}"#, "invalid_params", "params.name"),
        (#"{"pvsched":1,"method":"thread.boost","params":{"tid":-4}}"#, "invalid_params", "params.tid"),
        (#"{"pvsched":1,"id":[1],"method":"vm.list"}"#, "invalid_request", "id"),
    ])
    func badRequestsGetAnErrorNamingTheField(line: String, code: String, field: String) throws {
        let h = try makeHandler()
        let r = try parse(h.respond(to: Array(line.utf8)))
        #expect(r["ok"] == false)
        #expect(r["error"]?["code"]?.stringValue == code)
        #expect(r["error"]?["field"]?.stringValue == field)
        #expect(r["pvsched"] == 1)
    }

    @Test func oversizedRequestIsRefused() throws {
        let h = try makeHandler()
        let big = [UInt8](repeating: UInt8(ascii: " "), count: ControlProtocol.maxRequestBytes + 1)
        let r = try parse(h.respond(to: big))
        #expect(r["error"]?["code"] == "too_large")
    }

    @Test func responsesCarryTheRequestID() throws {
        let h = try makeHandler()
        let r = try parse(h.respond(to: Array(#"{"pvsched":1,"id":"abc","method":"daemon.info"}"#.utf8)))
        #expect(r["id"] == "abc")
        #expect(r["result"]?["protocol"] == 1)
    }

    @Test func defaultDriverCanBeSetAndCleared() throws {
        let h = try makeHandler()
        var r = try parse(h.respond(to: request("drivers.set_default", ["name": "nop"])))
        #expect(r["result"]?["previous"] == "latency-boost")
        r = try parse(h.respond(to: request("drivers.set_default", ["name": .null])))
        #expect(r["result"]?["previous"] == "nop")
        #expect(h.host.registry.defaultDriverName == nil)
    }

    /// Every method is documented in the schema file.
    @Test func schemaDocumentsEveryMethod() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let schema = try String(contentsOf: root.appendingPathComponent("docs/control-api.md"), encoding: .utf8)
        for m in ControlProtocol.methods { #expect(schema.contains("### `\(m)`"), "\(m) is not documented") }
        for c in ["parse_error", "invalid_request", "unsupported_version", "unknown_method", "invalid_params", "not_found",
                  "conflict", "failed", "too_large", "permission_denied", "busy"] {
            #expect(schema.contains("`\(c)`"), "error code \(c) is not documented")
        }
    }
}
