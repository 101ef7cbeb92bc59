import ArgumentParser
import BlockEngine
import ImageFormats

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Print an image's format, virtual size, cluster size, allocation and backing chain.")

    @Flag(help: "Print JSON for scripts.")
    var json = false

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
            let fmt = format.flatMap { ImageFormat(rawValue: $0.lowercased()) }
            if let format, fmt == nil { throw BlockError.usage("unknown format '\(format)'") }
            // Like `qemu-img info -U`: no lock, so it works on a mounted image.
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: fmt, lock: false))
            var chain: [BlockDevice] = []
            var d: BlockDevice? = device
            while let cur = d { chain.append(cur); d = cur.backing }
            // Tables too many (or too hostile) to walk in the report budget: estimated from the host file.
            let walked = try device.allocatedBytes(budget: .report, parallel: true)
            let allocated = walked ?? device.estimatedAllocatedBytes()
            var info = device.driver.info
            if let bochs = device.driver as? BochsDriver {
                info.details.append(("allocated extents", "\(try bochs.allocatedExtents())"))
            }
            var bitmaps: [QCOW2Bitmap] = []
            if let qcow2 = device.driver as? QCOW2Driver, qcow2.header.hasBitmaps {
                do {
                    bitmaps = try QCOW2Bitmaps.list(qcow2.file, header: qcow2.header)
                    // Autoclear bit 0 clear: a program without bitmap support wrote the image.
                    let ignored = qcow2.header.autoclear & 1 == 0 ? "; QEMU ignores it (autoclear bit 0 is clear)" : ""
                    for b in bitmaps {
                        let flags = b.flagNames.isEmpty ? "none (disabled)" : b.flagNames.joined(separator: ", ")
                        info.details.append(("bitmap \(b.name)", "granularity \(b.granularity), flags: \(flags)\(ignored)"))
                    }
                } catch {
                    info.details.append(("bitmap directory", "unreadable: \(describe(error))"))
                }
            }
            if let qcow2 = device.driver as? QCOW2Driver {
                // What `mount --snapshot ID|NAME` can show.
                do {
                    for s in try qcow2.snapshots() {
                        info.details.append(("snapshot \(s.id)", "\(s.name), \(humanSize(s.diskSize)), taken \(s.dateText)"))
                    }
                } catch {
                    info.details.append(("snapshot table", "unreadable: \(describe(error))"))  // the active disk still reads
                }
            }
            let table = PartitionTable.read(device)
            if json {
                var fields: [String] = [
                    "\"filename\": \(jsonString(device.driver.file.path))",
                    "\"format\": \(jsonString(info.format))",
                    "\"virtual-size\": \(info.virtualSize)",
                    "\"cluster-size\": \(info.clusterSize)",
                    "\"allocated-bytes\": \(allocated)",
                    "\"allocated-bytes-estimated\": \(walked == nil)",
                    "\"file-size\": \(try device.driver.file.size())",
                ]
                let backing = chain.dropFirst().map { "{\"filename\": \(jsonString($0.driver.file.path)), \"format\": \(jsonString($0.driver.info.format))}" }
                fields.append("\"backing-chain\": [\(backing.joined(separator: ", "))]")
                // qemu-img info's names for the same fields.
                let maps = bitmaps.map { b in
                    "{\"name\": \(jsonString(b.name)), \"granularity\": \(b.granularity), \"flags\": [\(b.flagNames.map(jsonString).joined(separator: ", "))]}"
                }
                if !maps.isEmpty { fields.append("\"bitmaps\": [\(maps.joined(separator: ", "))]") }
                let parts = table.partitions.map { p in
                    var f = ["\"index\": \(p.index)", "\"start\": \(p.start)", "\"size\": \(p.length)", "\"type\": \(jsonString(p.type))"]
                    if let t = p.typeName { f.append("\"type-name\": \(jsonString(t))") }
                    if let n = p.name { f.append("\"name\": \(jsonString(n))") }
                    if let u = p.uuid { f.append("\"uuid\": \(jsonString(u))") }
                    return "{" + f.joined(separator: ", ") + "}"
                }
                fields.append("\"partition-table\": {\"scheme\": \(jsonString(table.scheme.rawValue)), \"partitions\": [\(parts.joined(separator: ", "))], "
                              + "\"notes\": [\(table.notes.map(jsonString).joined(separator: ", "))]}")
                let details = info.details.map { "\(jsonString($0.0)): \(jsonString($0.1))" }
                fields.append("\"details\": {\(details.joined(separator: ", "))}")
                print("{\n  " + fields.joined(separator: ",\n  ") + "\n}")
            } else {
                print("image: \(device.driver.file.path)")
                print("format: \(info.format)")
                print("virtual size: \(humanSize(info.virtualSize)) (\(info.virtualSize) bytes)")
                print("cluster size: \(info.clusterSize)")
                print("allocated: \(humanSize(allocated)) (\(allocated) bytes)\(walked == nil ? ", estimated from the host file: too many table entries to walk" : "")")
                print("file size: \(try device.driver.file.size()) bytes")
                for (k, v) in info.details { print("\(k): \(v)") }
                for (i, b) in chain.dropFirst().enumerated() {
                    print("backing file \(i + 1): \(b.driver.file.path) (\(b.driver.info.format))")
                }
                if table.scheme != .none || !table.notes.isEmpty {
                    print("partition table: \(table.scheme.rawValue)")
                    for p in table.partitions {
                        let kind = p.typeName.map { "\(p.type) (\($0))" } ?? p.type
                        let name = p.name.map { ", name \(jsonString($0))" } ?? ""
                        print("partition \(p.index): start \(p.start) (sector \(p.start / 512)), size \(p.length) (\(humanSize(p.length))), type \(kind)\(name)")
                    }
                    for n in table.notes { print("partition table note: \(n)") }
                }
            }
            try? device.close()
        } catch let e as ExitCode {
            throw e
        } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }
}

func jsonString(_ s: String) -> String {
    var out = "\""
    for u in s.unicodeScalars {
        switch u {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        default:
            if u.value < 0x20 { out += "\\u00" + (u.value < 16 ? "0" : "") + String(u.value, radix: 16) } else { out.unicodeScalars.append(u) }
        }
    }
    return out + "\""
}

func humanSize(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n); var i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(n) B" : "\((v * 10).rounded() / 10) \(units[i])"
}
