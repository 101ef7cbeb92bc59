import ArgumentParser
import BlockEngine
import ImageFormats

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Print the allocation of IMAGE's guest disk as `qemu-img map` does (start, length, depth, present, zero, data, offset).",
        discussion: "Works for every format rawmount reads, including those QEMU cannot (Bochs, bare COWD, VDI differencing). depth is the layer of the backing chain that answers (0: the image itself); offset is where the bytes lie in that layer's file." + Examples.section("map"))

    @Option(help: ArgumentHelp("human (default: data ranges with their host offset and file) or json (every range).", valueName: "format"))
    var output: String = "human"

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Option(help: "Start at this guest offset (bytes or with a unit).")
    var startOffset: String?

    @Option(help: "Map at most this many bytes.")
    var maxLength: String?

    @Option(help: "Print a qcow2 persistent dirty bitmap's dirty extents instead, each split by whether the disk holds data there (what an incremental backup copies) or zeros (what it marks zero).")
    var bitmap: String?

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
            guard output == "human" || output == "json" else { throw BlockError.usage("--output \(output): human or json") }
            let fmt = try parseFormat(format)
            // Like `qemu-img map -U`: no lock, so a mounted image can be mapped.
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: fmt, lock: false))
            defer { try? device.close() }
            let size = device.virtualSize
            let start = min(try startOffset.map(parseSize) ?? 0, size)
            let end = try maxLength.map { start + min(try parseSize($0), size - start) } ?? size
            let json = output == "json"
            if let bitmap { return try dirtyExtents(device, bitmap, from: start, to: end, json: json) }
            if json { print("[", terminator: "") } else { print("Offset          Length          Mapped to       File") }
            var pending: AllocationMap.Entry?
            var first = true
            func emit(_ e: AllocationMap.Entry) {
                if json {
                    print((first ? "" : ",\n") + e.json, terminator: "")
                } else if e.data, let offset = e.offset {
                    print(pad(hex(e.start)) + pad(hex(e.length)) + pad(hex(offset)) + e.file)
                }
                first = false
            }
            try AllocationMap.walk(device, from: start, to: end) { e in
                if let p = pending, let merged = p.merged(with: e) { pending = merged; return }
                if let p = pending { emit(p) }
                pending = e
            }
            if let p = pending { emit(p) }
            if json { print("]") }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
    }

    /// qemu-img's `%#-16x`: 0 has no 0x.
    /// The bitmap's dirty extents within [start, end), each split into runs the disk holds
    /// data for and runs that read as zeros.
    private func dirtyExtents(_ device: BlockDevice, _ name: String, from start: UInt64, to end: UInt64, json: Bool) throws {
        guard let bits = device.driver.dirtyBitmaps.first(where: { $0.name == name })?.bits else {
            let format = device.driver.info.format
            throw BlockError.usage(format == "qcow2"
                ? "\(image): no consistent bitmap named '\(name)' (rawmount bitmap list shows the bitmaps)"
                : "\(image): \(format) images keep no persistent dirty bitmaps (only qcow2 does)")
        }
        var rows: [String] = []
        var total: UInt64 = 0
        var pos = start
        while pos < end {
            let r = bits.run(from: pos, maxLength: end - pos)
            let n = min(max(r.length, 1), end - pos)
            if r.dirty {
                var at = pos
                while at < pos + n {
                    let s = try device.status(at, maxLength: pos + n - at)
                    let k = min(max(s.length, 1), pos + n - at)
                    rows.append(json ? "{ \"start\": \(at), \"length\": \(k), \"dirty\": true, \"data\": \(s.data)}"
                                     : pad(String(at)) + pad(String(k)) + (s.data ? "data" : "zero"))
                    total += k
                    at += k
                }
            }
            pos += n
        }
        if json { print("[" + rows.joined(separator: ",\n") + "]") } else {
            print("Offset          Length          Dirty, holding")
            rows.forEach { print($0) }
            print("\(total) dirty bytes in \(rows.count) extent(s)")
        }
    }

    private func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
    private func pad(_ s: String) -> String { s.count >= 16 ? s + " " : s + String(repeating: " ", count: 16 - s.count) }
}
