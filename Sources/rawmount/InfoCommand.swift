import ArgumentParser
import BlockEngine
import ImageFormats
import Synchronization

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Print an image's format, virtual size, cluster size, allocation and backing chain.",
        discussion: String(Examples.section("info").dropFirst(2)))

    @Flag(help: "Print JSON for scripts: qemu-img info's keys and types (virtual-size, actual-size, cluster-size, dirty-flag, backing-filename, full-backing-filename, backing-filename-format, snapshots, format-specific), and rawmount's own (allocated-bytes, file-size, partition-table, details).")
    var json = false

    @Option(help: ArgumentHelp("human (default) or json, as qemu-img's --output.", valueName: "format"))
    var output: String = "human"

    @Flag(help: "Describe every image of the backing chain, top first (JSON: an array, as qemu-img prints it).")
    var backingChain = false

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Accepted as qemu-img takes it: info never takes a lock, so it works on an image in use.")
    var forceShare = false

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
            let fmt = try parseFormat(format)
            // Like `qemu-img info -U`: no lock, so it works on a mounted image. A missing
            // backing file is named, not fatal: qemu-img info still describes the image.
            let missing = NoteList()
            var options = ImageOpener.Options(writable: false, format: fmt, lock: false, onNote: { missing.add($0) })
            options.toleratesMissingBacking = true
            let device = try ImageOpener.open(path: image, options: options)
            defer { for n in missing.notes where n.contains("not found") { printError("rawmount: warning: \(n)") } }
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
            guard ["human", "json"].contains(output) else { throw BlockError.usage("--output \(output): human or json") }
            if json || output == "json" {
                var top = QemuImageInfo.fields(of: device)
                top["allocated-bytes"] = allocated
                top["allocated-bytes-estimated"] = walked == nil
                top["file-size"] = try device.driver.file.size()
                top["backing-chain"] = chain.dropFirst().map { ["filename": $0.driver.file.path, "format": $0.driver.info.format] }
                let absent = missing.notes.filter { $0.contains("not found") }
                if !absent.isEmpty { top["missing-backing-files"] = absent }
                if !bitmaps.isEmpty {
                    top["bitmaps"] = bitmaps.map { ["name": $0.name, "granularity": $0.granularity, "flags": $0.flagNames] as [String: Any] }
                }
                top["partition-table"] = [
                    "scheme": table.scheme.rawValue,
                    "notes": table.notes,
                    "partitions": table.partitions.map { p -> [String: Any] in
                        var f: [String: Any] = ["index": p.index, "start": p.start, "size": p.length, "type": p.type]
                        if let t = p.typeName { f["type-name"] = t }
                        if let n = p.name { f["name"] = n }
                        if let u = p.uuid { f["uuid"] = u }
                        return f
                    },
                ]
                top["details"] = Dictionary(info.details, uniquingKeysWith: { a, _ in a })
                if backingChain {
                    print(QemuImageInfo.json([top] + chain.dropFirst().map(QemuImageInfo.fields(of:))))
                } else {
                    print(QemuImageInfo.json(top))
                }
            } else {
                printLine("image: \(device.driver.file.path)")
                printLine("format: \(info.format)")
                printLine("virtual size: \(humanSize(info.virtualSize)) (\(info.virtualSize) bytes)")
                printLine("cluster size: \(info.clusterSize)")
                printLine("allocated: \(humanSize(allocated)) (\(allocated) bytes)\(walked == nil ? ", estimated from the host file: too many table entries to walk" : "")")
                printLine("file size: \(try device.driver.file.size()) bytes")
                for (k, v) in info.details { printLine("\(k): \(v)") }
                for (i, b) in chain.dropFirst().enumerated() {
                    printLine("backing file \(i + 1): \(b.driver.file.path) (\(b.driver.info.format))")
                }
                for n in missing.notes where n.contains("not found") { printLine("missing: \(n)") }
                if backingChain {
                    for b in chain.dropFirst() {
                        printLine("")
                        printLine("image: \(b.driver.file.path)")
                        printLine("format: \(b.driver.info.format)")
                        printLine("virtual size: \(humanSize(b.driver.info.virtualSize)) (\(b.driver.info.virtualSize) bytes)")
                        printLine("cluster size: \(b.driver.info.clusterSize)")
                        printLine("file size: \(try b.driver.file.size()) bytes")
                        for (k, v) in b.driver.info.details { printLine("\(k): \(v)") }
                    }
                }
                if table.scheme != .none || !table.notes.isEmpty {
                    printLine("partition table: \(table.scheme.rawValue)")
                    for p in table.partitions {
                        let kind = p.typeName.map { "\(p.type) (\($0))" } ?? p.type
                        let name = p.name.map { ", name \(jsonString($0))" } ?? ""
                        printLine("partition \(p.index): start \(p.start) (sector \(p.start / 512)), size \(p.length) (\(humanSize(p.length))), type \(kind)\(name)")
                    }
                    for n in table.notes { printLine("partition table note: \(n)") }
                }
            }
            try? device.close()
            keepUntilExit(device)
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
            if u.value < 0x20 || (0x7F...0x9F).contains(u.value) { out += "\\u00" + (u.value < 16 ? "0" : "") + String(u.value, radix: 16) } else { out.unicodeScalars.append(u) }
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

/// One line of `info`'s report: every string in it (paths, details from the image) has its
/// control characters written out, newlines included, so no image can forge a line.
private func printLine(_ text: String) {
    Swift.print(text.escapingControls)
}

/// Notes the opener sends while an image opens, kept in order.
final class NoteList: Sendable {
    private let list = Mutex<[String]>([])
    func add(_ s: String) { list.withLock { $0.append(s) } }
    var notes: [String] { list.withLock { $0 } }
}
