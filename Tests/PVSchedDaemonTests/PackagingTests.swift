import Foundation
import PVSchedControl
import PVSchedTesting
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The checkout's root (Tests/PVSchedDaemonTests/ is two levels down).
let checkoutRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// Runs `argv` and returns its result (the program found on PATH when not a path).
func run(_ argv: [String], timeout: Double = 600) throws -> CommandResult {
    let program = argv[0].hasPrefix("/") ? argv[0] : (Requirement.executable(argv[0]) ?? argv[0])
    return try PVSchedBinary.run(program, Array(argv.dropFirst()), timeout: timeout)
}

/// The Debian packages as an operator gets them: built by scripts/package.sh from
/// this checkout, installed with dpkg, their units verified by systemd, the guest
/// module built by DKMS for the installed kernel headers. CI builds them once
/// (`PVSCHED_PACKAGE_DIR`); without it this test builds them itself (minutes).
@Suite(.serialized, .enabled(if: Requirement.packaging.shouldRun, "needs root, dpkg-deb, dkms and systemd-analyze"))
struct PackagingTests {
    static var version: String {
        (try? String(contentsOfFile: checkoutRoot + "/VERSION", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
    }

    static func installed(_ package: String) -> Bool {
        (try? run(["dpkg-query", "-W", "-f=${Status}", package]))?.stdout.contains("install ok installed") == true
    }

    @Test func bothPackagesBuildInstallAndWork() throws {
        try Requirement.packaging.check()
        var dir = ProcessInfo.processInfo.environment["PVSCHED_PACKAGE_DIR"] ?? ""
        var scratch: String?
        if dir.isEmpty {
            dir = "/tmp/pvsched-it-packages-\(getpid())"
            scratch = dir
            let built = try run(["/bin/bash", checkoutRoot + "/scripts/package.sh", dir], timeout: 1500)
            #expect(built.status == 0, "\(built.stderr)")
        }
        defer { if let scratch { try? FileManager.default.removeItem(atPath: scratch) } }
        let host = "\(dir)/pvsched_\(Self.version)_amd64.deb", guest = "\(dir)/pvsched-guest-dkms_\(Self.version)_all.deb"
        #expect(FileManager.default.fileExists(atPath: host) && FileManager.default.fileExists(atPath: guest), "\(dir)")

        // What the host package declares and holds.
        let control = try run(["dpkg-deb", "-f", host])
        #expect(control.stdout.contains("Depends:") && control.stdout.contains("libbpf1"), "\(control.stdout)")
        #expect(control.stdout.contains("Recommends: libvirt0"), "\(control.stdout)")
        let files = try run(["dpkg-deb", "-c", host]).stdout
        for f in ["./usr/bin/pvsched", "./lib/systemd/system/pvsched.service", "./lib/systemd/system/pvsched.socket",
                  "./etc/pvsched/pvsched.conf", "./usr/share/man/man1/pvsched.1.gz", "./usr/share/bash-completion/completions/pvsched",
                  "./usr/share/zsh/vendor-completions/_pvsched", "./usr/share/fish/vendor_completions.d/pvsched.fish",
                  "./usr/lib/pvsched/bpf/kvm_events.bpf.o", "./usr/lib/pvsched/bpf/latency_boost.bpf.o", "./usr/share/doc/pvsched/README.md"] {
            #expect(files.contains(f), "the host package lacks \(f)")
        }
        let guestFiles = try run(["dpkg-deb", "-c", guest]).stdout
        for f in ["/usr/src/pvsched-guest-\(Self.version)/dkms.conf", "/usr/src/pvsched-guest-\(Self.version)/pvsched_guest.c",
                  "/usr/src/pvsched-guest-\(Self.version)/include/pvsched_abi.h", "./etc/modprobe.d/pvsched-guest.conf"] {
            #expect(guestFiles.contains(f), "the guest package lacks \(f)")
        }

        // Installed as an operator installs them; removed afterwards unless they were there before.
        let hadHost = Self.installed("pvsched"), hadGuest = Self.installed("pvsched-guest-dkms")
        defer {
            if !hadGuest { _ = try? run(["dpkg", "--purge", "pvsched-guest-dkms"]) }
            if !hadHost { _ = try? run(["dpkg", "--purge", "pvsched"]) }
        }
        let install = try run(["dpkg", "-i", host, guest], timeout: 900)
        #expect(install.status == 0, "\(install.stdout)\n\(install.stderr)")
        let version = try run(["/usr/bin/pvsched", "--version"])
        #expect(version.status == 0 && version.stdout.hasPrefix(Self.version + " ("), "\(version.stdout)")
        let verify = try run(["systemd-analyze", "verify", "/lib/systemd/system/pvsched.service", "/lib/systemd/system/pvsched.socket"])
        #expect(verify.status == 0 && verify.stderr.isEmpty, "\(verify.stderr)")
        let check = try run(["/usr/bin/pvsched", "config", "check", "/etc/pvsched/pvsched.conf"])
        #expect(check.status == 0, "\(check.stderr)")
        #expect(try run(["getent", "group", "pvsched"]).status == 0, "the read group was not made")

        // DKMS built the module for every kernel with headers (the cloud kernel's here).
        let kernels = (try? FileManager.default.contentsOfDirectory(atPath: "/lib/modules"))?
            .filter { FileManager.default.fileExists(atPath: "/lib/modules/\($0)/build") } ?? []
        #expect(!kernels.isEmpty, "no kernel headers installed")
        let status = try run(["dkms", "status", "pvsched-guest/\(Self.version)"]).stdout
        for k in kernels {
            #expect(status.contains("pvsched-guest/\(Self.version), \(k), x86_64: installed"), "\(status)")
            let info = try run(["modinfo", "-k", k, "pvsched_guest"]).stdout
            // Loaded at boot when the ivshmem device is there: its PCI id as the module's alias.
            #expect(info.contains("alias:          pci:v00001AF4d00001110"), "\(info)")
            #expect(info.contains("parm:           deadlines"), "\(info)")
        }
    }
}

/// The node agent's manifests, the dashboard and the KubeVirt hook, checked offline.
@Suite(.serialized)
struct DeployTests {
    static let deploy = checkoutRoot + "/deploy"

    @Test(.enabled(if: Requirement.manifests.shouldRun, "needs python3 and kubernetes-validate"))
    func theManifestsValidateAndFitTogether() throws {
        try Requirement.manifests.check()
        let manifests = ["kubernetes/pvsched-node-agent.yaml", "kubernetes/pvsched-servicemonitor.yaml",
                         "kubevirt/pvsched-hook-configmap.yaml", "kubevirt/example-vmi.yaml"].map { "\(Self.deploy)/\($0)" }
        let v = try run(["kubernetes-validate", "--strict"] + manifests, timeout: 120)
        #expect(v.status == 0, "\(v.stdout)\n\(v.stderr)")
        #expect(v.stdout.components(separatedBy: "passed for resource").count - 1 >= 5, "\(v.stdout)")
        // The custom resources have no schema offline: what ties them together is checked here.
        let script = """
        import json, sys, yaml
        d = sys.argv[1]
        agent = list(yaml.safe_load_all(open(d + "/kubernetes/pvsched-node-agent.yaml")))
        kinds = {o["kind"]: o for o in agent}
        ds, svc, cm = kinds["DaemonSet"], kinds["Service"], kinds["ConfigMap"]
        pod = ds["spec"]["template"]["spec"]
        assert pod["hostPID"] is True, "hostPID"
        c = pod["containers"][0]
        caps = set(c["securityContext"]["capabilities"]["add"])
        assert {"SYS_NICE", "SYS_ADMIN"} <= caps or {"SYS_NICE", "BPF", "PERFMON"} <= caps, caps
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        for p in ["/dev/shm", "/sys/kernel/btf", "/run/libvirt", "/etc/pvsched"]:
            assert p in mounts, "mount " + p
        assert "discover = yes" in cm["data"]["pvsched.conf"], "discover"
        sm = yaml.safe_load(open(d + "/kubernetes/pvsched-servicemonitor.yaml"))
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(), "ServiceMonitor selects the Service"
        assert sm["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]], "endpoint port"
        assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(), "Service selects the pods"
        vmi = yaml.safe_load(open(d + "/kubevirt/example-vmi.yaml"))
        a = vmi["metadata"]["annotations"]
        assert a["pvsched.io/enabled"] == "true"
        hooks = json.loads(a["hooks.kubevirt.io/hookSidecars"])
        hook_cm = yaml.safe_load(open(d + "/kubevirt/pvsched-hook-configmap.yaml"))
        assert hooks[0]["configMap"]["name"] == hook_cm["metadata"]["name"], "the VMI names the hook's ConfigMap"
        assert hooks[0]["configMap"]["key"] in hook_cm["data"], "and its key"
        assert hook_cm["data"]["onDefineDomain"] == open(d + "/kubevirt/onDefineDomain.py").read(), "the ConfigMap holds onDefineDomain.py as it is"
        json.load(open(d + "/grafana/pvsched-dashboard.json"))
        print("ok")
        """
        let r = try run(["python3", "-c", script, Self.deploy])
        #expect(r.status == 0 && r.stdout.contains("ok"), "\(r.stderr)")
    }

    static func hook(vmi: String, domain: String) throws -> CommandResult {
        try run(["python3", "\(deploy)/kubevirt/onDefineDomain.py", "--vmi", vmi, "--domain", domain])
    }

    @Test(.enabled(if: Requirement.executable("python3") != nil, "needs python3"))
    func theKubeVirtHookAddsTheRegionOnlyToAnnotatedVMIs() throws {
        let domain = try String(contentsOfFile: "\(Self.deploy)/kubevirt/sample-domain.xml", encoding: .utf8)
        let annotated = #"{"metadata": {"name": "rt-guest", "namespace": "lab", "annotations": {"pvsched.io/enabled": "true", "pvsched.io/driver": "deadline-boost", "pvsched.io/boost": "slice:100"}}}"#
        let out = try Self.hook(vmi: annotated, domain: domain)
        #expect(out.status == 0, "\(out.stderr)")
        #expect(out.stdout.contains("<shmem name=\"pvsched-lab-rt-guest\"><model type=\"ivshmem-plain\" /><size unit=\"M\">1</size></shmem>"), "\(out.stdout)")
        #expect(out.stdout.contains("xmlns:pvsched=\"https://pvsched.dev/xmlns/libvirt/1\""), "\(out.stdout)")
        #expect(out.stdout.contains("driver=\"deadline-boost\"") && out.stdout.contains("boost=\"slice:100\""), "\(out.stdout)")
        // The rest of the domain is kept.
        #expect(out.stdout.contains("<vcpu"), "\(out.stdout)")
        // Applied twice (the shim may call it again): one region, not two.
        let twice = try Self.hook(vmi: annotated, domain: out.stdout)
        #expect(twice.stdout.components(separatedBy: "<shmem ").count == 2)
        // Without the annotation, or with garbage, the domain goes on unchanged and the VM starts.
        for vmi in [#"{"metadata": {"name": "plain"}}"#, #"{"metadata": {"name": "x", "annotations": {"pvsched.io/enabled": "false"}}}"#, "not json"] {
            let r = try Self.hook(vmi: vmi, domain: domain)
            #expect(r.status == 0 && r.stdout == domain, "\(vmi): \(r.stdout)")
        }
        let names = try Self.hook(vmi: #"{"metadata": {"name": "a/b c", "namespace": "n$", "annotations": {"pvsched.io/enabled": "yes"}}}"#,
                                  domain: domain)
        #expect(names.stdout.contains("<shmem name=\"pvsched-n_-a_b_c\">"), "a name made safe: \(names.stdout)")
    }

    @Test(.enabled(if: Requirement.root.shouldRun, "needs root"))
    func everyMetricTheDashboardShowsIsServed() throws {
        try Requirement.root.check()
        let dashboard = try String(contentsOfFile: "\(Self.deploy)/grafana/pvsched-dashboard.json", encoding: .utf8)
        let used = Set(dashboard.matches(of: /pvsched_[a-z_]+/).map { String($0.output) })
        #expect(used.count >= 8, "\(used)")
        let d = try DaemonProcess(metrics: true)
        let vmm = try StandInProcess(vcpus: 1, region: "/dev/shm/pvsched-dash-\(getpid())")
        defer { vmm.stop() }
        #expect(try d.cli(["vm", "attach", "--pid", "\(vmm.pid)", "--thread-names", "cloud-hypervisor", "--shm", vmm.region!,
                           "--name", "dash", "--events", "watch"]).status == 0)
        try vmm.command("line 0 10 fifo 80")
        usleep(300_000)
        try vmm.command("line 0 40")
        let address = try #require(try d.client().call(DaemonInfo.self).metrics)
        let scraped = try run(["curl", "-sf", "--max-time", "5", "http://\(address)/metrics"]).stdout
        let served = Set(scraped.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { String($0.split(separator: " ")[2]) })
        for m in used {
            let family = ["_bucket", "_sum", "_count"].reduce(m) { $0.hasSuffix($1) ? String($0.dropLast($1.count)) : $0 }
            #expect(served.contains(family) || served.contains(m), "the dashboard shows \(m), which the daemon does not serve")
        }
    }
}
