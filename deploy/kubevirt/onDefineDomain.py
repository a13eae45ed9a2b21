#!/usr/bin/env python3
"""KubeVirt hook (sidecar-shim, onDefineDomain): adds the pvsched region to a VMI's
domain when the VMI asks for it with the annotation `pvsched.io/enabled: "true"`.

The shim calls this script as `onDefineDomain --vmi VMI_JSON --domain DOMAIN_XML`
and takes what it prints as the domain. Added:
  <shmem name='pvsched-NAMESPACE-NAME'><model type='ivshmem-plain'/><size unit='M'>1</size></shmem>
(the guest's pvsched_guest module writes its region there; the node's pvsched daemon
finds the QEMU process that maps it), and, when the VMI's annotations name them,
the driver, boost class and governor in the domain's pvsched metadata, which the
daemon reads. A domain that has a pvsched <shmem> already, or a VMI without the
annotation, is printed unchanged.
"""
import json
import re
import sys
import xml.etree.ElementTree as ET

NS = "https://pvsched.dev/xmlns/libvirt/1"
ANNOTATION = "pvsched.io/enabled"
SETTINGS = {"pvsched.io/driver": "driver", "pvsched.io/boost": "boost", "pvsched.io/governor": "governor"}


def shmem_name(vmi):
    meta = vmi.get("metadata", {})
    raw = "pvsched-%s-%s" % (meta.get("namespace", "default"), meta.get("name", "vm"))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:200]


def transform(vmi, domain_xml):
    annotations = vmi.get("metadata", {}).get("annotations", {}) or {}
    if str(annotations.get(ANNOTATION, "")).lower() not in ("true", "yes", "1"):
        return domain_xml
    ET.register_namespace("pvsched", NS)
    root = ET.fromstring(domain_xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for s in devices.findall("shmem"):
        if (s.get("name") or "").startswith("pvsched-"):
            return domain_xml
    shmem = ET.SubElement(devices, "shmem", {"name": shmem_name(vmi)})
    ET.SubElement(shmem, "model", {"type": "ivshmem-plain"})
    size = ET.SubElement(shmem, "size", {"unit": "M"})
    size.text = "1"
    settings = {attr: str(annotations[key]) for key, attr in SETTINGS.items() if key in annotations}
    if settings:
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        ET.SubElement(metadata, "{%s}pvsched" % NS, settings)
    return ET.tostring(root, encoding="unicode")


def main(argv):
    vmi_json = domain_xml = None
    i = 1
    while i < len(argv):
        if argv[i] == "--vmi" and i + 1 < len(argv):
            vmi_json = argv[i + 1]; i += 2
        elif argv[i] == "--domain" and i + 1 < len(argv):
            domain_xml = argv[i + 1]; i += 2
        else:
            i += 1
    if vmi_json is None or domain_xml is None:
        sys.stderr.write("usage: onDefineDomain --vmi VMI_JSON --domain DOMAIN_XML\n")
        return 2
    try:
        out = transform(json.loads(vmi_json), domain_xml)
    except (ValueError, ET.ParseError) as e:
        # Never break the VM's start: the domain goes on unchanged.
        sys.stderr.write("pvsched hook: domain left unchanged: %s\n" % e)
        out = domain_xml
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
