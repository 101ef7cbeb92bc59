import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount compare A B`, as `qemu-img compare`: the guest disks, not the files.
struct CompareCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Compare two images' guest disks, as qemu-img compare does (any formats rawmount reads).",
        discussion: "Prints \"Images are identical.\" or \"Content mismatch at offset N!\" (N: the first differing 512-byte sector). "
            + "Images of different sizes are identical when the larger one reads as zeros past the smaller one's end, unless --strict. "
            + "Ranges both images hold no data for are not read. Exit status as qemu-img's: 0 identical, 1 different, 2 an image "
            + "cannot be opened, 3 a read failed." + Examples.section("compare"))

    @Option(name: [.customShort("f")], help: "Format of the first image; probed when omitted.") var format1: String?
    @Option(name: [.customShort("F")], help: "Format of the second image; probed when omitted.") var format2: String?
    @Flag(name: [.customShort("s"), .long], help: "Strict: different sizes, or data in one where the other has none, are a difference.") var strict = false
    @Flag(name: [.customShort("q"), .long], help: "Print nothing; the exit status says it.") var quiet = false
    @Flag(name: [.customShort("p"), .long], help: "Show progress on the terminal.") var progress = false
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no image locks.") var forceShare = false
    @Argument(help: "The first image.", completion: .file()) var image1: String
    @Argument(help: "The second image.", completion: .file()) var image2: String

    static let piece = 1 << 20

    func run() throws {
        let a: BlockDevice, b: BlockDevice
        do {
            a = try ImageOpener.open(path: image1, options: .init(writable: false, format: try parseFormat(format1), lock: !forceShare))
            do { b = try ImageOpener.open(path: image2, options: .init(writable: false, format: try parseFormat(format2), lock: !forceShare)) } catch {
                try? a.close(); throw error
            }
        } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode(2)
        }
        defer { try? a.close(); try? b.close() }
        func say(_ text: String) { if !quiet { print(text) } }
        do {
            if a.virtualSize != b.virtualSize {
                if strict { say("Strict mode: Image size mismatch!"); throw ExitCode(1) }
                say("Warning: Image size mismatch!")
            }
            let common = min(a.virtualSize, b.virtualSize)
            let bar = Progress(total: max(a.virtualSize, b.virtualSize), enabled: progress && isatty(STDERR_FILENO) == 1)
            if let at = try firstDifference(a, b, upTo: common, bar) { say("Content mismatch at offset \(at)!"); throw ExitCode(1) }
            let larger = a.virtualSize > b.virtualSize ? a : b
            if let at = try firstNonZero(larger, from: common, bar) { say("Content mismatch at offset \(at)!"); throw ExitCode(1) }
            bar.finish()
            say("Images are identical.")
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode(3)
        }
    }

    /// The first differing 512-byte sector of the two disks below `end`, or nil.
    private func firstDifference(_ a: BlockDevice, _ b: BlockDevice, upTo end: UInt64, _ bar: Progress) throws -> UInt64? {
        let x = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096)
        let y = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096)
        defer { x.deallocate(); y.deallocate() }
        var pos: UInt64 = 0
        while pos < end {
            let sa = try a.status(pos, maxLength: min(end - pos, UInt64(Self.piece)))
            let sb = try b.status(pos, maxLength: min(end - pos, UInt64(Self.piece)))
            let n = min(sa.length, sb.length)
            if strict && sa.data != sb.data {
                if !quiet { print("Strict mode: Offset \(pos) block status mismatch!") }
                throw ExitCode(1)
            }
            if sa.data || sb.data {
                let bx = UnsafeMutableRawBufferPointer(rebasing: x[0..<Int(n)]), by = UnsafeMutableRawBufferPointer(rebasing: y[0..<Int(n)])
                try a.read(into: bx, at: pos)
                try b.read(into: by, at: pos)
                if memcmp(bx.baseAddress!, by.baseAddress!, Int(n)) != 0 {
                    var i = 0
                    while i < Int(n), bx[i] == by[i] { i += 1 }
                    return (pos + UInt64(i)) / 512 * 512
                }
            }
            pos += n
            bar.show(pos)
        }
        return nil
    }

    /// The first sector at or after `from` of `d` that does not read as zeros, or nil.
    private func firstNonZero(_ d: BlockDevice, from start: UInt64, _ bar: Progress) throws -> UInt64? {
        let x = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096)
        defer { x.deallocate() }
        var pos = start
        while pos < d.virtualSize {
            let s = try d.status(pos, maxLength: min(d.virtualSize - pos, UInt64(Self.piece)))
            if s.data {
                let bx = UnsafeMutableRawBufferPointer(rebasing: x[0..<Int(s.length)])
                try d.read(into: bx, at: pos)
                if let i = bx.firstIndex(where: { $0 != 0 }) { return (pos + UInt64(i)) / 512 * 512 }
            }
            pos += s.length
            bar.show(pos)
        }
        return nil
    }
}
