import ArgumentParser
import BlockEngine
import ImageFormats

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Print the allocation of IMAGE's guest disk as `qemu-img map` does (start, length, depth, present, zero, data, offset).",
        discussion: "Works for every format rawmount reads, including those QEMU cannot (Bochs, bare COWD, VDI differencing). depth is the layer of the backing chain that answers (0: the image itself); offset is where the bytes lie in that layer's file.")

    @Option(help: ArgumentHelp("human (default: data ranges with their host offset and file) or json (every range).", valueName: "format"))
    var output: String = "human"

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Option(help: "Start at this guest offset (bytes or with a unit).")
    var startOffset: String?

    @Option(help: "Map at most this many bytes.")
    var maxLength: String?

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func run() throws {
        do {
            guard output == "human" || output == "json" else { throw BlockError.usage("--output \(output): human or json") }
            let fmt = try format.map { f in
                guard let known = ImageFormat(rawValue: f.lowercased()) else { throw BlockError.usage("unknown format '\(f)'") }
                return known
            }
            // Like `qemu-img map -U`: no lock, so a mounted image can be mapped.
            let device = try ImageOpener.open(path: image, options: .init(writable: false, format: fmt, lock: false))
            defer { try? device.close() }
            let size = device.virtualSize
            let start = min(try startOffset.map(parseSize) ?? 0, size)
            let end = try maxLength.map { start + min(try parseSize($0), size - start) } ?? size
            let json = output == "json"
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
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    /// qemu-img's `%#-16x`: 0 has no 0x.
    private func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
    private func pad(_ s: String) -> String { s.count >= 16 ? s + " " : s + String(repeating: " ", count: 16 - s.count) }
}

/// The guest disk's ranges, each answered by one layer of the chain, as qemu-img map reports them.
enum AllocationMap {
    struct Entry {
        var start: UInt64, length: UInt64, depth: Int
        var present: Bool, zero: Bool, data: Bool
        var offset: UInt64?
        var file: String

        /// One range with the next when qemu-img would print them as one.
        func merged(with next: Entry) -> Entry? {
            guard start + length == next.start, depth == next.depth, present == next.present, zero == next.zero,
                  data == next.data, (offset == nil) == (next.offset == nil), file == next.file else { return nil }
            if let o = offset, let n = next.offset, o + length != n { return nil }
            var e = self
            e.length += next.length
            return e
        }

        var json: String {
            var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present), \"zero\": \(zero), \"data\": \(data)"
            if let offset { s += ", \"offset\": \(offset)" }
            return s + "}"
        }
    }

    /// Calls `visit` with consecutive entries covering [from, to). Work follows the metadata:
    /// each driver answers whole runs of like clusters at a time.
    static func walk(_ device: BlockDevice, from: UInt64, to end: UInt64, visit: (Entry) throws -> Void) throws {
        var pos = from
        while pos < end {
            let e = try entry(device, at: pos, maxLength: end - pos, depth: 0)
            precondition(e.length > 0)
            try visit(e)
            pos += e.length
        }
    }

    private static func entry(_ device: BlockDevice, at pos: UInt64, maxLength: UInt64, depth: Int) throws -> Entry {
        let driver = device.driver
        // Past the end of a shorter backing image the disk reads as zeros, allocated nowhere.
        guard pos < device.virtualSize else {
            return Entry(start: pos, length: maxLength, depth: depth, present: false, zero: true, data: false, offset: nil, file: "")
        }
        let limit = min(maxLength, device.virtualSize - pos)
        let mapping = try driver.status(pos, maxLength: limit)
        let here = Entry(start: pos, length: 0, depth: depth, present: true, zero: false, data: true, offset: nil, file: driver.file.path)
        var e = here
        switch mapping {
        case let .data(host, length), let .shared(host, length):
            let (file, offset) = driver.resolve(host: host)
            e.length = length; e.offset = offset; e.file = file.path
        case let .compressed(_, _, length):
            e.length = length
        case let .zero(length):
            e.length = length; e.zero = true; e.data = false
            // A hole in a raw file is still the file's bytes at that offset.
            if driver is RawDriver { e.offset = pos }
        case let .unallocated(length):
            guard let backing = device.backing else {
                e.length = length; e.zero = true; e.data = false
                // QEMU's VDI (which has no backing files there) counts unallocated blocks as
                // allocated zeros; report them as qemu-img does.
                e.present = driver is VDIDriver
                return e
            }
            return try entry(backing, at: pos, maxLength: min(length, limit), depth: depth + 1)
        }
        e.length = min(e.length, limit)
        return e
    }
}
