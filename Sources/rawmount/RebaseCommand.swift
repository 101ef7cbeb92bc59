import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount rebase -b NEW IMAGE`, as `qemu-img rebase`: IMAGE gets a new backing file and
/// keeps its guest disk. Safe mode copies into IMAGE every range IMAGE does not hold itself
/// where the old backing chain and the new one differ (durable first), then names the new
/// backing file in the header; `-u` only changes the name (the user vouches for the content).
struct RebaseCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebase",
        abstract: "Give a qcow2 image another backing file (or none, -b \"\"), its guest disk unchanged, as qemu-img rebase does.",
        discussion: "The new name is stored as given and, like every backing name, read relative to IMAGE's folder. Safe mode reads "
            + "the old and the new backing where IMAGE holds no data of its own and writes into IMAGE what differs (its data made "
            + "durable before the header changes: a crash leaves the old backing named and the image's disk as it was). -u only "
            + "rewrites the name." + Examples.section("rebase"))

    @Option(name: [.customShort("b")], help: "The new backing file (\"\" for none).") var backing: String
    @Option(name: [.customShort("F")], help: "The new backing file's format (stored in the image; probed when omitted).") var backingFormat: String?
    @Option(name: [.customShort("f")], help: "IMAGE's format (qcow2).") var format: String?
    @Flag(name: [.customShort("u")], help: "Unsafe: only change the name; the new backing file is not read (it need not exist).") var unsafe = false
    @Flag(name: [.customShort("p")], help: "Show progress on the terminal.") var progress = false
    @Flag(name: [.customShort("q")], help: "Quiet.") var quiet = false
    @Argument(help: "The image to rebase.", completion: .file()) var image: String

    func run() throws {
        do {
            let fmt = try parseFormat(format)
            let newFormat = try parseFormat(backingFormat, what: "backing format")
            var copied = ImageCopy.Totals()
            // One writer's lock over the copy and the header change: no other program may
            // open the image between them (a discard there would show the new backing where
            // the copy had made the old one's bytes the image's own).
            let file = try ImageFile(path: image, writable: true)
            try ImageLock.acquire(file, writable: true)
            if !unsafe {
                // The data goes into the file the header is changed in (the open refuses one swapped in since).
                let top = try ImageOpener.open(path: image, options: .held(by: file, writable: true, format: fmt))
                do {
                    guard top.driver is QCOW2Driver else { throw BlockError.usage("\(image): rebase changes qcow2 images; this one is \(top.driver.info.format)") }
                    let new = backing.isEmpty ? nil : try ImageOpener.open(path: PathName.resolve(backing, relativeTo: image), options: .init(writable: false, format: newFormat))
                    defer { try? new?.close() }
                    copied = try copyDifferences(top, new: new)
                    try top.flush()
                    try top.close()
                } catch { try? top.close(); throw error }
            }
            if Self.testPauseBeforeHeader > 0 { usleep(Self.testPauseBeforeHeader) }
            let header = try QCOW2Header.read(from: file)
            _ = try header.rewritingBacking(file, name: backing, format: backing.isEmpty ? nil : newFormat?.rawValue ?? backingFormat)
            if !quiet && !unsafe && copied.written + copied.zeroed > 0 && progress {
                printError("rawmount: \(image): \(copied.written) bytes copied, \(copied.zeroed) zeroed")
            }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode.failure
        }
    }

    /// Tests only: a pause after the copy, before the header names the new backing file.
    static let testPauseBeforeHeader: UInt32 = getenv("RAWMOUNT_TEST_REBASE_PAUSE_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    /// Where `top` holds nothing itself, the old chain's bytes (read through `top`) against
    /// the new chain's (zeros without one): what differs is written into `top` (zeros as
    /// zeros), in runs, by the copy `convert -B` uses.
    private func copyDifferences(_ top: BlockDevice, new: BlockDevice?) throws -> ImageCopy.Totals {
        var ranges: [(offset: UInt64, length: UInt64)] = []
        let size = top.virtualSize
        var pos: UInt64 = 0
        while pos < size {
            let m = try top.driver.map(pos, maxLength: size - pos)
            let n = min(max(m.length, 1), size - pos)
            if case .unallocated = m {
                if let last = ranges.last, last.offset + last.length == pos { ranges[ranges.count - 1].length += n } else { ranges.append((pos, n)) }
            }
            pos += n
        }
        let bar = Progress(total: ranges.reduce(0) { $0 + $1.length }, enabled: progress && !quiet && isatty(STDERR_FILENO) == 1)
        defer { bar.finish() }
        return try ImageCopy(source: top, destination: top, ranges: ranges, against: new).run { _, read in bar.show(read) }
    }
}
