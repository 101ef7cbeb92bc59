import Foundation
import BlockEngine
import ImageFormats

/// One image of a chain as `qemu-img info --output=json` describes it: the same keys, types
/// and meanings where the fact is the same, so scripts written for qemu-img read ours.
enum QemuImageInfo {
    static func fields(of device: BlockDevice) -> [String: Any] {
        let driver = device.driver
        let info = driver.info
        var f: [String: Any] = [
            "filename": driver.file.path,
            "format": info.format,
            "virtual-size": info.virtualSize,
            "actual-size": driver.hostAllocatedBytes,
            "dirty-flag": false,
        ]
        if info.hasClusters { f["cluster-size"] = info.clusterSize }
        if let backing = device.backing {
            f["full-backing-filename"] = backing.driver.file.path
            f["backing-filename"] = storedBackingName(driver) ?? backing.driver.file.path
        } else if let name = storedBackingName(driver) {
            f["backing-filename"] = name  // named but missing (`info` still describes the image)
        }
        switch driver {
        case let q as QCOW2Driver:
            let h = q.header
            f["dirty-flag"] = h.incompatible & QCOW2Header.incompatibleDirty != 0
            if let bf = h.backingFormat { f["backing-filename-format"] = bf }
            var data: [String: Any] = [
                "compat": h.version >= 3 ? "1.1" : "0.10",
                "compression-type": h.compressionType == 1 ? "zstd" : "zlib",
                "lazy-refcounts": h.compatible & QCOW2Header.compatibleLazyRefcounts != 0,
                "refcount-bits": h.refcountBits,
                "corrupt": h.incompatible & QCOW2Header.incompatibleCorrupt != 0,
                "extended-l2": h.extendedL2,
            ]
            if h.version < 3 { data = ["compat": "0.10", "refcount-bits": h.refcountBits] }
            if h.hasBitmaps, let bitmaps = try? QCOW2Bitmaps.list(q.file, header: h) {
                data["bitmaps"] = bitmaps.map { ["name": $0.name, "granularity": $0.granularity, "flags": $0.flagNames] as [String: Any] }
            }
            f["format-specific"] = ["type": "qcow2", "data": data]
            if let snaps = try? q.snapshots(), !snaps.isEmpty {
                f["snapshots"] = snaps.map { s -> [String: Any] in
                    var item: [String: Any] = ["id": s.id, "name": s.name, "vm-state-size": s.vmStateSize, "date-sec": s.dateSeconds,
                                               "date-nsec": s.dateNanoseconds, "vm-clock-sec": s.vmClockNanoseconds / 1_000_000_000,
                                               "vm-clock-nsec": s.vmClockNanoseconds % 1_000_000_000]
                    if let icount = s.icount, icount != .max { item["icount"] = icount }  // qemu-img leaves out an unknown one
                    return item
                }
            }
        case let q as QEDDriver:
            f["dirty-flag"] = q.header.features & QEDHeader.featureNeedCheck != 0
            if q.backingName != nil, q.header.features & QEDHeader.featureBackingNoProbe != 0 { f["backing-filename-format"] = "raw" }
        case let v as VMDKDriver:
            if let d = v.descriptor {
                var data: [String: Any] = ["cid": d.cid ?? 0, "parent-cid": d.parentCID ?? 0xFFFF_FFFF]
                if let t = d.createType { data["create-type"] = t }
                let details = v.extentDetails
                data["extents"] = d.extents.enumerated().map { i, e -> [String: Any] in
                    var x: [String: Any] = ["filename": e.fileName.map { PathName.resolve($0, relativeTo: v.file.path) } ?? "", "virtual-size": e.sectors * 512]
                    if i < details.count {
                        x["format"] = details[i].format
                        if let cs = details[i].clusterSize { x["cluster-size"] = cs }
                        if details[i].compressed { x["compressed"] = true }
                    }
                    return x
                }
                f["format-specific"] = ["type": "vmdk", "data": data]
            }
        default:
            break
        }
        return f
    }

    /// The backing name as the image stores it (before it is resolved against the image's
    /// directory), for `backing-filename`.
    static func storedBackingName(_ driver: ImageDriver) -> String? {
        switch driver {
        case let q as QCOW2Driver: return q.header.backingName
        case let q as QEDDriver: return q.backingName
        case let v as VMDKDriver: return v.parentFileNameHint
        default: return nil
        }
    }

    static func json(_ value: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]) else {
            return "{}"
        }
        // JSONSerialization leaves DEL and the C1 controls (U+0080-U+009F, which terminals
        // may obey) as they are; inside JSON strings they may be written as \u00XX.
        let text = String(decoding: data, as: UTF8.self)
        guard text.unicodeScalars.contains(where: { (0x7F...0x9F).contains($0.value) }) else { return text }
        var out = ""
        for u in text.unicodeScalars {
            if (0x7F...0x9F).contains(u.value) { out += "\\u00" + String(u.value, radix: 16) } else { out.unicodeScalars.append(u) }
        }
        return out
    }
}
