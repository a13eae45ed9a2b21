import PVSchedCore

let testVM = VMHandle(id: 1, name: "test", vcpuCount: 2)
