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
