import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount commit IMAGE`, as `qemu-img commit`: what IMAGE (and the images between it and
/// the base) hold is written into the base image, made durable, and only then IMAGE is
/// emptied (its clusters read from the base again; -d keeps them). IMAGE's disk reads the
/// same before and after.
struct CommitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "commit",
        abstract: "Write a qcow2 image's own data into its backing file (or -b a deeper base), then empty it, as qemu-img commit does.",
        discussion: "Both images are locked for writing for the whole run. The base is made durable before IMAGE is emptied, so "
            + "a crash in between leaves IMAGE with its data (its disk unchanged either way). The base must be as large as IMAGE." + Examples.section("commit"))

    @Option(name: [.customShort("f")], help: "IMAGE's format (probed when omitted).") var format: String?
    @Option(name: [.customShort("b")], help: "The image of IMAGE's backing chain to commit into (default: its backing file).") var base: String?
    @Flag(name: [.customShort("d")], help: "Do not empty IMAGE afterwards (implied by -b, as in qemu-img).") var keep = false
    @Flag(name: [.customShort("p")], help: "Show progress on the terminal.") var progress = false
    @Flag(name: [.customShort("q")], help: "Quiet.") var quiet = false
    @Argument(help: "The image to commit.", completion: .file()) var image: String

    func run() throws {
        do {
            // Our own write locks on both files, held throughout; the devices take none.
            let topGuard = try ImageFile(path: image, writable: true)
            try ImageLock.acquire(topGuard, writable: true)
            let top = try ImageOpener.open(path: image, options: .init(writable: false, format: try parseFormat(format), lock: false))
            var topOpen = true
            defer { if topOpen { try? top.close() } }
            guard top.driver.file.isSameFile(as: topGuard) else { throw BlockError.invalid(file: image, field: "file", detail: "it was replaced while being opened") }
            guard let backing = top.backing else { throw BlockError.usage("\(image): has no backing file to commit into") }
            // Emptying drops clusters back to the backing file, which only qcow2 does here.
            // With -b, as qemu-img, IMAGE is kept as it is (the layers between still need it).
            let empty = !keep && base == nil
            guard !empty || top.driver is QCOW2Driver else {
                throw BlockError.usage("\(image): rawmount empties only qcow2 images after a commit; with -d it commits this \(top.driver.info.format) image and keeps its data")
            }
            // The layers above the base, top first, and the base itself.
            var above: [BlockDevice] = [top]
            var target: BlockDevice = backing
            if let base {
                // As given (from here), else as a backing name (from IMAGE's folder).
                let wanted = try (try? ImageFile(path: base, writable: false)) ?? ImageFile(path: PathName.resolve(base, relativeTo: image), writable: false)
                while !target.driver.file.isSameFile(as: wanted) {
                    guard let next = target.backing else { throw BlockError.usage("\(base): is not in \(image)'s backing chain") }
                    above.append(target)
                    target = next
                }
            }
            let basePath = target.driver.file.path
            guard target.virtualSize >= top.virtualSize else {
                throw BlockError.usage("\(basePath): is smaller than \(image) (\(target.virtualSize) < \(top.virtualSize) bytes); rawmount commit does not resize")
            }
            let baseGuard = try ImageFile(path: basePath, writable: true)
            try ImageLock.acquire(baseGuard, writable: true)
            let dst = try ImageOpener.open(path: basePath, options: .init(writable: true, lock: false))
            var totals = ImageCopy.Totals()
            do {
                guard dst.driver.file.isSameFile(as: baseGuard) else { throw BlockError.invalid(file: basePath, field: "file", detail: "it was replaced while being opened") }
                totals = try copyAbove(above, from: top, into: dst)
                try dst.flush()
                try dst.close()
            } catch { try? dst.close(); throw error }
            try top.close()
            topOpen = false
            if empty {
                let w = try ImageOpener.open(path: image, options: .init(writable: true, format: try parseFormat(format), lock: false))
                do {
                    try w.unallocate(at: 0, length: w.virtualSize)
                    try w.flush()
                    try w.close()
                } catch { try? w.close(); throw error }
            }
            if !quiet { print("Image committed.") }
            _ = totals
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
    }

    /// Every range one of `above` holds itself, read through `top`, into `dst` (zeros as zeros).
    private func copyAbove(_ above: [BlockDevice], from top: BlockDevice, into dst: BlockDevice) throws -> ImageCopy.Totals {
        var held: [(offset: UInt64, length: UInt64)] = []
        let size = top.virtualSize
        var pos: UInt64 = 0
        while pos < size {
            // The shortest answer of the layers, and whether any holds this range.
            var n = min(size - pos, 1 << 30), mine = false
            for layer in above {
                let m = try layer.driver.map(pos, maxLength: n)
                n = min(n, max(m.length, 1))
                if case .unallocated = m {} else { mine = true }
            }
            if mine {
                if let last = held.last, last.offset + last.length == pos { held[held.count - 1].length += n } else { held.append((pos, n)) }
            }
            pos += n
        }
        let total = held.reduce(0) { $0 + $1.length }
        let bar = Progress(total: total, enabled: progress && !quiet && isatty(STDERR_FILENO) == 1)
        defer { bar.finish() }
        return try ImageCopy(source: top, destination: dst, ranges: held, zeroing: true).run { _, read in bar.show(read) }
    }
}
